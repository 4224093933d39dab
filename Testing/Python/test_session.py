"""The interactive engine on real scans: cache, undo/redo, crops, carried-over logits, CPU fallback."""

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from FastSAM3DLib import build_model
from FastSAM3DLib.image import ImageError, image_from_array, lps_to_ras
from FastSAM3DLib.model import Sam3D
from FastSAM3DLib.roi import roi_box_on_image
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


def _apply(caller, update):
    """What a caller does with an update: replace exactly the patch's box."""
    if update is not None and update.patch is not None:
        caller[update.patch.slices] = update.patch.array


def test_undo_redo_return_exactly_the_earlier_masks(engine, spine):
    image, cord = spine
    session = engine.new_session(image)
    caller = np.zeros(image.GetSize()[::-1], dtype=bool)
    masks = []
    for which, positive in [(0.5, True), (0.2, True), (0.8, False)]:
        _apply(caller, session.add_click(_cord_point_ras(image, cord, which), positive=positive))
        masks.append(session.mask())
    assert len({m.sum() for m in masks}) == 3
    for step, expected in [(session.undo, 1), (session.undo, 0), (session.redo, 1), (session.redo, 2)]:
        _apply(caller, step())
        np.testing.assert_array_equal(session.mask(), masks[expected])
        np.testing.assert_array_equal(caller, masks[expected])
    assert session.redo() is None and not session.can_redo and session.can_undo
    _apply(caller, session.reset())
    assert not session.mask().any() and not caller.any() and session.clicks == []
    _apply(caller, session.undo())
    np.testing.assert_array_equal(caller, masks[2])
    # A new click after undo drops the redo branch.
    session.undo()
    session.add_click(_cord_point_ras(image, cord, 0.6))
    assert session.redo() is None and len(session.clicks) == 3


def test_undo_history_is_bounded(engine, spine):
    image, cord = spine
    session = engine.new_session(image, max_history=3)
    for which in (0.3, 0.4, 0.5, 0.6, 0.7):
        session.add_click(_cord_point_ras(image, cord, which))
    assert session.undo() and session.undo() and session.undo() is None
    assert len(session.clicks) == 3


def _recording_decode(engine):
    """Wrap engine.decode to record (points, labels, embedding, mask prompt, logits, multimask) of each call."""
    calls, real = [], engine.decode

    def decode(embedding, points, labels, mask_logits, multimask=False):
        logits, iou = real(embedding, points, labels, mask_logits, multimask)
        calls.append({"points": np.array(points), "labels": np.array(labels), "embedding": embedding,
                      "prompt": mask_logits.clone(), "logits": logits.clone(), "multimask": multimask})
        return logits, iou
    engine.decode = decode
    return calls


def test_a_far_click_carries_the_logits_over_and_keeps_the_first_crop(shared_data):
    """A brain 181 x 217 x 181 mm: a click 130 mm from the first needs a second crop;
    its mask prompt is the first crop's logits read at its cells (checked against
    an explicit trilinear interpolation), and voxels outside it stay."""
    torch.manual_seed(1)
    engine = Engine(model=build_model("fastsam3d"), device="cpu")
    calls = _recording_decode(engine)
    image = sitk.ReadImage(str(shared_data / "mri_brain_aal_colin27" / "ch2.nii.gz"))
    session = engine.new_session(image)
    first = session.add_click((60, 108, 90), space="ijk")
    near = session.add_click((60, 108, 90 + 40), space="ijk")      # inside the first crop: decoder only
    assert not near.reembedded and near.roi == first.roi
    before = session.mask()
    far = session.add_click((170, 108, 90), space="ijk")
    assert far.reembedded and far.recentred and far.roi != first.roi and len(session.tiles) == 2
    # The prompt of the new crop against scipy's trilinear interpolation of the previous logits.
    previous, sent = calls[-2]["logits"][0, 0].double().numpy(), calls[-1]["prompt"][0, 0].numpy()
    cells = np.arange(32) * 4 + 1.5                                 # low-res cell centres, crop voxels
    grid = np.stack(np.meshgrid(cells, cells, cells, indexing="ij"), axis=-1)
    voxels = first.roi.lps_to_voxel(far.roi.voxel_to_lps(grid))
    inside = np.all((voxels >= -0.5) & (voxels <= 127.5), axis=-1)
    reference = ndimage.map_coordinates(previous, np.moveaxis((voxels - 1.5) / 4, -1, 0).reshape(3, -1),
                                        order=1, mode="nearest").reshape(sent.shape)
    reference[~inside] = previous.min()
    assert 0.2 < inside.mean() < 0.9
    np.testing.assert_allclose(sent, reference, atol=1e-4)
    # Voxels of the object that the new crop does not reach are kept.
    kept = np.ones(before.shape, dtype=bool)
    kept[tuple(slice(a, b) for a, b in zip(*roi_box_on_image(image, far.roi)))] = False
    assert before[kept].sum() > 1000
    np.testing.assert_array_equal(session.mask()[kept], before[kept])


