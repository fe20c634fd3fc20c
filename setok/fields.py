"""A JSON document checked field by field: specs (Scalar, Nullable, ListOf, Record) that raise
FieldError naming the field by its path (`stages.llm.inputs[0].shape`), what it holds and what it
should hold. The manifest and engines.json readers build their schemas from these (no torch)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-<>]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FieldError(Exception):
    """A field that is not what its spec expects; the reader turns it into its own error class."""

    def __init__(self, where: str, expected: str, got: Any = None, missing: bool = False):
        self.where = where or "the document"
        super().__init__(f"{self.where} is missing; expected {expected}" if missing
                         else f"{self.where}: got {describe(got)}; expected {expected}")


def describe(value: Any) -> str:
    """A short, one-line, ASCII rendering of a JSON value and its kind: `a string "x"`, `null`."""
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object")]
    if value is None:
        return "null"
    kind = next((k for t, k in kinds if isinstance(value, t)), type(value).__name__)
    if isinstance(value, (list, dict)) and not value:
        kind = kind.replace("a list", "an empty list").replace("an object", "an empty object")
    text = _short(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _short(value: Any, depth: int = 0) -> str:
    if isinstance(value, dict):
        if not value or depth > 1:
            return "{...}" if value else "{}"
        items = [f"{json.dumps(str(k))}: {_short(v, depth + 1)}" for k, v in list(value.items())[:3]]
        return "{" + ", ".join(items + (["..."] if len(value) > 3 else [])) + "}"
    if isinstance(value, list):
        if not value or depth > 1:
            return "[...]" if value else "[]"
        return "[" + ", ".join([_short(v, depth + 1) for v in value[:4]] + (["..."] if len(value) > 4 else [])) + "]"
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    return json.dumps(value) if isinstance(value, (int, float, bool)) else repr(value)[:40]


def plain_key(key: str) -> bool:
    """A key that reads as `a.key` in a path (else `a["odd key"]`)."""
    return bool(_SAFE_KEY.fullmatch(key))


def at(where: str, key: Any) -> str:
    """The path of `key` under `where`: `a.b` for a plain key, `a["odd key"]` otherwise, `a[3]` for an index."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if _SAFE_KEY.fullmatch(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


Spec = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Scalar:
    expected: str
    ok: Callable[[Any], bool]

    def __call__(self, value: Any, where: str) -> Any:
        if not self.ok(value):
            raise FieldError(where, self.expected, value)
        return value


def is_int(v: Any) -> bool:
    return type(v) is int  # JSON true/false are not integers here


def integer(lo: int | None = None) -> Scalar:
    return Scalar("an integer" if lo is None else f"an integer >= {lo}", lambda v: is_int(v) and (lo is None or v >= lo))


def number(positive: bool = False) -> Scalar:
    return Scalar("a positive number" if positive else "a finite number",
                  lambda v: type(v) in (int, float) and math.isfinite(v) and (not positive or v > 0))


def one_of(*values: str) -> Scalar:
    return Scalar(f"one of {list(values)}", lambda v: isinstance(v, str) and v in values)


NAME = Scalar("a non-empty string without control characters",
              lambda v: isinstance(v, str) and v != "" and not _CONTROL.search(v))
TEXT = Scalar("a string", lambda v: isinstance(v, str))
BOOLEAN = Scalar("true or false", lambda v: type(v) is bool)
SHA256 = Scalar("a sha256 digest (64 hex digits, 0-9a-f)", lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)))
DIM = Scalar("an integer >= 0 or a dimension name", lambda v: (is_int(v) and v >= 0) or NAME.ok(v))
ANY_OBJECT = Scalar("an object", lambda v: isinstance(v, dict))


@dataclass(frozen=True)
class Nullable:
    spec: Spec

    @property
    def expected(self) -> str:
        return f"{self.spec.expected} or null"

    def __call__(self, value: Any, where: str) -> Any:
        if value is None:
            return None
        try:
            return self.spec(value, where)
        except FieldError as e:
            if e.where == where:  # the value itself, not a field inside it: say null would do too
                raise FieldError(where, self.expected, value) from None
            raise


@dataclass(frozen=True)
class ListOf:
    item: Spec
    min_len: int = 0
    max_len: int | None = None
    what: str = ""  # how the expectation reads, when not "a list of <item>"

    @property
    def expected(self) -> str:
        if self.what:
            return self.what
        if self.max_len is not None:
            n = f"{self.min_len}" if self.max_len == self.min_len else f"{self.min_len} to {self.max_len}"
            return f"a list of {n} items, each {self.item.expected}"
        return f"a {'non-empty ' if self.min_len else ''}list, each item {self.item.expected}"

    def __call__(self, value: Any, where: str) -> list:
        if not isinstance(value, list) or len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            raise FieldError(where, self.expected, value)
        return [self.item(v, at(where, i)) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Record:
    """A JSON object: `fields` name -> (spec, required); other keys are checked by `others`, if given."""

    fields: dict[str, tuple[Spec, bool]]
    others: Spec | None = None
    what: str = ""

    @property
    def expected(self) -> str:
        if self.what:
            return self.what
        need = [k for k, (_, req) in self.fields.items() if req]
        return f"an object with {', '.join(need)}" if need else "an object"

    def __call__(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise FieldError(where, self.expected, value)
        for key, (spec, required) in self.fields.items():
            if key in value:
                spec(value[key], at(where, key))
            elif required:
                raise FieldError(at(where, key), spec.expected, missing=True)
        if self.others is not None:
            for key, v in value.items():
                if key not in self.fields:
                    self.others(v, at(where, key))
        return value
