"""Export the visible segments as one labelmap file on the volume's grid."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import slicer

from FastSAM3DLib.atomic import atomic_output_path, full_suffix

from .geometry import local_ijk_to_ras, numpy_to_matrix, volume_shape_kji
from .writer import read_segment, segment_ids

LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")


@dataclass
class ExportInfo:
    path: Path
    labels: dict = field(default_factory=dict)      # label value -> segment name
    seconds: float = 0.0


def export_labelmap(segmentation_node, volume_node, path, segment_ids_to_export=None) -> ExportInfo:
    """Write the visible segments as a labelmap on ``volume_node``'s grid.

    Label n is the n-th exported segment in the segmentation's order (as Slicer's
    own export); where segments overlap the later one wins. The file has the
    volume's geometry (its IJK-to-RAS as Slicer would save the volume), so it
    pairs voxel by voxel with the image file. Segments are placed through world
    space, so parent transforms of either node are honoured. The file appears
    complete or not at all (temporary file + rename). Formats: .nrrd, .nii,
    .nii.gz, .mha.
    """
    started = time.perf_counter()
    path = Path(path)
    suffix = full_suffix(path).lower()
    if suffix not in LABELMAP_SUFFIXES:
        raise ValueError(f"unsupported labelmap format '{suffix}': use one of {', '.join(LABELMAP_SUFFIXES)}")
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("a volume with voxels is needed as the export grid")
    ids = (segment_ids(segmentation_node, visible_only=True) if segment_ids_to_export is None
           else list(segment_ids_to_export))
    dtype = np.uint8 if len(ids) < 256 else np.uint16
    labels = np.zeros(volume_shape_kji(volume_node), dtype=dtype)
    names = {}
    for value, segment_id in enumerate(ids, start=1):
        labels[read_segment(segmentation_node, segment_id, volume_node)] = value
        names[value] = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()

    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "FastSAM3D export")
    labelmap.SetHideFromEditors(True)
    storage = None
    try:
        slicer.util.updateVolumeFromArray(labelmap, labels)
        labelmap.SetIJKToRASMatrix(numpy_to_matrix(local_ijk_to_ras(volume_node)))
        storage = labelmap.CreateDefaultStorageNode()
        storage.SetUseCompression(1)
        with atomic_output_path(path) as tmp:
            os.unlink(tmp)                  # the writer wants to create it itself
            storage.SetFileName(str(tmp))
            if not storage.WriteData(labelmap):
                raise OSError(f"could not write {path}")
    finally:
        if storage is not None and storage.GetScene() is not None:
            scene.RemoveNode(storage)
        scene.RemoveNode(labelmap)
    return ExportInfo(path=path, labels=names, seconds=time.perf_counter() - started)
