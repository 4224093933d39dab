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


def test_a_new_box_replaces_the_old_one_and_the_clicks_stay():
    engine = _engine()
    session = engine.new_session(_ball_image())
    session.add_box((-12, -12, -12), (12, 12, 12))
    session.add_click((0, 0, 0))
    session.add_click((0, 0, 9), positive=False)
    session.add_box((-11, -11, -11), (11, 11, 11))
    assert [type(p).__name__ for p in session.prompts] == ["PhysicalBox", "PhysicalClick", "PhysicalClick"]
    np.testing.assert_allclose(session.box.bounds_lps, [[-11] * 3, [11] * 3])
    call = engine.model.decoder_calls[-1]
    assert list(call["labels"].numpy()) == [2, 3, 1, 0]           # one box, then the clicks in order
    session.undo()
    np.testing.assert_allclose(session.box.bounds_lps, [[-12] * 3, [12] * 3])


def test_scribble_resampling_is_even_and_bounded():
    line = np.array([[0, 0, 0], [30, 0, 0], [30, 40, 0]], float)      # 70 mm, a right angle
    points = resample_polyline(line)
    assert len(points) == SCRIBBLE_MAX_POINTS
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    # Even along the curve: 10 mm of arc between neighbours (a chord across the corner is shorter).
    along = [0.0]
    for p in points[1:]:
        along.append(p[0] if p[1] == 0 else 30 + p[1])
    np.testing.assert_allclose(np.diff(along), 70 / 7, atol=1e-9)
    assert np.all(steps <= 70 / 7 + 1e-9)
    np.testing.assert_allclose(points[[0, -1]], line[[0, -1]])
    short = resample_polyline(line[:2] / 3)                             # 10 mm: 5 mm apart, 3 points
    assert len(short) == 3 and np.all(np.diff(short[:, 0]) >= SCRIBBLE_MIN_GAP_MM - 1e-9)
    np.testing.assert_allclose(resample_polyline(np.array([[0, 0, 0], [0, 0, 0], [2, 0, 0]])), [[1, 0, 0]])
    assert len(resample_polyline(line, max_points=3)) == 3
    with pytest.raises(ImageError, match="max_points"):
        resample_polyline(line, max_points=SCRIBBLE_MAX_POINTS + 1)


def test_a_scribble_is_one_step_of_clicks_of_its_sign():
    engine = _engine()
    image = _ball_image(GRIDS["oblique"])
    session = engine.new_session(image)
    session.add_click((0, 0, 0))
    # A negative stroke 40 mm long on RAS, half of it beyond the image? No: inside, 9 points given.
    stroke = np.stack([np.linspace(-20, 20, 9), np.full(9, 3.0), np.zeros(9)], axis=1)
    update = session.add_scribble(stroke, positive=False)
    added = session.clicks[1:]
    assert len(added) == SCRIBBLE_MAX_POINTS and all(not c.positive and c.source == "scribble" for c in added)
    np.testing.assert_allclose(np.array([c.point_lps for c in added]) * RAS_TO_LPS,
                               resample_polyline(stroke), atol=1e-9)
    assert update.patch is not None and len(update.crops) >= 1
    session.undo()
    assert len(session.clicks) == 1                                     # the whole stroke was one step
    with pytest.raises(ImageError, match="outside the image"):
        session.add_scribble([(500, 0, 0), (520, 0, 0)])
    assert len(session.clicks) == 1 and session.can_redo               # nothing lost, redo kept


def _winding_number(polygon, point):
    """Sum of the angles the polygon's edges subtend at ``point``, in turns (0 outside)."""
    rel = polygon - point
    angles = np.arctan2(rel[:, 1], rel[:, 0])
    turns = np.diff(np.concatenate([angles, angles[:1]]))
    return round(float(np.sum((turns + np.pi) % (2 * np.pi) - np.pi)) / (2 * np.pi))


def _distance_to_outline(polygon, point):
    a, b = polygon, np.roll(polygon, -1, axis=0)
    t = np.clip(np.einsum("ij,ij->i", point - a, b - a) / np.einsum("ij,ij->i", b - a, b - a), 0, 1)
    return float(np.min(np.linalg.norm(a + t[:, None] * (b - a) - point, axis=1)))


