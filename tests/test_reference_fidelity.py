"""The library's reference-compatible pretraining step against a reference execution
written here to the published semantics (ricklisz/AnatoMask: AnatoMask.py,
encoder3D.py, decoder3D.py, STUNet_head.py, the loop of pretrain_AntoMask.py), on the
same weights, input and masks:

- teacher: a timm ``ModelEma`` copy, in eval mode (decoder BatchNorm with its running
  statistics, not updated by the pass), errors against the raw patch;
- sparse InstanceNorm: the visible voxels of the whole batch as one (C, n) matrix,
  eps 1e-5 in the encoder (STU-Net's InstanceNorm3d), 1e-6 in densify;
- mask: the ``int(n_mask * hard_frac)`` largest teacher errors hidden, the rest of the
  hidden patches from the remaining ones (here: by the given noise);
- student in training mode, normalized-target loss, AdamW with weight decay 1e-5 on
  every parameter, clipping at 12, EMA ``ema * d + (1 - d) * s`` over the whole state
  (integer buffers truncated);
- learning rate: lightning-bolts' ``LinearWarmupCosineAnnealingLR(warmup_epochs=20,
  max_epochs=E, warmup_start_lr=1e-6, eta_min=0)`` stepped once per epoch; EMA decay
  ``0.999 + i / (E // 4) * (0.9999 - 0.999)`` for ``i < E // 4``, else 0.9999.
The reference is built from plain torch modules and ops; nothing of the library's
step, schedules or EMA is used in it."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from anatomask_fast.models import AnatoMaskNet
from anatomask_fast.schedules import masking_schedule
from anatomask_fast.train.config import PretrainConfig
from anatomask_fast.train.config import check as check_config
from anatomask_fast.train.optim import ema_decay_at_epoch, ema_update
from anatomask_fast.train.pretrain import (
    build_optimizer,
    epoch_lr,
    pretrain_step,
    published_hard_frac,
)
from anatomask_fast.train.step import optimizer_step

P = 16  # patch size = the encoder's downsampling
ENCODER_EPS, DENSIFY_EPS = 1e-5, 1e-6
SLOPE = 0.01


# ---------------------------------------------------------------- the published step


def full_mask(active: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    f = t.shape[2] // active.shape[2]
    return active.repeat_interleave(f, 2).repeat_interleave(f, 3).repeat_interleave(f, 4)


def pooled_instance_norm(x, active, weight, bias, eps):
    """SparseInstanceNorm: nn.InstanceNorm1d on the (C, n) matrix of every visible voxel
    of the batch; hidden positions zero."""
    b, h, w, d = torch.nonzero(full_mask(active, x)[:, 0], as_tuple=True)
    cn = x[b, :, h, w, d].t()
    mean = cn.mean(1, keepdim=True)
    var = cn.var(1, unbiased=False, keepdim=True)
    cn = (cn - mean) / torch.sqrt(var + eps) * weight[:, None] + bias[:, None]
    out = torch.zeros_like(x)
    out[b, :, h, w, d] = cn.t()
    return out


def published_forward(net, x, active):
    """SparK.forward with the SparK-converted STU-Net encoder and LightDecoder."""

    def sparse(t):
        return t * full_mask(active, t)

    h = sparse(x)
    features = []
    for stage in net.encoder.conv_blocks_context:
        for block in stage:
            y = F.leaky_relu(
                pooled_instance_norm(
                    sparse(block.conv1(h)),
                    active,
                    block.norm1.weight,
                    block.norm1.bias,
                    ENCODER_EPS,
                ),
                SLOPE,
            )
            y = pooled_instance_norm(
                sparse(block.conv2(y)), active, block.norm2.weight, block.norm2.bias, ENCODER_EPS
            )
            skip = sparse(block.conv3(h)) if block.conv3 is not None else h
            h = F.leaky_relu(y + skip, SLOPE)
        features.append(h)
    features.reverse()
    to_dec = []
    for i, f in enumerate(features):
        norm = net.densify_norms[i]
        f = pooled_instance_norm(f, active, norm.weight, norm.bias, DENSIFY_EPS)
        f = torch.where(full_mask(active, f).expand_as(f), f, net.mask_tokens[i].expand_as(f))
        to_dec.append(net.densify_projs[i](f))
    out = 0
    for i, level in enumerate(net.decoder.dec):
        out = level.conv(level.up_sample(out + to_dec[i]))
    return net.decoder.proj(out)


def patchify(t):
    B, C, H, W, D = t.shape
    t = t.reshape(B, C, H // P, P, W // P, P, D // P, P)
    return torch.einsum("bchpwqdg->bhwdpqgc", t).reshape(B, -1, C * P**3)


def teacher_errors_published(teacher, x, active):
    with torch.no_grad():
        rec = published_forward(teacher, x, active)
        l2 = ((patchify(rec) - patchify(x)) ** 2).mean(dim=2)
        return l2 * active.logical_not().int().view(x.shape[0], -1)


def student_loss_published(rec, x, active):
    inp, rec = patchify(x), patchify(rec)
    mean, var = inp.mean(-1, keepdim=True), inp.var(-1, keepdim=True)
    inp = (inp - mean) / (var + 1e-6) ** 0.5
    l2 = ((rec - inp) ** 2).mean(dim=2)
    hidden = active.logical_not().int().view(x.shape[0], -1)
    return (l2 * hidden).sum() / (hidden.sum() + 1e-8)


def mask_published(errors, noise, mask_ratio, hard_frac):
    """(active, hard) with the published counts: the n_hard largest errors hidden, the
    other hidden patches the remaining ones of smallest noise."""
    B, L = errors.shape
    len_keep = round(L * (1 - mask_ratio))
    n_mask = L - len_keep
    n_hard = int(n_mask * hard_frac)
    hard_ids = torch.argsort(errors, dim=1)[:, L - n_hard :]
    hard = torch.zeros(B, L, dtype=torch.bool).scatter_(1, hard_ids, True)
    rest_noise = noise.masked_fill(hard, math.inf)
    random_ids = torch.argsort(rest_noise, dim=1, stable=True)[:, : n_mask - n_hard]
    hidden = hard.clone().scatter_(1, random_ids, True)
    return ~hidden, hard


def ema_published(ema, model, decay):
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            e.copy_(e * decay + (1.0 - decay) * m)


def lr_lightning_bolts(epochs, base_lr=1e-4, warmup=20, start=1e-6, eta_min=0.0):
    """The scheduler's chainable form, as ``scheduler.step()`` once per epoch runs it."""
    lrs = [start]
    for e in range(1, epochs):
        lr = lrs[-1]
        if e < warmup:
            lr = lr + (base_lr - start) / (warmup - 1)
        elif e == warmup:
            lr = base_lr
        else:
            span = epochs - warmup
            lr = (1 + math.cos(math.pi * (e - warmup) / span)) / (
                1 + math.cos(math.pi * (e - warmup - 1) / span)
            ) * (lr - eta_min) + eta_min
        lrs.append(lr)
    return lrs


