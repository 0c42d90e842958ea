"""``python -m anatomask_fast.guidance --checkpoint RUN --data LABELLED``: does the
teacher's anatomical mask hide anatomy, on the data as the run's training reads it?

For the EMA teacher of a pretraining checkpoint, for its student (the published EMA
moves the teacher slowly: after a short run it is still close to its start), and for
the same architecture freshly initialized with the run's seed, each in eval mode as
the published teacher, the published step's teacher pass is run on crops of
labelled volumes: a random mask (``--mask-ratio``), the teacher's per-patch errors
ranked by each rule (``--rules``; the published one is ``raw``), and the hard patches
the anatomical mask picks at ``--hard-frac``. Printed: the share of hard patches that
contain labelled structure (any label > 0) and a structure boundary (two different
labels inside the patch), against as many patches drawn at random among the teacher
pass's hidden ones (the pool the hard ones come from), as many drawn among all, and
all patches.

LABELLED is a store written with labels, an nnU-Net pre-processed folder, or a raw
labelled folder (nnU-Net raw dataset or paired ``images/`` + ``labels/``), which is
pre-processed into a store with the run's modality and spacing. Every case is
normalized with the run's saved normalization (dataset-wide CT statistics, or each
volume's own when the run normalized per volume) and cut into non-overlapping crops
of the run's crop size (centred), read by the training loader's call and batched as
in training (the published norm statistics are pooled over the batch). Anything
asked for that differs from the run (crop, normalization, mask ratio) is stated in
the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .models.anatomask import AnatoMaskNet
from .serialization import safe_load
from .train.data import DataError
from .train.guidance_probe import (
    ALL_RULES,
    PROPERTIES,
    SETS,
    GuidanceProbe,
    Rule,
    labelled_volumes,
    run_data,
)


def load_run(checkpoint: str) -> tuple[dict, dict, Path]:
    """(the checkpoint, its run config, its file) of a run folder or checkpoint file."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint_latest.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"--checkpoint: {path} does not exist (expected a pretraining "
            "run folder or its checkpoint_latest.pt / checkpoint_epoch_*.pt)"
        )
    saved = safe_load(path, "--checkpoint")  # weights_only: a foreign pickle is refused
    if "teacher" not in saved or "config" not in saved:
        found = sorted(saved)
        raise ValueError(
            f"--checkpoint: {path} is not a pretraining checkpoint (expected "
            f"'teacher' and 'config' entries, got {found})"
        )
    return saved, saved["config"], path


# The networks measured: name -> the checkpoint entry of its weights (None: initialization).
NETWORKS = {"teacher": "teacher", "student": "model", "initialization": None}


def _network(saved: dict, config: dict, device: torch.device, entry: str | None) -> AnatoMaskNet:
    torch.manual_seed(config["seed"])
    net = AnatoMaskNet(
        saved["size"],
        saved["in_channels"],
        per_sample_norm=bool(saved.get("per_sample_norm", False)),
    )
    if entry is not None:
        net.load_state_dict(saved[entry])
    return net.to(device).eval()


def training_progress(saved: dict, config: dict) -> dict:
    """Steps done and epochs done (a fraction when the run stopped inside an epoch)."""
    state = saved.get("state", {})
    steps = state.get("global_step", 0)
    per_epoch = saved.get("steps_per_epoch") or config.get("steps_per_epoch")
    epochs = steps / per_epoch if per_epoch else state.get("epoch")
    return {
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "epochs": epochs,
        "total_epochs": config.get("epochs"),
    }


