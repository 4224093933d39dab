"""Click-simulation evaluation: how every model of the project is judged.

For each case and target (one label id), clicks are simulated by a named rule
(``clicks.py``) against the ground truth on the image's own grid; the method
under test answers each click and the Dice after every click is recorded.
Three things are reported side by side, so a number is never read alone:

* ``model``: the engine (``Engine.new_session`` / ``add_click`` / ``mask``),
  with each prompt's click-to-mask time and encoder runs (``MaskUpdate``);
* ``sphere``: the trivial baseline (``SphereBaseline``): a 12 mm ball around
  every positive click, a 6 mm hole at every negative one, in physical mm on
  the image's grid, driven by the same click rule against its own previous
  prediction;
* the resolution ceiling (``resolution_ceiling``): the Dice that PERFECT
  low-res logits reach once the engine upsamples them, i.e. what the decoder's
  32^3 output grid allows at a given crop spacing, whatever the model learns.

Targets are grouped by the quality of their labels (manual vs model-made, from
the manifest's ``label_quality``), and work is spread over processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from .atomic import atomic_output_path
from .clicks import dice, simulate_click
from .image import ImageError, _index_to_lps_affine, load_image, lps_to_continuous_index, point_to_lps
from .roi import ROI_DIRECTION, RoiGeometry, logits_to_patch, patch_to_full, roi_for_point

REPORTED_CLICKS = (1, 3, 5, 10)
METHODS = ("model", "sphere")
QUALITY_GROUPS = ("manual", "model", "unknown")
POSITIVE_RADIUS_MM = 12.0
NEGATIVE_RADIUS_MM = 6.0
LOWERED_BY = 0.005                  # a click that lowers the Dice by more than this undid earlier work
FIT_MIN_SPACING_MM = 0.5            # finest crop spacing the "fit" ceiling may choose
FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    case: str
    label: int
    name: str
    quality: str                    # "manual", "model" (made by a network/pipeline) or "unknown"
    voxels: int


def quality_group(label_quality: str | None) -> str:
    """The manifest's free-text ``label_quality`` ("manual", "manual (clinical
    contours)", "model", "automatic (FreeSurfer)", ...) as a report group."""
    text = (label_quality or "").strip().lower()
    if text.startswith("manual"):
        return "manual"
    if text.startswith(("model", "automatic")):
        return "model"
    return "unknown"


def manifest_label_quality(manifest) -> dict[str, str]:
    """case name -> quality group, from a MANIFEST.json's ``label_quality`` fields."""
    try:
        entries = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the manifest {manifest}: {exc}") from None
    return {str(e["case"]): quality_group(e.get("label_quality")) for e in entries
            if isinstance(e, dict) and "case" in e}


def parse_ids(text: str) -> list[int]:
    """'37,38,71-78' -> [37, 38, 71, ..., 78]."""
    ids = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"'{text}' is not a list of label ids (write e.g. 37,38,71-78)") from None
    return ids


def parse_subset(text: str) -> tuple[str, str, list[int]]:
    """'deep_grey=mri_brain_aal_colin27:37,38,71-78' -> (name, case, ids)."""
    name, sep, rest = text.partition("=")
    case, sep2, ids = rest.partition(":")
    if not (sep and sep2 and name and case and ids):
        raise ValueError(f"'{text}' is not a subset: write NAME=CASE:IDS, e.g. "
                         "deep_grey=mri_brain_aal_colin27:37,38,71-78")
    return name, case, parse_ids(ids)


def load_label(path, image: sitk.Image) -> np.ndarray:
    """Integer label array (k, j, i) on exactly the image's grid."""
    try:
        label = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ImageError(f"cannot read label file {path}") from None
    same_grid = (label.GetSize() == image.GetSize()
                 and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
                 and np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-4)
                 and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4))
    if not same_grid:
        raise ImageError(f"label {Path(path).name} is not on the image's voxel grid")
    return sitk.GetArrayFromImage(label).astype(np.int64)


