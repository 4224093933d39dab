"""The ROI policy: crop spacing per object, tiles for objects larger than one crop,
clicks that never erase what lies outside their crops. A model with a known answer
(oracle_model: the bright voxels of its crop) makes every expected mask exact."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from FastSAM3DLib.image import image_from_array
from FastSAM3DLib.roi import RoiGeometry
from FastSAM3DLib.session import (Engine, PhysicalClick, RoiPolicy, Tile, logits_for_crop, parse_spacing)
from oracle_model import NEGATIVE_RADIUS, oracle_model


def _engine(**options):
    return Engine(model=oracle_model(options.pop("trained", None)), device="cpu", **options)


@pytest.fixture(scope="module")
def rod():
    """A 280 mm rod (radius 6 mm) along k on a 1 mm grid: longer than a 192 mm crop."""
    k, j, i = np.mgrid[:320, :40, :40]
    array = (((j - 19.5) ** 2 + (i - 19.5) ** 2 <= 36) & (k >= 20) & (k < 300)).astype(np.float32) * 100
    return image_from_array(array), array > 0


def _ball(radius_mm, spacing_mm, shape=64):
    k, j, i = (np.mgrid[:shape, :shape, :shape] - (shape - 1) / 2) * spacing_mm
    array = ((k ** 2 + j ** 2 + i ** 2) <= radius_mm ** 2).astype(np.float32) * 100
    return image_from_array(array, spacing=(spacing_mm,) * 3)


def _centre_ijk(image):
    return tuple((np.array(image.GetSize()) - 1) / 2)


def test_an_object_longer_than_one_crop_keeps_every_voxel_when_clicked_at_both_ends(rod):
    image, truth = rod
    session = _engine().new_session(image)
    first = session.add_click((19.5, 19.5, 40), space="ijk")
    after_first = session.mask()
    assert after_first[40, 20, 20] and not after_first[290, 20, 20]
    second = session.add_click((19.5, 19.5, 290), space="ijk")
    after_second = session.mask()
    assert second.reembedded and len(session.tiles) == 2          # a second tile, the first kept
    assert np.array_equal(after_second & after_first, after_first)     # nothing lost
    assert after_second[290, 20, 20]
    # A click between the two tiles joins them: the whole rod, end to end.
    session.add_click((19.5, 19.5, 165), space="ijk")
    final = session.mask()
    assert np.array_equal(final & after_second, after_second)
    assert final[24:296, 20, 20].all() and not (final & ~ndimage.binary_dilation(truth, iterations=3)).any()
    assert first.roi.spacing == 1.5                                  # official-checkpoint default: fixed


def test_a_far_negative_click_removes_nothing_outside_its_neighbourhood(rod):
    image, _ = rod
    session = _engine().new_session(image)
    session.add_click((19.5, 19.5, 40), space="ijk")
    before = session.mask()
    # Far beyond the crop: no crop is centred on a negative click, nothing changes.
    far = session.add_click((19.5, 19.5, 290), positive=False, space="ijk")
    assert np.array_equal(session.mask(), before) and far.encoder_runs == 0
    # Inside the crop: only its ball (plus one low-res cell of interpolation) goes.
    session.add_click((19.5, 19.5, 100), positive=False, space="ijk")
    after = session.mask()
    k = np.arange(before.shape[0])[:, None, None]
    near = np.abs(k - 100) <= NEGATIVE_RADIUS * 1.5 + 6 + 1
    assert np.array_equal(after[~near.repeat(40, 1).repeat(40, 2)], before[~near.repeat(40, 1).repeat(40, 2)])
    assert not after[100, 20, 20] and before[100, 20, 20]


def test_every_positive_click_stays_in_the_prompt_of_every_crop_that_holds_it(rod):
    image, _ = rod
    engine = _engine()
    session = engine.new_session(image)
    calls = engine.model.decoder_calls
    # The negative click lies beyond the reach of its ball (18 mm) plus one low-res cell from every positive one.
    clicks = [(40, True), (60, True), (290, True), (90, False), (270, True), (165, True)]
    for k, positive in clicks:
        n = len(calls)
        result = session.add_click((19.5, 19.5, k), positive=positive, space="ijk")
        for call, roi in zip(calls[n:], result.crops):
            sent = {tuple(np.round(roi.voxel_to_lps(p.numpy()), 3))
                    for p, lab in zip(call["points"], call["labels"]) if int(lab) == 1}
            wanted = {tuple(np.round(c.point_lps, 3)) for c in session.clicks
                      if c.positive and roi.contains(np.array(c.point_lps), 0)}
            assert wanted <= sent
    mask = session.mask()
    assert all(mask[k, 20, 20] for k, positive in clicks if positive)


def test_the_ladder_picks_finer_crops_for_small_objects_and_coarser_for_large():
    policy = RoiPolicy(128, 1.5, "auto", image_spacing=(0.5, 0.5, 0.5))
    assert policy.steps == (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    assert policy.spacing_for(20) == 0.5 and policy.spacing_for(60) == 0.75
    assert policy.spacing_for(150) == 2.0 and policy.spacing_for(250) == 3.0 and policy.spacing_for(900) == 3.0
    # Never finer than the scan (1 mm voxels), nor outside the model's trained range.
    assert RoiPolicy(128, 1.5, "auto", image_spacing=(1.0, 1.0, 3.0)).spacing_for(20) == 1.0
    assert RoiPolicy(128, 1.5, "auto", image_spacing=(0.5,) * 3, trained_range=(0.75, 2.0)).steps == (
        0.75, 1.0, 1.5, 2.0)
    assert RoiPolicy(128, 1.5, "fixed").spacing_for(20) == 1.5 and RoiPolicy(128, 1.5, 0.8).spacing_for(900) == 0.8

    engine = _engine(trained=(0.5, 3.0))
    assert engine.spacing_setting == "auto"                      # trained across spacings: zoom on
    small = engine.new_session(_ball(6, 0.5), refine=False)      # a 12 mm ball on a 0.5 mm scan
    first = small.add_click(_centre_ijk(small.image), space="ijk")
    second = small.add_click(_centre_ijk(small.image), space="ijk")
    assert first.roi.spacing == 1.5 and second.roi.spacing == 0.5 and second.reembedded
    large = engine.new_session(_ball(110, 2.0, shape=128), refine=False)   # a 220 mm ball
    large.add_click(_centre_ijk(large.image), space="ijk")
    assert large.add_click(_centre_ijk(large.image), space="ijk").roi.spacing == 3.0
    # The zoomed crop keeps the object and sharpens it: closer to the truth than the 1.5 mm one.
    truth = _ball(6, 0.5)
    from SimpleITK import GetArrayFromImage
    truth = GetArrayFromImage(truth) > 0
    fine = small.mask()
    small.undo()
    coarse = small.mask()
    assert (fine ^ truth).sum() < (coarse ^ truth).sum()


def test_refine_reruns_at_once_on_the_zoomed_crop():
    engine = _engine(trained=(0.5, 3.0))
    session = engine.new_session(_ball(6, 0.5))                  # refine: on by default
    result = session.add_click(_centre_ijk(session.image), space="ijk")
    assert [r.spacing for r in result.crops] == [1.5, 0.5] and result.encoder_runs == 2
    assert [t.roi for t in session.tiles] == [result.crops[1]]   # the coarse tile adds nothing: dropped
    # The zoom pass got the first pass's logits carried over as its mask prompt.
    first, zoomed = engine.model.decoder_calls[-2:]
    carried = logits_for_crop([Tile(result.crops[0], first["logits"], 0)], result.crops[1], 32, "cpu")
    assert torch.equal(zoomed["prompt"], carried) and not torch.equal(carried, first["logits"])
    assert not session.add_click(_centre_ijk(session.image), space="ijk").reembedded   # zoomed once

def test_undo_and_redo_across_a_zoom_and_a_new_tile_restore_the_exact_masks(rod):
    image, _ = rod
    engine = _engine(trained=(0.5, 3.0), spacing="fixed")
    for session, clicks in [(engine.new_session(image), [(40, True), (290, True), (100, False), (165, True)]),
                            (engine.new_session(_ball(6, 0.5), spacing="auto"), [(31.5, True), (31.5, True),
                                                                                (27, False), (31.5, True)])]:
        caller = np.zeros(session.image.GetSize()[::-1], dtype=bool)     # what a caller writes
        masks = [session.mask()]
        for k, positive in clicks:
            point = (19.5, 19.5, k) if session.image.GetSize()[2] == 320 else (31.5, 31.5, k)
            update = session.add_click(point, positive=positive, space="ijk")
            if update.patch is not None:
                caller[update.patch.slices] = update.patch.array
            masks.append(session.mask())
            assert np.array_equal(caller, masks[-1])
        assert len({m.sum() for m in masks}) > 2                      # the steps differ
        for expected in masks[-2::-1]:
            update = session.undo()
            if update.patch is not None:
                caller[update.patch.slices] = update.patch.array
            assert np.array_equal(session.mask(), expected) and np.array_equal(caller, expected)
        assert session.undo() is None
        for expected in masks[1:]:
            update = session.redo()
            if update.patch is not None:
                caller[update.patch.slices] = update.patch.array
            assert np.array_equal(session.mask(), expected) and np.array_equal(caller, expected)


def test_logits_carried_between_crops_equal_an_explicit_trilinear_reference():
    logits = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    source = RoiGeometry((10.0, -20.0, 30.0), 128, 1.5)
    target = RoiGeometry((80.0, 5.0, 70.0), 128, 0.75)           # finer, off-centre, partly outside
    carried = logits_for_crop([Tile(source, logits, 0)], target, 32, "cpu")[0, 0].numpy()
    # Reference: target cell centres -> LPS -> source crop voxels -> source low-res cell
    # coordinates (cell c's centre is crop voxel 4c + 1.5); trilinear with clamped edges.
    cells = np.arange(32) * 4 + 1.5
    grid = np.stack(np.meshgrid(cells, cells, cells, indexing="ij"), axis=-1)
    voxels = source.lps_to_voxel(target.voxel_to_lps(grid))
    inside = np.all((voxels >= -0.5) & (voxels <= 127.5), axis=-1)
    at = np.moveaxis((voxels - 1.5) / 4, -1, 0)
    reference = ndimage.map_coordinates(logits[0, 0].double().numpy(), at.reshape(3, -1), order=1,
                                        mode="nearest").reshape(32, 32, 32)
    reference[~inside] = float(logits.min())
    assert 0.1 < inside.mean() < 0.9
    np.testing.assert_allclose(carried, reference, atol=1e-4)


def test_spacing_settings_parse_and_reach_the_session():
    assert parse_spacing("auto") == "auto" and parse_spacing("FIXED") == "fixed" and parse_spacing("0.75") == 0.75
    for bad in ("zoom", "-1", "nan", None):
        with pytest.raises(ValueError, match="spacing"):
            parse_spacing(bad)
    engine = _engine()
    assert engine.spacing_setting == "fixed"                     # trained at one spacing only
    session = engine.new_session(_ball(6, 0.5), spacing=0.75)
    assert session.add_click(_centre_ijk(session.image), space="ijk").roi.spacing == 0.75
    assert isinstance(session.clicks[0], PhysicalClick)
