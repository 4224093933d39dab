"""Training data on real scans: readers, ROI samples, synthetic volumes, augmentation."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from FastSAM3DLib.image import load_image
from FastSAM3DLib.roi import extract_roi
from FastSAM3DLib.training.data import (DataError, TrainingSampleSource, augment_batch, read_cases,
                                        read_manifest, read_nnunet_folder)
from FastSAM3DLib.training.synthetic import MIN_OBJECT_VOXELS, synthetic_volume

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MANIFEST = DATA / "train" / "MANIFEST.json"
needs_data = pytest.mark.skipif(not MANIFEST.is_file(), reason="shared real data not present")


@pytest.fixture(scope="module")
def manifest_cases():
    return {case.name: case for case in read_manifest(MANIFEST)}


def write_nnunet_folder(root: Path, dataset_json: dict | None) -> Path:
    """Two spinal-cord cases (real T2 scan; the second a cropped copy) plus,
    in label 2, an 8-voxel speck that is too small to train on."""
    image = sitk.ReadImage(str(DATA / "mri_spine_cord_sct_t2" / "t2.nii.gz"))
    label = sitk.ReadImage(str(DATA / "mri_spine_cord_sct_t2" / "t2_seg-manual.nii.gz"))
    array = sitk.GetArrayFromImage(label).astype(np.uint8)
    array[2:4, 2:4, 2:4] = 2
    speck_label = sitk.GetImageFromArray(array)
    speck_label.CopyInformation(label)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name, box in (("spine_001", None), ("spine_002", (slice(5, 55), slice(0, 55), slice(5, 50)))):
        img, lab = (image, speck_label) if box is None else (image[box[2], box[1], box[0]],
                                                            speck_label[box[2], box[1], box[0]])
        sitk.WriteImage(img, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"{name}.nii.gz"))
    if dataset_json is not None:
        (root / "dataset.json").write_text(json.dumps(dataset_json))
    return root


def physical_check(sample, label: sitk.Image, label_id: int) -> None:
    """Every target voxel of the sample lies, in millimetres, on a voxel of
    ``label_id`` in the original label (nearest neighbour)."""
    roi = sample["roi"]
    target = sample["target"][0].numpy() > 0
    points = roi.voxel_to_lps(np.argwhere(target))
    array = sitk.GetArrayFromImage(label)
    for point in points[:: max(1, len(points) // 200)]:
        i, j, k = label.TransformPhysicalPointToIndex(point.tolist())
        assert array[k, j, i] == label_id


# ----------------------------------------------------------------------------- readers


@needs_data
def test_manifest_lists_every_case_with_paths_names_and_modality(manifest_cases):
    raw = json.loads(MANIFEST.read_text(encoding="utf-8"))
    assert list(manifest_cases) == [entry["case"] for entry in raw]
    for case in manifest_cases.values():
        assert case.image.is_file() and case.label.is_file()
    aorta = manifest_cases["ct_chest_aorta_heart_totalseg"]
    assert aorta.label_names[1] == "aorta" and aorta.label_names[8] == "vertebra T12"
    assert aorta.modality.startswith("CT")
    # Paths leaving the train folder ("../") are resolved against the manifest.
    spine = manifest_cases["mri_spine_cord_sct_t2"]
    assert spine.image == (DATA / "mri_spine_cord_sct_t2" / "t2.nii.gz").resolve()
    assert spine.label_names == {1: "spinal cord"}
    assert [c.name for c in read_cases(MANIFEST.parent)] == list(manifest_cases)


def test_manifest_errors_are_one_line(tmp_path):
    manifest = tmp_path / "MANIFEST.json"
    manifest.write_text(json.dumps([{"case": "a", "image": "a.nii.gz"}]))
    with pytest.raises(DataError, match="entry 0 lacks label"):
        read_manifest(manifest)
    manifest.write_text(json.dumps([{"case": "a", "image": "a.nii.gz", "label": "b.nii.gz"}]))
    with pytest.raises(DataError, match="case a: image file not found"):
        read_manifest(manifest)
    manifest.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(manifest)
    with pytest.raises(DataError, match="not found"):
        read_cases(tmp_path / "nowhere")


@needs_data
def test_nnunet_folder_v2_layout(tmp_path):
    root = write_nnunet_folder(tmp_path / "Dataset900_Spine", {
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "cord": 1, "speck": 2, "both": [1, 2]},
        "file_ending": ".nii.gz"})
    cases = read_nnunet_folder(root)
    assert [c.name for c in cases] == ["spine_001", "spine_002"]
    assert cases[0].image == root / "imagesTr" / "spine_001_0000.nii.gz"
    assert cases[0].label == root / "labelsTr" / "spine_001.nii.gz"
    assert cases[0].label_names == {1: "cord", 2: "speck"} and cases[0].modality == "T2"
    assert [c.name for c in read_cases(root)] == ["spine_001", "spine_002"]


@needs_data
def test_nnunet_folder_v1_layout_and_missing_parts(tmp_path):
    root = write_nnunet_folder(tmp_path / "Task01", {"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "cord"}})
    cases = read_nnunet_folder(root)
    assert cases[1].label_names == {1: "cord"} and cases[1].modality == "MRI"
    bare = write_nnunet_folder(tmp_path / "bare", None)
    assert read_nnunet_folder(bare)[0].label_names == {}
    (bare / "labelsTr" / "spine_002.nii.gz").unlink()
    with pytest.raises(DataError, match="case spine_002: label file not found"):
        read_nnunet_folder(bare)
    with pytest.raises(DataError, match="no imagesTr"):
        read_nnunet_folder(tmp_path)


# ----------------------------------------------------------------------------- samples


@needs_data
def test_samples_hold_the_label_near_the_roi_centre(manifest_cases):
    names = ["mri_spine_cord_sct_t1", "mri_brain_tumour_t1c_pyradiomics_brain1", "ct_chest_aorta_heart_totalseg",
             "mri_spine_greymatter_sct_t2s"]
    source = TrainingSampleSource([manifest_cases[n] for n in names], synthetic_ratio=0, seed=3)
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(12):
        sample = source.sample(rng)
        image, target = sample["image"], sample["target"]
        assert image.shape == target.shape == (1, 128, 128, 128)
        assert image.dtype == target.dtype == torch.float32
        assert set(torch.unique(target).tolist()) == {0.0, 1.0}
        # The clicked label voxel is at most 16 ROI voxels (size / 8) from the centre.
        centre = target[0, 47:81, 47:81, 47:81]
        assert centre.any(), sample["name"]
        case_name, label_name = sample["name"].split("/", 1)
        case = manifest_cases[case_name]
        label_id = next(i for i, n in case.label_names.items() if n == label_name)
        physical_check(sample, sitk.ReadImage(str(case.label)), label_id)
        # The image went through the engine's own preprocessing.
        expected = extract_roi(load_image(case.image), sample["roi"])
        assert torch.equal(image[0], torch.from_numpy(expected))
        seen.add(case_name)
    assert len(seen) >= 3


@needs_data
def test_whole_small_structure_has_its_volume_at_model_spacing(manifest_cases):
    # The cervical cord (4,275 voxels of 1 mm³) fits in one ROI: about 4275 / 1.5³ voxels.
    source = TrainingSampleSource([manifest_cases["mri_spine_cord_sct_t2"]], synthetic_ratio=0, seed=0)
    target = source.sample(np.random.default_rng(0))["target"]
    assert target.sum().item() == pytest.approx(4275 / 1.5 ** 3, rel=0.1)


@needs_data
def test_labels_below_ten_voxels_are_never_targets(tmp_path):
    cases = read_nnunet_folder(write_nnunet_folder(tmp_path / "d", {"labels": {"cord": 1, "speck": 2}}))
    source = TrainingSampleSource(cases, synthetic_ratio=0, seed=0)
    names = {source.sample(np.random.default_rng(seed))["name"] for seed in range(12)}
    assert names == {"spine_001/cord", "spine_002/cord"}


@needs_data
def test_indexed_samples_are_a_function_of_seed_and_index(manifest_cases):
    cases = [manifest_cases["mri_spine_cord_sct_t1"], manifest_cases["mri_spine_cord_ivadomed_unf01_t2w"]]
    first, second = (TrainingSampleSource(cases, synthetic_ratio=0, seed=5) for _ in range(2))
    image, target = first[7]
    assert torch.equal(image, second[7][0]) and torch.equal(target, second[7][1])
    assert not torch.equal(image, first[8][0])
    batch = torch.utils.data.default_collate([first[0], first[1]])
    assert batch[0].shape == batch[1].shape == (2, 1, 128, 128, 128)


@needs_data
def test_real_and_synthetic_samples_are_mixed(manifest_cases):
    source = TrainingSampleSource([manifest_cases["mri_spine_cord_sct_t1"]], synthetic_ratio=0.5, seed=1, size=64)
    names = [source.sample(np.random.default_rng(seed))["name"] for seed in range(10)]
    synthetic = [n for n in names if n.startswith("synthetic-")]
    assert 0 < len(synthetic) < len(names)
    only_synthetic = TrainingSampleSource([], synthetic_ratio=1.0, seed=1, size=64)
    sample = only_synthetic.sample(np.random.default_rng(0))
    assert sample["name"].startswith("synthetic-") and sample["target"].shape == (1, 64, 64, 64)
    assert sample["target"][0, 24:40, 24:40, 24:40].any()
    with pytest.raises(DataError, match="no training cases"):
        TrainingSampleSource([], synthetic_ratio=0.5)


# ----------------------------------------------------------------------------- synthetic volumes


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_synthetic_volume_shapes_values_and_objects(modality):
    image, label = synthetic_volume(np.random.default_rng(4), (96, 112, 128), modality)
    assert image.shape == label.shape == (96, 112, 128)
    assert image.dtype == np.float32 and np.issubdtype(label.dtype, np.integer)
    assert np.isfinite(image).all()
    ids = np.unique(label)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))       # one id per object, 1..n
    assert len(ids) - 1 >= 2
    assert np.bincount(label.ravel())[1:].min() >= MIN_OBJECT_VOXELS
    if modality == "CT":
        assert image[0, 0, 0] < -800                                       # air outside the body
    else:
        assert image.min() >= 0                                            # magnitude image
    # Objects stand out from the tissue right around them by more than their own
    # spread (noise + texture, robustly from the core). Not every one: an object
    # can sit where fat and soft tissue around it average to its own value.
    visible = []
    for object_id in ids[1:]:
        inside = label == object_id
        ring = ndimage.binary_dilation(inside, iterations=3) & ~ndimage.binary_dilation(inside) & (label == 0)
        core = image[ndimage.binary_erosion(inside)]
        spread = 1.4826 * np.median(np.abs(core - np.median(core)))
        if ring.sum() > 50:
            visible.append(abs(np.median(image[inside]) - np.median(image[ring])) > spread)
    assert np.mean(visible) >= 0.7


def test_synthetic_volumes_reproduce_with_a_seed():
    first = synthetic_volume(np.random.default_rng(9))
    again = synthetic_volume(np.random.default_rng(9))
    other = synthetic_volume(np.random.default_rng(10))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_synthetic_tubes_are_long_and_thin():
    _, label = synthetic_volume(np.random.default_rng(2), modality="CT", blobs=(0, 0), tubes=(1, 1))
    assert label.max() == 1
    tube = label == 1
    extent = np.ptp(np.argwhere(tube), axis=0).max()
    thickness = ndimage.distance_transform_edt(tube).max()
    assert extent > 40 and extent > 5 * thickness


def test_synthetic_volume_is_fast():
    rng = np.random.default_rng(0)
    started = time.process_time()
    for _ in range(3):
        synthetic_volume(rng)
    assert (time.process_time() - started) / 3 < 1.0      # ~0.25 s of CPU per 128³ volume


def test_synthetic_volume_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic modality"):
        synthetic_volume(np.random.default_rng(0), modality="PET")
    with pytest.raises(ValueError, match="3D shape"):
        synthetic_volume(np.random.default_rng(0), shape=(8, 8, 8))


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def real_batch():
    """A (2, 1, 128³) batch: a real spinal-cord crop (a synthetic one without
    the shared data) and a synthetic one."""
    synthetic = TrainingSampleSource([], synthetic_ratio=1.0, seed=0)
    if MANIFEST.is_file():
        cord = [c for c in read_manifest(MANIFEST) if c.name == "mri_spine_cord_sct_t1"]
        first = TrainingSampleSource(cord, synthetic_ratio=0.0).sample(np.random.default_rng(0))
    else:
        first = synthetic.sample(np.random.default_rng(1))
    samples = [first, synthetic.sample(np.random.default_rng(0))]
    return (torch.stack([s["image"] for s in samples]), torch.stack([s["target"] for s in samples]))


def test_flips_move_image_and_target_together(real_batch):
    images, targets = real_batch
    plain = dict(affine_probability=0.0, intensity_scale=0.0, intensity_shift=0.0, max_noise_std=0.0)
    generator = torch.Generator().manual_seed(3)
    flipped_images, flipped_targets = augment_batch(images, targets, generator, **plain)
    for b in range(len(images)):
        # Find the flip that maps the image, and check the target took the same one.
        dims = next(d for d in _all_flips() if torch.equal(images[b].flip(d) if d else images[b], flipped_images[b]))
        assert torch.equal(targets[b].flip(dims) if dims else targets[b], flipped_targets[b])
        # The target marks the same image values as before.
        assert torch.equal(torch.sort(images[b][targets[b] > 0]).values,
                           torch.sort(flipped_images[b][flipped_targets[b] > 0]).values)
    every_axis = augment_batch(images, targets, torch.Generator().manual_seed(0), flip_probability=1.0, **plain)
    assert torch.equal(every_axis[0], images.flip((2, 3, 4))) and torch.equal(every_axis[1], targets.flip((2, 3, 4)))


def _all_flips():
    return [tuple(d for d, on in zip((1, 2, 3), bits) if on)
            for bits in np.ndindex(2, 2, 2)]


def test_rotation_and_scaling_keep_the_target_on_its_structure(real_batch):
    _, targets = real_batch
    # An image whose bright structure is exactly the target, smoothed.
    images = torch.from_numpy(ndimage.gaussian_filter(targets.numpy(), sigma=(0, 0, 1, 1, 1)))
    generator = torch.Generator().manual_seed(1)
    moved_images, moved_targets = augment_batch(images, targets, generator, flip_probability=0.0,
                                                affine_probability=1.0, intensity_scale=0.0,
                                                intensity_shift=0.0, max_noise_std=0.0)
    assert not torch.equal(moved_targets, targets)
    for b in range(len(targets)):
        bright, marked = moved_images[b] > 0.5, moved_targets[b] > 0
        overlap = 2 * (bright & marked).sum() / (bright.sum() + marked.sum())
        assert overlap > 0.9
        assert set(torch.unique(moved_targets[b]).tolist()) <= {0.0, 1.0}
        assert moved_targets[b].sum() == pytest.approx(targets[b].sum().item(), rel=0.4)


def test_augmentation_reproduces_with_a_seed_and_changes_intensities(real_batch):
    images, targets = real_batch
    first = augment_batch(images, targets, torch.Generator().manual_seed(5))
    again = augment_batch(images, targets, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[1].dtype == targets.dtype and first[0].shape == images.shape
    assert not torch.equal(first[0], images)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        augment_batch(images[:, 0], targets[:, 0], torch.Generator())
