"""FastSAM3D.py's logic class on real MRML, with a minimal stand-in for the Qt
parts of Slicer (qt.QSettings, ScriptedLoadableModule base classes, i18n,
parameterNodeWrapper, slicer.app). Only the logic is exercised: the widget and
the effect need real Slicer (see FastSAM3DTest / SegmentEditorFastSAM3DTest).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_env import (CT_ABDOMEN, SPINE_T2, load_volume, make_mrml_env,  # noqa: E402
                      new_segmentation)

ROOT = Path(__file__).resolve().parents[2]


def _shim_modules(settings_dir):
    """sys.modules entries that stand in for Slicer's Qt-dependent Python."""
    qt = types.ModuleType("qt")

    class QSettings:
        store = {}

        def value(self, key, default=None):
            return self.store.get(key, default)

        def setValue(self, key, value):
            self.store[key] = value
    qt.QSettings = QSettings

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
                node.SetSingletonTag(self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    slm.__all__ = [c.__name__ for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                        ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls

    app = types.SimpleNamespace(slicerUserSettingsFilePath=str(Path(settings_dir) / "Slicer.ini"),
                                defaultScenePath=str(settings_dir), testingEnabled=lambda: True)
    return {"qt": qt, "slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n,
            "slicer.parameterNodeWrapper": pnw}, app


@pytest.fixture
def module(tmp_path, monkeypatch):
    try:
        import FastSAM3DLib.session  # noqa: F401
    except ImportError as e:
        pytest.skip(f"FastSAM3DLib.session not importable yet: {e}")
    modules, app = _shim_modules(tmp_path)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", modules["slicer.ScriptedLoadableModule"], raising=False)
    monkeypatch.setattr(slicer, "i18n", modules["slicer.i18n"], raising=False)
    monkeypatch.setattr(slicer, "parameterNodeWrapper", modules["slicer.parameterNodeWrapper"], raising=False)
    spec = importlib.util.spec_from_file_location("FastSAM3D", ROOT / "FastSAM3D" / "FastSAM3D.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "FastSAM3D", mod)
    spec.loader.exec_module(mod)
    yield mod
    if mod._sharedLogic is not None:
        mod._sharedLogic.closeAllSessions()
        if mod._sharedLogic._worker is not None:
            mod._sharedLogic._worker.shutdown(wait=True)


@pytest.fixture
def tiny_weights(tmp_path):
    from FastSAM3DLib.checkpoint import save_model
    from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
    import torch
    torch.manual_seed(0)
    config = ModelConfig(name="tiny-logic", encoder=EncoderConfig(
        img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=0, global_attn_indexes=(),
        attention_free_blocks=1, block_formula="fastsam3d"))
    model = Sam3D(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    return path


def centre(volume, ijk):
    from FastSAM3DLib.slicer_bridge import world_ijk_to_ras
    return (world_ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]


def test_logic_clicks_undo_neighbours_export(module, tiny_weights, tmp_path):
    import SimpleITK as sitk
    from FastSAM3DLib.slicer_bridge import read_segment
    scene, logics = make_mrml_env()
    vol = load_volume(logics, SPINE_T2, "t2")
    seg, (a, b) = new_segmentation(scene, vol, ("a", "b"))
    logic = module.getLogic()
    assert logic is module.getLogic()
    # import the weights as a user would; the model choice is remembered
    entry = logic.importModel(tiny_weights)
    assert Path(entry.value).parent == tmp_path / "FastSAM3D" / "models"
    assert entry.value in [e.value for e in logic.availableModels()]
    logic.setModel(entry.value)
    logic.setDevice("cpu")
    assert module.qt.QSettings().value("FastSAM3D/Model") == entry.value
    assert not logic.engineReady()

    info = logic.addClick(vol, seg, a, centre(vol, (30, 27, 26)))
    assert logic.engineReady() and info.reembedded and info.clicks == 1
    assert "CPU" in logic.deviceDescription() and logic.runsOnCpu()
    n1 = int(read_segment(seg, a, vol).sum())
    logic.addClick(vol, seg, a, centre(vol, (33, 27, 26)), positive=False)
    n2 = int(read_segment(seg, a, vol).sum())
    assert logic.undo(vol, seg, a).operation == "undo"
    assert read_segment(seg, a, vol).sum() == n1
    logic.redo(vol, seg, a)
    assert read_segment(seg, a, vol).sum() == n2

    finished = read_segment(seg, a, vol).copy()
    logic.addClick(vol, seg, b, centre(vol, (35, 27, 26)))
    np.testing.assert_array_equal(read_segment(seg, a, vol), finished)
    assert not np.any(read_segment(seg, b, vol) & finished)

    # the crop spacing reaches every open session and is remembered; a bad value changes nothing
    logic.setSpacing("0.75")
    assert logic.getSession(vol, seg, a, create=False).engine_session.policy.setting == 0.75
    assert module.qt.QSettings().value("FastSAM3D/Spacing") == "0.75"
    with pytest.raises(ValueError, match="spacing"):
        logic.setSpacing("zoom")
    assert logic.spacing == "0.75"
    logic.setSpacing("")

    out = tmp_path / "labels.nrrd"
    export = logic.exportLabelmap(seg, vol, str(out))
    assert export.labels == {1: "a", 2: "b"} and sitk.ReadImage(str(out)).GetSize() == (60, 55, 52)

    # a new model or device drops the engine and the sessions (their clicks belong to the old model)
    logic.setDevice("auto")
    assert not logic.engineReady() and logic.getSession(vol, seg, a, create=False) is None
    logic.closeAllSessions()
    assert scene.GetFirstNodeByName("FastSAM3D writer") is None


def test_requirements_file_and_already_installed(module):
    logic = module.getLogic()
    reqs = logic._requirements()
    assert reqs and all(not r.startswith("torch") for r in reqs)
    # torch and safetensors are installed here: nothing to install, no dialog, no pip
    assert logic.setupPythonRequirements(askConfirmation=True) is True
    assert logic._requirementsChecked


def test_default_export_directory(module):
    scene, logics = make_mrml_env()
    vol = load_volume(logics, CT_ABDOMEN, "ct")
    assert module.FastSAM3DLogic.defaultExportDirectory(vol) == str(CT_ABDOMEN.parent)


# -- behaviour that replaced checks of strings in the source ----------------------------
def test_module_imports_without_torch_and_installs_only_from_setup(tmp_path, monkeypatch):
    """FastSAM3D.py imports with torch unavailable (it is installed on first use);
    missing requirements are installed by setupPythonRequirements, on the calling
    (main) thread, once; a click afterwards installs nothing."""
    import threading
    modules, app = _shim_modules(tmp_path)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    torch = sys.modules.get("torch")
    monkeypatch.setitem(sys.modules, "torch", None)             # import torch -> ImportError
    spec = importlib.util.spec_from_file_location("FastSAM3D_without_torch", ROOT / "FastSAM3D" / "FastSAM3D.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "torch", torch)
    installs = []
    monkeypatch.setattr(slicer, "packaging", types.SimpleNamespace(
        pip_check=lambda requirement: requirement.startswith("safetensors"),
        pip_ensure=lambda reqs, **kw: installs.append((list(reqs), threading.current_thread()))), raising=False)
    logic = mod.FastSAM3DLogic()
    monkeypatch.setattr(logic, "_requirements", lambda: ["safetensors>=0.4", "not-installed-yet>=1"])
    assert logic.setupPythonRequirements(askConfirmation=False)
    assert installs == [(["not-installed-yet>=1"], threading.current_thread())]
    assert logic.setupPythonRequirements() and len(installs) == 1


def _effect_class(tmp_path, monkeypatch):
    modules, app = _shim_modules(tmp_path)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    effects = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    effects.__all__ = ["AbstractScriptedSegmentEditorEffect"]
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", effects)
    qt = modules["qt"]
    qt.QApplication = types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None)
    qt.Qt = types.SimpleNamespace(WaitCursor=0)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(
        ModificationModeAdd=slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd,
        ModificationModeRemove=slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove), raising=False)
    spec = importlib.util.spec_from_file_location(
        "SegmentEditorEffect", ROOT / "FastSAM3D" / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SegmentEditorEffect


@pytest.mark.parametrize("replace", [False, True])
def test_effect_apply_keeps_the_segment_unless_replace(tmp_path, monkeypatch, replace):
    """The effect's Apply (one Segment Editor undo state, then the modifier
    labelmaps) adds the preview to a segment with painted content; with
    "Replace" the preview replaces the segment inside its region."""
    from FastSAM3DLib.slicer_bridge import SegmentEditorLogicWriter, SegmentSession, read_segment
    from FastSAM3DLib.slicer_bridge.geometry import oriented_image, world_ijk_to_ras
    from mrml_env import FakeEngine, MaskPatch, engine_image
    Effect = _effect_class(tmp_path, monkeypatch)
    scene, logics = make_mrml_env()
    vol = load_volume(logics, SPINE_T2, "t2")
    seg, (target,) = new_segmentation(scene, vol, ("target",))
    painter = SegmentEditorLogicWriter(seg, target, vol)
    painter.apply(MaskPatch((24, 16, 5), np.ones((3, 22, 50), bool)))        # a painted slab
    painter.close()
    slab = read_segment(seg, target, vol).copy()

    calls = []
    editor_logic = slicer.vtkSlicerSegmentEditorLogic()
    editor_logic.SetMRMLScene(scene)
    editor_logic.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor_logic.SetSegmentationNode(seg)
    editor_logic.SetSourceVolumeNode(vol)

    class ScriptedEffect:
        def parameterSetNode(self):
            return types.SimpleNamespace(GetSelectedSegmentID=lambda: target, SetSelectedSegmentID=lambda s: None)

        def defaultModifierLabelmap(self):
            return oriented_image(np.zeros((1, 1, 1)), (0, 0, 0), world_ijk_to_ras(vol))

        def saveStateForUndo(self):
            calls.append("undo state")

        def modifySelectedSegmentByLabelmap(self, labelmap, mode, extent):
            calls.append(mode)
            editor_logic.ModifySegmentByLabelmap(seg, target, labelmap, mode, extent, False, True)

    effect = Effect(ScriptedEffect())
    preview = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "preview")
    preview.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    preview_id = preview.GetSegmentation().AddEmptySegment("", "preview")
    engine = FakeEngine(5.0)
    session = SegmentSession(vol, preview, preview_id, engine=engine, image=engine_image(vol))
    session.add_click((world_ijk_to_ras(vol) @ [30, 27, 26, 1])[:3])
    predicted = session.engine_session.mask().copy()
    effect.session, effect.previewNode, effect.previewSegmentId = session, preview, preview_id
    effect._target = (seg, target, vol)
    effect.protectCheckBox = types.SimpleNamespace(checked=True)
    effect.replaceCheckBox = types.SimpleNamespace(checked=replace)
    effect.onApply()
    E = slicer.vtkSlicerSegmentEditorLogic
    after = read_segment(seg, target, vol)
    if replace:
        assert calls == ["undo state", E.ModificationModeRemove, E.ModificationModeAdd]
        np.testing.assert_array_equal(after & predicted, predicted)
        assert (slab & ~after).any()                       # the region was cleared first
    else:
        assert calls == ["undo state", E.ModificationModeAdd]
        np.testing.assert_array_equal(after, slab | predicted)
    assert effect.previewNode is None and preview.GetScene() is None


def test_effect_module_registers_the_effect_file(tmp_path, monkeypatch):
    modules, app = _shim_modules(tmp_path)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    connected = []
    app.connect = lambda signal, slot: connected.append((signal, slot))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    registered = []

    class ScriptedEffect:
        def __init__(self, parent):
            pass

        def setPythonSource(self, path):
            registered.append(Path(path))

        def self(self):
            return types.SimpleNamespace(register=lambda: registered.append("registered"))
    monkeypatch.setitem(sys.modules, "qSlicerSegmentationsEditorEffectsPythonQt",
                        types.SimpleNamespace(qSlicerSegmentEditorScriptedEffect=ScriptedEffect))
    spec = importlib.util.spec_from_file_location("SegmentEditorFastSAM3D", ROOT / "FastSAM3D" / "SegmentEditorFastSAM3D.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parent = types.SimpleNamespace()
    module = mod.SegmentEditorFastSAM3D(parent)
    assert parent.hidden is True
    assert connected and connected[0][0] == "startupCompleted()"
    connected[0][1]()
    assert registered[0] == ROOT / "FastSAM3D" / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py"
    assert registered[0].is_file() and registered[1] == "registered"
    assert issubclass(mod.SegmentEditorFastSAM3DTest, unittest.TestCase) and module is not None


def test_logic_markups_prompts_with_the_bundled_model(module):
    """The module's Markups prompts: an ROI is a box, a curve a scribble, a closed
    curve a (negative) lasso; each one undo step; other nodes are a clear error."""
    from FastSAM3DLib.session import EngineError
    from FastSAM3DLib.slicer_bridge import read_segment
    scene, logics = make_mrml_env()
    vol = load_volume(logics, SPINE_T2, "t2")
    seg, (sid,) = new_segmentation(scene, vol)
    logic = module.getLogic()
    logic.setModel("default")
    logic.setDevice("cpu")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*centre(vol, (30, 27, 26)))
    roi.SetSize(14.0, 10.0, 12.0)
    curve = scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "scribble")
    lasso = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", "lasso")
    for ijk in [(28, 25, 24), (30, 27, 26), (33, 29, 27)]:
        curve.AddControlPointWorld(*centre(vol, ijk))
    c = centre(vol, (30, 27, 26))
    for dr, da in [(-4, -4), (4, -4), (5, 3), (-4, 4)]:
        lasso.AddControlPointWorld(c[0] + dr, c[1] + da, c[2])
    counts = [0]
    for node, positive, kind in [(roi, True, "box"), (curve, True, "scribble"), (lasso, False, "lasso")]:
        info = logic.addMarkupsPrompt(vol, seg, sid, node, positive)
        assert info.operation == kind
        counts.append(int(read_segment(seg, sid, vol).sum()))
    assert counts[1] > 0 and len(set(counts)) == 4
    session = logic.getSession(vol, seg, sid, create=False)
    assert session.prompts[0].source == "box"
    for expected in counts[-2::-1]:
        logic.undo(vol, seg, sid)
        assert read_segment(seg, sid, vol).sum() == expected
    with pytest.raises(ValueError, match="Markups ROI"):
        logic.addMarkupsPrompt(vol, seg, sid, scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))
    logic.closeAllSessions()
