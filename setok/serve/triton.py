"""Export a bundle as a Triton Inference Server model repository (torch-free).

One Triton model per stage (`<stage>/config.pbtxt` + `<stage>/1/model.onnx` for the ONNX Runtime
backend, or `<stage>/1/model.plan` for the TensorRT backend when given a `setok build` engines
directory), plus `setok_pipeline/`, a Python-backend model that chains the stages through BLS exactly like
`setok.runtime.Pipeline.answer` (see `setok/serve/model_py.py`). The repository is written
atomically: a kill leaves the old repository or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from setok import manifest as M
from setok.errors import InputError
from setok.io import atomic_dir

log = logging.getLogger(__name__)

PIPELINE_MODEL = "setok_pipeline"
VERSION = "1"
SETTINGS_FILE = "setok_pipeline.json"  # read by model.py; the server has no setok to read a manifest
ENGINES_MANIFEST = "engines.json"
DEFAULT_MAX_NEW_TOKENS = 8  # the runtime's default for answer()

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

# Why max_batch_size 0: every stage already carries its batch (or token) axis explicitly in its
# shapes, so Triton must pass tensors through as they are. With max_batch_size > 0 Triton would
# prepend a batch axis of its own to `dims`, and every shape would be off by one axis.
BATCHING_NOTE = (
    "max_batch_size 0: the batch axis is explicit in this stage's shapes (the leading -1 below), so "
    "Triton passes tensors through unchanged and never forms batches itself. No dynamic_batching "
    "block: with max_batch_size 0 there is nothing for the dynamic batcher to merge. {batching}"
)
BATCHABLE = ("To let Triton batch this stage: set max_batch_size to N > 0, drop the leading -1 "
             "from every dims below (Triton prepends the batch axis itself), and add:")
BATCHING_SNIPPET = "dynamic_batching { max_queue_delay_microseconds: 500 }"
NOT_BATCHABLE = ("Do not enable Triton batching here: its requests differ in more than the batch axis "
                 "(token counts, sequence or cache lengths), so they could not be stacked.")
# Symbolic dims that are constant for one deployed model (fixed by the image size), so requests
# agree on them and the dynamic batcher could stack them; any other symbolic dim varies per request.
STACKABLE_DIMS = frozenset({"batch", "num_patches"})


@dataclass(frozen=True)
class ServedStage:
    """One Triton stage model: where its file comes from and what it declares."""

    name: str
    precision: str
    inputs: list[M.TensorSpec]
    outputs: list[M.TensorSpec]
    platform: str  # "onnxruntime_onnx", "tensorrt_plan", or "python" (ONNX Runtime inside the Python backend)
    kind: str  # KIND_CPU / KIND_GPU
    file: Path

    @property
    def filename(self) -> str:
        return PLATFORM_FILES[self.platform]


PLATFORM_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.onnx"}
STAGE_BACKENDS = {"onnxruntime": "onnxruntime_onnx", "python": "python"}


def export_triton(bundle_or_engines: str | Path, out: str | Path, device: str = "cpu",
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, bundle: str | Path | None = None,
                  stage_backend: str = "onnxruntime", python_env: str | Path | None = None) -> Path:
    """Write a Triton model repository to `out` (atomically) and return `out`.

    `bundle_or_engines` is a bundle (every stage served as ONNX by the onnxruntime backend) or an
    engines directory from `setok build` (its stages served as TensorRT plans on the GPU; `bundle`
    must then name the bundle it was built from, which supplies the tokenizer, the embeddings and
    any stage without a servable engine). `device` ("cpu"/"gpu") is the instance kind of the ONNX
    stages; the Python pipeline model always runs on CPU (it only orchestrates).

    `stage_backend="python"` serves each ONNX stage through a Python-backend model running ONNX
    Runtime (`setok/serve/ort_stage.py`), for a tritonserver with the Python backend only (PyPI's
    nvidia-pytriton). `python_env` (a directory with bin/activate, e.g. a venv) becomes every
    Python model's EXECUTION_ENV_PATH: that build's stub needs numpy < 2 (see README, Serving).
    """
    src, out = Path(bundle_or_engines), Path(out)
    if device not in KINDS:
        raise InputError(f"device={device!r}; expected one of {sorted(KINDS)}")
    if not 1 <= max_new_tokens <= 4096:
        raise InputError(f"max_new_tokens={max_new_tokens}; expected 1..4096")
    if stage_backend not in STAGE_BACKENDS:
        raise InputError(f"stage_backend={stage_backend!r}; expected one of {sorted(STAGE_BACKENDS)}")
    if python_env is not None and not (Path(python_env) / "bin" / "activate").is_file():
        raise InputError(f"python_env={python_env}: no bin/activate; expected a venv or an unpacked conda env")
    is_engines = (src / ENGINES_MANIFEST).is_file()
    bundle_dir = _bundle_dir(src, bundle, is_engines)
    manifest = M.load_manifest(bundle_dir)  # verifies every file's sha256 before anything is copied
    _check_pipeline_stages(manifest)
    skipped = skipped_stages(manifest)
    engines = _engine_stages(src, bundle_dir, skipped) if is_engines else {}
    stages = [engines.get(e.name) or _onnx_stage(bundle_dir, e, KINDS[device], STAGE_BACKENDS[stage_backend])
              for e in manifest.stages if e.name not in skipped]
    with atomic_dir(out) as tmp:
        env = None if python_env is None else str(Path(python_env).resolve())
        for stage in stages:
            _write_stage(tmp, stage, env)
        _write_pipeline_model(bundle_dir, tmp, manifest, max_new_tokens, env)
        (tmp / "README.md").write_text(repo_readme(manifest, stages, skipped))
    log.info("triton: wrote model repository %s (%s)", out, ", ".join(f"{s.name}:{s.platform}" for s in stages))
    return out


def _bundle_dir(src: Path, bundle: str | Path | None, is_engines: bool) -> Path:
    if not is_engines:
        return src
    if bundle is None:
        # engines.json records the bundle's manifest digest, not its path; the pipeline model
        # still needs that bundle's tokenizer, embeddings and prompt settings.
        raise InputError(f"{src} is a TensorRT engines directory: also pass bundle=<the bundle it was built from>")
    return Path(bundle)


def _engine_stages(engines_dir: Path, bundle: Path, skipped: dict[str, str]) -> dict[str, ServedStage]:
    """Stage name -> plan for every engine Triton's TensorRT backend can load as it is."""
    from setok.backends.trt.engines import (
        load_engines_manifest,  # pure: no tensorrt import
    )

    em = load_engines_manifest(engines_dir)  # verifies every plan's sha256
    if em.bundle_manifest_sha256 != M.sha256(bundle / M.MANIFEST):
        raise M.BundleError(f"{engines_dir} was built from another bundle than {bundle} (manifest sha256 differs); "
                            "pass the bundle it was built from, or rebuild with `setok build`")
    served = {}
    for e in em.engines:
        if e.plugin:
            # The plugin is registered from Python (or a library) inside setok; Triton's TensorRT
            # backend would need it preloaded, so this stage is served from the bundle's ONNX.
            skipped[f"{e.stage} (TensorRT engine)"] = (f"built with the {e.plugin.get('id') or e.stage} plugin, which "
                                                      "Triton's tensorrt backend does not load; served as ONNX instead")
            continue
        served[e.stage] = ServedStage(e.stage, e.precision, e.inputs, e.outputs, "tensorrt_plan", KINDS["gpu"],
                                      M.inside(engines_dir, e.file))
    return served


