"""What a job's ``--data`` becomes: a store or an nnU-Net pre-processed folder is read
as it is; a raw folder (or the embedded phantom) is pre-processed into a store in
the cache folder on first use and reused while its files and options are unchanged.
Also the ``preprocess`` subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import phantom_root
from .store import StoreOptions, default_cache, is_store, prepare
from .volumes import Volumes, is_nnunet_preprocessed, open_store, open_volumes


def store_options(config: Any, with_labels: bool) -> StoreOptions:
    return StoreOptions(
        modality=config.modality,
        spacing=config.spacing,
        ct_normalization=config.ct_normalization,
        with_labels=with_labels,
    )


def job_volumes(config: Any, out: Path, runtime, *, with_labels: bool = False) -> Volumes:
    """The volumes a training job reads crops from (``config``: a resolved Pretrain- or
    FinetuneConfig)."""
    data = (
        Path(config.data)
        if config.data is not None
        else phantom_root(out, runtime, cases=config.phantom_cases, seed=config.seed)
    )
    options = store_options(config, with_labels)
    cache = Path(config.cache) if config.cache else default_cache(data, options, out)
    if is_store(data) or is_nnunet_preprocessed(data):
        return open_volumes(data, cache)
    prepare(data, options, cache, workers=config.preprocess_workers)
    return open_store(cache)


def run_preprocess(config: Any) -> Path:
    """``python -m anatomask_fast.train preprocess``."""
    from .config import check
    from .runtime import setup, teardown

    check(config)
    setup("cpu")
    try:
        root = prepare(
            config.data,
            store_options(config, config.labels),
            Path(config.out),
            workers=config.workers,
        )
    finally:
        teardown()
    volumes = open_store(root)
    print(f"anatomask_fast preprocess: {len(volumes)} case(s) in {root} ({volumes.description})")
    data = f"--data {config.data} --cache {root}" if config.labels else f"--data {root}"
    print(
        f"  next: train on it: python -m anatomask_fast.train "
        f"{'finetune' if config.labels else 'pretrain'} {data}"
    )
    return root
