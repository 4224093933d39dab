"""Losses of interactive training and distillation (computed in fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_per_sample(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(1 - soft Dice) + binary cross-entropy of each sample, a (B,) tensor; logits
    and target (B, ...). Dice keeps small targets from being ignored, BCE gives
    every voxel a gradient even when the prediction is far off."""
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    prob = torch.sigmoid(logits)
    soft_dice = 1 - (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    return soft_dice + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)


def ball_around(points: torch.Tensor, size: tuple[int, int, int], radius: float) -> torch.Tensor:
    """(B, 1, D, H, W) float: 1 within ``radius`` voxels of each sample's point
    (``points`` (B, 3) in tensor-axis order), else 0."""
    axes = [(torch.arange(n, device=points.device) - points[:, a, None].float()) ** 2 for a, n in enumerate(size)]
    squared = axes[0][:, :, None, None] + axes[1][:, None, :, None] + axes[2][:, None, None, :]
    return (squared <= radius ** 2).float()[:, None]


def focused_bce(logits: torch.Tensor, target: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over each sample's ``focus`` region (0/1
    weights shaped like ``logits``), then over the batch: what a loss over the
    whole crop dilutes, the voxels around the newest click, counted in full."""
    voxelwise = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return ((voxelwise * focus).flatten(1).sum(1) / focus.flatten(1).sum(1).clamp_min(1)).mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``dice_bce_per_sample`` averaged over the batch."""
    return dice_bce_per_sample(logits, target).mean()


def batch_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks per sample, a (B,) tensor; 1.0 where both are empty
    (they agree, and a training metric must stay finite). Evaluation scores
    with ``clicks.dice`` instead, which is NaN there, as the reference's."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * (pred * target).sum(1) / total.clamp_min(1), 1.0)


def hard_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks per sample (B,); 1 where both are empty."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, (pred & target).sum(1).float() / union.clamp_min(1), 1.0)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE divided by the teacher's mean square: pre-norm teachers' residual
    streams grow block by block, and plain MSE would let the deepest matched
    layer drown the others."""
    teacher = teacher.float()
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-6)


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-voxel KL(teacher || student) of the Bernoulli distributions the
    logits define. Unlike MSE on logits it does not chase the exact value of
    confidently-decided voxels (|logit| >> 1), where the mask cannot change."""
    teacher_prob = torch.sigmoid(teacher_logits.float())
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits.float(), teacher_prob)
    teacher_entropy = F.binary_cross_entropy_with_logits(teacher_logits.float(), teacher_prob)
    return cross_entropy - teacher_entropy
