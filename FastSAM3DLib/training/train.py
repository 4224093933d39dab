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

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import PARTS, CheckpointError, detect_config, load_weights, merge_checkpoints, save_model
from ..model import NAMED_CONFIGS, ModelConfig, Sam3D
from ..model.config import DEFAULT_COMPACT
from .interaction import (box_corners, choose_click, make_click_plan, sample_clicks,
                          upsample_logits, upsampling_matrix)
from .loop import BatchSource, DistributedContext, RunConfig, Task, TrainingError, loader_batches, run, step_seed
from .losses import ball_around, batch_dice, dice_bce_loss, dice_bce_per_sample, focused_bce, hard_iou
from .pack import DataError, read_pack
from .sampler import GpuCropSampler, SamplerConfig

TRAINABLE_CONFIGS: dict[str, ModelConfig] = {"default": DEFAULT_COMPACT, **NAMED_CONFIGS}
CLICK_FOCUS_RADIUS = 8.0                # voxels: two low-res cells either way of the click (12 mm at 1.5 mm)


@dataclass
class InteractionConfig:
    min_steps: int = 6                  # click steps per sample and iteration
    max_steps: int = 11
    interior_prob: float = 0.5          # share of clicks drawn from the eroded error core
    click_depth: int = 1                # erosions a core click may go down (the deepest level left)
    first_click_depth: int | None = None  # the same for a sample's first click (None: click_depth)
    iou_loss_weight: float = 1.0
    # Weight of the cross-entropy within CLICK_FOCUS_RADIUS voxels of the newest click, beside
    # the loss over the whole crop (0: none); what the newest click says, the loss then heeds.
    click_focus: float = 0.0
    # torch.compile the per-voxel work of each click step (upsampling, losses,
    # click sampling: elementwise passes over B x 128^3 that dominate the step
    # once the data is on the GPU); CUDA only, tens of seconds to compile once.
    compile: bool = True
    box_probability: float = 0.3        # share of steps whose first prompt is a box (box-prompt models)


@dataclass
class DataConfig:
    sources: tuple[str, ...] = ()       # manifests or data folders; empty = synthetic only
    synthetic_ratio: float = 0.5
    val_cases: tuple[str, ...] = ()     # kept out of training
    # Data packs (``fastsam3d pack``): crops are then cut on the training device
    # by ``GpuCropSampler`` and ``sources`` / ``synthetic_ratio`` are not used.
    packs: tuple[str, ...] = ()
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


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
    box_prompts: bool = False           # add box-corner embeddings to a model that lacks them
    encoder_width: int | None = None    # image-encoder width of a fresh model (heads = width / 64)
    multimask_first_click: bool = False  # train the multimask outputs on first clicks (see ModelConfig)
    freeze_encoder: bool = False         # train the prompt encoder and mask decoder only
    multimask_only: bool = False         # train the multimask outputs and the IoU head only


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
    # A box-prompt model started from point-only weights: its two corner
    # embeddings are the only new parameters and start fresh.
    state.update({k: v for k, v in own.items() if k not in state and _is_box_embedding(k)})
    load_weights(model, state, " + ".join(Path(f).name for f in files))
    return [p.rstrip(".") for p in present]


def _is_box_embedding(key: str) -> bool:
    return key in ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight")


