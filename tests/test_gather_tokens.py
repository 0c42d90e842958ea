"""gather_tokens on every backend against MAE's way (torch.gather with a repeated
index), forward and backward."""

import pytest
import torch

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.reference import gather_tokens_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import opcheck
from .token_cases import SHAPES, compare, leaves, shuffle


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,length,channels,keep", SHAPES)
def test_matches_reference(backend, device, dtype, batch, length, channels, keep):
    gen = torch.Generator().manual_seed(length * 31 + channels)
    x = torch.randn(batch, length, channels, generator=gen).to(device, dtype)
    ids_keep, _ = shuffle(batch, length, keep, gen, device)
    grad = torch.randn(batch, keep, channels, generator=gen).to(device, dtype)
    (x_ref,), (x_test,) = leaves(x.double()), leaves(x)
    expected = gather_tokens_reference(x_ref, ids_keep)
    expected.backward(grad.double())
    with use_backend(backend):
        out = anatomask_fast.gather_tokens(x_test, ids_keep)
    out.backward(grad)
    compare(out, expected, [x_test], [x_ref], dtype)


def test_gradcheck_cpp_kernels():
    gen = torch.Generator().manual_seed(2)
    ids_keep, _ = shuffle(2, 6, 3, gen, "cpu")
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda t: anatomask_fast.gather_tokens(t, ids_keep), (x,))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(3)
    ids_keep, _ = shuffle(2, 8, 3, gen, "cpu")
    x = torch.randn(2, 8, 5, requires_grad=True)
    opcheck("gather_tokens", backend, device, x, ids_keep)
    opcheck("gather_tokens_backward", backend, device, torch.randn(2, 3, 5), ids_keep, 8)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: anatomask_fast.gather_tokens(
                torch.randn(2, 6, 4), torch.tensor([[0, 6], [1, 2]])
            ),
            ValueError,
            r"'ids_keep' must hold indices in \[0, 6\) of the L=6 tokens of each sample; got a maximum of 6",
        ),
        (
            lambda: anatomask_fast.gather_tokens(
                torch.randn(2, 6, 4), torch.tensor([[0, 0], [1, 2]])
            ),
            ValueError,
            r"'ids_keep' must hold distinct indices",
        ),
        (
            lambda: anatomask_fast.gather_tokens(
                torch.randn(2, 6, 4), torch.zeros(2, 7, dtype=torch.long)
            ),
            ValueError,
            r"'ids_keep' must have at most L=6 columns, got \(2, 7\)",
        ),
        (
            lambda: anatomask_fast.gather_tokens(
                torch.randn(2, 6, 4), torch.zeros(3, 2, dtype=torch.long)
            ),
            ValueError,
            r"'ids_keep' must have shape \(2, n\), got \(3, 2\)",
        ),
        (
            lambda: anatomask_fast.gather_tokens(
                torch.randn(2, 6, 4), torch.zeros(2, 2, dtype=torch.int32)
            ),
            TypeError,
            r"'ids_keep' must have dtype in \(torch.int64\), got torch.int32",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
