"""Interactive training: clicks, losses, the loop, the time budget, resume and DDP.

Tiny models (a 2-block encoder and a narrow decoder) on 128^3 crops keep every
test to seconds of CPU time per step.
"""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from FastSAM3DLib.checkpoint import read_checkpoint, save_model
from FastSAM3DLib.cli import main
from FastSAM3DLib.model import DecoderConfig, EncoderConfig, ModelConfig, Sam3D
from FastSAM3DLib.model.config import DEFAULT_COMPACT
from FastSAM3DLib.model.prompt_encoder import PositionEmbeddingRandom3D
from FastSAM3DLib.training.interaction import erode, make_click_plan, sample_clicks, upsampling_matrix
from FastSAM3DLib.training.loop import (CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, DistributedContext,
                                        RunConfig, TrainingError, learning_rate_factor, loader_batches, run)
from FastSAM3DLib.training.losses import ball_around, batch_dice, dice_bce_loss, hard_iou
from FastSAM3DLib.training.train import (DataConfig, InteractionConfig, TrainConfig, build_training, click_step_terms,
                                         multimask_step_terms)

TINY = ModelConfig(
    name="tiny",
    encoder=EncoderConfig(embed_dim=48, depth=2, num_heads=2, out_chans=48, window_size=0,
                          global_attn_indexes=(), attention_free_blocks=1, block_formula="fastsam3d"),
    prompt_embed_dim=48,
    decoder=DecoderConfig(transformer_mlp_dim=96, transformer_heads=4, iou_head_hidden_dim=32))

# The eroded-core clicks are covered by their own test; on the CPU they cost
# more than the tiny model itself.
FEW_CLICKS = InteractionConfig(min_steps=2, max_steps=3, interior_prob=0.0)