def measure(args: argparse.Namespace) -> dict:
    saved, config, path = load_run(args.checkpoint)
    run = run_data(saved, config, path.parent)
    crop = tuple(args.crop) if args.crop else run.crop
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else config["mask_ratio"]
    deviations = [
        f"{what} {mine} instead of the run's {theirs}"
        for what, mine, theirs in (
            ("crop", crop, run.crop),
            ("mask ratio", mask_ratio, config["mask_ratio"]),
        )
        if mine != theirs
    ]
    volumes, normalized = labelled_volumes(
        args.data,
        run,
        out=path.parent,
        cache=Path(args.cache) if args.cache else None,
        per_volume=args.normalization == "volume",
    )
    if args.normalization == "volume":
        deviations.append("normalization per volume instead of the run's")
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    rules = [Rule.parse(name) for name in args.rules] if args.rules else list(ALL_RULES)
    probe = GuidanceProbe(
        volumes,
        crop,
        batch_size=args.batch_size or config["batch_size"],
        mask_ratio=mask_ratio,
        hard_frac=args.hard_frac,
        repeats=args.repeats,
        seed=args.seed,
        rules=rules,
    )
    from tqdm import tqdm

    networks = args.networks or list(NETWORKS)
    progress = tqdm(
        total=len(networks) * len(probe.batches) * args.repeats, desc="guidance", file=sys.stderr
    )
    results = {
        name: probe.measure(_network(saved, config, device, NETWORKS[name]), device, progress)
        for name in networks
    }
    progress.close()
    return {
        "checkpoint": str(path),
        **training_progress(saved, config),
        "data": str(args.data),
        "normalized": normalized,
        "deviations": deviations,
        "crop": list(crop),
        "crops": probe.crops,
        "hard_frac": args.hard_frac,
        "mask_ratio": mask_ratio,
        "repeats": args.repeats,
        "run_rule": Rule(
            config.get("teacher_target", "raw"), bool(config.get("teacher_foreground", False))
        ).name,
        "results": results,
    }


def _progress_text(result: dict) -> str:
    if result["steps_per_epoch"]:
        return (
            f"after {result['steps']} steps = {result['epochs']:g} epochs of "
            f"{result['steps_per_epoch']} steps (of {result['total_epochs']})"
        )
    return f"after {result['steps']} steps"


def report(result: dict) -> str:
    lines = [
        f"anatomask_fast guidance: {result['checkpoint']} ({_progress_text(result)}; "
        f"its rule: {result['run_rule']}) on {result['data']}: {result['crops']} crops of "
        f"{tuple(result['crop'])}, mask_ratio {result['mask_ratio']}, hard_frac "
        f"{result['hard_frac']}, {result['repeats']} random masks per crop",
        f"normalized: {result['normalized']}",
        "deviations from the run: " + ("; ".join(result["deviations"]) or "none"),
        "share of patches with labelled structure | with a structure boundary "
        "(hidden: random among the teacher pass's hidden patches)",
        f"{'network':<15} {'rule':<22} "
        + " | ".join(" ".join(f"{s:>6}" for s in SETS) for _ in PROPERTIES)
        + " | hard patches",
    ]
    for network, by_rule in result["results"].items():
        for rule, shares in by_rule.items():
            cells = [" ".join(f"{shares[p][s]:6.3f}" for s in SETS) for p in PROPERTIES]
            lines.append(
                f"{network:<15} {rule:<22} {' | '.join(cells)} | {shares['patches']['hard']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anatomask_fast.guidance", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="pretraining run folder (its checkpoint_latest.pt) or checkpoint file",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="labelled volumes: a store written with "
        "labels, an nnU-Net pre-processed folder, an nnU-Net raw dataset "
        "(imagesTr/, labelsTr/) or paired images/ and labels/ folders",
    )
    parser.add_argument(
        "--hard-frac",
        type=float,
        default=0.5,
        help="share of the hidden patches chosen by the teacher's error (default: 0.5)",
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=None,
        help="ranking rules: raw, normalized, centred, relative, each with "
        "an optional +foreground (default: all of them)",
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=list(NETWORKS),
        default=None,
        help="which networks to measure (default: all three)",
    )
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's")
    parser.add_argument(
        "--repeats", type=int, default=4, help="random teacher masks per crop (default: 4)"
    )
    parser.add_argument("--crop", type=int, nargs=3, default=None, help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument(
        "--normalization",
        choices=("run", "volume"),
        default="run",
        help="run: the run's saved normalization (default); volume: each "
        "volume by its own statistics, a deviation stated in the report",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="store of a raw --data (default: $ANATOMASK_CACHE/KEY, else beside the run folder)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if not 0.0 <= args.hard_frac <= 1.0:
        parser.error(f"--hard-frac must be in [0, 1], got {args.hard_frac}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        result = measure(args)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