def select_targets(case, label_array: np.ndarray, quality: str, min_voxels: int,
                   labels: list[int] | None = None, keep_first: list[int] = (),
                   max_targets: int | None = None) -> list[Target]:
    """The case's targets: label ids (all nonzero, or ``labels``) with at least
    ``min_voxels`` voxels. ``max_targets`` (the fast mode) keeps the ids of
    ``keep_first`` and then ids evenly spread over the rest in id order."""
    counts = np.bincount(label_array[label_array > 0].ravel()) if label_array.max() > 0 else np.zeros(1)
    ids = [i for i in (labels or range(1, len(counts))) if 0 < i < len(counts) and counts[i] >= min_voxels]
    if max_targets is not None and len(ids) > max_targets:
        first = [i for i in ids if i in set(keep_first)][:max_targets]
        rest = [i for i in ids if i not in set(first)]
        room = max_targets - len(first)
        spread = [rest[n] for n in np.unique(np.linspace(0, len(rest) - 1, room).round().astype(int))] \
            if room > 0 and rest else []
        ids = sorted(first + spread)
    names = getattr(case, "label_names", None) or {}
    return [Target(case.name, int(i), str(names.get(i, "")), quality, int(counts[i])) for i in ids]


# ----------------------------------------------------------------------------- methods


class ModelMethod:
    """The engine, through its public session API. Each target gets its own
    image object: sessions of one image share cached ROIs (a new object's first
    click reuses an embedded region), which would make a target's result depend
    on the targets evaluated before it in the same process."""

    def __init__(self, engine, image: sitk.Image):
        self.session = engine.new_session(sitk.Image(image))

    def add_click(self, index_kji, positive: bool):
        k, j, i = index_kji
        return self.session.add_click((i, j, k), positive=positive, space="ijk")

    def add_box(self, box_lps):
        return self.session.add_box(box_lps[0], box_lps[1], space="lps")

    def mask(self) -> np.ndarray:
        return self.session.mask()


class SphereBaseline:
    """The trivial baseline: each positive click paints a ball of
    ``positive_radius_mm`` around it, each negative click erases a ball of
    ``negative_radius_mm``, in click order. Balls are measured in physical mm
    between voxel centres (spacing and direction of the image), so they are
    round on anisotropic, flipped or oblique grids."""

    def __init__(self, image: sitk.Image, positive_radius_mm: float = POSITIVE_RADIUS_MM,
                 negative_radius_mm: float = NEGATIVE_RADIUS_MM):
        self.shape = tuple(image.GetSize()[::-1])
        self._index_to_mm, self._origin = _index_to_lps_affine(image)     # (i, j, k) -> LPS mm
        self._mm_to_index = np.linalg.inv(self._index_to_mm)
        self.positive_radius_mm = positive_radius_mm
        self.negative_radius_mm = negative_radius_mm
        self._mask = np.zeros(self.shape, dtype=bool)

    def ball(self, index_kji, radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """(slices, bool block) of the voxels within ``radius_mm`` of the voxel ``index_kji``."""
        centre = np.asarray(index_kji, dtype=int)
        # |index offset| along axis a <= radius * |row a of the mm->index matrix|.
        reach_ijk = np.floor(radius_mm * np.linalg.norm(self._mm_to_index, axis=1) + 1e-9).astype(int)
        reach = reach_ijk[::-1]
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, self.shape)
        offsets = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)],
                                       indexing="ij"), axis=-1)          # (k, j, i) offsets
        mm = offsets[..., ::-1] @ self._index_to_mm.T
        block = np.einsum("...d,...d->...", mm, mm) <= radius_mm ** 2 * (1 + 1e-9)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), block

    def add_click(self, index_kji, positive: bool) -> None:
        slices, block = self.ball(index_kji, self.positive_radius_mm if positive else self.negative_radius_mm)
        if positive:
            self._mask[slices] |= block
        else:
            self._mask[slices] &= ~block

    def add_box(self, box_lps) -> None:
        """A box prompt paints the ellipsoid inscribed in the (LPS axis-aligned) box."""
        low, high = np.asarray(box_lps, dtype=float)
        centre, half = (low + high) / 2, np.maximum((high - low) / 2, 1e-6)
        origin = self._origin
        corners = np.stack(np.meshgrid(*zip(low, high), indexing="ij"), -1).reshape(-1, 3)
        index = (corners - origin) @ self._mm_to_index.T                   # (i, j, k)
        lo = np.maximum(np.floor(index.min(0)).astype(int), 0)
        hi = np.minimum(np.ceil(index.max(0)).astype(int) + 1, self.shape[::-1])
        i, j = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="xy")
        for k in range(lo[2], hi[2]):
            lps = np.stack([i, j, np.full_like(i, k)], -1) @ self._index_to_mm.T + origin
            self._mask[k, lo[1]:hi[1], lo[0]:hi[0]] |= (((lps - centre) / half) ** 2).sum(-1) <= 1

    def mask(self) -> np.ndarray:
        return self._mask.copy()


