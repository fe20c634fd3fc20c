"""The plugin node against what TensorRT's ONNX parser reads, and the build's network flags.

The parser's attribute names, types and defaults are read from the quoted parser source in
sources/onnx_parser_plugin_attrs.txt (fetched from onnx/onnx-tensorrt and NVIDIA/TensorRT), not
written down here from memory.
"""

from __future__ import annotations

import enum
import re
import types
from pathlib import Path

import onnx
import pytest

from setok.backends.trt import build as B
from setok.backends.trt.lint import (
    DPC_ATTRS,
    PARSER_ATTRS,
    PARSER_DEFAULTS,
    lint_bundle,
    lint_model,
    load_table,
)
from setok.config import ClusterConfig
from setok.export.cluster import PARSER_ATTRS as EXPORT_PARSER_ATTRS
from setok.export.cluster import plugin_model
from setok.manifest import CLUSTER_OP

SOURCE = Path(__file__).parent / "sources" / "onnx_parser_plugin_attrs.txt"
CPP_TYPES = {"std::string": onnx.AttributeProto.STRING, "int": onnx.AttributeProto.INT,
             "int32_t": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT}


def parser_reads() -> dict[str, tuple[int, str | None]]:
    """attribute -> (ONNX type, default) from every `attrs.get<T>("name", default)` of the quoted source."""
    found = {}
    for cpp, name, default in re.findall(r'attrs\.get<([\w:]+)>\("(\w+)",\s*([^)]*)\)', SOURCE.read_text()):
        found[name] = (CPP_TYPES[cpp], default.strip().strip('"'))
    return found


def test_the_quoted_source_names_the_three_attributes():
    reads = parser_reads()
    assert reads == {"plugin_version": (onnx.AttributeProto.STRING, "1"),
                     "plugin_namespace": (onnx.AttributeProto.STRING, ""), "aot": (onnx.AttributeProto.INT, "0")}
    text = SOURCE.read_text()
    assert 'attrs.count("aot")' in text and "kSTRICT_AOT" in text  # the node's aot decides
    assert 'string attribute called "plugin_namespace"' in text and 'attribute called "aot"' in text  # the docs


def test_exporter_and_lint_use_exactly_the_parsers_attributes():
    reads = parser_reads()
    assert {k: t for k, (t, _) in reads.items()} == PARSER_ATTRS == EXPORT_PARSER_ATTRS
    assert PARSER_DEFAULTS == {k: d for k, (t, d) in reads.items() if t == onnx.AttributeProto.STRING and d}
    # loadFields passes only the creator's own fields: none of the parser's attributes may be one.
    assert not set(PARSER_ATTRS) & set(DPC_ATTRS)


def test_the_exported_node_carries_what_the_parser_reads():
    node = plugin_model(ClusterConfig(k=8, tau=0.3, min_tokens=2, max_tokens=16)).graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    for name, (kind, _) in parser_reads().items():
        assert attrs[name].type == kind, name
    assert attrs["plugin_namespace"].s.decode() == CLUSTER_OP.domain
    assert attrs["plugin_version"].s.decode() == str(CLUSTER_OP.version) and attrs["aot"].i == 1
    assert set(attrs) == set(DPC_ATTRS) | set(PARSER_ATTRS)


def _lint(**change):
    model = plugin_model(ClusterConfig(k=8, tau=0.3, min_tokens=2, max_tokens=16))
    node = model.graph.node[0]
    for name, value in change.items():
        i = [a.name for a in node.attribute].index(name)
        if value is None:
            del node.attribute[i]
        else:
            node.attribute[i].CopyFrom(onnx.helper.make_attribute(name, value))
    return lint_model(model, "cluster_plugin", load_table(), {CLUSTER_OP.id})


def _messages(findings, severity="error"):
    return [f.message for f in findings if f.severity == severity]


def test_lint_accepts_the_exported_node():
    assert _lint() == []


def test_lint_checks_the_parser_attributes():
    assert any("plugin_version='2'" in m for m in _messages(_lint(plugin_version="2")))
    assert any("plugin_namespace='other'" in m for m in _messages(_lint(plugin_namespace="other")))
    assert any("aot=3" in m for m in _messages(_lint(aot=3)))
    assert any("'aot' must be INT" in m for m in _messages(_lint(aot="yes")))
    assert any("missing attribute 'plugin_namespace'" in m for m in _messages(_lint(plugin_namespace=None)))
    assert _messages(_lint(plugin_version=None)) == []  # the parser's default "1" is the creator's version
    assert any("PREFER_AOT" in m for m in _messages(_lint(aot=None), "warning")) and not _messages(_lint(aot=None))
    assert any("unknown attribute 'flavour'" in m for m in _messages(_lint_extra("flavour")))


def _lint_extra(name):
    model = plugin_model(ClusterConfig(k=8, tau=0.3, min_tokens=2, max_tokens=16))
    model.graph.node[0].attribute.append(onnx.helper.make_attribute(name, 1))
    return lint_model(model, "cluster_plugin", load_table(), {CLUSTER_OP.id})


def test_lint_for_jetpack_says_the_plugin_form_is_not_built_there(tiny_bundle):
    notes = [f for f in lint_bundle(tiny_bundle, trt_version="10.3") if "no Python AOT plugins" in f.message]
    assert notes and all(f.severity == "warning" and f.stage == "cluster_plugin" for f in notes)
    assert not [f for f in lint_bundle(tiny_bundle, trt_version="10.9") if "no Python AOT plugins" in f.message]


# ---- network flags: the names TensorRT's bindings define per release (python/src/infer/pyCore.cpp) ----
def _trt(version: str, names: tuple[str, ...]):
    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=enum.IntEnum("F", names, start=0))


@pytest.mark.parametrize(("version", "names", "want"), [
    ("10.3.0", ("EXPLICIT_BATCH", "STRONGLY_TYPED"), {"STRONGLY_TYPED"}),
    ("10.9.0", ("EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"),
     {"STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"}),
    ("11.1.0", ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"),
     {"PREFER_AOT_PYTHON_PLUGINS"}),  # 11: strongly typed always, the flag deprecated and ignored
])
def test_network_flags(version, names, want):
    trt = _trt(version, names)
    plan = B.plan_stage("encoder", "int8", "int8", int(version.split(".")[0]))
    flags = B.network_flags(trt, plan)
    assert {f.name for f in trt.NetworkDefinitionCreationFlag if flags & (1 << int(f))} == want


def test_plugin_form_needs_tensorrt_with_aot_plugins():
    assert not B._plugin_available("10.8.0.43") and not B._plugin_available("10.3.0")


def test_aot_engines_need_no_python_plugin_at_run_time(monkeypatch):
    import setok.backends.trt.runner as T
    from setok.backends.trt.engines import EngineEntry

    monkeypatch.setattr(T, "tensorrt", lambda: pytest.fail("an AOT engine must not need tensorrt.plugin"))
    entry = EngineEntry("cluster", "c.engine", "", "cluster_plugin.onnx", "fp32", [], [], [],
                        {"id": CLUSTER_OP.id, "module": "setok.plugins.trt_plugin", "impl": "aot"})
    T._load_plugin(entry)  # nothing imported, nothing registered
