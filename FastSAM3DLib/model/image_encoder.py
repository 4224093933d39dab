"""3D ViT image encoder of SAM-Med3D and FastSAM3D (one class, config-driven)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention3D
from .common import LayerNorm3d, MLPBlock, patchify
from .config import EncoderConfig


class PatchEmbed3D(nn.Module):
    """Non-overlapping patches -> channels-last tokens. The stride = kernel
    convolution (key ``proj``) runs as one matrix product over flattened patches."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj.kernel_size[0]
        if any(s % p for s in x.shape[2:]):
            raise ValueError(f"the input sides {tuple(x.shape[2:])} must be multiples of the patch size {p}")
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patchify(x, p), weight, self.proj.bias)       # (B, D, H, W, C)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad a (B, D, H, W, C) grid at the high end of each axis to a multiple
    of ``window`` and cut it into (B * n_windows, window, window, window, C)."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % window, (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int, int],
                       size: tuple[int, int, int]) -> torch.Tensor:
    dp, hp, wp = padded
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    d, h, w = size
    return x[:, :d, :h, :w]


class EncoderBlock(nn.Module):
    """Transformer block. Attention-free blocks own only ``norm2`` and ``mlp``."""

    def __init__(self, config: EncoderConfig, index: int):
        super().__init__()
        dim = config.embed_dim
        self.has_attention = index >= config.attention_free_blocks
        self.window_size = config.window_size if config.is_windowed(index) else 0
        self.formula = config.block_formula
        if self.has_attention:
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            grid = self.window_size or config.grid_size
            self.attn = Attention3D(dim, config.num_heads, config.use_rel_pos, grid,
                                    config.sparse_attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * config.mlp_ratio))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        if not self.window_size:
            return self.attn(x)
        size = x.shape[1:4]
        if max(size) <= self.window_size and not self.attn.sparse_pairs:
            return self.attn(x, window=self.window_size)        # one window holds the grid
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_attention:
            x = x + self._attend(x)
        if self.formula == "prenorm":
            return x + self.mlp(self.norm2(x))
        # FastSAM3D: the residual stream continues from the normalised value.
        x = self.norm2(x)
        return x + self.mlp(x)


class ImageEncoderViT3D(nn.Module):
    """(B, 1, S, S, S) z-normalised crop -> (B, out_chans, S/16, S/16, S/16)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        g = config.grid_size
        self.patch_embed = PatchEmbed3D(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, config.embed_dim))
        self.blocks = nn.ModuleList(EncoderBlock(config, i) for i in range(config.depth))
        self.neck = nn.Sequential(
            nn.Conv3d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm3d(config.out_chans),
            nn.Conv3d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(config.out_chans),
        )

    def set_sparse_attention(self, pairs: tuple[tuple[int, int], ...] | None) -> None:
        """Switch every attention block to LongNet sparse attention (None = exact)."""
        for block in self.blocks:
            if block.has_attention:
                block.attn.sparse_pairs = tuple(tuple(p) for p in pairs) if pairs else None

    def forward(self, x: torch.Tensor, return_block_outputs: bool = False):
        """With ``return_block_outputs`` also returns the token grids
        (B, g, g, g, C) after patch embedding and after every block, the hooks
        layer-wise distillation matches."""
        x = self.patch_embed(x) + self.pos_embed
        outputs = [x]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        embedding = self.neck(x.permute(0, 4, 1, 2, 3))
        if return_block_outputs:
            return embedding, outputs
        return embedding
