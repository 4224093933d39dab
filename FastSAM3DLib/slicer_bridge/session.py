"""``SegmentSession``: clicks in world RAS -> FastSAM3D -> one segment of a segmentation.

Every operation comes in two halves so that a GUI can run the engine on a
worker thread and touch MRML only on the main thread:

    result = session.compute_click(ras, positive)   # engine only: any thread
    info = session.apply_click(result)               # MRML only: main thread

``add_click``/``undo``/``redo``/``reset`` do both in one call.

Undo restores the segment's content exactly as it was before the click
(a copy of the box is kept per click), so content that was in the segment
before the session started is not lost.
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


@dataclass
class SegmentUpdate:
    """What one operation did; timings in seconds."""
    operation: str                      # "click", "undo", "redo", "reset"
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
    """The engine image of a volume, shared by all sessions of ``engine`` on
    this volume (so they share cached embeddings). Rebuilt when the voxels or
    the world geometry change. Main thread (reads MRML)."""
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


def _pack(array: np.ndarray):
    return (array.shape, np.packbits(array, axis=None))


def _unpack(packed) -> np.ndarray:
    shape, bits = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


class _Patch:
    """Minimal MaskPatch (start_kji, array) for restores."""

    def __init__(self, start_kji, array):
        self.start_kji = tuple(int(v) for v in start_kji)
        self.array = array

    @property
    def stop_kji(self):
        return tuple(s + n for s, n in zip(self.start_kji, self.array.shape))


class SegmentSession:
    """Interactive FastSAM3D segmentation of one segment.

    volume_node: the image clicked on (scalar volume; linear parent transforms ok).
    segmentation_node, segment_id: where results go.
    engine: a ``FastSAM3DLib.session.Engine`` (default: a shared one for model/device).
    writer: a ``SegmentWriter`` (default: ``SegmentEditorLogicWriter``).
    overwrite_other_segments: only for the default writer (see writer.py).
    spacing: the crop spacing, "auto", "fixed" or mm (None: the engine's default; see
    ``FastSAM3DLib.session.RoiPolicy``).
    """

    def __init__(self, volume_node, segmentation_node, segment_id, model="default", device="auto",
                 engine=None, writer=None, *, overwrite_other_segments=False, image=None, spacing=None):
        if volume_node is None or segmentation_node is None:
            raise ValueError("a volume node and a segmentation node are required")
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise KeyError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        volume_array(volume_node)               # scalar volume with voxels, or a clear error
        local_to_world(segmentation_node)       # linear, or a clear error
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.engine = engine if engine is not None else get_engine(model, device)
        self.image = image if image is not None else image_for_volume(self.engine, volume_node)
        self._session = self.engine.new_session(self.image, spacing=spacing)
        ensure_reference_geometry(segmentation_node, volume_node)
        self._owns_writer = writer is None
        self.writer = writer if writer is not None else SegmentEditorLogicWriter(
            segmentation_node, segment_id, volume_node, overwrite_other_segments=overwrite_other_segments)
        self._before = []          # per applied click/redo/reset: (start, {segment_id: packed}) or None
        self._touched = None       # (start_kji, stop_kji) union of everything written

    # -- state ----------------------------------------------------------------
    @property
    def clicks(self) -> list:
        return list(self._session.clicks)

    def clicks_ras(self) -> list:
        """[(ras, positive), ...] of the current clicks, world RAS."""
        from .prompts import clicks_ras
        return clicks_ras(self._session)

    @property
    def engine_session(self):
        return self._session

    @property
    def can_undo(self) -> bool:
        return len(self._before) > 0

    def set_spacing(self, spacing) -> None:
        """The crop spacing from the next click on: "auto", "fixed", mm or None (the engine's)."""
        self._session.set_spacing(spacing)

    @property
    def touched_box(self):
        """(start_kji, stop_kji) covering every box this session wrote, or None."""
        return self._touched

    @property
    def overwrite_other_segments(self) -> bool:
        return bool(getattr(self.writer, "overwrite_other_segments", False))

    # -- engine halves (any thread; no MRML) -------------------------------------
    def compute_click(self, ras, positive=True):
        ras = [float(v) for v in ras]
        if len(ras) != 3 or not np.all(np.isfinite(ras)):
            raise ValueError(f"a click needs 3 finite RAS coordinates, got {ras}")
        return self._timed(self._session.add_click, ras, positive=bool(positive), space="ras")

    def compute_undo(self):
        return self._timed(self._session.undo)

    def compute_redo(self):
        return self._timed(self._session.redo)

    def compute_reset(self):
        return self._timed(self._session.reset)

    def prefetch(self, ras) -> bool:
        """Compute (and cache) the embedding of the region around world ``ras``
        before the first click, e.g. at "Initialize". Engine only: any thread.
        Returns whether the encoder ran (False: cached, or outside the image)."""
        return self._session.prefetch([float(v) for v in ras], space="ras")

    @staticmethod
    def _timed(fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        if result is not None:
            result._bridge_engine_seconds = time.perf_counter() - started
        return result

    # -- MRML halves (main thread) ---------------------------------------------
    def apply_click(self, result, operation="click") -> SegmentUpdate:
        started = time.perf_counter()
        patch = getattr(result, "patch", None) if result is not None else None
        if patch is None or np.asarray(patch.array).size == 0:
            self._before.append(None)
            changed = False
            box = None
        else:
            self._before.append(self._snapshot(patch))
            self.writer.save_undo_state()
            self.writer.apply(patch)
            changed = True
            box = (tuple(patch.start_kji), tuple(patch.stop_kji))
            self._grow_touched(box)
        return self._info(operation, result, changed, box, started)

    def apply_undo(self, result) -> SegmentUpdate:
        """Restore the segment as it was before the undone operation."""
        started = time.perf_counter()
        changed, box = False, None
        if result is not None and self._before:
            saved = self._before.pop()
            if saved is not None:
                start, crops = saved
                self.writer.save_undo_state()
                for segment_id, packed in crops.items():
                    patch = _Patch(start, _unpack(packed))
                    self._restore(patch, segment_id)
                    box = (patch.start_kji, patch.stop_kji)
                changed = True
        elif result is not None and getattr(result, "patch", None) is not None:
            # No snapshot (history out of step): fall back to the engine's state.
            self.writer.save_undo_state()
            self.writer.apply(result.patch)
            changed, box = True, (tuple(result.patch.start_kji), tuple(result.patch.stop_kji))
        return self._info("undo", result, changed, box, started)

    def _restore(self, patch, segment_id):
        """Put a saved box back exactly (no masking, no overwriting)."""
        if isinstance(self.writer, SegmentEditorLogicWriter):
            self.writer.apply(patch, segment_id=segment_id, others="ignore")
        elif segment_id == self.segment_id:
            self.writer.apply(patch)

    def _snapshot(self, patch):
        """Copy of the box of this segment (and, when other segments may be
        overwritten, of the others that have voxels there)."""
        start = tuple(int(v) for v in patch.start_kji)
        shape = np.asarray(patch.array).shape
        crops = {self.segment_id: _pack(read_segment(self.segmentation_node, self.segment_id,
                                                     self.volume_node, start, shape))}
        if self.overwrite_other_segments:
            for other in segment_ids(self.segmentation_node):
                if other != self.segment_id:
                    crop = read_segment(self.segmentation_node, other, self.volume_node, start, shape)
                    if crop.any():
                        crops[other] = _pack(crop)
        return start, crops

    def _grow_touched(self, box):
        if self._touched is None:
            self._touched = box
        else:
            self._touched = (tuple(min(a, b) for a, b in zip(self._touched[0], box[0])),
                             tuple(max(a, b) for a, b in zip(self._touched[1], box[1])))

    def _info(self, operation, result, changed, box, started) -> SegmentUpdate:
        write = time.perf_counter() - started
        engine_s = getattr(result, "_bridge_engine_seconds", 0.0) if result is not None else 0.0
        timings = {"engine": engine_s, "write": write, "total": engine_s + write}
        for k, v in (getattr(result, "timings", None) or {}).items():
            timings[f"engine_{k}"] = v
        return SegmentUpdate(operation=operation, changed=changed, clicks=len(self._session.clicks),
                             reembedded=bool(getattr(result, "reembedded", False)),
                             iou=getattr(result, "iou", None), box_kji=box, timings=timings)

    # -- both halves -------------------------------------------------------------
    def add_click(self, ras, positive=True) -> SegmentUpdate:
        """Add a +/- click at world RAS ``ras`` and write the result."""
        return self.apply_click(self.compute_click(ras, positive))

    def undo(self) -> SegmentUpdate | None:
        result = self.compute_undo()
        return None if result is None else self.apply_undo(result)

    def redo(self) -> SegmentUpdate | None:
        result = self.compute_redo()
        return None if result is None else self.apply_click(result, "redo")

    def reset(self) -> SegmentUpdate:
        """Forget all clicks and clear what they wrote (undoable)."""
        return self.apply_click(self.compute_reset(), "reset")

    def mask(self) -> np.ndarray:
        """The segment on the volume grid, bool (k, j, i)."""
        return read_segment(self.segmentation_node, self.segment_id, self.volume_node)

    def close(self) -> None:
        """Release the writer's helper nodes; the segment keeps its content."""
        if self._owns_writer and hasattr(self.writer, "close"):
            self.writer.close()