# ----------------------------------------------------------------------------- clicks


@dataclass
class Run:
    """One method on one target with one seed of the click rule."""
    method: str
    seed: int
    dice: list[float]                            # after prompt 1, 2, ... (with a box first: the box, then clicks)
    clicks: list[tuple[tuple[int, int, int], bool]] = field(default_factory=list)   # (k, j, i), positive
    obeyed: list[bool] = field(default_factory=list)   # after each click, its voxel has the click's label
    box_lps: list[list[float]] | None = None     # the first prompt's box (LPS min, max corners)
    # The model's answer to each prompt it was given (the baseline has none): the session's
    # click-to-mask time and the crops it embedded (MaskUpdate.timings["total"], .encoder_runs).
    prompt_ms: list[float] = field(default_factory=list)
    encoder_runs: list[int] = field(default_factory=list)

    def record(self, update) -> None:
        if update is not None:
            self.prompt_ms.append(update.timings["total"] * 1000)
            self.encoder_runs.append(update.encoder_runs)

    def dice_at(self, n: int) -> float:
        if not self.dice:
            return math.nan
        return self.dice[min(n, len(self.dice)) - 1]


def target_box_lps(image: sitk.Image, gt: np.ndarray, jitter: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """(2, 3) LPS min and max corners of the target's voxel centres (world axes,
    as training's crop boxes), each coordinate moved by up to ``jitter`` of the
    box's extent along it (uniform; a user's box is not exact)."""
    lps = _voxel_lps(image, gt)
    box = np.stack([lps.min(0), lps.max(0)])
    if jitter:
        box = box + jitter * (box[1] - box[0]) * rng.uniform(-1, 1, size=(2, 3))
    return np.sort(box, axis=0)


def simulate(method, image: sitk.Image, gt: np.ndarray, rule: str, n_clicks: int, seed: int,
             name: str = "", first_prompt: str = "click", box_jitter: float = 0.0) -> Run:
    """``n_clicks`` prompts against the method's own previous mask: clicks of
    ``rule``, or with ``first_prompt`` "box" the target's box (``target_box_lps``)
    and then ``n_clicks`` - 1 clicks (numbered from the first click)."""
    rng = np.random.default_rng(seed)
    spacing_kji = np.array(image.GetSpacing())[::-1]
    run = Run(name, seed, [])
    pred = np.zeros_like(gt, dtype=bool)
    first_click = 0
    if first_prompt == "box":
        box = target_box_lps(image, gt, box_jitter, rng)
        run.record(method.add_box(box))
        pred = method.mask()
        run.box_lps = box.tolist()
        run.dice.append(dice(pred, gt))
        first_click = 1
    for n in range(first_click, n_clicks):
        click = simulate_click(rule, n - first_click, pred, gt, rng, spacing_kji)
        if click is None:                       # nothing left to correct
            run.dice.append(run.dice[-1] if run.dice else dice(pred, gt))
            continue
        run.record(method.add_click(click.index, click.positive))
        pred = method.mask()
        run.clicks.append((tuple(int(v) for v in click.index), bool(click.positive)))
        run.obeyed.append(bool(pred[tuple(click.index)] == click.positive))
        run.dice.append(dice(pred, gt))
    return run


# ----------------------------------------------------------------------------- ceiling


class SignedDistance:
    """The signed distance (mm, > 0 inside) of a voxel mask at any LPS point,
    with the zero level halfway between inside and outside voxel centres:
    (distance to the nearest outside centre - distance to the nearest inside
    centre) / 2. Beyond the image counts as outside.

    A point's nearest voxel centre of a set is the centre of the voxel it lies
    in when that voxel is in the set; otherwise it is a voxel of the set with a
    face neighbour outside it (a step toward the point would be closer), so
    two k-d trees over the two border layers give exact distances."""

    def __init__(self, image: sitk.Image, mask_kji: np.ndarray):
        self.image = image
        self.mask = np.asarray(mask_kji, dtype=bool)
        if not self.mask.any():
            raise ValueError("the signed distance needs a non-empty mask")
        self._linear, self._origin = _index_to_lps_affine(image)
        # The mask's box with a one-voxel border (beyond the image: outside) holds both layers.
        box = ndimage.find_objects(self.mask.astype(np.uint8))[0]
        start = np.array([b.start for b in box]) - 1
        padded = np.pad(self.mask[box], 1)
        inner = padded & ~ndimage.binary_erosion(padded, FACE_NEIGHBOURS, border_value=0)
        outer = ndimage.binary_dilation(padded, FACE_NEIGHBOURS) & ~padded
        self._inside = cKDTree(self._lps_of(np.argwhere(inner) + start))
        self._outside = cKDTree(self._lps_of(np.argwhere(outer) + start))

    def _lps_of(self, index_kji: np.ndarray) -> np.ndarray:
        return index_kji[:, ::-1] @ self._linear.T + self._origin

    def __call__(self, points_lps) -> np.ndarray:
        points = np.asarray(points_lps, dtype=float).reshape(-1, 3)
        index = lps_to_continuous_index(self.image, points)
        nearest = np.rint(index).astype(int)
        size = np.array(self.image.GetSize())
        in_image = np.all((nearest >= 0) & (nearest < size), axis=1)
        inside = np.zeros(len(points), dtype=bool)
        i, j, k = nearest[in_image].T
        inside[in_image] = self.mask[k, j, i]
        own = np.linalg.norm((index - nearest) @ self._linear.T, axis=1)
        to_inside = np.where(inside, own, self._inside.query(points)[0])
        to_outside = np.where(inside, self._outside.query(points)[0], own)
        return ((to_outside - to_inside) / 2).reshape(np.shape(points_lps)[:-1])


def low_res_cell_centres(roi: RoiGeometry, low_res_size: int) -> np.ndarray:
    """LPS centres (s, s, s, 3) of the decoder's low-res cells of ``roi`` (the
    positions ``F.interpolate(..., align_corners=False)`` reads them at)."""
    cell = roi.size / low_res_size
    centres = (np.arange(low_res_size) + 0.5) * cell - 0.5
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)
    return roi.voxel_to_lps(grid.reshape(-1, 3)).reshape(low_res_size, low_res_size, low_res_size, 3)


