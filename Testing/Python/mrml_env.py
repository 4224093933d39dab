"""Fixture helpers for the MRML-tier tests (slicer-core on plain Python, no Qt).

``make_mrml_env`` builds a scene with the module logics real Slicer would have
(recipe verified in shared/research/slicer-core.md, section 1.2). The
``slicer.mrmlScene`` / ``slicer.modules`` globals are set here, in the test
fixture only: the bridge under test takes the scene and its nodes as arguments.

The geometry variants (``flipped``, ``permuted``, ``oblique``, ``transformed``)
give copies of a volume whose voxel order or placement differ; all but
``oblique`` show the very same image in world space.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SPINE_T2 = DATA / "mri_spine_cord_sct_t2" / "t2.nii.gz"
CT_ABDOMEN = DATA / "ct_abdomen_pelvis_totalseg_example" / "example_ct.nii.gz"


def make_mrml_env():
    """A fresh scene with application, colour, volumes, markups, segmentations
    and subject-hierarchy logics. Returns (scene, logics-by-name)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics = {"Application": app}
    for name, cls in [("Colors", slicer.vtkMRMLColorLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)]:
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{
        k.lower(): types.SimpleNamespace(logic=lambda lg=v: lg) for k, v in logics.items()})
    return scene, logics


def load_volume(logics, path, name=None):
    node = logics["Volumes"].AddArchetypeVolume(str(path), name or Path(path).name.split(".")[0], 0)
    if node is None:
        raise RuntimeError(f"could not load {path}")
    return node


def ijk_to_ras_of(node) -> np.ndarray:
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _set_ijk_to_ras(node, matrix):
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(m)


def add_volume_from_array(scene, array_kji, ijk_to_ras, name):
    """A scalar volume node holding a copy of ``array_kji`` with this geometry."""
    import slicer
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    _set_ijk_to_ras(node, ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def flipped_copy(scene, source, name="flipped"):
    """Same world image, i axis reversed: a left-handed IJK-to-RAS."""
    import slicer
    a = slicer.util.arrayFromVolume(source)
    m = ijk_to_ras_of(source)
    ni = a.shape[2]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, ni - 1          # new i -> old i = ni-1-i
    return add_volume_from_array(scene, a[:, :, ::-1], m @ flip, name)


def permuted_copy(scene, source, name="permuted"):
    """Same world image stored with axes rotated: new (i, j, k) = old (j, k, i)."""
    import slicer
    a = slicer.util.arrayFromVolume(source)       # (k, j, i)
    m = ijk_to_ras_of(source)
    # new array (k', j', i') = (old i, old k, old j)
    new = np.transpose(a, (2, 0, 1))
    # new index (i', j', k') = (old j, old k, old i) -> old (i, j, k) = (k', i', j')
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 0] = perm[2, 1] = perm[3, 3] = 1
    return add_volume_from_array(scene, new, m @ perm, name)


def rotation(axis, degrees):
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(4)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_copy(scene, source, degrees=20.0, name="oblique"):
    """Same voxels, grid rotated about the volume centre: an oblique volume."""
    import slicer
    a = slicer.util.arrayFromVolume(source)
    m = ijk_to_ras_of(source)
    centre = m @ np.array([*(np.array(a.shape[::-1]) - 1) / 2, 1.0])
    to_c, back = np.eye(4), np.eye(4)
    to_c[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    rot = back @ rotation(0, degrees) @ rotation(2, degrees / 2) @ to_c
    return add_volume_from_array(scene, a, rot @ m, name)


def transformed_copy(scene, source, matrix, name="transformed"):
    """Same voxels and local geometry, under a parent linear transform ``matrix``.
    Returns (volume node, transform node)."""
    import slicer
    import vtk
    a = slicer.util.arrayFromVolume(source)
    node = add_volume_from_array(scene, a, ijk_to_ras_of(source), name)
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name + " transform")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    return node, tnode


