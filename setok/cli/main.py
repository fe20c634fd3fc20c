"""The `setok` command line. Each command parses its flags, imports its library function lazily
(so `setok --help` is instant) and calls it. A SetokError is printed as one line, exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from setok.errors import SetokError
from setok.manifest import ATTENTION_FORMS, EAGER_ATTENTION, LOGITS_FORMS


def user_errors(fn):
    """Print SetokError as `error: ...` on stderr and exit 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SetokError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="setok")
def main(verbose: bool) -> None:
    """setok: a semantic vision tokenizer from PyTorch to ONNX, INT8 and TensorRT."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to write.")
@click.option("--steps", type=int, default=None, help="Total steps (split between the two stages); default per preset.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", default="synthetic", show_default=True, help="'synthetic' or a folder with captions.jsonl.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--tokenizer", type=click.Choice(["setok", "patch", "topk"]), default="setok", show_default=True,
              help="setok: DPC-KNN clusters; patch / topk: the baselines.")
@click.option("--max-minutes", type=float, default=None, help="Wall-clock budget (for same-time baselines).")
@click.option("--ckpt-every", type=int, default=200, show_default=True)
@click.option("--tune-merger", is_flag=True,
              help="Stage 2 also trains the merger and detokenizer (LLM losses + reconstruction); the encoder, "
                   "hence the clustering, stays frozen.")
@click.option("--place-head", is_flag=True,
              help="Generation places each token by a 3x3-cell classification plus a position in the cell, "
                   "instead of regressing its centroid with MSE (docs/generation.md).")
@click.option("--place-steps", type=click.IntRange(1), default=300, show_default=True,
              help="With --place-head: its loss joins only the last N stage-2 steps (from the start it "
                   "crowds out the other losses; N >= the stage-2 steps: all of them).")
@click.option("--place-lr", type=float, default=1.0, show_default=True,
              help="With --place-head: the head's own parameters learn at this constant rate, relative to the "
                   "preset's (the rest stays on the stage's cosine).")
@click.option("--restart-steps", type=int, default=None,
              help="The last N stage-2 steps as a second cosine cycle (peak --restart-lr, to a tenth of it), the vision "
                   "tokenizer frozen and the place head's loss on from its first step (instead of --place-steps/--place-lr).")
@click.option("--restart-lr", type=float, default=0.3, show_default=True,
              help="With --restart-steps: the second cycle's peak rate, relative to the preset's.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Global batch (split over torchrun processes); default per preset.")
@click.option("--encoder", "encoder_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local Hugging Face vision model directory instead of the built-in ViT.")
@click.option("--llm", "llm_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local causal-LM directory instead of the built-in Llama (its own tokenizer is kept).")
@click.option("--freeze-encoder", is_flag=True,
              help="Keep the vision tower's weights as loaded (SeTok trains the tokenizer on a frozen tower).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N or auto (under torchrun, cuda means one GPU per rank).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast the forward passes (weights and optimizer state stay float32).")
@click.option("--compile", is_flag=True,
              help="torch.compile every transformer block: cheaper steps after about 1.5 min of compiling on a "
                   "cold cache (measured on the CPU: docs/generation.md \"Cheaper steps\").")
@click.option("--palette", type=int, default=None,
              help="The detokenizer's colour codes (k-means over the training scenes' object pixels): each pixel is "
                   "classified as background (regressed) or one code's colour; 0: regression only (the preset's default).")
@click.option("--token-bank", type=click.IntRange(0), default=0, show_default=True,
              help="After the last step, keep this many of the model's own tokens of training scenes; each "
                   "generated token's content snaps to its nearest (0: none; `setok bank` adds one later).")
@user_errors
def train(**kw) -> None:
    """Train a Setokim checkpoint (stage 1 vision tokenizer, stage 2 LLM and heads)."""
    from setok.train import TrainOptions
    from setok.train import train as run

    out = run(TrainOptions(**kw))
    click.echo(f"checkpoint written to {out}")


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write here (default: CKPT, in place).")
@click.option("--size", type=click.IntRange(1), default=16384, show_default=True, help="Tokens in the bank.")
@click.option("--scenes", type=click.IntRange(1), default=2000, show_default=True, help="Training scenes to draw them from.")
@click.option("--data", default="synthetic", show_default=True, help="'synthetic' or a folder with captions.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True, help="The training stream's seed.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto: where the tokens are drawn.")
@user_errors
def bank(ckpt: Path, out: Path | None, size: int, scenes: int, data: str, seed: int, device: str) -> None:
    """Add a token bank to a trained checkpoint: generated tokens snap to the nearest real one."""
    from setok.train.bank import add_bank

    click.echo(f"checkpoint written to {add_bank(_checkpoint(ckpt), out, data, size, scenes, seed, device)}")


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Write the fine-tuned checkpoint here.")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--lr", type=click.FloatRange(0, 1e-2, min_open=True), default=3e-4, show_default=True, help="Peak rate of the cosine (to a tenth of it).")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True, help="Images per step.")
@click.option("--seed", type=int, default=321, show_default=True, help="The scene stream's seed.")
@click.option("--data", default="synthetic", show_default=True, help="'synthetic' or a folder with captions.jsonl.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast the forward passes (weights and optimizer state stay float32).")
@click.option("--compile", is_flag=True, help="torch.compile every transformer block (as for `setok train`).")
@user_errors
def finetune(ckpt: Path, out: Path, steps: int, lr: float, batch: int, seed: int, data: str, precision: str,
             compile: bool) -> None:
    """A second cosine cycle of every stage-2 loss over a trained checkpoint, vision frozen."""
    from setok.train.finetune import finetune as run

    out = run(_checkpoint(ckpt), out, steps, lr, batch, seed, data, precision, compile)
    click.echo(f"checkpoint written to {out}")


@main.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the metrics here.")
@click.option("--n", type=click.IntRange(1), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="For a bundle: the runtime backend (tensorrt: an engines directory).")
@user_errors
def eval_(target: Path, json_out: Path | None, n: int, seed: int, backend: str) -> None:
    """Evaluate a checkpoint, or an exported bundle, on held-out synthetic scenes."""
    from setok.eval.evaluation import evaluate_bundle, evaluate_checkpoint
    from setok.io import write_json

    if (target / "manifest.json").is_file() or (target / "engines.json").is_file():
        result = evaluate_bundle(target, n=n, seed=seed, backend=backend)
    else:
        result = evaluate_checkpoint(_checkpoint(target), n=n, seed=seed)
    if json_out:
        write_json(json_out, result)
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="Checkpoint (default: the shipped small one).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("setok-demo"), show_default=True)
@click.option("--n", type=click.IntRange(1), default=100, show_default=True, help="Held-out scenes to evaluate.")
@user_errors
def demo(ckpt: Path | None, out: Path, n: int) -> None:
    """Evaluate a reference checkpoint and show what it does on a few scenes."""
    from setok.cli.demo import run_demo

    run_demo(ckpt, out, n, echo=click.echo)


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--opset", type=click.IntRange(14, 21), default=17, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Override the cluster stage's max_tokens.")
@click.option("--max-context", type=click.IntRange(2), default=None,
              help="Cap the LLM's context (default: its config's max_position_embeddings).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: float16 weights and compute for GPU targets (graph I/O stays float32; the clustering "
                   "stays fp32), validated with fp16 gates.")
@click.option("--llm-attention", type=click.Choice(ATTENTION_FORMS), default=EAGER_ATTENTION, show_default=True,
              help="gqa: the LLM's attention as ONNX Runtime's fused GroupQueryAttention (faster decode on ONNX "
                   "Runtime; TensorRT cannot build it). eager: plain ONNX ops, for every backend.")
@click.option("--llm-logits", type=click.Choice(LOGITS_FORMS), default=None,
              help="newest: the LM head reads only each row's newest token (logits [batch, 1, vocab]; a prefill "
                   "skips the vocabulary-sized head for every other position). Default: newest with "
                   "--llm-attention gqa, all with eager.")
@user_errors
def export(ckpt: Path, out: Path, opset: int, max_tokens: int | None, max_context: int | None, dtype: str,
           llm_attention: str, llm_logits: str | None) -> None:
    """Export every stage of a checkpoint to ONNX, validated against PyTorch, plus manifest.json."""
    from setok.export.onnx import export_bundle

    export_bundle(_checkpoint(ckpt), out, opset=opset, max_tokens=max_tokens, max_context=max_context, dtype=dtype,
                  attention=llm_attention, logits=llm_logits)
    click.echo(f"bundle written to {out}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image file to tokenize.")
@click.option("--ask", default=None, help="A question about the image.")
@click.option("--segment", "expression", default=None, help="A referring expression to segment.")
@click.option("--generate", default=None, help="A caption to draw an image from.")
@click.option("--save-masks", type=click.Path(path_type=Path), default=None, help="PNG of the token masks (and segmentation) on the original image.")
@click.option("--save-image", type=click.Path(path_type=Path), default=None, help="PNG of the generated image.")
@click.option("--letterbox", is_flag=True, help="Pad the image to the model's square instead of center-cropping it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def run(bundle: Path, image: Path | None, ask: str | None, expression: str | None, generate: str | None,
        save_masks: Path | None, save_image: Path | None, letterbox: bool, as_json: bool) -> None:
    """Run a bundle with the torch-free runtime (positions in the image's own pixels)."""
    from setok.cli.run import run_bundle

    result = run_bundle(bundle, image, ask, expression, generate, save_masks, save_image, letterbox)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value}")


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A folder of real photos (any size or mode); default: synthetic scenes.")
@click.option("--n", type=click.IntRange(1), default=32, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True,
              help="The gates to apply: the exported fp32 / fp16 bundle, a calibrated INT8 one, a weight-only int4 LLM.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@user_errors
def parity(ckpt: Path, bundle: Path, images: Path | None, n: int, precision: str, json_out: Path | None) -> None:
    """Check every exported stage, and the whole chain, against PyTorch."""
    from setok.export.parity import format_table, run_parity
    from setok.io import write_json

    if images is not None and not images.is_dir():
        raise SetokError(f"--images {images}: no such folder; expected a folder of image files")
    result = run_parity(_checkpoint(ckpt), bundle, images, n, precision)
    if json_out:
        write_json(json_out, result)
    click.echo(format_table(result))
    if not result["passed"]:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="INT8 bundle directory to write.")
