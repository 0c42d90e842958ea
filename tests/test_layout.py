"""The layout rule of the README, enforced: every op registered for dispatch (an
``Op`` of ``anatomask_fast/ops/<family>.py``) has its public function there, its
plain-PyTorch reference ``<op>_reference`` in ``anatomask_fast/reference/<family>.py``,
a registered compiled backend (``<op>_cpu`` / ``<op>_cuda`` in ``csrc/cpu/<family>.cpp``
and ``csrc/cuda/<family>.cu``, ``<op>_triton`` in ``kernels/<family>.py``),
``tests/test_<op>.py`` and ``benchmarks/bench_<op>.py``."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import anatomask_fast
import anatomask_fast.ops
from anatomask_fast import _extension
from anatomask_fast.dispatch import Op

ROOT = Path(__file__).resolve().parents[1]


def registered_ops() -> list[tuple[str, Op]]:
    """(family, Op) of every op the ``ops`` modules register."""
    found = []
    for module in pkgutil.iter_modules(anatomask_fast.ops.__path__):
        family = importlib.import_module(f"anatomask_fast.ops.{module.name}")
        found += [(module.name, value) for value in vars(family).values() if isinstance(value, Op)]
    return sorted(found, key=lambda item: item[1].name)


def layout_problems(family: str, op: Op, root: Path = ROOT) -> list[str]:
    """What ``op`` of ``family`` lacks of the layout rule (empty when it has all)."""
    name, problems = op.name, []
    public = getattr(importlib.import_module(f"anatomask_fast.ops.{family}"), name, None)
    if not callable(public) or getattr(anatomask_fast, name, None) is not public:
        problems.append(f"public function anatomask_fast.{name} (ops/{family}.py)")
    if (
        getattr(op.reference, "__name__", None) != f"{name}_reference"
        or op.reference.__module__ != f"anatomask_fast.reference.{family}"
    ):
        problems.append(f"reference {name}_reference in anatomask_fast/reference/{family}.py")
    if op.cpp is None and op.triton is None:
        problems.append("a compiled backend (C++ or Triton)")
    if op.cpp is not None:
        for source, suffix in (
            (f"csrc/cpu/{family}.cpp", "cpu"),
            (f"csrc/cuda/{family}.cu", "cuda"),
        ):
            path = root / source
            text = path.read_text() if path.exists() else ""
            if not re.search(rf'm\.impl\("{op.cpp}",\s*&{name}_{suffix}\)', text):
                problems.append(f'm.impl("{op.cpp}", &{name}_{suffix}) in {source}')
    if op.triton is not None and op.triton != f"{family}:{name}_triton":
        problems.append(f"Triton kernel {family}:{name}_triton (registered: {op.triton})")
    for path in (f"tests/test_{name}.py", f"benchmarks/bench_{name}.py"):
        if not (root / path).is_file():
            problems.append(path)
    return problems


OPS = registered_ops()


def test_every_public_op_family_registers_ops():
    assert {op.name for _, op in OPS} >= {
        "apply_mask",
        "densify",
        "sparse_norm",
        "gather_tokens",
        "scatter_tokens",
        "dice_ce_loss",
        "anatomical_mask",
        "patch_recon_loss",
        "pack_patches",
        "unpack_patches",
        "pad_halo",
        "pad_halo_backward",
    }


@pytest.mark.parametrize("family,op", OPS, ids=[op.name for _, op in OPS])
def test_op_follows_the_layout(family, op):
    assert layout_problems(family, op) == []


@pytest.mark.parametrize("family,op", OPS, ids=[op.name for _, op in OPS])
def test_compiled_backends_are_registered(family, op):
    """The C++ operator has a CPU kernel in the loaded extension; the Triton operator
    exists once its kernel module is imported."""
    if op.cpp is not None and _extension.load()[0] is not None:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"anatomask_fast::{op.cpp}", "CPU"), (
            op.cpp
        )
    if op.triton is not None:
        module, function = op.triton.split(":")
        kernels = importlib.import_module(f"anatomask_fast.kernels.{module}")
        assert hasattr(kernels, function)
        assert hasattr(torch.ops.anatomask_fast, function)


def test_the_rule_finds_what_is_missing(tmp_path):
    """An op without test, benchmark, C++ kernels, Triton name or reference is named."""
    orphan = Op(
        "orphan_op", reference=lambda x: x, cpp="orphan_op", triton="gather_scatter:something_else"
    )
    try:
        problems = layout_problems("gather_scatter", orphan, root=tmp_path)
    finally:
        anatomask_fast.dispatch._OPS.pop("orphan_op")
    assert problems == [
        "public function anatomask_fast.orphan_op (ops/gather_scatter.py)",
        "reference orphan_op_reference in anatomask_fast/reference/gather_scatter.py",
        'm.impl("orphan_op", &orphan_op_cpu) in csrc/cpu/gather_scatter.cpp',
        'm.impl("orphan_op", &orphan_op_cuda) in csrc/cuda/gather_scatter.cu',
        "Triton kernel gather_scatter:orphan_op_triton (registered: gather_scatter:something_else)",
        "tests/test_orphan_op.py",
        "benchmarks/bench_orphan_op.py",
    ]
