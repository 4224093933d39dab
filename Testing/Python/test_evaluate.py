"""Evaluation: the sphere baseline's geometry, the resolution ceiling, grouping and the report."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from FastSAM3DLib import build_model, evaluate as ev
from FastSAM3DLib.cli import main
from FastSAM3DLib.clicks import center_click
from FastSAM3DLib.image import image_from_array, point_to_lps
from FastSAM3DLib.roi import roi_for_point
from FastSAM3DLib.session import Engine


def _oblique_flipped_direction() -> np.ndarray:
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return rotation @ np.diag([-1.0, 1.0, -1.0])


def _physical_distances(image: sitk.Image, centre_ijk) -> np.ndarray:
    """|p(v) - p(c)| in mm for every voxel v (k, j, i), through SimpleITK's own index->point mapping."""
    size = image.GetSize()
    centre = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in centre_ijk)))
    out = np.empty(size[::-1])
    for k in range(size[2]):
        for j in range(size[1]):
            for i in range(size[0]):
                out[k, j, i] = np.linalg.norm(np.array(image.TransformIndexToPhysicalPoint((i, j, k))) - centre)
    return out


def test_sphere_baseline_measures_balls_in_mm_on_an_anisotropic_oblique_flipped_grid():
    spacing = (0.7, 1.7, 3.1)
    image = image_from_array(np.zeros((14, 24, 40)), spacing=spacing, origin=(5.0, -3.0, 12.0),
                             direction=_oblique_flipped_direction())
    baseline = ev.SphereBaseline(image)
    centre_ijk = (20, 12, 7)
    baseline.add_click(centre_ijk[::-1], positive=True)
    distances = _physical_distances(image, centre_ijk)
    expected = distances <= ev.POSITIVE_RADIUS_MM
    np.testing.assert_array_equal(baseline.mask(), expected)
    # 12 mm reaches 17 voxels along i, 7 along j and 3 along k: not a ball of voxels.
    assert expected[7, 12, :].sum() == 35 and expected[7, :, 20].sum() == 15 and expected[:, 12, 20].sum() == 7

    hole_ijk = (26, 12, 7)
    baseline.add_click(hole_ijk[::-1], positive=False)
    expected &= _physical_distances(image, hole_ijk) > ev.NEGATIVE_RADIUS_MM
    np.testing.assert_array_equal(baseline.mask(), expected)
    # A positive click inside the hole paints again: clicks apply in order.
    baseline.add_click(hole_ijk[::-1], positive=True)
    expected |= _physical_distances(image, hole_ijk) <= ev.POSITIVE_RADIUS_MM
    np.testing.assert_array_equal(baseline.mask(), expected)


SPHERE_SPACING = (0.9, 0.8, 1.1)


def _sphere_case(radius_mm: float, size: int = 44):
    """An anisotropic image holding a ball of ``radius_mm`` (physical mm) near its centre."""
    image = image_from_array(np.zeros((size,) * 3, np.float32), spacing=SPHERE_SPACING, origin=(-7.0, 4.0, 30.0))
    lps = _all_voxel_lps(image, 0)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([size / 2 - 0.35, size / 2 + 0.2, size / 2]))
    mask = (np.linalg.norm(lps - centre, axis=-1) <= radius_mm).reshape((size,) * 3)
    return image, mask


def _all_voxel_lps(image: sitk.Image, pad: int) -> np.ndarray:
    """LPS centres (N, 3), C order over (k, j, i), of the image's voxels and ``pad`` more on every side."""
    size = np.array(image.GetSize())
    axes = [np.arange(-pad, n + pad) for n in size[::-1]]
    kji = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    linear = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return kji[:, ::-1] @ linear.T + np.array(image.GetOrigin())


