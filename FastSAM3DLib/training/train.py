"""Interactive training, the way SAM-Med3D trains (upstream spec 7.5).

Per batch the image embedding is computed once; then ``steps`` simulated
click steps (6-11 by default) run the prompt encoder and mask decoder: the
first click lies in the target, later clicks in the error of the current
prediction, points accumulate, the previous low-res logits (detached) are the
mask prompt (zeros at the first step, as the official loops), and one middle
step and the last step add no click. The loss of every step (Dice + BCE on
the low-res logits upsampled trilinearly to the 128³ crop, exactly the
prediction the engine makes at inference; plus MSE of the IoU head against
the real IoU) is averaged, so the encoder learns from every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import PARTS, CheckpointError, detect_config, load_weights, merge_checkpoints, save_model
from ..model import NAMED_CONFIGS, ModelConfig, Sam3D
from ..model.config import DEFAULT_COMPACT
from .interaction import decode_fp32, make_click_plan, sample_clicks
from .loop import DistributedContext, RunConfig, Task, TrainingError, run, step_seed
from .losses import dice_bce_loss, batch_dice, hard_iou

TRAINABLE_CONFIGS: dict[str, ModelConfig] = {"default": DEFAULT_COMPACT, **NAMED_CONFIGS}


@dataclass
class InteractionConfig:
    min_steps: int = 6                  # click steps per sample and iteration
    max_steps: int = 11
    interior_prob: float = 0.5          # share of clicks drawn from the eroded error core
    iou_loss_weight: float = 1.0


@dataclass
class DataConfig:
    sources: tuple[str, ...] = ()       # manifests or data folders; empty = synthetic only
    synthetic_ratio: float = 0.5
    val_cases: tuple[str, ...] = ()     # kept out of training


@dataclass
class TrainConfig:
    run: RunConfig
    data: DataConfig = field(default_factory=DataConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    model_config: str | None = None     # a name of TRAINABLE_CONFIGS; None = from --init, else "default"
    init: tuple[str, ...] = ()          # weights files; later files replace whole parts
    # Learning-rate multiplier of the prompt encoder and mask decoder. None: 0.1
    # when --init supplied a decoder (FastSAM3D's fine-tuning ratio), else 1.
    decoder_lr_scale: float | None = None


def resolve_model_config(name: str | None, init: tuple[str, ...]) -> ModelConfig:
    if name is None:
        if init:
            state, stored = merge_checkpoints(list(init))
            return stored or detect_config(state)
        name = "default"
    try:
        return TRAINABLE_CONFIGS[name]
    except KeyError:
        raise TrainingError(f"unknown model configuration '{name}': use one of "
                            f"{', '.join(TRAINABLE_CONFIGS)}") from None


def initialise(model: Sam3D, files: tuple[str, ...]) -> list[str]:
    """Load the parts (image encoder, prompt encoder, mask decoder) the files
    hold, strictly; parts they do not hold keep their fresh initialisation.
    Returns the names of the parts loaded."""
    state, _ = merge_checkpoints(list(files))
    present = [part for part in PARTS if any(k.startswith(part) for k in state)]
    if not present:
        raise CheckpointError(f"{', '.join(files)}: no model weights found")
    own = model.state_dict()
    state.update({k: v for k, v in own.items() if not any(k.startswith(p) for p in present)})
    load_weights(model, state, " + ".join(Path(f).name for f in files))
    return [p.rstrip(".") for p in present]


class InteractiveTraining(nn.Module):
    """forward(images, targets, generator) -> (loss, metrics) of one batch of
    simulated interactions; the click plan of a step is set by ``begin_step``
    so that every rank runs the same number of decoder passes."""

    def __init__(self, model: Sam3D, interaction: InteractionConfig, seed: int):
        super().__init__()
        self.model = model
        self.interaction = interaction
        self.seed = seed
        self.plan = None

    def begin_step(self, step: int) -> None:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, rank=0))
        self.plan = make_click_plan(self.interaction.min_steps, self.interaction.max_steps, generator)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator):
        plan = self.plan
        target = targets.bool()
        batch, size = images.shape[0], images.shape[2:]
        low = self.model.low_res_size
        embedding = self.model.encode(images)
        mask_prompt = images.new_zeros(batch, 1, low, low, low)
        pred = torch.zeros_like(target)
        points = torch.zeros(batch, 0, 3, dtype=torch.long, device=images.device)
        labels = torch.zeros(batch, 0, dtype=torch.long, device=images.device)
        total = images.new_zeros(())
        first_dice = None
        for i in range(plan.steps):
            if plan.adds_click(i):
                coords, click_labels = sample_clicks(pred, target, generator, self.interaction.interior_prob)
                points = torch.cat([points, coords[:, None]], dim=1)
                labels = torch.cat([labels, click_labels[:, None]], dim=1)
            low_res, iou_pred = decode_fp32(self.model, embedding, points, labels, mask_prompt)
            logits = F.interpolate(low_res, size=size, mode="trilinear", align_corners=False)
            pred = logits.detach() > 0
            iou_loss = F.mse_loss(iou_pred[:, 0].float(), hard_iou(pred, target))
            total = total + dice_bce_loss(logits, target) + self.interaction.iou_loss_weight * iou_loss
            mask_prompt = low_res.detach()
            if first_dice is None:
                first_dice = batch_dice(pred, target).mean()
        return total / plan.steps, {"dice": batch_dice(pred, target).mean(), "dice_click1": first_dice}


def _lr_scales(name: str, decoder_scale: float) -> float:
    return 1.0 if name.startswith("model.image_encoder.") else decoder_scale


def build_dataset(data: DataConfig, seed: int, img_size: int):
    """(dataset, augment): real ROI crops of the data sources mixed with
    synthetic volumes (``FastSAM3DLib.training.data``); no sources = synthetic only."""
    from .data import TrainingSampleSource, augment_batch, read_cases

    cases = [case for source in data.sources for case in read_cases(source)]
    missing = set(data.val_cases) - {case.name for case in cases}
    if missing:
        raise TrainingError(f"--val-case {', '.join(sorted(missing))}: no such case in the data")
    kept = [case for case in cases if case.name not in set(data.val_cases)]
    if cases and not kept:
        raise TrainingError("every case is a --val-case: nothing left to train on")
    ratio = data.synthetic_ratio if kept else 1.0
    return TrainingSampleSource(kept, synthetic_ratio=ratio, seed=seed, size=img_size), augment_batch


def build_training(config: TrainConfig, context: DistributedContext):
    """(task, dataset, augment) of an interactive training run on ``context``."""
    model_config = resolve_model_config(config.model_config, config.init)
    dataset, augment = build_dataset(config.data, config.run.seed, model_config.encoder.img_size)
    # Same initial weights on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(config.run.seed)
    model = Sam3D(model_config)
    loaded = initialise(model, config.init) if config.init else []
    if loaded and context.is_main:
        print(f"initialised {', '.join(loaded)} from {', '.join(config.init)}", flush=True)
    decoder_lr_scale = config.decoder_lr_scale
    if decoder_lr_scale is None:
        decoder_lr_scale = 0.1 if "mask_decoder" in loaded else 1.0
    module = InteractiveTraining(model, config.interaction, config.run.seed)

    def export(path: Path) -> None:
        save_model(model, path, dtype=torch.float16,
                   metadata={"training": json.dumps({"task": "interactive", "seed": config.run.seed})})

    task = Task(name="train", module=module, model_config_json=json.dumps(model_config.to_dict()),
                export=export, lr_scales=lambda name: _lr_scales(name, decoder_lr_scale),
                on_step=module.begin_step)
    return task, dataset, augment


def train(config: TrainConfig) -> dict:
    """Run (or continue) interactive training; returns the loop's summary."""
    context = DistributedContext.start(config.run.device)
    try:
        return run(*build_training(config, context), config.run, context)
    finally:
        context.stop()
