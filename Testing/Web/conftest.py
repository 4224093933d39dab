"""Web tier: the trame-slicer app (``FastSAM3DLib.web``), in its own venv (.venv-web).

trame-slicer 2.0.0 pins slicer-core 5.11.x while the main test venv has
5.12.x, so these tests are not collected by the main run (``Testing/Python``)
and are run by ``scripts/test.sh`` with ``.venv-web/bin/python -m pytest Testing/Web``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")   # headless, no X server

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CT_ABDOMEN = DATA / "ct_abdomen_pelvis_totalseg_example" / "example_ct.nii.gz"


def tiny_model():
    """A small randomly initialised FastSAM3D-style model (deterministic): its
    masks are meaningless, but it runs in tens of milliseconds on a CPU and is
    biased towards "object here", which is all these tests need."""
    import torch
    from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
    torch.manual_seed(0)
    config = ModelConfig(name="tiny-web-test", encoder=EncoderConfig(
        img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=0, global_attn_indexes=(),
        attention_free_blocks=1, block_formula="fastsam3d"))
    model = Sam3D(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model.eval()


@pytest.fixture(scope="session")
def ct_path() -> Path:
    if not CT_ABDOMEN.is_file():
        pytest.skip(f"shared test data not found at {CT_ABDOMEN}")
    return CT_ABDOMEN


@pytest.fixture(scope="session")
def tiny_engine():
    from FastSAM3DLib.session import Engine
    return Engine(model=tiny_model(), device="cpu")


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    from FastSAM3DLib.checkpoint import save_model
    path = tmp_path_factory.mktemp("weights") / "tiny-web-test.safetensors"
    save_model(tiny_model(), path)
    return path

