"""`python -m anatomask_fast.train pretrain` end to end on small settings: outputs,
exact resume, a non-finite loss, bad input, and two processes under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from anatomask_fast.models.segmentation import STUNet
from anatomask_fast.models.stunet import STUNetEncoder
from anatomask_fast.train import pretrain
from anatomask_fast.train.__main__ import main
from anatomask_fast.train.config import PretrainConfig
from anatomask_fast.train.step import NonFiniteLoss

SMALL = [
    "--crop",
    "32",
    "32",
    "32",
    "--batch-size",
    "2",
    "--phantom-cases",
    "4",
    "--workers",
    "0",
    "--epochs",
    "2",
    "--save-every",
    "1",
]


def run_cli(out, *extra):
    return main(["pretrain", "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli(out) == 0
    return out


def test_outputs(finished_run):
    out = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["size"] == "tiny" and config["crop"] == [32, 32, 32]
    assert {p.name for p in out.glob("checkpoint_*.pt")} == {
        "checkpoint_latest.pt",
        "checkpoint_epoch_0001.pt",
        "checkpoint_epoch_0002.pt",
    }
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert all(l["loss"] > 0 and 0 <= l["hard_frac"] <= 1 for l in lines)
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == [
        "epoch_0000.png",
        "epoch_0001.png",
    ]
    export = torch.load(out / "encoder.pt", weights_only=True)
    STUNetEncoder.from_size("tiny", 1).load_state_dict(export["state_dict"], strict=True)
    # The whole six-stage STU-Net for STU-Net's / nnU-Net's -pretrained_weights.
    stunet = torch.load(out / "stunet_tiny_pretrained.pth", weights_only=True)
    STUNet("tiny", 1, 2).load_state_dict(stunet["network_weights"], strict=True)
    for name, value in export["state_dict"].items():
        assert torch.equal(stunet["network_weights"][name], value), name


def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path, finished_run):
    assert run_cli(tmp_path, "--stop-after-steps", "1", "--latest-every-steps", "1") == 0
    assert torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)["state"] == {
        "epoch": 0,
        "step_in_epoch": 1,
        "global_step": 1,
    }
    assert run_cli(tmp_path, "--resume") == 0
    resumed = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    straight = torch.load(finished_run / "checkpoint_latest.pt", weights_only=True)
    for key in ("model", "teacher"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    assert resumed["state"] == straight["state"]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pretrain.patch_recon_loss

    def poisoned(rec, x, active, patch, **kw):
        loss, per_patch = real(rec, x, active, patch, **kw)
        if kw.get("norm_pix", True) and not kw.get("hidden_only"):
            calls["n"] += 1
            if calls["n"] == 2:
                loss = loss * float("nan")
        return loss, per_patch

    monkeypatch.setattr(pretrain, "patch_recon_loss", poisoned)
    config = PretrainConfig(
        out=str(tmp_path),
        crop=(32, 32, 32),
        batch_size=2,
        phantom_cases=4,
        workers=0,
        epochs=2,
        latest_every_steps=1,
    )
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 0, step 1"):
        pretrain.run(config)
    saved = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert saved["state"]["global_step"] == 1


def test_bad_input_is_reported(tmp_path, capsys, finished_run):
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no .nii or .nii.gz volumes found" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint_latest.pt").write_bytes(
        (finished_run / "checkpoint_latest.pt").read_bytes()
    )
    assert run_cli(tmp_path / "other", "--size", "S", "--resume") == 2
    assert (
        "does not fit this model (size: checkpoint has 'tiny', this run has 'S')"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_two_processes_with_torchrun_on_gloo(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "anatomask_fast.train",
        "pretrain",
        "--out",
        str(tmp_path),
        *SMALL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # 4 cases / (2 per process x 2 processes): a step per epoch
    assert (tmp_path / "checkpoint_latest.pt").exists()
