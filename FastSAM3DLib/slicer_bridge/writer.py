"""Reading segments on a volume grid, and writing engine results into a segment.

A result is a ``MaskPatch`` on the source volume's grid: the object's mask
over a box. Writing it means "replace exactly this box of this segment":
remove the box, then add the mask (vtkSlicerSegmentEditorLogic, so the change
is undoable). ``SetBinaryLabelmapToSegment`` with an extent would not do: its
REPLACE mode clears the whole segment.

Other segments are never changed unless ``overwrite_other_segments=True``:
voxels that already belong to another segment are left out of the new mask
(a finished neighbour is never eroded, cf. SlicerNNInteractive#105).
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

    def save_undo_state(self) -> None:
        """Snapshot the segmentation so that the next ``apply`` can be undone."""

    def apply(self, patch) -> None:
        """Replace the patch's box of the segment by ``patch.array``."""


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
                       reference_to_frame=None):
    """The two labelmaps of an ROI-local replace, in the segmentation's frame:
    (box of ones to Remove, new mask to Add), with their extents.

    protect_others: leave out voxels that belong to other segments.
    reference_to_frame: index-to-frame matrix of the grid the segmentation edits
    on (e.g. ``scriptedEffect.defaultModifierLabelmap()``); when the volume grid
    is that grid shifted by whole voxels, the labelmaps are expressed on it
    (no resampling). Otherwise they stay on the volume grid and Slicer resamples.
    """
    mask = np.asarray(patch.array, dtype=bool)
    start = tuple(int(v) for v in patch.start_kji)
    if protect_others:
        mask = mask & ~other_segments_mask(segmentation_node, segment_id, volume_node, start, mask.shape)
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
    """SegmentWriter through ``vtkSlicerSegmentEditorLogic``: ROI-local replace
    with Slicer's own undo/redo history for this segmentation (``undo()``).

    The logic gets its own hidden segment editor node, so the user's Segment
    Editor settings are neither used nor changed.
    """

    def __init__(self, segmentation_node, segment_id, volume_node,
                 overwrite_other_segments=False, max_undo_states=20):
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
        self._logic.SetMaximumNumberOfUndoStates(max_undo_states)

    # SegmentWriter
    def save_undo_state(self) -> None:
        self._logic.SaveStateForUndo()

    def apply(self, patch, segment_id=None, others=None) -> None:
        """Replace the box of ``segment_id`` (default: this writer's segment).

        others: what happens where the new mask meets other segments:
        "protect" (default unless overwrite_other_segments): those voxels are
        left out of the mask; "overwrite": the other segments lose them;
        "ignore": the mask is written as is and others are unchanged (overlap).
        """
        segment_id = segment_id or self.segment_id
        if others is None:
            others = "overwrite" if self.overwrite_other_segments else "protect"
        if others not in ("protect", "overwrite", "ignore"):
            raise ValueError(f"others must be protect, overwrite or ignore, not {others!r}")
        if np.asarray(patch.array).size == 0:
            return
        overwrite = others == "overwrite"
        self._editor_node.SetOverwriteMode(
            self._editor_node.OverwriteAllSegments if overwrite else self._editor_node.OverwriteNone)
        box, new = modifier_labelmaps(patch, self.segmentation_node, segment_id, self.volume_node,
                                      protect_others=others == "protect")
        E = self._E
        # args: isPerSegment=False, bypassMasking=True (no masking, no overwrite of others)
        self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, box,
                                            E.ModificationModeRemove, box.GetExtent(), False, True)
        self._logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, new,
                                            E.ModificationModeAdd, new.GetExtent(), False, not overwrite)

    # Slicer's own history of this segmentation (all segments)
    @property
    def can_undo(self) -> bool:
        return bool(self._logic.CanUndo())

    @property
    def can_redo(self) -> bool:
        return bool(self._logic.CanRedo())

    def undo(self) -> None:
        self._logic.Undo()

    def redo(self) -> None:
        self._logic.Redo()

    def close(self) -> None:
        scene = self._editor_node.GetScene()
        if scene is not None:
            scene.RemoveNode(self._editor_node)
