"""setok's TensorRT plugin definitions run through TensorRT's own `tensorrt.plugin` package on CPU.

TensorRT's decorators and validators judge our register / impl / aot_impl functions; its creator
builds the plugin from our exported ONNX node the way the ONNX parser hands it over; its ShapeExpr /
SymInt32 classes evaluate our shape function and our AOT launch for N pinned (a static network dim)
and symbolic (a dynamic dim with a profile range). See trt_standin.py for the one stand-in: the
compiled `tensorrt` module, which needs libnvinfer.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trt_standin as S

from setok.config import ClusterConfig
from setok.export.cluster import plugin_model
from setok.manifest import CLUSTER_OP

pytestmark = pytest.mark.skipif(S.plugin_package_dir() is None,
                                reason=f"{S.WHEEL} is not installed (pip install -e '.[dev]')")
CFG = ClusterConfig(k=8, tau=0.3, min_tokens=2, max_tokens=16)


@pytest.fixture
def trt(monkeypatch):
    """TensorRT's plugin package over the stand-in, fresh per test; setok's registration state reset."""
    import setok.plugins.trt_plugin as P

    S.uninstall()
    monkeypatch.setattr(P, "_registered", False)
    trt, trtp = S.install()
    yield trt, trtp
    S.uninstall()


def _node(aot: bool = True):
    return plugin_model(CFG, aot=aot).graph.node[0]


def test_registration_passes_tensorrts_validators(trt):
    """Finding 1: TensorRT's _validate_aot_impl wants (inputs..., attrs..., outputs, tactic)."""
    from setok.plugins.trt_plugin import register_plugin

    register_plugin()
    _, trtp = trt
    from tensorrt.plugin._lib import QDP_REGISTRY

    desc = QDP_REGISTRY[CLUSTER_OP.id]
    assert desc.input_tensor_names == ["x"] and list(desc.input_attrs) == ["k", "tau", "min_tokens", "max_tokens"]
    assert desc.num_outputs == 3 and desc.impl_func is not None and desc.aot_impl_func is not None
    assert desc.aot_impl_attr_names == ["k", "tau", "min_tokens", "max_tokens"]
    assert trtp.op.setok.DensityPeakCluster is desc


def test_older_tensorrt_is_refused_with_the_minimum(monkeypatch):
    import setok.plugins.trt_plugin as P
    from setok.errors import MissingDependency

    S.uninstall()
    monkeypatch.setattr(P, "_registered", False)
    try:
        S.install("10.8.0.43")
        with pytest.raises(MissingDependency, match=r"TensorRT 10\.8\.0\.43 found; TensorRT >= 10\.9"):
            P.register_plugin()
    finally:
        S.uninstall()


def _plugin(trt, node, **flags):
    from setok.plugins.trt_plugin import register_plugin

    register_plugin()
    creator = S.creator_for(trt, node)
    assert creator is not None, "the parser finds no creator for the node's plugin_namespace / plugin_version"
    fields = S.fields_from_node(trt, creator, node)
    return creator.create_plugin(node.op_type, CLUSTER_OP.domain, fields, trt.TensorRTPhase.BUILD,
                                 S.request_from_node(trt, node, **flags))


def test_the_exported_node_selects_the_aot_implementation(trt):
    """Finding 2: the node's `aot` makes it STRICT_AOT; without it and without a network flag TensorRT refuses."""
    trt_mod, _ = trt
    from tensorrt.plugin._plugin_class import _TemplateAOTPlugin, _TemplateJITPlugin

    plugin = _plugin(trt_mod, _node())
    assert isinstance(plugin, _TemplateAOTPlugin) and not isinstance(plugin, _TemplateJITPlugin)
    assert plugin.attrs == {"k": 8, "tau": pytest.approx(0.3), "min_tokens": 2, "max_tokens": 16}
    bare = plugin_model(CFG).graph.node[0]
    del bare.attribute[[a.name for a in bare.attribute].index("aot")]
    with pytest.raises(ValueError, match="both AOT and JIT implementations"):
        _plugin(trt_mod, bare)
    assert isinstance(_plugin(trt_mod, bare, prefer_aot=True), _TemplateAOTPlugin)  # what setok build sets


def _shapes(trt, pinned: bool):
    """(input dims expressions, DynamicPluginTensorDesc) of patch_features [B, N, C=32]."""
    b = S.IDimensionExpr(None, "batch")
    n = S.IDimensionExpr(729) if pinned else S.IDimensionExpr(None, "num_patches")
    dims = (-1, 729 if pinned else -1, 32)
    return [S.DimsExprs([b, n, S.IDimensionExpr(32)])], [S.DynamicPluginTensorDesc(dims, trt.DataType.FLOAT,
                                                                                     (1, 729, 32), (4, 729, 32))]


