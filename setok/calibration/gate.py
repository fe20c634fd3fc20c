"""The task-accuracy gate: an INT8 bundle keeps a stage INT8 only if the whole pipeline's task
metrics stay within the allowed drops of the fp32 bundle, on held-out scenes.

Stages are reverted upstream first: an error early in the chain (the encoder feeds the discrete
clustering, where a small feature error moves patches between tokens) spreads to every task.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from setok import manifest as M

log = logging.getLogger(__name__)

# metric -> largest allowed drop (fp32 minus INT8); PSNRs in dB.
TASK_GATES = {"vqa_accuracy": 0.01, "caption_exact": 0.01, "fg_ari": 0.02, "refseg_miou": 0.02,
              "recon_psnr": 1.0, "gen_psnr": 1.0}
GATE_SEED = 7  # held-out scenes, but not `setok eval`'s default ones: no selecting on the report


def misses(fp32: dict, int8: dict, gates: dict[str, float]) -> list[str]:
    return [f"{k} {fp32[k]:.4f} -> {int8[k]:.4f} (drop {fp32[k] - int8[k]:.4f} > {allowed})"
            for k, allowed in gates.items() if fp32[k] - int8[k] > allowed]


def apply_task_gate(bundle: Path, tmp: Path, manifest: M.Manifest, n: int, gates: dict[str, float] | None = None) -> dict:
    """Evaluate the candidate in `tmp` against `bundle`; revert INT8 stages until the gates hold.
    Rewrites `tmp`'s manifest; returns what was measured and reverted."""
    from setok.eval.evaluation import evaluate_bundle

    gates = gates or TASK_GATES
    original = {s.name: s for s in M.load_manifest(bundle).stages}
    ref = evaluate_bundle(bundle, n=n, seed=GATE_SEED)
    reverted, cand = [], evaluate_bundle(tmp, n=n, seed=GATE_SEED)
    for entry in [s for s in manifest.stages if s.precision != "fp32"]:  # int8, and int4 weight-only
        failed = misses(ref, cand, gates)
        if not failed:
            break
        _revert(bundle, tmp, manifest, entry, original[entry.name], failed)
        reverted.append({"stage": entry.name, "misses": failed})
        log.info("task gate: %s back to fp32 (%s)", entry.name, "; ".join(failed))
        cand = evaluate_bundle(tmp, n=n, seed=GATE_SEED)
    keys = sorted(gates)
    return {"n": n, "seed": GATE_SEED, "fp32": {k: ref[k] for k in keys}, "int8": {k: cand[k] for k in keys},
            "reverted": reverted, "passed": not misses(ref, cand, gates)}


def _revert(bundle: Path, tmp: Path, manifest: M.Manifest, entry: M.StageEntry, fp32: M.StageEntry, why: list[str]) -> None:
    for rel in (entry.file, *(d["file"] for d in entry.data)):
        (tmp / rel).unlink(missing_ok=True)
    for rel in (fp32.file, *(d["file"] for d in fp32.data)):
        shutil.copy2(M.inside(bundle, rel), tmp / rel)
    entry.file, entry.sha256, entry.precision, entry.opset, entry.data = fp32.file, fp32.sha256, "fp32", fp32.opset, fp32.data
    entry.extra = {**fp32.extra, "kept_float": "task gate: " + "; ".join(why)}
    manifest.write(tmp)