def skipped_stages(manifest: M.Manifest) -> dict[str, str]:
    """Stage -> why it is not served. A graph holding a custom op would need our custom-op
    library in Triton's stock onnxruntime backend; the stage it is a form of computes the same."""
    return {s.name: f"needs the {s.custom_op} custom op, which Triton's onnxruntime backend does not load; "
                    f"the standard `{s.serves}` stage is served instead"
            for s in manifest.stages if s.custom_op and s.form_of}


def _check_pipeline_stages(manifest: M.Manifest) -> None:
    from setok.serve.model_py import CHAINED_STAGES

    names = {s.name for s in manifest.stages}
    missing = set(CHAINED_STAGES) - names
    if missing:
        raise M.BundleError(f"bundle lacks the stages {sorted(missing)} that setok_pipeline chains")
    if "embeddings" not in manifest.files or "tokenizer" not in manifest.files:
        raise M.BundleError("bundle lacks llm_embeddings / tokenizer files that setok_pipeline needs")


# ---- stage models -------------------------------------------------------------------------------
def _onnx_stage(bundle: Path, entry: M.StageEntry, kind: str, platform: str = "onnxruntime_onnx") -> ServedStage:
    return ServedStage(entry.name, entry.precision, entry.inputs, entry.outputs, platform, kind,
                       M.inside(bundle, entry.file))


