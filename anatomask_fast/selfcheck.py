"""``python -m anatomask_fast.selfcheck``: reports the backends and checks each
available one against the reference on random inputs."""

from __future__ import annotations

import sys

import torch

from . import apply_mask, backends, use_backend
from .reference import apply_mask_reference


def devices_for(backend: str) -> list[str]:
    if backend == "cuda":
        return ["cuda"]
    if backend == "cpu":
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def main() -> int:
    report = backends()
    for name, status in report.items():
        print(f"{name:>9}: {status}")
    failures = 0
    for name, status in report.items():
        if not status.available:
            continue
        for device in devices_for(name):
            x = torch.randn(2, 3, 16, 16, 16, device=device, requires_grad=True)
            active = torch.rand(2, 1, 4, 4, 4, device=device) < 0.4
            with use_backend(name):
                out = apply_mask(x, active)
            out.backward(torch.ones_like(out))
            ok = torch.equal(out, apply_mask_reference(x.detach(), active)) and torch.equal(
                x.grad, apply_mask_reference(torch.ones_like(x), active)
            )
            failures += not ok
            print(f"apply_mask on {name} ({device}): {'ok' if ok else 'MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
