"""scatter_tokens on every backend against MAE's way (cat with the repeated mask
token, torch.gather, + pos_embed), forward and backward; the round trip through
gather_tokens and both under torch.compile."""

import pytest
import torch

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.reference import gather_tokens_reference, scatter_tokens_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import opcheck
from .token_cases import SHAPES, compare, leaves, shuffle


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,length,channels,keep", SHAPES)
@pytest.mark.parametrize("pos", [None, "1LC", "LC"])
def test_matches_reference(backend, device, dtype, batch, length, channels, keep, pos):
    gen = torch.Generator().manual_seed(length * 17 + channels)
    x = torch.randn(batch, keep, channels, generator=gen).to(device, dtype)
    _, ids_restore = shuffle(batch, length, keep, gen, device)
    token = torch.randn(1, 1, channels, generator=gen).to(device, dtype)
    pos_embed = (
        None
        if pos is None
        else torch.randn(
            (1, length, channels) if pos == "1LC" else (length, channels), generator=gen
        ).to(device, dtype)
    )
    grad = torch.randn(batch, length, channels, generator=gen).to(device, dtype)
    ref = leaves(x.double(), token.double(), None if pos is None else pos_embed.double())
    expected = scatter_tokens_reference(ref[0], ids_restore, ref[1], ref[2])
    expected.backward(grad.double())
    mine = leaves(x, token, pos_embed)
    with use_backend(backend):
        out = anatomask_fast.scatter_tokens(mine[0], ids_restore, mine[1], mine[2])
    out.backward(grad)
    compare(out, expected, mine, ref, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_round_trip_all_visible_and_token_shape_c(backend, device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, device=device)
    ids_keep, ids_restore = shuffle(2, 6, 6, gen, device)
    with use_backend(backend):
        back = anatomask_fast.scatter_tokens(
            anatomask_fast.gather_tokens(x, ids_keep), ids_restore, torch.randn(4, device=device)
        )
    assert torch.equal(back, x)


def test_gradcheck_cpp_kernels():
    gen = torch.Generator().manual_seed(2)
    _, ids_restore = shuffle(2, 6, 3, gen, "cpu")
    xv = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: anatomask_fast.scatter_tokens(a, ids_restore, b, c), (xv, token, pos)
        )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(3)
    _, ids_restore = shuffle(2, 8, 3, gen, "cpu")
    xv, token = torch.randn(2, 3, 5, requires_grad=True), torch.randn(1, 1, 5, requires_grad=True)
    pos = torch.randn(1, 8, 5, requires_grad=True)
    opcheck("scatter_tokens", backend, device, xv, ids_restore, token, pos)
    opcheck("scatter_tokens", backend, device, xv, ids_restore, token, None)
    opcheck("scatter_tokens_backward", backend, device, torch.randn(2, 8, 5), ids_restore, 3, True)


def test_torch_compile_fullgraph_on_cpu():
    gen = torch.Generator().manual_seed(4)
    ids_keep, ids_restore = shuffle(2, 8, 3, gen, "cpu")
    x = torch.randn(2, 8, 5, requires_grad=True)
    token, pos = torch.randn(1, 1, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)

    def step(t, tok, pe, gather, scatter):
        return (scatter(gather(t * 2.0, ids_keep) ** 2, ids_restore, tok, pe) ** 2).sum()

    fast = (anatomask_fast.gather_tokens, anatomask_fast.scatter_tokens)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, token, pos, *fast)
    loss.backward()
    ref = leaves(x, token, pos)
    expected = step(*ref, gather_tokens_reference, scatter_tokens_reference)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, b in zip((x, token, pos), ref):
        torch.testing.assert_close(a.grad, b.grad)


def bad_scatter(**changes):
    args = dict(
        x_visible=torch.randn(2, 3, 4),
        ids_restore=torch.arange(6).repeat(2, 1),
        mask_token=torch.randn(1, 1, 4),
        pos_embed=None,
    )
    args.update(changes)
    return lambda: anatomask_fast.scatter_tokens(**args)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            bad_scatter(ids_restore=torch.tensor([[0, 1, 2, 3, 4, 6]] * 2)),
            ValueError,
            r"'ids_restore' must hold indices in \[0, 6\) of the L=6 tokens of each sample; got a maximum of 6",
        ),
        (
            bad_scatter(ids_restore=torch.tensor([[0, 1, 2, 3, 4, 4]] * 2)),
            ValueError,
            r"'ids_restore' must be a permutation of \[0, 6\)",
        ),
        (
            bad_scatter(ids_restore=torch.arange(2).repeat(2, 1)),
            ValueError,
            r"'ids_restore' must have L >= len_keep=3 columns, got \(2, 2\)",
        ),
        (
            bad_scatter(mask_token=torch.randn(1, 1, 5)),
            ValueError,
            r"'mask_token' must have shape \(1, 1, 4\) or \(4,\) \(C=4\), got \(1, 1, 5\)",
        ),
        (
            bad_scatter(pos_embed=torch.randn(1, 5, 4)),
            ValueError,
            r"'pos_embed' must have shape \(1, 6, 4\) or \(6, 4\) \(C=4\), got \(1, 5, 4\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
