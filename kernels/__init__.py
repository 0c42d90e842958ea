"""Triton kernels, installed as ``anatomask_fast.kernels``; one module per op family.

Each op is a ``torch.library.triton_op`` so that torch.compile sees the kernel. On a
machine without a CUDA device they run under the Triton interpreter on CPU tensors:
``TRITON_INTERPRET`` is read when triton is imported and when a kernel is defined, so
it is set here, before the family modules import triton, unless the user set it.
"""
from anatomask_fast.dispatch import enable_interpreter_if_needed

enable_interpreter_if_needed()