def _independent_ceiling(image: sitk.Image, mask: np.ndarray, roi, low_res: int = 32) -> float:
    """The same ceiling by other means: the signed distance from nearest-centre
    searches over EVERY voxel centre (image plus a margin beyond it, which is
    outside), only at the low-res cells that can reach an image voxel; the
    trilinear upsampling evaluated at the image's voxel centres by
    map_coordinates (edge clamped, as F.interpolate); False outside the ROI."""
    cell_mm = roi.spacing * roi.size / low_res
    pad = int(np.ceil(cell_mm / min(image.GetSpacing()))) + 2
    big = np.pad(mask, pad).ravel()
    centres = _all_voxel_lps(image, pad)
    inside, outside = cKDTree(centres[big]), cKDTree(centres[~big])
    cells = (np.arange(low_res) + 0.5) * roi.size / low_res - 0.5
    grid_lps = roi.voxel_to_lps(np.stack(np.meshgrid(cells, cells, cells, indexing="ij"), -1).reshape(-1, 3))
    index = np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in grid_lps])
    reach = cell_mm / np.array(image.GetSpacing()) + 1
    near = np.all((index >= -reach) & (index <= np.array(image.GetSize()) - 1 + reach), axis=1)
    logits = np.full(len(grid_lps), -1e3)          # cells too far to touch an image voxel
    logits[near] = (outside.query(grid_lps[near])[0] - inside.query(grid_lps[near])[0]) / 2
    logits = logits.reshape((low_res,) * 3)
    roi_voxel = roi.lps_to_voxel(_all_voxel_lps(image, 0))
    values = ndimage.map_coordinates(logits, ((roi_voxel + 0.5) * low_res / roi.size - 0.5).T,
                                     order=1, mode="nearest")
    inside_roi = np.all((roi_voxel >= -0.5) & (roi_voxel <= roi.size - 0.5), axis=1)
    return ev.dice(((values > 0) & inside_roi).reshape(mask.shape), mask)


def test_resolution_ceiling_of_a_sphere_is_near_one_fine_lower_coarse_and_matches_an_independent_computation():
    image, mask = _sphere_case(radius_mm=8.0)
    k, j, i = center_click(np.zeros_like(mask), mask, spacing=SPHERE_SPACING[::-1]).index   # the first ROI's centre
    centre = point_to_lps(image, (i, j, k), "ijk")
    fine = ev.resolution_ceiling(image, mask, roi_for_point(centre, 128, 0.5), 32)
    coarse = ev.resolution_ceiling(image, mask, roi_for_point(centre, 128, 1.5), 32)
    assert fine > 0.97
    assert coarse < fine - 0.03
    for spacing, value in ((0.5, fine), (1.5, coarse)):
        assert value == pytest.approx(_independent_ceiling(image, mask, roi_for_point(centre, 128, spacing)),
                                      abs=1e-9)
    # The per-target report places the crop where the engine puts the first click's: the ROI
    # policy's first crop (a lattice crop near the click, not centred on it).
    by_setting = {c.setting: c for c in ev.ceilings_for_target(image, mask, ["1.5", "0.5", "fit"], 128, 32, 1.5)}
    for setting, spacing in (("1.5", 1.5), ("0.5", 0.5)):
        engine_crop = Engine(build_model("fastsam3d"), device="cpu", spacing=spacing) \
            .new_session(image).add_click((i, j, k), space="ijk").roi
        assert engine_crop.center_lps != tuple(centre)
        assert by_setting[setting].dice == pytest.approx(
            _independent_ceiling(image, mask, engine_crop), abs=1e-9)
    assert by_setting["fit"].spacing_mm == ev.FIT_MIN_SPACING_MM and by_setting["fit"].coverage == 1.0


