"""The typed surface: SamplingParams everywhere the decode runs, the context manager, warmup,
separate error classes, answer_batch's hygiene. On the shipped checkpoint (its answers differ
between scenes and its sampled captions differ between seeds)."""

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from setok.data.items import eval_items
from setok.errors import BundleError, InputError, SetokError
from setok.runtime import Pipeline, SamplingParams


@pytest.fixture(scope="module")
def scenes():
    return eval_items(6, seed=31)


def test_sampling_changes_the_output_and_a_seed_fixes_it(shipped, scenes):
    vt = shipped.tokenize(scenes[0].image)
    greedy = shipped.caption(vt, max_new_tokens=16).token_ids
    hot = [shipped.caption(vt, sampling=SamplingParams(temperature=1.5, seed=s, max_new_tokens=16)).token_ids
           for s in range(8)]
    assert len({tuple(h) for h in hot}) >= 3, "sampling at temperature 1.5 gave (nearly) one caption for 8 seeds"
    assert any(h != greedy for h in hot)
    again = [shipped.caption(vt, sampling=SamplingParams(temperature=1.5, seed=s, max_new_tokens=16)).token_ids
             for s in range(8)]
    assert again == hot
    # the old keyword arguments mean the same as the dataclass
    assert shipped.caption(vt, temperature=1.5, seed=3, max_new_tokens=16).token_ids == hot[3]
    # a keyword overrides the dataclass's field; top_k=1 and a tiny top_p are greedy again
    assert shipped.caption(vt, sampling=SamplingParams(temperature=1.5, seed=3), max_new_tokens=16).token_ids == hot[3]
    assert shipped.caption(vt, temperature=1.5, top_k=1, seed=0, max_new_tokens=16).token_ids == greedy
    assert shipped.caption(vt, temperature=1.5, top_p=1e-6, seed=0, max_new_tokens=16).token_ids == greedy


def test_stop_strings_end_the_text_everywhere(shipped, scenes):
    vt = shipped.tokenize(scenes[1].image)
    full = shipped.caption(vt).text
    word = full.split()[2]
    cut = full[: full.index(word)].strip()
    s = SamplingParams(stop=(word,))
    assert shipped.caption(vt, sampling=s).text == cut
    assert shipped.caption(vt, stop=word).text == cut
    assert "".join(shipped.stream(vt, sampling=s)).strip() == cut
    q = "how many objects are there"
    assert shipped.answer_batch([vt], [q], stop="zzz")[0].text == shipped.answer(vt, q).text


@pytest.mark.parametrize("bad, needle", [
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"seed": "x"}, "seed"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_is_a_clear_error(bad, needle):
    with pytest.raises(InputError, match=needle):
        SamplingParams(**bad)


def test_every_decode_entry_point_takes_sampling_params(shipped, scenes):
    vt = shipped.tokenize(scenes[2].image)
    q = scenes[2].qa[0][0]
    s = SamplingParams(temperature=2.0, seed=11, max_new_tokens=6)
    one = shipped.answer(vt, q, sampling=s)
    assert "".join(shipped.stream(vt, q, sampling=s)).strip() == one.text
    assert shipped.answer_batch([vt], [q], sampling=s)[0].token_ids == one.token_ids  # per-row generator

    async def run():
        a = await shipped.answer_async(vt, q, sampling=s)
        c = await shipped.caption_async(vt, sampling=s)
        b = await shipped.answer_batch_async([vt], [q], sampling=s)
        pieces = [p async for p in shipped.astream(vt, q, sampling=s)]
        return a, c, b, pieces

    a, c, b, pieces = asyncio.run(run())
    assert a.token_ids == one.token_ids == b[0].token_ids and "".join(pieces).strip() == one.text
    assert c.token_ids == shipped.caption(vt, sampling=s).token_ids
    with pytest.raises(InputError, match="SamplingParams"):
        shipped.answer(vt, q, sampling={"temperature": 1})


def test_answer_batch_leaves_the_callers_tokens_alone_and_closes_its_decoder(shipped, scenes, monkeypatch):
    vts = [shipped.tokenize(it.image) for it in scenes[:3]]
    before = [dict(vt.timings) for vt in vts]
    texts = shipped.answer_batch(vts, [it.qa[0][0] for it in scenes[:3]])
    assert [vt.timings for vt in vts] == before, "answer_batch wrote into the caller's Tokens.timings"
    assert all("projector" in t.timings and "llm_prefill" in t.timings for t in texts)
    assert len({t.text for t in texts} | {shipped.answer(vts[0], "what color is the background").text}) > 1

    llm = shipped.stage("llm")
    closed = []
    real = llm.decoder

    class Failing:
        def __init__(self, d):
            self.d = d

        def step(self, embeds, mask=None):
            if mask is None:  # the first decode step after the prefill
                raise RuntimeError("device lost")
            return self.d.step(embeds, mask)

        def close(self):
            closed.append(True)
            self.d.close()

    monkeypatch.setattr(llm, "decoder", lambda batch=1: Failing(real(batch)))
    with pytest.raises(RuntimeError, match="device lost"):
        shipped.answer_batch(vts[:2], ["how many objects are there"] * 2)
    assert closed == [True]


def test_context_manager_closes_and_warmup_opens_every_stage(shipped_bundle):
    with Pipeline.open(shipped_bundle, threads=1) as pipe:
        timings = pipe.warmup()
        opened = set(pipe._backends)
        assert {"encoder", "cluster", "merger", "projector", "llm", "seg_head", "regress_head", "detokenizer"} <= opened
        assert {"encoder", "llm_prefill", "llm_decode", "seg_head", "regress_head", "detokenizer"} <= set(timings)
    assert not pipe._backends
    with pytest.raises(RuntimeError, match="closed"):
        pipe.tokenize(np.zeros((64, 64, 3), np.uint8))
    pipe.close()  # twice is harmless


def test_bundle_and_input_errors_are_told_apart(shipped_bundle, tmp_path):
    assert issubclass(BundleError, SetokError) and issubclass(InputError, SetokError)
    assert not issubclass(BundleError, InputError) and not issubclass(InputError, BundleError)
    bad = tmp_path / "b"
    shutil.copytree(shipped_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError):
        Pipeline.open(bad)
    with pytest.raises(InputError):
        Pipeline.open(shipped_bundle).tokenize(np.zeros((4, 4, 7), np.uint8))
    # the CLI prints both as one line and exits 2
    cli = [sys.executable, "-m", "setok.cli"]
    png = tmp_path / "x.png"
    png.write_bytes(b"not a png")
    for args in (["run", str(bad), "--image", str(png)], ["run", str(shipped_bundle), "--image", str(png)]):
        r = subprocess.run(cli + args, check=False, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
