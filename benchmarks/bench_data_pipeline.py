"""The data pipeline at scale: generated CT-like int16 volumes (written at run time into
a temporary folder, never committed) pre-processed into a store, then a short
pretraining run in a fresh process per dataset size: its peak RSS and its time from
start to the first step; and the loader's throughput in crops per second per worker.

    python -m benchmarks.bench_data_pipeline [--quick] [--json PATH]

Full size: 8, 64 and 512 volumes of 192^3 int16 (512 are ~7 GB raw), crops
112x112x128. Quick (CI, also the pytest benchmark): 4, 8 and 16 volumes of 64^3,
crops 32^3. Targets: RSS(largest) / RSS(8) <= 1.15 and time to the first step
<= 1.2x the 8-volume one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from .common import QUICK, ROOT

FULL = dict(counts=(8, 64, 512), edge=192, crop=(112, 112, 128), throughput_crops=24)
SMALL = dict(counts=(8, 16), edge=64, crop=(32, 32, 32), throughput_crops=16)
GPU_STEP_S = {"bf16": 0.2395, "fp32": 0.3198}  # STU-Net-B, batch 4, 112x112x128, H200 (RESULTS.md)
GPU_BATCH = 4


def write_volumes(folder: Path, count: int, edge: int, seed: int = 0) -> None:
    """``count`` CT-like int16 volumes (air around a body with a brighter organ and a
    bone, scanner noise everywhere), uncompressed NIfTI; each a shifted copy of one of a
    few templates with its own noise, so that every file differs and generating 512
    stays cheap."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.indices((edge,) * 3, dtype=np.float32) / edge - 0.5
    templates = []
    for _ in range(4):
        radius = (grid**2 / rng.uniform(0.3, 0.42, 3)[:, None, None, None] ** 2).sum(0)
        volume = np.full((edge,) * 3, -1024, np.int16)
        volume[radius < 1] = 40
        volume[(radius < 0.3)] = 120
        volume[(grid[0] ** 2 + grid[1] ** 2 < 0.003) & (radius < 1)] = 700
        templates.append(volume)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(count):
        path = folder / f"ct_{i:04d}.nii"
        if path.exists():
            continue
        shift = rng.integers(-edge // 16, edge // 16 + 1, 3)
        volume = np.roll(templates[i % 4], tuple(shift), axis=(0, 1, 2))
        noise = rng.integers(-30, 31, volume.shape, dtype=np.int16)
        nib.save(nib.Nifti1Image(volume + noise, affine), path)


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, **kwargs)


def preprocess(raw: Path, store: Path, workers: int) -> float:
    from anatomask_fast.train.store import StoreOptions, prepare

    started = time.perf_counter()
    prepare(raw, StoreOptions(), store, workers=workers)
    return time.perf_counter() - started


def pretrain_run(store: Path, out: Path, crop) -> dict:
    """A fresh process pretraining 2 steps (tiny model, batch 2, loading in-process):
    its peak RSS and the seconds from its start to the end of its first step."""
    metrics = out / "metrics.jsonl"
    args = [
        "-m",
        "benchmarks.bench_data_pipeline",
        "--child",
        "--data",
        str(store),
        "--out",
        str(out),
        "--crop",
        *map(str, crop),
    ]
    started = time.perf_counter()
    process = _python(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and metrics.exists() and metrics.read_text().strip():
            first = time.perf_counter() - started
        time.sleep(0.02)
    out_text, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"pretraining failed: {err[-2000:]}")
    return {
        "peak_rss_mb": json.loads(out_text.strip().splitlines()[-1])["peak_rss_mb"],
        "first_step_s": first if first is not None else time.perf_counter() - started,
    }


