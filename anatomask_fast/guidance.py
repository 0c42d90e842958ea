"""``python -m anatomask_fast.guidance --checkpoint RUN --data LABELLED``: does the
teacher's anatomical mask hide anatomy?

For the EMA teacher of a pretraining checkpoint, for its student (the published EMA
moves the teacher slowly: after a short run it is still close to its start), and for
the same architecture freshly initialized with the run's seed, each in eval mode as
the published teacher, the published step's teacher pass is run on crops of
labelled volumes: a random mask (``--mask-ratio``), the teacher's per-patch errors,
and the hard patches the anatomical mask picks at ``--hard-frac``. Printed: the share
of hard patches that contain labelled structure (any label > 0) and a structure
boundary (two different labels inside the patch), against as many uniformly random
patches and against all patches; for the raw-patch target (published) and the
normalized one, from the same reconstructions.

LABELLED is an nnU-Net raw dataset (``imagesTr/``, ``labelsTr/``) or paired ``images/``
and ``labels/`` folders, read and normalized as in training (the run's modality and
spacing). Each volume is cut into non-overlapping crops of the run's crop size
(centred), batched as in training (the published norm statistics are pooled over the
batch).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import anatomical_mask, random_mask
from .models.anatomask import AnatoMaskNet
from .serialization import safe_load
from .train.data import DataError, discover, preprocessing
from .train.pretrain import patch_errors, teacher_reconstruction

TARGETS = ("raw", "normalized")
PROPERTIES = ("structure", "boundary")
SETS = ("hard", "random", "all")


@dataclass
class Counts:
    """Patches counted per set, and those with each property."""

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETS, 0))
    found: dict[str, dict[str, int]] = field(
        default_factory=lambda: {p: dict.fromkeys(SETS, 0) for p in PROPERTIES})

    def add(self, name: str, chosen: torch.Tensor, properties: dict[str, torch.Tensor]) -> None:
        self.total[name] += int(chosen.sum())
        for prop, has in properties.items():
            self.found[prop][name] += int((chosen & has).sum())

    def shares(self) -> dict:
        return {prop: {name: self.found[prop][name] / max(self.total[name], 1) for name in SETS}
                for prop in PROPERTIES} | {"patches": dict(self.total)}


def patch_properties(label: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """(B, L) booleans of a (B, 1, H, W, D) label map: a label > 0 in the patch, two
    different labels in the patch."""
    B, _, H, W, D = label.shape
    cells = label.view(B, H // patch, patch, W // patch, patch, D // patch, patch)
    cells = cells.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, patch ** 3)
    top, bottom = cells.amax(-1), cells.amin(-1)
    return {"structure": top > 0, "boundary": top != bottom}


def crops(volume: torch.Tensor, crop: Sequence[int]) -> list[tuple[slice, ...]]:
    """Non-overlapping crops of ``crop`` covering the centre of a (C, H, W, D) volume."""
    spatial = volume.shape[1:]
    per_axis = []
    for size, c in zip(spatial, crop):
        n = size // c
        start = (size - n * c) // 2
        per_axis.append([slice(start + i * c, start + (i + 1) * c) for i in range(n)])
    return [(slice(None), a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def labelled_batches(data: str, crop: Sequence[int], batch_size: int, modality: str,
                     spacing: Sequence[float] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, label) batches of crops of every case, pre-processed as in training."""
    dataset = discover(data, modality=modality, with_labels=True)
    transform = preprocessing(dataset, crop, spacing)
    images, labels = [], []
    for case in dataset.cases:
        item = transform({"image": str(case.images[0]) if len(case.images) == 1
                          else [str(p) for p in case.images], "label": str(case.label)})
        if item["label"].shape[1:] != item["image"].shape[1:]:
            raise DataError(f"case {case.name!r}: label shape {tuple(item['label'].shape[1:])} "
                            f"differs from the image's {tuple(item['image'].shape[1:])}")
        for window in crops(item["image"], crop):
            images.append(item["image"][window])
            labels.append(item["label"][window])
            if len(images) == batch_size:
                yield torch.stack(images), torch.stack(labels)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.stack(labels)


