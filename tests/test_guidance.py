"""The guidance measurement on a tiny pretraining run of the labelled phantom: the
report's input tensors are the training loader's (same case and window, the run's
dataset-wide CT normalization, not the labelled data's own), its format and counts
(all-patch shares against a direct count on the label files, hard-patch counts
against the mask counts), epochs counted from the steps, the per-patch properties
against a loop, and the measurement during pretraining (metrics.jsonl records and the
plot)."""

import json
import struct

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.guidance import load_run
from anatomask_fast.guidance import main as guidance
from anatomask_fast.train.__main__ import main as train
from anatomask_fast.train.config import PretrainConfig
from anatomask_fast.train.data import DataError
from anatomask_fast.train.guidance_probe import (
    ALL_RULES,
    GuidanceProbe,
    TrainingGuidance,
    labelled_volumes,
    patch_properties,
    read_window,
    run_data,
    windows,
)
from anatomask_fast.train.inputs import job_volumes
from anatomask_fast.train.phantom import VERSION
from anatomask_fast.train.runtime import Runtime
from anatomask_fast.train.sampling import RandomCrops

CROP = (32, 32, 32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 epochs of 1 step, stopped after 2 steps (inside epoch 1), measuring its
    guidance at initialization and after every step on the phantom it trains on."""
    out = tmp_path_factory.mktemp("guidance_run")
    data = out / "data" / f"phantom_v{VERSION}_n2_s0"
    assert (
        train(
            [
                "pretrain",
                "--out",
                str(out),
                "--crop",
                *map(str, CROP),
                "--batch-size",
                "2",
                "--phantom-cases",
                "2",
                "--workers",
                "0",
                "--epochs",
                "3",
                "--steps-per-epoch",
                "1",
                "--stop-after-steps",
                "2",
                "--preview-every",
                "0",
                "--guidance-data",
                str(data),
                "--guidance-every",
                "1",
            ]
        )
        == 0
    )
    return out, data


def test_report_reads_the_training_loaders_tensors(tiny_run):
    run, data = tiny_run
    saved, config, _ = load_run(str(run))
    inputs = run_data(saved, config, run)
    assert inputs.normalization["scheme"] == "dataset" and inputs.crop == CROP
    resolved = PretrainConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    )
    training = job_volumes(resolved, run, Runtime(torch.device("cpu")))
    assert training.normalization == inputs.normalization
    loader = RandomCrops(training, CROP, seed=3, rank=0, batch_size=2, augmentation="none")
    labelled, how = labelled_volumes(data, inputs, out=run)
    assert how.startswith("the run's dataset-wide CT normalization")
    own, _ = labelled_volumes(data, inputs, out=run, per_volume=True)
    for key in [(0, 0, 0), (0, 0, 1), (2, 5, 1), (7, 1, 0)]:
        index, start, _, _ = loader.draw(key)
        expected = loader[key]["image"]
        case = labelled.names.index(training.names[index])
        image, label = read_window(labelled, case, start, CROP)
        assert torch.equal(image, expected)
        assert label.shape == (1, *CROP) and label.dtype == torch.int64
        # The labelled data's own (per-volume) normalization is another tensor.
        assert not torch.allclose(read_window(own, case, start, CROP)[0], expected)
    probe = GuidanceProbe(labelled, CROP, batch_size=2, mask_ratio=0.6, hard_frac=0.5)
    first = windows(labelled, CROP)[0]
    assert torch.equal(probe.batches[0][0][0], read_window(labelled, *first, CROP)[0])


def test_a_checkpoint_without_its_normalization_reads_the_runs_store(tiny_run, tmp_path):
    run, data = tiny_run
    saved, config, _ = load_run(str(run))
    expected = run_data(saved, config, run)
    older = {k: v for k, v in saved.items() if k != "normalization"}
    assert run_data(older, config, run) == expected
    gone = run_data(older, config, tmp_path)  # no store beside this folder
    assert gone.normalization["scheme"] == "unknown"
    with pytest.raises(DataError, match="holds no 'normalization'"):
        labelled_volumes(data, gone, out=tmp_path)


def direct_all_shares(data, crop=32, patch=16):
    """Share of patches with a label > 0 / two labels, over the centred crops."""
    structure = boundary = total = 0
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        label = np.asanyarray(nib.load(path).dataobj)
        starts = [(s - s // crop * crop) // 2 for s in label.shape]
        counts = [s // crop for s in label.shape]
        for i in range(counts[0] * crop // patch):
            for j in range(counts[1] * crop // patch):
                for k in range(counts[2] * crop // patch):
                    cell = label[
                        starts[0] + i * patch : starts[0] + (i + 1) * patch,
                        starts[1] + j * patch : starts[1] + (j + 1) * patch,
                        starts[2] + k * patch : starts[2] + (k + 1) * patch,
                    ]
                    structure += cell.max() > 0
                    boundary += cell.max() != cell.min()
                    total += 1
    return structure / total, boundary / total, total


def test_report_format_and_shares_from_the_data(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    report = tmp_path / "guidance.json"
    assert (
        guidance(
            ["--checkpoint", str(run), "--data", str(data), "--repeats", "1", "--json", str(report)]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    # Stopped inside epoch 1 after 2 steps: 2 epochs of 1 step ran.
    assert lines[0].startswith(
        f"anatomask_fast guidance: {run}/checkpoint_latest.pt (after 2 "
        "steps = 2 epochs of 1 steps (of 3); its rule: raw)"
    )
    assert lines[1].startswith("normalized: the run's dataset-wide CT normalization (clip [")
    assert lines[2] == "deviations from the run: none"
    assert lines[4].split() == [
        "network",
        "rule",
        *["hard", "hidden", "random", "all", "|"] * 2,
        "hard",
        "patches",
    ]
    rows = [line.split() for line in lines[5:]]
    assert [r[:2] for r in rows] == [
        [n, rule.name] for n in ("teacher", "student", "initialization") for rule in ALL_RULES
    ]
    result = json.loads(report.read_text())
    structure, boundary, total = direct_all_shares(data)
    crops = result["crops"]
    assert total == crops * 8 and 0 < structure < 1
    # L = 8 patches a crop: len_keep = round(8 * 0.4) = 3, n_hard = floor(5 * 0.5) = 2
    for network, by_rule in result["results"].items():
        for rule, shares in by_rule.items():
            assert shares["patches"] == {
                "hard": 2 * crops,
                "hidden": 2 * crops,
                "random": 2 * crops,
                "all": total,
            }
            assert shares["structure"]["all"] == pytest.approx(structure, abs=1e-12)
            assert shares["boundary"]["all"] == pytest.approx(boundary, abs=1e-12)
            for prop in ("structure", "boundary"):
                assert all(0.0 <= v <= 1.0 for v in shares[prop].values())
            row = next(r for r in rows if r[:2] == [network, rule])
            assert float(row[2]) == pytest.approx(shares["structure"]["hard"], abs=5e-4)
            assert float(row[10]) == pytest.approx(shares["boundary"]["all"], abs=5e-4)
            assert int(row[12]) == shares["patches"]["hard"]


def test_a_deviation_is_stated(tiny_run, capsys):
    run, data = tiny_run
    assert (
        guidance(
            [
                "--checkpoint",
                str(run),
                "--data",
                str(data),
                "--repeats",
                "1",
                "--networks",
                "teacher",
                "--rules",
                "raw",
                "--crop",
                "32",
                "32",
                "48",
                "--normalization",
                "volume",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("normalized: each volume by its own statistics (asked for")
    assert lines[2] == (
        "deviations from the run: crop (32, 32, 48) instead of the run's "
        "(32, 32, 32); normalization per volume instead of the run's"
    )
    assert [line.split()[:2] for line in lines[5:]] == [["teacher", "raw"]]


def test_guidance_during_pretraining(tiny_run, tmp_path):
    run, data = tiny_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "guidance" in r]
    # At initialization and after each of the two steps (epochs of one step).
    assert [(r["step"], r["guidance"]["epochs"]) for r in measured] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
    ]
    for record in measured:
        shares = record["guidance"]["teacher"]["raw"]
        assert record["guidance"]["rule"] == "raw" and record["guidance"]["hard_frac"] == 0.5
        assert shares["patches"]["hard"] == 2 * record["guidance"]["crops"]
        assert all(0.0 <= v <= 1.0 for v in shares["structure"].values())
    # The standalone report gives the same numbers for the checkpoint of step 2.
    report = tmp_path / "report.json"
    assert (
        guidance(
            [
                "--checkpoint",
                str(run),
                "--data",
                str(data),
                "--repeats",
                "1",
                "--networks",
                "teacher",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    standalone = json.loads(report.read_text())["results"]["teacher"]
    assert standalone == measured[-1]["guidance"]["teacher"]
    plot = (run / "previews" / "guidance.png").read_bytes()
    assert plot[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", plot[16:24])
    assert width > 600 and height > 300


def test_when_guidance_is_measured():
    every = TrainingGuidance.__new__(TrainingGuidance)
    every.every = 3
    assert [s for s in range(1, 10) if every.due(s, epoch_end=False)] == [3, 6, 9]
    assert not every.due(3, epoch_end=True)  # not twice at an epoch's end
    per_epoch = TrainingGuidance.__new__(TrainingGuidance)
    per_epoch.every = 0
    assert per_epoch.due(7, epoch_end=True) and not per_epoch.due(7, epoch_end=False)


def test_patch_properties_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 8, 12, 4, generator=gen) < 0.05).long() * 3
    label[1, 0, 4:8, 0:4, 0:4] = 2  # one constant labelled patch
    props = patch_properties(label, 4)
    cells = [(b, i, j, k) for b in range(2) for i in range(2) for j in range(3) for k in range(1)]
    for b, i, j, k in cells:
        cell = label[b, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, 4 * k : 4 * k + 4]
        index = (i * 3 + j) * 1 + k
        assert props["structure"][b, index] == bool(cell.max() > 0)
        assert props["boundary"][b, index] == bool(cell.max() != cell.min())
    assert props["structure"][1, 3] and not props["boundary"][1, 3]


def test_bad_arguments_are_named(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    assert guidance(["--checkpoint", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert guidance(["--checkpoint", str(run), "--data", str(tmp_path)]) == 2
    assert "labels cannot be paired" in capsys.readouterr().err
    assert guidance(["--checkpoint", str(run), "--data", str(data), "--rules", "loud"]) == 2
    assert "a guidance rule must be one of raw[+foreground]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        guidance(["--checkpoint", str(run), "--data", str(data), "--hard-frac", "1.5"])
    assert "--hard-frac must be in [0, 1], got 1.5" in capsys.readouterr().err
