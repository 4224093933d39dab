import logging
import os

import qt
import vtk

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import *


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """FastSAM3D in the Segment Editor, shaped like "Grow from seeds":
    Initialize (load model, embed the region in view) -> left click include /
    right click exclude, live preview -> Apply (through
    modifySelectedSegmentByLabelmap, so masking, overlap settings and Ctrl+Z
    work) or Cancel.
    """

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "FastSAM3D"  # no tr (modules find effects by name)
        scriptedEffect.title = _("FastSAM3D")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.previewNode = None
        self.previewSegmentId = None
        self._target = None               # (segmentation node, segment ID, source volume) of the preview
        self._tasks = None
        self._prompts = None              # display of the clicks (locked point lists)
        self._consumedRightPress = False
        self._stroke = None               # (positive, slice node, [xy, ...]) while a drag is drawn

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return "<html>" + _("""Segment the selected segment with FastSAM3D point prompts.<br>
<ul style="margin: 0">
<li><b>Initialize</b>: loads the model and computes the image embedding around the centre of the red view
(optional: the first click does it too).
<li><b>Left click</b> in a slice view (any orientation): include point. <b>Right click</b>: exclude point.
The preview updates after each click; only the small decoder runs.
<li><b>Box</b>, <b>Scribble</b>, <b>Lasso</b>: drag in a slice view instead: a rectangle on the slice (the
bundled model has box prompts), a stroke, or an outline of the region (right drag: remove).
<li><b>Apply</b> adds the preview to the selected segment, which keeps everything it had (with <i>Replace the
segment in the region</i>: the preview replaces the segment inside its region); masking and overlap settings
apply; undo with Ctrl+Z.
<b>Cancel</b> discards it.
</ul>
With <i>Protect other segments</i> on, voxels of other segments are never taken.</html>""")

    def _logic(self):
        import FastSAM3D
        return FastSAM3D.getLogic()

    def _bridge(self):
        from FastSAM3DLib import slicer_bridge
        return slicer_bridge

    # -- options panel ----------------------------------------------------------------
    def setupOptionsFrame(self):
        import FastSAM3D
        self._tasks = FastSAM3D.TaskQueue(self._onBusyChanged, self._showError)

        self.initializeButton = qt.QPushButton(_("Initialize"))
        self.initializeButton.objectName = self.__class__.__name__ + "Initialize"
        self.initializeButton.setToolTip(_("Load the model and compute the embedding of the region in view."))
        self.scriptedEffect.addOptionsWidget(self.initializeButton)

        toolsFrame = qt.QHBoxLayout()
        self.toolButtons = {}
        self.toolGroup = qt.QButtonGroup()
        for tool, label, tip in [("point", _("Points"), _("Left click: include, right click: exclude.")),
                                 ("box", _("Box"), _("Left drag: a box around the object, on this slice.")),
                                 ("scribble", _("Scribble"), _("Drag a stroke: left adds, right removes.")),
                                 ("lasso", _("Lasso"), _("Drag an outline: left adds its region, right removes it."))]:
            button = qt.QRadioButton(label)
            button.setToolTip(tip)
            button.objectName = self.__class__.__name__ + "Tool" + tool.capitalize()
            self.toolGroup.addButton(button)
            self.toolButtons[tool] = button
            toolsFrame.addWidget(button)
        self.toolButtons["point"].checked = True
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompt:"), toolsFrame)

        self.undoClickButton = qt.QPushButton(_("Undo click"))
        self.redoClickButton = qt.QPushButton(_("Redo click"))
        self.resetButton = qt.QPushButton(_("Reset"))
        clicksFrame = qt.QHBoxLayout()
        clicksFrame.addWidget(self.undoClickButton)
        clicksFrame.addWidget(self.redoClickButton)
        clicksFrame.addWidget(self.resetButton)
        self.scriptedEffect.addLabeledOptionsWidget(_("Clicks:"), clicksFrame)

        self.protectCheckBox = qt.QCheckBox(_("Protect other segments"))
        self.protectCheckBox.setToolTip(_("Never take voxels that already belong to another segment."))
        self.scriptedEffect.addOptionsWidget(self.protectCheckBox)

        self.replaceCheckBox = qt.QCheckBox(_("Replace the segment in the region"))
        self.replaceCheckBox.setToolTip(_("Apply clears the selected segment inside the preview's region first. "
                                          "Off: the preview is added and the segment keeps everything it has."))
        self.scriptedEffect.addOptionsWidget(self.replaceCheckBox)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 0)
        self.progressBar.setTextVisible(False)
        self.progressBar.setVisible(False)
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip(_("Discard the preview."))
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip(_("Write the preview into the selected segment."))
        finishFrame = qt.QHBoxLayout()
        finishFrame.addWidget(self.cancelButton)
        finishFrame.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(finishFrame)

        self.initializeButton.connect("clicked()", self.onInitialize)
        self.undoClickButton.connect("clicked()", lambda: self.runOperation("undo"))
        self.redoClickButton.connect("clicked()", lambda: self.runOperation("redo"))
        self.resetButton.connect("clicked()", lambda: self.runOperation("reset"))
        self.protectCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.replaceCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ProtectOtherSegments", 1)
        self.scriptedEffect.setParameterDefault("ReplaceInRegion", 0)

    def updateGUIFromMRML(self):
        wasBlocked = self.protectCheckBox.blockSignals(True)
        self.protectCheckBox.checked = self.scriptedEffect.integerParameter("ProtectOtherSegments") != 0
        self.protectCheckBox.blockSignals(wasBlocked)
        wasBlocked = self.replaceCheckBox.blockSignals(True)
        self.replaceCheckBox.checked = self.scriptedEffect.integerParameter("ReplaceInRegion") != 0
        self.replaceCheckBox.blockSignals(wasBlocked)
        active = self.session is not None
        busy = self._tasks.busy if self._tasks else False
        self.initializeButton.text = _("Initialized") if active else _("Initialize")
        self.initializeButton.enabled = not active and not busy
        self.undoClickButton.enabled = active and self.session.can_undo and not busy
        self.redoClickButton.enabled = active and self.session.can_redo and not busy
        self.resetButton.enabled = active and bool(self.session.prompts) and not busy
        self.applyButton.enabled = active and self.session.touched_box is not None and not busy
        self.cancelButton.enabled = active

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("ProtectOtherSegments", 1 if self.protectCheckBox.checked else 0)
        self.scriptedEffect.setParameter("ReplaceInRegion", 1 if self.replaceCheckBox.checked else 0)

    def activate(self):
        self.statusLabel.text = _("Left click: include, right click: exclude.")

    def deactivate(self):
        self._stroke = None
        self.onCancel()

    def cleanup(self):
        if self._tasks:
            self._tasks.stop()

    # -- clicks and drags ----------------------------------------------------------------
    def tool(self):
        return next(tool for tool, button in self.toolButtons.items() if button.checked)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if self._stroke is not None and self._processDrag(callerInteractor, eventId):
            return True
        if callerInteractor.GetShiftKey() or callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
            return False
        if eventId == vtk.vtkCommand.RightButtonReleaseEvent and self._consumedRightPress:
            self._consumedRightPress = False
            return True                                    # no context menu after an exclude click
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonPressEvent):
            return False
        positive = eventId == vtk.vtkCommand.LeftButtonPressEvent
        self._consumedRightPress = not positive
        if self.tool() != "point":
            self._stroke = (positive, viewWidget.mrmlSliceNode(), [callerInteractor.GetEventPosition()])
            return True
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        self.addClick(ras, positive)
        return True

    def _processDrag(self, callerInteractor, eventId):
        """A box, scribble or lasso being dragged: collect view positions; at the
        release the bridge turns them into the prompt."""
        positive, sliceNode, points = self._stroke
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            points.append(callerInteractor.GetEventPosition())
            return True
        if eventId not in (vtk.vtkCommand.LeftButtonReleaseEvent, vtk.vtkCommand.RightButtonReleaseEvent):
            return False
        self._stroke = None
        self._consumedRightPress = False
        points.append(callerInteractor.GetEventPosition())
        shapes = self._bridge().shapes
        try:
            prompt = shapes.slice_drag_prompt(self.tool(), sliceNode, shapes.slice_xy_to_ras(sliceNode, points),
                                              positive)
        except ValueError as e:
            self._showError(e)
            return True
        if self._requirements():
            self.runOperation(prompt.kind, prompt.ras, prompt.positive, **prompt.options)
        return True

    def _inputs(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        return (parameterSetNode.GetSegmentationNode(), parameterSetNode.GetSelectedSegmentID(),
                parameterSetNode.GetSourceVolumeNode())

    def _ensurePreview(self):
        """Preview segmentation + session for the selected segment (main thread)."""
        segmentationNode, segmentId, sourceVolume = self._inputs()
        if not (segmentationNode and segmentId and sourceVolume):
            raise ValueError(_("Select a source volume and a segment first."))
        if self.session is not None and self._target == (segmentationNode, segmentId, sourceVolume):
            return self.session
        self.onCancel()
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        preview = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                     segmentationNode.GetName() + " FastSAM3D preview")
        preview.SetSaveWithScene(False)
        preview.CreateDefaultDisplayNodes()
        preview.GetDisplayNode().SetOpacity(0.6)
        if segmentationNode.GetParentTransformNode():
            preview.SetAndObserveTransformNodeID(segmentationNode.GetParentTransformNode().GetID())
        preview.SetReferenceImageGeometryParameterFromVolumeNode(sourceVolume)
        self.previewSegmentId = preview.GetSegmentation().AddEmptySegment("", segment.GetName() + " preview",
                                                                         segment.GetColor())
        self.previewNode = preview
        engine = self._logic().engine()
        self.session = self._bridge().SegmentSession(sourceVolume, preview, self.previewSegmentId, engine=engine)
        self._target = (segmentationNode, segmentId, sourceVolume)
        self._prompts = self._bridge().PromptPoints(
            slicer.mrmlScene, None, names=("FastSAM3D effect include", "FastSAM3D effect exclude"))
        self._prompts.clear()
        return self.session

    def onInitialize(self):
        """Load the model; compute the embedding around the centre of the red view."""
        if not self._requirements():
            return
        centre = None
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget:
            sliceToRas = sliceWidget.mrmlSliceNode().GetSliceToRAS()
            centre = [sliceToRas.GetElement(r, 3) for r in range(3)]
        self.statusLabel.text = _("Loading the model and computing the embedding...")

        def withEngine(engine):
            session = self._ensurePreview()
            if centre is not None and hasattr(session, "prefetch"):
                self._tasks.wait(self._logic().worker.submit(session.prefetch, centre), self._done)
            else:
                self._done(None)

        self._tasks.wait(self._logic().engineFuture(), withEngine)

    def _done(self, _result):
        self.statusLabel.text = self._logic().deviceDescription()
        self.updateGUIFromMRML()

    def _requirements(self):
        try:
            return self._logic().setupPythonRequirements()
        except Exception as e:
            self._showError(e)
            return False

    def addClick(self, ras, positive):
        if not self._requirements():
            return
        self.runOperation("click", ras, positive)

    def runOperation(self, operation, ras=None, positive=True, **options):
        def withEngine(engine):
            session = self._ensurePreview()

            def finished(done):
                info = done.apply()             # None: nothing to do, or the preview was cancelled
                if info is None:
                    self.updateGUIFromMRML()
                    return
                if self._prompts is not None and not self._tasks.busy:
                    self._prompts.show(session.clicks_ras())
                t = info.timings
                self.statusLabel.text = _("{clicks} click(s). Last: {total:.0f} ms (model {engine:.0f} ms, preview {write:.0f} ms)").format(
                    clicks=info.clicks, total=1000 * t["total"], engine=1000 * t["engine"], write=1000 * t["write"])
                self.updateGUIFromMRML()

            self._tasks.wait(session.submit(self._logic().worker, operation, ras, positive, **options), finished)

        if not self._logic().engineReady():
            self.statusLabel.text = _("Loading the model...")
        elif self.session is None or not self.session.prompts:
            self.statusLabel.text = _("Computing the image embedding...")
        self._tasks.wait(self._logic().engineFuture(), withEngine)

    def addClickSync(self, ras, positive=True):
        """Blocking click, for tests and scripts."""
        session = self._ensurePreview()
        info = session.submit(self._logic().worker, "click", ras, positive).result().apply()
        self._prompts.show(session.clicks_ras())
        self.updateGUIFromMRML()
        return info

    # -- apply / cancel --------------------------------------------------------------------
    def onApply(self):
        if self.session is None or self.session.touched_box is None:
            return
        segmentationNode, segmentId, sourceVolume = self._target
        b = self._bridge()
        start, stop = self.session.touched_box
        shape = tuple(e - s for s, e in zip(start, stop))
        mask = b.read_segment(self.previewNode, self.previewSegmentId, sourceVolume, start, shape)

        class Patch:
            start_kji = start
            array = mask

        if self.scriptedEffect.parameterSetNode().GetSelectedSegmentID() != segmentId:
            self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(segmentId)
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            reference = b.geometry.image_to_frame(self.scriptedEffect.defaultModifierLabelmap())
            # The segment keeps what it has (the preview is added) unless "Replace" is checked.
            labelmaps = b.preview_labelmaps(
                Patch, segmentationNode, segmentId, sourceVolume, replace=self.replaceCheckBox.checked,
                protect_others=self.protectCheckBox.checked, reference_to_frame=reference)
            self.scriptedEffect.saveStateForUndo()           # the Segment Editor's own Ctrl+Z
            mode = slicer.qSlicerSegmentEditorAbstractEffect
            modes = {"remove": mode.ModificationModeRemove, "add": mode.ModificationModeAdd}
            for labelmap, kind in labelmaps:
                self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, modes[kind], list(labelmap.GetExtent()))
        finally:
            qt.QApplication.restoreOverrideCursor()
        self.onCancel()

    def onCancel(self):
        if self._prompts is not None:
            self._prompts.close(remove_nodes=True)
            self._prompts = None
        if self.session is not None:
            self.session.close()
        self.session = None
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self.previewNode)
        self.previewNode = None
        self.previewSegmentId = None
        self._target = None
        if hasattr(self, "applyButton"):
            self.updateGUIFromMRML()

    # -- status --------------------------------------------------------------------------
    def _onBusyChanged(self, busy, seconds):
        self.progressBar.setVisible(busy and seconds > 0.25)
        self.updateGUIFromMRML()

    def _showError(self, error):
        logging.error(f"FastSAM3D effect: {error}")
        self.statusLabel.text = str(error)