def make_variant(scene, vol, kind):
    """The volume itself or a copy with other geometry: "flipped", "permuted",
    "oblique", or (any other kind) under a rotating + translating parent transform."""
    if kind == "original":
        return vol
    if kind == "flipped":
        return flipped_copy(scene, vol)
    if kind == "permuted":
        return permuted_copy(scene, vol)
    if kind == "oblique":
        return oblique_copy(scene, vol, 20.0)
    t = rotation(0, 25.0) @ rotation(1, -10.0)
    t[:3, 3] = (4.0, -7.5, 12.25)
    return transformed_copy(scene, vol, t, name=kind)[0]


def new_segmentation(scene, volume, names=("object",), name="Segmentation"):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    if volume.GetParentTransformNode() is not None:
        seg.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
    ids = [seg.GetSegmentation().AddEmptySegment("", n) for n in names]
    return seg, ids


def markups_points(scene, points_ras, name="prompts", parent=None):
    """A point list with one control point per world RAS position; optionally
    under a parent transform node (positions are still given in world)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    for n, p in enumerate(points_ras):
        node.AddControlPointWorld(*[float(v) for v in p], f"p{n}")
    return node


def world_points(markups_node):
    out = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, p)
        out.append(p)
    return np.array(out)


def segment_voxel_count(segmentation_node, segment_id, volume_node):
    from FastSAM3DLib.slicer_bridge import read_segment
    return int(read_segment(segmentation_node, segment_id, volume_node).sum())


try:
    from FastSAM3DLib.roi import MaskPatch
except ImportError:                      # the engine has not landed: a stand-in
    from dataclasses import dataclass

    @dataclass
    class MaskPatch:
        start_kji: tuple
        array: np.ndarray

        @property
        def stop_kji(self):
            return tuple(s + n for s, n in zip(self.start_kji, self.array.shape))

        @property
        def slices(self):
            return tuple(slice(a, b) for a, b in zip(self.start_kji, self.stop_kji))


class FakeMaskUpdate:
    def __init__(self, patch, reembedded=False):
        self.patch = patch
        self.reembedded = reembedded
        self.iou = 1.0
        self.timings = {"encode": 0.0, "decode": 0.0, "paste": 0.0, "total": 0.0}


class FakeEngine:
    """Stand-in for ``FastSAM3DLib.session.Engine`` (same call shape), computed
    in physical space from the engine image's own geometry: a click is a ball
    of ``radius_mm``; a box the voxels inside it (the axis-aligned box, or the
    slab of the rectangle on its slice); a scribble or lasso a ball around each
    of its points. Positive prompts add, negative ones take away. Tests the
    MRML side without a model; each session keeps its ``prompts`` as received."""

    device_description = "CPU (fake engine)"

    def __init__(self, radius_mm=6.0, box_thickness_mm=4.0):
        self.radius_mm = radius_mm
        self.box_thickness_mm = box_thickness_mm
        self.sessions = 0

    def forget_image(self, image):
        pass

    def new_session(self, image, spacing=None):
        self.sessions += 1
        return _FakeSession(self, image, spacing)


def _lps_of(point, space):
    p = np.asarray(point, float)
    if space == "ras":
        return p * np.array([-1, -1, 1])
    if space != "lps":
        raise ValueError(space)
    return p


class _FakeSession:
    def __init__(self, engine, image, spacing=None):
        self.engine = engine
        self.spacing = spacing          # recorded only: the shapes do not depend on it
        self.image = image
        size = image.GetSize()
        idx = np.indices(size[::-1]).reshape(3, -1)[::-1].T.astype(float)   # (i, j, k)
        d = np.array(image.GetDirection()).reshape(3, 3)
        sp = np.array(image.GetSpacing())
        self._lps = (np.array(image.GetOrigin()) + (idx * sp) @ d.T)         # voxel -> LPS
        self._shape = size[::-1]
        self._history = [()]
        self._pos = 0

    def set_spacing(self, spacing):
        self.spacing = spacing

    @property
    def prompts(self):
        """(kind, data in LPS, positive) of every prompt now in the session."""
        return list(self._history[self._pos])

    @property
    def clicks(self):
        return [(data, positive) for kind, data, positive in self.prompts if kind == "click"]

    @property
    def can_undo(self):
        return self._pos > 0

    @property
    def can_redo(self):
        return self._pos + 1 < len(self._history)

    def _ball(self, p):
        return np.sum((self._lps - p) ** 2, axis=1) <= self.engine.radius_mm ** 2

    def _box(self, data):
        a, b, axes, thickness = data
        if axes is None:
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            return np.all((self._lps >= lo) & (self._lps <= hi), axis=1)
        u, v = axes
        w = np.cross(u, v)
        local = (self._lps - a) @ np.stack([u, v, w]).T
        extent = (b - a) @ np.stack([u, v]).T
        lo, hi = np.minimum(0, extent), np.maximum(0, extent)
        return (np.all((local[:, :2] >= lo) & (local[:, :2] <= hi), axis=1)
                & (np.abs(local[:, 2]) <= thickness / 2))

    def _mask(self, prompts):
        m = np.zeros(len(self._lps), bool)
        for kind, data, positive in prompts:
            if kind == "click":
                inside = self._ball(data)
            elif kind == "box":
                inside = self._box(data)
            else:
                inside = np.zeros(len(self._lps), bool)
                for p in data:
                    inside |= self._ball(p)
            m = (m | inside) if positive else (m & ~inside)
        return m.reshape(self._shape)

    def mask(self):
        return self._mask(self._history[self._pos])

    def _result(self, old, new, reembedded=False):
        before, after = self._mask(old), self._mask(new)
        union = before | after
        if not union.any():
            return FakeMaskUpdate(None, reembedded)
        nz = np.nonzero(union)
        start = tuple(int(v.min()) for v in nz)
        stop = tuple(int(v.max()) + 1 for v in nz)
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        return FakeMaskUpdate(MaskPatch(start, after[box].copy()), reembedded)

    def _add(self, prompt):
        old = self._history[self._pos]
        new = old + (prompt,)
        self._history = self._history[:self._pos + 1] + [new]
        self._pos += 1
        return self._result(old, new, reembedded=len(old) == 0)

    def add_click(self, point, positive=True, space="ras"):
        return self._add(("click", _lps_of(point, space), bool(positive)))

    def add_box(self, corner_a, corner_b, space="ras", *, slice_axes=None, thickness_mm=None):
        axes = None if slice_axes is None else tuple(_lps_of(axis, space) for axis in slice_axes)
        thickness = self.engine.box_thickness_mm if thickness_mm is None else thickness_mm
        return self._add(("box", (_lps_of(corner_a, space), _lps_of(corner_b, space), axes, thickness), True))

    def add_scribble(self, points, positive=True, space="ras", max_points=None):
        return self._add(("scribble", np.array([_lps_of(p, space) for p in points]), bool(positive)))

    def add_lasso(self, points, positive=True, space="ras", *, slice_axes=None, thickness_mm=None):
        self.last_lasso_axes = slice_axes
        return self._add(("lasso", np.array([_lps_of(p, space) for p in points]), bool(positive)))

    def undo(self):
        if self._pos == 0:
            return None
        self._pos -= 1
        return self._result(self._history[self._pos + 1], self._history[self._pos])

    def redo(self):
        if self._pos + 1 >= len(self._history):
            return None
        self._pos += 1
        return self._result(self._history[self._pos - 1], self._history[self._pos])

    def reset(self):
        old = self._history[self._pos]
        self._history = self._history[:self._pos + 1] + [()]
        self._pos += 1
        return self._result(old, ())


def engine_image(volume_node):
    """The engine image of a volume: the engine's own converter when it has
    landed, else a SimpleITK equivalent (LPS, world geometry)."""
    import SimpleITK as sitk
    import slicer
    from FastSAM3DLib.slicer_bridge import world_ijk_to_ras
    array = slicer.util.arrayFromVolume(volume_node)
    m = world_ijk_to_ras(volume_node)
    try:
        from FastSAM3DLib.image import image_from_ijk_to_ras
    except ImportError:
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        return image
    return image_from_ijk_to_ras(array, m)
