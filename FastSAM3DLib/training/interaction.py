"""Simulated clicks for training, vectorised over the batch on the training device.

SAM-Med3D trains with a sequence of click steps per sample: the first click
lies in the target, every later click in the error of the current prediction
(a voxel of fn is a positive click, a voxel of fp a negative one), the
previous low-res logits are fed back as the mask prompt, and at one middle
step and the last step no click is added, so the model also learns to refine
from its own mask alone. ``FastSAM3DLib.clicks`` implements the evaluation
rules with distance transforms on the CPU; here a click is drawn uniformly
from the error region (the "random" rule), optionally from its eroded core
(closer to the RITM rule's "deep inside the largest error"), with one random
number per voxel and an argmax, so a whole batch costs a few GPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClickPlan:
    """The click schedule of one iteration, the same for every sample and rank
    (so all ranks do the same amount of work per step)."""
    steps: int
    silent_steps: frozenset[int]        # steps that add no click (mask prompt only)
    box_first: bool = False             # the first prompt is a box (two corners), not a click

    def adds_click(self, step: int) -> bool:
        return step not in self.silent_steps


def make_click_plan(min_steps: int, max_steps: int, generator: torch.Generator,
                    box_probability: float = 0.0) -> ClickPlan:
    """``steps`` uniform in [min_steps, max_steps]; the first step always
    prompts (a box with ``box_probability``, else a click); with 3 or more
    steps one random middle step and the last step are silent."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"click steps must satisfy 1 <= min <= max, got {min_steps}..{max_steps}")
    steps = int(torch.randint(min_steps, max_steps + 1, (), generator=generator))
    box_first = bool(torch.rand((), generator=generator) < box_probability)
    if steps < 3:
        return ClickPlan(steps, frozenset(), box_first)
    middle = int(torch.randint(1, steps - 1, (), generator=generator))
    return ClickPlan(steps, frozenset({middle, steps - 1}), box_first)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of (B, 1, D, H, W) with a cube of side 2 radius + 1
    (outside the volume does not erode). Separable: per axis, the AND of the
    2 radius + 1 shifted slices of a copy padded with ones. Elementwise ops
    that ``torch.compile`` fuses into one pass; the pooling kernels that did
    this before were among the slowest of the training step."""
    x = mask.to(torch.uint8)
    for axis in (2, 3, 4):
        pad = [0, 0] * (4 - axis) + [radius, radius]
        padded = F.pad(x, pad, value=1)
        n = x.shape[axis]
        x = padded.narrow(axis, 0, n)
        for shift in range(1, 2 * radius + 1):
            x = x & padded.narrow(axis, shift, n)
    return x.bool()


def _any_per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.flatten(1).any(1).view(-1, *([1] * (mask.dim() - 1)))


def choose_click(pred: torch.Tensor, target: torch.Tensor, use_interior: torch.Tensor,
                 scores: torch.Tensor, interior_radius: int = 2, depth: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic part of ``sample_clicks`` given its random numbers:
    ``use_interior`` (B,) bool and ``scores`` uniform, shaped like ``pred``;
    ``interior_radius`` 0 never looks at the eroded core. The core is the
    deepest non-empty of ``depth`` successive erosions of fn and fp (each by
    ``interior_radius``). A pure function of tensors, so that it can be compiled."""
    target = target.bool()
    pred = pred.bool()
    fn, fp = target & ~pred, ~target & pred
    region = fn | fp
    region = torch.where(_any_per_sample(region), region, target)
    region = torch.where(_any_per_sample(region), region, torch.ones_like(region))
    if interior_radius > 0:
        core = torch.zeros_like(region)
        fn_core, fp_core = fn, fp
        for _ in range(depth):
            fn_core, fp_core = erode(fn_core, interior_radius), erode(fp_core, interior_radius)
            level = (fn_core | fp_core) & region
            core = torch.where(_any_per_sample(level), level, core)
        use_core = use_interior.view(-1, *([1] * (pred.dim() - 1))) & _any_per_sample(core)
        region = torch.where(use_core, core, region)
    flat_index = torch.where(region, scores, -1.0).flatten(1).argmax(1)
    size = region.shape[2:]
    coords = torch.stack([flat_index // (size[1] * size[2]), (flat_index // size[2]) % size[1],
                          flat_index % size[2]], dim=1)
    labels = target.flatten(1).gather(1, flat_index[:, None]).squeeze(1).long()
    return coords, labels


