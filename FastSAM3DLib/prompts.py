"""Box, scribble and lasso prompts: their geometry in physical space (LPS mm).

A box is kept as its 8 corners in LPS, so a box drawn axis-aligned in RAS, LPS
or voxel (ijk) axes, or as a rectangle on an oblique slice, is one thing: in a
crop the model gets the bounding box of the corners in crop voxel coordinates
(``PhysicalBox.in_crop``), as two points labelled 2 and 3 (SAM's box encoding,
``training.interaction.box_corners``). A scribble becomes a few clicks evenly
spaced along it; a lasso's filled region gives a box (its extent as a thin
slab) and its deepest interior points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .image import ImageError, _index_to_lps_affine, point_to_lps
from .roi import RoiGeometry

# At most this many clicks from one scribble: the bundled model was trained with up to
# 9 clicks (and a box) per crop, and a pass takes every click inside its crop.
SCRIBBLE_MAX_POINTS = 8
SCRIBBLE_MIN_GAP_MM = 5.0        # resampled scribble points are at least this far apart along it
LASSO_MAX_POINTS = 3             # interior points of one lasso
_LASSO_MAX_CELLS = 256           # the lasso's fill grid has at most this many cells per side


@dataclass(frozen=True)
class PhysicalBox:
    """A box prompt, as points (LPS mm) whose bounding box in a crop's axes is
    the box there: the 8 corners of a box axis-aligned in some frame (world,
    voxel or a slice's) for ``source`` "box"; for "lasso" the lasso's outline
    on its plane, at both faces of its slab."""
    corners_lps: tuple[tuple[float, float, float], ...]
    source: str = "box"

    @property
    def bounds_lps(self) -> np.ndarray:
        """(2, 3) LPS min/max of the corners."""
        corners = np.asarray(self.corners_lps)
        return np.stack([corners.min(0), corners.max(0)])

    @property
    def center_lps(self) -> np.ndarray:
        return np.asarray(self.corners_lps).mean(0)

    def in_crop(self, roi: RoiGeometry) -> np.ndarray | None:
        """(2, 3) lowest and highest crop voxel coordinate of the corners per
        crop axis, clamped to the crop's voxel centres; None if the box misses the crop."""
        voxels = roi.lps_to_voxel(np.asarray(self.corners_lps))
        low, high = voxels.min(0), voxels.max(0)
        if np.any(high < -0.5) or np.any(low > roi.size - 0.5):
            return None
        return np.clip(np.stack([low, high]), 0, roi.size - 1)


def _unit(vector, what: str) -> np.ndarray:
    v = np.asarray(vector, dtype=float)
    norm = np.linalg.norm(v) if v.shape == (3,) and np.all(np.isfinite(v)) else 0.0
    if norm < 1e-9:
        raise ImageError(f"{what} needs a nonzero 3D direction, got {vector!r}")
    return v / norm


def direction_to_lps(image: sitk.Image, vector, space: str) -> np.ndarray:
    """A direction (3,) in "ras", "lps" or "ijk" -> a unit LPS direction."""
    v = _unit(vector, "a slice axis")
    return _unit(point_to_lps(image, v, space) - point_to_lps(image, np.zeros(3), space), "a slice axis")


def slice_frame(image: sitk.Image, slice_axes, space: str) -> np.ndarray:
    """(3, 3) rows u, v, n: the slice's in-plane axes (v made orthogonal to u)
    and its normal u x v, unit LPS vectors."""
    if slice_axes is None or len(slice_axes) != 2:
        raise ImageError(f"slice_axes must be two in-plane directions (u, v), got {slice_axes!r}")
    u = direction_to_lps(image, slice_axes[0], space)
    v = direction_to_lps(image, slice_axes[1], space)
    v = v - (v @ u) * u
    if np.linalg.norm(v) < 1e-6:
        raise ImageError("the two slice axes are parallel: give two in-plane directions of the slice")
    v = v / np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)])


def slice_thickness_mm(image: sitk.Image, normal_lps) -> float:
    """The thickness of one slice of the scan along ``normal_lps``: the step
    along it that moves one voxel along the scan axis it crosses fastest."""
    linear, _ = _index_to_lps_affine(image)
    return float(1.0 / np.abs(np.linalg.solve(linear, _unit(normal_lps, "a slice normal"))).max())


