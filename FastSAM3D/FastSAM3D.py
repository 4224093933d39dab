"""FastSAM3D: interactive 3D segmentation from point clicks.

Thin Qt layer: widgets -> FastSAM3DLogic -> FastSAM3DLib.slicer_bridge (MRML)
-> FastSAM3DLib (engine). The model runs on one worker thread; MRML and Qt are
only touched on the main thread.
"""

import logging
import os
from pathlib import Path

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


def _ensureFastSAM3DLibImportable():
    """Installed extension: FastSAM3DLib lies beside this file (on sys.path).
    Source tree in developer mode (module path <repo>/FastSAM3D): one folder up."""
    import importlib.util
    import sys
    if importlib.util.find_spec("FastSAM3DLib") is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(root, "FastSAM3DLib")) and root not in sys.path:
            sys.path.append(root)


_ensureFastSAM3DLibImportable()

# PyTorch through the PyTorch extension (PyTorchUtils / light-the-torch picks the CUDA build).
TORCH_REQUIREMENT = ">=2.5,<3"

DEVICES = ["auto", "cuda", "cpu"]          # order of the device combo box items
SPACINGS = ["", "auto", "fixed", "0.5", "0.75", "1.0", "1.5", "2.0", "3.0"]   # "" = the model's default


class InstallError(RuntimeError):
    pass


#
# FastSAM3D
#


class FastSAM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FastSAM3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["FastSAM3D Slicer extension contributors"]
        self.parent.helpText = _("""
Interactive 3D segmentation with FastSAM3D: place include (+) and exclude (&minus;) points in any
slice view and the current segment is updated in milliseconds. The image embedding is computed once
per region (first click); every later click runs only the small decoder.<br>
A Markups ROI is a box prompt, a curve a scribble and a closed curve a lasso: pick one and press
<b>Use</b> (a box suits a whole organ as a first guess; the bundled model has box prompts).<br>
Shortcuts while this module is shown: <b>i</b> include point, <b>e</b> exclude point,
<b>m</b> use the selected markups as a prompt,
<b>z</b>/<b>Ctrl+Z</b> undo, <b>y</b>/<b>Ctrl+Y</b> redo.<br>
Also available as the "FastSAM3D" effect in the Segment Editor.
See <a href="https://github.com/fastsam3d/SlicerFastSAM3D">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
FastSAM3D (Shen et al., MICCAI 2024) and SAM-Med3D (Wang et al.) models.
The extension is written from scratch under the Apache-2.0 licence.
""")


#
# Parameter node
#


@parameterNodeWrapper
class FastSAM3DParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    overwriteOtherSegments: bool = False


#
# Shared logic (one engine, one worker thread, for the module and the effect)
#

_sharedLogic = None


def getLogic():
    global _sharedLogic
    if _sharedLogic is None:
        _sharedLogic = FastSAM3DLogic()
    return _sharedLogic


def bridge():
    """FastSAM3DLib.slicer_bridge, imported on first use."""
    from FastSAM3DLib import slicer_bridge
    return slicer_bridge


#
# FastSAM3DWidget
#