@click.option("--data", default="synthetic", show_default=True, help="'synthetic' or a folder of images.")
@click.option("--n", type=int, default=256, show_default=True, help="Calibration images (at least 8).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--stages", default=None, help="Comma-separated stages to quantize (default: every stage where INT8 applies).")
@click.option("--quantizer", type=click.Choice(["onnxruntime", "modelopt", "dynamic"]), default="onnxruntime", show_default=True,
              help="onnxruntime / modelopt: calibrated explicit Q/DQ (TensorRT and ORT); dynamic: ONNX Runtime CPU INT8.")
@click.option("--auto-exclude", is_flag=True, help="Keep the most sensitive layers in float until the gates hold.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep-slow-int8", is_flag=True, help="Keep INT8 stages even where they are not faster than fp32 here.")
@click.option("--task-gate", type=click.IntRange(0), default=100, show_default=True,
              help="Held-out scenes for the task-accuracy gate (0: skip it).")
@click.option("--trt-version", default=None,
              help="TensorRT that will read the calibration tables (their header); default: the installed one, "
                   "10.3 (JetPack 6) without one.")
@click.option("--target", type=click.Choice(["onnxruntime-cpu", "tensorrt"]), default="onnxruntime-cpu", show_default=True,
              help="What will run the bundle: onnxruntime-cpu keeps what is faster here (Q/DQ, dynamic INT8, MatMulNBits); "
                   "tensorrt keeps Q/DQ where the accuracy gates hold (its speed is not measurable here).")