def perfect_logits(distance: SignedDistance, roi: RoiGeometry, low_res_size: int) -> torch.Tensor:
    """The target's signed distance on the ROI's low-res grid: the best logits
    the decoder could output, (s, s, s) float32 in the ROI's tensor-axis order."""
    return torch.from_numpy(distance(low_res_cell_centres(roi, low_res_size)).astype(np.float32))


def crop_coverage(image: sitk.Image, gt: np.ndarray, roi: RoiGeometry) -> float:
    """Share of the target's voxel centres inside the ROI (its border included,
    with the paste-back's rounding tolerance)."""
    voxels = roi.lps_to_voxel(_voxel_lps(image, gt))
    tolerance = 1e-4
    return float(np.all((voxels >= -0.5 - tolerance) & (voxels <= roi.size - 0.5 + tolerance), axis=1).mean())


def resolution_ceiling(image: sitk.Image, gt: np.ndarray, roi: RoiGeometry, low_res_size: int,
                       distance: SignedDistance | None = None) -> float:
    """Dice of the perfect low-res logits after the engine's own upsampling
    and paste-back (``roi.logits_to_patch``: trilinear to the ROI, evaluated
    at the image's voxel centres) and thresholding at 0."""
    distance = SignedDistance(image, gt) if distance is None else distance
    patch = logits_to_patch(image, roi, perfect_logits(distance, roi, low_res_size))
    return dice(patch_to_full(image, patch), gt)


def fit_spacing(image: sitk.Image, gt: np.ndarray, centre_lps, size: int, low_res_size: int,
                finest: float, coarsest: float) -> float:
    """The finest crop spacing in [finest, coarsest] whose ROI centred at
    ``centre_lps`` holds every target voxel centre at least one low-res cell
    from its border (a zoom policy's best single crop); ``coarsest`` when none does."""
    offsets = np.abs((_voxel_lps(image, gt) - np.asarray(centre_lps)) * ROI_DIRECTION).max()
    room = size / 2 - size / low_res_size                   # ROI voxels from centre to the last full cell
    return float(np.clip(offsets / room, finest, coarsest))


