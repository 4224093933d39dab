import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *


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


class SegmentEditorFastSAM3D(ScriptedLoadableModule):
    """Hidden module that registers the FastSAM3D Segment Editor effect."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegmentEditorFastSAM3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FastSAM3D Slicer extension contributors"]
        self.parent.hidden = True
        self.parent.helpText = _("This hidden module registers the FastSAM3D segment editor effect.")
        self.parent.acknowledgementText = _("FastSAM3D and SAM-Med3D models; see the FastSAM3D module.")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorFastSAM3DTest(ScriptedLoadableModuleTest):
    """Drives the effect through a real qMRMLSegmentEditorWidget (real Slicer only)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_SegmentEditorFastSAM3D_preview_apply_undo()

    def test_SegmentEditorFastSAM3D_preview_apply_undo(self):
        import numpy as np
        import SampleData
        from FastSAM3DLib import slicer_bridge

        self.delayDisplay("Load source volume")
        volume = SampleData.SampleDataLogic().downloadMRHead()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        neighbour = segmentation.GetSegmentation().AddEmptySegment("", "neighbour")
        target = segmentation.GetSegmentation().AddEmptySegment("", "target")

        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.show()

        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]

        # A finished neighbour: a small cube next to where we will click.
        ijk = np.round(slicer_bridge.ras_to_ijk(volume, [centre[0] + 6, centre[1], centre[2]])).astype(int)
        cube = np.ones((6, 6, 6), bool)
        writer = slicer_bridge.SegmentEditorLogicWriter(segmentation, neighbour, volume)

        class Patch:
            start_kji = tuple(int(v) - 3 for v in ijk[::-1])
            array = cube
        writer.apply(Patch())
        writer.close()
        before = slicer_bridge.read_segment(segmentation, neighbour, volume).copy()

        self.delayDisplay("Activate FastSAM3D, click, apply")
        editorNode.SetSelectedSegmentID(target)
        editor.setActiveEffectByName("FastSAM3D")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect)
        self.assertEqual(editor.activeEffect().name, "FastSAM3D")
        effectSelf = effect.self()
        effectSelf.addClickSync(centre, True)
        effectSelf.addClickSync([centre[0] + 3, centre[1], centre[2]], True)
        self.assertIsNotNone(effectSelf.previewNode)
        effectSelf.onApply()
        self.assertIsNone(effectSelf.previewNode)
        after = slicer_bridge.read_segment(segmentation, target, volume)
        self.assertTrue(np.array_equal(slicer_bridge.read_segment(segmentation, neighbour, volume), before))
        self.assertFalse(np.any(after & before))

        self.delayDisplay("Segment Editor undo reverts the applied result")
        editor.undo()
        self.assertEqual(int(slicer_bridge.read_segment(segmentation, target, volume).sum()), 0)
        editor.setActiveEffectByName("")
        self.delayDisplay("Test passed")
