"""The drop-in masker: counters and schedule, both mask conventions, seeding per
rank and step, resume, and clear errors."""

import pytest
import torch

from anatomask_fast.masker import AnatoMasker


def make(**kw):
    return AnatoMasker(
        **{"grid": (2, 3, 4), "mask_ratio": 0.5, "total_epochs": 5, "steps_per_epoch": 3, **kw}
    )


def test_random_and_anatomical_masks_in_both_conventions():
    masker = make()
    teacher = masker.random(4, "cpu")
    assert teacher.active.shape == (4, 1, 2, 3, 4)
    assert teacher.active.view(4, -1).sum(1).tolist() == [12] * 4
    assert teacher.ids_keep.shape == (4, 12) and teacher.ids_restore.shape == (4, 24)
    flat = teacher.active.view(4, -1)
    assert torch.equal(torch.gather(flat, 1, teacher.ids_keep), torch.ones(4, 12, dtype=torch.bool))
    masker.set_epoch(4)  # linear schedule at its top: 0.5 * 5 / 4 -> 0.625
    errors = torch.rand(4, 24)
    mask = masker.anatomical(errors)
    n_hard = int(12 * masker.hard_frac)
    top = errors.topk(n_hard, dim=1).indices
    assert (~mask.active.gather(1, top)).all()  # the largest errors are hidden
    assert mask.hard.sum(1).tolist() == [n_hard] * 4


def test_counters_schedule_and_resume():
    masker = make()
    fractions = []
    for _ in range(7):
        fractions.append(masker.hard_frac)
        masker.step()
    assert (masker.epoch, masker.step_in_epoch, masker.global_step) == (2, 1, 7)
    assert fractions[:3] == [pytest.approx(0.125)] * 3 and fractions[3] == pytest.approx(0.25)
    clone = make()
    clone.load_state_dict(masker.state_dict())
    assert torch.equal(clone.random(2, "cpu").active, masker.random(2, "cpu").active)


def test_seeding_differs_per_rank_and_step_and_repeats():
    a, b, c = make(rank=0), make(rank=1), make(rank=0)
    assert torch.equal(a.random(8, "cpu").active, c.random(8, "cpu").active)
    assert not torch.equal(a.random(8, "cpu").active, b.random(8, "cpu").active)
    first = a.random(8, "cpu").active
    a.step()
    assert not torch.equal(a.random(8, "cpu").active, first)


def test_token_masker_and_errors_of_the_wrong_shape():
    masker = AnatoMasker(num_patches=10, mask_ratio=0.6, total_epochs=3)
    assert masker.random(2, "cpu").active.shape == (2, 10)
    with pytest.raises(ValueError, match=r"'errors' must be \(B, 10\).*got \(2, 12\)"):
        masker.anatomical(torch.rand(2, 12))
    with pytest.raises(ValueError, match="exactly one of 'grid'"):
        AnatoMasker(mask_ratio=0.6, total_epochs=3)


def test_errors_from_the_fused_loss():
    masker = make()
    x = torch.randn(2, 1, 8, 12, 16)
    mask = masker.random(2, "cpu")
    errors = masker.errors(torch.randn_like(x), x, mask, (4, 4, 4))
    assert errors.shape == (2, 24)
    assert (errors[mask.active.view(2, -1)] == 0).all() and (
        errors[mask.hidden.view(2, -1)] > 0
    ).all()
