"""`setok bench`: per-stage latency of a checkpoint (PyTorch eager) or a bundle (ONNX Runtime).

Targets are run interleaved (A B A B ...) in one process, so ratios between them survive a
noisy machine; `e2e_ratio` is the median over pairs of each target's end-to-end latency divided
by the first target's.

Decode reads every LLM weight once per token, so its ceiling is memory bandwidth: the result holds
this machine's copy bandwidth (`copy_bandwidth_gbs`, a large numpy copy, read + write bytes, best
of several) and, per target, the LLM weight bytes read per token, the tokens/s that bandwidth allows
(`bound_tokens_per_s`) and the fraction of it the decode reached (`fraction_of_bound`).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from setok.errors import InputError
from setok.runtime.timing import timed

log = logging.getLogger(__name__)

DECODE = "llm_decode"  # the timing of the decode loop (every other timing precedes the first token)
QUESTION = "how many objects are there"


class RuntimeTarget:
    """A bundle (ONNX Runtime) or engines (TensorRT) through the torch-free runtime."""

    def __init__(self, path: Path, backend: str, threads: int | None = None, spin: bool = False):
        from setok.runtime import Pipeline

        start = time.perf_counter()
        # By default no spinning ORT threads: they would steal the cores from the next target in the
        # interleaved loop (PyTorch measured 10x slower beside spinning ORT sessions). `spin`: the
        # runtime's own default (threads busy-wait between runs), for ORT-only runs and the peers,
        # which spin too: sleeping threads cost a wake-up per parallel op (~25 % of an int4 step).
        self.pipe = Pipeline.open(path, backend=backend, spin=spin, threads=threads)
        self.open_seconds = time.perf_counter() - start
        self.name = f"{backend}:{path}"
        self.weight_bytes = bundle_llm_bytes(self.pipe.manifest, path) if backend == "onnxruntime" else None

    def run(self, image: np.ndarray, max_new_tokens: int) -> tuple[dict[str, float], int, int]:
        vt = self.pipe.tokenize(image)
        text = self.pipe.answer(vt, QUESTION, max_new_tokens=max_new_tokens)  # timings include vt's
        return text.timings, len(text.token_ids), vt.num_tokens

    def run_batch(self, images: list[np.ndarray], max_new_tokens: int) -> None:
        self.pipe.answer_batch(self.pipe.tokenize_batch(images), [QUESTION] * len(images), max_new_tokens)

    def forced_decode(self, image: np.ndarray, steps: int) -> tuple[float, list[float], int]:
        """Prefill the question prompt, then `steps` greedy steps that ignore <eos>: (prefill s,
        seconds per step, prompt length). Random-weight LLMs answer <eos> at once, so `run` times
        no decode step at real size."""
        pipe = self.pipe
        _, embeds, _ = pipe.prompt_parts(pipe.tokenize(image), pipe.prompts["question"], q=QUESTION)
        decoder = pipe.decoder()
        try:
            start = time.perf_counter()
            logits = decoder.step(embeds)[0]
            prefill, times = time.perf_counter() - start, []
            for _ in range(steps):
                start = time.perf_counter()
                logits = decoder.step(pipe.embeddings[[int(logits[0].argmax())]][None])[0]  # (1, 1, H) fed back
                times.append(time.perf_counter() - start)
        finally:
            decoder.close()
        return prefill, times, int(embeds.shape[1])


class TorchTarget:
    """A checkpoint in PyTorch eager mode, timed at the same stage boundaries."""

    def __init__(self, path: Path):
        import torch

        from setok.model.setokim import Setokim

        torch.set_grad_enabled(False)
        start = time.perf_counter()
        self.model = Setokim.from_pretrained(path)
        self.open_seconds = time.perf_counter() - start
        self.name = f"pytorch:{path}"
        self.threads = torch.get_num_threads()
        llm = self.model.llm
        # What one decode step reads: every parameter but the input embedding table (a row lookup),
        # unless the LM head is that same table (tied).
        embed = llm.get_input_embeddings().weight
        head = llm.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters()) - (0 if tied else embed.numel() * embed.element_size())

    def _sized(self, image: np.ndarray) -> np.ndarray:
        """The image at the encoder's input size, through the runtime's own resize + centre crop."""
        from setok.runtime.preprocess import prepare

        return prepare(image, self.model.cfg.encoder.image_size).rgb

    def run(self, image: np.ndarray, max_new_tokens: int) -> tuple[dict[str, float], int, int]:
        import torch

        from setok.model.encoder import preprocess
        from setok.model.setokim import QUESTION_PROMPT

        m, t = self.model, {}
        with timed(t, "preprocess"):  # resized to the encoder's input as the runtime does (a real-size tower is 224+)
            px = preprocess(torch.from_numpy(self._sized(image)[None]), m.cfg.encoder)
        with timed(t, "encoder"):
            feats = m.vision.encoder(px)
        with timed(t, "cluster"):
            c = m.vision.cluster(feats)
        with timed(t, "merger"):
            tokens = m.vision.merger(feats, c.assignment, c.num_tokens)
        k = int(c.num_tokens[0])
        with timed(t, "llm_prefill"):  # projector + prefill + decode, as Setokim.greedy runs them
            seq = m.prompt(tokens[0, :k], QUESTION_PROMPT, q=QUESTION)
            ids = m.greedy([seq], max_new_tokens)[0]
        return t, len(ids), k

    def forced_decode(self, image: np.ndarray, steps: int) -> tuple[float, list[float], int]:
        """RuntimeTarget.forced_decode in PyTorch: HF-style greedy steps on its KV cache, as
        Setokim.greedy runs them, without the <eos> stop."""
        import torch

        from setok.model.encoder import preprocess
        from setok.model.setokim import QUESTION_PROMPT

        m = self.model
        vt = m.vision(preprocess(torch.from_numpy(self._sized(image)[None]), m.cfg.encoder))
        batch = m.collate([m.prompt(vt.tokens[0, : int(vt.clusters.num_tokens[0])], QUESTION_PROMPT, q=QUESTION)],
                          left_pad=True)
        start = time.perf_counter()
        out = m.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=True)
        prefill, times = time.perf_counter() - start, []
        mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
        for _ in range(steps):
            start = time.perf_counter()
            mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
            emb = m.llm.get_input_embeddings()(out.logits[:, -1].argmax(-1)).unsqueeze(1)  # (1, 1, H)
            out = m.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
            times.append(time.perf_counter() - start)
        return prefill, times, int(batch.embeds.shape[1])

    def run_batch(self, images: list[np.ndarray], max_new_tokens: int) -> None:
        import torch

        from setok.model.encoder import preprocess
        from setok.model.setokim import QUESTION_PROMPT

        m = self.model
        vt = m.vision(preprocess(torch.from_numpy(np.stack([self._sized(i) for i in images])), m.cfg.encoder))
        seqs = [m.prompt(vt.tokens[i, : int(k)], QUESTION_PROMPT, q=QUESTION) for i, k in enumerate(vt.clusters.num_tokens)]
        m.greedy(seqs, max_new_tokens)


def bundle_llm_bytes(manifest, bundle: Path) -> int | None:
    """Bytes of the decoder stage's graph and its external data: the weights one decode step reads."""
    from setok import manifest as M

    decoders = [s for s in manifest.stages if s.kv_cache.past]
    if not decoders:
        return None
    entry = decoders[0]
    files = [entry.file, *(d["file"] for d in entry.data)]
    return sum(M.inside(Path(bundle), f).stat().st_size for f in files)


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of a large numpy copy (bytes read + bytes written), the best of `repeats`: DRAM bandwidth
    as one process sees it (the array is far larger than any cache)."""
    src = np.ones(mb << 18, np.float32)  # mb MiB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def bandwidth_bound(target: dict, weight_bytes: int | None, bandwidth_gbs: float) -> None:
    """Add the memory-bandwidth bound of decode to one target's summary."""
    if not weight_bytes:
        return
    bound = bandwidth_gbs * 1e9 / weight_bytes
    target["weight_mb_per_token"] = weight_bytes / 2**20
    target["bound_tokens_per_s"] = bound
    target["fraction_of_bound"] = target["decode_tokens_per_s"] / bound if target.get("decode_tokens_per_s") else None


