"""Experiment (issue #20, docs/generation.md "The place head"): fine-tune the shipped small checkpoint's
LLM (vision frozen) with a place head (9 cell logits + an (x, y) per cell) at the <target> slots, every
stage-2 loss kept, then judge generation with the regressed dims 0-1 and with the head's, and VQA.
Written before the head was part of the model (Setokim.place); kept as the measurement's record.

    python scripts/place_finetune_probe.py 300      # steps [offset-loss weight, default 1]
"""
import json
import logging
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from setok.data.items import SceneStream, eval_items
from setok.eval.evaluation import evaluate_batch, to_unit
from setok.eval.judge import JUDGE_KEYS, judge_rows
from setok.eval.metrics import psnr
from setok.model import text as T
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim
from setok.train.sequences import task_sequences

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("place_probe")
torch.set_num_threads(2)
torch.manual_seed(0)
STEPS = int(sys.argv[1]); W = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
m = Setokim.from_pretrained("setok/checkpoints/small")
enc = m.cfg.encoder; hd = m.llm.config.hidden_size
head = torch.nn.Sequential(torch.nn.Linear(hd, hd), torch.nn.GELU(), torch.nn.Linear(hd, 27))
m.vision.requires_grad_(False)
params = [p for n, p in m.named_parameters() if not n.startswith("vision.")] + list(head.parameters())
opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
def cell(y):
    c = (y.clamp(0, 0.9999) * 3).long(); return c[:, 1] * 3 + c[:, 0]
def head_loss(h, y):
    out = head(h); logits, off = out[:, :9], out[:, 9:].view(-1, 9, 2); c = cell(y)
    return F.cross_entropy(logits, c) + 10 * F.mse_loss(off[torch.arange(len(h)), c], y), (logits.argmax(1) == c).float().mean()
def place(h):
    out = head(h); c = out[:, :9].argmax(1); return out[:, 9:].view(-1, 9, 2)[torch.arange(len(h)), c]
stream = SceneStream(enc.image_size, seed=321)
t = time.time(); m.train()
for step in range(STEPS):
    items = stream.batch(step, 32)
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), enc)
    with torch.no_grad(): vt = m.vision(px)
    counts = vt.clusters.num_tokens.tolist(); asg = vt.clusters.assignment
    seqs, gens = [], []
    for i, it in enumerate(items):
        rng = random.Random(step * 10007 + i)
        s = task_sequences(m, it, vt.tokens[i, :counts[i]], asg[i], rng); seqs += s; gens.append(s[-1])
    losses = m.losses(seqs)
    batch = m.collate(gens); _, hidden = m.hidden(batch)
    slots = batch.ids == m.ids[T.TARGET]
    y = torch.cat([g.targets[:, :2] for g in gens])
    hl, acc = head_loss(hidden[slots], y)
    loss = losses["lm"] + losses["regress"] + losses.get("seg", 0) + W * hl
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % 25 == 0:
        log.info("step %d %.0fs %s place %.3f cell acc %.3f", step, time.time() - t,
                 {k: round(float(v), 3) for k, v in losses.items()}, float(hl), float(acc))
m.eval()
with torch.no_grad():
    items = eval_items(200, 0, enc.image_size)
    rows = {"shipped_path": {}, "head": {}}; vqa = []
    for i in range(0, 200, 50):
        chunk = items[i:i+50]
        vqa += evaluate_batch(m, chunk)["vqa_accuracy"]
        seqs = [m.generation_prefix(it.caption) for it in chunk]
        new_ids, hiddens = m.greedy(seqs, m.cfg.max_tokens + 3, keep_hidden=True)
        tokens = torch.zeros(len(chunk), m.cfg.max_tokens, m.cfg.merger.token_dim); counts = torch.zeros(len(chunk), dtype=torch.long)
        fixed = tokens.clone()
        for b, (ids, hs) in enumerate(zip(new_ids, hiddens)):
            sl = [hh for tok, hh in zip(ids, hs) if tok == m.ids[T.TARGET]][:m.cfg.max_tokens]
            if sl:
                S = torch.stack(sl); tokens[b, :len(sl)] = m.regress(S); fixed[b, :len(sl)] = tokens[b, :len(sl)]; fixed[b, :len(sl), :2] = place(S)
            counts[b] = max(len(sl), 1)
        px = preprocess(torch.from_numpy(np.stack([it.image for it in chunk])), enc); vt = m.vision(px)
        recon = to_unit(m.vision.reconstruct(vt))
        for name, toks in (("shipped_path", tokens), ("head", fixed)):
            gen = to_unit(m.vision.detokenizer(toks, counts))
            for it, rr, g in zip(chunk, recon, gen):
                for key, values in judge_rows(it.caption, it.image, rr, g).items(): rows[name].setdefault(key, []).extend(values)
                rows[name].setdefault("gen_psnr", []).append(psnr(g, it.image.astype(np.float64) / 255))
    res = {n: {k: round(float(np.mean(v)), 3) for k, v in r.items() if v and (k in JUDGE_KEYS or k == "gen_psnr")} for n, r in rows.items()}
    res["vqa_accuracy_200"] = float(np.mean(vqa)); res["steps"] = STEPS; res["seconds"] = time.time() - t
    print(json.dumps(res, indent=1))
