"""A model whose answer is known: it segments the bright voxels of its crop.

The "embedding" is the crop averaged over 4^3 cells (the low-res grid); the
logits are that average minus the midpoint of its range, so bright objects on
a zero background come out positive; every negative click subtracts a ball of
``NEGATIVE_RADIUS`` crop voxels. Positive clicks, box corners (labels 2
and 3, with ``box_prompts``) and the mask prompt are ignored. Every decoder call is recorded (crop-voxel points, labels, prompt, logits), so
tests can check what the engine asked for. Runs in milliseconds on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from FastSAM3DLib.model import Sam3D
from FastSAM3DLib.model.config import EncoderConfig, ModelConfig

NEGATIVE_RADIUS = 12.0          # crop voxels


def oracle_model(trained_spacing_range_mm=None, box_prompts: bool = False) -> Sam3D:
    config = ModelConfig(name="oracle", encoder=EncoderConfig(embed_dim=16, depth=1, num_heads=1,
                                                              window_size=0, global_attn_indexes=()),
                         trained_spacing_range_mm=trained_spacing_range_mm, box_prompts=box_prompts)
    model = Sam3D(config).eval()
    model.decoder_calls = []
    model.encode = lambda volume: F.avg_pool3d(volume.float(), 4)

    def decode(embedding, points, labels, mask_logits=None, multimask=False):
        cells = embedding[0, 0]
        logits = cells - (cells.max() + cells.min()) / 2 - 1e-3
        s = cells.shape[-1]
        centres = (torch.arange(s, dtype=torch.float32) + 0.5) * (config.encoder.img_size / s) - 0.5
        grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), dim=-1)
        for point, label in zip(points[0], labels[0]):
            if int(label) == 0:
                inside = ((grid - point) ** 2).sum(-1) <= NEGATIVE_RADIUS ** 2
                logits = logits - 1000.0 * inside
        model.decoder_calls.append({"points": points[0].clone(), "labels": labels[0].clone(),
                                    "prompt": None if mask_logits is None else mask_logits.clone(),
                                    "logits": logits[None, None].clone()})
        return logits[None, None], torch.ones(1, 1)

    model.decode = decode
    return model

