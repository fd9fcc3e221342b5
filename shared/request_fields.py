"""Request fields: the type, range and length limit of every field a caller sends, checked before any store sees it.

Every limit is a constant here, and functions/openapi.yaml states the same numbers (tests/test_request_fields.py
compares them). A body is read through `RequestFields`, which collects each problem as `{"field", "problem"}`
and raises them together as one ValidationError; a path or query parameter goes through `parameter`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from shared.errors import ValidationError
from shared.feature_store import MAX_STUDENT_ID_LENGTH

# -- limits ------------------------------------------------------------------------------------------

MAX_SKILL_NAME_LENGTH = 64
MAX_RUN_ID_LENGTH = 100
MAX_CHECK_ID_LENGTH = 64
# Chunk numbers are six digits in task names; the cap also keeps a caller's integer within what the stores hold.
MAX_CHUNK_NUMBER = 999_999
MAX_CHUNK_STUDENTS = 10_000
MAX_WINDOW_DAYS = 90
MAX_WINDOW_MINUTES = MAX_WINDOW_DAYS * 1440
MAX_SKILLS_LISTED = 100  # skill names in one request's `skills` (repeats count; they are read once)
MAX_TASK_ATTEMPT = 1_000  # Cloud Tasks' X-CloudTasks-TaskRetryCount; the queue's own cap is 100 attempts
# An error names at most this many unknown members, each cut to this length: the caller chose both.
MAX_UNKNOWN_FIELDS_NAMED = 5
MAX_UNKNOWN_NAME_SHOWN = 64


# -- rules -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntegerRule:
    """An integer (never a boolean) from `minimum` to `maximum`, both included."""

    minimum: int
    maximum: int

    @property
    def problem(self) -> str:
        return f"must be an integer from {self.minimum} to {self.maximum}"

    def accepts(self, value: object) -> TypeGuard[int]:
        # `type(...) is int` refuses True/False, which are ints to isinstance.
        return type(value) is int and self.minimum <= value <= self.maximum


@dataclass(frozen=True, slots=True)
class TextRule:
    """A string of `min_length` to `max_length` characters that encodes as UTF-8 (a JSON escape can carry a lone
    surrogate, which no store can write) and, with a `pattern`, matches it whole."""

    max_length: int
    min_length: int = 1
    pattern: str | None = None  # a regular expression the whole string must match (no anchors: the spec adds ^...$)
    wording: str | None = None  # the problem as a caller reads it; by default it states the length
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            object.__setattr__(self, "_compiled", re.compile(self.pattern))

    @property
    def problem(self) -> str:
        if self.wording is not None:
            return self.wording
        return f"must be a UTF-8 string of {self.min_length} to {self.max_length} characters"

    def accepts(self, value: object) -> TypeGuard[str]:
        if type(value) is not str or not self.min_length <= len(value) <= self.max_length:
            return False
        if self._compiled is not None and self._compiled.fullmatch(value) is None:
            return False
        return value.isascii() or _encodes(value)


@dataclass(frozen=True, slots=True)
class TextListRule:
    """An array of `min_items` to `max_items` strings, each one accepted by `item`."""

    item: TextRule
    max_items: int
    min_items: int = 0
    wording: str | None = None

    @property
    def problem(self) -> str:
        if self.wording is not None:
            return self.wording
        return f"must be an array of {self.min_items} to {self.max_items} strings"

    def accepts(self, value: object) -> TypeGuard[list[str]]:
        if type(value) is not list or not self.min_items <= len(value) <= self.max_items:
            return False
        accepts = self.item.accepts
        return all(accepts(v) for v in value)


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- the API's fields (functions/openapi.yaml names each one the same) -------------------------------

STUDENT_ID = TextRule(MAX_STUDENT_ID_LENGTH)
SKILL_NAME = TextRule(
    MAX_SKILL_NAME_LENGTH, wording=f"must be a non-empty string of at most {MAX_SKILL_NAME_LENGTH} characters"
)
RUN_ID = TextRule(
    MAX_RUN_ID_LENGTH, pattern="[A-Za-z0-9_-]+", wording=f"must be 1 to {MAX_RUN_ID_LENGTH} letters, digits, '-' or '_'"
)
CHECK_ID = TextRule(
    MAX_CHECK_ID_LENGTH, pattern="[A-Za-z0-9-]+", wording=f"must be 1 to {MAX_CHECK_ID_LENGTH} letters, digits or '-'"
)
CHUNK = IntegerRule(0, MAX_CHUNK_NUMBER)
CHUNK_STUDENT_IDS = TextListRule(
    STUDENT_ID, MAX_CHUNK_STUDENTS, wording=f"must be an array of up to {MAX_CHUNK_STUDENTS} student ids"
)
WINDOW_DAYS = IntegerRule(1, MAX_WINDOW_DAYS)
WINDOW_MINUTES = IntegerRule(1, MAX_WINDOW_MINUTES)
# The drift check needs at least one skill; the canary check reads an empty list as every skill.
DRIFT_SKILLS = TextListRule(
    SKILL_NAME,
    MAX_SKILLS_LISTED,
    min_items=1,
    wording=f"must be a non-empty array of up to {MAX_SKILLS_LISTED} skill names",
)
CANARY_SKILLS = TextListRule(
    SKILL_NAME, MAX_SKILLS_LISTED, wording=f"must be an array of up to {MAX_SKILLS_LISTED} skill names"
)
TASK_ATTEMPT = IntegerRule(0, MAX_TASK_ATTEMPT)

BOOLEAN_PROBLEM = "must be true or false"
OBJECT_PROBLEM = "must be a JSON object"
UNKNOWN_FIELD_PROBLEM = "is not a field of this request"
EMPTY_NAME_PROBLEM = 'has a member named "", which is not a field of this request'


# -- reading a body ----------------------------------------------------------------------------------


class RequestFields:
    """Reads a JSON object's fields one by one, collecting every problem; `done` raises them as one ValidationError.

    A reader returns the field's value. A required field that is absent is a problem; an optional one
    that is absent or null reads as its default. On a problem a reader records it and returns a
    placeholder of the field's type, which the caller never uses: `done` raises first. A member the
    request does not define is a problem too.
    """

    __slots__ = ("body", "problems")

    def __init__(self, body: Any, known: frozenset[str], body_problem: str = OBJECT_PROBLEM) -> None:
        """Raises ValidationError (field `body`) at once if the body is not a JSON object."""
        if type(body) is not dict:
            raise ValidationError([{"field": "body", "problem": body_problem}])
        self.body: dict[str, Any] = body
        self.problems: list[dict[str, str]] | None = None
        if not body.keys() <= known:
            unknown = [name for name in body if name not in known]
            for name in unknown[:MAX_UNKNOWN_FIELDS_NAMED]:
                if name:
                    self.add(_shown(name), UNKNOWN_FIELD_PROBLEM)
                else:  # a field is named by its member's name, and the answer's field names are never empty
                    self.add("body", EMPTY_NAME_PROBLEM)

    def add(self, name: str, problem: str) -> None:
        """Records a problem of the named field."""
        if self.problems is None:
            self.problems = []
        self.problems.append({"field": name, "problem": problem})

    def done(self) -> None:
        """Raises ValidationError naming every field with a problem, if any has one."""
        if self.problems:
            raise ValidationError(self.problems)

    def integer(self, name: str, rule: IntegerRule) -> int:
        """Returns the required integer field."""
        value = self.body.get(name)
        if rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return rule.minimum

    def optional_integer(self, name: str, rule: IntegerRule) -> int | None:
        """Returns the integer field, or None when it is absent or null."""
        value = self.body.get(name)
        if value is None or rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return None

    def text(self, name: str, rule: TextRule) -> str:
        """Returns the required string field."""
        value = self.body.get(name)
        if rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return ""

    def optional_text(self, name: str, rule: TextRule) -> str | None:
        """Returns the string field, or None when it is absent or null."""
        value = self.body.get(name)
        if value is None or rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return None

    def boolean(self, name: str, default: bool = False) -> bool:
        """Returns the boolean field, or `default` when it is absent or null."""
        value = self.body.get(name)
        if value is True or value is False:
            return value
        if value is None:
            return default
        self.add(name, BOOLEAN_PROBLEM)
        return default

    def texts(self, name: str, rule: TextListRule) -> list[str]:
        """Returns the required array-of-strings field."""
        value = self.body.get(name)
        if rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return []

    def optional_texts(self, name: str, rule: TextListRule) -> list[str] | None:
        """Returns the array-of-strings field, or None when it is absent or null."""
        value = self.body.get(name)
        if value is None or rule.accepts(value):
            return value
        self.add(name, rule.problem)
        return None

    def array(self, name: str, problem: str, min_items: int = 1) -> list[Any]:
        """Returns the required array field of at least `min_items` items (its items are checked by its owner;
        how many it may hold is the owner's too, where too many is a 413 rather than a malformed field)."""
        value = self.body.get(name)
        if type(value) is list and len(value) >= min_items:
            return value
        self.add(name, problem)
        return []

    def mapping(self, name: str, problem: str) -> dict[str, Any]:
        """Returns the required object field (its members are checked by its owner, e.g. a skill's feature schema)."""
        value = self.body.get(name)
        if type(value) is dict:
            return value
        self.add(name, problem)
        return {}


def _shown(name: str) -> str:
    """Returns an unknown member's name as an error names it, cut short."""
    return name if len(name) <= MAX_UNKNOWN_NAME_SHOWN else name[:MAX_UNKNOWN_NAME_SHOWN] + "..."


# -- path and query parameters -----------------------------------------------------------------------


def parameter(name: str, value: str, rule: TextRule) -> str:
    """Returns a path or query parameter that the rule accepts; raises ValidationError naming it otherwise."""
    if rule.accepts(value):
        return value
    raise ValidationError([{"field": name, "problem": rule.problem}])


def header_integer(value: str | None, rule: IntegerRule, default: int) -> int:
    """Returns a header's decimal integer within the rule, or `default` for a header that is absent or is not one
    (headers set by the platform are informational: a malformed one must not fail the request)."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > len(str(rule.maximum)):
        return default
    number = int(value)
    return number if rule.accepts(number) else default
