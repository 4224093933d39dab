"""The optimisation loop shared by interactive training and distillation.

A *task* is an ``nn.Module`` whose ``forward(images, targets, generator)``
returns ``(loss, metrics)``; this module owns everything around it: devices
and DistributedDataParallel (``torchrun``), the data loader, augmentation,
AdamW with warm-up + cosine, bf16 autocast on CUDA, gradient clipping, skipping
the update of a step whose loss or gradient is not finite, the
time budget, resumable checkpoints, the metrics log and the progress bar.

Determinism: every random choice of step ``s`` on rank ``r`` comes from a
generator seeded with (seed, s, r), and training sample number ``n`` (counted
over all ranks) is generated from (seed, n) alone. A resumed run therefore
continues exactly as an uninterrupted one would, on any world size, and the
checkpoint needs no RNG states: the step and the sample counter are the state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_output_path
from ..build import resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
MAX_SKIPPED_IN_A_ROW = 3             # steps with a non-finite loss or gradient that mean divergence
MODEL_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """A training run that cannot start or continue; the message is one line."""


@dataclass
class RunConfig:
    """Settings of the optimisation loop (task-specific settings live in the task)."""
    out: Path
    steps: int = 2000
    batch_size: int = 4                   # per rank
    lr: float = 8e-4
    min_lr_ratio: float = 0.01            # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_minutes: float | None = None      # stop, checkpoint and exit cleanly before this
    resume: bool = False                  # continue from OUT/checkpoint.pt when it exists
    device: str = "auto"
    seed: int = 2024
    checkpoint_every: int = 250
    log_every: int = 10
    workers: int = 4                      # data-loader processes per rank
    progress: bool = True
    started: float = field(default_factory=time.monotonic)   # the budget counts from here


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_ratio``
    at ``total_steps`` (step counted from 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed per (run seed, step, rank), far apart for neighbouring inputs."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2 ** 63)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str) -> "DistributedContext":
        """Join the process group ``torchrun`` describes in the environment
        (NCCL on CUDA, gloo on CPU), or run alone without one."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(0, 1, resolve_device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            resolved = torch.device("cuda", local_rank)
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", init_method="env://")
        return cls(dist.get_rank(), dist.get_world_size(), resolved)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank, the same answer on every rank (a
        step skipped anywhere is skipped everywhere; the time budget is rank 0's
        clock)."""
        if not self.distributed:
            return flag
        flags = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0] > 0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data


class StepBatches:
    """Batch sampler: the indices rank ``rank`` trains on at each step, starting
    at the global sample counter ``first_sample``; endless."""

    def __init__(self, first_sample: int, batch_size: int, rank: int, world_size: int):
        self.first_sample = first_sample
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.first_sample + self.rank * self.batch_size
        while True:
            yield list(range(start, start + self.batch_size))
            start += self.world_size * self.batch_size


def collate_samples(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, target) pairs; binary targets travel from the loader
    processes as uint8, a quarter of the shared memory of float32."""
    images, targets = zip(*samples)
    return torch.stack(images), torch.stack(targets).to(torch.uint8)


def _single_threaded_worker(worker_id: int) -> None:
    # Every loader process already has a core; ITK's own threads per resample
    # would only oversubscribe them (torch does this for itself in workers).
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def make_loader(dataset: torch.utils.data.Dataset, first_sample: int, config: RunConfig,
                context: DistributedContext) -> Iterator:
    sampler = StepBatches(first_sample, config.batch_size, context.rank, context.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers,
                                         collate_fn=collate_samples, worker_init_fn=_single_threaded_worker,
                                         pin_memory=context.device.type == "cuda")
    return iter(loader)


# A batch source: started with the global sample counter of the first step, it
# returns next_batch(step, generator) -> (images, targets) on the training device.
NextBatch = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
BatchSource = Callable[[int], NextBatch]


def loader_batches(dataset: torch.utils.data.Dataset,
                   augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator],
                                     tuple[torch.Tensor, torch.Tensor]],
                   config: RunConfig, context: DistributedContext) -> BatchSource:
    """Batches of a Dataset read by loader processes on the host, augmented on the device."""
    def start(first_sample: int) -> NextBatch:
        batches = make_loader(dataset, first_sample, config, context)

        def next_batch(step: int, generator: torch.Generator):
            images, targets = next(batches)
            images = images.to(context.device, non_blocking=True).float()
            targets = targets.to(context.device, non_blocking=True)
            return augment(images, targets, generator)
        return next_batch
    return start


