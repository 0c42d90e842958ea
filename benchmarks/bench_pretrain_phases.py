"""Where one AnatoMask pretraining step's time and memory go, phase by phase, in the
library's execution and in the dense reference execution (``reference_execution``:
dense-masked encoder, the plain-PyTorch ops, full densify, plain decoder; the
published AdamW and timm ``ModelEma`` update), which equals the published step in
float64.

    python -m benchmarks.bench_pretrain_phases [--quick] [--size NAME ...] [--repeats N]

Phases, in step order: the data hand-off (a batch from a DataLoader worker onto the
device), the random mask, the eval-mode teacher's forward, its per-patch errors, the
anatomical mask, the student's encoder / densify / decoder forward, the loss, their
backward (loss, decoder, densify, encoder), the optimizer (clipping at 12, AdamW) and
the EMA update. Each is timed between device synchronizations; its memory is the
peak during the phase beyond the step's set-up (models, AdamW state, the batch): on
CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs before each phase, with
glibc's mmap threshold fixed as in ``benchmarks.common``), on a GPU the allocator's
peak. The two executions alternate in one process (A B B A ...), ``repeats`` steps
each after a warm-up step each: medians and the spread (min-max). One more step of
each under the profiler gives each phase's share of time inside PyTorch's own
convolutions (CPU): phases above half are bound by them, the others by the code
around them (this library's, or the reference's plain PyTorch).

The student is cut at its part boundaries (encoder | densify | decoder | loss): each
boundary's tensors become detached leaves, and the backward runs part by part with
the gradients that arrive at each boundary, which gives the gradients of one whole
backward (tests/test_bench_pretrain_phases.py) with each part's time and memory on its
own. The whole step's peak is ``bench_pretrain_step``'s.

Writes ``benchmarks/pretrain_phases.json`` (read by ``benchmarks.report`` into
RESULTS.md) and ``benchmarks/pretrain_phases.png`` (full sizes; ``--json`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from anatomask_fast import anatomical_mask, patch_recon_loss, random_mask
from anatomask_fast.models.anatomask import AnatoMaskNet, reference_execution
from anatomask_fast.train.optim import ema_update
from anatomask_fast.train.teacher import ranking_errors, teacher_reconstruction

from .common import ROOT, benchmark_test, sizes, synchronize, training_step_pairs

PHASES = (
    "data hand-off",
    "random mask",
    "teacher forward",
    "teacher errors",
    "anatomical mask",
    "encoder forward",
    "densify forward",
    "decoder forward",
    "loss forward",
    "loss backward",
    "decoder backward",
    "densify backward",
    "encoder backward",
    "optimizer",
    "EMA update",
)
# The phases of bench_pretrain_step's timed call (teacher pass to the student's backward).
STEP_TO_BACKWARD = PHASES[1:13]
FULL = {
    "B-B2-1x64x64x64": dict(model="B", B=2, spatial=(64, 64, 64)),
    "B-B2-1x112x112x128": dict(model="B", B=2, spatial=(112, 112, 128)),
}
QUICK = {"quick-tiny-B2-1x32x32x32": dict(model="tiny", B=2, spatial=(32, 32, 32))}
SIZES = sizes(full=FULL, quick=QUICK)
MASK_RATIO, HARD_FRAC, CLIP, DECAY, LR = 0.6, 0.25, 12.0, 0.999, 1e-4
RESULTS = Path(__file__).resolve().parent / "pretrain_phases.json"
PLOT = RESULTS.with_suffix(".png")
# As benchmarks.common: without a fixed threshold glibc keeps freed tensors in its heap
# after the first large free, and RSS would count that retention.
MMAP_THRESHOLD = "131072"
MIB = 2**20


# ---------------------------------------------------------------- measuring a phase


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class Meter:
    """Times phases between device synchronizations and takes each one's memory peak
    and the memory it leaves held, both beyond ``baseline`` (the step's set-up)."""

    def __init__(self, device: str, memory: bool = True) -> None:
        self.device, self.memory = device, memory
        self.baseline = 0
        self.records: dict[str, dict[str, float]] = {}

    def current(self) -> int:
        if not self.memory:
            return 0
        return torch.cuda.memory_allocated() if self.device == "cuda" else _status_bytes("VmRSS")

    def _reset_peak(self) -> None:
        if not self.memory:
            return
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")

    def _peak(self) -> int:
        if not self.memory:
            return 0
        return (
            torch.cuda.max_memory_allocated() if self.device == "cuda" else _status_bytes("VmHWM")
        )

    def start_step(self) -> None:
        synchronize(self.device)
        self.records = {}
        self.baseline = self.current()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        self._reset_peak()
        started = time.perf_counter()
        with torch.profiler.record_function(f"phase: {name}"):
            yield
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.records[name] = {
            "seconds": seconds,
            "peak_bytes": self._peak() - self.baseline,
            "held_bytes": self.current() - self.baseline,
        }


# ---------------------------------------------------------------- one phased step


def _leaves(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]


def _backward(outputs: list[torch.Tensor | None], leaves: list[torch.Tensor | None]) -> None:
    """Backward from ``outputs`` with the gradients their leaf copies received (a
    leaf without one, e.g. the full-resolution feature that the reference densifies
    and never reads, contributes none)."""
    pairs = [
        (o, leaf.grad)
        for o, leaf in zip(outputs, leaves)
        if leaf is not None and leaf.grad is not None
    ]
    for leaf in leaves:
        if leaf is not None:
            leaf.grad = None
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


@dataclass
class Execution:
    """One execution's networks, optimizer and EMA update, and the context it runs in."""

    name: str
    student: AnatoMaskNet
    teacher: AnatoMaskNet
    optimizer: torch.optim.Optimizer
    ema: Callable[[torch.nn.Module, torch.nn.Module, float], None]
    context: Callable[[], contextlib.AbstractContextManager]

    @property
    def trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]


