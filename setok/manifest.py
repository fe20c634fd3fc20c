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

from setok.errors import InputError

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
# Prompt templates (manifest `text.prompts`) mark where the vision tokens go with this slot.
IMAGE_SLOT = "{image}"


class BundleError(InputError):
    """A bundle that is missing files, tampered with, or of an unknown schema."""


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "file": self.file, "sha256": self.sha256, "precision": self.precision,
            "opset": self.opset, "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs], **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageEntry:
        try:
            return cls(
                d["name"], d["file"], d["sha256"], d["precision"], int(d["opset"]),
                [TensorSpec(**t) for t in d["inputs"]], [TensorSpec(**t) for t in d["outputs"]], d.get("extra", {}),
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest stage entry {d.get('name', '?')!r} is malformed ({e})") from None


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


def verify_files(bundle: Path, m: Manifest, stages: bool = True) -> None:
    entries = [(s.file, s.sha256) for s in m.stages] if stages else []
    entries += [(f["file"], f["sha256"]) for f in m.files.values()]
    for rel, digest in entries:
        path = inside(bundle, rel)
        if not path.is_file():
            raise BundleError(f"{bundle}: {rel} is missing; the manifest lists it")
        if sha256(path) != digest:
            raise BundleError(f"{bundle}: {rel} has sha256 {sha256(path)[:12]}..., the manifest says {digest[:12]}...; refusing a modified bundle")
