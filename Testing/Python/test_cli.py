"""The ``fastsam3d`` command: outputs on the input grid, one-line errors, nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Samples" / "ct_abdomen_example.nii.gz"
LIVER_RAS = "98,164.3,394.3"


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_a_labelmap_on_the_input_grid(tmp_path, capsys):
    out = tmp_path / "liver.nrrd"
    code, _, err = _run(["segment", SAMPLE, "-o", out, "--point", LIVER_RAS, "--model", "fastsam3d",
                         "--random-weights", "--device", "cpu"], capsys)
    assert code == 0, err
    image, label = sitk.ReadImage(str(SAMPLE)), sitk.ReadImage(str(out))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    assert "wrote" in err
    assert [p.name for p in tmp_path.iterdir()] == ["liver.nrrd"]


def test_prompts_file_gives_one_label_per_object_without_overwriting(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"space": "ras", "objects": [
        {"label": 3, "name": "liver", "points": [[98, 164.3, 394.3]]},
        {"label": 7, "name": "near liver", "points": [[90, 160, 390]], "negative": [[98, 164.3, 394.3]]},
    ]}))
    out = tmp_path / "organs.nii.gz"
    code, _, err = _run(["segment", SAMPLE, "-o", out, "--prompts", prompts, "--model", "fastsam3d",
                         "--random-weights"], capsys)
    assert code == 0, err
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out)))))
    assert values <= {0, 3, 7} and 3 in values


@pytest.mark.parametrize("args, message", [
    (["segment", "/no/such/scan.nii.gz", "-o", "{tmp}/x.nii.gz", "--point", "1,2,3"], "not found"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--point", "1e5,0,0"], "outside the image"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--negative", LIVER_RAS], "positive"),
    (["segment", SAMPLE, "-o", "{tmp}/no_such_dir/x.nii.gz", "--point", LIVER_RAS], "does not exist"),
    (["segment", SAMPLE, "-o", "{tmp}/x.txt", "--point", LIVER_RAS], "extension"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--point", LIVER_RAS, "--model", "{tmp}/nope.pth"], "not found"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--point", LIVER_RAS, "--model", "{tmp}/notes.txt"],
     "notes.txt is not a weights file"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--point", LIVER_RAS, "--model", "fastsam3d"], "--random-weights"),
    (["segment", SAMPLE, "-o", "{tmp}/x.nii.gz", "--point", LIVER_RAS, "--model", "sam-med3d"], "--random-weights"),
    (["segment", SAMPLE, "-o", "{tmp}/folder.nii.gz", "--point", LIVER_RAS], "is a folder"),
    (["segment", SAMPLE, "-o", "/sys/x.nii.gz", "--point", LIVER_RAS], "cannot write /sys/x.nii.gz: Permission"),
])
def test_bad_input_gives_one_line_and_no_output(tmp_path, capsys, args, message):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "folder.nii.gz").mkdir()
    if "notes.txt" in args[-1]:
        notes = Path(args[-1])
        notes.write_text("some notes, not weights\n")
    if "--model" not in args:
        args += ["--model", "fastsam3d", "--random-weights"]
    code, out, err = _run(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fastsam3d: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "np.float64" not in err
    assert not any(p.is_file() and p.suffix != ".txt" for p in tmp_path.rglob("*"))


def test_errors_show_plain_numbers_and_come_before_the_model(tmp_path, capsys, monkeypatch):
    """A point outside the image and a missing output folder are reported
    before the model is built, with numbers as typed (no numpy reprs)."""
    import FastSAM3DLib.session as session

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")
    monkeypatch.setattr(session.Engine, "__init__", no_model)
    code, _, err = _run(["segment", SAMPLE, "-o", tmp_path / "x.nii.gz", "--point", "5000,0,0"], capsys)
    assert code == 2 and "the point (5000, 0, 0) (ras) of object lies outside the image" in err, err
    code, _, err = _run(["segment", SAMPLE, "-o", tmp_path / "none" / "x.nii.gz", "--point", LIVER_RAS], capsys)
    assert code == 2 and "does not exist" in err and "AssertionError" not in err, err


def test_negative_coordinates_as_separate_argument_and_normal_file_mode(tmp_path, capsys):
    """``--point -98,-164.3,394.3`` (a value starting with '-') is a point, not an
    option; the output gets the usual permissions (umask), not mkstemp's 0600."""
    import os
    out = tmp_path / "liver.nii.gz"
    old = os.umask(0o022)
    try:
        code, _, err = _run(["segment", SAMPLE, "-o", out, "--space", "lps", "--point", "-98,-164.3,394.3",
                             "--negative", "-1e2,-170,394.3", "--model", "fastsam3d", "--random-weights",
                             "--device", "cpu"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert "click at (-98.0, -164.3, 394.3)" in err and "click at (-100.0, -170.0, 394.3)" in err
    assert (out.stat().st_mode & 0o777) == 0o644


def test_an_empty_result_is_reported_and_not_written(tmp_path, capsys, monkeypatch):
    import FastSAM3DLib.session as session
    monkeypatch.setattr(session.InteractiveSession, "mask",
                        lambda self: np.zeros(self.image.GetSize()[::-1], bool))
    out = tmp_path / "x.nii.gz"
    code, _, err = _run(["segment", SAMPLE, "-o", out, "--point", LIVER_RAS, "--model", "fastsam3d",
                         "--random-weights", "--device", "cpu"], capsys)
    assert code == 1 and "object came out empty (0 voxels)" in err and "nothing was written" in err, err
    assert not out.exists()


def test_written_files_get_the_umask_mode(tmp_path):
    import os
    from FastSAM3DLib.image import image_from_array, write_image_atomic
    old = os.umask(0o027)
    try:
        write_image_atomic(image_from_array(np.zeros((3, 3, 3), np.uint8)), tmp_path / "a.nrrd")
    finally:
        os.umask(old)
    assert ((tmp_path / "a.nrrd").stat().st_mode & 0o777) == 0o640


def test_text_file_as_image_and_bad_point_syntax(tmp_path, capsys):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    code, _, err = _run(["segment", text, "-o", tmp_path / "x.nii.gz", "--point", "1,2,3"], capsys)
    assert code == 2 and "fastsam3d: error" in err
    with pytest.raises(SystemExit) as info:
        main(["segment", str(SAMPLE), "-o", str(tmp_path / "x.nii.gz"), "--point", "1,2"])
    assert info.value.code == 2
    assert "X,Y,Z" in capsys.readouterr().err


def test_installed_command_and_help():
    exe = Path(sys.executable).with_name("fastsam3d")
    result = subprocess.run([str(exe), "segment", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for words in ("--point", "--negative", "ras", "Slicer", "voxel grid"):
        assert words in result.stdout


def test_spacing_option_reaches_the_engine(tmp_path, capsys, monkeypatch, shared_data):
    import FastSAM3DLib.session as session_module
    crops = []
    real = session_module.InteractiveSession.add_click

    def add_click(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        crops.append(result.roi.spacing)
        return result
    monkeypatch.setattr(session_module.InteractiveSession, "add_click", add_click)
    for spacing, crop_mm, logged in (("2.5", 2.5, "2.5"), ("fixed", 1.5, "fixed")):
        code, _, err = _run(["segment", SAMPLE, "-o", tmp_path / "x.nii.gz", "--point", LIVER_RAS, "--model",
                             "fastsam3d", "--random-weights", "--device", "cpu", "--spacing", spacing], capsys)
        assert code == 0 and crops[-1] == crop_mm and f"crop spacing {logged}" in err
    spine = shared_data / "mri_spine_cord_sct_t2"
    code, _, err = _run(["evaluate", "--image", spine / "t2.nii.gz", "--label", spine / "t2_seg-manual.nii.gz",
                         "--model", "default", "--device", "cpu", "--clicks", "1", "--spacing", "0.75"], capsys)
    assert code == 0 and crops[-1] == 0.75, err
    with pytest.raises(SystemExit):
        main(["evaluate", "--image", str(SAMPLE), "--label", str(SAMPLE), "--spacing", "zoom"])
    assert "auto, fixed or a spacing in mm" in capsys.readouterr().err


BOX_IJK = ((87, 47, 93), (97, 55, 107))           # around the structure at LIVER_RAS


def _box_in_ras(corners_ijk):
    image = sitk.ReadImage(str(SAMPLE))
    ras = [np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])) * [-1, -1, 1]
           for c in corners_ijk]
    return ",".join(f"{v:.4f}" for v in np.concatenate(ras))


def test_a_box_gives_the_same_labelmap_in_every_space_and_in_a_prompts_file(tmp_path, capsys):
    """The bundled model (box prompts) on the sample: a box in voxel indices, the same box in
    RAS (the sample's axes are RAS-aligned, so the box is the same) and in a prompts file."""
    outputs = []
    for n, (box, space) in enumerate([(",".join(map(str, BOX_IJK[0] + BOX_IJK[1])), "ijk"),
                                      (_box_in_ras(BOX_IJK), "ras")]):
        out = tmp_path / f"box{n}.nii.gz"
        code, _, err = _run(["segment", SAMPLE, "-o", out, "--box", box, "--space", space, "--device", "cpu"],
                            capsys)
        assert code == 0, err
        assert "box" in err
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"space": "ijk", "objects": [{"label": 2, "box": [list(c) for c in BOX_IJK]}]}))
    code, _, err = _run(["segment", SAMPLE, "-o", tmp_path / "file.nii.gz", "--prompts", prompts,
                         "--device", "cpu"], capsys)
    assert code == 0, err
    outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "file.nii.gz"))) // 2)
    mask = outputs[0] > 0
    assert mask.sum() > 100
    assert np.array_equal(outputs[1], outputs[0]) and np.array_equal(outputs[2], outputs[0])
    # Mostly within the box (grown by two voxels).
    (i0, j0, k0), (i1, j1, k1) = BOX_IJK
    assert mask[k0 - 2:k1 + 3, j0 - 2:j1 + 3, i0 - 2:i1 + 3].sum() >= 0.9 * mask.sum()


