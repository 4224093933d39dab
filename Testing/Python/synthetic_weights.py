"""Deterministic synthetic weights, the parity input volume and the parity prompt cases.

This module is shared by the parity tests and by the (out-of-repository) harness that produced
``Testing/fixtures/parity/*.npz``. It depends only on torch and numpy.

Synthetic weights
-----------------
Every tensor is generated from its state-dict key and its shape only, so any implementation that
uses the official key names can regenerate bit-identical weights:

* **Canonical key.** The seed is always derived from the key as it appears in a *full* ``Sam3D``
  state dict. Keys that already start with ``image_encoder.``, ``prompt_encoder.`` or
  ``mask_decoder.`` are used as they are; any other key is taken to be an encoder-only key (the
  layout of an encoder-only checkpoint) and ``image_encoder.`` is prepended. So
  ``blocks.0.norm1.weight`` and ``image_encoder.blocks.0.norm1.weight`` give the same tensor.
* **Seed.** ``int.from_bytes(sha256(canonical_key.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)``
  seeds a fresh CPU ``torch.Generator``; the tensor is ``torch.randn(shape, generator=g,
  dtype=torch.float32) * std + mean``.
* **Distribution** (first matching rule wins; ``name`` = the canonical key, ``leaf`` = its last
  dot-separated component, ``module`` = everything before the last dot):

  1. ``leaf == "positional_encoding_gaussian_matrix"`` (prompt encoder Fourier matrix): N(0, 1).
  2. ``name`` contains one of ``point_embeddings``, ``not_a_point_embed``, ``no_mask_embed``,
     ``iou_token``, ``mask_tokens`` (embeddings / tokens): N(0, 1).
  3. ``leaf`` starts with ``rel_pos_`` (relative-position tables): N(0, 0.1).
  4. ``leaf == "pos_embed"`` (absolute position embedding): N(0, 0.02).
  5. ``leaf == "weight"``, the tensor is 1-D, and the module is a norm: the module path contains
     ``norm`` (LayerNorm: ``norm1``, ``norm2``, ..., ``norm_final_attn``) or ends with one of the
     LayerNorm3d positions ``neck.1``, ``neck.3``, ``mask_downscaling.1``, ``mask_downscaling.4``,
     ``output_upscaling.1``: N(1, 0.1).
  6. ``leaf == "bias"`` (every bias, norms included): N(0, 0.02).
  7. Otherwise: N(0, 1/sqrt(fan_in)) with ``fan_in = prod(shape[1:])`` (1 for a 1-D tensor). Note
     this is applied literally to the stored shape, so for ``ConvTranspose3d`` weights
     ``(in, out, k, k, k)`` it is ``out * k**3``.

Parity volume
-------------
``parity_volume()`` = ``torch.randn((1, 1, 128, 128, 128), generator=torch.Generator().manual_seed(1234),
dtype=torch.float32)`` (regenerated instead of stored).

Prompt cases
------------
``PROMPT_CASES`` lists the prompt cases of the parity fixtures (see ``PromptCase``). Coordinates are
voxel indices of the 128^3 crop in tensor-axis order, passed as float32 ``(B, N, 3)``; labels are
int64 ``(B, N)``. Mask prompts are ``(B, 1, 32, 32, 32)`` float32 logits.

Fixture keys
------------
Each ``Testing/fixtures/parity/{variant}.npz`` holds ``embedding`` (1,384,8,8,8), ``dense_pe``
(1,384,8,8,8) and, per case, ``{case}__sparse``, ``{case}__low_res_logits``, ``{case}__iou``
(``fixture_key(case, item)``); all float32.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "TOP_LEVEL_PREFIXES",
    "NORM3D_MODULES",
    "EMBEDDING_KEY_PARTS",
    "canonical_key",
    "key_seed",
    "key_distribution",
    "synthetic_tensor",
    "synthetic_state_dict",
    "PARITY_VOLUME_SEED",
    "PARITY_VOLUME_SHAPE",
    "parity_volume",
    "PromptCase",
    "PROMPT_CASES",
    "PROMPT_CASES_BY_NAME",
    "case_inputs",
    "PARITY_VARIANTS",
    "FIXTURE_ITEMS",
    "fixture_key",
    "FIXTURE_DIR",
    "load_parity_fixture",
]

# --------------------------------------------------------------------------------------------
# Synthetic weights
# --------------------------------------------------------------------------------------------

TOP_LEVEL_PREFIXES: Tuple[str, ...] = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

#: Module paths (suffixes of the canonical key's module part) that are LayerNorm3d layers.
NORM3D_MODULES: Tuple[str, ...] = (
    "neck.1",
    "neck.3",
    "mask_downscaling.1",
    "mask_downscaling.4",
    "output_upscaling.1",
)

#: Key fragments that identify learned embeddings / tokens (drawn from N(0, 1)).
EMBEDDING_KEY_PARTS: Tuple[str, ...] = (
    "point_embeddings",
    "not_a_point_embed",
    "no_mask_embed",
    "iou_token",
    "mask_tokens",
)

ShapeLike = Union[Sequence[int], torch.Size]


def canonical_key(key: str) -> str:
    """Return the key as it appears in a full ``Sam3D`` state dict (adds ``image_encoder.`` if needed)."""
    if key.startswith(TOP_LEVEL_PREFIXES):
        return key
    return "image_encoder." + key


def key_seed(key: str) -> int:
    """63-bit seed from the SHA-256 of the canonical key."""
    digest = hashlib.sha256(canonical_key(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _is_norm_module(module: str) -> bool:
    if "norm" in module:
        return True
    return any(module == m or module.endswith("." + m) for m in NORM3D_MODULES)


def key_distribution(key: str, shape: ShapeLike) -> Tuple[float, float]:
    """Return ``(mean, std)`` of the normal distribution used for ``key`` (rules in the module doc)."""
    name = canonical_key(key)
    module, _, leaf = name.rpartition(".")
    shape = tuple(int(s) for s in shape)
    if leaf == "positional_encoding_gaussian_matrix":
        return 0.0, 1.0
    if any(part in name for part in EMBEDDING_KEY_PARTS):
        return 0.0, 1.0
    if leaf.startswith("rel_pos_"):
        return 0.0, 0.1
    if leaf == "pos_embed":
        return 0.0, 0.02
    if leaf == "weight" and len(shape) == 1 and _is_norm_module(module):
        return 1.0, 0.1
    if leaf == "bias":
        return 0.0, 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return 0.0, 1.0 / math.sqrt(fan_in)


def synthetic_tensor(key: str, shape: ShapeLike) -> torch.Tensor:
    """Deterministic float32 CPU tensor for a state-dict ``key`` of the given ``shape``."""
    shape = tuple(int(s) for s in shape)
    mean, std = key_distribution(key, shape)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key_seed(key))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    return t * std + mean


def synthetic_state_dict(
    reference: Union[Mapping[str, torch.Tensor], Mapping[str, ShapeLike], Iterable[Tuple[str, ShapeLike]]],
    prefix: str = "",
) -> "dict[str, torch.Tensor]":
    """Fill every key of ``reference`` with ``synthetic_tensor``.

    ``reference`` is a state dict (values are tensors), a mapping key -> shape, or an iterable of
    ``(key, shape)`` pairs. ``prefix`` is prepended to each key for seeding only (e.g. pass
    ``"mask_decoder."`` with ``model.mask_decoder.state_dict()``); the returned dict uses the
    original keys. Non-floating tensors (none exist in these models) are copied unchanged.
    """
    items = reference.items() if isinstance(reference, Mapping) else reference
    out: "dict[str, torch.Tensor]" = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                out[key] = value.clone()
                continue
            shape = tuple(value.shape)
        else:
            shape = tuple(int(s) for s in value)
        out[key] = synthetic_tensor(prefix + key, shape)
    return out


# --------------------------------------------------------------------------------------------
# Parity volume
# --------------------------------------------------------------------------------------------

PARITY_VOLUME_SEED = 1234
PARITY_VOLUME_SHAPE = (1, 1, 128, 128, 128)


def parity_volume() -> torch.Tensor:
    """The fixed (1, 1, 128, 128, 128) float32 N(0, 1) input volume (seed 1234)."""
    gen = torch.Generator(device="cpu").manual_seed(PARITY_VOLUME_SEED)
    return torch.randn(PARITY_VOLUME_SHAPE, generator=gen, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Prompt cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptCase:
    """One prompt-encoder + mask-decoder call.

    ``points``: nested list (B, N, 3) of voxel indices (tensor-axis order of the 128^3 crop).
    ``labels``: nested list (B, N); 1 = positive, 0 = negative.
    ``mask``: ``"zeros"`` -> an all-zero (B, 1, 32, 32, 32) mask prompt (``masks=zeros``, not None);
    ``None`` -> ``masks=None`` (the ``no_mask_embed`` path); any other string names an earlier case
    whose low-res logits (B, 1, 32, 32, 32) are the mask prompt.
    ``multimask``: the decoder's ``multimask_output``.
    The image embedding always has batch 1; the decoder repeats it per prompt when B > 1.
    """

    name: str
    points: Tuple[Tuple[Tuple[float, float, float], ...], ...]
    labels: Tuple[Tuple[int, ...], ...]
    mask: Optional[str]
    multimask: bool

    @property
    def batch(self) -> int:
        return len(self.points)


PROMPT_CASES: Tuple[PromptCase, ...] = (
    PromptCase("first_click", (((64, 64, 64),),), ((1,),), "zeros", False),
    PromptCase("second_click", (((30, 80, 100),),), ((0,),), "first_click", False),
    PromptCase(
        "three_points_single",
        (((64, 64, 64), (30, 80, 100), (100, 20, 50)),),
        ((1, 0, 1),),
        None,
        False,
    ),
    PromptCase(
        "three_points_multi",
        (((64, 64, 64), (30, 80, 100), (100, 20, 50)),),
        ((1, 0, 1),),
        None,
        True,
    ),
    PromptCase("batch_two", (((64, 64, 64),), ((30, 80, 100),)), ((1,), (0,)), "zeros", False),
)

PROMPT_CASES_BY_NAME = {c.name: c for c in PROMPT_CASES}


def case_inputs(
    case: Union[PromptCase, str],
    previous_logits: Optional["Mapping[str, torch.Tensor]"] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Return ``(coords float32 (B,N,3), labels int64 (B,N), masks or None)`` for a case.

    ``previous_logits`` maps case names to their low-res logits; needed when ``case.mask`` names
    another case (``second_click`` uses ``first_click``'s logits).
    """
    if isinstance(case, str):
        case = PROMPT_CASES_BY_NAME[case]
    coords = torch.tensor(case.points, dtype=torch.float32)
    labels = torch.tensor(case.labels, dtype=torch.int64)
    if case.mask is None:
        masks = None
    elif case.mask == "zeros":
        masks = torch.zeros((case.batch, 1, 32, 32, 32), dtype=torch.float32)
    else:
        if previous_logits is None or case.mask not in previous_logits:
            raise KeyError(f"case {case.name!r} needs the low-res logits of {case.mask!r}")
        masks = previous_logits[case.mask]
    return coords, labels, masks


# --------------------------------------------------------------------------------------------
# Fixture layout
# --------------------------------------------------------------------------------------------

#: Variant name -> short description (see Testing/fixtures/parity/README.md).
PARITY_VARIANTS = {
    "sammed3d": "SAM-Med3D vit_b_ori teacher, pre-norm blocks (324 tensors)",
    "fastsam3d_teacher": "same tensors, FastSAM3D block formula, skip_layer 0, window 14",
    "fastsam3d_student": "FastSAM3D 6-layer student encoder + SAM-Med3D prompt encoder/decoder (216 tensors)",
}

#: Per-case items stored in the fixtures.
FIXTURE_ITEMS = ("sparse", "low_res_logits", "iou")

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def fixture_key(case: str, item: str) -> str:
    """npz key of a per-case item, e.g. ``first_click__low_res_logits``."""
    return f"{case}__{item}"


def load_parity_fixture(variant: str) -> "dict[str, np.ndarray]":
    """Load ``Testing/fixtures/parity/{variant}.npz`` into a plain dict of arrays."""
    with np.load(FIXTURE_DIR / f"{variant}.npz") as data:
        return {k: data[k] for k in data.files}
