"""Click collection with markups point lists: placed in any view (slice views,
oblique reformats, 3D), reported in world RAS.

Two lists, "FastSAM3D include" (green) and "FastSAM3D exclude" (red). Markups
placement mode does the picking; each newly defined point calls
``on_point(ras, positive)``. The lists then show the session's clicks
(``show``), so undo/redo/reset keep the points in step with the mask.
"""

from __future__ import annotations

import numpy as np

import slicer

INCLUDE_NAME = "FastSAM3D include"
EXCLUDE_NAME = "FastSAM3D exclude"
COLOURS = {True: (0.2, 0.85, 0.2), False: (0.95, 0.25, 0.2)}


def _find_or_add(scene, name, positive):
    node = None
    nodes = scene.GetNodesByClassByName("vtkMRMLMarkupsFiducialNode", name)
    if nodes.GetNumberOfItems():
        node = nodes.GetItemAsObject(0)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.SetSaveWithScene(False)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*COLOURS[positive])
    display.SetColor(*COLOURS[positive])
    display.SetPointLabelsVisibility(False)
    return node


class PromptPoints:
    """The include/exclude point lists of one scene.

    on_point(ras, positive) is called for every point the user places (None:
    the lists only display clicks made elsewhere, e.g. by the effect).
    markups_logic: ``slicer.modules.markups.logic()`` in Slicer (a
    vtkSlicerMarkupsLogic); needed only for ``start_placing``.
    """

    def __init__(self, scene, on_point=None, markups_logic=None, names=(INCLUDE_NAME, EXCLUDE_NAME)):
        self.scene = scene
        self.on_point = on_point
        self.markups_logic = markups_logic
        self.nodes = {True: _find_or_add(scene, names[0], True),
                      False: _find_or_add(scene, names[1], False)}
        self._muted = False
        self._tags = [(node, node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                              self._defined(positive)))
                      for positive, node in self.nodes.items()]

    def _defined(self, positive):
        def callback(caller, event):
            if self._muted or self.on_point is None:
                return
            n = caller.GetNumberOfControlPoints()
            if n == 0:
                return
            ras = [0.0, 0.0, 0.0]
            caller.GetNthControlPointPositionWorld(n - 1, ras)
            self.on_point(ras, positive)
        return callback

    def start_placing(self, positive, interaction_node=None) -> bool:
        """Persistent place mode for the include (True) or exclude (False) list."""
        if self.markups_logic is None:
            raise RuntimeError("a markups logic is needed to start placing points")
        self.markups_logic.SetActiveList(self.nodes[bool(positive)])
        return bool(self.markups_logic.StartPlaceMode(True, interaction_node) if interaction_node
                    else self.markups_logic.StartPlaceMode(True))

    @staticmethod
    def stop_placing(interaction_node) -> None:
        if interaction_node is not None and interaction_node.GetCurrentInteractionMode() == interaction_node.Place:
            interaction_node.SwitchToViewTransformMode()

    def show(self, clicks) -> None:
        """Show exactly these clicks: iterable of (ras, positive). Points already
        shown are kept (no flicker, and a point the user is placing right now is
        not disturbed); shown points are locked, since moving one would not
        re-run the click."""
        wanted = {True: [], False: []}
        for ras, positive in clicks:
            wanted[bool(positive)].append([float(v) for v in ras])
        self._muted = True
        try:
            for positive, node in self.nodes.items():
                defined = [n for n in range(node.GetNumberOfControlPoints())
                           if node.GetNthControlPointPositionStatus(n) == node.PositionDefined]
                current = []
                for n in defined:
                    p = [0.0, 0.0, 0.0]
                    node.GetNthControlPointPositionWorld(n, p)
                    current.append(p)
                if len(current) != len(wanted[positive]) or not np.allclose(
                        np.reshape(current, (-1, 3)), np.reshape(wanted[positive], (-1, 3)), atol=1e-4):
                    for n in reversed(defined):
                        node.RemoveNthControlPoint(n)
                    for ras in wanted[positive]:
                        node.AddControlPointWorld(*ras, "")
                for n in range(node.GetNumberOfControlPoints()):
                    if node.GetNthControlPointPositionStatus(n) == node.PositionDefined:
                        node.SetNthControlPointLocked(n, True)
        finally:
            self._muted = False

    def clear(self) -> None:
        self.show([])

    def close(self, remove_nodes=False) -> None:
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []
        if remove_nodes:
            for node in self.nodes.values():
                if node.GetScene() is not None:
                    self.scene.RemoveNode(node)


def clicks_ras(session) -> list:
    """[(ras, positive), ...] of an engine session's clicks (stored in LPS)."""
    out = []
    for click in session.clicks:
        if hasattr(click, "point_lps"):
            lps, positive = click.point_lps, click.positive
        else:
            lps, positive = click
        ras = np.asarray(lps, dtype=float) * (-1.0, -1.0, 1.0)
        out.append((ras, bool(positive)))
    return out
