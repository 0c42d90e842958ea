"""Training data: discovery, errors naming the file, padding with a warning, seeded
augmentation and a resumable, rank-sharded order."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.train.data import CropDataset, DataError, ResumableSampler, discover
from anatomask_fast.train.phantom import LABELS, make_case, write_phantom_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), cases=3, seed=1)


def save(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def test_phantom_has_organs_and_labels():
    image, label = make_case(0)
    assert image.shape == label.shape
    for name, value in LABELS.items():
        assert (label == value).sum() > 500, name
    assert image[label == 1].mean() > image[label == 0].mean()


def test_nnunet_dataset_is_discovered_with_labels(phantom):
    dataset = discover(phantom, with_labels=True)
    assert len(dataset.cases) == 3 and dataset.modality == "CT"
    assert dataset.labels == LABELS
    assert all(case.label.exists() for case in dataset.cases)


def test_crops_are_seeded_by_epoch_and_index(phantom):
    data = CropDataset(discover(phantom), (32, 32, 32), seed=0)
    first = data[1]["image"]
    assert first.shape == (1, 32, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, data[1]["image"])
    data.set_epoch(1)
    assert not torch.equal(first, data[1]["image"])
    other = CropDataset(discover(phantom), (32, 32, 32), seed=0)
    assert torch.equal(other[1]["image"], first)


def test_images_and_labels_are_cropped_together(phantom):
    data = CropDataset(discover(phantom, with_labels=True), (48, 48, 48), seed=3)
    item = data[0]
    assert item["label"].shape == (1, 48, 48, 48) and item["label"].dtype == torch.int64
    # CT normalization: clipped then z-scored, so organ intensities stay ordered.
    assert item["image"][item["label"] == 1].mean() > item["image"][item["label"] == 0].mean()


def test_plain_folder_small_volume_is_padded_with_a_warning(tmp_path):
    save(tmp_path / "small.nii.gz", np.random.rand(20, 24, 16).astype(np.float32))
    with pytest.warns(UserWarning, match="small.nii.gz.*smaller than the crop"):
        data = CropDataset(discover(tmp_path, modality="MR"), (32, 32, 32), seed=0)
    assert data[0]["image"].shape == (1, 32, 32, 32)


def test_bad_data_is_named(tmp_path):
    with pytest.raises(DataError, match="no .nii or .nii.gz volumes found"):
        discover(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")
    save(tmp_path / "flat.nii.gz", np.random.rand(20, 24).astype(np.float32))
    with pytest.raises(DataError, match="flat.nii.gz: expected a 3D volume"):
        CropDataset(discover(tmp_path), (16, 16, 16), seed=0)[0]


def test_unreadable_file_is_named(tmp_path):
    save(tmp_path / "good.nii.gz", np.random.rand(16, 16, 16).astype(np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="broken.nii.gz: cannot be read as NIfTI"):
        CropDataset(discover(tmp_path), (16, 16, 16), seed=0)


def test_missing_label_is_named(tmp_path, phantom):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(phantom, copy)
    (copy / "labelsTr" / "phantom_001.nii.gz").unlink()
    with pytest.raises(DataError, match="phantom_001.*no label file"):
        discover(copy, with_labels=True)


def test_multichannel_nnunet_cases(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    for c in range(2):
        save(tmp_path / "imagesTr" / f"case_{c:04d}.nii.gz".replace("case_", "a_"),
             np.random.rand(16, 16, 16).astype(np.float32))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}}))
    dataset = discover(tmp_path)
    assert len(dataset.cases) == 1 and len(dataset.cases[0].images) == 2
    assert CropDataset(dataset, (16, 16, 16), seed=0)[0]["image"].shape == (2, 16, 16, 16)


def test_sampler_shards_pads_and_resumes():
    ranks = [ResumableSampler(7, seed=5, rank=r, world_size=2) for r in range(2)]
    orders = [list(s) for s in ranks]
    assert all(len(o) == 4 for o in orders)
    assert set(orders[0]) | set(orders[1]) == set(range(7))
    ranks[0].set_epoch(0, start=2)
    assert list(ranks[0]) == orders[0][2:]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != orders[0]


def _paired_folders(root, shape=(12, 10, 8), cases=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        save(root / "images" / f"case{i}.nii.gz", rng.normal(size=shape).astype(np.float32))
        label = np.zeros(shape, np.uint8)
        label[2:5, 2:5, 2:5] = 1 + i % 2          # largest value: 2
        save(root / "labels" / f"case{i}.nii.gz", label)
    return root


def test_paired_folders_with_classes_read_off_the_labels(tmp_path):
    dataset = discover(_paired_folders(tmp_path), modality="mr", with_labels=True)
    assert [c.name for c in dataset.cases] == ["case0", "case1", "case2"]
    assert all(c.label == tmp_path / "labels" / f"{c.name}.nii.gz" for c in dataset.cases)
    assert dataset.modality == "MR"
    assert dataset.labels == {"background": 0, "class_1": 1, "class_2": 2}
    assert "3 classes read off the label maps" in dataset.description


def test_paired_folders_take_the_classes_of_dataset_json(tmp_path):
    root = _paired_folders(tmp_path)
    (root / "dataset.json").write_text(json.dumps({"labels": {"bg": 0, "a": 1, "b": 2, "c": 3}}))
    assert discover(root, with_labels=True).labels == {"bg": 0, "a": 1, "b": 2, "c": 3}


def test_paired_folders_errors_name_the_case(tmp_path):
    root = _paired_folders(tmp_path)
    (root / "labels" / "case1.nii.gz").unlink()
    with pytest.raises(DataError, match="'case1' has no label file"):
        discover(root, with_labels=True)
    (root / "labels" / "case1.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="label .*case1.nii.gz cannot be read"):
        discover(root, with_labels=True)
    with pytest.raises(DataError, match="nor paired images/ and labels/ folders"):
        discover(tmp_path / "images", with_labels=True)
