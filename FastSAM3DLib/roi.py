"""The model's view of an image: a cube ("ROI") around a click, and back.

The ROI is a ``size``^3 grid of isotropic ``spacing`` in the canonical RAS+
axis order the reference pipelines feed the network (torchio ``ToCanonical``):
tensor axis 0 increases toward the patient's Right, axis 1 toward Anterior,
axis 2 toward Superior. In LPS that is the direction matrix diag(-1, -1, 1).
Its geometric centre (continuous voxel (size - 1) / 2 = 63.5 for 128) is the
ROI's ``center_lps``. ROI arrays are in tensor-axis order (axis0, axis1, axis2),
i.e. the SimpleITK array of the ROI grid transposed (2, 1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .image import ImageError, check_volume, lps_to_continuous_index
from .normalization import normalize_intensity

ROI_DIRECTION = np.array([-1.0, -1.0, 1.0])        # diagonal of the LPS direction matrix (RAS+)
_GRID_SAMPLE_VOXELS_PER_CHUNK = 1 << 22            # bounds the sampling grid's memory (48 MB)


@dataclass(frozen=True)
class RoiGeometry:
    """A ``size``^3 RAS+ grid of ``spacing`` mm whose centre is ``center_lps``.
    Hashable: the embedding cache keys on it."""
    center_lps: tuple[float, float, float]
    size: int = 128
    spacing: float = 1.5

    def __post_init__(self):
        center = np.asarray(self.center_lps, dtype=float)
        if center.shape != (3,) or not np.all(np.isfinite(center)):
            raise ImageError(f"the ROI centre needs 3 finite coordinates, got {self.center_lps!r}")
        if int(self.size) != self.size or self.size < 1:
            raise ImageError(f"the ROI size must be a positive whole number of voxels, got {self.size!r}")
        if not (np.isfinite(self.spacing) and self.spacing > 0):
            raise ImageError(f"the ROI spacing must be a positive number of mm, got {self.spacing!r}")
        object.__setattr__(self, "center_lps", tuple(float(v) for v in center))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "spacing", float(self.spacing))

    @property
    def origin_lps(self) -> np.ndarray:
        """LPS position of voxel (0, 0, 0)."""
        half = (self.size - 1) / 2 * self.spacing
        return np.array(self.center_lps) - ROI_DIRECTION * half

    def reference_image(self) -> sitk.Image:
        """An empty (zero) image on the ROI grid."""
        image = sitk.Image([self.size] * 3, sitk.sitkUInt8)
        image.SetSpacing([self.spacing] * 3)
        image.SetOrigin(self.origin_lps.tolist())
        image.SetDirection(np.diag(ROI_DIRECTION).ravel().tolist())
        return image

    def lps_to_voxel(self, points_lps) -> np.ndarray:
        """LPS point(s) (..., 3) -> continuous ROI voxel coordinates in tensor-axis order."""
        return (np.asarray(points_lps, dtype=float) - self.origin_lps) * ROI_DIRECTION / self.spacing

    def voxel_to_lps(self, voxels) -> np.ndarray:
        return self.origin_lps + np.asarray(voxels, dtype=float) * self.spacing * ROI_DIRECTION

    def contains(self, p_lps, margin_voxels: float = 0) -> bool:
        """Whether the point lies in the ROI, at least ``margin_voxels`` from its border."""
        voxel = self.lps_to_voxel(p_lps)
        return bool(np.all((voxel >= margin_voxels - 0.5) & (voxel <= self.size - 0.5 - margin_voxels)))


def roi_for_point(p_lps, size: int = 128, spacing: float = 1.5) -> RoiGeometry:
    """The ROI centred on an LPS point."""
    return RoiGeometry(tuple(np.asarray(p_lps, dtype=float).tolist()), size, spacing)


# -- image -> model ----------------------------------------------------------------

def resample_roi(image: sitk.Image, roi: RoiGeometry) -> np.ndarray:
    """Raw intensities on the ROI grid (linear; 0 outside the image, as the
    reference's zero padding), float32 in tensor-axis order. Only the ROI's
    voxels are computed, so the cost does not grow with the image."""
    check_volume(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([roi.size] * 3)
    resampler.SetOutputSpacing([roi.spacing] * 3)
    resampler.SetOutputOrigin(roi.origin_lps.tolist())
    resampler.SetOutputDirection(np.diag(ROI_DIRECTION).ravel().tolist())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    crop = resampler.Execute(image)
    return np.ascontiguousarray(sitk.GetArrayFromImage(crop).transpose(2, 1, 0))


def extract_roi(image: sitk.Image, roi: RoiGeometry) -> np.ndarray:
    """The network input for ``roi``: (size,)*3 float32, tensor-axis order."""
    return normalize_intensity(resample_roi(image, roi))


def label_on_roi(label: sitk.Image, roi: RoiGeometry) -> np.ndarray:
    """An integer label map on the ROI grid (nearest neighbour, 0 outside the
    label image), in tensor-axis order like ``extract_roi``: training targets."""
    resampled = sitk.Resample(label, roi.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              label.GetPixelID())
    return np.ascontiguousarray(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0))


# -- model -> image ------------------------------------------------------------------

@dataclass(eq=False)
class MaskPatch:
    """A boolean mask over the box ``start_kji`` .. ``start_kji + array.shape``
    of an image's (k, j, i) voxel grid."""
    start_kji: tuple[int, int, int]
    array: np.ndarray

    def __post_init__(self):
        self.start_kji = tuple(int(v) for v in self.start_kji)
        self.array = np.asarray(self.array, dtype=bool)
        if len(self.start_kji) != 3 or self.array.ndim != 3:
            raise ImageError("a mask patch needs a 3D start (k, j, i) and a 3D array")

    @property
    def stop_kji(self) -> tuple[int, int, int]:
        return tuple(s + n for s, n in zip(self.start_kji, self.array.shape))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index of the patch's box in a full (k, j, i) array."""
        return tuple(slice(a, b) for a, b in zip(self.start_kji, self.stop_kji))

    def paste_into(self, full_kji: np.ndarray) -> None:
        """Replace the patch's box of ``full_kji`` by the patch."""
        if any(a < 0 for a in self.start_kji) or any(b > n for b, n in zip(self.stop_kji, full_kji.shape)):
            raise ImageError(f"the mask patch {self.start_kji}..{self.stop_kji} does not fit "
                             f"in an image of {full_kji.shape} voxels (k, j, i)")
        full_kji[self.slices] = self.array

    def union_box(self, other: MaskPatch) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(start_kji, stop_kji) of the box covering both patches."""
        return (tuple(min(a, b) for a, b in zip(self.start_kji, other.start_kji)),
                tuple(max(a, b) for a, b in zip(self.stop_kji, other.stop_kji)))


def roi_box_on_image(image: sitk.Image, roi: RoiGeometry, lower=None, upper=None):
    """(start_kji, stop_kji) of the image voxels whose centres the ROI's
    bounding box can cover, clipped to the image; None if they do not meet.
    ``lower``/``upper`` (ROI voxel coordinates, default the whole ROI) narrow it
    to a sub-box of the ROI."""
    lower = np.full(3, -0.5) if lower is None else np.maximum(np.asarray(lower, float), -0.5)
    upper = np.full(3, roi.size - 0.5) if upper is None else np.minimum(np.asarray(upper, float),
                                                                         roi.size - 0.5)
    corners = np.stack(np.meshgrid(*zip(lower, upper), indexing="ij"), axis=-1).reshape(-1, 3)
    index = lps_to_continuous_index(image, roi.voxel_to_lps(corners))
    tolerance = 1e-6
    start = np.maximum(np.ceil(index.min(0) - tolerance), 0).astype(int)
    stop = np.minimum(np.floor(index.max(0) + tolerance) + 1, image.GetSize()).astype(int)
    if np.any(stop <= start):
        return None
    return tuple(start[::-1].tolist()), tuple(stop[::-1].tolist())


def positive_cell_bounds(low_res_logits: torch.Tensor) -> np.ndarray | None:
    """(3, 2) inclusive [lo, hi] cell indices per axis of the logits > 0 of an
    (s, s, s) tensor, or None if none is positive (three reductions and one
    small device-to-host copy, cheap on the GPU)."""
    cube = low_res_logits.detach().reshape(low_res_logits.shape[-3:])
    profiles = torch.cat([cube.amax(dim=(1, 2)), cube.amax(dim=(0, 2)), cube.amax(dim=(0, 1))]) > 0
    profiles = profiles.cpu().numpy()
    sizes = np.cumsum([0, *cube.shape])
    bounds = []
    for axis in range(3):
        hit = np.flatnonzero(profiles[sizes[axis]:sizes[axis + 1]])
        if hit.size == 0:
            return None
        bounds.append((hit[0], hit[-1]))
    return np.array(bounds, dtype=np.int64)


def positive_box_on_image(image: sitk.Image, roi: RoiGeometry, low_res_logits: torch.Tensor):
    """The image box that can hold positive voxels of the upsampled logits:
    trilinear interpolation is positive only next to a positive low-res cell, so
    the box of positive cells grown by one cell bounds the mask. Evaluating only
    there keeps the paste-back cost proportional to the object, not the ROI."""
    bounds = positive_cell_bounds(low_res_logits)
    if bounds is None:
        return None
    cell = roi.size / low_res_logits.shape[-1]
    lo, hi = bounds[:, 0] - 1, bounds[:, 1] + 1
    # Cell c's centre sits at ROI voxel (c + 0.5) * cell - 0.5.
    return roi_box_on_image(image, roi, (lo + 0.5) * cell - 0.5, (hi + 0.5) * cell - 0.5)


def logits_on_image(image: sitk.Image, roi: RoiGeometry, low_res_logits: torch.Tensor,
                    box=None) -> torch.Tensor:
    """The ROI's low-res logits evaluated at the image voxel centres of ``box``
    ((start_kji, stop_kji); default ``roi_box_on_image``): float32 (k, j, i) on
    the logits' device, -inf outside the ROI.

    Each value is what the reference pipeline reads at that point of its
    upsampled mask, ``F.interpolate(logits, size^3, trilinear,
    align_corners=False)``, interpolated continuously (no staircase). Done with
    torch rather than SimpleITK so the logits stay on their device (GPU) and the
    border handling matches ``F.interpolate`` exactly.
    """
    logits = low_res_logits.detach().float()
    if logits.dim() == 5 and logits.shape[:2] == (1, 1):
        logits = logits[0, 0]
    if logits.dim() != 3:
        raise ImageError(f"expected low-res logits of shape (s, s, s) or (1, 1, s, s, s), "
                         f"got {tuple(low_res_logits.shape)}")
    box = roi_box_on_image(image, roi) if box is None else box
    if box is None:
        return torch.empty((0, 0, 0), device=logits.device)
    start_kji, stop_kji = (np.asarray(b, dtype=int) for b in box)

    # Image index (i, j, k) -> ROI voxel u = linear @ ijk + offset -> the normalised
    # coordinate 2 (u + 0.5) / size - 1 of grid_sample (align_corners=False). That equals
    # F.interpolate's source position at any low-res size, and "border" padding equals its
    # edge clamping.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    linear = ROI_DIRECTION[:, None] * (direction * np.array(image.GetSpacing())) / roi.spacing
    offset = ROI_DIRECTION * (np.array(image.GetOrigin()) - roi.origin_lps) / roi.spacing
    if logits.device.type == "cpu":
        values = _separable_values(logits, roi.size, linear, offset, start_kji, stop_kji)
        if values is not None:
            return values
    scale = 2.0 / roi.size
    # grid_sample's last axis is (x, y, z) = (tensor axis 2, 1, 0).
    to_grid = torch.tensor((scale * linear)[::-1].copy(), dtype=torch.float32, device=logits.device)
    grid_offset = torch.tensor((scale * (offset + 0.5) - 1)[::-1].copy(), dtype=torch.float32,
                               device=logits.device)

    def axis(n):
        return torch.arange(start_kji[n], stop_kji[n], dtype=torch.float32, device=logits.device)

    i, j = axis(2), axis(1)
    plane = i[None, :, None] * to_grid[:, 0] + j[:, None, None] * to_grid[:, 1] + grid_offset
    slices_per_chunk = max(1, _GRID_SAMPLE_VOXELS_PER_CHUNK // max(1, i.numel() * j.numel()))
    source = logits[None, None]
    chunks = []
    for k_start in range(int(start_kji[0]), int(stop_kji[0]), slices_per_chunk):
        k = torch.arange(k_start, min(k_start + slices_per_chunk, int(stop_kji[0])),
                         dtype=torch.float32, device=logits.device)
        grid = plane[None] + k[:, None, None, None] * to_grid[:, 2]
        values = F.grid_sample(source, grid[None], mode="bilinear", padding_mode="border",
                               align_corners=False)[0, 0]
        inside = (grid.abs() <= 1 + 1e-6).all(dim=-1)
        chunks.append(values.masked_fill(~inside, float("-inf")))
    return torch.cat(chunks, dim=0)


def _separable_values(logits: torch.Tensor, size: int, linear: np.ndarray, offset: np.ndarray,
                      start_kji: np.ndarray, stop_kji: np.ndarray) -> torch.Tensor | None:
    """``logits_on_image``'s values for an image whose axes map one-to-one onto
    the ROI's (a signed permutation, no obliquity; None otherwise): trilinear
    interpolation is then a product of three 1D linear interpolations, i.e.
    three small matrix products (on the CPU 10 x faster than grid_sample; float
    rounding aside the same values, and the same inside test per axis)."""
    big = np.abs(linear) > 1e-9 * np.abs(linear).max()
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    s = logits.shape[0]
    weights, inside, subscripts = [None] * 3, [None] * 3, [None] * 3
    for r in range(3):                                   # ROI (logits) axis r
        component = int(np.flatnonzero(big[r])[0])       # image index component: 0 = i, 1 = j, 2 = k
        dim = 2 - component                              # its array axis in (k, j, i)
        t = np.arange(start_kji[dim], stop_kji[dim], dtype=np.float64)
        n = (2.0 * (linear[r, component] * t + offset[r]) + 1.0) / size - 1.0
        u = np.clip(((n + 1.0) * s - 1.0) / 2.0, 0.0, s - 1.0)
        lo = np.floor(u).astype(np.int64)
        hi = np.minimum(lo + 1, s - 1)
        w = np.zeros((t.size, s), dtype=np.float32)
        rows = np.arange(t.size)
        np.add.at(w, (rows, lo), 1.0 - (u - lo))
        np.add.at(w, (rows, hi), u - lo)
        weights[r] = torch.from_numpy(w)
        inside[dim] = torch.from_numpy(np.abs(n) <= 1.0 + 1e-6)
        subscripts[r] = "kji"[dim]
    expr = f"xyz,{subscripts[0]}x,{subscripts[1]}y,{subscripts[2]}z->kji"
    values = torch.einsum(expr, logits, *weights)
    if all(bool(axis.all()) for axis in inside):        # the usual case: a box inside the ROI
        return values
    within = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return values.masked_fill(~within, float("-inf"))


def logits_to_patch(image: sitk.Image, roi: RoiGeometry, low_res_logits: torch.Tensor,
                    box=None) -> MaskPatch:
    """The predicted mask (logit > 0, i.e. sigmoid > 0.5) on the image's own
    grid over ``box`` (default: the ROI's box); False outside the ROI."""
    box = roi_box_on_image(image, roi) if box is None else box
    if box is None:
        return MaskPatch((0, 0, 0), np.zeros((0, 0, 0), dtype=bool))
    mask = logits_on_image(image, roi, low_res_logits, box) > 0
    return MaskPatch(box[0], mask.cpu().numpy())


def patch_to_full(image: sitk.Image, patch: MaskPatch) -> np.ndarray:
    """The patch as a full (k, j, i) bool mask of the image."""
    full = np.zeros(image.GetSize()[::-1], dtype=bool)
    patch.paste_into(full)
    return full
