"""Thousands of inferences through one Pipeline from several threads: each answer is the one that
image gets alone, and memory stays flat.

The shipped checkpoint answers differently for different scenes (asserted below): with a model that
gives every image the same answer, a thread handed another thread's result would still pass.
"""

import resource
import threading

from setok.data.items import eval_items
from setok.runtime import Pipeline

QUESTIONS = ("what is here", "how many objects are there")
MIN_DISTINCT = 3  # of the 8 scenes' answers to each question (the shipped model gives 4 and 6)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_soak_memory_flat_answers_are_each_images_own(shipped_bundle):
    pipe = Pipeline.open(shipped_bundle, threads=1)  # the app runs 4 threads: one ORT thread each
    items = eval_items(8, seed=70)
    jobs = [(it.image, q) for q in QUESTIONS for it in items]  # 16 (image, question) pairs
    serial = [pipe.answer(img, q) for img, q in jobs]
    expected = [(a.text, a.token_ids) for a in serial]
    for q in QUESTIONS:
        answers = {a.text for (_, qq), a in zip(jobs, serial) if qq == q}
        assert len(answers) >= MIN_DISTINCT, (q, answers)  # a mix-up between images would change answers
    for i in range(48):  # warm-up: allocator arenas, ORT caches and the prompt-prefix cache reach their size
        pipe.answer(*jobs[i % len(jobs)])
    base = _rss_mb()
    samples, errors, done = [], [], []

    def worker(offset: int) -> None:
        for i in range(250):
            k = (offset * 5 + i * 3) % len(jobs)  # threads visit the jobs in different orders
            got = pipe.answer(*jobs[k])
            if (got.text, got.token_ids) != expected[k]:
                errors.append((k, got.text, expected[k][0]))
            done.append(k)
            if i % 50 == 0:
                samples.append(_rss_mb())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 1000 and len(set(done)) == len(jobs)
    assert not errors, errors[:3]
    assert max(samples + [_rss_mb()]) - base < 64, (base, samples)  # 1000 calls; a leak of 64 kB/call would show
