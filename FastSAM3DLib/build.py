"""``build_model``: one entry point for every model the project knows."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_weights, merge_checkpoints, detect_config
from .model import NAMED_CONFIGS, Sam3D

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.safetensors"
MODEL_NAMES = ("default", *NAMED_CONFIGS)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA GPU is available to PyTorch")
    return device


def build_model(name: str | os.PathLike = "default", checkpoint=None,
                device: str | torch.device = "cpu") -> Sam3D:
    """Build a model in eval mode.

    name: "default" (the bundled weights), "sam-med3d", "fastsam3d-teacher",
    "fastsam3d", or the path of a weights file (architecture read from it).
    checkpoint: a weights file or a list of them (later files replace whole
    parts of earlier ones); official ``.pth`` files and our ``.safetensors``.
    Without a checkpoint a named architecture is randomly initialised.
    """
    device = resolve_device(device)
    name = str(name)
    if name == "default":
        if checkpoint is None and DEFAULT_WEIGHTS.is_file():
            checkpoint = DEFAULT_WEIGHTS
        config = None
    elif name in NAMED_CONFIGS:
        config = NAMED_CONFIGS[name]
    elif Path(name).suffix in (".pth", ".pt", ".ckpt", ".safetensors") or Path(name).exists():
        checkpoint, config = checkpoint or name, None
    else:
        raise CheckpointError(f"unknown model '{name}': use one of {', '.join(MODEL_NAMES)} "
                              "or the path of a weights file")

    if checkpoint is None:
        if config is None:
            warnings.warn("the bundled default weights are not installed: using a randomly "
                          "initialised FastSAM3D model; its masks are meaningless", stacklevel=2)
            config = NAMED_CONFIGS["fastsam3d"]
        model = Sam3D(config)
    else:
        state, stored_config = merge_checkpoints(checkpoint)
        config = config or stored_config or detect_config(state)
        model = Sam3D(config)
        sources = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        load_weights(model, state, " + ".join(Path(s).name for s in sources))
    return model.eval().to(device)

