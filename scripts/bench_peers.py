"""Benchmark two peer runtimes next to setok's INT4 LLM decode (issue #17).

Both peers run the same Hugging Face LLM directory (a random-weight Qwen2.5-0.5B-shaped model with the full
151,936-token vocab), batch 1, ``--threads`` threads (default 2):

* onnxruntime-genai: its model builder makes an INT4 CPU model (MatMulNBits, accuracy_level=4); timed with
  ``og.Model`` / ``og.Generator`` in a separate process (its own peak RSS): ``append_tokens`` of a fixed random
  ``--prompt-tokens`` prompt plus the first ``generate_next_token`` is the prefill, the next ``--decode-tokens``
  ``generate_next_token`` calls are the decode (min_length keeps the random-weight model from stopping at <eos>).
* llama.cpp, built from the C++ source vendored in PyPI's llama-cpp-python sdist: ``convert_hf_to_gguf.py`` to
  F32 GGUF, ``llama-quantize`` to Q4_0, ``llama-bench -p PROMPT -n DECODE -t THREADS -r REPS -o json`` on
  ``q4_0`` (llama.cpp's recipe: the tied embedding / output matrix stays Q8_0), on ``q4_0_pure`` (``--pure``:
  every matrix Q4_0, like genai's INT4 model, whose embedding and lm_head are 4-bit too) and on F32 as a
  reference (unless ``--llama-ref none``). Numbers are medians over the repetitions (the per-run values are kept).

The HF directory's tokenizer is a locally trained one whose pre-tokenizer hash llama.cpp's converter does not
know; the converter is run with ``TextModel.get_vocab_base_pre`` monkeypatched to return the architecture's own
pre-tokenizer ("qwen2"). Tokenization does not enter these timings (both peers get token ids).

Reproduce (WORK=/tmp/peers; every step is skipped when its output exists, so reruns only re-time)::

    # 1. build the peers (what --build does)
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d $WORK/sdist
    tar xzf $WORK/sdist/llama_cpp_python-0.3.36.tar.gz -C $WORK
    cmake -S $WORK/llama_cpp_python-0.3.36/vendor/llama.cpp -B $WORK/llama-build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
        -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    cmake --build $WORK/llama-build -j2 --target llama-bench llama-quantize
    python -m venv --system-site-packages $WORK/genai-venv
    $WORK/genai-venv/bin/pip install onnxruntime-genai==0.18.0 onnx_ir 'transformers>=5'

    # 2. prepare (convert / quantize / build the INT4 model, cached in --work) and time both peers
    python scripts/bench_peers.py --build --llm runs/real/siglip-qwen2.5-0.5b/llm --work $WORK \
        --out $WORK/peers.json [--setok-bench setok_bench.json]

The ISA flags above are what ``--build`` derives from /proc/cpuinfo on the AMD EPYC (AVX2, no AVX-512) VM:
``GGML_NATIVE=OFF`` because a native build's Q4_0 kernels died there with an illegal instruction; AMX is always
off. A genai venv is used because the builder of onnxruntime-genai 0.18 imports transformers 5 classes, while the
main environment keeps transformers 4 (the venv sees the main env's onnxruntime / torch / onnx).

``--setok-bench`` takes the JSON ``setok bench BUNDLE --decode-tokens 32 --threads 2 --json OUT`` writes
(targets[0].decode_tokens_per_s, targets[0].forced_prefill_ms / prompt_len) and adds setok/peer ratios (> 1:
setok faster).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_peers")

LLAMA_CPP_PYTHON = "0.3.36"
GENAI_VERSION = "0.18.0"
GENAI_DEPS = ["onnx_ir", "transformers>=5"]
LLAMA_TARGETS = ["llama-bench", "llama-quantize"]
CMAKE_FIXED = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
# ggml option -> /proc/cpuinfo flags that must all be present
ISA_OPTIONS = {"GGML_SSE42": ["sse4_2"], "GGML_AVX": ["avx"], "GGML_AVX2": ["avx2"], "GGML_FMA": ["fma"],
               "GGML_F16C": ["f16c"], "GGML_BMI2": ["bmi2"], "GGML_AVX_VNNI": ["avx_vnni"],
               "GGML_AVX512": ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
               "GGML_AVX512_VBMI": ["avx512vbmi"], "GGML_AVX512_VNNI": ["avx512_vnni"],
               "GGML_AVX512_BF16": ["avx512_bf16"]}

# Runs convert_hf_to_gguf.py with the main environment's python: the vendored gguf-py / conversion package on
# sys.path, the unknown pre-tokenizer hash mapped to the architecture's own ("qwen2"), and the missing
# tokenizer.model reported as FileNotFoundError (Qwen2's set_vocab then takes the HF BPE path) even where the
# sentencepiece package is not installed (the converter imports it before it looks for the file).
CONVERT_SHIM = """
import os, runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
spm = base.TextModel._set_vocab_sentencepiece
def no_spm(self, *a, **k):
    if not os.path.isfile(os.path.join(self.dir_model, "tokenizer.model")):
        raise FileNotFoundError("no tokenizer.model")
    return spm(self, *a, **k)
