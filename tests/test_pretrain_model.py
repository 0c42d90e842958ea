"""The pretraining network: the library's execution (packed encoder, fused ops, lean
decoder) gives the reference execution's reconstruction, loss and gradients."""

import copy

import pytest
import torch

from anatomask_fast import patch_recon_loss, random_mask
from anatomask_fast.models.anatomask import AnatoMaskNet, reference_execution
from anatomask_fast.models.stunet import STUNetEncoder
from anatomask_fast.train.pretrain import pretrain_step

from .conftest import gpu


def loss_and_grads(net, x, active):
    rec = net(x, active)
    loss, per_patch = patch_recon_loss(rec, x, active, 16)
    loss.backward()
    return (
        rec,
        loss,
        per_patch,
        {n: p.grad for n, p in net.named_parameters() if p.grad is not None},
    )


def run_both(per_sample: bool, mask_ratio: float, dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    net = AnatoMaskNet("tiny", 1, per_sample_norm=per_sample).train().to(dtype).to(device)
    reference = copy.deepcopy(net)
    x = torch.randn(2, 1, 48, 32, 32, dtype=dtype).to(device)
    active = random_mask((2, 1, 3, 2, 2), mask_ratio, seed=3).active.to(device)
    fast = loss_and_grads(net, x, active)
    with reference_execution(reference):
        return fast, loss_and_grads(reference, x, active)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "reference-quirk"])
@pytest.mark.parametrize("mask_ratio", [0.4, 0.75])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def test_library_execution_equals_reference_execution_float64(per_sample, mask_ratio, device):
    """Same math: in float64 every output and gradient agrees to rounding."""
    (rec, loss, per_patch, grads), (rec_r, loss_r, per_patch_r, grads_r) = run_both(
        per_sample, mask_ratio, torch.float64, device
    )
    torch.testing.assert_close(loss, loss_r, rtol=1e-11, atol=0)
    torch.testing.assert_close(rec, rec_r, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(per_patch, per_patch_r, rtol=1e-9, atol=1e-12)
    # The reference also densifies the full-resolution stage, which gets no gradient.
    assert set(grads) == set(grads_r)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_r[name], rtol=1e-8, atol=1e-11, msg=name)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "reference-quirk"])
def test_library_loss_equals_reference_loss_float32(per_sample):
    """fp32: the loss within 1e-5 relative. Gradients are compared in float64 above:
    norms over the few visible voxels of the deepest stages amplify fp32 rounding."""
    (rec, loss, _, _), (rec_r, loss_r, _, _) = run_both(per_sample, 0.6, torch.float32)
    assert abs(loss.item() - loss_r.item()) <= 1e-5 * abs(loss_r.item())
    torch.testing.assert_close(rec, rec_r, rtol=1e-3, atol=5e-5)


def test_encoder_keys_load_into_the_dense_stunet():
    net = AnatoMaskNet("tiny", 2)
    dense = STUNetEncoder.from_size("tiny", 2)
    dense.load_state_dict(net.encoder_state_dict(), strict=True)
    assert next(iter(net.encoder_state_dict())).startswith("conv_blocks_context.0.0.conv1")


def test_step_masks_are_exact_and_reproducible():
    torch.manual_seed(0)
    student = AnatoMaskNet("tiny", 1)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = torch.randn(2, 1, 32, 32, 64)
    loss, mask, rec, _, _ = pretrain_step(
        student, teacher, x, mask_ratio=0.5, hard_frac=1.0, seed=7, teacher_target="raw"
    )
    assert torch.isfinite(loss) and rec.shape == x.shape
    assert mask.active.shape == (2, 1, 2, 2, 4)
    # L = 16, len_keep = 8; hard_frac 1 makes all 8 hidden patches loss-chosen.
    assert mask.active.view(2, -1).sum(1).tolist() == [8, 8]
    assert (mask.hard & mask.active).sum() == 0 and mask.hard.view(2, -1).sum(1).tolist() == [8, 8]
    again = pretrain_step(
        student, teacher, x, mask_ratio=0.5, hard_frac=1.0, seed=7, teacher_target="raw"
    ).mask
    assert torch.equal(again.active, mask.active)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def test_step_under_bf16_autocast(device):
    """The hand-written backward passes (packed convs, fused decoder) under autocast:
    bf16 convolutions with fp32 weights, recomputed parts in the forward's precision.
    The loss stays within bf16 rounding of fp32's; every parameter that gets a gradient
    in fp32 gets a finite fp32 one. (Gradient values of a random tiny network are too
    ill-conditioned in bf16 to compare: the reference execution's differ as much.)"""
    torch.manual_seed(0)
    student = AnatoMaskNet("tiny", 1).to(device)
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = torch.randn(2, 1, 32, 32, 32, device=device)

    def step(amp: bool):
        student.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = pretrain_step(
                student, teacher, x, mask_ratio=0.6, hard_frac=0.25, seed=1, teacher_target="raw"
            ).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32)
    assert set(grads16) == set(grads32)
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name


def test_teacher_pass_skipped_when_no_patch_is_chosen_by_its_error():
    """hard_frac 0.1 of 8 hidden patches chooses none: the teacher does not run, and the
    mask is the one its errors would have given."""
    from anatomask_fast import anatomical_mask
    from anatomask_fast.train.pretrain import _seed

    torch.manual_seed(0)
    student = AnatoMaskNet("tiny", 1)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = torch.randn(2, 1, 32, 32, 64)
    with_errors = pretrain_step(student, teacher, x, mask_ratio=0.5, hard_frac=1.0, seed=7)

    def refuse(*args):
        raise AssertionError("the teacher ran")

    teacher.forward = refuse
    skipped = pretrain_step(student, teacher, x, mask_ratio=0.5, hard_frac=0.1, seed=7)
    assert skipped.mask.n_hard == 0 and not skipped.teacher_errors.any()
    expected = anatomical_mask(
        with_errors.teacher_errors.view(2, 1, 2, 2, 4), 0.5, 0.1, seed=_seed(7, 1)
    )
    assert torch.equal(skipped.mask.active, expected.active)
