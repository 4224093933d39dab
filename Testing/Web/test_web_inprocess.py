"""The web app in-process, no browser: real offscreen trame-slicer slice views,
mouse events injected on their interactors (as trame-slicer's own tests do),
a real CT from shared/data, the real engine with a tiny random model."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web extra is not installed: pip install -e .[web]")

from trame_slicer.core import SlicerApp  # noqa: E402
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition, ViewProps, ViewType  # noqa: E402

from FastSAM3DLib.slicer_bridge import read_segment, volume_to_image, world_ijk_to_ras  # noqa: E402
from FastSAM3DLib.web.segmenter import WebSegmenter  # noqa: E402
from FastSAM3DLib.web.uploads import UploadError, display_name, save_uploads  # noqa: E402

SIZE = (400, 300)


class Views:
    """Offscreen slice views of one SlicerApp, with mouse events."""

    def __init__(self, app):
        app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.views = {}
        for tag, orientation in (("Red", "Axial"), ("Yellow", "Sagittal")):
            view = app.view_manager.create_view(ViewLayoutDefinition(
                singleton_tag=tag, view_type=ViewType.SLICE_VIEW, properties=ViewProps(orientation=orientation)))
            view.render_window().SetSize(*SIZE)
            view.interactor().UpdateSize(*SIZE)
            self.views[orientation] = view

    def click(self, x, y, button="Left", orientation="Axial"):
        interactor = self.views[orientation].interactor()
        interactor.SetEventPosition(x, y)
        interactor.InvokeEvent("MouseMoveEvent")
        interactor.InvokeEvent(f"{button}ButtonPressEvent")
        interactor.InvokeEvent(f"{button}ButtonReleaseEvent")

    def drag(self, points, button="Left", orientation="Axial"):
        """Press at the first view pixel, move through the others, release at the last."""
        interactor = self.views[orientation].interactor()
        interactor.SetEventPosition(*points[0])
        interactor.InvokeEvent("MouseMoveEvent")
        interactor.InvokeEvent(f"{button}ButtonPressEvent")
        for x, y in points[1:]:
            interactor.SetEventPosition(x, y)
            interactor.InvokeEvent("MouseMoveEvent")
        interactor.InvokeEvent(f"{button}ButtonReleaseEvent")

    def xy_to_ras(self, x, y, orientation="Axial"):
        m = self.views[orientation].get_view_node().GetXYToRAS()
        return np.array([sum(m.GetElement(r, c) * v for c, v in enumerate((x, y, 0.0, 1.0))) for r in range(3)])


@pytest.fixture
def web(ct_path, tiny_engine):
    app = SlicerApp()
    views = Views(app)
    segmenter = WebSegmenter(app, engine=tiny_engine)
    received = []
    handler = segmenter.effect.on_prompt
    segmenter.effect.on_prompt = lambda tool, node, points, positive: (
        received.append((np.array(points[-1]), positive)), handler(tool, node, points, positive))
    segmenter.load_volume(ct_path)
    yield segmenter, views, received
    segmenter.close()


def engine_mask(engine, volume, clicks):
    """What the engine alone gives for these world-RAS clicks (a fresh session)."""
    session = engine.new_session(volume_to_image(volume))
    for ras, positive in clicks:
        session.add_click(ras, positive=positive, space="ras")
    return session.mask()


def segment(segmenter, segment_id=None):
    return read_segment(segmenter.segmentation, segment_id or segmenter.segment_id, segmenter.volume)


def test_left_click_gives_the_engines_segment(web, tiny_engine):
    segmenter, views, received = web
    assert segmenter.tool_active and segment(segmenter).sum() == 0
    views.click(200, 150)
    # the view turned the click into the world RAS of that pixel, as a positive point ...
    assert len(received) == 1 and received[0][1] is True
    np.testing.assert_allclose(received[0][0], views.xy_to_ras(200, 150), atol=1e-3)
    # ... inside the scan ...
    ijk = np.linalg.inv(world_ijk_to_ras(segmenter.volume)) @ np.r_[received[0][0], 1.0]
    assert np.all(ijk[:3] >= -0.5) and np.all(ijk[:3] <= np.array(segmenter.volume.GetImageData().GetDimensions()) - 0.5)
    # ... and the segment is, voxel for voxel, what the engine gives for that RAS point
    mask = segment(segmenter)
    expected = engine_mask(tiny_engine, segmenter.volume, [(received[0][0], True)])
    assert mask.sum() > 100
    np.testing.assert_array_equal(mask, expected)
    assert segmenter.voxel_count() == int(mask.sum())
    status = segmenter.status()
    assert status["latency_ms"] > 0 and status["device"].startswith("CPU") and status["revision"] == 1
    # the click is shown as a point of the include list
    include = segmenter.prompts.nodes[True]
    assert include.GetNumberOfControlPoints() == 1


def test_right_click_removes_and_undo_restores(web, tiny_engine):
    segmenter, views, received = web
    views.click(200, 150)
    first = segment(segmenter)
    views.click(206, 150, button="Right")
    assert [positive for _, positive in received] == [True, False]
    second = segment(segmenter)
    np.testing.assert_array_equal(second, engine_mask(tiny_engine, segmenter.volume, received))
    assert second.sum() < first.sum()
    assert segmenter.prompts.nodes[False].GetNumberOfControlPoints() == 1
    segmenter.undo()
    np.testing.assert_array_equal(segment(segmenter), first)
    assert segmenter.prompts.nodes[False].GetNumberOfControlPoints() == 0
    segmenter.undo()
    assert segment(segmenter).sum() == 0 and not segmenter.can_undo
    segmenter.redo()
    np.testing.assert_array_equal(segment(segmenter), first)
    segmenter.redo()
    np.testing.assert_array_equal(segment(segmenter), second)
    assert not segmenter.can_redo


def test_crop_spacing_choice_reaches_every_segment(web):
    segmenter, views, _ = web
    views.click(200, 150)
    session = segmenter.session(create=False).engine_session
    assert session.roi.spacing == 1.5                      # the tiny model: trained at 1.5 mm only
    segmenter.set_spacing("0.75")
    views.click(204, 150)
    assert session.roi.spacing == 0.75
    with pytest.raises(ValueError, match="spacing"):
        segmenter.set_spacing("zoom")


def test_negative_switch_and_tool_off(web, tiny_engine):
    segmenter, views, received = web
    views.click(200, 150)
    first = segment(segmenter)
    segmenter.negative = True
    views.click(206, 150)                          # a left click, now negative
    assert received[-1][1] is False
    second = segment(segmenter)
    np.testing.assert_array_equal(second, engine_mask(tiny_engine, segmenter.volume, received))
    assert second.sum() < first.sum()
    segmenter.negative = False
    segmenter.tool_active = False                  # navigation: clicks do not segment
    views.click(150, 120)
    assert len(received) == 2
    segmenter.tool_active = True
    segmenter.reset()                              # clear the segment (undoable)
    assert segment(segmenter).sum() == 0
    segmenter.undo()
    np.testing.assert_array_equal(segment(segmenter), second)


def test_new_segment_never_erases_the_others(web):
    segmenter, views, _ = web
    views.click(200, 150)
    first_id = segmenter.segment_id
    first = segment(segmenter, first_id)
    second_id = segmenter.add_segment("second")
    assert segmenter.segment_id == second_id and len(segmenter.segments()) == 2
    views.click(203, 152)                           # overlapping the first segment
    second = segment(segmenter, second_id)
    assert second.sum() > 0
    np.testing.assert_array_equal(segment(segmenter, first_id), first)     # untouched
    assert not np.any(first & second)                                      # no overlap written
    # app-wide undo: the second segment's click, then the first's
    segmenter.undo()
    assert segment(segmenter, second_id).sum() == 0
    np.testing.assert_array_equal(segment(segmenter, first_id), first)
    segmenter.undo()
    assert segmenter.segment_id == first_id and segment(segmenter, first_id).sum() == 0


def test_server_mode_runs_the_engine_on_the_worker_in_order(web, tiny_engine):
    """Inside an asyncio loop (the trame server) operations become tasks: the engine
    half runs on the worker thread, one operation at a time, in click order."""
    import asyncio
    import threading
    segmenter, views, received = web
    from FastSAM3DLib.slicer_bridge import Operation
    threads = []
    compute = Operation.compute

    def spy(self):
        threads.append(threading.current_thread().name)
        return compute(self)

    async def run():
        Operation.compute = spy
        try:
            views.click(200, 150)                  # both clicks arrive before either is done
            views.click(206, 150, button="Right")
            undo = segmenter.undo()
            assert isinstance(undo, asyncio.Task) and segmenter.revision == 0
            await asyncio.gather(*list(segmenter._tasks))
        finally:
            Operation.compute = compute

    asyncio.run(run())
    assert threads and all(name.startswith("FastSAM3D-web-engine") for name in threads)
    assert segmenter.revision == 3 and not segmenter.busy
    np.testing.assert_array_equal(segment(segmenter), engine_mask(tiny_engine, segmenter.volume, received[:1]))


def _scene_nodes(scene) -> dict:
    """How many nodes of each kind a browser session can add to the scene."""
    return {cls: scene.GetNumberOfNodesByClass(cls) for cls in (
        "vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLVolumeArchetypeStorageNode",
        "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode")}


def test_clear_leaves_nothing_of_the_session(ct_path, tiny_engine):
    """What a browser session did (scans, an upload, segments, clicks, undo steps,
    an operation still running) is gone from the scene after clear(), and the
    scene works again for the next session."""
    import asyncio
    import threading
    app = SlicerApp()
    views = Views(app)
    segmenter = WebSegmenter(app, engine=tiny_engine)
    empty = _scene_nodes(app.scene)
    segmenter.load_volume(ct_path)
    views.click(200, 150)
    segmenter.add_segment("second")
    segmenter.load_uploads([{"name": "private.nii.gz", "content": ct_path.read_bytes()}])
    views.click(200, 150)
    assert segmenter.can_undo and segmenter.revision == 2 and _scene_nodes(app.scene) != empty

    from FastSAM3DLib.slicer_bridge import Operation
    compute, computing, release = Operation.compute, threading.Event(), threading.Event()

    def held(self):
        computing.set()
        release.wait(30)
        return compute(self)

    async def clear_while_clicking():
        Operation.compute = held
        try:
            views.click(206, 150)
            pending = list(segmenter._tasks)
            await asyncio.to_thread(computing.wait, 30)   # the engine is busy with it ...
            segmenter.clear()                             # ... when the session ends
            release.set()
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0.3)           # a late 3D surface job would run now
        finally:
            Operation.compute = compute
    asyncio.run(clear_while_clicking())
    assert computing.is_set()

    assert _scene_nodes(app.scene) == empty
    assert segmenter.volumes == [] and segmenter.volume is None and segmenter.segment_ids() == []
    assert not segmenter.can_undo and not segmenter.can_redo and segmenter.revision == 0
    assert segmenter.status()["latency_ms"] is None
    assert all(node.GetNumberOfControlPoints() == 0 for node in segmenter.prompts.nodes.values())
    # the next session: the same scan, an empty segment, clicks work
    segmenter.load_volume(ct_path)
    assert [s["voxels"] for s in segmenter.segments()] == [0]
    views.click(200, 150)
    np.testing.assert_array_equal(segment(segmenter), engine_mask(
        tiny_engine, segmenter.volume, [(views.xy_to_ras(200, 150), True)]))
    segmenter.close()


def test_session_guard_admits_one_and_fails_closed():
    from FastSAM3DLib.web.exclusive import ExclusiveSession
    ended = []
    guard = ExclusiveSession(lambda: ended.append(True))
    assert guard.admit("a") and guard.admit("a") and not guard.admit("b")
    guard.end("b")                             # a refused connection closing changes nothing
    assert ended == [] and not guard.admit("c")
    guard.end("a")
    assert ended == [True] and guard.admit("c")

    def broken():
        raise RuntimeError("scene not cleared")
    guard = ExclusiveSession(broken)
    assert guard.admit("a")
    with pytest.raises(RuntimeError):
        guard.end("a")
    assert guard.in_use and not guard.admit("b")     # never admit into an uncleared scene


def test_sagittal_view_click(web, tiny_engine):
    segmenter, views, received = web
    views.click(200, 150, orientation="Sagittal")
    np.testing.assert_allclose(received[0][0], views.xy_to_ras(200, 150, "Sagittal"), atol=1e-3)
    np.testing.assert_array_equal(segment(segmenter), engine_mask(tiny_engine, segmenter.volume, received))


def test_export_labelmap_on_the_scan_grid(web, ct_path):
    import SimpleITK as sitk
    segmenter, views, _ = web
    views.click(200, 150)
    segmenter.add_segment()
    views.click(150, 200)
    name, data, labels = segmenter.export_bytes(".nii.gz")
    assert name == "example_ct-segmentation.nii.gz" and labels == {1: "Segment 1", 2: "Segment 2"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        out, ct = sitk.ReadImage(str(path)), sitk.ReadImage(str(ct_path))
    assert out.GetSize() == ct.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), ct.GetDirection(), atol=1e-5)
    values = sitk.GetArrayFromImage(out)
    ids = segmenter.segment_ids()
    assert (values == 1).sum() == segmenter.voxel_count(ids[0]) > 0
    assert (values == 2).sum() == segmenter.voxel_count(ids[1]) > 0
    with pytest.raises(ValueError):
        segmenter.export_bytes("../x.nii.gz")


# -- uploads -------------------------------------------------------------------------
def test_upload_names_never_become_paths(tmp_path):
    files = [{"name": "../../etc/evil.nii.gz", "content": b"a"},
             {"name": "/abs/path/x.NRRD", "content": [b"b", b"c"]},
             {"name": "..\\..\\win.mha", "content": b"d"}]
    saved = save_uploads(files, tmp_path)
    assert [p.name for p, _ in saved] == ["upload-000.nii.gz", "upload-001.nrrd", "upload-002.mha"]
    assert all(p.parent == tmp_path for p, _ in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload-000.nii.gz", "upload-001.nrrd", "upload-002.mha"]
    assert saved[1][0].read_bytes() == b"bc"
    assert [label for _, label in saved] == ["evil", "x", "win"]
    assert display_name("<script>.nii") == "script" and display_name("") == "volume"


@pytest.mark.parametrize("name", ["scan.exe", "scene.mrb", "x.nii.gz.sh", "nii.gz", ".nii", "noext"])
def test_upload_refuses_other_types_and_writes_nothing(tmp_path, name):
    with pytest.raises(UploadError):
        save_uploads([{"name": "ok.nii.gz", "content": b"x"}, {"name": name, "content": b"y"}], tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UploadError):
        save_uploads([{"name": "empty.nii", "content": b""}], tmp_path)
    with pytest.raises(UploadError):
        save_uploads([{"name": "big.nii", "content": b"12345"}], tmp_path, max_bytes=4)


def test_upload_loads_from_a_deleted_temporary_folder(ct_path, tiny_engine, monkeypatch):
    app = SlicerApp()
    segmenter = WebSegmenter(app, engine=tiny_engine)
    made = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        tmp = real(*args, **kwargs)
        made.append(Path(tmp.name))
        return tmp

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    nodes = segmenter.load_uploads([{"name": "../../my scan.nii.gz", "content": ct_path.read_bytes()}])
    assert len(nodes) == 1 and segmenter.volume is nodes[0] and nodes[0].GetName() == "my_scan"
    assert nodes[0].GetImageData().GetDimensions() == (122, 101, 112)
    assert made and all(p.name.startswith("fastsam3d-upload-") and not p.exists() for p in made)
    assert all(Path(tempfile.gettempdir()) in p.parents for p in made)
    with pytest.raises(UploadError):
        segmenter.load_uploads([{"name": "notes.txt", "content": b"hello"}])
    segmenter.close()


# -- the page object and the command ---------------------------------------------------
def test_app_page_and_state(ct_path, tiny_engine):
    from trame.app import get_server
    from FastSAM3DLib.web.app import FastSAM3DWebApp
    server = get_server("fastsam3d-web-test", client_type="vue3")
    app = FastSAM3DWebApp(server, images=[ct_path], engine=tiny_engine)
    state = app.state
    assert [v["title"] for v in state.volumes] == ["example_ct"]
    assert len(state.segments) == 1 and state.active_segment == state.segments[0]["id"]
    assert state.status["device"].startswith("CPU") and state.export_name == "example_ct-segmentation.nii.gz"
    app.add_segment()
    assert len(state.segments) == 2 and state.active_segment == state.segments[1]["id"]
    app.upload([{"name": "evil/../x.exe", "content": b"1"}])
    assert "not a supported image" in state.upload_error and len(state.volumes) == 1
    page = app.ui.html
    for element in ("fs3d-latency", "fs3d-device", "fs3d-undo", "fs3d-redo", "fs3d-new-segment",
                    "fs3d-export", "fs3d-upload", "fs3d-segments", "fs3d-spacing"):
        assert f'id="{element}"' in page
    # the crop spacing choice reaches the segmenter; a bad one is shown, not applied
    state.ready()                                 # change callbacks run from here on, as in the server
    state.crop_spacing = "0.75"
    state.flush()
    assert app.segmenter.spacing == 0.75
    state.crop_spacing = "zoom"
    state.flush()
    assert app.segmenter.spacing == 0.75 and "spacing" in state.status["error"]
    app.segmenter.close()


def test_upload_limit_is_enforced_before_content_is_read(ct_path, tiny_engine, tmp_path):
    """The declared size decides before any content is decoded or written; the
    app's limit (``--max-upload-mb``) applies to the whole upload."""
    from trame.app import get_server
    from FastSAM3DLib.web.app import FastSAM3DWebApp

    class Unreadable(dict):
        def get(self, key, default=None):
            if key == "content":
                raise AssertionError("content read although the declared size is over the limit")
            return super().get(key, default)
    with pytest.raises(UploadError, match="larger than 1 MiB"):
        save_uploads([Unreadable(name="big.nii.gz", size=2 * 1024 ** 2)], tmp_path, max_bytes=1024 ** 2)
    assert not list(tmp_path.iterdir())
    server = get_server("fastsam3d-web-limit-test", client_type="vue3")
    app = FastSAM3DWebApp(server, engine=tiny_engine, max_upload_bytes=1024 ** 2)
    data = ct_path.read_bytes()
    assert len(data) > 1024 ** 2
    app.upload([{"name": "ct.nii.gz", "size": len(data), "content": data}])
    assert state_error(app) == "the upload is larger than 1 MiB" == app.state.upload_limit_error
    assert app.state.upload_limit == 1024 ** 2 and app.state.volumes == []
    assert "upload_limit" in app.ui.html                       # the page refuses it before sending too
    app.segmenter.close()


