"""The bundle manifest: the contract between the exporter and the runtime (no torch here).

The exporter writes `manifest.json`; the runtime reads nothing else. Paths are relative and must
stay inside the bundle; every file's sha256 is recorded and checked on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setok.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# Tensor names shared by exporter and runtime.
PIXEL_VALUES = "pixel_values"
PATCH_FEATURES = "patch_features"
ASSIGNMENT, NUM_TOKENS, CENTERS = "assignment", "num_tokens", "centers"
VISION_TOKENS = "vision_tokens"
EMBEDS = "embeds"
HIDDEN = "hidden"
QUERY_HIDDEN, TOKEN_HIDDEN, SEG_LOGITS = "query_hidden", "token_hidden", "seg_logits"
IMAGE = "image"
# The llm stage's other I/O (optimum's decoder-with-past names).
INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS = "inputs_embeds", "attention_mask", "position_ids"
LOGITS, HIDDEN_STATES = "logits", "hidden_states"
# Prompt templates (manifest `text.prompts`) mark where the vision tokens go with this slot.
IMAGE_SLOT = "{image}"

# KV-cache names of the llm stage, one template per layer and kind ("{i}" = layer index). The
# exporter writes the expanded lists into the llm entry (`extra.kv_cache`, as onnxruntime-genai's
# config carries past_names / present_names); the runtime reads them from there.
PAST_NAMES = ("past_key_values.{i}.key", "past_key_values.{i}.value")
PRESENT_NAMES = ("present.{i}.key", "present.{i}.value")


@dataclass(frozen=True)
class KvCache:
    """The cache inputs of the llm stage and, position by position, the output that feeds each."""

    past: tuple[str, ...]
    present: tuple[str, ...]

    @classmethod
    def for_layers(cls, num_layers: int) -> KvCache:
        return cls(*(tuple(t.format(i=i) for i in range(num_layers) for t in names) for names in (PAST_NAMES, PRESENT_NAMES)))

    @classmethod
    def of(cls, inputs: list[TensorSpec], extra: dict[str, Any]) -> KvCache:
        """From a stage's manifest record; bundles written before `extra.kv_cache` used the templates."""
        kv = extra.get("kv_cache")
        if isinstance(kv, dict) and isinstance(kv.get("past"), list) and isinstance(kv.get("present"), list):
            if len(kv["past"]) != len(kv["present"]):
                raise BundleError(f"manifest kv_cache: {len(kv['past'])} past names but {len(kv['present'])} present names")
            return cls(tuple(kv["past"]), tuple(kv["present"]))
        legacy = cls.for_layers(len(inputs))  # as many layers as could be: keep those the stage has
        names = {t.name for t in inputs}
        pairs = [(p, q) for p, q in zip(legacy.past, legacy.present) if p in names]
        return cls(tuple(p for p, _ in pairs), tuple(q for _, q in pairs))

    def to_dict(self) -> dict[str, Any]:
        return {"past": list(self.past), "present": list(self.present)}

    def as_past(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """A step's outputs -> the next step's cache feeds (present name -> past name)."""
        return {p: outputs[q] for p, q in zip(self.past, self.present)}


@dataclass(frozen=True)
class CustomOp:
    """A custom ONNX op a stage's graph may hold (TensorRT plugin, onnxruntime-extensions PyOp)."""

    domain: str
    op_type: str
    version: int = 1

    @property
    def id(self) -> str:
        return f"{self.domain}::{self.op_type}"

    def record(self) -> dict[str, Any]:
        """What the manifest entry of a stage holding this op carries (`extra`)."""
        return {"plugin_namespace": self.domain, "op": self.id, "op_version": self.version}


# The cluster stage as one node: the TensorRT plugin and the onnxruntime-extensions PyOp.
CLUSTER_OP = CustomOp("setok", "DensityPeakCluster", 1)


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: list[int | str]  # ints are fixed, strings symbolic

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class StageEntry:
    name: str
    file: str
    sha256: str
    precision: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict[str, Any] = field(default_factory=dict)
    # Another graph of the named stage (same I/O): the runtime may run either, TensorRT builds one.
    form_of: str | None = None
    # The graph's external-data files (weights of graphs past protobuf's 2 GB): {file, sha256} each.
    data: list[dict[str, str]] = field(default_factory=list)

    @property
    def serves(self) -> str:
        """The stage this entry computes: its own name, or the stage it is a form of."""
        return self.form_of or self.name

    @property
    def custom_op(self) -> str | None:
        """The custom op ("domain::Op") the graph holds, if any."""
        return self.extra.get("op") or None

    @property
    def kv_cache(self) -> KvCache:
        return KvCache.of(self.inputs, self.extra)

    @property
    def exact(self) -> bool:
        """Integer outputs only (token ids, counts): reduced precision would change them, not blur them."""
        return all(not t.dtype.startswith("float") for t in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "file": self.file, "sha256": self.sha256, "precision": self.precision,
            "opset": self.opset, "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs], **({"extra": self.extra} if self.extra else {}),
            **({"form_of": self.form_of} if self.form_of else {}), **({"data": self.data} if self.data else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageEntry:
        try:
            return cls(
                d["name"], d["file"], d["sha256"], d["precision"], int(d["opset"]),
                [TensorSpec(**t) for t in d["inputs"]], [TensorSpec(**t) for t in d["outputs"]], d.get("extra", {}),
                d.get("form_of", LEGACY_FORMS.get(d["name"])), list(d.get("data", [])),
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest stage entry {d.get('name', '?')!r} is malformed ({e})") from None


# Bundles written before `form_of` existed had one alternative form, under this name.
LEGACY_FORMS = {"cluster_plugin": "cluster"}


@dataclass
class Manifest:
    setok_version: str
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    stages: list[StageEntry]
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # other files: role -> {file, sha256}
    text: dict[str, Any] = field(default_factory=dict)  # special token ids, prompt templates
    schema_version: int = SCHEMA_VERSION

    def stage(self, name: str) -> StageEntry:
        for s in self.stages:
            if s.name == name:
                return s
        raise BundleError(f"bundle has no stage {name!r}; it has {[s.name for s in self.stages]}")

    def forms(self, name: str) -> list[StageEntry]:
        """The stage `name` and every alternative form of it the bundle carries."""
        return [s for s in self.stages if s.serves == name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "setok_version": self.setok_version, "config": self.config,
            "preprocessing": self.preprocessing, "stages": [s.to_dict() for s in self.stages],
            "files": self.files, "text": self.text,
        }

    def write(self, bundle: Path) -> None:
        (Path(bundle) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def split_prompt(template: str, **fields: str) -> tuple[str, str]:
    """A prompt template -> (text before the vision tokens, text after them), fields filled in.

    Text before the image lets the LLM read the vision tokens already knowing the question: in
    a causal decoder, tokens placed first can never attend to what follows them. A template
    without the slot (bundles written before it existed) puts the image first.
    """
    before, slot, after = template.partition(IMAGE_SLOT)
    if not slot:
        before, after = "", template
    return before.format(**fields).strip(), after.format(**fields).strip()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(bundle: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing absolute paths, `..` and links out of the bundle."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"manifest path {rel!r} is not a relative path inside the bundle")
    root = bundle.resolve()
    path = (bundle / rel).resolve()
    if root not in path.parents:
        raise BundleError(f"manifest path {rel!r} points outside the bundle ({path})")
    return path


def load_manifest(bundle: str | Path, verify: bool = True, stages: bool = True) -> Manifest:
    """Read and check a manifest; `stages=False` skips the stage files (an engines directory
    carries only the manifest and its other files: the stages are engines there)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    d = read_versioned_json(path, SCHEMA_VERSION, BundleError, "a bundle written by `setok export`", "re-export the bundle")
    try:
        m = Manifest(d["setok_version"], d["config"], d["preprocessing"],
                     [StageEntry.from_dict(s) for s in d["stages"]], d.get("files", {}), d.get("text", {}))
    except (KeyError, TypeError) as e:
        raise BundleError(f"{path} is missing {e}") from None
    if verify:
        verify_files(bundle, m, stages)
    return m


def read_versioned_json(path: Path, schema: int, error: type[Exception], what: str, fix: str) -> dict:
    """A JSON object with `schema_version == schema`, or `error` saying what was found and what to do."""
    if not path.is_file():
        raise error(f"{path.parent}: no {path.name}; expected {what}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("schema_version") != schema:
        got = d.get("schema_version") if isinstance(d, dict) else None
        raise error(f"{path}: schema_version {got!r} is not supported; expected {schema} ({fix})")
    return d


def external_data(onnx_path: Path) -> list[str]:
    """Relative paths of the external-data files an ONNX graph references (its weights are not read)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return sorted({e.value for t in tensors if uses_external_data(t) for e in t.external_data if e.key == "location"})


def data_records(onnx_path: Path) -> list[dict[str, str]]:
    """The manifest's `data` of a stage: each external-data file beside its graph, with its sha256."""
    return [{"file": str(Path(onnx_path.name).parent / rel), "sha256": sha256(onnx_path.parent / rel)}
            for rel in external_data(onnx_path)]


def verify_files(bundle: Path, m: Manifest, stages: bool = True) -> None:
    entries = [(s.file, s.sha256) for s in m.stages] if stages else []
    entries += [(d["file"], d["sha256"]) for s in m.stages for d in s.data] if stages else []
    entries += [(f["file"], f["sha256"]) for f in m.files.values()]
    for rel, digest in entries:
        path = inside(bundle, rel)
        if not path.is_file():
            raise BundleError(f"{bundle}: {rel} is missing; the manifest lists it")
        if sha256(path) != digest:
            raise BundleError(f"{bundle}: {rel} has sha256 {sha256(path)[:12]}..., the manifest says {digest[:12]}...; refusing a modified bundle")
