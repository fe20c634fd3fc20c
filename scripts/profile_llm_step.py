"""Where one decode step of a bundle's llm graph spends its time: ONNX Runtime's profiler, kernel
time per op type over the last 4 of 8 steps after a 30-token prefill (docs/quantization.md).

usage: python scripts/profile_llm_step.py BUNDLE LLM_ONNX   (LLM_ONNX: that bundle's or a quantized one's llm.onnx)
"""
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from setok import manifest as M

m = M.load_manifest(sys.argv[1], verify=False)
e = m.stage("llm"); kv = e.kv_cache; specs = {s.name: s for s in e.inputs}; H = e.inputs[0].shape[-1]
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.enable_profiling = True; o.profile_file_prefix = "/tmp/setok-llm-profile"
s = ort.InferenceSession(sys.argv[2], o, providers=["CPUExecutionProvider"])
L = 30; rng = np.random.default_rng(0)
feed = {M.INPUTS_EMBEDS: rng.standard_normal((1, L, H)).astype(np.float32)*0.02, M.ATTENTION_MASK: np.ones((1, L), np.int64), M.POSITION_IDS: np.arange(L)[None]}
for p in kv.past:
    _, h, _, d = specs[p].shape; feed[p] = np.zeros((1, h, 0, d), np.float32)
names = [x.name for x in s.get_outputs()]
out = dict(zip(names, s.run(None, feed))); past = kv.as_past(out)
for i in range(8):
    f = {M.INPUTS_EMBEDS: feed[M.INPUTS_EMBEDS][:, :1], M.ATTENTION_MASK: np.ones((1, L + i + 1), np.int64), M.POSITION_IDS: np.array([[L + i]]), **past}
    t = time.perf_counter(); o2 = dict(zip(names, s.run(None, f))); print(f"{(time.perf_counter()-t)*1000:.1f} ms")
    past = kv.as_past(o2)
pf = s.end_profiling()
ev = json.loads(Path(pf).read_text()); os.unlink(pf)
runs = [x for x in ev if x.get("name") == "model_run"]
last = runs[-4:]
agg = collections.Counter()
t0 = last[0]["ts"]
for x in ev:
    if x.get("cat") == "Node" and x["name"].endswith("_kernel_time") and x["ts"] >= t0:
        agg[x["args"]["op_name"]] += x["dur"]
tot = sum(agg.values())
print("kernel total per step ms", tot/4/1000, "model_run ms", [r["dur"]/1000 for r in last])
for k, v in agg.most_common(12): print(k, round(v/4/1000, 2))
