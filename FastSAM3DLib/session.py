"""The interactive engine: an image, clicks in, masks on the image's own grid out.

``Engine`` owns the model, the device and a cache of crop embeddings;
``InteractiveSession`` is one object being segmented. Each click runs one
decoder pass (prompt encoder + mask decoder) on one or more crops ("tiles")
that ``RoiPolicy`` chooses; a crop's image embedding is computed once. The
previous low-res logits, carried over to the pass's crop, are the mask prompt.

The object's mask is the merge of its tiles on the image grid: where the
newest pass covers a voxel, the union of that pass's tiles; elsewhere what
earlier passes gave. So a pass never loses what lies outside its crops, and
a big object is the union of the tiles its clicks made.

Points are physical: RAS (Slicer's world), LPS (DICOM/ITK) or "ijk", a
continuous voxel index (i, j, k) of the image. Masks are numpy arrays in
(k, j, i) order, the order of ``SimpleITK.GetArrayFromImage`` and Slicer's
``arrayFromVolume``.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .acceleration import ModelRunner
from .build import build_model, resolve_device
from .image import (ImageError, bounding_box, format_numbers, is_inside, load_image, lps_to_continuous_index,
                    point_to_lps, validate_image)
from .model import Sam3D
from .prompts import (SCRIBBLE_MAX_POINTS, PhysicalBox, box_corners_lps, lasso_region, points_to_lps,
                      check_thickness_mm, resample_polyline, slice_frame,
                      slice_thickness_mm)
from .roi import (MaskPatch, RoiGeometry, extract_roi, logits_to_patch, positive_box_on_image,
                  roi_box_on_image, roi_for_point)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Crop spacings (mm) the automatic zoom chooses from.
SPACING_LADDER_MM = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


class EngineError(RuntimeError):
    """A failure the user should see as one line (e.g. GPU out of memory)."""


class GpuFailure(EngineError):
    """The GPU failed a model call (out of memory, also inside a CUDA-graph
    capture); the session that hit it continues on the CPU."""


def _is_gpu_failure(exc: BaseException) -> bool:
    """Errors a CUDA out-of-memory can surface as: the OOM itself, or, inside a
    CUDA-graph capture or a cuBLAS/cuDNN call, a RuntimeError naming CUDA."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, EngineError):
        return False
    text = str(exc)
    lowered = text.lower()
    return ("CUDA" in text or "CUBLAS" in text or "CUDNN" in text) and any(
        sign in lowered for sign in ("out of memory", "alloc_failed", "memoryallocation", "capture"))


