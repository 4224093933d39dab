"""MRML tier: box, scribble and lasso prompts through the Slicer bridge, on real MRML (slicer-core).

Markups ROI nodes, curves, closed curves and slice-view drags -> world RAS
(``slicer_bridge.shapes``) -> ``SegmentSession`` -> segment. The stand-in
engine (mrml_env.FakeEngine) fills the box it receives in physical space and
draws balls around scribble and lasso points, so the segment shows exactly
what geometry reached the engine; Slicer's own ROI planes are the oracle for
the boxes. test_slicer_engine.py runs the prompts with the bundled model.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from mrml_env import (SPINE_T2, FakeEngine, engine_image, load_volume, make_mrml_env,  # noqa: E402
                      make_variant, new_segmentation, rotation)

from FastSAM3DLib.slicer_bridge import (SegmentEditorLogicWriter, SegmentSession, read_segment,  # noqa: E402
                                        world_ijk_to_ras)
from FastSAM3DLib.slicer_bridge.geometry import numpy_to_matrix  # noqa: E402
from FastSAM3DLib.slicer_bridge.shapes import (Box, curve_points, roi_box, slice_axes,  # noqa: E402
                                               slice_rectangle, slice_xy_to_ras)

RADIUS = 4.0
SLACK = 1e-3        # mm: voxel centres this close to a face may fall either side

pytestmark = pytest.mark.skipif(not SPINE_T2.is_file(), reason="shared test data missing")


@pytest.fixture
def spine():
    scene, logics = make_mrml_env()
    return scene, logics, load_volume(logics, SPINE_T2, "t2")


def session(volume, seg, segment_id, engine=None, **kw):
    return SegmentSession(volume, seg, segment_id, engine=engine or FakeEngine(RADIUS),
                          image=engine_image(volume), **kw)


def world_centres(volume):
    shape = slicer.util.arrayFromVolume(volume).shape
    k, j, i = np.indices(shape).reshape(3, -1)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=1).astype(float)
    return (ijk1 @ world_ijk_to_ras(volume).T)[:, :3].reshape(*shape, 3)


def centre_of(volume, ijk):
    return (world_ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]


def world_set(volume, mask):
    return set(map(tuple, np.round(world_centres(volume)[mask], 3)))


def roi_distance(roi, points):
    """Slicer's own signed distance of each world point to the ROI's box (< 0 inside)."""
    planes = vtk.vtkPlanes()
    roi.GetPlanesWorld(planes)
    flat = points.reshape(-1, 3)
    return np.array([planes.EvaluateFunction(*p) for p in flat]).reshape(points.shape[:-1])


def add_roi(scene, centre, size, parent=None, object_to_node=None):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    if object_to_node is not None:
        roi.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(object_to_node))
    if parent is not None:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "roi transform")
        transform.SetMatrixTransformToParent(numpy_to_matrix(parent))
        roi.SetAndObserveTransformNodeID(transform.GetID())
    return roi


def assert_is_roi(volume, mask, roi):
    """mask == the voxels whose world centre Slicer puts inside the ROI."""
    centres = world_centres(volume)
    near = np.zeros(mask.shape, bool)      # only voxels near the ROI: EvaluateFunction is per point
    b = [0.0] * 6
    roi.GetRASBounds(b)
    lo, hi = np.array(b[::2]) - 2, np.array(b[1::2]) + 2
    near = np.all((centres >= lo) & (centres <= hi), axis=-1)
    distance = np.full(mask.shape, np.inf)
    distance[near] = roi_distance(roi, centres[near])
    assert mask.any()
    assert not np.any(mask & (distance > SLACK)), "voxels outside the ROI"
    assert not np.any(~mask & (distance < -SLACK)), "ROI voxels missing"


# -- boxes from Markups ROI nodes ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["original", "flipped", "permuted", "oblique", "transformed"])
def test_roi_box_fills_the_roi_in_world_space(spine, kind):
    """An axis-aligned ROI: the segment is exactly the voxels Slicer puts inside it,
    whatever the volume's voxel order (flipped, permuted), grid (oblique) or transform."""
    scene, _, vol = spine
    v = make_variant(scene, vol, kind)
    seg, (sid,) = new_segmentation(scene, v)
    roi = add_roi(scene, centre_of(v, (30, 27, 26)), (9.0, 14.0, 7.0))
    box = roi_box(roi)
    assert box.slice_axes is None
    s = session(v, seg, sid)
    info = s.add_box(*box)
    assert info.operation == "box" and info.changed
    assert_is_roi(v, read_segment(seg, sid, v), roi)


