"""``fastsam3d web``: the trame-slicer page over ``WebSegmenter``.

Four views (axial + 3D on top, sagittal + coronal below), a side panel with
the scans, the segment list, the FastSAM3D tool (points: left click adds,
right click removes, or the "negative" switch; box, scribble and lasso: drag
in a slice view), undo/redo, export, and the latency of the last prompt with
the device it ran on. This file is only the page: what
happens on a click is ``segmenter.WebSegmenter``, i.e. the MRML bridge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path

if not os.environ.get("DISPLAY"):       # headless: render with EGL (Mesa or the GPU's), no X server
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from trame.app import TrameApp                                               # noqa: E402
from trame.widgets import client, html                                       # noqa: E402
from trame.widgets import vuetify3 as v3                                     # noqa: E402
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout             # noqa: E402

from trame_slicer import module as trame_slicer_module                       # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp                       # noqa: E402
from trame_slicer.rca_view import register_rca_factories                     # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402

from . import exclusive                                                       # noqa: E402
from .effect import TOOLS                                                     # noqa: E402
from .segmenter import EXPORT_FORMATS, WebSegmenter, safe_label               # noqa: E402
from .uploads import MAX_UPLOAD_BYTES, UPLOAD_SUFFIXES, UploadError          # noqa: E402

# The prompt tools' buttons: (tool, label, icon, what the mouse does).
TOOL_BUTTONS = (("point", "Point", "mdi-circle-small", "Left click: add. Right click: remove."),
                ("box", "Box", "mdi-vector-square", "Left drag: a box around the object, on this slice."),
                ("scribble", "Scribble", "mdi-draw", "Left drag: a stroke on the object. Right drag: remove."),
                ("lasso", "Lasso", "mdi-lasso", "Left drag: outline the object. Right drag: remove inside."))

# The crop spacing choices offered (any other mm value can be typed).
CROP_SPACINGS = ("model default", "auto", "fixed", "0.5", "0.75", "1.0", "1.5", "2.0", "3.0")

FOUR_UP = "Four-Up"
# What a browser session may have changed in the page, as a new session finds it.
SESSION_DEFAULTS = {"tool_active": True, "negative": False, "prompt_tool": "point",
                    "export_format": EXPORT_FORMATS[0],
                    "upload_error": "", "new_segment_name": ""}
DISCONNECTED = "a browser disconnected during an update"


def quiet_disconnects() -> None:
    """A browser closed mid-update makes the server's next write fail with
    ConnectionResetError (aiohttp's ClientConnectionResetError), wherever in
    trame, wslink, aiohttp or asyncio that write was: not an error of the app.
    Such log records become one INFO line without a traceback (installed once,
    as a record factory, so every logger and handler gets it)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "fastsam3d_quiet_disconnects", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        if record.exc_info and isinstance(record.exc_info[1], ConnectionResetError):
            record.msg, record.args = DISCONNECTED, ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return record
    factory.fastsam3d_quiet_disconnects = True
    logging.setLogRecordFactory(factory)


def four_up_layout() -> Layout:
    """Slicer's Four-Up: axial | 3D over sagittal | coronal."""
    return Layout(LayoutDirection.Vertical, [
        Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(),
                                            ViewLayoutDefinition.threed_view()]),
        Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.sagittal_view(),
                                            ViewLayoutDefinition.coronal_view()]),
    ])


