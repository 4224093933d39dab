"""MRML tier: the Slicer bridge on real MRML (slicer-core), with a stand-in engine.

The stand-in (mrml_env.FakeEngine) draws balls around the clicks in physical
space from the engine image's own geometry, so these tests check the whole
chain volume node -> engine image -> patch -> segment -> world, for every
kind of geometry, without a model. test_slicer_engine.py repeats the key
checks with the real engine.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from mrml_env import (CT_ABDOMEN, SPINE_T2, FakeEngine, engine_image,  # noqa: E402
                      ijk_to_ras_of, load_volume, make_mrml_env, markups_points, new_segmentation,
                      make_variant, rotation, transformed_copy, world_points)

from FastSAM3DLib.slicer_bridge import (GeometryError, SegmentEditorLogicWriter,  # noqa: E402
                                        SegmentSession, SegmentWriter, export_labelmap,
                                        oriented_image, ras_to_ijk, read_segment, world_ijk_to_ras)

RADIUS = 5.0

pytestmark = pytest.mark.skipif(not SPINE_T2.is_file(), reason="shared test data missing")


@pytest.fixture
def env():
    return make_mrml_env()


@pytest.fixture
def spine(env):
    scene, logics = env
    return scene, logics, load_volume(logics, SPINE_T2, "t2")


def world_centres(volume, mask_kji):
    """World RAS of the voxels set in ``mask_kji`` (k, j, i) of ``volume``."""
    k, j, i = np.nonzero(mask_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=1).astype(float)
    return (ijk1 @ world_ijk_to_ras(volume).T)[:, :3]


def all_world_centres(volume):
    return world_centres(volume, np.ones(slicer.util.arrayFromVolume(volume).shape, bool))


def session(volume, seg, segment_id, engine, **kw):
    return SegmentSession(volume, seg, segment_id, engine=engine, image=engine_image(volume), **kw)


def assert_ball(volume, mask, centre, radius=RADIUS):
    """mask == voxels whose world centre is within ``radius`` of ``centre`` (1e-3 mm slack)."""
    d = np.linalg.norm(all_world_centres(volume) - centre, axis=1).reshape(mask.shape)
    assert mask.any()
    assert not np.any(mask & (d > radius + 1e-3)), "voxels outside the ball"
    assert not np.any(~mask & (d < radius - 1e-3)), "ball voxels missing"


def slicer_world_voxels(seg, segment_id):
    """World RAS of the segment's voxels as Slicer itself places them
    (its labelmap with the segmentation's parent transform applied): an
    independent check of the bridge's geometry."""
    from FastSAM3DLib.slicer_bridge.geometry import image_array, image_to_frame
    img = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, img)
    values, (k0, j0, i0) = image_array(img)
    label = seg.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    k, j, i = np.nonzero(values == label)
    ijk1 = np.stack([i + i0, j + j0, k + k0, np.ones_like(i)], axis=1).astype(float)
    return (ijk1 @ image_to_frame(img).T)[:, :3]


def centre_of(volume, ijk):
    return (world_ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]


# -- geometry ----------------------------------------------------------------------
def test_world_matrix_and_ras_round_trip(spine):
    scene, _, vol = spine
    m = world_ijk_to_ras(vol)
    np.testing.assert_allclose(m, ijk_to_ras_of(vol))
    tvol, _ = transformed_copy(scene, vol, rotation(2, 30.0) @ np.diag([1, 1, 1, 1.0]))
    mt = world_ijk_to_ras(tvol)
    np.testing.assert_allclose(mt, rotation(2, 30.0) @ m, atol=1e-9)
    ijk = np.array([[3.5, 7.0, 11.25], [0, 0, 0]])
    ras = np.c_[ijk, np.ones(2)] @ mt.T
    np.testing.assert_allclose(ras_to_ijk(tvol, ras[:, :3]), ijk, atol=1e-9)