def copy_single_mask_output(model: Sam3D) -> None:
    """Start the multimask outputs from the trained single-mask output, for weights
    that only trained that one: its hypernetwork and IoU-head row, copied. (Not its
    token: the four tokens attend to each other, so changing the multimask ones
    would change the single mask of every prompt.) Untrained outputs would give
    the first click a random mask."""
    decoder = model.mask_decoder
    with torch.no_grad():
        for i in range(1, decoder.num_mask_tokens):
            decoder.output_hypernetworks_mlps[i].load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
        last = decoder.iou_prediction_head.layers[-1]
        last.weight[1:] = last.weight[0]
        last.bias[1:] = last.bias[0]


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
        self.step_terms, self.choose_click = click_step_terms, choose_click
        self.multimask_terms = multimask_step_terms

    def compile_for(self, device: torch.device) -> None:
        """Compile the per-voxel functions for ``device`` when the configuration asks (CUDA only)."""
        if self.interaction.compile and device.type == "cuda":
            self.step_terms = torch.compile(click_step_terms, dynamic=False)
            self.choose_click = torch.compile(choose_click, dynamic=False)
            self.multimask_terms = torch.compile(multimask_step_terms, dynamic=False)

    def begin_step(self, step: int) -> None:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, rank=0))
        boxes = self.interaction.box_probability if self.model.config.box_prompts else 0.0
        self.plan = make_click_plan(self.interaction.min_steps, self.interaction.max_steps, generator, boxes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator):
        plan = self.plan
        target = targets.bool()
        batch, size = images.shape[0], images.shape[2]
        low = self.model.low_res_size
        upsampling = upsampling_matrix(low, size, images.device)
        embedding = self.model.encode(images)
        mask_prompt = images.new_zeros(batch, 1, low, low, low)
        pred = torch.zeros_like(target)
        points = torch.zeros(batch, 0, 3, dtype=torch.long, device=images.device)
        labels = torch.zeros(batch, 0, dtype=torch.long, device=images.device)
        if plan.box_first:
            points = box_corners(target, generator)
            labels = torch.tensor([2, 3], device=images.device).expand(batch, 2)
        total = images.new_zeros(())
        first_dice = None
        for i in range(plan.steps):
            if plan.adds_click(i) and not (i == 0 and plan.box_first):
                depth = self.interaction.click_depth
                if points.shape[1] == 0 and self.interaction.first_click_depth is not None:
                    depth = self.interaction.first_click_depth
                coords, click_labels = sample_clicks(pred, target, generator, self.interaction.interior_prob,
                                                     choose=self.choose_click, depth=depth)
                points = torch.cat([points, coords[:, None]], dim=1)
                labels = torch.cat([labels, click_labels[:, None]], dim=1)
            # The engine's rule: a first prompt of one click (always positive here) is multimask.
            if i == 0 and not plan.box_first and self.model.config.multimask_first_click:
                low_res, iou_pred = self.model.decode(embedding, points, labels, mask_prompt, multimask=True)
                loss, pred, low_res = self.multimask_terms(low_res, iou_pred, upsampling, target,
                                                           self.interaction.iou_loss_weight)
            else:
                low_res, iou_pred = self.model.decode(embedding, points, labels, mask_prompt)
                focus = None             # a box alone (two corners, no click yet) has no newest click
                if self.interaction.click_focus and not (plan.box_first and points.shape[1] == 2):
                    focus = ball_around(points[:, -1], target.shape[2:], CLICK_FOCUS_RADIUS)
                loss, pred = self.step_terms(low_res, iou_pred, upsampling, target,
                                             self.interaction.iou_loss_weight, focus, self.interaction.click_focus)
            total = total + loss
            mask_prompt = low_res.detach()
            if first_dice is None:
                first_dice = batch_dice(pred, target).mean()
        return total / plan.steps, {"dice": batch_dice(pred, target).mean(), "dice_click1": first_dice}


