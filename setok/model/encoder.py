"""encoder stage: ViT over the image -> patch features (B, N, C) with a 2-D sin/cos code added.

The features that enter clustering are LayerNorm-ed (no affine) before the position code is
added: distances then keep their spread as training moves the features, so a fixed tau keeps
a stable token count (measured: without it the count collapsed to min_tokens in ~200 steps).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from setok.config import EncoderConfig
from setok.model.layers import Block, init_weights, sincos_2d

MEAN = (0.5, 0.5, 0.5)  # the built-in ViT's (EncoderConfig's defaults)
STD = (0.5, 0.5, 0.5)


class ViT(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_in", sincos_2d(cfg.grid, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        init_weights(self)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embed(pixel_values)  # (B, C, G, G)
        x = x.flatten(2).transpose(1, 2) + self.pos_in  # (B, C, G, G) -> (B, N, C)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class HFVision(nn.Module):
    """A Hugging Face vision tower (model/families.py); `last_hidden_state` are the patch features."""

    def __init__(self, cfg: EncoderConfig, pretrained: bool = False):
        super().__init__()
        from setok.model.families import build_vision, read_config, require_dir

        config = cfg.hf_config or read_config(require_dir(cfg.hf_path, "vision tower"), "--encoder")
        self.model = build_vision(config, cfg.hf_path if pretrained else None)
        self.proj = nn.Linear(self.model.config.hidden_size, cfg.width)
        self.num_patches = cfg.num_patches

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = self.model(pixel_values=pixel_values).last_hidden_state  # (B, prefix + N, H)
        h = h[:, -self.num_patches :]  # drop the leading CLS / register tokens, if any
        return self.proj(h)  # (B, N, H) -> (B, N, C)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.backbone = HFVision(cfg, pretrained) if cfg.hf_path or cfg.hf_config else ViT(cfg)
        if cfg.freeze:  # the tower keeps its weights; HFVision's projection to C still trains
            (self.backbone.model if isinstance(self.backbone, HFVision) else self.backbone).requires_grad_(False)
        self.register_buffer("pos_out", sincos_2d(cfg.grid, cfg.width) * cfg.pos_scale, persistent=False)

    def features(self, pixel_values: Tensor) -> Tensor:
        """Normalised content features (B, N, C), before the position code."""
        h = self.backbone(pixel_values)
        return nn.functional.layer_norm(h, (self.cfg.width,))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.features(pixel_values) + self.pos_out  # (B, N, C): `patch_features`


def preprocess(images: Tensor, cfg: EncoderConfig | None = None) -> Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), with the tower's mean / std."""
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, H, W, 3) -> (B, 3, H, W)
    mean = torch.tensor(cfg.mean if cfg else MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std if cfg else STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