def parse_spacing(value) -> str | float:
    """'auto', 'fixed' or a positive spacing in mm (a number or its text)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "fixed"):
        return value.strip().lower()
    try:
        mm = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be auto, fixed or a spacing in mm, not {value!r}") from None
    if not (np.isfinite(mm) and mm > 0):
        raise ValueError(f"a crop spacing must be a positive number of mm, not {value!r}")
    return mm


@dataclass(frozen=True)
class PhysicalClick:
    """A user's click at a physical point (LPS, mm); ``clicks.Click`` is a
    simulated click at a voxel index. ``source``: "click", "scribble" or "lasso"."""
    point_lps: tuple[float, float, float]
    positive: bool
    source: str = "click"


@dataclass(frozen=True, eq=False)
class Tile:
    """One crop's decoder output: low-res logits (1, 1, s, s, s) of ``roi``.
    ``pass_index`` orders the passes: a later pass replaces an earlier one
    inside its crops; the tiles of one pass are united."""
    roi: RoiGeometry
    logits: torch.Tensor
    pass_index: int


@dataclass
class MaskUpdate:
    """What one click, undo, redo or reset changed.

    ``patch`` holds the object's mask over a box that covers both the previous
    and the new result: a caller replaces exactly that box. None when both
    are empty (nothing to write).
    """
    patch: MaskPatch | None
    reembedded: bool = False          # the encoder ran for this click
    encoder_runs: int = 0             # crops embedded for this click (zoom, new tiles)
    recentred: bool = False           # the click ran on a crop the object did not have before
    iou: float | None = None
    roi: RoiGeometry | None = None    # the crop of the last decoder pass
    crops: tuple[RoiGeometry, ...] = ()   # every crop a decoder pass ran on for this click
    timings: dict[str, float] = field(default_factory=dict)
    fell_back_to_cpu: bool = False


@dataclass(frozen=True)
class _Step:
    """One state of the undo history: the prompts (clicks, the object's box)
    and the tiles (crops and logits) they produced; the mask is recomputed from the tiles."""
    clicks: tuple[PhysicalClick, ...] = ()
    tiles: tuple[Tile, ...] = ()
    box: PhysicalBox | None = None


def _cropped(start_kji, array: np.ndarray) -> MaskPatch | None:
    """The array cut down to the box of its True voxels (None if empty):
    callers then write only what an object can occupy."""
    box = bounding_box(array)
    if box is None:
        return None
    return MaskPatch(tuple(s + b.start for s, b in zip(start_kji, box)), array[box])


def _union_patch(old: MaskPatch | None, new: MaskPatch | None) -> MaskPatch | None:
    """``new`` re-expressed over the box covering both, False outside ``new``."""
    if old is None or new is None:
        return new if new is not None else (
            None if old is None else MaskPatch(old.start_kji, np.zeros_like(old.array)))
    start, stop = old.union_box(new)
    array = np.zeros(tuple(b - a for a, b in zip(start, stop)), dtype=bool)
    array[tuple(slice(n - s, n - s + d) for n, s, d in zip(new.start_kji, start, new.array.shape))] = new.array
    return MaskPatch(start, array)


def _box_union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return (tuple(min(x, y) for x, y in zip(a[0], b[0])), tuple(max(x, y) for x, y in zip(a[1], b[1])))


def _box_intersection(a, b):
    if a is None or b is None:
        return None
    start = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    stop = tuple(min(x, y) for x, y in zip(a[1], b[1]))
    return None if any(s >= e for s, e in zip(start, stop)) else (start, stop)


def _roi_corners_lps(roi: RoiGeometry) -> np.ndarray:
    edge = (-0.5, roi.size - 0.5)
    return roi.voxel_to_lps(np.stack(np.meshgrid(edge, edge, edge, indexing="ij"), -1).reshape(-1, 3))


def _roi_within(inner: RoiGeometry, outer: RoiGeometry) -> bool:
    """Whether the cube of ``inner`` lies inside the cube of ``outer``."""
    return all(outer.contains(c, -1e-6) for c in _roi_corners_lps(inner))


# -- carrying logits between crops -------------------------------------------------

def sample_logits(logits: torch.Tensor, roi: RoiGeometry, points_lps) -> tuple[torch.Tensor, np.ndarray]:
    """A crop's low-res logits (1, 1, s, s, s) read at LPS points (..., 3) as the
    reference pipeline's upsampled mask holds them (``F.interpolate`` to the
    crop, trilinear, align_corners=False, edges clamped); returns (values on the
    logits' device, whether each point lies inside the crop)."""
    voxels = roi.lps_to_voxel(points_lps)
    normalised = 2 * (voxels + 0.5) / roi.size - 1
    inside = np.all(np.abs(normalised) <= 1 + 1e-6, axis=-1)
    # grid_sample takes (x, y, z) = (last, middle, first) tensor axes.
    grid = torch.from_numpy(normalised.reshape(1, 1, 1, -1, 3)).float().flip(-1).to(logits.device)
    values = F.grid_sample(logits.float().reshape(1, 1, *logits.shape[-3:]), grid, mode="bilinear",
                           padding_mode="border", align_corners=False)
    return values.reshape(voxels.shape[:-1]), inside


def tiles_at(tiles, points_lps, device) -> torch.Tensor:
    """The object's logits at LPS points (..., 3), merged as its mask is: the
    newest pass covering a point gives its value (the largest of that pass's
    tiles: their union); points no tile covers get the lowest logit of all."""
    points = np.asarray(points_lps, dtype=float)
    background = min(float(t.logits.min()) for t in tiles)
    merged = torch.full(points.shape[:-1], background, dtype=torch.float32, device=device)
    for _, group in groupby(sorted(tiles, key=lambda t: t.pass_index), key=lambda t: t.pass_index):
        best = torch.full_like(merged, float("-inf"))
        covered = np.zeros(points.shape[:-1], dtype=bool)
        for tile in group:
            values, inside = sample_logits(tile.logits, tile.roi, points)
            inside_t = torch.from_numpy(inside).to(device)
            best = torch.where(inside_t, torch.maximum(best, values.to(device)), best)
            covered |= inside
        merged = torch.where(torch.from_numpy(covered).to(device), best, merged)
    return merged


def logits_for_crop(tiles, roi: RoiGeometry, low_res_size: int, device) -> torch.Tensor:
    """The object's logits carried over to ``roi``'s low-res grid (1, 1, s, s, s):
    the mask prompt of a pass on that crop."""
    if len(tiles) == 1 and tiles[0].roi == roi:
        return tiles[0].logits.to(device)
    s = low_res_size
    cells = (np.arange(s) + 0.5) * (roi.size / s) - 0.5        # cell centres in crop voxels
    grid = np.stack(np.meshgrid(cells, cells, cells, indexing="ij"), axis=-1)
    return tiles_at(tiles, roi.voxel_to_lps(grid), device).reshape(1, 1, s, s, s)


# -- the ROI policy ------------------------------------------------------------

class RoiPolicy:
    """Chooses the crops (centre and spacing) of each decoder pass of one object.

    setting "fixed": every crop at ``model_spacing``; a number: at that spacing;
    "auto": a spacing from ``ladder`` so the object (its mask and positive
    clicks) fills at most ``fill`` of the crop, the first click at
    ``model_spacing``. The ladder is cut to the model's trained range and to no
    finer than the scan's finest voxel spacing (or ``model_spacing`` if that is
    finer): finer crops only interpolate.

    A click inside a crop that still suits the object reuses it (decoder only).
    Otherwise the crop moves to hold the object, if it fits in one crop and the
    moved crop holds the click; else the crops at the wanted spacing that hold
    the click run; else a positive click starts a new tile centred on itself
    (the object's crop set grows). A crop is never centred on a negative click:
    it re-runs the crops that hold it, and outside every crop it needs no pass.
    """

    def __init__(self, size: int, model_spacing: float, setting="fixed", image_spacing=None,
                 trained_range=None, ladder=SPACING_LADDER_MM, fill: float = 0.7,
                 margin: int = 8, refine: bool = True):
        self.size = int(size)
        self.setting = parse_spacing(setting)
        self.model_spacing = float(model_spacing)
        self.fill = fill
        self.margin = margin
        self.refine = refine            # re-run at once on the zoomed crop after a pass
        if self.setting == "auto":
            finest = min(self.model_spacing, min(image_spacing)) if image_spacing is not None else 0.0
            lo, hi = trained_range if trained_range is not None else (0.0, np.inf)
            tolerance = 1 - 1e-6
            steps = sorted(s for s in ladder if s >= finest * tolerance and lo * tolerance <= s <= hi / tolerance)
            self.steps = tuple(steps) or (self.model_spacing,)
        else:
            self.steps = (self.model_spacing if self.setting == "fixed" else self.setting,)

    @property
    def initial_spacing(self) -> float:
        return self.model_spacing if self.setting == "auto" else self.steps[0]

    def spacing_for(self, extent_mm: float) -> float:
        """The finest step whose crop the extent fills at most ``fill`` of (the coarsest if none)."""
        for step in self.steps:
            if extent_mm <= self.fill * self.size * step:
                return step
        return self.steps[-1]

    def fits(self, box_lps, spacing: float) -> bool:
        """Whether the LPS box (2, 3) fits in one crop of ``spacing`` inside its margin."""
        return bool(np.all(box_lps[1] - box_lps[0] <= (self.size - 2 * self.margin - 1) * spacing))

    def crop(self, centre_lps, spacing: float) -> RoiGeometry:
        return roi_for_point(centre_lps, size=self.size, spacing=spacing)

    def first_crop(self, p_lps) -> RoiGeometry:
        """A new object's crop for its first click: the crop of a fixed lattice
        (centres a quarter crop apart in LPS) nearest to the click, so the same
        click always gets the same crop whatever was clicked before (a result
        that depends on history cannot be reproduced), objects near each other
        share one embedding, and the click stays in the crop's central half."""
        step = self.size * self.initial_spacing / 4
        return self.crop(np.round(np.asarray(p_lps, dtype=float) / step) * step, self.initial_spacing)

    def suits(self, roi: RoiGeometry, box_lps) -> bool:
        """Whether ``roi`` can stay the object's crop: at the wanted spacing, or
        one step finer while the object still fits (no zooming back and forth)."""
        wanted = self.spacing_for(float(np.max(box_lps[1] - box_lps[0])))
        if roi.spacing == wanted:
            return True
        finer = [s for s in self.steps if s < wanted]
        return bool(finer) and roi.spacing == finer[-1] and self.fits(box_lps, roi.spacing)

    def plan(self, click: PhysicalClick, clicks, tiles, mask_box_lps, box: PhysicalBox | None = None
             ) -> list[RoiGeometry]:
        """The crops of the pass for ``click`` (the newest of ``clicks``); ``box``: the object's box."""
        p = np.asarray(click.point_lps)
        if not tiles:
            return [self.first_crop(p)] if click.positive else []
        box = _object_box(clicks, mask_box_lps, box)
        containing = list(dict.fromkeys(t.roi for t in tiles if t.roi.contains(p, self.margin)))
        staying = [roi for roi in containing if self.suits(roi, box)]
        if staying:
            return staying
        spacing = self.spacing_for(float(np.max(box[1] - box[0])))
        if self.fits(box, spacing):
            moved = self.crop(box.mean(axis=0), spacing)
            if moved.contains(p, self.margin):
                return [moved]
        at_spacing = [roi for roi in containing if roi.spacing == spacing]
        if at_spacing:
            return at_spacing
        # A positive click starts a tile of its own; a negative one re-runs the crops holding it.
        return [self.crop(p, spacing)] if click.positive else containing

    def plan_box(self, box: PhysicalBox) -> list[RoiGeometry]:
        """A new box states the object's extent: one crop centred on it at the
        spacing its extent wants (the coarsest step if it is bigger than every crop)."""
        bounds = box.bounds_lps
        return [self.crop(bounds.mean(axis=0), self.spacing_for(float(np.max(bounds[1] - bounds[0]))))]

    def plan_points(self, new_clicks, clicks, tiles, mask_box_lps, box: PhysicalBox | None = None
                    ) -> list[RoiGeometry]:
        """The crops of the pass for several clicks of one sign added at once
        (a scribble, a lasso's interior points). A new positive object: one crop
        centred on their extent (no finer than a first click's); else each
        click's ``plan``, except for clicks a planned crop already holds."""
        if len(new_clicks) == 1:
            return self.plan(new_clicks[0], clicks, tiles, mask_box_lps, box)
        points = np.array([c.point_lps for c in new_clicks])
        if not tiles:
            if not new_clicks[0].positive:
                return []
            extent = float(np.max(points.max(0) - points.min(0)))
            centre = (points.max(0) + points.min(0)) / 2
            return [self.crop(centre, max(self.initial_spacing, self.spacing_for(extent)))]
        crops: list[RoiGeometry] = []
        for click, p in zip(new_clicks, points):
            if not any(roi.contains(p, self.margin) for roi in crops):
                crops += [roi for roi in self.plan(click, clicks, tiles, mask_box_lps, box) if roi not in crops]
        return crops

    def zoom(self, ran, clicks, mask_box_lps, box: PhysicalBox | None = None) -> RoiGeometry | None:
        """The crop to re-run on at once after a pass on ``ran`` (``refine``):
        the object's own crop when that one does not suit it; else None."""
        if not self.refine or self.setting != "auto" or len(ran) != 1:
            return None
        box = _object_box(clicks, mask_box_lps, box)
        if self.suits(ran[0], box):
            return None
        spacing = self.spacing_for(float(np.max(box[1] - box[0])))
        return self.crop(box.mean(axis=0), spacing) if self.fits(box, spacing) else None


def _object_box(clicks, mask_box_lps, box: PhysicalBox | None = None) -> np.ndarray:
    """(2, 3) LPS min/max of the mask's box, the positive clicks and the box prompt."""
    points = [c.point_lps for c in clicks if c.positive]
    if mask_box_lps is not None:
        points += list(mask_box_lps)
    if box is not None:
        points += list(box.bounds_lps)
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return np.stack([points.min(0), points.max(0)])


def _box_corners(box_lps) -> np.ndarray:
    return np.stack(np.meshgrid(*zip(box_lps[0], box_lps[1]), indexing="ij"), axis=-1).reshape(-1, 3)


def _mask_box_lps(image: sitk.Image, patch: MaskPatch | None) -> np.ndarray | None:
    """(2, 3) LPS min/max of the patch's box (its corner voxel centres)."""
    if patch is None:
        return None
    start, stop = np.array(patch.start_kji[::-1]), np.array(patch.stop_kji[::-1]) - 1
    corners = np.stack(np.meshgrid(*zip(start, stop), indexing="ij"), axis=-1).reshape(-1, 3)
    lps = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners.astype(float)])
    return np.stack([lps.min(0), lps.max(0)])


