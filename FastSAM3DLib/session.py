"""The interactive engine: an image, clicks in, masks on the image's own grid out.

``Engine`` owns the model, the device and a cache of ROI embeddings;
``InteractiveSession`` is one object being segmented. The image embedding of a
ROI is computed once; every click is one prompt-encoder + mask-decoder pass
with the previous low-res logits fed back as the mask prompt.

Points are physical: RAS (Slicer's world), LPS (DICOM/ITK) or "ijk", a
continuous voxel index (i, j, k) of the image. Masks are numpy arrays in
(k, j, i) order, the order of ``SimpleITK.GetArrayFromImage`` and Slicer's
``arrayFromVolume``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .acceleration import ModelRunner
from .build import build_model, resolve_device
from .image import ImageError, format_numbers, is_inside, load_image, point_to_lps, validate_image
from .model import Sam3D
from .roi import MaskPatch, RoiGeometry, extract_roi, logits_to_patch, positive_box_on_image, roi_for_point

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EngineError(RuntimeError):
    """A failure the user should see as one line (e.g. GPU out of memory)."""


@dataclass(frozen=True)
class Click:
    point_lps: tuple[float, float, float]
    positive: bool


@dataclass
class ClickResult:
    """What one click (or undo/redo) changed.

    ``patch`` holds the object's mask over a box that covers both the previous
    and the new result: a caller replaces exactly that box. None when both
    are empty (nothing to write).
    """
    patch: MaskPatch | None
    reembedded: bool = False          # the encoder ran for this click
    recentred: bool = False           # the click moved the session to another ROI
    iou: float | None = None
    roi: RoiGeometry | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fell_back_to_cpu: bool = False


@dataclass(frozen=True)
class _State:
    clicks: tuple[Click, ...]
    roi: RoiGeometry | None
    low_res_logits: torch.Tensor | None     # (1, 1, s, s, s) in this ROI
    patch: MaskPatch | None


def _crop_to_content(patch: MaskPatch) -> MaskPatch | None:
    """The patch cut down to the bounding box of its True voxels (None if empty):
    callers then write only what an object can occupy, not the whole ROI box."""
    if not patch.array.any():
        return None
    nonzero = [np.flatnonzero(patch.array.any(axis=tuple(a for a in range(3) if a != axis)))
               for axis in range(3)]
    lo = [int(n[0]) for n in nonzero]
    hi = [int(n[-1]) + 1 for n in nonzero]
    return MaskPatch(tuple(s + l for s, l in zip(patch.start_kji, lo)),
                     patch.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])


def _union_patch(old: MaskPatch | None, new: MaskPatch | None) -> MaskPatch | None:
    """``new`` re-expressed over the box covering both, False outside ``new``."""
    if old is None or new is None:
        return new if new is not None else (
            None if old is None else MaskPatch(old.start_kji, np.zeros_like(old.array)))
    start = tuple(min(a, b) for a, b in zip(old.start_kji, new.start_kji))
    stop = tuple(max(a, b) for a, b in zip(old.stop_kji, new.stop_kji))
    array = np.zeros(tuple(b - a for a, b in zip(start, stop)), dtype=bool)
    offset = tuple(slice(n - s, n - s + d) for n, s, d in zip(new.start_kji, start, new.array.shape))
    array[offset] = new.array
    return MaskPatch(start, array)


class Engine:
    """Model + device + embedding cache, shared by the sessions of an application.

    Thread-safe: every model call and cache access holds one lock, so a GUI
    may run clicks on a worker thread. Model calls go through a ``ModelRunner``
    (on CUDA: CUDA-graph replays, ``compile``: torch.compile first); ``paster``
    (image, roi, low-res logits, box) -> MaskPatch evaluates a click's mask on
    the image grid (``roi.logits_to_patch``; the bench injects its own).
    """

    def __init__(self, model: str | Sam3D = "default", device: str = "auto",
                 precision: str = "auto", checkpoint=None, cache_size: int = 8,
                 cpu_fallback: bool = True, graphs: bool = True, compile: bool = False,
                 paster=logits_to_patch):
        self.device = resolve_device(device)
        if isinstance(model, Sam3D):
            self.model = model.eval().to(self.device)
        else:
            self.model = build_model(model, checkpoint=checkpoint, device=self.device)
        self.precision = self._choose_precision(precision)
        self._runner_options = {"graphs": graphs, "compile": compile}
        self.runner = self._new_runner()
        self.paster = paster
        self.cpu_fallback = cpu_fallback
        self.encoder_calls = 0
        self._lock = threading.RLock()
        # (id(image), roi) -> (image, embedding); holding the image keeps its id unique.
        self._cache: OrderedDict[tuple, tuple[sitk.Image, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._images: dict = {}

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
        return InteractiveSession(self, self.prepare_image(image), **options)

    def prepare_image(self, image: sitk.Image | str | Path) -> sitk.Image:
        """The validated float32 image for ``image``, made once per image object or path."""
        key = str(Path(image).resolve()) if isinstance(image, (str, Path)) else id(image)
        with self._lock:
            entry = self._images.get(key)
            if entry is None or (not isinstance(key, str) and entry[0] is not image):
                prepared = load_image(image) if isinstance(key, str) else validate_image(image)
                # Keeping the original alive keeps its id() from being reused.
                entry = (image, prepared)
                self._images[key] = entry
                while len(self._images) > self._cache_size:
                    self._images.pop(next(iter(self._images)))
            return entry[1]

    # -- model calls -------------------------------------------------------
    def _run(self, fn):
        """Run a model call; on CUDA out-of-memory fall back to the CPU (or say so)."""
        try:
            return fn(), False
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if not self.cpu_fallback:
                raise EngineError("the GPU ran out of memory; close other GPU programs or "
                                  "choose the CPU device") from None
            warnings.warn("GPU out of memory: continuing on the CPU", stacklevel=3)
            self.runner.release()
            torch.cuda.empty_cache()
            self.device = torch.device("cpu")
            self.model = self.model.to(self.device)
            self.precision = torch.float32
            self.runner = self._new_runner()
            self._cache.clear()
            return fn(), True

    def cached_rois(self, image: sitk.Image) -> list[RoiGeometry]:
        return [roi for key, roi in self._cache if key == id(image)]

    def embedding(self, image: sitk.Image, roi: RoiGeometry) -> tuple[torch.Tensor, bool]:
        """The ROI's image embedding, from the cache or computed; returns
        (embedding, computed_now)."""
        with self._lock:
            key = (id(image), roi)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][1], False
            crop = extract_roi(image, roi)

            volume = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
            embedding, _ = self._run(lambda: self.runner.encode(volume))
            self.encoder_calls += 1
            self._cache[key] = (image, embedding)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return embedding, True

    def decode(self, embedding: torch.Tensor, points_voxel: np.ndarray, labels: np.ndarray,
               mask_logits: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        with self._lock:
            points = torch.as_tensor(points_voxel, dtype=torch.float32)[None]
            lab = torch.as_tensor(labels, dtype=torch.int64)[None]
            (logits, iou), _ = self._run(lambda: self.runner.decode(embedding, points, lab, mask_logits))
            return logits, float(iou[0, 0])


def _resample_logits(logits: torch.Tensor, source: RoiGeometry, target: RoiGeometry) -> torch.Tensor:
    """Carry low-res logits (1, 1, s, s, s) of one ROI over to another ROI of the
    same size and spacing (a re-centred ROI keeps the mask prompt)."""
    s = logits.shape[-1]
    factor = source.size / s
    # Centres of the target's low-res cells, in the target's full-resolution voxels.
    cells = (torch.arange(s, dtype=torch.float64) + 0.5) * factor - 0.5
    grid = torch.stack(torch.meshgrid(cells, cells, cells, indexing="ij"), dim=-1).numpy()
    lps = target.voxel_to_lps(grid.reshape(-1, 3))
    src = (source.lps_to_voxel(lps) + 0.5) / factor        # source low-res cell units
    normalised = torch.from_numpy(2 * src / s - 1).float().reshape(1, s, s, s, 3)
    # grid_sample takes (x, y, z) = (last, middle, first) tensor axes.
    normalised = normalised.flip(-1).to(logits.device)
    outside = float(logits.min())
    shifted = F.grid_sample(logits - outside, normalised, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return shifted + outside


class InteractiveSession:
    """One object being segmented on one image.

    accumulate_clicks: pass every click to the decoder (SAM-Med3D's newer
    pipeline); False = only the newest click, as FastSAM3D's evaluation did.
    border_margin: a click closer than this many ROI voxels to the ROI border
    re-centres the ROI (and re-embeds).
    """

    def __init__(self, engine: Engine, image: sitk.Image | str | Path,
                 accumulate_clicks: bool = True, border_margin: int = 8):
        self.engine = engine
        self.image = engine.prepare_image(image)
        self.accumulate_clicks = accumulate_clicks
        self.border_margin = border_margin
        self._history: list[_State] = [_State((), None, None, None)]
        self._position = 0

    # -- state ---------------------------------------------------------------
    @property
    def _state(self) -> _State:
        return self._history[self._position]

    @property
    def clicks(self) -> list[Click]:
        return list(self._state.clicks)

    @property
    def roi(self) -> RoiGeometry | None:
        return self._state.roi

    @property
    def patch(self) -> MaskPatch | None:
        return self._state.patch

    def mask(self) -> np.ndarray:
        """The object's mask on the full image grid, (k, j, i) bool."""
        full = np.zeros(self.image.GetSize()[::-1], dtype=bool)
        if self._state.patch is not None:
            self._state.patch.paste_into(full)
        return full

    # -- clicks --------------------------------------------------------------
    def _choose_roi(self, p_lps: np.ndarray, clicks: tuple[Click, ...]) -> RoiGeometry:
        current = self._state.roi
        margin = self.border_margin
        if current is not None and current.contains(p_lps, margin):
            return current
        size, spacing = self.engine.roi_size, self.engine.spacing_mm
        if current is None:
            # A new object inside a region another object already embedded shares it.
            for cached in self.engine.cached_rois(self.image):
                if cached.size == size and cached.spacing == spacing and cached.contains(p_lps, 2 * margin):
                    return cached
            return roi_for_point(p_lps, size=size, spacing=spacing)
        # Re-centre on the span of the clicks if it fits, else on the new click.
        points = np.array([c.point_lps for c in clicks])
        centre = (points.min(0) + points.max(0)) / 2
        candidate = roi_for_point(centre, size=size, spacing=spacing)
        if all(candidate.contains(np.array(c.point_lps), margin) for c in clicks):
            return candidate
        return roi_for_point(p_lps, size=size, spacing=spacing)

    def add_click(self, point, positive: bool = True, space: str = "ras") -> ClickResult:
        """Add a +/- click and return the updated mask."""
        started = time.perf_counter()
        device_before = self.engine.device
        p_lps = point_to_lps(self.image, point, space)
        if not is_inside(self.image, p_lps):
            raise ImageError(f"the point {format_numbers(point, 2)} ({space}) "
                             "lies outside the image")
        with self.engine._lock:
            previous = self._state
            clicks = previous.clicks + (Click(tuple(float(v) for v in p_lps), bool(positive)),)
            roi = self._choose_roi(p_lps, clicks)
            embedding, computed = self.engine.embedding(self.image, roi)
            encoded = time.perf_counter()

            prompt = previous.low_res_logits
            if prompt is not None and previous.roi != roi:
                prompt = _resample_logits(prompt, previous.roi, roi)
            if prompt is None:
                # The official loops give an all-zero mask prompt on the first click.
                s = self.engine.model.low_res_size
                prompt = torch.zeros(1, 1, s, s, s, device=self.engine.device)
            used = clicks if self.accumulate_clicks else clicks[-1:]
            used = [c for c in used if roi.contains(np.array(c.point_lps), 0)]
            points = roi.lps_to_voxel(np.array([c.point_lps for c in used]))
            labels = np.array([int(c.positive) for c in used])
            logits, iou = self.engine.decode(embedding, points, labels, prompt)
            decoded = time.perf_counter()

            # Evaluated only on the box the mask can occupy, then cut to its content.
            box = positive_box_on_image(self.image, roi, logits[0, 0])
            new_patch = None if box is None else _crop_to_content(
                self.engine.paster(self.image, roi, logits[0, 0], box))
            state = _State(clicks, roi, logits, new_patch)
            self._history = self._history[:self._position + 1] + [state]
            self._position += 1
            patch = _union_patch(previous.patch, new_patch)
            done = time.perf_counter()
        return ClickResult(
            patch=patch, reembedded=computed,
            recentred=previous.roi is not None and roi != previous.roi, iou=iou, roi=roi,
            fell_back_to_cpu=device_before != self.engine.device,
            timings={"encode": encoded - started, "decode": decoded - encoded,
                     "paste": done - decoded, "total": done - started})

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._history) - 1

    def prefetch(self, point, space: str = "ras") -> bool:
        """Compute (or find cached) the embedding of the ROI a first click at
        ``point`` would use, so that click then costs one decoder pass; returns
        whether the encoder ran (False also for a point outside the image: a
        prefetch is only a hint). (Segment Editor's "Initialize".)"""
        p_lps = point_to_lps(self.image, point, space)
        if not is_inside(self.image, p_lps):
            return False
        with self.engine._lock:
            clicks = self._state.clicks + (Click(tuple(float(v) for v in p_lps), True),)
            return self.engine.embedding(self.image, self._choose_roi(p_lps, clicks))[1]

    def _move(self, step: int) -> ClickResult | None:
        target = self._position + step
        if not 0 <= target < len(self._history):
            return None
        old = self._state
        self._position = target
        new = self._state
        return ClickResult(patch=_union_patch(old.patch, new.patch), roi=new.roi)

    def undo(self) -> ClickResult | None:
        """Go back one click; None if there is nothing to undo."""
        with self.engine._lock:
            return self._move(-1)

    def redo(self) -> ClickResult | None:
        with self.engine._lock:
            return self._move(+1)

    def reset(self) -> ClickResult:
        """Forget every click (undoable); the cached embedding is kept."""
        with self.engine._lock:
            old = self._state
            empty = _State((), None, None, None)
            self._history = self._history[:self._position + 1] + [empty]
            self._position += 1
            return ClickResult(patch=_union_patch(old.patch, None))