def test_ceiling_marks_a_target_larger_than_the_crop():
    image, mask = _sphere_case(radius_mm=36.0, size=96)
    (ceiling,) = ev.ceilings_for_target(image, mask, ["0.1"], 128, 32, 1.5)      # a 12.8 mm crop
    assert ceiling.coverage < 0.5
    # nothing outside the crop (equality when the crop lies inside the target: rounding allowed)
    assert ceiling.dice <= 2 * ceiling.coverage / (1 + ceiling.coverage) + 1e-12
    (fit,) = ev.ceilings_for_target(image, mask, ["fit"], 128, 32, 1.5)
    assert fit.coverage == 1.0 and ev.FIT_MIN_SPACING_MM < fit.spacing_mm < 1.5


def test_label_quality_groups_from_the_manifest(shared_data):
    quality = ev.manifest_label_quality(shared_data / "train" / "MANIFEST.json")
    assert quality["ct_abdomen_pelvis_totalseg_example"] == "model"
    assert quality["mri_brain_aal_colin27"] == "manual"
    assert quality["ct_headneck_oar_openkbp_pt4"] == "manual"            # "manual (original clinical ...)"
    assert quality["mri_brain_aparc2009s_aseg_freesurfer_niivue"] == "model"   # "automatic (FreeSurfer ...)"
    assert quality["ct_spine_lumbar_vertebrae_tptbox"] == "unknown"


def _result(case, label, quality, model_dice, sphere_dice, seed=0):
    target = ev.Target(case, label, "", quality, 500)
    return ev.TargetResult(target, [ev.Run("model", seed, model_dice), ev.Run("sphere", seed, sphere_dice)], [], 0.0)


def test_summary_keeps_manual_and_model_targets_apart_and_subsets():
    results = [_result("a", 1, "manual", [0.2, 0.4, 0.6], [0.1, 0.1, 0.1]),
               _result("a", 2, "manual", [0.4, 0.6, 0.8], [0.3, 0.3, 0.3]),
               _result("b", 1, "model", [0.9, 0.9, 0.9], [0.5, 0.5, 0.5])]
    summary = ev.summarise(results, n_clicks=3, subsets=[("two", "a", [2])])
    groups = {g["group"]: g for g in summary["groups"]}
    assert summary["clicks_reported"] == [1, 3]
    assert groups["manual-label targets"]["targets"] == 2
    assert groups["manual-label targets"]["model"]["dice@3"]["mean"] == pytest.approx(0.7)
    assert groups["manual-label targets"]["sphere"]["dice@1"]["mean"] == pytest.approx(0.2)
    assert groups["model-label targets"]["model"]["dice@1"]["mean"] == pytest.approx(0.9)
    assert groups["two (a)"]["model"]["dice@3"]["mean"] == pytest.approx(0.8)
    # Seeds: the spread is the standard deviation of the group mean over seeds.
    seeded = [_result("a", 1, "manual", [0.2], [0.1], seed=0), _result("a", 1, "manual", [0.6], [0.1], seed=1)]
    merged = ev.TargetResult(seeded[0].target, seeded[0].runs + seeded[1].runs, [], 0.0)
    group = ev.summarise([merged], n_clicks=1)["groups"][0]
    assert group["model"]["dice@1"] == {"mean": pytest.approx(0.4), "spread": pytest.approx(np.std([0.2, 0.6],
                                                                                                   ddof=1))}


def test_latency_splits_later_prompts_by_whether_they_embedded_a_crop():
    def timed(ms, encoder_runs):
        run = ev.Run("model", 0, [0.5] * len(ms))
        run.prompt_ms, run.encoder_runs = list(ms), list(encoder_runs)
        return ev.TargetResult(ev.Target("a", 1, "", "manual", 500), [run, ev.Run("sphere", 0, [0.1])], [], 0.0)

    results = [timed([900, 30, 40, 500], [2, 0, 0, 1]), timed([700, 20, 60], [1, 0, 0]), timed([800], [2])]
    value = ev.summarise(results, n_clicks=3)["latency"]
    assert value["first_prompt"] == {"count": 3, "median_ms": 800.0, "p90_ms": pytest.approx(880.0)}
    assert value["decoder_only"]["count"] == 4 and value["decoder_only"]["median_ms"] == pytest.approx(35.0)
    assert value["with_encoder"] == {"count": 1, "median_ms": 500.0, "p90_ms": 500.0}
    assert value["encoder_runs_per_object"] == pytest.approx((3 + 1 + 2) / 3)
    line = ev.format_latency({"latency": value})
    assert "first prompt 800.0 ms" in line and "decoder-only click 35.0 ms" in line and "1.00" not in line
    assert ev.format_latency(ev.summarise([_result("a", 1, "manual", [0.2], [0.1])], 1)) == ""