@pytest.mark.parametrize("args, message", [
    (["--box", "1,2,3,4,5"], "is not a box: write X1,Y1,Z1,X2,Y2,Z2"),
    (["--box", "a,b,c,d,e,f"], "is not a box"),
    (["--box", "-1e5,0,0,-1e5,1,1"], "lies outside the image"),
    (["--box", f"{LIVER_RAS},{LIVER_RAS}"], "two different corners"),
    (["--box", "90,160,390,100,170,400", "--model", "fastsam3d", "--random-weights"], "has no box prompt"),
])
def test_a_bad_box_gives_one_line_and_no_output(tmp_path, capsys, args, message):
    out = tmp_path / "x.nii.gz"
    try:
        code, _, err = _run(["segment", SAMPLE, "-o", out, "--device", "cpu", *args], capsys)
    except SystemExit as exc:           # argparse's own error line: "fastsam3d segment: error: ..."
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fastsam3d") and ": error: " in line]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("obj, message", [
    ({"box": [[1, 2, 3]]}, "is not a box"),
    ({"box": [[1, 2, 3], [4, 5]]}, "is not a point"),
    ({"points": [[98, 164.3, 394.3]], "scribbles": [{"points": []}]}, "is not a scribble"),
    ({"negative": [[98, 164.3, 394.3]]}, "no positive point or box"),
])
def test_a_bad_box_in_a_prompts_file_gives_one_line(tmp_path, capsys, obj, message):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"objects": [obj]}))
    code, _, err = _run(["segment", SAMPLE, "-o", tmp_path / "x.nii.gz", "--prompts", prompts], capsys)
    lines = [line for line in err.splitlines() if line.startswith("fastsam3d: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
