"""dice_ce_loss and deep_supervision_loss on every backend against the reference
(softmax tensor + one-hot by scatter + products + F.cross_entropy, as nnU-Net)."""

import pytest
import torch
import torch.nn.functional as F

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.numerics import accumulation_dtype
from anatomask_fast.ops.seg_loss import deep_supervision_weights, downsample_labels
from anatomask_fast.reference import dice_ce_loss_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import TOLERANCES, opcheck

# (B, K, spatial): odd sizes, K not a power of two, one voxel row, B=1.
SHAPES = [
    (2, 3, (5, 7, 9)),
    (1, 5, (6, 1, 11)),
    (3, 2, (4, 4, 4)),
]
OPTIONS = [
    dict(),
    dict(batch_dice=True),
    dict(do_bg=True, smooth=1.0),
    dict(weight_ce=0.3, weight_dice=2.0, ignore_label=1),
    dict(batch_dice=True, weight_ce=0.0, ignore_label=250),
]


def make_inputs(
    batch, classes, spatial, dtype, device, *, seed=0, ignore_label=None, channel_dim=False
):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, classes, *spatial, generator=gen)).to(device, dtype)
    labels = torch.randint(0, classes, (batch, *spatial), generator=gen)
    if ignore_label is not None:
        labels[torch.rand(labels.shape, generator=gen) < 0.3] = ignore_label
    if channel_dim:
        labels = labels[:, None]
    return logits, labels.to(device)


def assert_close_scaled(actual, expected, dtype):
    """Tolerances of ``dtype`` relative to the largest magnitude of ``expected``."""
    tol = TOLERANCES[dtype]
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["rtol"] * scale)


def run_both(backend, logits, labels, **options):
    ref_in = logits.clone().requires_grad_()
    expected = dice_ce_loss_reference(ref_in, labels, **options)
    expected.backward()
    test_in = logits.clone().requires_grad_()
    with use_backend(backend):
        out = anatomask_fast.dice_ce_loss(test_in, labels, **options)
    out.backward()
    return out, expected, test_in.grad, ref_in.grad


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("batch,classes,spatial", SHAPES)
def test_matches_reference_fp32(backend, device, options, batch, classes, spatial):
    logits, labels = make_inputs(
        batch,
        classes,
        spatial,
        torch.float32,
        device,
        ignore_label=options.get("ignore_label"),
        channel_dim=batch == 2,
    )
    out, expected, grad, grad_ref = run_both(backend, logits, labels, **options)
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    assert_close_scaled(grad, grad_ref, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference_other_dtypes(backend, device, dtype):
    logits, labels = make_inputs(2, 4, (6, 5, 7), dtype, device, seed=1)
    out, expected, grad, grad_ref = run_both(backend, logits, labels, batch_dice=True)
    # Both compute in fp32 (fp64) from the same stored logits: the loss agrees to the
    # accumulation type; the gradient is rounded once to the logits' dtype.
    assert out.dtype == accumulation_dtype(dtype)
    torch.testing.assert_close(out, expected, **TOLERANCES[accumulation_dtype(dtype)])
    assert grad.dtype == dtype
    assert_close_scaled(grad.float(), grad_ref.float(), dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8])
