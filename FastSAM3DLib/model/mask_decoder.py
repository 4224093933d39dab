"""3D mask decoder: tokens + image embedding -> 32^3 mask logits and IoU estimates."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm3d, up_conv_tokens
from .config import DecoderConfig
from .transformer import TwoWayTransformer


class MaskDecoder3D(nn.Module):
    def __init__(self, transformer_dim: int, config: DecoderConfig):
        super().__init__()
        self.transformer = TwoWayTransformer(config.transformer_depth, transformer_dim,
                                             config.transformer_heads, config.transformer_mlp_dim)
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, config.iou_head_hidden_dim,
                                       self.num_mask_tokens, config.iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        # One image embedding serves a batch of prompts.
        src = image_embeddings.expand(b, -1, -1, -1, -1) + dense_prompt_embeddings
        pos = image_pe.expand(b, -1, -1, -1, -1)
        _, c, d, h, w = src.shape

        hs, src = self.transformer(src, pos, tokens)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        # Only the selected masks' hypernetworks run.
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens][:, selected]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in
                                enumerate(self.output_hypernetworks_mlps[selected])], dim=1)
        upscaled = self._upscale(src.reshape(b, d, h, w, c))
        bu, du, hu, wu, cu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(bu, du * hu * wu, cu).transpose(1, 2)).reshape(bu, -1, du, hu, wu)
        iou_pred = self.iou_prediction_head(hs[:, 0])
        return masks, iou_pred[:, selected]

    def _upscale(self, tokens: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` on channels-last tokens (B, g, g, g, C) -> (B, 4g, 4g, 4g, C/8)."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        return act2(up_conv_tokens(up2, act1(norm.tokens(up_conv_tokens(up1, tokens)))))
