"""Loading, validation, LPS/RAS geometry and atomic writing, on real scans."""

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib import image as image_module
from FastSAM3DLib.image import (ImageError, image_from_array, image_from_ijk_to_ras, ijk_to_ras_matrix,
                                is_inside, load_image, lps_to_continuous_index, lps_to_ras, point_to_lps,
                                ras_to_lps, validate_image, write_image_atomic)


@pytest.fixture(scope="module")
def t2_path(shared_data):
    return shared_data / "mri_spine_cord_sct_t2" / "t2.nii.gz"


@pytest.fixture(scope="module")
def t2(t2_path):
    return sitk.ReadImage(str(t2_path))


def nifti_sform(path) -> np.ndarray:
    """The voxel-to-RAS sform of a NIfTI-1 file, read from the header bytes."""
    header = gzip.open(path).read(348)
    (sform_code,) = struct.unpack("<h", header[254:256])
    assert sform_code > 0
    affine = np.eye(4)
    affine[:3] = np.array(struct.unpack("<12f", header[280:328])).reshape(3, 4)
    return affine


def test_load_image_keeps_the_pixel_type_and_the_file_geometry(t2_path, t2):
    """No whole-volume float32 copy: the file's own pixel type is kept (the ROI
    resampling makes float32), so an int16 CT costs half the memory."""
    image = load_image(t2_path)
    assert image.GetPixelID() == sitk.ReadImage(str(t2_path)).GetPixelID() != sitk.sitkFloat32
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(image, get)() == getattr(t2, get)()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(t2))


@pytest.mark.parametrize("case", ["mri_spine_cord_sct_t2/t2.nii.gz",
                                  "mri_brain_aal_colin27/ch2.nii.gz",
                                  "train/mri_spine_cord_ivadomed_unf01_t2w/image.nii.gz"])
def test_ijk_to_ras_matrix_matches_the_nifti_header(shared_data, case):
    # The header's sform is RAS by the NIfTI definition: an independent check of the LPS flip.
    sform = nifti_sform(shared_data / case)
    np.testing.assert_allclose(ijk_to_ras_matrix(load_image(shared_data / case)), sform, atol=1e-4)