def test_flipped_volume_same_world_box(spine):
    scene, _, vol = spine
    flipped = make_variant(scene, vol, "flipped")
    roi = add_roi(scene, centre_of(vol, (30, 27, 26)), (9.0, 14.0, 7.0))
    masks = []
    for v in (vol, flipped):
        seg, (sid,) = new_segmentation(scene, v, name=v.GetName())
        session(v, seg, sid).add_box(*roi_box(roi))
        masks.append(world_set(v, read_segment(seg, sid, v)))
    assert masks[0] and masks[0] == masks[1]


@pytest.mark.parametrize("how", ["rotated ROI", "ROI under a rotating transform"])
def test_rotated_roi_gives_its_oriented_box(spine, how):
    """A rotated ROI is passed as its own oriented box (rectangle on its first two
    axes, its third size as thickness), not the larger axis-aligned box around it."""
    scene, _, vol = spine
    v = make_variant(scene, vol, "flipped")
    seg, (sid,) = new_segmentation(scene, v)
    turn = rotation(2, 30.0) @ rotation(0, 20.0)
    centre = centre_of(v, (30, 27, 26))
    if how == "rotated ROI":
        roi = add_roi(scene, (0, 0, 0), (9.0, 16.0, 6.0), object_to_node=np.r_[np.c_[turn[:3, :3], centre], [[0, 0, 0, 1]]])
    else:
        placed = np.linalg.inv(turn) @ np.r_[centre, 1.0]
        roi = add_roi(scene, placed[:3], (9.0, 16.0, 6.0), parent=turn)
    box = roi_box(roi)
    assert box.slice_axes is not None and box.thickness_mm == pytest.approx(6.0)
    np.testing.assert_allclose(box.slice_axes, turn[:3, :2].T, atol=1e-9)
    s = session(v, seg, sid)
    s.add_box(*box)
    mask = read_segment(seg, sid, v)
    assert_is_roi(v, mask, roi)
    b = [0.0] * 6
    roi.GetRASBounds(b)
    centres = world_centres(v)
    in_bounds = np.all((centres >= np.array(b[::2]) + SLACK) & (centres <= np.array(b[1::2]) - SLACK), -1)
    assert in_bounds.sum() > 1.3 * mask.sum(), "the box around the ROI was filled, not the ROI"


def test_sheared_roi_gives_the_box_of_its_corners(spine):
    scene, _, _ = spine
    shear = np.eye(4)
    shear[0, 1] = 0.5
    roi = add_roi(scene, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), parent=shear)
    box = roi_box(roi)
    b = [0.0] * 6
    roi.GetRASBounds(b)
    assert box.slice_axes is None
    np.testing.assert_allclose(box.corner_a, b[::2], atol=1e-9)
    np.testing.assert_allclose(box.corner_b, b[1::2], atol=1e-9)


