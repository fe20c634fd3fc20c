"""The bundle manifest: the contract between the exporter and the runtime (no torch here).

The exporter writes `manifest.json`; the runtime reads nothing else. Paths are relative and must
stay inside the bundle; every file's sha256 is recorded and checked on load.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setok.errors import BundleError
from setok.fields import (
    ANY_OBJECT,
    BOOLEAN,
    DIM,
    NAME,
    SHA256,
    TEXT,
    FieldError,
    ListOf,
    Nullable,
    Record,
    Scalar,
    Spec,
    at,
    describe,
    integer,
    is_int,
    number,
    one_of,
    plain_key,
)

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
# How the llm graph computes attention (`extra.attention`; absent: plain ONNX ops). "gqa": ONNX
# Runtime's com.microsoft GroupQueryAttention, which reads the mask as lengths (batched prompts
# right-padded) and which TensorRT cannot parse.
ATTENTION_FORMS = ("eager", "gqa")
EAGER_ATTENTION, GQA_ATTENTION = ATTENTION_FORMS
# Which positions the llm graph's `logits` cover (`extra.logits`; absent: "all", (B, S, V)). "newest":
# each row's newest real token only, (B, 1, V) (the GQA form: a prefill multiplies one row per
# sequence by the LM head); hidden_states always cover every position.
LOGITS_FORMS = ("all", "newest")
ALL_LOGITS, NEWEST_LOGITS = LOGITS_FORMS


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


# ---- checking JSON field by field ---------------------------------------------------------------
# Every field of manifest.json (and of engines.json, which reuses these specs) is checked on load.
# A wrong one is one line naming it by its path (`stages.llm.inputs[0].shape`), what it holds and
# what it should hold, raised as the reader's error; nothing malformed reaches the runtime.

SPECIAL_TOKENS = ("<bos>", "<eos>", "<im_start>", "<im_end>", "<target>")  # text.special_ids the runtime uses
PROMPT_FIELDS = {"caption": (), "question": ("q",), "refer": ("e",), "draw": ("c",)}  # text.prompts and their fields
PREPROCESSING_MODES = ("crop", "letterbox")  # preprocessing.mode (setok.runtime.frame.MODES)
TENSOR_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
DECODER_INPUTS = (INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS)  # an llm stage's inputs besides its KV cache
# Dims the runtime reads from a stage's record, as (side, tensor index, dims that must be integers):
# the detokenizer's padded token count and token width.
FIXED_DIMS = {"detokenizer": (("inputs", 0, (1, 2)),)}
# Sections the runtime reads when the bundle has this stage (bundles of other stages may lack them).
NEEDED_BY = {"llm": (("text",), ("files", "embeddings"), ("files", "tokenizer"))}


def _formats(template: Any, fields: tuple[str, ...]) -> bool:
    if not isinstance(template, str):
        return False
    try:
        split_prompt(template, **{f: "" for f in fields})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        return False
    return True


def prompt(fields: tuple[str, ...]) -> Scalar:
    names = ", ".join("{" + f + "}" for f in (*fields, "image"))
    return Scalar(f"a prompt template (a string whose only fields are {names})", lambda v: _formats(v, fields))


FILE = Record({"file": (NAME, True), "sha256": (SHA256, True)})
TENSOR = Record({"name": (NAME, True), "dtype": (one_of(*TENSOR_DTYPES), True), "shape": (ListOf(DIM), True)},
                what="a tensor record {name, dtype, shape}")
KV_CACHE = Record({"past": (ListOf(NAME, 1), True), "present": (ListOf(NAME, 1), True)})
STAGE = Record({
    "name": (NAME, True), "file": (NAME, True), "sha256": (SHA256, True), "precision": (NAME, True),
    "opset": (integer(1), True), "inputs": (ListOf(TENSOR, 1), True), "outputs": (ListOf(TENSOR, 1), True),
    "extra": (Record({"kv_cache": (KV_CACHE, False), "op": (NAME, False), "plugin_namespace": (NAME, False),
                      "op_version": (integer(1), False), "attention": (one_of(*ATTENTION_FORMS), False),
                      "logits": (one_of(*LOGITS_FORMS), False)}), False),
    "form_of": (NAME, False), "data": (ListOf(FILE), False),
}, what="a stage record {name, file, sha256, precision, opset, inputs, outputs}")
PREPROCESSING = Record({
    "size": (integer(1), True), "mean": (ListOf(number(), 3, 3), True), "std": (ListOf(number(positive=True), 3, 3), True),
    "layout": (TEXT, False), "channels": (TEXT, False), "resize": (TEXT, False),
    "mode": (one_of(*PREPROCESSING_MODES), False),  # how a frame becomes the square (bundles before it: crop)
})
TEXT_CONTRACT = Record({
    "special_ids": (Record({t: (integer(0), True) for t in SPECIAL_TOKENS}, others=integer(0)), True),
    "prompts": (Record({k: (prompt(f), True) for k, f in PROMPT_FIELDS.items()}, others=TEXT), True),
    "max_positions": (integer(2), True), "num_layers": (integer(1), False), "chat_template": (TEXT, False),
})


def _config_spec(cls: type) -> Record:
    """The spec of a config dataclass's JSON, from its type hints (setok.config.SetokimConfig)."""
    hints = typing.get_type_hints(cls)
    return Record({f.name: (_hint_spec(hints[f.name], f"{cls.__name__}.{f.name}"), False) for f in dataclasses.fields(cls)})


