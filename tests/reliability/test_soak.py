"""Thousands of inferences through one Pipeline from several threads: answers identical, memory flat."""

import resource
import threading

from setok.data.items import eval_items
from setok.runtime import Pipeline


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_soak_memory_flat_answers_identical(tiny_bundle):
    pipe = Pipeline.open(tiny_bundle)
    items = eval_items(8, seed=70)
    expected = [pipe.answer(it.image, "how many objects are there").text for it in items]
    for _ in range(50):  # warm-up: allocator arenas and ORT caches reach their steady size
        pipe.answer(items[0].image, "how many objects are there")
    base = _rss_mb()
    samples, errors = [], []

    def worker(offset: int) -> None:
        for i in range(250):
            it = offset + i
            got = pipe.answer(items[it % 8].image, "how many objects are there").text
            if got != expected[it % 8]:
                errors.append((it, got))
            if i % 50 == 0:
                samples.append(_rss_mb())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert max(samples + [_rss_mb()]) - base < 64, (base, samples)  # 1000 calls; a leak of 64 kB/call would show