def test_roi_box_errors(spine):
    scene, _, _ = spine
    with pytest.raises(ValueError, match="Markups ROI"):
        roi_box(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points"))
    with pytest.raises(ValueError, match="not placed"):
        roi_box(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty"))


# -- boxes dragged in slice views ----------------------------------------------------------
def slice_node(scene, volume, orientation="Axial", tilt_degrees=0.0):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    node.SetLayoutName("Red")
    getattr(node, f"SetOrientationTo{orientation}")()
    node.SetDimensions(400, 300, 1)
    node.SetFieldOfView(120.0, 90.0, 1.0)
    if tilt_degrees:
        slice_to_ras = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        tilted = rotation(0, tilt_degrees) @ rotation(2, tilt_degrees / 2) @ slice_to_ras
        node.GetSliceToRAS().DeepCopy(numpy_to_matrix(tilted))
    centre = centre_of(volume, (30, 27, 26))
    node.JumpSliceByCentering(*centre)
    node.UpdateMatrices()
    return node


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_slice_rectangle_is_a_slab_on_the_view(spine, tilt):
    """A drag in a (possibly oblique) slice view: corners on the slice, the view's
    axes; the segment is the slab of that rectangle, on a flipped volume too."""
    scene, _, vol = spine
    view = slice_node(scene, vol, tilt_degrees=tilt)
    xy_a, xy_b = (170.0, 120.0), (240.0, 190.0)
    box = slice_rectangle(view, xy_a, xy_b, thickness_mm=5.0)
    np.testing.assert_allclose(box.slice_axes[0], view.GetSliceToRAS().MultiplyPoint((1, 0, 0, 0))[:3], atol=1e-9)
    np.testing.assert_allclose(box.slice_axes[1], view.GetSliceToRAS().MultiplyPoint((0, 1, 0, 0))[:3], atol=1e-9)
    normal = np.cross(*box.slice_axes)
    origin = np.array(view.GetSliceToRAS().MultiplyPoint((0, 0, 0, 1))[:3])
    for corner in (box.corner_a, box.corner_b):
        assert abs((np.array(corner) - origin) @ normal) < 1e-9      # on the slice
    pixel = 120.0 / 400                                              # mm per view pixel
    in_plane = (np.array(box.corner_b) - box.corner_a) @ np.array(box.slice_axes).T
    np.testing.assert_allclose(np.abs(in_plane), [70 * pixel, 70 * pixel], atol=1e-9)

    worlds = []
    for v in (vol, make_variant(scene, vol, "flipped")):
        seg, (sid,) = new_segmentation(scene, v, name=v.GetName())
        session(v, seg, sid).add_box(*box)
        mask = read_segment(seg, sid, v)
        local = (world_centres(v) - box.corner_a) @ np.array([*box.slice_axes, normal]).T
        lo, hi = np.minimum(0, in_plane), np.maximum(0, in_plane)
        inside = np.all((local[..., :2] >= lo - SLACK) & (local[..., :2] <= hi + SLACK), -1) \
            & (np.abs(local[..., 2]) <= 2.5 + SLACK)
        core = np.all((local[..., :2] >= lo + SLACK) & (local[..., :2] <= hi - SLACK), -1) \
            & (np.abs(local[..., 2]) <= 2.5 - SLACK)
        assert mask.any() and not np.any(mask & ~inside) and not np.any(core & ~mask)
        worlds.append(world_set(v, mask))
    assert worlds[0] == worlds[1]


def test_slice_xy_to_ras_is_the_views_own_mapping(spine):
    scene, _, vol = spine
    view = slice_node(scene, vol, "Sagittal", tilt_degrees=15.0)
    xy = np.array([[0.0, 0.0], [400.0, 300.0], [123.5, 77.25]])
    expected = [view.GetXYToRAS().MultiplyPoint((x, y, 0, 1))[:3] for x, y in xy]
    np.testing.assert_allclose(slice_xy_to_ras(view, xy), expected, atol=1e-9)
    assert slice_axes(view) == slice_rectangle(view, (1, 2), (3, 4)).slice_axes
    with pytest.raises(ValueError, match="same point"):
        slice_rectangle(view, (5, 5), (5, 5))


# -- scribbles and lassos from curves --------------------------------------------------------
def add_curve(scene, points, closed=False, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode" if closed else "vtkMRMLMarkupsCurveNode",
                                   "lasso" if closed else "scribble")
    if parent is not None:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "curve transform")
        transform.SetMatrixTransformToParent(numpy_to_matrix(parent))
        node.SetAndObserveTransformNodeID(transform.GetID())
    for p in points:
        node.AddControlPointWorld(*[float(v) for v in p])
    return node


def balls(volume, points, radius=RADIUS):
    d = np.min([np.linalg.norm(world_centres(volume) - p, axis=-1) for p in points], axis=0)
    return d <= radius + SLACK, d < radius - SLACK


def test_curve_scribble_reaches_the_engine_in_world_space(spine):
    """A curve under a transform: the scribble is its interpolated points in world
    RAS (through the flipped volume's LPS image), and is one undo step."""
    scene, _, vol = spine
    v = make_variant(scene, vol, "flipped")
    seg, (sid,) = new_segmentation(scene, v)
    world = [centre_of(v, ijk) for ijk in [(26, 20, 26), (30, 27, 26), (34, 30, 27)]]
    move = rotation(1, 15.0)
    move[:3, 3] = (3.0, -2.0, 1.5)
    curve = add_curve(scene, world, parent=move)
    points = curve_points(curve)
    assert len(points) > len(world)                   # along the curve, not only its control points
    for p in world:
        assert np.min(np.linalg.norm(points - p, axis=1)) < 1e-6
    s = session(v, seg, sid)
    s.add_click(centre_of(v, (30, 40, 26)))
    before = read_segment(seg, sid, v).copy()
    info = s.add_scribble(points)
    assert info.operation == "scribble"
    kind, sent, positive = s.engine_session.prompts[-1]
    assert kind == "scribble" and positive
    np.testing.assert_allclose(sent * (-1, -1, 1), points, atol=1e-9)     # LPS -> RAS
    outer, inner = balls(v, points)
    mask = read_segment(seg, sid, v)
    assert not np.any(mask & ~(outer | before)) and not np.any(inner & ~mask)
    s.undo()                                                              # one step
    np.testing.assert_array_equal(read_segment(seg, sid, v), before)


def test_closed_curve_lasso_with_the_slice_axes(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    view = slice_node(scene, vol)
    ring = slice_xy_to_ras(view, [(180, 130), (230, 130), (230, 180), (180, 180)])
    lasso = add_curve(scene, ring, closed=True)
    points = curve_points(lasso, closed=True)
    assert len(points) > 4 and not np.allclose(points[0], points[-1])
    s = session(vol, seg, sid)
    s.add_lasso(points, slice_axes=slice_axes(view))
    assert s.engine_session.last_lasso_axes == slice_axes(view)
    grown = read_segment(seg, sid, vol).copy()
    assert grown.any()
    s.add_lasso(points[::3], positive=False)
    assert s.engine_session.prompts[-1][2] is False
    assert read_segment(seg, sid, vol).sum() < grown.sum()
    with pytest.raises(ValueError, match="closed curve"):
        curve_points(add_curve(scene, ring), closed=True)
    with pytest.raises(ValueError, match="at least 3"):
        curve_points(add_curve(scene, ring[:2], closed=True), closed=True)
    with pytest.raises(ValueError, match="curve node"):
        curve_points(view)


# -- one undo step each; the segment's own voxels are kept -------------------------------------
def painted_slab(seg, sid, vol, start=(24, 16, 5), shape=(3, 22, 50)):
    from mrml_env import MaskPatch
    w = SegmentEditorLogicWriter(seg, sid, vol)
    w.apply(MaskPatch(start, np.ones(shape, bool)))
    w.close()
    slab = np.zeros(slicer.util.arrayFromVolume(vol).shape, bool)
    slab[tuple(slice(a, a + n) for a, n in zip(start, shape))] = True
    return slab


def prompt(s, vol, kind):
    """One prompt of each kind across the painted slab (world RAS)."""
    line = [centre_of(vol, (25 + n, 27, 26 + n)) for n in range(0, 10, 3)]
    if kind == "box":
        return s.add_box(centre_of(vol, (27, 24, 22)), centre_of(vol, (33, 31, 29)))
    if kind == "slice box":
        return s.add_box(centre_of(vol, (27, 24, 28)), centre_of(vol, (33, 31, 28)),
                         slice_axes=((0, 1, 0), (0, 0, 1)), thickness_mm=3.0)
    if kind.endswith("scribble"):
        return s.add_scribble(line, positive=not kind.startswith("negative"))
    return s.add_lasso(line + [centre_of(vol, (30, 31, 26))], positive=not kind.startswith("negative"))


@pytest.mark.parametrize("kind", ["box", "slice box", "scribble", "lasso", "negative scribble",
                                  "negative lasso"])
def test_every_prompt_keeps_painted_voxels_and_is_one_undo_step(spine, kind):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    slab = painted_slab(seg, sid, vol)
    s = session(vol, seg, sid)
    s.add_click(centre_of(vol, (30, 27, 26)))
    predicted = s.engine_session.mask().copy()
    after_click = read_segment(seg, sid, vol).copy()
    info = prompt(s, vol, kind)
    assert info.operation == kind.split()[-1] if "box" not in kind else info.operation == "box"
    assert info.changed
    now = s.engine_session.mask()
    mask = read_segment(seg, sid, vol)
    assert not np.array_equal(mask, after_click)
    # base | prediction; a negative prompt erases painted voxels only where it removed predicted ones
    removed = predicted & ~now
    np.testing.assert_array_equal(mask, (slab & ~removed) | now)
    if kind.startswith("negative"):
        assert (removed & slab).any()
    else:
        assert not np.any(slab & ~mask), "painted voxels lost"
    s.undo()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), after_click)
    s.redo()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), mask)
    s.reset()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab)
    s.undo()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), mask)


