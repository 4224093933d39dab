"""MRML tier with the real engine: volume nodes -> SegmentSession -> segments.

A tiny randomly initialised model keeps each test a few seconds on 2 CPU
cores; the masks are meaningless but deterministic, which is all geometry,
undo and overlap checks need.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_env import (CT_ABDOMEN, SPINE_T2, load_volume, make_mrml_env,  # noqa: E402
                      make_variant, markups_points, new_segmentation, world_points)

pytestmark = pytest.mark.skipif(not SPINE_T2.is_file(), reason="shared test data missing")


def _engine_module():
    try:
        import FastSAM3DLib.session as engine_session
    except ImportError as e:                  # the engine has not landed yet
        pytest.skip(f"FastSAM3DLib.session not importable yet: {e}")
    return engine_session


@pytest.fixture(scope="module")
def engine():
    session_module = _engine_module()
    import torch
    from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
    torch.manual_seed(0)
    config = ModelConfig(name="tiny-test", encoder=EncoderConfig(
        img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=0, global_attn_indexes=(),
        attention_free_blocks=1, block_formula="fastsam3d"))
    model = Sam3D(config)
    with torch.no_grad():                     # bias the random decoder towards "object here"
        for p in model.parameters():
            p.mul_(0.5)
    return session_module.Engine(model=model, device="cpu")


@pytest.fixture
def spine():
    scene, logics = make_mrml_env()
    return scene, logics, load_volume(logics, SPINE_T2, "t2")


def world_set(volume, mask_kji, decimals=3):
    from FastSAM3DLib.slicer_bridge import world_ijk_to_ras
    k, j, i = np.nonzero(mask_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=1).astype(float)
    return set(map(tuple, np.round((ijk1 @ world_ijk_to_ras(volume).T)[:, :3], decimals)))


def sitk_world_set(image, mask_kji, decimals=3):
    k, j, i = np.nonzero(mask_kji)
    pts = [image.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)]
    return set(map(tuple, np.round(np.array(pts).reshape(-1, 3) * [-1, -1, 1], decimals)))


def centre(volume, ijk):
    from FastSAM3DLib.slicer_bridge import world_ijk_to_ras
    return (world_ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]


@pytest.mark.parametrize("kind", ["original", "flipped", "permuted", "oblique", "transformed",
                                  "transformed-seg-in-world"])
def test_segment_equals_engine_result_in_world_space(engine, spine, kind):
    """Clicks placed as markups points (world RAS): the segment, in world space,
    is exactly what the engine returns for the same physical clicks on the
    same image built independently of the bridge."""
    from FastSAM3DLib.image import image_from_ijk_to_ras
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment, world_ijk_to_ras
    scene, _, vol = spine
    v = make_variant(scene, vol, kind)
    seg, (sid,) = new_segmentation(scene, v)
    if kind == "transformed-seg-in-world":
        seg.SetAndObserveTransformNodeID(None)
    pts = markups_points(scene, [centre(v, (30, 27, 26)), centre(v, (32, 30, 25))],
                         parent=v.GetParentTransformNode())
    clicks = world_points(pts)
    s = SegmentSession(v, seg, sid, engine=engine)
    for p in clicks:
        info = s.add_click(p, positive=True)
        assert set(info.timings) >= {"engine", "write", "total"}
    mask = read_segment(seg, sid, v)

    reference = engine.new_session(image_from_ijk_to_ras(
        np.array(slicer.util.arrayFromVolume(v)), world_ijk_to_ras(v)))
    for p in clicks:
        reference.add_click(p, positive=True, space="ras")
    np.testing.assert_array_equal(mask, reference.mask())
    assert mask.any(), "the test model segments nothing: weaken the bias in the fixture"


def test_original_volume_matches_the_engine_on_the_file(engine, spine):
    """The bridge's image of a loaded NIfTI (left-handed, K-flipped by Slicer)
    and the engine's own reading of the file give the same world mask."""
    import SimpleITK as sitk
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    p = centre(vol, (30, 27, 26))
    SegmentSession(vol, seg, sid, engine=engine).add_click(p)
    image = sitk.ReadImage(str(SPINE_T2), sitk.sitkFloat32)
    direct = engine.new_session(image)
    direct.add_click(p, positive=True, space="ras")
    got = world_set(vol, read_segment(seg, sid, vol))
    assert got and got == sitk_world_set(image, direct.mask())