def _write_stage(repo: Path, stage: ServedStage, python_env: str | None = None) -> None:
    from setok.serve import ort_stage

    model_dir = repo / stage.name
    version = model_dir / VERSION
    version.mkdir(parents=True)
    shutil.copyfile(stage.file, version / stage.filename)
    if stage.platform == "python":
        shutil.copyfile(Path(ort_stage.__file__), version / "model.py")
    if stage.filename == "model.onnx":
        for rel in M.external_data(stage.file):
            # External weights are found relative to the model file, so they keep their names.
            target = version / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(M.inside(stage.file.parent, rel), target)
    (model_dir / "config.pbtxt").write_text(stage_config(stage, python_env if stage.platform == "python" else None))


def is_batchable(tensors: list[M.TensorSpec]) -> bool:
    """True when every tensor leads with the batch axis and its other dims agree between requests."""
    return all(t.shape and t.shape[0] == "batch" and all(isinstance(d, int) or d in STACKABLE_DIMS for d in t.shape)
               for t in tensors)


def stage_config(stage: ServedStage, python_env: str | None = None) -> str:
    batchable = is_batchable(stage.inputs + stage.outputs)
    note = BATCHING_NOTE.format(batching=BATCHABLE if batchable else NOT_BATCHABLE)
    lines = textwrap.wrap(note, 96) + (["  " + BATCHING_SNIPPET] if batchable else [])
    return "\n".join([
        f"# setok stage {stage.name!r} ({stage.precision}), generated by setok.serve.triton",
        *("# " + line for line in lines),
        f'name: "{stage.name}"',
        'backend: "python"' if stage.platform == "python" else f'platform: "{stage.platform}"',
        "max_batch_size: 0",
        _tensors("input", [(t.name, _triton_dtype(stage.name, t), _dims(t.shape)) for t in stage.inputs]),
        _tensors("output", [(t.name, _triton_dtype(stage.name, t), _dims(t.shape)) for t in stage.outputs]),
        _instance_group(stage.kind),
        *([_env_parameter(python_env)] if python_env else []),
    ]) + "\n"


def _env_parameter(python_env: str) -> str:
    return f'parameters {{\n  key: "EXECUTION_ENV_PATH"\n  value {{ string_value: "{python_env}" }}\n}}'


def _triton_dtype(stage: str, spec: M.TensorSpec) -> str:
    if spec.dtype not in TRITON_DTYPES:
        raise M.BundleError(f"stage {stage}: tensor {spec.name} has dtype {spec.dtype!r}; "
                            f"expected one of {sorted(TRITON_DTYPES)}")
    return TRITON_DTYPES[spec.dtype]


def _dims(shape: list[int | str]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]  # symbolic dims are variable (-1)


def _tensors(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    blocks = [
        f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
        for name, dtype, dims in tensors
    ]
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]"


def _instance_group(kind: str) -> str:
    return f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]"


# ---- the Python-backend pipeline model ----------------------------------------------------------
def pipeline_config(max_new_tokens: int, python_env: str | None = None) -> str:
    return "\n".join([
        "# setok_pipeline: image + question -> answer; chains the stage models through BLS (1/model.py).",
        "# One request is one image; max_batch_size 0 because the pipeline is per image (the token",
        "# count differs between images), so there is nothing for Triton to batch here.",
        f'name: "{PIPELINE_MODEL}"',
        'backend: "python"',
        "max_batch_size: 0",
        _tensors("input", [("IMAGE", "TYPE_UINT8", [-1, -1, 3]), ("QUESTION", "TYPE_STRING", [1])]),
        _tensors("output", [("TEXT", "TYPE_STRING", [1]), ("NUM_TOKENS", "TYPE_INT64", [1])]),
        _instance_group(KINDS["cpu"]),  # it orchestrates only; the stages run where their configs say
        f'parameters {{\n  key: "max_new_tokens"\n  value {{ string_value: "{max_new_tokens}" }}\n}}',
        *([_env_parameter(python_env)] if python_env else []),
    ]) + "\n"