def _voxel_lps(image: sitk.Image, mask_kji: np.ndarray) -> np.ndarray:
    linear, origin = _index_to_lps_affine(image)
    return np.argwhere(mask_kji)[:, ::-1] @ linear.T + origin


@dataclass
class Ceiling:
    setting: str                    # "1.5" (a fixed spacing, mm) or "fit"
    spacing_mm: float
    dice: float
    coverage: float                 # share of the target inside the single crop (< 1: the crop is too small)


def parse_ceiling_settings(text: str) -> list[str]:
    settings = [s.strip() for s in text.split(",") if s.strip()]
    for s in settings:
        if s != "fit":
            try:
                if not float(s) > 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"ceiling spacing '{s}' is neither a positive number of mm nor 'fit'") from None
    if not settings:
        raise ValueError("--ceiling needs spacings, e.g. 1.5,fit")
    return settings


def ceilings_for_target(image: sitk.Image, gt: np.ndarray, settings: list[str], size: int,
                        low_res_size: int, engine_spacing: float) -> list[Ceiling]:
    """The ceiling at each setting, with one crop placed where the engine puts
    the first ROI for the first click of the centre rule (the deepest target
    voxel): at a spacing in mm, the ROI policy's first crop at that spacing;
    "fit": a crop centred on that click at the spacing of ``fit_spacing``
    between ``FIT_MIN_SPACING_MM`` and the engine's spacing (standing for the
    zoom's crop, which the engine centres on the object's box)."""
    from .session import RoiPolicy
    first = simulate_click("center", 0, np.zeros_like(gt), gt, np.random.default_rng(0),
                           np.array(image.GetSpacing())[::-1])
    k, j, i = first.index
    centre = point_to_lps(image, (i, j, k), "ijk")
    distance = SignedDistance(image, gt)
    results = []
    for setting in settings:
        if setting == "fit":
            spacing = fit_spacing(image, gt, centre, size, low_res_size, FIT_MIN_SPACING_MM, engine_spacing)
            roi = roi_for_point(centre, size=size, spacing=spacing)
        else:
            spacing = float(setting)
            roi = RoiPolicy(size, spacing).first_crop(centre)
        results.append(Ceiling(setting, spacing, resolution_ceiling(image, gt, roi, low_res_size, distance),
                               crop_coverage(image, gt, roi)))
    return results


# ----------------------------------------------------------------------------- running


@dataclass
class Settings:
    """What to run on every target (picklable: sent to worker processes)."""
    model: str = "default"
    device: str = "auto"
    rule: str = "center"
    clicks: int = 10
    seeds: tuple[int, ...] = (2023,)
    baseline: str | None = "sphere"
    ceiling: tuple[str, ...] = ()
    threads: int = 1
    spacing: str | float | None = None          # crop spacing: auto, fixed, mm (None: the model's default)
    first_prompt: str = "click"                 # "box": the target's box, then clicks
    box_jitter: float = 0.0                     # of the box's extent, per corner coordinate


@dataclass
class TargetResult:
    target: Target
    runs: list[Run]
    ceilings: list[Ceiling]
    seconds: float

    def runs_of(self, method: str) -> list[Run]:
        return [r for r in self.runs if r.method == method]


class Evaluator:
    """One process's engine and loaded cases."""

    CACHED_CASES = 2

    def __init__(self, settings: Settings, engine=None):
        from .session import Engine
        self.settings = settings
        self.engine = engine if engine is not None else Engine(
            model=settings.model, device=settings.device, spacing=settings.spacing)
        self._cases: dict[str, tuple[sitk.Image, np.ndarray]] = {}

    def case_data(self, case) -> tuple[sitk.Image, np.ndarray]:
        if case.name not in self._cases:
            image = self.engine.prepare_image(load_image(case.image))
            self._cases[case.name] = (image, load_label(case.label, image))
            while len(self._cases) > self.CACHED_CASES:
                self._cases.pop(next(iter(self._cases)))
        return self._cases[case.name]

    def __call__(self, case, target: Target) -> TargetResult:
        started = time.perf_counter()
        s = self.settings
        image, label = self.case_data(case)
        gt = label == target.label
        runs = []
        for seed in s.seeds:
            prompts = {"first_prompt": s.first_prompt, "box_jitter": s.box_jitter}
            runs.append(simulate(ModelMethod(self.engine, image), image, gt, s.rule, s.clicks, seed, "model",
                                 **prompts))
            if s.baseline == "sphere":
                runs.append(simulate(SphereBaseline(image), image, gt, s.rule, s.clicks, seed, "sphere",
                                     **prompts))
        ceilings = ceilings_for_target(image, gt, list(s.ceiling), self.engine.roi_size,
                                       self.engine.model.low_res_size, self.engine.spacing_mm) \
            if s.ceiling else []
        return TargetResult(target, runs, ceilings, time.perf_counter() - started)


