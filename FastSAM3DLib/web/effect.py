"""The FastSAM3D segmentation effect for trame-slicer views.

``effect.tool`` says what the mouse draws in a slice view: "point" (a left
click is a positive point, a right click a negative one), "box" (a left drag
is a rectangle on the slice), "scribble" (a left or right drag is a positive
or negative stroke) or "lasso" (a drag outlines a region on the slice).
``effect.negative`` makes every left click or drag negative. The pipeline
only collects the mouse's world RAS positions and hands them, with the slice
node, to ``effect.on_prompt``; all geometry and segmentation work is the
bridge's (``FastSAM3DLib.slicer_bridge``).
"""

from __future__ import annotations

from trame_slicer.segmentation import SegmentationEffect, SegmentationEffectPipeline
from vtkmodules.vtkCommonCore import vtkCommand

LEFT_PRESS = int(vtkCommand.LeftButtonPressEvent)
RIGHT_PRESS = int(vtkCommand.RightButtonPressEvent)
LEFT_RELEASE = int(vtkCommand.LeftButtonReleaseEvent)
RIGHT_RELEASE = int(vtkCommand.RightButtonReleaseEvent)
MOUSE_MOVE = int(vtkCommand.MouseMoveEvent)
TOOLS = ("point", "box", "scribble", "lasso")


class FastSAM3DPipeline(SegmentationEffectPipeline):
    """Per slice view: a press (point tool) or a press-drag-release (the others)
    -> (tool, slice node, world RAS points, positive)."""

    def __init__(self, slice_node) -> None:
        super().__init__()
        self.slice_node = slice_node
        self._stroke = None                  # (positive, [ras, ...]) while a drag is drawn

    def CanProcessInteractionEvent(self, event_data):
        if not self.IsActive() or self._effect is None:
            return False, 0
        kind = event_data.GetType()
        if kind in (LEFT_PRESS, RIGHT_PRESS, LEFT_RELEASE, RIGHT_RELEASE):
            # Releases are swallowed too, so that the view does not start or end a
            # window/level or zoom drag that it never saw begin.
            return True, 0
        return kind == MOUSE_MOVE and self._stroke is not None, 0

    def ProcessInteractionEvent(self, event_data):
        kind = event_data.GetType()
        ras = tuple(event_data.GetWorldPosition())
        if kind in (LEFT_PRESS, RIGHT_PRESS):
            positive = kind == LEFT_PRESS and not self._effect.negative
            if self._effect.tool == "point":
                self._effect.prompt("point", self.slice_node, [ras], positive)
            else:
                self._stroke = (positive, [ras])
        elif kind == MOUSE_MOVE and self._stroke is not None:
            self._stroke[1].append(ras)
        elif kind in (LEFT_RELEASE, RIGHT_RELEASE) and self._stroke is not None:
            positive, points = self._stroke
            self._stroke = None
            self._effect.prompt(self._effect.tool, self.slice_node, points + [ras], positive)
        return True

    def LoseFocus(self, event_data) -> None:
        self._stroke = None
        super().LoseFocus(event_data)


class FastSAM3DEffect(SegmentationEffect):
    """Point, box, scribble and lasso prompts for FastSAM3D.
    ``on_prompt(tool, slice_node, points_ras, positive)`` is set by the app."""

    def __init__(self) -> None:
        super().__init__()
        self.on_prompt = None
        self.negative = False
        self.tool = "point"

    def _create_pipeline(self, view_node, _parameter):
        if view_node is None or not view_node.IsA("vtkMRMLSliceNode"):
            return None                      # 3D view: navigation only
        return FastSAM3DPipeline(view_node)

    def prompt(self, tool, slice_node, points, positive) -> None:
        if self.is_active and self.on_prompt is not None:
            self.on_prompt(tool, slice_node, points, positive)
