"""Training data on the device: the data pack, the crop sampler (run here on CPU
tensors: the same code as on the GPU), SynthSeg-style synthesis, box prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from FastSAM3DLib.checkpoint import read_checkpoint, save_model
from FastSAM3DLib.cli import main
from FastSAM3DLib.model import DecoderConfig, EncoderConfig, ModelConfig, Sam3D
from FastSAM3DLib.normalization import normalize_intensity, normalize_intensity_batch
from FastSAM3DLib.roi import label_on_roi, resample_roi, roi_for_point
from FastSAM3DLib.training.intensity import synthesise_from_labels
from FastSAM3DLib.training.interaction import box_corners, upsample_logits, upsampling_matrix
from FastSAM3DLib.training.pack import DataError, read_pack, volumes_of_source, write_pack
from FastSAM3DLib.training.sampler import CropPlan, GpuCropSampler, SamplerConfig
from FastSAM3DLib.training.train import initialise

TINY_BOX = ModelConfig(
    name="tiny-box",
    encoder=EncoderConfig(embed_dim=48, depth=2, num_heads=2, out_chans=48, window_size=0,
                          global_attn_indexes=(), attention_free_blocks=1, block_formula="fastsam3d"),
    prompt_embed_dim=48,
    decoder=DecoderConfig(transformer_mlp_dim=96, transformer_heads=4, iou_head_hidden_dim=32),
    box_prompts=True)


def _synthetic_case(folder: Path, direction: str = "PIR") -> Path:
    """A CT-like case on a permuted, flipped, anisotropic grid: a smooth field of
    whole multiples of the pack's CT step (so quantisation is exact), with two
    touching boxes and a ball as labels. Returns its manifest."""
    rng = np.random.default_rng(3)
    shape_kji = (30, 36, 40)
    field = rng.standard_normal((4, 5, 6))
    from scipy import ndimage
    smooth = ndimage.zoom(field, np.array(shape_kji) / np.array(field.shape), order=3)
    values = 4 * np.round(250 * smooth + 300)                     # nonzero almost everywhere
    label = np.zeros(shape_kji, np.uint8)
    label[5:15, 6:20, 8:30] = 3
    label[15:22, 6:20, 8:30] = 7                                   # touches label 3
    k, j, i = np.ogrid[:30, :36, :40]
    label[(k - 20) ** 2 + (j - 28) ** 2 + (i - 10) ** 2 < 30] = 9
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing((1.2, 1.0, 1.6))
    image.SetOrigin((12.0, -40.0, 7.0))
    image = sitk.DICOMOrient(image, direction)
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(sitk.GetImageFromArray(values.astype(np.int16)))
    label_image.SetSpacing((1.2, 1.0, 1.6))
    label_image.SetOrigin((12.0, -40.0, 7.0))
    label_image = sitk.DICOMOrient(label_image, direction)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(label_image, str(folder / "label.nii.gz"))
    entries = [{"case": "synthetic_ct", "image": "image.nii.gz", "label": "label.nii.gz", "modality": "CT",
                "label_names": {"3": "upper", "7": "lower", "9": "ball"}, "label_quality": "manual"}]
    (folder / "MANIFEST.json").write_text(json.dumps(entries))
    return folder / "MANIFEST.json"


@pytest.fixture(scope="module")
def synthetic_manifest(tmp_path_factory) -> Path:
    return _synthetic_case(tmp_path_factory.mktemp("case"))


@pytest.fixture(scope="module")
def small_real_manifest(tmp_path_factory, shared_data) -> Path:
    """Two small real training cases and one of their label maps as a label-only map."""
    train = shared_data / "train"
    entries = {e["case"]: e for e in json.loads((train / "MANIFEST.json").read_text())}
    folder = tmp_path_factory.mktemp("real")
    chosen = []
    for name in ("mri_spine_cord_sct_t1", "ct_spine_lumbar_vertebrae_tptbox"):
        entry = dict(entries[name])
        entry["image"], entry["label"] = str(train / entry["image"]), str(train / entry["label"])
        chosen.append(entry)
    chosen.append({"case": "vertebrae_map", "image": None,
                   "label": str(train / entries["ct_spine_lumbar_vertebrae_tptbox"]["label"])})
    (folder / "MANIFEST.json").write_text(json.dumps(chosen))
    return folder / "MANIFEST.json"


# ----------------------------------------------------------------------------- the pack


def test_pack_round_trip_keeps_every_label_voxel_and_the_intensities(tmp_path, small_real_manifest):
    manifest_entries = json.loads(small_real_manifest.read_text())
    # Label-only entries make a label-map source; the others a case source.
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([e for e in manifest_entries if e["image"]]))
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "MANIFEST.json").write_text(json.dumps([e for e in manifest_entries if not e["image"]]))
    volumes = volumes_of_source(cases) + volumes_of_source(maps)
    path = tmp_path / "train.pack"
    write_pack(path, volumes)
    packed = {v.name: v for v in read_pack(path)}
    assert set(packed) == {"mri_spine_cord_sct_t1", "ct_spine_lumbar_vertebrae_tptbox", "vertebrae_map"}
    for entry in manifest_entries:
        volume = packed[entry["case"]]
        original = sitk.GetArrayFromImage(sitk.ReadImage(entry["label"]))
        ids = [int(v) for v in np.unique(original) if v]
        assert volume.label_ids == ids
        counts = np.bincount(volume.label.ravel(), minlength=len(ids) + 1)
        assert counts[1:].tolist() == [int((original == i).sum()) for i in ids]
        if entry["image"]:
            image = sitk.GetArrayFromImage(sitk.ReadImage(entry["image"])).astype(np.float64)
            values = volume.image_values()
            for packed_id, original_id in enumerate(ids, start=1):
                # Mean intensity per label within half a quantisation step.
                assert abs(values[volume.label == packed_id].mean() - image[original == original_id].mean()) \
                    <= volume.image_scale / 2 + 1e-3
        else:
            assert volume.image is None


def test_pack_errors_are_one_line(tmp_path, synthetic_manifest):
    path = tmp_path / "a.pack"
    write_pack(path, volumes_of_source(synthetic_manifest))
    damaged = tmp_path / "damaged.pack"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad, expected in ((tmp_path / "missing.pack", "not found"), (damaged, "damaged.pack"),
                          (synthetic_manifest, "not a training pack")):
        with pytest.raises(DataError, match=expected) as error:
            read_pack(bad)
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- crops


def test_sampler_cuts_the_crop_the_engine_cuts(tmp_path, synthetic_manifest):
    """Without augmentation the sampler's raw crop equals the engine's ROI
    resampling at the same point (image linear, label nearest), on a permuted
    and flipped anisotropic grid. (At a scan's border the two differ by half
    a voxel: ITK holds the edge value, grid_sample fades to the zero padding.)"""
    path = tmp_path / "p.pack"
    write_pack(path, volumes_of_source(synthetic_manifest))
    size, spacing = 16, 1.5             # 24 mm: inside the scan, away from its border
    sampler = GpuCropSampler(read_pack(path), "cpu", SamplerConfig(size=size), seed=0)
    image = sitk.ReadImage(str(synthetic_manifest.parent / "image.nii.gz"))
    label = sitk.ReadImage(str(synthetic_manifest.parent / "label.nii.gz"))
    oriented = sitk.DICOMOrient(image, "RAS")
    # Tensor order of the RAS array = ITK index order of the reoriented image.
    centre_index = (np.array(sampler.volumes[0].label.shape) - 1) / 2 + np.array([0.3, -0.4, 0.2])
    centre_lps = oriented.TransformContinuousIndexToPhysicalPoint(centre_index.tolist())
    plan = CropPlan(volume=0, group=(1,), matrix=np.eye(3) * spacing,
                    centre_mm=centre_index * np.array(sampler.volumes[0].spacing))
    crops, labels = sampler.cut([plan], torch.Generator().manual_seed(0))
    roi = roi_for_point(centre_lps, size, spacing)
    expected_image = resample_roi(image, roi)
    expected_label = label_on_roi(label, roi)
    assert np.abs(crops[0, 0].numpy() - expected_image).max() < 1e-2
    packed_ids = np.array([0] + sampler.volumes[0].label_ids)
    agreement = (packed_ids[labels[0, 0].numpy().astype(int)] == expected_label).mean()
    assert agreement > 0.995


def test_targets_are_the_chosen_labels_and_batches_are_normalised(tmp_path, synthetic_manifest):
    path = tmp_path / "p.pack"
    write_pack(path, volumes_of_source(synthetic_manifest))
    sampler = GpuCropSampler(read_pack(path), "cpu", SamplerConfig(size=32, shape_probability=0.0), seed=0)
    generator = torch.Generator().manual_seed(1)
    plans = [CropPlan(0, (1, 2), np.eye(3) * 1.5, np.array([20.0, 18.0, 24.0]), synthetic=s, ct_like=True)
             for s in (False, True)]
    images, labels = sampler.cut(plans, generator)
    normalised, targets = sampler.finish(plans, images, labels, generator)
    assert torch.equal(targets, (labels == 1) | (labels == 2))
    assert targets.any() and (~targets).any()
    assert torch.isfinite(normalised).all()
    # z-normalised over the raw foreground: a spread of order 1, not the raw Hounsfield-like scale.
    assert ((normalised.flatten(1).std(1) > 0.2) & (normalised.flatten(1).std(1) < 10)).all()
    # The table knows which labels touch: 3 and 7 are packed 1 and 2.
    touching = {entry.label: entry.neighbours for entry in sampler.tables[0]}
    assert touching[1] == (2,) and touching[2] == (1,) and touching[3] == ()
    # Random batches: every sample has a target voxel near its centre most of the time.
    batch_images, batch_targets = sampler.sample(6, np.random.default_rng(0), generator)
    assert batch_images.shape == batch_targets.shape == (6, 1, 32, 32, 32)
    assert torch.isfinite(batch_images).all() and batch_targets.flatten(1).any(1).float().mean() >= 0.5


def test_volume_weights_draw_a_volume_as_often_as_asked(tmp_path, synthetic_manifest):
    """``volume_weights`` (``train --oversample NAME=W``): a volume of weight 5
    among four image volumes is drawn 5/8 of the image samples, the label-only
    maps keep their share; unknown names and bad weights are refused."""
    import dataclasses
    path = tmp_path / "p.pack"
    write_pack(path, volumes_of_source(synthetic_manifest))
    volume = read_pack(path)[0]
    volumes = [dataclasses.replace(volume, name=f"case{n}") for n in range(4)]
    volumes += [dataclasses.replace(volume, name=f"map{n}", image=None) for n in range(2)]

    def shares(weights):
        sampler = GpuCropSampler(volumes, "cpu", SamplerConfig(size=16, volume_weights=weights), seed=0)
        rng = np.random.default_rng(0)
        drawn = np.bincount([sampler.plan(rng).volume for _ in range(4000)], minlength=6) / 4000
        return drawn[2] / drawn[:4].sum(), drawn[4:].sum()

    case2, label_only = shares((("case2", 5.0),))
    assert abs(case2 - 5 / 8) < 0.04 and abs(label_only - 0.35) < 0.04
    case2, label_only = shares(())
    assert abs(case2 - 1 / 4) < 0.04 and abs(label_only - 0.35) < 0.04
    for weights, message in [((("nowhere", 2.0),), "nowhere: no such volume"),
                             ((("case1", 0.0),), "positive")]:
        with pytest.raises(DataError, match=message):
            GpuCropSampler(volumes, "cpu", SamplerConfig(size=16, volume_weights=weights), seed=0)


def test_part_targets_are_voronoi_cells_of_a_large_label(shared_data):
    """``part_probability`` (``train --part-probability``): a label of 20 ml or
    more (a SynthSeg map's cerebral cortex) gives a part of itself as the
    target: the label's voxels of the crop nearer to the part's seed than to
    its neighbours, a fraction of the label; its image (synthesised from the
    labels) is the whole label's, so nothing in it shows where the part ends."""
    from FastSAM3DLib.training.pack import pack_volume
    folder = shared_data / "label_maps" / "brain_whole_head_synthseg"
    volume = pack_volume("seg01", next(folder.glob("*seg_01*")))
    cortex = volume.label_ids.index(3) + 1          # FreeSurfer 3: left cerebral cortex
    sampler = GpuCropSampler([volume], "cpu", SamplerConfig(size=48, part_probability=1.0,
                                                            shape_probability=0.0), seed=0)
    rng, generator = np.random.default_rng(2), torch.Generator().manual_seed(2)
    plans = []
    while len(plans) < 4:
        plan = sampler.plan(rng)
        if plan.group == (cortex,):
            plans.append(plan)
    assert all(plan.part_seeds is not None and plan.part_seeds.shape == (17, 3) for plan in plans)
    images, labels = sampler.cut(plans, generator)
    _, targets = sampler.finish(plans, images, labels, generator)
    offsets = sampler.offsets.numpy()
    fractions = []
    for plan, label, target in zip(plans, labels, targets):
        whole = (label[0] == cortex).flatten().numpy()
        nearest = np.argmin(((offsets[:, None] - plan.part_seeds[None]) ** 2).sum(-1), 1)
        assert np.array_equal(target.flatten().numpy(), whole & (nearest == 0))
        fractions.append(target.sum().item() / whole.sum())
    assert 0 < min(fractions) and max(fractions) < 0.9
    # Off by default; out-of-range probabilities are refused.
    assert SamplerConfig().part_probability == 0
    with pytest.raises(DataError, match="part probability"):
        GpuCropSampler([volume], "cpu", SamplerConfig(size=16, part_probability=1.5), seed=0)


def test_normalisation_of_a_batch_equals_the_engines(rng=np.random.default_rng(0)):
    crops = rng.standard_normal((4, 10, 12, 14)).astype(np.float32) * 50 + 10
    crops[1] = -3                                   # no foreground: unchanged
    crops[2] = np.where(crops[2] > 0, 7.0, crops[2])  # zero spread: unchanged
    expected = np.stack([normalize_intensity(c) for c in crops])
    assert np.abs(normalize_intensity_batch(torch.from_numpy(crops)).numpy() - expected).max() < 1e-5


# ----------------------------------------------------------------------------- synthesis


def test_synthesis_gives_each_label_its_own_intensity_and_keeps_the_labels():
    labels = torch.zeros(4, 1, 24, 24, 24)
    labels[:, :, 4:12] = 1
    labels[:, :, 12:20, :12] = 2
    labels[:, :, 12:20, 12:] = 3
    before = labels.clone()
    generator = torch.Generator().manual_seed(0)
    ct_like = torch.tensor([False, False, True, True])
    images = synthesise_from_labels(labels, generator, max_label=3, ct_like=ct_like)
    assert torch.equal(labels, before) and torch.isfinite(images).all()
    means = torch.stack([torch.stack([images[b][labels[b] == v].mean() for v in (1, 2, 3)]) for b in range(4)])
    # Labels differ within a sample, and one label differs between samples.
    assert (means.max(1).values - means.min(1).values > 0.05).all()
    assert means[0, 0] != means[1, 0]
    assert (images[:2] >= 0).all()                       # MR-like images are positive
    assert images[2:].min() < -50                        # CT-like ones have dark air


# ----------------------------------------------------------------------------- prompts


def test_box_corners_enclose_the_target():
    target = torch.zeros(3, 1, 32, 32, 32, dtype=torch.bool)
    target[0, 0, 10:20, 5:30, 7:9] = True
    target[1, 0, 3, 4, 5] = True
    exact = box_corners(target, torch.Generator().manual_seed(0), jitter=0.0)
    assert exact.shape == (3, 2, 3)
    assert exact[0].tolist() == [[10, 5, 7], [19, 29, 8]]
    assert exact[1].tolist() == [[3, 4, 5], [3, 4, 5]]
    assert exact[2].tolist() == [[0, 0, 0], [31, 31, 31]]       # empty target: the whole crop
    jittered = box_corners(target, torch.Generator().manual_seed(0), jitter=0.1)
    extent = torch.tensor([10, 25, 2])
    assert ((jittered[0] - exact[0]).abs() <= (0.1 * extent).ceil()).all()
    assert (jittered[0, 0] <= jittered[0, 1]).all()


def test_box_prompt_model_decodes_boxes_and_starts_from_point_only_weights(tmp_path):
    torch.manual_seed(0)
    point_only = Sam3D(ModelConfig.from_dict({**TINY_BOX.to_dict(), "box_prompts": False}))
    assert len(point_only.prompt_encoder.point_embeddings) == 2
    path = tmp_path / "points.safetensors"
    save_model(point_only, path)
    model = Sam3D(TINY_BOX)
    assert len(model.prompt_encoder.point_embeddings) == 4
    fresh_box = model.prompt_encoder.point_embeddings[2].weight.detach().clone()
    initialise(model, (str(path),))
    for name, value in point_only.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.prompt_encoder.point_embeddings[2].weight, fresh_box)
    embedding = model.encode(torch.randn(1, 1, 128, 128, 128))
    corners = torch.tensor([[[40, 50, 60], [80, 90, 70]]])
    box_labels = torch.tensor([[2, 3]])
    logits, iou = model.decode(embedding, corners, box_labels)
    assert logits.shape == (1, 1, 32, 32, 32) and iou.shape == (1, 1)
    # The corner embeddings are used: the same two points as clicks give other logits.
    as_clicks, _ = model.decode(embedding, corners, torch.tensor([[1, 1]]))
    assert not torch.allclose(logits, as_clicks)


