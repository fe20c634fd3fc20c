"""What robotics apps embedding the runtime rely on: threads, deadlines, encode once ask many."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from setok.data.items import eval_items
from setok.errors import InputError
from setok.runtime import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = Pipeline.open(tiny_bundle)
    p.warmup()
    return p


def test_threads_give_the_serial_answers(pipe):
    items = eval_items(6, seed=41)
    jobs = [(it.image, q) for it in items for q, _ in it.qa[:2]]
    serial = [(pipe.caption(img, max_new_tokens=16).text, pipe.answer(img, q).text) for img, q in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda job: (pipe.caption(job[0], max_new_tokens=16).text, pipe.answer(*job).text), jobs * 2))
    assert threaded == serial * 2


def test_deadline_returns_partial_text_with_a_flag(pipe):
    img = eval_items(1, seed=42)[0].image
    full = pipe.caption(img, max_new_tokens=20)
    cut = pipe.caption(img, max_new_tokens=20, deadline=1e-6)
    assert full.complete and not cut.complete
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(full.token_ids)
    with pytest.raises(InputError, match="deadline"):
        pipe.caption(img, deadline=0)


def test_encode_once_ask_many(pipe):
    it = eval_items(1, seed=43)[0]
    vt = pipe.tokenize(it.image)
    answers = [pipe.answer(vt, q) for q, _ in it.qa]
    assert [a.text for a in answers] == [pipe.answer(it.image, q).text for q, _ in it.qa]
    for a in answers:  # vision stages ran once: each answer reports the same encoder time, no re-run
        assert a.timings["encoder"] == vt.timings["encoder"]
    assert set(vt.timings) == {"preprocess", "encoder", "cluster", "merger"}, "asking does not touch the Tokens"


def test_warmup_and_lazy_open(tiny_bundle):
    p = Pipeline.open(tiny_bundle)
    assert p._backends == {}, "opening loads no session"
    p.warmup()
    assert {"encoder", "cluster", "merger", "llm"} <= set(p._backends)
    assert isinstance(p.caption(np.zeros((64, 64, 3), np.uint8), max_new_tokens=2).text, str)
