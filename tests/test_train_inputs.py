"""What --data accepts, end to end through the CLI: a dataset that the real nnunetv2
package planned and pre-processed, the `preprocess` subcommand and its store, a
single volume filling its batch, a bad --modality."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.train.__main__ import main
from anatomask_fast.train.phantom import make_case
from anatomask_fast.train.sampling import RandomCrops
from anatomask_fast.train.volumes import open_nnunet

from .helpers import nnunet_dataset

TINY = [
    "--size",
    "tiny",
    "--crop",
    "32",
    "32",
    "32",
    "--workers",
    "0",
    "--epochs",
    "2",
    "--preview-every",
    "0",
    "--save-every",
    "0",
    "--warmup-epochs",
    "0",
]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def nnunet_preprocessed(tmp_path_factory):
    """Two small phantom cases planned and pre-processed (3d_fullres) by nnunetv2."""
    return nnunet_dataset(tmp_path_factory.mktemp("nnunet")) / "nnUNetPlans_3d_fullres"


@pytest.mark.slow
def test_pretraining_on_a_dataset_nnunetv2_preprocessed(nnunet_preprocessed, tmp_path):
    import blosc2

    assert sorted(p.name for p in nnunet_preprocessed.glob("*.b2nd")) == [
        "case0.b2nd",
        "case0_seg.b2nd",
        "case1.b2nd",
        "case1_seg.b2nd",
    ]
    volumes = open_nnunet(nnunet_preprocessed, tmp_path / "cache")
    assert volumes.names == ["case0", "case1"] and volumes.labels["spleen"] == 3
    crops = RandomCrops(volumes, (32, 32, 32), seed=0, rank=0, batch_size=2, augmentation="none")
    for key in [(0, 0, 0), (0, 1, 1)]:
        index, start, _, _ = crops.draw(key)
        stored = blosc2.open(str(nnunet_preprocessed / f"case{index}.b2nd"))
        region = tuple(slice(b, b + 32) for b in start)
        assert torch.equal(crops[key]["image"], torch.from_numpy(stored[(slice(None), *region)]))
    # nnU-Net's class locations, read from its pickle without running it
    table = volumes.locations(0)
    seg = blosc2.open(str(nnunet_preprocessed / "case0_seg.b2nd"))[0]
    assert set(table[:, 0].tolist()) == {1, 2, 3}
    assert all(seg[tuple(row[1:])] == row[0] for row in table[:50])

    # Older releases' layout: CASE.npz holding "data" and "seg" (unpacked once to .npy)
    old = tmp_path / "Dataset017_Phantom" / "nnUNetPlans_3d_fullres"
    old.mkdir(parents=True)
    (old.parent / "dataset.json").write_text(
        (nnunet_preprocessed.parent / "dataset.json").read_text()
    )
    for name in volumes.names:
        np.savez_compressed(
            old / f"{name}.npz",
            data=blosc2.open(str(nnunet_preprocessed / f"{name}.b2nd"))[:],
            seg=blosc2.open(str(nnunet_preprocessed / f"{name}_seg.b2nd"))[:],
        )
    older = RandomCrops(
        open_nnunet(old, tmp_path / "unpacked"),
        (32, 32, 32),
        seed=0,
        rank=0,
        batch_size=2,
        augmentation="none",
    )
    assert torch.equal(older[(0, 1, 1)]["image"], crops[(0, 1, 1)]["image"])
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == [
        "case0.npy",
        "case0_seg.npy",
        "case1.npy",
        "case1_seg.npy",
    ]

    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(nnunet_preprocessed),
                "--out",
                str(out),
                *TINY,
                "--batch-size",
                "2",
                "--steps-per-epoch",
                "1",
            ]
        )
        == 0
    )
    lines = metrics(out)
    assert [l["step"] for l in lines] == [1, 2] and all(l["batch_size"] == 2 for l in lines)
    assert all(np.isfinite(l["loss"]) for l in lines)


def test_preprocess_command_then_a_single_volume_fills_its_batch(tmp_path, capsys):
    image, _ = make_case(3)
    (tmp_path / "raw").mkdir()
    nib.save(
        nib.Nifti1Image(image[:48, :48, :40].astype(np.int16), np.eye(4)),
        tmp_path / "raw" / "only.nii.gz",
    )
    store = tmp_path / "store"
    assert (
        main(["preprocess", "--data", str(tmp_path / "raw"), "--out", str(store), "--workers", "0"])
        == 0
    )
    assert "1 case(s)" in capsys.readouterr().out
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["cases"][0]["shape"] == [48, 48, 40]
    assert manifest["cases"][0]["dtype"] == "int16"  # integer CT kept as it is
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(store),
                "--out",
                str(out),
                *TINY,
                "--batch-size",
                "3",
                "--steps-per-epoch",
                "1",
            ]
        )
        == 0
    )
    lines = metrics(out)
    assert [l["batch_size"] for l in lines] == [3, 3]


def test_raw_folder_is_preprocessed_once_into_the_cache(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    image, _ = make_case(4)
    nib.save(nib.Nifti1Image(image[:40, :40, :40], np.eye(4)), tmp_path / "raw" / "a.nii.gz")
    args = [
        "pretrain",
        "--data",
        str(tmp_path / "raw"),
        *TINY,
        "--batch-size",
        "1",
        "--steps-per-epoch",
        "1",
        "--augmentation",
        "none",
        "--cache",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    assert "preprocess: 100%" in capsys.readouterr().out  # the store's progress bar
    record = tmp_path / "c" / "cases" / "a.json"
    written = record.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "r2")]) == 0
    assert "preprocess:" not in capsys.readouterr().out
    assert record.stat().st_mtime_ns == written


def test_bad_modality_is_reported(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "raw" / "a.nii.gz"
    )
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "pretrain",
                "--data",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "r"),
                "--modality",
                "T1",
                *TINY,
            ]
        )
    assert stop.value.code == 2 and not (tmp_path / "r").exists()
    assert (
        "argument --modality: invalid choice: 'T1' (choose from 'CT', 'MR', 'PET')"
        in capsys.readouterr().err
    )