def test_same_world_image_same_world_segment(engine, spine):
    """Original, flipped and permuted copies hold one world image: the engine
    crops in physical space, so the world segments agree."""
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment
    scene, _, vol = spine
    clicks = [centre(vol, (30, 27, 26))]
    sets = []
    for kind in ("original", "flipped", "permuted"):
        v = make_variant(scene, vol, kind)
        seg, (sid,) = new_segmentation(scene, v, name=kind)
        s = SegmentSession(v, seg, sid, engine=engine)
        for p in clicks:
            s.add_click(p)
        sets.append(world_set(v, read_segment(seg, sid, v), 2))
    assert sets[0] and sets[0] == sets[1] == sets[2]


def test_neighbour_unchanged_and_embedding_shared(engine, spine):
    from FastSAM3DLib.slicer_bridge import SegmentSession, image_for_volume, read_segment
    scene, _, vol = spine
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    calls = engine.encoder_calls
    sa = SegmentSession(vol, seg, a, engine=engine)
    first = sa.add_click(centre(vol, (30, 27, 26)))
    assert first.reembedded and engine.encoder_calls == calls + 1
    second = sa.add_click(centre(vol, (31, 28, 26)), positive=False)
    assert not second.reembedded and engine.encoder_calls == calls + 1
    finished = read_segment(seg, a, vol).copy()
    assert finished.any()
    sb = SegmentSession(vol, seg, b, engine=engine)
    assert sb.image is sa.image is image_for_volume(engine, vol)
    sb.add_click(centre(vol, (33, 27, 26)))
    assert engine.encoder_calls == calls + 1          # the second object reuses the embedding
    np.testing.assert_array_equal(read_segment(seg, a, vol), finished)
    mb = read_segment(seg, b, vol)
    assert mb.any() and not np.any(mb & finished)
    np.testing.assert_array_equal(mb, sb.engine_session.mask() & ~finished)


def test_prefetch_embeds_before_the_first_click(engine, spine):
    """What "Initialize" does: the embedding is computed ahead, the first click reuses it."""
    from FastSAM3DLib.slicer_bridge import SegmentSession
    scene, logics = make_mrml_env()
    vol = load_volume(logics, CT_ABDOMEN, "ct")
    seg, (sid,) = new_segmentation(scene, vol)
    s = SegmentSession(vol, seg, sid, engine=engine)
    calls = engine.encoder_calls
    assert s.prefetch(centre(vol, (20, 20, 20)))
    assert engine.encoder_calls == calls + 1
    s.add_click(centre(vol, (21, 20, 19)))
    assert engine.encoder_calls == calls + 1
    assert not s.prefetch(centre(vol, (-500, 0, 0)))          # outside the image: nothing to do


def test_undo_redo_exact_counts(engine, spine):
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = SegmentSession(vol, seg, sid, engine=engine)
    counts = [0]
    for ijk, positive in [((30, 27, 26), True), ((33, 27, 26), False), ((28, 24, 27), True)]:
        s.add_click(centre(vol, ijk), positive)
        counts.append(int(read_segment(seg, sid, vol).sum()))
    for n in range(len(counts) - 1, 0, -1):
        s.undo()
        assert read_segment(seg, sid, vol).sum() == counts[n - 1]
    for n in range(1, len(counts)):
        s.redo()
        assert read_segment(seg, sid, vol).sum() == counts[n]
        np.testing.assert_array_equal(read_segment(seg, sid, vol), s.engine_session.mask())


