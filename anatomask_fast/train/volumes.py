"""Read access to pre-processed volumes: a store of this library (see ``store``) or an
nnU-Net pre-processed configuration folder (``nnUNet_preprocessed/DatasetXXX/
nnUNetPlans_3d_fullres``: ``.b2nd`` of nnU-Net >= 2.5, ``.npy`` / ``.npz`` of older
releases). Arrays are opened memory-mapped, per process, on first use; a region
read decompresses only the chunks it touches, so memory does not grow with the
number or size of the volumes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import DataError
from .store import case_normalization, is_store


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    image: Path
    label: Path | None
    locations: Path | None  # (N, 4) rows (class, x, y, z), .npy or nnU-Net .pkl
    normalization: tuple[dict, ...]  # per channel: lower/upper (None: no clip), mean, std


def _open(path: Path):
    if path.suffix == ".b2nd":
        import blosc2

        # One decompression thread: a loader worker is one of many processes (and a
        # forked one would not have the parent's blosc2 thread pool).
        return blosc2.open(str(path), mode="r", mmap_mode="r", dparams={"nthreads": 1})
    return np.load(path, mmap_mode="r")


class Volumes:
    """The cases of a store or an nnU-Net folder, opened lazily (each DataLoader
    worker opens its own memory maps; pickling drops them)."""

    def __init__(
        self,
        entries: Sequence[Entry],
        *,
        channels: int,
        labels: dict | None,
        description: str,
        normalization: dict,
    ) -> None:
        if not entries:
            raise DataError(f"{description}: no cases")
        self.entries = tuple(entries)
        self.channels = channels
        self.labels = labels
        self.description = description
        self.normalization = normalization  # what predict needs to repeat it
        self._arrays: dict[Path, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def _opened(self) -> dict:
        """This process's open arrays (a forked worker opens its own)."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        return self._arrays

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def subset(self, names: Sequence[str]) -> Volumes:
        keep = set(names)
        return Volumes(
            [e for e in self.entries if e.name in keep],
            channels=self.channels,
            labels=self.labels,
            description=self.description,
            normalization=self.normalization,
        )

    def array(self, path: Path):
        arrays = self._opened()
        if path not in arrays:
            arrays[path] = _open(path)
        return arrays[path]

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self.array(self.entries[index].image).shape[1:])

    def region(
        self, index: int, start: Sequence[int], size: Sequence[int], label: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The normalized image (C, *size) float32 and the label map (1, *size) int64
        (or None) of case ``index`` from voxel ``start``; outside the volume: zeros."""
        entry = self.entries[index]
        shape = self.shape(index)
        inside = tuple(slice(max(0, b), min(s, b + n)) for b, n, s in zip(start, size, shape))
        at = tuple(slice(i.start - b, i.stop - b) for i, b in zip(inside, start))
        image = np.zeros((self.channels, *size), np.float32)
        if all(i.stop > i.start for i in inside):
            image[(slice(None), *at)] = normalize(
                np.asarray(self.array(entry.image)[(slice(None), *inside)]), entry.normalization
            )
        labels = None
        if label:
            if entry.label is None:
                raise DataError(f"case {entry.name!r} has no label map")
            labels = np.zeros((1, *size), np.int64)
            if all(i.stop > i.start for i in inside):
                part = np.asarray(self.array(entry.label)[(slice(None), *inside)])
                labels[(slice(None), *at)] = np.maximum(part, 0)  # nnU-Net's -1: outside
        return image, labels

    def whole(self, index: int, label: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        return self.region(index, (0, 0, 0), self.shape(index), label)

    def locations(self, index: int) -> np.ndarray:
        """(N, 4) int rows (class, x, y, z) of sampled foreground voxels."""
        entry = self.entries[index]
        if entry.locations is None:
            raise DataError(f"case {entry.name!r} has no foreground locations (no labels)")
        if entry.locations.suffix == ".npy":
            return np.load(entry.locations)
        return _pkl_locations(entry.locations)


def normalize(array: np.ndarray, channels: Sequence[dict]) -> np.ndarray:
    """Clip (when the channel has bounds) then z-score, channel by channel, in float32."""
    out = array.astype(np.float32)
    for c, stats in enumerate(channels):
        if stats.get("lower") is not None:
            np.clip(out[c], stats["lower"], stats["upper"], out=out[c])
        out[c] -= stats["mean"]
        out[c] /= max(stats["std"], 1e-8)
    return out


def open_store(root: Path) -> Volumes:
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    folder = Path(root) / "cases"
    entries = []
    for record in manifest["cases"]:
        name = record["name"]
        has_label = (folder / f"{name}_seg.b2nd").exists()
        entries.append(
            Entry(
                name,
                folder / f"{name}.b2nd",
                folder / f"{name}_seg.b2nd" if has_label else None,
                folder / f"{name}_fg.npy" if has_label else None,
                tuple(case_normalization(record, manifest)),
            )
        )
    options = manifest["options"]
    scheme = (
        "dataset"
        if options["modality"] == "CT" and options["ct_normalization"] == "dataset"
        else "volume"
    )
    return Volumes(
        entries,
        channels=manifest["cases"][0]["channels"],
        labels=manifest["labels"],
        description=f"{manifest['description']}, read from the store {root}",
        normalization={
            "scheme": scheme,
            "modality": options["modality"],
            "spacing": options["spacing"],
            "channels": manifest["normalization"],
        },
    )


# --- nnU-Net pre-processed folders ----------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtins, numpy arrays and dtypes only: nothing else is constructed,
    so no code of the file runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "slice"),
        ("builtins", "tuple"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (
            module.startswith("numpy") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def read_properties(path: Path) -> dict:
    """An nnU-Net case ``.pkl`` (spacing, class_locations, ...), plain values only."""
    try:
        return _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except Exception as error:
        raise DataError(
            f"{path}: cannot be read as an nnU-Net properties pickle ({error})"
        ) from None


def _pkl_locations(path: Path) -> np.ndarray:
    """nnU-Net's ``class_locations`` ({class: (N, 4) rows (0, x, y, z)}) as (class, x, y, z)."""
    found = read_properties(path).get("class_locations") or {}
    rows = [
        np.concatenate([np.full((len(v), 1), int(c)), np.asarray(v)[:, 1:4]], 1)
        for c, v in found.items()
        if np.asarray(v).size and not isinstance(c, tuple)
    ]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 4), np.int64)


