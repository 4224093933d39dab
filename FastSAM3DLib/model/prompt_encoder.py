"""3D prompt encoder: clicks and a low-resolution mask -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding: [sin u, cos u, sin u], u = 2 pi (2c - 1) G."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        # Drawn once at training time and stored in every checkpoint: load it, never re-draw.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        # A broadcast product and sum, not a matrix product: it stays in full precision
        # under a bf16 autocast or TF32 matmuls, which would round the arguments (up to
        # ~20 rad) by a tenth of a radian; so the rest of the decoder may run in bf16.
        gaussian = self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = ((2 * coords - 1).unsqueeze(-1) * gaussian).sum(-2)
        coords = 2 * math.pi * coords
        # The sine block is repeated: the official weights were trained on this layout.
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """(C, size, size, size) encoding of the cell centres of the embedding grid.

        Axes 0 and 1 are swapped relative to point coordinates (as in the
        trained model): cell (i, j, k) is encoded at ((j + .5), (i + .5), (k + .5)) / size.
        """
        device = self.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        a0, a1, a2 = torch.meshgrid(centres, centres, centres, indexing="ij")
        return self._encode(torch.stack([a1, a0, a2], dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """(B, N, C) encoding of continuous voxel coordinates in [0, image_size]."""
        return self._encode(coords / image_size)


class PromptEncoder3D(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: int, input_image_size: int,
                 mask_in_chans: int, box_prompts: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # index 0: negative click, 1: positive click; with box prompts 2 and 3: box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4 if box_prompts else 2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords (B, N, 3) voxel indices of the crop, labels (B, N): 1 positive,
        0 negative, -1 not a point, and with box prompts 2 / 3 for the corners of
        a box (two voxel indices, lowest and highest per axis). A padding point
        is appended, as the released models were trained."""
        b = coords.shape[0]
        coords = coords.float() + 0.5                     # voxel index -> voxel centre
        coords = torch.cat([coords, coords.new_zeros(b, 1, 3)], dim=1)
        labels = torch.cat([labels.to(coords.device), labels.new_full((b, 1), -1)], dim=1)
        embedding = self.pe_layer.points(coords, self.input_image_size)
        labels = labels[..., None]
        # torch.where (not boolean indexing) keeps shapes static for CUDA graphs.
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        for label, point_embedding in enumerate(self.point_embeddings):
            embedding = embedding + torch.where(labels == label, point_embedding.weight, 0.0)
        return embedding

    def embed_mask(self, mask_logits: torch.Tensor | None, batch: int) -> torch.Tensor:
        if mask_logits is not None:
            return self.mask_downscaling(mask_logits)
        g = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, g, g, g)

    def forward(self, coords: torch.Tensor, labels: torch.Tensor,
                mask_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(coords, labels)
        return sparse, self.embed_mask(mask_logits, coords.shape[0])
