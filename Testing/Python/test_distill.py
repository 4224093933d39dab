"""Layer-wise progressive distillation: the Eq. 2 schedule, the layer mapping,
the frozen teacher decoder, and losses that go down on tiny models."""

import json
import math
from pathlib import Path

import pytest
import torch

from FastSAM3DLib.checkpoint import read_checkpoint, save_model
from FastSAM3DLib.cli import main
from FastSAM3DLib.model import DecoderConfig, EncoderConfig, ModelConfig, Sam3D
from FastSAM3DLib.training.distill import (DistillConfig, Distillation, active_student_layers,
                                           build_distillation, teacher_layer_for)
from FastSAM3DLib.training.loop import (CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, DistributedContext, RunConfig,
                                        loader_batches, run)
from FastSAM3DLib.training.train import InteractionConfig

TINY_DECODER = DecoderConfig(transformer_mlp_dim=96, transformer_heads=4, iou_head_hidden_dim=32)
STUDENT = ModelConfig(
    name="tiny-student",
    encoder=EncoderConfig(embed_dim=48, depth=2, num_heads=2, out_chans=48, window_size=0,
                          global_attn_indexes=(), attention_free_blocks=1, block_formula="fastsam3d"),
    prompt_embed_dim=48, decoder=TINY_DECODER)
TEACHER = ModelConfig(
    name="tiny-teacher",
    encoder=EncoderConfig(embed_dim=96, depth=4, num_heads=2, out_chans=48, window_size=0,
                          global_attn_indexes=()),
    prompt_embed_dim=48, decoder=TINY_DECODER)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for seed, config in enumerate((TEACHER, STUDENT)):
        torch.manual_seed(seed)
        paths[config.name] = folder / f"{config.name}.safetensors"
        save_model(Sam3D(config), paths[config.name])
    return paths


class OneSample(torch.utils.data.Dataset):
    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(0)
        target = torch.zeros(1, 128, 128, 128)
        target[:, 40:80, 50:90, 44:84] = 1
        return 2 * target + 0.5 * torch.randn(1, 128, 128, 128, generator=generator), target


def _config(out: Path, weights: dict, steps: int, layerwise_fraction: float, **run_options) -> DistillConfig:
    options = dict(out=out, steps=steps, batch_size=1, workers=0, log_every=1, warmup_steps=1, lr=3e-3,
                   progress=False)
    options.update(run_options)
    return DistillConfig(run=RunConfig(**options), teacher=str(weights["tiny-teacher"]),
                         init=(str(weights["tiny-student"]),), layerwise_fraction=layerwise_fraction,
                         interaction=InteractionConfig(min_steps=2, max_steps=2, interior_prob=0.0))


def _run(config: DistillConfig) -> dict:
    context = DistributedContext.start("cpu")
    try:
        task, _ = build_distillation(config, context)
        batches = loader_batches(OneSample(), lambda images, targets, generator: (images, targets),
                                 config.run, context)
        return run(task, batches, config.run, context) | {"task": task}
    finally:
        context.stop()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def test_active_layers_follow_eq2_exactly():
    for student_depth in (1, 2, 4, 6):
        for total in (1, 5, 6, 7, 12, 100, 1001):
            ks = [active_student_layers(t, student_depth, total) for t in range(1, total + 1)]
            assert ks == [math.ceil(t * student_depth / total) for t in range(1, total + 1)]
            assert ks[-1] == student_depth and all(a <= b for a, b in zip(ks, ks[1:]))
    assert [active_student_layers(t, 6, 12) for t in range(1, 13)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    with pytest.raises(ValueError):
        active_student_layers(0, 6, 12)


def test_student_block_i_imitates_teacher_block_2i():
    assert [teacher_layer_for(i, 6, 12) for i in range(1, 7)] == [2, 4, 6, 8, 10, 12]
    assert [teacher_layer_for(i, 4, 12) for i in range(1, 5)] == [3, 6, 9, 12]


def test_distillation_module_stages_projections_and_frozen_decoder(weights, tmp_path):
    teacher, student = Sam3D(TEACHER), Sam3D(STUDENT)
    module = Distillation(student, teacher, layerwise_steps=4, config=_config(tmp_path, weights, 6, 0.7))
    assert module.teacher_layers == [2, 4]
    # Widths differ (48 vs 96): linear projections, owned by the module, not the student.
    assert all(isinstance(p, torch.nn.Linear) for p in module.projections)
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in module.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(student.mask_decoder.state_dict().values(),
                                                  teacher.mask_decoder.state_dict().values()))
    assert not any(p.requires_grad for p in student.mask_decoder.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    stages = []
    for step in range(6):
        module.begin_step(step)
        stages.append(module.active_layers)
    assert stages == [1, 1, 2, 2, 0, 0]           # 0 = the final output stage
    same_width = Distillation(Sam3D(STUDENT), Sam3D(STUDENT), 4, _config(tmp_path, weights, 6, 0.7))
    assert not list(same_width.projections.parameters())


def test_layer_stage_loss_goes_down(weights, tmp_path):
    # 16 steps, all layer-wise: k = 1 for steps 1-8, k = 2 for steps 9-16.
    _run(_config(tmp_path, weights, steps=16, layerwise_fraction=1.0, lr=1e-2))
    records = _metrics(tmp_path)
    assert [r["active_layers"] for r in records] == [1] * 8 + [2] * 8
    losses = [r["layer_loss"] for r in records]
    assert losses[7] < 0.8 * losses[0] and losses[15] < 0.8 * losses[8], losses


def test_output_stage_loss_goes_down_and_the_student_keeps_the_teacher_decoder(weights, tmp_path):
    result = _run(_config(tmp_path, weights, steps=10, layerwise_fraction=0.0))
    records = _metrics(tmp_path)
    assert all(r["layer_loss"] == 0 and r["logit_loss"] >= 0 for r in records)
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert result["finished"]
    state, config = read_checkpoint(tmp_path / MODEL_NAME)
    assert config == STUDENT
    teacher, _ = read_checkpoint(weights["tiny-teacher"])
    decoder_keys = [k for k in state if k.startswith("mask_decoder.")]
    assert all(torch.allclose(state[k].float(), teacher[k], atol=1e-3) for k in decoder_keys)


def test_cli_distill_runs_resumes_and_refuses_a_weightless_teacher(weights, tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    common = ["distill", "--teacher", str(weights["tiny-teacher"]), "--init", str(weights["tiny-student"]),
              "--data", str(shared_data / "train"), "--synthetic-ratio", "0", "--out", str(out),
              "--layerwise-fraction", "0.5", "--batch-size", "1", "--workers", "0", "--min-clicks", "2",
              "--max-clicks", "2", "--log-every", "1", "--device", "cpu", "--no-progress"]
    assert main(common + ["--steps", "2"]) == 0
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert main(common + ["--steps", "3", "--resume"]) == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    # Steps 1 of 2 was layer-wise; with 3 steps in all, step 3 is in the output stage.
    assert records[0]["layer_loss"] > 0 and records[2]["layer_loss"] == 0 and records[2]["embedding_loss"] > 0
    assert (out / MODEL_NAME).is_file()
    assert main(["distill", "--teacher", "sam-med3d", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--teacher-weights" in capsys.readouterr().err
