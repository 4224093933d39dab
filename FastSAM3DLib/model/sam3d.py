"""The promptable 3D segmentation model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """State-dict keys equal the official SAM-Med3D / FastSAM3D checkpoints'."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT3D(config.encoder)
        self.prompt_encoder = PromptEncoder3D(config.prompt_embed_dim, config.image_embedding_size,
                                              config.encoder.img_size, config.mask_in_chans,
                                              box_prompts=config.box_prompts)
        self.mask_decoder = MaskDecoder3D(config.prompt_embed_dim, config.decoder)

    @property
    def input_size(self) -> int:
        return self.config.encoder.img_size

    @property
    def low_res_size(self) -> int:
        return self.config.image_embedding_size * 4

    @property
    def spacing_mm(self) -> float:
        return self.config.spacing_mm

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) z-normalised crop -> image embedding (B, 384, S/16, S/16, S/16)."""
        return self.image_encoder(volume)

    def decode(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt pass.

        points (B, N, 3): voxel coordinates of the crop in tensor-axis order;
        labels (B, N): 1 positive, 0 negative, and with ``config.box_prompts``
        2 / 3 for a box's first / opposite corner; mask_logits (B, 1, S/4, S/4, S/4):
        previous low-res logits, or None for the learned no-mask embedding
        (the official loops pass zeros on the first click, not None).
        Returns low-res logits (B, 1 or 3, S/4, S/4, S/4) and IoU estimates (B, 1 or 3).
        An embedding of batch 1 serves a batch of B prompts.
        """
        sparse, dense = self.prompt_encoder(points, labels, mask_logits)
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask)
