"""Checkpoint I/O: official ``.pth`` files read safely, our own weights as safetensors.

Official files are pickles. They are read with ``torch.load(weights_only=True)``
plus an explicit allow-list of the few harmless classes the FastSAM3D training
checkpoint stores (argparse.Namespace, collections.Counter); anything else is
refused, so a malicious file can never run code.

Our files may store their matrices as int8 with one scale per output channel
(``save_model(int8=True)``, ``fastsam3d quantize``): half the size of fp16;
``read_checkpoint`` returns them dequantized, so every reader sees float weights.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_output_path
from .model.config import NAMED_CONFIGS, EncoderConfig, ModelConfig

SAFE_PICKLE_GLOBALS = [argparse.Namespace, collections.Counter]
PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
CONFIG_METADATA_KEY = "fastsam3d_config"
QUANTIZATION_METADATA_KEY = "fastsam3d_quantization"
INT8_PER_CHANNEL = "int8-per-output-channel"
INT8_SCALE_SUFFIX = ".int8_scale"
# Smaller tensors (norms, biases, the few rows of prompt embeddings) stay 16-bit: they
# are under 1 % of the weights, and a per-channel scale would cost as much as they do.
INT8_MIN_ELEMENTS = 4096


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message is one line for the user."""


_ZIP_MAGIC = b"PK\x03\x04"          # torch.save's default (zip) format
_PICKLE_PROTOCOL = b"\x80"            # older torch.save files: a bare pickle


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL)):
        raise CheckpointError(f"{path.name} is not a weights file: expected a PyTorch checkpoint "
                              "(.pth, .pt, .ckpt) or a .safetensors file")
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path.name}: refused to load: the file holds Python objects that are not plain "
            f"weights, so it could run code ({first_line[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{path.name}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{str(exc).splitlines()[0][:160]}") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Return the model state dict of a file and the configuration stored in it
    (only our safetensors files store one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: not a readable safetensors file: "
                                  f"{str(exc).splitlines()[0][:160]}") from None
        quantization = metadata.get(QUANTIZATION_METADATA_KEY)
        if quantization == INT8_PER_CHANNEL:
            state = _dequantize_int8(state, path.name)
        elif quantization is not None:
            raise CheckpointError(f"{path.name}: unknown weight quantization {quantization[:40]!r} "
                                  f"(this version reads {INT8_PER_CHANNEL!r})")
        config = None
        if CONFIG_METADATA_KEY in metadata:
            config = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        return state, config
    data = _read_pickle(path)
    if isinstance(data, dict) and isinstance(data.get("model_state_dict"), dict):
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path.name}: no model weights found (expected a state dict, "
                              "or a dict with 'model_state_dict')")
    return data, None


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-only int8: each floating tensor of 2+ dimensions and at least
    ``INT8_MIN_ELEMENTS`` elements as int8 with a symmetric float32 scale per
    output channel (dim 0; the error of a weight is at most half its channel's
    scale) under ``key + INT8_SCALE_SUFFIX``; other tensors unchanged."""
    out = {}
    for key, value in state.items():
        if value.is_floating_point() and value.dim() >= 2 and value.numel() >= INT8_MIN_ELEMENTS:
            rows = value.detach().float().reshape(value.shape[0], -1)
            scale = rows.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            out[key] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(value.shape)
            out[key + INT8_SCALE_SUFFIX] = scale
        else:
            out[key] = value
    return out


def _dequantize_int8(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            if key.removesuffix(INT8_SCALE_SUFFIX) not in state:
                raise CheckpointError(f"{source}: int8 scale {key} has no weight")
            continue
        scale = state.get(key + INT8_SCALE_SUFFIX)
        if scale is None:
            if value.dtype == torch.int8:
                raise CheckpointError(f"{source}: int8 weight {key} has no scale")
            out[key] = value
            continue
        if value.dtype != torch.int8 or scale.dim() != 1 or value.dim() < 1 or scale.shape[0] != value.shape[0]:
            raise CheckpointError(f"{source}: {key} is not int8 with one scale per output channel "
                                  f"({value.dtype}, {tuple(value.shape)}; scale {tuple(scale.shape)})")
        out[key] = value.float() * scale.float().reshape(-1, *([1] * (value.dim() - 1)))
    return out


def _encoder_only_to_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # FastSAM3D's distillation saves the student encoder alone, without prefix.
    if "patch_embed.proj.weight" in state:
        return {f"image_encoder.{k}": v for k, v in state.items()}
    return state


def detect_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the architecture from the keys and shapes of a state dict.

    The block formula cannot be seen in the keys: 12-block ViT-B weights are
    taken as SAM-Med3D (pre-norm, what the turbo weights were trained with),
    students with attention-free blocks as FastSAM3D.
    """
    try:
        embed_dim = state["image_encoder.pos_embed"].shape[-1]
        grid = state["image_encoder.pos_embed"].shape[1]
        patch = state["image_encoder.patch_embed.proj.weight"].shape[-1]
        out_chans = state["image_encoder.neck.0.weight"].shape[0]
    except KeyError:
        raise CheckpointError("not a SAM-Med3D/FastSAM3D image encoder: "
                              "'image_encoder.pos_embed' or 'patch_embed' is missing") from None
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    attention_free = 0
    while attention_free < depth and f"image_encoder.blocks.{attention_free}.attn.qkv.weight" not in state:
        attention_free += 1
    head_dim = None
    windowed, window_size = [], 0
    for i in range(attention_free, depth):
        table = state.get(f"image_encoder.blocks.{i}.attn.rel_pos_d")
        if table is None:
            continue
        head_dim = table.shape[1]
        side = (table.shape[0] + 1) // 2
        if side != grid:
            windowed.append(i)
            window_size = side
    if head_dim is None:
        raise CheckpointError("unsupported encoder: no relative-position tables found")
    mlp = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    encoder = EncoderConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // head_dim, mlp_ratio=mlp / embed_dim, out_chans=out_chans,
        window_size=window_size,
        global_attn_indexes=tuple(i for i in range(depth) if i not in windowed) if windowed else (),
        attention_free_blocks=attention_free,
        block_formula="fastsam3d" if attention_free else "prenorm",
    )
    for config in NAMED_CONFIGS.values():
        if config.encoder == encoder:
            return config
    return ModelConfig(name="custom", encoder=encoder, prompt_embed_dim=out_chans)


