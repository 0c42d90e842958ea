"""``python -m benchmarks.report [--quick] [pytest args]``: runs the benchmarks and
writes benchmarks/RESULTS.md: the machine, the versions, and per benchmark group the
median time and the peak extra memory of each backend as ratios to the reference on
the same device."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}"


def table(benchmarks: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in benchmarks:
        groups[bench["group"]].append(bench)
    lines = []
    for group, items in groups.items():
        lines += [f"### {group}", "",
                  "| backend | device | median time | time / reference | peak extra memory | memory / reference |",
                  "|---|---|---|---|---|---|"]
        reference = {b["extra_info"]["device"]: b for b in items
                     if b["extra_info"]["backend"] == "reference"}
        for bench in items:
            info = bench["extra_info"]
            ref = reference.get(info["device"])
            time_ms = bench["stats"]["median"] * 1e3
            memory = info.get("peak_extra_bytes")
            time_ratio = f"{bench['stats']['median'] / ref['stats']['median']:.3f}" if ref else "-"
            mem_ratio = (f"{memory / ref['extra_info']['peak_extra_bytes']:.3f}"
                         if ref and memory is not None and ref["extra_info"]["peak_extra_bytes"]
                         else "-")
            mem_text = f"{memory / 2**20:.1f} MiB" if memory is not None else "-"
            lines.append(f"| {info['backend']} | {info['device']} | {time_ms:.3f} ms | "
                         f"{time_ratio} | {mem_text} | {mem_ratio} |")
        lines.append("")
    return lines


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    extra = [arg for arg in argv if arg != "--quick"]
    env = {**os.environ, **({"ANATOMASK_BENCH_QUICK": "1"} if quick else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        code = subprocess.call([sys.executable, "-m", "pytest", "benchmarks", "-q",
                                "-p", "no:cacheprovider", f"--benchmark-json={out}", *extra],
                               cwd=ROOT, env=env)
        if code != 0:
            return code
        benchmarks = json.loads(out.read_text())["benchmarks"]
    target = ROOT / "benchmarks" / ("RESULTS.quick.md" if quick else "RESULTS.md")
    lines = ["# Benchmark results", "",
             f"Measured with `python -m benchmarks.report{' --quick' if quick else ''}`.", "",
             f"- Machine: {machine()}", f"- Versions: {versions()}", "",
             "Times are medians of forward+backward; memory is the peak beyond the inputs, "
             "as peak RSS (VmHWM) of a fresh process on CPU or the CUDA allocator's peak on "
             "GPU. Ratios are to the reference backend on the same device (lower is better).",
             "", *table(benchmarks)]
    target.write_text("\n".join(lines))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
