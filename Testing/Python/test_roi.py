"""The ROI round trip on real scans: image -> 128^3 RAS+ model input -> mask on the image grid."""

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from test_image import nifti_sform

from FastSAM3DLib.image import (ImageError, image_from_array, load_image, lps_to_continuous_index,
                                lps_to_ras, ras_to_lps)
from FastSAM3DLib.roi import (MaskPatch, RoiGeometry, extract_roi, logits_on_image, logits_to_patch,
                              normalize_intensity, patch_to_full, resample_roi, roi_box_on_image,
                              roi_for_point)


@pytest.fixture(scope="module")
def t2(shared_data):
    return load_image(shared_data / "mri_spine_cord_sct_t2" / "t2.nii.gz")


def centre_lps(image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def roi_voxel_grid(size: int, step: int = 1) -> np.ndarray:
    """Continuous ROI voxel coordinates (n, n, n, 3) in tensor-axis order."""
    axis = np.arange(0, size, step, dtype=float)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


def sample_like_reference(image, points_lps):
    """Linear interpolation at LPS points, independent of SimpleITK's resampler:
    numpy index maths + scipy; NaN where not strictly inside the voxel lattice."""
    index = lps_to_continuous_index(image, points_lps)
    voxels_ijk = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)
    values = ndimage.map_coordinates(voxels_ijk, index.reshape(-1, 3).T, order=1)
    inside = np.all((index >= 0) & (index <= np.array(image.GetSize()) - 1), axis=-1)
    return np.where(inside.ravel(), values, np.nan).reshape(index.shape[:-1])


def voxel_centres_lps(image, kji) -> np.ndarray:
    """LPS centres of voxels given as (n, 3) integer (k, j, i) indices."""
    linear = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return np.asarray(kji)[:, ::-1] @ linear.T + np.array(image.GetOrigin())


def reoriented(image, axes=(0, 1, 2), flips=(False, False, False)) -> sitk.Image:
    """The same physical image stored with permuted and/or reversed voxel axes."""
    voxels_ijk = sitk.GetArrayFromImage(image).transpose(2, 1, 0).transpose(axes)
    linear = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    linear = linear[:, list(axes)]
    origin = np.array(image.GetOrigin())
    for axis, flip in enumerate(flips):
        if flip:
            voxels_ijk = np.flip(voxels_ijk, axis)
            origin = origin + linear[:, axis] * (voxels_ijk.shape[axis] - 1)
            linear[:, axis] *= -1
    spacing = np.linalg.norm(linear, axis=0)
    return image_from_array(voxels_ijk.transpose(2, 1, 0), spacing, origin, linear / spacing)


