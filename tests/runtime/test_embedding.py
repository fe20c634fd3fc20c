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


def test_threads_give_the_serial_answers(shipped):
    """Four threads on one Pipeline: each (image, question) gets exactly the caption and answer it
    gets alone. On the shipped checkpoint, whose outputs differ between scenes (asserted): with a
    model that says the same for every image, a result handed to the wrong thread would pass."""
    items = eval_items(6, seed=41)
    jobs = [(it.image, q) for it in items for q, _ in it.qa[:2]]

    def run(job):
        caption, answer = shipped.caption(job[0], max_new_tokens=8), shipped.answer(*job)
        return caption.text, caption.token_ids, answer.text, answer.token_ids

    serial = [run(job) for job in jobs]
    assert len({s[0] for s in serial[::2]}) >= 5, "the 6 scenes' captions should differ"
    assert len({s[2] for s in serial}) >= 3, "the 12 answers should differ"
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(run, jobs[::-1] * 2))  # another order than the serial run
    assert threaded == serial[::-1] * 2


def test_deadline_returns_partial_text_with_a_flag(pipe):
    img = eval_items(1, seed=42)[0].image
    # Seeded sampling, hot: the barely trained test model's greedy caption is often just <eos>,
    # and a deadline can only cut a decode that has more than one token to give.
    hot = {"temperature": 3.0, "seed": 0}
    full = pipe.caption(img, max_new_tokens=20, **hot)
    cut = pipe.caption(img, max_new_tokens=20, deadline=1e-6, **hot)
    assert len(full.token_ids) >= 2
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


def test_async_answers_and_stream_match_the_sync_ones(pipe):
    import asyncio

    items = eval_items(3, seed=44)
    jobs = [(it.image, q) for it in items for q, _ in it.qa[:2]]

    async def main():
        answers = await asyncio.gather(*(pipe.answer_async(img, q) for img, q in jobs))
        caption = await pipe.caption_async(items[0].image, max_new_tokens=12)
        pieces = [p async for p in pipe.astream(items[0].image, max_new_tokens=12)]
        return answers, caption, pieces

    answers, caption, pieces = asyncio.run(main())
    assert [a.text for a in answers] == [pipe.answer(img, q).text for img, q in jobs]
    assert "".join(pieces).strip() == caption.text == pipe.caption(items[0].image, max_new_tokens=12).text

    async def bad():
        return [p async for p in pipe.astream(items[0].image, question=" ")]

    with pytest.raises(InputError, match="question"):
        asyncio.run(bad())


def test_http_service_example_answers_like_the_pipeline(pipe, tiny_bundle, tmp_path):
    """examples/http_service.py in a real subprocess, over real HTTP."""
    import base64
    import io
    import json
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    from PIL import Image

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[2] / "examples" / "http_service.py"
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_bundle), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        it = eval_items(1, seed=45)[0]
        buf = io.BytesIO()
        Image.fromarray(it.image).save(buf, format="PNG")
        question = it.qa[0][0]

        def post(route, payload):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        code, out = post("/answer", {"image": base64.b64encode(buf.getvalue()).decode(), "question": question})
        assert code == 200 and out["text"] == pipe.answer(it.image, question).text and out["complete"]
        assert out["num_tokens"] == pipe.tokenize(it.image).num_tokens and out["timings_ms"]["encoder"] > 0
        code, out = post("/answer", {"image": "not base64!", "question": question})
        assert code == 400 and "error" in out
        code, out = post("/answer", {"image": base64.b64encode(buf.getvalue()).decode(), "question": ""})
        assert code == 400 and "question" in out["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_batched_answers_match_one_at_a_time(pipe):
    """Right-padded batched prefill + decode gives each image's own answer (different token counts)."""
    items = eval_items(5, seed=46)
    images = [it.image for it in items]
    questions = [it.qa[i % len(it.qa)][0] for i, it in enumerate(items)]
    vts = pipe.tokenize_batch(images)
    assert [v.num_tokens for v in vts] == [pipe.tokenize(im).num_tokens for im in images]
    for v, im in zip(vts, images):
        np.testing.assert_allclose(v.tokens, pipe.tokenize(im).tokens, rtol=1e-4, atol=1e-4)
    batched = pipe.answer_batch(images, questions, max_new_tokens=8)
    single = [pipe.answer(im, q, max_new_tokens=8) for im, q in zip(images, questions)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    captions = pipe.answer_batch(vts[:2], ["what is here", "how many objects are there"])  # Tokens reused
    assert len(captions) == 2 and "encoder" in captions[0].timings
    with pytest.raises(InputError, match="equal"):
        pipe.answer_batch(images, questions[:2])
