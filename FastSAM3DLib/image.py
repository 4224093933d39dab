"""Images in, images out: loading, validation, geometry and atomic writing.

Physical space inside the library is LPS (ITK/SimpleITK, DICOM). Slicer and
NIfTI tools speak RAS; the two differ by the sign of x and y. Voxel arrays are
numpy in SimpleITK order (k, j, i); "ijk" points are continuous voxel indices
(i, j, k) of the image.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output_path, full_suffix

# LPS <-> RAS: negate x and y (the map is its own inverse).
_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])

# Single-file formats only: a detached header (.mhd, .nhdr) could not be replaced atomically.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
_NON_FINITE_CHECK_SLAB = 64          # slices per pass: bounds the temporary mask's memory


class ImageError(ValueError):
    """An image the library cannot use; the message is one line for the user."""


def format_numbers(values, digits: int = 3) -> str:
    """(1.5, -2.0, 3.25): numbers as a user reads them (never numpy reprs)."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in np.ravel(values)) + ")"


def _one_line(exc: Exception) -> str:
    """The informative last line of a (multi-line) ITK exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# -- validation -----------------------------------------------------------------

def check_volume(image) -> None:
    """The structural checks of ``validate_image`` (3D, scalar, non-empty, sane
    geometry) without touching the voxels: cheap on any volume size."""
    if not isinstance(image, sitk.Image):
        raise ImageError(f"expected a SimpleITK image, got {type(image).__name__}")
    size = image.GetSize()
    if image.GetDimension() == 2:
        raise ImageError(f"the image is 2D (a single {size[0]}x{size[1]} slice); "
                         "FastSAM3D segments 3D volumes (for DICOM, load the whole series folder)")
    if image.GetDimension() != 3:
        raise ImageError(f"the image is {image.GetDimension()}D (size {'x'.join(map(str, size))}), "
                         "e.g. a time series; FastSAM3D needs one 3D volume: extract a single frame first")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ImageError(f"the image has {components} values per voxel (colour or vector image); "
                         "FastSAM3D needs a grey-value (scalar) volume")
    if image.GetPixelID() in _COMPLEX_PIXEL_IDS:
        raise ImageError("the image has complex voxel values; FastSAM3D needs a real-valued "
                         "(magnitude) volume")
    if min(size) == 0:
        raise ImageError(f"the image is empty: size {'x'.join(map(str, size))} voxels")
    spacing = np.array(image.GetSpacing())
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ImageError(f"the voxel spacing {format_numbers(spacing)} mm is not positive")
    _check_direction(np.array(image.GetDirection()).reshape(3, 3))


def _check_direction(direction: np.ndarray) -> None:
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise ImageError("the image's axis directions are degenerate (singular direction matrix)")
    # Tolerance for directions stored in single precision (NIfTI qform); shears are refused.
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ImageError("the image's voxel axes are not perpendicular unit vectors (sheared grid); "
                         "resample it onto a regular grid first")


def _count_non_finite(image: sitk.Image) -> int:
    voxels = sitk.GetArrayViewFromImage(image)
    return sum(int(np.count_nonzero(~np.isfinite(voxels[k:k + _NON_FINITE_CHECK_SLAB])))
               for k in range(0, voxels.shape[0], _NON_FINITE_CHECK_SLAB))


_FLOAT_PIXEL_IDS = (sitk.sitkFloat32, sitk.sitkFloat64)


def validate_image(image) -> sitk.Image:
    """``image`` itself if it is a usable 3D scalar volume; ImageError otherwise.

    The pixel type is kept (an int16 CT stays int16: half the memory of
    float32); the ROI resampling makes float32 from it. Floating-point
    volumes with NaN or infinite voxels are refused (no silent replacement).
    """
    check_volume(image)
    bad = _count_non_finite(image) if image.GetPixelID() in _FLOAT_PIXEL_IDS else 0
    if bad:
        total = int(np.prod(image.GetSize()))
        raise ImageError(f"the image has {bad} of {total} voxels that are NaN or infinite; "
                         "fix or mask them before segmenting")
    return image


# -- loading ----------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 20


def _nifti_data_size(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (header + voxels), from its header; None
    if ``header`` is not a NIfTI header."""
    import struct
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":       # header/image pair (.hdr + .img): not one file
                return None
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    n = max(1, min(int(dims[0]), 7))
    voxels = int(np.prod([max(int(d), 1) for d in dims[1:1 + n]], dtype=np.int64))
    return offset + voxels * max(int(bitpix), 8) // 8


