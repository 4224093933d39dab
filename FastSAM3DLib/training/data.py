"""Training data: labelled cases, ROI crops through the engine's preprocessing,
a mix with synthetic volumes, and batch augmentation.

A sample is one binary target (one label id of one case) in a ``size``^3 ROI
at the model spacing, cut exactly as the engine cuts it at inference
(``FastSAM3DLib.roi``: RAS+ tensor-axis order, linear resampling,
z-normalisation over voxels > 0); the label is resampled onto the same grid
with nearest neighbour.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..image import image_from_array, load_image
from ..roi import RoiGeometry, extract_roi, label_on_roi, roi_for_point
from .pack import DataError
from .synthetic import synthetic_volume

# Labels smaller than this are skipped (upstream spec 7.1 skips volume < 10;
# counted here in voxels of the original grid).
MIN_LABEL_VOXELS = 10
MAX_DRAWS = 50              # crops tried before giving up on a sample


@dataclass
class Case:
    name: str
    image: Path
    label: Path
    label_names: dict[int, str] = field(default_factory=dict)   # id -> name; may be empty
    modality: str = ""


# ----------------------------------------------------------------------------- readers


def read_manifest(path) -> list[Case]:
    """Cases of a MANIFEST.json: a list of {"case", "image", "label",
    "modality", "label_names": {"id": "name"}}, paths relative to the manifest."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path.name}: expected a list of cases")
    cases = []
    for number, entry in enumerate(entries):
        missing = [key for key in ("case", "image", "label") if key not in entry]
        if missing:
            raise DataError(f"{path.name}: entry {number} lacks {', '.join(missing)}")
        names = {int(k): str(v) for k, v in entry.get("label_names", {}).items()}
        case = Case(str(entry["case"]), (path.parent / entry["image"]).resolve(),
                    (path.parent / entry["label"]).resolve(), names, str(entry.get("modality", "")))
        _check_files(case, path.name)
        cases.append(case)
    return cases


def read_nnunet_folder(root) -> list[Case]:
    """Cases of an nnU-Net raw dataset folder: imagesTr/<case>_0000<ending> and
    labelsTr/<case><ending> (ending from dataset.json's "file_ending", default
    .nii.gz; only channel 0 is used). Label names and modality come from
    dataset.json when present (nnU-Net v1 or v2 layout)."""
    root = Path(root)
    images = root / "imagesTr"
    if not images.is_dir():
        raise DataError(f"{root} is not an nnU-Net folder: no imagesTr/")
    info = {}
    if (root / "dataset.json").is_file():
        try:
            info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{root.name}/dataset.json is not valid JSON: {exc}") from None
    ending = info.get("file_ending", ".nii.gz")
    names = _nnunet_label_names(info.get("labels", {}))
    channels = info.get("channel_names") or info.get("modality") or {}
    modality = str(channels.get("0", ""))
    cases = []
    for image in sorted(images.glob(f"*_0000{ending}")):
        name = image.name[:-len(f"_0000{ending}")]
        case = Case(name, image, root / "labelsTr" / f"{name}{ending}", dict(names), modality)
        _check_files(case, root.name)
        cases.append(case)
    if not cases:
        raise DataError(f"{root}: no imagesTr/*_0000{ending} images")
    return cases


def read_cases(source) -> list[Case]:
    """Cases of a MANIFEST.json, of a folder holding one, or of an nnU-Net folder."""
    source = Path(source)
    if source.is_dir() and (source / "MANIFEST.json").is_file():
        source = source / "MANIFEST.json"
    if source.is_file():
        return read_manifest(source)
    if source.is_dir():
        return read_nnunet_folder(source)
    raise DataError(f"training data not found: {source}")


def _nnunet_label_names(labels: dict) -> dict[int, str]:
    """v1: {"1": "liver"}; v2: {"liver": 1} (region lists, which are not one
    id, are left out). The background (0) is not a target."""
    names = {}
    for key, value in labels.items():
        if str(key).isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, int):
            names[value] = str(key)
    names.pop(0, None)
    return names


def _check_files(case: Case, where: str) -> None:
    for kind, path in (("image", case.image), ("label", case.label)):
        if not Path(path).is_file():
            raise DataError(f"{where}: case {case.name}: {kind} file not found: {path}")


# ----------------------------------------------------------------------------- samples


