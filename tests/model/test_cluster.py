"""The cluster stage against SETOK.md: a loop-by-loop reference and hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setok.config import ClusterConfig
from setok.model.cluster import dpc_knn, pairwise_distance, pairwise_sq


def reference(d2: np.ndarray, cfg: ClusterConfig):
    """SETOK.md transcribed with plain loops, for one image, from its squared distances d^2.

    Arithmetic follows the documented float32 contract: neighbour d^2 summed in ascending
    order; densities compared through that mean (exp is strictly decreasing)."""
    n = d2.shape[0]
    k = min(cfg.k, n)
    d = np.sqrt(d2)
    m = np.zeros(n, dtype=np.float32)
    for i in range(n):
        acc = np.float32(0)
        for v in np.sort(d2[i])[:k]:
            acc = np.float32(acc + v)
        m[i] = acc / np.float32(k)
    # exp's last bit differs between libms (numpy vs torch vs CUDA); scores of different
    # patches can tie under one and not another, so the reference uses torch's exp.
    rho = torch.exp(-torch.from_numpy(m)).numpy()
    delta = np.zeros(n, dtype=np.float32)
    for i in range(n):
        denser = [j for j in range(n) if m[j] < m[i] or (m[j] == m[i] and j < i)]
        delta[i] = min(d[i, j] for j in denser) if denser else d.max()
    score = rho * delta
    order = sorted(range(n), key=lambda i: (-score[i], i))
    passing = int((score > cfg.tau).sum())
    count = min(max(passing, min(cfg.min_tokens, n)), min(cfg.max_tokens, n))
    centers = sorted(order[:count])
    assignment = []
    for i in range(n):
        if i in centers:
            assignment.append(centers.index(i))
        else:
            best = min(range(len(centers)), key=lambda t: (d[i, centers[t]], t))
            assignment.append(best)
    padded = centers + [-1] * (cfg.max_tokens - len(centers))
    return np.array(assignment), len(centers), np.array(padded)


def check_against_reference(x: torch.Tensor, cfg: ClusterConfig):
    out = dpc_knn(x, cfg)
    d2 = pairwise_sq(x).numpy()
    for b in range(x.shape[0]):
        assignment, count, centers = reference(d2[b], cfg)
        assert out.num_tokens[b].item() == count
        np.testing.assert_array_equal(out.assignment[b].numpy(), assignment)
        np.testing.assert_array_equal(out.centers[b].numpy(), centers)


def test_distance_matches_definition():
    x = torch.randn(2, 9, 5)
    direct = torch.linalg.norm(x.unsqueeze(2) - x.unsqueeze(1), dim=-1) / math.sqrt(5)
    torch.testing.assert_close(pairwise_distance(x), direct, atol=1e-5, rtol=1e-5)
    assert torch.all(pairwise_distance(x).diagonal(dim1=1, dim2=2) == 0)


def test_single_patch():
    out = dpc_knn(torch.randn(1, 1, 4), ClusterConfig(k=8, tau=0.1, min_tokens=2, max_tokens=3))
    assert out.num_tokens.tolist() == [1]
    assert out.assignment.tolist() == [[0]]
    assert out.centers.tolist() == [[0, -1, -1]]


def test_identical_features_ties_break_by_index():
    # d = 0 everywhere: equal densities, so only patch 0 has no denser patch, all scores are 0,
    # nothing passes tau, the min_tokens=2 highest are patches 0 and 1 (ties by index), and
    # every non-center goes to token 0 (ties by lower token index).
    out = dpc_knn(torch.ones(1, 4, 8), ClusterConfig(k=2, tau=0.25, min_tokens=2, max_tokens=3))
    assert out.num_tokens.tolist() == [2]
    assert out.centers.tolist() == [[0, 1, -1]]
    assert out.assignment.tolist() == [[0, 1, 0, 0]]


def test_two_points_by_hand():
    # d01 = 1, rho = exp(-(0 + 1) / 2) for both: patch 0 is densest (tie, lower index) so its
    # delta is the image max (1); patch 1's delta is d10 = 1; both scores exp(-0.5) = 0.607.
    x = torch.tensor([[[0.0], [1.0]]])
    both = dpc_knn(x, ClusterConfig(k=2, tau=0.5, min_tokens=1, max_tokens=2))
    assert both.num_tokens.tolist() == [2] and both.assignment.tolist() == [[0, 1]]
    capped = dpc_knn(x, ClusterConfig(k=2, tau=0.5, min_tokens=1, max_tokens=1))
    assert capped.centers.tolist() == [[0]] and capped.assignment.tolist() == [[0, 0]]
    none = dpc_knn(x, ClusterConfig(k=2, tau=0.7, min_tokens=1, max_tokens=2))
    assert none.num_tokens.tolist() == [1] and none.centers.tolist() == [[0, -1]]


def test_separated_groups_become_tokens():
    g = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1], [5.1, 5.0]])
    out = dpc_knn(g[None], ClusterConfig(k=3, tau=1.0, min_tokens=1, max_tokens=4))
    assert out.num_tokens.tolist() == [2]
    assert out.assignment.tolist() == [[0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("tau", [0.0, 0.2, 10.0])
def test_random_matches_reference(tau):
    torch.manual_seed(0)
    check_against_reference(torch.randn(3, 40, 6), ClusterConfig(k=5, tau=tau, min_tokens=2, max_tokens=7))


def test_more_than_max_pass_keeps_highest_scores():
    torch.manual_seed(1)
    x = torch.randn(2, 30, 4) * 10
    cfg = ClusterConfig(k=3, tau=0.0, min_tokens=1, max_tokens=5)
    assert dpc_knn(x, cfg).num_tokens.tolist() == [5, 5]
    check_against_reference(x, cfg)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 24),
    k=st.integers(1, 10),
    tau=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    min_tokens=st.integers(1, 4),
    extra=st.integers(0, 6),
    seed=st.integers(0, 10_000),
    levels=st.integers(1, 4),
)
def test_property_contract(n, k, tau, min_tokens, extra, seed, levels):
    """Small integer features make ties common; the output always meets the contract."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, levels, size=(2, n, 3)).astype(np.float32))
    cfg = ClusterConfig(k=k, tau=tau, min_tokens=min_tokens, max_tokens=min_tokens + extra)
    out = dpc_knn(x, cfg)
    for b in range(2):
        count = int(out.num_tokens[b])
        assert min(cfg.min_tokens, n) <= count <= min(cfg.max_tokens, n)
        a, centers = out.assignment[b], out.centers[b]
        assert a.min() >= 0 and a.max() < count
        real = centers[:count]
        assert torch.all(real[1:] > real[:-1]), "centers are raster-ordered"
        assert torch.all(centers[count:] == -1)
        assert torch.all(a[real] == torch.arange(count)), "every center owns itself"
    check_against_reference(x, cfg)