# -- the engine ----------------------------------------------------------------

class Engine:
    """Model + device + embedding cache, shared by the sessions of an application.

    Thread-safe: every model call and cache access holds one lock, so a GUI
    may run clicks on a worker thread. Model calls go through a ``ModelRunner``
    (on CUDA: CUDA-graph replays, ``compile``: torch.compile first); ``paster``
    (image, roi, low-res logits, box) -> MaskPatch evaluates a crop's mask on
    the image grid (``roi.logits_to_patch``; the bench injects its own).

    spacing: the sessions' default crop spacing, kept as ``spacing_setting`` (see ``RoiPolicy``):
    "auto", "fixed" or mm; None: "auto" for a model trained across spacings
    (``ModelConfig.trained_spacing_range_mm``), else "fixed".
    cache_bytes / image_cache_bytes: bounds of the embedding cache and of the
    engine's own float32 copies of images. A cached image and its embeddings
    are dropped as soon as the caller lets the image go (a changed volume is a
    new image) or calls ``forget_image``.
    cpu_fallback: a session whose model call fails on the GPU (out of memory)
    continues on a CPU copy of the model; other sessions stay on the GPU.
    """

    def __init__(self, model: str | Sam3D = "default", device: str = "auto",
                 precision: str = "auto", checkpoint=None, cache_bytes: int = 512 << 20,
                 image_cache_bytes: int = 2 << 30, cpu_fallback: bool = True, graphs: bool = True,
                 compile: bool = False, paster=logits_to_patch, spacing=None):
        self.device = resolve_device(device)
        if isinstance(model, Sam3D):
            self.model = model.eval().to(self.device)
        else:
            self.model = build_model(model, checkpoint=checkpoint, device=self.device)
        self.precision = self._choose_precision(precision)
        self.spacing_setting = parse_spacing(spacing if spacing is not None else (
            "auto" if self.model.config.trained_spacing_range_mm is not None else "fixed"))
        self._runner_options = {"graphs": graphs, "compile": compile}
        self.runner = self._new_runner()
        self.paster = paster
        self.cpu_fallback = cpu_fallback
        self._cpu_engine: Engine | None = None
        self.encoder_calls = 0
        self._lock = threading.RLock()
        # (id(image), roi) -> embedding; entries of an image go when the image is collected.
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._watched: dict[int, weakref.finalize] = {}
        # path or id(source) -> (weakref to the source or the path, prepared image or None = the source)
        self._images: OrderedDict = OrderedDict()
        self._image_cache_bytes = image_cache_bytes

    def _new_runner(self) -> ModelRunner:
        # A half-precision engine runs its float32 decoder on TF32 tensor cores; fp32 is strict.
        return ModelRunner(self.model, self.device, self.precision, tf32=self.precision != torch.float32,
                           **self._runner_options)

    def _choose_precision(self, precision: str) -> torch.dtype:
        if precision == "auto":
            if self.device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}")
        if self.device.type == "cpu" and precision != "fp32":
            raise ValueError("half precision is only supported on CUDA; use fp32 on the CPU")
        return PRECISIONS[precision]

    @property
    def device_description(self) -> str:
        if self.device.type == "cuda":
            return f"GPU: {torch.cuda.get_device_name(self.device)}"
        return f"CPU ({torch.get_num_threads()} threads): first click of each region takes about a second"

    @property
    def spacing_mm(self) -> float:
        return self.model.spacing_mm

    @property
    def roi_size(self) -> int:
        return self.model.input_size

    def new_session(self, image: sitk.Image | str | Path, **options) -> "InteractiveSession":
        """A session for one object. Sessions given the same image object (or
        path) share the validated image and its cached embeddings."""
        return InteractiveSession(self, image, **options)

    # -- caches -------------------------------------------------------------
    def prepare_image(self, image: sitk.Image | str | Path) -> sitk.Image:
        """The validated float32 image for ``image``, made once per image object or path."""
        is_path = isinstance(image, (str, Path))
        key = str(Path(image).resolve()) if is_path else id(image)
        with self._lock:
            entry = self._images.get(key)
            if entry is not None and (is_path or entry[0]() is image):
                self._images.move_to_end(key)
                return entry[1] if entry[1] is not None else image
            prepared = load_image(image) if is_path else validate_image(image)
            if is_path:
                self._images[key] = (key, prepared)
            else:
                # Only a copy the engine made is held; the caller's own image is watched.
                self._images[key] = (weakref.ref(image), None if prepared is image else prepared)
                self._watch(image, key)
            self._watch(prepared)
            self._trim_images()
            return prepared

    def _watch(self, image: sitk.Image, image_key=None) -> None:
        """Free an image's cache entries when it is collected."""
        ident = id(image)
        if ident not in self._watched:
            self._watched[ident] = weakref.finalize(image, self._forget_id, ident, image_key)

    def _forget_id(self, ident: int, image_key=None) -> None:
        with self._lock:
            self._watched.pop(ident, None)
            if image_key is not None:
                self._images.pop(image_key, None)
            for key in [k for k in self._cache if k[0] == ident]:
                del self._cache[key]

    def forget_image(self, image: sitk.Image | str | Path) -> None:
        """Drop the cached copy and embeddings of an image (e.g. its voxels changed)."""
        with self._lock:
            key = str(Path(image).resolve()) if isinstance(image, (str, Path)) else id(image)
            entry = self._images.pop(key, None)
            prepared = None if entry is None else entry[1]
            for ident in {id(image), None if prepared is None else id(prepared)}:
                if ident is not None:
                    for cache_key in [k for k in self._cache if k[0] == ident]:
                        del self._cache[cache_key]

    @staticmethod
    def _image_bytes(image: sitk.Image) -> int:
        return image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()

    def _trim_images(self) -> None:
        def held():
            return sum(self._image_bytes(p) for _, p in self._images.values() if p is not None)
        while len(self._images) > 1 and held() > self._image_cache_bytes:
            key, (_, prepared) = self._images.popitem(last=False)
            if prepared is not None:
                self._forget_id(id(prepared))

    @property
    def cache_bytes(self) -> int:
        """Bytes held by cached embeddings."""
        return sum(e.element_size() * e.nelement() for e in self._cache.values())

    def cached_rois(self, image: sitk.Image) -> list[RoiGeometry]:
        return [roi for ident, roi in self._cache if ident == id(image)]

    # -- model calls -------------------------------------------------------
    def _run(self, fn):
        """Run a model call; a GPU failure (out of memory) becomes GpuFailure, or
        an EngineError when there is no CPU fallback."""
        try:
            return fn()
        except Exception as exc:
            if not _is_gpu_failure(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if not self.cpu_fallback:
                raise EngineError(f"the GPU ran out of memory ({detail}); close other GPU programs "
                                  "or choose the CPU device") from None
            raise GpuFailure(detail) from exc

    def cpu_engine(self) -> "Engine":
        """A CPU copy of this engine, made on the first GPU failure, for the
        sessions that fell back; this engine stays on its device."""
        with self._lock:
            if self._cpu_engine is None:
                model = Sam3D(self.model.config)
                model.load_state_dict({k: v.detach().to("cpu") for k, v in self.model.state_dict().items()})
                self._cpu_engine = Engine(model, device="cpu", cache_bytes=self._cache_bytes,
                                          image_cache_bytes=self._image_cache_bytes, cpu_fallback=False,
                                          paster=self.paster, spacing=self.spacing_setting,
                                          **self._runner_options)
            return self._cpu_engine

    def embedding(self, image: sitk.Image, roi: RoiGeometry) -> tuple[torch.Tensor, bool]:
        """The ROI's image embedding, from the cache or computed; returns
        (embedding, computed_now)."""
        with self._lock:
            key = (id(image), roi)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], False
            volume = torch.from_numpy(np.ascontiguousarray(extract_roi(image, roi)))[None, None]
            embedding = self._run(lambda: self.runner.encode(volume))
            self.encoder_calls += 1
            self._watch(image)
            self._cache[key] = embedding
            while len(self._cache) > 1 and self.cache_bytes > self._cache_bytes:
                self._cache.popitem(last=False)
            return embedding, True

    def decode(self, embedding: torch.Tensor, points_voxel: np.ndarray, labels: np.ndarray,
               mask_logits: torch.Tensor | None, multimask: bool = False) -> tuple[torch.Tensor, float]:
        """(1, 1, s, s, s) low-res logits and their IoU estimate; ``multimask``: of the
        decoder's multimask outputs, the one with the highest IoU estimate."""
        with self._lock:
            points = torch.as_tensor(points_voxel, dtype=torch.float32)[None]
            lab = torch.as_tensor(labels, dtype=torch.int64)[None]
            logits, iou = self._run(lambda: self.runner.decode(embedding, points, lab, mask_logits, multimask))
            best = int(iou[0].argmax()) if multimask else 0
            return logits[:, best:best + 1], float(iou[0, best])