def test_lps_ras_and_index_conversions(t2):
    np.testing.assert_array_equal(lps_to_ras([[1.0, 2.0, 3.0]]), [[-1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras([4.0, -5.0, 6.0])), [4.0, -5.0, 6.0])
    ijk = np.array([10.25, 3.5, 40.75])
    p_lps = np.array(t2.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    np.testing.assert_allclose(point_to_lps(t2, ijk, "ijk"), p_lps, atol=1e-9)
    np.testing.assert_allclose(point_to_lps(t2, lps_to_ras(p_lps), "RAS"), p_lps, atol=1e-9)
    np.testing.assert_allclose(point_to_lps(t2, p_lps, "lps"), p_lps)
    np.testing.assert_allclose(lps_to_continuous_index(t2, p_lps), ijk, atol=1e-9)
    ras = (ijk_to_ras_matrix(t2) @ np.append(ijk, 1.0))[:3]
    np.testing.assert_allclose(ras, lps_to_ras(p_lps), atol=1e-9)
    with pytest.raises(ImageError, match="unknown coordinate space"):
        point_to_lps(t2, ijk, "xyz")
    with pytest.raises(ImageError, match="3 finite coordinates"):
        point_to_lps(t2, [1.0, np.nan, 2.0], "ras")


def test_is_inside_includes_the_outer_half_voxel(t2):
    size = np.array(t2.GetSize())
    for ijk, inside in [((-0.5, 0, 0), True), ((-0.51, 0, 0), False),
                        (tuple(size - 0.5), True), ((0, size[1] - 0.49, 0), False)]:
        assert is_inside(t2, point_to_lps(t2, ijk, "ijk")) is inside
    points = np.array([point_to_lps(t2, (1, 1, 1), "ijk"), point_to_lps(t2, (-3, 1, 1), "ijk")])
    np.testing.assert_array_equal(is_inside(t2, points), [True, False])


@pytest.mark.parametrize("case", ["train/mri_spine_cord_ivadomed_unf01_t2w/image.nii.gz",   # oblique
                                  "train/mri_spine_greymatter_sct_t2s/image.nii.gz"])      # left-handed
def test_image_from_ijk_to_ras_keeps_oblique_and_left_handed_geometry(shared_data, case):
    original = load_image(shared_data / case)
    matrix = ijk_to_ras_matrix(original)
    rebuilt = image_from_ijk_to_ras(sitk.GetArrayFromImage(original), matrix)
    np.testing.assert_allclose(rebuilt.GetSpacing(), original.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(rebuilt.GetOrigin(), original.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(rebuilt.GetDirection(), original.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(ijk_to_ras_matrix(rebuilt), matrix, atol=1e-12)
    if "t2s" in case:
        assert np.linalg.det(matrix[:3, :3]) < 0


def test_image_from_ijk_to_ras_follows_slicer_matrix_convention():
    # A Slicer-style matrix: i toward Left (-x RAS) at 0.5 mm, j toward Anterior at 0.8 mm,
    # k toward Inferior at 2 mm (left-handed), 10 degrees oblique in the axial plane.
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    matrix = np.array([[-0.5 * c, -0.8 * s, 0, 12.0],
                       [-0.5 * s, 0.8 * c, 0, -30.0],
                       [0, 0, -2.0, 55.0],
                       [0, 0, 0, 1]])
    image = image_from_ijk_to_ras(np.zeros((4, 5, 6)), matrix)
    assert image.GetSize() == (6, 5, 4)
    for ijk in [(0, 0, 0), (5, 4, 3), (2.5, 1.25, 0.5)]:
        expected_ras = (matrix @ np.append(ijk, 1.0))[:3]
        lps = image.TransformContinuousIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(lps_to_ras(lps), expected_ras, atol=1e-12)


def test_image_from_array_ras_and_lps_describe_the_same_image(t2):
    array = sitk.GetArrayFromImage(t2)
    direction = np.array(t2.GetDirection()).reshape(3, 3)
    lps = image_from_array(array, t2.GetSpacing(), t2.GetOrigin(), direction)
    ras = image_from_array(array, t2.GetSpacing(), lps_to_ras(t2.GetOrigin()),
                           np.diag([-1.0, -1.0, 1.0]) @ direction, space="ras")
    for image in (lps, ras):
        assert image.GetPixelID() == t2.GetPixelID()
        np.testing.assert_allclose(image.GetOrigin(), t2.GetOrigin(), atol=1e-12)
        np.testing.assert_allclose(image.GetDirection(), t2.GetDirection(), atol=1e-12)


def write_dicom_series(volume: sitk.Image, folder, series_uid: str, slices, position=None):
    """One DICOM file per axial slice, with the position/orientation tags a reader needs.
    position(k): the slice's LPS position (default: where slice k of ``volume`` lies)."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = volume.GetDirection()
    position = position or (lambda k: volume.TransformIndexToPhysicalPoint((0, 0, k)))
    for number, k in enumerate(slices, start=1):
        plane = volume[:, :, k]
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": series_uid, "0008|0018": f"{series_uid}.{number}",
                "0020|0013": str(number),
                "0020|0032": "\\".join(map(str, position(k))),
                "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))}
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}.{number}.dcm"))
        writer.Execute(plane)


def test_dicom_folder_loads_the_largest_series(shared_data, tmp_path):
    ct = sitk.ReadImage(str(shared_data / "train" / "ct_abdomen_upper_totalseg_dicom" / "image.nii.gz"))
    write_dicom_series(ct, tmp_path, "1.2.826.0.1.3680043.2.1125.2", range(ct.GetSize()[2]))
    write_dicom_series(ct, tmp_path, "1.2.826.0.1.3680043.2.1125.3", range(3))      # a short extra series
    image = load_image(tmp_path)
    assert image.GetSize() == ct.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct))


@pytest.mark.parametrize("layout, message", [
    ("missing", "1 missing slice(s): a gap of 4.00 mm after slice 5 of 11"),
    ("uneven", "uneven slice spacing (2.00 to 3.00 mm)"),
    ("tilt", "gantry tilt of 16.7 degrees"),
    ("regular", None),
])
def test_dicom_series_checks(tmp_path, layout, message):
    volume = sitk.GetImageFromArray(np.arange(12 * 16 * 16, dtype=np.int16).reshape(12, 16, 16))
    volume.SetSpacing((0.8, 0.8, 2.0))
    slices = list(range(12))
    position = None
    if layout == "missing":
        slices.remove(5)
    elif layout == "uneven":
        position = lambda k: (0.0, 0.0, 2.0 * k if k < 6 else 12.0 + 3.0 * (k - 6))
    elif layout == "tilt":
        position = lambda k: (0.0, 0.6 * k, 2.0 * k)
    write_dicom_series(volume, tmp_path, "1.2.826.0.1.3680043.2.1125.9", slices, position)
    if message is None:
        image = load_image(tmp_path)
        assert image.GetSize() == (16, 16, 12) and image.GetPixelID() == sitk.sitkInt16
        np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.8, 2.0), atol=1e-4)
        return
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _bad_files(folder, t2):
    """(name, path, expected message fragment) for unusable inputs built from a real scan."""
    cases = [("missing", folder / "missing.nii.gz", "not found")]
    (folder / "notes.txt").write_text("not an image\n")
    cases.append(("text", folder / "notes.txt", "not an image file"))
    (folder / "fake.nii.gz").write_bytes(b"this is no NIfTI")
    cases.append(("fake nifti", folder / "fake.nii.gz", "not an image file"))
    sitk.WriteImage(t2[:, :, 20], str(folder / "slice.nii.gz"))
    cases.append(("2D", folder / "slice.nii.gz", "2D"))
    sitk.WriteImage(sitk.JoinSeries([t2, t2]), str(folder / "series.nii.gz"))
    cases.append(("4D", folder / "series.nii.gz", "4D"))
    sitk.WriteImage(sitk.Compose([t2, t2, t2]), str(folder / "rgb.nrrd"))
    cases.append(("vector", folder / "rgb.nrrd", "3 values per voxel"))
    array = sitk.GetArrayFromImage(t2).astype(np.float32)
    array.flat[[5, 500, 5000]] = np.nan
    array.flat[7] = np.inf
    with_nan = sitk.GetImageFromArray(array)
    with_nan.CopyInformation(t2)
    sitk.WriteImage(with_nan, str(folder / "nan.nrrd"))          # NIfTI IO turns NaN into 0
    cases.append(("NaN", folder / "nan.nrrd", f"4 of {array.size} voxels that are NaN or infinite"))
    (folder / "empty").mkdir()
    cases.append(("empty folder", folder / "empty", "no DICOM series"))
    # Truncated and corrupt files (ITK would read the missing voxels as zeros).
    sitk.WriteImage(t2, str(folder / "whole.nii.gz"), True)
    data = (folder / "whole.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(data[:len(data) // 2])
    cases.append(("truncated nii.gz", folder / "cut.nii.gz", "cut.nii.gz is truncated"))
    flipped = bytearray(data)
    flipped[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (folder / "bad.nii.gz").write_bytes(bytes(flipped))
    cases.append(("corrupt nii.gz", folder / "bad.nii.gz", "bad.nii.gz is corrupt"))
    sitk.WriteImage(t2, str(folder / "whole.nii"))
    data = (folder / "whole.nii").read_bytes()
    (folder / "cut.nii").write_bytes(data[:len(data) - 100])
    cases.append(("truncated nii", folder / "cut.nii", "cut.nii is truncated: its header describes"))
    sitk.WriteImage(t2, str(folder / "whole.nrrd"), True)
    data = (folder / "whole.nrrd").read_bytes()
    (folder / "cut.nrrd").write_bytes(data[:len(data) // 2])
    cases.append(("truncated nrrd", folder / "cut.nrrd", "cut.nrrd is truncated"))
    return cases


def test_every_bad_file_gives_a_one_line_image_error(t2, tmp_path):
    for name, path, message in _bad_files(tmp_path, t2):
        with pytest.raises(ImageError) as caught:
            load_image(path)
        text = str(caught.value)
        assert message in text, (name, text)
        assert "\n" not in text, (name, text)


def test_every_bad_array_or_image_gives_a_one_line_image_error(t2):
    array = sitk.GetArrayFromImage(t2)
    nan = array.astype(np.float32)
    nan[0, 0, 0] = np.nan
    cases = [
        (lambda: validate_image(sitk.Image([0, 5, 5], sitk.sitkFloat32)), "empty"),
        (lambda: validate_image(array), "expected a SimpleITK image"),
        (lambda: validate_image(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32)), "complex"),
        (lambda: image_from_array(array[0]), "3D voxel array"),
        (lambda: image_from_array(np.zeros((0, 4, 4))), "empty"),
        (lambda: image_from_array(nan), "1 of"),
        (lambda: image_from_array(array, spacing=(1, 0, 1)), "spacing"),
        (lambda: image_from_array(array, direction=[[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]), "sheared"),
        (lambda: image_from_array(array, space="xyz"), "unknown coordinate space"),
        (lambda: image_from_ijk_to_ras(array, np.eye(3)), "4x4"),
        (lambda: image_from_ijk_to_ras(array, np.diag([1.0, 0.0, 1.0, 1.0])), "singular"),
    ]
    for make, message in cases:
        with pytest.raises(ImageError) as caught:
            make()
        assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.nii", "mask.nrrd", "mask.seg.nrrd", "mask.mha"])
def test_write_image_atomic_round_trip_leaves_only_the_output(shared_data, tmp_path, name):
    label = sitk.ReadImage(str(shared_data / "mri_spine_cord_sct_t2" / "t2_seg-manual.nii.gz"))
    write_image_atomic(label, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    back = sitk.ReadImage(str(tmp_path / name))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    np.testing.assert_allclose(back.GetDirection(), label.GetDirection(), atol=1e-6)


def test_write_image_atomic_failure_leaves_no_partial_file(t2, tmp_path, monkeypatch):
    target = tmp_path / "result.nii.gz"
    target.write_bytes(b"previous result")

    def write_half_then_fail(image, path, *args):
        with open(path, "wb") as handle:
            handle.write(b"\x1f\x8b partial")
        raise RuntimeError("ITK ERROR: NiftiImageIO: \nERROR: No space left on device")

    monkeypatch.setattr(image_module.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(ImageError, match="cannot write .*result.nii.gz: .*No space left on device"):
        write_image_atomic(t2, target)
    assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]
    assert target.read_bytes() == b"previous result"


def test_write_image_atomic_refuses_bad_targets(t2, tmp_path):
    with pytest.raises(ImageError, match="use one of the extensions"):
        write_image_atomic(t2, tmp_path / "mask.png")
    with pytest.raises(ImageError, match="use one of the extensions"):
        write_image_atomic(t2, tmp_path / "mask.mhd")          # header + separate .raw: not atomic
    with pytest.raises(ImageError, match="expected a SimpleITK image"):
        write_image_atomic(sitk.GetArrayFromImage(t2), tmp_path / "mask.nrrd")
    with pytest.raises(ImageError, match="output folder does not exist"):
        write_image_atomic(t2, tmp_path / "missing" / "mask.nrrd")
    assert list(tmp_path.iterdir()) == []
