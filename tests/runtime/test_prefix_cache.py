"""The prompt-prefix KV cache of a frame loop: same outputs as without it, hits counted, bounded."""

import threading

import numpy as np
import pytest

from setok.data.items import eval_items
from setok.runtime import Pipeline
from setok.runtime.prefix_cache import PrefixCache


def test_lru_eviction_is_bounded():
    c = PrefixCache(2)
    c.put((1,), "a")
    c.put((2,), "b")
    assert c.get((1,)) == "a"  # (1,) is now the most recent
    c.put((3,), "c")
    assert (2,) not in c and (1,) in c and (3,) in c and len(c) == 2
    assert c.get((2,)) is None
    assert c.stats() == {"entries": 2, "max_entries": 2, "hits": 1, "misses": 1, "evictions": 1}
    off = PrefixCache(0)
    off.put((1,), "a")
    assert len(off) == 0


@pytest.fixture(scope="module")
def pipes(shipped_bundle):
    cached = Pipeline.open(shipped_bundle, threads=1, prefix_cache=2)
    plain = Pipeline.open(shipped_bundle, threads=1, prefix_cache=0)
    yield cached, plain
    cached.close()
    plain.close()


def test_a_frame_loop_with_the_cache_answers_as_without_it(pipes):
    cached, plain = pipes
    q = "how many objects are there"
    frames = eval_items(12, seed=51)
    answers = set()
    for i, it in enumerate(frames):
        a, b = cached.answer(it.image, q), plain.answer(it.image, q)
        assert a.token_ids == b.token_ids, i
        assert a.cached_tokens == (0 if i == 0 else len(cached.encode("question " + q)) + 2) and b.cached_tokens == 0
        answers.add(a.text)
        c, d = cached.caption(it.image), plain.caption(it.image)
        assert c.token_ids == d.token_ids
    assert len(answers) > 1  # the frames' answers differ: equality above is not trivially true
    s = cached.prefix_cache.stats()
    assert s["hits"] == 2 * len(frames) - 2 and s["misses"] == 2 and s["entries"] == 2


def test_the_cache_stays_bounded_and_evicts_the_oldest(pipes):
    cached, _ = pipes
    img = eval_items(1, seed=52)[0].image
    before = cached.prefix_cache.stats()["evictions"]
    for q in ("is there a red circle", "is there a blue square", "what color is the background"):
        cached.answer(img, q)
    s = cached.prefix_cache.stats()
    assert s["entries"] == 2 and s["evictions"] - before >= 1


def test_threads_share_the_cache_and_get_the_serial_answers(pipes):
    cached, plain = pipes
    q = "how many objects are there"
    frames = [it.image for it in eval_items(8, seed=53)]
    serial = [plain.answer(f, q).token_ids for f in frames]
    out = [None] * len(frames)

    def work(i):
        out[i] = cached.answer(frames[i], q).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(frames))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == serial and len({tuple(s) for s in serial}) > 1


def test_a_negative_size_is_refused(shipped_bundle):
    from setok.errors import InputError

    with pytest.raises(InputError, match="prefix_cache"):
        Pipeline.open(shipped_bundle, prefix_cache=-1)
    np.testing.assert_equal(Pipeline.open(shipped_bundle, prefix_cache=0).prefix_cache.max_entries, 0)