def describe(config: ModelConfig) -> str:
    e = config.encoder
    return (f"'{config.name}' ({e.depth} blocks, width {e.embed_dim}, {e.num_heads} heads, "
            f"{e.attention_free_blocks} attention-free)")


def merge_checkpoints(paths) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Read one file or several: a later file replaces whole parts
    (image encoder, prompt encoder, mask decoder) of earlier ones, e.g.
    [sam_med3d_turbo.pth, student_encoder.pth] = FastSAM3D's evaluation setup."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    merged: dict[str, torch.Tensor] = {}
    config = None
    for path in paths:
        state, file_config = read_checkpoint(path)
        state = _encoder_only_to_full(state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        for part in PARTS:
            if any(k.startswith(part) for k in state):
                merged = {k: v for k, v in merged.items() if not k.startswith(part)}
                merged.update({k: v for k, v in state.items() if k.startswith(part)})
        config = file_config or config
    return merged, config


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear error naming what was expected and found."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        try:
            found = describe(detect_config(state))
        except CheckpointError as exc:
            found = f"an unknown model ({exc})"
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} of wrong shape (e.g. {k}: "
                          f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise CheckpointError(
            f"{source} does not fit model {describe(model.config)}: it looks like {found}; "
            f"tensors {', '.join(detail)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def save_model(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
               metadata: dict[str, str] | None = None, int8: bool = False) -> None:
    """Write the model as safetensors with its configuration, atomically;
    ``int8``: its matrices as int8 with per-channel scales (``quantize_int8``),
    the other tensors in ``dtype``."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if int8:
        state = quantize_int8(state)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not k.endswith(INT8_SCALE_SUFFIX)
                 else v).contiguous() for k, v in state.items()}
    meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    meta.update(metadata or {})
    if int8:
        meta[QUANTIZATION_METADATA_KEY] = INT8_PER_CHANNEL
    with atomic_output_path(path) as tmp:
        save_file(state, tmp, metadata=meta)