def test_non_linear_transform_is_a_clear_error(spine):
    scene, _, vol = spine
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    vol.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(GeometryError, match="non-linear transform 'warp'.*[Hh]arden"):
        world_ijk_to_ras(vol)
    seg, (sid,) = new_segmentation(scene, vol)
    with pytest.raises(GeometryError):
        SegmentSession(vol, seg, sid, engine=FakeEngine())


def test_vector_volume_is_rejected(env):
    scene, _ = env
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), np.uint8))
    seg, (sid,) = new_segmentation(scene, node)
    with pytest.raises(GeometryError, match="scalar"):
        SegmentSession(node, seg, sid, engine=FakeEngine())


def test_oriented_image_round_trip(spine):
    _, _, vol = spine
    mask = np.random.default_rng(0).random((4, 5, 6)) > 0.5
    img = oriented_image(mask, (2, 3, 4), world_ijk_to_ras(vol))
    assert img.GetExtent() == (4, 9, 3, 7, 2, 5)
    from FastSAM3DLib.slicer_bridge.geometry import image_array, image_to_frame
    back, start = image_array(img)
    assert start == (2, 3, 4)
    np.testing.assert_array_equal(back.astype(bool), mask)
    np.testing.assert_allclose(image_to_frame(img), world_ijk_to_ras(vol))