def _hint_spec(hint: Any, name: str) -> Spec:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        return Nullable(_hint_spec(args[0], name))
    origin = typing.get_origin(hint) or hint
    simple = {bool: BOOLEAN, int: integer(), float: number(), str: TEXT, dict: ANY_OBJECT}
    if origin in simple:
        return simple[origin]
    if origin is list and args:
        return ListOf(_hint_spec(args[0], name))
    if dataclasses.is_dataclass(origin):
        return _config_spec(origin)
    raise TypeError(f"{name}: no manifest spec for the config type {hint!r}; add one in setok/manifest.py")


@functools.lru_cache(maxsize=1)
def config_spec() -> Record:
    """The model config (setok.config.SetokimConfig.to_dict()): every known key typed, the two the
    runtime reads required. Keys this version does not know are left alone (older or newer bundles)."""
    from setok.config import SetokimConfig

    spec = _config_spec(SetokimConfig)
    encoder = spec.fields["encoder"][0]
    required = {"image_size": (integer(1), True), "patch_size": (integer(1), True)}
    return dataclasses.replace(spec, fields={**spec.fields, "encoder": (dataclasses.replace(
        encoder, fields={**encoder.fields, **required}), True)})


def check_manifest(d: dict[str, Any]) -> None:
    """FieldError for the first field of a manifest's JSON that is not what the runtime expects."""
    Record({"setok_version": (TEXT, True), "config": (config_spec(), True), "preprocessing": (PREPROCESSING, True),
            "stages": (Scalar("a non-empty list of stage records", lambda v: isinstance(v, list) and bool(v)), True),
            "files": (Record({}, others=FILE), False), "text": (TEXT_CONTRACT, False)})(d, "")
    names = named_items(d["stages"], "stages", "name", STAGE, "a name no other stage has")
    _check_stages(d, names)
    pre, enc = d["preprocessing"], d["config"]["encoder"]
    if pre["size"] != enc["image_size"]:
        raise FieldError("preprocessing.size", f"config.encoder.image_size ({enc['image_size']})", pre["size"])
    if pre["size"] % enc["patch_size"]:
        raise FieldError("config.encoder.patch_size", f"a divisor of preprocessing.size ({pre['size']})", enc["patch_size"])


def named_items(items: list, where: str, key: str, spec: Spec, unique: str) -> dict[str, str]:
    """Check each record of a list with `spec`; its path is `where.<its key>` (`stages.llm`), or
    `where[i]` while that key is not a plain name. Returns key -> path; a key seen twice is an error."""
    paths: dict[str, str] = {}
    for i, item in enumerate(items):
        name = item.get(key) if isinstance(item, dict) else None
        if isinstance(name, str) and name in paths:
            raise FieldError(at(at(where, i), key), f"{unique} ({paths[name]} has it)", name)
        here = at(where, name) if isinstance(name, str) and plain_key(name) else at(where, i)
        spec(item, here)
        paths[name] = here
    return paths


def _check_stages(d: dict[str, Any], names: dict[str, str]) -> None:
    """What crosses fields: forms name a stage, KV caches match the I/O, dims the runtime reads are fixed."""
    for s in d["stages"]:
        where = names[s["name"]]
        form = s.get("form_of", LEGACY_FORMS.get(s["name"]))
        if "form_of" in s and (form == s["name"] or form not in names):
            raise FieldError(at(where, "form_of"), f"the name of another stage of the bundle ({sorted(names)})", form)
        inputs, outputs = _by_name(s, "inputs", where), _by_name(s, "outputs", where)
        _check_kv(s, where, inputs, outputs)
        for side, index, dims in FIXED_DIMS.get(s["name"], ()):
            tensors = s[side]
            shape = tensors[index]["shape"] if index < len(tensors) else []
            if len(shape) <= max(dims) or not all(is_int(shape[k]) for k in dims):
                raise FieldError(at(at(at(where, side), index), "shape"),
                                 f"integers at {', '.join(f'[{k}]' for k in dims)} (the runtime reads them)", shape)
        for section in NEEDED_BY.get(s["name"], ()):
            node: Any = d
            for i, key in enumerate(section):
                if not isinstance(node, dict) or key not in node:
                    what = "the special token ids and prompts" if section == ("text",) else "a file record {file, sha256}"
                    raise FieldError(".".join(section[: i + 1]), f"{what} (the {s['name']} stage needs it)", missing=True)
                node = node[key]


