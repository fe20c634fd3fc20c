"""The `cluster_plugin` form in ONNX Runtime: DPC-KNN in numpy as an onnxruntime-extensions PyOp.

No torch here: a deployed runtime runs the plugin-form ONNX (one node of `setok.manifest.CLUSTER_OP`,
see setok/export/cluster.py) with onnxruntime + onnxruntime-extensions + numpy only.
onnxruntime-extensions is optional and imported lazily.

Domain: onnxruntime-extensions puts PyOps in `ai.onnx.contrib` unless the op_type is written
"domain::OpType"; then it creates that custom-op domain when the library is registered. So the
op is registered as CLUSTER_OP.id and the exported model runs unchanged (no domain
rewrite). Ops must be declared before `register_custom_ops_library`, which
`plugin_session_options` guarantees.

Note: onnxruntime-extensions 0.15 itself imports torch when torch is installed (an optional
import in its cvt.py), so torch may be loaded once the plugin is *used*; importing this module
never loads it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from setok.errors import BundleError
from setok.manifest import CLUSTER_OP
from setok.optional import require

if TYPE_CHECKING:  # annotations only: onnxruntime is imported where a session is made
    import onnxruntime

log = logging.getLogger(__name__)

_MISSING = "onnxruntime-extensions is needed to run the cluster_plugin form: pip install onnxruntime-extensions"
_registered = False


# ---------------------------------------------------------------- DPC-KNN in numpy (float32)


def pairwise_sq(x: np.ndarray) -> np.ndarray:
    """d_ij^2 = ||x_i - x_j||^2 / C, float32 in the reference's order.  (B, N, C) -> (B, N, N)."""
    c = x.shape[-1]
    sq = (x * x).sum(-1, dtype=np.float32)  # (B, N)
    gram = np.matmul(x, x.transpose(0, 2, 1))
    # (sq_i + sq_j) - 2 g_ij, as the torch reference groups it.
    d2 = (sq[:, :, None] + sq[:, None, :]) - np.float32(2.0) * gram
    d2 = np.maximum(d2, np.float32(0.0))
    n = x.shape[1]
    d2[:, np.arange(n), np.arange(n)] = 0.0  # rounding can leave tiny diagonal values
    return d2 / np.float32(c)


