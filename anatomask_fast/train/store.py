"""The pre-processed store: every case of a raw dataset loaded once (NIfTI via
nibabel), optionally resampled, and written as a chunked, compressed blosc2 array
(``.b2nd``, nnU-Net v2's format) that training slices crops out of, plus a
``manifest.json`` (shapes, spacings, intensity statistics, source files with their
size and mtime, the normalization).

Layout of a store folder::

    manifest.json          written last, by rank 0: the store is complete
    cases/NAME.b2nd        (C, X, Y, Z) intensities, before normalization
    cases/NAME_seg.b2nd    (1, X, Y, Z) uint8 label map (with labels)
    cases/NAME_fg.npy      (N, 4) int32 rows (class, x, y, z): sampled foreground voxels
    cases/NAME_fgi.npy     (C, n) float32 sampled foreground intensities (statistics)
    cases/NAME.json        the case's record, written after its arrays: the case is done

Intensities are stored before normalization and normalized when a crop is read (the
same clip and z-score, applied to the crop), so the dataset-wide CT statistics need
one pass over the raw files, not two. Every file is written to a temporary name and
renamed, and a case counts as done only once its record exists and names the same
source sizes and mtimes: a killed run continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .data import MODALITIES, Case, DataError, Dataset, check_modality, discover, refuse_nonfinite

FORMAT = "anatomask_fast.store/1"
CT_NORMALIZATIONS = ("dataset", "volume")
CHUNK = 64  # chunk edge (voxels): a 112x112x128 crop touches 3x3x3 chunks
BLOCK = 32  # blosc2 block edge inside a chunk
FOREGROUND_SAMPLES = 10_000  # foreground intensities kept per case (nnU-Net: 10^7 / cases)
LOCATION_SAMPLES = 10_000  # voxel locations kept per class (nnU-Net's class_locations)
LABEL_MAP_VALUES = 64  # an integer volume with at most this many values is a label map


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    modality: str = "CT"
    spacing: tuple[float, float, float] | None = None
    ct_normalization: str = "dataset"
    with_labels: bool = False

    def __post_init__(self) -> None:
        check_modality(self.modality)
        if self.ct_normalization not in CT_NORMALIZATIONS:
            raise DataError(
                f"--ct-normalization must be 'dataset' or 'volume', got {self.ct_normalization!r}"
            )
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise DataError(f"--spacing must be three positive numbers (mm), got {self.spacing}")

    def as_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "modality": self.modality.upper(),
            "spacing": list(self.spacing) if self.spacing is not None else None,
        }


def default_cache(data: str | Path, options: StoreOptions, out: Path) -> Path:
    """Where the store of a raw folder goes when no --cache is given:
    ``$ANATOMASK_CACHE/<key>``, else ``<out>/../.store/<key>``; the key hashes the data
    folder's absolute path and the options, so other options get another store."""
    key = json.dumps({"data": str(Path(data).resolve()), **options.as_json()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = os.environ.get("ANATOMASK_CACHE")
    return (Path(base) if base else Path(out).resolve().parent / ".store") / digest


def _sources(case: Case) -> list[dict]:
    files = [*case.images, *([case.label] if case.label is not None else [])]
    out = []
    for path in files:
        stat = path.stat()
        out.append(
            {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
    return out


def _atomic(path: Path, write) -> None:
    """``write(temporary_path)`` then rename onto ``path``: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def _write_b2nd(array: np.ndarray, path: Path) -> None:
    import blosc2

    chunks = (array.shape[0], *(min(CHUNK, s) for s in array.shape[1:]))
    blocks = (array.shape[0], *(min(BLOCK, s) for s in array.shape[1:]))
    # blosc2 wants the .b2nd ending: a temporary .b2nd name, then the rename.
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.b2nd")
    blosc2.asarray(
        np.ascontiguousarray(array),
        urlpath=str(temporary),
        mode="w",
        chunks=chunks,
        blocks=blocks,
        cparams={"codec": blosc2.Codec.ZSTD, "clevel": 3, "nthreads": 1},
    )
    os.replace(temporary, path)


def _remove_partial(case: Case, folder: Path) -> None:
    """Temporary files a killed run left behind for ``case``."""
    for suffix in ("", "_seg", "_fg", "_fgi"):
        for stale in folder.glob(f".{case.name}{suffix}.*tmp-*"):
            stale.unlink(missing_ok=True)


def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.dtype]:
    """A NIfTI volume's array (its stored dtype when unscaled), spacing and on-disk
    dtype; a DataError naming the file when it cannot be read or is not 3D."""
    import nibabel as nib

    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
        spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
        dtype = image.header.get_data_dtype()
    except Exception as error:  # nibabel raises several types for bad files
        raise DataError(f"{path}: cannot be read as NIfTI ({error})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        refuse_nonfinite(path, int(array.size - np.count_nonzero(np.isfinite(array))), array.size)
    return array, spacing, dtype


def looks_like_label_map(array: np.ndarray, dtype: np.dtype) -> bool:
    """An integer volume with few distinct values (<= LABEL_MAP_VALUES)."""
    if not np.issubdtype(dtype, np.integer):
        return False
    return (
        np.unique(array.ravel()[:: max(1, array.size // 100_000)]).size <= LABEL_MAP_VALUES
        and np.unique(array).size <= LABEL_MAP_VALUES
    )


def _resample(
    array: np.ndarray, old: tuple[float, ...], new: tuple[float, ...], nearest: bool
) -> np.ndarray:
    """(C, X, Y, Z) to spacing ``new``: trilinear for images, nearest for labels."""
    import torch

    shape = [max(1, round(s * o / n)) for s, o, n in zip(array.shape[1:], old, new)]
    if list(array.shape[1:]) == shape:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).float()[None]
    mode = "nearest" if nearest else "trilinear"
    kwargs = {} if nearest else {"align_corners": False}
    resized = torch.nn.functional.interpolate(tensor, size=shape, mode=mode, **kwargs)[0]
    return resized.numpy().astype(np.uint8 if nearest else np.float32)


def _seeded(name: str) -> np.random.Generator:
    return np.random.default_rng(
        int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    )


def _sample(values: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """All of ``values`` when there are at most ``count``, else ``count`` of them."""
    if values.shape[-1] <= count:
        return values
    return values[..., np.sort(rng.choice(values.shape[-1], count, replace=False))]


def _intensity_stats(values: np.ndarray) -> dict:
    values = values.astype(np.float64)
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "lower": 0.0, "upper": 0.0}
    lower, upper = np.percentile(values, [0.5, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "lower": float(lower),
        "upper": float(upper),
    }


def _volume_stats(channel: np.ndarray, clip: bool) -> dict:
    """The per-volume scheme (``preprocessing``'s, used by predict): CT clipped to the
    volume's 0.5 / 99.5 percentiles, then z-scored with the clipped volume's mean and
    std; MR / PET (and CT normalized dataset-wide: for information) as they are."""
    lower = upper = None
    if clip:
        lower, upper = (float(v) for v in np.percentile(channel, [0.5, 99.5]))
        channel = np.clip(channel, lower, upper)
    return {
        "lower": lower,
        "upper": upper,
        "mean": float(channel.mean(dtype=np.float64)),
        "std": float(channel.std(dtype=np.float64)),
    }


def process_case(case: Case, folder: Path, options: StoreOptions, plain: bool) -> dict:
    """Loads, checks, resamples and writes one case; returns its record (also written
    to ``cases/NAME.json``, last). ``plain``: a plain folder, where a volume that looks
    like a label map is skipped (the record says so)."""
    loaded = [_load(path) for path in case.images]
    shapes = {a.shape for a, _, _ in loaded}
    if len(shapes) > 1:
        raise DataError(f"case {case.name!r}: its channel files have different shapes {shapes}")
    if plain and looks_like_label_map(loaded[0][0], loaded[0][2]):
        record = {
            "name": case.name,
            "skipped": f"{case.images[0]} looks like a label map "
            f"(integer values, at most {LABEL_MAP_VALUES} distinct)",
            "sources": _sources(case),
        }
        _atomic(folder / f"{case.name}.json", lambda p: p.write_text(json.dumps(record)))
        return record
    spacing = loaded[0][1]
    dtypes = [a.dtype for a, _, _ in loaded]
    keep = (
        options.spacing is None
        and all(np.issubdtype(d, np.integer) for d in dtypes)
        and np.result_type(*dtypes).itemsize <= 2
    )
    image = np.stack([a for a, _, _ in loaded]).astype(
        np.result_type(*dtypes) if keep else np.float32, copy=False
    )
    label = None
    if case.label is not None:
        label_array, _, _ = _load(case.label)
        if label_array.shape != image.shape[1:]:
            raise DataError(
                f"case {case.name!r}: image {case.images[0]} has shape "
                f"{image.shape[1:]} but label {case.label} has {label_array.shape}"
            )
        label = label_array[None].astype(np.uint8)
    if options.spacing is not None:
        image = _resample(image, spacing, options.spacing, nearest=False)
        label = (
            _resample(label, spacing, options.spacing, nearest=True) if label is not None else None
        )
        spacing = tuple(options.spacing)
    rng = _seeded(case.name)
    # Foreground for the intensity statistics: labelled voxels when there are labels
    # (nnU-Net), else voxels above the volume's minimum (outside-the-scanner air and
    # padding are at the minimum).
    mask = (label[0] > 0) if label is not None else (image[0] > image[0].min())
    foreground = _sample(image[:, mask], FOREGROUND_SAMPLES, rng).astype(np.float32)
    _write_b2nd(image, folder / f"{case.name}.b2nd")
    _atomic(folder / f"{case.name}_fgi.npy", lambda p: np.save(open(p, "wb"), foreground))
    record: dict[str, Any] = {
        "name": case.name,
        "shape": list(image.shape[1:]),
        "channels": image.shape[0],
        "dtype": str(image.dtype),
        "spacing": list(spacing),
        "sources": _sources(case),
        "volume": [
            _volume_stats(
                c, options.modality.upper() == "CT" and options.ct_normalization == "volume"
            )
            for c in image
        ],
        "foreground": [_intensity_stats(c) for c in foreground],
    }
    if label is not None:
        _write_b2nd(label, folder / f"{case.name}_seg.b2nd")
        locations = [
            np.concatenate([np.full((len(v), 1), c), v], 1)
            for c in np.unique(label[label > 0]).tolist()
            for v in [_sample(np.argwhere(label[0] == c).T, LOCATION_SAMPLES, rng).T]
        ]
        table = (
            np.concatenate(locations).astype(np.int32) if locations else np.zeros((0, 4), np.int32)
        )
        _atomic(folder / f"{case.name}_fg.npy", lambda p: np.save(open(p, "wb"), table))
        record["classes"] = sorted({int(c) for c in table[:, 0]})
    _atomic(folder / f"{case.name}.json", lambda p: p.write_text(json.dumps(record)))
    return record


def _done(case: Case, folder: Path) -> dict | None:
    """The record of a case already written from the same source files, else None."""
    path = folder / f"{case.name}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("sources") == _sources(case) else None


def normalization(records: list[dict], options: StoreOptions) -> list[dict]:
    """Per channel: clip bounds (CT) and the mean and std of the z-score.
    CT ``dataset``: nnU-Net's scheme, from the foreground intensities of all cases
    pooled (0.5 / 99.5 percentiles, mean, std); per-volume schemes are per case and
    are applied on reading (see :func:`case_normalization`)."""
    if options.modality.upper() != "CT" or options.ct_normalization != "dataset":
        return []
    raise_if_empty(records)
    channels = records[0]["channels"]
    return [
        _intensity_stats(np.concatenate([np.load(r["_fgi"])[c] for r in records]))
        for c in range(channels)
    ]


def raise_if_empty(records: list[dict]) -> None:
    if not records:
        raise DataError("no volumes left to train on (all were skipped)")


def case_normalization(record: dict, manifest: dict) -> list[dict]:
    """Per channel of a case: clip bounds (None: no clipping), mean and std."""
    options = manifest["options"]
    if options["modality"] == "CT" and options["ct_normalization"] == "dataset":
        return manifest["normalization"]
    return record["volume"]


def _rank_info() -> tuple[int, int, bool]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def build(
    dataset: Dataset,
    root: Path,
    options: StoreOptions,
    *,
    workers: int = 1,
    plain: bool = False,
    progress: bool = True,
) -> Path:
    """Writes (or completes) the store of ``dataset`` in ``root``; returns ``root``.
    Under torchrun each rank writes its share of the cases (every world_size-th), then
    rank 0 writes the manifest after a barrier; ``workers`` processes per rank."""
    from .progress import progress_bar

    rank, world, distributed = _rank_info()
    folder = root / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    mine = list(dataset.cases[rank::world])
    todo = [case for case in mine if _done(case, folder) is None]
    for case in todo:
        _remove_partial(case, folder)
    talk = progress and rank == 0
    if talk and todo and len(todo) < len(mine):
        print(
            f"  resuming the store {root}: {len(mine) - len(todo)} of {len(mine)} cases were "
            "written by an earlier run with the same data and options",
            flush=True,
        )
    bar = progress_bar(len(mine), "preprocess", "case", done=len(mine) - len(todo), enabled=talk)
    try:
        if workers <= 1 or len(todo) <= 1:
            for case in todo:
                process_case(case, folder, options, plain)
                bar.update(1)
        else:
            # fork, as DataLoader workers: spawned ones re-import torch (a minute when the
            # cores are busy); one thread each, the parallelism is across processes.
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_one_thread
            ) as pool:
                futures = [pool.submit(process_case, case, folder, options, plain) for case in todo]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(1)
    except BaseException:
        if rank == 0:
            done = sum(_done(case, folder) is not None for case in dataset.cases)
            # Kept, not removed: a store is the expensive part of a first run.
            print(
                f"the partial store {root} is kept ({done} of {len(dataset.cases)} cases "
                "written): the next run with the same data and options resumes it; delete "
                "the folder to discard it",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        bar.close()
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        write_manifest(dataset, root, options)
    if distributed:
        dist.barrier()
    return root


def write_manifest(dataset: Dataset, root: Path, options: StoreOptions) -> dict:
    folder = root / "cases"
    records, skipped = [], []
    for case in dataset.cases:
        record = _done(case, folder)
        if record is None:
            raise DataError(
                f"case {case.name!r} was not pre-processed (is every rank "
                f"writing to the same --cache folder {root}?)"
            )
        (skipped if "skipped" in record else records).append(record)
    for record in skipped:
        warnings.warn(f"skipped {record['skipped']}", stacklevel=3)
    for record in records:
        record["_fgi"] = str(folder / f"{record['name']}_fgi.npy")
    manifest = {
        "format": FORMAT,
        "options": options.as_json(),
        "description": dataset.description,
        "labels": dataset.labels,
        "normalization": normalization(records, options),
        "cases": [{k: v for k, v in r.items() if k != "_fgi"} for r in records],
        "skipped": [r["skipped"] for r in skipped],
    }
    raise_if_empty(records)
    _atomic(root / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


def is_store(path: Path) -> bool:
    manifest = Path(path) / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT


def up_to_date(dataset: Dataset, root: Path, options: StoreOptions) -> bool:
    """The store in ``root`` is complete, made with ``options`` from these files."""
    if not is_store(root):
        return False
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest["options"] != options.as_json():
        return False
    return len(manifest["cases"]) + len(manifest["skipped"]) == len(dataset.cases) and all(
        _done(case, root / "cases") is not None for case in dataset.cases
    )


def prepare(data: str | Path, options: StoreOptions, root: Path, *, workers: int = 1) -> Path:
    """The store of raw folder ``data`` in ``root``, built or completed unless it is
    already up to date."""
    dataset = discover(data, modality=options.modality, with_labels=options.with_labels)
    plain = not (Path(data) / "imagesTr").is_dir() and not options.with_labels
    if not plain:  # nnU-Net's channel names: CT is CT, any other name is z-scored
        modality = dataset.modality if dataset.modality in MODALITIES else "MR"
        options = dataclasses.replace(options, modality=modality)
    if up_to_date(dataset, root, options):
        return root
    return build(dataset, root, options, workers=workers, plain=plain)