@click.option("--llm-weights", type=click.Choice(["int4", "int8"]), default=None,
              help="Weight-only quantization of the LLM (MatMulNBits for onnxruntime-cpu, DequantizeLinear->MatMul for tensorrt).")
@click.option("--block-size", type=int, default=32, show_default=True, help="--llm-weights: rows per scale (a power of two >= 16).")
@click.option("--accuracy-level", type=int, default=4, show_default=True,
              help="--llm-weights on onnxruntime-cpu: MatMulNBits accuracy_level (4: int8 compute, the fast CPU path).")
@click.option("--algorithm", type=click.Choice(["rtn", "gptq", "awq"]), default="rtn", show_default=True,
              help="--llm-weights: round-to-nearest, GPTQ on the bundle's own calibration feeds, or ModelOpt's int4 AWQ.")
@click.option("--quantize-lm-head", is_flag=True, help="--llm-weights: quantize the LM head too (default: it stays float).")
@user_errors
def calibrate(bundle: Path, out: Path, data: str, n: int, method: str, stages: str | None, quantizer: str,
              auto_exclude: bool, seed: int, keep_slow_int8: bool, task_gate: int, trt_version: str | None, target: str,
              llm_weights: str | None, block_size: int, accuracy_level: int, algorithm: str, quantize_lm_head: bool) -> None:
    """Calibrate a bundle on real data into explicit Q/DQ INT8 ONNX (+ range files, TensorRT table), and with
    --llm-weights the LLM into weight-only int4/int8."""
    from setok.calibration import calibrate_bundle
    from setok.calibration.ranges import table_version
    from setok.calibration.weights import WeightSpec

    names = [x.strip() for x in stages.split(",") if x.strip()] if stages else None
    spec = WeightSpec(llm_weights, block_size, accuracy_level, algorithm, quantize_lm_head, target) if llm_weights else None
    if spec is not None:
        spec.check()  # before anything is loaded or logged
    with table_version(trt_version) as header:
        report = calibrate_bundle(bundle, out, data=data, n=n, method=method, stages=names, quantizer=quantizer,
                                  auto_exclude=auto_exclude, seed=seed, speed_gate=not keep_slow_int8,
                                  task_gate=task_gate, target=target, llm_weights=spec)
    report["trt_calibration_table"] = f"TRT-{header}"
    click.echo(json.dumps(report, indent=2, default=str))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime-cpu"]), default="tensorrt", show_default=True,
              help="tensorrt: TensorRT's ONNX parser and its quantized forms; onnxruntime-cpu: ORT CPU kernels.")