def click_step_terms(low_res: torch.Tensor, iou_pred: torch.Tensor, upsampling: torch.Tensor,
                     target: torch.Tensor, iou_loss_weight: float, focus: torch.Tensor | None = None,
                     focus_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, prediction) of one click step: Dice + BCE of the upsampled logits
    and the IoU head's error, plus ``focus_weight`` x the BCE within ``focus``
    (``focused_bce``); a pure function of tensors, so that it can be compiled."""
    logits = upsample_logits(low_res.float(), upsampling)
    pred = logits.detach() > 0
    iou_loss = F.mse_loss(iou_pred[:, 0].float(), hard_iou(pred, target))
    loss = dice_bce_loss(logits, target) + iou_loss_weight * iou_loss
    if focus is not None:
        loss = loss + focus_weight * focused_bce(logits, target, focus)
    return loss, pred


def train_multimask_outputs_only(model: Sam3D) -> None:
    """Leave every weight that shapes the single mask as it is, so that every
    prompt but a lone first click gets exactly the answer it got before: the
    encoders, the decoder's transformer and upscaling, and all four mask tokens
    (they attend to each other, so a multimask token that moved would move the
    single mask too). The multimask hypernetworks and the IoU head learn."""
    model.requires_grad_(False)
    decoder = model.mask_decoder
    decoder.output_hypernetworks_mlps[1:].requires_grad_(True)
    decoder.iou_prediction_head.requires_grad_(True)


def multimask_step_terms(low_res: torch.Tensor, iou_pred: torch.Tensor, upsampling: torch.Tensor,
                         target: torch.Tensor, iou_loss_weight: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, prediction, low-res logits fed back) of a multimask step, as SAM
    trains ambiguous prompts: per sample only the mask with the lowest Dice + BCE
    is learnt from (so the masks can answer different readings of the click), the
    IoU head learns every mask's IoU, and what goes on, as at inference, is the
    mask with the highest IoU estimate. low_res (B, M, s, s, s), iou_pred (B, M)."""
    logits = upsample_logits(low_res.float(), upsampling)                # (B, M, N, N, N)
    batch, masks = logits.shape[:2]
    truth = target.expand_as(logits).flatten(0, 1)                       # each mask a sample of its own
    per_mask = dice_bce_per_sample(logits.flatten(0, 1), truth).view(batch, masks)
    preds = logits.detach() > 0
    iou_loss = F.mse_loss(iou_pred.float(), hard_iou(preds.flatten(0, 1), truth).view(batch, masks))
    chosen = iou_pred.detach().argmax(1)
    pick = chosen.view(batch, 1, 1, 1, 1)
    pred = preds.gather(1, pick.expand(-1, 1, *preds.shape[2:]))
    fed_back = low_res.gather(1, pick.expand(-1, 1, *low_res.shape[2:]))
    return per_mask.amin(1).mean() + iou_loss_weight * iou_loss, pred, fed_back


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


def build_batch_source(data: DataConfig, run_config: RunConfig, context: DistributedContext,
                       img_size: int, spacing_mm: float) -> BatchSource:
    """Crops cut on the device from data packs, or the host loader's samples."""
    if not data.packs:
        if data.sampler.volume_weights:
            raise TrainingError("--oversample weights volumes of packs: it needs --pack")
        if data.sampler.part_probability:
            raise TrainingError("--part-probability cuts labels of packs: it needs --pack")
        return loader_batches(*build_dataset(data, run_config.seed, img_size), run_config, context)
    volumes = [volume for pack in data.packs for volume in read_pack(pack)]
    kept = [volume for volume in volumes if volume.name not in set(data.val_cases)]
    if not kept:
        raise DataError("the packs hold no volume that is not a --val-case")
    sampler_config = dataclasses.replace(data.sampler, size=img_size, default_spacing_mm=spacing_mm)
    sampler = GpuCropSampler(kept, context.device, sampler_config, seed=run_config.seed)

    def start(first_sample: int):
        def next_batch(step: int, generator: torch.Generator):
            # Host choices from (seed, step, rank) alone: a resumed run continues the same stream.
            rng = np.random.default_rng([run_config.seed, step, context.rank])
            return sampler.sample(run_config.batch_size, rng, generator)
        return next_batch
    return start