def timm_model_ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """The published teacher update, timm ``ModelEma.update`` as written there: one
    state entry at a time, ``ema.copy_(ema * decay + (1 - decay) * model)``."""
    with torch.no_grad():
        model = student.state_dict()
        for key, ema in teacher.state_dict().items():
            ema.copy_(ema * decay + (1.0 - decay) * model[key].detach())


def executions(size: dict, device: str, backend: str | None = None) -> list[Execution]:
    """The reference execution and the library's (or only ``backend``'s: "reference" or a
    library backend), from the same initial weights."""
    torch.manual_seed(0)
    student = AnatoMaskNet(size["model"], 1).to(device)
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)
    found = []
    for name in ("reference", "library"):
        if backend is not None and (name == "reference") != (backend == "reference"):
            continue
        net = copy.deepcopy(student)
        teacher = copy.deepcopy(net).requires_grad_(False).eval()
        trained = [p for p in net.parameters() if p.requires_grad]
        if name == "reference":
            optimizer = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.999), weight_decay=1e-5)
            found.append(
                Execution(
                    name,
                    net,
                    teacher,
                    optimizer,
                    timm_model_ema_update,
                    lambda n=net, t=teacher: reference_execution(n, t),
                )
            )
        else:
            from anatomask_fast.train.config import PretrainConfig
            from anatomask_fast.train.pretrain import build_optimizer

            optimizer = build_optimizer(net, PretrainConfig(lr=LR, warmup_epochs=1, epochs=1))
            found.append(
                Execution(name, net, teacher, optimizer, ema_update, contextlib.nullcontext)
            )
    return found


