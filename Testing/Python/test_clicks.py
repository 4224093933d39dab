"""Click simulation on real labels: where each rule clicks, seeds, Dice, speed-ups."""

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FastSAM3DLib.clicks import (CLICK_RULES, Click, center_click, dice, error_regions, random_click,
                                 reference_rule, ritm_click, simulate_click)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def read_mask(relative_path, label_value=None):
    """Label file as a (k, j, i) boolean array, with its spacing in that order."""
    if not (DATA / relative_path).is_file():
        pytest.skip(f"shared real data not present: {DATA / relative_path}")
    image = sitk.ReadImage(str(DATA / relative_path))
    array = sitk.GetArrayFromImage(image)
    mask = array > 0 if label_value is None else array == label_value
    return mask, np.array(image.GetSpacing())[::-1]


def full_depth(mask, spacing=None):
    """Distance to the mask border on the whole array, edge counting as border
    (what the cropped computations must reproduce)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


@pytest.fixture(scope="module")
def cord():
    return read_mask("mri_spine_cord_sct_t2/t2_seg-manual.nii.gz")[0]


@pytest.fixture(scope="module")
def enhancing_tumour():
    """BRATS enhancing tumour (label 4), on the tumour's region of the scan
    (reference computations on the whole 240x240x155 grid take minutes)."""
    mask = read_mask("mri_brain_glioma_brats2013/OTMultiClass.nii.gz", label_value=4)[0]
    region = mask[20:100, 70:150, 50:115]
    assert region.sum() == mask.sum()
    return region


def test_first_center_click_is_the_deepest_target_voxel(cord):
    # The cord runs through the whole volume along axis 1: the array edge must count as border.
    assert cord[:, 0].any() and cord[:, -1].any()
    click = center_click(np.zeros_like(cord), cord)
    depth = full_depth(cord)
    assert click.positive and cord[click.index]
    assert depth[click.index] == depth.max()
    assert click.index == np.unravel_index(np.argmax(depth), depth.shape)   # first maximum in C order


def test_center_click_goes_into_the_missed_part(cord):
    pred = cord.copy()
    pred[:, :20] = False                      # the model missed the upper 20 slices of the cord
    pred[ball(cord.shape, (10, 45, 10), 2)] = True   # and raised a small false alarm
    click = center_click(pred, cord)
    missed = cord & ~pred
    assert click.positive and missed[click.index] and click.index[1] < 20
    assert full_depth(missed)[click.index] == full_depth(missed).max()


def test_center_click_rejects_a_false_alarm_blob(cord):
    blob = ball(cord.shape, (40, 20, 12), 5)
    assert not (blob & cord).any()
    pred = cord.copy()
    pred[:, :3] = False                       # a smaller miss as well
    pred |= blob
    click = center_click(pred, cord)
    assert not click.positive and blob[click.index]
    assert click.index == (40, 20, 12)        # the centre of the ball is its deepest voxel


def test_center_click_follows_millimetres_with_anisotropic_spacing():
    # Two separate target parts: 7 voxels thin along axis 0, and 5 voxels thin along axis 1.
    gt = np.zeros((30, 30, 40), bool)
    gt[2:9, 2:13, 2:13] = True
    gt[12:25, 15:20, 20:35] = True
    empty = np.zeros_like(gt)
    assert center_click(empty, gt).index[0] < 9      # in voxels the first part is deeper
    # Axis 0 at 0.5 mm makes the first part 3.5 mm thin: the second is now deeper.
    spacing = np.array([0.5, 1.0, 1.0])
    click = center_click(empty, gt, spacing)
    assert click.index[0] >= 12
    assert full_depth(gt, spacing)[click.index] == full_depth(gt, spacing).max()


def test_center_click_on_real_anisotropic_scan_uses_physical_distance():
    tumour, spacing = read_mask("train/mri_brain_tumour_t1c_pyradiomics_brain1/label.nii.gz")
    assert spacing[0] > 6                    # 6.5 mm slices, 0.78 mm in plane
    empty = np.zeros_like(tumour)
    in_voxels, in_mm = center_click(empty, tumour), center_click(empty, tumour, spacing)
    depth_mm = full_depth(tumour, spacing)
    assert tumour[in_mm.index] and depth_mm[in_mm.index] == depth_mm.max()
    assert in_voxels.index != in_mm.index and depth_mm[in_voxels.index] < depth_mm.max()


def test_center_click_ties_go_to_the_first_component_in_c_order():
    gt = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(gt)
    gt[2:5, 2:5, 2:5] = True                  # miss A, 27 voxels
    pred[12:15, 12:15, 12:15] = True          # false alarm B, 27 voxels, later in C order
    click = center_click(pred, gt)
    assert click == Click((3, 3, 3), True)
    # Components that touch only at an edge are separate (6-connectivity).
    gt2 = np.zeros((10, 10, 10), bool)
    gt2[1:3, 1:3, 1:3] = True
    gt2[3:5, 3:5, 1:3] = True
    pred2 = np.zeros_like(gt2)
    pred2[0, 0, 0] = True
    labels, count = ndimage.label(gt2 & ~pred2, structure=ndimage.generate_binary_structure(3, 1))
    assert count == 2 and center_click(pred2, gt2).index in {(1, 1, 1), (2, 2, 2)}


def test_no_error_gives_no_click(cord):
    rng = np.random.default_rng(0)
    for rule in CLICK_RULES:
        assert simulate_click(rule, 3, cord, cord, rng) is None
        assert simulate_click(rule, 0, np.zeros_like(cord), np.zeros_like(cord), rng) is None


def test_ritm_first_click_lands_in_the_inner_half_distance_core(enhancing_tumour):
    depth = full_depth(enhancing_tumour)
    empty = np.zeros_like(enhancing_tumour)
    rng = np.random.default_rng(2023)
    picks = {ritm_click(empty, enhancing_tumour, rng) for _ in range(20)}
    assert len(picks) > 10                    # random over the core, not one fixed voxel
    for click in picks:
        assert click.positive and depth[click.index] > depth.max() / 2


def test_ritm_prefers_the_deeper_error_kind(enhancing_tumour):
    pred = enhancing_tumour.copy()
    pred[:, :, :110] = False                  # a miss
    blob = ball(pred.shape, (66, 66, 50), 12)  # a thicker false alarm beside the tumour
    assert not (blob & enhancing_tumour).any()
    pred |= blob
    fn, fp = error_regions(pred, enhancing_tumour)
    fp_depth = full_depth(fp)
    assert fp_depth.max() > full_depth(fn).max()
    rng = np.random.default_rng(7)
    for _ in range(10):
        click = ritm_click(pred, enhancing_tumour, rng)
        assert not click.positive and blob[click.index] and fp_depth[click.index] > fp_depth.max() / 2


def test_random_click_is_an_error_voxel_labelled_by_its_kind(cord):
    pred = np.roll(cord, 3, axis=2)          # shifted prediction: misses on one side, false alarms on the other
    fn, fp = error_regions(pred, cord)
    rng = np.random.default_rng(1)
    clicks = [random_click(pred, cord, rng) for _ in range(200)]
    for click in clicks:
        assert fn[click.index] or fp[click.index]
        assert click.positive == bool(fn[click.index])
    assert {c.positive for c in clicks} == {True, False}


def test_cropped_computation_equals_the_full_array_one(cord, enhancing_tumour):
    """The bounding-box crops are an optimisation only: same clicks as full arrays."""
    def full_ritm(pred, gt, rng):
        fn, fp = gt & ~pred, pred & ~gt
        fn_depth, fp_depth = full_depth(fn), full_depth(fp)
        top = max(fn_depth.max(), fp_depth.max())
        chosen = fn_depth if fn_depth.max() > fp_depth.max() else fp_depth
        voxels = np.argwhere(chosen > top / 2)
        index = tuple(int(v) for v in voxels[rng.integers(len(voxels))])
        return Click(index, bool(fn[index]))

    def full_random(pred, gt, rng):
        fn, fp = gt & ~pred, pred & ~gt
        voxels = np.argwhere(fn | fp)
        index = tuple(int(v) for v in voxels[rng.integers(len(voxels))])
        return Click(index, bool(fn[index]))

    def full_center(pred, gt, spacing):
        fn, fp = gt & ~pred, pred & ~gt
        if not pred.any():
            region, positive = gt, True
        else:
            candidates = []
            for errors, positive in ((fn, True), (fp, False)):
                labels, count = ndimage.label(errors)
                for component in range(1, count + 1):
                    mask = labels == component
                    candidates.append((-mask.sum(), np.flatnonzero(mask.ravel())[0], positive, mask))
            _, _, positive, region = min(candidates, key=lambda c: c[:2])
        depth = full_depth(region, spacing)
        return Click(tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape)), positive)

    spacing = np.array([1.0, 0.7, 2.0])
    for gt in (cord, enhancing_tumour[30:]):          # both touch the array edge
        shifted = np.roll(gt, (2, -3, 4), axis=(0, 1, 2))
        for pred in (np.zeros_like(gt), shifted, gt & shifted):
            for seed in (0, 1, 2):
                assert ritm_click(pred, gt, np.random.default_rng(seed)) == \
                    full_ritm(pred, gt, np.random.default_rng(seed))
                assert random_click(pred, gt, np.random.default_rng(seed)) == \
                    full_random(pred, gt, np.random.default_rng(seed))
            for sampling in (None, spacing):
                assert center_click(pred, gt, sampling) == full_center(pred, gt, sampling)


def test_seeds_reproduce_the_reference_schedule(enhancing_tumour):
    pred = np.roll(enhancing_tumour, 4, axis=1)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [simulate_click("reference", n, pred, enhancing_tumour, rng) for n in range(5)]

    assert run(2023) == run(2023)
    assert run(2023) != run(2024)
    # Clicks 0 and 1 are RITM, later ones random, all from the one generator.
    expected_rng, rng = np.random.default_rng(5), np.random.default_rng(5)
    expected = [ritm_click(pred, enhancing_tumour, expected_rng), ritm_click(pred, enhancing_tumour, expected_rng),
                random_click(pred, enhancing_tumour, expected_rng)]
    assert [reference_rule(n, pred, enhancing_tumour, rng) for n in range(3)] == expected


def test_center_rule_needs_no_generator_and_is_deterministic(cord):
    pred = np.roll(cord, 2, axis=0)
    clicks = {simulate_click("center", 1, pred, cord, np.random.default_rng(seed), None) for seed in range(3)}
    assert len(clicks) == 1


def test_unknown_rule_is_refused(cord):
    with pytest.raises(ValueError, match="unknown click rule"):
        simulate_click("nearest", 0, cord, cord, np.random.default_rng(0))


def test_dice_matches_a_direct_computation(cord, enhancing_tumour):
    pred = np.roll(cord, 2, axis=2)
    direct = 2 * np.sum(pred & cord) / (np.sum(pred) + np.sum(cord))
    assert dice(pred, cord) == pytest.approx(direct)
    assert dice(cord, cord) == 1.0
    assert dice(np.zeros_like(cord), cord) == 0.0
    assert np.isnan(dice(np.zeros_like(cord), np.zeros_like(cord)))
    # Integer label maps count nonzero voxels as inside.
    assert dice(enhancing_tumour.astype(np.uint8) * 4, enhancing_tumour) == 1.0


def test_a_click_on_a_large_scan_costs_far_less_than_a_full_distance_transform():
    gt = np.zeros((300, 512, 512), bool)
    gt[120:160, 200:260, 220:300] = ball((40, 60, 80), (20, 30, 40), 25)
    pred = np.zeros_like(gt)
    pred[125:165, 200:260, 220:300] = gt[120:160, 200:260, 220:300]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for n in range(3):
        assert simulate_click("center", n, pred if n else np.zeros_like(gt), gt, rng) is not None
        assert simulate_click("reference", n, pred, gt, rng) is not None
    assert (time.perf_counter() - start) / 6 < 0.5    # a full 512x512x300 transform takes ~20 s
