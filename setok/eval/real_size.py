"""The real-size benchmark (documented, not in CI): a Setokim on the towers and LLMs users deploy,
random weights built from `transformers` config classes, through every setok command.

    python -m setok.eval.real_size --shape siglip-qwen2.5-0.5b --out runs/real
    python -m setok.eval.real_size --shape vit-tinyllama-1.1b --out runs/real --steps 0

For each step (train a few steps with the tower frozen, export, lint, parity, bench) it records
wall time and the step's own peak RSS (one child process per step, measured by the OS), plus
bundle and file sizes; the JSON goes to OUT/<shape>/real_size.json. The LLM has its family's full
vocabulary; its tokenizer is a small locally trained one (the embedding is larger than the
tokenizer, as real ones are padded), which changes no cost measured here but the vocabulary's.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Published shapes (the models' config.json), random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "siglip-qwen2.5-0.5b": {
        "tower": ("SiglipVisionConfig", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                              "num_attention_heads": 12, "image_size": 224, "patch_size": 16}),
        "llm": ("Qwen2Config", {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                                    "rope_theta": 1_000_000.0, "tie_word_embeddings": True}),
    },
    "vit-tinyllama-1.1b": {
        "tower": ("ViTConfig", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                    "num_attention_heads": 12, "image_size": 224, "patch_size": 16}),
        "llm": ("LlamaConfig", {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                                    "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                                    "tie_word_embeddings": False}),
    },
}
TOWER_CLASSES = {"SiglipVisionConfig": "SiglipVisionModel", "ViTConfig": "ViTModel"}


def make_dirs(shape: str, root: Path) -> tuple[Path, Path]:
    """The 'pretrained' tower and LLM directories (random weights, a local tokenizer)."""
    import torch
    import transformers as tf

    spec = SHAPES[shape]
    tower, llm = root / "tower", root / "llm"
    torch.manual_seed(0)
    if not (tower / "config.json").is_file():
        name, kw = spec["tower"]
        getattr(tf, TOWER_CLASSES[name])(getattr(tf, name)(**kw)).save_pretrained(tower)
    if not (llm / "config.json").is_file():
        tok = _tokenizer()
        name, kw = spec["llm"]
        model = tf.AutoModelForCausalLM.from_config(getattr(tf, name)(**kw, eos_token_id=tok.eos_token_id))
        model.save_pretrained(llm)
        tok.save_pretrained(llm)
        del model
    return tower, llm


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from setok.data.scenes import text_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(text_corpus(2000, seed=1, size=64), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def measured(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run one setok step as its own process: wall seconds, its peak RSS (MB), its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    peak_kb = int(proc.stderr.strip().splitlines()[-1]) if proc.stderr.strip() else before
    out = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024), "rc": proc.returncode}
    if proc.returncode:
        out["error"] = proc.stderr.strip().splitlines()[-2:] if proc.stderr else []
    log.info("%s: %s", " ".join(cmd[3:5]), out)
    return out | {"stdout": proc.stdout}


def _setok(*args: Any) -> list[str]:
    return [sys.executable, "-m", "setok.cli", *map(str, args)]


def sizes(bundle: Path) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    return {"bundle_mb": round(sum(files.values()) / 2**20), "largest_file_mb": round(max(files.values()) / 2**20),
            "files_mb": {k: round(v / 2**20, 1) for k, v in sorted(files.items()) if v > 2**20}}


def run(shape: str, out: Path, steps: int = 2, n: int = 4) -> dict[str, Any]:
    root = out / shape
    root.mkdir(parents=True, exist_ok=True)
    tower, llm = make_dirs(shape, root)
    ck, bundle = root / "ck", root / "bundle"
    report: dict[str, Any] = {"shape": shape, "steps": {}}
    first = (("train", _setok("train", "--preset", "tiny", "--out", ck, "--steps", steps, "--batch-size", 2,
                              "--encoder", tower, "--llm", llm, "--freeze-encoder")) if steps else
             ("init", [sys.executable, "-m", "setok.eval.real_size", "--init", str(ck), "--tower", str(tower),
                       "--llm", str(llm)]))
    plan = [
        first,
        ("export", _setok("export", ck, "--out", bundle)),
        ("lint", _setok("lint", bundle)),
        ("parity", _setok("parity", ck, bundle, "--n", n, "--json", root / "parity.json")),
        ("bench", _setok("bench", bundle, "--n", n, "--warmup", 1, "--batch", 0, "--json", root / "bench.json")),
        ("decode", [sys.executable, "-m", "setok.eval.real_size", "--decode", str(bundle)]),
    ]
    for name, cmd in plan:
        step = measured(cmd, root)
        stdout = step.pop("stdout")
        report["steps"][name] = step
        if name == "decode" and step["rc"] == 0:
            report["decode"] = json.loads(stdout)
        if name == "export" and step["rc"] == 0:
            report["bundle"] = sizes(bundle)
        _write(root, report)
    if (root / "parity.json").is_file():
        p = json.loads((root / "parity.json").read_text())
        report["parity"] = {"passed": p["passed"], "failures": p["failures"], "end_to_end": p["end_to_end"]}
    if (root / "bench.json").is_file():
        t = json.loads((root / "bench.json").read_text())["targets"][0]
        report["runtime"] = {k: t[k] for k in ("ttft_ms", "decode_tokens_per_s", "e2e_median_ms", "tokens_per_image")}
        report["runtime"]["stages_ms"] = {k: round(v["median_ms"], 2) for k, v in t["stages"].items()}
        report["runtime"]["peak_rss_mb"] = report["steps"]["bench"]["peak_rss_mb"]
    _write(root, report)
    return report


def init_checkpoint(out: Path, tower: Path, llm: Path) -> None:
    """A checkpoint of the assembled model, untrained (`--steps 0`: a 1B LLM's Adam state would not
    fit this machine's memory): exactly what `setok train` starts from."""
    from setok.config import preset
    from setok.model import text as T
    from setok.model.setokim import Setokim
    from setok.train.trainer import tower_config

    cfg = preset("tiny")
    cfg.encoder, cfg.llm.hf_path = tower_config(cfg.encoder, str(tower)), str(llm)
    Setokim(cfg, T.load_pretrained_tokenizer(llm), pretrained=True).save_pretrained(out)


def decode_speed(bundle: Path, prompt: int = 40, steps: int = 32) -> dict[str, float]:
    """The llm stage alone, through the runtime's KV-cache decoder: a `prompt`-token prefill, then
    `steps` greedy steps fed back whatever the argmax is (a barely trained model would end at
    <eos> at once, which measures nothing). Median of 3 runs."""
    import numpy as np

    from setok.runtime import Pipeline

    pipe = Pipeline.open(bundle)
    rng = np.random.default_rng(0)
    embeds = pipe.embeddings[rng.integers(0, len(pipe.embeddings), prompt)][None]
    prefill, decode = [], []
    for _ in range(3):
        dec = pipe.stage("llm").decoder(1)
        start = time.perf_counter()
        logits, _ = dec.step(embeds)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(steps):
            logits, _ = dec.step(pipe.embeddings[[int(logits[0].argmax())]][None])
        decode.append(time.perf_counter() - start)
        dec.close()
    return {"prompt_tokens": prompt, "prefill_ms": round(1000 * float(np.median(prefill)), 1),
            "decode_tokens_per_s": round(steps / float(np.median(decode)), 2)}


def _write(root: Path, report: dict) -> None:
    from setok.io import write_json

    write_json(root / "real_size.json", report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--decode", type=Path, default=None, help="only time the llm stage's decode of this bundle")
    ap.add_argument("--init", type=Path, default=None, help="only write the untrained checkpoint (with --tower, --llm)")
    ap.add_argument("--tower", type=Path)
    ap.add_argument("--llm", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    ap.add_argument("--steps", type=int, default=2, help="training steps (0: an untrained checkpoint)")
    ap.add_argument("--n", type=int, default=4, help="images for parity and bench")
    args = ap.parse_args()
    if args.decode:
        print(json.dumps(decode_speed(args.decode)))
        return
    if args.init:
        init_checkpoint(args.init, args.tower, args.llm)
        return
    if not args.shape:
        ap.error("--shape is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(args.shape, args.out, args.steps, args.n), indent=2))


if __name__ == "__main__":
    main()