def is_nnunet_preprocessed(folder: Path) -> bool:
    folder = Path(folder)
    return (
        folder.is_dir()
        and (folder.parent / "dataset.json").is_file()
        and any(p.suffix in (".b2nd", ".npy", ".npz") for p in folder.iterdir())
    )


def _unpack(npz: Path, cache: Path) -> tuple[Path, Path | None]:
    """An older release's ``CASE.npz`` (``data``, ``seg``) as .npy files in ``cache``
    (memory-mappable), written once."""
    from .store import _atomic

    cache.mkdir(parents=True, exist_ok=True)
    image, seg = cache / f"{npz.stem}.npy", cache / f"{npz.stem}_seg.npy"
    if not image.exists():
        with np.load(npz) as content:
            if "seg" in content:
                _atomic(seg, lambda p: np.save(open(p, "wb"), content["seg"]))
            _atomic(image, lambda p: np.save(open(p, "wb"), content["data"]))
    return image, seg if seg.exists() else None


def open_nnunet(folder: Path, cache: Path) -> Volumes:
    """An nnU-Net pre-processed configuration folder; its arrays are already
    normalized (nnU-Net's scheme), so they are read as they are."""
    folder = Path(folder)
    meta = json.loads((folder.parent / "dataset.json").read_text())
    files = sorted(folder.iterdir())
    entries = []
    for path in files:
        if path.name.endswith(("_seg.b2nd", "_seg.npy")) or path.suffix not in (
            ".b2nd",
            ".npy",
            ".npz",
        ):
            continue
        name = path.name[: -len(path.suffix)]
        if path.suffix == ".npz":
            if (folder / f"{name}.npy").exists():
                continue  # already unpacked by nnU-Net itself
            image, seg = _unpack(path, cache)
        else:
            image = path
            seg = folder / f"{name}_seg{path.suffix}"
            seg = seg if seg.exists() else None
        pkl = folder / f"{name}.pkl"
        channels = len(meta.get("channel_names") or meta.get("modality") or {"0": ""})
        entries.append(
            Entry(
                name,
                image,
                seg,
                pkl if pkl.exists() and seg else None,
                tuple(
                    {"lower": None, "upper": None, "mean": 0.0, "std": 1.0} for _ in range(channels)
                ),
            )
        )
    if not entries:
        raise DataError(f"{folder}: no nnU-Net pre-processed cases (.b2nd, .npy, .npz)")
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if isinstance(v, int)}
    plans = sorted(p.name for p in folder.parent.glob("*Plans*.json"))
    return Volumes(
        entries,
        channels=len(entries[0].normalization),
        labels=labels or None,
        description=f"nnU-Net pre-processed {folder} ({len(entries)} cases; "
        f"plans {', '.join(plans) or 'none found'})",
        normalization={"scheme": "nnunet", "channels": []},
    )


def open_volumes(path: Path, cache: Path) -> Volumes:
    """A store or an nnU-Net pre-processed folder (raw folders: ``store.prepare`` first)."""
    if is_store(path):
        return open_store(path)
    if is_nnunet_preprocessed(path):
        return open_nnunet(path, cache)
    raise DataError(
        f"{path} is neither a store (manifest.json) nor an nnU-Net pre-processed folder"
    )
