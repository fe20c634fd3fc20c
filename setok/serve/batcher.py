"""Micro-batching of concurrent greedy answers into `Pipeline.answer_batch`.

A lane takes the first waiting job, waits at most `window_s` for more (up to `max_batch`), and
runs them as one batched vision pass, one prefill and one decode loop. Greedy decoding makes a
batched answer the answer the same job gets alone (padding counts no position; a test
holds the served answers to serial `Pipeline.answer` calls).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from setok.errors import InputError
from setok.runtime.pipeline import Pipeline, Text, Tokens
from setok.runtime.sampling import cut_at_stop
from setok.serve.generate import Completion, prompt_length

log = logging.getLogger(__name__)

# Two lanes: one batch computes while the next one forms (images decode, requests arrive); on a
# few CPU cores more lanes only make batches contend for the same cores.
LANES = 2


@dataclass(frozen=True)
class Job:
    image: np.ndarray  # (size, size, 3) uint8, already fitted: the runtime skips resizing
    question: str
    max_tokens: int
    stop: tuple[str, ...] = ()


def answer_jobs(pipe: Pipeline, jobs: list[Job]) -> list[Completion | InputError]:
    """Every job's completion (or its InputError); one batched run when there are several."""
    if len(jobs) == 1:
        return [_answer_one(pipe, jobs[0])]
    try:
        vts = pipe.tokenize_batch([j.image for j in jobs])
        texts = pipe.answer_batch(vts, [j.question for j in jobs], max(j.max_tokens for j in jobs))
    except InputError:  # e.g. the longest prompt plus the largest max_tokens overflow: each alone
        return [_answer_one(pipe, j) for j in jobs]
    return [_completion(pipe, j, vt, t) for j, vt, t in zip(jobs, vts, texts)]


def _answer_one(pipe: Pipeline, job: Job) -> Completion | InputError:
    try:
        vt = pipe.tokenize(job.image)
        return _completion(pipe, job, vt, pipe.answer(vt, job.question, max_new_tokens=job.max_tokens))
    except InputError as e:  # this job fails; the others of its batch still get answers
        return e


def _completion(pipe: Pipeline, job: Job, vt: Tokens, text: Text) -> Completion:
    """A batch decodes to the largest max_tokens; each job keeps its own number of tokens."""
    ids = text.token_ids[: job.max_tokens]
    body = text.text if len(ids) == len(text.token_ids) else pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()
    body, stopped = cut_at_stop(body, job.stop)
    finish = "stop" if stopped or len(ids) < job.max_tokens else "length"
    return Completion(body, ids, finish, prompt_length(pipe, job.question, vt.num_tokens), vt.num_tokens, text.timings)


class Batcher:
    """Jobs in, completions out; `run` is called on a worker thread with one batch at a time per lane."""

    def __init__(self, run: Callable[[list[Job]], list], max_batch: int, window_s: float,
                 on_batch: Callable[[list], None] = lambda results: None, lanes: int = LANES):
        self.run, self.max_batch, self.window_s, self.on_batch, self.lanes = run, max_batch, window_s, on_batch, lanes
        self.waiting: deque = deque()  # (job, future), oldest first
        self.arrived: asyncio.Event | None = None
        self.tasks: list[asyncio.Task] = []
        self.executor = ThreadPoolExecutor(lanes, thread_name_prefix="setok-batch")

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        self.arrived = asyncio.Event()
        self.tasks = [asyncio.create_task(self._lane()) for _ in range(self.lanes)]

    async def submit(self, job: Job) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((job, future))
        self.arrived.set()
        return await future

    async def _lane(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            batch = [(job, fut) for job, fut in batch if not fut.done()]  # a client that left is not computed
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [job for job, _ in batch])
            except Exception as e:  # a bug: every waiting request fails with it, the lane lives on
                log.exception("batch of %d failed", len(batch))
                results = [e] * len(batch)
            self.on_batch(results)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_exception(result) if isinstance(result, Exception) else fut.set_result(result)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list:
        """Wait for a job, then up to window_s for more. (An Event, not Queue.get under a timeout:
        a cancelled get may drop an item on Python 3.11.)"""
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        due = loop.time() + self.window_s
        while len(self.waiting) < self.max_batch and (left := due - loop.time()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                break
        return [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]

    async def stop(self) -> None:
        """After the server drained its requests: end the lanes and their threads."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=True)
