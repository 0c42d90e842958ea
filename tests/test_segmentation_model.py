"""The full STU-Net: shapes, deep supervision, encoder loading from both formats, the
fused execution (equal to the plain one, storing less) and checkpointing."""

import copy

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from anatomask_fast.models import segmentation
from anatomask_fast.models.anatomask import AnatoMaskNet
from anatomask_fast.models.segmentation import STUNet, fused_block, load_encoder, norm_act
from anatomask_fast.models.stunet import BasicResBlock, STUNetEncoder

from .conftest import gpu


def _grads(model, x, fused, checkpointing):
    """Outputs and parameter gradients of a random linear function of the outputs."""
    model.zero_grad(set_to_none=True)
    model.fused, model.checkpointing = fused, checkpointing
    outputs = model(x)
    weights = torch.Generator().manual_seed(1)
    loss = sum(
        (o * torch.randn(o.shape, generator=weights, dtype=o.dtype).to(o.device)).sum()
        for o in outputs
    )
    loss.backward()
    return [o.detach() for o in outputs], {n: p.grad.clone() for n, p in model.named_parameters()}


# Anisotropic strides (an nnU-Net plans' kind), the last one (1, 1, 1) as STU-Net pads
# them: small inputs keep a 2^3 bottleneck, and every up-sampling kind is exercised.
ANISO = [(2, 2, 2), (2, 2, 2), (2, 1, 2), (2, 2, 2), (1, 1, 1)]


