"""Reading segments on a volume grid, and writing engine results into a segment.

A write is ROI-local: it sets one box of one segment to ``keep | mask``, where
``keep`` is content that stays as it is (the segment's own voxels from before
the session, see session.py) and ``mask`` the engine's prediction. Technically:
remove the box, then add the new content (vtkSlicerSegmentEditorLogic).
``SetBinaryLabelmapToSegment`` with an extent would not do: its REPLACE mode
clears the whole segment.

Other segments are never changed unless ``overwrite_other_segments=True``:
voxels that already belong to another segment are left out of the prediction
(a finished neighbour is never eroded, cf. SlicerNNInteractive#105); ``keep``
is never masked (overlap the segment already had stays).
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import numpy as np

import slicer

from .geometry import (BINARY_LABELMAP, _extent_empty, image_array, image_to_frame, integer_shift,
                       oriented_image, volume_grid_in, volume_shape_kji)


@runtime_checkable
class SegmentWriter(Protocol):
    """Where a SegmentSession writes its results (one segment)."""

    def apply(self, patch, keep=None) -> np.ndarray:
        """Set the patch's box of the segment to ``keep | patch.array`` (``keep``:
        a bool array of the box, or None) and return what the box now holds."""


# -- reading -------------------------------------------------------------------
def _segment_layer(segmentation_node, segment_id):
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
    layer = segment.GetRepresentation(BINARY_LABELMAP)
    if layer is None or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
        return None, segment.GetLabelValue()
    return layer, segment.GetLabelValue()


def _read_layer_into(out, layer, label, box_to_frame, start_kji):
    """OR (layer == label) sampled on the box grid into ``out`` (k, j, i)."""
    layer_to_frame = image_to_frame(layer)
    shift = integer_shift(layer_to_frame, box_to_frame)
    if shift is not None:
        # Same grid up to a whole-voxel offset: copy the overlap, exactly.
        values, layer_start = image_array(layer)
        si, sj, sk = shift
        box_start = np.array(start_kji) + (sk, sj, si)          # in layer index
        lo = np.maximum(box_start, layer_start)
        hi = np.minimum(box_start + out.shape, np.array(layer_start) + values.shape)
        if np.any(hi <= lo):
            return
        src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, layer_start))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, box_start))
        out[dst] |= values[src] == label
        return
    # Different grid (rotated, other spacing): nearest-neighbour resampling.
    reference = oriented_image(np.zeros(out.shape, np.uint8), start_kji, box_to_frame)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        layer, reference, resampled, False, False)
    values, res_start = image_array(resampled)
    if values.shape == out.shape and tuple(res_start) == tuple(start_kji):
        out |= values == label


def read_segments(segmentation_node, segment_ids: Iterable[str], volume_node,
                  start_kji=(0, 0, 0), shape_kji=None) -> np.ndarray:
    """Union of the segments over a box of the volume's grid, as bool (k, j, i).
    The whole volume by default. Parent transforms of both nodes are honoured."""
    if shape_kji is None:
        shape_kji = tuple(n - s for n, s in zip(volume_shape_kji(volume_node), start_kji))
    out = np.zeros(tuple(int(v) for v in shape_kji), dtype=bool)
    if out.size == 0:
        return out
    box_to_frame = volume_grid_in(volume_node, segmentation_node)
    for segment_id in segment_ids:
        layer, label = _segment_layer(segmentation_node, segment_id)
        if layer is not None:
            _read_layer_into(out, layer, label, box_to_frame, start_kji)
    return out


def read_segment(segmentation_node, segment_id, volume_node, start_kji=(0, 0, 0),
                 shape_kji=None) -> np.ndarray:
    """One segment on the volume grid (whole volume or a box), bool (k, j, i)."""
    return read_segments(segmentation_node, [segment_id], volume_node, start_kji, shape_kji)


def segment_ids(segmentation_node, visible_only=False) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if visible_only:
        display = segmentation_node.GetDisplayNode()
        if display is not None:
            ids = [s for s in ids if display.GetSegmentVisibility(s)]
    return ids


def other_segments_mask(segmentation_node, segment_id, volume_node, start_kji, shape_kji) -> np.ndarray:
    """Voxels of the box that belong to any segment other than ``segment_id``."""
    others = [s for s in segment_ids(segmentation_node) if s != segment_id]
    return read_segments(segmentation_node, others, volume_node, start_kji, shape_kji)


def ensure_binary_labelmap_source(segmentation_node) -> None:
    """Editing needs binary labelmap as the source representation (a segmentation
    imported from models has closed surfaces)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
        if segmentation.GetNumberOfSegments() and not segmentation.CreateRepresentation(BINARY_LABELMAP):
            raise RuntimeError(f"cannot convert '{segmentation_node.GetName()}' to a binary labelmap")
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)


