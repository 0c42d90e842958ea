"""Faults of the training CLI: a pickled payload in a checkpoint runs through no
command; broken checkpoints, volumes and output folders end in one line naming the
file, exit status 2, the last checkpoint intact and no empty run folder."""

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.models.segmentation import STUNet
from anatomask_fast.serialization import CheckpointError, safe_load
from anatomask_fast.train.__main__ import main
from anatomask_fast.train.inference import SEGMENTATION_FORMAT as FORMAT

from .test_train_finetune import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--size",
    "tiny",
    "--crop",
    "32",
    "32",
    "32",
    "--batch-size",
    "2",
    "--epochs",
    "2",
    "--phantom-cases",
    "2",
    "--workers",
    "0",
]
PRETRAIN = ["pretrain", *TINY, "--preview-every", "0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anatomask_fast.train", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        **kwargs,
    )


def error_line(stderr: str) -> str:
    """The one error line, checked to be alone and the last thing written."""
    lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def volumes(folder: Path, count: int = 2, shape=(36, 36, 36)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        nib.save(
            nib.Nifti1Image((100 * rng.standard_normal(shape)).astype(np.float32), np.eye(4)),
            folder / f"v{i}.nii.gz",
        )
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("labelled"), cases=3)


@pytest.fixture(scope="module")
def segmentation_checkpoint(tmp_path_factory):
    """A fine-tuning checkpoint as finetune writes it (tiny STU-Net, 2 classes)."""
    path = tmp_path_factory.mktemp("seg") / "checkpoint_best.pt"
    torch.save(
        {
            "format": FORMAT,
            "size": "tiny",
            "in_channels": 1,
            "num_classes": 2,
            "modality": "CT",
            "spacing": None,
            "crop": (32, 32, 32),
            "labels": {"background": 0, "organ": 1},
            "network_weights": STUNet("tiny", 1, 2).state_dict(),
        },
        path,
    )
    return path


def test_the_payload_is_real(tmp_path):
    """Control: an unrestricted torch.load of the payload does create the marker."""
    marker = tmp_path / "ran"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
            str(tmp_path / "evil.pt"),
        ],
        env=_env(),
        check=True,
        timeout=120,
    )
    assert marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        "pretrain --resume",
        "finetune --pretrained",
        "finetune --resume",
        "predict --checkpoint",
        "safe_load",
    ],
)
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, capsys, labelled, command):
    marker = tmp_path / "ran"
    evil = tmp_path / "run" / "checkpoint_latest.pt"
    evil.parent.mkdir()
    torch.save(
        {
            "format": FORMAT,
            "size": "tiny",
            "in_channels": 1,
            "num_classes": 4,
            "model": {"w": torch.zeros(1)},
            "state": Payload(marker),
        },
        evil,
    )
    run = str(evil.parent)
    if command == "safe_load":
        with pytest.raises(CheckpointError, match="refused without running them"):
            safe_load(evil)
    else:
        argv = {
            "pretrain --resume": [*PRETRAIN, "--out", run, "--resume"],
            "finetune --pretrained": [
                "finetune",
                "--data",
                str(labelled),
                "--out",
                str(tmp_path / "ft"),
                *TINY,
                "--pretrained",
                str(evil),
            ],
            "finetune --resume": [
                "finetune",
                "--data",
                str(labelled),
                "--out",
                run,
                *TINY,
                "--resume",
            ],
            "predict --checkpoint": [
                "predict",
                "--checkpoint",
                str(evil),
                "--input",
                str(labelled / "imagesTr"),
                "--output",
                str(tmp_path / "pred"),
            ],
        }[command]
        assert main(argv) == 2
        line = error_line(capsys.readouterr().err)
        assert str(evil) in line and "posix.system" in line and "refused" in line, line
    assert not marker.exists()
    assert not (tmp_path / "ft").exists() and not (tmp_path / "pred").exists()