def open_target(path: str | Path, backend: str | None, threads: int | None = None, spin: bool = False):
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint or bundle")
    kinds = {"onnxruntime": "manifest.json", "tensorrt": "engines.json", "pytorch": "model.safetensors"}
    backend = backend or next((b for b, f in kinds.items() if (path / f).is_file()), "pytorch")
    if not (path / kinds[backend]).is_file():
        raise InputError(f"{path}: backend {backend!r} needs a directory with {kinds[backend]}")
    return TorchTarget(path) if backend == "pytorch" else RuntimeTarget(path, backend, threads, spin)


def bench(targets: list[str | Path], backend: str | None = None, n: int = 50, warmup: int = 5,
          max_new_tokens: int = 8, batch: int = 4, threads: int | None = None, decode_tokens: int = 0,
          spin: bool = False) -> dict[str, Any]:
    """decode_tokens > 0: also time that many greedy steps per image that ignore <eos> (a random-weight
    LLM answers <eos> first); decode tokens/s and the bandwidth bound then come from those steps.
    spin: ONNX Runtime's threads busy-wait between runs (the runtime's default; not beside PyTorch)."""
    from setok.data.items import eval_items

    if n < 1 or warmup < 0 or batch < 0:
        raise InputError(f"--n {n} / --warmup {warmup} / --batch {batch}: expected n >= 1, warmup >= 0, batch >= 0")
    opened = []
    for t in targets:
        before = _rss_mb()
        opened.append(open_target(t, backend if len(targets) == 1 else None, threads, spin))
        opened[-1].open_rss_mb = _rss_mb() - before
    images = [it.image for it in eval_items(n + warmup, seed=31)]
    rows: list[list[dict]] = [[] for _ in opened]
    from tqdm.auto import tqdm

    for i, image in enumerate(tqdm(images, desc="bench", unit="image", dynamic_ncols=True)):
        for j, target in enumerate(opened):  # interleaved: A B A B ...
            start = time.perf_counter()
            timings, generated, tokens = target.run(image, max_new_tokens)
            e2e = time.perf_counter() - start
            row = {"timings": timings, "e2e": e2e, "generated": generated, "tokens": tokens}
            if decode_tokens:
                row["prefill"], row["decode"], row["prompt_len"] = target.forced_decode(image, decode_tokens)
            if i >= warmup:
                rows[j].append(row)
    result = {"machine": machine(), "n": n, "warmup": warmup, "max_new_tokens": max_new_tokens, "batch": batch,
              "threads": threads, "spin": spin, "decode_tokens": decode_tokens, "targets": [summarize(t, r) for t, r in zip(opened, rows)]}
    result["copy_bandwidth_gbs"] = copy_bandwidth()
    for target, summary in zip(opened, result["targets"]):
        summary["open_rss_mb"] = round(getattr(target, "open_rss_mb", 0.0), 1)
        bandwidth_bound(summary, getattr(target, "weight_bytes", None), result["copy_bandwidth_gbs"])
    base = np.array([r["e2e"] for r in rows[0]])
    result["e2e_ratio"] = [float(np.median(np.array([r["e2e"] for r in rows[j]]) / base)) for j in range(1, len(rows))]
    prefill = [np.array([r["timings"].get("llm_prefill", 0.0) for r in rs]) for rs in rows]
    # How much faster the first target's prefill is than each other's (SeTok vs the patch baseline).
    result["prefill_speedup"] = [float(np.median(prefill[j] / np.maximum(prefill[0], 1e-9))) for j in range(1, len(rows))]
    if batch > 1:
        _bench_batches(opened, images, batch, warmup, max_new_tokens, result)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _bench_batches(opened, images, batch: int, warmup: int, max_new_tokens: int, result: dict) -> None:
    """End to end for `batch` images at once (one batched vision run, one batched LLM run)."""
    groups = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    skip = min(max(1, warmup // batch), len(groups) - 1)
    times: list[list[float]] = [[] for _ in opened]
    for g, group in enumerate(groups):
        for j, target in enumerate(opened):
            start = time.perf_counter()
            target.run_batch(group, max_new_tokens)
            if g >= skip:
                times[j].append(time.perf_counter() - start)
    for target, ts in zip(result["targets"], times):
        ms = np.array(ts) * 1000
        target["batch"] = {"size": batch, "runs": len(ts), "e2e_median_ms": float(np.median(ms)),
                           "e2e_p90_ms": float(np.percentile(ms, 90)), "per_image_ms": float(np.median(ms) / batch)}


def summarize(target, rows: list[dict]) -> dict[str, Any]:
    stages = {}
    for stage in dict.fromkeys(k for r in rows for k in r["timings"]):  # in the order the stages ran
        ms = np.array([r["timings"].get(stage, 0.0) for r in rows]) * 1000
        stages[stage] = {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}
    e2e = np.array([r["e2e"] for r in rows]) * 1000
    decode_ms = np.array([r["timings"].get(DECODE, 0.0) * 1000 / max(r["generated"], 1) for r in rows])
    # Image in -> first token out: every timing of an answer but the decode loop's.
    ttft = np.array([sum(v for k, v in r["timings"].items() if k != DECODE) for r in rows]) * 1000
    return {
        "name": target.name, "open_seconds": target.open_seconds, "stages": stages,
        "e2e_median_ms": float(np.median(e2e)), "e2e_p90_ms": float(np.percentile(e2e, 90)),
        "decode_ms_per_token": float(np.median(decode_ms)),
        "decode_tokens_per_s": float(1000 / np.median(decode_ms)) if np.median(decode_ms) > 0 else None,
        "ttft_ms": float(np.median(ttft)),
        "tokens_per_image": float(np.mean([r["tokens"] for r in rows])),
        **_forced(rows),
    }


def _forced(rows: list[dict]) -> dict[str, Any]:
    """The forced decode's medians (each image's first step dropped: it pays the first cache growth)."""
    if not rows or "decode" not in rows[0]:
        return {}
    ms = np.array([x for r in rows for x in r["decode"][1:]] or [x for r in rows for x in r["decode"]]) * 1000
    return {"generated": [r["generated"] for r in rows], "forced_decode_ms_per_token": float(np.median(ms)),
            "forced_decode_p90_ms": float(np.percentile(ms, 90)), "decode_tokens_per_s": float(1000 / np.median(ms)),
            "forced_prefill_ms": float(np.median([r["prefill"] for r in rows]) * 1000), "prompt_len": rows[0]["prompt_len"]}


def _rss_mb() -> float:
    """This process's resident set now (Linux), MiB; 0 where /proc is not there."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def plot(result: dict, png: Path) -> None:
    """Per-stage latency as a stacked bar per target."""
    from PIL import Image, ImageDraw

    targets = result["targets"]
    # Pipeline order: timings are recorded (and kept, dicts being ordered) as the stages run.
    stages = list(dict.fromkeys(s for t in targets for s in t["stages"]))
    colors = [tuple(int(c) for c in np.random.default_rng(i).integers(60, 230, 3)) for i in range(len(stages))]
    total = max(sum(t["stages"][s]["median_ms"] for s in t["stages"]) for t in targets) or 1.0
    w, h, bar = 640, 80 + 50 * len(targets), 30
    img = Image.new("RGB", (w, h + 20 * len(stages)), "white")
    draw = ImageDraw.Draw(img)
    for i, t in enumerate(targets):
        x, y = 10.0, 20 + 50 * i
        draw.text((10, y - 14), f"{t['name']}  ({t['e2e_median_ms']:.1f} ms end to end)", fill="black")
        for s, color in zip(stages, colors):
            width = 600 * t["stages"].get(s, {"median_ms": 0})["median_ms"] / total
            draw.rectangle([x, y, x + width, y + bar], fill=color)
            x += width
    for j, (s, color) in enumerate(zip(stages, colors)):
        draw.rectangle([10, h + 20 * j, 24, h + 20 * j + 12], fill=color)
        draw.text((30, h + 20 * j), s, fill="black")
    from setok.io import save_png

    save_png(png, img)
