"""The decoder's up-sampling and first convolution composed into 8 low-resolution phase
convolutions (models/transposed_up_conv.py) give the two modules' output and every
gradient, borders included; the decoder and the pretraining network use it."""

import copy

import pytest
import torch

from anatomask_fast import patch_recon_loss, random_mask
from anatomask_fast.models import decoder as decoder_module
from anatomask_fast.models import transposed_up_conv as tuc
from anatomask_fast.models.amp import memory_format_of
from anatomask_fast.models.anatomask import AnatoMaskNet, reference_execution
from anatomask_fast.models.decoder import LightDecoder


def pair(inp, mid, out, bias, dtype=torch.float64):
    up = torch.nn.ConvTranspose3d(inp, mid, 4, stride=2, padding=1, bias=bias).to(dtype)
    conv = torch.nn.Conv3d(mid, out, 3, padding=1, bias=bias).to(dtype)
    with torch.no_grad():  # away from the initialization's zero biases
        for p in (*up.parameters(), *conv.parameters()):
            p.normal_()
    return up, conv


def grads(fn, s, modules, grad):
    for t in (s, *(p for m in modules for p in m.parameters())):
        t.grad = None
    out = fn(s)
    out.backward(grad)
    return out, [s.grad] + [p.grad for m in modules for p in m.parameters()]


@pytest.mark.parametrize(
    "shape,bias,channels_last",
    [
        ((2, 3, 3, 4, 5), True, False),
        ((1, 2, 1, 2, 1), False, False),  # one voxel along two axes: both borders meet
        ((2, 4, 3, 3, 2), True, True),
    ],
)
def test_equals_up_sampling_then_convolution_float64(shape, bias, channels_last):
    torch.manual_seed(0)
    up, conv = pair(shape[1], 5, 6, bias)
    s = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        s = s.contiguous(memory_format=torch.channels_last_3d)
    s.requires_grad_()
    grad = torch.randn(shape[0], 6, *(2 * n for n in shape[2:]), dtype=torch.float64)
    plain, plain_grads = grads(lambda t: conv(up(t)), s, (up, conv), grad)
    out, out_grads = grads(lambda t: tuc.transposed_up_conv(t, up, conv), s, (up, conv), grad)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(out_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    assert memory_format_of(out) == memory_format_of(plain)


def test_channels_last_in_channels_last_out_float32():
    torch.manual_seed(0)
    up, conv = pair(8, 8, 8, True, torch.float32)
    s = torch.randn(2, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    out = tuc.transposed_up_conv(s, up, conv)
    assert memory_format_of(out) == memory_format_of(conv(up(s))) == torch.channels_last_3d
    torch.testing.assert_close(out, conv(up(s)), rtol=1e-4, atol=1e-3)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    up, conv = pair(4, 4, 4, True, torch.float32)
    s = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tuc.transposed_up_conv(s, up, conv)
    assert out.dtype == torch.bfloat16
    expected = conv(up(s))
    assert (out.float() - expected).abs().max() <= 3e-2 * expected.abs().max()
    out.float().sum().backward()
    assert torch.isfinite(s.grad).all() and conv.weight.grad.dtype == torch.float32


def test_pays_at_the_full_resolution_level_only():
    """STU-Net-B at 64^3, batch 2: the 64-channel level (32^3 in), not the 128-channel
    one (16^3 in), nor another geometry."""
    up64, conv64 = pair(64, 64, 64, True, torch.float32)
    up128, conv128 = pair(128, 128, 128, True, torch.float32)
    assert tuc.pays(torch.empty(2, 64, 32, 32, 32), up64, conv64)
    assert not tuc.pays(torch.empty(2, 128, 16, 16, 16), up128, conv128)
    odd = torch.nn.ConvTranspose3d(64, 64, 2, stride=2)
    assert not tuc.pays(torch.empty(2, 64, 32, 32, 32), odd, conv64)
    # STU-Net-tiny's 16-channel full-resolution level: narrow, plain (below MIN_CHANNELS)
    up16, conv16 = pair(16, 16, 16, True, torch.float32)
    assert not tuc.pays(torch.empty(2, 16, 32, 32, 32), up16, conv16)


@pytest.fixture
def composed_everywhere(monkeypatch):
    monkeypatch.setattr(tuc, "MAX_PAIRS_TO_MAP", float("inf"))
    monkeypatch.setattr(tuc, "MIN_CHANNELS", 1)


@pytest.mark.parametrize("sliced", [False, True], ids=["whole-samples", "channel-slices"])
def test_decoder_lean_and_eval_with_the_composition(composed_everywhere, sliced, monkeypatch):
    """The lean levels run the composed block, whose backward hands c1's gradient to the
    composition slice by slice (uneven groups of at least 3 channels when sliced)."""
    if sliced:
        monkeypatch.setattr(decoder_module, "SLICE_BYTES", 1)
        monkeypatch.setattr(decoder_module, "_MIN_SLICE_CHANNELS", 3)
    torch.manual_seed(0)
    plain = LightDecoder(levels=3, width=32, out_channels=2).double().train()
    lean = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 32, 2, 2, 2), (2, 16, 4, 4, 4), (2, 8, 8, 8, 8)]
    a = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    b = [t.detach().clone().requires_grad_() for t in a]
    out_plain, out_lean = plain(a), lean(b, lean=True)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_lean.backward(grad)
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=name)
    plain.eval()
    lean.eval()
    with torch.no_grad():  # the teacher's pass: running statistics
        torch.testing.assert_close(lean(b, lean=True), plain(a), rtol=1e-10, atol=1e-12)


def test_pretraining_network_with_the_composition_equals_reference_float64(composed_everywhere):
    torch.manual_seed(0)
    net = AnatoMaskNet("tiny", 1).double().train()
    reference = copy.deepcopy(net)
    x = torch.randn(2, 1, 32, 32, 48, dtype=torch.float64)
    active = random_mask((2, 1, 2, 2, 3), 0.6, seed=3).active
    results = []
    for model, context in ((net, None), (reference, reference_execution(reference))):
        with context if context is not None else torch.enable_grad():
            loss, _ = patch_recon_loss(model(x, active), x, active, 16)
            loss.backward()
        results.append(
            (loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss, got), (loss_r, want) = results
    torch.testing.assert_close(loss, loss_r, rtol=1e-11, atol=0)
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-8, atol=1e-11, msg=name)


def test_decoder_under_bf16_autocast_with_the_composition(composed_everywhere):
    torch.manual_seed(0)
    decoder = LightDecoder(levels=2, width=16, out_channels=1).train()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(s, generator=gen) for s in [(2, 16, 2, 2, 2), (2, 8, 4, 4, 4)]]
    full = decoder(inputs, lean=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = decoder(inputs, lean=True)
    assert (half.float() - full).abs().max() <= 5e-2 * full.abs().max()
    half.float().square().mean().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
