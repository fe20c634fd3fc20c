"""The regular expressions structured answers are written in, as automata: a recursive-descent
parser to an AST, a Thompson NFA, and a DFA determinised lazily (a DFA state is a set of NFA
states). Pure Python; `setok.runtime.guided` walks the tokenizer's vocabulary through it.

Supported: literals and escapes (\\d \\w \\s \\D \\W \\S \\. \\n ...), classes [a-z0-9_] and [^...], `.`,
groups (...) and (?:...), `|`, and the quantifiers * + ? {m} {m,} {m,n}; ^ and $ are implied (the
whole text must match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from setok.errors import InputError

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 20_000
MAX_REPEAT = 1000

# ---- regular expressions -> NFA ---------------------------------------------------------------

_DIGIT = ((ord("0"), ord("9")),)
_WORD = ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("_"), ord("_")), (ord("a"), ord("z")))
_SPACE = tuple((ord(c), ord(c)) for c in " \t\n\r\f\v")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


@dataclass(frozen=True)
class CharSet:
    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def __contains__(self, ch: str) -> bool:
        o = ord(ch)
        return any(lo <= o <= hi for lo, hi in self.ranges) != self.negated


ANY = CharSet(((ord("\n"), ord("\n")),), negated=True)


def _lit(ch: str) -> CharSet:
    return CharSet(((ord(ch), ord(ch)),))


class _Parser:
    """Recursive descent over the supported subset -> an AST of tuples."""

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def fail(self, why: str):
        raise InputError(f"regex {self.p!r}: {why} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self):
        if self.p.startswith("^"):
            self.i = 1
        node = self.alt()
        if self.peek() == "$" and self.i == len(self.p) - 1:
            self.i += 1
        if self.i != len(self.p):
            self.fail(f"unexpected {self.peek()!r}")
        return node

    def alt(self):
        options = [self.concat()]
        while self.peek() == "|":
            self.take()
            options.append(self.concat())
        return options[0] if len(options) == 1 else ("alt", options)

    def concat(self):
        items = []
        while self.peek() not in (None, "|", ")") and not (self.peek() == "$" and self.i == len(self.p) - 1):
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            ch = self.take()
            if ch == "*":
                node = ("rep", node, 0, None)
            elif ch == "+":
                node = ("rep", node, 1, None)
            elif ch == "?":
                node = ("rep", node, 0, 1)
            else:
                m = re.match(r"(\d+)(,(\d*))?\}", self.p[self.i:])
                if not m:
                    self.fail("expected {m}, {m,} or {m,n}")
                self.i += m.end()
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
                    self.fail(f"repeat {{{m.group(0)[:-1]}}} is not 0 <= m <= n <= {MAX_REPEAT}")
                node = ("rep", node, lo, hi)
            if self.peek() == "?":  # lazy quantifiers match the same language
                self.take()
        return node

    def atom(self):
        ch = self.take()
        if ch == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("only (...) and (?:...) groups are supported")
            node = self.alt()
            if self.peek() != ")":
                self.fail("missing )")
            self.take()
            return node
        if ch == "[":
            return ("set", self.char_class())
        if ch == ".":
            return ("set", ANY)
        if ch == "\\":
            return ("set", self.escape())
        if ch in "*+?{":
            self.fail(f"nothing to repeat before {ch!r}")
        return ("set", _lit(ch))

    def escape(self) -> CharSet:
        if self.peek() is None:
            self.fail("trailing backslash")
        ch = self.take()
        table = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
                 "s": (_SPACE, False), "S": (_SPACE, True)}
        if ch in table:
            return CharSet(*table[ch])
        if ch == "u":
            code = self.p[self.i:self.i + 4]
            if not re.fullmatch(r"[0-9a-fA-F]{4}", code):
                self.fail("expected \\uXXXX")
            self.i += 4
            return _lit(chr(int(code, 16)))
        return _lit(_ESCAPES.get(ch, ch))

    def char_class(self) -> CharSet:
        negated = self.peek() == "^"
        if negated:
            self.take()
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.peek() is None:
                self.fail("missing ]")
            ch = self.take()
            if ch == "]" and not first:
                break
            first = False
            if ch == "\\":
                s = self.escape()
                if s.negated:
                    self.fail("negated escapes (\\D \\W \\S) inside [...] are not supported")
                if len(s.ranges) != 1 or s.ranges[0][0] != s.ranges[0][1]:
                    ranges.extend(s.ranges)
                    continue
                lo = s.ranges[0][0]
            else:
                lo = ord(ch)
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                hi_ch = self.take()
                hi = self.escape().ranges[0][0] if hi_ch == "\\" else ord(hi_ch)
                if hi < lo:
                    self.fail(f"bad range {chr(lo)}-{chr(hi)}")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return CharSet(tuple(ranges), negated)


class Nfa:
    """Thompson NFA: state i has epsilon edges `eps[i]` and char edges `edges[i]` = [(CharSet, j)]."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[CharSet, int]]] = []

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise InputError(f"constraint too large: more than {MAX_NFA_STATES} automaton states; simplify it")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """A fragment (start, end) for the AST node."""
        kind = node[0]
        if kind == "set":
            a, b = self.new(), self.new()
            self.edges[a].append((node[1], b))
            return a, b
        if kind == "cat":
            a = b = self.new()
            for item in node[1]:
                s, e = self.build(item)
                self.eps[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self.new(), self.new()
            for option in node[1]:
                s, e = self.build(option)
                self.eps[a].append(s)
                self.eps[e].append(b)
            return a, b
        _, sub, lo, hi = node  # "rep"
        a = b = self.new()
        for _ in range(lo):
            s, e = self.build(sub)
            self.eps[b].append(s)
            b = e
        if hi is None:
            s, e = self.build(sub)
            self.eps[b].append(s)
            self.eps[e].append(s)
            end = self.new()
            self.eps[b].append(end)
            self.eps[e].append(end)
            return a, end
        end = self.new()
        for _ in range(hi - lo):
            s, e = self.build(sub)
            self.eps[b].append(s)
            self.eps[b].append(end)
            b = e
        self.eps[b].append(end)
        return a, end


class Dfa:
    """The NFA determinised on demand; state 0 is dead (no text in it can be completed)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.nfa = Nfa()
        # Leading whitespace is free: every answer is stripped.
        start, self.final = self.nfa.build(("cat", [("rep", ("set", CharSet(_SPACE)), 0, None), _Parser(pattern).parse()]))
        self.sets: list[frozenset[int]] = [frozenset()]
        self.ids: dict[frozenset[int], int] = {frozenset(): 0}
        self.moves: dict[tuple[int, str], int] = {}
        self.start = self._id(self._closure({start}))

    def _closure(self, states: set[int]) -> frozenset[int]:
        stack, seen = list(states), set(states)
        while stack:
            for t in self.nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def _id(self, s: frozenset[int]) -> int:
        if s not in self.ids:
            if len(self.sets) >= MAX_DFA_STATES:
                raise InputError(f"constraint too large: more than {MAX_DFA_STATES} automaton states; simplify it")
            self.ids[s] = len(self.sets)
            self.sets.append(s)
        return self.ids[s]

    def step(self, d: int, ch: str) -> int:
        key = (d, ch)
        nxt = self.moves.get(key)
        if nxt is None:
            moved = {t for q in self.sets[d] for cs, t in self.nfa.edges[q] if ch in cs}
            nxt = self._id(self._closure(moved)) if moved else 0
            self.moves[key] = nxt
        return nxt

    def accepts(self, d: int) -> bool:
        return self.final in self.sets[d]


def check(pattern: str) -> None:
    """Raise an InputError naming the position of the first thing `pattern` gets wrong."""
    _Parser(pattern).parse()