def test_click_response_pairs_each_click_with_the_dice_change_it_made():
    clicked = ev.Run("model", 0, [0.2, 0.5, 0.4, 0.6], [((1, 1, 1), True), ((2, 2, 2), True),
                                                         ((3, 3, 3), False), ((4, 4, 4), True)],
                     obeyed=[True, True, False, True])
    boxed = ev.Run("model", 0, [0.5, 0.7, 0.68], [((1, 1, 1), False), ((2, 2, 2), True)],
                   box_lps=[[0, 0, 0], [9, 9, 9]], obeyed=[True, False])
    finished = ev.Run("model", 0, [0.3, 0.9, 0.9], [((1, 1, 1), True), ((2, 2, 2), True)],  # nothing left
                      obeyed=[True, True])
    target = ev.Target("a", 1, "", "manual", 500)
    results = [ev.TargetResult(target, [run, ev.Run("sphere", 0, [0.1])], [], 0.0)
               for run in (clicked, boxed, finished)]
    value = ev.click_response(results, "model")
    # Positive: +0.3, +0.2 (first run), -0.02 (after the box), +0.6 (third run), obeyed 3 of 4
    # (the first click counts not); negative: -0.1 (first run, not obeyed), +0.2 (the box run's
    # first click, obeyed). The first prompts count not.
    assert value["positive"] == {"clicks": 4, "mean_gain": pytest.approx((0.3 + 0.2 - 0.02 + 0.6) / 4),
                                 "obeyed_share": pytest.approx(3 / 4)}
    assert value["negative"] == {"clicks": 2, "mean_gain": pytest.approx((-0.1 + 0.2) / 2),
                                 "obeyed_share": pytest.approx(1 / 2)}
    assert value["lowered_share"] == pytest.approx(2 / 6)
    summary = ev.summarise(results, n_clicks=3)
    assert summary["groups"][0]["click_response"]["model"] == value
    assert ev.format_click_response(summary).startswith(
        "click response, manual-label targets: model +0.270 per positive / +0.050 per negative click, "
        "75 % / 50 % obeyed, 33.3 % of clicks lower the Dice")


def test_fast_mode_keeps_subset_labels_then_spreads():
    class Case:
        name = "c"
        label_names = {}

    labels = np.zeros((4, 10, 10), dtype=np.int64)
    for n in range(1, 11):
        labels[:, n - 1, :] = n                      # ten labels of 40 voxels each
    labels[0, 0, 0] = 11                             # one label of 1 voxel
    chosen = ev.select_targets(Case(), labels, "manual", min_voxels=10, keep_first=[5, 6], max_targets=4)
    assert [t.label for t in chosen] == [1, 5, 6, 10]
    assert [t.label for t in ev.select_targets(Case(), labels, "manual", min_voxels=10)] == list(range(1, 11))


