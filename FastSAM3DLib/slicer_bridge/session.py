"""``SegmentSession``: clicks in world RAS -> FastSAM3D -> one segment of a segmentation.

Every operation (a prompt: click, box, scribble or lasso; or undo, redo,
reset) is one ``Operation`` in two halves, so that a GUI runs the engine on a
worker thread and touches MRML only on the main thread; the module, the
Segment Editor effect and the web app all use it:

    operation = session.operation("click", ras, positive)    # main thread
    operation.compute()                                      # engine only: any thread
    info = operation.apply()                                 # MRML only: main thread

``session.run(kind, ...)`` (and ``add_click``/``add_box``/``add_scribble``/
``add_lasso``/``undo``/``redo``/``reset``) do all three in one call. Each
prompt is one undo step. An operation whose session was closed meanwhile (scene
closed, model or device changed, nodes removed) is dropped: ``apply`` returns
None and writes nothing.

The segment's content at the start of the session is its base layer: a write
sets the engine result's box to ``base | prediction`` (negative clicks take
base voxels away only where they removed predicted voxels), so voxels painted
before are never lost (the same for every prompt: a negative prompt is a
negative click); ``mode="replace"`` makes the box hold the prediction
only. Undo, redo and reset rewrite the box from the same rule, so they restore
the segment exactly. Edits made with other tools between two clicks are
folded into the base.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from .geometry import (ensure_reference_geometry, local_to_world, volume_array,
                       volume_to_image, world_ijk_to_ras)
from .writer import SegmentEditorLogicWriter, read_segment, segment_ids

MODES = ("add", "replace")
PROMPTS = ("click", "box", "scribble", "lasso")
OPERATIONS = PROMPTS + ("undo", "redo", "reset")


@dataclass
class SegmentUpdate:
    """What one operation did; timings in seconds."""
    operation: str                      # one of OPERATIONS
    changed: bool                       # something was written
    clicks: int                         # number of clicks now in the session
    reembedded: bool = False            # the engine (re)computed the ROI embedding
    iou: float | None = None
    box_kji: tuple | None = None        # (start_kji, stop_kji) of the written box
    timings: dict = field(default_factory=dict)   # engine, write, total (+ engine's own split)

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.timings.get("total", 0.0)


# -- shared engines and images -------------------------------------------------
_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()
_IMAGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_engine(model="default", device="auto", **options):
    """One engine per (model, device): the model is loaded once per process.
    Safe to call from a worker thread (it touches no MRML)."""
    from FastSAM3DLib.session import Engine
    if not isinstance(model, str):
        return Engine(model=model, device=device, **options)
    key = (model, device, tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = Engine(model=model, device=device, **options)
        return _ENGINES[key]


def forget_engines() -> None:
    with _ENGINES_LOCK:
        _ENGINES.clear()


def image_for_volume(engine, volume_node):
    """The engine image of a volume (voxels copied in their own pixel type),
    shared by all sessions of ``engine`` on this volume (so they share cached
    embeddings). Rebuilt when the voxels or the world geometry change. Main
    thread (reads MRML); the voxel checks run later, on the worker."""
    image_data = volume_node.GetImageData()
    key = (volume_node.GetID(), image_data.GetMTime() if image_data else 0,
           tuple(np.round(world_ijk_to_ras(volume_node), 9).ravel()))
    try:
        per_engine = _IMAGES.setdefault(engine, {})
    except TypeError:                   # engine not weak-referenceable
        per_engine = {}
    image = per_engine.get(key)
    if image is None:
        for stale in [k for k in per_engine if k[0] == key[0]]:
            engine.forget_image(per_engine.pop(stale))      # its embeddings show the old voxels
        image = volume_to_image(volume_node)
        per_engine[key] = image
    return image


class _Box:
    """A box of the volume grid: start and stop (k, j, i)."""

    def __init__(self, start, stop):
        self.start = tuple(int(v) for v in start)
        self.stop = tuple(int(v) for v in stop)

    @classmethod
    def of(cls, patch):
        return cls(patch.start_kji, np.add(patch.start_kji, np.shape(patch.array)))

    @property
    def shape(self):
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def union(self, other):
        if other is None:
            return self
        return _Box(np.minimum(self.start, other.start), np.maximum(self.stop, other.stop))

    def within(self, outer):
        """Slices of this box inside ``outer`` (which must contain it)."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start))


