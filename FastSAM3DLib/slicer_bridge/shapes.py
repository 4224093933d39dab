"""Box, scribble and lasso prompts from MRML, in world RAS.

A box comes from a Markups ROI node (``roi_box``) or a rectangle dragged in a
slice view (``slice_rectangle`` from view pixels, ``slice_box`` from world points); a scribble from a Markups curve
(``curve_points``) or a stroke in a slice view (``slice_xy_to_ras``); a lasso
from a closed Markups curve (``curve_points(..., closed=True)``) or a closed
stroke. The results are what ``SegmentSession.add_box`` / ``add_scribble`` /
``add_lasso`` take; every geometry decision about the prompt itself (slab,
resampling, filling) is the engine's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .geometry import GeometryError, matrix_to_numpy

# Axes closer than this (in cosine) to a world axis count as aligned with it.
ALIGNED_TOLERANCE = 1e-6


class Box(NamedTuple):
    """A box prompt in world RAS: ``SegmentSession.add_box(*box)``.

    slice_axes None: the axis-aligned box with opposite corners corner_a and
    corner_b. Else (u, v), unit in-plane axes: the rectangle with these
    corners on the plane through them spanned by u and v, extruded by
    thickness_mm along u x v (None: the engine's default slab).
    """
    corner_a: tuple
    corner_b: tuple
    slice_axes: tuple | None = None
    thickness_mm: float | None = None


def _triple(values) -> tuple:
    return tuple(float(v) for v in values)


def _is_axis_aligned(axes) -> bool:
    """Whether each unit column of ``axes`` (3 x 3) lies along one world axis."""
    return bool(np.all(np.abs(axes).max(axis=0) > 1 - ALIGNED_TOLERANCE))


def roi_box(roi_node) -> Box:
    """A Markups ROI node -> its box in world RAS, parent transforms included.

    An ROI whose axes (after its transforms) are the world's gives the plain
    box of its corners. A rotated ROI gives the rectangle spanned by its first
    two axes through its centre, extruded by its size along the third: the
    same oriented box, without the larger axis-aligned box around it. Under a
    transform that shears it (axes no longer at right angles) the ROI gives
    the axis-aligned box of its 8 corners.
    """
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise ValueError("a box prompt needs a Markups ROI node")
    size = np.array(roi_node.GetSize(), dtype=float)
    if roi_node.GetNumberOfControlPoints() == 0 or not np.all(size > 0):
        raise ValueError(f"the ROI '{roi_node.GetName()}' is not placed yet (it has no size)")
    object_to_world = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    edges = object_to_world[:3, :3] * size          # the ROI's three edges in world
    lengths = np.linalg.norm(edges, axis=0)
    if not np.all(lengths > 0):
        raise GeometryError(f"the ROI '{roi_node.GetName()}' is flattened by its transform")
    axes = edges / lengths
    centre = object_to_world[:3, 3]
    orthogonal = np.allclose(axes.T @ axes, np.eye(3), atol=1e-6)
    if not orthogonal or _is_axis_aligned(axes):
        signs = np.stack(np.meshgrid((-0.5, 0.5), (-0.5, 0.5), (-0.5, 0.5), indexing="ij"), -1).reshape(-1, 3)
        corners = centre + signs @ edges.T
        return Box(_triple(corners.min(axis=0)), _triple(corners.max(axis=0)))
    half_in_plane = 0.5 * (edges[:, 0] + edges[:, 1])
    return Box(_triple(centre - half_in_plane), _triple(centre + half_in_plane),
               (_triple(axes[:, 0]), _triple(axes[:, 1])), float(lengths[2]))


def slice_axes(slice_node) -> tuple:
    """The in-plane unit axes (u, v) of a slice view, world RAS: the first two
    columns of its SliceToRAS matrix (oblique reformats included)."""
    slice_to_ras = matrix_to_numpy(slice_node.GetSliceToRAS())[:3, :3]
    u, v = slice_to_ras[:, 0], slice_to_ras[:, 1]
    return (_triple(u / np.linalg.norm(u)), _triple(v / np.linalg.norm(v)))


def slice_xy_to_ras(slice_node, xy_points) -> np.ndarray:
    """View pixel positions (N, 2) of a slice view -> world RAS (N, 3) on its slice."""
    xy = np.asarray(xy_points, dtype=float).reshape(-1, 2)
    xy_to_ras = matrix_to_numpy(slice_node.GetXYToRAS())
    homogeneous = np.c_[xy, np.zeros(len(xy)), np.ones(len(xy))]
    return (homogeneous @ xy_to_ras.T)[:, :3]


def slice_box(slice_node, ras_a, ras_b, thickness_mm=None) -> Box:
    """A rectangle dragged in a slice view between world points ``ras_a`` and
    ``ras_b`` on its slice -> a box on that slice (any orientation),
    ``thickness_mm`` thick (None: the engine's default)."""
    corner_a, corner_b = np.asarray(ras_a, dtype=float), np.asarray(ras_b, dtype=float)
    if np.allclose(corner_a, corner_b):
        raise ValueError("drag a rectangle: the box's two corners are the same point")
    return Box(_triple(corner_a), _triple(corner_b), slice_axes(slice_node),
               None if thickness_mm is None else float(thickness_mm))


def slice_rectangle(slice_node, xy_a, xy_b, thickness_mm=None) -> Box:
    """``slice_box`` for a drag from view pixel ``xy_a`` to ``xy_b``."""
    return slice_box(slice_node, *slice_xy_to_ras(slice_node, [xy_a, xy_b]), thickness_mm)


def curve_points(curve_node, closed=False) -> np.ndarray:
    """A Markups curve's points along the curve (interpolated as the curve is
    drawn), world RAS (N, 3). ``closed``: the curve must be a closed curve
    (a lasso) with at least 3 control points."""
    if curve_node is None or not curve_node.IsA("vtkMRMLMarkupsCurveNode"):
        raise ValueError("a scribble or lasso prompt needs a Markups curve node")
    name = curve_node.GetName()
    is_closed = curve_node.IsA("vtkMRMLMarkupsClosedCurveNode")
    if closed and not is_closed:
        raise ValueError(f"a lasso needs a closed curve; '{name}' is an open curve")
    needed = 3 if closed else 1
    if curve_node.GetNumberOfDefinedControlPoints() < needed:
        raise ValueError(f"the curve '{name}' needs at least {needed} point{'s' if needed > 1 else ''}")
    points = curve_node.GetCurvePointsWorld()
    if points is None or points.GetNumberOfPoints() == 0:
        positions = [curve_node.GetNthControlPointPositionWorld(n)
                     for n in range(curve_node.GetNumberOfControlPoints())]
        return np.array(positions, dtype=float).reshape(-1, 3)
    out = np.array([points.GetPoint(n) for n in range(points.GetNumberOfPoints())], dtype=float)
    if is_closed and len(out) > 1 and np.allclose(out[0], out[-1]):
        out = out[:-1]                       # a closed curve repeats its first point at the end
    return out


class Prompt(NamedTuple):
    """One prompt as ``SegmentSession.operation(kind, ras, positive, **options)`` takes it."""
    kind: str
    ras: object
    positive: bool
    options: dict


def markups_prompt(node, positive=True) -> Prompt:
    """A Markups node as a prompt: an ROI is a box, a closed curve a lasso,
    an open curve a scribble (world RAS, parent transforms included)."""
    if node is not None and node.IsA("vtkMRMLMarkupsROINode"):
        box = roi_box(node)
        return Prompt("box", (box.corner_a, box.corner_b), bool(positive),
                      {"slice_axes": box.slice_axes, "thickness_mm": box.thickness_mm})
    if node is not None and node.IsA("vtkMRMLMarkupsClosedCurveNode"):
        return Prompt("lasso", curve_points(node, closed=True), bool(positive), {})
    if node is not None and node.IsA("vtkMRMLMarkupsCurveNode"):
        return Prompt("scribble", curve_points(node), bool(positive), {})
    raise ValueError("a prompt needs a Markups ROI (box), curve (scribble) or closed curve (lasso)")


def slice_drag_prompt(tool, slice_node, points_ras, positive=True) -> Prompt:
    """A drag in a slice view, as world RAS points on its slice, with the tool
    "box" (first to last point), "scribble" or "lasso" (the closed stroke on
    the view's slice)."""
    points = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    if tool == "box":
        box = slice_box(slice_node, points[0], points[-1])
        return Prompt("box", (box.corner_a, box.corner_b), bool(positive),
                      {"slice_axes": box.slice_axes, "thickness_mm": box.thickness_mm})
    if tool == "scribble":
        return Prompt("scribble", points, bool(positive), {})
    if tool == "lasso":
        return Prompt("lasso", points, bool(positive), {"slice_axes": slice_axes(slice_node)})
    raise ValueError(f"a slice-view drag is a box, scribble or lasso, not {tool!r}")
