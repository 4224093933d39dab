"""MRML bridge between 3D Slicer's scene and the FastSAM3D engine.

Imports ``slicer`` (MRML, logics, util) and ``vtk`` only: never Qt, ctk or
``slicer.app``, so it runs in real Slicer and on plain Python with the
``slicer-core`` wheel. Every function takes the scene's nodes as arguments.
"""

from . import models, shapes
from .export import ExportInfo, export_labelmap
from .geometry import (GeometryError, local_to_world, oriented_image, ras_to_ijk, volume_to_image,
                       world_ijk_to_ras)
from .prompts import PromptPoints, clicks_ras
from .session import Operation, SegmentSession, SegmentUpdate, forget_engines, get_engine, image_for_volume
from .worker import EngineWorker
from .writer import (SegmentEditorLogicWriter, SegmentWriter, other_segments_mask, preview_labelmaps,
                     read_segment, read_segments, segment_ids)

__all__ = [
    "EngineWorker", "shapes", "ExportInfo", "GeometryError", "PromptPoints", "clicks_ras", "SegmentEditorLogicWriter",
    "SegmentSession", "SegmentUpdate", "SegmentWriter", "export_labelmap", "forget_engines", "get_engine",
    "image_for_volume", "local_to_world", "Operation", "oriented_image", "other_segments_mask",
    "preview_labelmaps", "ras_to_ijk",
    "read_segment", "read_segments", "segment_ids", "volume_to_image", "world_ijk_to_ras",
]