def test_cli_clicks_5_has_no_dice_at_10_and_jobs_agree(shared_data, tmp_path, capsys):
    case = shared_data / "mri_spine_cord_sct_t2"
    common = ["evaluate", "--image", case / "t2.nii.gz", "--label", case / "t2_seg-manual.nii.gz",
              "--label-quality", "manual", "--model", "default", "--device", "cpu", "--clicks", "5",
              "--rule", "reference", "--seeds", "2", "--ceiling", "1.5", "--threads", "1"]
    outputs = []
    for jobs in (1, 2):           # one torch thread each: CPU kernels may round differently with more
        path = tmp_path / f"jobs{jobs}.json"
        assert main([str(a) for a in common + ["--jobs", str(jobs), "--json", path]]) == 0
        printed = capsys.readouterr().out
        assert "Dice@5" in printed and "Dice@3" in printed and "Dice@10" not in printed
        assert "manual-label targets" in printed and "sphere" in printed and "ceil 1.5mm" in printed
        outputs.append(json.loads(path.read_text()))
    first, second = outputs
    assert first["meta"]["seeds"] == [2023, 2024]
    assert all("dice@10" not in g["model"] for g in first["groups"])

    def without_times(runs):
        return [{k: v for k, v in r.items() if k != "prompt_ms"} for r in runs]

    assert [without_times(d["runs"]) for d in first["details"]] == \
        [without_times(d["runs"]) for d in second["details"]]
    runs = first["details"][0]["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("model", 2023), ("model", 2024),
                                                             ("sphere", 2023), ("sphere", 2024)]
    assert all(len(r["dice"]) == 5 for r in runs)
    # The model's answer to every click it got is timed, with the crops it embedded; the
    # baseline has none. The first click embeds the object's crop, and the summary's line
    # reports the first clicks' median.
    for run in runs:
        n = len(run["clicks"]) if run["method"] == "model" else 0
        assert len(run["prompt_ms"]) == len(run["encoder_runs"]) == n
    models = [r for r in runs if r["method"] == "model"]
    assert all(r["encoder_runs"][0] >= 1 and all(ms > 0 for ms in r["prompt_ms"]) for r in models)
    assert first["latency"]["first_prompt"]["median_ms"] == pytest.approx(
        float(np.median([r["prompt_ms"][0] for r in models])))
    assert first["latency"]["encoder_runs_per_object"] == pytest.approx(
        np.mean([sum(r["encoder_runs"]) for r in models]))
    assert "model click-to-mask, medians: first prompt" in printed and "thread(s) on cpu)" in printed
    # The click response pairs every corrective click with the Dice change it made.
    gains = {True: [], False: []}
    for run in models:
        for n, (_, positive) in enumerate(run["clicks"][1:], start=1):
            gains[positive].append(run["dice"][n] - run["dice"][n - 1])
    response = first["groups"][0]["click_response"]["model"]
    assert response["positive"]["clicks"] == len(gains[True]) and response["negative"]["clicks"] == len(gains[False])
    for sign, name in ((True, "positive"), (False, "negative")):
        if gains[sign]:
            assert response[name]["mean_gain"] == pytest.approx(np.mean(gains[sign]))
    # Obeyed: the click's voxel has the click's label in the mask that answered it.
    assert all(len(r["obeyed"]) == len(r["clicks"]) for r in runs)
    spheres = [r for r in runs if r["method"] == "sphere"]
    assert all(all(r["obeyed"]) for r in spheres)          # a ball at the click always holds it
    obeyed = {True: [], False: []}
    for run in models:
        for (_, positive), kept in list(zip(run["clicks"], run["obeyed"]))[1:]:
            obeyed[positive].append(kept)
    for sign, name in ((True, "positive"), (False, "negative")):
        if obeyed[sign]:
            assert response[name]["obeyed_share"] == pytest.approx(np.mean(obeyed[sign]))
    assert "click response, manual-label targets: model" in printed and "obeyed" in printed


def test_a_target_scores_the_same_whatever_was_evaluated_before_it(shared_data):
    from FastSAM3DLib.training.data import Case
    folder = shared_data / "mri_spine_cord_sct_t2"
    case = Case("cord_levels", folder / "t2.nii.gz", folder / "t2_seg-manual_labeled.nii.gz")
    settings = ev.Settings(model="default", device="cpu", clicks=2, baseline=None)
    c3, c4 = (ev.Target(case.name, label, "", "manual", 0) for label in (3, 4))
    alone = ev.run_targets([(case, c4)], settings)[0]
    after = ev.run_targets([(case, c3), (case, c4)], settings)[1]   # C3's region holds C4's first click
    assert after.runs[0].dice == alone.runs[0].dice