def test_export_after_real_clicks(engine, tmp_path):
    import SimpleITK as sitk
    from FastSAM3DLib.slicer_bridge import SegmentSession, export_labelmap, read_segment
    scene, logics = make_mrml_env()
    vol = load_volume(logics, CT_ABDOMEN, "ct")
    seg, (sid,) = new_segmentation(scene, vol)
    SegmentSession(vol, seg, sid, engine=engine).add_click(centre(vol, (60, 50, 56)))
    out = tmp_path / "ct_labels.nii.gz"
    export_labelmap(seg, vol, out)
    got, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(CT_ABDOMEN))
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got) > 0, read_segment(seg, sid, vol))


def test_click_outside_the_image_is_a_clear_error(engine, spine):
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = SegmentSession(vol, seg, sid, engine=engine)
    with pytest.raises(Exception, match="outside"):
        s.add_click(centre(vol, (-50, 27, 26)))
    assert s.clicks == [] and read_segment(seg, sid, vol).sum() == 0


# -- model import (no MRML) ----------------------------------------------------------------
def test_import_weights_checks_and_caches(tmp_path):
    from FastSAM3DLib.checkpoint import save_model
    from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
    from FastSAM3DLib.slicer_bridge import models
    config = ModelConfig(name="tiny-import", encoder=EncoderConfig(
        img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=0, global_attn_indexes=(),
        attention_free_blocks=1, block_formula="fastsam3d"))
    source = tmp_path / "downloads" / "my weights.safetensors"
    source.parent.mkdir()
    save_model(Sam3D(config), source)
    cache = models.models_directory(tmp_path / "settings")
    assert [e.value for e in models.available_models(cache)] == ["default"]
    entry = models.import_weights(source, cache)
    assert entry.name == "my weights" and "tiny-import" in entry.description
    assert [e.value for e in models.available_models(cache)][1] == entry.value
    assert models.import_weights(source, cache) == entry             # cached, not rebuilt
    from FastSAM3DLib.build import build_model
    assert build_model(entry.value).config.encoder.depth == 2
    bad = tmp_path / "downloads" / "FastSAM3D.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        models.import_weights(bad, cache)
    text = source.with_suffix(".txt")
    text.write_text("x")
    with pytest.raises(ValueError, match="expected one of"):
        models.import_weights(text, cache)
    models.remove_model(entry.value)
    assert [e.value for e in models.available_models(cache)] == ["default"]


def test_image_is_prepared_once_on_the_worker_in_its_own_pixel_type(engine, spine, monkeypatch):
    """A session's image keeps the volume's pixel type (no float32 copy of the
    whole volume), and the voxel (NaN/inf) scan runs once, on the worker thread,
    not on the main thread that builds the session."""
    import threading
    import SimpleITK as sitk
    import FastSAM3DLib.image as image_module
    from FastSAM3DLib.slicer_bridge import EngineWorker, SegmentSession, read_segment
    scene, _, vol = spine
    float_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "float copy")
    slicer.util.updateVolumeFromArray(float_volume, slicer.util.arrayFromVolume(vol).astype(np.float32))
    float_volume.CopyOrientation(vol)
    seg, (sid,) = new_segmentation(scene, float_volume)
    scans = []
    count = image_module._count_non_finite
    monkeypatch.setattr(image_module, "_count_non_finite",
                        lambda image: scans.append(threading.current_thread().name) or count(image))
    s = SegmentSession(float_volume, seg, sid, engine=engine)
    assert scans == [] and s.image.GetPixelID() == sitk.sitkFloat32
    worker = EngineWorker("prepare-test")
    try:
        for ijk in [(30, 27, 26), (32, 27, 26)]:
            assert s.submit(worker, "click", centre(float_volume, ijk)).result().apply().changed
    finally:
        worker.shutdown(wait=True)
    assert len(scans) == 1 and scans[0].startswith("prepare-test")
    assert read_segment(seg, sid, float_volume).any()
    native = SegmentSession(vol, seg, sid, engine=engine)
    assert native.image.GetPixelID() == sitk.ReadImage(str(SPINE_T2)).GetPixelID() != sitk.sitkFloat32
    native.close()
    s.close()


