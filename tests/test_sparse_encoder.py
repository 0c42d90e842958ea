"""The packed sparse STU-Net encoder against the dense-masked reference execution:
every stage's output and every parameter's gradient, for random masks and weights."""

import pytest
import torch
from torch import nn

from anatomask_fast.models import (
    STUNET_SIZES,
    MaskLayout,
    SparseSTUNetEncoder,
    STUNetEncoder,
    packed_conv,
)
from anatomask_fast.reference import upsample_mask

from .conftest import gpu
from .helpers import random_mask

# Equivalence is checked in float64, where only summation order differs: in fp32 a
# LeakyReLU input within rounding of zero can take the other slope in one execution,
# an O(1) change at that voxel that shows at the 1e-2 level in a random-probe
# gradient sum and is amplified by the deepest norms (a few voxels per sample).
TOL = dict(rtol=1e-7, atol=1e-9)
# Narrower than the "tiny" size: float64 convs are slow on CPU, and the equivalence
# does not depend on the width.
WIDTHS = (4, 8, 8, 8, 8)


def _encoder(seed: int) -> STUNetEncoder:
    torch.manual_seed(seed)
    encoder = STUNetEncoder(1, WIDTHS)
    with torch.no_grad():  # non-trivial affine norms
        for name, p in encoder.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return encoder