def child(argv: list[str]) -> None:
    """Runs in the fresh process: the pretraining, then its peak RSS (VmHWM) as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--crop", type=int, nargs=3)
    args = parser.parse_args(argv)
    from anatomask_fast.train.__main__ import main

    code = main(
        [
            "pretrain",
            "--data",
            args.data,
            "--out",
            args.out,
            "--size",
            "tiny",
            "--crop",
            *map(str, args.crop),
            "--batch-size",
            "2",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "1",
            "--workers",
            "0",
            "--preview-every",
            "0",
            "--save-every",
            "0",
            "--warmup-epochs",
            "0",
        ]
    )
    if code:
        raise SystemExit(code)
    import torch

    from anatomask_fast.train.step import peak_memory_bytes

    print(json.dumps({"peak_rss_mb": peak_memory_bytes(torch.device("cpu")) / 2**20}))


def throughput(store: Path, crop, crops: int) -> dict:
    """Crops per second of one loader worker (this process), per augmentation mode."""
    import torch

    from anatomask_fast.train.sampling import RandomCrops
    from anatomask_fast.train.volumes import open_store

    torch.set_num_threads(1)  # a DataLoader worker's setting
    volumes = open_store(store)
    keys = [(1, n // 4, n % 4) for n in range(crops)]
    for key in keys:  # the steady state: a worker has opened its files
        RandomCrops(volumes, crop, seed=0, rank=0, batch_size=4, augmentation="none")[key]
    rates = {}
    for mode in ("none", "light", "nnunet"):
        data = RandomCrops(volumes, crop, seed=0, rank=0, batch_size=4, augmentation=mode)
        started = time.perf_counter()
        for key in keys:
            data[key]
        rates[mode] = crops / (time.perf_counter() - started)
    return rates


def measure(quick: bool, workers: int = 2) -> dict:
    setting = SMALL if quick else FULL
    base = Path(os.environ.get("ANATOMASK_BENCH_TMP", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=base, prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        runs = {}
        for count in setting["counts"]:
            raw, store = tmp / f"raw_{count}", tmp / f"store_{count}"
            write_volumes(raw, count, setting["edge"])
            seconds = preprocess(raw, store, workers)
            run = pretrain_run(store, tmp / f"run_{count}", setting["crop"])
            runs[count] = {
                **run,
                "preprocess_s": seconds,
                "raw_gb": sum(p.stat().st_size for p in raw.iterdir()) / 1e9,
                "store_gb": sum(p.stat().st_size for p in (store / "cases").iterdir()) / 1e9,
            }
            for path in raw.iterdir():  # keep the disk use to one raw copy at a time
                path.unlink()
        largest = max(setting["counts"])
        rates = throughput(tmp / f"store_{largest}", setting["crop"], setting["throughput_crops"])
    reference = runs[8]
    summary = {
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "runs": runs,
        "rss_ratio": runs[largest]["peak_rss_mb"] / reference["peak_rss_mb"],
        "first_step_ratio": runs[largest]["first_step_s"] / reference["first_step_s"],
        "crops_per_second_per_worker": rates,
    }
    if not quick:
        summary["workers_to_keep_gpu_busy"] = {
            precision: {mode: int(np.ceil(GPU_BATCH / step / rate)) for mode, rate in rates.items()}
            for precision, step in GPU_STEP_S.items()
        }
    return summary


RESULTS = Path(__file__).resolve().parent / "data_pipeline.json"


def markdown(result: dict) -> list[str]:
    """The section of benchmarks/RESULTS.md (written by benchmarks.report)."""
    setting = result["setting"]
    crop = "x".join(map(str, setting["crop"]))
    lines = [
        "### data pipeline (`python -m benchmarks.bench_data_pipeline`)",
        "",
        f"_Measured on {result.get('machine', '?')}; {result.get('date', '?')}._ "
        f"Generated CT-like int16 volumes of {setting['edge']}^3; a fresh process "
        f"pretraining 2 steps (tiny model, batch 2, crops {crop}, loading in-process).",
        "",
        "| volumes | raw GB | store GB | preprocess s (2 workers) | peak RSS MiB "
        "| start to first step s |",
        "|---|---|---|---|---|---|",
    ]
    for count, run in result["runs"].items():
        lines.append(
            f"| {count} | {run['raw_gb']:.2f} | {run['store_gb']:.2f} | "
            f"{run['preprocess_s']:.0f} | {run['peak_rss_mb']:.0f} | "
            f"{run['first_step_s']:.1f} |"
        )
    rates = ", ".join(
        f"{mode} {rate:.1f}" for mode, rate in result["crops_per_second_per_worker"].items()
    )
    lines += [
        "",
        f"RSS ratio (largest / 8) {result['rss_ratio']:.3f}; first-step ratio "
        f"{result['first_step_ratio']:.3f}. Crops {crop} per second per worker "
        f"(augmentation mode): {rates}"
        + (f" ({result['throughput_note']})." if "throughput_note" in result else "."),
    ]
    for precision, need in result.get("workers_to_keep_gpu_busy", {}).items():
        lines.append(
            f"Workers to keep an H200 busy at STU-Net-B's {precision} step "
            f"({GPU_STEP_S[precision] * 1e3:.0f} ms per batch of {GPU_BATCH}): "
            + ", ".join(f"{mode} {n}" for mode, n in need.items())
            + "."
        )
    return [*lines, ""]


@pytest.mark.benchmark(group="data pipeline: one crop read + nnunet augmentation")
def test_data_pipeline(benchmark, tmp_path):
    """pytest benchmark (quick in CI): times one crop read with nnU-Net's augmentation;
    checks the RSS target always, the time target at full size (on a shared 2-core
    machine the quick run's seconds are noise); the whole measurement in extra_info."""
    from anatomask_fast.train.sampling import RandomCrops
    from anatomask_fast.train.volumes import open_store

    result = measure(QUICK)
    setting = SMALL if QUICK else FULL
    write_volumes(tmp_path / "raw", 2, setting["edge"])
    preprocess(tmp_path / "raw", tmp_path / "store", workers=0)
    crops = RandomCrops(
        open_store(tmp_path / "store"),
        setting["crop"],
        seed=0,
        rank=0,
        batch_size=4,
        augmentation="nnunet",
    )
    keys = iter((0, n // 4, n % 4) for n in range(10**6))
    benchmark.pedantic(lambda: crops[next(keys)], rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(
        backend="store",
        device="cpu",
        case="data_pipeline",
        size=result["setting"],
        peak_extra_bytes=None,
        result=result,
    )
    assert result["rss_ratio"] <= 1.15, result
    if not QUICK:
        assert result["first_step_ratio"] <= 1.2, result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument(
            "--json",
            type=Path,
            help=f"where to write the results "
            f"(full size: default {RESULTS.name}, read by benchmarks.report)",
        )
        options = parser.parse_args()
        from .machine import machine

        found = {
            **measure(options.quick, options.workers),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(found, indent=1))
        target = options.json or (None if options.quick else RESULTS)
        if target:
            target.write_text(json.dumps(found, indent=1) + "\n")
