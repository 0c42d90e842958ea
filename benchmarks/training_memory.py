"""Does a pretraining configuration fit a card? ``python -m benchmarks.training_memory
--model L --batch 4 --spatial 112 112 128 --amp bf16``: the CUDA allocator's peak over
whole training steps of the library (student, eval-mode teacher, AdamW state, the
step's activations, gradient clipping, the optimizer and EMA updates), the numbers a
card's memory must hold. The step benchmark counts only the step's extra memory."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from anatomask_fast.models import decoder
from anatomask_fast.models.anatomask import AnatoMaskNet
from anatomask_fast.train.optim import ema_update
from anatomask_fast.train.pretrain import pretrain_step
from anatomask_fast.train.step import optimizer_step

GIB = 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B", help="STU-Net size: tiny, S, B, L, H")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--spatial", type=int, nargs=3, default=(112, 112, 128))
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--decoder-slice-mib",
        type=int,
        default=None,
        help=f"the lean decoder's slice budget (default: {decoder.SLICE_BYTES // 2**20} MiB)",
    )
    args = parser.parse_args(argv)
    if args.decoder_slice_mib is not None:
        decoder.SLICE_BYTES = args.decoder_slice_mib * 2**20
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the allocator's peak is the number a card holds")
    device = torch.device("cuda")
    torch.manual_seed(0)
    student = AnatoMaskNet(args.model, 1).to(device)
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
    x = torch.randn(args.batch, 1, *args.spatial, device=device)
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = pretrain_step(
            student, teacher, x, mask_ratio=0.6, hard_frac=0.25, seed=step, amp=args.amp
        ).loss
        optimizer_step(loss, optimizer, scaler, student.parameters(), 12.0)
        ema_update(teacher, student, 0.999)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in student.parameters())
    print(
        f"training_memory STU-Net-{args.model} B={args.batch} {tuple(args.spatial)} "
        f"amp={args.amp} decoder slices <= {decoder.SLICE_BYTES // 2**20} MiB "
        f"on {torch.cuda.get_device_name()}: {parameters / 1e6:.1f} M "
        f"parameters; peak allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB, "
        f"peak reserved {torch.cuda.max_memory_reserved() / GIB:.2f} GiB; "
        f"step {min(seconds[1:] or seconds) * 1e3:.0f} ms (best after the first)"
    )


if __name__ == "__main__":
    main()
