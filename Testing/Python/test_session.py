"""The interactive engine on real scans: cache, undo/redo, re-centring, orientation."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model
from FastSAM3DLib.image import ImageError, image_from_array, lps_to_ras
from FastSAM3DLib.session import Engine, EngineError


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(model=build_model("fastsam3d"), device="cpu")


@pytest.fixture(scope="module")
def spine(shared_data):
    image = sitk.ReadImage(str(shared_data / "mri_spine_cord_sct_t2" / "t2.nii.gz"))
    label = sitk.ReadImage(str(shared_data / "mri_spine_cord_sct_t2" / "t2_seg-manual.nii.gz"))
    return image, sitk.GetArrayFromImage(label) > 0


def _cord_point_ras(image, cord, which=0.5):
    k, j, i = np.argwhere(cord)[int(which * (cord.sum() - 1))]
    return lps_to_ras(np.array(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))))


def test_second_click_does_not_run_the_encoder(engine, spine):
    image, cord = spine
    session = engine.new_session(image)
    calls = engine.encoder_calls
    first = session.add_click(_cord_point_ras(image, cord, 0.5))
    assert first.reembedded and engine.encoder_calls == calls + 1
    second = session.add_click(_cord_point_ras(image, cord, 0.45), positive=False)
    assert not second.reembedded and engine.encoder_calls == calls + 1
    assert second.timings["encode"] < first.timings["encode"]
    # Another object in the same region shares the cached embedding.
    other = engine.new_session(image)
    other.add_click(_cord_point_ras(image, cord, 0.55))
    assert engine.encoder_calls == calls + 1


def test_patch_covers_previous_and_new_result(engine, spine):
    image, cord = spine
    session = engine.new_session(image)
    full = np.zeros(image.GetSize()[::-1], dtype=bool)
    for n, (which, positive) in enumerate([(0.5, True), (0.3, True), (0.7, False)]):
        result = session.add_click(_cord_point_ras(image, cord, which), positive=positive)
        full[result.patch.slices] = result.patch.array        # what a caller does with a patch
        np.testing.assert_array_equal(full, session.mask())


def test_undo_redo_return_exactly_the_earlier_masks(engine, spine):
    image, cord = spine
    session = engine.new_session(image)
    masks = []
    for which, positive in [(0.5, True), (0.2, True), (0.8, False)]:
        session.add_click(_cord_point_ras(image, cord, which), positive=positive)
        masks.append(session.mask())
    assert session.undo() is not None
    np.testing.assert_array_equal(session.mask(), masks[1])
    session.undo()
    np.testing.assert_array_equal(session.mask(), masks[0])
    session.redo()
    np.testing.assert_array_equal(session.mask(), masks[1])
    session.redo()
    np.testing.assert_array_equal(session.mask(), masks[2])
    assert session.redo() is None
    session.reset()
    assert not session.mask().any() and session.clicks == []
    session.undo()
    np.testing.assert_array_equal(session.mask(), masks[2])
    # A new click after undo drops the redo branch.
    session.undo()
    session.add_click(_cord_point_ras(image, cord, 0.6))
    assert session.redo() is None and len(session.clicks) == 3


def test_far_click_recentres_the_roi_and_says_so(engine):
    # A long thin volume: 1 x 1 x 1 mm, 64 x 64 x 400 voxels.
    array = np.random.default_rng(0).normal(100, 20, (400, 64, 64)).astype(np.float32)
    image = image_from_array(array, spacing=(1, 1, 1))
    session = engine.new_session(image)
    first = session.add_click((32, 32, 60), space="ijk")
    assert first.reembedded
    near = session.add_click((32, 32, 80), space="ijk")
    assert not near.reembedded and not near.recentred and near.roi == first.roi
    far = session.add_click((32, 32, 300), space="ijk")
    assert far.reembedded and far.recentred and far.roi != first.roi
    assert far.roi.contains(np.array(session.clicks[-1].point_lps), margin_voxels=8)


def test_newest_click_only_option_differs_from_accumulating(engine, spine):
    image, cord = spine
    points = [(_cord_point_ras(image, cord, w), p) for w, p in [(0.5, True), (0.25, True), (0.75, False)]]
    masks = []
    for accumulate in (True, False):
        session = engine.new_session(image, accumulate_clicks=accumulate)
        for point, positive in points:
            session.add_click(point, positive=positive)
        masks.append(session.mask())
    assert (masks[0] != masks[1]).any()


def test_points_in_every_space_agree(engine, spine):
    image, cord = spine
    k, j, i = np.argwhere(cord)[len(np.argwhere(cord)) // 2]
    lps = np.array(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
    masks = []
    for point, space in [((i, j, k), "ijk"), (lps, "lps"), (lps_to_ras(lps), "ras")]:
        session = engine.new_session(image)
        session.add_click(point, space=space)
        masks.append(session.mask())
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[2])


def test_point_outside_the_image_is_a_clear_error(engine, spine):
    image, _ = spine
    session = engine.new_session(image)
    with pytest.raises(ImageError, match="outside the image"):
        session.add_click((1e4, 0, 0), space="ras")
    assert session.clicks == []


def test_cuda_out_of_memory_falls_back_to_cpu_or_says_so(spine):
    image, cord = spine
    model = build_model("fastsam3d")
    original = model.encode
    state = {"fail": True}

    def encode_fails_once(volume):
        if state["fail"]:
            state["fail"] = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(volume)

    model.encode = encode_fails_once
    engine = Engine(model=model, device="cpu")
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        result = engine.new_session(image).add_click(_cord_point_ras(image, cord))
    assert result.patch is not None and engine.device.type == "cpu"

    state["fail"] = True
    strict = Engine(model=model, device="cpu", cpu_fallback=False)
    with pytest.raises(EngineError, match="out of memory"):
        strict.new_session(image).add_click(_cord_point_ras(image, cord))


def test_sessions_can_run_on_worker_threads(engine, spine):
    import threading
    image, cord = spine
    errors, results = [], {}

    def work(n):
        try:
            session = engine.new_session(image)
            session.add_click(_cord_point_ras(image, cord, 0.3 + 0.1 * n))
            results[n] = session.mask().sum()
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