# -- one object ------------------------------------------------------------------

def require_box_prompts(model: Sam3D) -> None:
    """EngineError unless the model has box-corner embeddings."""
    if not model.config.box_prompts:
        raise EngineError(f"the model {model.config.name} has no box prompt (the official SAM-Med3D/FastSAM3D "
                          "checkpoints have none): use the bundled default model, or clicks")


class InteractiveSession:
    """One object being segmented on one image.

    accumulate_clicks: pass every click inside a crop to the decoder (SAM-Med3D's
    newer pipeline); False = only the newest click, as FastSAM3D's evaluation did.
    border_margin: a click closer than this many crop voxels to a crop's border
    does not count as inside it.
    spacing: "auto", "fixed" or mm (see ``RoiPolicy``); default: the engine's.
    refine: in "auto", re-run a click's pass at once on the zoomed crop. Measured with the
    bundled model (docs/zoom.md): the same encoder runs per object (the zoom's embedding is
    computed one click earlier) and a mean Dice as good or better at 1, 3, 5 and 10 clicks; so on.
    max_history: undo states kept.
    """

    def __init__(self, engine: Engine, image: sitk.Image | str | Path,
                 accumulate_clicks: bool = True, border_margin: int = 8, spacing=None,
                 refine: bool = True, max_history: int = 100):
        self.engine = engine
        self.image = engine.prepare_image(image)
        self.accumulate_clicks = accumulate_clicks
        self._border_margin, self._refine = border_margin, refine
        self.set_spacing(spacing)
        self.max_history = max(1, int(max_history))
        self._history: list[_Step] = [_Step()]
        self._position = 0
        self._patch: MaskPatch | None = None       # the mask of the current step
        self._calls = engine                       # the engine running this object's model calls
        self.encoder_runs = 0                      # crops embedded for this object

    def set_spacing(self, spacing=None) -> None:
        """The crop spacing from the next click on: "auto", "fixed", mm, or None (the engine's)."""
        engine = self.engine
        setting = engine.spacing_setting if spacing is None else spacing
        self.policy = RoiPolicy(engine.roi_size, engine.spacing_mm, setting,
                                image_spacing=self.image.GetSpacing(),
                                trained_range=engine.model.config.trained_spacing_range_mm,
                                margin=self._border_margin, refine=self._refine)

    # -- state ---------------------------------------------------------------
    @property
    def _step(self) -> _Step:
        return self._history[self._position]

    @property
    def clicks(self) -> list[PhysicalClick]:
        return list(self._step.clicks)

    @property
    def box(self) -> PhysicalBox | None:
        """The object's box prompt (one per object), None without one."""
        return self._step.box

    @property
    def prompts(self) -> list[PhysicalBox | PhysicalClick]:
        """Every prompt of the object in the order the model gets them: the box first, then the clicks."""
        return ([self._step.box] if self._step.box is not None else []) + list(self._step.clicks)

    @property
    def tiles(self) -> tuple[Tile, ...]:
        return self._step.tiles

    @property
    def roi(self) -> RoiGeometry | None:
        """The crop of the newest pass (None before the first)."""
        tiles = self._step.tiles
        return max(tiles, key=lambda t: t.pass_index).roi if tiles else None

    @property
    def patch(self) -> MaskPatch | None:
        return self._patch

    @property
    def on_cpu_fallback(self) -> bool:
        return self._calls is not self.engine

    def mask(self) -> np.ndarray:
        """The object's mask on the full image grid, (k, j, i) bool."""
        full = np.zeros(self.image.GetSize()[::-1], dtype=bool)
        if self._patch is not None:
            self._patch.paste_into(full)
        return full

    # -- the mask from tiles ----------------------------------------------------
    def _paste(self, roi: RoiGeometry, logits: torch.Tensor, box) -> MaskPatch:
        return self._calls.paster(self.image, roi, logits.reshape(logits.shape[-3:]), box)

    def _paint(self, base: MaskPatch | None, tiles) -> MaskPatch | None:
        """``base`` with one pass's tiles painted over it: inside their crops the
        union of their masks, outside them ``base``. Only the boxes that can
        change are evaluated: each tile's positive box and base's box inside it."""
        base_box = None if base is None else (base.start_kji, base.stop_kji)
        masks, covers = [], []                 # patches of the tiles' masks and of their coverage of base
        for tile in tiles:
            crop_box = roi_box_on_image(self.image, tile.roi)
            if crop_box is None:
                continue
            overlap = _box_intersection(base_box, crop_box)
            box = _box_union(positive_box_on_image(self.image, tile.roi, tile.logits), overlap)
            if box is not None:
                masks.append(self._paste(tile.roi, tile.logits, box))
            if overlap is not None:
                covers.append(self._paste(tile.roi, torch.ones_like(tile.logits), overlap))
        out_box = base_box
        for patch in masks + covers:
            out_box = _box_union(out_box, (patch.start_kji, patch.stop_kji))
        if out_box is None:
            return None
        start = out_box[0]
        shape = tuple(b - a for a, b in zip(*out_box))

        def layer(patches):
            array = np.zeros(shape, dtype=bool)
            for patch in patches:
                array[tuple(slice(a - s, b - s) for a, b, s in zip(patch.start_kji, patch.stop_kji, start))] |= \
                    patch.array
            return array
        # Inside the crops base gives way: only its True voxels need the crops' coverage.
        kept = layer([base] if base is not None else []) & ~layer(covers)
        return _cropped(start, kept | layer(masks))

    def _mask_of(self, tiles) -> MaskPatch | None:
        patch = None
        for _, group in groupby(sorted(tiles, key=lambda t: t.pass_index), key=lambda t: t.pass_index):
            patch = self._paint(patch, list(group))
        return patch

    # -- clicks --------------------------------------------------------------
    def _run_pass(self, crops, clicks, box, newest: int, tiles, pass_index: int, counts: dict):
        """Decoder passes on ``crops`` (each with the box, as its two corners
        first, and the clicks inside it, and the object's logits carried over
        as mask prompt) -> new tiles. ``newest``: how many of ``clicks`` the
        step added (without ``accumulate_clicks`` only those are given)."""
        engine = self._calls
        s = engine.model.low_res_size
        used = clicks if self.accumulate_clicks else clicks[len(clicks) - newest:]
        new, ious = [], []
        for roi in crops:
            inside = [c for c in used if roi.contains(np.array(c.point_lps), 0)]
            corners = None if box is None else box.in_crop(roi)
            if not inside and corners is None:
                continue
            t0 = time.perf_counter()
            embedding, computed = engine.embedding(self.image, roi)
            counts["encoder_runs"] += int(computed)
            counts["encode"] += time.perf_counter() - t0
            if tiles:
                prompt = logits_for_crop(tiles, roi, s, engine.device)
            else:
                # The official loops give an all-zero mask prompt on the first click.
                prompt = torch.zeros(1, 1, s, s, s, device=engine.device)
            points = roi.lps_to_voxel(np.array([c.point_lps for c in inside]).reshape(-1, 3))
            labels = np.array([int(c.positive) for c in inside], dtype=np.int64)
            if corners is not None:
                points, labels = np.concatenate([corners, points]), np.concatenate([[2, 3], labels])
            # A lone positive click on a new object is the ambiguous prompt multimask answers.
            multimask = (engine.model.config.multimask_first_click and not tiles and corners is None
                         and len(inside) == 1 and inside[0].positive)
            t0 = time.perf_counter()
            logits, iou = engine.decode(embedding, points, labels, prompt, multimask)
            counts["decode"] += time.perf_counter() - t0
            new.append(Tile(roi, logits, pass_index))
            ious.append(iou)
        return new, ious

    def _add_prompts(self, new_clicks: tuple[PhysicalClick, ...], box: PhysicalBox | None,
                     started: float) -> MaskUpdate:
        """One step: ``new_clicks`` (of one sign) and, if given, a new box for the object."""
        previous = self._step
        base = self._patch
        clicks = previous.clicks + new_clicks
        object_box = previous.box if box is None else box
        tiles = list(previous.tiles)
        counts = {"encoder_runs": 0, "encode": 0.0, "decode": 0.0}
        mask_box = _mask_box_lps(self.image, base)
        if box is not None:
            crops = self.policy.plan_box(box)
        else:
            crops = self.policy.plan_points(new_clicks, clicks, tiles, mask_box, object_box)
        next_pass = max((t.pass_index for t in tiles), default=-1) + 1
        patch, ran, ious, crops_run = base, [], [], []
        for zoom_pass in (False, True):            # the click's pass, then at most one zoom pass
            if zoom_pass:
                zoomed = self.policy.zoom(ran, clicks, _mask_box_lps(self.image, patch), object_box) \
                    if ran else None
                crops = [zoomed] if zoomed is not None and zoomed not in ran else []
            new, pass_ious = self._run_pass(crops, clicks, object_box, len(new_clicks), tiles, next_pass,
                                            counts)
            if not new:
                break
            tiles = [t for t in tiles if not any(_roi_within(t.roi, n.roi) for n in new)] + new
            # When the new crops hold every earlier one, the mask is theirs alone.
            patch = self._paint(None if len(tiles) == len(new) else patch, new)
            # Earlier tiles that add nothing (the whole mask lies in one new crop) are dropped.
            box = _mask_box_lps(self.image, patch)
            if len(tiles) > len(new) and box is not None and any(
                    all(t.roi.contains(c, 0) for c in _box_corners(box)) for t in new):
                tiles = new
            ran, ious = [t.roi for t in new], pass_ious
            crops_run += ran
            next_pass += 1
        self._push(_Step(clicks, tuple(tiles), object_box), patch)
        self.encoder_runs += counts["encoder_runs"]
        done = time.perf_counter()
        known = {t.roi for t in previous.tiles}
        return MaskUpdate(
            patch=_union_patch(base, patch), reembedded=counts["encoder_runs"] > 0,
            encoder_runs=counts["encoder_runs"],
            recentred=bool(previous.tiles) and any(r not in known for r in crops_run),
            iou=ious[0] if ious else None, roi=crops_run[-1] if crops_run else self.roi, crops=tuple(crops_run),
            fell_back_to_cpu=self.on_cpu_fallback,
            timings={"encode": counts["encode"], "decode": counts["decode"],
                     "paste": done - started - counts["encode"] - counts["decode"], "total": done - started})

    def _push(self, step: _Step, patch: MaskPatch | None) -> None:
        self._history = self._history[:self._position + 1] + [step]
        if len(self._history) > self.max_history:
            del self._history[:len(self._history) - self.max_history]
        self._position = len(self._history) - 1
        self._patch = patch

    def _with_cpu_fallback(self, operation):
        """Run ``operation``; if the GPU fails it, continue this object on the CPU."""
        try:
            return operation()
        except GpuFailure as failure:
            warnings.warn(f"GPU out of memory ({failure}): this object continues on the CPU "
                          "(slower); other objects keep the GPU", stacklevel=3)
            self._calls = self.engine.cpu_engine()
            self.image = self._calls.prepare_image(self.image)
            return operation()

    def add_click(self, point, positive: bool = True, space: str = "ras") -> MaskUpdate:
        """Add a +/- click and return the updated mask."""
        started = time.perf_counter()
        p_lps = point_to_lps(self.image, point, space)
        if not is_inside(self.image, p_lps):
            raise ImageError(f"the point {format_numbers(point, 2)} ({space}) "
                             "lies outside the image")
        click = PhysicalClick(tuple(float(v) for v in p_lps), bool(positive))
        with self.engine._lock:
            return self._with_cpu_fallback(lambda: self._add_prompts((click,), None, started))

    def _box(self, corners_lps: np.ndarray, source: str, described: str) -> PhysicalBox:
        """The box of these corners, if it meets the image."""
        index = lps_to_continuous_index(self.image, corners_lps)
        size = np.array(self.image.GetSize())
        if np.any(index.max(0) < -0.5) or np.any(index.min(0) > size - 0.5):
            raise ImageError(f"the {described} lies outside the image")
        return PhysicalBox(tuple(tuple(float(v) for v in c) for c in corners_lps), source)

    def add_box(self, corner_a, corner_b, space: str = "ras", *, slice_axes=None,
                thickness_mm: float | None = None) -> MaskUpdate:
        """Give the object's box (one undo step; it replaces the object's earlier
        box, the clicks stay). ``corner_a``/``corner_b``: opposite corners in
        ``space``, best the object's outermost points. Without ``slice_axes``:
        a box axis-aligned in that space (RAS/LPS world axes, or the scan's voxel
        axes for "ijk"). With ``slice_axes`` = (u, v), two in-plane directions of
        a slice view in the same space (oblique ones too): a rectangle on that
        slice, extruded by ``thickness_mm`` along u x v (default: one slice of
        the scan along the normal, ``prompts.slice_thickness_mm``).

        The model gets the bounding box of the corners in each crop's voxels,
        clamped to the crop, as two points labelled 2 and 3 before the clicks;
        the box centres the object's crop and its extent picks the spacing. A
        model without box embeddings raises EngineError and nothing changes."""
        started = time.perf_counter()
        require_box_prompts(self.engine.model)
        corners = box_corners_lps(self.image, corner_a, corner_b, space, slice_axes, thickness_mm)
        box = self._box(corners, "box", f"box {format_numbers(corner_a, 2)} .. {format_numbers(corner_b, 2)} "
                                        f"({space})")
        with self.engine._lock:
            return self._with_cpu_fallback(lambda: self._add_prompts((), box, started))

    def _clicks_inside(self, points_lps, positive: bool, source: str, described: str):
        inside = [p for p in points_lps if is_inside(self.image, p)]
        if not inside:
            raise ImageError(f"the {described} lies outside the image")
        return tuple(PhysicalClick(tuple(float(v) for v in p), bool(positive), source) for p in inside)

    def add_scribble(self, points, positive: bool = True, space: str = "ras",
                     max_points: int = SCRIBBLE_MAX_POINTS) -> MaskUpdate:
        """A +/- polyline (N, 3) in ``space``, resampled by arc length to at most
        ``max_points`` (1 to ``prompts.SCRIBBLE_MAX_POINTS`` = 8) points at least
        ``prompts.SCRIBBLE_MIN_GAP_MM`` (5 mm) apart, both ends included (a shorter
        one: its midpoint), that become clicks of that sign in one undo step;
        points outside the image are left out."""
        started = time.perf_counter()
        polyline = points_to_lps(self.image, points, space, "scribble")
        clicks = self._clicks_inside(resample_polyline(polyline, max_points), positive, "scribble", "scribble")
        with self.engine._lock:
            return self._with_cpu_fallback(lambda: self._add_prompts(clicks, None, started))

    def add_lasso(self, points, positive: bool = True, space: str = "ras", *, slice_axes=None,
                  thickness_mm: float | None = None) -> MaskUpdate:
        """A closed curve (N, 3) in ``space`` on one slice, one undo step. Its
        filled region, on the slice plane of ``slice_axes`` (as in ``add_box``)
        or else the points' best-fit plane (points are projected onto it),
        gives a positive lasso a box (the region's extent: its outline at both
        faces of a slab of ``thickness_mm``, default one slice; it replaces the
        object's box) and
        up to ``prompts.LASSO_MAX_POINTS`` (3) positive clicks at the region's
        deepest points; on a model without box prompts only those clicks. A
        negative lasso gives negative clicks at the deepest points (no box)."""
        started = time.perf_counter()
        curve = points_to_lps(self.image, points, space, "lasso")
        frame = None if slice_axes is None else slice_frame(self.image, slice_axes, space)
        region = lasso_region(curve, frame, cell_mm=min(self.image.GetSpacing()))
        clicks = self._clicks_inside(region.interior_lps, positive, "lasso", "lasso's region")
        box = None
        if positive and self.engine.model.config.box_prompts:
            thickness = (slice_thickness_mm(self.image, region.frame[2]) if thickness_mm is None
                         else check_thickness_mm(thickness_mm))
            box = self._box(region.slab_lps(thickness), "lasso", "lasso's region")
        with self.engine._lock:
            return self._with_cpu_fallback(lambda: self._add_prompts(clicks, box, started))

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._history) - 1

    def prefetch(self, point, space: str = "ras") -> bool:
        """Compute (or find cached) the embeddings of the crops a positive click
        at ``point`` would use, so that click then costs decoder passes only;
        returns whether the encoder ran (False also for a point outside the
        image: a prefetch is only a hint). (Segment Editor's "Initialize".)"""
        p_lps = point_to_lps(self.image, point, space)
        if not is_inside(self.image, p_lps):
            return False
        click = PhysicalClick(tuple(float(v) for v in p_lps), True)
        with self.engine._lock:
            def embed():
                step = self._step
                crops = self.policy.plan(click, step.clicks + (click,), step.tiles,
                                         _mask_box_lps(self.image, self._patch), step.box)
                return any([self._calls.embedding(self.image, roi)[1] for roi in crops])
            return self._with_cpu_fallback(embed)

    def _move(self, step: int) -> MaskUpdate | None:
        target = self._position + step
        if not 0 <= target < len(self._history):
            return None
        old = self._patch
        self._position = target
        self._patch = self._mask_of(self._step.tiles)
        return MaskUpdate(patch=_union_patch(old, self._patch), roi=self.roi)

    def undo(self) -> MaskUpdate | None:
        """Go back one click; None if there is nothing to undo."""
        with self.engine._lock:
            return self._move(-1)

    def redo(self) -> MaskUpdate | None:
        with self.engine._lock:
            return self._move(+1)

    def reset(self) -> MaskUpdate:
        """Forget every click (undoable); the cached embeddings are kept."""
        with self.engine._lock:
            old = self._patch
            self._push(_Step(), None)
            return MaskUpdate(patch=_union_patch(old, None))