def _by_name(s: dict[str, Any], side: str, where: str) -> dict[str, tuple[int, dict]]:
    tensors: dict[str, tuple[int, dict]] = {}
    for i, t in enumerate(s[side]):
        if t["name"] in tensors:
            raise FieldError(at(at(at(where, side), i), "name"), f"a name no other tensor of the stage has "
                             f"({side}[{tensors[t['name']][0]}] has it)", t["name"])
        tensors[t["name"]] = (i, t)
    return tensors


def _check_kv(s: dict[str, Any], where: str, inputs: dict, outputs: dict) -> None:
    """A decoder stage (it takes inputs_embeds) feeds back exactly its cache inputs, each (B, heads, T, head_dim)."""
    extra = s.get("extra", {})
    kv = extra.get("kv_cache")
    if kv is not None and len(kv["past"]) != len(kv["present"]):
        raise FieldError(at(at(at(where, "extra"), "kv_cache"), "present"),
                         f"as many names as kv_cache.past has ({len(kv['past'])})", kv["present"])
    if INPUTS_EMBEDS not in inputs:
        return
    cache = KvCache.of([TensorSpec(t["name"], t["dtype"], t["shape"]) for _, t in inputs.values()], extra)
    expected = sorted(set(inputs) - set(DECODER_INPUTS))
    kv_where = at(at(where, "extra"), "kv_cache") if kv is not None else at(where, "inputs")
    if sorted(cache.past) != expected:
        raise FieldError(kv_where, f"past names that are exactly the stage's cache inputs {expected}", list(cache.past))
    for past, present in zip(cache.past, cache.present):
        i, t = inputs[past]
        if len(t["shape"]) != 4 or not (is_int(t["shape"][1]) and is_int(t["shape"][3])):
            raise FieldError(at(at(at(where, "inputs"), i), "shape"), "(batch, heads, past_sequence, head_dim) with "
                             "integer heads and head_dim", t["shape"])
        if present not in outputs:
            raise FieldError(kv_where, f"present names that are outputs of the stage ({present!r} is not)", list(cache.present))


def checked(path: Path, error: type[Exception], fix: str, check: Callable[[dict[str, Any]], None], d: dict[str, Any]) -> None:
    """Run `check` on a document read from `path`; a FieldError becomes `error` naming the file and the fix."""
    try:
        check(d)
    except FieldError as e:
        raise error(f"{path}: {e} ({fix})") from None


def load_manifest(bundle: str | Path, verify: bool = True, stages: bool = True) -> Manifest:
    """Read and check a manifest; `stages=False` skips the stage files (an engines directory
    carries only the manifest and its other files: the stages are engines there).

    Every field is type-checked first (check_manifest): a malformed manifest is one BundleError
    naming the field, never an exception from deeper in the runtime."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    fix = "re-export the bundle with `setok export`"
    d = read_versioned_json(path, SCHEMA_VERSION, BundleError, "a bundle written by `setok export`", fix)
    checked(path, BundleError, fix, check_manifest, d)
    m = Manifest(d["setok_version"], d["config"], d["preprocessing"], [StageEntry.from_dict(s) for s in d["stages"]],
                 d.get("files", {}), d.get("text", {}))
    if verify:
        verify_files(bundle, m, stages)
    return m


def read_versioned_json(path: Path, schema: int, error: type[Exception], what: str, fix: str) -> dict:
    """A JSON object with `schema_version == schema`, or `error` saying what was found and what to do."""
    if not path.is_file():
        raise error(f"{path.parent}: no {path.name}; expected {what}")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})") from None
    got = d.get("schema_version") if isinstance(d, dict) else None
    if type(got) is not int or got != schema:  # true == 1 and 1.0 == 1 in Python: not here
        what_got = (f"schema_version {json.dumps(got) if type(got) in (int, float, bool, str) or got is None else describe(got)}"
                    if isinstance(d, dict) else f"{describe(d)} instead of an object")
        raise error(f"{path}: {what_got} is not supported; expected schema_version {schema} ({fix})")
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
