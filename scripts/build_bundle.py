"""The deploy bundle: one reproducible zip that every Cloud Run function is built from.

    PYTHONPATH=. .venv/bin/python scripts/build_bundle.py [--out build/bundle.zip]

The zip holds `main.py` (a copy of functions/main.py: every entry point), the `shared/` package, the
skill catalog `models/catalog.json` and `requirements.txt` (functions/requirements.txt: the serving
pins only). functions-framework loads main.py by path and puts its folder on sys.path, so `shared`
must sit beside it. Tests, caches and local artifacts stay out.

The same sources give the same bytes, hence the same sha256: entries in sorted order, one fixed
timestamp, fixed permissions, fixed compression. Terraform names the uploaded object after that hash,
so a changed bundle, and only a changed bundle, redeploys the functions.

Before writing, the script refuses a bundle that would not serve or would drift from what was
tested: a pin in functions/requirements.txt that is not the root requirements.txt's, a training- or
test-only distribution among them, or a module that imports, at module level, a package that is
neither the standard library, the bundle's own code, nor one the bundle installs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from scripts.command_line import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "bundle.zip"
ROOT_REQUIREMENTS = ROOT / "requirements.txt"
SERVING_REQUIREMENTS = ROOT / "functions" / "requirements.txt"

# (file in the repository, its name in the bundle); shared/ is added file by file below.
SINGLE_FILES: tuple[tuple[str, str], ...] = (
    ("functions/main.py", "main.py"),
    ("functions/requirements.txt", "requirements.txt"),
    ("models/catalog.json", "models/catalog.json"),
)
PACKAGE = "shared"
# Never shipped from inside the package: caches, compiled files and anything test-shaped.
_EXCLUDED_PARTS = frozenset({"__pycache__", "tests", "test", ".mypy_cache", ".pytest_cache"})
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".so", ".log", ".sqlite3")

# The zip format's earliest date: any fixed value works, this one needs no DOS-date arithmetic.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# A regular file, rw-r--r--, whoever builds and whatever their umask.
FILE_ATTRIBUTES = (0o100644 & 0xFFFF) << 16
UNIX_SYSTEM = 3
COMPRESS_LEVEL = 9

# Training, export, tests and type checks: never installed by a function. scipy is not listed because
# xgboost-cpu declares it as a hard dependency (pip installs it either way, so it is pinned instead).
EXCLUDED_DISTRIBUTIONS = frozenset(
    {
        "scikit-learn", "onnx", "onnxmltools", "skl2onnx", "joblib", "threadpoolctl", "ml-dtypes",
        "pytest", "iniconfig", "pluggy", "mypy", "mypy-extensions", "librt", "ast-serialize", "pathspec",
        "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "pyyaml", "psutil",
        "gcp-storage-emulator", "python-hcl2", "lark", "regex",
    }
)
# Imports that are the bundle's own code: the package and the entry point module.
OWN_MODULES = frozenset({PACKAGE, "main"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#.*)?$")


class BundleError(Exception):
    """The bundle cannot be built as it stands; the message says what to fix."""


@dataclass(frozen=True)
class Bundle:
    """A built bundle: where it is, its sha256, its size and how many files it holds."""

    path: Path
    sha256: str
    size: int
    files: int

    def to_dict(self) -> dict[str, object]:
        return {"bundle": str(self.path), "sha256": self.sha256, "bytes": self.size, "files": self.files}


def canonical(name: str) -> str:
    """Returns a distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _shown(path: Path) -> str:
    """Returns the path relative to the repository when it lies inside it (shorter messages)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_pins(path: Path) -> dict[str, str]:
    """Returns {canonical name: version} of a requirements file made of `name==version` lines only;
    raises BundleError on any other requirement (a range or a URL would make the install drift)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise BundleError(f"{_shown(path)}:{number}: {line!r} is not an exact `name==version` pin.")
        name = canonical(match.group(1))
        if name in pins:
            raise BundleError(f"{_shown(path)}:{number}: {match.group(1)} is pinned twice.")
        pins[name] = match.group(2)
    return pins