def test_shapes_and_deep_supervision():
    model = STUNet("tiny", 2, 3)
    outputs = model(torch.randn(1, 2, 64, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [
        (1, 3, 64, 64, 96),
        (1, 3, 32, 32, 48),
        (1, 3, 16, 16, 24),
        (1, 3, 8, 8, 12),
        (1, 3, 4, 4, 6),
    ]
    model.deep_supervision = False
    assert model(torch.randn(1, 2, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    with pytest.raises(ValueError, match=r"must be divisible by \(32, 32, 32\)"):
        model(torch.randn(1, 2, 32, 32, 48))
    aniso = STUNet(
        "tiny",
        1,
        2,
        strides=[(1, 2, 2)] + [(2, 2, 2)] * 4,
        kernels=[(1, 3, 3)] + [(3, 3, 3)] * 5,
        deep_supervision=False,
    )
    assert aniso.downsampling == (16, 32, 32)
    assert aniso(torch.randn(1, 1, 32, 64, 64)).shape == (1, 2, 32, 64, 64)
    assert aniso.conv_blocks_context[0][0].conv1.padding == (0, 1, 1)
    assert aniso.upsample_layers[4].upsample.scale == (1, 2, 2)
    with pytest.raises(
        ValueError, match="'strides' and 'kernels': expected 5 strides .* got 4 and 6"
    ):
        STUNet("tiny", 1, 2, strides=[(2, 2, 2)] * 4)
    with pytest.raises(ValueError, match=r"strides\[\]: expected a positive int or three"):
        STUNet("tiny", 1, 2, strides=[(2, 2)] * 5)


def _on_cuda(*values):
    return pytest.param(*values, "cuda", marks=[gpu, pytest.mark.gpu])


@pytest.mark.parametrize(
    "fused,checkpointing,per_sample,device",
    [
        (True, False, False, "cpu"),
        (True, False, True, "cpu"),
        (False, True, False, "cpu"),
        (True, True, False, "cpu"),
        (True, 2, True, "cpu"),
        _on_cuda(True, False, False),
        _on_cuda(True, 2, True),
    ],
)
def test_memory_options_give_the_plain_results(
    fused, checkpointing, per_sample, device, monkeypatch
):
    if per_sample:  # the one-sample-at-a-time backward of large maps, at a test's size
        monkeypatch.setattr(segmentation, "BATCHED_BACKWARD_BYTES", 0)
    torch.manual_seed(0)
    # fp64: the instance norms over the 2^3 bottleneck voxels make fp32 gradients of a
    # randomly initialised network ill-conditioned; in fp64 the executions agree to
    # rounding.
    model = (
        STUNet("tiny", 1, 4, strides=ANISO, fused=False, checkpointing=False).double().to(device)
    )
    x = torch.randn(2, 1, 32, 16, 32, dtype=torch.float64).to(device)
    plain_out, plain_grads = _grads(model, x, False, False)
    out, grads = _grads(model, x, fused, checkpointing)
    for a, b in zip(out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    scale = max(g.abs().max() for g in plain_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-9, atol=1e-11 * scale, msg=name)


def _saved_bytes(fn, x):
    """Bytes of the tensors autograd keeps for backward, the parameters not counted (both
    executions keep them)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in getattr(fn, "parameters", list)()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def test_fused_norm_act_equals_the_plain_pair_and_stores_less():
    norm = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    act = nn.LeakyReLU(0.01, inplace=True)
    x = torch.randn(2, 6, 12, 10, 14, requires_grad=True)
    grad = torch.randn(2, 6, 12, 10, 14)
    plain = act(norm(x * 1.0))
    fused = norm_act(x * 1.0, norm.weight, norm.bias, norm.eps, "leaky_relu")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(y, (x, norm.weight, norm.bias), grad) for y in (plain, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    h = x.detach() + 0  # a non-leaf input, as in the network
    h.requires_grad_()
    plain_bytes = _saved_bytes(lambda t: act(norm(t * 1.0)), h)
    fused_bytes = _saved_bytes(
        lambda t: norm_act(t * 1.0, norm.weight, norm.bias, norm.eps, "leaky_relu"), h
    )
    assert fused_bytes < plain_bytes - x.numel() * 4 // 2


def test_fused_network_stores_less():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 16, 32)
    model = STUNet("tiny", 1, 4, strides=ANISO, fused=False, checkpointing=False)
    plain = _saved_bytes(model, x)
    model.fused = True
    fused = _saved_bytes(model, x)
    model.checkpointing = 2
    highest = _saved_bytes(model, x)
    model.checkpointing = True
    both = _saved_bytes(model, x)
    # Measured: 0.52, 0.14 and 0.11 of the plain execution's.
    assert fused < 0.7 * plain and both < highest < 0.4 * fused and both < 0.2 * plain


def test_encoder_loads_from_an_export_and_from_a_pretraining_checkpoint(tmp_path, capsys):
    pretrained = AnatoMaskNet("tiny", 1)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.uniform_(-1, 1)
    weights = pretrained.encoder_state_dict()
    torch.save({"model": pretrained.state_dict()}, tmp_path / "checkpoint_latest.pt")
    torch.save({"state_dict": weights}, tmp_path / "encoder.pt")
    for name in ("checkpoint_latest.pt", "encoder.pt"):
        model = STUNet("tiny", 1, 4)
        report = load_encoder(model, tmp_path / name)
        assert len(report["loaded"]) == len(weights) and not report["missing"]
        for key, value in weights.items():
            assert torch.equal(model.state_dict()[key], value), key
        assert report["fresh"] == [
            "conv_blocks_context.5",
            "upsample_layers",
            "conv_blocks_localization",
            "seg_outputs",
        ]
        printed = capsys.readouterr().out
        assert (
            f"{len(weights)}/{len(model.state_dict())} tensors loaded ("
            "conv_blocks_context.0, conv_blocks_context.1, conv_blocks_context.2, "
            "conv_blocks_context.3, conv_blocks_context.4)" in printed
        )
        assert (
            "starting fresh: conv_blocks_context.5, upsample_layers, "
            "conv_blocks_localization, seg_outputs"
        ) in printed
    two_channels = STUNet("tiny", 2, 4)
    report = load_encoder(two_channels, tmp_path / "encoder.pt")
    assert report["shape_mismatch"] == [
        "conv_blocks_context.0.0.conv1.weight: file (8, 1, 3, 3, 3), model (8, 2, 3, 3, 3)",
        "conv_blocks_context.0.0.conv3.weight: file (8, 1, 1, 1, 1), model (8, 2, 1, 1, 1)",
    ]


def test_encoder_that_does_not_fit_is_an_error(tmp_path):
    torch.save({"state_dict": STUNetEncoder.from_size("S", 1).state_dict()}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"s\.pt: no encoder weight fits STU-Net-tiny"):
        load_encoder(STUNet("tiny", 1, 4), tmp_path / "s.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an encoder export"):
        load_encoder(STUNet("tiny", 1, 4), tmp_path / "other.pt")


@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_decoder_block_under_bf16_autocast_is_as_accurate_as_the_plain_block(
    per_sample, monkeypatch
):
    """A decoder block's fused execution (per-sample backwards summing half-precision
    parameter gradients in fp32) and the plain block, both under bf16 autocast, against
    the plain block in fp64. bf16 keeps 8 mantissa bits, and the instance norms' backward
    amplifies rounding: the plain block's gradients are 1-8% off fp64 here, and the fused
    one (rounding at other points: c1 as the sum of two half-convolutions) up to 4x
    that. A lost sample, a doubled or unscaled gradient is off by 30% or more."""
    if per_sample:
        monkeypatch.setattr(segmentation, "BATCHED_BACKWARD_BYTES", 0)
    torch.manual_seed(0)
    block = BasicResBlock(12, 6)
    low = torch.randn(3, 6, 4, 5, 3)
    skip = torch.randn(3, 6, 8, 10, 6)
    grad = torch.randn(3, 6, 8, 10, 6)

    def run(block: BasicResBlock, dtype: torch.dtype, fused: bool) -> list[torch.Tensor]:
        lo, sk = (t.to(dtype).requires_grad_() for t in (low, skip))
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            out = (
                fused_block(block, (lo, sk))
                if fused
                else block(
                    torch.cat(
                        [nn.functional.interpolate(lo, scale_factor=2, mode="nearest"), sk], 1
                    )
                )
            )
        out.to(dtype).backward(grad.to(dtype))
        params = [
            p.grad for n, p in block.named_parameters() if n not in ("conv1.bias", "conv2.bias")
        ]  # 0 in exact arithmetic (norm)
        return [lo.grad, sk.grad, *params]

    exact = run(copy.deepcopy(block).double(), torch.float64, False)
    plain, fused = run(block, torch.float32, False), run(block, torch.float32, True)
    for e, p, f in zip(exact, plain, fused):
        assert f.dtype == torch.float32
        error = [((g.double() - e).norm() / e.norm()).item() for g in (p, f)]
        assert error[1] <= max(4 * error[0], 0.15), error