def test_bad_prompts_are_clear_errors_and_write_nothing(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid)
    a, b = centre_of(vol, (27, 24, 22)), centre_of(vol, (33, 31, 29))
    cases = [(lambda: s.run("box", (a, b), False), "positive only"),
             (lambda: s.add_box(a, b, slice_axes=((1, 0, 0),)), "slice_axes"),
             (lambda: s.add_box(a, b, thickness_mm=0), "thickness"),
             (lambda: s.run("box", (a,)), "two RAS corners"),
             (lambda: s.add_scribble([]), "at least 1"),
             (lambda: s.add_scribble([(0, float("nan"), 0)]), "finite"),
             (lambda: s.add_lasso([a, b]), "at least 3"),
             (lambda: s.run("lasso", [a, b, a], max_points=2), "no option max_points"),
             (lambda: s.run("undo", thickness_mm=2.0), "no options")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert not read_segment(seg, sid, vol).any() and not s.can_undo


def test_box_tuple_is_the_add_box_signature():
    box = Box((0, 0, 0), (1, 1, 1), ((1, 0, 0), (0, 1, 0)), 2.0)
    assert Box._fields == ("corner_a", "corner_b", "slice_axes", "thickness_mm")
    import inspect
    assert list(inspect.signature(SegmentSession.add_box).parameters)[1:] == list(box._fields)


def test_markups_and_drag_prompts_are_session_operations(spine):
    """markups_prompt / slice_drag_prompt give what SegmentSession.run takes: the
    same segment as the direct add_box / add_scribble / add_lasso calls."""
    from FastSAM3DLib.slicer_bridge.shapes import markups_prompt, slice_drag_prompt
    scene, _, vol = spine
    view = slice_node(scene, vol)
    roi = add_roi(scene, centre_of(vol, (30, 27, 26)), (9.0, 14.0, 7.0), parent=rotation(2, 25.0) @ np.eye(4))
    ring = slice_xy_to_ras(view, [(180, 130), (230, 130), (230, 180), (180, 180)])
    curve, lasso = add_curve(scene, ring), add_curve(scene, ring, closed=True)
    assert [markups_prompt(n).kind for n in (roi, curve, lasso)] == ["box", "scribble", "lasso"]
    for prompt, direct in [
            (markups_prompt(roi), lambda s: s.add_box(*roi_box(roi))),
            (markups_prompt(curve, positive=False), lambda s: s.add_scribble(curve_points(curve), False)),
            (markups_prompt(lasso), lambda s: s.add_lasso(curve_points(lasso, closed=True))),
            (slice_drag_prompt("box", view, ring), lambda s: s.add_box(*slice_rectangle(view, (180, 130),
                                                                                        (180, 180)))),
            (slice_drag_prompt("lasso", view, ring), lambda s: s.add_lasso(ring, slice_axes=slice_axes(view)))]:
        masks = []
        for how in ("prompt", "direct"):
            seg, (sid,) = new_segmentation(scene, vol, name=how)
            s = session(vol, seg, sid)
            s.add_click(centre_of(vol, (30, 27, 26)))
            s.run(prompt.kind, prompt.ras, prompt.positive, **prompt.options) if how == "prompt" else direct(s)
            masks.append(read_segment(seg, sid, vol))
        assert masks[0].any()
        np.testing.assert_array_equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="ROI .box"):
        markups_prompt(view)
    with pytest.raises(ValueError, match="not 'brush'"):
        slice_drag_prompt("brush", view, ring)
