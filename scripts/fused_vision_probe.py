"""Experiment (issue #17, docs/quantization.md "The shipped small model end to end"): encoder ->
cluster -> merger -> projector as ONE ONNX Runtime session against the bundle's four sessions, on the
same scenes, interleaved runs, no spinning threads. Not a product form: it measured 2-4 %.

    python scripts/fused_vision_probe.py BUNDLE [n]     # a setok export of the small checkpoint
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper

from setok.data import make_scene
from setok.runtime.preprocess import normalize

B = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
names = ["encoder", "cluster", "merger", "projector"]
FILES = {st["name"]: st["file"] for st in json.loads(Path(B, "manifest.json").read_text())["stages"]}
models = {n: compose.add_prefix(onnx.load(f"{B}/{FILES[n]}"), prefix=f"{n}/") for n in names}
nodes, inits, vis = [], [], []
def ident(src, dst): nodes.append(helper.make_node("Identity", [src], [dst]))
ident("pixel_values", "encoder/pixel_values")
ident("encoder/patch_features", "cluster/patch_features")
ident("encoder/patch_features", "merger/patch_features")
ident("cluster/assignment", "merger/assignment")
ident("cluster/num_tokens", "merger/num_tokens")
nodes.append(helper.make_node("Constant", [], ["flat_shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [-1, 128])))
nodes.append(helper.make_node("Reshape", ["merger/vision_tokens", "flat_shape"], ["projector/vision_tokens"]))
for n in names:
    g = models[n].graph; nodes += list(g.node); inits += list(g.initializer); vis += list(g.value_info)
for src, dst in [("cluster/assignment", "assignment"), ("cluster/num_tokens", "num_tokens"), ("merger/vision_tokens", "vision_tokens"), ("projector/embeds", "embeds")]:
    ident(src, dst)
outs = [helper.make_tensor_value_info("assignment", TensorProto.INT64, None), helper.make_tensor_value_info("num_tokens", TensorProto.INT64, None),
        helper.make_tensor_value_info("vision_tokens", TensorProto.FLOAT, None), helper.make_tensor_value_info("embeds", TensorProto.FLOAT, None)]
inp = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 64, 64])]
graph = helper.make_graph(nodes, "vision", inp, outs, initializer=inits, value_info=vis)
domains = {o.domain: o.version for m in models.values() for o in m.opset_import}
fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()])
fused.ir_version = max(m.ir_version for m in models.values())
onnx.save(fused, "vision_fused.onnx")
def sess(path):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1; so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
S = {n: sess(f"{B}/{FILES[n]}") for n in names}; F = sess("vision_fused.onnx")
pre = json.loads(Path(B, "manifest.json").read_text())["preprocessing"]
px = [normalize(make_scene(10**9 + i).image[None], pre["mean"], pre["std"]) for i in range(20)]
def chain(x):
    f = S["encoder"].run(None, {"pixel_values": x})[0]
    a, k, _ = S["cluster"].run(None, {"patch_features": f})
    t = S["merger"].run(None, {"patch_features": f, "assignment": a, "num_tokens": k})[0]
    e = S["projector"].run(None, {"vision_tokens": t[0, : int(k[0])]})[0]
    return a, k, t, e
def fused_run(x):
    return F.run(None, {"pixel_values": x})
for x in px[:5]:
    a, k, t, e = chain(x); fa, fk, ft, fe = fused_run(x)
    assert (a == fa).all() and (k == fk).all(); np.testing.assert_allclose(t, ft, atol=1e-5)
    np.testing.assert_allclose(e, fe[: int(k[0])], atol=1e-5 if "dyn" not in B else 1e-2)  # dynamic INT8: the range of 32 padded rows
ts = {"four_sessions": [], "fused": []}
for r in range(N):
    x = px[r % len(px)]
    for name, fn in (("four_sessions", chain), ("fused", fused_run)) if r % 2 else (("fused", fused_run), ("four_sessions", chain)):
        t0 = time.perf_counter(); fn(x); ts[name].append(1e3 * (time.perf_counter() - t0))
res = {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90))} for k, v in ts.items()}
res["ratio_fused"] = res["fused"]["median_ms"] / res["four_sessions"]["median_ms"]
print(json.dumps(res, indent=1))
