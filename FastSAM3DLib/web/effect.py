"""The FastSAM3D segmentation effect for trame-slicer views.

A left click in a slice view is a positive point, a right click a negative one
(or every click is negative while ``effect.negative`` is set). The pipeline
only turns the click into world RAS and hands it to ``effect.on_click``; all
segmentation work happens in the bridge (``FastSAM3DLib.slicer_bridge``).
"""

from __future__ import annotations

from trame_slicer.segmentation import SegmentationEffect, SegmentationEffectPipeline
from vtkmodules.vtkCommonCore import vtkCommand

LEFT_PRESS = int(vtkCommand.LeftButtonPressEvent)
RIGHT_PRESS = int(vtkCommand.RightButtonPressEvent)
LEFT_RELEASE = int(vtkCommand.LeftButtonReleaseEvent)
RIGHT_RELEASE = int(vtkCommand.RightButtonReleaseEvent)


class FastSAM3DPipeline(SegmentationEffectPipeline):
    """Per slice view: mouse presses -> (world RAS, positive)."""

    def CanProcessInteractionEvent(self, event_data):
        if not self.IsActive() or self._effect is None:
            return False, 0
        kind = event_data.GetType()
        if kind in (LEFT_PRESS, RIGHT_PRESS, LEFT_RELEASE, RIGHT_RELEASE):
            # Releases are swallowed too, so that the view does not start or end a
            # window/level or zoom drag that it never saw begin.
            return True, 0
        return False, 0

    def ProcessInteractionEvent(self, event_data):
        kind = event_data.GetType()
        if kind in (LEFT_PRESS, RIGHT_PRESS):
            positive = kind == LEFT_PRESS and not self._effect.negative
            self._effect.click(tuple(event_data.GetWorldPosition()), positive)
        return True


class FastSAM3DEffect(SegmentationEffect):
    """Point prompts for FastSAM3D. ``on_click(ras, positive)`` is set by the app."""

    def __init__(self) -> None:
        super().__init__()
        self.on_click = None
        self.negative = False

    def _create_pipeline(self, view_node, _parameter):
        if view_node is None or not view_node.IsA("vtkMRMLSliceNode"):
            return None                      # 3D view: navigation only
        return FastSAM3DPipeline()

    def click(self, ras, positive) -> None:
        if self.is_active and self.on_click is not None:
            self.on_click(ras, positive)
