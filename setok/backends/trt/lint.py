"""Lint a bundle's ONNX stages for a deployment target before anyone builds an engine or opens a session.

`tensorrt`: the operator support matrix is data (`trt_onnx_ops.json` beside this module, transcribed from
onnx-tensorrt's docs/operators.md); the restrictions that can bite our graphs are encoded here as code.
Errors mean the TensorRT ONNX parser (or our engine-per-stage contract) would reject the stage;
warnings mean it probably parses but deserves a look.

`onnxruntime-cpu`: every op must have an ONNX Runtime CPU kernel (the installed ONNX Runtime's own
kernel registry says which), and the quantized forms are checked against what that target takes.

Each target takes its own quantized forms (the table's `quantized_forms`): TensorRT parses Q/DQ INT8
and weight-only DequantizeLinear(INT4 blocked | INT8 per channel) -> MatMul, never ONNX Runtime's CPU
forms (MatMulNBits, MatMulInteger / DynamicQuantizeLinear); ONNX Runtime CPU runs all of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference
from onnx.external_data_helper import uses_external_data

from setok.backends.findings import Finding
from setok.backends.onnxrt.lint import lint_ort_cpu
from setok.errors import InputError
from setok.manifest import CLUSTER_OP, inside, load_manifest

log = logging.getLogger(__name__)

TABLE_FILE = "trt_onnx_ops.json"
STANDARD_DOMAINS = ("", "ai.onnx")
DPC_PLUGIN = CLUSTER_OP.id
PLUGIN_OPS = frozenset({DPC_PLUGIN})
TARGETS = ("tensorrt", "onnxruntime-cpu")
TOPK_MAX_K = 3840  # the table: `K` must be less than 3840
LARGE_INT64 = 1 << 16  # elements; beyond this an INT64 tensor is worth a warning
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression"}
# Inputs whose *values* decide an op's output shape: a value computed from input data makes the shape data-dependent.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "TopK": (1,), "Resize": (2, 3), "Upsample": (1,), "Pad": (1,), "OneHot": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Loop": (0, 1), "CenterCropPad": (1,),
}
TRT_TYPES = {  # TensorRT's names for ONNX element types; TensorRT has no type for the others
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16", TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.DOUBLE: "DOUBLE",
}
if hasattr(TensorProto, "FLOAT4E2M1"):
    TRT_TYPES[TensorProto.FLOAT4E2M1] = "FP4"


def load_table(path: Path | None = None) -> dict:
    """The TensorRT ONNX support matrix shipped with setok (or one at `path`)."""
    text = Path(path).read_text() if path else resources.files(__package__).joinpath(TABLE_FILE).read_text()
    return json.loads(text)


# ---- the graph as facts: constants, types, shapes ----------------------------------------------
class Graph:
    """One stage's graph after shape inference, with what the checks ask of it."""

    def __init__(self, model: onnx.ModelProto):
        self.model, g = model, model.graph
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumed = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        self.info = {v.name: v.type for v in [*g.input, *g.value_info, *g.output]}
        fed = {i.name for i in g.input}  # an initializer that is also an input can be overridden at run time
        stored = [t for t in g.initializer if t.name not in fed]
        # Weights in external data stay on disk (lint never needs their values, only that they are constant).
        self.weights = {t.name: list(t.dims) for t in stored if uses_external_data(t)}
        self.values = {t.name: numpy_helper.to_array(t) for t in stored if t.name not in self.weights}
        self.init_types = {t.name: t.data_type for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS and n.attribute and n.attribute[0].name == "value":
                t = n.attribute[0].t  # exporters put large Constants in external data too
                if uses_external_data(t):
                    self.weights[n.output[0]] = list(t.dims)
                else:
                    self.values[n.output[0]] = numpy_helper.to_array(t)
        self.const = self._fold_constants()

    def _fold_constants(self) -> set[str]:
        """Tensors known at build time: initializers, Constants, and ops over only those (TensorRT folds them)."""
        const = set(self.values) | set(self.weights)
        for n in self.model.graph.node:  # nodes are topologically sorted in a valid model
            if n.op_type == "Constant" or (n.op_type == "Shape" and self.static(n.input[0])):
                const.update(n.output)
            elif not n.op_type.startswith("Random") and n.input and all(i in const for i in n.input if i):
                const.update(o for o in n.output if o)
        return const

    def elem_type(self, name: str) -> int:
        t = self.info.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else self.init_types.get(name, 0)

    def dims(self, name: str) -> list[int | str | None] | None:
        """Static ints, symbolic names, None for unknown; None overall when even the rank is unknown."""
        if name in self.values:
            return list(self.values[name].shape)
        if name in self.weights:
            return self.weights[name]
        t = self.info.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def static(self, name: str) -> bool:
        return all(isinstance(d, int) for d in (self.dims(name) or [None]))


def _strip_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph outputs declare only their type, so inference says what the graph really computes."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for o in bare.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    return bare


# ---- checks ---------------------------------------------------------------------------------------
Report = Callable[..., None]  # (node or None, severity, message, where="")


def lint_model(model: onnx.ModelProto, stage: str, table: dict, plugin_ops: set[str]) -> list[Finding]:
    """Every finding for one stage's graph against `table` (see load_table)."""
    findings: list[Finding] = []
    try:
        inferred, failure = shape_inference.infer_shapes(_strip_output_shapes(model), data_prop=True), ""
    except (shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        inferred, failure = model, f"ONNX shape inference failed: {e}"
    index = {id(n): i for i, n in enumerate(inferred.graph.node)}

    def report(node: onnx.NodeProto | None, severity: str, message: str, where: str = "") -> None:
        name = (node.name or f"{node.op_type}#{index.get(id(node), -1)}") if node is not None else where
        findings.append(Finding(stage, name, node.op_type if node is not None else "", severity, message))

    if failure:
        report(None, "error", failure)
    _check_opset(model, table, report)
    _check_io_declared(model, report)
    g = Graph(inferred)
    for node in inferred.graph.node:
        if node.domain in STANDARD_DOMAINS:
            _check_standard(node, g, table, report)
        elif _ort_form(node, table):
            report(node, "error", f"{node.domain}::{node.op_type} is not a TensorRT op: {_ort_form(node, table)}")
        else:
            _check_plugin(node, plugin_ops, report)
    _check_int64(g, report)
    _check_output_shapes(model, g, report)
    return findings


def _check_opset(model: onnx.ModelProto, table: dict, report: Report) -> None:
    lo, hi = table["opset_range"]
    versions = [o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    for v in versions or [None]:
        if v is None or not lo <= v <= hi:
            report(None, "error", f"opset {v} is outside TensorRT {table['tensorrt_version']}'s supported range {lo}..{hi}")


def _check_io_declared(model: onnx.ModelProto, report: Report) -> None:
    """Engines need every I/O tensor's type and rank, with each dim a number or a named dynamic axis."""
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            t = v.type.tensor_type if v.type.HasField("tensor_type") else None
            if t is None or t.elem_type == TensorProto.UNDEFINED or not t.HasField("shape"):
                report(None, "error", f"graph {kind} {v.name!r} has no declared tensor type and shape", v.name)
                continue
            unnamed = [i for i, d in enumerate(t.shape.dim) if not d.HasField("dim_value") and not d.dim_param]
            if unnamed:
                report(None, "error", f"graph {kind} {v.name!r} has undeclared dims at {unnamed} (need ints or symbolic names)", v.name)


def _check_standard(node: onnx.NodeProto, g: Graph, table: dict, report: Report) -> None:
    entry = table["ops"].get(node.op_type)
    version = table["tensorrt_version"]
    if entry is None:
        report(node, "error", f"{node.op_type} is not in TensorRT {version}'s ONNX operator table")
        return
    if not entry["supported"]:
        why = f" ({entry['restrictions']})" if entry["restrictions"] else ""
        hint = f"; {_ort_form(node, table)}" if _ort_form(node, table) else ""
        report(node, "error", f"{node.op_type} is not supported by the TensorRT {version} ONNX parser{why}{hint}")
        return
    _check_type(node, g, entry, report)
    if node.op_type in DATA_DEPENDENT_OPS:
        report(node, "warning", f"{node.op_type} has a data-dependent output shape; TensorRT needs an output allocator "
                                "if it reaches an engine output, and the shape must not cross an engine boundary")
    for check in RESTRICTIONS.get(node.op_type, ()):
        check(node, g, report)


def _check_type(node: onnx.NodeProto, g: Graph, entry: dict, report: Report) -> None:
    """The table's type list for the op's data tensor; the parser is often wider, so a miss is a warning."""
    names = ([node.input[1]] if node.op_type == "Where" else node.input[:1]) if node.input else node.output[:1]
    for name in names:
        et = g.elem_type(name)
        if et == TensorProto.UNDEFINED:
            continue
        trt = TRT_TYPES.get(et)
        if trt is None:
            report(node, "error", f"{name!r} is {TensorProto.DataType.Name(et)}, a type TensorRT does not have")
        elif trt == "DOUBLE":
            report(node, "warning", f"{name!r} is DOUBLE; TensorRT casts it down to FP32 (clamped to +-FLT_MAX)")
        elif entry["types"] and trt not in entry["types"]:
            report(node, "warning", f"{name!r} is {trt}, not in the table's types for {node.op_type} "
                                    f"({', '.join(entry['types'])}); the parser may still accept it, verify with trtexec")


# ---- quantized forms per target ---------------------------------------------------------------------
def _ort_form(node: onnx.NodeProto, table: dict) -> str | None:
    """The hint for an ONNX Runtime-only quantized op (None for any other op)."""
    forms = table.get("quantized_forms", {}).get("onnxruntime_only", {})
    return forms.get(f"{node.domain}::{node.op_type}" if node.domain not in STANDARD_DOMAINS else node.op_type)


def _dq_weights(node: onnx.NodeProto, g: Graph, report: Report) -> None:
    """TensorRT's IDequantizeLayer: a build-time-constant scale (scalar, 1-D per channel, 2-D blocked);
    block quantization for INT4 only; INT4 only as constant weights (weight-only)."""
    if len(node.input) > 1 and node.input[1] not in g.const:
        report(node, "error", f"DequantizeLinear scale {node.input[1]!r} must be a build-time constant")
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    et = g.elem_type(node.input[0])
    if block and et != TensorProto.INT4:
        got = TRT_TYPES.get(et, TensorProto.DataType.Name(et))
        report(node, "error", f"block-quantized DequantizeLinear (block_size={block}) of {got}; TensorRT's block "
                              "quantization takes INT4 only (quantize INT8 weights per channel)")
    if et == TensorProto.INT4 and node.input[0] not in g.const:
        report(node, "error", f"INT4 input {node.input[0]!r} is computed at run time; TensorRT takes INT4 only as "
                              "constant weights (weight-only quantization)")
    if block:
        dims = g.dims(node.input[1]) or []
        if len(dims) != 2:
            report(node, "error", f"block-quantized DequantizeLinear scale has rank {len(dims)}; TensorRT needs 2-D block scales")


# ---- restrictions as code --------------------------------------------------------------------------
def _need_const(index: int, what: str, severity: str = "error") -> Callable[[onnx.NodeProto, Graph, Report], None]:
    def check(node: onnx.NodeProto, g: Graph, report: Report) -> None:
        if len(node.input) > index and node.input[index] and node.input[index] not in g.const:
            report(node, severity, f"{what} ({node.input[index]!r}) must be a build-time constant (initializer or Constant)")
    return check


def _topk(node: onnx.NodeProto, g: Graph, report: Report) -> None:
    sorted_ = next((a.i for a in node.attribute if a.name == "sorted"), 1)
    if sorted_ != 1:
        report(node, "error", "TopK needs sorted=1 in TensorRT")
    k = g.values.get(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(np.max(k)) >= TOPK_MAX_K:
        report(node, "error", f"TopK K={int(np.max(k))}; TensorRT needs K < {TOPK_MAX_K}")


def _zero_point(index: int, what: str) -> Callable[[onnx.NodeProto, Graph, Report], None]:
    """INT8 Q/DQ in TensorRT is symmetric: the zero point must be a constant zero."""
    def check(node: onnx.NodeProto, g: Graph, report: Report) -> None:
        if len(node.input) <= index or not node.input[index]:
            return
        zp = g.values.get(node.input[index])
        if zp is None or np.any(zp != 0):
            got = "not a constant" if zp is None else f"{zp.ravel()[:4].tolist()}"
            report(node, "error", f"{what} is {got}; TensorRT quantization is symmetric: it must be a constant zero")
    return check


def _conv_weights(node: onnx.NodeProto, g: Graph, report: Report) -> None:
    w = node.input[1]
    dq = g.producer.get(w)
    if w in g.const or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in g.const):
        return
    report(node, "warning", f"{node.op_type} weights {w!r} are computed at run time; TensorRT cannot fold or refit them")


def _attr_in(name: str, allowed: Iterable[str | int], default: str | int) -> Callable[[onnx.NodeProto, Graph, Report], None]:
    allowed = set(allowed)

    def check(node: onnx.NodeProto, g: Graph, report: Report) -> None:
        attr = next((a for a in node.attribute if a.name == name), None)
        value = default if attr is None else onnx.helper.get_attribute_value(attr)
        value = value.decode() if isinstance(value, bytes) else value
        if value not in allowed:
            report(node, "error", f"{node.op_type} {name}={value!r} is not supported by TensorRT (allowed: {sorted(map(str, allowed))})")
    return check


def _first_output_only(node: onnx.NodeProto, g: Graph, report: Report) -> None:
    extra = [o for o in node.output[1:] if o and o in g.consumed]
    if extra:
        report(node, "error", f"{node.op_type}: only the first output is supported by TensorRT; {extra} are used")


_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
RESTRICTIONS: dict[str, tuple[Callable[[onnx.NodeProto, Graph, Report], None], ...]] = {
    "TopK": (_need_const(1, "TopK's K"), _topk),
    # The 10.x table dropped Slice's axes restriction (older ones required an initializer): a warning only.
    "Slice": (_need_const(3, "Slice axes", "warning"),),
    "Squeeze": (_need_const(1, "Squeeze axes"),), "Unsqueeze": (_need_const(1, "Unsqueeze axes"),),
    "CumSum": (_need_const(1, "CumSum axis"),), "OneHot": (_need_const(2, "OneHot depth"),),
    "Dropout": (_need_const(2, "Dropout is_training"),),
    "DequantizeLinear": (_zero_point(2, "DequantizeLinear x_zero_point"), _dq_weights),
    "QuantizeLinear": (_zero_point(2, "QuantizeLinear y_zero_point"),),
    "Conv": (_conv_weights,), "ConvTranspose": (_conv_weights,),
    "Resize": (_attr_in("mode", ("nearest", "linear"), "nearest"), _attr_in("antialias", (0,), 0),
               _attr_in("coordinate_transformation_mode", ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                           "asymmetric", "align_corners"), "half_pixel")),
    "ScatterND": (_attr_in("reduction", ("none",), "none"),),
    "MaxPool": (_first_output_only,), "LayerNormalization": (_first_output_only,),
    **{op: (_need_const(1, f"{op} axes"),) for op in _REDUCE},
}


# ---- plugins ------------------------------------------------------------------------------------
DPC_ATTRS = {"k": onnx.AttributeProto.INT, "tau": onnx.AttributeProto.FLOAT, "min_tokens": onnx.AttributeProto.INT,
             "max_tokens": onnx.AttributeProto.INT}  # the plugin creator's fields (register's attributes)
# What TensorRT's ONNX parser itself reads off a plugin node (onnx-tensorrt onnxOpImporters.cpp,
# FallbackPluginImporter: plugin_version default "1", plugin_namespace default ""; importerUtils.cpp,
# createPlugin: `aot` read as an int). Required here: plugin_namespace (our creator is not in "").
PARSER_ATTRS = {"plugin_namespace": onnx.AttributeProto.STRING, "plugin_version": onnx.AttributeProto.STRING,
                "aot": onnx.AttributeProto.INT}
PARSER_DEFAULTS = {"plugin_version": "1"}


def _check_plugin(node: onnx.NodeProto, plugin_ops: set[str], report: Report) -> None:
    name = f"{node.domain}::{node.op_type}"
    if name not in plugin_ops:
        report(node, "error", f"custom op {name} is not a known TensorRT plugin (known: {sorted(plugin_ops)})")
    elif name == DPC_PLUGIN:
        _check_dpc(node, report)


def _check_dpc(node: onnx.NodeProto, report: Report) -> None:
    """The creator's fields (a missing or mistyped one fails at engine build) and the parser's attributes."""
    attrs = {a.name: a for a in node.attribute}
    for key, kind in {**DPC_ATTRS, **PARSER_ATTRS}.items():
        if key not in attrs:
            if key in DPC_ATTRS or key == "plugin_namespace":
                report(node, "error", f"{DPC_PLUGIN} is missing attribute {key!r}")
        elif attrs[key].type != kind:
            report(node, "error", f"{DPC_PLUGIN} attribute {key!r} must be {onnx.AttributeProto.AttributeType.Name(kind)}")
    for key in sorted(set(attrs) - set(DPC_ATTRS) - set(PARSER_ATTRS)):
        report(node, "error", f"{DPC_PLUGIN} has unknown attribute {key!r}")
    if any(k not in attrs or attrs[k].type != kind for k, kind in DPC_ATTRS.items()):
        return  # the values below cannot be read
    k, lo, hi = attrs["k"].i, attrs["min_tokens"].i, attrs["max_tokens"].i
    if k < 1:
        report(node, "error", f"{DPC_PLUGIN} k={k}; need k >= 1")
    if not 1 <= lo <= hi:
        report(node, "error", f"{DPC_PLUGIN} min_tokens={lo}, max_tokens={hi}; need 1 <= min_tokens <= max_tokens")
    _check_parser_values(node, attrs, report)


def _check_parser_values(node: onnx.NodeProto, attrs: dict, report: Report) -> None:
    """The parser looks the creator up by (op_type, plugin_version, plugin_namespace); `aot` picks the impl."""
    def value(key: str) -> str | int | None:
        a = attrs.get(key)
        if a is None or a.type != PARSER_ATTRS[key]:
            return PARSER_DEFAULTS.get(key)
        return a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i

    if value("plugin_namespace") not in (None, CLUSTER_OP.domain):
        report(node, "error", f"{DPC_PLUGIN} plugin_namespace={value('plugin_namespace')!r}; the creator is "
                              f"registered in {CLUSTER_OP.domain!r}")
    if value("plugin_version") != str(CLUSTER_OP.version):
        report(node, "error", f"{DPC_PLUGIN} plugin_version={value('plugin_version')!r}; the creator is "
                              f"version {CLUSTER_OP.version!r}")
    aot = value("aot")
    if aot is None:
        report(node, "warning", f"{DPC_PLUGIN} has no 'aot' attribute: TensorRT refuses a plugin with both AOT and "
                                "JIT implementations unless the network sets PREFER_AOT/JIT_PYTHON_PLUGINS")
    elif aot not in (0, 1):
        report(node, "error", f"{DPC_PLUGIN} aot={aot}; expected 0 (JIT) or 1 (AOT)")


# ---- INT64 and data-dependent shapes ------------------------------------------------------------------
def _check_int64(g: Graph, report: Report) -> None:
    """TensorRT 10 runs INT64, but big INT64 tensors cost twice INT32's memory and bandwidth."""
    for name, t in g.info.items():
        if t.tensor_type.elem_type != TensorProto.INT64 or name in g.const or name not in g.consumed:
            continue  # (an output nothing reads, such as TopK's indices beside its values, is never kept)
        dims = g.dims(name) or []
        known = int(np.prod([d for d in dims if isinstance(d, int)] or [1]))
        # Dim 0 is the batch in every stage; two more dynamic dims mean an N x N-like INT64 tensor.
        dynamic = [d for d in dims[1:] if not isinstance(d, int)]
        if len(dynamic) >= 2 or known >= LARGE_INT64:
            report(g.producer.get(name), "warning", f"INT64 tensor {name!r} of shape {dims} may be large; "
                                                    "INT32 would halve its memory", name)


def _shape_taint(g: Graph) -> set[str]:
    """Tensors whose shape depends on input *values* (not only on input shapes)."""
    value_dep = {i.name for i in g.model.graph.input} - g.const
    shape_dep: set[str] = set()
    for n in g.model.graph.node:
        ins, out = [i for i in n.input if i], [o for o in n.output if o]
        if n.op_type in ("Shape", "Size"):  # a shape read carries data only when that shape is data-dependent
            dep, vals = False, any(i in shape_dep for i in ins)
        else:
            dep = any(i in shape_dep for i in ins) or n.op_type in DATA_DEPENDENT_OPS
            dep |= any(len(n.input) > k and n.input[k] in value_dep for k in SHAPE_INPUTS.get(n.op_type, ()))
            vals = any(i in value_dep for i in ins) or n.op_type in DATA_DEPENDENT_OPS
        shape_dep.update(out if dep else [])
        value_dep.update(out if vals else [])
    return shape_dep


def _check_output_shapes(model: onnx.ModelProto, g: Graph, report: Report) -> None:
    """Each stage is one engine: an output whose shape comes from data values cannot cross into the next one."""
    symbols = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    tainted = _shape_taint(g)
    for out in model.graph.output:
        declared = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in out.type.tensor_type.shape.dim]
        inferred = g.dims(out.name)
        node = g.producer.get(out.name)
        for i, (got, want) in enumerate(zip(inferred or [], declared)):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                report(node, "error", f"output {out.name!r} dim {i} is {got}, declared {want}", out.name)
        loose = [i for i, d in enumerate(inferred or []) if not isinstance(d, int) and d not in symbols]
        if not loose:
            continue
        if out.name in tainted:
            report(node, "error", f"output {out.name!r} has data-dependent dims {loose} (inferred {inferred}): "
                                  "no data-dependent shape may cross an engine boundary", out.name)
        elif any(not (isinstance(declared[i], int) or declared[i] in symbols) for i in loose if i < len(declared)):
            report(node, "warning", f"output {out.name!r} dims {loose} follow neither an input dim nor a constant "
                                    f"(inferred {inferred}, declared {declared})", out.name)


# ---- bundles ----------------------------------------------------------------------------------
def lint_bundle(bundle: Path, target: str = "tensorrt", trt_version: str = "10.8") -> list[Finding]:
    """Lint every ONNX stage listed in the bundle's manifest; findings are ordered by stage."""
    if target not in TARGETS:
        raise InputError(f"lint target {target!r} is not supported; expected one of {list(TARGETS)}")
    bundle, table = Path(bundle), load_table()
    findings = _version_note(table, trt_version) if target == "tensorrt" else []
    for st in load_manifest(bundle).stages:
        # The graph without its external weights: a multi-GB LLM lints in the memory of its graph.
        model = onnx.load(str(inside(bundle, st.file)), load_external_data=False)
        if target != "tensorrt":
            findings += lint_ort_cpu(model, st.name, st.extra.get("target"))
            continue
        stage_findings = lint_model(model, st.name, table, set(PLUGIN_OPS))
        if st.extra.get("target") not in (None, "tensorrt"):
            stage_findings.append(Finding(st.name, "", "", "warning", f"quantized for {st.extra['target']}, not TensorRT: "
                                          "recalibrate with `setok calibrate --target tensorrt` for TensorRT's forms"))
        opset = max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=None)
        if opset is not None and opset != st.opset:
            stage_findings.append(Finding(st.name, "", "", "warning", f"manifest says opset {st.opset}, the model imports {opset}"))
        stage_findings += _plugin_version_note(st, trt_version)
        log.info("lint %s: %d findings, %d errors", st.name, len(stage_findings),
                 sum(f.severity == "error" for f in stage_findings))
        findings += stage_findings
    return findings