def test_label_dtypes(backend, device, label_dtype):
    logits, labels = make_inputs(2, 3, (4, 6, 5), torch.float32, device, seed=2)
    out, expected, grad, grad_ref = run_both(backend, logits, labels.to(label_dtype))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    assert_close_scaled(grad, grad_ref, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_logits_and_gradient_into_both_terms(backend, device):
    base = torch.randn(2, 6, 7, 5, 3, device=device)
    logits = base.permute(0, 4, 1, 2, 3)  # (2, 3, 6, 7, 5), not contiguous
    labels = torch.randint(0, 3, (2, 6, 7, 5), device=device)
    results = []
    for fn in (dice_ce_loss_reference, anatomask_fast.dice_ce_loss):
        x = logits.detach().clone().requires_grad_()
        with use_backend(backend):
            # Gradients reach the CE and the Dice through separate graph paths.
            ce_only = fn(x, labels, weight_dice=0.0)
            dice_only = fn(x, labels, weight_ce=0.0, batch_dice=True)
            (3.0 * ce_only - 0.5 * dice_only**2).backward()
        results.append((ce_only, dice_only, x.grad))
    for got, want in zip(results[1], results[0]):
        assert_close_scaled(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_every_voxel_ignored_gives_zero_ce_and_finite_gradient(backend, device):
    logits = torch.randn(1, 3, 4, 4, 4, device=device, requires_grad=True)
    labels = torch.full((1, 4, 4, 4), 7, device=device)
    with use_backend(backend):
        loss = anatomask_fast.dice_ce_loss(logits, labels, ignore_label=7, weight_dice=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_flag_invalid_labels_with_nan(backend):
    """What CUDA tensors get instead of an error (no host sync): a NaN CE sum."""
    logits, labels = make_inputs(2, 3, (4, 4, 4), torch.float32, "cpu")
    labels = labels.reshape(2, -1)
    labels[1, 5] = 3
    if backend == "cpu":
        class_sums, ce_sums = torch.ops.anatomask_fast.dice_ce_loss(logits, labels, None)
    else:
        from anatomask_fast.kernels.seg_loss import dice_ce_loss_triton

        class_sums, ce_sums = dice_ce_loss_triton(logits, labels, None)
    assert ce_sums[0].isfinite() and ce_sums[1].isnan()
    assert class_sums[1, 2].sum() == 63  # the invalid voxel is counted nowhere


def test_sums_match_their_definition():
    logits, labels = make_inputs(2, 4, (5, 6, 3), torch.float64, "cpu", ignore_label=9)
    class_sums, ce_sums = torch.ops.anatomask_fast.dice_ce_loss(logits, labels.reshape(2, -1), 9)
    probs = torch.softmax(logits, 1)
    counted = (labels != 9)[:, None]
    onehot = F.one_hot(labels.clamp(max=3), 4).permute(0, 4, 1, 2, 3) * counted
    dims = (2, 3, 4)
    expected = torch.stack(
        [(probs * onehot).sum(dims), (probs * counted).sum(dims), onehot.sum(dims).double()], 1
    )
    torch.testing.assert_close(class_sums, expected)
    torch.testing.assert_close(ce_sums, -(probs.log() * onehot).sum((1, 2, 3, 4)))


def test_gradcheck_cpp_kernel():
    logits, labels = make_inputs(2, 3, (3, 4, 2), torch.float64, "cpu", ignore_label=0)
    logits.requires_grad_()
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda t: anatomask_fast.dice_ce_loss(t, labels, ignore_label=0, do_bg=True), (logits,)
        )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    logits, labels = make_inputs(2, 3, (4, 3, 5), torch.float32, "cpu")
    labels = labels.reshape(2, -1)
    logits.requires_grad_()
    opcheck("dice_ce_loss", backend, device, logits, labels, None)
    opcheck("dice_ce_loss", backend, device, logits, labels, 1)
    grads = (torch.randn(2, 3, 3), torch.randn(2))
    # The backward operators have no double backward: their inputs are data here.
    opcheck("dice_ce_loss_backward", backend, device, *grads, logits.detach(), labels, None)


def test_torch_compile_fullgraph_on_cpu():
    logits, labels = make_inputs(2, 4, (6, 6, 6), torch.float32, "cpu")
    x = logits.clone().requires_grad_()

    def step(t):
        return anatomask_fast.dice_ce_loss(t * 2.0, labels, batch_dice=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    x_ref = logits.clone().requires_grad_()
    expected = dice_ce_loss_reference(x_ref * 2.0, labels, batch_dice=True)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert_close_scaled(x.grad, x_ref.grad, torch.float32)


def test_downsample_labels_is_nearest_exact():
    labels = torch.randint(0, 5, (2, 1, 12, 9, 7))
    for size in [(6, 5, 4), (3, 3, 2), (12, 9, 7)]:
        expected = F.interpolate(labels.float(), size, mode="nearest-exact").long()
        assert torch.equal(downsample_labels(labels, size), expected)


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_deep_supervision_loss(backend, device):
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 1, 8, 12, 4), generator=gen).to(device)
    sizes = [(8, 12, 4), (4, 6, 2), (2, 3, 1), (1, 2, 1)]
    outputs = [torch.randn(2, 3, *s, generator=gen).to(device).requires_grad_() for s in sizes]
    with use_backend(backend):
        loss = anatomask_fast.deep_supervision_loss(outputs, labels, batch_dice=True)
    loss.backward()
    weights = deep_supervision_weights(len(sizes))
    copies = [o.detach().clone().requires_grad_() for o in outputs]
    expected = sum(
        w
        * dice_ce_loss_reference(
            o,
            F.interpolate(labels.float(), o.shape[2:], mode="nearest-exact").long(),
            batch_dice=True,
        )
        for w, o in zip(weights, copies)
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for out, ref in zip(outputs[:-1], copies[:-1]):
        assert_close_scaled(out.grad, ref.grad, torch.float32)
    assert outputs[-1].grad is None  # weight 0: not computed


def bad_cases():
    x = torch.randn(2, 3, 4, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4, 4))
    call = anatomask_fast.dice_ce_loss
    return [
        (lambda: call(x, y + 1), ValueError, r"'labels'.*\[0, 3\).*\[3\]"),
        (lambda: call(x, y - 1, ignore_label=5), ValueError, r"'labels'.*ignore_label 5.*\[-1\]"),
        (lambda: call(x, y[:, :3]), ValueError, r"'labels' must have shape \(2, 4, 4, 4\)"),
        (lambda: call(x, y[None]), ValueError, r"'labels' must have shape"),
        (lambda: call(x, y.float()), TypeError, r"'labels' must have dtype.*torch.float32"),
        (lambda: call(x.long(), y), TypeError, r"'logits' must have dtype"),
        (lambda: call(x[0], y), ValueError, r"'logits' must be 5-D"),
        (lambda: call(x, y.to("meta")), ValueError, r"'labels' is on meta"),
        (lambda: call(x, y, smooth="1"), TypeError, r"'smooth' must be a float"),
        (lambda: call(x, y, ignore_label=1.5), TypeError, r"'ignore_label' must be an int"),
        (lambda: anatomask_fast.deep_supervision_loss(x, y), TypeError, r"'outputs' must be"),
        (
            lambda: anatomask_fast.deep_supervision_loss([x, x], y, weights=[1.0]),
            ValueError,
            r"'weights' must have one entry per output \(2\)",
        ),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_names_the_argument(case):
    make_call, error, match = bad_cases()[case]
    with pytest.raises(error, match=match):
        make_call()


def test_cpp_operator_checks_its_arguments():
    x = torch.randn(2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"'labels' must have shape \(B=2, S=64\)"):
        torch.ops.anatomask_fast.dice_ce_loss(x, torch.zeros(2, 63, dtype=torch.long), None)
    with pytest.raises(TypeError, match=r"'labels' must be int64"):
        torch.ops.anatomask_fast.dice_ce_loss(x, torch.zeros(2, 64), None)
