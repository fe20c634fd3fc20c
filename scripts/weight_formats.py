"""Per weight-only format of a bundle's LLM: teacher-forced next-token agreement and logits cosine
against fp32 on the held-out prefills, file size and one decode step (docs/quantization.md).

usage: python scripts/weight_formats.py BUNDLE OUT_DIR
"""
import json
import sys
import time
from pathlib import Path

from setok import manifest as M
from setok.calibration import feeds as D
from setok.calibration import weights as W
from setok.calibration.quantize import compare_decoder
from setok.runtime.pipeline import Pipeline

bundle, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
pipe = Pipeline.open(bundle)
held = D.collect_feeds(pipe, D.heldout_samples(pipe.size, 0), ["llm"])["llm"]
pipe.close()
kv = M.load_manifest(bundle, verify=False).stage("llm").kv_cache
res = {"bundle": str(bundle), "positions": int(sum(f[M.INPUTS_EMBEDS].shape[1] for f in held)), "formats": {}}
for label, spec in [("int4-rtn-b32", W.WeightSpec("int4", 32, 4, "rtn", False)), ("int4-rtn-b32-head", W.WeightSpec("int4", 32, 4, "rtn", True)),
                    ("int8-rtn-b32-head", W.WeightSpec("int8", 32, 4, "rtn", True)),
                    ("int4-rtn-b32-head-trt", W.WeightSpec("int4", 32, 4, "rtn", True, "tensorrt"))]:
    dst = out / label / "llm.onnx"; dst.parent.mkdir(exist_ok=True)
    t = time.time(); W.quantize_stage(bundle / "llm.onnx", dst, spec, "llm", []); qs = time.time() - t
    r = compare_decoder(bundle / "llm.onnx", dst, held, kv, timed=True)
    r["quantize_s"] = qs; r["mb"] = round(sum(p.stat().st_size for p in dst.parent.iterdir()) / 2**20, 1)
    res["formats"][label] = r; print(label, json.dumps(r), flush=True)
    for p in dst.parent.iterdir(): p.unlink()
print(json.dumps(res, indent=1))