def test_lasso_interior_points_lie_deep_inside_the_polygon_on_its_plane():
    frame = _rotation(35, (1, 1, 0))
    u, v, n = frame[:, 0], frame[:, 1], frame[:, 2]
    # An L-shaped lasso (its bounding box's centre lies outside it), slightly off-plane.
    outline = np.array([[0, 0], [40, 0], [40, 12], [12, 12], [12, 40], [0, 40]], float)
    wobble = np.array([0.3, -0.3, 0.3, -0.3, 0.3, -0.3])
    offset = np.array([5.0, -3.0, 7.0])
    curve = outline @ np.stack([u, v]) + wobble[:, None] * n + offset
    region = lasso_region(curve, cell_mm=0.5)
    assert 2 <= len(region.interior_lps) <= 3
    # On the best-fit plane (the wobble's mean plane), inside the L and about its half-width
    # (6 mm, less a cell and a half) from the outline, spread over both arms.
    centre = curve.mean(0)
    np.testing.assert_allclose((region.interior_lps - centre) @ n, 0, atol=1e-6)
    uv = (region.interior_lps - offset) @ np.stack([u, v]).T
    for point in uv:
        assert _winding_number(outline, point) != 0
        assert _distance_to_outline(outline, point) >= 5.0
    assert np.ptp(uv[:, 0]) > 15 and np.ptp(uv[:, 1]) > 15                # one in each arm
    # The outline projected onto that plane: the wobble goes, the shape stays.
    np.testing.assert_allclose((region.outline_lps - centre) @ n, 0, atol=1e-9)
    np.testing.assert_allclose((region.outline_lps - offset) @ np.stack([u, v]).T, outline, atol=1e-9)


@pytest.mark.parametrize("box_prompts", [True, False])
def test_a_lasso_is_one_step_a_box_and_interior_clicks(box_prompts):
    engine = _engine(box_prompts=box_prompts)
    image = _ball_image(GRIDS["permuted (PIR)"])
    session = engine.new_session(image)
    square = np.array([[-9, -9], [9, -9], [9, 9], [-9, 9]], float)
    u, v = np.array([1.0, 0, 0]), np.array([0, 0.6, 0.8])              # an oblique slice (RAS)
    curve = square @ np.stack([u, v]) + 1.0 * np.cross(u, v)
    session.add_lasso(curve, slice_axes=(u, v), thickness_mm=3.0)
    clicks = session.clicks
    assert clicks and all(c.positive and c.source == "lasso" for c in clicks)
    if box_prompts:
        # The square's outline at both faces of a 3 mm slab about its slice.
        box = np.array(session.box.corners_lps) * RAS_TO_LPS
        expected = np.concatenate([curve + h * np.cross(u, v) for h in (-1.5, 1.5)])
        np.testing.assert_allclose(box, expected, atol=1e-9)
        assert session.box.source == "lasso"
        assert list(engine.model.decoder_calls[-1]["labels"].numpy()[:2]) == [2, 3]
    else:
        assert session.box is None and 2 not in engine.model.decoder_calls[-1]["labels"].numpy()
    session.add_lasso(curve * 0.5, positive=False, slice_axes=(u, v))
    assert all(not c.positive for c in session.clicks[len(clicks):]) and session.prompts[:1] == (
        [session.box] if box_prompts else session.prompts[:1])
    session.undo()
    assert session.clicks == clicks
    session.undo()
    assert session.prompts == [] and not session.mask().any()


def test_undo_and_redo_of_box_scribble_and_lasso_restore_the_exact_masks(shared_data):
    """The bundled model (box prompts) on a real scan: each prompt is one step, and moving
    through the history gives back exactly the mask each step had (as a caller applies patches)."""
    image = sitk.ReadImage(str(shared_data / "mri_spine_cord_sct_t2" / "t2.nii.gz"))
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "mri_spine_cord_sct_t2" /
                                                     "t2_seg-manual.nii.gz"))) > 0
    session = Engine(model="default", device="cpu").new_session(image)
    voxels = np.argwhere(cord)[:, ::-1]                                 # (i, j, k)
    low, high = voxels.min(0), voxels.max(0)
    middle = (low + high) / 2
    caller = np.zeros(cord.shape, dtype=bool)

    def apply(update):
        if update is not None and update.patch is not None:
            caller[update.patch.slices] = update.patch.array

    masks, prompt_counts = [session.mask()], [0]
    steps = [lambda: session.add_box(low, high, space="ijk"),
             lambda: session.add_scribble([middle + (0, 0, d) for d in (-20, 0, 20)], space="ijk"),
             lambda: session.add_lasso([middle + (di, dj, 10) for di, dj in ((-3, -3), (3, -3), (3, 3), (-3, 3))],
                                       positive=False, space="ijk")]
    for step in steps:
        apply(step())
        masks.append(session.mask())
        prompt_counts.append(len(session.prompts))
    assert len({m.sum() for m in masks}) == 4 and prompt_counts[1] == 1 and prompt_counts[2] > 2
    for move, expected in [(session.undo, 2), (session.undo, 1), (session.undo, 0), (session.redo, 1),
                           (session.redo, 2), (session.redo, 3)]:
        apply(move())
        np.testing.assert_array_equal(session.mask(), masks[expected])
        np.testing.assert_array_equal(caller, masks[expected])
        assert len(session.prompts) == prompt_counts[expected]