def check_requirements(serving: Path = SERVING_REQUIREMENTS, root: Path = ROOT_REQUIREMENTS) -> dict[str, str]:
    """Returns the serving pins after checking that each is the root file's pin of the same version and
    that none is a training- or test-only distribution; raises BundleError naming every problem."""
    serving_pins, root_pins = read_pins(serving), read_pins(root)
    problems = []
    for name, version in sorted(serving_pins.items()):
        if name in EXCLUDED_DISTRIBUTIONS:
            problems.append(f"{name} is training- or test-only and must not be deployed")
        elif name not in root_pins:
            problems.append(f"{name}=={version} is not pinned in requirements.txt")
        elif root_pins[name] != version:
            problems.append(f"{name}=={version} differs from requirements.txt's {name}=={root_pins[name]}")
    if problems:
        raise BundleError(f"{_shown(serving)}: " + "; ".join(problems) + ".")
    return serving_pins


def bundle_sources(root: Path = ROOT) -> list[tuple[Path, str]]:
    """Returns (source file, name in the bundle) for every file the bundle holds, sorted by name."""
    entries = [(root / source, name) for source, name in SINGLE_FILES]
    for path in (root / PACKAGE).rglob("*"):
        relative = path.relative_to(root)
        if not path.is_file() or _EXCLUDED_PARTS.intersection(relative.parts):
            continue
        if path.name.startswith((".", "test_")) or path.name.endswith(_EXCLUDED_SUFFIXES):
            continue
        entries.append((path, relative.as_posix()))
    for source, _ in entries:
        if not source.is_file():
            raise BundleError(f"{_shown(source)} is missing; the bundle needs it.")
    return sorted(entries, key=lambda entry: entry[1])


def import_names(distributions: set[str]) -> set[str]:
    """Returns the top-level module names that these installed distributions provide."""
    names = set()
    for module, providers in importlib.metadata.packages_distributions().items():
        if any(canonical(p) in distributions for p in providers):
            names.add(module)
    return names


def module_level_imports(source: str, filename: str) -> list[tuple[int, str]]:
    """Returns (line, top-level module) of every absolute import that runs when the module is imported:
    the module body and class bodies, including `if`/`try`/`with` blocks, but not function bodies
    (lazy imports) nor `if TYPE_CHECKING:` blocks (never run)."""
    found: list[tuple[int, str]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    found.append((node.lineno, node.module.split(".")[0]))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(ast.parse(source, filename=filename).body)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def check_imports(entries: list[tuple[Path, str]], serving_pins: dict[str, str]) -> None:
    """Raises BundleError naming every module-level import of a package the bundle does not install:
    a training-only package imported at module level would fail the function at its first import."""
    allowed = set(sys.stdlib_module_names) | OWN_MODULES | import_names(set(serving_pins))
    problems = []
    for source, name in entries:
        if not name.endswith(".py"):
            continue
        for line, module in module_level_imports(source.read_text(), name):
            if module not in allowed:
                problems.append(f"{name}:{line} imports {module!r} at module level")
    if problems:
        raise BundleError(
            "The bundle would import packages it does not install (move the import into the function "
            "that needs it, or add the package to functions/requirements.txt): " + "; ".join(problems) + "."
        )


def write_zip(entries: list[tuple[Path, str]], out: Path) -> Bundle:
    """Writes the entries as a reproducible zip at `out` (atomically) and returns what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for source, name in entries:
            info = zipfile.ZipInfo(str(PurePosixPath(name)), date_time=FIXED_DATE_TIME)
            info.external_attr = FILE_ATTRIBUTES
            info.create_system = UNIX_SYSTEM
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, source.read_bytes(), compresslevel=COMPRESS_LEVEL)
    partial.replace(out)
    data = out.read_bytes()
    return Bundle(out, hashlib.sha256(data).hexdigest(), len(data), len(entries))


def build(out: Path = DEFAULT_OUT) -> Bundle:
    """Checks the sources and writes the bundle; returns it. Raises BundleError if it would not serve."""
    serving_pins = check_requirements()
    entries = bundle_sources()
    check_imports(entries, serving_pins)
    return write_zip(entries, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the zip (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.out.resolve())
    except BundleError as exc:
        print(f"build_bundle: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(bundle.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
