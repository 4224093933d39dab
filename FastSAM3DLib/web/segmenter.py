"""What the web app does, without the web page: volumes, one segmentation per
volume, one ``SegmentSession`` per segment, an undo history, export.

All segmentation logic is the bridge's (``FastSAM3DLib.slicer_bridge``): the
same SegmentSession, SegmentEditorLogicWriter (other segments are never
erased), export_labelmap and engine cache as the 3D Slicer module. This class
only wires them to a trame-slicer ``SlicerApp``. It needs no browser: the
in-process tests drive it with offscreen views and injected mouse events.

Engine calls run on one worker thread (``EngineWorker``) when an asyncio loop
is running (the trame server); MRML is only touched on the loop's thread.
Without a running loop (tests, scripts) every operation runs synchronously.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from FastSAM3DLib.session import EngineError
from FastSAM3DLib.slicer_bridge import (SegmentUpdate, EngineWorker, Operation, PromptPoints, SegmentSession,
                                        export_labelmap, get_engine, read_segment)
from FastSAM3DLib.slicer_bridge.export import LABELMAP_SUFFIXES
from FastSAM3DLib.slicer_bridge.session import PROMPTS
from FastSAM3DLib.slicer_bridge.shapes import slice_drag_prompt

from .effect import TOOLS, FastSAM3DEffect
from .uploads import MAX_UPLOAD_BYTES, UploadError, display_name, save_uploads

SEGMENT_COLOURS = [(0.95, 0.65, 0.15), (0.25, 0.60, 1.00), (0.90, 0.30, 0.65),
                   (0.30, 0.85, 0.85), (0.95, 0.90, 0.25), (0.60, 0.40, 0.95)]
EXPORT_FORMATS = (".nii.gz", ".nrrd")
CLOSED_SURFACE = "Closed surface"
SURFACE_DELAY_S = 0.4


def colour_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(255 * c))):02x}" for c in rgb[:3])


@dataclass
class _Plan:
    key: tuple
    operation: Operation             # the bridge's prompt/undo/redo/reset (compute, then apply)

    @property
    def kind(self) -> str:
        return self.operation.kind

    @property
    def session(self) -> SegmentSession:
        return self.operation.session


class WebSegmenter:
    """slicer_app: a ``trame_slicer.core.SlicerApp`` (views registered by the caller).
    model/device: as ``Engine``; or ``engine``: a ready Engine (tests).
    """

    def __init__(self, slicer_app, model="default", device="auto", engine=None,
                 show_3d_surfaces=True, spacing=None):
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.editor = slicer_app.segmentation_editor
        self.model = model
        self.device = device
        self.spacing = spacing                     # crop spacing: None (model default), auto, fixed, mm
        self.show_3d_surfaces = show_3d_surfaces
        self.worker = EngineWorker("FastSAM3D-web-engine")
        self._engine = engine
        self._engine_given = engine is not None
        self._engine_future: Future | None = None
        self.engine_notes: list[str] = []          # e.g. "random model" warnings
        self.volumes: list = []                    # loaded volume nodes, in order
        self.volume = None                         # the one shown
        self._segmentations: dict = {}             # volume id -> segmentation node
        self._sessions: dict = {}                  # (volume id, segmentation id, segment id) -> session
        self._history: dict = {}                   # volume id -> [session key, ...] (undo order)
        self._redo: dict = {}                      # volume id -> [session key, ...]
        self.last: SegmentUpdate | None = None         # the last prompt
        self.last_operation: SegmentUpdate | None = None
        self.revision = 0                          # +1 after every applied operation
        self.busy = False
        self.error = ""
        self.listeners: list[Callable[[], None]] = []
        self._lock: asyncio.Lock | None = None
        self._tasks: set = set()
        self._surface_jobs: dict = {}              # segmentation id -> pending asyncio handle
        self._tool_active = True
        self.editor.register_effect_type(FastSAM3DEffect)
        self.effect: FastSAM3DEffect = self.editor.get_effect(FastSAM3DEffect)
        self.effect.on_prompt = self._on_view_prompt
        self.prompts = PromptPoints(self.scene)

    # -- engine ----------------------------------------------------------------
    def engine_future(self) -> Future:
        """The engine, loaded once on the worker thread (started at once)."""
        if self._engine_future is None:
            if self._engine is not None:
                self._engine_future = Future()
                self._engine_future.set_result(self._engine)
            else:
                self._engine_future = self.worker.submit(self._load_engine)
        return self._engine_future

    def _load_engine(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = get_engine(self.model, self.device)
        self.engine_notes = [str(w.message) for w in caught]
        return engine

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.engine_future().result()
        return self._engine

    @property
    def engine_ready(self) -> bool:
        return self._engine is not None or (self._engine_future is not None and self._engine_future.done()
                                            and self._engine_future.exception() is None)

    @property
    def device_description(self) -> str:
        future = self._engine_future
        if self._engine is None and future is not None and future.done() and future.exception() is not None:
            return f"the model could not be loaded: {str(future.exception()).splitlines()[0]}"
        if not self.engine_ready:
            return "loading the model..."
        return self.engine.device_description

    # -- volumes ---------------------------------------------------------------
    def load_volume(self, path, name=None, show=True):
        """Load a scan (NIfTI, NRRD, MHA; a folder or list of DICOM files)."""
        paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
        if len(paths) == 1 and Path(paths[0]).is_dir():
            paths = sorted(str(p) for p in Path(paths[0]).iterdir() if p.is_file())
        nodes = self.app.io_manager.load_volumes(paths)
        if not nodes:
            raise ValueError(f"could not read an image from {display_name(Path(paths[0]).name, 'the file')}")
        node = nodes[-1]
        node.SetName(name or display_name(Path(paths[0]).name))
        self.volumes.append(node)
        if show:
            self.show_volume(node)
        return node

    def load_uploads(self, files, max_bytes=MAX_UPLOAD_BYTES) -> list:
        """Browser files -> volumes. They are written under generated names into
        a temporary folder that is deleted once they are read."""
        with tempfile.TemporaryDirectory(prefix="fastsam3d-upload-") as tmp:
            saved = save_uploads(files, tmp, max_bytes=max_bytes)
            if all(p.suffix == ".dcm" for p, _ in saved):
                groups = [([p for p, _ in saved], saved[0][1])]      # one DICOM series
            else:
                if any(p.suffix == ".dcm" for p, _ in saved):
                    raise UploadError("upload either one DICOM series (.dcm files) or image files, not both")
                groups = [([p], label) for p, label in saved]
            nodes = [self.load_volume(paths, name=label, show=False) for paths, label in groups]
        self.show_volume(nodes[-1])
        return nodes

    def volume_by_id(self, node_id):
        return next((v for v in self.volumes if v.GetID() == node_id), None)

    def show_volume(self, volume) -> None:
        """Show ``volume`` in the slice views, with its own segmentation."""
        self.volume = volume
        display = self.app.display_manager
        display.show_volume_in_slice_background(volume)
        display.show_volume_in_slice_foreground(None)
        for view in self.app.view_manager.get_slice_views():
            view.set_visible_in_3d(True)           # the 3D view shows the three planes + the segments
        display.reset_views()
        segmentation = self._segmentations.get(volume.GetID())
        if segmentation is None:
            segmentation = self.editor.create_empty_segmentation_node()
            segmentation.SetName(f"{volume.GetName()} segmentation")
            self._segmentations[volume.GetID()] = segmentation
        for node in self._segmentations.values():
            if node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(node is segmentation)
        self.editor.set_active_segmentation(segmentation, volume)
        if self.show_3d_surfaces:
            self.editor.set_surface_representation_enabled(True)
        if not self.segment_ids():
            self.add_segment()
        self._apply_tool_state()
        self._show_prompts()
        self._notify()

    @property
    def segmentation(self):
        return self._segmentations.get(self.volume.GetID()) if self.volume is not None else None

    # -- segments --------------------------------------------------------------
    def segment_ids(self) -> list[str]:
        if self.volume is None:                # the editor may still hold a cleared segmentation
            return []
        return list(self.editor.get_segment_ids())

    @property
    def segment_id(self) -> str:
        if self.volume is None:
            return ""
        return self.editor.get_active_segment_id() or ""

    def add_segment(self, name=None) -> str:
        if self.volume is None:
            raise ValueError("load a scan first")
        n = len(self.segment_ids())
        segment_id = self.editor.add_empty_segment(
            segment_name=name or f"Segment {n + 1}",
            segment_color=list(SEGMENT_COLOURS[n % len(SEGMENT_COLOURS)]))
        self.select_segment(segment_id)
        return segment_id

    def select_segment(self, segment_id) -> None:
        if segment_id not in self.segment_ids():
            raise KeyError(f"no segment '{segment_id}'")
        self.editor.set_active_segment_id(segment_id)
        self._apply_tool_state()
        self._show_prompts()
        self._notify()

    def segments(self) -> list[dict]:
        """Rows of the segment list."""
        rows = []
        segmentation = self.segmentation
        for segment_id in self.segment_ids():
            segment = segmentation.GetSegmentation().GetSegment(segment_id)
            session = self._sessions.get(self._key(segment_id))
            rows.append({"id": segment_id, "name": segment.GetName(), "color": colour_hex(segment.GetColor()),
                         "voxels": self.voxel_count(segment_id),
                         "clicks": len(session.clicks) if session else 0})
        return rows

    def voxel_count(self, segment_id=None) -> int:
        """Voxels of a segment. Everything in a segment was written by its
        session, so counting inside the session's written box is enough."""
        segment_id = segment_id or self.segment_id
        session = self._sessions.get(self._key(segment_id))
        if session is None or session.touched_box is None:
            return 0
        start, stop = session.touched_box
        shape = tuple(b - a for a, b in zip(start, stop))
        return int(read_segment(self.segmentation, segment_id, self.volume, start, shape).sum())

    # -- the FastSAM3D tool ------------------------------------------------------
    @property
    def tool_active(self) -> bool:
        return self._tool_active

    @tool_active.setter
    def tool_active(self, on) -> None:
        self._tool_active = bool(on)
        self._apply_tool_state()
        self._notify()

    @property
    def negative(self) -> bool:
        return self.effect.negative

    @negative.setter
    def negative(self, on) -> None:
        self.effect.negative = bool(on)
        self._notify()

    @property
    def prompt_tool(self) -> str:
        """What a drag or click in a slice view draws: one of effect.TOOLS."""
        return self.effect.tool

    @prompt_tool.setter
    def prompt_tool(self, tool) -> None:
        if tool not in TOOLS:
            raise ValueError(f"the prompt tool must be one of {', '.join(TOOLS)}, not {tool!r}")
        self.effect.tool = tool
        self._notify()

    def _apply_tool_state(self) -> None:
        if self._tool_active and self.segment_id:
            self.editor.set_active_effect(self.effect)
        else:
            self.editor.deactivate_effect()

    def _on_view_prompt(self, tool, slice_node, points, positive) -> None:
        """A click or drag in a slice view, as world RAS points on its slice."""
        try:
            if tool == "point":
                self.click(points[-1], positive)
            else:
                kind, ras, positive, options = slice_drag_prompt(tool, slice_node, points, positive)
                self._prompt(kind, ras, positive, **options)
        except (ValueError, EngineError) as exc:    # e.g. a box without a drag: shown, nothing changes
            self.error = str(exc)
            self._notify()

    # -- sessions ----------------------------------------------------------------
    def _key(self, segment_id):
        if self.volume is None:
            return None
        return (self.volume.GetID(), self.segmentation.GetID(), segment_id)

    def session(self, create=True) -> SegmentSession | None:
        """The session of the selected segment."""
        return self._session_for(self._key(self.segment_id), create)

    def _session_for(self, key, create=True) -> SegmentSession | None:
        if key is None or not key[2]:
            return None
        session = self._sessions.get(key)
        if session is None and create:
            volume, segmentation = self.volume_by_id(key[0]), self._segmentations.get(key[0])
            if volume is None or segmentation is None or segmentation.GetID() != key[1] \
                    or segmentation.GetSegmentation().GetSegment(key[2]) is None:
                return None                    # gone meanwhile
            session = SegmentSession(volume, segmentation, key[2], engine=self.engine, spacing=self.spacing)
            self._sessions[key] = session
        return session

    def set_spacing(self, spacing) -> None:
        """Crop spacing of every segment from its next click: None (the model's default),
        "auto", "fixed" or mm."""
        if spacing is not None:
            from FastSAM3DLib.session import parse_spacing
            spacing = parse_spacing(spacing)
        self.spacing = spacing
        for session in self._sessions.values():
            session.set_spacing(spacing)

    @property
    def can_undo(self) -> bool:
        return bool(self.volume is not None and self._history.get(self.volume.GetID()))

    @property
    def can_redo(self) -> bool:
        return bool(self.volume is not None and self._redo.get(self.volume.GetID()))

    # -- operations (prompts, undo, redo, reset) ------------------------------------
    def click(self, ras, positive=True):
        """A positive/negative point at world RAS on the selected segment.
        Returns the SegmentUpdate (synchronous) or an asyncio Task (in the server)."""
        return self._prompt("click", [float(v) for v in ras], positive)

    def box(self, corner_a, corner_b, slice_axes=None, thickness_mm=None, positive=True):
        """A box prompt in world RAS (``shapes.Box`` fields); positive only."""
        return self._prompt("box", (corner_a, corner_b), positive, slice_axes=slice_axes,
                            thickness_mm=thickness_mm)

    def scribble(self, points, positive=True):
        return self._prompt("scribble", points, positive)

    def lasso(self, points, positive=True, slice_axes=None):
        return self._prompt("lasso", points, positive, slice_axes=slice_axes)

    def _prompt(self, kind, ras, positive, **options):
        # the segment selected now, even if the prompt waits behind another operation
        return self._operate(kind, ras=ras, positive=bool(positive), options=options,
                             key=self._key(self.segment_id))

    def undo(self):
        return self._operate("undo")

    def redo(self):
        return self._operate("redo")

    def reset(self):
        """Clear the selected segment's clicks and what they wrote (undoable)."""
        return self._operate("reset")

    def _operate(self, kind, **kw):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            plan = self._plan(kind, kw)
            if plan is None:
                return None
            plan.operation.compute()
            return self._finish(plan)
        task = loop.create_task(self._operate_async(kind, kw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _operate_async(self, kind, kw):
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:                 # one operation at a time, in order
            self._set_busy(True)
            try:
                if self._engine is None:
                    self._engine = await asyncio.wrap_future(self.engine_future())
                plan = self._plan(kind, kw)
                if plan is None:
                    return None
                await asyncio.wrap_future(self.worker.submit(plan.operation.compute))
                return self._finish(plan)
            except Exception as exc:           # shown in the page; the server goes on
                self.error = f"{kind} failed: {exc}"
                self._notify()
                return None
            finally:
                self._set_busy(False)

    def _plan(self, kind, kw) -> _Plan | None:
        if self.volume is None:
            return None
        history = self._history.setdefault(self.volume.GetID(), [])
        redo = self._redo.setdefault(self.volume.GetID(), [])
        if kind in PROMPTS:
            session = self._session_for(kw["key"], create=True)
            if session is None:
                return None
            return _Plan(kw["key"], session.operation(kind, kw["ras"], kw["positive"], **kw["options"]))
        if kind == "reset":
            session = self.session(create=False)
            if session is None or not session.prompts:
                return None
            return _Plan(self._key(self.segment_id), session.operation("reset"))
        stack = history if kind == "undo" else redo
        while stack and stack[-1] not in self._sessions:      # segment gone
            stack.pop()
        if not stack:
            return None
        key = stack[-1]
        return _Plan(key, self._sessions[key].operation(kind))

    def _finish(self, plan: _Plan) -> SegmentUpdate | None:
        surfaces = self._pause_surfaces(plan.session.segmentation_node)
        try:
            info = plan.operation.apply()
        finally:
            if surfaces:
                self._resume_surfaces(plan.session.segmentation_node)
        history = self._history.setdefault(plan.key[0], [])
        redo = self._redo.setdefault(plan.key[0], [])
        if plan.kind in PROMPTS or plan.kind == "reset":
            history.append(plan.key)
            redo.clear()
        elif plan.kind == "undo":
            history.pop()
            if info is not None:
                redo.append(plan.key)
        else:
            redo.pop()
            if info is not None:
                history.append(plan.key)
        shown = self.volume is not None and plan.key[0] == self.volume.GetID()
        if shown and plan.key[2] != self.segment_id and plan.key[2] in self.segment_ids():
            self.editor.set_active_segment_id(plan.key[2])     # show what changed
            self._apply_tool_state()
        if info is not None:
            self.last_operation = info
            if plan.kind in PROMPTS:
                self.last = info
        self.error = ""
        self.revision += 1
        self._show_prompts()
        self._notify()
        return info

    # -- 3D surfaces -----------------------------------------------------------------
    # The 3D view shows closed surfaces made from the labelmaps. Slicer remakes them on
    # every change of a segment, i.e. twice per write (remove box, add mask), which costs
    # far more than the write. So they are dropped during the write and remade once
    # afterwards; in the server a moment later, so that the slice views update first.
    def _pause_surfaces(self, segmentation_node) -> bool:
        segmentation = segmentation_node.GetSegmentation()
        wanted = segmentation_node.GetID() in self._surface_jobs
        if segmentation.ContainsRepresentation(CLOSED_SURFACE):
            segmentation.RemoveRepresentation(CLOSED_SURFACE)
            wanted = True
        return wanted

    def _resume_surfaces(self, segmentation_node) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        node_id = segmentation_node.GetID()
        if node_id in self._surface_jobs:
            self._surface_jobs.pop(node_id).cancel()
        if loop is None:
            self._make_surfaces(segmentation_node)
        else:
            self._surface_jobs[node_id] = loop.call_later(
                SURFACE_DELAY_S, self._make_surfaces, segmentation_node)

    def _make_surfaces(self, segmentation_node) -> None:
        pending = self._surface_jobs.pop(segmentation_node.GetID(), None) is not None
        if segmentation_node.GetScene() is not None:
            segmentation_node.CreateClosedSurfaceRepresentation()
        if pending:
            self._notify()                     # "3D up to date"

    # -- export ------------------------------------------------------------------
    def export_name(self, suffix=".nii.gz") -> str:
        base = display_name(self.volume.GetName() if self.volume is not None else "", "scan")
        return f"{base}-segmentation{suffix}"

    def export_bytes(self, suffix=".nii.gz") -> tuple[str, bytes, dict]:
        """The visible segments as one labelmap file on the scan's grid (label n =
        n-th segment): (download name, file bytes, {label: segment name})."""
        if suffix not in EXPORT_FORMATS or suffix not in LABELMAP_SUFFIXES:
            raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}")
        if self.volume is None:
            raise ValueError("load a scan first")
        with tempfile.TemporaryDirectory(prefix="fastsam3d-export-") as tmp:
            info = export_labelmap(self.segmentation, self.volume, Path(tmp) / f"labels{suffix}")
            return self.export_name(suffix), info.path.read_bytes(), info.labels

    # -- display helpers -----------------------------------------------------------
    def _show_prompts(self) -> None:
        session = self.session(create=False)
        self.prompts.show(session.clicks_ras() if session is not None else [])

    def _set_busy(self, busy) -> None:
        self.busy = bool(busy)
        self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def status(self) -> dict:
        """What the page shows: latency of the last prompt, device, state."""
        last = self.last
        return {
            "last_prompt": last.operation if last else None,
            "prompt_tool": self.prompt_tool,
            "latency_ms": round(last.latency_ms, 1) if last else None,
            "engine_ms": round(1000 * last.timings.get("engine", 0.0), 1) if last else None,
            "write_ms": round(1000 * last.timings.get("write", 0.0), 1) if last else None,
            "reembedded": bool(last.reembedded) if last else False,
            "device": self.device_description,
            "model": self.model_label(),
            "notes": list(self.engine_notes),
            "revision": self.revision,
            "surfaces_pending": bool(self._surface_jobs),
            "busy": self.busy,
            "error": self.error,
            "can_undo": self.can_undo,
            "can_redo": self.can_redo,
        }

    def model_label(self) -> str:
        """The model's name for the page: a weights file by its file name only."""
        if self._engine_given:
            config = getattr(getattr(self._engine, "model", None), "config", None)
            return getattr(config, "name", "custom")
        name = str(self.model)
        return Path(name).name if ("/" in name or "\\" in name) else name

    def clear(self) -> None:
        """Forget every scan, segmentation, click and undo step: the scene as
        before the first scan (the next browser session must see nothing of
        the previous one). Operations still running are cancelled."""
        for task in list(self._tasks):
            task.cancel()
        for handle in self._surface_jobs.values():
            handle.cancel()
        self._surface_jobs.clear()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._history.clear()
        self._redo.clear()
        self.prompts.clear()
        self.editor.deactivate_effect()
        self.app.display_manager.show_volume_in_slice_background(None)
        for node in [*self._segmentations.values(), *self.volumes]:
            self.scene.RemoveNode(node)        # MRML removes its display and storage nodes with it
        self._segmentations.clear()
        self.volumes.clear()
        self.volume = None
        self.last = self.last_operation = None
        self.revision = 0
        self.busy = False
        self.error = ""
        self._tool_active = True
        self.effect.negative = False
        self.effect.tool = "point"
        self._notify()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self.prompts.close()
        self.worker.shutdown()


def safe_label(text, default="Segment") -> str:
    """A segment name typed in the browser, trimmed to something printable."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text or "")).strip()[:64]
    return text or default