_WORKER: dict = {}


def _start_worker(settings: Settings) -> None:
    torch.set_num_threads(settings.threads)
    _WORKER["settings"] = settings


def _work(case, target: Target) -> TargetResult:
    # Built by the first task rather than the initializer, so a bad model
    # reaches the caller as its own one-line error, not as a broken pool.
    if "evaluator" not in _WORKER:
        _WORKER["evaluator"] = Evaluator(_WORKER["settings"])
    return _WORKER["evaluator"](case, target)


def threads_per_job(jobs: int) -> int:
    """Torch threads per worker process: the machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_targets(tasks, settings: Settings, jobs: int = 1, engine=None, progress=None) -> list[TargetResult]:
    """Evaluate ``tasks`` ((case, Target) pairs); results in task order.
    ``jobs`` > 1: that many worker processes (spawned: safe with CUDA), each
    with its own engine and ``settings.threads`` torch threads."""
    tasks = list(tasks)
    if jobs <= 1:
        evaluator = Evaluator(settings, engine)
        results = []
        for case, target in tasks:
            results.append(evaluator(case, target))
            if progress is not None:
                progress(results[-1])
        return results
    results: list[TargetResult | None] = [None] * len(tasks)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                               initializer=_start_worker, initargs=(settings,))
    try:
        futures = {pool.submit(_work, case, target): n for n, (case, target) in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(results[futures[future]])
    finally:
        pool.shutdown(cancel_futures=True)      # a failure stops the queued targets too
    return results


# ----------------------------------------------------------------------------- report


def reported_clicks(n_clicks: int) -> list[int]:
    """The Dice@k columns of a run of ``n_clicks``: the standard ones up to it, and k = n_clicks."""
    ks = [k for k in REPORTED_CLICKS if k <= n_clicks]
    return ks if n_clicks in ks or n_clicks > REPORTED_CLICKS[-1] else ks + [n_clicks]


def _mean_over_seeds(results: list[TargetResult], method: str, k: int) -> tuple[float, float]:
    """(mean, spread) of the targets' mean Dice@k: spread = standard deviation over seeds (0 for one)."""
    seeds = sorted({r.seed for t in results for r in t.runs_of(method)})
    per_seed = [float(np.mean([r.dice_at(k) for t in results for r in t.runs_of(method) if r.seed == seed]))
                for seed in seeds]
    if not per_seed:
        return math.nan, math.nan
    return float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0


def click_response(results: list[TargetResult], method: str) -> dict:
    """How ``method`` answers corrective clicks (every click after the first
    prompt), for positive and negative clicks apart: the mean Dice change and
    the share of clicks obeyed (their voxel has their label afterwards); and the
    share of clicks that lowered the Dice by more than ``LOWERED_BY``."""
    gains = {True: [], False: []}
    obeyed = {True: [], False: []}
    for t in results:
        for run in t.runs_of(method):
            # Dice i answers prompt i; a box first shifts the clicks by one. A run stops
            # clicking only once nothing is left to correct, so its clicks come first.
            offset = 1 if run.box_lps is not None else 0
            for n, (_, positive) in enumerate(run.clicks):
                d = n + offset
                if d > 0 and math.isfinite(run.dice[d]) and math.isfinite(run.dice[d - 1]):
                    gains[positive].append(run.dice[d] - run.dice[d - 1])
                    if n < len(run.obeyed):
                        obeyed[positive].append(run.obeyed[n])

    def mean(values) -> float:
        return float(np.mean(values)) if values else math.nan

    every = gains[True] + gains[False]
    return {**{sign: {"clicks": len(gains[positive]), "mean_gain": mean(gains[positive]),
                      "obeyed_share": mean(obeyed[positive])}
               for sign, positive in (("positive", True), ("negative", False))},
            "lowered_share": mean([g < -LOWERED_BY for g in every])}


