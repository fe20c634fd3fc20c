"""Choose the clustering threshold tau on training scenes.

DPC scores bunch tightly and move as features train, so a tau fixed before training either
collapses the token count to min_tokens or explodes it. We compute scores once and pick the
tau that best separates objects (fg_ari) and tracks scene complexity (tokens vs objects).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from setok.config import SetokimConfig
from setok.eval.metrics import fg_ari, spearman
from setok.model.cluster import assign, density_peaks, select_centers
from setok.model.encoder import preprocess
from setok.model.losses import patch_labels


@torch.no_grad()
def calibrate_tau(vision, items, cfg: SetokimConfig, candidates: int = 48) -> float:
    dev = next(vision.parameters(), torch.empty(0)).device  # a parameter-free encoder runs on the CPU
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])).to(dev), cfg.encoder)
    features = vision.encoder(px)
    d, score = density_peaks(features, cfg.cluster.k)
    masks = torch.from_numpy(np.stack([it.instance_mask for it in items]))
    labels = patch_labels(masks, cfg.encoder.patch_size).numpy()
    objects = [it.num_objects for it in items]
    taus = np.quantile(score.cpu().numpy(), np.linspace(0.80, 0.998, candidates))
    best, best_value = cfg.cluster.tau, -np.inf
    limit = cfg.encoder.num_patches / 8
    for tau in taus:
        ccfg = dataclasses.replace(cfg.cluster, tau=float(tau))
        centers = select_centers(score, ccfg)
        assignment, _ = assign(d, centers)
        counts = centers.sum(-1).cpu().numpy()
        if counts.mean() > limit:
            continue
        ari = np.mean([fg_ari(a, l) for a, l in zip(assignment.cpu().numpy(), labels)])
        value = ari + 0.25 * spearman(counts, objects)
        if value > best_value:
            best, best_value = float(tau), value
    return best
