"""The real-size decode table of docs/quantization.md (issue #17): `setok bench`'s own run per target
(time to first token, RSS, the bandwidth bound) plus a forced greedy decode of DECODE_TOKENS tokens
that ignores <eos>: random-weight LLMs emit <eos> first, so `setok bench` times no decode step at
this size. Targets are interleaved (A B A B) in one process, so their ratios share the machine's state.

usage: python scripts/real_decode.py OUT.json N DECODE_TOKENS TARGET...
       (TARGET: a bundle directory, or a checkpoint directory for PyTorch eager)
"""
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from setok.data.items import eval_items
from setok.eval import bench as B

out, n, steps, targets = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
THREADS = 2

def forced_decode_ort(t, image):
    pipe = t.pipe
    vt = pipe.tokenize(image)
    _, embeds, _ = pipe._prompt_parts(vt, pipe.prompts["question"], q=B.QUESTION)
    dec = pipe._decoder()
    try:
        t0 = time.perf_counter(); logits = dec.step(embeds)[0]; prefill = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            tok = int(logits[0].argmax())
            t0 = time.perf_counter(); logits = dec.step(pipe.embeddings[[tok]][None])[0]; times.append(time.perf_counter() - t0)
    finally:
        dec.close()
    return prefill, times, embeds.shape[1]

def forced_decode_torch(t, image):
    import torch
    from setok.model.encoder import preprocess
    from setok.model.setokim import QUESTION_PROMPT
    m = t.model
    px = preprocess(torch.from_numpy(t._sized(image)[None]), m.cfg.encoder)
    feats = m.vision.encoder(px); c = m.vision.cluster(feats); tokens = m.vision.merger(feats, c.assignment, c.num_tokens)
    k = int(c.num_tokens[0])
    seq = m.prompt(tokens[0, :k], QUESTION_PROMPT, q=B.QUESTION)
    batch = m.collate([seq], left_pad=True)
    t0 = time.perf_counter()
    o = m.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=True)
    prefill = time.perf_counter() - t0
    past, mask, pos, logits = o.past_key_values, batch.attention_mask, batch.position_ids[:, -1:], o.logits[:, -1]
    times = []
    for _ in range(steps):  # HF-style greedy step with its KV cache, exactly as Setokim.greedy, no <eos> stop
        t0 = time.perf_counter()
        nxt = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1); pos = pos + 1
        emb = m.llm.get_input_embeddings()(nxt).unsqueeze(1)
        o = m.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = o.past_key_values, o.logits[:, -1]
        times.append(time.perf_counter() - t0)
    return prefill, times, batch.embeds.shape[1]

import torch; torch.set_num_threads(THREADS)
opened = []
for p in targets:
    before = B._rss_mb()
    t = B.open_target(p, None, THREADS)
    t.open_rss_mb = B._rss_mb() - before
    opened.append(t); print("opened", t.name, round(t.open_rss_mb), "MB", flush=True)
images = [it.image for it in eval_items(n + 1, seed=31)]
rows = [[] for _ in opened]
for i, image in enumerate(images):
    for j, t in enumerate(opened):
        s0 = time.perf_counter(); timings, gen, tok = t.run(image, 8); e2e = time.perf_counter() - s0  # setok bench's own run
        f = forced_decode_torch if isinstance(t, B.TorchTarget) else forced_decode_ort
        prefill, times, plen = f(t, image)
        if i >= 1:
            rows[j].append({"timings": timings, "e2e": e2e, "generated": gen, "tokens": tok, "prefill": prefill, "decode": times, "prompt_len": plen})
    print("image", i, open("/proc/loadavg").read().strip(), flush=True)
bw = B.copy_bandwidth()
res = {"machine": B.machine(), "n": n, "decode_tokens": steps, "threads": THREADS, "copy_bandwidth_gbs": bw,
       "loadavg_end": open("/proc/loadavg").read().strip(), "targets": []}
for t, rs in zip(opened, rows):
    s = B.summarize(t, rs)
    dec = np.array([x for r in rs for x in r["decode"][1:]]) * 1000  # first forced step dropped per image
    s["setok_bench_generated"] = [r["generated"] for r in rs]
    s["forced_decode_ms_per_token"] = float(np.median(dec)); s["forced_decode_p90_ms"] = float(np.percentile(dec, 90))
    s["decode_tokens_per_s"] = 1000 / s["forced_decode_ms_per_token"]
    s["forced_prefill_ms"] = float(np.median([r["prefill"] for r in rs]) * 1000); s["prompt_len"] = rs[0]["prompt_len"]
    s["open_rss_mb"] = round(t.open_rss_mb, 1)
    B.bandwidth_bound(s, getattr(t, "weight_bytes", None), bw)
    res["targets"].append(s)
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out.write_text(json.dumps(res, indent=1))
for s in res["targets"]:
    print(s["name"], "decode tok/s %.2f" % s["decode_tokens_per_s"], "ttft %.0f" % s["ttft_ms"], "frac", s.get("fraction_of_bound"), "open_rss", s["open_rss_mb"])
print("bw", bw, "peak", res["peak_rss_mb"])
