"""Measuring the anatomical mask on labelled data read as a run's training reads it:
the share of the teacher's hard patches that hold labelled structure (any label > 0)
or a structure boundary (two labels in the patch), against random patches.

The data path is training's: labelled volumes come from a store (a raw labelled
folder is pre-processed into one with the run's modality and spacing), every case is
normalized with the run's saved normalization (``Volumes.normalization``: the
dataset-wide CT statistics of the run's store, or each volume's own statistics when
the run normalized per volume), and crops are read with ``Volumes.region``, the call
the training loader makes (without augmentation). Used by ``python -m
anatomask_fast.guidance`` and by ``pretrain --guidance-data`` (per epoch or every N
steps, into ``metrics.jsonl`` and ``previews/guidance.png``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import anatomical_mask, random_mask
from .data import DataError
from .store import StoreOptions, default_cache, is_store, prepare
from .teacher import TARGETS, ranking_errors, teacher_reconstruction
from .volumes import Volumes, is_nnunet_preprocessed, open_store, open_volumes

PROPERTIES = ("structure", "boundary")
# hard: the anatomical mask's loss-chosen patches; hidden: as many drawn uniformly among
# the teacher pass's hidden patches (the pool the hard ones come from); random: as many
# drawn uniformly among all patches; all: every patch.
SETS = ("hard", "hidden", "random", "all")


@dataclass(frozen=True)
class Rule:
    """A ranking rule of the teacher's errors (see ``train.teacher``)."""

    target: str = "raw"
    foreground: bool = False

    @property
    def name(self) -> str:
        return self.target + ("+foreground" if self.foreground else "")

    @classmethod
    def parse(cls, name: str) -> Rule:
        target, _, extra = name.partition("+")
        if target not in TARGETS or extra not in ("", "foreground"):
            choices = ", ".join(f"{t}[+foreground]" for t in TARGETS)
            raise ValueError(f"a guidance rule must be one of {choices}, got {name!r}")
        return cls(target, extra == "foreground")


ALL_RULES = tuple(Rule(t, f) for t in TARGETS for f in (False, True))


@dataclass
class Counts:
    """Patches counted per set, and those with each property."""

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETS, 0))
    found: dict[str, dict[str, int]] = field(
        default_factory=lambda: {p: dict.fromkeys(SETS, 0) for p in PROPERTIES}
    )

    def add(self, name: str, chosen: torch.Tensor, properties: dict[str, torch.Tensor]) -> None:
        self.total[name] += int(chosen.sum())
        for prop, has in properties.items():
            self.found[prop][name] += int((chosen & has).sum())

    def shares(self) -> dict:
        return {
            prop: {name: self.found[prop][name] / max(self.total[name], 1) for name in SETS}
            for prop in PROPERTIES
        } | {"patches": dict(self.total)}