def _placed(patch, box: _Box) -> np.ndarray:
    """``patch`` (MaskPatch or None) on ``box``, False elsewhere."""
    out = np.zeros(box.shape, dtype=bool)
    if patch is not None:
        lo = np.maximum(patch.start_kji, box.start)
        hi = np.minimum(np.add(patch.start_kji, np.shape(patch.array)), box.stop)
        if np.all(hi > lo):
            src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, patch.start_kji))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, box.start))
            out[dst] = np.asarray(patch.array, dtype=bool)[src]
    return out


class _Mask:
    """A bool array over a box of the volume grid (a MaskPatch without torch)."""

    def __init__(self, start_kji, array):
        self.start_kji = tuple(int(v) for v in start_kji)
        self.array = array


def _points(values, name, minimum) -> np.ndarray:
    """World RAS points (N, 3), finite, at least ``minimum`` of them, or a clear error."""
    try:
        points = np.asarray(values, dtype=float).reshape(-1, 3)
    except (TypeError, ValueError):
        raise ValueError(f"a {name} needs RAS points (x, y, z)") from None
    if len(points) < minimum or not np.all(np.isfinite(points)):
        raise ValueError(f"a {name} needs at least {minimum} finite RAS point{'s' if minimum > 1 else ''}, "
                         f"got {len(points)}")
    return points


def _prompt_options(kind, options) -> dict:
    """The engine's keyword options of a prompt, checked; None values left out
    (the engine's defaults)."""
    allowed = {"click": (), "box": ("slice_axes", "thickness_mm"), "scribble": ("max_points",),
               "lasso": ("slice_axes", "thickness_mm")}[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"a {kind} takes no option {', '.join(unknown)}")
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "slice_axes":
            axes = np.asarray(value, dtype=float)
            if axes.shape != (2, 3) or not np.all(np.isfinite(axes)):
                raise ValueError(f"slice_axes must be two RAS directions (u, v), got {value!r}")
            value = tuple(tuple(float(c) for c in axis) for axis in axes)
        elif key == "thickness_mm":
            value = float(value)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"a {kind}'s thickness must be a positive number of mm, not {value!r}")
        elif key == "max_points":
            value = int(value)
            if value < 1:
                raise ValueError(f"max_points must be at least 1, not {value}")
        out[key] = value
    return out


class Operation:
    """One prompt, undo, redo or reset of a SegmentSession (see the module doc).

    ras: the prompt in world RAS: one point (click), two opposite corners
    (box), a polyline (scribble) or a closed curve (lasso). options: the
    engine's options of the prompt (box and lasso: slice_axes, thickness_mm;
    scribble: max_points).
    """

    def __init__(self, session: "SegmentSession", kind: str, ras=None, positive=True, **options):
        if kind not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, not {kind!r}")
        if kind == "click":
            ras = [float(v) for v in ras]
            if len(ras) != 3 or not np.all(np.isfinite(ras)):
                raise ValueError(f"a click needs 3 finite RAS coordinates, got {tuple(ras)}")
        elif kind == "box":
            ras = _points(ras, "box", 1)
            if len(ras) != 2:
                raise ValueError(f"a box needs two RAS corners, got {len(ras)} points")
            if not positive:
                raise ValueError("a box prompt is positive only: use a negative scribble or lasso to remove")
            ras = [tuple(float(v) for v in corner) for corner in ras]
        elif kind in ("scribble", "lasso"):
            ras = [tuple(float(v) for v in p) for p in _points(ras, kind, 3 if kind == "lasso" else 1)]
        self.options = _prompt_options(kind, options) if kind in PROMPTS else {}
        if kind not in PROMPTS and options:
            raise ValueError(f"{kind} takes no options")
        self.session = session
        self.kind = kind
        self.ras = ras
        self.positive = bool(positive)
        self.generation = session.generation
        self.result = None
        self.computed = False
        self.engine_seconds = 0.0

    @property
    def stale(self) -> bool:
        """The session was closed (or invalidated) after this operation was made."""
        return self.session.closed or self.session.generation != self.generation

    def compute(self) -> "Operation":
        """The engine half (any thread, no MRML). Skipped for a stale operation."""
        if self.stale:
            return self
        started = time.perf_counter()
        engine_session = self.session.engine_session
        if self.kind == "click":
            self.result = engine_session.add_click(self.ras, positive=self.positive, space="ras")
        elif self.kind == "box":
            self.result = engine_session.add_box(*self.ras, space="ras", **self.options)
        elif self.kind in ("scribble", "lasso"):
            self.result = getattr(engine_session, f"add_{self.kind}")(
                self.ras, positive=self.positive, space="ras", **self.options)
        else:
            self.result = getattr(engine_session, self.kind)()
        self.engine_seconds = time.perf_counter() - started
        self.computed = True
        return self

    def apply(self) -> SegmentUpdate | None:
        """The MRML half (main thread): writes the result. None when there was
        nothing to do (undo at the start, redo at the end) or the operation is
        stale (its session closed, its nodes removed)."""
        if self.stale or not self.computed or not self.session.nodes_alive():
            return None
        if self.result is None:
            return None
        return self.session._apply(self)