def neighbour_mean(d2: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k smallest d^2 per row, summed ascending left to right.  (B, N, N) -> (B, N)."""
    k = min(k, d2.shape[-1])
    nearest = np.sort(d2, axis=-1)[..., :k]
    acc = nearest[..., 0].copy()
    for j in range(1, k):  # a fixed order makes equal neighbour multisets give bit-equal means
        acc = acc + nearest[..., j]
    return acc / np.float32(k)


def denser_than(m: np.ndarray) -> np.ndarray:
    """mask[b, i, j] = m_j < m_i, or equal and j < i (densities compared through m)."""
    n = m.shape[-1]
    idx = np.arange(n)
    lower = (idx[None, :] < idx[:, None])[None]  # (1, N, N): j < i
    m_i, m_j = m[:, :, None], m[:, None, :]
    return (m_j < m_i) | ((m_j == m_i) & lower)


def peak_distance(d: np.ndarray, denser: np.ndarray) -> np.ndarray:
    """delta_i = min d_ij over denser j; the densest patch gets the image-wide max of d."""
    big = d.max(axis=(1, 2))  # (B,)
    delta = np.where(denser, d, np.float32(np.inf)).min(-1)
    return np.where(denser.any(-1), delta, big[:, None]).astype(np.float32)


def score_rank(score: np.ndarray) -> np.ndarray:
    """Rank per score, highest first, ties by lower index.  (B, N) -> (B, N) int64."""
    order = np.argsort(-score, axis=-1, kind="stable")  # stable: equal scores keep index order
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[-1])[None].repeat(len(score), 0), -1)
    return rank


def select_centers(score: np.ndarray, tau: float, min_tokens: int, max_tokens: int) -> np.ndarray:
    """Center mask (B, N): the top K by rank, K = clamp(#(score > tau), min_tokens, max_tokens)."""
    n = score.shape[-1]
    npass = (score > np.float32(tau)).sum(-1, keepdims=True)
    count = np.clip(npass, min(min_tokens, n), min(max_tokens, n))
    return score_rank(score) < count


def assign(d: np.ndarray, is_center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center per patch (argmin: first = lowest token index); centers own themselves."""
    token_of = np.cumsum(is_center, -1, dtype=np.int64) - 1
    nearest = np.where(is_center[:, None, :], d, np.float32(np.inf)).argmin(-1)
    assignment = np.take_along_axis(token_of, nearest, -1)
    return np.where(is_center, token_of, assignment), token_of


def centers_list(is_center: np.ndarray, max_tokens: int) -> np.ndarray:
    """(B, N) center mask -> (B, max_tokens) raster-ordered patch indices, -1 padded."""
    out = np.full((is_center.shape[0], max_tokens), -1, dtype=np.int64)
    for b, row in enumerate(is_center):  # B is small; per-image nonzero keeps this obvious
        idx = np.flatnonzero(row)[:max_tokens]
        out[b, : len(idx)] = idx
    return out


def dpc_knn_numpy(
    x: np.ndarray, k: int, tau: float, min_tokens: int, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DPC-KNN of SETOK.md on (B, N, C) features -> (assignment, num_tokens, centers), int64.

    Same float32 order as setok.model.cluster.dpc_knn. exp is numpy's: its last bit may differ
    from torch's, which can flip an exact score tie between patches of *different* m; BLAS and
    reduction order can also move d^2 by an ulp. Outputs match the reference exactly unless the
    input sits on such a knife edge (exact ties of equal features stay ties: same bits in).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"patch_features must be (B, N, C), got shape {x.shape}")
    d2 = pairwise_sq(x)
    d = np.sqrt(d2)
    m = neighbour_mean(d2, k)
    delta = peak_distance(d, denser_than(m))
    score = np.exp(-m) * delta
    is_center = select_centers(score, tau, min_tokens, max_tokens)
    assignment, _ = assign(d, is_center)
    num_tokens = is_center.sum(-1).astype(np.int64)
    return assignment.astype(np.int64), num_tokens, centers_list(is_center, max_tokens)


# ---------------------------------------------------------------- onnxruntime-extensions glue


def _extensions() -> Any:
    return require("onnxruntime_extensions", _MISSING)


def register_plugin() -> None:
    """Declare the cluster op's PyOp once per process."""
    global _registered
    if _registered:
        return
    ext = _extensions()
    dt = ext.PyCustomOpDef
    attrs = {
        "k": dt.dt_int64,
        "tau": dt.dt_float,
        "min_tokens": dt.dt_int64,
        "max_tokens": dt.dt_int64,
        # Read by TensorRT's ONNX parser, unused here; declared so the node's attributes are all known.
        "plugin_namespace": dt.dt_string,
        "plugin_version": dt.dt_string,
        "aot": dt.dt_int64,
    }

    # "domain::op" is how onnxruntime-extensions places a PyOp outside ai.onnx.contrib.
    @ext.onnx_op(
        op_type=CLUSTER_OP.id,
        inputs=[dt.dt_float],
        outputs=[dt.dt_int64] * 3,
        attrs=attrs,
    )
    def density_peak_cluster(x: np.ndarray, **kw: Any) -> tuple[np.ndarray, ...]:
        return dpc_knn_numpy(x, kw["k"], kw["tau"], kw["min_tokens"], kw["max_tokens"])

    _registered = True
    log.debug("registered PyOp %s", CLUSTER_OP.id)


def plugin_session_options(op: str = CLUSTER_OP.id) -> onnxruntime.SessionOptions:
    """onnxruntime.SessionOptions able to run a graph holding the custom op `op` (a manifest's `extra.op`)."""
    import onnxruntime

    if op != CLUSTER_OP.id:
        raise BundleError(f"custom op {op!r}: this runtime implements only {CLUSTER_OP.id}; re-export the bundle "
                          "with this setok version")
    register_plugin()  # must precede register_custom_ops_library: domains are built there
    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(_extensions().get_library_path())
    return so