# ----------------------------------------------------------------------------- optimiser


def parameter_groups(module: nn.Module, lr_scales: Callable[[str], float] = lambda name: 1.0
                     ) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings and position
    tables (decaying them only shrinks offsets the model needs); ``lr_scales``
    maps a parameter name to a multiplier of the base learning rate."""
    embedding_params = {id(p) for m in module.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, bool], list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (param.ndim < 2 or id(param) in embedding_params
                    or name.endswith("pos_embed") or ".rel_pos_" in name)
        groups.setdefault((lr_scales(name), not no_decay), []).append(param)
    return [{"params": params, "lr_scale": scale, "decay": decay}
            for (scale, decay), params in sorted(groups.items())]


def make_optimizer(module: nn.Module, config: RunConfig,
                   lr_scales: Callable[[str], float] = lambda name: 1.0) -> torch.optim.AdamW:
    groups = parameter_groups(module, lr_scales)
    for group in groups:
        group["weight_decay"] = config.weight_decay if group["decay"] else 0.0
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, task_name: str, model_config_json: str, module: nn.Module,
                    optimizer: torch.optim.Optimizer, step: int, samples_seen: int,
                    world_size: int) -> None:
    """Plain tensors, numbers and strings only, so it loads with weights_only=True."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "task": task_name,
        "model_config": model_config_json,
        "step": step,
        "samples_seen": samples_seen,
        "world_size": world_size,
        "module": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    with atomic_output_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, task_name: str, model_config_json: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:        # any unreadable file gets the same one-line answer
        raise TrainingError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a training checkpoint of this version")
    if state["task"] != task_name:
        raise TrainingError(f"{path} is a '{state['task']}' checkpoint, not '{task_name}': "
                            "use another --out folder")
    if json.loads(state["model_config"]) != json.loads(model_config_json):
        raise TrainingError(f"{path} was written for another model configuration: "
                            "use the same --model-config / --student-config, or another --out folder")
    return state


# ----------------------------------------------------------------------------- the loop


@dataclass
class Task:
    """What ``run`` optimises.

    module: forward(images, targets, generator) -> (loss, {name: scalar tensor});
    its whole state dict is checkpointed. export: writes the deliverable model.
    """
    name: str
    module: nn.Module
    model_config_json: str
    export: Callable[[Path], None]
    lr_scales: Callable[[str], float] = lambda name: 1.0
    # Some steps leave parts of the module unused (distillation's early stages,
    # the no-mask embedding in training); DDP must then look for them.
    find_unused_parameters: bool = True
    on_step: Callable[[int], None] = lambda step: None      # called before each step


