"""Layer-wise progressive distillation (FastSAM3D paper, section 2.2).

Stage 1, the first ``layerwise_fraction`` of the steps (T_layerwise): student
block i (1-based) learns to reproduce the token grid after teacher block
round(i L_t / L_s) (= 2i for a 12-block teacher and a 6-block student), by
an L2 loss; at iteration t only the first k = ceil(t L_s / T_layerwise)
student blocks are trained (Eq. 2), so k grows from 1 to L_s and each new
block starts from inputs its predecessors already match. Stage 2, the rest:
the final image embedding (MSE) and the decoder's logits for the same
simulated clicks (KL of the per-voxel Bernoulli distributions) are matched.

The teacher is frozen (eval, no gradients). The student's prompt encoder and
mask decoder are copied from the teacher (the prompt width must agree) and are
frozen unless asked otherwise, as FastSAM3D runs its student with the
teacher's decoder. When the widths differ, learnable linear maps student width
-> teacher width compare the token grids; they belong to the distillation
module (checkpointed with it) and are not part of the exported student.

The official code (upstream spec 9) matched only the final embedding; the
progressive schedule here follows the paper.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..build import build_model
from ..checkpoint import save_model
from ..model import NAMED_CONFIGS, Sam3D
from .interaction import make_click_plan, sample_clicks
from .loop import DistributedContext, RunConfig, Task, TrainingError, run, step_seed
from .losses import batch_dice, relative_mse, sigmoid_kl
from .train import DataConfig, InteractionConfig, build_batch_source, initialise, resolve_model_config


def active_student_layers(iteration: int, student_depth: int, layerwise_iterations: int) -> int:
    """Eq. 2: k = ceil(t L_s / T) for iteration t = 1..T of the layer-wise stage."""
    if not 1 <= iteration <= layerwise_iterations:
        raise ValueError(f"iteration {iteration} is outside the layer-wise stage 1..{layerwise_iterations}")
    return -(-iteration * student_depth // layerwise_iterations)


def teacher_layer_for(student_layer: int, student_depth: int, teacher_depth: int) -> int:
    """The teacher block (1-based) that student block ``student_layer`` (1-based)
    imitates: the same relative depth, 2i for 12 vs 6 blocks."""
    return round(student_layer * teacher_depth / student_depth)


def token_grids(encoder: nn.Module, images: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """Token grids (B, g, g, g, C) after patch embedding and after each of the
    first ``blocks`` blocks; the rest of the encoder is not run."""
    x = encoder.patch_embed(images) + encoder.pos_embed
    grids = [x]
    for block in encoder.blocks[:blocks]:
        x = block(x)
        grids.append(x)
    return grids


@dataclass
class DistillConfig:
    run: RunConfig
    teacher: str = "sam-med3d"               # a model name or a weights file
    teacher_weights: tuple[str, ...] = ()    # weights for a named teacher architecture
    student_config: str | None = None        # a configuration name; None = from --init, else "default"
    init: tuple[str, ...] = ()               # student weights to start from
    layerwise_fraction: float = 0.7
    train_decoder: bool = False              # False: the teacher's prompt encoder + decoder stay frozen
    decoder_lr_scale: float = 0.1
    embedding_weight: float = 1.0
    logit_weight: float = 1.0
    data: DataConfig = field(default_factory=DataConfig)
    interaction: InteractionConfig = field(default_factory=lambda: InteractionConfig(min_steps=2, max_steps=5))


class Distillation(nn.Module):
    """forward(images, targets, generator) -> (loss, metrics) of the stage that
    ``begin_step`` selected."""

    def __init__(self, student: Sam3D, teacher: Sam3D, layerwise_steps: int, config: DistillConfig):
        super().__init__()
        if student.config.prompt_embed_dim != teacher.config.prompt_embed_dim:
            raise TrainingError(
                f"student and teacher prompt widths differ ({student.config.prompt_embed_dim} vs "
                f"{teacher.config.prompt_embed_dim}): the student cannot reuse the teacher's decoder")
        if student.config.encoder.depth > teacher.config.encoder.depth:
            raise TrainingError("the student has more blocks than the teacher")
        s_encoder, t_encoder = student.config.encoder, teacher.config.encoder
        if (s_encoder.img_size, s_encoder.patch_size) != (t_encoder.img_size, t_encoder.patch_size):
            raise TrainingError("student and teacher must share the input size and patch size "
                                "(their token grids are compared)")
        self.student = student
        # A tuple hides the teacher from nn.Module: it is neither trained, nor
        # checkpointed, nor synchronised by DDP.
        self._teacher = (teacher.eval().requires_grad_(False),)
        student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
        student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
        student.prompt_encoder.requires_grad_(config.train_decoder)
        student.mask_decoder.requires_grad_(config.train_decoder)
        s_depth, t_depth = student.config.encoder.depth, teacher.config.encoder.depth
        self.teacher_layers = [teacher_layer_for(i, s_depth, t_depth) for i in range(1, s_depth + 1)]
        s_width, t_width = student.config.encoder.embed_dim, teacher.config.encoder.embed_dim
        self.projections = nn.ModuleList(
            nn.Identity() if s_width == t_width else nn.Linear(s_width, t_width) for _ in range(s_depth))
        self.layerwise_steps = layerwise_steps
        self.config = config
        self.active_layers = 0            # 0 = output stage
        self.plan = None

    @property
    def teacher(self) -> Sam3D:
        return self._teacher[0]

    def begin_step(self, step: int) -> None:
        iteration = step + 1
        if iteration <= self.layerwise_steps:
            self.active_layers = active_student_layers(iteration, len(self.teacher_layers),
                                                       self.layerwise_steps)
        else:
            self.active_layers = 0
            generator = torch.Generator().manual_seed(step_seed(self.config.run.seed, step, rank=0))
            self.plan = make_click_plan(self.config.interaction.min_steps,
                                        self.config.interaction.max_steps, generator)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator):
        zero = images.new_zeros(())
        if self.active_layers:
            loss = self._layer_loss(images, self.active_layers)
            metrics = {"layer_loss": loss.detach(), "embedding_loss": zero, "logit_loss": zero,
                       "teacher_agreement": zero, "active_layers": zero + self.active_layers}
            return loss, metrics
        embedding_loss, logit_loss, agreement = self._output_losses(images, targets.bool(), generator)
        loss = self.config.embedding_weight * embedding_loss + self.config.logit_weight * logit_loss
        metrics = {"layer_loss": zero, "embedding_loss": embedding_loss.detach(),
                   "logit_loss": logit_loss.detach(), "teacher_agreement": agreement,
                   "active_layers": zero + len(self.teacher_layers)}
        return loss, metrics

    def _layer_loss(self, images: torch.Tensor, active: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_grids = token_grids(self.teacher.image_encoder, images, self.teacher_layers[active - 1])
        student_grids = token_grids(self.student.image_encoder, images, active)
        losses = [relative_mse(self.projections[i - 1](student_grids[i]), teacher_grids[self.teacher_layers[i - 1]])
                  for i in range(1, active + 1)]
        return torch.stack(losses).mean()

    def _output_losses(self, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """The teacher segments with simulated clicks (each click corrects the
        teacher's own prediction); the student decodes the same points with the
        same mask prompts, so both see identical prompts at every step."""
        teacher, student = self.teacher, self.student
        batch, size = images.shape[0], images.shape[2:]
        low = teacher.low_res_size
        with torch.no_grad():
            teacher_embedding = teacher.encode(images)
            prompts, teacher_logits = [], []
            mask_prompt = images.new_zeros(batch, 1, low, low, low)
            pred = torch.zeros_like(target)
            points = torch.zeros(batch, 0, 3, dtype=torch.long, device=images.device)
            labels = torch.zeros(batch, 0, dtype=torch.long, device=images.device)
            for i in range(self.plan.steps):
                if self.plan.adds_click(i):
                    coords, click_labels = sample_clicks(pred, target, generator,
                                                         self.config.interaction.interior_prob)
                    points = torch.cat([points, coords[:, None]], dim=1)
                    labels = torch.cat([labels, click_labels[:, None]], dim=1)
                logits = teacher.decode(teacher_embedding, points, labels, mask_prompt)[0]
                prompts.append((points, labels, mask_prompt))
                teacher_logits.append(logits)
                pred = F.interpolate(logits, size=size, mode="trilinear", align_corners=False) > 0
                mask_prompt = logits
        embedding = student.encode(images)
        embedding_loss = F.mse_loss(embedding.float(), teacher_embedding.float())
        logit_losses = []
        for (points, labels, mask_prompt), target_logits in zip(prompts, teacher_logits):
            logits = student.decode(embedding, points, labels, mask_prompt)[0]
            logit_losses.append(sigmoid_kl(logits, target_logits))
        agreement = batch_dice(logits.detach() > 0, target_logits > 0).mean()
        return embedding_loss, torch.stack(logit_losses).mean(), agreement


def _lr_scales(name: str, decoder_scale: float) -> float:
    if name.startswith("student.prompt_encoder.") or name.startswith("student.mask_decoder."):
        return decoder_scale
    return 1.0


def build_teacher(config: DistillConfig) -> Sam3D:
    if config.teacher_weights:
        return build_model(config.teacher, checkpoint=list(config.teacher_weights))
    if config.teacher in NAMED_CONFIGS:
        raise TrainingError(f"the teacher '{config.teacher}' needs weights: add --teacher-weights FILE, "
                            "or give a weights file as --teacher")
    return build_model(config.teacher)


def build_distillation(config: DistillConfig, context: DistributedContext):
    """(task, batch source) of a distillation run on ``context``."""
    if not 0 <= config.layerwise_fraction <= 1:
        raise TrainingError(f"--layerwise-fraction must lie in [0, 1], got {config.layerwise_fraction}")
    teacher = build_teacher(config).to(context.device)
    student_config = resolve_model_config(config.student_config, config.init)
    torch.manual_seed(config.run.seed)
    student = Sam3D(student_config)
    if config.init:
        initialise(student, config.init)
    layerwise_steps = math.floor(config.layerwise_fraction * config.run.steps)
    module = Distillation(student, teacher, layerwise_steps, config)
    batches = build_batch_source(config.data, config.run, context, student_config.encoder.img_size,
                                 student_config.spacing_mm)
    teacher_name = Path(config.teacher).name

    def export(path: Path) -> None:
        save_model(student, path, dtype=torch.float16,
                   metadata={"training": json.dumps({"task": "distillation", "teacher": teacher_name})})

    task = Task(name="distill", module=module,
                model_config_json=json.dumps(student_config.to_dict()), export=export,
                lr_scales=lambda name: _lr_scales(name, config.decoder_lr_scale),
                on_step=module.begin_step)
    return task, batches


def distill(config: DistillConfig) -> dict:
    """Run (or continue) distillation; returns the loop's summary."""
    context = DistributedContext.start(config.run.device)
    try:
        return run(*build_distillation(config, context), config.run, context)
    finally:
        context.stop()
