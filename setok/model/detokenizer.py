"""detokenizer stage: one learnable query per output patch cross-attends to the vision tokens,
a few transformer blocks, and a pixel head that paints each patch.

Cross-attention logits get a learned Gaussian locality bias, -|p_i - c_t|^2 * s_h * r_th,
between the query patch's centre p_i and the token's centroid c_t (token dims 0-1). Without it
the attention starts uniform and the decoder painted the dataset mean for hundreds of steps.
r_th = exp(w_h . token_t) is each token's own reach per head (zero-initialised, so it starts as
the shared s_h): a large object's token must reach farther than a small one's, and with one
width for all, objects' edges and interiors were most of the error (300 stage-1 steps: recon
19.0 -> 20.4 dB; a per-token anisotropic reach with a shifted centre was no better, 20.4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from setok.config import DetokenizerConfig, EncoderConfig
from setok.model.layers import Block, init_weights, sincos_2d, unpatchify
from setok.model.merger import OFFSET_FEATURES, offset_logits, patch_coords, token_mask


class Detokenizer(nn.Module):
    def __init__(self, cfg: DetokenizerConfig, enc: EncoderConfig, token_dim: int):
        super().__init__()
        self.patch = enc.patch_size
        self.queries = nn.Parameter(torch.zeros(1, enc.num_patches, cfg.width))
        self.register_buffer("pos", sincos_2d(enc.grid, cfg.width), persistent=False)
        self.token_in = nn.Linear(token_dim, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cross=True) for _ in range(cfg.depth)
        )
        self.heads = cfg.heads
        self.register_buffer("coords", patch_coords(enc.grid), persistent=False)
        self.locality = nn.Parameter(torch.full((cfg.heads,), 50.0))  # 1/(2 sigma^2), sigma ~ 0.1
        self.reach = nn.Linear(token_dim, cfg.heads)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, enc.patch_size * enc.patch_size * 3)
        init_weights(self)
        nn.init.zeros_(self.reach.weight)  # starts as the shared per-head locality
        self.field = None
        if cfg.shape_field:
            # Zero-initialised (it starts as the disc) and drawn on a forked RNG: every other
            # weight is the same with or without it.
            with torch.random.fork_rng(devices=[]):
                self.field = nn.Linear(token_dim, cfg.heads * OFFSET_FEATURES)
            nn.init.zeros_(self.field.weight)
            nn.init.zeros_(self.field.bias)
        self.codes = None
        if cfg.palette:
            with torch.random.fork_rng(devices=[]):
                self.codes = nn.Linear(cfg.width, enc.patch_size * enc.patch_size * (cfg.palette + 1))
            # Step 0 paints background everywhere, i.e. the regression's image.
            nn.init.zeros_(self.codes.weight)
            with torch.no_grad():
                self.codes.bias.copy_(torch.tensor([3.0] + [0.0] * cfg.palette).repeat(enc.patch_size ** 2))
            # (palette, 3) in the normalised pixel space; set from data before training (train/palette.py).
            self.register_buffer("codebook", torch.zeros(cfg.palette, 3))

    def forward(self, tokens: Tensor, num_tokens: Tensor) -> Tensor:
        """(B, T, D), (B,) -> image (B, 3, H, W) in the encoder's normalised pixel space."""
        rgb, logits = self.paint(tokens, num_tokens)
        if logits is None:
            return rgb
        cls = logits.argmax(1, keepdim=True)  # (B, 1, H, W): 0 background, 1..k a colour code
        # Row 0 is a placeholder for background, so the class indexes the table as it is: an integer
        # Sub/Clip on the indices is INT64 Clip in ONNX, which TensorRT's Clip does not take.
        table = torch.cat([self.codebook.new_zeros(1, 3), self.codebook])  # (k+1, 3)
        code = table[cls[:, 0]].permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        return torch.where(cls > 0, code, rgb)

    def paint(self, tokens: Tensor, num_tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """The regression's image (B, 3, H, W) and, with a palette, the per-pixel logits over
        background + codes (B, k+1, H, W): what the losses read."""
        x = self.features(tokens, num_tokens)  # (B, N, W)
        rgb = unpatchify(self.head(x), self.patch)  # (B, N, p*p*3) -> (B, 3, H, W)
        if self.codes is None:
            return rgb, None
        b, g, p, c = x.shape[0], rgb.shape[-1] // self.patch, self.patch, self.codebook.shape[0] + 1
        per = self.codes(x).reshape(b, g, g, p, p, c)  # (B, N, p*p*(k+1)) -> (B, G, G, p, p, k+1), unpatchify's layout
        return rgb, per.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, k+1, H, W)

    def features(self, tokens: Tensor, num_tokens: Tensor) -> Tensor:
        """(B, T, D), (B,) -> (B, N, W): each output patch's normalised feature, before the pixel head."""
        ctx = self.token_in(tokens)  # (B, T, W)
        x = (self.queries + self.pos).expand(tokens.shape[0], -1, -1)  # (B, N, W)
        bias = self.cross_bias(tokens, num_tokens)
        for blk in self.blocks:
            x = blk(x, ctx=ctx, ctx_mask=bias)
        return self.norm(x)

    def cross_bias(self, tokens: Tensor, num_tokens: Tensor, points: Tensor | None = None) -> Tensor:
        """(B, heads, N, T) additive logits: locality prior, and a large negative for padding; at the
        patch centres, or at other (P, 2) points (scripts/detok_shape_probe.py's in-patch paint)."""
        points = self.coords if points is None else points
        where = tokens[..., :2]  # (B, T, 2) token centroids
        d2 = ((points.unsqueeze(1) - where.unsqueeze(1)) ** 2).sum(-1)  # (P,1,2)-(B,1,T,2) -> (B, P, T)
        scale = self.locality.view(1, -1, 1) * torch.exp(self.reach(tokens)).transpose(1, 2)  # (B, heads, T)
        bias = -d2.unsqueeze(1) * scale.unsqueeze(2)  # (B, heads, P, T)
        if self.field is not None:
            bias = bias + self.shape_bias(tokens, points)
        pad = ~token_mask(num_tokens, tokens.shape[1])  # (B, T)
        # A finite large negative, not -inf: exports cleanly and never makes a NaN row.
        return bias.masked_fill(pad[:, None, None, :], -1e4)

    def shape_bias(self, tokens: Tensor, points: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, heads, P, T): each token's field, linear in the merger's Fourier code of a
        point's offset from the token's centroid (the same code the merger's shape signature is
        built from), with weights read from the token. MatMuls, not Einsum, for TensorRT."""
        b, t, _ = tokens.shape
        weights = self.field(tokens).view(b, t, self.heads, OFFSET_FEATURES)  # (B, T, heads, 40)
        return offset_logits(self.coords if points is None else points, tokens[..., :2], weights)  # (B, heads, P, T)
