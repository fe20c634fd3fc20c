"""The CPU twin of TensorRT's Python plugin machinery: TensorRT's own `tensorrt.plugin` package
(pure Python, from the tensorrt-cu12-bindings wheel, where it is `tensorrt_bindings/plugin/`) loaded
against a minimal stand-in for the compiled `tensorrt` module, which needs libnvinfer.

The stand-in holds only what that package touches: the enums and base classes its modules name at
import, the plugin registry, PluginField(Collection), and an IExprBuilder whose expressions are
constants or named symbols (TensorRT's IDimensionExpr: constant only when the network's dim is
static). The parser-side helpers replay, in Python, what the ONNX parser does with a plugin node
(tests/backends/trt/sources/onnx_parser_plugin_attrs.txt): the creator's fields from the node's
attributes, and the creation request from `aot` or the network flags. Nothing of setok is faked.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx

WHEEL = "tensorrt-cu12-bindings"


def plugin_package_dir() -> Path | None:
    """tensorrt_bindings/plugin/ of the installed wheel (found without importing its compiled module)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "plugin"
    return path if (path / "__init__.py").is_file() else None


def wheel_version() -> str:
    from importlib import metadata

    return metadata.version(WHEEL)


# ---- expressions --------------------------------------------------------------------------------
class DimensionOperation(enum.IntEnum):
    SUM, PROD, MAX, MIN, SUB, EQUAL, LESS, FLOOR_DIV, CEIL_DIV = range(9)


_OPS = {
    DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IDimensionExpr:
    """A constant (build-time value) or a symbol, as TensorRT's IDimensionExpr."""

    def __init__(self, value: int | None = None, name: str = ""):
        self.value, self.name = value, name or str(value)

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        assert self.value is not None, f"{self.name} is not a build-time constant"
        return self.value

    def __repr__(self) -> str:
        return f"IDimensionExpr({self.name})"


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def operation(self, op, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(_OPS[DimensionOperation(op)](a.value, b.value))
        return IDimensionExpr(None, f"({a.name} {DimensionOperation(op).name} {b.name})")


class DimsExprs(list):
    def __init__(self, n: int | list = 0):
        super().__init__([None] * n if isinstance(n, int) else n)


class Dims(tuple):
    MAX_DIMS = 8


# ---- descriptors, fields, registry -----------------------------------------------------------------
class DataType(enum.IntEnum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4, FP4 = range(11)


class TensorFormat(enum.IntEnum):
    LINEAR = 0


class PluginTensorDesc:
    def __init__(self, dims=(), type=DataType.FLOAT, format=TensorFormat.LINEAR, scale=1.0):
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale


class DynamicPluginTensorDesc:
    """A plugin I/O at build time: dims with -1 where the profile lets them vary, plus min / max."""

    def __init__(self, dims, dtype, min=None, max=None):
        self.desc = PluginTensorDesc(dims, dtype)
        self.min, self.max = Dims(min or dims), Dims(max or dims)


class PluginFieldType(enum.IntEnum):
    FLOAT16, FLOAT32, FLOAT64, INT8, INT16, INT32, CHAR, DIMS, UNKNOWN, BF16, INT64, FP8, INT4, FP4 = range(14)


class PluginField:
    def __init__(self, name: str, data=None, type=PluginFieldType.UNKNOWN):
        self.name, self.type = name, type
        self.data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)


class PluginFieldCollection(list):
    pass


class Registry:
    def __init__(self):
        self.creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


class _Base:
    """The pybind base classes: their __init__ takes only self."""

    def __init__(self):
        pass


def standin(version: str) -> types.ModuleType:
    """The stand-in `tensorrt` module: only the names tensorrt.plugin touches."""
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    registry = Registry()
    m.get_plugin_registry = lambda: registry
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):
        setattr(m, name, type(name, (_Base,), {}))
    m.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, *a: None, "log": lambda self, *a: None})
    m.QuickPluginCreationRequest = enum.IntEnum("QuickPluginCreationRequest",
                                                "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT", start=0)
    m.TensorRTPhase = enum.IntEnum("TensorRTPhase", "BUILD RUNTIME", start=0)
    m.PluginArgType = enum.IntEnum("PluginArgType", "INT", start=0)
    m.PluginArgDataType = enum.IntEnum("PluginArgDataType", "INT8 INT16 INT32", start=0)
    for cls in (DimensionOperation, DataType, TensorFormat, PluginFieldType, IDimensionExpr, IExprBuilder, DimsExprs,
                Dims, PluginTensorDesc, DynamicPluginTensorDesc, PluginField, PluginFieldCollection):
        setattr(m, cls.__name__, cls)
    m.float32, m.float16, m.int32, m.int64, m.int8, m.bool = (DataType.FLOAT, DataType.HALF, DataType.INT32,
                                                               DataType.INT64, DataType.INT8, DataType.BOOL)
    m.nptype = lambda t: {DataType.FLOAT: np.float32, DataType.INT64: np.int64, DataType.INT32: np.int32}[t]
    return m


def install(version: str = "10.9.0.34") -> tuple[types.ModuleType, types.ModuleType]:
    """Put the stand-in and TensorRT's real plugin package in sys.modules as `tensorrt`, `tensorrt.plugin`.
    The caller removes them again (every `tensorrt*` key)."""
    path = plugin_package_dir()
    assert path is not None, f"{WHEEL} is not installed"
    trt = standin(version)
    sys.modules["tensorrt"] = trt
    spec = importlib.util.spec_from_file_location("tensorrt.plugin", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    trtp = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt.plugin"] = trtp
    trt.plugin = trtp
    spec.loader.exec_module(trtp)
    return trt, trtp


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        del sys.modules[name]


# ---- what the ONNX parser does with a plugin node ------------------------------------------------
def creator_for(trt, node: onnx.NodeProto):
    """importPluginCreator(op_type, plugin_version (default "1"), plugin_namespace (default ""))."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode()
    return trt.get_plugin_registry().get_creator(node.op_type, version, namespace)


def fields_from_node(trt, creator, node: onnx.NodeProto) -> PluginFieldCollection:
    """loadFields: walk the creator's field names, take each from the node (INT -> INT32, FLOAT -> FLOAT32,
    STRING -> CHAR); attributes the creator does not declare are not passed."""
    attrs = {a.name: a for a in node.attribute}
    fields = PluginFieldCollection()
    for f in creator.field_names:
        a = attrs.get(f.name)
        if a is None:
            continue
        if a.type == onnx.AttributeProto.INT:
            fields.append(PluginField(f.name, np.array([a.i], np.int32), PluginFieldType.INT32))
        elif a.type == onnx.AttributeProto.FLOAT:
            fields.append(PluginField(f.name, np.array([a.f], np.float32), PluginFieldType.FLOAT32))
        elif a.type == onnx.AttributeProto.STRING:
            fields.append(PluginField(f.name, a.s, PluginFieldType.CHAR))
        else:
            raise AssertionError(f"attribute type {a.type} of {f.name}: not a plugin field type here")
    return fields


def request_from_node(trt, node: onnx.NodeProto, prefer_aot: bool = False, prefer_jit: bool = False):
    """createPlugin (V3 quick): a node's `aot` is STRICT_AOT / STRICT_JIT, else the network's preference."""
    Q = trt.QuickPluginCreationRequest
    attrs = {a.name: a for a in node.attribute}
    if "aot" in attrs:
        return Q.STRICT_AOT if attrs["aot"].i else Q.STRICT_JIT
    return Q.PREFER_JIT if prefer_jit else (Q.PREFER_AOT if prefer_aot else Q.UNKNOWN)
