"""Structured answers: choices, regex and JSON-schema constraints on the decode. The automaton
is checked against Python's `re`; the constrained answers of the shipped checkpoint must fit for
every prompt and equal the unconstrained answer whenever that one already fits."""

import json
import re

import numpy as np
import pytest

from setok.data.items import eval_items
from setok.errors import InputError
from setok.runtime.guided import Dfa, schema_regex

PATTERNS = [r"\d+", r"(red|blue) (circle|square)", r"[a-c]{2,3}x?", r"[^0-9]*", r"a.b", r"(?:ab)+|c", r"[\w-]+",
            r"x{0,2}", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", r"(yes|no)(, (yes|no))*", r"[a-z ]{1,5}"]


def _matches(pattern: str, text: str) -> bool:
    d = Dfa(pattern)
    s = d.start
    for ch in text:
        s = d.step(s, ch)
        if s == 0:
            return False
    return d.accepts(s)


def test_the_automaton_accepts_what_re_fullmatch_accepts():
    rng = np.random.default_rng(0)
    alphabet = list("abcx019 -.,yesnoredblu")
    for p in PATTERNS:
        texts = ["".join(rng.choice(alphabet, rng.integers(0, 7))) for _ in range(300)]
        texts += ["12", "red circle", "abcx", "ab", "abab", "a-b_c", "xx", "-1.5", "yes, no, yes", "a b"]
        for t in texts:
            # leading whitespace is free (answers are stripped)
            assert _matches(p, t) == (re.fullmatch(rf"\s*(?:{p})", t) is not None), (p, t)


def test_schemas_compile_to_their_json_texts():
    cases = {
        json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5},
                                                    "c": {"enum": ["red", "blue"]}}}):
            (['{"n": 3, "c": "red"}'], ['{"n": 6, "c": "red"}', '{"c": "red", "n": 3}']),
        json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}):
            (["[]", "[true]", "[true, false]"], ["[true, true, true]", "[1]"]),
        json.dumps({"type": "string", "maxLength": 3}): (['"ab"', '"a\\"b"'], ['"abcd"', "ab"]),
        json.dumps({"type": "number"}): (["-1.5e3", "0", "2.25"], ["01", "1."]),
        json.dumps({"anyOf": [{"type": "null"}, {"const": 7}]}): (["null", "7"], ["8"]),
    }
    for schema, (good, bad) in cases.items():
        p = schema_regex(json.loads(schema))
        assert all(_matches(p, t) for t in good), (schema, good)
        assert not any(_matches(p, t) for t in bad), (schema, bad)
        for t in good:
            json.loads(t)


@pytest.mark.parametrize("bad, needle", [
    ({"regex": "(ab"}, "missing"), ({"regex": "a{3,1}"}, "repeat"), ({"choices": []}, "choices"),
    ({"choices": "yes"}, "choices"), ({"schema": {"type": "date"}}, "not supported"),
    ({"choices": ["a"], "regex": "a"}, "at most one"),
])
def test_bad_constraints_are_clear_errors(shipped, bad, needle):
    with pytest.raises(InputError, match=needle):
        shipped.answer(np.zeros((64, 64, 3), np.uint8), "how many objects are there", **bad)


def test_a_constraint_the_vocabulary_cannot_spell_is_refused(shipped):
    # the shipped tokenizer has no '"': a JSON string can never be written
    with pytest.raises(InputError, match="no answer of this bundle's tokenizer can match"):
        shipped.answer(np.zeros((64, 64, 3), np.uint8), "what color", schema={"type": "string"})


CONSTRAINTS = [
    ("choices", {"choices": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ("count", {"schema": {"type": "integer", "minimum": 1, "maximum": 5}}, lambda t: 1 <= json.loads(t) <= 5),
    ("boolean", {"schema": {"type": "boolean"}}, lambda t: isinstance(json.loads(t), bool)),
    ("regex", {"regex": r"[a-z]+ [a-z]+"}, lambda t: re.fullmatch(r"[a-z]+ [a-z]+", t) is not None),
    ("colors", {"choices": ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"]},
     lambda t: t in ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white")),
]


@pytest.mark.parametrize("name, kwargs, fits", CONSTRAINTS, ids=[c[0] for c in CONSTRAINTS])
def test_constrained_answers_fit_for_every_prompt(shipped, name, kwargs, fits):
    fitted = 0
    for it in eval_items(8, seed=41):
        vt = shipped.tokenize(it.image)
        for q, _ in it.qa[:3] + [("what color is the background", "")]:
            free = shipped.answer(vt, q)
            got = shipped.answer(vt, q, **kwargs)
            assert got.complete and fits(got.text), (q, got.text)
            assert got.value == (json.loads(got.text) if "schema" in kwargs else got.text)
            if _parses(free.text, kwargs) and fits(free.text):
                fitted += 1
                assert got.token_ids == free.token_ids, (q, free.text, got.text)  # the constraint changed nothing
    if name in ("choices", "count"):
        assert fitted > 0, "no unconstrained answer fitted: the equality half of the test never ran"


def _parses(text: str, kwargs: dict) -> bool:
    if "schema" not in kwargs:
        return True
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_sampled_constrained_answers_fit_too(shipped):
    it = eval_items(1, seed=42)[0]
    vt = shipped.tokenize(it.image)
    for seed in range(5):
        t = shipped.answer(vt, "how many objects are there", temperature=3.0, seed=seed,
                           schema={"type": "integer", "minimum": 1, "maximum": 5})
        assert 1 <= t.value <= 5
