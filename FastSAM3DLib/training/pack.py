"""The training-data pack: every case read, reoriented and quantised once, in one small file.

Reading and resampling NIfTI files per sample on the CPU bound the first
training runs to ~10 samples/s. The pack holds each volume once, on its own
voxel grid turned to the ROI's RAS+ axis order (``FastSAM3DLib.roi``), so the
GPU sampler (``training.sampler``) cuts every crop with one ``grid_sample``
from memory on the device:

* images as int16 with one scale per volume (``value = q * scale``); the step
  is a small fraction of the intensity spread (CT: 2 HU), far below what the
  z-normalisation and the model can see, and it makes the volumes compress
  several times better than raw floats;
* label maps as uint8 (or int16 above 255 labels), renumbered 1..n in the
  original ids' order, with the original ids and names kept;
* volumes finer than ``min_spacing_mm`` are resampled to it (linear for images,
  nearest for labels): no crop the engine cuts is finer;
* label-only maps (for synthesis) are cut to their labels' bounding box plus a
  margin (their background carries no information); images are kept whole,
  since zero padding where a scan had air would teach the model a border the
  engine never shows it.

The file is a ZIP (LZMA) of ``index.json`` and one ``.npy`` per array: numpy and
the standard library read it, no pickle is involved.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_output_path

PACK_FORMAT = 1
DEFAULT_MIN_SPACING_MM = 0.9
LABEL_MAP_MARGIN_VOXELS = 8
# Quantisation step as a fraction of the robust spread of the foreground
# intensities (the engine z-normalises over voxels > 0).
QUANTISATION_FRACTION = 1 / 64


class DataError(ValueError):
    """Training data the library cannot use; the message is one line."""


@dataclass
class PackedVolume:
    """One volume of the pack; arrays in RAS+ tensor-axis order (axis 0 toward
    the patient's Right, 1 Anterior, 2 Superior), as ROI arrays."""
    name: str
    label: np.ndarray                            # uint8/int16, 0 = background, 1..n
    spacing: tuple[float, float, float]          # mm per axis
    image: np.ndarray | None = None              # int16 quantised, None for label-only maps
    image_scale: float = 1.0
    modality: str = ""
    label_quality: str = ""
    label_ids: list[int] = field(default_factory=list)      # original id of label 1..n
    label_names: dict[int, str] = field(default_factory=dict)   # by packed label

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def image_values(self) -> np.ndarray:
        return self.image.astype(np.float32) * np.float32(self.image_scale)


# ----------------------------------------------------------------------------- building
# Building needs SimpleITK and the engine's readers; reading a pack needs numpy
# only, so the GPU machine (no SimpleITK) trains from packs built elsewhere.


def _to_ras_arrays(image, min_spacing: float, interpolator) -> tuple[np.ndarray, tuple]:
    """(array in RAS+ tensor-axis order, spacing): the nearest axis-aligned
    reorientation (obliqueness is left out: training rotates crops anyway),
    resampled to ``min_spacing`` along axes finer than it."""
    import SimpleITK as sitk

    oriented = sitk.DICOMOrient(image, "RAS")
    spacing = np.array(oriented.GetSpacing())
    if np.any(spacing < min_spacing):
        new_spacing = np.maximum(spacing, min_spacing)
        new_size = np.maximum(1, np.round(np.array(oriented.GetSize()) * spacing / new_spacing)).astype(int)
        oriented = sitk.Resample(oriented, [int(n) for n in new_size], sitk.Transform(), interpolator,
                                 oriented.GetOrigin(), new_spacing.tolist(), oriented.GetDirection(), 0,
                                 oriented.GetPixelID())
    array = sitk.GetArrayFromImage(oriented).transpose(2, 1, 0)
    return np.ascontiguousarray(array), tuple(float(s) for s in oriented.GetSpacing())


def quantise_image(values: np.ndarray, modality: str) -> tuple[np.ndarray, float]:
    """(int16 q, scale) with values ≈ q * scale; the sign of every voxel is kept
    (the z-normalisation selects voxels > 0)."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0)
    if modality.upper().startswith("CT"):
        scale = 4.0
    else:
        foreground = values[values > 0]
        spread = np.percentile(foreground, 99) - np.percentile(foreground, 1) if foreground.size else 1.0
        scale = float(max(spread, 1e-6) * QUANTISATION_FRACTION)
    q = np.round(values / scale)
    limit = np.iinfo(np.int16).max
    if np.abs(q).max(initial=0) > limit:            # a few extreme voxels: widen the step
        scale *= float(np.abs(q).max()) / limit
        q = np.round(values / scale)
    # Keep the sign: a small positive value must not round to 0 and leave the foreground.
    q = np.where((values > 0) & (q == 0), 1, q)
    return q.astype(np.int16), float(scale)


def _renumber(label: np.ndarray, name: str) -> tuple[np.ndarray, list[int]]:
    if np.issubdtype(label.dtype, np.floating):
        label = np.rint(label)
    if label.size and label.min() < 0:
        raise DataError(f"{name}: the label map holds negative values")
    ids = [int(v) for v in np.unique(label) if v != 0]
    lookup = np.zeros(int(label.max()) + 1 if label.size else 1, dtype=np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    dtype = np.uint8 if len(ids) < 256 else np.int16
    return lookup[label.astype(np.int64)].astype(dtype), ids


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    axes = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        axes.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + margin + 1)))
    return tuple(axes)


def pack_volume(name: str, label_path, image_path=None, modality: str = "", label_quality: str = "",
                label_names: dict[int, str] | None = None,
                min_spacing_mm: float = DEFAULT_MIN_SPACING_MM) -> PackedVolume:
    """Read one case (or a label-only map when ``image_path`` is None) into the pack's form."""
    import SimpleITK as sitk

    from ..image import load_image

    label_image = sitk.ReadImage(str(label_path))
    image = load_image(image_path) if image_path is not None else None
    if image is not None and label_image.GetSize() == image.GetSize():
        # Same voxel grid: header differences are header noise (as the training reader).
        label_image.CopyInformation(image)
    label, spacing = _to_ras_arrays(label_image, min_spacing_mm, sitk.sitkNearestNeighbor)
    label, ids = _renumber(label, name)
    if not ids:
        raise DataError(f"{name}: the label map is empty")
    values = None
    if image is not None:
        # The image defines the sampling grid; the label is moved onto it if needed.
        values, image_spacing = _to_ras_arrays(sitk.Cast(image, sitk.sitkFloat32), min_spacing_mm,
                                               sitk.sitkLinear)
        if values.shape != label.shape:
            reference = sitk.DICOMOrient(image, "RAS")
            moved = sitk.Resample(label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            label, spacing = _to_ras_arrays(moved, min_spacing_mm, sitk.sitkNearestNeighbor)
            label, ids = _renumber(label, name)
        spacing = image_spacing
        # Voxels outside the box of nonzero image or label voxels are 0, which is
        # exactly the engine's padding outside an image: cutting them loses nothing.
        box = _bounding_box((values != 0) | (label > 0), 1)
        values, label = np.ascontiguousarray(values[box]), np.ascontiguousarray(label[box])
    else:
        box = _bounding_box(label > 0, LABEL_MAP_MARGIN_VOXELS)
        label = np.ascontiguousarray(label[box])
    names = {packed: str((label_names or {}).get(original, original))
             for packed, original in enumerate(ids, start=1)}
    volume = PackedVolume(name=name, label=label, spacing=spacing, modality=modality,
                          label_quality=label_quality, label_ids=ids, label_names=names)
    if values is not None:
        volume.image, volume.image_scale = quantise_image(values, modality)
    return volume


def _manifest_entries(source: Path) -> list[dict]:
    manifest = source / "MANIFEST.json" if source.is_dir() else source
    try:
        return json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else []
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest} is not valid JSON: {exc}") from None


def volumes_of_source(source, exclude: set[str] = frozenset(), min_spacing_mm: float = DEFAULT_MIN_SPACING_MM,
                      progress=None) -> list[PackedVolume]:
    """Packed volumes of a data folder or manifest: cases with images through
    the training readers; manifest entries whose ``image`` is null are
    label-only maps. Cases named in ``exclude`` (validation) are left out, as
    are manifest entries with ``"stored_in_train_folder": false`` (the training
    manifest lists the validation cases that way)."""
    from .data import read_cases

    source = Path(source)
    entries = {str(e.get("case")): e for e in _manifest_entries(source)}
    volumes = []
    label_only = [e for e in entries.values() if e.get("image") is None and "label" in e]
    if label_only:
        root = source if source.is_dir() else source.parent
        for entry in label_only:
            if entry["case"] in exclude:
                continue
            names = {int(k): str(v) for k, v in entry.get("label_names", {}).items()}
            volumes.append(pack_volume(entry["case"], root / entry["label"], None, "",
                                       str(entry.get("label_quality", "")), names, min_spacing_mm))
            if progress:
                progress(volumes[-1])
        return volumes
    for case in read_cases(source):
        entry = entries.get(case.name, {})
        if case.name in exclude or entry.get("stored_in_train_folder") is False:
            continue
        volumes.append(pack_volume(case.name, case.label, case.image, case.modality,
                                   str(entry.get("label_quality", "")), case.label_names, min_spacing_mm))
        if progress:
            progress(volumes[-1])
    return volumes


def write_pack(path, volumes: list[PackedVolume]) -> None:
    """Write ``volumes`` atomically as one LZMA ZIP."""
    if not volumes:
        raise DataError("nothing to pack")
    index = {"format": PACK_FORMAT, "volumes": []}
    with atomic_output_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
            for number, volume in enumerate(volumes):
                entry = {"name": volume.name, "spacing": list(volume.spacing), "modality": volume.modality,
                         "label_quality": volume.label_quality, "label_ids": volume.label_ids,
                         "label_names": {str(k): v for k, v in volume.label_names.items()},
                         "label": f"{number}.label.npy", "image": None, "image_scale": volume.image_scale}
                archive.writestr(entry["label"], _npy_bytes(volume.label))
                if volume.has_image:
                    entry["image"] = f"{number}.image.npy"
                    archive.writestr(entry["image"], _npy_bytes(volume.image))
                index["volumes"].append(entry)
            archive.writestr("index.json", json.dumps(index, indent=1))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_pack(path) -> list[PackedVolume]:
    """The volumes of a pack written by ``write_pack``."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"training pack not found: {path}") from None
    except zipfile.BadZipFile:
        raise DataError(f"{path.name} is not a training pack (not a ZIP file)") from None
    with archive:
        try:
            index = json.loads(archive.read("index.json"))
        except KeyError:
            raise DataError(f"{path.name} is not a training pack (no index.json)") from None
        if index.get("format") != PACK_FORMAT:
            raise DataError(f"{path.name}: pack format {index.get('format')} is not {PACK_FORMAT}")
        volumes = []
        for entry in index["volumes"]:
            try:
                label = np.load(io.BytesIO(archive.read(entry["label"])), allow_pickle=False)
                image = (np.load(io.BytesIO(archive.read(entry["image"])), allow_pickle=False)
                         if entry["image"] else None)
            except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"{path.name}: volume {entry.get('name')} is damaged ({exc})") from None
            volumes.append(PackedVolume(
                name=entry["name"], label=label, spacing=tuple(entry["spacing"]), image=image,
                image_scale=float(entry["image_scale"]), modality=entry["modality"],
                label_quality=entry["label_quality"], label_ids=list(entry["label_ids"]),
                label_names={int(k): v for k, v in entry["label_names"].items()}))
    return volumes