def test_newest_click_only_option_sends_only_the_newest_click(engine, spine):
    image, cord = spine
    points = [(_cord_point_ras(image, cord, w), p) for w, p in [(0.5, True), (0.25, True), (0.75, False)]]
    for accumulate, expected in ((True, [1, 2, 3]), (False, [1, 1, 1])):
        calls = _recording_decode(engine)
        try:
            session = engine.new_session(image, accumulate_clicks=accumulate)
            for point, positive in points:
                session.add_click(point, positive=positive)
        finally:
            del engine.decode                                       # back to the class's method
        assert [len(c["labels"]) for c in calls] == expected
        assert list(calls[-1]["labels"]) == ([1, 1, 0] if accumulate else [0])


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


def test_a_gpu_failure_moves_only_that_session_to_the_cpu(spine):
    """A CUDA-like failure (as an out-of-memory inside CUDA-graph capture raises it)
    in one session: that session continues on a CPU copy of the model with a
    warning; the engine and its other sessions keep their model."""
    image, cord = spine
    from oracle_model import oracle_model
    torch.manual_seed(0)
    model = Sam3D(oracle_model().config).eval()           # a small real network
    original = model.encode
    state = {"fail": 1, "calls": 0}

    def encode(volume):
        state["calls"] += 1
        if state["fail"]:
            state["fail"] -= 1
            raise RuntimeError("CUDA error: out of memory (operation failed due to a previous error "
                               "during capture)")
        return original(volume)

    model.encode = encode
    engine = Engine(model=model, device="cpu")
    session = engine.new_session(image)
    with pytest.warns(UserWarning, match="continues on the CPU"):
        result = session.add_click(_cord_point_ras(image, cord))
    assert result.patch is not None and result.fell_back_to_cpu and session.on_cpu_fallback
    assert state["calls"] == 1 and engine.model is model            # the copy ran the click
    on_the_copy = session.mask()
    assert session.add_click(_cord_point_ras(image, cord, 0.4)).fell_back_to_cpu
    other = engine.new_session(image).add_click(_cord_point_ras(image, cord, 0.3))
    assert not other.fell_back_to_cpu and state["calls"] == 2          # the engine's own model
    # The CPU copy computes what the model computes.
    reference = Engine(model=Sam3D(model.config), device="cpu")
    reference.model.load_state_dict(model.state_dict())
    expected = reference.new_session(image)
    expected.add_click(_cord_point_ras(image, cord))
    np.testing.assert_array_equal(on_the_copy, expected.mask())

    state["fail"] = 1
    strict = Engine(model=model, device="cpu", cpu_fallback=False)
    with pytest.raises(EngineError, match="out of memory"):
        strict.new_session(image).add_click(_cord_point_ras(image, cord))
    # Other errors are not mistaken for a GPU failure.
    model.encode = lambda volume: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Engine(model=model, device="cpu").new_session(image).add_click(_cord_point_ras(image, cord))


def test_caches_are_bounded_by_bytes_and_freed_with_their_image():
    import gc

    from oracle_model import oracle_model
    engine = Engine(model=oracle_model(), device="cpu", cache_bytes=int(2.5 * 32 ** 3 * 4))
    array = np.zeros((200, 40, 40), np.int16)
    array[20:180, 15:25, 15:25] = 100
    image = image_from_array(array)
    native = sitk.Cast(image, sitk.sitkInt16)                 # the engine makes a float32 copy of this
    session = engine.new_session(native)
    for k in (20, 70, 120, 170):                              # a crop each (1.5 mm crops re-centre)
        session.add_click((20, 20, k), space="ijk")
        assert engine.cache_bytes <= int(2.5 * 32 ** 3 * 4)
    assert len(engine._cache) == 2 and len(engine._images) == 1
    del session, native
    gc.collect()
    assert engine.cache_bytes == 0 and not engine._images
    # forget_image drops them at once (a caller whose voxels changed in place).
    session = engine.new_session(image)
    session.add_click((20, 20, 40), space="ijk")
    assert engine.cache_bytes > 0
    engine.forget_image(image)
    assert engine.cache_bytes == 0 and not engine._images


