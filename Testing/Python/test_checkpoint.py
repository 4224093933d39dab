"""Checkpoint I/O: official layouts load strictly, bad files fail with one clear line."""

import argparse
import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from FastSAM3DLib import CheckpointError, build_model
from FastSAM3DLib.build import DEFAULT_WEIGHTS
from FastSAM3DLib.checkpoint import (INT8_MIN_ELEMENTS, INT8_SCALE_SUFFIX, QUANTIZATION_METADATA_KEY, detect_config,
                                     read_checkpoint, save_model)
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


def test_int8_file_is_half_the_size_and_each_weight_within_half_its_channel_step(tmp_path):
    model = Sam3D(TINY).eval()
    model.load_state_dict(_random_state(TINY))
    half, int8 = tmp_path / "fp16.safetensors", tmp_path / "int8.safetensors"
    save_model(model, half, dtype=torch.float16)
    save_model(model, int8, dtype=torch.float16, int8=True)
    assert int8.stat().st_size < 0.55 * half.stat().st_size
    state, config = read_checkpoint(int8)
    assert config == TINY and state.keys() == model.state_dict().keys()
    quantized = 0
    for key, weight in model.state_dict().items():
        if weight.dim() >= 2 and weight.numel() >= INT8_MIN_ELEMENTS:
            rows = weight.reshape(weight.shape[0], -1)
            step = rows.abs().amax(1, keepdim=True) / 127
            error = (state[key].reshape(rows.shape) - rows).abs()
            assert bool((error <= step / 2 + 1e-7).all()), key
            assert error.max() > 0                                         # really rounded
            quantized += weight.numel()
        else:
            assert torch.equal(state[key], weight.half()), key
    assert quantized > 0.9 * sum(w.numel() for w in model.state_dict().values())
    embedding, logits = _outputs(model)
    q_embedding, q_logits = _outputs(build_model(int8))
    assert (q_embedding - embedding).norm() < 0.02 * embedding.norm()
    assert (q_logits - logits).norm() < 0.02 * logits.norm()


def test_the_bundled_file_is_int8_and_int8_rounding_keeps_a_real_models_masks(tmp_path, shared_data, capsys):
    """The bundled model ships in int8. An fp16 model off the int8 lattice (the bundled
    weights each moved by up to half its channel's step, as a training run writes them)
    quantized by `fastsam3d quantize`: half the file, its provenance kept, and one click in
    the CT's spleen and one in Colin27's left putamen give the fp16 model's masks (Dice >= 0.98)."""
    import SimpleITK as sitk
    from FastSAM3DLib.cli import main
    from FastSAM3DLib.clicks import center_click
    from FastSAM3DLib.image import lps_to_ras
    from FastSAM3DLib.session import Engine

    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        assert f.metadata()[QUANTIZATION_METADATA_KEY] == "int8-per-output-channel"
    model = build_model("default", device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, weight in model.state_dict().items():
            if weight.dim() >= 2 and weight.numel() >= INT8_MIN_ELEMENTS:
                step = weight.reshape(weight.shape[0], -1).abs().amax(1) / 127
                shift = torch.rand(weight.shape, generator=generator) - 0.5
                weight += shift * step.reshape(-1, *[1] * (weight.dim() - 1))
    half, out = tmp_path / "fp16.safetensors", tmp_path / "int8.safetensors"
    save_model(model, half, dtype=torch.float16, metadata={"training": '{"task": "interactive"}'})
    assert main(["quantize", str(half), str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert out.stat().st_size < 0.55 * half.stat().st_size
    with safe_open(str(out), framework="pt") as f:                 # the provenance travels
        assert f.metadata()["training"] == '{"task": "interactive"}'
    engines = Engine(str(half), device="cpu"), Engine(str(out), device="cpu")
    for folder, image_name, label_name, value in [
            ("ct_abdomen_pelvis_totalseg_example", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", 1),
            ("mri_brain_aal_colin27", "ch2.nii.gz", "aal.nii.gz", 73)]:
        image = sitk.ReadImage(str(shared_data / folder / image_name))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / folder / label_name))) == value
        k, j, i = center_click(np.zeros_like(truth), truth, np.array(image.GetSpacing())[::-1]).index
        point = lps_to_ras(np.array(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))))
        masks = []
        for engine in engines:
            session = engine.new_session(image)
            session.add_click(point)
            masks.append(session.mask())
        overlap = 2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum())
        assert masks[0].sum() > 100 and overlap >= 0.98, (folder, overlap)


def test_average_writes_the_mean_of_runs_of_one_configuration(tmp_path, capsys):
    from FastSAM3DLib.cli import main

    paths, states = [], []
    for seed in (0, 1, 2):
        model = Sam3D(TINY).eval()
        model.load_state_dict(_random_state(TINY, seed))
        paths.append(tmp_path / f"run{seed}.safetensors")
        save_model(model, paths[-1], dtype=torch.float16)
        states.append(read_checkpoint(paths[-1])[0])
    out = tmp_path / "soup.safetensors"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    averaged, config = read_checkpoint(out)
    assert config == TINY and averaged.keys() == states[0].keys()
    for key, value in averaged.items():
        mean = sum(s[key].float() for s in states) / 3
        torch.testing.assert_close(value.float(), mean, rtol=1e-3, atol=1e-4)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["averaged_from"] == ", ".join(map(str, paths))

    # Another configuration, one file, a missing file: one line each, and nothing written.
    other = tmp_path / "other.safetensors"
    save_model(Sam3D(ModelConfig(name="tinier", encoder=EncoderConfig(
        embed_dim=48, depth=2, num_heads=2, window_size=0, global_attn_indexes=()))), other)
    capsys.readouterr()
    for args, message in [([paths[0], other], "only runs of one configuration can be averaged"),
                          ([paths[0]], "two or more weights files"),
                          ([paths[0], tmp_path / "nope.safetensors"], "weights file not found")]:
        target = tmp_path / "refused.safetensors"
        assert main(["average", *map(str, args), "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not target.exists()


def test_broken_int8_files_and_quantize_errors_give_one_line(tmp_path, capsys):
    from safetensors.torch import save_file
    from FastSAM3DLib.cli import main

    model = Sam3D(TINY).eval()
    path = tmp_path / "int8.safetensors"
    save_model(model, path, int8=True)
    state, metadata = load_file(path), safe_open(str(path), framework="pt").metadata()
    key = "image_encoder.blocks.0.mlp.lin1.weight"
    cases = {
        "no scale": ({k: v for k, v in state.items() if k != key + INT8_SCALE_SUFFIX}, metadata,
                     "has no scale"),
        "wrong scale": ({**state, key + INT8_SCALE_SUFFIX: state[key + INT8_SCALE_SUFFIX][:3]}, metadata,
                        "one scale per output channel"),
        "unknown": (state, {**metadata, QUANTIZATION_METADATA_KEY: "int4"}, "unknown weight quantization"),
    }
    for name, (broken, meta, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(broken, bad, metadata=meta)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(bad)
    for args, message in [(["missing.pth", "out.safetensors"], "weights file not found"),
                          (["sam-med3d", "out.safetensors"], "weights file not found"),
                          ([str(path), "out.pth"], "must end in .safetensors")]:
        out = tmp_path / args[1]
        assert main(["quantize", args[0], str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists()