def phased_step(
    run: Execution, batches: Iterator[dict], meter: Meter, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step, phase by phase (see the module's docstring); the loss and the
    student's visible mask."""
    student, teacher = run.student, run.teacher
    meter.start_step()
    with run.context():
        with meter("data hand-off"):
            x = next(batches)["image"].to(device, non_blocking=True)
        patch = student.patch_size
        shape = (x.shape[0], 1, *(s // patch for s in x.shape[2:]))
        with meter("random mask"):
            teacher_mask = random_mask(shape, MASK_RATIO, device=x.device, seed=2 * seed)
        with meter("teacher forward"):
            rec = teacher_reconstruction(teacher, x, teacher_mask.active)
        with meter("teacher errors"):
            errors = ranking_errors(rec, x, teacher_mask.active, patch, target="raw")
        del rec
        with meter("anatomical mask"), torch.no_grad():
            active = anatomical_mask(
                errors.view(shape), MASK_RATIO, HARD_FRAC, seed=2 * seed + 1
            ).active
        with meter("encoder forward"):
            features = student.encode(x, active)
        features_in = _leaves(features)
        with meter("densify forward"):
            maps = student.densify_features(features_in, active)
        maps_in = _leaves(maps)
        with meter("decoder forward"):
            rec = student.decode(maps_in)
        (rec_in,) = _leaves([rec])
        with meter("loss forward"):
            loss, _ = patch_recon_loss(rec_in, x, active, patch, norm_pix=True)
        with meter("loss backward"):
            loss.backward()
        with meter("decoder backward"):
            _backward([rec], [rec_in])
        del rec, rec_in
        with meter("densify backward"):
            _backward(maps, maps_in)
        del maps, maps_in
        with meter("encoder backward"):
            _backward(features, features_in)
        del features, features_in
        with meter("optimizer"):
            torch.nn.utils.clip_grad_norm_(run.trained, CLIP)
            run.optimizer.step()
        with meter("EMA update"):
            run.ema(teacher, student, DECAY)
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), active


class _Batches(torch.utils.data.Dataset):
    def __init__(self, size: dict) -> None:
        self.shape = (1, *size["spatial"])

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.randn(self.shape, generator=generator)}


def batch_loader(size: dict, workers: int = 1) -> Iterator[dict]:
    """Batches as the training loop gets them: collated by a DataLoader worker (shared
    memory); the worker has the next batches ready long before a step ends."""
    loader = torch.utils.data.DataLoader(_Batches(size), batch_size=size["B"], num_workers=workers)
    return iter(loader)


# ---------------------------------------------------------------- pytest mode


def setup_pretrain_phases(backend: str, size: dict, device: str):
    (run,) = executions(size, device, backend)
    batches = batch_loader(size, workers=0)
    meter = Meter(device, memory=False)
    seconds: dict[str, list[float]] = {name: [] for name in PHASES}
    steps = iter(range(1 << 30))

    def step() -> None:
        phased_step(run, batches, meter, device, seed=next(steps))
        for name, record in meter.records.items():
            seconds[name].append(record["seconds"])

    step.extra_info = lambda: {
        "phase_median_s": {name: statistics.median(v) for name, v in seconds.items() if v}
    }
    return step


test_pretrain_phases = benchmark_test(
    "bench_pretrain_phases",
    "pretrain_phases",
    "pretrain step by phase",
    SIZES,
    training_step_pairs(),
)


# ---------------------------------------------------------------- standalone mode

CONV_OPS = {
    "aten::conv3d",
    "aten::conv_transpose3d",
    "aten::convolution",
    "aten::_convolution",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::slow_conv3d_forward",
    "aten::slow_conv_transpose3d",
}


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def conv_shares(run: Execution, batches: Iterator[dict], device: str) -> dict[str, float]:
    """Per phase, the share of its (CPU) time inside PyTorch's convolution ops (forward
    and backward, their layout copies included), from one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    meter = Meter(device, memory=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phased_step(run, batches, meter, device, seed=10**6)
    events = list(prof.profiler.kineto_results.events())
    convs = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in CONV_OPS]
    shares = {}
    for e in events:
        if not e.name().startswith("phase: "):
            continue
        lo, hi = e.start_ns(), e.start_ns() + e.duration_ns()
        inside = [(max(a, lo), min(b, hi)) for a, b in convs if a < hi and b > lo]
        shares[e.name()[len("phase: ") :]] = _union_ns(inside) / max(hi - lo, 1)
    return shares


def measure_size(size: dict, device: str, repeats: int, profile: bool) -> dict:
    runs = executions(size, device)
    batches = batch_loader(size)
    meter = Meter(device)
    found = {
        run.name: {
            "phases": {
                name: {"seconds": [], "peak_bytes": [], "held_bytes": []} for name in PHASES
            },
            "losses": [],
        }
        for run in runs
    }
    for run in runs:  # warm-up: one-time costs not counted
        phased_step(run, batches, meter, device, seed=0)
    for repeat in range(repeats):
        order = runs if repeat % 2 == 0 else runs[::-1]
        for run in order:
            loss, _ = phased_step(run, batches, meter, device, seed=1 + repeat)
            found[run.name]["losses"].append(loss.item())
            for name, record in meter.records.items():
                for key, value in record.items():
                    found[run.name]["phases"][name][key].append(value)
            print(
                f"  {run.name:9s} step {repeat}: "
                f"{sum(r['seconds'] for r in meter.records.values()):7.2f} s",
                flush=True,
            )
    if profile and device == "cpu":
        for run in runs:
            for name, share in conv_shares(run, batches, device).items():
                found[run.name]["phases"][name]["conv_share"] = share
    return found


def measure(names: list[str], quick: bool, repeats: int, profile: bool = True) -> dict:
    """{"sizes": {name: the size's measurement, stamped with machine, date and load}}."""
    from .machine import machine, versions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = QUICK if quick else FULL
    result: dict = {"sizes": {}}
    for name in names or list(table):
        print(f"{name}:", flush=True)
        size = table[name]
        load_before = os.getloadavg()[0]
        found = measure_size(size, device, repeats, profile)
        result["sizes"][name] = {
            "machine": machine(),
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "load": [load_before, os.getloadavg()[0]],
            "size": {**size, "spatial": list(size["spatial"])},
            **found,
        }
    return result


# ---------------------------------------------------------------- the documents


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _step_seconds(phases: dict, names=PHASES) -> list[float]:
    """Per repeat, the sum of ``names``' seconds."""
    return [sum(values) for values in zip(*(phases[n]["seconds"] for n in names))]


def bound_by(share: float | None) -> str:
    if share is None:
        return "-"
    return "PyTorch convolutions" if share >= 0.5 else "code around them"


def markdown(result: dict) -> list[str]:
    """The section of benchmarks/RESULTS.md (written by benchmarks.report)."""
    lines = [
        "### pretrain step by phase (`python -m benchmarks.bench_pretrain_phases`)",
        "",
        "One training step of STU-Net-B split into its phases: the library's execution "
        "against the dense reference execution (which equals the published step in "
        "float64), alternating in one process. Times: median of the repeated steps of "
        "each, (min-max) their spread. Memory: the phase's peak RSS beyond the step's "
        "set-up (models, AdamW state, batch). Conv share: of the phase's time, the part "
        "inside PyTorch's own convolution ops (one profiled step); above half, the phase "
        "is bound by them, below by the code around them. Plot: "
        f"[`{PLOT.name}`]({PLOT.name}).",
        "",
    ]
    for name, entry in result["sizes"].items():
        ref, lib = entry["reference"]["phases"], entry["library"]["phases"]
        lines += [
            f"#### {name}",
            "",
            f"_Measured on {entry['machine']}; {entry['versions']}; {entry['date']}; "
            f"{entry['threads']} threads; {entry['repeats']} steps each; load average "
            f"{entry['load'][0]:.1f} before, {entry['load'][1]:.1f} after._",
            "",
            "| phase | reference ms | library ms | time ratio | reference peak MiB "
            "| library peak MiB | conv share ref / lib | library bound by |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for phase in PHASES:
            r, f = ref[phase], lib[phase]
            rt, ft = _median(r["seconds"]), _median(f["seconds"])
            lines.append(
                f"| {phase} | {_spread(r['seconds'])} | {_spread(f['seconds'])} | "
                f"{ft / rt if rt > 0 else float('nan'):.2f} | "
                f"{_median(r['peak_bytes']) / MIB:.0f} | {_median(f['peak_bytes']) / MIB:.0f} | "
                f"{_share(r)} / {_share(f)} | {bound_by(f.get('conv_share'))} |"
            )
        for label, names in (
            ("teacher pass to student backward (bench_pretrain_step's call)", STEP_TO_BACKWARD),
            ("whole step", PHASES),
        ):
            rs, fs = _step_seconds(ref, names), _step_seconds(lib, names)
            lines.append(
                f"| **{label}** | {_spread(rs)} | {_spread(fs)} | "
                f"{_median(fs) / _median(rs):.2f} | "
                f"{max(_median(ref[n]['peak_bytes']) for n in names) / MIB:.0f} | "
                f"{max(_median(lib[n]['peak_bytes']) for n in names) / MIB:.0f} | | |"
            )
        lines.append("")
    return lines


def _spread(seconds: list[float]) -> str:
    return f"{_median(seconds) * 1e3:.0f} ({min(seconds) * 1e3:.0f}-{max(seconds) * 1e3:.0f})"


def _share(phase: dict) -> str:
    share = phase.get("conv_share")
    return "-" if share is None else f"{share:.0%}"


def plot(result: dict, path: Path) -> None:
    """Per size: the step's time as stacked bars of its phases (reference, library), and
    each phase's memory peak side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sizes"])
    fig, axes = plt.subplots(
        len(names),
        2,
        figsize=(15, 4.2 * len(names)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.1, 1]},
    )
    colors = plt.get_cmap("tab20")(range(len(PHASES)))
    for row, name in zip(axes, names):
        entry = result["sizes"][name]
        time_ax, memory_ax = row
        for y, execution in enumerate(("reference", "library")):
            left = 0.0
            for phase, color in zip(PHASES, colors):
                width = _median(entry[execution]["phases"][phase]["seconds"])
                time_ax.barh(
                    y,
                    width,
                    left=left,
                    color=color,
                    edgecolor="white",
                    linewidth=0.5,
                    label=phase if y == 0 else None,
                )
                left += width
            time_ax.text(left, y, f" {left:.1f} s", va="center")
        time_ax.set_yticks([0, 1], ["reference", "library"])
        time_ax.set_xlabel("seconds per step (median)")
        time_ax.set_title(f"{name}: time per phase")
        time_ax.margins(x=0.12)
        xs = range(len(PHASES))
        for offset, execution, hatch in ((-0.2, "reference", None), (0.2, "library", "//")):
            peaks = [_median(entry[execution]["phases"][p]["peak_bytes"]) / MIB for p in PHASES]
            memory_ax.bar(
                [x + offset for x in xs],
                peaks,
                width=0.4,
                color=colors,
                edgecolor="black",
                linewidth=0.4,
                hatch=hatch,
                label=execution,
            )
        memory_ax.set_xticks(list(xs), PHASES, rotation=60, ha="right", fontsize=8)
        memory_ax.set_ylabel("peak beyond set-up (MiB)")
        memory_ax.set_title(f"{name}: memory peak per phase\n(plain: reference, hatched: library)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=8, title="phase")
    stamps = sorted({f"{e['machine']}, {e['date']}" for e in result["sizes"].values()})
    fig.suptitle(f"AnatoMask pretraining step by phase, STU-Net-B ({'; '.join(stamps)})")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny CI size")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        help=f"a size to measure (default: all of {list(FULL)})",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiled step (the conv shares)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help=f"where to write the results (full size: "
        f"default {RESULTS.name}, with {PLOT.name} next to it)",
    )
    options = parser.parse_args(argv)
    result = measure(options.size, options.quick, options.repeats, not options.no_profile)
    print("\n".join(markdown(result)))
    target = options.json or (None if options.quick else RESULTS)
    if target:
        if target == RESULTS and RESULTS.exists() and options.size:
            kept = json.loads(RESULTS.read_text())  # other sizes of an earlier run stay
            result["sizes"] = {**kept["sizes"], **result["sizes"]}
        target.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, target.with_suffix(".png"))
        print(f"wrote {target} and {target.with_suffix('.png')}")


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc reads it at start-up: run again with it set.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(
            sys.executable,
            [sys.executable, "-m", "benchmarks.bench_pretrain_phases", *sys.argv[1:]],
            env,
        )
    os.chdir(ROOT)
    main(sys.argv[1:])
