"""Triton kernels, installed as ``anatomask_fast.kernels``; one module per op family.

Each op is a ``torch.library.triton_op`` so that torch.compile sees the kernel. On a
machine without a CUDA device they run under the Triton interpreter on CPU tensors:
``TRITON_INTERPRET`` is read when triton is imported and when a kernel is defined, so
it is set here, before the family modules import triton, unless the user set it.
"""
from torch.library import wrap_triton as _wrap_triton

from anatomask_fast.dispatch import enable_interpreter_if_needed

enable_interpreter_if_needed()


def launchable(kernel):
    """``kernel`` made visible to torch.compile (``wrap_triton``). Triton before 3.7
    defines interpreted kernels as a class that ``wrap_triton`` rejects: those are
    launched as they are (the interpreter runs eagerly anyway)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return _wrap_triton(kernel) if isinstance(kernel, (JITFunction, Autotuner)) else kernel