class SegmentSession:
    """Interactive FastSAM3D segmentation of one segment.

    volume_node: the image clicked on (scalar volume; linear parent transforms ok).
    segmentation_node, segment_id: where results go.
    engine: a ``FastSAM3DLib.session.Engine`` (default: a shared one for model/device).
    writer: a ``SegmentWriter`` (default: ``SegmentEditorLogicWriter``).
    overwrite_other_segments: only for the default writer (see writer.py).
    mode: "add" (the segment's earlier content stays) or "replace" (each
    result's box holds the prediction only).
    spacing: the crop spacing, "auto", "fixed" or mm (None: the engine's default; see
    ``FastSAM3DLib.session.RoiPolicy``).

    Building a session touches only MRML and copies the voxels; the engine's
    image checks and session are made on first use by an operation's compute
    (the worker thread), never on the main thread.
    """

    def __init__(self, volume_node, segmentation_node, segment_id, model="default", device="auto",
                 engine=None, writer=None, *, overwrite_other_segments=False, image=None, mode="add",
                 spacing=None):
        if volume_node is None or segmentation_node is None:
            raise ValueError("a volume node and a segmentation node are required")
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise KeyError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        volume_array(volume_node)               # scalar volume with voxels, or a clear error
        local_to_world(segmentation_node)       # linear, or a clear error
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.mode = mode
        self.engine = engine if engine is not None else get_engine(model, device)
        self.image = image if image is not None else image_for_volume(self.engine, volume_node)
        self._engine_session = None
        self._spacing = spacing
        self._prepare_lock = threading.Lock()
        ensure_reference_geometry(segmentation_node, volume_node)
        self._owns_writer = writer is None
        self.writer = writer if writer is not None else SegmentEditorLogicWriter(
            segmentation_node, segment_id, volume_node, overwrite_other_segments=overwrite_other_segments)
        self.generation = 0
        self.closed = False
        # The base layer and what the session last wrote, over the box of all writes.
        self._box: _Box | None = None
        self._base = None
        self._written = None
        self._prediction: _Mask | None = None
        # Base voxels taken away by negative clicks, per engine state (flat volume indices).
        self._erased = [np.zeros(0, np.int64)]
        self._position = 0
        # overwrite_other_segments: other segments' content of each written box, for undo.
        self._others_before = []

    # -- state ----------------------------------------------------------------
    @property
    def engine_session(self):
        """The engine's session, made on first use (image checks included):
        call it from the worker thread."""
        if self._engine_session is None:
            with self._prepare_lock:
                if self._engine_session is None:
                    self._engine_session = self.engine.new_session(self.image, spacing=self._spacing)
        return self._engine_session

    @property
    def clicks(self) -> list:
        return [] if self._engine_session is None else list(self._engine_session.clicks)

    @property
    def prompts(self) -> list:
        """The engine's prompts now in the session (a box, then the clicks, scribble and lasso points)."""
        return [] if self._engine_session is None else list(self._engine_session.prompts)

    def clicks_ras(self) -> list:
        """[(ras, positive), ...] of the current clicks, world RAS."""
        from .prompts import clicks_ras
        return [] if self._engine_session is None else clicks_ras(self._engine_session)

    @property
    def can_undo(self) -> bool:
        return self._engine_session is not None and bool(self._engine_session.can_undo)

    @property
    def can_redo(self) -> bool:
        return self._engine_session is not None and bool(self._engine_session.can_redo)

    def set_spacing(self, spacing) -> None:
        """The crop spacing from the next click on: "auto", "fixed", mm or None (the engine's)."""
        if spacing is not None:
            from FastSAM3DLib.session import parse_spacing
            parse_spacing(spacing)               # a clear error before anything changes
        with self._prepare_lock:
            self._spacing = spacing
            if self._engine_session is not None:
                self._engine_session.set_spacing(spacing)

    @property
    def touched_box(self):
        """(start_kji, stop_kji) covering every box this session wrote, or None."""
        return None if self._box is None else (self._box.start, self._box.stop)

    @property
    def overwrite_other_segments(self) -> bool:
        return bool(getattr(self.writer, "overwrite_other_segments", False))

    def nodes_alive(self) -> bool:
        """The volume, the segmentation and the segment are still in a scene."""
        return (self.volume_node.GetScene() is not None and self.segmentation_node.GetScene() is not None
                and self.segmentation_node.GetSegmentation().GetSegment(self.segment_id) is not None)

    # -- operations -------------------------------------------------------------
    def operation(self, kind, ras=None, positive=True, **options) -> Operation:
        """A prompt/undo/redo/reset to compute (worker) and then apply (main thread)."""
        return Operation(self, kind, ras, positive, **options)

    def run(self, kind, ras=None, positive=True, **options) -> SegmentUpdate | None:
        """An operation computed and applied on the calling thread."""
        return self.operation(kind, ras, positive, **options).compute().apply()

    def submit(self, worker, kind, ras=None, positive=True, **options):
        """An operation computed on ``worker`` (EngineWorker): a Future of the
        Operation, to ``apply()`` on the main thread once done."""
        return worker.submit(self.operation(kind, ras, positive, **options).compute)

    def add_click(self, ras, positive=True) -> SegmentUpdate:
        """Add a +/- click at world RAS ``ras`` and write the result."""
        return self.run("click", ras, positive)

    def add_box(self, corner_a, corner_b, slice_axes=None, thickness_mm=None) -> SegmentUpdate:
        """A box prompt in world RAS (``shapes.Box`` fields, so ``add_box(*box)``):
        axis-aligned, or with slice_axes a rectangle on a slice extruded by thickness_mm."""
        return self.run("box", (corner_a, corner_b), True, slice_axes=slice_axes, thickness_mm=thickness_mm)

    def add_scribble(self, points, positive=True, max_points=None) -> SegmentUpdate:
        """A +/- polyline in world RAS (N, 3); the engine resamples it to clicks."""
        return self.run("scribble", points, positive, max_points=max_points)

    def add_lasso(self, points, positive=True, slice_axes=None, thickness_mm=None) -> SegmentUpdate:
        """A closed curve on one slice in world RAS (N, 3): positive, its region
        (a slab thickness_mm thick) is the object; negative, its interior is taken away."""
        return self.run("lasso", points, positive, slice_axes=slice_axes, thickness_mm=thickness_mm)

    def undo(self) -> SegmentUpdate | None:
        return self.run("undo")

    def redo(self) -> SegmentUpdate | None:
        return self.run("redo")

    def reset(self) -> SegmentUpdate | None:
        """Forget all clicks and give the segment back its base (undoable)."""
        return self.run("reset")

    def prefetch(self, ras) -> bool:
        """Compute (and cache) the embedding of the region around world ``ras``
        before the first click, e.g. at "Initialize". Engine only: any thread.
        Returns whether the encoder ran (False: cached, or outside the image)."""
        if self.closed:
            return False
        return self.engine_session.prefetch([float(v) for v in ras], space="ras")

    # -- the MRML half ------------------------------------------------------------
    def _apply(self, operation: Operation) -> SegmentUpdate:
        started = time.perf_counter()
        result = operation.result
        kind = operation.kind
        patch = getattr(result, "patch", None)
        if patch is not None and np.asarray(patch.array).size == 0:
            patch = None
        if kind == "undo":
            self._position = max(self._position - 1, 0)
        elif kind == "redo":
            self._position = min(self._position + 1, len(self._erased) - 1)
        changed, box = False, None
        erased_delta = np.zeros(0, np.int64)
        if patch is not None or self._prediction is not None:
            negative = kind in PROMPTS and not operation.positive
            box, erased_delta = self._write(patch, kind, negative)
            changed = True
        if kind in PROMPTS or kind == "reset":
            erased = (np.zeros(0, np.int64) if kind == "reset"
                      else np.union1d(self._erased[self._position], erased_delta))
            del self._erased[self._position + 1:]
            self._erased.append(erased)
            self._position += 1
        write = time.perf_counter() - started
        timings = {"engine": operation.engine_seconds, "write": write,
                   "total": operation.engine_seconds + write}
        for k, v in (getattr(result, "timings", None) or {}).items():
            timings[f"engine_{k}"] = v
        return SegmentUpdate(operation=kind, changed=changed, clicks=len(self.clicks),
                         reembedded=bool(getattr(result, "reembedded", False)),
                         iou=getattr(result, "iou", None),
                         box_kji=None if box is None else (box.start, box.stop), timings=timings)

    def _grow(self, box: _Box) -> None:
        """Extend the base layer to cover ``box``: outside what the session
        wrote so far, the segment's content is the base."""
        grown = box.union(self._box)
        if self._box is not None and grown.shape == self._box.shape and grown.start == self._box.start:
            return
        fresh = read_segment(self.segmentation_node, self.segment_id, self.volume_node,
                             grown.start, grown.shape)
        base, written = fresh, fresh.copy()
        if self._box is not None:
            inner = self._box.within(grown)
            base[inner] = self._base
            written[inner] = self._written
        self._box, self._base, self._written = grown, base, written

    def _volume_shape(self):
        return tuple(int(v) for v in self.image.GetSize()[::-1])

    def _flat(self, box: _Box, mask: np.ndarray) -> np.ndarray:
        """Flat volume indices of the True voxels of ``mask`` over ``box``."""
        k, j, i = np.nonzero(mask)
        return np.ravel_multi_index((k + box.start[0], j + box.start[1], i + box.start[2]),
                                    self._volume_shape())

    def _unflat(self, box: _Box, flat: np.ndarray) -> np.ndarray:
        """The voxels of ``flat`` (flat volume indices) that lie in ``box``, as a mask."""
        out = np.zeros(box.shape, dtype=bool)
        if flat.size:
            shape = self._volume_shape()
            kji = np.unravel_index(flat, shape)
            local = [c - s for c, s in zip(kji, box.start)]
            inside = np.all([(c >= 0) & (c < n) for c, n in zip(local, box.shape)], axis=0)
            out[tuple(c[inside] for c in local)] = True
        return out

    def _write(self, patch, kind, negative):
        """Write ``base | prediction`` (see the module doc) over the box of the
        new and the previous prediction. Returns (box, base voxels erased now)."""
        box = _Box.of(patch) if patch is not None else None
        if self._prediction is not None:
            previous_box = _Box.of(self._prediction)
            box = previous_box if box is None else box.union(previous_box)
        self._grow(box)
        inner = box.within(self._box)
        base, written = self._base[inner], self._written[inner]
        # Edits made with other tools since the last write change the base.
        current = read_segment(self.segmentation_node, self.segment_id, self.volume_node,
                               box.start, box.shape)
        base |= current & ~written
        base &= ~(written & ~current)
        new = _placed(patch, box)
        old = _placed(self._prediction, box)
        erased_delta = np.zeros(0, np.int64)
        if negative:
            erased_delta = self._flat(box, base & old & ~new)
        if kind == "reset":
            erased = np.zeros(box.shape, dtype=bool)
        else:       # after an undo/redo, self._position is already the new state
            erased = self._unflat(box, np.union1d(self._erased[self._position], erased_delta))
        keep = np.zeros_like(base) if self.mode == "replace" else base & ~erased
        if self.overwrite_other_segments:
            self._record_others(kind, box)
        content = self.writer.apply(_Mask(box.start, new), keep=keep)
        written[...] = (keep | new) if content is None else content
        self._prediction = None if patch is None else _Mask(box.start, new)
        return box, erased_delta

    def _record_others(self, kind, box: _Box) -> None:
        """overwrite_other_segments: keep the other segments' content of the box
        before a click/redo/reset takes voxels from them; put it back at undo."""
        if kind == "undo":
            if self._others_before:
                start, crops = self._others_before.pop()
                for other, crop in crops.items():
                    self.writer.apply(_Mask(start, crop), segment_id=other, others="ignore")
            return
        crops = {}
        for other in segment_ids(self.segmentation_node):
            if other != self.segment_id:
                crop = read_segment(self.segmentation_node, other, self.volume_node, box.start, box.shape)
                if crop.any():
                    crops[other] = crop
        self._others_before.append((box.start, crops))

    def mask(self) -> np.ndarray:
        """The segment on the volume grid, bool (k, j, i)."""
        return read_segment(self.segmentation_node, self.segment_id, self.volume_node)

    def close(self) -> None:
        """Drop pending operations and release the writer's helper nodes; the
        segment keeps its content."""
        self.closed = True
        self.generation += 1
        if self._owns_writer and hasattr(self.writer, "close"):
            self.writer.close()