@click.option("--trt-version", default="10.8", show_default=True, help="TensorRT version the engines will be built with.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@user_errors
def lint(bundle: Path, target: str, trt_version: str, as_json: bool) -> None:
    """Check every node of every stage against the target's operator support (TensorRT's ONNX parser, or
    ONNX Runtime's CPU kernels) and quantized forms; exit 1 on errors."""
    import dataclasses

    from setok.backends.trt.lint import lint_bundle

    findings = lint_bundle(bundle, target=target, trt_version=trt_version)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(str(f))
    errors = sum(f.severity == "error" for f in findings)
    # With --json stdout is the JSON alone (for a parser); the summary goes to stderr.
    click.echo(f"{errors} error(s), {len(findings) - errors} warning(s)", err=as_json)
    if errors:
        sys.exit(1)


@main.command("bench")
@click.argument("targets", nargs=-1, type=click.Path(path_type=Path))
@click.option("--compare", is_flag=True, help="Run several targets interleaved and report e2e_ratio.")
@click.option("--backend", type=click.Choice(["pytorch", "onnxruntime", "tensorrt"]), default=None,
              help="Default: pytorch for a checkpoint, onnxruntime for a bundle.")
@click.option("--n", type=click.IntRange(1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--batch", type=click.IntRange(0), default=4, show_default=True,
              help="Also time BATCH images answered at once (0 or 1: skip).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (default: the runtime's).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="Stacked per-stage latency PNG.")
@click.option("--frame-loop", is_flag=True,
              help="A bundle's frame loop (same question, new frames): time to first token with and without the "
                   "prompt-prefix KV cache.")
@click.option("--decode-tokens", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Also time this many greedy decode steps per image that ignore <eos> (random-weight LLMs answer "
                   "<eos> first); decode tokens/s and the bandwidth bound come from them.")
@click.option("--spin", is_flag=True,
              help="ONNX Runtime threads busy-wait between runs, as the runtime does by default (and the peers): "
                   "faster, but they take the cores from a PyTorch target in the same run.")
@user_errors
def bench_(targets: tuple[Path, ...], compare: bool, backend: str | None, n: int, warmup: int, max_new_tokens: int,
           batch: int, threads: int | None, json_out: Path | None, plot_out: Path | None, frame_loop: bool,
           decode_tokens: int, spin: bool) -> None:
    """Per-stage latency (median, p90), time per decoded token, end-to-end image -> answer."""
    from setok.eval.bench import bench, plot
    from setok.io import write_json

    if not targets or (len(targets) > 1 and not compare):
        raise SetokError(f"got {len(targets)} target(s); expected one, or several with --compare")
    if frame_loop:
        from setok.eval.frame_bench import frame_loop as run_frame_loop

        if len(targets) != 1 or not (targets[0] / "manifest.json").is_file():
            raise SetokError(f"--frame-loop: got {[str(t) for t in targets]}; expected one bundle directory")
        result = run_frame_loop(targets[0], n, warmup, threads)
        if json_out:
            write_json(json_out, result)
        click.echo(json.dumps(result, indent=2))
        return
    result = bench(list(targets), backend, n, warmup, max_new_tokens, batch, threads, decode_tokens, spin)
    if json_out:
        write_json(json_out, result)
    if plot_out:
        plot(result, plot_out)
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def doctor(bundle: Path | None, as_json: bool) -> None:
    """Print the environment (versions, usable providers, TensorRT / GPU, plugin); with BUNDLE, exit
    status says whether it can run here (0 yes, 1 no)."""
    from setok.cli.doctor import check_bundle, environment

    env = environment()
    problems = check_bundle(bundle) if bundle is not None else []
    if bundle is not None:
        env["bundle"] = {"path": str(bundle), "runs_here": not problems, "problems": problems}
    if as_json:
        click.echo(json.dumps(env, indent=2))
    else:
        for key, value in env.items():
            if isinstance(value, dict):
                click.echo(f"{key}:")
                for k, v in value.items():
                    click.echo(f"  {k}: {v if v is not None else 'not installed'}")
            else:
                click.echo(f"{key}: {value}")
    if problems:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Engines directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None)
@click.option("--version-compatible", is_flag=True, help="Engines that load on later TensorRT versions (slower).")
@click.option("--cluster-form", type=click.Choice(["auto", "plugin", "standard"]), default="auto", show_default=True)
@user_errors
def build(bundle: Path, out: Path, precision: str, max_batch: int, timing_cache: Path | None,
          version_compatible: bool, cluster_form: str) -> None:
    """Build one TensorRT engine per stage (needs an NVIDIA GPU and TensorRT)."""
    from setok.backends.trt.build import build_engines

    build_engines(bundle, out, precision, max_batch, timing_cache, version_compatible, cluster_form)
    click.echo(f"engines written to {out}")


@main.command("export-triton")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="With an engines directory: its source bundle.")
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--stage-backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime", show_default=True,
              help="python: each stage runs ONNX Runtime inside Triton's Python backend (a server without "
                   "the onnxruntime backend, such as PyPI's nvidia-pytriton).")
@click.option("--python-env", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A venv every Python-backend model runs in (EXECUTION_ENV_PATH).")
@user_errors
def export_triton_(source: Path, out: Path, device: str, bundle: Path | None, max_new_tokens: int, stage_backend: str,
                   python_env: Path | None) -> None:
    """Write a Triton Inference Server model repository: one model per stage + a Python-backend pipeline."""
    from setok.serve import export_triton

    export_triton(source, out, device=device, max_new_tokens=max_new_tokens, bundle=bundle,
                  stage_backend=stage_backend, python_env=python_env)
    click.echo(f"model repository written to {out}")


@main.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-concurrency", type=click.IntRange(1), default=64, show_default=True,
              help="Requests in flight at once; the next one gets 429 with Retry-After.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Concurrent greedy answers batched into one run (1: no batching).")
@click.option("--api-key", envvar="SETOK_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (or set SETOK_API_KEY).")
@user_errors
def serve_(bundle: Path, host: str, port: int, max_concurrency: int, max_batch: int, api_key: str | None) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    from setok.serve.server import ServeOptions, serve

    click.echo(f"serving {bundle} on http://{host}:{port} (Ctrl-C: stop after the requests in flight)", err=True)
    serve(bundle, ServeOptions(host=host, port=port, max_concurrency=max_concurrency, max_batch=max_batch,
                               api_key=api_key))


@main.group()
def plugin() -> None:
    """The clustering plugin: Triton kernels for the TensorRT plugin of the cluster op."""


@plugin.command("compile")
@click.option("--arch", default="sm_87,sm_89,sm_90", show_default=True, help="Comma-separated GPU architectures (Jetson Orin is sm_87).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--max-patches", type=click.IntRange(1), default=1024, show_default=True, help="Largest N the AOT kernel serves.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--ptx-version", default=None,
              help="PTX ISA of the files (e.g. 8.5); default per --arch: sm_87 -> 8.5 (JetPack 6, CUDA 12.6), "
                   "others -> the installed CUDA runtime's.")
@user_errors
def plugin_compile(arch: str, out: Path, max_patches: int, max_tokens: int, ptx_version: str | None) -> None:
    """Compile the kernels to PTX (and cubin) without a GPU; list kernels and launch parameters."""
    from setok.plugins.compile import compile_kernels

    result = compile_kernels([a.strip() for a in arch.split(",") if a.strip()], out, max_patches, max_tokens,
                             ptx_version)
    click.echo(json.dumps(result, indent=2))


@main.command("gpu-check")
@click.option("--out", type=click.Path(path_type=Path), default=Path("gpu-check"), show_default=True,
              help="Folder for gpu_check.json.")
@click.option("--dry-run", is_flag=True, help="List the checks and check their inputs; run nothing.")
@click.option("--only", default=None, help="Comma-separated checks to run (default: all).")
@user_errors
def gpu_check(out: Path, dry_run: bool, only: str | None) -> None:
    """Check the GPU path on this machine (Triton kernels, AOT PTX, reference model, TensorRT runner; engines
    where TensorRT is installed) in under 8 minutes; JSON report. Exit 1 when a check fails."""
    from setok.cli.gpu_check import plan, run_checks

    names = [x.strip() for x in only.split(",") if x.strip()] if only else None
    report = plan(out) if dry_run else run_checks(out, names)
    click.echo(json.dumps(report, indent=2, default=str))
    if not dry_run and not report["passed"]:
        sys.exit(1)


def _checkpoint(path: Path) -> Path:
    if not path.exists():
        raise SetokError(f"{path}: no such checkpoint directory; expected one written by `setok train`")
    return path


if __name__ == "__main__":
    main()