class FastSAM3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._prompts = None
        self._tasks = None
        self._interactionNode = None
        self.spacingComboBox = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FastSAM3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = getLogic()
        self._tasks = TaskQueue(self._onBusyChanged, self._showError)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)", self.onInputsChanged)
        self.ui.addSegmentButton.connect("clicked()", self.onAddSegment)
        self.ui.includePointButton.connect("toggled(bool)", lambda on: self.onPlaceToggled(True, on))
        self.ui.excludePointButton.connect("toggled(bool)", lambda on: self.onPlaceToggled(False, on))
        self.ui.markupsPromptButton.connect("clicked()", self.onMarkupsPrompt)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.redoButton.connect("clicked()", self.onRedo)
        self.ui.resetButton.connect("clicked()", self.onReset)
        self.ui.acceptButton.connect("clicked()", self.onAccept)
        self.ui.importModelButton.connect("clicked()", self.onImportModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.progressBar.setVisible(False)
        self.ui.exportPathLineEdit.settingKey = "FastSAM3D/ExportPath"

        self._interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(self._interactionNode, vtk.vtkCommand.ModifiedEvent, self.onInteractionModeChanged)

        self.updateModelList()
        self.ui.deviceComboBox.setCurrentIndex(DEVICES.index(self.logic.device))
        self.addSpacingChoice()
        self.initializeParameterNode()
        self.updateGUI()

    def cleanup(self) -> None:
        self.removeShortcuts()
        if self._prompts:
            self._prompts.close()
            self._prompts = None
        if self._tasks:
            self._tasks.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.removeShortcuts()
        self.stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    # -- parameter node -------------------------------------------------------------
    def onSceneStartClose(self, caller, event) -> None:
        self.stopPlacing()
        self.logic.closeAllSessions()
        if self._prompts:
            self._prompts.close()
            self._prompts = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.segmentation:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if first:
                self._parameterNode.segmentation = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    # -- inputs ----------------------------------------------------------------------
    def currentInputs(self):
        """(volume, segmentation, segment ID); any may be None."""
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.segmentationSelector.currentNode()
        segmentId = None
        if segmentation:
            selected = self.ui.segmentsTableView.selectedSegmentIDs()
            if selected:
                segmentId = selected[0]
        return volume, segmentation, segmentId

    def currentSession(self, create=False):
        volume, segmentation, segmentId = self.currentInputs()
        if not (volume and segmentation and segmentId):
            return None
        return self.logic.getSession(volume, segmentation, segmentId, create=create,
                                     overwriteOtherSegments=self.ui.overwriteOtherSegmentsCheckBox.checked)

    def onSegmentationChanged(self, node) -> None:
        self.ui.segmentsTableView.setSegmentationNode(node)
        if node and self.ui.inputVolumeSelector.currentNode():
            if not node.GetDisplayNode():
                node.CreateDefaultDisplayNodes()
            if not node.GetSegmentation().GetNumberOfSegments():
                self.onAddSegment()
        self.onInputsChanged()

    def onInputsChanged(self, *args) -> None:
        self.showPrompts()
        self.updateGUI()

    def onAddSegment(self) -> None:
        segmentation = self.ui.segmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        if not segmentation:
            return
        if volume and not segmentation.GetSegmentation().GetNumberOfSegments():
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment()
        self.ui.segmentsTableView.setSelectedSegmentIDs([segmentId])
        self.updateGUI()

    # -- point placement ---------------------------------------------------------------
    def ensurePrompts(self):
        if self._prompts is None:
            self._prompts = bridge().PromptPoints(slicer.mrmlScene, self.onPointPlaced,
                                                  slicer.modules.markups.logic())
        return self._prompts

    def onPlaceToggled(self, positive, on) -> None:
        other = self.ui.excludePointButton if positive else self.ui.includePointButton
        if on:
            button = self.ui.includePointButton if positive else self.ui.excludePointButton
            volume, segmentation, segmentId = self.currentInputs()
            if not (volume and segmentation and segmentId):
                self.setStatus(_("Select an input volume, a segmentation and a segment first."), error=True)
                self._setChecked(button, False)
                return
            try:
                if not self.logic.setupPythonRequirements():
                    self._setChecked(button, False)
                    return
            except Exception as e:
                self._showError(e)
                self._setChecked(button, False)
                return
            self._setChecked(other, False)
            self.ensurePrompts().start_placing(positive)
        elif not other.checked:
            self.stopPlacing()

    def stopPlacing(self) -> None:
        self._setChecked(self.ui.includePointButton, False)
        self._setChecked(self.ui.excludePointButton, False)
        if self._interactionNode:
            bridge().PromptPoints.stop_placing(self._interactionNode)

    def onInteractionModeChanged(self, caller=None, event=None) -> None:
        if self._interactionNode and self._interactionNode.GetCurrentInteractionMode() != self._interactionNode.Place:
            self._setChecked(self.ui.includePointButton, False)
            self._setChecked(self.ui.excludePointButton, False)

    @staticmethod
    def _setChecked(button, checked) -> None:
        wasBlocked = button.blockSignals(True)
        button.checked = checked
        button.blockSignals(wasBlocked)

    def onPointPlaced(self, ras, positive) -> None:
        """A point was placed in a view: run one click (engine on the worker)."""
        volume, segmentation, segmentId = self.currentInputs()
        if not (volume and segmentation and segmentId):
            self.setStatus(_("Select an input volume, a segmentation and a segment first."), error=True)
            qt.QTimer.singleShot(0, self.showPrompts)
            return
        try:
            if not self.logic.setupPythonRequirements():
                qt.QTimer.singleShot(0, self.showPrompts)
                return
        except Exception as e:
            self._showError(e)
            qt.QTimer.singleShot(0, self.showPrompts)
            return
        self.runOperation("click", ras=list(ras), positive=positive)

    def onMarkupsPrompt(self) -> None:
        """The selected ROI, curve or closed curve as a box, scribble or lasso prompt."""
        volume, segmentation, segmentId = self.currentInputs()
        if not (volume and segmentation and segmentId):
            self.setStatus(_("Select an input volume, a segmentation and a segment first."), error=True)
            return
        try:
            prompt = bridge().shapes.markups_prompt(self.ui.markupsPromptSelector.currentNode(),
                                                    positive=not self.ui.markupsNegativeCheckBox.checked)
            if not self.logic.setupPythonRequirements():
                return
        except Exception as e:
            self._showError(e)
            return
        self.runOperation(prompt.kind, ras=prompt.ras, positive=prompt.positive, **prompt.options)

    # -- operations (worker + main thread) ---------------------------------------------
    def runOperation(self, operation, ras=None, positive=True, **options) -> None:
        inputs = self.currentInputs()
        overwrite = self.ui.overwriteOtherSegmentsCheckBox.checked
        firstLoad = not self.logic.engineReady()
        self.setStatus(_("Loading the model...") if firstLoad else "")

        def withEngine(engine):
            self.ui.deviceLabel.text = self.logic.deviceDescription()
            self._styleDeviceLabel()
            session = self.logic.getSession(*inputs, create=True, overwriteOtherSegments=overwrite)
            if operation != "undo" and operation != "redo" and not session.prompts:
                self.setStatus(_("Computing the image embedding (first click in this region)..."))
            # Computed on the worker, applied here; dropped if the session was closed meanwhile.
            self._tasks.wait(session.submit(self.logic.worker, operation, ras, positive, **options),
                             lambda done: self.onOperationFinished(done.apply()),
                             onError=lambda e: (self._showError(e), self.showPrompts()))

        self._tasks.wait(self.logic.engineFuture(), withEngine,
                         onError=lambda e: (self._showError(e), self.showPrompts()))

    def onOperationFinished(self, info) -> None:
        if info is not None:
            t = info.timings
            self.ui.latencyLabel.text = _("Last {operation}: {total:.0f} ms (model {engine:.0f} ms, segment update {write:.0f} ms){embed}").format(
                operation=info.operation, total=1000 * t.get("total", 0), engine=1000 * t.get("engine", 0),
                write=1000 * t.get("write", 0), embed=_(", new embedding") if info.reembedded else "")
            self.setStatus("")
        if not self._tasks.busy:
            self.showPrompts()
        self.updateGUI()

    def onUndo(self) -> None:
        if self.currentSession() is not None:
            self.runOperation("undo")

    def onRedo(self) -> None:
        if self.currentSession() is not None:
            self.runOperation("redo")

    def onReset(self) -> None:
        if self.currentSession() is not None:
            self.runOperation("reset")

    def onAccept(self) -> None:
        """Keep the segment, forget its clicks, start a new segment."""
        volume, segmentation, segmentId = self.currentInputs()
        if segmentation and segmentId:
            self.logic.closeSession(volume, segmentation, segmentId)
            self.onAddSegment()
        self.showPrompts()
        self.updateGUI()

    def showPrompts(self) -> None:
        session = self.currentSession()
        if self._prompts is None and session is None:
            return
        self.ensurePrompts().show(session.clicks_ras() if session else [])

    # -- model, device, export ---------------------------------------------------------
    def updateModelList(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            entries = self.logic.availableModels()
        except ImportError:               # PyTorch not installed yet: list the bundled model only
            entries = []
            combo.addItem(_("FastSAM3D (bundled)"), "default")
        for entry in entries:
            combo.addItem(entry.name, entry.value)
        index = combo.findData(self.logic.model)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index) -> None:
        value = self.ui.modelComboBox.itemData(index)
        if value and value != self.logic.model:
            self.logic.setModel(value)
            self.showPrompts()
        try:
            entries = {e.value: e for e in self.logic.availableModels()}
        except ImportError:
            entries = {}
        entry = entries.get(self.logic.model)
        self.ui.modelInfoLabel.text = entry.description if entry else ""
        self.updateGUI()

    def addSpacingChoice(self) -> None:
        """Crop spacing: the model's default, auto (zoom), fixed, or mm (editable)."""
        layout = self.ui.deviceComboBox.parentWidget().layout()
        combo = qt.QComboBox()
        combo.editable = True
        combo.toolTip = _("Crop spacing of the model's input. Auto: each object's crop follows its size "
                          "(models trained across spacings). Fixed: the model's training spacing (1.5 mm for "
                          "the official checkpoints). Or a spacing in mm.")
        for value in SPACINGS:
            label = _("Model default") if not value else value if value in ("auto", "fixed") else f"{value} mm"
            combo.addItem(label, value)
        combo.setCurrentIndex(max(combo.findData(self.logic.spacing), 0))
        combo.connect("currentIndexChanged(int)", lambda i: self.onSpacingChanged(combo.itemData(i)))
        combo.lineEdit().connect("editingFinished()", self.onSpacingTyped)
        row = layout.rowCount()
        layout.addWidget(qt.QLabel(_("Crop spacing:")), row, 0)
        layout.addWidget(combo, row, 1)
        self.spacingComboBox = combo

    def onSpacingTyped(self) -> None:
        """A typed spacing: a listed entry's value, else the number typed ("0.6" or "0.6 mm")."""
        combo = self.spacingComboBox
        index = combo.findText(combo.currentText)
        self.onSpacingChanged(combo.itemData(index) if index >= 0 else combo.currentText.replace("mm", "").strip())

    def onSpacingChanged(self, value) -> None:
        try:
            self.logic.setSpacing(value)
        except ValueError as exc:
            self._showError(str(exc))

    def onDeviceChanged(self, index) -> None:
        self.logic.setDevice(DEVICES[index])
        self.ui.deviceLabel.text = _("Model not loaded yet.")
        self.showPrompts()
        self.updateGUI()

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import FastSAM3D / SAM-Med3D weights"), "",
            _("Model weights (*.pth *.pt *.ckpt *.safetensors)"))
        if not path:
            return
        try:
            if not self.logic.setupPythonRequirements():
                return
        except Exception as e:
            self._showError(e)
            return
        self.setStatus(_("Checking {name}...").format(name=os.path.basename(path)))

        def imported(entry):
            self.logic.setModel(entry.value)
            self.updateModelList()
            self.setStatus(_("Imported {name}: {description}").format(name=entry.name, description=entry.description))

        self._tasks.wait(self.logic.worker.submit(self.logic.importModel, path), imported)

    def onExport(self) -> None:
        volume, segmentation, _segmentId = self.currentInputs()
        path = self.ui.exportPathLineEdit.currentPath
        if not path and volume:
            path = str(Path(self.logic.defaultExportDirectory(volume)) / f"{volume.GetName()}_fastsam3d.nii.gz")
            self.ui.exportPathLineEdit.currentPath = path
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            info = self.logic.exportLabelmap(segmentation, volume, path)
            self.ui.exportPathLineEdit.addCurrentPathToHistory()
            self.setStatus(_("Wrote {path} ({count} segments).").format(path=info.path, count=len(info.labels)))

    # -- status --------------------------------------------------------------------------
    def updateGUI(self, caller=None, event=None) -> None:
        if not hasattr(self, "ui"):
            return
        volume, segmentation, segmentId = self.currentInputs()
        ready = bool(volume and segmentation and segmentId)
        session = self.currentSession() if ready else None
        busy = self._tasks.busy if self._tasks else False
        self.ui.includePointButton.enabled = ready
        self.ui.excludePointButton.enabled = ready
        self.ui.addSegmentButton.enabled = segmentation is not None
        self.ui.undoButton.enabled = bool(session and session.can_undo) and not busy
        self.ui.redoButton.enabled = bool(session and session.can_redo) and not busy
        self.ui.resetButton.enabled = bool(session and session.prompts) and not busy
        self.ui.acceptButton.enabled = session is not None and not busy
        self.ui.exportButton.enabled = bool(volume and segmentation)
        n = len(session.clicks) if session else 0
        self.ui.clicksLabel.text = (_("{n} click(s) on this segment.").format(n=n) if session
                                    else _("No clicks yet.") if ready
                                    else _("Select an input volume, a segmentation and a segment."))

    def setStatus(self, text, error=False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")

    def _styleDeviceLabel(self) -> None:
        cpu = self.logic.runsOnCpu()
        self.ui.deviceLabel.setStyleSheet("color: #c0392b; font-weight: bold" if cpu else "")
        if cpu:
            self.ui.deviceLabel.toolTip = _(
                "No CUDA GPU is used: a new region takes about a second, later clicks are fast. "
                "For GPU speed install a CUDA build of PyTorch (PyTorch Utils module).")

    def _onBusyChanged(self, busy, seconds) -> None:
        self.ui.progressBar.setVisible(busy and seconds > 0.25)
        self.updateGUI()

    def _showError(self, error) -> None:
        logging.error(f"FastSAM3D: {error}")
        self.setStatus(str(error), error=True)

    # -- shortcuts (only while the module is shown) -------------------------------------
    def installShortcuts(self) -> None:
        self.removeShortcuts()
        keys = [("i", lambda: self._toggleFromKey(self.ui.includePointButton)),
                ("e", lambda: self._toggleFromKey(self.ui.excludePointButton)),
                ("m", self.onMarkupsPrompt),
                ("z", self.onUndo), ("Ctrl+Z", self.onUndo),
                ("y", self.onRedo), ("Ctrl+Y", self.onRedo)]
        for key, callback in keys:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

    def removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

    def _toggleFromKey(self, button) -> None:
        if button.enabled:
            button.checked = not button.checked


#
# TaskQueue: wait for worker futures on the main thread
#


class TaskQueue:
    """Polls ``concurrent.futures.Future`` objects with a QTimer and calls their
    callbacks on the main thread, in submission order."""

    def __init__(self, onBusyChanged=None, onError=None, intervalMs=20):
        import time
        self._time = time.perf_counter
        self._waiting = []
        self._since = None
        self._onBusyChanged = onBusyChanged
        self._onError = onError
        self._timer = qt.QTimer()
        self._timer.setInterval(intervalMs)
        self._timer.connect("timeout()", self._poll)

    @property
    def busy(self) -> bool:
        return bool(self._waiting)

    def wait(self, future, onDone, onError=None) -> None:
        self._waiting.append((future, onDone, onError or self._onError))
        if self._since is None:
            self._since = self._time()
        if not self._timer.isActive():
            self._timer.start()

    def _poll(self) -> None:
        while self._waiting and self._waiting[0][0].done():
            future, onDone, onError = self._waiting.pop(0)
            try:
                result = future.result()
            except Exception as e:
                if onError:
                    onError(e)
                continue
            try:
                onDone(result)
            except Exception as e:
                logging.exception("FastSAM3D")
                if onError:
                    onError(e)
        if not self._waiting:
            self._timer.stop()
            self._since = None
        if self._onBusyChanged:
            self._onBusyChanged(self.busy, 0.0 if self._since is None else self._time() - self._since)

    def stop(self) -> None:
        self._timer.stop()
        self._timer.disconnect("timeout()", self._poll)
        self._waiting = []


#
# FastSAM3DLogic
#


class FastSAM3DLogic(ScriptedLoadableModuleLogic):
    """Everything the GUI does, usable from scripts without it:

        logic = FastSAM3D.getLogic()
        info = logic.addClick(volumeNode, segmentationNode, segmentId, [r, a, s], positive=True)
        logic.exportLabelmap(segmentationNode, volumeNode, "/path/labels.nii.gz")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        settings = qt.QSettings()
        self.model = settings.value("FastSAM3D/Model", "default") or "default"
        self.device = settings.value("FastSAM3D/Device", "auto") or "auto"
        if self.device not in DEVICES:
            self.device = "auto"
        self.spacing = settings.value("FastSAM3D/Spacing", "") or ""     # "": the model's default
        self._worker = None
        self._engineFuture = None
        self._engineKey = None
        self._sessions = {}
        self._requirementsChecked = False

    def getParameterNode(self):
        return FastSAM3DParameterNode(super().getParameterNode())

    # -- dependencies (main thread only: may show a dialog) ---------------------------------
    def setupPythonRequirements(self, askConfirmation=True) -> bool:
        """Install PyTorch (PyTorch extension) and requirements.txt after one
        confirmation. Returns False if the user declined."""
        if self._requirementsChecked:
            return True
        import importlib.util
        toInstall = []
        torchLogic = None
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise InstallError(_("FastSAM3D needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and try again."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                toInstall.append("torch" + TORCH_REQUIREMENT)
        requirements = self._requirements()
        missing = [r for r in requirements if not self._satisfied(r)]
        toInstall += missing
        if toInstall:
            if askConfirmation and not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
                    _("FastSAM3D needs additional Python packages. Installing them needs a network connection "
                      "and may take several minutes."),
                    _("Install Python packages"),
                    detailedText=_("Packages to install: {packages}").format(packages=", ".join(toInstall))):
                return False
            if torchLogic is not None and any(t.startswith("torch") for t in toInstall):
                if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    raise InstallError(_("PyTorch could not be installed; use the PyTorch Utils module."))
            if missing:
                if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):   # Slicer >= 5.12
                    slicer.packaging.pip_ensure(missing, prompt_install=False, requester="FastSAM3D")
                else:
                    for requirement in missing:
                        slicer.util.pip_install(requirement)
        self._requirementsChecked = True
        return True

    def _requirements(self):
        path = Path(__file__).resolve().parent / "Resources" / "requirements.txt"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]

    @staticmethod
    def _satisfied(requirement) -> bool:
        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_check"):
            return slicer.packaging.pip_check(requirement)
        import importlib.metadata
        from packaging.requirements import Requirement
        req = Requirement(requirement)
        try:
            return importlib.metadata.version(req.name) in req.specifier
        except importlib.metadata.PackageNotFoundError:
            return False

    # -- engine --------------------------------------------------------------------------
    @property
    def worker(self):
        if self._worker is None:
            self._worker = bridge().EngineWorker()
        return self._worker

    def setModel(self, value) -> None:
        if value != self.model:
            self.model = value
            qt.QSettings().setValue("FastSAM3D/Model", value)
            self._dropEngine()

    def setDevice(self, device) -> None:
        if device != self.device:
            self.device = device
            qt.QSettings().setValue("FastSAM3D/Device", device)
            self._dropEngine()

    def setSpacing(self, value) -> None:
        """Crop spacing of every session: "" (the model's default), "auto", "fixed" or mm."""
        value = str(value or "").strip()
        if value:
            from FastSAM3DLib.session import parse_spacing
            parse_spacing(value)             # a clear error for a bad value, before anything changes
        self.spacing = value
        qt.QSettings().setValue("FastSAM3D/Spacing", value)
        for session in self._sessions.values():
            session.set_spacing(value or None)

    def _dropEngine(self) -> None:
        self.closeAllSessions()
        self._engineFuture = None
        self._engineKey = None

    def engineFuture(self):
        """Future of the engine for the current model and device (loaded once, on the worker)."""
        key = (self.model, self.device)
        if self._engineFuture is None or self._engineKey != key or (
                self._engineFuture.done() and self._engineFuture.exception() is not None):
            self._engineKey = key
            self._engineFuture = self.worker.submit(bridge().get_engine, self.model, self.device)
        return self._engineFuture

    def engine(self):
        """The engine, loading it if needed (blocks)."""
        return self.engineFuture().result()

    def engineReady(self) -> bool:
        f = self._engineFuture
        return f is not None and self._engineKey == (self.model, self.device) and f.done() and f.exception() is None

    def deviceDescription(self) -> str:
        return self.engine().device_description if self.engineReady() else _("Model not loaded yet.")

    def runsOnCpu(self) -> bool:
        return self.engineReady() and str(getattr(self.engine(), "device", "cpu")).startswith("cpu")

    # -- models --------------------------------------------------------------------------
    def modelsDirectory(self) -> Path:
        return bridge().models.models_directory(Path(slicer.app.slicerUserSettingsFilePath).parent)

    def availableModels(self):
        return bridge().models.available_models(self.modelsDirectory())

    def importModel(self, path):
        """Check and cache a weights file (slow: run it on the worker)."""
        return bridge().models.import_weights(path, self.modelsDirectory())

    # -- sessions (main thread) ----------------------------------------------------------
    @staticmethod
    def _key(volume, segmentation, segmentId):
        return (volume.GetID(), segmentation.GetID(), segmentId)

    def getSession(self, volume, segmentation, segmentId, create=True, overwriteOtherSegments=False):
        key = self._key(volume, segmentation, segmentId)
        session = self._sessions.get(key)
        if session is not None and session.overwrite_other_segments != bool(overwriteOtherSegments) and not session.prompts:
            self.closeSession(volume, segmentation, segmentId)
            session = None
        if session is None and create:
            session = bridge().SegmentSession(volume, segmentation, segmentId, engine=self.engine(),
                                              overwrite_other_segments=overwriteOtherSegments,
                                              spacing=self.spacing or None)
            self._sessions[key] = session
        return session

    def closeSession(self, volume, segmentation, segmentId) -> None:
        if volume is None or segmentation is None:
            return
        session = self._sessions.pop(self._key(volume, segmentation, segmentId), None)
        if session is not None:
            session.close()

    def closeAllSessions(self) -> None:
        for session in self._sessions.values():
            try:
                session.close()
            except Exception:
                logging.exception("FastSAM3D: closing a session")
        self._sessions = {}

    # -- synchronous API (scripts, self-test) --------------------------------------------
    def run(self, operation, volume, segmentation, segmentId, ras=None, positive=True, **options):
        """One prompt/undo/redo/reset: engine on the worker, write here. Blocks."""
        session = self.getSession(volume, segmentation, segmentId)
        return session.submit(self.worker, operation, ras, positive, **options).result().apply()

    def addMarkupsPrompt(self, volume, segmentation, segmentId, markupsNode, positive=True):
        """An ROI (box), curve (scribble) or closed curve (lasso) as one prompt. Blocks."""
        kind, ras, positive, options = bridge().shapes.markups_prompt(markupsNode, positive)
        return self.run(kind, volume, segmentation, segmentId, ras, positive, **options)

    def addClick(self, volume, segmentation, segmentId, ras, positive=True):
        return self.run("click", volume, segmentation, segmentId, ras, positive)

    def undo(self, volume, segmentation, segmentId):
        return self.run("undo", volume, segmentation, segmentId)

    def redo(self, volume, segmentation, segmentId):
        return self.run("redo", volume, segmentation, segmentId)

    def exportLabelmap(self, segmentation, volume, path):
        if not (segmentation and volume and path):
            raise ValueError(_("Select an input volume, a segmentation and an output file."))
        return bridge().export_labelmap(segmentation, volume, path)

    @staticmethod
    def defaultExportDirectory(volume) -> str:
        storage = volume.GetStorageNode() if volume else None
        if storage and storage.GetFileName():
            return str(Path(storage.GetFileName()).parent)
        return slicer.app.defaultScenePath


#
# FastSAM3DTest
#


class FastSAM3DTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (Reload & Test, Self Tests module, or ctest py_FastSAM3D).
    Uses the bundled model; a randomly initialised one if the weights are absent,
    so the checks are about plumbing and geometry, not accuracy."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FastSAM3D_clicks_undo_export()
        self.setUp()
        self.test_FastSAM3D_markups_prompts()
        self.setUp()
        self.test_FastSAM3D_widget_and_shortcuts()

    def _volume(self):
        import SampleData
        return SampleData.SampleDataLogic().downloadMRHead()

    def test_FastSAM3D_clicks_undo_export(self):
        import tempfile
        import numpy as np
        self.delayDisplay("Loading sample data")
        logic = getLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        volume = self._volume()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        first = segmentation.GetSegmentation().AddEmptySegment("", "first")
        second = segmentation.GetSegmentation().AddEmptySegment("", "second")

        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]

        self.delayDisplay("First click (embedding)")
        info = logic.addClick(volume, segmentation, first, centre)
        self.assertEqual(info.clicks, 1)
        self.assertTrue(info.reembedded)
        self.delayDisplay(f"First click: {info.latency_ms:.0f} ms")
        b = bridge()
        counts = [int(b.read_segment(segmentation, first, volume).sum())]
        info = logic.addClick(volume, segmentation, first, [centre[0] + 5, centre[1], centre[2]], positive=False)
        self.assertFalse(info.reembedded)
        counts.append(int(b.read_segment(segmentation, first, volume).sum()))

        self.delayDisplay("Undo / redo")
        logic.undo(volume, segmentation, first)
        self.assertEqual(int(b.read_segment(segmentation, first, volume).sum()), counts[0])
        logic.redo(volume, segmentation, first)
        self.assertEqual(int(b.read_segment(segmentation, first, volume).sum()), counts[1])

        self.delayDisplay("A second segment next to the first leaves it unchanged")
        before = b.read_segment(segmentation, first, volume).copy()
        logic.addClick(volume, segmentation, second, [centre[0] + 8, centre[1], centre[2]])
        self.assertTrue(np.array_equal(b.read_segment(segmentation, first, volume), before))
        self.assertFalse(np.any(b.read_segment(segmentation, second, volume) & before))

        self.delayDisplay("Export")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "labels.nrrd")
            export = logic.exportLabelmap(segmentation, volume, path)
            self.assertTrue(os.path.isfile(path))
            self.assertEqual(len(export.labels), 2)
            loaded = slicer.util.loadLabelVolume(path)
            self.assertEqual(loaded.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        logic.closeAllSessions()
        self.delayDisplay("Test passed")

    def test_FastSAM3D_markups_prompts(self):
        """A Markups ROI (box), curve (scribble) and closed curve (negative lasso)
        as prompts through the logic, one undo step each."""
        logic = getLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        volume = self._volume()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "prompts")
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        c = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*c)
        roi.SetSize(30.0, 30.0, 30.0)
        curve = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "scribble")
        for d in (-8, 0, 8):
            curve.AddControlPointWorld(c[0] + d, c[1], c[2])
        lasso = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", "lasso")
        for dr, da in ((-5, -5), (5, -5), (5, 5), (-5, 5)):
            lasso.AddControlPointWorld(c[0] + dr, c[1] + da, c[2])
        b = bridge()
        counts = [0]
        for node, positive, kind in ((roi, True, "box"), (curve, True, "scribble"), (lasso, False, "lasso")):
            self.delayDisplay(f"{node.GetName()} as a {kind} prompt")
            try:
                info = logic.addMarkupsPrompt(volume, segmentation, segmentId, node, positive)
            except RuntimeError as e:            # a model without box prompts: one clear line
                self.assertEqual(kind, "box")
                self.assertNotIn("\n", str(e))
                self.delayDisplay(f"Box refused: {e}")
                continue
            self.assertEqual(info.operation, kind)
            counts.append(int(b.read_segment(segmentation, segmentId, volume).sum()))
        for expected in counts[-2::-1]:
            logic.undo(volume, segmentation, segmentId)
            self.assertEqual(int(b.read_segment(segmentation, segmentId, volume).sum()), expected)
        logic.closeAllSessions()
        self.delayDisplay("Test passed")

    def test_FastSAM3D_widget_and_shortcuts(self):
        """The module GUI loads, and its shortcuts exist only while it is shown."""
        self.delayDisplay("Module GUI")
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            self.delayDisplay("No main window: GUI part skipped")
            return
        slicer.util.selectModule("FastSAM3D")
        widget = slicer.modules.fastsam3d.widgetRepresentation().self()
        self.assertTrue(len(widget._shortcuts) > 0)
        self.assertIn("vtkMRMLMarkupsROINode", widget.ui.markupsPromptSelector.nodeTypes)
        slicer.util.selectModule("Data")
        self.assertEqual(len(widget._shortcuts), 0)
        self.delayDisplay("Test passed")
