"""Volume and segmentation geometry: MRML nodes <-> numpy arrays and 4x4 matrices.

Conventions: arrays on a volume grid are (k, j, i), as ``slicer.util.arrayFromVolume``;
"world" is Slicer's RAS after all parent transforms; a node's "local" frame is
the one its own matrices are written in (before its parent transforms). Only
linear parent transforms are supported.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtkmodules.util import numpy_support

import slicer

BINARY_LABELMAP = "Binary labelmap"


class GeometryError(ValueError):
    """A node's geometry cannot be used (non-linear transform, vector volume...)."""


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def local_to_world(node) -> np.ndarray:
    """4x4 from the node's local frame to world RAS (identity if untransformed)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise GeometryError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'. "
            "FastSAM3D needs a linear geometry: harden the transform on the node "
            "(Data module, right-click the transform, 'Harden transform') or remove it.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


def local_ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK-to-RAS composed with its (linear) parent transforms."""
    return local_to_world(volume_node) @ local_ijk_to_ras(volume_node)


def ras_to_ijk(volume_node, ras) -> np.ndarray:
    """World RAS point(s) (..., 3) -> continuous voxel index (i, j, k) of the volume."""
    ras = np.asarray(ras, dtype=float)
    inverse = np.linalg.inv(world_ijk_to_ras(volume_node))
    homogeneous = np.concatenate([ras, np.ones(ras.shape[:-1] + (1,))], axis=-1)
    return (homogeneous @ inverse.T)[..., :3]


def volume_shape_kji(volume_node) -> tuple[int, int, int]:
    dims = volume_node.GetImageData().GetDimensions()
    return (dims[2], dims[1], dims[0])


def volume_array(volume_node) -> np.ndarray:
    """The (k, j, i) voxel array of a scalar volume (a view, not a copy)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise GeometryError(f"volume '{name}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(
            f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
            "components per voxel; FastSAM3D needs a scalar (grey-value) volume: extract one "
            "component first (Vector to Scalar Volume module)")
    return slicer.util.arrayFromVolume(volume_node)


def volume_to_image(volume_node, check_voxels=False):
    """Volume node -> the engine's image (SimpleITK, LPS), in world geometry,
    with a copy of the voxels in their own pixel type (int16 CT stays int16).
    The NaN/inf scan is left to the engine's ``prepare_image`` (off the main
    thread) unless ``check_voxels``."""
    from FastSAM3DLib.image import image_from_ijk_to_ras
    return image_from_ijk_to_ras(volume_array(volume_node), world_ijk_to_ras(volume_node),
                                 check_voxels=check_voxels)


def volume_grid_in(volume_node, other_node) -> np.ndarray:
    """4x4 from the volume's voxel index to ``other_node``'s local frame
    (where e.g. a segmentation node's labelmaps live)."""
    return np.linalg.inv(local_to_world(other_node)) @ world_ijk_to_ras(volume_node)


def oriented_image(array_kji, start_kji, ijk_to_frame) -> "slicer.vtkOrientedImageData":
    """A uint8 vtkOrientedImageData holding ``array_kji`` at voxel offset
    ``start_kji`` of a grid whose index-to-frame matrix is ``ijk_to_frame``."""
    array_kji = np.ascontiguousarray(array_kji, dtype=np.uint8)
    k0, j0, i0 = (int(v) for v in start_kji)
    nk, nj, ni = array_kji.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_frame))
    scalars = numpy_support.numpy_to_vtk(array_kji.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def image_array(image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """vtkImageData -> ((k, j, i) array view, start_kji) of its extent."""
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(shape) <= 0:
        return np.zeros((0, 0, 0), np.uint8), (e[4], e[2], e[0])
    return numpy_support.vtk_to_numpy(scalars).reshape(shape), (e[4], e[2], e[0])


def image_to_frame(image) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix_to_numpy(matrix)


def integer_shift(a_to_frame, b_to_frame, tolerance=1e-3):
    """If grid b is grid a shifted by whole voxels, the shift (i, j, k) with
    b_index + shift = a_index; else None."""
    relative = np.linalg.inv(a_to_frame) @ b_to_frame
    if not np.allclose(relative[:3, :3], np.eye(3), atol=1e-5):
        return None
    shift = relative[:3, 3]
    rounded = np.round(shift)
    if not np.allclose(shift, rounded, atol=tolerance):
        return None
    return tuple(int(v) for v in rounded)


def ensure_reference_geometry(segmentation_node, volume_node) -> bool:
    """Make the segmentation's labelmap grid the volume's grid (seen from the
    segmentation's frame) when that costs nothing: the segmentation has no
    binary-labelmap content yet. Then every write is voxel-exact. Returns True
    if the geometry was set."""
    segmentation = segmentation_node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        layer = segmentation.GetNthSegment(n).GetRepresentation(BINARY_LABELMAP)
        if layer is not None and not _extent_empty(layer.GetExtent()):
            return False
    matrix = volume_grid_in(volume_node, segmentation_node)
    dims = volume_node.GetImageData().GetDimensions()
    geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        numpy_to_matrix(matrix), [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1])
    segmentation.SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry)
    return True


def _extent_empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]