def aligned_to(image, axis_signs) -> sitk.Image:
    """``image`` reoriented so that its direction matrix is diag(axis_signs) (LPS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axes = tuple(int(np.argmax(np.abs(direction[row]))) for row in range(3))
    flips = tuple(bool(np.sign(direction[row, axes[row]]) != axis_signs[row]) for row in range(3))
    return reoriented(image, axes, flips)


def low_res_cell_centres_lps(roi: RoiGeometry, low_res: int = 32) -> np.ndarray:
    """LPS centres of the low-res logit cells, (s, s, s, 3): cell c covers ROI voxels
    factor*c .. factor*(c+1) - 1 (F.interpolate, align_corners=False)."""
    factor = roi.size / low_res
    return roi.voxel_to_lps(roi_voxel_grid(low_res) * factor + (factor - 1) / 2)


def sphere_logits(roi: RoiGeometry, centre_lps, radius_mm: float) -> torch.Tensor:
    """Low-res logits = signed distance (mm) to a sphere."""
    distance = np.linalg.norm(low_res_cell_centres_lps(roi) - centre_lps, axis=-1)
    return torch.from_numpy(radius_mm - distance).float()


# -- ROI geometry ----------------------------------------------------------------

def test_roi_grid_centre_axes_and_containment():
    roi = roi_for_point(np.array([10.0, -20.0, 30.0]))
    reference = roi.reference_image()
    assert reference.GetSize() == (128, 128, 128) and reference.GetSpacing() == (1.5, 1.5, 1.5)
    # The geometric centre, continuous voxel 63.5, is the ROI centre.
    np.testing.assert_allclose(reference.TransformContinuousIndexToPhysicalPoint((63.5,) * 3), roi.center_lps)
    np.testing.assert_allclose(roi.lps_to_voxel(roi.center_lps), [63.5] * 3)
    # Tensor axes step toward patient Right, Anterior, Superior (RAS+).
    steps_ras = lps_to_ras(roi.voxel_to_lps(np.eye(3)) - roi.voxel_to_lps(np.zeros(3)))
    np.testing.assert_allclose(steps_ras, 1.5 * np.eye(3))
    voxels = np.random.default_rng(0).uniform(-5, 130, (50, 3))
    np.testing.assert_allclose(roi.lps_to_voxel(roi.voxel_to_lps(voxels)), voxels, atol=1e-9)
    for index in [(0, 0, 0), (127.3, 64.0, 5.0)]:
        np.testing.assert_allclose(roi.voxel_to_lps(index), reference.TransformContinuousIndexToPhysicalPoint(index))
    assert roi.contains(roi.voxel_to_lps((-0.5, 0, 127.5)))
    assert not roi.contains(roi.voxel_to_lps((-0.6, 0, 0)))
    assert roi.contains(roi.voxel_to_lps((8, 60, 119)), margin_voxels=8)
    assert not roi.contains(roi.voxel_to_lps((7, 60, 60)), margin_voxels=8)
    assert roi == RoiGeometry((10, -20, 30)) and hash(roi) == hash(RoiGeometry((10, -20, 30)))
    for bad in [dict(center_lps=(0, 0)), dict(center_lps=(0, 0, np.nan)),
                dict(center_lps=(0, 0, 0), size=0), dict(center_lps=(0, 0, 0), spacing=-1.5)]:
        with pytest.raises(ImageError):
            RoiGeometry(**bad)


def test_roi_axes_are_canonical_ras_on_a_real_nifti(shared_data):
    # ch2's sform (RAS by the NIfTI definition) is diagonal and positive: its voxel axes
    # already point Right, Anterior, Superior. Sample it through the header's affine only.
    path = shared_data / "mri_brain_aal_colin27" / "ch2.nii.gz"
    sform = nifti_sform(path)
    np.testing.assert_allclose(sform[:3, :3], np.eye(3))
    image = load_image(path)
    centre_ras = (sform @ [90.3, 108.6, 80.2, 1.0])[:3]
    roi = roi_for_point(ras_to_lps(centre_ras))
    crop = resample_roi(image, roi)
    voxels = roi_voxel_grid(128)
    ras = centre_ras + 1.5 * (voxels - 63.5)                  # axis n steps +1.5 mm along RAS axis n
    ijk = (ras - sform[:3, 3]) @ np.linalg.inv(sform[:3, :3]).T
    inside = np.all((ijk >= 0) & (ijk <= np.array(image.GetSize()) - 1), axis=-1)
    voxels_ijk = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)   # NIfTI order
    expected = ndimage.map_coordinates(voxels_ijk, ijk[inside].T, order=1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(crop[inside], expected, atol=1e-3)
    beyond = np.any((ijk < -1) | (ijk > np.array(image.GetSize())), axis=-1)
    assert beyond.any() and np.all(crop[beyond] == 0)                  # zero padding outside the scan


def test_roi_axes_follow_the_patients_anatomy(shared_data):
    # Right kidney and liver lie toward the patient's Right, the aorta anterior to the back
    # muscles, the liver superior to the bladder: read straight off the tensor axes.
    folder = shared_data / "ct_abdomen_pelvis_totalseg_example"
    ct = load_image(folder / "example_ct.nii.gz")
    labels = sitk.ReadImage(str(folder / "example_seg_fast_force_split.nii.gz"))
    roi = roi_for_point(centre_lps(ct), spacing=3.0)            # 384 mm: the whole scan
    names = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "bladder": 21,
             "aorta": 52, "back_muscle_left": 86, "back_muscle_right": 87}
    centroid = {}
    for name, value in names.items():
        inside = resample_roi(sitk.Cast(labels == value, sitk.sitkFloat32), roi) > 0.5
        centroid[name] = np.argwhere(inside).mean(axis=0)
    assert centroid["kidney_right"][0] > centroid["kidney_left"][0] + 40
    assert centroid["liver"][0] > centroid["spleen"][0] + 40
    assert centroid["back_muscle_right"][0] > centroid["back_muscle_left"][0]
    assert centroid["aorta"][1] > centroid["back_muscle_left"][1] + 10
    assert centroid["liver"][2] > centroid["bladder"][2] + 40


# -- image -> model -----------------------------------------------------------------

def test_extract_roi_is_the_same_for_any_storage_orientation(t2, tmp_path):
    # t2 is stored sagittally with permuted axes; the same physical image stored as LPS,
    # RAS, permuted and flipped (and written to disk in different formats) gives the same ROI.
    variants = {"lps.nii.gz": aligned_to(t2, (1, 1, 1)), "ras.nrrd": aligned_to(t2, (-1, -1, 1)),
                "permuted.mha": reoriented(t2, (2, 0, 1)),
                "flipped.nii.gz": reoriented(t2, (0, 1, 2), (True, False, True)),
                "permuted_flipped.nrrd": reoriented(t2, (1, 2, 0), (False, True, True))}
    assert variants["lps.nii.gz"].GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert variants["ras.nrrd"].GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    roi = roi_for_point(centre_lps(t2) + [0.3, -0.7, 1.1])
    expected = extract_roi(t2, roi)
    assert expected.shape == (128,) * 3 and expected.dtype == np.float32
    assert np.ptp(expected) > 3                   # real anatomy, not only padding
    for name, variant in variants.items():
        sitk.WriteImage(variant, str(tmp_path / name))
        crop = extract_roi(load_image(tmp_path / name), roi)
        np.testing.assert_allclose(crop, expected, atol=1e-4, err_msg=name)


def test_extract_roi_of_an_oblique_image_samples_the_rotated_physical_image(t2):
    # Rotate the direction 20 degrees about the image centre, keeping the voxels: a
    # different physical image. Compare with sampling it independently (numpy + scipy)
    # and through SimpleITK's point interpolation.
    angle = np.radians(20)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    centre = centre_lps(t2)
    direction = rotation @ np.array(t2.GetDirection()).reshape(3, 3)
    origin = centre + rotation @ (np.array(t2.GetOrigin()) - centre)
    oblique = image_from_array(sitk.GetArrayFromImage(t2), t2.GetSpacing(), origin, direction)
    roi = roi_for_point(centre + [0.4, 0.9, -1.3])
    crop = resample_roi(oblique, roi)
    expected = sample_like_reference(oblique, roi.voxel_to_lps(roi_voxel_grid(128)))
    inside = ~np.isnan(expected)
    assert inside.sum() > 30_000
    np.testing.assert_allclose(crop[inside], expected[inside], rtol=1e-5, atol=1e-2)
    for voxel in np.argwhere(inside)[::1000]:
        point = roi.voxel_to_lps(voxel).tolist()
        assert crop[tuple(voxel)] == pytest.approx(oblique.EvaluateAtPhysicalPoint(point, sitk.sitkLinear),
                                                  rel=1e-5, abs=1e-2)
    assert np.abs(crop - resample_roi(t2, roi))[inside].mean() > 10       # rotation changed the image


def test_normalize_intensity_uses_voxels_above_zero_and_unbiased_std():
    crop = np.array([[[-3.0, 0.0, 1.0, 2.0, 6.0]]], dtype=np.float32)
    foreground = np.array([1.0, 2.0, 6.0])
    expected = (crop - foreground.mean()) / foreground.std(ddof=1)
    result = normalize_intensity(crop)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    for unchanged in (np.full((2, 2, 2), 5.0), np.full((2, 2, 2), -1.0), np.zeros((2, 2, 2))):
        np.testing.assert_array_equal(normalize_intensity(unchanged), unchanged)


def test_extract_roi_on_an_anisotropic_image(shared_data):
    # 0.3 x 0.3 x 10 mm (thin in-plane, thick slices), made from a real brain scan.
    ch2 = load_image(shared_data / "mri_brain_aal_colin27" / "ch2.nii.gz")
    grid = sitk.Image([500, 500, 14], sitk.sitkFloat32)
    grid.SetSpacing((0.3, 0.3, 10.0))
    grid.SetOrigin((centre_lps(ch2) - [75.0, 75.0, 65.0]).tolist())
    image = sitk.Resample(ch2, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    roi = roi_for_point(centre_lps(image) + [2.1, -3.3, 4.0])
    started = time.perf_counter()
    crop = extract_roi(image, roi)
    assert time.perf_counter() - started < 1.0
    raw = resample_roi(image, roi)
    expected = sample_like_reference(image, roi.voxel_to_lps(roi_voxel_grid(128)))
    inside = ~np.isnan(expected)
    np.testing.assert_allclose(raw[inside], expected[inside], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(crop, normalize_intensity(raw))
    assert np.all(np.isfinite(crop)) and crop.std() > 0.5
    # The mask comes back on the fine grid: 150 mm in-plane, the slices the ROI reaches.
    patch = logits_to_patch(image, roi, sphere_logits(roi, roi.center_lps, 30.0))
    assert patch.array.shape == (14, 500, 500)
    full = patch_to_full(image, patch)
    index = np.argwhere(full)
    distance = np.linalg.norm(voxel_centres_lps(image, index) - roi.center_lps, axis=1)
    assert distance.max() < 30.5 and full.sum() > 0.9 * 4 / 3 * np.pi * 30 ** 3 / (0.3 * 0.3 * 10)


def test_extract_roi_cost_does_not_grow_with_the_volume():
    volume = sitk.Image([512, 512, 2000], sitk.sitkInt16)        # 1 GB of int16, like a long CT
    volume.SetSpacing((0.7, 0.7, 0.5))
    for index in np.ndindex(4, 4, 4):
        volume.SetPixel([300 + index[0], 200 + index[1], 1500 + index[2]], 1000)
    bright = volume.TransformContinuousIndexToPhysicalPoint((301.5, 201.5, 1501.5))
    roi = roi_for_point(np.array(bright) + [20.0, -15.0, 40.0])
    extract_roi(volume, roi)                                     # warm-up
    started = time.perf_counter()
    crop = extract_roi(volume, roi)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"extract_roi took {elapsed:.2f} s"
    print(f"extract_roi on 512x512x2000 int16: {elapsed * 1000:.0f} ms")
    peak = np.unravel_index(np.argmax(crop), crop.shape)
    np.testing.assert_allclose(roi.voxel_to_lps(peak), bright, atol=1.5)


def test_extract_roi_refuses_unusable_images(t2):
    roi = roi_for_point(centre_lps(t2))
    for image, message in [(t2[:, :, 3], "2D"), (sitk.Compose([t2, t2]), "2 values per voxel"),
                           (sitk.GetArrayFromImage(t2), "SimpleITK image")]:
        with pytest.raises(ImageError, match=message):
            extract_roi(image, roi)


# -- model -> image ------------------------------------------------------------------

def test_logits_on_image_equal_the_reference_upsampling_at_roi_voxel_centres():
    torch.manual_seed(0)
    roi = roi_for_point(np.array([-12.0, 40.0, 7.0]))
    logits = torch.randn(1, 1, 32, 32, 32)
    upsampled = F.interpolate(logits, size=(128,) * 3, mode="trilinear", align_corners=False)[0, 0]
    # An image whose voxel centres are ROI voxel centres, in another axis order and
    # orientation, at coarser spacings, reaching past the ROI on every side.
    direction = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], dtype=float)      # columns: L/R, A/P, S/I
    spacing = np.array([3.0, 1.5, 4.5])
    origin = roi.voxel_to_lps([130, -8, -6])        # i -> +2 ROI voxels on axis 1, j -> +1 on 2, k -> -3 on 0
    image = image_from_array(np.zeros((60, 150, 80)), spacing, origin, direction)
    values = logits_on_image(image, roi, logits)
    start, stop = roi_box_on_image(image, roi)
    assert values.shape == tuple(b - a for a, b in zip(start, stop))
    kji = np.argwhere(np.ones(values.shape, dtype=bool)) + start
    u = roi.lps_to_voxel(voxel_centres_lps(image, kji))
    np.testing.assert_allclose(u, np.round(u), atol=1e-9)
    u = np.round(u).astype(int)
    inside = np.all((u >= 0) & (u < 128), axis=1)
    got = values.numpy().reshape(-1)
    expected = upsampled[tuple(u[inside].T)].numpy()
    np.testing.assert_allclose(got[inside], expected, atol=1e-5)
    assert inside.sum() > 10_000 and np.all(np.isneginf(got[~inside]))
    patch = logits_to_patch(image, roi, logits[0, 0])
    np.testing.assert_array_equal(patch.array.reshape(-1), got > 0)


def test_logits_to_patch_on_the_roi_grid_itself_is_the_upsampled_mask():
    torch.manual_seed(1)
    roi = roi_for_point(np.array([5.0, 6.0, 7.0]))
    logits = torch.randn(32, 32, 32)
    image = roi.reference_image()
    patch = logits_to_patch(image, roi, logits)
    assert patch.start_kji == (0, 0, 0) and patch.stop_kji == (128, 128, 128)
    upsampled = F.interpolate(logits[None, None], size=(128,) * 3, mode="trilinear", align_corners=False)
    np.testing.assert_array_equal(patch.array, (upsampled[0, 0] > 0).numpy().transpose(2, 1, 0))
    with pytest.raises(ImageError, match="low-res logits"):
        logits_to_patch(image, roi, torch.zeros(2, 32, 32, 32))


@pytest.mark.parametrize("case", ["train/mri_spine_cord_ivadomed_unf01_t2w/image.nii.gz",   # oblique
                                  "train/mri_spine_greymatter_sct_t2s/image.nii.gz",       # left-handed
                                  "mri_spine_cord_sct_t2/t2.nii.gz"])                      # permuted
def test_plane_logits_come_back_as_the_half_space_on_any_grid(shared_data, case):
    # Trilinear interpolation reproduces a linear function exactly, so logits = signed
    # distance to an oblique plane must give exactly that half-space on the image grid
    # (a swapped or flipped axis, or a half-cell shift, would tilt or move it).
    image = load_image(shared_data / case)
    roi = roi_for_point(centre_lps(image) + [1.7, -2.2, 0.6])
    normal = np.array([0.48, -0.6, 0.64])
    through = roi.center_lps + np.array([2.0, 1.0, -3.0])
    logits = torch.from_numpy((low_res_cell_centres_lps(roi) - through) @ normal)
    full = patch_to_full(image, logits_to_patch(image, roi, logits))
    lps = voxel_centres_lps(image, np.argwhere(np.ones(full.shape, dtype=bool)))
    side = ((lps - through) @ normal).reshape(full.shape)
    u = roi.lps_to_voxel(lps).reshape(full.shape + (3,))
    unclamped = np.all((u >= 1.5) & (u <= 125.5), axis=-1)       # F.interpolate clamps at the edges
    clear = unclamped & (np.abs(side) > 1e-3)
    assert clear.mean() > 0.5 and 0.2 < full[clear].mean() < 0.8
    np.testing.assert_array_equal(full[clear], side[clear] > 0)
    outside_roi = np.any((u < -0.5) | (u > 127.5), axis=-1)
    assert not full[outside_roi].any()


def test_label_round_trip_through_low_res_logits_recovers_the_heart(shared_data):
    # Heart label -> signed distance -> 32^3 low-res logits of a ROI around it -> mask on
    # the original grid: the paste-back loses only what 6 mm logit cells cannot carry.
    folder = shared_data / "train" / "ct_chest_aorta_heart_totalseg"
    image = load_image(folder / "image.nii.gz")
    heart = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz"))) == 2
    spacing_kji = image.GetSpacing()[::-1]
    signed_distance = (ndimage.distance_transform_edt(heart, sampling=spacing_kji)
                       - ndimage.distance_transform_edt(~heart, sampling=spacing_kji))
    low, high = np.argwhere(heart).min(0), np.argwhere(heart).max(0)
    centre = image.TransformContinuousIndexToPhysicalPoint(((low + high) / 2)[::-1].tolist())
    roi = roi_for_point(centre)
    corners = np.array([image.TransformIndexToPhysicalPoint(tuple(map(int, c[::-1])))
                        for c in np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1).T])
    assert all(roi.contains(c, margin_voxels=8) for c in corners)         # well inside the ROI
    low_res = sitk.Image([32] * 3, sitk.sitkFloat32)                      # the 6 mm logit cells
    low_res.SetSpacing([6.0] * 3)
    low_res.SetDirection(roi.reference_image().GetDirection())
    low_res.SetOrigin(low_res_cell_centres_lps(roi)[0, 0, 0].tolist())
    distance_image = image_from_array(signed_distance, image.GetSpacing(), image.GetOrigin(),
                                      image.GetDirection())
    logits = sitk.GetArrayFromImage(sitk.Resample(distance_image, low_res, sitk.Transform(),
                                                  sitk.sitkLinear, -50.0)).transpose(2, 1, 0)
    patch = logits_to_patch(image, roi, torch.from_numpy(np.ascontiguousarray(logits)))
    mask = patch_to_full(image, patch)
    dice = 2 * (mask & heart).sum() / (mask.sum() + heart.sum())
    assert dice >= 0.95, dice
    print(f"heart Dice after the low-res round trip: {dice:.4f}")


def test_roi_box_on_image_clips_and_reports_no_overlap(t2):
    size_kji = t2.GetSize()[::-1]
    start, stop = roi_box_on_image(t2, roi_for_point(centre_lps(t2)))
    assert start == (0, 0, 0) and stop == size_kji                         # 192 mm ROI > 60 mm image
    # 8 mm centred between voxels: exactly 8 voxel centres on each axis.
    small = roi_for_point(t2.TransformContinuousIndexToPhysicalPoint((29.5, 26.5, 25.5)), size=8, spacing=1.0)
    start, stop = roi_box_on_image(t2, small)
    assert tuple(b - a for a, b in zip(start, stop)) == (8, 8, 8)
    far = roi_for_point(centre_lps(t2) + [500.0, 0, 0])
    assert roi_box_on_image(t2, far) is None
    empty = logits_to_patch(t2, far, torch.ones(32, 32, 32))
    assert empty.array.size == 0 and not patch_to_full(t2, empty).any()


def test_mask_patch_boxes():
    patch = MaskPatch((2, 3, 4), np.ones((3, 2, 1), dtype=np.uint8))
    assert patch.array.dtype == bool and patch.stop_kji == (5, 5, 5)
    full = np.zeros((6, 6, 6), dtype=bool)
    full[2, 3, 4] = False
    full[0, 0, 0] = True
    patch.paste_into(full)
    assert full[patch.slices].all() and full.sum() == 7
    other = MaskPatch((0, 4, 1), np.zeros((1, 2, 2), dtype=bool))
    assert patch.union_box(other) == ((0, 3, 1), (5, 6, 5))
    with pytest.raises(ImageError, match="does not fit"):
        MaskPatch((5, 5, 5), np.ones((2, 2, 2))).paste_into(full)


def test_positive_box_bounds_the_mask_of_the_whole_roi_box():
    from FastSAM3DLib.roi import positive_box_on_image
    angle = np.radians(20)
    oblique = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image = image_from_array(np.zeros((90, 100, 110), np.float32), spacing=(0.8, 0.9, 1.1),
                             direction=oblique)
    roi = roi_for_point(image.TransformContinuousIndexToPhysicalPoint((55, 50, 45)))
    gen = torch.Generator().manual_seed(0)
    for blob in range(4):
        logits = 0.5 * torch.randn(32, 32, 32, generator=gen) - 3.0
        c = torch.randint(10, 22, (3,), generator=gen)
        logits[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] += 4.0   # one compact object
        whole = logits_to_patch(image, roi, logits)
        box = positive_box_on_image(image, roi, logits)
        inside = logits_to_patch(image, roi, logits, box)
        full_whole, full_inside = np.zeros(image.GetSize()[::-1], bool), np.zeros(image.GetSize()[::-1], bool)
        whole.paste_into(full_whole)
        inside.paste_into(full_inside)
        assert full_whole.any()
        np.testing.assert_array_equal(full_whole, full_inside)
        assert inside.array.size < whole.array.size
    assert positive_box_on_image(image, roi, torch.full((32, 32, 32), -1.0)) is None