def test_painted_slab_survives_real_engine_clicks(engine, spine):
    """With the real engine's patches: a slab painted before the session keeps
    every voxel through clicks, undo and reset."""
    from FastSAM3DLib.slicer_bridge import SegmentEditorLogicWriter, SegmentSession, read_segment
    from FastSAM3DLib.roi import MaskPatch
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    painter = SegmentEditorLogicWriter(seg, sid, vol)
    painter.apply(MaskPatch((24, 16, 5), np.ones((3, 22, 50), bool)))
    painter.close()
    slab = read_segment(seg, sid, vol).copy()
    assert slab.sum() == 3300
    s = SegmentSession(vol, seg, sid, engine=engine)
    predicted = np.zeros_like(slab)
    erased = np.zeros_like(slab)                  # taken by negative clicks from what they un-predicted
    for ijk, positive in [((30, 27, 26), True), ((34, 27, 26), False), ((28, 30, 25), True)]:
        s.add_click(centre(vol, ijk), positive)
        now = s.engine_session.mask()
        if not positive:
            erased |= slab & predicted & ~now
        predicted = now.copy()
        assert predicted.any()
        np.testing.assert_array_equal(read_segment(seg, sid, vol), (slab & ~erased) | predicted)
    s.undo()
    s.reset()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab)
    s.close()


def test_crop_spacing_reaches_the_engine_session(engine, spine):
    """SegmentSession(spacing=...) and set_spacing: the crops the engine runs on."""
    from FastSAM3DLib.slicer_bridge import SegmentSession
    scene, _, vol = spine
    seg, (a,) = new_segmentation(scene, vol)
    s = SegmentSession(vol, seg, a, engine=engine, spacing=0.75)
    assert s.operation("click", centre(vol, (30, 27, 26))).compute().result.roi.spacing == 0.75
    s.set_spacing("fixed")
    assert s.operation("click", centre(vol, (31, 27, 26))).compute().result.roi.spacing == engine.spacing_mm
    with pytest.raises(ValueError, match="spacing"):
        s.set_spacing("zoom")


def test_changed_voxels_free_the_old_images_embeddings(engine, spine):
    from FastSAM3DLib.slicer_bridge import SegmentSession, image_for_volume
    scene, _, vol = spine
    seg, (a,) = new_segmentation(scene, vol)
    SegmentSession(vol, seg, a, engine=engine).add_click(centre(vol, (30, 27, 26)))
    old = image_for_volume(engine, vol)
    assert engine.cached_rois(engine.prepare_image(old))
    vol.GetImageData().Modified()                      # the voxels changed (e.g. an edit)
    assert image_for_volume(engine, vol) is not old
    assert not engine.cached_rois(engine.prepare_image(old))


# -- box, scribble and lasso prompts with the bundled model (it has box embeddings) -------------
@pytest.fixture(scope="module")
def bundled():
    session_module = _engine_module()
    return session_module.Engine(model="default", device="cpu")


def _prompt_nodes(scene, v):
    """A rotated Markups ROI, an open curve and a closed curve on an axial slice, around the cord."""
    from FastSAM3DLib.slicer_bridge.geometry import numpy_to_matrix
    from mrml_env import rotation
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    placement = rotation(2, 20.0)
    placement[:3, 3] = centre(v, (30, 27, 26))
    roi.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(placement))
    roi.SetSize(14.0, 10.0, 12.0)
    scribble = scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "scribble")
    for ijk in [(28, 25, 24), (30, 27, 26), (33, 29, 27)]:
        scribble.AddControlPointWorld(*centre(v, ijk))
    lasso = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", "lasso")
    axial = centre(v, (30, 27, 26))[2]
    for dr, da in [(-4, -4), (4, -4), (5, 3), (-4, 4)]:
        c = centre(v, (30, 27, 26))
        lasso.AddControlPointWorld(c[0] + dr, c[1] + da, axial)
    return roi, scribble, lasso