@pytest.fixture(scope="module")
def train_data(shared_data) -> Path:
    path = shared_data / "train"
    if not (path / "MANIFEST.json").is_file():
        pytest.skip(f"no training manifest in {path}")
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A randomly initialised tiny model: --init takes its configuration from the file."""
    path = tmp_path_factory.mktemp("init") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(Sam3D(TINY), path)
    return path


class OneSample(torch.utils.data.Dataset):
    """The same sphere in noise at every index: something to overfit."""

    def __getitem__(self, index):
        axis = torch.arange(128.0)
        distance = ((axis[:, None, None] - 60) ** 2 + (axis[None, :, None] - 70) ** 2
                    + (axis[None, None, :] - 64) ** 2)
        target = (distance < 18 ** 2).float()
        noise = torch.randn(128, 128, 128, generator=torch.Generator().manual_seed(0))
        return (2 * target + 0.5 * noise)[None], target[None]


def no_augmentation(images, targets, generator):
    return images, targets


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- units


def test_compact_default_config_is_small():
    assert DEFAULT_COMPACT.name == "default"
    encoder = DEFAULT_COMPACT.encoder
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.attention_free_blocks) == (256, 6, 4, 2)
    assert DEFAULT_COMPACT.prompt_embed_dim == 384
    parameters = sum(p.numel() for p in Sam3D(DEFAULT_COMPACT).parameters())
    assert parameters * 2 < 45e6             # fp16 bytes; measured 34.2 MB with metadata


def test_clicks_land_in_the_error_with_the_right_label():
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(3, 1, 32, 32, 32, dtype=torch.bool)
    target[:, :, 8:20, 8:20, 8:20] = True
    pred = torch.zeros_like(target)
    pred[1] = target[1]                                  # perfect: a positive click in the target
    pred[2, :, 8:20, 8:20, 8:26] = True                  # false alarm only: a negative click there
    pred[2, :, 8:20, 8:20, 8:20] = True
    for interior in (0.0, 1.0):
        for _ in range(5):
            coords, labels = sample_clicks(pred, target, generator, interior_prob=interior)
            a, b, c = coords[0].tolist()
            assert target[0, 0, a, b, c] and labels[0] == 1
            a, b, c = coords[1].tolist()
            assert target[1, 0, a, b, c] and labels[1] == 1
            a, b, c = coords[2].tolist()
            assert not target[2, 0, a, b, c] and pred[2, 0, a, b, c] and labels[2] == 0
    # The eroded core keeps clicks two voxels away from the error's border.
    coords, _ = sample_clicks(torch.zeros_like(target), target, generator, interior_prob=1.0)
    assert ((coords >= 10) & (coords <= 17)).all()


def test_deep_clicks_come_from_the_deepest_erosion_level_left():
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
    target[0, :, 4:28, 4:28, 4:28] = True                 # 24 voxels thick: 4 erosions by 2 leave 16 wide
    target[1, :, 8:20, 8:20, 8:20] = True                 # 12 thick: the third erosion empties it
    target[1, :, 22:24, 2:30, 2:30] = True                # and a thin slab beside it, never in a core
    empty = torch.zeros_like(target)
    for _ in range(5):
        coords, labels = sample_clicks(empty, target, generator, interior_prob=1.0, depth=4)
        assert ((coords[0] >= 12) & (coords[0] <= 19)).all() and labels.tolist() == [1, 1]
        assert ((coords[1] >= 12) & (coords[1] <= 15)).all()
    shallow = torch.stack([sample_clicks(empty, target, generator, interior_prob=1.0)[0][0] for _ in range(40)])
    assert shallow.min() < 10 and shallow.max() > 21     # depth 1 (the default): the whole 2-voxel core


def test_first_click_depth_applies_to_each_samples_first_click_alone(monkeypatch):
    from FastSAM3DLib.training import train as training
    drawn = []

    def recording(pred, target, generator, interior_prob, choose, depth):
        coords, labels = sample_clicks(pred, target, generator, interior_prob, choose=choose, depth=depth)
        drawn.append((depth, coords))
        return coords, labels

    monkeypatch.setattr(training, "sample_clicks", recording)
    targets = torch.zeros(2, 1, 128, 128, 128, dtype=torch.bool)
    targets[:, :, 40:72, 40:72, 40:72] = True            # 32 thick: 6 erosions by 2 leave 8 wide
    images = torch.randn(2, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    step = training.InteractiveTraining(Sam3D(TINY), InteractionConfig(
        min_steps=4, max_steps=4, interior_prob=1.0, first_click_depth=6, compile=False), seed=3)
    step.begin_step(0)
    assert not step.plan.box_first
    with torch.no_grad():
        step(images, targets, torch.Generator().manual_seed(2))
    assert [d for d, _ in drawn] == [6] + [1] * (len(drawn) - 1) and len(drawn) >= 2
    assert ((drawn[0][1] >= 52) & (drawn[0][1] <= 59)).all()   # the deepest level, the cube's 8-voxel centre


def test_erosion_is_a_cube_min_filter():
    mask = torch.rand(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(1)) > 0.2
    reference = -torch.nn.functional.max_pool3d(-mask.float(), 5, stride=1, padding=2) > 0.5
    assert torch.equal(erode(mask, 2), reference)


def test_click_plan_has_silent_middle_and_last_steps():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        plan = make_click_plan(6, 11, generator)
        assert 6 <= plan.steps <= 11 and plan.adds_click(0) and not plan.adds_click(plan.steps - 1)
        assert len(plan.silent_steps) == 2 and all(0 < s < plan.steps for s in plan.silent_steps)
    assert make_click_plan(2, 2, generator).silent_steps == frozenset()


def test_click_fourier_features_stay_exact_under_a_bf16_autocast():
    """Training runs the decoder under a bf16 autocast (as on CUDA): the clicks'
    Fourier features (sines of arguments up to ~20 rad) must not be rounded."""
    torch.manual_seed(0)
    layer = PositionEmbeddingRandom3D(24)
    coords = torch.rand(3, 5, 3) * 128
    exact = layer.points(coords, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer.points(coords, 128)
        grid = layer.dense(8)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(grid, layer.dense(8), rtol=0, atol=1e-5)


def test_training_step_under_a_bf16_autocast_reaches_every_part(tiny_weights):
    """The CUDA training step (bf16 autocast around encoder and decoder): a finite
    loss whose gradient reaches the encoder, the prompt encoder and the decoder."""
    config = TrainConfig(run=RunConfig(out="unused", batch_size=2, device="cpu"),
                         interaction=InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0),
                         init=(str(tiny_weights),))
    task, _ = build_training(config, DistributedContext(0, 1, torch.device("cpu")))
    images, targets = OneSample()[0]
    task.on_step(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = task.module(images[None].repeat(2, 1, 1, 1, 1), targets[None].repeat(2, 1, 1, 1, 1),
                                    torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = {name.split(".")[1]: p.grad for name, p in task.module.named_parameters() if p.grad is not None}
    assert {"image_encoder", "prompt_encoder", "mask_decoder"} <= set(grads)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_learning_rate_warms_up_then_decays_by_cosine():
    factors = [learning_rate_factor(s, 100, 10, 0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)


def test_dice_bce_is_low_for_a_confident_right_answer():
    target = torch.zeros(2, 1, 8, 8, 8)
    target[:, :, 2:6, 2:6, 2:6] = 1
    assert dice_bce_loss(20 * (2 * target - 1), target) < 0.01 < dice_bce_loss(torch.zeros_like(target), target)
    assert batch_dice(target > 0, target > 0).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- runs


def _train_config(out: Path, init: Path, steps: int, **run_options) -> TrainConfig:
    options = dict(out=out, steps=steps, batch_size=1, workers=0, log_every=1, warmup_steps=2, lr=1e-3,
                   progress=False)
    options.update(run_options)
    return TrainConfig(run=RunConfig(**options), interaction=FEW_CLICKS, init=(str(init),),
                       decoder_lr_scale=1.0)


def _run_training(config: TrainConfig, dataset=None) -> dict:
    """The library path of ``train`` (which returns no model), optionally on a
    given dataset without augmentation; the result holds the task."""
    context = DistributedContext.start(config.run.device)
    try:
        task, batches = build_training(config, context)
        if dataset is not None:
            batches = loader_batches(dataset, no_augmentation, config.run, context)
        return run(task, batches, config.run, context) | {"task": task}
    finally:
        context.stop()


def test_cli_train_end_to_end_on_real_and_synthetic_samples(tmp_path, train_data, tiny_weights):
    out = tmp_path / "run"
    code = main(["train", "--data", str(train_data), "--synthetic-ratio", "0.5", "--init", str(tiny_weights),
                 "--val-case", "mri_spine_cord_sct_t2", "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--workers", "1", "--min-clicks", "2", "--max-clicks", "3", "--click-depth", "3",
                 "--click-focus", "1", "--log-every", "1", "--device", "cpu", "--no-progress"])
    assert code == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "dice", "dice_click1", "lr", "samples_per_s"} <= set(records[0])
    checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["samples_seen"] == 4
    state, config = read_checkpoint(out / MODEL_NAME)
    assert config == TINY and all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    # A second run without --resume refuses to overwrite the checkpoint.
    assert main(["train", "--init", str(tiny_weights), "--out", str(out), "--steps", "2", "--workers", "0",
                 "--no-progress"]) == 2


def test_cli_rejects_an_unknown_val_case(tmp_path, train_data, capsys):
    assert main(["train", "--data", str(train_data), "--val-case", "nope", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_loss_goes_down_when_overfitting_one_sample(tmp_path, tiny_weights):
    config = _train_config(tmp_path, tiny_weights, steps=20, lr=5e-3)
    config.interaction = InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0)
    result = _run_training(config, OneSample())
    losses = [r["loss"] for r in _metrics(tmp_path)]
    assert result["finished"] and len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4, losses


def test_time_budget_stops_cleanly_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_weights):
    straight = _run_training(_train_config(tmp_path / "straight", tiny_weights, steps=3), OneSample())
    # A budget already spent: the run stops after its first step, with a checkpoint and a model.
    stopped = _run_training(_train_config(tmp_path / "chunks", tiny_weights, steps=3, max_minutes=1e-4),
                            OneSample())
    assert stopped["step"] == 1 and not stopped["finished"]
    assert (tmp_path / "chunks" / MODEL_NAME).is_file()
    assert torch.load(tmp_path / "chunks" / CHECKPOINT_NAME, weights_only=True)["step"] == 1
    resumed = _run_training(_train_config(tmp_path / "chunks", tiny_weights, steps=3, resume=True),
                            OneSample())
    assert resumed["step"] == 3 and resumed["finished"]
    a = straight["task"].module.state_dict()
    b = resumed["task"].module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _metrics(tmp_path / "chunks")] == [1, 2, 3]


def test_a_slow_first_step_does_not_end_the_time_budget(tmp_path, tiny_weights):
    # The first step of a process compiles (tens of seconds on a GPU): the budget's estimate
    # of the next step must not take it for the step time, or a short run stops after one step.
    config = _train_config(tmp_path, tiny_weights, steps=3, max_minutes=0.5)
    context = DistributedContext.start(config.run.device)
    try:
        task, batches = build_training(config, context)
        batches = loader_batches(OneSample(), no_augmentation, config.run, context)
        on_step = task.on_step
        task.on_step = lambda step: (time.sleep(8) if step == 0 else None, on_step(step))
        result = run(task, batches, config.run, context)
    finally:
        context.stop()
    assert result["finished"] and result["step"] == 3


def _poisoned(source, bad_steps: set[int]):
    """``source``'s batches, with the image all NaN at the steps in ``bad_steps``
    (counted from 0): a batch whose loss and gradients overflow."""
    def start(first_sample):
        next_batch = source(first_sample)

        def poisoned_batch(step, generator):
            images, targets = next_batch(step, generator)
            return (torch.full_like(images, float("nan")) if step in bad_steps else images), targets
        return poisoned_batch
    return start


def _train_on_poisoned_batches(config: TrainConfig, bad_steps: set[int]) -> dict:
    context = DistributedContext.start(config.run.device)
    try:
        task, batches = build_training(config, context)
        batches = loader_batches(OneSample(), no_augmentation, config.run, context)
        return run(task, _poisoned(batches, bad_steps), config.run, context) | {"task": task}
    finally:
        context.stop()


def test_a_step_with_a_non_finite_loss_is_skipped_and_training_goes_on(tmp_path, tiny_weights, capsys):
    result = _train_on_poisoned_batches(_train_config(tmp_path, tiny_weights, steps=4), bad_steps={1})
    assert result["finished"] and result["step"] == 4
    state = result["task"].module.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 3, 4]          # the skipped step has no record
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "step 2: the loss or a gradient is not finite" in capsys.readouterr().err
    # The model written is finite too (the NaN step never reached the optimiser).
    state_on_disk, _ = read_checkpoint(tmp_path / MODEL_NAME)
    assert all(torch.isfinite(v.float()).all() for v in state_on_disk.values() if v.is_floating_point())


def test_a_run_whose_loss_stays_non_finite_stops_as_diverged(tmp_path, tiny_weights):
    with pytest.raises(TrainingError, match="not finite at 3 steps in a row"):
        _train_on_poisoned_batches(_train_config(tmp_path, tiny_weights, steps=6), bad_steps={1, 2, 3})


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str, init: str, data: str, steps: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = _train_config(Path(out), Path(init), steps=steps, device="cpu")
    config.data = DataConfig(sources=(data,), synthetic_ratio=0.0)
    result = _run_training(config)
    torch.save(result["task"].module.state_dict(), Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_end_identical_and_resume_on_one(tmp_path, train_data, tiny_weights):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(tiny_weights), str(train_data), 2),
             nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["samples_seen"] == 4 and checkpoint["world_size"] == 2
    # Continue the two-process run in one process.
    config = _train_config(tmp_path, tiny_weights, steps=3, resume=True)
    config.data = DataConfig(sources=(str(train_data),), synthetic_ratio=0.0)
    result = _run_training(config)
    assert result["step"] == 3
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["samples_seen"] == 5


def test_click_focus_adds_the_cross_entropy_around_the_newest_click_only():
    n = 32
    target = torch.zeros(2, 1, n, n, n, dtype=torch.bool)
    target[:, :, 8:24, 8:24, 8:24] = True
    low_res = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    iou_pred = torch.zeros(2, 1)
    upsampling = upsampling_matrix(8, n)
    points = torch.tensor([[4, 30, 16], [20, 20, 21]])
    ball = ball_around(points, (n, n, n), 6.0)
    # The ball, voxel by voxel: within 6 voxels of the point, the crop's border cutting it.
    k, j, i = torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij")
    for b in range(2):
        near = (k - points[b, 0]) ** 2 + (j - points[b, 1]) ** 2 + (i - points[b, 2]) ** 2 <= 36
        assert torch.equal(ball[b, 0].bool(), near)
    plain, _ = click_step_terms(low_res, iou_pred, upsampling, target, 0.0)
    focused, _ = click_step_terms(low_res, iou_pred, upsampling, target, 0.0, ball, 2.0)
    logits = F.interpolate(low_res, size=(n,) * 3, mode="trilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    expected = torch.stack([bce[b][ball[b].bool()].mean() for b in range(2)]).mean()
    assert (focused - plain).item() == pytest.approx(2.0 * expected.item(), rel=1e-4)
    # The gradient changes only through the logits within the balls.
    plain_grad, = torch.autograd.grad(plain, low_res)
    focused_grad, = torch.autograd.grad(focused, low_res)
    cells_touched = F.max_pool3d(ball, 4) > 0            # low-res cells whose upsampled voxels meet a ball
    reach = F.max_pool3d(cells_touched.float(), 3, stride=1, padding=1) > 0   # trilinear: one cell further
    assert torch.allclose(plain_grad[~reach], focused_grad[~reach], atol=1e-7)
    assert not torch.allclose(plain_grad[reach], focused_grad[reach])


def test_training_step_adds_the_click_focus_term_in_proportion_to_its_weight():
    from FastSAM3DLib.training.train import InteractiveTraining
    torch.manual_seed(0)
    model = Sam3D(TINY)
    images = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(1, 1, 128, 128, 128, dtype=torch.bool)
    targets[:, :, 40:90, 50:80, 30:100] = True
    losses = []
    for weight in (0.0, 1.0, 2.0):
        step = InteractiveTraining(model, InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0,
                                                            click_focus=weight, compile=False), seed=5)
        step.begin_step(0)
        with torch.no_grad():
            losses.append(step(images, targets, torch.Generator().manual_seed(7))[0].item())
    # The clicks and masks do not depend on the weight, so the loss is linear in it.
    assert losses[1] > losses[0]
    assert losses[2] - losses[0] == pytest.approx(2 * (losses[1] - losses[0]), rel=1e-4)


# ----------------------------------------------------------------------------- multimask first clicks


def test_multimask_step_learns_only_from_the_best_mask_and_feeds_back_the_most_confident():
    """Per sample the loss is the lowest of the masks' losses (the gradient reaches
    that mask alone), the IoU head is scored on every mask, and the mask fed back
    is the one the IoU head rates highest, not the best by loss."""
    n = 8
    target = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
    target[:, :, 8:24, 8:24, 8:24] = True
    right = 20.0 * (2 * F.avg_pool3d(target.float(), 4) - 1)              # (2, 1, 8, 8, 8) low-res logits
    wrong = -right
    # Sample 0: mask 1 is right; sample 1: mask 2 is right. Mask 0 is right nowhere.
    low_res = torch.cat([wrong, torch.cat([right[:1], wrong[1:]]), torch.cat([wrong[:1], right[1:]])], 1)
    low_res.requires_grad_(True)
    iou_pred = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.2, 0.3]])
    upsampling = upsampling_matrix(n, 32)
    loss, pred, fed_back = multimask_step_terms(low_res, iou_pred, upsampling, target, iou_loss_weight=0.0)
    best = torch.stack([click_step_terms(low_res[b:b + 1, m:m + 1], iou_pred[b:b + 1, m:m + 1], upsampling,
                                         target[b:b + 1], 0.0)[0] for b, m in ((0, 1), (1, 2))]).mean()
    assert loss.item() == pytest.approx(best.item(), rel=1e-5)
    loss.backward()
    touched = low_res.grad.flatten(2).abs().sum(2) > 0
    assert touched.tolist() == [[False, True, False], [False, False, True]]
    # Fed back: sample 0's mask 0 (IoU 0.9, wrong), sample 1's mask 2 (0.3, right).
    assert torch.equal(fed_back.detach(), torch.stack([low_res[0, 0:1], low_res[1, 2:3]]).detach())
    assert pred.shape == target.shape
    assert batch_dice(pred, target).tolist() == pytest.approx([0.0, 1.0], abs=0.05)
    # The IoU head's error counts on all three masks.
    with_iou, _, _ = multimask_step_terms(low_res, iou_pred, upsampling, target, iou_loss_weight=1.0)
    upsampled = F.interpolate(low_res.detach(), size=(32,) * 3, mode="trilinear", align_corners=False) > 0
    truth = torch.stack([hard_iou(upsampled[:, m:m + 1], target) for m in range(3)], 1)
    assert truth[0, 1] > 0.9 and truth[1, 2] > 0.9 and truth[0, 0] < 0.1
    assert (with_iou - loss).item() == pytest.approx(F.mse_loss(iou_pred, truth).item(), rel=1e-4)


def test_multimask_outputs_start_from_the_single_mask_output_and_the_flag_survives_the_file(tmp_path, tiny_weights):
    """Training a single-mask model with multimask first clicks: its multimask
    hypernetworks and IoU rows start as copies of the single mask's, its single
    mask answers every prompt exactly as before, and the exported file tells the
    engine to use the multimask outputs."""
    config = TrainConfig(run=RunConfig(out=tmp_path, batch_size=1, device="cpu"), interaction=FEW_CLICKS,
                         init=(str(tiny_weights),), multimask_first_click=True)
    task, _ = build_training(config, DistributedContext(0, 1, torch.device("cpu")))
    model = task.module.model.eval()
    assert model.config.multimask_first_click
    fresh = Sam3D(read_checkpoint(tiny_weights)[1])
    fresh.load_state_dict(read_checkpoint(tiny_weights)[0])
    fresh.eval()
    decoder = model.mask_decoder
    for m in (1, 2, 3):
        for a, b in zip(decoder.output_hypernetworks_mlps[m].parameters(),
                        decoder.output_hypernetworks_mlps[0].parameters()):
            assert torch.equal(a, b)
    last = decoder.iou_prediction_head.layers[-1]
    assert torch.equal(last.weight[3], last.weight[0]) and torch.equal(last.bias[1:], last.bias[:1].expand(3))
    torch.manual_seed(1)
    embedding = torch.randn(1, TINY.prompt_embed_dim, 8, 8, 8)
    points, labels = torch.tensor([[[60.0, 70.0, 64.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(embedding, points, labels)[0],
                                   fresh.decode(embedding, points, labels)[0], rtol=0, atol=0)
        multi, _ = model.decode(embedding, points, labels, multimask=True)
        untouched, _ = fresh.decode(embedding, points, labels, multimask=True)
    assert multi.shape[1] == 3 and not torch.allclose(multi, untouched, atol=1e-3)
    task.export(tmp_path / "model.safetensors")
    assert read_checkpoint(tmp_path / "model.safetensors")[1].multimask_first_click


def test_training_step_with_multimask_first_clicks_reaches_every_mask_output(tiny_weights):
    config = TrainConfig(run=RunConfig(out="unused", batch_size=2, device="cpu"),
                         interaction=InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0,
                                                       box_probability=0.0),
                         init=(str(tiny_weights),), multimask_first_click=True)
    task, _ = build_training(config, DistributedContext(0, 1, torch.device("cpu")))
    images, targets = OneSample()[0]
    task.on_step(0)
    loss, metrics = task.module(images[None].repeat(2, 1, 1, 1, 1), targets[None].repeat(2, 1, 1, 1, 1),
                                torch.Generator().manual_seed(0))
    loss.backward()
    decoder = task.module.model.mask_decoder
    # The single mask learns from the later click steps, the chosen multimask output from the first.
    assert torch.isfinite(loss)
    assert decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    assert sum(decoder.output_hypernetworks_mlps[m].layers[0].weight.grad.abs().sum() for m in (1, 2, 3)) > 0


def test_a_frozen_encoder_keeps_its_weights_while_the_decoder_learns(tmp_path, tiny_weights):
    config = _train_config(tmp_path, tiny_weights, steps=2)
    config.freeze_encoder = True
    result = _run_training(config, OneSample())
    trained = result["task"].module.model.state_dict()
    start, _ = read_checkpoint(tiny_weights)
    encoder = [k for k in start if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(trained[k].to(start[k].dtype), start[k]) for k in encoder)
    assert any(not torch.equal(trained[k].to(v.dtype), v) for k, v in start.items() if k.startswith("mask_decoder."))


def test_multimask_only_training_leaves_every_other_answer_unchanged(tmp_path, tiny_weights):
    """--multimask-only: the single mask of any prompt is bit-identical after
    training, the multimask outputs have learnt."""
    config = _train_config(tmp_path, tiny_weights, steps=2, lr=5e-3)
    config.multimask_first_click = config.multimask_only = True
    config.interaction = InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0, box_probability=0.0)
    model = _run_training(config, OneSample())["task"].module.model.eval()
    start = Sam3D(read_checkpoint(tiny_weights)[1])
    start.load_state_dict(read_checkpoint(tiny_weights)[0])
    start.eval()
    torch.manual_seed(2)
    embedding = torch.randn(1, TINY.prompt_embed_dim, 8, 8, 8)
    points, labels = torch.tensor([[[60.0, 70.0, 64.0], [50.0, 60.0, 70.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(embedding, points, labels)[0],
                                   start.decode(embedding, points, labels)[0], rtol=0, atol=0)
        assert not torch.allclose(model.decode(embedding, points[:, :1], labels[:, :1], multimask=True)[0],
                                  start.decode(embedding, points[:, :1], labels[:, :1], multimask=True)[0])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    assert changed and all(k.startswith(("mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head."))
                           for k in changed), changed
    assert not any(k.startswith("mask_decoder.output_hypernetworks_mlps.0.") for k in changed)


def test_multimask_only_without_multimask_first_clicks_is_refused(tmp_path, tiny_weights, capsys):
    assert main(["train", "--init", str(tiny_weights), "--multimask-only", "--out", str(tmp_path / "run"),
                 "--steps", "1", "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--multimask-first-click" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_gives_training_the_iou_loss_weight(tmp_path, monkeypatch):
    """--iou-loss-weight reaches the click steps' loss (its effect on the loss: the multimask test above)."""
    seen = []
    monkeypatch.setattr("FastSAM3DLib.training.train.train", seen.append)
    assert main(["train", "--out", str(tmp_path / "run"), "--iou-loss-weight", "7.5", "--no-progress"]) == 0
    assert [c.interaction.iou_loss_weight for c in seen] == [7.5]