def slab_corners(centre, frame: np.ndarray, low_uv, high_uv, thickness_mm: float) -> np.ndarray:
    """(8, 3) LPS corners of the slab [low_uv, high_uv] (in-plane coordinates
    relative to ``centre``) x [-thickness/2, thickness/2] along the normal."""
    half = thickness_mm / 2
    grid = np.stack(np.meshgrid((low_uv[0], high_uv[0]), (low_uv[1], high_uv[1]), (-half, half),
                                indexing="ij"), axis=-1).reshape(-1, 3)
    return np.asarray(centre, dtype=float) + grid @ frame


def check_thickness_mm(thickness_mm) -> float:
    try:
        value = float(thickness_mm)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ImageError(f"a slab thickness must be a positive number of mm, got {thickness_mm!r}")
    return value


def box_corners_lps(image: sitk.Image, corner_a, corner_b, space: str = "ras", slice_axes=None,
                    thickness_mm=None) -> np.ndarray:
    """(8, 3) LPS corners of the box with opposite corners a and b given in
    ``space``: without ``slice_axes`` the box is axis-aligned in that space's
    axes (RAS/LPS world axes, or the scan's voxel axes for "ijk"); with
    ``slice_axes`` = (u, v), a rectangle on that slice extruded by
    ``thickness_mm`` (default: one slice of the scan, ``slice_thickness_mm``)
    about the corners' plane, along u x v."""
    a, b = np.asarray(corner_a, dtype=float), np.asarray(corner_b, dtype=float)
    for corner in (a, b):
        if corner.shape != (3,) or not np.all(np.isfinite(corner)):
            raise ImageError(f"a box corner needs 3 finite coordinates, got {corner.tolist()!r}")
    if slice_axes is None:
        in_space = np.stack(np.meshgrid(*zip(a, b), indexing="ij"), axis=-1).reshape(-1, 3)
        corners = np.array([point_to_lps(image, c, space) for c in in_space])
        if np.all(np.ptp(corners, axis=0) < 1e-6):
            raise ImageError("a box needs two different corners; both are "
                             f"{np.round(a, 2).tolist()} ({space})")
        return corners
    frame = slice_frame(image, slice_axes, space)
    a_lps, b_lps = point_to_lps(image, a, space), point_to_lps(image, b, space)
    thickness = slice_thickness_mm(image, frame[2]) if thickness_mm is None else check_thickness_mm(thickness_mm)
    off_plane = abs(float((b_lps - a_lps) @ frame[2]))
    if off_plane > max(thickness / 2, 1e-3):
        raise ImageError(f"the corners of a slice rectangle must lie on one slice; they are {off_plane:.2f} mm "
                         "apart along its normal")
    centre = (a_lps + b_lps) / 2
    half = np.abs((b_lps - a_lps) @ frame[:2].T) / 2
    if np.all(half < 1e-6):
        raise ImageError("a slice rectangle needs two different corners")
    return slab_corners(centre, frame, -half, half, thickness)


def points_to_lps(image: sitk.Image, points, space: str, what: str) -> np.ndarray:
    array = np.asarray(points, dtype=float) if np.ndim(points) == 2 else np.empty((0, 0))
    if array.ndim != 2 or array.shape[1:] != (3,) or len(array) == 0 or not np.all(np.isfinite(array)):
        raise ImageError(f"a {what} needs a list of 3D points [[x, y, z], ...]")
    return np.array([point_to_lps(image, p, space) for p in array])


