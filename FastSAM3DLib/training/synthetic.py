"""Procedural 3D training volumes: organ-like blobs and vessel-like tubes in a body.

``synthetic_volume(rng)`` returns an image (float32, CT-like Hounsfield units or
MR-like positive intensities) and a label map (int16, one id per object,
1..n) of the requested shape. Everything is drawn from the caller's
``np.random.Generator``, so a seed gives the same volume. Sizes are in voxels
of the output grid (think of the model's 1.5 mm spacing).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MODALITIES = ("CT", "MR")
MIN_OBJECT_VOXELS = 100     # objects mostly hidden by later ones are dropped


def synthetic_volume(rng: np.random.Generator, shape=(128, 128, 128), modality: str | None = None,
                     blobs: tuple[int, int] = (2, 5), tubes: tuple[int, int] = (1, 3)
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label int16) of ``shape``; ``modality`` "CT", "MR" or None
    (random); ``blobs`` and ``tubes`` are inclusive ranges of object counts."""
    if modality is None:
        modality = MODALITIES[rng.integers(len(MODALITIES))]
    if modality not in MODALITIES:
        raise ValueError(f"unknown synthetic modality {modality!r}; choose one of {MODALITIES}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"synthetic volumes need a 3D shape of at least 16 voxels per axis, got {shape}")

    body, fat = _body(rng, shape)
    interior = body & ~fat                  # objects lie under the subcutaneous fat
    label = np.zeros(shape, dtype=np.int16)
    next_id = 1
    for _ in range(rng.integers(blobs[0], blobs[1] + 1)):
        next_id += _paint_blob(rng, label, interior, next_id)
    for _ in range(rng.integers(tubes[0], tubes[1] + 1)):
        next_id += _paint_tube(rng, label, interior, next_id)
    label = _drop_small_objects(label)

    if modality == "CT":
        image = _ct_texture(rng, label, body, fat)
    else:
        image = _mr_texture(rng, label, body, fat)
    return image.astype(np.float32, copy=False), label


def smooth_noise(rng: np.random.Generator, shape, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with about ``cells`` independent
    values along each axis: normal noise on a coarse grid, interpolated to
    ``shape`` with Gaussian weights one axis at a time (a few small matrix
    products, much faster than spline zooming)."""
    n0, n1, n2 = (int(n) for n in shape)
    nodes = cells + 1
    field = rng.standard_normal((nodes,) * 3).astype(np.float32)
    # Expand the last axis first, then the others, as contiguous matrix products.
    field = field @ _interpolation_weights(n2, nodes).T                        # (nodes, nodes, n2)
    field = _interpolation_weights(n1, nodes) @ field                          # (nodes, n1, n2)
    field = (_interpolation_weights(n0, nodes) @ field.reshape(nodes, -1)).reshape(n0, n1, n2)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _interpolation_weights(size: int, nodes: int) -> np.ndarray:
    """(size, nodes) rows of normalised Gaussian weights from evenly spread coarse
    nodes to every output position."""
    positions = np.linspace(0, nodes - 1, size)[:, None]
    weights = np.exp(-0.5 * ((positions - np.arange(nodes)[None]) / 0.7) ** 2)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid_radius(rng, box_shape, centre, radii, rotation, wobble, cells) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on a box, deformed by a
    smooth random field of relative amplitude ``wobble``."""
    # Coordinates along each box axis, broadcast: no (N, 3) coordinate array.
    axes = [(np.arange(n, dtype=np.float32) - np.float32(c)).reshape([-1 if a == d else 1 for d in range(3)])
            for a, (n, c) in enumerate(zip(box_shape, centre))]
    squared = np.zeros(tuple(box_shape), dtype=np.float32)
    for k in range(3):
        local = sum(axes[a] * np.float32(rotation[a, k]) for a in range(3))
        squared += (local / np.float32(radii[k])) ** 2
    return np.sqrt(squared) - np.float32(wobble) * smooth_noise(rng, box_shape, cells)


def _body(rng, shape):
    """Body mask (an irregular ellipsoid filling most of the volume) and its
    outer shell, the subcutaneous fat."""
    centre = np.array(shape) / 2 - 0.5 + rng.uniform(-0.05, 0.05, 3) * shape
    radii = np.array(shape) * rng.uniform(0.38, 0.5, 3)
    radius = _ellipsoid_radius(rng, shape, centre, radii, np.eye(3), 0.06, 3)
    body = radius < 1
    return body, body & (radius > rng.uniform(0.85, 0.95))


def _random_voxel(rng, mask) -> np.ndarray:
    voxels = np.flatnonzero(mask)
    return np.array(np.unravel_index(voxels[rng.integers(len(voxels))], mask.shape), dtype=float)


def _paint_blob(rng, label, region, object_id) -> int:
    """An organ-like deformed ellipsoid within ``region``; returns 1 if painted."""
    size = min(label.shape)
    radii = size * rng.uniform(0.04, 0.25, 3)
    wobble = rng.uniform(0.05, 0.25)
    centre = _random_voxel(rng, region)
    # The unit-std deformation field rarely exceeds 3: the box holds the whole blob.
    reach = int(np.ceil(radii.max() * (1 + 3 * wobble))) + 1
    low = np.maximum(centre.astype(int) - reach, 0)
    high = np.minimum(centre.astype(int) + reach + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    radius = _ellipsoid_radius(rng, high - low, centre - low, radii, _random_rotation(rng), wobble,
                               int(rng.integers(3, 6)))
    inside = (radius < 1) & region[box]
    label[box][inside] = object_id
    return int(inside.any())


def _paint_tube(rng, label, region, object_id) -> int:
    """A vessel- or cord-like tube within ``region``: a smooth random 3D curve
    swept by a ball of slowly varying radius, passing through a voxel of the
    region at its middle; returns 1 if painted."""
    size = min(label.shape)
    step = 0.5
    count = int(rng.uniform(0.4, 1.5) * size / step)
    # The direction wanders smoothly around a main direction: gentle bends.
    wander = ndimage.gaussian_filter1d(rng.standard_normal((count, 3)), sigma=rng.uniform(10, 40), axis=0)
    directions = rng.standard_normal(3) / 1.7 + rng.uniform(0.3, 1.0) * wander / wander.std()
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    points = np.cumsum(directions * step, axis=0)
    points += _random_voxel(rng, region) - points[count // 2]
    radius_variation = ndimage.gaussian_filter1d(rng.standard_normal(count), sigma=30)
    radii = np.clip(rng.uniform(1.2, 0.04 * size) * (1 + 2.0 * radius_variation), 1.0, None)
    inside = _balls_along(points, radii, label.shape) & region
    label[inside] = object_id
    return int(inside.any())


def _balls_along(points, radii, shape) -> np.ndarray:
    """Mask of the union of balls (centre, radius) along a curve."""
    mask = np.zeros(shape, dtype=bool)
    # Neighbouring balls overlap by far more than needed; a third of the
    # smallest radius between centres keeps the surface smooth.
    points, radii = points[::max(1, int(radii.min() / 1.5))], radii[::max(1, int(radii.min() / 1.5))]
    reach = int(np.ceil(radii.max())) + 1
    cube = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    offsets = cube[(cube ** 2).sum(1) <= (reach + 1) ** 2]
    inside_volume = np.all((points > -reach) & (points < np.array(shape) + reach), axis=1)
    points, radii = points[inside_volume], radii[inside_volume]
    for chunk in np.array_split(np.arange(len(points)), max(1, len(points) // 32)):
        if chunk.size == 0:
            continue
        voxels = np.floor(points[chunk])[:, None, :].astype(np.int32) + offsets[None]
        near = ((voxels - points[chunk][:, None, :]) ** 2).sum(-1) <= radii[chunk][:, None] ** 2
        near &= np.all((voxels >= 0) & (voxels < np.array(shape)), axis=-1)
        hit = voxels[near]
        mask[hit[:, 0], hit[:, 1], hit[:, 2]] = True
    return mask


def _drop_small_objects(label) -> np.ndarray:
    counts = np.bincount(label.ravel())
    kept = np.flatnonzero(counts >= MIN_OBJECT_VOXELS)
    kept = kept[kept > 0]
    renumber = np.zeros(len(counts), dtype=np.int16)
    renumber[kept] = np.arange(1, len(kept) + 1)
    return renumber[label]


def _object_intensities(rng, count, background, low, high, min_contrast) -> np.ndarray:
    """One intensity per object id, each at least ``min_contrast`` from the
    background tissue so that every object is visible."""
    values = rng.uniform(low, high, count)
    close = np.abs(values - background) < min_contrast
    values[close] = background + np.where(rng.random(close.sum()) < 0.5, -1, 1) * min_contrast * rng.uniform(
        1, 3, close.sum())
    return values


def _ct_texture(rng, label, body, fat) -> np.ndarray:
    count = int(label.max())
    soft_tissue = rng.uniform(20, 60)
    objects = _object_intensities(rng, count, soft_tissue, -80, 300, 30)
    bony = rng.random(count) < 0.15
    objects[bony] = rng.uniform(300, 1200, bony.sum())
    # Index 0: outside the body (air); then objects by id.
    lookup = np.concatenate([[-1000.0], objects]).astype(np.float32)
    image = lookup[label]
    tissue = body & (label == 0)
    image[tissue] = soft_tissue
    image[fat & (label == 0)] = rng.uniform(-120, -80)
    texture_strength = np.concatenate([[0.0], rng.uniform(5, 30, count)]).astype(np.float32)
    texture_strength_map = texture_strength[label]
    texture_strength_map[tissue] = rng.uniform(5, 20)
    image += texture_strength_map * smooth_noise(rng, label.shape, int(rng.integers(12, 24)))
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.2), truncate=2.5)   # partial-volume blur
    image += rng.uniform(5, 25) * rng.standard_normal(label.shape, dtype=np.float32)
    return image


def _mr_texture(rng, label, body, fat) -> np.ndarray:
    count = int(label.max())
    tissue_level = rng.uniform(200, 600)
    objects = _object_intensities(rng, count, tissue_level, 40, 1000, 0.2 * tissue_level)
    lookup = np.concatenate([[0.0], np.abs(objects)]).astype(np.float32)
    image = lookup[label]
    tissue = body & (label == 0)
    image[tissue] = tissue_level
    image[fat & (label == 0)] = rng.uniform(0.2, 1.6) * tissue_level
    image *= 1 + rng.uniform(0.02, 0.1) * smooth_noise(rng, label.shape, int(rng.integers(12, 24)))
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.2), truncate=2.5)   # partial-volume blur
    image *= np.exp(rng.uniform(0.1, 0.4) * smooth_noise(rng, label.shape, 2))   # coil bias field
    # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels.
    sigma = rng.uniform(0.01, 0.05) * tissue_level
    real = image + sigma * rng.standard_normal(label.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(label.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)