def test_the_box_baseline_is_the_ellipsoid_inscribed_in_the_box_on_an_oblique_grid():
    image = image_from_array(np.zeros((14, 24, 40)), spacing=(0.7, 1.7, 3.1), origin=(5.0, -3.0, 12.0),
                             direction=_oblique_flipped_direction())
    baseline = ev.SphereBaseline(image)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((19.5, 11.5, 6.5)))
    box = np.stack([centre - (8.0, 6.0, 10.0), centre + (8.0, 6.0, 10.0)])
    baseline.add_box(box)
    k, j, i = np.indices(image.GetSize()[::-1])
    lps = np.array([image.TransformIndexToPhysicalPoint((int(a), int(b), int(c)))
                    for a, b, c in zip(i.ravel(), j.ravel(), k.ravel())]).reshape(*i.shape, 3)
    expected = (((lps - box.mean(0)) / ((box[1] - box[0]) / 2)) ** 2).sum(-1) <= 1
    assert expected.sum() > 50
    np.testing.assert_array_equal(baseline.mask(), expected)


def test_target_box_is_the_world_extent_of_the_target_and_jitter_moves_it_within_bounds():
    image = image_from_array(np.zeros((14, 24, 40)), spacing=(0.7, 1.7, 3.1), direction=_oblique_flipped_direction())
    gt = np.zeros((14, 24, 40), dtype=bool)
    gt[3:9, 5:15, 10:30] = True
    centres = np.array([image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
                        for k, j, i in np.argwhere(gt)])
    box = ev.target_box_lps(image, gt)
    np.testing.assert_allclose(box, [centres.min(0), centres.max(0)], atol=1e-9)
    jittered = ev.target_box_lps(image, gt, 0.1, np.random.default_rng(0))
    assert np.all(np.abs(jittered - box) <= 0.1 * (box[1] - box[0]) + 1e-9) and not np.allclose(jittered, box)


def test_cli_first_prompt_box_scores_the_box_then_clicks(shared_data, tmp_path, capsys):
    case = shared_data / "mri_spine_cord_sct_t2"
    path = tmp_path / "box.json"
    args = ["evaluate", "--image", case / "t2.nii.gz", "--label", case / "t2_seg-manual.nii.gz",
            "--model", "default", "--device", "cpu", "--clicks", "3", "--first-prompt", "box",
            "--box-jitter", "0.05", "--threads", "1", "--json", path]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "first prompt: the target's bounding box (jitter 0.05" in printed and "Dice@3" in printed
    result = json.loads(path.read_text())
    assert result["meta"]["first_prompt"] == "box"
    model = next(r for r in result["details"][0]["runs"] if r["method"] == "model")
    sphere = next(r for r in result["details"][0]["runs"] if r["method"] == "sphere")
    assert len(model["dice"]) == 3 and len(model["clicks"]) <= 2 and model["box_lps"] == sphere["box_lps"]
    label = sitk.ReadImage(str(case / "t2_seg-manual.nii.gz"))
    exact = ev.target_box_lps(label, sitk.GetArrayFromImage(label) > 0)
    extent = exact[1] - exact[0]
    assert np.all(np.abs(np.array(model["box_lps"]) - exact) <= 0.05 * extent + 1e-6)
    assert model["dice"][0] > 0.3                 # the bundled model segments from the box alone
    # A point-only model is refused in one line before any target runs.
    code = main([str(a) for a in args[:5] + ["--model", "fastsam3d", "--device", "cpu",
                                             "--first-prompt", "box"]])
    err = capsys.readouterr().err
    assert code == 2 and "has no box prompt" in err
