"""Check an exported stage against its torch module; a failure lists every output's numbers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from setok.errors import SetokError
from setok.export.stages import Stage, Tolerance

log = logging.getLogger(__name__)


class ValidationError(SetokError):
    """An exported stage disagrees with PyTorch beyond its tolerance."""


@dataclass
class Comparison:
    output: str
    cosine: float | None = None
    norm_ratio: float | None = None
    max_abs: float | None = None
    match: float | None = None  # integer outputs: fraction identical

    def failures(self, tol: Tolerance) -> list[str]:
        if self.match is not None:
            return [] if self.match >= tol.int_match else [f"{self.output}: {self.match:.4%} identical (need {tol.int_match:.2%})"]
        bad = []
        diff = f" (max abs diff {self.max_abs:.3g})"
        if self.cosine < tol.cosine:
            bad.append(f"{self.output}: cosine {self.cosine:.6f} < {tol.cosine}{diff}")
        if abs(self.norm_ratio - 1) > tol.norm_ratio:
            bad.append(f"{self.output}: norm ratio {self.norm_ratio:.6f} off by more than {tol.norm_ratio}{diff}")
        if tol.max_abs is not None and self.max_abs > tol.max_abs:
            bad.append(f"{self.output}: max abs diff {self.max_abs:.3g} > {tol.max_abs}")
        return bad


def compare(name: str, ref: np.ndarray, got: np.ndarray) -> Comparison:
    if ref.shape != got.shape:
        raise ValidationError(f"{name}: shape {got.shape} from ONNX, {ref.shape} from PyTorch")
    if np.issubdtype(ref.dtype, np.integer):
        return Comparison(name, match=float(np.mean(ref == got)) if ref.size else 1.0)
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = 1.0 if na == nb == 0 else float(a @ b / max(na * nb, 1e-30))
    ratio = 1.0 if na == 0 and nb == 0 else float(nb / max(na, 1e-30))
    return Comparison(name, cos, ratio, float(np.max(np.abs(a - b))) if a.size else 0.0)


def session(path: Path, custom_op: str | None = None):
    """A CPU session for a freshly exported graph (with the custom-op library when it holds one)."""
    import onnxruntime as ort

    opts = None
    if custom_op:
        from setok.backends.onnxrt.custom_op import plugin_session_options

        opts = plugin_session_options(custom_op)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def validate_module(stage: Stage, model, path: Path, example: dict) -> list[Comparison]:
    """The default validator: run the ONNX file and `stage.module(model)` on `example`; raise
    ValidationError listing every output that misses the stage's tolerance."""
    ins, outs = stage.specs(model)
    ref = stage.module(model).eval()(*(example[s.name] for s in ins))
    ref = ref if isinstance(ref, tuple) else (ref,)
    feeds = {s.name: example[s.name].numpy() for s in ins}
    names = [s.name for s in outs]
    got = session(path, stage.custom_op.id if stage.custom_op else None).run(names, feeds)
    comps = [compare(n, r.numpy(), g) for n, r, g in zip(names, ref, got)]
    bad = [f for c in comps for f in c.failures(stage.tolerance)]
    if bad:
        raise ValidationError(f"stage {stage.name} ({path.name}) disagrees with PyTorch: " + "; ".join(bad))
    return comps


def validate_llm_stage(stage: Stage, model, path: Path, example: dict) -> list[Comparison]:
    """The llm's validator: a left-padded prefill and a decode step on each side's own cache."""
    from setok.export.llm import validate_llm

    try:
        log.info("llm: %s", validate_llm(model.llm, path, tolerance=stage.tolerance))
    except ValueError as e:  # validate_llm names the output and its max difference
        raise ValidationError(f"stage {stage.name} ({path.name}) disagrees with PyTorch: {e}") from None
    return []