def pipeline_settings(manifest: M.Manifest) -> dict:
    """What model.py needs from the manifest (the server side has no setok to read one)."""
    pre, text = manifest.preprocessing, manifest.text
    llm = manifest.stage("llm")
    present = dict(zip(llm.kv_cache.past, llm.kv_cache.present))
    past = [{"name": s.name, "present": present[s.name], "heads": int(s.shape[1]), "head_dim": int(s.shape[3])}
            for s in llm.inputs if s.name in present]
    standard = [s.name for s in manifest.forms("cluster") if not s.custom_op]
    if not standard:
        raise M.BundleError(f"bundle has no standard-op form of the cluster stage (its forms "
                            f"{[s.name for s in manifest.forms('cluster')]} all need a custom op); re-export the bundle")
    return {
        "setok_version": manifest.setok_version, "size": pre["size"], "mean": pre["mean"], "std": pre["std"],
        "special_ids": text["special_ids"], "question_prompt": text["prompts"]["question"],
        "max_positions": text["max_positions"], "past": past, "cluster_stage": standard[0],
    }


def _write_pipeline_model(src: Path, repo: Path, manifest: M.Manifest, max_new_tokens: int,
                          python_env: str | None = None) -> None:
    from setok.serve import model_py

    version = repo / PIPELINE_MODEL / VERSION
    version.mkdir(parents=True)
    shutil.copyfile(Path(model_py.__file__), version / "model.py")
    shutil.copyfile(M.inside(src, manifest.files["tokenizer"]["file"]), version / model_py.TOKENIZER_FILE)
    shutil.copyfile(M.inside(src, manifest.files["embeddings"]["file"]), version / model_py.EMBEDDINGS_FILE)
    (version / SETTINGS_FILE).write_text(json.dumps(pipeline_settings(manifest), indent=2) + "\n")
    (repo / PIPELINE_MODEL / "config.pbtxt").write_text(pipeline_config(max_new_tokens, python_env))


def repo_readme(manifest: M.Manifest, stages: list[ServedStage], skipped: dict[str, str]) -> str:
    rows = "\n".join(f"| `{s.name}` | {s.platform} | {s.kind} | {'yes' if is_batchable(s.inputs + s.outputs) else 'no'} |"
                     for s in stages)
    notes = "\n".join(f"- `{name}`: {why}." for name, why in skipped.items())
    return README.format(version=manifest.setok_version, rows=rows, skipped=notes or "- none", pipeline=PIPELINE_MODEL)


README = """\
# setok Triton model repository (setok {version})

Generated by `setok.serve.export_triton`. Serve it with

    tritonserver --model-repository <this directory>

and query `{pipeline}` (see `examples/triton_client.py` in the setok repository).

## Models
| model | platform | instance kind | Triton batching possible |
| --- | --- | --- | --- |
{rows}
| `{pipeline}` | python (BLS) | KIND_CPU | no |

`{pipeline}` takes IMAGE (uint8, [H, W, 3], RGB) and QUESTION (string, [1]) and returns TEXT
(string, [1]) and NUM_TOKENS (int64, [1]): the image is resized like the setok runtime, tokenized
by encoder -> cluster -> merger, exactly NUM_TOKENS vision tokens go through the projector into
the LLM (never padding), and the answer is decoded greedily with the KV cache round-tripping
through the `llm` model. `max_new_tokens` is a parameter in its config.pbtxt.

The Python backend's interpreter needs `numpy`, `tokenizers` and `Pillow` (no torch, no setok):
`pip install` them in the server image, or point the model at a packed environment with the
`EXECUTION_ENV_PATH` parameter. With `--model-control-mode explicit`, load every stage model
above before `{pipeline}`: it calls them by name.

## Skipped stages
{skipped}

## Batching
Every model has `max_batch_size: 0`: the batch axis is explicit in the stage shapes, so Triton
passes tensors through unchanged and batches nothing, and no model has a `dynamic_batching`
block. For a stage marked "yes" above you may enable batching: set `max_batch_size` to N > 0,
remove the leading `-1` from each of its `dims` (Triton adds the batch axis itself) and add
`dynamic_batching {{ max_queue_delay_microseconds: 500 }}`. The other stages must stay at 0.

## Notes
- The first LLM call (prefill) sends an empty KV cache (past length 0), as the setok runtime does;
  Triton and its onnxruntime backend must accept zero-sized dims for it.
- TensorRT plans (`model.plan`, platform `tensorrt_plan`, KIND_GPU) run only with the TensorRT
  version and GPU they were built for; Triton uses each plan's first optimization profile.
"""
