"""Checkpoint I/O: official layouts load strictly, bad files fail with one clear line."""

import argparse
import collections
import os
import pickle
from pathlib import Path

import pytest
import torch

from FastSAM3DLib import CheckpointError, build_model
from FastSAM3DLib.checkpoint import detect_config, read_checkpoint, save_model
from FastSAM3DLib.model import NAMED_CONFIGS, EncoderConfig, ModelConfig, Sam3D

TINY = ModelConfig(name="tiny", encoder=EncoderConfig(
    embed_dim=96, depth=3, num_heads=2, window_size=0, global_attn_indexes=(),
    attention_free_blocks=1, block_formula="fastsam3d"))


def _random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in Sam3D(config).state_dict().items()}


def _outputs(model: Sam3D) -> tuple[torch.Tensor, torch.Tensor]:
    volume = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding = model.encode(volume)
        logits, _ = model.decode(embedding, torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[1]]))
    return embedding, logits


def test_named_architectures_have_the_official_keys():
    assert len(Sam3D(NAMED_CONFIGS["sam-med3d"]).state_dict()) == 324
    student = Sam3D(NAMED_CONFIGS["fastsam3d"]).state_dict()
    assert len(student) == 216
    assert "image_encoder.blocks.1.attn.qkv.weight" not in student       # attention-free block
    assert student["image_encoder.blocks.2.attn.rel_pos_d"].shape == (15, 128)
    teacher = Sam3D(NAMED_CONFIGS["sam-med3d"]).state_dict()
    assert teacher["image_encoder.blocks.0.attn.rel_pos_d"].shape == (27, 64)
    assert teacher["image_encoder.blocks.2.attn.rel_pos_d"].shape == (15, 64)


def test_detect_config_recognises_official_layouts():
    for name in ("sam-med3d", "fastsam3d"):
        state = {k: torch.empty(v.shape, device="meta")
                 for k, v in Sam3D(NAMED_CONFIGS[name]).state_dict().items()}
        assert detect_config(state).name == name


def test_fastsam3d_training_checkpoint_loads_with_allow_list(tmp_path):
    state = _random_state(TINY)
    # What FastSAM3D's training script stores next to the weights.
    ckpt = {"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {"state": {}},
            "args": argparse.Namespace(lr=8e-4, device=torch.device("cpu")),
            "used_datas": collections.Counter({"ct": 2}), "best_loss": 0.1}
    path = tmp_path / "FastSAM3D.pth"
    torch.save(ckpt, path)
    model = Sam3D(TINY)
    loaded, config = read_checkpoint(path)
    assert config is None and set(loaded) == set(model.state_dict())
    model.load_state_dict(loaded)
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"],
                       state["mask_decoder.iou_token.weight"])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model_state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        build_model("fastsam3d", checkpoint=path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # A bare pickle (not a torch zip) is refused the same way.
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    assert not marker.exists()


def test_truncated_file_gives_one_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": _random_state(TINY)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    st = tmp_path / "model.safetensors"
    save_model(build_model("fastsam3d"), st)
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(st)


def test_missing_file_and_unknown_name():
    with pytest.raises(CheckpointError, match="not found"):
        build_model("fastsam3d", checkpoint="/nonexistent/FastSAM3D.pth")
    with pytest.raises(CheckpointError, match="unknown model"):
        build_model("vit_giant")


def test_file_of_another_architecture_names_expected_and_found(tmp_path):
    path = tmp_path / "student.pth"
    state = {k: v.half() for k, v in Sam3D(NAMED_CONFIGS["fastsam3d"]).state_dict().items()}
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        build_model("sam-med3d", checkpoint=path)
    message = str(info.value)
    assert "'sam-med3d'" in message and "'fastsam3d'" in message and "\n" not in message
    # By path, the architecture is read from the file.
    assert build_model(str(path)).config.name == "fastsam3d"


def test_encoder_only_student_is_combined_with_a_decoder_file(tmp_path):
    full = _random_state(TINY, seed=1)
    decoder_file = tmp_path / "decoder_source.pth"
    torch.save({"model_state_dict": full}, decoder_file)
    encoder_only = {k.removeprefix("image_encoder."): v * 2 for k, v in _random_state(TINY, seed=2).items()
                    if k.startswith("image_encoder.")}
    encoder_file = tmp_path / "student_encoder.pth"
    torch.save({"model_state_dict": encoder_only}, encoder_file)
    model = build_model(str(decoder_file), checkpoint=[decoder_file, encoder_file])
    sd = model.state_dict()
    assert torch.equal(sd["image_encoder.pos_embed"], encoder_only["pos_embed"])
    assert torch.equal(sd["mask_decoder.iou_token.weight"], full["mask_decoder.iou_token.weight"])


def test_safetensors_round_trip_keeps_config_and_outputs(tmp_path):
    model = Sam3D(TINY).eval()
    model.load_state_dict(_random_state(TINY))
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    assert not [p for p in os.listdir(tmp_path) if p != "tiny.safetensors"]     # no temp left
    loaded = build_model(path)
    assert loaded.config == TINY
    for a, b in zip(_outputs(model), _outputs(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
