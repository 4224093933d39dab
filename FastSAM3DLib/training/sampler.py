"""Training crops cut on the GPU from a data pack held in device memory.

One call of ``GpuCropSampler.sample`` makes a whole batch of (image, target)
crops the way the engine cuts them at inference (``FastSAM3DLib.roi``: a
``size``^3 RAS+ grid of isotropic spacing around a point, linear
interpolation, zero outside the scan, then ``normalize_intensity_batch``),
plus the augmentations the engine never does:

* spacing per crop: the model default (the engine's first click), one that
  fits the object into ~70% of the crop (the engine's zoom), or log-uniform
  over ``spacing_range_mm``, so the model sees every zoom it will be used at;
* rotation, anisotropic scale, flips and a smooth elastic displacement,
  composed into the one sampling grid (one interpolation, no blur build-up);
* targets: one label, or a label with some of the labels it touches (e.g.
  a whole tumour), chosen by size class (small / medium / large) so that the
  many small structures of atlases do not crowd out organs; a part of a large
  label cut by a random Voronoi cell, with no edge in the image where the part
  ends (as atlas parcels of the cortex, lobes, segments: only the clicks tell
  where it stops); or a procedural blob painted into the crop
  (``intensity.insert_shapes``);
* images: the real scan with milder intensity changes, or a SynthSeg-style
  image synthesised from the label crop (always for label-only maps);
* volumes: uniform within the image volumes and within the label-only maps,
  unless ``volume_weights`` weights some (e.g. the one brain with cortical
  parcels, whose kind of target dominates the brain validation).

Choices that need no voxel data (which volume, label, spacing, angles) are
drawn on the host from a numpy generator; everything per voxel runs batched
on the device, with no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..normalization import normalize_intensity_batch
from .intensity import augment_intensity, insert_shapes, synthesise_from_labels
from .pack import DataError, PackedVolume

VOXELS_KEPT_PER_LABEL = 512          # candidate crop centres per label
SIZE_CLASSES_ML = (2.0, 50.0)        # small < 2 ml <= medium < 50 ml <= large
MIN_LABEL_VOXELS = 10
PART_MIN_ML = 20.0                   # labels this large may give a part as the target
PART_RADIUS_MM = (12.0, 30.0)        # the part's Voronoi cell radius (cortical atlas parcels: 5-30 ml)
PART_NEIGHBOURS = 16                 # Voronoi seeds around the part's own


@dataclass(frozen=True)
class SamplerConfig:
    size: int = 128
    default_spacing_mm: float = 1.5
    spacing_range_mm: tuple[float, float] = (0.5, 3.0)
    default_spacing_share: float = 0.25      # crops at the model's default spacing
    fitted_spacing_share: float = 0.4        # crops whose spacing fits the object (zoom)
    fill_fraction: float = 0.7
    label_only_share: float = 0.35           # samples from label-only maps (when the pack has both)
    synthetic_image_share: float = 0.25      # samples of image volumes shown with a synthesised image
    union_probability: float = 0.15
    shape_probability: float = 0.1
    part_probability: float = 0.0            # of labels >= PART_MIN_ML: a Voronoi part of it as the target
    max_rotation_degrees: float = 20.0
    max_log_scale: float = 0.15              # per-axis scale in exp(±0.15)
    max_elastic_mm: float = 4.0
    centre_jitter_voxels: float = 12.0
    volume_weights: tuple[tuple[str, float], ...] = ()   # (volume name, weight); the others weigh 1


@dataclass(frozen=True)
class CropPlan:
    """The host-side choices of one crop."""
    volume: int                    # index into the sampler's volumes
    group: tuple[int, ...]         # packed labels whose union is the target
    matrix: np.ndarray             # (3, 3) mm in the volume per crop voxel step (rotation, scale, flips)
    centre_mm: np.ndarray          # (3,) crop centre, mm from the volume's voxel (0, 0, 0)
    elastic_mm: float = 0.0        # amplitude of the smooth displacement
    synthetic: bool = False        # synthesise the image from the label crop
    ct_like: bool = False          # intensities of CT (Hounsfield-like), else MR-like
    shape: bool = False            # replace the target by a painted procedural blob
    part_seeds: np.ndarray | None = None   # (k, 3) crop voxels from the centre: the target is the
                                           # label within the Voronoi cell of the first seed


@dataclass
class _Label:
    volume: int
    label: int
    positions: np.ndarray          # (n, 3) voxel indices of candidate centres
    box_min: np.ndarray            # (3,) voxel index
    box_max: np.ndarray
    volume_ml: float
    neighbours: tuple[int, ...]


def _label_table(label: torch.Tensor, spacing, number: int, generator: torch.Generator) -> list[_Label]:
    """Per label of one volume (a (X, Y, Z) integer tensor on the sampler's
    device): candidate centres, bounding box, size and touching labels,
    computed with a few sorts and reductions over all voxels on the device."""
    flat = label.flatten().long()
    count = int(flat.max()) + 1
    counts = torch.bincount(flat, minlength=count)
    # A random order within each label: a random permutation, then a stable sort by label.
    permutation = torch.randperm(flat.numel(), generator=generator, device=generator.device).to(flat.device)
    order = permutation[torch.sort(flat[permutation], stable=True).indices]
    shape = label.shape
    coords = torch.stack(torch.unravel_index(torch.arange(flat.numel(), device=flat.device), shape), 1)
    low = torch.full((count, 3), flat.numel(), device=flat.device).scatter_reduce(
        0, flat[:, None].expand(-1, 3), coords, "amin")
    high = torch.full((count, 3), -1, device=flat.device).scatter_reduce(
        0, flat[:, None].expand(-1, 3), coords, "amax")
    codes = []
    for axis in range(3):
        a = label.movedim(axis, 0)[:-1].flatten().long()
        b = label.movedim(axis, 0)[1:].flatten().long()
        border = (a != b) & (a > 0) & (b > 0)
        codes.append(a[border] * count + b[border])
    touching: dict[int, set[int]] = {}
    for code in torch.unique(torch.cat(codes)).tolist():
        p, q = divmod(code, count)
        touching.setdefault(p, set()).add(q)
        touching.setdefault(q, set()).add(p)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    counts_list, low, high = counts.tolist(), low.cpu().numpy(), high.cpu().numpy()
    voxel_ml = float(np.prod(spacing)) / 1000
    table = []
    for value in range(1, count):
        if counts_list[value] < MIN_LABEL_VOXELS:
            continue
        kept = order[starts[value]:starts[value] + min(counts_list[value], VOXELS_KEPT_PER_LABEL)]
        positions = np.stack(np.unravel_index(kept.cpu().numpy(), shape), 1)
        table.append(_Label(number, value, positions, low[value], high[value], counts_list[value] * voxel_ml,
                            tuple(sorted(touching.get(value, ())))))
    return table


class GpuCropSampler:
    """Batches of (image, target) training crops from packed volumes on ``device``."""

    def __init__(self, volumes: list[PackedVolume], device, config: SamplerConfig = SamplerConfig(),
                 seed: int = 0):
        if not volumes:
            raise DataError("the training pack holds no volumes")
        self.config = config
        self.device = torch.device(device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.volumes = volumes
        self.labels = [torch.from_numpy(v.label.astype(np.float32))[None, None].to(self.device) for v in volumes]
        self.images = [torch.from_numpy(v.image_values())[None, None].to(self.device) if v.has_image else None
                       for v in volumes]
        self.ct_like = [v.modality.upper().startswith("CT") for v in volumes]
        self.tables = [_label_table(label[0, 0], v.spacing, n, generator)
                       for n, (v, label) in enumerate(zip(volumes, self.labels))]
        self.max_label = max(len(v.label_ids) for v in volumes)
        usable = [n for n, table in enumerate(self.tables) if table]
        self.with_image = [n for n in usable if volumes[n].has_image]
        self.label_only = [n for n in usable if not volumes[n].has_image]
        if not usable:
            raise DataError(f"no label of the pack has {MIN_LABEL_VOXELS} voxels or more")
        names = [v.name for v in volumes]
        weights = dict(config.volume_weights)
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise DataError(f"volume weight for {', '.join(unknown)}: no such volume in the packs "
                            f"(they hold e.g. {', '.join(names[:3])})")
        if any(not (w > 0 and math.isfinite(w)) for w in weights.values()):
            raise DataError("volume weights must be positive numbers")
        self.volume_weights = np.array([weights.get(name, 1.0) for name in names])
        if not 0 <= config.part_probability <= 1:
            raise DataError(f"part probability must lie in [0, 1], got {config.part_probability}")
        size = config.size
        axis = torch.arange(size, device=self.device, dtype=torch.float32) - (size - 1) / 2
        # Crop voxel offsets from the centre, in voxels, tensor-axis order: (size^3, 3).
        self.offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)

    # -- host-side choices ------------------------------------------------------------

    def _choose_volume(self, rng: np.random.Generator) -> int:
        pool = self.with_image
        if self.label_only and (not pool or rng.random() < self.config.label_only_share):
            pool = self.label_only
        weights = self.volume_weights[pool]
        return int(pool[rng.choice(len(pool), p=weights / weights.sum())])

    def _choose_label(self, table: list[_Label], rng: np.random.Generator) -> _Label:
        classes = np.digitize([entry.volume_ml for entry in table], SIZE_CLASSES_ML)
        present = np.unique(classes)
        chosen = present[rng.integers(len(present))]
        members = np.flatnonzero(classes == chosen)
        return table[int(members[rng.integers(len(members))])]

    def _spacing(self, extent_mm: float, rng: np.random.Generator) -> float:
        c = self.config
        low, high = c.spacing_range_mm
        draw = rng.random()
        if draw < c.default_spacing_share:
            return c.default_spacing_mm
        if draw < c.default_spacing_share + c.fitted_spacing_share:
            fitted = extent_mm / (c.fill_fraction * c.size) * math.exp(rng.uniform(-0.3, 0.3))
            return float(np.clip(fitted, low, high))
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))

    def plan(self, rng: np.random.Generator) -> CropPlan:
        """Host-side choices of one sample."""
        c = self.config
        number = self._choose_volume(rng)
        volume, table = self.volumes[number], self.tables[number]
        entry = self._choose_label(table, rng)
        group = {entry.label}
        box_min, box_max = entry.box_min.astype(float), entry.box_max.astype(float)
        if entry.neighbours and rng.random() < c.union_probability:
            by_label = {e.label: e for e in table}
            for other in entry.neighbours:
                if other in by_label and rng.random() < 0.5:
                    group.add(other)
                    box_min = np.minimum(box_min, by_label[other].box_min)
                    box_max = np.maximum(box_max, by_label[other].box_max)
        spacing_vol = np.array(volume.spacing)
        extent_mm = float(((box_max - box_min + 1) * spacing_vol).max())
        part_radius_mm = 0.0
        if len(group) == 1 and entry.volume_ml >= PART_MIN_ML and rng.random() < c.part_probability:
            part_radius_mm = float(rng.uniform(*PART_RADIUS_MM))
            extent_mm = min(extent_mm, 2 * part_radius_mm)
        crop_spacing = self._spacing(extent_mm, rng)
        on_label = entry.positions[rng.integers(len(entry.positions))].astype(float)
        if part_radius_mm or rng.random() < 0.5:
            centre = on_label
        else:
            centre = (box_min + box_max) / 2 + rng.uniform(-0.15, 0.15, 3) * (box_max - box_min)
        centre_mm = centre * spacing_vol + rng.uniform(-1, 1, 3) * c.centre_jitter_voxels * crop_spacing
        angles = np.radians(rng.uniform(-c.max_rotation_degrees, c.max_rotation_degrees, 3))
        scales = np.exp(rng.uniform(-c.max_log_scale, c.max_log_scale, 3))
        flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
        matrix = _rotation(angles) @ np.diag(scales * flips) * crop_spacing
        part_seeds = None
        if part_radius_mm:
            # The part's seed on the label voxel, its neighbours about two radii away in
            # random directions, so the seed's Voronoi cell reaches ~one radius around it.
            own = np.linalg.solve(matrix, on_label * spacing_vol - centre_mm)
            directions = rng.normal(size=(PART_NEIGHBOURS, 3))
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            distance = 2 * part_radius_mm / crop_spacing * rng.uniform(0.8, 1.25, (PART_NEIGHBOURS, 1))
            part_seeds = np.vstack([own, own + directions * distance])
        synthetic = (not volume.has_image) or rng.random() < c.synthetic_image_share
        return CropPlan(number, tuple(sorted(group)), matrix, centre_mm, rng.uniform(0, c.max_elastic_mm),
                        synthetic, self.ct_like[number] if not synthetic else bool(rng.random() < 0.3),
                        bool(rng.random() < c.shape_probability), part_seeds)

    # -- the batch ---------------------------------------------------------------------

    def sample(self, batch_size: int, rng: np.random.Generator, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 1, S, S, S) float32 z-normalised, targets (B, 1, S, S, S) bool)."""
        plans = [self.plan(rng) for _ in range(batch_size)]
        images, labels = self.cut(plans, generator)
        return self.finish(plans, images, labels, generator)

    def cut(self, plans: list[CropPlan], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw crops: (images (B, 1, S, S, S) in the scan's units, 0 outside it;
        for synthetic plans 1 inside the scan's extent and 0 outside; label
        crops (B, 1, S, S, S) of packed ids, nearest neighbour)."""
        batch, size, device = len(plans), self.config.size, self.device
        matrices = torch.tensor(np.stack([p.matrix for p in plans]), dtype=torch.float32).to(device)
        centres = torch.tensor(np.stack([p.centre_mm for p in plans]), dtype=torch.float32).to(device)
        elastic = torch.tensor([p.elastic_mm for p in plans], dtype=torch.float32).to(device)
        # Positions in mm from each volume's voxel (0, 0, 0): (B, S^3, 3).
        positions = centres[:, None] + self.offsets @ matrices.transpose(1, 2)
        coarse = torch.randn((batch, 3, 5, 5, 5), generator=generator, device=generator.device).to(device)
        displacement = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
        positions = positions + (displacement * elastic[:, None, None, None, None]).flatten(2).transpose(1, 2)
        images, labels = [], []
        for b, plan in enumerate(plans):
            number = plan.volume
            shape = torch.tensor(self.labels[number].shape[2:], dtype=torch.float32, device=device)
            spacing = torch.tensor(self.volumes[number].spacing, dtype=torch.float32, device=device)
            # grid_sample (align_corners=False): voxel v sits at (2v + 1) / n - 1; the
            # grid's last axis lists (W, H, D) coordinates, the reverse of tensor order.
            grid = ((2 * positions[b] / spacing + 1) / shape - 1).flip(-1).reshape(1, size, size, size, 3)
            labels.append(F.grid_sample(self.labels[number], grid, mode="nearest", padding_mode="zeros",
                                        align_corners=False))
            if plan.synthetic:
                images.append((grid.abs() <= 1).all(-1)[:, None].float())
            else:
                images.append(F.grid_sample(self.images[number], grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=False))
        return torch.cat(images), torch.cat(labels)

    def finish(self, plans: list[CropPlan], images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets, synthesised or augmented intensities, blobs, and the engine's
        z-normalisation of crops from ``cut``."""
        batch, device = len(plans), self.device
        lookup = torch.zeros(batch, self.max_label + 1, dtype=torch.bool)
        for b, plan in enumerate(plans):
            lookup[b, list(plan.group)] = True
        targets = lookup.to(device).gather(1, labels.flatten(1).long()).reshape(labels.shape)
        parts = [b for b, p in enumerate(plans) if p.part_seeds is not None]
        if parts:
            # One host-to-device copy for the batch's seeds; the cells one sample at a time
            # (a (S^3, k) comparison each: batched, they would hold P times that in memory).
            seeds = torch.tensor(np.stack([plans[b].part_seeds for b in parts]), dtype=torch.float32).to(device)
            for b, part_seeds in zip(parts, seeds):
                targets[b] &= self._voronoi_cell(part_seeds).reshape(targets.shape[1:])
        ct_like = torch.tensor([p.ct_like for p in plans], device=device)
        # The split is known on the host: each pipeline runs on its own samples only.
        synthetic = torch.tensor([b for b, p in enumerate(plans) if p.synthetic], dtype=torch.long, device=device)
        real = torch.tensor([b for b, p in enumerate(plans) if not p.synthetic], dtype=torch.long, device=device)
        images = images.clone()
        if synthetic.numel():
            synthesised = synthesise_from_labels(labels[synthetic], generator, self.max_label, ct_like[synthetic])
            # zero outside the scan, as the engine pads
            images[synthetic] = synthesised * images[synthetic]
        if real.numel():
            images[real] = augment_intensity(images[real], generator, ct_like[real])
        shapes = torch.tensor([p.shape for p in plans], device=device)
        images, targets = insert_shapes(images, targets, shapes, generator)
        return normalize_intensity_batch(images), targets

    def _voronoi_cell(self, seeds: torch.Tensor) -> torch.Tensor:
        """(S^3,) crop voxels nearer to ``seeds[0]`` than to any other of the
        (k, 3) ``seeds``: the intersection of the half-spaces
        x.(s_k - s_0) <= (|s_k|^2 - |s_0|^2) / 2."""
        normals = seeds[1:] - seeds[0]
        limits = ((seeds[1:] ** 2).sum(1) - (seeds[0] ** 2).sum()) / 2
        return (self.offsets @ normals.T <= limits).all(1)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation by ``angles`` (3,) radians about the three axes in turn."""
    result = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rotation = np.eye(3)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        result = rotation @ result
    return result