base.TextModel._set_vocab_sentencepiece = no_spm
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Runs in the genai venv: argv = model_dir threads prompt_tokens decode_tokens repetitions; prints one JSON line.
GENAI_RUNNER = """
import json, resource, sys, time
import numpy as np
import onnx, onnxruntime, onnxruntime_genai as og
model_dir, threads, n_prompt, n_decode, reps = sys.argv[1], *map(int, sys.argv[2:])
graph = onnx.load(model_dir + "/model.onnx", load_external_data=False).graph
quant = {n.name: {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT} for n in graph.node
         if n.op_type in ("MatMulNBits", "GatherBlockQuantized") and ("lm_head" in n.name or "embed" in n.name)}
del graph
config = og.Config(model_dir)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
start = time.perf_counter()
model = og.Model(config)
load_s = time.perf_counter() - start
vocab = json.load(open(model_dir + "/genai_config.json"))["model"]["vocab_size"]
ids = np.random.default_rng(0).integers(1, vocab, n_prompt).astype(np.int32)
prefill, decode = [], []
for rep in range(reps + 1):  # the first run is a warmup
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n_prompt + n_decode + 1, min_length=n_prompt + n_decode + 1,
                              do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    mid = time.perf_counter()
    for _ in range(n_decode):
        gen.generate_next_token()
    end = time.perf_counter()
    assert len(gen.get_sequence(0)) == n_prompt + n_decode + 1, len(gen.get_sequence(0))
    if rep:
        prefill.append(mid - start)
        decode.append(end - mid)
print(json.dumps({"load_s": load_s, "prefill_s": prefill, "decode_s": decode, "embed_lm_head_quant": quant,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", type=Path, required=True, help="Hugging Face LLM directory (read only)")
    p.add_argument("--work", type=Path, required=True, help="build / model cache directory")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=5, help="timed runs per peer (llama-bench -r)")
    p.add_argument("--setok-bench", type=Path, default=None, help="`setok bench --decode-tokens N --json` output")
    p.add_argument("--build", action="store_true", help="download / build / install the peers first (cached)")
    p.add_argument("--peers", default="genai,llama", help="comma-separated subset of: genai, llama")
    p.add_argument("--llama-src", type=Path, default=None,
                   help=f"llama.cpp source (default WORK/llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp)")
    p.add_argument("--llama-bin", type=Path, default=None, help="llama.cpp binaries (default WORK/llama-build/bin)")
    p.add_argument("--llama-ref", choices=["f32", "none"], default="f32", help="also time the unquantized GGUF")
    p.add_argument("--llama-bench-args", default="",
                   help="extra llama-bench flags, e.g. '--poll 0' (its spinning threads collapse on a busy machine)")
    p.add_argument("--genai-python", type=Path, default=None, help="genai venv python (default WORK/genai-venv)")
    p.add_argument("--convert-python", type=Path, default=Path(sys.executable), help="python for convert_hf_to_gguf")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.llama_src = args.llama_src or args.work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    args.llama_bin = args.llama_bin or args.work / "llama-build" / "bin"
    args.genai_python = args.genai_python or args.work / "genai-venv" / "bin" / "python"
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    return args


def run(cmd: list[Any], logfile: Path, **kw) -> str:
    """Run cmd (stderr, and stdout too, to logfile); return its stdout. Raises on a non-zero exit."""
    out, _ = run_measured(cmd, logfile, **kw)
    return out


def run_measured(cmd: list[Any], logfile: Path, **kw) -> tuple[str, float]:
    """Run cmd; return (stdout, the child's peak RSS in MB, from wait4)."""
    cmd = [str(c) for c in cmd]
    logfile.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join("<code>" if "\n" in c else c for c in cmd)  # the embedded -c programs are in this file
    log.info("$ %s  (log: %s)", shown, logfile)
    with open(logfile, "a") as err:
        err.write(f"\n$ {shown}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, **kw)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.write(out)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}; see {logfile}")
    return out, usage.ru_maxrss / 1024


def cpu_isa_flags() -> list[str]:
    """-DGGML_<ISA>=ON/OFF for what /proc/cpuinfo lists (instead of GGML_NATIVE's -march=native)."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    return [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in ISA_OPTIONS.items()]


def cmake_flags() -> list[str]:
    return CMAKE_FIXED + cpu_isa_flags()


def build_llama(args: argparse.Namespace) -> None:
    """pip download the llama-cpp-python sdist, extract it, cmake-build llama-bench / llama-quantize."""
    logs = args.work / "logs" / "build-llama.log"
    if not args.llama_src.is_dir():
        sdist = args.work / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.is_file():
            run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                 "--no-binary", ":all:", "-d", sdist.parent], logs)
        with tarfile.open(sdist) as tar:
            tar.extractall(args.work, filter="data")
    if all((args.llama_bin / t).is_file() for t in LLAMA_TARGETS):
        return
    build = args.llama_bin.parent
    run(["cmake", "-S", args.llama_src, "-B", build, *cmake_flags()], logs)
    run(["cmake", "--build", build, "-j2", "--target", *LLAMA_TARGETS], logs)


def build_genai(args: argparse.Namespace) -> None:
    """A venv that sees the main environment's packages, plus onnxruntime-genai and its builder's deps."""
    if args.genai_python.exists():
        return
    logs = args.work / "logs" / "build-genai.log"
    venv = args.genai_python.parent.parent
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], logs)
    run([args.genai_python, "-m", "pip", "install", f"onnxruntime-genai=={GENAI_VERSION}", *GENAI_DEPS], logs)


def convert_f32(args: argparse.Namespace) -> Path:
    """--llm as an F32 GGUF (its weights' own precision), converted once into WORK/gguf."""
    f32 = args.work / "gguf" / "llm-f32.gguf"
    if not f32.is_file():
        f32.parent.mkdir(parents=True, exist_ok=True)
        tmp = f32.with_suffix(".tmp")
        run([args.convert_python, "-c", CONVERT_SHIM, args.llama_src, "qwen2", args.llm.resolve(),
             "--outtype", "f32", "--outfile", tmp], args.work / "logs" / "prepare-llama.log")
        tmp.rename(f32)
    return f32


def quantize(args: argparse.Namespace, f32: Path, label: str, extra: list[str]) -> dict[str, Any]:
    """llama-quantize f32 -> Q4_0 once; a sidecar JSON keeps the command and the token_embd type it chose
    (llama.cpp's Q4_0 recipe keeps the tied embedding / output matrix at Q6_K, falling back to Q8_0 for 896
    columns; --pure makes it Q4_0 too)."""
    gguf = args.work / "gguf" / f"llm-{label}.gguf"
    meta = gguf.with_suffix(".json")
    if not (gguf.is_file() and meta.is_file()):
        tmp, logs = gguf.with_suffix(".tmp"), args.work / "logs" / f"prepare-llama-{label}.log"
        logs.unlink(missing_ok=True)
        cmd = [str(args.llama_bin / "llama-quantize"), *extra, str(f32), str(tmp), "Q4_0", str(args.threads)]
        run(cmd, logs)
        tmp.rename(gguf)
        found = re.findall(r"token_embd\.weight .*converting to (\w+)", logs.read_text())
        meta.write_text(json.dumps({"command": " ".join(cmd).replace(str(tmp), str(gguf)),
                                    "token_embd_type": found[-1] if found else None}))
    return {"gguf": gguf, **json.loads(meta.read_text())}


def llama_bench_cmd(args: argparse.Namespace, gguf: Path) -> list[str]:
    return [str(args.llama_bin / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-p",
            str(args.prompt_tokens), "-n", str(args.decode_tokens), "-r", str(args.repetitions), "-o", "json",
            *shlex.split(args.llama_bench_args)]


def bench_llama(args: argparse.Namespace, gguf: Path, label: str) -> dict[str, Any]:
    """llama-bench on one GGUF: its pp (prefill) and tg (decode) rows, as medians over the repetitions
    (llama-bench's own means are kept as *_mean)."""
    cmd, load = llama_bench_cmd(args, gguf), os.getloadavg()
    out, rss = run_measured(cmd, args.work / "logs" / f"bench-llama-{label}.log")
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == args.prompt_tokens and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == args.decode_tokens and r["n_prompt"] == 0)
    return {"decode_tokens_per_s": args.decode_tokens / (median(tg["samples_ns"]) / 1e9),
            "decode_tokens_per_s_mean": tg["avg_ts"], "decode_runs_tokens_per_s": tg["samples_ts"],
            "prefill_ms": median(pp["samples_ns"]) / 1e6, "prefill_ms_mean": pp["avg_ns"] / 1e6,
            "prefill_runs_ms": [round(ns / 1e6, 2) for ns in pp["samples_ns"]], "peak_rss_mb": round(rss, 1),
            "model_mb": round(gguf.stat().st_size / 2**20, 1), "model": str(gguf), "model_type": tg["model_type"],
            "command": " ".join(cmd), "threads": tg["n_threads"], "flash_attn": tg.get("flash_attn"),
            "build_commit": tg["build_commit"], "build_number": tg["build_number"], "cpu_info": tg.get("cpu_info"),
            "loadavg_before": load}


def llama_source_commit(src: Path) -> str | None:
    """The vendored llama.cpp commit recorded in the sdist's submodule metadata (read, not via git)."""
    head = src.parent.parent / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    return head.read_text().strip() if head.is_file() else None


def run_llama(args: argparse.Namespace) -> dict[str, Any]:
    """Q4_0 (llama.cpp's recipe), Q4_0 --pure (every matrix Q4_0), and the F32 reference."""
    f32 = convert_f32(args)
    result: dict[str, Any] = {}
    for label, extra in (("q4_0", []), ("q4_0_pure", ["--pure"])):
        q = quantize(args, f32, label, extra)
        result[label] = {**bench_llama(args, q["gguf"], label), "quantize": q["command"],
                         "token_embd_type": q["token_embd_type"]}
    if args.llama_ref == "f32":
        result["f32"] = bench_llama(args, f32, "f32")
    result["versions"] = {"llama-cpp-python sdist": LLAMA_CPP_PYTHON, "ggml": ggml_version(args.llama_src),
                          "source_commit": llama_source_commit(args.llama_src),
                          "build_commit": result["q4_0"]["build_commit"],
                          "build_number": result["q4_0"]["build_number"]}
    result["prepare"] = {
        "convert": f"{args.convert_python} -c CONVERT_SHIM {args.llama_src} qwen2 {args.llm.resolve()} "
                   f"--outtype f32 --outfile {f32}",
        "pre_tokenizer": "the local tokenizer's hash is unknown to convert_hf_to_gguf: get_vocab_base_pre "
                         "monkeypatched to return 'qwen2' (the architecture's own)",
        "cmake": cmake_flags()}
    return result


def ggml_version(src: Path) -> str | None:
    text = (src / "ggml" / "CMakeLists.txt").read_text()
    parts = [re.search(rf"set\(GGML_VERSION_{p} (\d+)\)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def genai_model(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The INT4 CPU model the genai builder makes from --llm, built once into WORK/genai-int4."""
    out = args.work / "genai-int4"
    cmd = [str(args.genai_python), "-m", "onnxruntime_genai.models.builder", "-i", str(args.llm.resolve()),
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(args.work / "genai-cache"),
           "--extra_options", "accuracy_level=4"]
    if not (out / "genai_config.json").is_file():
        run(cmd, args.work / "logs" / "prepare-genai.log")
    return out, cmd


def dir_mb(path: Path, suffixes: tuple[str, ...] = (".onnx", ".data")) -> float:
    return round(sum(f.stat().st_size for f in path.iterdir() if f.suffix in suffixes) / 2**20, 1)


def run_genai(args: argparse.Namespace) -> dict[str, Any]:
    model, build_cmd = genai_model(args)
    tail = [str(model), str(args.threads), str(args.prompt_tokens), str(args.decode_tokens), str(args.repetitions)]
    load = os.getloadavg()
    out, _ = run_measured([args.genai_python, "-c", GENAI_RUNNER, *tail], args.work / "logs" / "bench-genai.log")
    r = json.loads(out.strip().splitlines()[-1])
    prefill, decode = median(r["prefill_s"]), median(r["decode_s"])
    return {"decode_tokens_per_s": args.decode_tokens / decode, "prefill_ms": prefill * 1000,
            "prefill_runs_ms": [round(s * 1000, 2) for s in r["prefill_s"]],
            "decode_runs_tokens_per_s": [round(args.decode_tokens / s, 2) for s in r["decode_s"]],
            "peak_rss_mb": round(r["peak_rss_mb"], 1), "model_mb": dir_mb(model), "model": str(model),
            "load_s": round(r["load_s"], 2), "build_command": " ".join(build_cmd),
            "command": f"{args.genai_python} -c GENAI_RUNNER {' '.join(tail)}",
            "loadavg_before": load, "session_options": {"intra_op_num_threads": args.threads}, "embed_lm_head_quant": r["embed_lm_head_quant"],
            "versions": {"onnxruntime-genai": r["onnxruntime_genai"], "onnxruntime": r["onnxruntime"]}}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[len(s) // 2] + s[(len(s) - 1) // 2]) / 2


def setok_numbers(path: Path) -> dict[str, Any]:
    """decode tokens/s and prefill (ms, prompt length) of the first target of a `setok bench --json` file."""
    target = json.loads(path.read_text())["targets"][0]
    if not target.get("decode_tokens_per_s"):
        raise ValueError(f"{path}: targets[0].decode_tokens_per_s is empty; run setok bench with --decode-tokens")
    prefill = target.get("forced_prefill_ms", target.get("stages", {}).get("llm_prefill", {}).get("median_ms"))
    return {"file": str(path), "name": target.get("name"), "decode_tokens_per_s": target["decode_tokens_per_s"],
            "prefill_ms": prefill, "prompt_len": target.get("prompt_len"),
            "prefill_source": "forced_prefill_ms" if "forced_prefill_ms" in target else "stages.llm_prefill"}


def ratios(setok: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    """setok / peer decode tokens/s, and peer / setok prefill ms (> 1: setok faster in both)."""
    out: dict[str, Any] = {}
    genai, llama = peers.get("onnxruntime_genai"), peers.get("llama_cpp")
    if genai and "decode_tokens_per_s" in genai:
        out["ratio_vs_onnxruntime_genai"] = setok["decode_tokens_per_s"] / genai["decode_tokens_per_s"]
        if setok["prefill_ms"]:
            out["prefill_ratio_vs_onnxruntime_genai"] = genai["prefill_ms"] / setok["prefill_ms"]
    for label in ("q4_0", "q4_0_pure"):
        if llama and label in llama:
            out[f"ratio_vs_llama_cpp_{label}"] = setok["decode_tokens_per_s"] / llama[label]["decode_tokens_per_s"]
    return out


def attempt(name: str, fn, args: argparse.Namespace) -> dict[str, Any]:
    """fn(args), or {"error": ...} so that one failing peer does not lose the other's numbers."""
    try:
        return fn(args)
    except Exception as e:  # reported in the JSON and the log
        log.exception("%s failed", name)
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"llm": str(args.llm.resolve()), "threads": args.threads, "batch": 1,
                              "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                              "repetitions": args.repetitions, "loadavg_start": os.getloadavg(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "peers": {}}
    if args.build:
        if "llama" in args.peers:
            build_llama(args)
        if "genai" in args.peers:
            build_genai(args)
    if "genai" in args.peers:
        result["peers"]["onnxruntime_genai"] = attempt("onnxruntime-genai", run_genai, args)
    if "llama" in args.peers:
        result["peers"]["llama_cpp"] = attempt("llama.cpp", run_llama, args)
    if args.setok_bench:
        result["setok"] = setok_numbers(args.setok_bench)
        if result["setok"]["prompt_len"] not in (None, args.prompt_tokens):
            log.warning("setok's prefill is over %s tokens, the peers' over %d: the prefill ratio compares "
                        "unequal prompts", result["setok"]["prompt_len"], args.prompt_tokens)
        result.update(ratios(result["setok"], result["peers"]))
    result["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if any("error" in p for p in result["peers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
