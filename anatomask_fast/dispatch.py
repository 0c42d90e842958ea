"""Backend selection for every public op.

Four backends exist: ``cuda`` (CUDA C++), ``triton``, ``cpu`` (C++ with OpenMP) and
``reference`` (plain PyTorch, literal to the method's formulas). By default an op runs
on CUDA tensors with the op's preferred GPU backend (``cuda`` or ``triton``, per op),
on CPU tensors with the C++ kernel, and falls back to the reference when neither is
available. ``ANATOMASK_BACKEND=<name>`` or ``with use_backend(name):`` forces one;
a forced backend that cannot run the inputs' device raises instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
BACKEND_ENV = "ANATOMASK_BACKEND"

# A plain list (not a ContextVar) so that torch.compile can trace the lookup.
_forced_stack: list[str | None] = []


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    detail: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.detail


def triton_interpreted() -> bool:
    """Whether Triton kernels run under the interpreter: ``TRITON_INTERPRET=1``, or
    unset on a machine without a CUDA device (``anatomask_fast.kernels`` then sets it
    before defining its kernels, since compiled Triton cannot run there anyway)."""
    flag = os.environ.get("TRITON_INTERPRET")
    return flag == "1" or (flag is None and not torch.cuda.is_available())


def enable_interpreter_if_needed() -> None:
    """Sets ``TRITON_INTERPRET=1`` where the interpreter is to be used. Triton reads it
    when it is imported and when a kernel is defined, so this runs before either."""
    if triton_interpreted():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.cache
def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    enable_interpreter_if_needed()
    import triton

    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if triton_interpreted():
        return BackendStatus(
            True,
            f"triton {triton.__version__}, interpreted on CPU tensors "
            "(TRITON_INTERPRET=1): for testing, not speed",
        )
    return BackendStatus(False, "no CUDA device, and TRITON_INTERPRET=0 forbids the interpreter")


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "plain PyTorch, any device")
    if name == "triton":
        return _triton_status()
    module, reason = _extension.load()
    if module is None:
        return BackendStatus(False, reason)
    if name == "cpu":
        return BackendStatus(True, f"C++ kernels, {torch.get_num_threads()} OpenMP threads")
    if not _extension.cuda_kernels_built():
        return BackendStatus(
            False,
            "the extension was built without CUDA kernels (no CUDA torch or no nvcc at build time)",
        )
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA kernels built, but no CUDA device is visible")
    return BackendStatus(True, f"CUDA C++ kernels on {torch.cuda.get_device_name()}")


def backends() -> dict[str, BackendStatus]:
    """What each backend can do here, and why not where it cannot."""
    return {name: _status(name) for name in BACKENDS}


def _runs_on(name: str, device: torch.device) -> str:
    """Empty when backend ``name`` can run tensors on ``device``, else the reason."""
    status = _status(name)
    if not status.available:
        return status.detail
    if name == "cuda" and device.type != "cuda":
        return f"it runs CUDA tensors only, the inputs are on {device}"
    if name == "cpu" and device.type != "cpu":
        return f"it runs CPU tensors only, the inputs are on {device}"
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return f"it cannot run tensors on {device}"
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        return "CPU tensors need the interpreter (TRITON_INTERPRET=1)"
    return ""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``ANATOMASK_BACKEND``, if any."""
    if _forced_stack:
        return _forced_stack[-1]
    name = os.environ.get(BACKEND_ENV, "")
    if name in ("", "auto"):
        return None
    return _check_name(name, BACKEND_ENV)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs every op inside the block with backend ``name``; ``"auto"`` restores the
    default choice (ignoring ``ANATOMASK_BACKEND``) inside the block."""
    if name != "auto":
        _check_name(name, "use_backend")
    _forced_stack.append(None if name == "auto" else name)
    try:
        yield
    finally:
        _forced_stack.pop()


# Every Op by name: _select takes the name, a constant that every torch.compile version
# can pass to an assume_constant_result function (torch 2.11 cannot pass a dataclass).
_OPS: dict[str, Op] = {}


@dataclass(frozen=True)
class Op:
    """Where each backend of one op lives; found by the op's name.

    ``cpp``: the operator in ``torch.ops.anatomask_fast`` with CPU and CUDA kernels.
    ``triton``: ``"module:function"`` under ``anatomask_fast.kernels`` (imported lazily,
    so that triton is only loaded when used).
    """

    name: str
    reference: Callable
    cpp: str | None = None
    triton: str | None = None
    cuda_preference: tuple[str, ...] = ("cuda", "triton")

    def __post_init__(self) -> None:
        _OPS[self.name] = self

    def implements(self, backend: str) -> bool:
        return backend == "reference" or (
            self.cpp is not None if backend in ("cpu", "cuda") else self.triton is not None
        )

    def select(self, device: torch.device) -> str:
        """The backend that runs this op for inputs on ``device``."""
        return _select(self.name, device.type)

    def kernel(self, backend: str) -> Callable:
        if backend == "reference":
            return self.reference
        if backend in ("cpu", "cuda"):
            return getattr(torch.ops.anatomask_fast, self.cpp)
        module, function = self.triton.split(":")
        # _select imported the module (outside any torch.compile trace).
        return getattr(sys.modules[f"anatomask_fast.kernels.{module}"], function)

    def __call__(self, device: torch.device) -> Callable:
        """The implementation to run for inputs on ``device``."""
        return self.kernel(self.select(device))


# Run eagerly even under torch.compile, whose graph then holds the chosen kernel:
# the choice depends on the environment and imports modules, neither traceable.
@torch.compiler.assume_constant_result
def _select(op_name: str, device_type: str) -> str:
    op = _OPS[op_name]
    device = torch.device(device_type)
    forced = forced_backend()
    if forced is not None:
        if not op.implements(forced):
            raise NotImplementedError(
                f"{op.name}: backend {forced!r} is not implemented for this op"
            )
        reason = _runs_on(forced, device)
        if reason:
            raise RuntimeError(
                f"{op.name}: backend {forced!r} was requested but cannot run here: {reason}"
            )
        choice = forced
    else:
        order = op.cuda_preference if device.type == "cuda" else ("cpu",)
        choice = next(
            (name for name in order if op.implements(name) and not _runs_on(name, device)),
            "reference",
        )
    if choice == "triton":
        importlib.import_module(f"anatomask_fast.kernels.{op.triton.split(':')[0]}")
    return choice