def _mask(batch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(L * (1 - ratio)) visible cells per sample, as the method draws."""
    keep = round(8 * (1 - ratio))
    order = torch.rand(batch, 8, generator=gen).argsort(dim=1)
    return (order < keep).view(batch, 1, 2, 2, 2)


def _case(ratio: float, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 32, 32, 32, generator=gen)
    active = _mask(batch, ratio, gen)
    probes = [
        torch.randn(batch, w, 32 >> s, 32 >> s, 32 >> s, generator=gen)
        for s, w in enumerate(WIDTHS)
    ]
    return x, active, probes


def _run(encoder, x, active, probes, **options):
    features = SparseSTUNetEncoder(encoder, **options)(x.to(probes[0].dtype), active)
    loss = sum((f * p).sum() for f, p in zip(features, probes))
    return features, torch.autograd.grad(loss, list(encoder.parameters()))


def _assert_grads_close(encoder, got, expected):
    grads = dict(zip((n for n, _ in encoder.named_parameters()), expected))
    for (name, _), g, e in zip(encoder.named_parameters(), got, expected):
        # A conv bias right before an InstanceNorm has an exactly-zero gradient; both
        # sides hold rounding noise of the norm's bias gradient, the sum it cancels.
        block, layer, leaf = name.rsplit(".", 2)
        norm_bias = f"{block}.{layer.replace('conv', 'norm')}.{leaf}"
        scale = (
            grads[norm_bias].abs().max()
            if layer in ("conv1", "conv2") and leaf == "bias"
            else e.abs().max()
        )
        torch.testing.assert_close(
            g,
            e,
            rtol=TOL["rtol"],
            atol=TOL["atol"] * max(1.0, float(scale)),
            msg=lambda m: f"{name}: {m}",
        )


def _check_equivalence(ratio, batch, per_sample, packed_stages_list, seed, device="cpu"):
    x, active, probes = (
        t.to(device) if torch.is_tensor(t) else [p.to(device) for p in t]
        for t in _case(ratio, batch, seed)
    )
    encoder = _encoder(seed).double().to(device)
    probes = [p.double() for p in probes]
    expected, expected_grads = _run(
        encoder, x, active, probes, per_sample=per_sample, packed_stages=0
    )
    for packed_stages in packed_stages_list:
        features, grads = _run(
            encoder, x, active, probes, per_sample=per_sample, packed_stages=packed_stages
        )
        for s, (f, e) in enumerate(zip(features, expected)):
            torch.testing.assert_close(f, e, **TOL, msg=lambda m: f"stage {s}: {m}")
            hidden = ~upsample_mask(active, tuple(f.shape[2:])).expand_as(f)
            assert not f[hidden].any(), f"stage {s}: hidden positions must be exactly zero"
        _assert_grads_close(encoder, grads, expected_grads)


# Batch 1: pooled and per-sample statistics coincide.
@pytest.mark.parametrize(
    "batch,per_sample",
    [(1, False), (3, False), (3, True)],
    ids=["B1", "B3-pooled", "B3-per-sample"],
)
@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75])
def test_packed_matches_dense_masked(ratio, batch, per_sample):
    """The cost-chosen plan (some stages packed, the deepest dense-masked)."""
    _check_equivalence(ratio, batch, per_sample, [None], seed=int(ratio * 100) + batch)


@gpu
@pytest.mark.gpu
def test_packed_matches_dense_masked_on_cuda():
    """The CUDA kernels and cuDNN convs in the packed execution (float64: exact)."""
    _check_equivalence(0.6, 3, True, [None, 5], seed=11, device="cuda")
    _check_equivalence(0.75, 2, False, [None], seed=12, device="cuda")


def test_every_packed_prefix_matches_dense_masked():
    """Every transition packed -> dense-masked, and all five stages packed (q down to 1)."""
    _check_equivalence(0.6, 2, True, [1, 2, 3, 4, 5], seed=7)


def test_chunked_conv_backward_matches_dense_masked(monkeypatch):
    """One patch per chunk in the CPU conv backward (real sizes use several chunks)."""
    monkeypatch.setattr(packed_conv, "_CPU_CHUNK_BYTES", 1)
    _check_equivalence(0.6, 2, True, [None, 5], seed=5)


def test_fp32_outputs_match_dense_masked():
    """fp32, as trained: conv algorithm differences, amplified by the deepest norms."""
    x, active, _ = _case(0.6, 3, seed=11)
    encoder = _encoder(11)
    with torch.no_grad():
        expected = SparseSTUNetEncoder(encoder, per_sample=True, packed_stages=0)(x, active)
        features = SparseSTUNetEncoder(encoder, per_sample=True)(x, active)
    for s, (f, e) in enumerate(zip(features, expected)):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"stage {s}: {m}")


def test_dense_masked_with_all_visible_equals_the_dense_encoder():
    encoder = _encoder(0)
    x = torch.randn(2, 1, 32, 32, 32)
    active = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    dense = encoder(x)
    for packed_stages in (0, 5):
        sparse = SparseSTUNetEncoder(encoder, per_sample=True, packed_stages=packed_stages)
        for f, e in zip(sparse(x, active), dense):
            torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4)


def test_state_dict_keys_are_the_dense_encoders():
    encoder = STUNetEncoder.from_size("tiny")
    sparse = SparseSTUNetEncoder(encoder)
    assert list(sparse.state_dict()) == list(encoder.state_dict())
    assert "conv_blocks_context.1.0.conv3.weight" in encoder.state_dict()
    assert (
        sparse.conv_blocks_context[0][0].conv1.weight
        is encoder.conv_blocks_context[0][0].conv1.weight
    )


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_sizes_have_the_stunet_structure(size):
    spec = STUNET_SIZES[size]
    encoder = STUNetEncoder.from_size(size)
    assert [len(stage) for stage in encoder.conv_blocks_context] == [spec.depth] * 5
    assert [stage[0].conv1.out_channels for stage in encoder.conv_blocks_context] == list(
        spec.widths
    )
    assert [stage[0].conv1.stride for stage in encoder.conv_blocks_context] == [(1, 1, 1)] + [
        (2, 2, 2)
    ] * 4
    SparseSTUNetEncoder(encoder)  # every layer is supported


def test_stage_plan_by_cost():
    active = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    active.view(2, -1)[:, :26] = True  # mask ratio 0.6
    plan = MaskLayout.build(active).stages
    assert [p.side for p in plan] == [16, 8, 4, 2, 1]
    assert [p.packed for p in plan] == [True, True, False, False, False]
    active.view(2, -1)[:, 16:] = False  # mask ratio 0.75
    assert [p.packed for p in MaskLayout.build(active).stages] == [True, True, True, False, False]


def test_layout_neighbours_are_symmetric():
    active = random_mask(3, (3, 4, 2), keep=0.5, generator=torch.Generator().manual_seed(1))
    layout = MaskLayout.build(active)
    nb = layout.neighbours
    for column in range(27):
        found = nb[:, column] >= 0
        back = nb[nb[:, column][found], 26 - column]
        assert torch.equal(back, torch.arange(nb.shape[0])[found])


def test_bad_input_is_named():
    sparse = SparseSTUNetEncoder(STUNetEncoder.from_size("tiny"))
    with pytest.raises(
        ValueError,
        match=r"spatial shape \(32, 32, 24\) of 'x' must be divisible "
        r"by the total downsampling 16",
    ):
        sparse(torch.randn(1, 1, 32, 32, 24), torch.ones(1, 1, 2, 2, 3, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"'active' must have the grid \(2, 2, 2\).*got \(4, 4, 4\)"
    ):
        sparse(torch.randn(1, 1, 32, 32, 32), torch.ones(1, 1, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"'active' must be a bool"):
        sparse(torch.randn(1, 1, 32, 32, 32), torch.ones(1, 1, 2, 2, 2))


@pytest.mark.parametrize(
    "edit,layer",
    [
        (
            lambda e: setattr(e.conv_blocks_context[1][0], "norm1", nn.BatchNorm3d(16)),
            r"'conv_blocks_context\.1\.0\.norm1' \(BatchNorm3d",
        ),
        (
            lambda e: e.conv_blocks_context[2].append(nn.MaxPool3d(2)),
            r"'conv_blocks_context\.2\.1'",
        ),
        (
            lambda e: setattr(e.conv_blocks_context[0][0], "drop", nn.Dropout3d()),
            r"'conv_blocks_context\.0\.0\.drop' \(Dropout3d",
        ),
        (
            lambda e: setattr(
                e.conv_blocks_context[3][0], "conv2", nn.Conv3d(64, 64, 3, padding=2, dilation=2)
            ),
            r"'conv_blocks_context\.3\.0\.conv2'.*dilation",
        ),
        (
            lambda e: setattr(e.conv_blocks_context[4][0], "act2", nn.GELU()),
            r"'conv_blocks_context\.4\.0\.act2' \(GELU",
        ),
    ],
)
def test_unsupported_layer_is_named(edit, layer):
    encoder = STUNetEncoder.from_size("tiny")
    edit(encoder)
    with pytest.raises(ValueError, match=layer):
        SparseSTUNetEncoder(encoder)
