"""The light decoder's memory-lean execution computes what the plain one computes and
stores less for backward."""

import copy

import pytest
import torch

from anatomask_fast.models import decoder as decoder_module
from anatomask_fast.models.decoder import LightDecoder, batch_norm_act_conv


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Runs fn() and counts the distinct storage bytes autograd saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def features(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 32, 2, 2, 2), (2, 16, 4, 4, 4), (2, 8, 8, 8, 8)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("sliced", [False, True], ids=["whole-samples", "channel-slices"])
@pytest.mark.parametrize("levels", [3, 4])
def test_lean_equals_plain_forward_backward_and_running_stats(levels, sliced, monkeypatch):
    if sliced:  # the fused BatchNorm backward in uneven groups of at least 5 channels
        monkeypatch.setattr(decoder_module, "SLICE_BYTES", 1)
        monkeypatch.setattr(decoder_module, "_MIN_SLICE_CHANNELS", 5)
        assert len(decoder_module._channel_groups(torch.empty(1, 32, 2, 2, 2))) == 6
    torch.manual_seed(0)
    plain = LightDecoder(levels=levels, width=32, out_channels=2).double().train()
    lean = copy.deepcopy(plain)
    a, b = features(), features()
    out_plain, out_lean = plain(a), lean(b, lean=True)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_lean.backward(grad)
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=name)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-9, atol=1e-11)
    for (name, p), q in zip(plain.named_buffers(), lean.buffers()):
        torch.testing.assert_close(q, p, msg=name)


def test_lean_stores_less():
    torch.manual_seed(0)
    decoder = LightDecoder(levels=3, width=32).train()
    inputs = features(torch.float32)
    _, plain = saved_bytes(lambda: decoder(inputs))
    _, lean = saved_bytes(lambda: decoder(inputs, lean=True))
    # Per level the plain path stores the up-sampled map, both conv inputs after
    # BatchNorm/ReLU6 and the final BatchNorm output; the lean one only s, c1 and c2.
    assert lean < 0.6 * plain, (lean, plain)


def test_eval_mode_and_no_grad_use_the_plain_path():
    decoder = LightDecoder(levels=3, width=32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(features(torch.float32), lean=True), decoder(features(torch.float32))
        )


def test_batchnorm_in_eval_mode_inside_a_training_decoder_uses_running_statistics():
    """A training-mode decoder whose BatchNorms are in eval mode (e.g. frozen): the lean
    path must not normalize with batch statistics; it gives the plain result (running
    statistics, left unchanged) with gradients, as the EMA teacher's eval pass does."""
    torch.manual_seed(0)
    plain = LightDecoder(levels=3, width=32).double().train()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.eval()
    lean = copy.deepcopy(plain)
    a, b = features(), features()
    out_plain, out_lean = plain(a), lean(b, lean=True)
    out_plain.sum().backward()
    out_lean.sum().backward()
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_buffers(), lean.buffers()):
        assert torch.equal(q, p), name
    bn = lean.dec[0].conv[1]
    assert bn.num_batches_tracked.item() == 0 and bn.running_mean.abs().max() > 0


def test_published_initialization():
    torch.manual_seed(0)
    decoder = LightDecoder(levels=3, width=64)
    conv = decoder.dec[0].conv[0].weight
    assert conv.std().item() == pytest.approx(0.02, rel=0.05)
    up = decoder.dec[0].up_sample
    fan_out = up.weight.shape[0] * up.weight[0, 0].numel()
    assert up.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert up.bias.abs().max() == 0 and decoder.proj.bias.abs().max() == 0


def test_fused_batch_norm_act_conv_half_precision_statistics_in_fp32():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(4)
    conv = torch.nn.Conv3d(4, 3, 3, padding=1, bias=False)
    x = (torch.randn(2, 4, 6, 6, 6) * 3 + 5).bfloat16().requires_grad_()
    bn_ref = copy.deepcopy(bn)
    out = batch_norm_act_conv(x, bn.bfloat16(), True, conv.bfloat16())
    expected = conv.float()(torch.nn.functional.relu6(bn_ref(x.float())))
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_small_levels_next_to_large_weights_run_plain():
    """STU-Net-B at 64^3: the 512-channel level (1 MiB maps per sample, 110 MB of
    weights) runs the plain modules, the full-resolution one the lean path."""
    decoder = LightDecoder(levels=4, width=512).train()
    deepest, full = decoder.dec[0], decoder.dec[3]
    assert not deepest.runs_lean(True, torch.empty(2, 512, 4, 4, 4))
    assert full.runs_lean(True, torch.empty(2, 64, 32, 32, 32))
    assert not full.runs_lean(False, torch.empty(2, 64, 32, 32, 32))