def build_training(config: TrainConfig, context: DistributedContext):
    """(task, batch source) of an interactive training run on ``context``."""
    model_config = resolve_model_config(config.model_config, config.init)
    if config.box_prompts:
        model_config = dataclasses.replace(model_config, box_prompts=True)
    if config.multimask_only and not (config.multimask_first_click or model_config.multimask_first_click):
        raise TrainingError("--multimask-only trains the multimask outputs of first clicks: "
                            "add --multimask-first-click (or --init a model trained with it)")
    multimask_is_new = config.multimask_first_click and not model_config.multimask_first_click
    if config.multimask_first_click:
        model_config = dataclasses.replace(model_config, multimask_first_click=True)
    if config.encoder_width:
        if config.encoder_width % 64 or config.init:
            raise TrainingError("--encoder-width must be a multiple of 64 and cannot be combined with --init")
        model_config = dataclasses.replace(model_config, encoder=dataclasses.replace(
            model_config.encoder, embed_dim=config.encoder_width, num_heads=config.encoder_width // 64))
    batches = build_batch_source(config.data, config.run, context, model_config.encoder.img_size,
                                 model_config.spacing_mm)
    # Same initial weights on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(config.run.seed)
    model = Sam3D(model_config)
    loaded = initialise(model, config.init) if config.init else []
    if loaded and context.is_main:
        print(f"initialised {', '.join(loaded)} from {', '.join(config.init)}", flush=True)
    if multimask_is_new and "mask_decoder" in loaded:
        copy_single_mask_output(model)
    if config.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    if config.multimask_only:
        train_multimask_outputs_only(model)
    decoder_lr_scale = config.decoder_lr_scale
    if decoder_lr_scale is None:
        decoder_lr_scale = 0.1 if "mask_decoder" in loaded else 1.0
    module = InteractiveTraining(model, config.interaction, config.run.seed)
    module.compile_for(context.device)

    def export(path: Path) -> None:
        save_model(model, path, dtype=torch.float16,
                   metadata={"training": json.dumps({"task": "interactive", "seed": config.run.seed})})

    task = Task(name="train", module=module, model_config_json=json.dumps(model_config.to_dict()),
                export=export, lr_scales=lambda name: _lr_scales(name, decoder_lr_scale),
                on_step=module.begin_step)
    return task, batches


def benchmark(config: TrainConfig, steps: int, warmup: int = 3) -> dict:
    """Throughput of the whole training step (data, forward, backward, optimiser)
    and of the data alone, over ``steps`` steps after ``warmup``; nothing is written."""
    import time

    from .loop import _autocast, configure_cuda, make_optimizer

    context = DistributedContext.start(config.run.device)
    configure_cuda(context.device)
    task, batches = build_training(config, context)
    module = task.module.to(context.device)
    optimizer = make_optimizer(module, config.run, task.lr_scales)
    next_batch = batches(0)
    generator = torch.Generator(device=context.device)
    cuda = context.device.type == "cuda"

    def synchronise():
        if cuda:
            torch.cuda.synchronize(context.device)

    def one_step(step: int, train_step: bool) -> None:
        generator.manual_seed(step_seed(config.run.seed, step, context.rank))
        images, targets = next_batch(step, generator)
        if not train_step:
            return
        task.on_step(step)
        with _autocast(context.device):
            loss, _ = module(images, targets, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timings = {}
    for name, train_step in (("data", False), ("step", True)):
        for step in range(warmup):
            one_step(step, train_step)
        synchronise()
        if cuda:
            torch.cuda.reset_peak_memory_stats(context.device)
        began = time.perf_counter()
        for step in range(warmup, warmup + steps):
            one_step(step, train_step)
        synchronise()
        timings[name] = time.perf_counter() - began
    batch = config.run.batch_size
    return {"device": torch.cuda.get_device_name(context.device) if cuda else "cpu",
            "batch_size": batch, "steps": steps,
            "data_samples_per_s": round(steps * batch / timings["data"], 1),
            "train_samples_per_s": round(steps * batch / timings["step"], 1),
            "step_ms": round(1000 * timings["step"] / steps, 1),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(context.device) / 1e9, 2) if cuda else None}


def train(config: TrainConfig) -> dict:
    """Run (or continue) interactive training; returns the loop's summary."""
    context = DistributedContext.start(config.run.device)
    try:
        return run(*build_training(config, context), config.run, context)
    finally:
        context.stop()
