"""Triton kernels, installed as ``anatomask_fast.kernels``; one module per op family.

Each op is a ``torch.library.triton_op`` so that torch.compile sees the kernel
(:func:`kernel_op`). On a machine without a CUDA device they run under the Triton
interpreter on CPU tensors: ``TRITON_INTERPRET`` is read when triton is imported and
when a kernel is defined, so it is set here, before the family modules import triton,
unless the user set it.
"""

from collections.abc import Callable

import torch
from torch.library import wrap_triton as _wrap_triton

from anatomask_fast.dispatch import enable_interpreter_if_needed, triton_interpreted
from anatomask_fast.numerics import accumulation_dtype

enable_interpreter_if_needed()


def kernel_op(name: str) -> Callable[[Callable], object]:
    """The operator ``name`` implemented by the decorated function: a
    ``torch.library.triton_op`` (torch.compile traces into it and sees the kernels).
    Under the interpreter an opaque ``torch.library.custom_op`` instead, whose fake
    kernel is the function itself (its launches skip fake tensors, :func:`launchable`):
    interpreted launches cannot be recorded in a traced graph."""

    def define(function: Callable) -> object:
        if not triton_interpreted():
            return torch.library.triton_op(name, mutates_args=())(function)
        op = torch.library.custom_op(name, mutates_args=())(function)
        op.register_fake(function)
        return op

    return define


def launchable(kernel):
    """``kernel`` made visible to torch.compile (``wrap_triton``). Interpreted kernels
    (no CUDA device) are a class that ``wrap_triton`` rejects: those are launched as
    they are (the interpreter runs eagerly anyway), except on fake tensors, where only
    the outputs' shapes are wanted (``opcheck``, torch.compile's shape propagation): the
    interpreter would read their (absent) data."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, (JITFunction, Autotuner)):
        return _wrap_triton(kernel)
    return _Interpreted(kernel)


class _Interpreted:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            from torch._subclasses.fake_tensor import is_fake

            if not any(
                isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())
            ):
                self.kernel[grid](*args, **kwargs)

        return launch


def accumulation(dtype: torch.dtype):
    """``numerics.accumulation_dtype`` as a Triton dtype (a kernel's ``ACC``)."""
    import triton.language as tl

    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32