class FastSAM3DWebApp(TrameApp):
    """The app. ``engine``: a ready Engine (tests); else ``model``/``device``."""

    def __init__(self, server=None, images=(), model="default", device="auto", engine=None,
                 show_3d_surfaces=True, max_upload_bytes=MAX_UPLOAD_BYTES, spacing=None):
        super().__init__(server, client_type="vue3")
        self.max_upload_bytes = int(max_upload_bytes)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict({FOUR_UP: four_up_layout(),
                                                  **LayoutManager.default_grid_configuration()})
        self.layout_manager.set_layout(FOUR_UP)
        self.segmenter = WebSegmenter(self.slicer_app, model=model, device=device, engine=engine,
                                      show_3d_surfaces=show_3d_surfaces, spacing=spacing)
        self.segmenter.listeners.append(self.sync_state)
        self._loop = None
        self.images = list(images)
        # One browser session at a time; the scene is cleared when it ends.
        self.session_guard = exclusive.ExclusiveSession(self.end_session)
        exclusive.install(self.server, self.session_guard)
        self.state.update({
            "volumes": [], "active_volume": None, "segments": [], "active_segment": None,
            **SESSION_DEFAULTS,
            "export_formats": list(EXPORT_FORMATS), "export_name": "segmentation.nii.gz",
            "status": {},
            "upload_accept": ",".join(UPLOAD_SUFFIXES),
            "upload_limit": self.max_upload_bytes,
            "upload_limit_error": f"the upload is larger than {self.max_upload_bytes // 1024 ** 2} MiB",
            "crop_spacing": "model default" if spacing is None else str(spacing),
            "crop_spacings": list(CROP_SPACINGS),
        })
        self.state.change("active_volume")(self._on_active_volume)
        self.state.change("active_segment")(self._on_active_segment)
        self.state.change("tool_active")(self._on_tool_active)
        self.state.change("negative")(self._on_negative)
        self.state.change("prompt_tool")(self._on_prompt_tool)
        self.state.change("crop_spacing")(self._on_crop_spacing)
        self.state.change("export_format")(lambda **_: self.sync_state())
        self.ctrl.on_server_ready.add(self._on_server_ready)
        self._build_ui()
        self._load_images()
        future = self.segmenter.engine_future()        # load the model now, not at the first click
        future.add_done_callback(self._engine_loaded)
        self.sync_state()

    def _load_images(self) -> None:
        """The scans given on the command line (each session starts with them)."""
        for image in self.images:
            self.segmenter.load_volume(image, show=False)
        if self.segmenter.volumes:
            self.segmenter.show_volume(self.segmenter.volumes[0])

    def end_session(self) -> None:
        """The browser session left: drop its scans, uploads, segments and page
        inputs, then reload the command-line scans for the next session."""
        self.segmenter.clear()
        self.state.update(SESSION_DEFAULTS)
        self._load_images()
        self.sync_state()

    # -- state -------------------------------------------------------------------
    def sync_state(self) -> None:
        seg = self.segmenter
        status = seg.status()
        segments = seg.segments() if seg.volume is not None else []
        active = seg.segment_id or None
        self.state.update({
            "volumes": [{"title": v.GetName(), "value": v.GetID()} for v in seg.volumes],
            "active_volume": seg.volume.GetID() if seg.volume is not None else None,
            "segments": segments,
            "active_segment": active,
            "active_voxels": next((s["voxels"] for s in segments if s["id"] == active), 0),
            "tool_active": seg.tool_active,
            "negative": seg.negative,
            "prompt_tool": seg.prompt_tool,
            "status": status,
            "export_name": seg.export_name(self.state.export_format or EXPORT_FORMATS[0]),
        })
        self.state.flush()

    def _on_crop_spacing(self, crop_spacing, **_):
        try:
            self.segmenter.set_spacing(None if crop_spacing in (None, "", "model default") else crop_spacing)
        except ValueError as exc:
            self.segmenter.error = str(exc)
        self.sync_state()

    def _on_server_ready(self, **_):
        self._loop = asyncio.get_running_loop()
        self.sync_state()

    def _engine_loaded(self, _future) -> None:
        # Worker thread: hand the update to the server's loop.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.sync_state)

    def _on_active_volume(self, active_volume=None, **_):
        seg = self.segmenter
        volume = seg.volume_by_id(active_volume)
        if volume is not None and volume is not seg.volume:
            seg.show_volume(volume)

    def _on_active_segment(self, active_segment=None, **_):
        seg = self.segmenter
        if active_segment and active_segment != seg.segment_id and active_segment in seg.segment_ids():
            seg.select_segment(active_segment)

    def _on_tool_active(self, tool_active=True, **_):
        if bool(tool_active) != self.segmenter.tool_active:
            self.segmenter.tool_active = bool(tool_active)

    def _on_negative(self, negative=False, **_):
        if bool(negative) != self.segmenter.negative:
            self.segmenter.negative = bool(negative)

    def _on_prompt_tool(self, prompt_tool="point", **_):
        if prompt_tool in TOOLS and prompt_tool != self.segmenter.prompt_tool:
            self.segmenter.prompt_tool = prompt_tool

    # -- actions -------------------------------------------------------------------
    def upload(self, files) -> None:
        """Browser files -> volumes (written only to a temporary folder, under generated names)."""
        try:
            self.segmenter.load_uploads(files, max_bytes=self.max_upload_bytes)
            self.state.upload_error = ""
        except (UploadError, ValueError, OSError) as exc:
            self.state.upload_error = str(exc)
        self.sync_state()

    def add_segment(self) -> None:
        if self.segmenter.volume is not None:
            name = safe_label(self.state.new_segment_name, "") or None
            self.segmenter.add_segment(name)
            self.state.new_segment_name = ""

    def undo(self) -> None:
        self.segmenter.undo()

    def redo(self) -> None:
        self.segmenter.redo()

    def reset(self) -> None:
        self.segmenter.reset()

    def export(self, suffix=None):
        """The labelmap as a download attachment."""
        suffix = suffix if suffix in EXPORT_FORMATS else EXPORT_FORMATS[0]
        _, data, _ = self.segmenter.export_bytes(suffix)
        return self.server.protocol.addAttachment(data)

    # -- page ------------------------------------------------------------------------
    def _build_ui(self):
        trigger = self.server.controller.trigger_name
        with SinglePageWithDrawerLayout(self.server, full_height=True) as ui:
            self.ui = ui
            ui.root.theme = "dark"
            ui.title.set_text("FastSAM3D")
            client.Style("html { overflow-y: hidden; } .fs3d-small { font-size: 0.8rem; }")
            ui.footer.hide()
            with ui.toolbar:
                v3.VSpacer()
                v3.VProgressCircular(v_show=("status.busy",), indeterminate=True, size=20, classes="mr-3")
                html.Span("updating 3D", v_show=("status.surfaces_pending && !status.busy",),
                          classes="text-caption text-medium-emphasis mr-3")
                v3.VChip("{{ status.latency_ms == null ? 'no click yet' : "
                         "'last ' + status.last_prompt + ' ' + status.latency_ms + ' ms' }}",
                         id="fs3d-latency", size="small", classes="mr-2", prepend_icon="mdi-timer-outline")
                v3.VChip("{{ (status.device || '').split(':')[0] }}", id="fs3d-device", size="small", classes="mr-2",
                         prepend_icon="mdi-chip")
            with ui.drawer:
                ui.drawer.width = 330
                with v3.VContainer(classes="pa-3 fs3d-small"):
                    self._scan_panel(trigger)
                    v3.VDivider(classes="my-3")
                    self._segment_panel()
                    v3.VDivider(classes="my-3")
                    self._tool_panel()
                    v3.VDivider(classes="my-3")
                    self._export_panel(trigger)
                    v3.VDivider(classes="my-3")
                    self._status_panel()
            with ui.content:
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 64px);",
                              id="fs3d-views"):
                    self.layout_manager.initialize_layout_grid(ui)

    def _scan_panel(self, trigger):
        html.Div("Scan", classes="text-subtitle-2 mb-1")
        v3.VSelect(v_model=("active_volume",), items=("volumes",), density="compact", hide_details=True,
                   label="shown scan", no_data_text="load a scan", id="fs3d-volume")
        v3.VFileInput(
            label="load scans (.nii.gz, .nii, .nrrd, .mha, DICOM .dcm)", multiple=True, density="compact",
            hide_details=True, prepend_icon="mdi-file-upload", classes="mt-2", accept=("upload_accept",),
            id="fs3d-upload",
            # Files over the limit are refused in the page, before they are sent (the server checks again).
            change=("Array.from($event.target.files).reduce((n, f) => n + f.size, 0) > upload_limit "
                    f"? (upload_error = upload_limit_error) : trigger('{trigger(self.upload)}', [$event.target.files])"))
        v3.VAlert("{{ upload_error }}", v_if=("upload_error",), type="error", density="compact", classes="mt-2")

    def _segment_panel(self):
        html.Div("Segments", classes="text-subtitle-2 mb-1")
        with v3.VList(density="compact", id="fs3d-segments", classes="py-0"):
            with v3.VListItem(v_for="item in segments", key="item.id",
                              active=("item.id === active_segment",),
                              click="active_segment = item.id"):
                with v3.Template(v_slot_prepend=True):
                    v3.VIcon("mdi-circle", color=("item.color",), size="small")
                v3.VListItemTitle("{{ item.name }}")
                v3.VListItemSubtitle("{{ item.voxels }} voxels, {{ item.clicks }} clicks")
        with html.Div(classes="d-flex align-center mt-1"):
            v3.VTextField(v_model=("new_segment_name",), placeholder="new segment name", density="compact",
                          hide_details=True, classes="mr-2")
            v3.VBtn("New", click=self.add_segment, prepend_icon="mdi-plus", size="small",
                    disabled=("!active_volume",), id="fs3d-new-segment")

    def _tool_panel(self):
        html.Div("FastSAM3D", classes="text-subtitle-2")
        v3.VSwitch(v_model=("tool_active",), label="click to segment", density="compact", hide_details=True,
                   color="primary", id="fs3d-tool")
        with v3.VBtnToggle(v_model=("prompt_tool",), mandatory=True, density="compact", divided=True,
                           variant="outlined", classes="my-1", id="fs3d-prompt-tool"):
            for tool, label, icon, _ in TOOL_BUTTONS:
                v3.VBtn(label, value=tool, prepend_icon=icon, size="small", id=f"fs3d-tool-{tool}")
        v3.VSwitch(v_model=("negative",), label="negative (left click or drag removes)", density="compact",
                   hide_details=True, color="error", id="fs3d-negative")
        for tool, _, _, help_text in TOOL_BUTTONS:
            html.Div(help_text + " Mouse wheel: change slice.", v_if=(f"prompt_tool === '{tool}'",),
                     classes="text-medium-emphasis my-1")
        v3.VCombobox(v_model=("crop_spacing",), items=("crop_spacings",), label="crop spacing (auto, fixed, mm)",
                     density="compact", hide_details=True, classes="my-1", id="fs3d-spacing")
        with html.Div(classes="d-flex"):
            v3.VBtn("Undo", click=self.undo, prepend_icon="mdi-undo", size="small", classes="mr-2",
                    disabled=("!status.can_undo",), id="fs3d-undo")
            v3.VBtn("Redo", click=self.redo, prepend_icon="mdi-redo", size="small", classes="mr-2",
                    disabled=("!status.can_redo",), id="fs3d-redo")
            v3.VBtn("Clear", click=self.reset, prepend_icon="mdi-eraser", size="small",
                    disabled=("!active_voxels",), id="fs3d-clear")

    def _export_panel(self, trigger):
        html.Div("Export", classes="text-subtitle-2 mb-1")
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(v_model=("export_format",), items=("export_formats",), density="compact",
                       hide_details=True, classes="mr-2", style="max-width: 120px")
            v3.VBtn("Labelmap", prepend_icon="mdi-download", size="small", id="fs3d-export",
                    disabled=("!active_volume",),
                    click=(f"utils.download(export_name, trigger('{trigger(self.export)}', [export_format]), "
                           "'application/octet-stream')"))

    def _status_panel(self):
        with html.Div(classes="text-medium-emphasis", id="fs3d-status"):
            html.Div("Device: {{ status.device }}")
            html.Div("Model: {{ status.model }}")
            html.Div("Last {{ status.last_prompt }}: {{ status.latency_ms }} ms (engine {{ status.engine_ms }} ms"
                     "{{ status.reembedded ? ', new region encoded' : '' }}, "
                     "write {{ status.write_ms }} ms)", v_if=("status.latency_ms != null",))
            html.Div("{{ active_voxels }}", id="fs3d-voxels", style="display: none")
            html.Div("{{ status.revision }}", id="fs3d-revision", style="display: none")
            html.Div("{{ status.surfaces_pending ? 'pending' : 'done' }}", id="fs3d-surfaces", style="display: none")
            html.Div("{{ (volumes.find(v => v.value === active_volume) || {}).title }}", id="fs3d-volume-name",
                     style="display: none")
        v3.VAlert("{{ note }}", v_for="note in status.notes", type="warning", density="compact", classes="mt-2")
        v3.VAlert("{{ status.error }}", v_if=("status.error",), type="error", density="compact", classes="mt-2")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(images=(), host="127.0.0.1", port=8080, model="default", device="auto",
          open_browser=False, max_upload_bytes=MAX_UPLOAD_BYTES, spacing=None) -> int:
    """Start the server (blocking). Binds to loopback unless told otherwise."""
    from FastSAM3DLib.build import MODEL_NAMES
    for image in images:
        if not Path(image).exists():
            raise ValueError(f"no such image: {image}")
    if str(model) not in MODEL_NAMES and not Path(model).is_file():
        raise ValueError(f"unknown model '{model}': use one of {', '.join(MODEL_NAMES)} or a weights file")
    if not is_loopback(host):
        print(f"fastsam3d web: warning: listening on {host}: anyone who can reach this address "
              "can open the page and see the scans; prefer 127.0.0.1 and an SSH tunnel", file=sys.stderr)
    # trame reads sys.argv for its own options: give it none of ours.
    sys.argv = sys.argv[:1]
    from trame.app import get_server
    server = get_server("fastsam3d-web", client_type="vue3")
    quiet_disconnects()
    app = FastSAM3DWebApp(server, images=images, model=model, device=device, max_upload_bytes=max_upload_bytes,
                          spacing=spacing)
    print(f"fastsam3d web: http://{host if ':' not in host else f'[{host}]'}:{port}/ "
          f"(model '{model}', device '{device}')", file=sys.stderr, flush=True)
    app.server.start(host=host, port=port, open_browser=open_browser, timeout=0,
                     show_connection_info=False)
    return 0
