"""Training data: discovery, the pre-processed store (round trip, resumable writing,
dataset-wide CT normalization, label-map skipping, errors naming the file), crops as
slices of the stored arrays, foreground oversampling and seeded augmentation."""

import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.train import store as store_module
from anatomask_fast.train.augment import region_size, spatial_matrix, warp
from anatomask_fast.train.data import DataError, case_dict, discover, preprocessing
from anatomask_fast.train.phantom import LABELS, make_case, write_phantom_dataset
from anatomask_fast.train.sampling import BatchOrder, RandomCrops, epoch_loader
from anatomask_fast.train.store import StoreOptions, prepare
from anatomask_fast.train.volumes import normalize, open_store, read_properties


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), cases=3, seed=1)


@pytest.fixture(scope="module")
def labelled_store(phantom, tmp_path_factory):
    return prepare(phantom, StoreOptions(with_labels=True), tmp_path_factory.mktemp("store"))


def save(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def ct_like(rng, shape=(20, 18, 16)):
    """Air at -1000 around a body of noisy tissue, int16 as CT scanners write."""
    image = np.full(shape, -1000, np.int16)
    image[3:-3, 3:-3, 2:-2] = rng.normal(40, 200, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
    return image


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


def test_store_round_trip(phantom, labelled_store):
    manifest = json.loads((labelled_store / "manifest.json").read_text())
    volumes = open_store(labelled_store)
    assert volumes.names == ["phantom_000", "phantom_001", "phantom_002"]
    for index, case in enumerate(discover(phantom, with_labels=True).cases):
        record = manifest["cases"][index]
        raw = nib.load(case.images[0])
        assert record["shape"] == list(raw.shape) and record["spacing"] == [1.5, 1.5, 2.0]
        assert record["sources"][0]["size"] == case.images[0].stat().st_size
        image, label = volumes.whole(index, label=True)
        expected = normalize(np.asanyarray(raw.dataobj)[None], manifest["normalization"])
        np.testing.assert_allclose(image, expected, rtol=1e-6, atol=1e-6)
        assert np.array_equal(label[0], np.asanyarray(nib.load(case.label).dataobj))
        table = volumes.locations(index)
        assert set(table[:, 0].tolist()) == {1, 2, 3}
        assert (label[0][tuple(table[:, 1:].T)] == table[:, 0]).all()


def test_prediction_preprocessing_repeats_the_store_normalization(phantom, labelled_store):
    volumes = open_store(labelled_store)
    assert volumes.normalization["scheme"] == "dataset"
    dataset = discover(phantom)
    transform = preprocessing(dataset, (32, 32, 32), None, volumes.normalization)
    item = transform(case_dict(dataset.cases[1]))
    image, _ = volumes.whole(1)
    torch.testing.assert_close(item["image"], torch.from_numpy(image), rtol=1e-5, atol=1e-5)


def test_dataset_wide_ct_normalization_equals_numpy(tmp_path):
    rng = np.random.default_rng(0)
    volumes = [ct_like(rng) for _ in range(3)]
    for i, volume in enumerate(volumes):
        save(tmp_path / f"ct{i}.nii.gz", volume)
    root = prepare(tmp_path, StoreOptions(), tmp_path / "store")
    foreground = np.concatenate([v[v > v.min()] for v in volumes]).astype(np.float64)
    (stats,) = json.loads((root / "manifest.json").read_text())["normalization"]
    assert stats["lower"] == pytest.approx(np.percentile(foreground, 0.5))
    assert stats["upper"] == pytest.approx(np.percentile(foreground, 99.5))
    assert stats["mean"] == pytest.approx(foreground.mean())
    assert stats["std"] == pytest.approx(foreground.std())
    image, _ = open_store(root).whole(1)
    direct = (
        np.clip(volumes[1], stats["lower"], stats["upper"]) - foreground.mean()
    ) / foreground.std()
    np.testing.assert_allclose(image[0], direct, rtol=1e-5, atol=1e-5)
    # the per-volume option: the volume's own clip and z-score
    root = prepare(tmp_path, StoreOptions(ct_normalization="volume"), tmp_path / "per_volume")
    image, _ = open_store(root).whole(1)
    low, high = np.percentile(volumes[1], [0.5, 99.5])
    clipped = np.clip(volumes[1].astype(np.float64), low, high)
    np.testing.assert_allclose(
        image[0], (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-5
    )


def test_killed_preprocessing_resumes_and_never_counts_a_partial_case(
    tmp_path, monkeypatch, capsys
):
    rng = np.random.default_rng(1)
    for i in range(3):
        save(tmp_path / f"ct{i}.nii.gz", ct_like(rng))
    root = tmp_path / "store"
    real_write = store_module._write_b2nd
    calls = []

    def dies_on_the_second_case(array, path):
        calls.append(path)
        if len(calls) == 2:  # half a file on disk, then the process is gone
            (path.parent / f".{path.stem}.tmp-999.b2nd").write_bytes(b"partial")
            raise KeyboardInterrupt
        real_write(array, path)

    monkeypatch.setattr(store_module, "_write_b2nd", dies_on_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, StoreOptions(), root)
    assert sorted(p.name for p in (root / "cases").glob("*.json")) == ["ct0.json"]
    assert not (root / "manifest.json").exists()
    # The partial store is kept, and said so: the next run resumes it.
    assert (
        f"the partial store {root} is kept (1 of 3 cases written): the next run with the "
        "same data and options resumes it" in capsys.readouterr().err
    )
    first = (root / "cases" / "ct0.json").stat().st_mtime_ns
    monkeypatch.setattr(store_module, "_write_b2nd", real_write)
    prepare(tmp_path, StoreOptions(), root)
    assert (
        f"resuming the store {root}: 1 of 3 cases were written by an earlier run"
        in capsys.readouterr().out
    )
    assert len(open_store(root)) == 3
    assert (root / "cases" / "ct0.json").stat().st_mtime_ns == first  # not redone
    assert not list((root / "cases").glob(".*tmp-*"))
    # a changed source file is pre-processed again, the others are kept
    save(tmp_path / "ct2.nii.gz", ct_like(rng))
    prepare(tmp_path, StoreOptions(), root)
    assert (root / "cases" / "ct0.json").stat().st_mtime_ns == first


def test_crops_are_slices_of_the_stored_arrays(labelled_store):
    volumes = open_store(labelled_store)
    crops = RandomCrops(
        volumes, (32, 40, 24), seed=3, rank=0, batch_size=2, augmentation="none", labels=True
    )
    for key in [(0, 0, 0), (0, 0, 1), (1, 4, 0)]:
        item = crops[key]
        index, start, matrix, _ = crops.draw(key)
        assert matrix is None
        image, label = volumes.whole(index, label=True)
        region = tuple(slice(b, b + n) for b, n in zip(start, (32, 40, 24)))
        assert torch.equal(item["image"], torch.from_numpy(image[(slice(None), *region)]))
        assert torch.equal(item["label"], torch.from_numpy(label[(slice(None), *region)]))
    assert not torch.equal(crops[(0, 0, 0)]["image"], crops[(0, 0, 1)]["image"])
    assert torch.equal(crops[(0, 0, 0)]["image"], crops[(0, 0, 0)]["image"])
    other_rank = RandomCrops(
        volumes, (32, 40, 24), seed=3, rank=1, batch_size=2, augmentation="none"
    )
    assert not torch.equal(other_rank[(0, 0, 0)]["image"], crops[(0, 0, 0)]["image"])


def test_batches_are_full_and_independent_of_workers_and_resume(labelled_store):
    crops = RandomCrops(
        open_store(labelled_store),
        (32, 32, 32),
        seed=0,
        rank=0,
        batch_size=4,
        augmentation="nnunet",
    )
    order = BatchOrder(steps_per_epoch=3, batch_size=4)
    batches = [b["image"] for b in epoch_loader(crops, order, epoch=2, start_step=0, workers=0)]
    assert [b.shape[0] for b in batches] == [4, 4, 4]
    with_workers = [
        b["image"] for b in epoch_loader(crops, order, epoch=2, start_step=1, workers=2)
    ]
    assert len(with_workers) == 2
    assert all(torch.equal(a, b) for a, b in zip(batches[1:], with_workers))


def test_foreground_oversampling_centres_the_last_third_on_labels(labelled_store):
    volumes = open_store(labelled_store)
    crops = RandomCrops(
        volumes,
        (16, 16, 16),
        seed=0,
        rank=0,
        batch_size=3,
        augmentation="none",
        labels=True,
        foreground=0.33,
    )
    forced = [crops[(0, step, 2)]["label"] for step in range(12)]
    assert all((label > 0).any() for label in forced)
    free = [crops[(0, step, 0)]["label"] for step in range(12)]
    assert sum(int(label[0, 8, 8, 8] > 0) for label in free) < 12
    augmented = RandomCrops(
        volumes,
        (16, 16, 16),
        seed=0,
        rank=0,
        batch_size=3,
        augmentation="nnunet",
        labels=True,
        foreground=0.33,
    )
    for step in range(6):
        item = augmented[(0, step, 2)]
        assert item["image"].shape == (1, 16, 16, 16) and item["label"].dtype == torch.int64
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3}


def test_spatial_augmentation_without_rotation_or_scaling_is_the_crop():
    region = torch.randn(1, 20, 22, 24)
    identity = np.eye(3)
    out, _ = warp(region, None, identity, (20, 22, 24))
    torch.testing.assert_close(out, region, atol=1e-5, rtol=1e-5)
    rng = np.random.default_rng(4)
    matrices = [spatial_matrix(rng, "nnunet") for _ in range(200)]
    drawn = [m for m in matrices if m is not None]
    assert 40 < len(drawn) < 110  # p(rotation or scaling) = 0.36
    for m in drawn:
        assert all(r >= c for r, c in zip(region_size((32, 32, 32), m), (32, 32, 32)))


def test_label_maps_in_a_plain_folder_are_skipped_with_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    save(tmp_path / "ct.nii.gz", ct_like(rng))
    save(tmp_path / "labels.nii.gz", rng.integers(0, 5, (20, 18, 16)).astype(np.uint8))
    with pytest.warns(UserWarning, match="labels.nii.gz looks like a label map"):
        root = prepare(tmp_path, StoreOptions(), tmp_path / "store")
    assert open_store(root).names == ["ct"]


def test_modality_must_be_ct_mr_or_pet(tmp_path):
    save(tmp_path / "a.nii.gz", np.random.rand(8, 8, 8).astype(np.float32))
    with pytest.raises(DataError, match="--modality must be one of CT, MR, PET, got 'T1'"):
        discover(tmp_path, modality="T1")
    with pytest.raises(DataError, match="--modality must be one of"):
        StoreOptions(modality="T1")
    assert discover(tmp_path, modality="pet").modality == "PET"


def test_small_volumes_are_zero_padded_mr_is_z_scored(tmp_path):
    volume = np.random.default_rng(0).normal(5, 2, (20, 24, 16)).astype(np.float32)
    save(tmp_path / "small.nii.gz", volume)
    volumes = open_store(prepare(tmp_path, StoreOptions(modality="MR"), tmp_path / "s"))
    item = RandomCrops(volumes, (32, 32, 32), seed=0, rank=0, batch_size=1, augmentation="none")[
        (0, 0, 0)
    ]["image"]
    assert item.shape == (1, 32, 32, 32)
    inner = item[0, 6:26, 4:28, 8:24].numpy()
    np.testing.assert_allclose(inner, (volume - volume.mean()) / volume.std(), atol=1e-5)
    assert float(item[0, :6].abs().max()) == 0.0


def test_bad_data_is_named(tmp_path):
    with pytest.raises(DataError, match="no .nii or .nii.gz volumes found"):
        discover(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")
    save(tmp_path / "flat.nii.gz", np.random.rand(20, 24).astype(np.float32))
    with pytest.raises(DataError, match="flat.nii.gz: expected a 3D volume"):
        prepare(tmp_path, StoreOptions(), tmp_path / "store")


def test_unreadable_file_is_named(tmp_path):
    save(tmp_path / "good.nii.gz", np.random.rand(16, 16, 16).astype(np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="broken.nii.gz: cannot be read as NIfTI"):
        prepare(tmp_path, StoreOptions(), tmp_path / "store", workers=2)


def test_properties_pickle_runs_no_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"spacing": [1.0], "x": Payload()}))
    with pytest.raises(DataError, match="evil.pkl: cannot be read.*builtins.print"):
        read_properties(tmp_path / "evil.pkl")
    plain = {"spacing": [1.5, 1.5, 2.0], "class_locations": {1: np.zeros((2, 4), np.int64)}}
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(plain))
    assert read_properties(tmp_path / "ok.pkl")["spacing"] == [1.5, 1.5, 2.0]


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
        save(
            tmp_path / "imagesTr" / f"a_{c:04d}.nii.gz",
            np.random.rand(16, 16, 16).astype(np.float32),
        )
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}}))
    dataset = discover(tmp_path)
    assert len(dataset.cases) == 1 and len(dataset.cases[0].images) == 2
    volumes = open_store(prepare(tmp_path, StoreOptions(), tmp_path / "store"))
    item = RandomCrops(volumes, (16, 16, 16), seed=0, rank=0, batch_size=1, augmentation="light")[
        (0, 0, 0)
    ]
    assert item["image"].shape == (2, 16, 16, 16)


def _paired_folders(root, shape=(12, 10, 8), cases=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        save(root / "images" / f"case{i}.nii.gz", rng.normal(size=shape).astype(np.float32))
        label = np.zeros(shape, np.uint8)
        label[2:5, 2:5, 2:5] = 1 + i % 2  # largest value: 2
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