@pytest.mark.parametrize("kind", ["original", "flipped"])
def test_prompts_equal_the_engine_result_in_world_space(bundled, spine, kind):
    """ROI box, curve scribble and closed-curve lasso (negative) through the
    bridge: after each, the segment is exactly what the engine gives for the
    same world prompts on an image built independently; each is one undo step."""
    from FastSAM3DLib.image import image_from_ijk_to_ras
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment, world_ijk_to_ras
    from FastSAM3DLib.slicer_bridge.shapes import curve_points, roi_box
    scene, _, vol = spine
    v = make_variant(scene, vol, kind)
    seg, (sid,) = new_segmentation(scene, v)
    roi, scribble, lasso = _prompt_nodes(scene, v)
    box = roi_box(roi)
    assert box.slice_axes is not None                      # rotated: its own oriented box
    s = SegmentSession(v, seg, sid, engine=bundled)
    reference = bundled.new_session(image_from_ijk_to_ras(
        np.array(slicer.util.arrayFromVolume(v)), world_ijk_to_ras(v)))
    steps = [
        (lambda: s.add_box(*box), lambda: reference.add_box(box.corner_a, box.corner_b, "ras",
                                                            slice_axes=box.slice_axes,
                                                            thickness_mm=box.thickness_mm)),
        (lambda: s.add_scribble(curve_points(scribble)),
         lambda: reference.add_scribble(curve_points(scribble), True, "ras")),
        (lambda: s.add_lasso(curve_points(lasso, closed=True), positive=False),
         lambda: reference.add_lasso(curve_points(lasso, closed=True), False, "ras")),
    ]
    masks = [read_segment(seg, sid, v).copy()]
    for bridged, direct in steps:
        info = bridged()
        direct()
        assert info.changed
        mask = read_segment(seg, sid, v)
        np.testing.assert_array_equal(mask, reference.mask())
        masks.append(mask.copy())
    assert masks[1].any() and not np.array_equal(masks[1], masks[2])
    assert [p.source for p in s.engine_session.prompts][0] == "box"
    for expected in masks[-2::-1]:
        s.undo()
        np.testing.assert_array_equal(read_segment(seg, sid, v), expected)
    s.close()


def test_painted_slab_survives_box_and_lasso(bundled, spine):
    from FastSAM3DLib.roi import MaskPatch
    from FastSAM3DLib.slicer_bridge import SegmentEditorLogicWriter, SegmentSession, read_segment
    from FastSAM3DLib.slicer_bridge.shapes import curve_points, roi_box
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    painter = SegmentEditorLogicWriter(seg, sid, vol)
    painter.apply(MaskPatch((24, 16, 5), np.ones((3, 22, 50), bool)))
    painter.close()
    slab = read_segment(seg, sid, vol).copy()
    roi, _, lasso = _prompt_nodes(scene, vol)
    s = SegmentSession(vol, seg, sid, engine=bundled)
    s.add_box(*roi_box(roi))
    predicted = s.engine_session.mask().copy()
    assert predicted.any()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab | predicted)
    s.add_lasso(curve_points(lasso, closed=True), positive=False)
    now = s.engine_session.mask()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), (slab & ~(predicted & ~now)) | now)
    s.reset()
    np.testing.assert_array_equal(read_segment(seg, sid, vol), slab)
    s.close()


def test_box_on_a_model_without_box_prompts_is_one_clear_line(engine, spine):
    """The tiny model has no box embeddings: one line naming the model to use; nothing written."""
    from FastSAM3DLib.session import EngineError
    from FastSAM3DLib.slicer_bridge import SegmentSession, read_segment
    scene, _, vol = spine
    seg, (sid,) = new_segmentation(scene, vol)
    s = SegmentSession(vol, seg, sid, engine=engine)
    with pytest.raises(EngineError, match="default model") as raised:
        s.add_box(centre(vol, (27, 24, 22)), centre(vol, (33, 31, 29)))
    assert "\n" not in str(raised.value)
    assert not read_segment(seg, sid, vol).any() and not s.can_undo
    s.add_scribble([centre(vol, (28, 25, 24)), centre(vol, (33, 29, 27))])      # clicks work on any model
    assert s.can_undo