def test_sessions_on_worker_threads_give_what_one_thread_gives(engine, spine):
    import threading
    image, cord = spine
    points = [_cord_point_ras(image, cord, 0.3 + 0.1 * n) for n in range(3)]
    expected = []
    for point in points:
        session = engine.new_session(image)
        session.add_click(point)
        expected.append(session.mask())
    errors, results = [], {}

    def work(n):
        try:
            session = engine.new_session(image)
            session.add_click(points[n])
            results[n] = session.mask()
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in range(3):
        np.testing.assert_array_equal(results[n], expected[n])


def test_only_a_lone_first_click_takes_the_most_confident_multimask_output(spine):
    """A model marked multimask_first_click answers an object's first prompt, when it
    is one positive click, with the multimask output its IoU head rates highest;
    every other prompt (later clicks, a box) with the single mask."""
    torch.manual_seed(0)
    model = Sam3D(dataclasses.replace(build_model("fastsam3d").config, multimask_first_click=True,
                                      box_prompts=True)).eval()
    engine = Engine(model=model, device="cpu")
    calls = _recording_decode(engine)
    image, cord = spine
    session = engine.new_session(image)
    session.add_click(_cord_point_ras(image, cord, 0.5))
    session.add_click(_cord_point_ras(image, cord, 0.4), positive=False)
    corners = np.argwhere(cord)[[0, -1]][:, ::-1]
    low, high = (image.TransformIndexToPhysicalPoint([int(v) for v in c]) for c in corners)
    boxed = engine.new_session(image)
    boxed.add_box(low, high, space="lps")
    boxed.add_click(_cord_point_ras(image, cord, 0.5))
    # Without accumulated clicks the second pass also has one click, but a mask prompt.
    alone = engine.new_session(image, accumulate_clicks=False)
    alone.add_click(_cord_point_ras(image, cord, 0.5))
    alone.add_click(_cord_point_ras(image, cord, 0.45))
    assert [c["multimask"] for c in calls] == [True, False, False, False, True, False]
    first = calls[0]
    args = (first["embedding"], torch.as_tensor(first["points"], dtype=torch.float32)[None],
            torch.as_tensor(first["labels"])[None], first["prompt"])
    with torch.no_grad():
        masks, ious = model.decode(*args, multimask=True)
        single, _ = model.decode(*args)
    best = int(ious[0].argmax())
    torch.testing.assert_close(first["logits"], masks[:, best:best + 1])
    assert not torch.allclose(first["logits"], single, atol=1e-3)


def test_the_same_clicks_give_the_same_mask_whatever_was_segmented_before(shared_data):
    """A new object's first crop depends on its click alone: objects segmented
    before (whose crops fill the engine's cache) change nothing. Bundled model,
    AAL regions next to each other, a centre click and one corrective click."""
    from FastSAM3DLib.clicks import center_click
    folder = shared_data / "mri_brain_aal_colin27"
    image = sitk.ReadImage(str(folder / "ch2.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "aal.nii.gz")))
    spacing = np.array(image.GetSpacing())[::-1]
    engine = Engine("default", device="cpu")

    def segment(value):
        truth = labels == value
        session = engine.new_session(image)
        first = center_click(np.zeros_like(truth), truth, spacing)
        session.add_click(first.index[::-1], positive=first.positive, space="ijk")
        second = center_click(session.mask(), truth, spacing) or first
        session.add_click(second.index[::-1], positive=second.positive, space="ijk")
        return session.mask(), (first, second)

    for value in (1, 2, 3, 4):
        mask, clicks = segment(value)
        again = engine.new_session(image)              # the same clicks, with this object's crops cached
        for click in clicks:
            again.add_click(click.index[::-1], positive=click.positive, space="ijk")
        np.testing.assert_array_equal(again.mask(), mask)
    fresh = Engine("default", device="cpu")             # and on an engine that segmented nothing before
    alone = fresh.new_session(image)
    for click in clicks:
        alone.add_click(click.index[::-1], positive=click.positive, space="ijk")
    np.testing.assert_array_equal(alone.mask(), mask)
