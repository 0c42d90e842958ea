"""``python -m benchmarks.report [--quick] [benchmark files...]``: runs benchmarks and
writes the results. ``python -m benchmarks.report --merge results.json...`` merges
results measured elsewhere (a GPU machine's ``benchmarks/results.json``; later files win)
and rewrites the documents without running anything.

Full mode merges the new results into ``benchmarks/results.json`` (replacing those of
the same name, keeping the others) and regenerates from it ``benchmarks/RESULTS.md``
(per group: median time and peak extra memory of each backend, as ratios to the
reference on the same device, with the machine and versions that measured it) and
``benchmarks/ratios.png``, and the README's summary table. Quick mode (small sizes, for CI) writes
``benchmarks/RESULTS.quick.md`` only.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from .machine import machine, versions

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"


def _fraction(entry: dict) -> str:
    """Achieved bandwidth over the device's copy bandwidth (GPU runs only): per call,
    and over the kernels' device time alone."""
    call, kernels = entry.get("bandwidth_fraction"), entry.get("kernel_bandwidth_fraction")
    if call is None:
        return "-"
    return f"{call:.0%}" + ("" if kernels is None else f" (kernels {kernels:.0%})")


def groups(entries: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for entry in entries:
        grouped[entry["group"]].append(entry)
    return dict(sorted(grouped.items()))


def ratios(items: list[dict]) -> list[tuple[dict, float | None, float | None]]:
    """(entry, time ratio, memory ratio) against the reference on the same device."""
    reference = {e["device"]: e for e in items if e["backend"] == "reference"}
    out = []
    for entry in items:
        ref = reference.get(entry["device"])
        time = entry["median_s"] / ref["median_s"] if ref else None
        memory = (
            entry["peak_extra_bytes"] / ref["peak_extra_bytes"]
            if ref and ref.get("peak_extra_bytes")
            else None
        )
        out.append((entry, time, memory))
    return out


def table(entries: list[dict]) -> list[str]:
    lines = []
    for group, items in groups(entries).items():
        where = sorted({f"{e['machine']}; {e['versions']}; {e['date']}" for e in items})
        lines += [
            f"### {group}",
            "",
            f"_Measured on {' / '.join(where)}._",
            "",
            "| backend | device | median time | time / reference | peak extra memory "
            "| memory / reference | bandwidth / copy bandwidth |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry, time, memory in ratios(items):
            mem = entry.get("peak_extra_bytes")
            lines.append(
                f"| {entry['backend']} | {entry['device']} | "
                f"{entry['median_s'] * 1e3:.3f} ms | {'-' if time is None else f'{time:.3f}'} | "
                f"{'-' if mem is None else f'{mem / 2**20:.1f} MiB'} | "
                f"{'-' if memory is None else f'{memory:.3f}'} | "
                f"{_fraction(entry)} |"
            )
        lines.append("")
    return lines


def plot(entries: list[dict], path: Path) -> None:
    """Horizontal bars of time and memory ratios (non-reference backends), with the
    reference at 1.0 marked."""
    from PIL import Image, ImageDraw

    rows = [
        (f"{group} [{e['backend']}-{e['device']}]", t, m)
        for group, items in groups(entries).items()
        for e, t, m in ratios(items)
        if e["backend"] != "reference"
    ]
    label_w, bar_w, row_h = 520, 360, 22
    image = Image.new("RGB", (label_w + 2 * bar_w + 40, 40 + row_h * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((label_w, 8), "time / reference", fill="black")
    draw.text((label_w + bar_w + 20, 8), "memory / reference", fill="black")
    scale = bar_w / 1.5  # 1.5x the reference fills a bar
    for i, (label, time, memory) in enumerate(rows):
        y = 30 + i * row_h
        draw.text((4, y + 4), label[:84], fill="black")
        for j, (value, color) in enumerate(((time, (52, 101, 164)), (memory, (78, 154, 6)))):
            x0 = label_w + j * (bar_w + 20)
            if value is not None:
                draw.rectangle([x0, y + 3, x0 + min(value, 1.5) * scale, y + row_h - 3], fill=color)
                draw.text((x0 + min(value, 1.5) * scale + 4, y + 4), f"{value:.2f}", fill="black")
            draw.line([x0 + scale, y, x0 + scale, y + row_h], fill=(200, 0, 0))
    image.save(path)


def run_pytest(args: list[str], quick: bool) -> tuple[list[dict], int]:
    """The results of the benchmarks that passed, and pytest's exit code (a failure
    still fails the command, after the others' results are written)."""
    env = {**os.environ, **({"ANATOMASK_BENCH_QUICK": "1"} if quick else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "pytest",
                *(args or ["benchmarks"]),
                "-q",
                "-p",
                "no:cacheprovider",
                f"--benchmark-json={out}",
            ],
            cwd=ROOT,
            env=env,
        )
        if not out.exists():
            raise SystemExit(code or 1)
        raw = json.loads(out.read_text())
    stamp = dict(machine=machine(), versions=versions(), date=raw["datetime"][:10])
    return [
        {
            "name": b["fullname"],
            "group": b["group"],
            "median_s": b["stats"]["median"],
            "backend": b["extra_info"]["backend"],
            "device": b["extra_info"]["device"],
            "peak_extra_bytes": b["extra_info"].get("peak_extra_bytes"),
            "bandwidth_fraction": b["extra_info"].get("bandwidth_fraction"),
            "kernel_bandwidth_fraction": b["extra_info"].get("kernel_bandwidth_fraction"),
            **stamp,
        }
        for b in raw["benchmarks"]
    ], code


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def readme_summary(entries: list[dict]) -> str:
    """The compact table the README shows: ratios per group and backend."""
    where = sorted({e["machine"] for e in entries})
    lines = [
        README_START,
        "",
        f"Measured on {' / '.join(where)} (details, absolute numbers and versions in "
        "`benchmarks/RESULTS.md`). Ratios to the reference on the same device; lower "
        "is better.",
        "",
        "| benchmark | backend | time / reference | memory / reference |",
        "|---|---|---|---|",
    ]
    for group, items in groups(entries).items():
        for entry, time, memory in ratios(items):
            if entry["backend"] != "reference":
                # Without a reference (CUDA graph replays): the absolute time.
                shown = f"{entry['median_s'] * 1e6:.0f} us" if time is None else f"{time:.2f}"
                lines.append(
                    f"| {group} | {entry['backend']}-{entry['device']} | {shown} | "
                    f"{'-' if memory is None else f'{memory:.2f}'} |"
                )
    return "\n".join([*lines, "", README_END])


def update_readme(entries: list[dict]) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_summary(entries) + text[end:])


def document(entries: list[dict], command: str) -> str:
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Written by `{command}`. Times are medians of one forward+backward (or one training "
            "step); memory is the peak beyond the inputs of a call after a first one (the steady "
            "state): on CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after the "
            "first call) of a fresh process with a fixed glibc mmap threshold, on GPU the CUDA "
            "allocator's peak. Ratios are to the reference backend on the "
            "same device, measured in the same run (lower is better). `ratios.png` plots them. "
            "On a GPU, memory-bound ops also report the bytes they must move per second as a "
            "share of the device's measured copy bandwidth, per call (host overhead included) and, "
            "in parentheses, over the time the device spends in the op's kernels (profiler).",
            "",
            *table(entries),
            *saved_section("bench_pretrain_phases"),
            *saved_section("bench_data_pipeline"),
        ]
    )


def saved_section(module: str) -> list[str]:
    """The section of a standalone benchmark (``bench_pretrain_phases``: the per-phase
    profile of a pretraining step; ``bench_data_pipeline``) from its last full run's
    JSON, through the module's own ``markdown``."""
    found = importlib.import_module(f".{module}", __package__)
    return found.markdown(json.loads(found.RESULTS.read_text())) if found.RESULTS.exists() else []


def merged(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """``kept`` with the entries of the same name replaced by ``fresh`` ones."""
    names = {entry["name"] for entry in fresh}
    return [e for e in kept if e["name"] not in names] + fresh


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    store = HERE / "results.json"
    entries = json.loads(store.read_text()) if store.exists() else []
    if argv[:1] == ["--merge"]:
        code = 0
        for path in argv[1:]:
            entries = merged(entries, json.loads(Path(path).read_text()))
    else:
        fresh, code = run_pytest([arg for arg in argv if arg != "--quick"], quick)
        if quick:
            (HERE / "RESULTS.quick.md").write_text(
                document(fresh, "python -m benchmarks.report --quick")
            )
            return code
        entries = merged(entries, fresh)
    store.write_text(json.dumps(entries, indent=1) + "\n")
    (HERE / "RESULTS.md").write_text(document(entries, "python -m benchmarks.report"))
    plot(entries, HERE / "ratios.png")
    update_readme(entries)
    print(f"wrote {HERE / 'RESULTS.md'}, {HERE / 'ratios.png'} and the README's table")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