def check_file_complete(path: Path) -> None:
    """Reject a truncated or corrupt NIfTI (.nii, .nii.gz) or gzip file with one
    line: gzip streams are read to the end (their length and CRC checked), and a
    NIfTI file must hold as many bytes as its header says. (ITK would read the
    missing voxels as zeros.) NRRD and MetaImage readers check this themselves."""
    import gzip
    import zlib
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    if compressed:
        size, header = 0, b""
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(_READ_CHUNK):
                    if len(header) < 540:
                        header += chunk[:540 - len(header)]
                    size += len(chunk)
        except EOFError:
            raise ImageError(f"{path.name} is truncated (the compressed data ends early): "
                             "copy or download it again") from None
        except (OSError, zlib.error) as exc:
            raise ImageError(f"{path.name} is corrupt ({exc}): copy or download it again") from None
    else:
        with open(path, "rb") as f:
            header = f.read(540)
        size = path.stat().st_size
    expected = _nifti_data_size(header)
    if expected is not None and size < expected:
        raise ImageError(f"{path.name} is truncated: its header describes {expected} bytes, the file holds "
                         f"{size}{' (uncompressed)' if compressed else ''}: copy or download it again")


_SLICE_GAP_TOLERANCE = 0.05            # relative spread of slice gaps taken as even
_TILT_TOLERANCE_DEGREES = 0.1


def _slice_geometry(files) -> tuple[np.ndarray, np.ndarray]:
    """(positions (n, 3), slice normal) of DICOM files from their headers."""
    reader = sitk.ImageFileReader()
    positions, normal = [], None
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        keys = set(reader.GetMetaDataKeys())
        if not {"0020|0032", "0020|0037"} <= keys:
            raise ImageError(f"{Path(name).name} has no slice position or orientation "
                             "(Image Position/Orientation Patient): cannot check the series")
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        if normal is None:
            orientation = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            normal = np.cross(orientation[:3], orientation[3:])
    return np.array(positions), normal / np.linalg.norm(normal)


def check_dicom_slices(files, folder) -> None:
    """One line for a series FastSAM3D cannot treat as a regular 3D grid: a
    gantry tilt (slices shifted along the table), missing slices, or uneven
    slice spacing. (ITK would build a volume with the first gap's spacing.)"""
    if len(files) < 3:
        return
    positions, normal = _slice_geometry(files)
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    if np.any(np.abs(gaps) < 1e-6):
        raise ImageError(f"the DICOM series in {folder} has two slices at the same position "
                         "(a duplicate or a second series mixed in)")
    along = np.abs(gaps) / np.linalg.norm(steps, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(along.min(), -1, 1))))
    if tilt > _TILT_TOLERANCE_DEGREES:
        raise ImageError(f"the DICOM series in {folder} was acquired with a gantry tilt of {tilt:.1f} "
                         "degrees; FastSAM3D needs a regular grid: correct the tilt first (e.g. Slicer's "
                         "DICOM import with 'Acquisition geometry regularization')")
    typical = float(np.median(gaps))
    if np.max(np.abs(gaps - typical)) > _SLICE_GAP_TOLERANCE * typical:
        wide = int(np.argmax(gaps))
        if gaps[wide] > 1.5 * typical:
            missing = int(round(gaps[wide] / typical)) - 1
            raise ImageError(f"the DICOM series in {folder} has {missing} missing slice(s): a gap of "
                             f"{gaps[wide]:.2f} mm after slice {wide + 1} of {len(files)} where the others are "
                             f"{typical:.2f} mm apart; load the complete series")
        raise ImageError(f"the DICOM series in {folder} has uneven slice spacing ({gaps.min():.2f} to "
                         f"{gaps.max():.2f} mm); FastSAM3D needs evenly spaced slices: resample it first")


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    # GDCM prints a warning for a folder without DICOM; the ImageError below says it once.
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if not series:
        raise ImageError(f"no DICOM series found in the folder {folder}")
    files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    # A folder may also hold scouts or derived series: the largest is the volume.
    chosen = max(files.values(), key=len)
    try:
        check_dicom_slices(chosen, folder)
        reader.SetFileNames(chosen)
        return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"cannot read the DICOM series in {folder}: {_one_line(exc)}") from None


