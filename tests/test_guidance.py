"""The guidance report (``python -m anatomask_fast.guidance``) on a tiny pretraining
run of the labelled phantom: output format, shares in [0, 1] computed from the data
(all-patch shares against a direct count on the label files, hard-patch counts
against the mask counts), and the per-patch properties against a brute-force loop."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_fast.guidance import main as guidance
from anatomask_fast.guidance import patch_properties
from anatomask_fast.train.__main__ import main as train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guidance_run")
    assert train(["pretrain", "--out", str(out), "--crop", "32", "32", "32", "--batch-size", "2",
                  "--phantom-cases", "2", "--workers", "0", "--epochs", "2",
                  "--steps-per-epoch", "1", "--preview-every", "0"]) == 0
    return out, next((out / "data").glob("phantom_*"))


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
                    cell = label[starts[0] + i * patch:starts[0] + (i + 1) * patch,
                                 starts[1] + j * patch:starts[1] + (j + 1) * patch,
                                 starts[2] + k * patch:starts[2] + (k + 1) * patch]
                    structure += cell.max() > 0
                    boundary += cell.max() != cell.min()
                    total += 1
    return structure / total, boundary / total, total


def test_report_format_and_shares_from_the_data(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    report = tmp_path / "guidance.json"
    assert guidance(["--checkpoint", str(run), "--data", str(data), "--repeats", "1",
                     "--json", str(report)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"anatomask_fast guidance: {run} (after 2 epochs)")
    assert lines[2].split() == ["network", "target", "hard", "random", "all", "|", "hard",
                                "random", "all", "|", "hard", "patches"]
    rows = [line.split() for line in lines[3:]]
    assert [r[:2] for r in rows] == [[n, t] for n in ("teacher", "student", "initialization")
                                     for t in ("raw", "normalized")]
    result = json.loads(report.read_text())
    structure, boundary, total = direct_all_shares(data)
    crops = result["crops"]
    assert total == crops * 8 and 0 < structure < 1
    # L = 8 patches a crop: len_keep = round(8 * 0.4) = 3, n_hard = floor(5 * 0.5) = 2
    for network, by_target in result["results"].items():
        for target, shares in by_target.items():
            assert shares["patches"] == {"hard": 2 * crops, "random": 2 * crops,
                                         "all": total}
            assert shares["structure"]["all"] == pytest.approx(structure, abs=1e-12)
            assert shares["boundary"]["all"] == pytest.approx(boundary, abs=1e-12)
            for prop in ("structure", "boundary"):
                assert all(0.0 <= v <= 1.0 for v in shares[prop].values())
            row = next(r for r in rows if r[:2] == [network, target])
            assert float(row[2]) == pytest.approx(shares["structure"]["hard"], abs=5e-4)
            assert float(row[8]) == pytest.approx(shares["boundary"]["all"], abs=5e-4)


def test_patch_properties_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 8, 12, 4, generator=gen) < 0.05).long() * 3
    label[1, 0, 4:8, 0:4, 0:4] = 2                       # one constant labelled patch
    props = patch_properties(label, 4)
    cells = [(b, i, j, k) for b in range(2) for i in range(2) for j in range(3) for k in range(1)]
    for b, i, j, k in cells:
        cell = label[b, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4, 4 * k:4 * k + 4]
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
    with pytest.raises(SystemExit):
        guidance(["--checkpoint", str(run), "--data", str(data), "--hard-frac", "1.5"])
    assert "--hard-frac must be in [0, 1], got 1.5" in capsys.readouterr().err