def ema_decay_published(i, epochs):
    return 0.999 + i / (epochs // 4) * (0.9999 - 0.999) if i < epochs // 4 else 0.9999


# ---------------------------------------------------------------- the comparison


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_models(dtype):
    """A trained-looking student and a lagging EMA teacher: BatchNorm running statistics
    away from their initial values, teacher weights and statistics not the student's,
    num_batches_tracked where truncation matters."""
    torch.manual_seed(0)
    student = AnatoMaskNet("tiny", 1).to(dtype)
    with torch.no_grad():
        warm = torch.randn(2, 1, 32, 32, 64, dtype=dtype)
        student(warm, torch.rand(2, 1, 2, 2, 4) < 0.5)  # running stats off 0 / 1
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in student.named_buffers():
            if name.endswith("running_var"):
                b.mul_(1.3)
    for (name, b), s in zip(teacher.named_buffers(), student.buffers()):
        if name.endswith("num_batches_tracked"):
            b.fill_(5)
            s.fill_(7)
    return student, teacher


def config(epochs=1000):
    return PretrainConfig(data="x", reference_compatible=True, epochs=epochs).resolved()


def library_and_reference_step(dtype, epoch=30, hard_frac=0.5):
    student, teacher = make_models(dtype)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ref_teacher.eval()  # ModelEma's copy
    teacher.train()  # the library must put it in eval itself
    x = torch.randn(2, 1, 32, 32, 64, dtype=dtype)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    cfg = config()
    lib = pretrain_step(
        student, teacher, x, mask_ratio=0.6, hard_frac=hard_frac, seed=11, noise=noise
    )
    optimizer = build_optimizer(student, cfg)
    for group in optimizer.param_groups:
        group["lr"] = epoch_lr(cfg, epoch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # The gradients before clipping; optimizer_step then runs backward again.
    lib.loss.backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    optimizer_step(lib.loss, optimizer, scaler, student.parameters(), cfg.clip_grad)
    ema_update(teacher, student, ema_decay_at_epoch(epoch, cfg.epochs))

    # The published step, on the copies.
    errors = teacher_errors_published(ref_teacher, x, lib.teacher_mask.active)
    active, hard = mask_published(errors, noise, 0.6, hard_frac)
    active = active.view(lib.mask.active.shape)
    ref_student.train()
    loss = student_loss_published(published_forward(ref_student, x, active), x, active)
    ref_optimizer = torch.optim.AdamW(
        ref_student.parameters(),
        lr=lr_lightning_bolts(1000)[epoch],
        betas=(0.9, 0.999),
        weight_decay=1e-5,
    )
    ref_optimizer.zero_grad()
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_student.named_parameters() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(ref_student.parameters(), 12)
    ref_optimizer.step()
    ema_published(ref_teacher, ref_student, ema_decay_published(epoch, 1000))
    return dict(
        lib=lib,
        errors=errors,
        active=active,
        hard=hard,
        loss=loss,
        grads=grads,
        ref_grads=ref_grads,
        models=(student, teacher, ref_student, ref_teacher),
    )


@pytest.fixture(scope="module")
def float64_step():
    return library_and_reference_step(torch.float64)


def test_teacher_errors_hard_set_and_visible_mask(float64_step):
    s = float64_step
    lib = s["lib"]
    assert rel(lib.teacher_errors, s["errors"]) <= 1e-9
    assert torch.equal(lib.mask.hard.view(2, -1), s["hard"]) and s["hard"].sum() == 2 * 5
    assert torch.equal(lib.mask.active, s["active"])


def test_student_loss_and_every_gradient(float64_step):
    s = float64_step
    assert abs(s["lib"].loss.item() - s["loss"].item()) <= 1e-9 * abs(s["loss"].item())
    assert set(s["grads"]) == set(s["ref_grads"])
    # Biases of convolutions followed by an InstanceNorm have a zero gradient in exact
    # arithmetic (about 1e-17 from rounding): compared with an absolute floor.
    for name, grad in s["grads"].items():
        ref = s["ref_grads"][name]
        assert (grad - ref).norm() <= 1e-9 * ref.norm() + 1e-15, name
    assert s["ref_grads"]["decoder.proj.weight"].norm() > 1e-3


def test_weights_ema_and_batchnorm_statistics_after_the_step(float64_step):
    """After AdamW (decay on all), clipping and the EMA: every parameter and buffer of
    student and teacher, BatchNorm running statistics (the student's updated by its
    pass, the teacher's not by its own) and the truncated num_batches_tracked."""
    student, teacher, ref_student, ref_teacher = float64_step["models"]
    for lib_net, ref_net in ((student, ref_student), (teacher, ref_teacher)):
        ref_state = ref_net.state_dict()
        for name, value in lib_net.state_dict().items():
            if value.dtype.is_floating_point:
                assert rel(value, ref_state[name]) <= 1e-9, name
            else:
                assert torch.equal(value, ref_state[name]), name
    tracked = {n: b.item() for n, b in teacher.named_buffers() if n.endswith("tracked")}
    assert tracked and set(tracked.values()) == {5}  # 5 * d + (1 - d) * 8 = 5.003, truncated


def test_float32_loss_and_hard_set():
    s = library_and_reference_step(torch.float32)
    assert abs(s["lib"].loss.item() - s["loss"].item()) <= 1e-5 * abs(s["loss"].item())
    assert torch.equal(s["lib"].mask.hard.view(2, -1), s["hard"])


def test_learning_rate_is_lightning_bolts_per_epoch_over_1000_epochs():
    cfg = config()
    expected = lr_lightning_bolts(1000)
    got = [epoch_lr(cfg, e) for e in range(1000)]
    assert got[0] == 1e-6 and got[19] == pytest.approx(1e-4) and got[20] == 1e-4
    for e, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 1e-9 * b + 1e-18, e


def test_ema_decay_per_epoch_over_1000_epochs_and_short_runs():
    for epochs in (1000, 7, 3):
        got = [ema_decay_at_epoch(i, epochs) for i in range(epochs)]
        want = [ema_decay_published(i, epochs) if epochs // 4 else 0.9999 for i in range(epochs)]
        assert got == pytest.approx(want, rel=0, abs=1e-15), epochs
    assert ema_decay_at_epoch(125, 1000) == pytest.approx(0.99945)


def test_hard_frac_published_formula_uncapped_in_reference_mode_capped_by_default():
    schedule = masking_schedule("linear", total_epochs=2, max_frac=0.5)
    published = [0.5 * (e + 1) / (2 - 1) for e in range(2)]  # 0.5, 1.0
    reference = [published_hard_frac(schedule, config(2), e, 0) for e in range(2)]
    default = PretrainConfig(data="x", epochs=2).resolved()
    capped = [published_hard_frac(schedule, default, e, 0) for e in range(2)]
    assert reference == published and capped == [0.5, 0.5]


def test_method_options_are_checked():
    with pytest.raises(
        ValueError, match="cannot be combined with --per-sample-norm, --decay-exempt"
    ):
        check_config(
            PretrainConfig(reference_compatible=True, per_sample_norm=True, decay_exempt=True)
        )
    with pytest.raises(
        ValueError,
        match="argument --teacher-target: invalid choice: 'noisy' "
        r"\(choose from 'raw', 'normalized', 'centred', "
        r"'relative'\)",
    ):
        check_config(PretrainConfig(teacher_target="noisy"))
    with pytest.raises(
        ValueError, match="cannot be combined with --teacher-target centred, --teacher-foreground"
    ):
        check_config(
            PretrainConfig(
                reference_compatible=True, teacher_target="centred", teacher_foreground=True
            )
        )
    check_config(PretrainConfig(per_sample_norm=True, teacher_target="normalized"))
