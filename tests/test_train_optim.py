"""Optimizer groups, schedules, EMA and checkpoint writing of the training jobs."""

import math

import pytest
import torch
from torch import nn

from anatomask_fast.train import checkpoint as ckpt
from anatomask_fast.train.optim import ema_update, param_groups, warmup_cosine


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3)
        self.norm = nn.BatchNorm3d(3)
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1, 1))


def test_no_decay_on_biases_norms_and_mask_tokens():
    model = Tiny()
    decay, no_decay = param_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert [p is model.conv.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.conv.bias),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.mask_token),
    }


def test_warmup_then_cosine():
    kw = dict(base_lr=1e-4, min_lr=1e-6, warmup_epochs=20, total_epochs=1000)
    assert warmup_cosine(0, **kw) == 0
    assert warmup_cosine(10, **kw) == pytest.approx(5e-5)
    assert warmup_cosine(20, **kw) == pytest.approx(1e-4)
    assert warmup_cosine(510, **kw) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert warmup_cosine(1000, **kw) == pytest.approx(1e-6)


def test_ema_update_is_timm_model_ema_with_integer_buffers_truncated():
    teacher, student = Tiny(), Tiny()
    before = teacher.conv.weight.detach().clone()
    with torch.no_grad():
        student.norm.running_mean.fill_(2.0)
    teacher.norm.num_batches_tracked.fill_(10)
    student.norm.num_batches_tracked.fill_(17)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.conv.weight, 0.9 * before + 0.1 * student.conv.weight)
    torch.testing.assert_close(teacher.norm.running_mean, torch.full((3,), 0.2))
    # 10 * 0.9 + 0.1 * 17 = 10.7, truncated (not copied, not rounded)
    assert teacher.norm.num_batches_tracked.item() == 10


def test_atomic_save_replaces_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "latest.pt"
    ckpt.atomic_save({"a": 1}, path)
    ckpt.atomic_save({"a": 2}, path)
    assert ckpt.load(path) == {"a": 2}

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        ckpt.atomic_save({"a": Unpicklable()}, path)
    assert ckpt.load(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_incompatible_checkpoint_is_named():
    with pytest.raises(ValueError, match="size: checkpoint has 'B', this run has 'tiny'"):
        ckpt.check_compatible({"size": "B"}, {"size": "tiny"}, "x.pt")
    assert math.isfinite(warmup_cosine(5, base_lr=1, min_lr=0, warmup_epochs=0, total_epochs=1))