def state_error(app):
    return app.state.upload_error


def test_a_browser_disconnecting_logs_one_line_not_a_traceback(capsys):
    import logging
    from aiohttp import ClientConnectionResetError
    from FastSAM3DLib.web.app import DISCONNECTED, quiet_disconnects
    previous = logging.getLogRecordFactory()
    quiet_disconnects()
    quiet_disconnects()                                        # once only
    handler = logging.StreamHandler()
    log = logging.getLogger("wslink.protocol.test")
    log.addHandler(handler)
    try:
        try:
            raise ClientConnectionResetError("Cannot write to closing transport")
        except ClientConnectionResetError:
            log.exception("Exception raised")
        try:
            raise ValueError("a real error")
        except ValueError:
            log.exception("Exception raised")
    finally:
        log.removeHandler(handler)
        logging.setLogRecordFactory(previous)
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "ValueError: a real error" in err     # real errors keep theirs
    assert err.splitlines()[0] == DISCONNECTED and "closing transport" not in err


def test_web_command_defaults_to_loopback():
    from FastSAM3DLib.cli import build_parser
    from FastSAM3DLib.web.app import is_loopback
    args = build_parser().parse_args(["web", "a.nii.gz"])
    assert args.host == "127.0.0.1" and args.port == 8080 and args.images == ["a.nii.gz"]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_core_library_does_not_import_the_web_app():
    code = ("import sys, FastSAM3DLib, FastSAM3DLib.cli, FastSAM3DLib.session, FastSAM3DLib.slicer_bridge; "
            "bad = [m for m in sys.modules if m.startswith(('trame', 'FastSAM3DLib.web'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_is_one_clear_line():
    code = ("import sys; sys.modules['trame'] = None; from FastSAM3DLib.cli import main; "
            "sys.exit(main(['web']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fastsam3d: error:") and "pip install -e .[web]" in lines[-1]


def test_web_command_refuses_bad_arguments_before_serving(tmp_path):
    from FastSAM3DLib.web.app import serve
    with pytest.raises(ValueError, match="no such image"):
        serve([str(tmp_path / "missing.nii.gz")])
    with pytest.raises(ValueError, match="unknown model"):
        serve([], model="no-such-model")


# -- box, scribble and lasso tools (the bundled model: it has box prompts) ---------------------
@pytest.fixture
def web_bundled(ct_path):
    from FastSAM3DLib.session import Engine
    app = SlicerApp()
    views = Views(app)
    segmenter = WebSegmenter(app, engine=Engine(model="default", device="cpu"))
    segmenter.load_volume(ct_path)
    yield segmenter, views
    segmenter.close()


def test_box_drag_on_the_axial_view_is_the_engines_box(web_bundled):
    """A left drag with the box tool: a box on that slice (its corners and the
    view's axes); the segment is what the engine gives for that box."""
    from FastSAM3DLib.slicer_bridge.shapes import slice_axes
    segmenter, views = web_bundled
    segmenter.prompt_tool = "box"
    views.drag([(180, 130), (200, 150), (225, 170)])
    assert segmenter.error == ""
    mask = segment(segmenter)
    assert mask.any() and segmenter.last.operation == "box"
    view_node = views.views["Axial"].get_view_node()
    session = segmenter.engine.new_session(volume_to_image(segmenter.volume))
    session.add_box(views.xy_to_ras(180, 130), views.xy_to_ras(225, 170), "ras",
                    slice_axes=slice_axes(view_node))
    np.testing.assert_array_equal(mask, session.mask())
    assert segmenter.session().engine_session.box is not None
    segmenter.undo()
    assert not segment(segmenter).any()


def test_scribble_and_lasso_drags(web_bundled):
    """A scribble (left drag) adds, a right-drag lasso takes its inside away:
    each is the engine's result for the dragged world points, and one undo step."""
    from FastSAM3DLib.slicer_bridge.shapes import slice_axes
    segmenter, views = web_bundled
    stroke = [(190, 140), (196, 146), (202, 150), (208, 154)]
    ring = [(196, 142), (210, 142), (210, 156), (196, 156), (197, 143)]
    segmenter.prompt_tool = "scribble"
    views.drag(stroke)
    after_scribble = segment(segmenter).copy()
    assert after_scribble.any() and segmenter.last.operation == "scribble"
    segmenter.prompt_tool = "lasso"
    views.drag(ring, button="Right")
    assert segmenter.last.operation == "lasso"
    session = segmenter.engine.new_session(volume_to_image(segmenter.volume))
    session.add_scribble([views.xy_to_ras(*p) for p in stroke], True, "ras")
    np.testing.assert_array_equal(after_scribble, session.mask())
    session.add_lasso([views.xy_to_ras(*p) for p in ring], False, "ras",
                      slice_axes=slice_axes(views.views["Axial"].get_view_node()))
    np.testing.assert_array_equal(segment(segmenter), session.mask())
    assert segment(segmenter).sum() < after_scribble.sum()
    segmenter.undo()
    np.testing.assert_array_equal(segment(segmenter), after_scribble)


def test_a_box_click_without_a_drag_is_a_clear_error(web_bundled):
    segmenter, views = web_bundled
    segmenter.prompt_tool = "box"
    views.click(200, 150)
    assert "drag a rectangle" in segmenter.error and not segment(segmenter).any() and not segmenter.can_undo
    segmenter.prompt_tool = "lasso"
    views.click(200, 150)
    assert "at least 3" in segmenter.error and not segmenter.can_undo
    with pytest.raises(ValueError, match="prompt tool"):
        segmenter.prompt_tool = "brush"