def load_image(path) -> sitk.Image:
    """A validated volume (its own pixel type) from a file SimpleITK reads
    (NIfTI, NRRD, MHA, ...) or from a DICOM series folder (the largest series
    if several)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        check_file_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            if any(words in str(exc) for words in ("but received", "not read completely")):
                raise ImageError(f"{path.name} is truncated (its voxel data ends early): "
                                 "copy or download it again") from None
            raise ImageError(f"{path.name} is not an image file FastSAM3D can read "
                             "(expected NIfTI, NRRD, MHA, DICOM, ...)") from None
    try:
        return validate_image(image)
    except ImageError as exc:
        raise ImageError(f"{path.name}: {exc}") from None


# -- construction -------------------------------------------------------------------

def image_from_array(array_kji, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                     direction=None, space: str = "LPS", check_voxels: bool = True) -> sitk.Image:
    """A validated image (the array's pixel type; bool as uint8) from a (k, j, i)
    array and its geometry.

    ``direction`` is 3x3 (or 9 numbers, row-major) whose columns are the i, j, k
    axis directions; with ``space="RAS"`` origin and direction are in RAS.
    check_voxels=False skips the NaN/inf scan (structure and geometry are still
    checked), for a caller whose engine validates the image later anyway.
    """
    array = np.asarray(array_kji)
    if array.ndim != 3:
        raise ImageError(f"expected a 3D voxel array (k, j, i), got shape {array.shape}")
    if array.size == 0:
        raise ImageError(f"the voxel array is empty: shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(f"voxel values must be real numbers, got {array.dtype}")
    spacing = np.asarray(spacing, dtype=float)
    origin = np.asarray(origin, dtype=float)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    if spacing.shape != (3,) or origin.shape != (3,) or direction.size != 9:
        raise ImageError("spacing and origin need 3 numbers and direction a 3x3 matrix")
    direction = direction.reshape(3, 3)
    if space.upper() == "RAS":
        origin = _LPS_RAS_FLIP * origin
        direction = _LPS_RAS_FLIP[:, None] * direction
    elif space.upper() != "LPS":
        raise ImageError(f"unknown coordinate space {space!r}: use 'LPS' or 'RAS'")
    if not np.all(np.isfinite(origin)):
        raise ImageError(f"the image origin {format_numbers(origin)} is not a finite point")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ImageError(f"the voxel spacing {format_numbers(spacing)} mm is not positive")
    _check_direction(direction)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    if not check_voxels:
        check_volume(image)
        return image
    return validate_image(image)


def image_from_ijk_to_ras(array_kji, ijk_to_ras, check_voxels: bool = True) -> sitk.Image:
    """An image from Slicer's IJK-to-RAS matrix (columns = direction * spacing,
    last column = origin), kept exactly: oblique and left-handed included."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ImageError(f"the IJK-to-RAS matrix must be 4x4 and finite, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ImageError("the IJK-to-RAS matrix is not affine (last row must be 0 0 0 1)")
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise ImageError("the IJK-to-RAS matrix is singular (a voxel axis has zero length)")
    return image_from_array(array_kji, spacing=spacing, origin=matrix[:3, 3],
                            direction=matrix[:3, :3] / spacing, space="RAS", check_voxels=check_voxels)


