"""Test setup: outputs are poisoned before kernels write them, and Triton kernels run
under the interpreter on CPU tensors when there is no GPU. Both variables are read
when the package and its kernels are imported, so they are set here, first."""

import os

os.environ.setdefault("ANATOMASK_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import anatomask_fast  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (backend, device) pairs every op test runs on; GPU pairs are skipped without a GPU.
BACKEND_DEVICES = [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreted"),
    pytest.param("cuda", "cuda", id="cuda", marks=[gpu, pytest.mark.gpu]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[gpu, pytest.mark.gpu]),
    pytest.param("reference", "cuda", id="reference-cuda", marks=[gpu, pytest.mark.gpu]),
]

# The compiled backends torch.library.opcheck checks (fake kernel, autograd
# registration, torch.compile traces): the C++ kernels, the Triton ones under the
# interpreter on small inputs, and both on a GPU (skipped without one).
OPCHECK_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreted"),
    pytest.param("cuda", "cuda", id="cuda", marks=[gpu, pytest.mark.gpu]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[gpu, pytest.mark.gpu]),
]


def pytest_collection_modifyitems(config, items):
    # Any test marked `gpu` is skipped without a device, however it got the mark.
    if not HAS_CUDA:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