def _group(name: str, results: list[TargetResult], ks: list[int]) -> dict:
    methods = [m for m in METHODS if any(t.runs_of(m) for t in results)]
    group = {"group": name, "targets": len(results),
             **{m: {f"dice@{k}": dict(zip(("mean", "spread"), _mean_over_seeds(results, m, k))) for k in ks}
                for m in methods},
             "click_response": {m: click_response(results, m) for m in methods}}
    settings = [c.setting for c in results[0].ceilings] if results else []
    if settings:
        group["ceiling"] = {s: {"dice": float(np.mean([t.ceilings[n].dice for t in results])),
                                "spacing_mm": float(np.mean([t.ceilings[n].spacing_mm for t in results])),
                                "targets_larger_than_crop": int(sum(t.ceilings[n].coverage < 1 for t in results))}
                            for n, s in enumerate(settings)}
    return group


def summarise(results: list[TargetResult], n_clicks: int, subsets=()) -> dict:
    """Group means: per label quality (all cases, then each case) and per named
    subset ((name, case, ids)); and one row per target."""
    ks = reported_clicks(n_clicks)
    groups = []
    for quality in QUALITY_GROUPS:
        members = [t for t in results if t.target.quality == quality]
        if not members:
            continue
        groups.append({**_group(f"{quality}-label targets", members, ks), "level": 0})
        for case in dict.fromkeys(t.target.case for t in members):
            groups.append({**_group(case, [t for t in members if t.target.case == case], ks), "level": 1})
        for name, case, ids in subsets:
            chosen = [t for t in members if t.target.case == case and t.target.label in set(ids)]
            if chosen:
                groups.append({**_group(f"{name} ({case})", chosen, ks), "level": 1})
    rows = [{**asdict(t.target), **{m: {f"dice@{k}": float(np.mean([r.dice_at(k) for r in t.runs_of(m)]))
                                        for k in ks} for m in METHODS if t.runs_of(m)},
             "ceiling": {c.setting: {"dice": c.dice, "spacing_mm": c.spacing_mm, "coverage": c.coverage}
                         for c in t.ceilings}} for t in results]
    return {"clicks_reported": ks, "groups": groups, "per_target": rows, "latency": latency(results)}


def latency(results: list[TargetResult]) -> dict:
    """The model's click-to-mask times (ms) over every run: the first prompt of each object;
    later prompts answered by the decoder alone, and those that embedded a crop (zoom, a
    moved crop, a new tile); and the encoder runs per object."""
    runs = [r for t in results for r in t.runs_of("model") if r.prompt_ms]
    if not runs:
        return {}
    later = [(ms, n) for r in runs for ms, n in zip(r.prompt_ms[1:], r.encoder_runs[1:])]

    def stats(values) -> dict:
        return {"count": len(values), "median_ms": float(np.median(values)) if values else None,
                "p90_ms": float(np.percentile(values, 90)) if values else None}

    return {"first_prompt": stats([r.prompt_ms[0] for r in runs]),
            "decoder_only": stats([ms for ms, n in later if n == 0]),
            "with_encoder": stats([ms for ms, n in later if n > 0]),
            "encoder_runs_per_object": float(np.mean([sum(r.encoder_runs) for r in runs]))}


def format_latency(summary: dict) -> str:
    """One line of ``summary["latency"]`` ('' when the model ran no prompt)."""
    value = summary.get("latency")
    if not value:
        return ""

    def cell(name: str, title: str) -> str:
        s = value[name]
        if not s["count"]:
            return f"{title}: none"
        return f"{title} {s['median_ms']:.1f} ms (p90 {s['p90_ms']:.1f}, n {s['count']})"

    return ("model click-to-mask, medians: " + "; ".join([
        cell("first_prompt", "first prompt"), cell("decoder_only", "decoder-only click"),
        cell("with_encoder", "click that embeds a crop")])
        + f"; encoder runs per object {value['encoder_runs_per_object']:.2f}")