# -- geometry -------------------------------------------------------------------------

def _index_to_lps_affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, origin) with lps = A @ ijk + origin."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return direction * np.array(image.GetSpacing()), np.array(image.GetOrigin())


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """Slicer's 4x4 IJK-to-RAS matrix of the image."""
    linear, origin = _index_to_lps_affine(image)
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_RAS_FLIP[:, None] * linear
    matrix[:3, 3] = _LPS_RAS_FLIP * origin
    return matrix


def _points(points) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.shape[-1:] != (3,):
        raise ImageError(f"expected 3D point(s) with shape (..., 3), got shape {points.shape}")
    return points


def lps_to_ras(points) -> np.ndarray:
    return _points(points) * _LPS_RAS_FLIP


def ras_to_lps(points) -> np.ndarray:
    return _points(points) * _LPS_RAS_FLIP


def point_to_lps(image: sitk.Image, point, space: str = "ras") -> np.ndarray:
    """One point given in "ras", "lps" or "ijk" (continuous (i, j, k)) -> LPS (3,)."""
    p = np.asarray(point, dtype=float)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ImageError(f"a point needs 3 finite coordinates, got {point!r}")
    space = space.lower()
    if space == "lps":
        return p
    if space == "ras":
        return ras_to_lps(p)
    if space == "ijk":
        linear, origin = _index_to_lps_affine(image)
        return linear @ p + origin
    raise ImageError(f"unknown coordinate space {space!r}: use 'ras', 'lps' or 'ijk'")


def lps_to_continuous_index(image: sitk.Image, p_lps) -> np.ndarray:
    """LPS point(s) (..., 3) -> continuous voxel index (i, j, k) (..., 3)."""
    linear, origin = _index_to_lps_affine(image)
    return (_points(p_lps) - origin) @ np.linalg.inv(linear).T


def is_inside(image: sitk.Image, p_lps):
    """Whether the LPS point lies within the voxel grid, the outer half voxel
    included (bool; an array of bools for (..., 3) points)."""
    index = lps_to_continuous_index(image, p_lps)
    tolerance = 1e-6           # a click exactly on the border stays inside despite rounding
    upper = np.array(image.GetSize()) - 0.5
    inside = np.all((index >= -0.5 - tolerance) & (index <= upper + tolerance), axis=-1)
    return bool(inside) if inside.ndim == 0 else inside


# -- writing ---------------------------------------------------------------------------

def check_output_path(path) -> Path:
    """The checks a labelmap output passes before any work is done: a known
    extension, an existing folder that can be written to, not a folder itself."""
    path = Path(path)
    if full_suffix(path).lower() not in WRITABLE_SUFFIXES:
        raise ImageError(f"cannot write {path.name}: use one of the extensions "
                         f"{', '.join(WRITABLE_SUFFIXES)} (or .seg.nrrd)")
    if not path.parent.is_dir():
        raise ImageError(f"the output folder does not exist: {path.parent}")
    if path.is_dir():
        raise ImageError(f"cannot write {path}: it is a folder")
    try:                                # a real try: access() says yes to root on read-only folders
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ImageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def write_image_atomic(image: sitk.Image, path) -> None:
    """Write ``image`` to ``path`` whole or not at all (temporary file + rename)."""
    if not isinstance(image, sitk.Image):
        raise ImageError(f"expected a SimpleITK image to write, got {type(image).__name__}")
    path = check_output_path(path)
    try:
        with atomic_output_path(path) as temporary:
            try:
                sitk.WriteImage(image, temporary, True)
            except RuntimeError as exc:
                raise OSError(f"cannot write {path}: {_one_line(exc).replace(str(temporary), str(path))}") from None
    except OSError as exc:
        message = str(exc) if str(path) in str(exc) else f"cannot write {path}: {exc}"
        raise ImageError(message) from None
