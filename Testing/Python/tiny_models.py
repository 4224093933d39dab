"""Tiny model configurations with deterministic synthetic weights, for fast tests."""

import torch
import torch.nn.functional as F

from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
from synthetic_weights import synthetic_state_dict

# FastSAM3D's layout (an attention-free block, then global attention) at 64^3.
TINY = ModelConfig(name="tiny", encoder=EncoderConfig(
    img_size=64, embed_dim=48, depth=3, num_heads=2, window_size=0, global_attn_indexes=(),
    attention_free_blocks=1, block_formula="fastsam3d"))
# SAM-Med3D's: a window (6) larger than the 4^3 token grid, then a global block.
TINY_WINDOWED = ModelConfig(name="tiny-windowed", encoder=EncoderConfig(
    img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=6, global_attn_indexes=(1,)))


def tiny_model(config: ModelConfig = TINY) -> Sam3D:
    model = Sam3D(config).eval()
    model.load_state_dict(synthetic_state_dict(model.state_dict()), strict=True)
    return model


def upsampled_mask(logits: torch.Tensor, size: int) -> torch.Tensor:
    """The reference pipelines' prediction: trilinear upsample to the crop, > 0."""
    return F.interpolate(logits.float(), size=(size,) * 3, mode="trilinear", align_corners=False) > 0