def format_click_response(summary: dict) -> str:
    """One line per label-quality group: each method's answer to corrective clicks."""
    lines = []
    for g in summary["groups"]:
        if g["level"] != 0 or "click_response" not in g:
            continue
        parts = []
        for method, value in g["click_response"].items():
            positive, negative = value["positive"], value["negative"]
            if positive["clicks"] + negative["clicks"]:
                parts.append(f"{method} {positive['mean_gain']:+.3f} per positive / "
                             f"{negative['mean_gain']:+.3f} per negative click, "
                             f"{100 * positive['obeyed_share']:.0f} % / {100 * negative['obeyed_share']:.0f} % "
                             f"obeyed, {100 * value['lowered_share']:.1f} % of clicks lower the Dice")
        if parts:
            lines.append(f"click response, {g['group']}: " + "; ".join(parts))
    return "\n".join(lines)


def _cell(value: dict) -> str:
    mean, spread = value["mean"], value["spread"]
    return f"{mean:.3f}±{spread:.3f}" if spread else f"{mean:.3f}"


def _ceiling_title(setting: str) -> str:
    return f"ceil {FIT_MIN_SPACING_MM:g}-fit" if setting == "fit" else f"ceil {float(setting):g}mm"


def format_table(summary: dict, per_target: bool = False) -> str:
    """Model, baseline and ceiling side by side, per group (and per target)."""
    ks = summary["clicks_reported"]
    seeds_spread = any(v["spread"] for g in summary["groups"] for m in METHODS if m in g
                       for v in g[m].values())
    width = 13 if seeds_spread else 7
    settings = list(next((g["ceiling"] for g in summary["groups"] if "ceiling" in g), {}))
    header = (f"{'group':<46} {'n':>4} {'method':<7}" + "".join(f" {'Dice@' + str(k):>{width}}" for k in ks)
              + "".join(f" {_ceiling_title(s):>13}" for s in settings))
    lines = [header, "-" * len(header)]
    for g in summary["groups"]:
        label = ("  " * g["level"] + g["group"])[:46]
        for n, method in enumerate(m for m in METHODS if m in g):
            line = (f"{label if n == 0 else '':<46} {g['targets'] if n == 0 else '':>4} {method:<7}"
                    + "".join(f" {_cell(g[method][f'dice@{k}']):>{width}}" for k in ks))
            if n == 0 and "ceiling" in g:
                line += "".join(f" {_ceiling_cell(g['ceiling'][s], s):>13}" for s in settings)
            lines.append(line)
    if per_target:
        lines += ["", f"{'case':<36} {'label':<22} {'voxels':>7} {'method':<7}"
                  + "".join(f" {'Dice@' + str(k):>7}" for k in ks)
                  + "".join(f" {_ceiling_title(s):>13}" for s in settings)]
        for row in summary["per_target"]:
            for n, method in enumerate(m for m in METHODS if m in row):
                head = (f"{row['case'][:36]:<36} {(str(row['label']) + ' ' + row['name'])[:22]:<22} "
                        f"{row['voxels']:>7}") if n == 0 else " " * 67
                line = f"{head} {method:<7}" + "".join(f" {row[method][f'dice@{k}']:7.3f}" for k in ks)
                if n == 0:
                    line += "".join(f" {_target_ceiling_cell(row['ceiling'][s], s):>13}" for s in settings)
                lines.append(line)
    return "\n".join(lines)


def _ceiling_cell(value: dict, setting: str) -> str:
    text = f"{value['dice']:.3f}"
    if setting == "fit":
        text += f"@{value['spacing_mm']:.2f}"
    if value["targets_larger_than_crop"]:
        text += f" ({value['targets_larger_than_crop']}>)"
    return text


def _target_ceiling_cell(value: dict, setting: str) -> str:
    text = f"{value['dice']:.3f}"
    if setting == "fit":
        text += f"@{value['spacing_mm']:.2f}"
    return text + (">" if value["coverage"] < 1 else "")


TABLE_NOTES = ("ceil: Dice of perfect low-res logits (signed distance on the decoder's grid, engine upsampling), "
               "one crop at the first click; '@mm' = spacing chosen to fit the target (mean); "
               "'(n>)' / '>' = target larger than one crop (single-crop ceiling, part of it outside)")


def _finite(value):
    """NaN -> None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, summary: dict, results: list[TargetResult], meta: dict) -> None:
    payload = {"meta": meta, **summary, "details": [asdict(r) for r in results]}
    with atomic_output_path(path) as tmp:
        Path(tmp).write_text(json.dumps(_finite(payload), indent=1))