def resample_polyline(points_lps, max_points: int = SCRIBBLE_MAX_POINTS,
                      min_gap_mm: float = SCRIBBLE_MIN_GAP_MM) -> np.ndarray:
    """Points evenly spaced by arc length along the polyline, both ends
    included: as many as fit ``min_gap_mm`` apart, at most ``max_points``;
    a polyline shorter than the gap gives its arc-length midpoint."""
    points = np.asarray(points_lps, dtype=float)
    if int(max_points) != max_points or not 1 <= max_points <= SCRIBBLE_MAX_POINTS:
        raise ImageError(f"a scribble's max_points must be a whole number from 1 to {SCRIBBLE_MAX_POINTS}, "
                         f"got {max_points!r}")
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    length = along[-1]
    count = int(min(max_points, np.floor(length / min_gap_mm + 1e-9) + 1))
    wanted = np.array([length / 2]) if count == 1 else np.linspace(0.0, length, count)
    keep = np.concatenate([[True], steps > 0])                # repeated points add no length
    return np.stack([np.interp(wanted, along[keep], points[keep, axis]) for axis in range(3)], axis=1)


def _inside_polygon(polygon: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Even-odd rule: whether each point (..., 2) lies inside the closed polygon (n, 2)."""
    x, y = xy[..., 0][..., None], xy[..., 1][..., None]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (np.count_nonzero(crosses & (x < at), axis=-1) % 2) == 1


@dataclass(frozen=True)
class LassoRegion:
    """A lasso's filled region on its plane: ``frame`` rows u, v, n (LPS), its
    outline projected onto the plane and its deepest interior points (LPS)."""
    frame: np.ndarray
    outline_lps: np.ndarray
    interior_lps: np.ndarray

    def slab_lps(self, thickness_mm: float) -> np.ndarray:
        """The outline at both faces of a slab of ``thickness_mm`` about the plane."""
        shift = thickness_mm / 2 * self.frame[2]
        return np.concatenate([self.outline_lps - shift, self.outline_lps + shift])


def lasso_region(points_lps, frame: np.ndarray | None = None, cell_mm: float = 1.0,
                 max_points: int = LASSO_MAX_POINTS) -> LassoRegion:
    """The region a closed curve encloses, on the plane ``frame`` (rows u, v,
    n) through the curve's mean, or without a frame its best-fit plane; the
    curve is projected onto it. The interior points are deep cells of the
    filled polygon (distance transform on a grid of ``cell_mm``): the deepest,
    then, among the cells at least 3/4 as deep, the one farthest from those
    chosen while that is farther than the deepest one's depth, up to ``max_points``."""
    points = np.asarray(points_lps, dtype=float)
    if len(points) < 3:
        raise ImageError("a lasso needs at least 3 points (a closed curve)")
    centre = points.mean(0)
    if frame is None:
        _, _, axes = np.linalg.svd(points - centre)
        frame = np.stack([axes[0], axes[1], np.cross(axes[0], axes[1])])
    polygon = (points - centre) @ frame[:2].T
    low, high = polygon.min(0), polygon.max(0)
    if np.any(high - low < 1e-6) or abs(_signed_area(polygon)) < 1e-6:
        raise ImageError("a lasso must enclose an area (its points lie on a line)")
    cell = max(cell_mm, float((high - low).max()) / _LASSO_MAX_CELLS)
    shape = np.ceil((high - low) / cell).astype(int) + 1
    # Cell centres on a grid centred on the extent.
    origin = (low + high) / 2 - (shape - 1) / 2 * cell
    centres = origin + np.stack(np.indices(shape), axis=-1) * cell
    filled = _inside_polygon(polygon, centres)
    if not filled.any():
        raise ImageError("a lasso must enclose an area (its region is thinner than one voxel)")
    depth = ndimage.distance_transform_edt(np.pad(filled, 1))[1:-1, 1:-1]
    # The deepest cell, then the deep cells (at least 3/4 as deep) farthest from those chosen,
    # while farther than the deepest cell's depth: points spread over the region's core.
    deepest = float(depth.max())
    candidates = np.argwhere(depth >= 0.75 * deepest)
    chosen = [int(np.argmax(depth[tuple(candidates.T)]))]
    nearest = np.linalg.norm(candidates - candidates[chosen[0]], axis=1)
    while len(chosen) < max_points and nearest.max() > deepest:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.linalg.norm(candidates - candidates[chosen[-1]], axis=1))
    interior = centre + centres[tuple(candidates[chosen].T)] @ frame[:2]
    return LassoRegion(frame, centre + polygon @ frame[:2], interior)


def _signed_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)
