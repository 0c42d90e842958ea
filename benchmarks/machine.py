"""Which machine and which versions measured a result: the stamp on every benchmark
group and on the data-pipeline measurement."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"CPU {model}, {os.cpu_count()} cores"


def versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}"