def patch_properties(label: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """(B, L) booleans of a (B, 1, H, W, D) label map: a label > 0 in the patch, two
    different labels in the patch."""
    B, _, H, W, D = label.shape
    cells = label.view(B, H // patch, patch, W // patch, patch, D // patch, patch)
    cells = cells.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, patch**3)
    top, bottom = cells.amax(-1), cells.amin(-1)
    return {"structure": top > 0, "boundary": top != bottom}


# --- the run's data path ------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """How a run's training read its data, from its checkpoint."""

    crop: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    modality: str
    ct_normalization: str
    normalization: dict  # the run's Volumes.normalization


def run_data(saved: dict, config: dict, run_folder: Path) -> RunData:
    """The run's data path; its normalization as saved in the checkpoint (runs from
    before it was saved: read from the run's store, scheme "unknown" if it is gone)."""
    normalization = saved.get("normalization") or _store_normalization(config, run_folder)
    spacing = normalization.get("spacing") or config.get("spacing")  # the store's
    return RunData(
        tuple(config["crop"]),
        tuple(spacing) if spacing else None,
        normalization.get("modality", config["modality"]),
        config.get("ct_normalization", "dataset"),
        normalization,
    )


def _store_normalization(config: dict, run_folder: Path) -> dict:
    """The normalization of the store a run read: its --data or --cache, else the
    default cache of its raw data (or embedded phantom) beside the run folder."""
    data = config.get("data")
    if data is None:
        data = next(iter(sorted((run_folder / "data").glob("phantom_*"))), None)
    candidates = [Path(p) for p in (data, config.get("cache")) if p]
    if data is not None:
        options = StoreOptions(
            modality=config["modality"],
            spacing=config.get("spacing"),
            ct_normalization=config.get("ct_normalization", "dataset"),
        )
        candidates.append(default_cache(data, options, run_folder))
    for candidate in candidates:
        if is_store(candidate) or is_nnunet_preprocessed(candidate):
            return open_volumes(candidate, candidate).normalization
    return {"scheme": "unknown", "modality": config["modality"]}


def labelled_volumes(
    data: str | Path,
    run: RunData,
    *,
    out: Path,
    cache: Path | None = None,
    per_volume: bool = False,
) -> tuple[Volumes, str]:
    """Labelled volumes read as the run's training reads its data, and a sentence
    saying how they were normalized. ``data``: a store with labels, an nnU-Net
    pre-processed folder, or a raw labelled folder (nnU-Net raw dataset or paired
    ``images/`` + ``labels/``), pre-processed into a store (``cache``, default
    ``$ANATOMASK_CACHE/KEY`` or ``OUT/../.store/KEY``) with the run's modality and
    spacing. ``per_volume``: a deviation asked for, each volume normalized by its own
    statistics (CT: clipped to its 0.5 / 99.5 percentiles) instead of the run's."""
    path = Path(data)
    if is_store(path) or is_nnunet_preprocessed(path):
        if per_volume:
            raise DataError("--normalization volume needs the raw labelled folder as --data")
        volumes = open_volumes(path, cache or out / ".unpacked")
    else:
        options = StoreOptions(
            modality=run.modality,
            spacing=run.spacing,
            ct_normalization="volume" if per_volume else run.ct_normalization,
            with_labels=True,
        )
        root = cache or default_cache(path, options, out)
        volumes = open_store(prepare(path, options, root, workers=0))
    if any(entry.label is None for entry in volumes.entries):
        raise DataError(
            f"--data {path}: every case needs a label map (a store written with "
            "--labels, or a labelled folder)"
        )
    if per_volume:
        return volumes, (
            "each volume by its own statistics (asked for; the run's scheme is "
            f"{run.normalization['scheme']!r})"
        )
    return matched(volumes, run.normalization)


def matched(volumes: Volumes, normalization: dict) -> tuple[Volumes, str]:
    """``volumes`` normalized as the run's training normalized its data."""
    scheme = normalization["scheme"]
    if scheme == "unknown":
        raise DataError(
            "the checkpoint holds no 'normalization' (a run from before it was "
            "saved) and the store it read is not found (its --data, --cache or "
            "default cache); measure with --normalization volume (a deviation), "
            "or rerun the pretraining"
        )
    if scheme == "dataset":
        channels = tuple(normalization["channels"])
        if len(channels) != volumes.channels:
            raise DataError(
                f"the run's normalization has {len(channels)} channel(s), the "
                f"labelled data {volumes.channels}"
            )
        entries = [dataclasses.replace(e, normalization=channels) for e in volumes.entries]
        stats = ", ".join(
            f"clip [{c['lower']:.1f}, {c['upper']:.1f}], mean {c['mean']:.1f}, std {c['std']:.1f}"
            for c in channels
        )
        return Volumes(
            entries,
            channels=volumes.channels,
            labels=volumes.labels,
            description=volumes.description,
            normalization=normalization,
        ), f"the run's dataset-wide CT normalization ({stats})"
    if volumes.normalization["scheme"] != scheme:
        raise DataError(
            f"the run normalized its data by the scheme {scheme!r}, the labelled "
            f"data is stored by {volumes.normalization['scheme']!r}: give the raw "
            "labelled folder (or, for an nnU-Net run, its pre-processed folder)"
        )
    what = (
        "each volume by its own statistics, as the run"
        if scheme == "volume"
        else "nnU-Net's pre-processed values, as the run read them"
    )
    return volumes, what


def windows(volumes: Volumes, crop: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """(case, region start) of non-overlapping crops covering the centre of every case;
    an axis shorter than the crop gets one crop centred on it (zero-padded, as the
    training loader pads)."""
    found = []
    for index in range(len(volumes)):
        starts = []
        for size, c in zip(volumes.shape(index), crop):
            n = max(1, size // c)
            first = (size - n * c) // 2
            starts.append([first + i * c for i in range(n)])
        found += [(index, (a, b, d)) for a in starts[0] for b in starts[1] for d in starts[2]]
    return found


def read_window(
    volumes: Volumes, index: int, start: Sequence[int], crop: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (C, *crop) image and (1, *crop) label of a window, by the loader's call."""
    image, label = volumes.region(index, start, crop, label=True)
    return torch.from_numpy(image), torch.from_numpy(label)


# --- measuring ------------------------------------------------------------------------


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class GuidanceProbe:
    """The windows of labelled volumes, read once, batched; :meth:`measure` runs a
    network as the teacher on them (a random mask, ``repeats`` times) and counts
    hard, hidden-random, random and all patches for every rule."""

    def __init__(
        self,
        volumes: Volumes,
        crop: Sequence[int],
        *,
        batch_size: int,
        mask_ratio: float,
        hard_frac: float,
        repeats: int = 1,
        seed: int = 0,
        rules: Sequence[Rule] = ALL_RULES,
    ) -> None:
        if any(c % 16 for c in crop):
            raise ValueError(
                f"the guidance crop must be divisible by 16 in every axis, got {tuple(crop)}"
            )
        self.crop, self.mask_ratio, self.hard_frac = tuple(crop), mask_ratio, hard_frac
        self.repeats, self.seed, self.rules = repeats, seed, tuple(rules)
        read = [read_window(volumes, i, s, crop) for i, s in windows(volumes, crop)]
        self.crops = len(read)
        self.batches = [
            (
                torch.stack([x for x, _ in read[k : k + batch_size]]),
                torch.stack([y for _, y in read[k : k + batch_size]]),
            )
            for k in range(0, len(read), batch_size)
        ]

    def measure(
        self, network: torch.nn.Module, device: torch.device | None = None, progress=None
    ) -> dict[str, dict]:
        """{rule name: shares} for ``network`` as the teacher (eval mode)."""
        device = device or next(network.parameters()).device
        counts = {rule.name: Counts() for rule in self.rules}
        for r in range(self.repeats):
            for i, (x, label) in enumerate(self.batches):
                self._count(counts, network, x.to(device), label, _seed(self.seed, r, i))
                if progress is not None:
                    progress.update(1)
        return {name: c.shares() for name, c in counts.items()}

    def _count(
        self,
        counts: dict[str, Counts],
        network: torch.nn.Module,
        x: torch.Tensor,
        label: torch.Tensor,
        seed: int,
    ) -> None:
        patch = network.patch_size
        shape = (x.shape[0], 1, *(s // patch for s in x.shape[2:]))
        teacher_mask = random_mask(shape, self.mask_ratio, device=x.device, seed=seed)
        rec = teacher_reconstruction(network, x, teacher_mask.active)
        properties = {k: v.to(x.device) for k, v in patch_properties(label, patch).items()}
        hidden_pool = ~teacher_mask.active.view(x.shape[0], -1)
        everything = torch.ones_like(hidden_pool)
        generator = torch.Generator().manual_seed(seed)
        for rule in self.rules:
            errors = ranking_errors(
                rec, x, teacher_mask.active, patch, target=rule.target, foreground=rule.foreground
            )
            hard = anatomical_mask(
                errors.view(shape), self.mask_ratio, self.hard_frac, seed=seed + 1
            ).hard.view(x.shape[0], -1)
            n_hard = int(hard[0].sum())
            chosen = {
                "hard": hard,
                "hidden": _draw(hidden_pool, n_hard, generator),
                "random": _draw(everything, n_hard, generator),
                "all": everything,
            }
            for name, patches in chosen.items():
                counts[rule.name].add(name, patches, properties)


def _draw(pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L) bool: ``n`` patches a row drawn uniformly among the True ones of ``pool``."""
    out = torch.zeros_like(pool)
    for b in range(pool.shape[0]):
        candidates = pool[b].nonzero().flatten().cpu()
        pick = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
        out[b, pick.to(pool.device)] = True
    return out


# --- during pretraining --------------------------------------------------------------


def plot(metrics: Path, path: Path, rule: str, data: str) -> Path | None:
    """``previews/guidance.png``: the teacher's hard / hidden-random / random shares of
    structure and boundary patches against epochs, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "guidance" in r]
    if not rows:
        return None
    epochs = [r["guidance"]["epochs"] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, prop in zip(axes, PROPERTIES):
        for name, style in (("hard", "-o"), ("hidden", "--s"), ("random", ":^")):
            axis.plot(
                epochs,
                [r["guidance"]["teacher"][rule][prop][name] for r in rows],
                style,
                label={
                    "hard": "hard (teacher's top errors)",
                    "hidden": "random among hidden",
                    "random": "random",
                }[name],
                markersize=4,
            )
        axis.set_title(
            f"patches with a {'labelled structure' if prop == 'structure' else 'structure boundary'}"
        )
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of chosen patches")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        f"Anatomical guidance of the EMA teacher during pretraining "
        f"(rule {rule}, on {Path(data).name})"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class TrainingGuidance:
    """``pretrain --guidance-data LABELLED [--guidance-every N]``: the teacher measured
    at initialization and every N steps (0: at every epoch's end) on the labelled
    volumes, read with the run's own normalization and crop, at ``hard_frac`` =
    ``--hard-max`` whatever the schedule's current value; each measurement is a
    ``guidance`` record in ``metrics.jsonl`` and redraws ``previews/guidance.png``."""

    def __init__(self, config, normalization: dict, out: Path, steps_per_epoch: int) -> None:
        spacing = normalization.get("spacing") or config.spacing
        run = RunData(
            tuple(config.crop),
            tuple(spacing) if spacing else None,
            normalization.get("modality", config.modality),
            config.ct_normalization,
            normalization,
        )
        volumes, self.normalized = labelled_volumes(config.guidance_data, run, out=out)
        self.rule = Rule(config.teacher_target, config.teacher_foreground)
        self.probe = GuidanceProbe(
            volumes,
            config.crop,
            batch_size=config.batch_size,
            mask_ratio=config.mask_ratio,
            hard_frac=config.hard_max,
            seed=config.seed,
        )
        self.every, self.steps_per_epoch = config.guidance_every, steps_per_epoch
        self.data, self.out = config.guidance_data, out

    def due(self, global_step: int, epoch_end: bool) -> bool:
        if epoch_end:
            return not self.every
        return bool(self.every) and global_step % self.every == 0

    def record(self, teacher: torch.nn.Module, state, metrics) -> dict:
        results = self.probe.measure(teacher)
        record = {
            "epochs": state.global_step / self.steps_per_epoch,
            "rule": self.rule.name,
            "hard_frac": self.probe.hard_frac,
            "crops": self.probe.crops,
            "normalized": self.normalized,
            "teacher": results,
        }
        metrics.write(state.global_step, {"epoch": state.epoch, "guidance": record})
        plot(
            self.out / "metrics.jsonl",
            self.out / "previews" / "guidance.png",
            self.rule.name,
            self.data,
        )
        return record