# -- clicks -> segment, every geometry -------------------------------------------------
VARIANTS = ["original", "flipped", "permuted", "oblique", "transformed", "transformed-seg-in-world"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_clicks_land_in_world_space(spine, kind):
    """Two positive clicks given as markups points: the segment, seen in world
    space, is exactly the union of balls the engine drew around them."""
    scene, _, vol = spine
    v = make_variant(scene, vol, kind)
    seg, (sid,) = new_segmentation(scene, v)
    if kind == "transformed-seg-in-world":
        seg.SetAndObserveTransformNodeID(None)     # volume transformed, segmentation not
    ijk_points = [(30, 27, 26), (33.4, 25.2, 27.7)]
    # the same voxels of the original volume, expressed in world space of the variant
    if kind in ("flipped", "permuted"):
        ras = [centre_of(vol, p) for p in ijk_points]          # same world image
    else:
        ras = [centre_of(v, p) for p in ijk_points]
    # clicks arrive as markups control points (in the volume's transform, like a
    # point placed on a transformed slice view); the bridge takes world RAS
    pts = markups_points(scene, ras, parent=v.GetParentTransformNode())
    ras_world = world_points(pts)
    np.testing.assert_allclose(ras_world, ras, atol=1e-6)
    s = session(v, seg, sid, FakeEngine(RADIUS))
    for p in ras_world:
        s.add_click(p)
    mask = read_segment(seg, sid, v)
    centres = all_world_centres(v)
    d = np.min([np.linalg.norm(centres - p, axis=1) for p in ras_world], axis=0).reshape(mask.shape)
    assert mask.any()
    assert not np.any(mask & (d > RADIUS + 1e-3))
    assert not np.any(~mask & (d < RADIUS - 1e-3))
    np.testing.assert_array_equal(mask, s.engine_session.mask())
    # Slicer's own placement of the segment agrees, voxel for voxel, in world space
    w_slicer = set(map(tuple, np.round(slicer_world_voxels(seg, sid), 3)))
    w_bridge = set(map(tuple, np.round(world_centres(v, mask), 3)))
    assert w_slicer == w_bridge


def test_same_world_image_gives_same_world_segment(spine):
    """Original, flipped and permuted copies hold one world image: the same world
    clicks give the same set of world voxels."""
    scene, _, vol = spine
    clicks = [centre_of(vol, (30, 27, 26)), centre_of(vol, (28, 24, 30))]
    sets = []
    for kind in ("original", "flipped", "permuted"):
        v = make_variant(scene, vol, kind)
        seg, (sid,) = new_segmentation(scene, v, name=kind)
        s = session(v, seg, sid, FakeEngine(RADIUS))
        for p in clicks:
            s.add_click(p)
        w = world_centres(v, read_segment(seg, sid, v))
        sets.append(set(map(tuple, np.round(w, 3))))
    assert sets[0] and sets[0] == sets[1] == sets[2]


def test_negative_click_removes(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    s.add_click(centre_of(vol, (30, 27, 26)))
    n1 = read_segment(seg, sid, vol).sum()
    info = s.add_click(centre_of(vol, (33, 27, 26)), positive=False)
    assert info.changed and info.clicks == 2
    assert 0 < read_segment(seg, sid, vol).sum() < n1


# -- neighbours, undo -----------------------------------------------------------------
def test_second_segment_leaves_finished_neighbour_unchanged(spine):
    scene, _, vol = spine
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    engine = FakeEngine(RADIUS)
    sa = session(vol, seg, a, engine)
    sa.add_click(centre_of(vol, (30, 27, 26)))
    before_a = read_segment(seg, a, vol).copy()
    sb = session(vol, seg, b, engine)
    sb.add_click(centre_of(vol, (34, 27, 26)))          # balls overlap
    mask_b = read_segment(seg, b, vol)
    np.testing.assert_array_equal(read_segment(seg, a, vol), before_a)
    assert mask_b.any() and not np.any(mask_b & before_a)
    # b = engine result minus a
    np.testing.assert_array_equal(mask_b, sb.engine_session.mask() & ~before_a)
    # undo/redo in b leave a alone too
    sb.undo()
    assert read_segment(seg, b, vol).sum() == 0
    sb.redo()
    np.testing.assert_array_equal(read_segment(seg, a, vol), before_a)
    np.testing.assert_array_equal(read_segment(seg, b, vol), mask_b)


def test_overwrite_other_segments_when_asked(spine):
    scene, _, vol = spine
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    engine = FakeEngine(RADIUS)
    session(vol, seg, a, engine).add_click(centre_of(vol, (30, 27, 26)))
    before_a = read_segment(seg, a, vol).copy()
    sb = session(vol, seg, b, engine, overwrite_other_segments=True)
    sb.add_click(centre_of(vol, (34, 27, 26)))
    mask_b = read_segment(seg, b, vol)
    np.testing.assert_array_equal(mask_b, sb.engine_session.mask())
    np.testing.assert_array_equal(read_segment(seg, a, vol), before_a & ~mask_b)
    sb.undo()                                  # restores the neighbour exactly
    np.testing.assert_array_equal(read_segment(seg, a, vol), before_a)
    assert read_segment(seg, b, vol).sum() == 0


def test_undo_redo_restore_exact_voxel_counts(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    counts = [0]
    for ijk, positive in [((30, 27, 26), True), ((35, 27, 26), True), ((32, 27, 26), False),
                          ((30, 22, 26), True)]:
        s.add_click(centre_of(vol, ijk), positive)
        counts.append(int(read_segment(seg, sid, vol).sum()))
    assert len(set(counts)) == len(counts)
    for n in range(len(counts) - 1, 0, -1):
        info = s.undo()
        assert info.operation == "undo" and info.clicks == n - 1
        assert read_segment(seg, sid, vol).sum() == counts[n - 1]
    assert s.undo() is None
    for n in range(1, len(counts)):
        s.redo()
        assert read_segment(seg, sid, vol).sum() == counts[n]
    assert s.redo() is None
    s.reset()
    assert read_segment(seg, sid, vol).sum() == 0 and s.clicks == []
    s.undo()
    assert read_segment(seg, sid, vol).sum() == counts[-1]


def test_content_before_the_session_survives_undo(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    writer = SegmentEditorLogicWriter(seg, sid, vol)
    from mrml_env import MaskPatch
    pre = np.zeros((6, 6, 6), bool)
    pre[1:5, 1:5, 1:5] = True
    writer.apply(MaskPatch((24, 25, 28), pre))           # overlaps the first click's ball
    before = read_segment(seg, sid, vol).copy()
    s = session(vol, seg, sid, FakeEngine(RADIUS), writer=writer)
    s.add_click(centre_of(vol, (30, 27, 26)))
    assert not np.array_equal(read_segment(seg, sid, vol), before)
    s.undo()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), before)


def test_writer_replaces_only_its_box_keeps_keep_and_keeps_no_mrml_undo(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    w = SegmentEditorLogicWriter(seg, sid, vol)
    assert isinstance(w, SegmentWriter)
    from mrml_env import MaskPatch
    w.apply(MaskPatch((5, 5, 5), np.ones((4, 4, 4), bool)))
    w.apply(MaskPatch((20, 20, 20), np.ones((3, 3, 3), bool)))
    assert read_segment(seg, sid, vol).sum() == 64 + 27
    half = np.zeros((4, 4, 4), bool)
    half[:2] = True
    w.apply(MaskPatch((5, 5, 5), half))
    assert read_segment(seg, sid, vol).sum() == 32 + 27
    keep = np.zeros((4, 4, 4), bool)
    keep[3] = True
    content = w.apply(MaskPatch((5, 5, 5), half), keep=keep)
    np.testing.assert_array_equal(content, half | keep)
    np.testing.assert_array_equal(read_segment(seg, sid, vol, (5, 5, 5), (4, 4, 4)), half | keep)
    assert not w._logic.CanUndo()                  # no private MRML history that nothing reads
    w.close()
    assert scene.GetFirstNodeByName("FastSAM3D writer") is None


# -- the segment's own content (base layer) ----------------------------------------------
def painted_slab(seg, sid, vol, start=(24, 16, 5), shape=(3, 22, 50)):
    """A painted slab (3 x 22 x 50 = 3,300 voxels) across where the clicks go."""
    w = SegmentEditorLogicWriter(seg, sid, vol)
    from mrml_env import MaskPatch
    w.apply(MaskPatch(start, np.ones(shape, bool)))
    w.close()
    slab = np.zeros(slicer.util.arrayFromVolume(vol).shape, bool)
    slab[tuple(slice(a, a + n) for a, n in zip(start, shape))] = True
    return slab


def test_painted_slab_keeps_every_voxel_through_clicks_undo_redo_reset(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    slab = painted_slab(seg, sid, vol)
    assert slab.sum() == 3300
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    states = [slab]
    for ijk, positive in [((30, 27, 26), True), ((35, 27, 26), True), ((30, 31, 26), True)]:
        info = s.add_click(centre_of(vol, ijk), positive)
        assert info.changed
        mask = read_segment(seg, sid, vol)
        assert not np.any(slab & ~mask), "painted voxels lost"
        np.testing.assert_array_equal(mask, slab | s.engine_session.mask())
        states.append(mask.copy())
    for expected in states[-2::-1]:
        s.undo()
        np.testing.assert_array_equal(read_segment(seg, sid, vol), expected)
    for expected in states[1:]:
        s.redo()
        np.testing.assert_array_equal(read_segment(seg, sid, vol), expected)
    s.reset()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab)


def test_replace_mode_gives_the_box_to_the_prediction(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    slab = painted_slab(seg, sid, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS), mode="replace")
    info = s.add_click(centre_of(vol, (30, 27, 26)))
    start, stop = info.box_kji
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    mask = read_segment(seg, sid, vol)
    np.testing.assert_array_equal(mask[box], s.engine_session.mask()[box])
    outside = np.ones(mask.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(mask & outside, slab & outside)
    assert (slab & ~mask).sum() > 0
    with pytest.raises(ValueError, match="mode"):
        session(vol, seg, sid, FakeEngine(RADIUS), mode="merge")


def test_negative_click_erases_base_only_where_it_removed_prediction(spine):
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    slab = painted_slab(seg, sid, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    s.add_click(centre_of(vol, (30, 27, 26)))
    predicted = s.engine_session.mask().copy()
    s.add_click(centre_of(vol, (33, 27, 26)), positive=False)
    now = s.engine_session.mask()
    removed = predicted & ~now
    assert (removed & slab).any()
    mask = read_segment(seg, sid, vol)
    np.testing.assert_array_equal(mask, (slab & ~removed) | now)
    s.undo()                                         # the erased base voxels come back
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab | predicted)


def test_edits_between_clicks_are_kept(spine):
    """Voxels painted (or erased) with another tool between two clicks stay so."""
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    start, _ = s.add_click(centre_of(vol, (30, 27, 26))).box_kji
    from mrml_env import MaskPatch
    painter = SegmentEditorLogicWriter(seg, sid, vol)
    corner = np.ones((2, 2, 2), bool)                  # in the written box, outside the ball
    assert not read_segment(seg, sid, vol, start, corner.shape).any()
    painter.apply(MaskPatch(start, corner))
    painted = read_segment(seg, sid, vol).copy()
    erased = tuple(int(v) for v in np.argwhere(painted)[len(np.argwhere(painted)) // 2])
    painter.apply(MaskPatch(erased, np.zeros((1, 1, 1), bool)))     # and one voxel erased
    assert not read_segment(seg, sid, vol)[erased]
    s.add_click(centre_of(vol, (31, 27, 26)))
    mask = read_segment(seg, sid, vol)
    assert mask[tuple(slice(a, a + 2) for a in start)].all()
    s.add_click(centre_of(vol, (29, 27, 26)))
    assert not read_segment(seg, sid, vol)[erased] or s.engine_session.mask()[erased]
    painter.close()


def test_effect_apply_adds_the_preview_and_replace_clears_the_box(spine):
    """The effect's Apply (preview_labelmaps) keeps the segment's content by default."""
    from FastSAM3DLib.slicer_bridge import preview_labelmaps
    from mrml_env import MaskPatch
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    slab = painted_slab(seg, sid, vol)
    preview = np.zeros((10, 10, 10), bool)
    preview[2:8, 2:8, 2:8] = True
    patch = MaskPatch((20, 22, 25), preview)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor)
    logic.SetSegmentationNode(seg)
    logic.SetSourceVolumeNode(vol)
    modes = {"add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove}

    def apply(ops):
        for image, mode in ops:
            logic.ModifySegmentByLabelmap(seg, sid, image, modes[mode], image.GetExtent(), False, True)
    placed = np.zeros_like(slab)
    placed[20:30, 22:32, 25:35] = preview
    apply(preview_labelmaps(patch, seg, sid, vol))
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab | placed)
    apply(preview_labelmaps(patch, seg, sid, vol, replace=True))
    box = np.zeros_like(slab)
    box[20:30, 22:32, 25:35] = True
    np.testing.assert_array_equal(read_segment(seg, sid, vol), (slab & ~box) | placed)


def test_resampled_read_for_a_segment_on_another_grid(spine):
    """A segment whose labelmap lives on a rotated grid is read by resampling."""
    scene, logics, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    m = world_ijk_to_ras(vol) @ rotation(2, 90.0)
    block = np.ones((3, 3, 3), np.uint8)
    img = oriented_image(block, (-2, -2, -2), m)     # 3x3x3 voxels round the origin of vol's index
    img2 = slicer.vtkOrientedImageData()
    img2.DeepCopy(img)
    # move it inside the volume
    shift = np.eye(4)
    shift[:3, 3] = (world_ijk_to_ras(vol) @ [20, 20, 20, 1])[:3] - (world_ijk_to_ras(vol) @ [0, 0, 0, 1])[:3]
    from FastSAM3DLib.slicer_bridge.geometry import numpy_to_matrix
    img2.SetImageToWorldMatrix(numpy_to_matrix(shift @ m))
    SL = slicer.vtkSlicerSegmentationsModuleLogic
    assert SL.SetBinaryLabelmapToSegment(img2, seg, sid, SL.MODE_REPLACE)
    mask = read_segment(seg, sid, vol)
    assert mask.sum() == 27


# -- export ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_export_labelmap_has_the_input_geometry(env, tmp_path, suffix):
    import SimpleITK as sitk
    scene, logics = env
    vol = load_volume(logics, CT_ABDOMEN, "ct")
    seg, (a, b, hidden) = new_segmentation(scene, vol, ("a", "b", "hidden"))
    engine = FakeEngine(8.0)
    session(vol, seg, a, engine).add_click(centre_of(vol, (60, 50, 56)))
    session(vol, seg, b, engine).add_click(centre_of(vol, (64, 50, 56)))
    session(vol, seg, hidden, engine).add_click(centre_of(vol, (30, 30, 30)))
    seg.GetDisplayNode().SetSegmentVisibility(hidden, False)
    out = tmp_path / f"labels{suffix}"
    info = export_labelmap(seg, vol, out)
    assert info.path == out and info.labels == {1: "a", 2: "b"}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]          # no temporary left
    got = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(str(CT_ABDOMEN))
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-5)
    labels = sitk.GetArrayFromImage(got)
    expected = np.zeros(labels.shape, np.uint8)
    expected[read_segment(seg, a, vol)] = 1
    expected[read_segment(seg, b, vol)] = 2
    np.testing.assert_array_equal(labels, expected)        # right-handed input: same voxel order
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.parametrize("kind", ["original", "flipped", "oblique", "transformed"])
def test_export_is_world_consistent(spine, tmp_path, kind):
    """Every labelled voxel of the file, placed in world space by SimpleITK,
    lies on a voxel of the segment (also for left-handed and oblique input)."""
    import SimpleITK as sitk
    scene, _, vol = spine
    v = make_variant(scene, vol, kind)
    seg, (sid,) = new_segmentation(scene, v)
    if kind == "transformed":
        seg.SetAndObserveTransformNodeID(None)
    session(v, seg, sid, FakeEngine(RADIUS)).add_click(centre_of(v, (30, 27, 26)))
    out = tmp_path / "x.nrrd"
    export_labelmap(seg, v, out)
    img = sitk.ReadImage(str(out))
    assert img.GetSize() == slicer.util.arrayFromVolume(v).shape[::-1]
    lab = sitk.GetArrayFromImage(img)
    k, j, i = np.nonzero(lab)
    lps = np.array([img.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)])
    ras_local = lps * [-1, -1, 1]
    # the file holds the volume's local geometry; world = parent transform applied
    from FastSAM3DLib.slicer_bridge import local_to_world
    world = (np.c_[ras_local, np.ones(len(ras_local))] @ local_to_world(v).T)[:, :3]
    expected = world_centres(v, read_segment(seg, sid, v))
    assert len(world) == len(expected) > 0
    assert set(map(tuple, np.round(world, 2))) == set(map(tuple, np.round(expected, 2)))


def test_export_rejects_unknown_format(spine, tmp_path):
    scene, _, vol = spine
    seg, _ = new_segmentation(scene, vol)
    with pytest.raises(ValueError, match="unsupported"):
        export_labelmap(seg, vol, tmp_path / "x.png")


def test_crop_writes_are_fast(env):
    """A ~100^3 patch is written in well under a second (crop, not full volume)."""
    import time
    scene, logics = env
    vol = load_volume(logics, CT_ABDOMEN, "ct")
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(40.0))
    info = s.add_click(centre_of(vol, (60, 50, 56)))
    assert info.timings["write"] < 1.0
    t = time.perf_counter()
    s.undo()
    assert time.perf_counter() - t < 1.0


# -- prompt points -------------------------------------------------------------------
def test_prompt_points_drive_a_session(spine):
    """Points placed in the include/exclude lists become clicks; the lists then
    show the session's clicks, through undo as well."""
    scene, logics, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    from FastSAM3DLib.slicer_bridge import PromptPoints
    got = []

    def on_point(ras, positive):
        got.append((tuple(ras), positive))
        s.add_click(ras, positive)
        prompts.show(s.clicks_ras())

    prompts = PromptPoints(scene, on_point, logics["Markups"])
    assert prompts.start_placing(True)
    inode = logics["Application"].GetInteractionNode()
    assert inode.GetCurrentInteractionMode() == inode.Place
    assert logics["Application"].GetSelectionNode().GetActivePlaceNodeID() == prompts.nodes[True].GetID()
    p1, p2 = centre_of(vol, (30, 27, 26)), centre_of(vol, (33, 27, 26))
    prompts.nodes[True].AddControlPointWorld(*p1, "")      # what placing a point does
    prompts.nodes[False].AddControlPointWorld(*p2, "")
    assert [g[1] for g in got] == [True, False]
    np.testing.assert_allclose(got[0][0], p1)
    assert s.clicks_ras()[1][1] is False
    np.testing.assert_allclose(s.clicks_ras()[1][0], p2, atol=1e-9)
    assert prompts.nodes[True].GetNumberOfControlPoints() == 1
    assert prompts.nodes[False].GetNumberOfControlPoints() == 1
    inc = prompts.nodes[True]
    assert inc.GetNthControlPointLocked(0)                     # shown points cannot be dragged
    # a point being placed right now (not yet defined) is left alone by show()
    prompts._muted = True                                     # (as the placement widget's preview point)
    inc.AddControlPointWorld(0.0, 0.0, 0.0, "placing")
    inc.UnsetNthControlPointPosition(1)
    prompts._muted = False
    s.undo()
    prompts.show(s.clicks_ras())
    assert prompts.nodes[False].GetNumberOfControlPoints() == 0
    assert inc.GetNumberOfControlPoints() == 2 and inc.GetNthControlPointPositionStatus(1) != inc.PositionDefined
    assert len(got) == 2                                   # show() places no clicks
    prompts.stop_placing(inode)
    assert inode.GetCurrentInteractionMode() != inode.Place
    prompts.close(remove_nodes=True)
    assert scene.GetFirstNodeByName("FastSAM3D include") is None


# -- threading rules -------------------------------------------------------------------
class _Untouchable:
    """Stands in for an MRML node: any use fails the test."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        raise AssertionError(f"worker half touched {self._name}.{attr}")


def test_engine_halves_touch_no_mrml_and_run_on_the_worker(spine):
    """Operation.compute runs on the EngineWorker thread without touching nodes
    or the writer; apply then writes on the calling (main) thread."""
    import threading
    from FastSAM3DLib.slicer_bridge import EngineWorker
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = session(vol, seg, sid, FakeEngine(RADIUS))
    real = (s.volume_node, s.segmentation_node, s.writer)
    s.volume_node, s.segmentation_node, s.writer = (_Untouchable("volume"), _Untouchable("segmentation"),
                                                    _Untouchable("writer"))
    worker = EngineWorker()
    threads = []
    compute = type(s.engine).new_session

    def spy(engine, image):
        threads.append(threading.current_thread().name)
        return compute(engine, image)
    s.engine.new_session = spy.__get__(s.engine)
    try:
        f1 = s.submit(worker, "click", centre_of(vol, (30, 27, 26)), True)
        f2 = s.submit(worker, "click", centre_of(vol, (34, 27, 26)), False)
        ops = [f1.result(), f2.result()]
    finally:
        worker.shutdown(wait=True)
    assert threads and threads[0] != threading.current_thread().name, "engine session made on the main thread"
    s.volume_node, s.segmentation_node, s.writer = real
    for op in ops:
        assert op.apply().changed
    np.testing.assert_array_equal(read_segment(seg, sid, vol), s.engine_session.mask())


def test_building_a_session_never_waits_for_the_engine(spine):
    """The main thread builds sessions while the worker holds the engine busy
    (encoding): nothing in the constructor may wait for the engine."""
    import threading
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    engine = FakeEngine(RADIUS)
    busy = threading.Lock()
    busy.acquire()                                     # "the worker is encoding"
    made = engine.new_session

    def waiting_new_session(image):
        with busy:
            return made(image)
    engine.new_session = waiting_new_session
    done = threading.Event()
    box = []
    thread = threading.Thread(target=lambda: (box.append(SegmentSession(vol, seg, sid, engine=engine)),
                                              done.set()), daemon=True)
    thread.start()
    try:
        assert done.wait(20), "SegmentSession() waited for the engine"
    finally:
        busy.release()
    s = box[0]
    assert not s.can_undo and not s.can_redo and s.clicks == []
    s.add_click(centre_of(vol, (30, 27, 26)))
    assert s.can_undo and not s.can_redo
    s.undo()
    assert s.can_redo
    s.redo()
    assert not s.can_redo


def test_results_arriving_after_close_or_node_removal_are_dropped(spine):
    from FastSAM3DLib.slicer_bridge import EngineWorker
    scene, _, vol = spine
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    worker = EngineWorker()
    try:
        s = session(vol, seg, a, FakeEngine(RADIUS))
        pending = s.submit(worker, "click", centre_of(vol, (30, 27, 26)))
        s.close()                                      # scene closed / model or device changed
        assert pending.result().apply() is None
        assert read_segment(seg, a, vol).sum() == 0
        s = session(vol, seg, b, FakeEngine(RADIUS))
        pending = s.submit(worker, "click", centre_of(vol, (30, 27, 26)))
        op = pending.result()
        seg.GetSegmentation().RemoveSegment(b)           # the segment was deleted meanwhile
        assert op.apply() is None
        s2 = session(vol, seg, a, FakeEngine(RADIUS))
        op = s2.submit(worker, "click", centre_of(vol, (30, 27, 26))).result()
        scene.RemoveNode(seg)
        assert op.apply() is None
    finally:
        worker.shutdown(wait=True)


def test_modifier_labelmaps_on_a_shifted_reference_grid(spine):
    """The effect hands the Segment Editor labelmaps on its own grid: a volume
    grid shifted by whole voxels is expressed on it without resampling."""
    from FastSAM3DLib.slicer_bridge.geometry import image_array, image_to_frame
    from FastSAM3DLib.slicer_bridge.writer import modifier_labelmaps
    from mrml_env import MaskPatch
    scene, _, vol = spine
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    m = world_ijk_to_ras(vol)
    ref = m.copy()
    ref[:3, 3] = (m @ [-2, -3, -4, 1])[:3]                 # reference index = volume index + (2, 3, 4)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 2:5] = True
    box, new = modifier_labelmaps(MaskPatch((10, 11, 12), mask), seg, a, vol, reference_to_frame=ref)
    arr, start = image_array(new)
    assert start == (14, 14, 14)                           # (k, j, i) + (4, 3, 2)
    np.testing.assert_array_equal(arr.astype(bool), mask)
    np.testing.assert_allclose(image_to_frame(new), ref)
    assert box.GetExtent() == (14, 19, 14, 18, 14, 17)
    # protect_others leaves another segment's voxels out
    w = SegmentEditorLogicWriter(seg, b, vol)
    w.apply(MaskPatch((11, 12, 14), np.ones((1, 1, 1), bool)))
    _, new = modifier_labelmaps(MaskPatch((10, 11, 12), mask), seg, a, vol)
    arr, _ = image_array(new)
    assert arr.sum() == mask.sum() - 1
