"""The intensity normalisation the weights were trained with, for the engine's
numpy crops and for training batches on the GPU (which has no SimpleITK, so
this module imports neither it nor the rest of the engine)."""

from __future__ import annotations

import numpy as np
import torch


def normalize_intensity(crop) -> np.ndarray:
    """Z-normalisation the weights were trained with (torchio ZNormalization,
    mask x > 0): mean and unbiased std over voxels > 0, applied to all voxels;
    unchanged when that std is 0 or undefined."""
    crop = np.asarray(crop, dtype=np.float32)
    foreground = crop[crop > 0]
    if foreground.size < 2:
        return crop
    mean = foreground.mean(dtype=np.float64)
    std = foreground.std(ddof=1, dtype=np.float64)
    if std == 0:
        return crop
    return ((crop - mean) / std).astype(np.float32)


def normalize_intensity_batch(crops: torch.Tensor) -> torch.Tensor:
    """``normalize_intensity`` of each crop of a (B, ...) tensor on its own
    device (training cuts crops on the GPU): mean and unbiased std over each
    crop's voxels > 0; crops with fewer than two such voxels or zero spread
    are unchanged. Statistics in float64, as the numpy version."""
    flat = crops.flatten(1)
    foreground = flat > 0
    count = foreground.sum(1, keepdim=True).double()
    values = torch.where(foreground, flat, 0).double()
    mean = values.sum(1, keepdim=True) / count.clamp_min(1)
    variance = (torch.where(foreground, flat.double() - mean, 0) ** 2).sum(1, keepdim=True) / (count - 1).clamp_min(1)
    std = variance.sqrt()
    usable = (count >= 2) & (std > 0)
    normalised = ((flat.double() - mean) / torch.where(usable, std, 1.0)).to(crops.dtype)
    return torch.where(usable, normalised, flat).reshape(crops.shape)
