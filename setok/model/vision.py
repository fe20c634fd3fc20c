"""The vision tokenizer (SeTok): encoder -> cluster -> merger, and the detokenizer back to pixels.

`tokenizer` picks how patches become tokens: "setok" (DPC-KNN clusters, dynamic count),
"patch" (every patch a token) or "topk" (a fixed K of DPC centers, TCFormer-style). The three
share every other part, so the baselines differ from SeTok in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from setok.config import SetokimConfig
from setok.model.cluster import Clusters, dpc_knn, every_patch, fixed_topk
from setok.model.detokenizer import Detokenizer
from setok.model.encoder import Encoder
from setok.model.losses import reconstruction_loss
from setok.model.merger import Merger


@dataclass
class VisionTokens:
    tokens: Tensor  # (B, T, D), zero beyond num_tokens
    clusters: Clusters
    features: Tensor  # (B, N, C) patch features (position code included)
    content: Tensor  # (B, N, C) the same before the position code (what grouping losses see)


class VisionTokenizer(nn.Module):
    def __init__(self, cfg: SetokimConfig, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        width = cfg.encoder.width
        self.encoder = Encoder(cfg.encoder, pretrained)
        self.merger = Merger(cfg.merger, width, cfg.max_tokens, cfg.encoder.grid)
        self.detokenizer = Detokenizer(cfg.detokenizer, cfg.encoder, cfg.merger.token_dim)

    def cluster(self, features: Tensor) -> Clusters:
        # Discrete: no gradient flows through it. And float32 under a bf16 autocast: the distances are
        # |x|^2 + |y|^2 - 2 x.y of LayerNorm-ed features (|x|^2 ~ C), and a bf16 x.y cancels to noise
        # for near neighbours, which is what density and delta read (measured on the shipped
        # checkpoint: 64 of 64 held-out images clustered differently, 9.8 tokens instead of 8.1).
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.cfg.tokenizer == "patch":
                return every_patch(features)
            if self.cfg.tokenizer == "topk":
                return fixed_topk(features, self.cfg.topk_tokens, self.cfg.cluster.k)
            return dpc_knn(features, self.cfg.cluster)

    def forward(self, pixel_values: Tensor, encoder_grad: bool = True) -> VisionTokens:
        """`encoder_grad=False` freezes encoder and clusters but keeps the merger differentiable
        (stage 2 with --tune-merger)."""
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            content = self.encoder.features(pixel_values)  # (B, N, C)
            features = content + self.encoder.pos_out
        clusters = self.cluster(features)
        tokens = self.merger(features, clusters.assignment, clusters.num_tokens)  # (B, T, D)
        return VisionTokens(tokens, clusters, features, content)

    def reconstruct(self, vt: VisionTokens) -> Tensor:
        return self.detokenizer(vt.tokens, vt.clusters.num_tokens)  # (B, 3, H, W)

    def reconstruction_loss(self, vt: VisionTokens, pixels: Tensor, masks: Tensor | None) -> Tensor:
        """The detokenizer's training loss on the image's own tokens (losses.reconstruction_loss)."""
        rgb, logits = self.detokenizer.paint(vt.tokens, vt.clusters.num_tokens)
        return reconstruction_loss(rgb, logits, pixels, getattr(self.detokenizer, "codebook", None), masks)


class ClusterOutputs(nn.Module):
    """The cluster stage as exported: features -> (assignment, num_tokens, centers) tensors."""

    def __init__(self, vision: VisionTokenizer):
        super().__init__()
        self.vision = vision

    def forward(self, patch_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.vision.cluster(patch_features)
        return c.assignment, c.num_tokens, c.centers