@dataclass
class _LoadedCase:
    image: sitk.Image
    label: sitk.Image                       # integer label map
    label_kji: np.ndarray
    ids: list[int]                          # label ids with at least min_voxels voxels
    voxels: dict[int, np.ndarray] = field(default_factory=dict)   # id -> flat voxel indices, on demand

    def voxels_of(self, label_id: int) -> np.ndarray:
        if label_id not in self.voxels:
            self.voxels[label_id] = np.flatnonzero(self.label_kji == label_id)
        return self.voxels[label_id]


class TrainingSampleSource(torch.utils.data.Dataset):
    """Endless training samples: real cases mixed with synthetic volumes.

    ``source[n]`` -> (image, target), each (1, size, size, size) float32
    tensors, is sample ``n`` of the stream: a function of (seed, n) alone, so a
    resumed or multi-worker run sees the same data. ``sample(rng)`` gives one
    sample as a dict with its name.

    A real sample picks a case uniformly, then one of its labels with at least
    ``min_voxels`` voxels uniformly (so no case dominates through many small
    labels), and centres the ROI on a random voxel of that label moved by up
    to ``jitter_voxels`` ROI voxels per axis (default size/8: the label voxel stays in the
    middle of the ROI). Loaded images are cached in memory.
    """

    def __init__(self, cases: list[Case], synthetic_ratio: float = 0.5, seed: int = 0, size: int = 128,
                 spacing: float = 1.5, jitter_voxels: float | None = None, min_voxels: int = MIN_LABEL_VOXELS):
        if not 0 <= synthetic_ratio <= 1:
            raise DataError(f"the synthetic ratio must be between 0 and 1, got {synthetic_ratio}")
        if not cases and synthetic_ratio < 1:
            raise DataError("no training cases: give data, or use synthetic volumes only (ratio 1)")
        self.cases = list(cases)
        self.synthetic_ratio = synthetic_ratio
        self.seed = seed
        self.size = size
        self.spacing = spacing
        self.jitter_voxels = size / 8 if jitter_voxels is None else jitter_voxels
        self.min_voxels = min_voxels
        self._loaded: dict[str, _LoadedCase] = {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.sample(np.random.default_rng([self.seed, int(index)]))
        return sample["image"], sample["target"]

    def sample(self, rng: np.random.Generator) -> dict:
        """{"image", "target": (1, size, size, size) float32 tensors, "name":
        "case/label name", "roi": the RoiGeometry cut}."""
        for _ in range(MAX_DRAWS):
            if rng.random() < self.synthetic_ratio:
                name, loaded = self._synthetic_case(rng)
                label_names = {}
            else:
                case = self.cases[rng.integers(len(self.cases))]
                name, loaded, label_names = case.name, self._load(case), case.label_names
            if not loaded.ids:
                continue
            label_id = int(loaded.ids[rng.integers(len(loaded.ids))])
            roi = self._roi_around(loaded, label_id, rng)
            target = label_on_roi(loaded.label, roi) == label_id
            if target.any():            # a thin label can vanish at the coarser model spacing
                return {"image": torch.from_numpy(extract_roi(loaded.image, roi))[None],
                        "target": torch.from_numpy(target.astype(np.float32))[None],
                        "name": f"{name}/{label_names.get(label_id, label_id)}", "roi": roi}
        raise DataError(f"no usable label found in {MAX_DRAWS} draws: are the labels empty or "
                        f"smaller than {self.min_voxels} voxels?")

    def _roi_around(self, loaded: _LoadedCase, label_id: int, rng: np.random.Generator) -> RoiGeometry:
        voxels = loaded.voxels_of(label_id)
        k, j, i = np.unravel_index(voxels[rng.integers(len(voxels))], loaded.label_kji.shape)
        centre = np.array(loaded.label.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        centre += rng.uniform(-1, 1, 3) * self.jitter_voxels * self.spacing
        return roi_for_point(centre, self.size, self.spacing)

    def _load(self, case: Case) -> _LoadedCase:
        if case.name not in self._loaded:
            image = load_image(case.image)
            label = sitk.ReadImage(str(case.label))
            label_kji = _integer_labels(sitk.GetArrayFromImage(label), case.name)
            label_image = sitk.GetImageFromArray(label_kji)
            if label.GetSize() == image.GetSize():
                # Same voxel grid: header differences are taken as header noise (the
                # reference copies one geometry onto the other too).
                label_image.CopyInformation(image)
            else:
                label_image.CopyInformation(label)
            self._loaded[case.name] = _LoadedCase(image, label_image, label_kji,
                                                  self._eligible_ids(label_kji))
        return self._loaded[case.name]

    def _synthetic_case(self, rng: np.random.Generator) -> tuple[str, _LoadedCase]:
        modality = ("CT", "MR")[rng.integers(2)]
        array, label_kji = synthetic_volume(rng, (self.size,) * 3, modality)
        spacing = (self.spacing,) * 3
        label = sitk.GetImageFromArray(label_kji)
        label.SetSpacing(spacing)
        return f"synthetic-{modality}", _LoadedCase(image_from_array(array, spacing=spacing), label,
                                                    label_kji, self._eligible_ids(label_kji))

    def _eligible_ids(self, label_kji: np.ndarray) -> list[int]:
        counts = np.bincount(label_kji.ravel())
        return [int(v) for v in np.flatnonzero(counts >= self.min_voxels) if v > 0]


def _integer_labels(array: np.ndarray, case_name: str) -> np.ndarray:
    """The label map in the smallest unsigned integer type (float files hold whole numbers)."""
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    if array.size and array.min() < 0:
        raise DataError(f"case {case_name}: the label map holds negative values")
    return array.astype(np.min_scalar_type(int(array.max()) if array.size else 0))


# ----------------------------------------------------------------------------- augmentation


def augment_batch(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                  flip_probability: float = 0.5, affine_probability: float = 0.3,
                  max_rotation_degrees: float = 10.0, max_scale: float = 0.1,
                  intensity_scale: float = 0.1, intensity_shift: float = 0.1, max_noise_std: float = 0.05
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, small rotations and scaling, and intensity changes of a
    (B, 1, D, H, W) batch, the same geometry applied to images and targets.

    Per sample: each axis flipped with ``flip_probability`` (as SAM-Med3D's
    RandomFlip); with ``affine_probability`` a rotation up to
    ``max_rotation_degrees`` about each axis and an isotropic scale within
    1 ± ``max_scale`` (trilinear for images, targets re-thresholded at 0.5);
    intensities x·(1 + a) + b with |a| ≤ ``intensity_scale``, |b| ≤
    ``intensity_shift``, plus Gaussian noise of std up to ``max_noise_std``.
    Random numbers come from ``generator`` (on its own device), so a seed
    reproduces a batch on any device."""
    if images.dim() != 5 or images.shape[1] != 1 or targets.shape != images.shape:
        raise ValueError(f"expected images and targets of one shape (B, 1, D, H, W), "
                         f"got {tuple(images.shape)} and {tuple(targets.shape)}")
    batch, device = images.shape[0], images.device

    def uniform(*shape):        # in [0, 1), drawn on the generator's device
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    def symmetric(*shape):      # in [-1, 1)
        return 2 * uniform(*shape) - 1

    target_dtype = targets.dtype
    targets = targets.float()
    flips = uniform(batch, 3) < flip_probability
    images = torch.stack([_flip(image, flip) for image, flip in zip(images, flips)])
    targets = torch.stack([_flip(target, flip) for target, flip in zip(targets, flips)])

    transformed = torch.flatten(torch.nonzero(uniform(batch) < affine_probability))
    if transformed.numel():
        count = transformed.numel()
        angles = symmetric(count, 3) * math.radians(max_rotation_degrees)
        scale = 1 + symmetric(count) * max_scale
        theta = torch.zeros(count, 3, 4, device=device)
        theta[:, :, :3] = _rotation_matrices(angles) / scale[:, None, None]
        grid = F.affine_grid(theta, (count, 1, *images.shape[2:]), align_corners=False)
        images = images.clone()
        targets = targets.clone()
        images[transformed] = F.grid_sample(images[transformed], grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=False)
        targets[transformed] = (F.grid_sample(targets[transformed], grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False) >= 0.5).float()

    shape = (batch, 1, 1, 1, 1)
    images = images * (1 + intensity_scale * symmetric(*shape)) + intensity_shift * symmetric(*shape)
    if max_noise_std > 0:
        noise_std = max_noise_std * uniform(*shape)
        noise = torch.randn(images.shape, generator=generator, device=generator.device).to(device)
        images = images + noise_std * noise
    return images, targets.to(target_dtype)


def _flip(volume: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """A (1, D, H, W) volume flipped along the spatial axes marked in ``axes`` (3 bools)."""
    dims = [axis + 1 for axis in range(3) if bool(axes[axis])]
    return volume.flip(dims) if dims else volume


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations by angles (N, 3) about the three axes in turn."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows):
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    about_0 = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    about_1 = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    about_2 = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return about_2 @ about_1 @ about_0
