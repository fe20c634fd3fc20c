"""Structured answers: the decode may only pick tokens that keep the text inside a language
(a list of choices, a regular expression, or a JSON-schema subset). Pure Python and numpy.

A constraint is a regular expression (choices and schemas are compiled to one). It becomes a
Thompson NFA, determinised lazily (a DFA state is a set of NFA states). The tokenizer's vocabulary,
each token as the text it adds to a decode, sits in a trie; walking the trie alongside the DFA gives,
for a DFA state, every token that keeps the text viable and the state it leads to. The DFA states
reachable by whole tokens are explored once up front, and only tokens leading to states from which
an accepted text is still reachable are allowed, so the decode can never paint itself into a
corner; <eos> is allowed exactly in accepting states. Leading whitespace is free (answers are
stripped), so a Metaspace tokenizer's "▁3" fits the pattern "3".

Supported regex: literals and escapes (\\d \\w \\s \\D \\W \\S \\. \\n ...), classes [a-z0-9_] and [^...],
`.`, groups (...) and (?:...), `|`, and the quantifiers * + ? {m} {m,} {m,n}; ^ and $ are implied
(the whole answer must match). Supported schema keywords: type (integer, number, boolean, null,
string, object, array), enum, const, anyOf / oneOf, properties (every property is written, in the
given order), items, minItems / maxItems, minimum / maximum (integers, ranges of up to 1000 values)
and string maxLength / pattern-free strings. The JSON is written as `json.dumps` writes it
(", " and ": " separators).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from setok.errors import InputError
from setok.runtime.regex import MAX_REPEAT, Dfa
from setok.runtime.regex import check as check_regex

MAX_INT_RANGE = 1000


# ---- the tokenizer's vocabulary as a trie ------------------------------------------------------

class TokenIndex:
    """Each token of the tokenizer as the text it adds to a decode, in a trie (built once per
    pipeline). Special tokens and tokens that add no text are never allowed in a constrained decode."""

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        self.vocab_size, self.eos = vocab_size, eos
        n = min(tokenizer.get_vocab_size(), vocab_size)
        anchor = _anchor(tokenizer)
        base = tokenizer.decode([anchor], skip_special_tokens=True)
        self.strings: list[str | None] = [None] * vocab_size
        for i in range(n):
            full = tokenizer.decode([anchor, i], skip_special_tokens=True)
            if full.startswith(base) and len(full) > len(base) and "\ufffd" not in full:
                self.strings[i] = full[len(base):]
        self.root: dict = {}
        for i, s in enumerate(self.strings):
            if s is None:
                continue
            node = self.root
            for ch in s:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(i)  # key None: the tokens ending here
        self.chars = sorted({c for s in self.strings if s for c in s})


def _anchor(tokenizer) -> int:
    """A plain token to decode others after (a Metaspace or byte-level decoder treats the first
    token of a decode specially: its leading space disappears)."""
    for piece in ("a", "x", "e", "1"):
        ids = tokenizer.encode(piece, add_special_tokens=False).ids
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True):
            return ids[0]
    raise InputError("structured answers: the tokenizer encodes none of 'a', 'x', 'e', '1' as one token")


# ---- a compiled constraint ----------------------------------------------------------------------

class Constraint:
    """A pattern against one vocabulary: per DFA state, the allowed tokens and where each leads."""

    def __init__(self, pattern: str, index: TokenIndex, what: str):
        self.pattern, self.index, self.what = pattern, index, what
        self.dfa = Dfa(pattern)
        self.edges: dict[int, dict[int, int]] = {}
        self._explore()

    def _walk(self, d: int) -> dict[int, int]:
        """token id -> DFA state after it, for every token that does not kill the text."""
        out: dict[int, int] = {}
        stack = [(self.index.root, d)]
        while stack:
            node, state = stack.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                nxt = self.dfa.step(state, ch)
                if nxt == 0:
                    continue
                for tok in child.get(None, ()):
                    out[tok] = nxt
                stack.append((child, nxt))
        return out

    def _explore(self) -> None:
        todo = [self.dfa.start]
        while todo:
            d = todo.pop()
            if d in self.edges:
                continue
            self.edges[d] = self._walk(d)
            todo.extend(t for t in self.edges[d].values() if t not in self.edges)
        # live: an accepted text is reachable from there by whole tokens
        live = {d for d in self.edges if self.dfa.accepts(d)}
        changed = True
        while changed:
            changed = False
            for d, nexts in self.edges.items():
                if d not in live and any(t in live for t in nexts.values()):
                    live.add(d)
                    changed = True
        if self.dfa.start not in live:
            raise InputError(f"{self.what}: no answer of this bundle's tokenizer can match it (its tokens spell only "
                             f"{''.join(self.index.chars)!r}); expected a pattern written with those characters")
        v = self.index.vocab_size
        self.allowed: dict[int, np.ndarray] = {}
        self.next: dict[int, dict[int, int]] = {}
        for d in live:
            nexts = {tok: t for tok, t in self.edges[d].items() if t in live}
            mask = np.zeros(v, bool)
            mask[list(nexts)] = True
            if self.dfa.accepts(d):
                mask[self.index.eos] = True
            self.allowed[d], self.next[d] = mask, nexts

    def guide(self) -> Guide:
        return Guide(self)


class Guide:
    """One decode's position in a constraint."""

    def __init__(self, c: Constraint):
        self.c, self.state = c, c.dfa.start

    def allowed(self) -> np.ndarray:
        return self.c.allowed[self.state]

    def advance(self, tok: int) -> None:
        if tok != self.c.index.eos:
            self.state = self.c.next[self.state][tok]

    @property
    def accepting(self) -> bool:
        return self.c.dfa.accepts(self.state)


