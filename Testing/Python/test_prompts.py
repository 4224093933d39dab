"""Box, scribble and lasso prompts: geometry on flipped and oblique grids, one undo step each,
the one-line refusal of a box by a point-only model. The oracle model (the bright voxels of
its crop) records what the engine gives the decoder, so every crop point can be checked."""

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib.image import ImageError, image_from_array
from FastSAM3DLib.prompts import SCRIBBLE_MAX_POINTS, SCRIBBLE_MIN_GAP_MM, lasso_region, resample_polyline
from FastSAM3DLib.session import Engine, EngineError
from oracle_model import oracle_model

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _rotation(degrees, axis):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return c * np.eye(3) + s * cross + (1 - c) * np.outer(u, u)


def _ball_image(direction=None, spacing=(1.0, 1.0, 1.0), shape=(48, 56, 64)):
    """A bright ball of radius 10 mm at RAS (0, 0, 0), on a grid of this direction (LPS columns)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    spacing = np.asarray(spacing, float)
    centre_index = (np.array(shape[::-1]) - 1) / 2                   # (i, j, k)
    origin = -(direction * spacing) @ centre_index                    # the grid's centre at LPS 0
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
    lps = np.stack([i, j, k], -1) @ (direction * spacing).T + origin
    array = (np.linalg.norm(lps, axis=-1) <= 10).astype(np.float32) * 100
    return image_from_array(array, spacing=spacing, origin=origin, direction=direction)


GRIDS = {
    "LPS": np.eye(3),
    "flipped (RAS, k down)": np.diag([-1.0, -1.0, -1.0]),
    "permuted (PIR)": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
    "oblique": _rotation(25, (1, 2, 3)) @ np.diag([1.0, -1.0, 1.0]),
}


def _engine(box_prompts=True, spacing="auto"):
    return Engine(model=oracle_model((0.5, 3.0), box_prompts=box_prompts), device="cpu", spacing=spacing)


def _crop_voxel_of_ras(roi, ras):
    """Independent of the engine's ROI code: the crop's axes are R, A, S at ``roi.spacing``,
    its centre at continuous voxel (size - 1) / 2."""
    centre_ras = np.asarray(roi.center_lps) * RAS_TO_LPS
    return (np.asarray(ras, float) - centre_ras) / roi.spacing + (roi.size - 1) / 2


def _box_points(call):
    labels = call["labels"].numpy()
    assert list(labels[:2]) == [2, 3] and not np.isin(labels[2:], (2, 3)).any()   # the box first, once
    return call["points"].numpy()[:2]


@pytest.mark.parametrize("grid", GRIDS)
def test_a_ras_box_lands_on_the_same_crop_voxels_on_every_grid(grid):
    engine = _engine()
    image = _ball_image(GRIDS[grid], spacing=(0.9, 1.1, 1.3))
    session = engine.new_session(image)
    a, b = np.array([12.0, -8.0, 9.0]), np.array([-9.0, 11.0, -10.5])
    update = session.add_box(a, b, space="ras")
    roi = update.roi
    # The crop is centred on the box, at the finest step the box fills at most 70 % of.
    np.testing.assert_allclose(np.asarray(roi.center_lps) * RAS_TO_LPS, (a + b) / 2, atol=1e-9)
    assert roi.spacing == 1.0 and 21.5 <= 0.7 * 128 * roi.spacing
    expected = np.sort(np.stack([_crop_voxel_of_ras(roi, a), _crop_voxel_of_ras(roi, b)]), axis=0)
    np.testing.assert_allclose(_box_points(engine.model.decoder_calls[-1]), expected, atol=1e-4)
    assert session.mask().sum() > 0.7 * (4 / 3 * np.pi * 1000) / np.prod(image.GetSpacing())


@pytest.mark.parametrize("grid", ["flipped (RAS, k down)", "oblique"])
def test_an_ijk_box_follows_the_voxel_axes(grid):
    """In "ijk" the box is axis-aligned in the scan's voxel axes: on an oblique grid its
    crop box is the bounding box of the 8 corners SimpleITK places in the world."""
    engine = _engine()
    image = _ball_image(GRIDS[grid])
    session = engine.new_session(image)
    a, b = (20.0, 18.0, 12.0), (42.0, 38.0, 35.0)
    update = session.add_box(a, b, space="ijk")
    corners = [image.TransformContinuousIndexToPhysicalPoint((x, y, z)) for x in (a[0], b[0])
               for y in (a[1], b[1]) for z in (a[2], b[2])]
    voxels = _crop_voxel_of_ras(update.roi, np.array(corners) * RAS_TO_LPS)
    np.testing.assert_allclose(_box_points(engine.model.decoder_calls[-1]),
                               np.clip([voxels.min(0), voxels.max(0)], 0, 127), atol=1e-4)


def test_a_rectangle_on_an_oblique_slice_is_a_slab_along_its_normal():
    engine = _engine()
    image = _ball_image(GRIDS["oblique"], spacing=(1.0, 1.0, 2.0))
    session = engine.new_session(image)
    frame = _rotation(30, (0, 1, 1)) @ np.eye(3)
    u, v = frame[:, 0], frame[:, 1]
    normal = np.cross(u, v)
    a = 9.0 * u - 7.0 * v + 0.2 * normal
    b = -8.0 * u + 10.0 * v + 0.2 * normal
    update = session.add_box(a, b, space="ras", slice_axes=(u, v), thickness_mm=4.0)
    du, dv = (b - a) @ u, (b - a) @ v
    corners = np.array([a + s * du * u + t * dv * v + h * normal
                        for s in (0, 1) for t in (0, 1) for h in (-2.0, 2.0)])
    stored = np.array(session.box.corners_lps) * RAS_TO_LPS
    np.testing.assert_allclose(stored[np.lexsort(stored.T.round(6))], corners[np.lexsort(corners.T.round(6))],
                               atol=1e-9)
    voxels = _crop_voxel_of_ras(update.roi, corners)
    np.testing.assert_allclose(_box_points(engine.model.decoder_calls[-1]), [voxels.min(0), voxels.max(0)],
                               atol=1e-4)
    # Default thickness: one slice of the scan along the normal; 2 mm across the k slices.
    session.add_box((0, 0, 0), (10, 10, 0), space="ijk", slice_axes=((1, 0, 0), (0, 1, 0)))
    assert np.ptp(np.array(session.box.corners_lps) @ np.asarray(GRIDS["oblique"])[:, 2]) == pytest.approx(2.0)
    # Corners on two different slices are refused, and the earlier box stays.
    box = session.box
    with pytest.raises(ImageError, match="lie on one slice"):
        session.add_box(a, b + 5 * normal, space="ras", slice_axes=(u, v), thickness_mm=4.0)
    assert session.box is box


def test_a_point_only_model_refuses_a_box_in_one_line_and_changes_nothing():
    engine = _engine(box_prompts=False)
    session = engine.new_session(_ball_image())
    session.add_click((0, 0, 0))
    before, prompts, calls = session.mask(), session.prompts, len(engine.model.decoder_calls)
    with pytest.raises(EngineError, match="no box prompt") as info:
        session.add_box((-10, -10, -10), (10, 10, 10))
    assert "\n" not in str(info.value) and "default model" in str(info.value)
    assert np.array_equal(session.mask(), before) and session.prompts == prompts
    assert len(engine.model.decoder_calls) == calls and session.can_undo and not session.can_redo