def _plugin_version_note(st, trt_version: str) -> list[Finding]:
    """A plugin-form stage cannot be built by a TensorRT without Python AOT plugins (JetPack 6's 10.3)."""
    from setok.plugins.versions import TRT_PYTHON_PLUGIN_MIN, dotted, version_tuple

    try:
        older = version_tuple(trt_version)[:2] < TRT_PYTHON_PLUGIN_MIN
    except ValueError:
        raise InputError(f"--trt-version {trt_version!r} is not a version; expected e.g. 10.3 or 10.13") from None
    if not st.custom_op or not older:
        return []
    return [Finding(st.name, "", "", "warning", f"TensorRT {trt_version} has no Python AOT plugins (needs >= "
                    f"{dotted(TRT_PYTHON_PLUGIN_MIN)}): `setok build` takes the standard-op form of {st.serves} there")]


def _version_note(table: dict, trt_version: str) -> list[Finding]:
    """The table is one TensorRT release's; say so when linting for another one."""
    have = str(table["tensorrt_version"])
    same_major = trt_version.split(".")[0] == have.split(".")[0]
    why = "ops added after your release would pass here" if same_major else "a different major release"
    return [] if trt_version == have else [Finding("*", "", "", "warning" if same_major else "error",
                                                   f"linting for TensorRT {trt_version} with the TensorRT {have} op table ({why})")]
