"""Model configurations: one code path, every variant described by data.

The named configurations reproduce the official checkpoints' architectures
(see ``docs/models.md``); a checkpoint written by this project carries its own
configuration, so compact or retrained variants need no code change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

BlockFormula = Literal["prenorm", "fastsam3d"]


@dataclass(frozen=True)
class EncoderConfig:
    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 384
    # 0 = every attention block is global. SAM-Med3D uses 14 (> the 8^3 grid),
    # which pads the grid to one 14^3 window; the weights depend on that padding.
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    # FastSAM3D's student starts with blocks that have no attention at all.
    attention_free_blocks: int = 0
    # "prenorm": y = x + A(LN1 x); out = y + M(LN2 y)   (SAM-Med3D, turbo weights)
    # "fastsam3d": y = x + A(LN1 x); z = LN2 y; out = z + M(z)   (FastSAM3D code)
    block_formula: BlockFormula = "prenorm"
    use_rel_pos: bool = True
    # LongNet-style dilated attention, as (segment length w, dilation r) pairs over
    # the flattened token sequence; None = exact attention.
    sparse_attention: tuple[tuple[int, int], ...] | None = None

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def is_windowed(self, block_index: int) -> bool:
        return self.window_size > 0 and block_index not in self.global_attn_indexes


@dataclass(frozen=True)
class DecoderConfig:
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class ModelConfig:
    name: str
    encoder: EncoderConfig
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Voxel spacing (mm) of the crops the weights were trained on.
    spacing_mm: float = 1.5
    # (finest, coarsest) crop spacing in mm the weights were trained across; None = trained at
    # spacing_mm only (the official checkpoints): the engine then keeps the spacing fixed by default.
    trained_spacing_range_mm: tuple[float, float] | None = None
    # Box prompts: two more point embeddings for the corners (labels 2 and 3, as
    # SAM encodes boxes). The official checkpoints have none.
    box_prompts: bool = False
    # A first prompt of one positive click is ambiguous (a part, the organ, or more): the
    # decoder's three multimask outputs answer it and the IoU head picks one, as SAM does.
    # Only for weights trained that way; the official checkpoints trained the single mask only.
    multimask_first_click: bool = False

    @property
    def image_embedding_size(self) -> int:
        return self.encoder.grid_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        enc = dict(data["encoder"])
        enc["global_attn_indexes"] = tuple(enc.get("global_attn_indexes", ()))
        if enc.get("sparse_attention") is not None:
            enc["sparse_attention"] = tuple(tuple(p) for p in enc["sparse_attention"])
        return cls(
            name=data["name"],
            encoder=EncoderConfig(**enc),
            prompt_embed_dim=data.get("prompt_embed_dim", 384),
            mask_in_chans=data.get("mask_in_chans", 16),
            decoder=DecoderConfig(**data.get("decoder", {})),
            spacing_mm=data.get("spacing_mm", 1.5),
            trained_spacing_range_mm=(None if data.get("trained_spacing_range_mm") is None
                                      else tuple(float(v) for v in data["trained_spacing_range_mm"])),
            box_prompts=bool(data.get("box_prompts", False)),
            multimask_first_click=bool(data.get("multimask_first_click", False)),
        )


SAM_MED3D = ModelConfig(name="sam-med3d", encoder=EncoderConfig())

FASTSAM3D_TEACHER = ModelConfig(
    name="fastsam3d-teacher", encoder=EncoderConfig(block_formula="fastsam3d")
)

FASTSAM3D = ModelConfig(
    name="fastsam3d",
    encoder=EncoderConfig(
        depth=6,
        num_heads=6,
        window_size=0,
        global_attn_indexes=(),
        attention_free_blocks=2,
        block_formula="fastsam3d",
    ),
)

NAMED_CONFIGS: dict[str, ModelConfig] = {
    c.name: c for c in (SAM_MED3D, FASTSAM3D_TEACHER, FASTSAM3D)
}

# The project's own compact model: FastSAM3D's layout (2 attention-free + 4
# global-attention blocks, FastSAM3D block formula) at a third of the width, so
# the fp16 weights stay small enough to ship; prompt encoder and decoder are
# unchanged (384 wide), so a SAM-Med3D / FastSAM3D decoder can initialise it.
DEFAULT_COMPACT = ModelConfig(
    name="default",
    encoder=EncoderConfig(
        embed_dim=256,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        window_size=0,
        global_attn_indexes=(),
        attention_free_blocks=2,
        block_formula="fastsam3d",
    ),
)
