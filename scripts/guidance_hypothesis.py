"""Why does the raw teacher target rank by intensity? For the teacher of a run (or
its initialization), on labelled volumes read through the run's data path: the rank
correlation of each hidden patch's raw error with its mean squared intensity
``mean(t^2)`` and with its variance, and what the hard patches (``hard_frac`` 0.5)
are made of against random hidden ones: air (a majority of voxels at or below the
normalized value of -500 HU, CT only), dense bone (a majority above +300 HU), and
labelled structure.

    python scripts/guidance_hypothesis.py RUN LABELLED [LABELLED ...] [--initialization]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from anatomask_fast import anatomical_mask, random_mask
from anatomask_fast.guidance import NETWORKS, _network, load_run
from anatomask_fast.train.guidance_probe import (
    GuidanceProbe,
    labelled_volumes,
    patch_properties,
    run_data,
)
from anatomask_fast.train.teacher import (
    patch_means,
    patch_variance,
    ranking_errors,
    teacher_reconstruction,
)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def hu_threshold(normalization: dict, hu: float) -> float | None:
    """The normalized value of ``hu`` under a dataset-wide CT scheme (None otherwise)."""
    if normalization["scheme"] != "dataset":
        return None
    stats = normalization["channels"][0]
    return (min(max(hu, stats["lower"]), stats["upper"]) - stats["mean"]) / stats["std"]


def analyse(run_path: str, data: str, entry: str | None) -> dict:
    saved, config, path = load_run(run_path)
    run = run_data(saved, config, path.parent)
    volumes, _ = labelled_volumes(data, run, out=path.parent)
    probe = GuidanceProbe(
        volumes, (64, 64, 64), batch_size=2, mask_ratio=0.6, hard_frac=0.5, repeats=1
    )
    net = _network(saved, config, torch.device("cpu"), entry)
    air, bone = (hu_threshold(run.normalization, hu) for hu in (-500.0, 300.0))
    errors, squares, variances, kinds = [], [], [], {"hard": [], "hidden": []}
    for i, (x, label) in enumerate(probe.batches):
        shape = (x.shape[0], 1, *(s // 16 for s in x.shape[2:]))
        mask = random_mask(shape, 0.6, seed=i)
        rec = teacher_reconstruction(net, x, mask.active)
        e = ranking_errors(rec, x, mask.active, 16, target="raw")
        hidden = ~mask.active.flatten(1)
        squares.append(patch_means(x * x, 16)[hidden])
        variances.append(patch_variance(x, 16)[hidden])
        errors.append(e[hidden])
        hard = anatomical_mask(e.view(shape), 0.6, 0.5, seed=i + 1).hard.flatten(1)
        props = {"structure": patch_properties(label, 16)["structure"]}
        if air is not None:
            props["air"] = torch.nn.functional.avg_pool3d((x <= air).float(), 16).flatten(1) > 0.5
            props["bone"] = torch.nn.functional.avg_pool3d((x > bone).float(), 16).flatten(1) > 0.5
        kinds["hard"].append({k: v[hard] for k, v in props.items()})
        kinds["hidden"].append({k: v[hidden] for k, v in props.items()})
    errors, squares, variances = (torch.cat(v) for v in (errors, squares, variances))
    shares = {
        name: {k: float(torch.cat([d[k] for d in parts]).float().mean()) for k in parts[0]}
        for name, parts in kinds.items()
    }
    return {
        "patches": len(errors),
        "spearman_mean_square": spearman(errors, squares),
        "spearman_variance": spearman(errors, variances),
        "shares": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("data", nargs="+")
    parser.add_argument(
        "--initialization",
        action="store_true",
        help="the network at initialization instead of the run's teacher",
    )
    args = parser.parse_args()
    entry = None if args.initialization else NETWORKS["teacher"]
    for data in args.data:
        found = analyse(args.run, data, entry)
        shares = "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items())
            for name, s in found["shares"].items()
        )
        print(
            f"{Path(data).name}: {found['patches']} hidden patches, Spearman(raw error, "
            f"mean t^2) {found['spearman_mean_square']:.3f}, (raw error, variance) "
            f"{found['spearman_variance']:.3f}; {shares}"
        )


if __name__ == "__main__":
    main()
