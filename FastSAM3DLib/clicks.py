"""Simulated user clicks for evaluation and training.

All functions take 3D arrays (prediction and ground truth; nonzero = inside) in
any axis order and return voxel indices in that same order. Two rules exist:

* ``"reference"``: FastSAM3D / SAM-Med3D evaluation (upstream spec 7.2 step 5,
  7.3): clicks 0 and 1 follow the RITM rule, later clicks are uniform random
  error voxels. Random, driven by the caller's ``np.random.Generator``.
* ``"center"``: deterministic. The first click goes to the deepest voxel of the
  target; every later click to the deepest voxel of the largest error
  component, positive for a miss, negative for a false alarm.

Distances count the array edge as a border (the reference pads with one zero
voxel), and every distance transform is computed on the bounding box of its
mask plus that one-voxel border, which gives exactly the full-array result at
a fraction of the cost on large scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .image import bounding_box

# 6-connectivity (faces only): regions that touch only along an edge or at a
# corner count as separate errors, so the chosen component is one solid region.
ERROR_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class Click:
    index: tuple[int, int, int]     # voxel index, in the axis order of the arrays given
    positive: bool                  # True = "include" (a miss), False = "exclude" (a false alarm)


def dice(a, b) -> float:
    """Evaluation Dice 2|A∩B| / (|A| + |B|) of two masks; NaN when both are empty
    (undefined, as in the reference evaluation, spec 7.2 step 7; averages skip
    it). Training's per-sample tensor version is ``training.losses.batch_dice``
    (1.0 there)."""
    a, b = _as_mask(a), _as_mask(b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    if total == 0:
        return float("nan")
    return 2.0 * np.count_nonzero(a & b) / total


def error_regions(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """(false_negative, false_positive): target voxels missed, and voxels
    predicted outside the target."""
    pred, gt = _as_mask(pred), _as_mask(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and target {gt.shape} must be 3D arrays of one shape")
    return gt & ~pred, pred & ~gt


def ritm_click(pred, gt, rng: np.random.Generator) -> Click | None:
    """The reference RITM rule: a uniform voxel of the inner half-distance core of
    the error kind (miss or false alarm) that reaches deepest."""
    found = _crop_to_objects(pred, gt)
    if found is None:
        return None
    offset, pred_box, gt_box = found
    fn, fp = error_regions(pred_box, gt_box)
    fn_depth, fp_depth = _inner_distance(fn), _inner_distance(fp)
    fn_max, fp_max = fn_depth.max(), fp_depth.max()
    if fn_max == fp_max == 0:
        return None
    depth = fn_depth if fn_max > fp_max else fp_depth
    return _uniform_voxel(depth > max(fn_max, fp_max) / 2.0, fn, offset, rng)


def random_click(pred, gt, rng: np.random.Generator) -> Click | None:
    """The reference random rule: a uniform voxel of the error fn ∪ fp,
    positive when it is a miss."""
    found = _crop_to_objects(pred, gt)
    if found is None:
        return None
    offset, pred_box, gt_box = found
    fn, fp = error_regions(pred_box, gt_box)
    errors = fn | fp
    if not errors.any():
        return None
    return _uniform_voxel(errors, fn, offset, rng)


def center_click(pred, gt, spacing=None) -> Click | None:
    """The deterministic rule.

    Empty prediction: a positive click at the deepest voxel of the target
    (largest distance to its border; in millimetres when ``spacing`` is given,
    in the arrays' axis order). Otherwise: the error is split into connected
    components (6-connectivity) of misses and of false alarms; the largest by
    voxel count is clicked at its deepest voxel, positive for a miss, negative
    for a false alarm. Ties go to the first voxel in C order (for components:
    the one whose first voxel comes first). None when there is no error.
    """
    found = _crop_to_objects(pred, gt)
    if found is None:
        return None
    offset, pred_box, gt_box = found
    if not pred_box.any():
        return Click(_shift(_deepest_voxel(gt_box, spacing), offset), True)
    fn, fp = error_regions(pred_box, gt_box)
    if not (fn.any() or fp.any()):
        return None
    region, positive = _largest_component(fn, fp)
    return Click(_shift(_deepest_voxel(region, spacing), offset), positive)


def reference_rule(click_number: int, pred, gt, rng: np.random.Generator) -> Click | None:
    """The reference schedule: RITM for clicks 0 and 1, random afterwards.
    Distances are in voxels, as in the reference."""
    if click_number < 2:
        return ritm_click(pred, gt, rng)
    return random_click(pred, gt, rng)


def _reference(click_number, pred, gt, rng, spacing):
    return reference_rule(click_number, pred, gt, rng)


def _center(click_number, pred, gt, rng, spacing):
    return center_click(pred, gt, spacing)


# Every rule takes (click_number, pred, gt, rng, spacing) and returns a Click or None.
CLICK_RULES = {"reference": _reference, "center": _center}


def simulate_click(rule_name: str, click_number: int, pred, gt, rng: np.random.Generator,
                   spacing=None) -> Click | None:
    """The next click of rule ``rule_name`` (see CLICK_RULES); None when the
    prediction already equals the target."""
    try:
        rule = CLICK_RULES[rule_name]
    except KeyError:
        raise ValueError(f"unknown click rule {rule_name!r}; choose one of {sorted(CLICK_RULES)}") from None
    return rule(click_number, pred, gt, rng, spacing)


def _as_mask(array) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array != 0


def _crop_to_objects(pred, gt):
    """(box offset, pred, gt) cropped to the box around prediction ∪ target,
    which holds every error; None when both are empty."""
    pred, gt = _as_mask(pred), _as_mask(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and target {gt.shape} must be 3D arrays of one shape")
    box = bounding_box(pred | gt)
    if box is None:
        return None
    return tuple(s.start for s in box), pred[box], gt[box]


def _uniform_voxel(candidates: np.ndarray, fn: np.ndarray, offset, rng: np.random.Generator) -> Click:
    # argwhere lists voxels in C order, which a box crop preserves, so a seed
    # picks the same voxel as it would on the full array.
    voxels = np.argwhere(candidates)
    index = tuple(voxels[rng.integers(len(voxels))])
    return Click(_shift(index, offset), bool(fn[index]))


def _inner_distance(mask: np.ndarray, spacing=None) -> np.ndarray:
    """Distance of every mask voxel to the nearest voxel outside the mask (0
    outside), the array edge counting as outside."""
    depth = np.zeros(mask.shape, dtype=np.float64)
    box = bounding_box(mask)
    if box is None:
        return depth
    # A one-voxel zero border around the tight box holds the nearest outside
    # voxel of every mask voxel, so the cropped transform is exact.
    padded = np.pad(mask[box], 1)
    depth[box] = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth


def _deepest_voxel(mask: np.ndarray, spacing=None) -> tuple[int, ...]:
    depth = _inner_distance(mask, spacing)
    # argmax returns the first maximum in C order
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def _largest_component(fn: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, bool]:
    """The largest connected error component and whether it is a miss."""
    best = None                                 # (-size, first voxel's flat index, labels, id, positive)
    for errors, positive in ((fn, True), (fp, False)):
        labels, count = ndimage.label(errors, structure=ERROR_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        boxes = ndimage.find_objects(labels)
        for component in np.flatnonzero(sizes == sizes.max()):
            box = boxes[component - 1]
            inside = labels[box] == component
            first = np.unravel_index(np.argmax(inside), inside.shape)
            first_flat = np.ravel_multi_index(tuple(f + s.start for f, s in zip(first, box)), labels.shape)
            key = (-int(sizes[component]), int(first_flat))
            if best is None or key < best[:2]:
                best = (*key, labels, component, positive)
    _, _, labels, component, positive = best
    return labels == component, positive


def _shift(index, offset) -> tuple[int, int, int]:
    return tuple(int(i) + int(o) for i, o in zip(index, offset))
