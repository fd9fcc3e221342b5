"""The OpenAPI contract (functions/openapi.yaml) as a test oracle: is this answer one the spec documents?"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parent.parent / "functions" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
JSON_MEDIA_TYPE = "application/json"
# The answers to requests no operation serves; every operation refers to the same two.
NOT_FOUND_RESPONSE = "#/components/responses/NotFound"
METHOD_NOT_ALLOWED_RESPONSE = "#/components/responses/MethodNotAllowed"


@functools.cache
def load_spec() -> dict[str, Any]:
    """Returns the spec as parsed from YAML, loaded once per test session."""
    return yaml.safe_load(SPEC_PATH.read_text())


@functools.cache
def json_schema_document() -> dict[str, Any]:
    """Returns the spec with every OpenAPI 3.0 `nullable` rewritten as JSON Schema (Draft 4) types."""
    return to_json_schema(load_spec())


def to_json_schema(node: Any) -> Any:
    """Returns a copy of an OpenAPI 3.0 document or schema that a Draft 4 validator reads the same way.

    `nullable: true` beside `type: X` becomes `type: [X, "null"]` (and admits null into an `enum`);
    OpenAPI ignores `nullable` without a `type`, so such a schema is refused as a spec mistake.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: to_json_schema(value) for key, value in node.items()}
    nullable = converted.get("nullable")
    if isinstance(nullable, bool):
        del converted["nullable"]
        if nullable:
            if "type" not in converted:
                raise ValueError(f"`nullable: true` needs a `type` beside it: {node!r}")
            types = converted["type"] if isinstance(converted["type"], list) else [converted["type"]]
            converted["type"] = [*types, "null"]
            if "enum" in converted and None not in converted["enum"]:
                converted["enum"] = [*converted["enum"], None]
    return converted


def resolve_pointer(document: dict[str, Any], ref: str) -> Any:
    """Returns what a local `#/a/b` reference points at; raises KeyError naming the reference."""
    if not ref.startswith("#/"):
        raise KeyError(f"{ref}: only local references (#/...) are used in this spec")
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise KeyError(f"{ref}: no {token!r}")
    return node


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@functools.cache
def _path_patterns() -> list[tuple[re.Pattern[str], str]]:
    """Returns a regex per spec path; literal paths come before templated ones, so they win."""
    paths = sorted(load_spec()["paths"], key=lambda p: (p.count("{"), p))
    return [(re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(p)) + "$"), p) for p in paths]


def find_path(path: str) -> str | None:
    """Returns the spec path (template) that serves a request path, or None."""
    path = path.split("?", 1)[0]
    for pattern, template in _path_patterns():
        if pattern.match(path):
            return template
    return None


def _response_ref(method: str, path: str, status: int) -> str:
    """Returns the JSON pointer of the response the spec documents for this answer; raises AssertionError."""
    spec = load_spec()
    template = find_path(path)
    if template is None:
        if status != 404:
            raise AssertionError(f"{method} {path}: no spec path matches, so the answer must be 404, not {status}")
        return NOT_FOUND_RESPONSE
    operation = spec["paths"][template].get(method.lower())
    if operation is None:
        if status != 405:
            served = sorted(m.upper() for m in spec["paths"][template] if m in HTTP_METHODS)
            raise AssertionError(
                f"{method} {path}: {template} serves only {served}, so the answer must be 405, not {status}"
            )
        return METHOD_NOT_ALLOWED_RESPONSE
    responses = operation["responses"]
    for key in (str(status), f"{status // 100}XX"):
        if key in responses:
            pointer = f"#/paths/{_escape(template)}/{method.lower()}/responses/{key}"
            response = responses[key]
            return response["$ref"] if "$ref" in response else pointer
    raise AssertionError(
        f"{method} {path}: status {status} is not documented for {template}; documented: {sorted(responses)}"
    )


@functools.cache
def _validator(schema_pointer: str) -> jsonschema.Draft4Validator:
    # The whole spec is the root document, so every `#/components/...` reference resolves inside it;
    # Draft 4 ignores the other members beside a root `$ref`.
    return jsonschema.Draft4Validator({**json_schema_document(), "$ref": schema_pointer})


def _where(error: jsonschema.ValidationError) -> str:
    return "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _describe(error: jsonschema.ValidationError, indent: str = "  ") -> str:
    text = f"{indent}at {_where(error)}: {error.message}"
    if error.context:
        # A oneOf/anyOf failure: say why each alternative failed, since no single one is "the" cause.
        alternatives: dict[int, list[jsonschema.ValidationError]] = {}
        for inner in error.context:
            alternatives.setdefault(int(inner.relative_schema_path[0]), []).append(inner)
        for index, inner_errors in sorted(alternatives.items()):
            branch = error.schema[error.validator][index]
            name = branch.get("$ref", f"alternative {index}") if isinstance(branch, dict) else f"alternative {index}"
            text += f"\n{indent}  not {name}:"
            text += "".join(f"\n{_describe(e, indent + '    ')}" for e in inner_errors)
    return text


def assert_matches_spec(method: str, path: str, status: int, body: Any) -> None:
    """Checks that the spec documents `status` for this request and that `body` matches its JSON schema.

    A path no operation serves must answer 404 with the NotFound response; a method a known path does
    not serve must answer 405 with the MethodNotAllowed response. Raises AssertionError saying why not.
    """
    response_ref = _response_ref(method, path, status)
    response = resolve_pointer(load_spec(), response_ref)
    content = response.get("content", {})
    if JSON_MEDIA_TYPE not in content:
        if body is not None:
            raise AssertionError(f"{method} {path} -> {status}: the spec documents no body, got {body!r}")
        return
    schema_pointer = f"{response_ref}/content/{_escape(JSON_MEDIA_TYPE)}/schema"
    errors = sorted(_validator(schema_pointer).iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        problems = "\n".join(_describe(e) for e in errors)
        shown = json.dumps(body)
        shown = shown if len(shown) <= 2000 else shown[:2000] + "..."
        raise AssertionError(
            f"{method} {path} -> {status}: the body does not match {schema_pointer}:\n{problems}\nbody: {shown}"
        )