@pytest.mark.parametrize("pinned", [True, False], ids=["N pinned", "N symbolic"])
def test_shape_function_through_shapeexpr(trt, pinned):
    trt_mod, _ = trt
    plugin = _plugin(trt_mod, _node())
    assert plugin.get_output_data_types([trt_mod.DataType.FLOAT], [3]) == [trt_mod.DataType.INT64] * 3
    inputs, _ = _shapes(trt_mod, pinned)
    outs = plugin.get_output_shapes(inputs, [], S.IExprBuilder())
    (b, n, _), (assignment, num_tokens, centers) = inputs[0], outs
    assert [len(o) for o in outs] == [2, 1, 2]
    assert assignment[0] is b and num_tokens[0] is b and centers[0] is b  # the batch flows through, symbolic
    assert assignment[1] is n and n.is_constant() == pinned
    assert centers[1].is_constant() and centers[1].get_constant_value() == CFG.max_tokens


_LAUNCH = """
import json, sys
sys.path.insert(0, sys.argv[1])
import trt_standin as S
from setok.config import ClusterConfig
from setok.export.cluster import plugin_model
from setok.plugins.trt_plugin import register_plugin

pinned = sys.argv[2] == "pinned"
trt, trtp = S.install()
register_plugin()
node = plugin_model(ClusterConfig(k=8, tau=0.3, min_tokens=2, max_tokens=16)).graph.node[0]
creator = S.creator_for(trt, node)
plugin = creator.create_plugin(node.op_type, "setok", S.fields_from_node(trt, creator, node), trt.TensorRTPhase.BUILD,
                               S.request_from_node(trt, node))
plugin.get_output_data_types([trt.DataType.FLOAT], [3])
b, n = S.IDimensionExpr(None, "batch"), (S.IDimensionExpr(729) if pinned else S.IDimensionExpr(None, "num_patches"))
inputs = [S.DimsExprs([b, n, S.IDimensionExpr(32)])]
plugin.get_output_shapes(inputs, [], S.IExprBuilder())
desc = [S.DynamicPluginTensorDesc((-1, 729 if pinned else -1, 32), trt.DataType.FLOAT, (1, 729, 32), (4, 729, 32))]
desc += [S.DynamicPluginTensorDesc(d, trt.DataType.INT64) for d in ((-1, -1), (-1,), (-1, 16))]
plugin.set_tactic(0)

class Setter(dict):
    nbSymExprs = 0

launch, extra = type("Launch", (), {})(), Setter()
plugin.get_launch_params(inputs, desc, 1, launch, extra, S.IExprBuilder())
name, ptx = plugin.get_kernel([d.desc for d in desc[:1]], [d.desc for d in desc[1:]])
name, ptx = (v.decode() if isinstance(v, bytes) else v for v in (name, ptx))
entry = ptx[ptx.index(".entry " + name):]
print(json.dumps({
    "name": name,
    "grid_x": launch.grid_x.expr.name, "block_x": launch.block_x.expr.value, "shared": launch.shared_mem.expr.value,
    "extra": [e.expr.value if e.expr.is_constant() else e.expr.name for e in (extra[i] for i in range(extra.nbSymExprs))],
    "params": entry[:entry.index(")")].count(".param"),
    "version": ptx.split(".version")[1].split()[0],
}))
"""


@pytest.mark.parametrize("pinned", [True, False], ids=["N pinned", "N symbolic"])
def test_aot_launch_through_symint32(pinned, tmp_path):
    """Findings 4 and 5: the AOT impl reads N's bound from the profile (not from a symbolic expr that is
    never constant) and calls constant_value(); TensorRT's AOT plugin turns our launch into PTX + SymInt32s."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"SETOK_PLUGIN_ARCH": "sm_87"}
    run = subprocess.run([sys.executable, "-c", _LAUNCH, str(Path(__file__).parent), "pinned" if pinned else "symbolic"],
                         env=env, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "holds at most" not in run.stderr  # no fallback bound: the profile's max was used
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["name"] == "dpc_knn_fused_kernel" and got["grid_x"] == "batch"
    assert got["params"] == 10  # x, n, c, k, tau_bits, min_tokens, max_tokens, 3 outputs: the documented layout
    from setok.plugins.cluster_kernels import tau_bits

    n = 729 if pinned else "num_patches"
    assert got["extra"] == [n, 32, CFG.k, tau_bits(CFG.tau), CFG.min_tokens, CFG.max_tokens]
    assert got["block_x"] == 8 * 32  # BLOCK_N = 1024 for N <= 729: 8 warps
    assert got["version"] == "8.5"  # sm_87: JetPack 6's PTX ISA


def test_the_wheel_is_a_tensorrt_with_aot_plugins():
    """The CI twin runs a TensorRT whose plugin package has aot_impl (>= 10.9)."""
    from setok.plugins.versions import TRT_PYTHON_PLUGIN_MIN, version_tuple

    assert version_tuple(S.wheel_version())[:2] >= TRT_PYTHON_PLUGIN_MIN
    text = textwrap.dedent((S.plugin_package_dir() / "_lib.py").read_text())
    assert "def aot_impl(" in text
