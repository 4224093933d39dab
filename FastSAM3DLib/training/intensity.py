"""Intensity synthesis and augmentation of crop batches, on the crops' device.

SynthSeg's idea (Billot et al., 2023): an image drawn from a label map with a
random intensity distribution per label, then blurred, biased, noised and
degraded in resolution, teaches a network shapes instead of one scanner's
contrast. ``synthesise_from_labels`` does that for a batch of label crops;
``augment_intensity`` applies the same degradations, milder, to real crops.
Every per-sample choice is a tensor drawn from the caller's generator: no
host synchronisation, one kernel per operation for the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLUR_RADIUS = 4                 # kernel half-width in voxels: sigmas up to ~2 voxels fit


def _uniform(shape, generator: torch.Generator, low: float = 0.0, high: float = 1.0,
             device=None) -> torch.Tensor:
    values = torch.rand(shape, generator=generator, device=generator.device)
    return (low + (high - low) * values).to(device or generator.device)


def _normal(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device or generator.device)


def gaussian_blur(volumes: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur (B, 1, D, H, W) with a separate Gaussian per sample and axis.

    sigmas (B, 3) in voxels (0 = no blur along that axis). Three separable
    passes, each one grouped convolution whose groups are the samples."""
    batch = volumes.shape[0]
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=volumes.device, dtype=volumes.dtype)
    x = volumes.reshape(1, batch, *volumes.shape[2:])
    for axis in range(3):
        sigma = sigmas[:, axis].to(volumes.dtype).clamp_min(1e-3)[:, None]
        kernel = torch.exp(-0.5 * (offsets[None] / sigma) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        shape = [batch, 1, 1, 1, 1]
        shape[2 + axis] = offsets.numel()
        padding = [0, 0, 0]
        padding[axis] = BLUR_RADIUS
        x = F.conv3d(x, kernel.reshape(shape), padding=tuple(padding), groups=batch)
    return x.reshape(volumes.shape)


def smooth_field(batch: int, size, cells: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, 1, *size) zero-mean smooth random field of unit-ish amplitude:
    normal noise on a ``cells``^3 grid, interpolated trilinearly."""
    coarse = _normal((batch, 1, cells, cells, cells), generator, device)
    return F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=True)


def synthesise_from_labels(labels: torch.Tensor, generator: torch.Generator, max_label: int,
                           ct_like: torch.Tensor | None = None) -> torch.Tensor:
    """A random-contrast image for each label crop (B, 1, D, H, W) of integer
    ids in 0..max_label.

    Per sample and label a mean and a spread (MR-like: mean in [0, 1] of a
    positive range, background often black; CT-like, where ``ct_like`` (B,)
    is true: means in Hounsfield-like units with air-dark background), then
    per-sample partial-volume and thick-slice blur, a multiplicative bias
    field and noise. The result has the intensity range of raw scans, so the
    engine's own z-normalisation follows."""
    batch, device = labels.shape[0], labels.device
    size = labels.shape[2:]
    count = max_label + 1
    if ct_like is None:
        ct_like = torch.zeros(batch, dtype=torch.bool, device=device)
    ct = ct_like.to(device)[:, None]
    means_mr = _uniform((batch, count), generator, 0.05, 1.0, device)
    # Black background (outside the head/body) in most MR-like samples, as real scans.
    black = _uniform((batch, 1), generator, device=device) < 0.6
    means_mr[:, :1] = torch.where(black, torch.zeros_like(means_mr[:, :1]), means_mr[:, :1])
    means_ct = _uniform((batch, count), generator, -200.0, 400.0, device)
    means_ct[:, :1] = _uniform((batch, 1), generator, -1000.0, -100.0, device)
    means = torch.where(ct, means_ct, means_mr)
    spread_mr = _uniform((batch, count), generator, 0.0, 0.08, device)
    spread_ct = _uniform((batch, count), generator, 0.0, 40.0, device)
    spreads = torch.where(ct, spread_ct, spread_mr)
    flat = labels.reshape(batch, -1).long().clamp(0, max_label)
    image = means.gather(1, flat) + spreads.gather(1, flat) * _normal(flat.shape, generator, device)
    image = image.reshape(labels.shape)

    # Partial volume (isotropic) plus, in a third of the samples, thick slices along one axis.
    sigmas = _uniform((batch, 1), generator, 0.0, 1.0, device).expand(batch, 3).clone()
    thick = _uniform((batch,), generator, device=device) < 0.33
    axis = (_uniform((batch,), generator, device=device) * 3).long().clamp(max=2)
    thickness = _uniform((batch,), generator, 0.8, 2.0, device)
    sigmas[torch.arange(batch, device=device), axis] = torch.where(
        thick, thickness, sigmas[torch.arange(batch, device=device), axis])
    image = gaussian_blur(image, sigmas)

    bias = smooth_field(batch, size, 4, generator, device) * _uniform((batch, 1, 1, 1, 1), generator, 0, 0.3,
                                                                       device)
    mr = ~ct[:, :, None, None, None]
    image = torch.where(mr, image * torch.exp(bias), image)
    noise_mr = _uniform((batch, 1, 1, 1, 1), generator, 0.0, 0.04, device)
    noise_ct = _uniform((batch, 1, 1, 1, 1), generator, 0.0, 25.0, device)
    image = image + torch.where(mr, noise_mr, noise_ct) * _normal(image.shape, generator, device)
    image = torch.where(mr, image.clamp_min(0), image)
    return _gamma(image, generator, mr.reshape(batch), strength=0.3)


def _gamma(image: torch.Tensor, generator: torch.Generator, which: torch.Tensor,
           strength: float) -> torch.Tensor:
    """x -> max · (x / max)^γ, log γ ~ N(0, strength), on the samples marked in
    ``which`` (B,) (positive, MR-like images; others unchanged)."""
    batch = image.shape[0]
    peak = image.flatten(1).amax(1).clamp_min(1e-6).reshape(batch, 1, 1, 1, 1)
    gamma = torch.exp(strength * _normal((batch, 1, 1, 1, 1), generator, image.device))
    changed = peak * (image.clamp_min(0) / peak) ** gamma
    return torch.where(which.reshape(batch, 1, 1, 1, 1), changed, image)


def augment_intensity(image: torch.Tensor, generator: torch.Generator, ct_like: torch.Tensor) -> torch.Tensor:
    """Milder degradations of real crops (B, 1, D, H, W) in raw units: blur
    (some samples), contrast and brightness, bias field and gamma (MR-like),
    and noise proportional to the crop's intensity spread."""
    batch, device = image.shape[0], image.device
    ct = ct_like.to(device).reshape(batch, 1, 1, 1, 1)
    spread = image.flatten(1).std(1).clamp_min(1e-6).reshape(batch, 1, 1, 1, 1)
    blurred = _uniform((batch, 1), generator, device=device) < 0.3
    sigmas = torch.where(blurred, _uniform((batch, 3), generator, 0.0, 1.0, device),
                         torch.zeros(batch, 3, device=device))
    image = gaussian_blur(image, sigmas)
    scale = _uniform((batch, 1, 1, 1, 1), generator, 0.85, 1.15, device)
    image = image * scale
    bias = smooth_field(batch, image.shape[2:], 4, generator, device) * _uniform(
        (batch, 1, 1, 1, 1), generator, 0, 0.2, device)
    image = torch.where(ct, image, image * torch.exp(bias))
    image = _gamma(image, generator, ~ct.reshape(batch), strength=0.2)
    noise = _uniform((batch, 1, 1, 1, 1), generator, 0.0, 0.05, device) * spread
    return image + noise * _normal(image.shape, generator, device)


def insert_shapes(image: torch.Tensor, targets: torch.Tensor, chosen: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """"Anything" objects: in the samples marked by ``chosen`` (B,), a random
    smooth blob (an ellipsoid with a noisy surface, radius 3-30 voxels, near the
    crop centre) painted with a contrast of 0.5-3 of the crop's spread, soft
    edged; it becomes that sample's target. Teaches the model to follow the
    click on objects no label map holds (lesions, cysts, devices)."""
    batch, device = image.shape[0], image.device
    size = image.shape[2:]
    axes = [torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2 for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))                     # (3, D, H, W)
    centre = _uniform((batch, 3, 1, 1, 1), generator, -12.0, 12.0, device)
    radii = torch.exp(_uniform((batch, 3, 1, 1, 1), generator, math.log(3.0), math.log(30.0), device))
    radius = ((grid[None] - centre) / radii).pow(2).sum(1, keepdim=True).sqrt()
    surface = 1 + 0.25 * smooth_field(batch, size, 5, generator, device)
    blob = radius < surface
    edge = torch.sigmoid((surface - radius) * radii.amin(1, keepdim=True) * 2)   # ~1 voxel soft edge
    spread = image.flatten(1).std(1).clamp_min(1e-6).reshape(batch, 1, 1, 1, 1)
    sign = torch.where(_uniform((batch, 1, 1, 1, 1), generator, device=device) < 0.5, -1.0, 1.0)
    contrast = sign * _uniform((batch, 1, 1, 1, 1), generator, 0.5, 3.0, device) * spread
    mark = chosen.reshape(batch, 1, 1, 1, 1).to(device)
    image = torch.where(mark, image + contrast * edge, image)
    targets = torch.where(mark, blob, targets)
    return image, targets