def test_matrix_upsampling_equals_trilinear_interpolation_with_its_gradient():
    low = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    matrix = upsampling_matrix(8, 32)
    ours = upsample_logits(low, matrix)
    reference = F.interpolate(low, size=(32, 32, 32), mode="trilinear", align_corners=False)
    assert torch.allclose(ours, reference, atol=1e-5)
    weights = torch.randn_like(reference)
    (gradient,) = torch.autograd.grad((ours * weights).sum(), low)
    (expected,) = torch.autograd.grad((reference * weights).sum(), low)
    assert torch.allclose(gradient, expected, atol=1e-4)


# ----------------------------------------------------------------------------- end to end


def test_cli_pack_then_train_from_it_with_box_prompts(tmp_path, synthetic_manifest, capsys):
    pack = tmp_path / "data.pack"
    assert main(["pack", str(pack), str(synthetic_manifest.parent)]) == 0
    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_model(Sam3D(ModelConfig.from_dict({**TINY_BOX.to_dict(), "box_prompts": False})), init)
    out = tmp_path / "run"
    common = ["train", "--pack", str(pack), "--init", str(init), "--box-prompts", "--box-probability", "1",
              "--decoder-lr-scale", "1", "--min-clicks", "2", "--max-clicks", "2", "--batch-size", "2",
              "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(common + ["--steps", "2", "--log-every", "1"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    _, config = read_checkpoint(out / "model.safetensors")
    assert config.box_prompts and config.encoder == TINY_BOX.encoder
    capsys.readouterr()
    assert main(common + ["--benchmark", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train_samples_per_s"] > 0 and result["data_samples_per_s"] > 0
    # --oversample reaches the sampler: a name the pack lacks is refused in one line.
    assert main(common + ["--steps", "1", "--oversample", "nowhere=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such volume in the packs" in err[0]
    with pytest.raises(SystemExit):
        main(common + ["--steps", "1", "--oversample", "nowhere"])
    assert "expected NAME=WEIGHT" in capsys.readouterr().err