def test_broken_checkpoints_are_named(tmp_path, capsys, labelled):
    run = tmp_path / "run"
    assert main([*PRETRAIN, "--out", str(run), "--stop-after-steps", "1"]) == 0
    latest = run / "checkpoint_latest.pt"
    assert torch.load(latest, weights_only=True)["state"]["global_step"] == 1  # resumable
    whole = latest.read_bytes()
    latest.write_bytes(whole[: len(whole) // 2])
    assert main([*PRETRAIN, "--out", str(run), "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"checkpoint {latest} cannot be read: truncated or not a PyTorch file" in line
    assert latest.read_bytes() == whole[: len(whole) // 2]  # left as it was
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    assert (
        main(
            [
                "finetune",
                "--data",
                str(labelled),
                "--out",
                str(tmp_path / "ft"),
                *TINY,
                "--pretrained",
                str(text),
            ]
        )
        == 2
    )
    assert f"encoder weights {text} cannot be read: truncated or not a PyTorch" in error_line(
        capsys.readouterr().err
    )
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("truncated", r"v1.nii.gz: cannot be read as NIfTI \(Compressed file ended"),
        ("4d", r"v1.nii.gz: expected a 3D volume, got shape \(36, 36, 36, 3\)"),
        ("nan", r"v1.nii.gz: 46656 of 46656 voxels are NaN or infinite"),
    ],
)
def test_bad_volumes_are_named_and_leave_no_run_folder(tmp_path, capsys, fault, message):
    data = volumes(tmp_path / "data")
    broken = data / "v1.nii.gz"
    if fault == "truncated":
        whole = broken.read_bytes()
        broken.write_bytes(whole[: len(whole) // 2])
    elif fault == "4d":
        nib.save(nib.Nifti1Image(np.ones((36, 36, 36, 3), np.float32), np.eye(4)), broken)
    else:
        nib.save(nib.Nifti1Image(np.full((36, 36, 36), np.nan, np.float32), np.eye(4)), broken)
    argv = [*PRETRAIN, "--data", data, "--out", tmp_path / "run", "--workers", "2"]
    if fault == "truncated":  # a process of its own: it must end with status 2, not abort
        result = cli(*argv)
        code, errors = result.returncode, result.stderr
    else:
        code, errors = main(list(map(str, argv))), capsys.readouterr().err
    assert code == 2, errors[-2000:]
    assert re.search(message, error_line(errors))
    assert not (tmp_path / "run").exists()


def test_a_truncated_label_is_named(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", cases=3)
    label = data / "labelsTr" / "c1.nii.gz"
    label.write_bytes(label.read_bytes()[:200])
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), *TINY]) == 2
    assert f"case 'c1': label {label} cannot be read as NIfTI" in error_line(
        capsys.readouterr().err
    )
    assert not (tmp_path / "ft").exists()


def test_predict_refuses_non_finite_input(tmp_path, capsys, segmentation_checkpoint):
    data = volumes(tmp_path / "in", count=1)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(segmentation_checkpoint),
                "--input",
                str(data),
                "--output",
                str(tmp_path / "ok"),
            ]
        )
        == 0
    )
    assert nib.load(tmp_path / "ok" / "v0.nii.gz").shape == (36, 36, 36)  # control
    volume = np.full((36, 36, 36), 5.0, np.float32)
    volume[3, 4, 5] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), data / "v0.nii.gz")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(segmentation_checkpoint),
                "--input",
                str(data),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "v0.nii.gz: 1 of 46656 voxels are NaN or infinite" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder nobody may write into: permissions for a user, a read-only tmpfs for
    root (whom permissions do not stop)."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folders(tmp_path, capsys, segmentation_checkpoint):
    data = volumes(tmp_path / "in", count=1)
    with read_only(tmp_path / "locked") as locked:
        assert (
            main(
                [
                    "predict",
                    "--checkpoint",
                    str(segmentation_checkpoint),
                    "--input",
                    str(data),
                    "--output",
                    str(locked),
                ]
            )
            == 2
        )
        line = error_line(capsys.readouterr().err)
        assert f"cannot write {locked / 'v0.nii.gz'}" in line, line
        assert main([*PRETRAIN, "--out", str(locked / "run")]) == 2
        assert f"cannot create the run folder {locked / 'run'}" in error_line(
            capsys.readouterr().err
        )


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert (
        main([*PRETRAIN, "--out", str(run), "--phantom-cases", "4", "--stop-after-steps", "1"]) == 0
    )
    latest = run / "checkpoint_latest.pt"
    before = latest.read_bytes()
    # Files may not grow past 1 MB: the next checkpoint cannot be written.
    result = cli(
        *PRETRAIN,
        "--out",
        run,
        "--resume",
        "--phantom-cases",
        "4",
        "--stop-after-steps",
        "2",
        preexec_fn=_file_size_limit(2**20),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert re.search(
        f"cannot write {re.escape(str(latest))}: (File too large|the write failed "
        r"\(disk full or file size limit\?\)) \(the previous version is intact\)",
        line,
    ), line
    assert latest.read_bytes() == before
    assert not list(run.glob(".*.tmp"))