def sample_clicks(pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                  interior_prob: float = 0.5, interior_radius: int = 2, choose=choose_click,
                  depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per sample.

    pred, target: (B, 1, D, H, W) bool. Returns coordinates (B, 3) int64 in
    tensor-axis order and labels (B,) int64 (1 = positive, 0 = negative).
    The click is a uniform voxel of fn ∪ fp; with probability ``interior_prob``
    of the eroded fn ∪ fp (fn and fp eroded separately) when that is not
    empty; ``depth`` > 1 erodes up to that many times and draws from the
    deepest level left, near the centre of the thickest error, where the
    evaluation's centre rule and users click. A sample without error gets a
    positive click in its target, and an empty target a negative click
    anywhere, so every sample always has a click.
    Branch-free over the batch (no host synchronisation). ``choose``:
    ``choose_click`` or a compiled copy of it (the random numbers are drawn
    here, eagerly, from ``generator``).
    """
    batch = pred.shape[0]
    use_interior = torch.rand(batch, generator=generator, device=generator.device).to(pred.device) < interior_prob
    scores = torch.rand(pred.shape, generator=generator, device=generator.device).to(pred.device)
    return choose(pred, target, use_interior, scores, interior_radius if interior_prob > 0 else 0, depth)


def box_corners(target: torch.Tensor, generator: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """(B, 2, 3) int64 box prompts from (B, 1, D, H, W) bool targets: the lowest
    and highest voxel index of the target per axis, each moved by up to
    ``jitter`` of the box's extent (a user's box is not exact), clamped to the
    crop. An empty target gets the whole crop."""
    batch, size = target.shape[0], target.shape[2:]
    lows, highs = [], []
    for axis in range(3):
        other = [d for d in range(2, 5) if d != axis + 2]
        present = target.any(dim=other).squeeze(1)                       # (B, n)
        n = size[axis]
        index = torch.arange(n, device=target.device)
        low = torch.where(present, index, n).amin(1)
        high = torch.where(present, index, -1).amax(1)
        empty = high < 0
        lows.append(torch.where(empty, 0, low))
        highs.append(torch.where(empty, n - 1, high))
    low, high = torch.stack(lows, 1).float(), torch.stack(highs, 1).float()
    extent = (high - low + 1)
    shift = (torch.rand((batch, 2, 3), generator=generator, device=generator.device).to(target.device) * 2 - 1)
    limit = torch.tensor(size, device=target.device, dtype=torch.float32) - 1
    low = (low + jitter * extent * shift[:, 0]).round().clamp(min=0).minimum(limit)
    high = (high + jitter * extent * shift[:, 1]).round().clamp(min=0).minimum(limit)
    return torch.stack([torch.minimum(low, high), torch.maximum(low, high)], 1).long()


def upsampling_matrix(low: int, high: int, device=None) -> torch.Tensor:
    """(high, low) matrix of 1-D linear interpolation as ``F.interpolate``
    (mode "linear", align_corners=False) computes it."""
    eye = torch.eye(low, device=device)[:, None]                       # (low, 1, low)
    return F.interpolate(eye, size=high, mode="linear", align_corners=False)[:, 0].T.contiguous()


def upsample_logits(low_res: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(low_res, scale, mode="trilinear", align_corners=False)`` of
    (B, C, n, n, n) as three matrix products with ``upsampling_matrix``: the
    same numbers, but a backward pass of matrix products instead of the
    atomic scatter of the trilinear kernel's backward, which dominated the
    training step at large batches."""
    x = low_res @ matrix.T                                               # (..., n, n, N)
    x = (x.transpose(-1, -2) @ matrix.T).transpose(-1, -2)               # (..., n, N, N)
    b, c, n, h, w = x.shape
    x = (matrix @ x.reshape(b, c, n, h * w)).reshape(b, c, -1, h, w)     # (..., N, N, N)
    return x