def configure_cuda(device: torch.device) -> None:
    """Fast kernels for training on CUDA: fixed 128^3 shapes let cuDNN pick the
    fastest 3-D convolutions once; TF32 for the float32 matrix products left
    outside the bf16 autocast (the Fourier features of clicks do not use one)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(task: Task, batch_source: BatchSource, config: RunConfig, context: DistributedContext) -> dict:
    """Optimise ``task.module`` for ``config.steps`` steps (or until the time
    budget); returns {"step", "finished", "checkpoint", "model"}."""
    out = Path(config.out)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path, metrics_path = out / CHECKPOINT_NAME, out / MODEL_NAME, out / METRICS_NAME
    device = context.device
    configure_cuda(device)
    module = task.module.to(device)
    optimizer = make_optimizer(module, config, task.lr_scales)

    step, samples_seen = 0, 0
    if config.resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, task.name, task.model_config_json)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        step, samples_seen = state["step"], state["samples_seen"]
        if context.is_main:
            _log(f"resuming from {checkpoint_path} at step {step} "
                 f"(written by {state['world_size']} process(es), now {context.world_size})")
    elif checkpoint_path.is_file():
        raise TrainingError(f"{checkpoint_path} exists: pass --resume to continue it, "
                            "or choose another --out folder")
    elif context.is_main and config.resume:
        _log(f"no checkpoint in {out} yet: starting at step 0")

    trained = DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=task.find_unused_parameters) if context.distributed else module
    module.train()
    next_batch = batch_source(samples_seen)
    generator = torch.Generator(device=device)
    global_batch = config.batch_size * context.world_size
    bar = None
    if context.is_main and config.progress:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=step, desc=task.name, unit="step", file=sys.stderr,
                   dynamic_ncols=True)

    budget_s = config.max_minutes * 60 if config.max_minutes else None
    save_s = 5.0                                      # replaced by the measured time of a save
    window_start, window_steps, window_sums = time.perf_counter(), 0, None
    step_time, first_step = 0.0, step
    skipped = skipped_in_a_row = 0

    def checkpoint() -> None:
        nonlocal save_s
        if context.is_main:
            began = time.perf_counter()
            save_checkpoint(checkpoint_path, task.name, task.model_config_json, module, optimizer,
                            step, samples_seen, context.world_size)
            save_s = time.perf_counter() - began

    while step < config.steps:
        began = time.perf_counter()
        factor = learning_rate_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * factor
        task.on_step(step)
        generator.manual_seed(step_seed(config.seed, step, context.rank))
        images, targets = next_batch(step, generator)
        with _autocast(device):
            loss, metrics = trained(images, targets, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The norm is NaN or inf when the loss or any gradient is (without clipping too).
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip or math.inf)
        if context.any_rank(not bool(torch.isfinite(loss) & torch.isfinite(grad_norm))):   # one host sync
            # One batch whose loss or gradient overflows must not end hours of training, nor
            # reach AdamW, whose moments it would fill with NaN: as a GradScaler does, the step
            # is skipped; a run that keeps overflowing has diverged and stops.
            skipped += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingError(f"the loss is not finite at {skipped_in_a_row} steps in a row (the last "
                                    f"{step + 1}): lower --lr (the last checkpoint in {out} is intact)")
            if context.is_main:
                _log(f"step {step + 1}: the loss or a gradient is not finite; the update is skipped "
                     f"({skipped} so far)")
        else:
            optimizer.step()
            skipped_in_a_row = 0
            values = torch.stack([loss.detach().float(), *(v.detach().float() for v in metrics.values())])
            window_sums = values if window_sums is None else window_sums + values
            window_steps += 1
        step += 1
        samples_seen += global_batch

        if window_steps and (step % config.log_every == 0 or step == config.steps):
            means = context.mean(window_sums / window_steps).tolist()
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": means[0],
                      **{k: v for k, v in zip(metrics, means[1:])},
                      "lr": config.lr * factor, "skipped_steps": skipped,
                      "samples_per_s": window_steps * global_batch / elapsed,
                      "elapsed_min": (time.monotonic() - config.started) / 60}
            if context.is_main:
                with open(metrics_path, "a") as log:
                    log.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    **{k: f"{record[k]:.3f}" for k in list(metrics)[:2]},
                                    lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
            window_start, window_steps, window_sums = time.perf_counter(), 0, None
        if bar is not None:
            bar.update(1)

        # The estimate of the next step skips this process's first one: torch.compile and the CUDA
        # warm-up make it tens of seconds once, which would end a short budget after one step.
        if step > first_step + 1:
            step_time = max(step_time * 0.9, time.perf_counter() - began)
        out_of_time = budget_s is not None and (
            time.monotonic() - config.started + 1.5 * step_time + 2 * save_s + 5 > budget_s)
        out_of_time = context.any_rank(out_of_time and context.is_main)
        if out_of_time and step < config.steps:
            checkpoint()
            if context.is_main:
                task.export(model_path)
                _log(f"time budget of {config.max_minutes} min reached at step {step} of "
                     f"{config.steps}: saved {checkpoint_path}; continue with --resume")
            break
        if step % config.checkpoint_every == 0 and step < config.steps:
            checkpoint()
    if bar is not None:
        bar.close()
    finished = step >= config.steps
    if finished:
        checkpoint()
        if context.is_main:
            task.export(model_path)
            _log(f"finished {step} steps: wrote {model_path}")
    if context.distributed:
        dist.barrier()
    return {"step": step, "finished": finished, "checkpoint": checkpoint_path, "model": model_path}