# -- writing -------------------------------------------------------------------
def modifier_labelmaps(patch, segmentation_node, segment_id, volume_node, protect_others=True,
                       reference_to_frame=None, keep=None):
    """The two labelmaps of an ROI-local replace, in the segmentation's frame:
    (box of ones to Remove, new content to Add), with their extents. The new
    content is ``keep | patch.array`` (keep: bool array of the box, or None).

    protect_others: leave out of ``patch.array`` voxels that belong to other segments.
    reference_to_frame: index-to-frame matrix of the grid the segmentation edits
    on (e.g. ``scriptedEffect.defaultModifierLabelmap()``); when the volume grid
    is that grid shifted by whole voxels, the labelmaps are expressed on it
    (no resampling). Otherwise they stay on the volume grid and Slicer resamples.
    """
    mask = np.asarray(patch.array, dtype=bool)
    start = tuple(int(v) for v in patch.start_kji)
    if protect_others:
        mask = mask & ~other_segments_mask(segmentation_node, segment_id, volume_node, start, mask.shape)
    if keep is not None:
        mask = mask | np.asarray(keep, dtype=bool)
    box_to_frame = volume_grid_in(volume_node, segmentation_node)
    if reference_to_frame is not None:
        shift = integer_shift(reference_to_frame, box_to_frame)
        if shift is not None:
            start = (start[0] + shift[2], start[1] + shift[1], start[2] + shift[0])
            box_to_frame = reference_to_frame
    box = oriented_image(np.ones(mask.shape, np.uint8), start, box_to_frame)
    new = oriented_image(mask, start, box_to_frame)
    return box, new


class SegmentEditorLogicWriter:
    """SegmentWriter through ``vtkSlicerSegmentEditorLogic``: ROI-local writes.

    The logic gets its own hidden segment editor node, so the user's Segment
    Editor settings are neither used nor changed. (Undo is the session's: it
    rewrites the box from its own state; no MRML undo states are kept.)
    """

    def __init__(self, segmentation_node, segment_id, volume_node, overwrite_other_segments=False):
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise KeyError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        scene = segmentation_node.GetScene()
        if scene is None:
            raise ValueError("the segmentation node is not in a scene")
        ensure_binary_labelmap_source(segmentation_node)
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.volume_node = volume_node
        self.overwrite_other_segments = bool(overwrite_other_segments)
        E = slicer.vtkSlicerSegmentEditorLogic
        self._E = E
        self._editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "FastSAM3D writer")
        self._editor_node.SetHideFromEditors(True)
        self._editor_node.SetSaveWithScene(False)
        self._editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        self._logic = E()
        self._logic.SetMRMLScene(scene)
        self._logic.SetSegmentEditorNode(self._editor_node)
        self._logic.SetSegmentationNode(segmentation_node)
        self._logic.SetSourceVolumeNode(volume_node)
        self._logic.SetCurrentSegmentID(segment_id)
        self._logic.SetMaximumNumberOfUndoStates(0)

    # SegmentWriter
    def apply(self, patch, keep=None, segment_id=None, others=None) -> np.ndarray:
        """Set the box of ``segment_id`` (default: this writer's segment) to
        ``keep | patch.array``; returns that content (bool, the box's shape).

        others: what happens where ``patch.array`` meets other segments:
        "protect" (default unless overwrite_other_segments): those voxels are
        left out; "overwrite": the other segments lose them; "ignore": the mask
        is written as is and others are unchanged (overlap). ``keep`` is always
        written as is.
        """
        segment_id = segment_id or self.segment_id
        if others is None:
            others = "overwrite" if self.overwrite_other_segments else "protect"
        if others not in ("protect", "overwrite", "ignore"):
            raise ValueError(f"others must be protect, overwrite or ignore, not {others!r}")
        mask = np.asarray(patch.array, dtype=bool)
        keep = np.zeros_like(mask) if keep is None else np.asarray(keep, dtype=bool)
        if keep.shape != mask.shape:
            raise ValueError(f"keep has shape {keep.shape}, the patch {mask.shape}")
        if mask.size == 0:
            return mask
        start = tuple(int(v) for v in patch.start_kji)
        if others == "protect":
            mask = mask & ~other_segments_mask(self.segmentation_node, segment_id, self.volume_node,
                                               start, mask.shape)
        content = keep | mask
        E = self._E
        box_to_frame = volume_grid_in(self.volume_node, self.segmentation_node)
        box = oriented_image(np.ones(mask.shape, np.uint8), start, box_to_frame)
        # args: isPerSegment=False, bypassMasking=True (no masking, no overwrite of others)
        self._editor_node.SetOverwriteMode(self._editor_node.OverwriteNone)
        self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, box,
                                            E.ModificationModeRemove, box.GetExtent(), False, True)
        if others == "overwrite":
            kept = oriented_image(keep, start, box_to_frame)
            self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, kept,
                                                E.ModificationModeAdd, kept.GetExtent(), False, True)
            self._editor_node.SetOverwriteMode(self._editor_node.OverwriteAllSegments)
            taken = oriented_image(mask & ~keep, start, box_to_frame)
            self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, taken,
                                                E.ModificationModeAdd, taken.GetExtent(), False, False)
        else:
            new = oriented_image(content, start, box_to_frame)
            self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, new,
                                                E.ModificationModeAdd, new.GetExtent(), False, True)
        return content

    def close(self) -> None:
        scene = self._editor_node.GetScene()
        if scene is not None:
            scene.RemoveNode(self._editor_node)


def preview_labelmaps(patch, segmentation_node, segment_id, volume_node, replace=False,
                      protect_others=True, reference_to_frame=None):
    """What the Segment Editor effect's Apply hands to the editor for a preview
    mask over a box: [(labelmap, "remove" | "add"), ...] in that order.

    By default the preview is added to the segment, so everything the segment
    already holds stays; ``replace=True`` first clears the box (the segment's
    content there is replaced by the preview).
    """
    box, new = modifier_labelmaps(patch, segmentation_node, segment_id, volume_node,
                                  protect_others=protect_others, reference_to_frame=reference_to_frame)
    return ([(box, "remove")] if replace else []) + [(new, "add")]