# ---- what the caller passes: choices, regex, schema ------------------------------------------------

@dataclass(frozen=True)
class Structure:
    """The compiled request: the pattern, and how the answer text becomes `Text.value`."""

    kind: str  # "choices", "regex" or "schema"
    pattern: str
    spec: Any

    def value(self, text: str) -> Any:
        if self.kind == "schema":
            return json.loads(text)
        return text


def structure(choices: Sequence[str] | None = None, regex: str | None = None,
              schema: dict | None = None) -> Structure | None:
    given = [n for n, v in (("choices", choices), ("regex", regex), ("schema", schema)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InputError(f"got {' and '.join(given)}; expected at most one of choices, regex, schema")
    if choices is not None:
        if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            raise InputError(f"choices: got {choices!r}; expected a non-empty list of non-empty strings")
        return Structure("choices", "|".join(_escape(c.strip()) for c in choices), tuple(choices))
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise InputError(f"regex: got {regex!r}; expected a non-empty regular expression string")
        check_regex(regex)  # errors name the position
        return Structure("regex", regex, regex)
    if not isinstance(schema, dict):
        raise InputError(f"schema: got {type(schema).__name__}; expected a JSON schema object")
    return Structure("schema", schema_regex(schema), schema)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}-" else c for c in text)


_JSON_STRING_CHAR = r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt])'


def schema_regex(schema: Any, where: str = "schema") -> str:
    """A JSON-schema subset -> a regex of its JSON texts (json.dumps' separators)."""
    if not isinstance(schema, dict):
        raise InputError(f"{where}: got {schema!r}; expected a schema object")
    if "const" in schema:
        return _escape(json.dumps(schema["const"]))
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise InputError(f"{where}.enum: got {schema['enum']!r}; expected a non-empty list")
        return "(?:" + "|".join(_escape(json.dumps(v)) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            subs = schema[key]
            if not isinstance(subs, list) or not subs:
                raise InputError(f"{where}.{key}: got {subs!r}; expected a non-empty list of schemas")
            return "(?:" + "|".join(schema_regex(s, f"{where}.{key}[{i}]") for i, s in enumerate(subs)) + ")"
    kind = schema.get("type")
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and hi is not None:
            if not (isinstance(lo, int) and isinstance(hi, int)) or hi < lo or hi - lo >= MAX_INT_RANGE:
                raise InputError(f"{where}: minimum {lo!r} .. maximum {hi!r}; expected integers at most "
                                 f"{MAX_INT_RANGE} apart")
            return "(?:" + "|".join(str(v) for v in range(lo, hi + 1)).replace("-", "\\-") + ")"
        if lo is not None or hi is not None:
            if lo is not None and isinstance(lo, int) and lo >= 0 and hi is None:
                if lo > 1:
                    raise InputError(f"{where}: minimum {lo} without maximum; only minimum 0 or 1 is supported alone")
                return "(?:[1-9][0-9]*)" if lo == 1 else "(?:0|[1-9][0-9]*)"
            raise InputError(f"{where}: a maximum without a minimum is not supported; give both")
        return "(?:\\-?(?:0|[1-9][0-9]*))"
    if kind == "number":
        return "(?:\\-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+\\-]?[0-9]+)?)"
    if kind == "boolean":
        return "(?:true|false)"
    if kind == "null":
        return "null"
    if kind == "string":
        n = schema.get("maxLength")
        if n is not None and not (isinstance(n, int) and 0 <= n <= MAX_REPEAT):
            raise InputError(f"{where}.maxLength: got {n!r}; expected 0..{MAX_REPEAT}")
        lo = schema.get("minLength", 0)
        if not (isinstance(lo, int) and 0 <= lo <= (n if n is not None else MAX_REPEAT)):
            raise InputError(f"{where}.minLength: got {lo!r}; expected 0..{n if n is not None else MAX_REPEAT}")
        return '"' + _JSON_STRING_CHAR + "{" + str(lo) + "," + ("" if n is None else str(n)) + '}"'
    if kind == "array":
        item = schema_regex(schema.get("items", {"type": "integer"}), f"{where}.items")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not (isinstance(lo, int) and lo >= 0) or (hi is not None and not (isinstance(hi, int) and hi >= lo)):
            raise InputError(f"{where}: minItems {lo!r} / maxItems {hi!r}; expected 0 <= minItems <= maxItems")
        if hi == 0:
            return "\\[\\]"
        rest = "(?:, " + item + "){" + str(max(lo - 1, 0)) + "," + ("" if hi is None else str(hi - 1)) + "}"
        body = item + rest
        return "\\[" + (body if lo >= 1 else "(?:" + body + ")?") + "\\]"
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict) or not props:
            raise InputError(f"{where}.properties: got {props!r}; expected an object of property schemas")
        parts = [_escape(json.dumps(k)) + ": " + schema_regex(v, f"{where}.properties.{k}") for k, v in props.items()]
        return "\\{" + ", ".join(parts) + "\\}"
    raise InputError(f"{where}: type {kind!r} is not supported; expected one of integer, number, boolean, null, "
                     "string, array, object (or enum, const, anyOf)")


class ConstraintCache:
    """Compiled constraints by pattern (bounded: a robot asks with a few fixed schemas)."""

    def __init__(self, index_factory, max_entries: int = 32):
        self._factory, self._index = index_factory, None
        self._cache: dict[str, Constraint] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, s: Structure) -> Constraint:
        with self._lock:
            if self._index is None:
                self._index = self._factory()
            c = self._cache.get(s.pattern)
            if c is None:
                c = Constraint(s.pattern, self._index, s.kind)
                if len(self._cache) >= self.max_entries:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[s.pattern] = c
            return c