def count_batch(counts: dict[str, Counts], teacher: AnatoMaskNet, x: torch.Tensor,
                label: torch.Tensor, *, mask_ratio: float, hard_frac: float, seed: int) -> None:
    """One teacher pass with a random mask: hard, random and all patches counted, for
    each target."""
    patch = teacher.patch_size
    shape = (x.shape[0], 1, *(s // patch for s in x.shape[2:]))
    teacher_mask = random_mask(shape, mask_ratio, device=x.device, seed=seed)
    rec = teacher_reconstruction(teacher, x, teacher_mask.active)
    properties = {k: v.to(x.device) for k, v in patch_properties(label, patch).items()}
    everything = torch.ones_like(properties["structure"])
    generator = torch.Generator().manual_seed(seed)
    for target in TARGETS:
        errors = patch_errors(rec, x, teacher_mask.active, patch, raw_target=target == "raw")
        hard = anatomical_mask(errors.view(shape), mask_ratio, hard_frac,
                               seed=seed + 1).hard.view(x.shape[0], -1)
        n_hard = int(hard[0].sum())
        chance = torch.zeros_like(hard)
        for b in range(x.shape[0]):
            chance[b, torch.randperm(hard.shape[1], generator=generator)[:n_hard]] = True
        for name, chosen in (("hard", hard), ("random", chance), ("all", everything)):
            counts[target].add(name, chosen, properties)


def load_run(checkpoint: str) -> tuple[dict, dict]:
    """(the checkpoint, its run config) of a run folder or checkpoint file."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint_latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist (expected a pretraining "
                                "run folder or its checkpoint_latest.pt / checkpoint_epoch_*.pt)")
    saved = safe_load(path, "--checkpoint")     # weights_only: a foreign pickle is refused
    if "teacher" not in saved or "config" not in saved:
        found = sorted(saved)
        raise ValueError(f"--checkpoint: {path} is not a pretraining checkpoint (expected "
                         f"'teacher' and 'config' entries, got {found})")
    return saved, saved["config"]


# The networks measured: name -> the checkpoint entry of its weights (None: initialization).
NETWORKS = {"teacher": "teacher", "student": "model", "initialization": None}


def _network(saved: dict, config: dict, device: torch.device, entry: str | None) -> AnatoMaskNet:
    torch.manual_seed(config["seed"])
    net = AnatoMaskNet(saved["size"], saved["in_channels"],
                       per_sample_norm=bool(saved.get("per_sample_norm", False)))
    if entry is not None:
        net.load_state_dict(saved[entry])
    return net.to(device).eval()


def measure(args: argparse.Namespace) -> dict:
    saved, config = load_run(args.checkpoint)
    crop = tuple(args.crop or config["crop"])
    if any(c % 16 for c in crop):
        raise ValueError(f"--crop must be divisible by 16 in every axis, got {crop}")
    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else config["mask_ratio"]
    batches = list(labelled_batches(args.data, crop, args.batch_size or config["batch_size"],
                                    args.modality or config["modality"], config.get("spacing")))
    from tqdm import tqdm

    results = {}
    progress = tqdm(total=len(NETWORKS) * len(batches) * args.repeats, desc="guidance",
                    file=sys.stderr)
    for teacher_name, entry in NETWORKS.items():
        teacher = _network(saved, config, device, entry)
        counts = {target: Counts() for target in TARGETS}
        for r in range(args.repeats):
            for i, (x, label) in enumerate(batches):
                count_batch(counts, teacher, x.to(device), label, mask_ratio=mask_ratio,
                            hard_frac=args.hard_frac,
                            seed=int(np.random.SeedSequence([args.seed, r, i]).generate_state(1)[0]))
                progress.update(1)
        results[teacher_name] = {t: c.shares() for t, c in counts.items()}
    progress.close()
    state = saved.get("state", {})
    return {"checkpoint": str(args.checkpoint), "epochs_done": state.get("epoch"),
            "data": str(args.data), "crop": list(crop), "crops": sum(len(x) for x, _ in batches),
            "hard_frac": args.hard_frac, "mask_ratio": mask_ratio, "repeats": args.repeats,
            "results": results}


def report(result: dict) -> str:
    lines = [f"anatomask_fast guidance: {result['checkpoint']} (after "
             f"{result['epochs_done']} epochs) on {result['data']}: {result['crops']} crops of "
             f"{tuple(result['crop'])}, mask_ratio {result['mask_ratio']}, hard_frac "
             f"{result['hard_frac']}, {result['repeats']} random masks per crop",
             "share of patches with labelled structure | with a structure boundary",
             f"{'network':<15} {'target':<11} {'hard':>6} {'random':>7} {'all':>6} | "
             f"{'hard':>6} {'random':>7} {'all':>6} | hard patches"]
    for teacher, by_target in result["results"].items():
        for target, shares in by_target.items():
            cells = [f"{shares[p][s]:{w}.3f}" for p in PROPERTIES
                     for s, w in zip(SETS, (6, 7, 6))]
            lines.append(f"{teacher:<15} {target:<11} {' '.join(cells[:3])} | "
                         f"{' '.join(cells[3:])} | {shares['patches']['hard']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anatomask_fast.guidance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="pretraining run folder (its checkpoint_latest.pt) or checkpoint file")
    parser.add_argument("--data", required=True, help="labelled volumes: nnU-Net raw dataset "
                        "(imagesTr/, labelsTr/) or paired images/ and labels/ folders")
    parser.add_argument("--hard-frac", type=float, default=0.5,
                        help="share of the hidden patches chosen by the teacher's error (default: 0.5)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's")
    parser.add_argument("--repeats", type=int, default=4,
                        help="random teacher masks per crop (default: 4)")
    parser.add_argument("--crop", type=int, nargs=3, default=None, help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--modality", default=None, help="CT, MR or PET (default: the run's)")
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
