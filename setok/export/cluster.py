"""Export the `cluster` stage (DPC-KNN) to ONNX: as standard ops, or as one plugin node.

Standard-op form: torch.onnx.export (TorchScript exporter) of DensityPeakCluster, dynamic in
batch and num_patches, domain "" only. The reference is written so nothing depends on a Python
int computed from N (topk is padded to k columns, the count clamp uses the config bounds), so
the graph runs for any N, N < k included.

Plugin form: one node of the manifest's CLUSTER_OP carrying the config as attributes, for the
TensorRT plugin and for onnxruntime-extensions (setok/backends/onnxrt/custom_op.py). Besides the
algorithm's attributes the node carries the three TensorRT's ONNX parser reads for a Python plugin
(PARSER_ATTRS): `plugin_namespace` and `plugin_version` find the creator (onnx-tensorrt
onnxOpImporters.cpp, FallbackPluginImporter; defaults "" and "1"), `aot` picks the implementation
(importerUtils.cpp, createPlugin: 1 -> STRICT_AOT, 0 -> STRICT_JIT). Without `aot` a plugin that has
both implementations is refused unless the network says which it prefers.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from setok.config import ClusterConfig
from setok.manifest import CLUSTER_OP
from setok.model.cluster import DensityPeakCluster

log = logging.getLogger(__name__)

CLUSTER_INPUTS = ("patch_features",)
# The node attributes TensorRT's ONNX parser consumes itself: name -> ONNX attribute type.
PARSER_ATTRS = {"plugin_namespace": onnx.AttributeProto.STRING, "plugin_version": onnx.AttributeProto.STRING,
                "aot": onnx.AttributeProto.INT}  # float32 [B, N, C]
CLUSTER_OUTPUTS = ("assignment", "num_tokens", "centers")  # int64 [B, N], [B], [B, max_tokens]

_DYNAMIC_AXES = {
    "patch_features": {0: "batch", 1: "num_patches"},
    "assignment": {0: "batch", 1: "num_patches"},
    "num_tokens": {0: "batch"},
    "centers": {0: "batch"},
}


def trace_num_patches(cfg: ClusterConfig) -> int:
    """N of the example input: large enough that no min(., N) in the reference clips a config value."""
    return max(64, cfg.k, cfg.min_tokens, cfg.max_tokens) + 1


def export_cluster(cfg: ClusterConfig, out: Path, opset: int = 17, width: int = 128) -> Path:
    """Standard-op ONNX of the cluster stage for features of width `width`; returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, trace_num_patches(cfg), width)
    with warnings.catch_warnings():
        # The remaining tracer warnings concern shape reads that are traced as ops (checked by tests).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            DensityPeakCluster(cfg).eval(),
            (example,),
            str(out),
            input_names=list(CLUSTER_INPUTS),
            output_names=list(CLUSTER_OUTPUTS),
            dynamic_axes=_DYNAMIC_AXES,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(out))
    _fix_centers_dim(model, cfg.max_tokens)
    onnx.save(model, str(out))
    log.info("exported cluster (standard ops, opset %d, C=%d) to %s", opset, width, out)
    return out


def _fix_centers_dim(model: onnx.ModelProto, max_tokens: int) -> None:
    """The tracer names centers' width after a Slice; it is the static max_tokens."""
    for value in model.graph.output:
        if value.name == "centers":
            dim = value.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = max_tokens


def plugin_model(cfg: ClusterConfig, opset: int = 17, plugin_namespace: str = CLUSTER_OP.domain,
                 aot: bool = True) -> onnx.ModelProto:
    """The one-node plugin graph (no file I/O); `aot`: TensorRT embeds the fused kernel's PTX
    (no Python at run time) instead of calling the Triton step kernels through Python."""
    node = helper.make_node(
        CLUSTER_OP.op_type,
        list(CLUSTER_INPUTS),
        list(CLUSTER_OUTPUTS),
        name="cluster",
        domain=CLUSTER_OP.domain,
        k=int(cfg.k),
        tau=float(cfg.tau),
        min_tokens=int(cfg.min_tokens),
        max_tokens=int(cfg.max_tokens),
        plugin_namespace=plugin_namespace,
        plugin_version=str(CLUSTER_OP.version),
        aot=int(aot),
    )
    graph = helper.make_graph(
        [node],
        "setok_cluster_plugin",
        [helper.make_tensor_value_info("patch_features", TensorProto.FLOAT, ["batch", "num_patches", "width"])],
        [
            helper.make_tensor_value_info("assignment", TensorProto.INT64, ["batch", "num_patches"]),
            helper.make_tensor_value_info("num_tokens", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("centers", TensorProto.INT64, ["batch", cfg.max_tokens]),
        ],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(CLUSTER_OP.domain, CLUSTER_OP.version)]
    # helper's default IR version can be newer than onnxruntime reads; use the opset's minimum.
    ir = helper.find_min_ir_version_for(opsets[:1])
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="setok")


def export_cluster_plugin(
    cfg: ClusterConfig, out: Path, opset: int = 17, plugin_namespace: str = CLUSTER_OP.domain
) -> Path:
    """Plugin-form ONNX: one CLUSTER_OP node; returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = plugin_model(cfg, opset, plugin_namespace)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    log.info("exported cluster (plugin node %s) to %s", CLUSTER_OP.id, out)
    return out


def export_plugin_stage(stage, model, out_dir: Path, opset: int, example: dict) -> Path:
    """The registry's exporter for the plugin form (no tracing: the node is written directly)."""
    return export_cluster_plugin(model.cfg.cluster, Path(out_dir) / stage.file, opset)
