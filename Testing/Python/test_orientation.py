"""Orientation invariance: the same physical clicks give the same mask in physical space,
whatever the voxel order, handedness or obliqueness of the file."""

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib.clicks import center_click, dice
from FastSAM3DLib.image import lps_to_ras
from FastSAM3DLib.session import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine(model="default", device="cpu")


@pytest.fixture(scope="module")
def tumour_case(shared_data):
    folder = shared_data / "mri_brain_glioma_brats2013"
    image = sitk.ReadImage(str(folder / "Flair_subtrMeanDivStd.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "OTMultiClass.nii.gz"))) == 2   # oedema
    return image, label


def _oblique_copy(image, degrees=20.0, spacing=0.5):
    """The scan resampled onto a grid rotated about its centre (a different voxel grid
    of the same physical content)."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    size = np.array(image.GetSize()) * np.array(image.GetSpacing())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2))
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    n = np.ceil(size / spacing).astype(int)
    origin = centre - direction @ ((n - 1) / 2 * spacing)
    return sitk.Resample(image, [int(v) for v in n], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         [spacing] * 3, direction.ravel().tolist(), 0.0, sitk.sitkFloat32)


def _physical_clicks(engine, image, label, n=3):
    """Clicks of the deterministic rule on the original file, as RAS points."""
    session, pred, clicks = engine.new_session(image), np.zeros_like(label), []
    for _ in range(n):
        click = center_click(pred, label, spacing=np.array(image.GetSpacing())[::-1])
        k, j, i = click.index
        clicks.append((lps_to_ras(np.array(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))),
                       click.positive))
        session.add_click(clicks[-1][0], positive=click.positive)
        pred = session.mask()
    return clicks


def _mask_on(engine, image, clicks, **options):
    session = engine.new_session(image, **options)
    for point, positive in clicks:
        session.add_click(point, positive=positive, space="ras")
    mask = sitk.GetImageFromArray(session.mask().astype(np.float32))
    mask.CopyInformation(image)
    return mask


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR", "SAL", "LIP"])
def test_reoriented_files_give_the_same_mask(engine, tumour_case, orientation):
    image, label = tumour_case
    clicks = _physical_clicks(engine, image, label)
    reference = sitk.GetArrayFromImage(_mask_on(engine, image, clicks)) > 0.5
    copy = sitk.DICOMOrient(image, orientation)            # voxels permuted / flipped, same physical image
    mask = _mask_on(engine, copy, clicks)
    back = sitk.GetArrayFromImage(sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0.5
    assert reference.sum() > 1000
    assert dice(back, reference) >= 0.99


def test_oblique_file_gives_the_same_mask_in_physical_space(engine, tumour_case):
    image, label = tumour_case
    clicks = _physical_clicks(engine, image, label)
    # Fixed crops: the 0.5 mm oblique copy claims a finer resolution than the 1 mm file, so
    # the zoom policy (auto) may rightly choose other crops for it; this test is about geometry.
    reference = sitk.GetArrayFromImage(_mask_on(engine, image, clicks, spacing="fixed")) > 0.5
    mask = _mask_on(engine, _oblique_copy(image), clicks, spacing="fixed")
    back = sitk.GetArrayFromImage(sitk.Resample(mask, image, sitk.Transform(), sitk.sitkLinear)) > 0.5
    assert reference.sum() > 1000
    # Not 0.99: an oblique copy is a re-interpolated image, and the model's boundary moves
    # with that (measured 2026-12-08, CPU: the bundled model 0.969 here and 0.992 for a copy
    # resampled at 0 degrees; the 2026-12-07 model 0.990 / 0.992; on BraTS labels 1 and 4 both
    # models give 0.93-0.97 at 20 degrees). A geometry error gives far less: this oedema
    # label rotated by 2 degrees about the image centre keeps Dice 0.885 with itself, by 20
    # degrees 0.41. The geometry itself is exact (half-space test in test_roi.py).
    assert dice(back, reference) >= 0.95
