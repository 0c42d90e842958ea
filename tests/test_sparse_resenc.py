"""The packed residual encoder (``models/sparse_resenc.py``) against the dense masked
execution (SparK's semantics: the input masked, every conv and pooling output masked,
every InstanceNorm over visible voxels only), in float64, forward and backward, on
random weights and masks at ratios 0.6 and 0.75, odd grids and batches; the dense
masked execution against dynamic-network-architectures' real encoder converted
SparK-style with hooks (as nnssl's ``convert_to_spark_cnn``); the whole pretraining
network against its reference execution."""

import contextlib

import pytest
import torch
from torch import nn

from anatomask_fast import patch_recon_loss
from anatomask_fast.models.anatomask import AnatoMaskNet, reference_execution
from anatomask_fast.models.resenc import ResEncArch, ResidualEncoder
from anatomask_fast.models.sparse_resenc import SparseResidualEncoder
from anatomask_fast.reference import upsample_mask
from anatomask_fast.reference.gather_scatter import sparse_norm_reference

from .conftest import gpu

# float64: only the summation order differs between the executions (see
# test_sparse_encoder.py for why fp32 is not compared this tightly).
TOL = dict(rtol=1e-9, atol=1e-9)
ISO = ((3, 3, 3),)
# Five stages: total stride 16 = the mask cell, the deepest stage one voxel per cell.
FIVE = ResEncArch(
    features=(4, 8, 8, 8, 8),
    kernels=ISO * 5,
    strides=((1, 1, 1),) + ((2, 2, 2),) * 4,
    blocks=(1, 2, 2, 1, 1),
    decoder_convs=(1,) * 4,
)
# Six stages: the last, at 1/32, is coarser than the 16^3 cells and runs unmasked.
SIX = ResEncArch(
    features=(4, 8, 8, 8, 8, 8),
    kernels=ISO * 6,
    strides=((1, 1, 1),) + ((2, 2, 2),) * 5,
    blocks=(1, 2, 1, 1, 1, 1),
    decoder_convs=(1,) * 5,
)
# An anisotropic plan: (1, 3, 3) kernels and (1, 2, 2) strides, cells (4, 8, 8).
ANISO = ResEncArch(
    features=(4, 8, 8, 8),
    kernels=((1, 3, 3), (3, 3, 3), (1, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    blocks=(1, 2, 1, 1),
    decoder_convs=(1, 1, 1),
)
# (arch, batch, spatial): grids 3x2x1, 2x4x2 and 2x2x3 with batches of 3, 2, 3.
CASES = {
    "five": (FIVE, 3, (48, 32, 16)),
    "six": (SIX, 2, (32, 64, 32)),
    "aniso": (ANISO, 3, (8, 16, 24)),
}


def _encoder(arch: ResEncArch, seed: int) -> ResidualEncoder:
    torch.manual_seed(seed)
    encoder = ResidualEncoder(arch, 1).double()
    with torch.no_grad():  # non-trivial affine norms (nnU-Net zeroes some)
        for name, p in encoder.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return encoder


def _mask(batch: int, grid: tuple[int, ...], ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(L * (1 - ratio)) visible cells per sample, as the method draws."""
    cells = grid[0] * grid[1] * grid[2]
    order = torch.rand(batch, cells, generator=gen).argsort(dim=1)
    return (order < round(cells * (1 - ratio))).view(batch, 1, *grid)


def _case(name: str, ratio: float, seed: int):
    arch, batch, spatial = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *spatial, generator=gen, dtype=torch.float64)
    patch = SparseResidualEncoder(ResidualEncoder(arch, 1)).patch
    active = _mask(batch, tuple(s // p for s, p in zip(spatial, patch)), ratio, gen)
    probes = [
        torch.randn(
            batch,
            w,
            *(s // c for s, c in zip(spatial, arch.cumulative_stride(i))),
            generator=gen,
            dtype=torch.float64,
        )
        for i, w in enumerate(arch.features)
    ]
    return _encoder(arch, seed), x, active, probes


def _grads(encoder: nn.Module, features, probes):
    loss = sum((f * p).sum() for f, p in zip(features, probes))
    return torch.autograd.grad(loss, list(encoder.parameters()))


def _run(encoder, x, active, probes, **options):
    features = SparseResidualEncoder(encoder, **options)(x, active)
    return features, _grads(encoder, features, probes)


def _assert_close(encoder, features, grads, expected, expected_grads):
    for s, (f, e) in enumerate(zip(features, expected)):
        torch.testing.assert_close(f, e, **TOL, msg=lambda m: f"stage {s}: {m}")
    named = dict(zip((n for n, _ in encoder.named_parameters()), expected_grads))
    for (name, _), g, e in zip(encoder.named_parameters(), grads, expected_grads):
        # A conv bias right before an InstanceNorm has an exactly-zero gradient; both
        # sides hold rounding noise of the norm bias's gradient, the sum it cancels.
        scale = (
            named[name.replace("conv.bias", "norm.bias")].abs().max()
            if name.endswith("conv.bias")
            else e.abs().max()
        )
        torch.testing.assert_close(
            g,
            e,
            rtol=TOL["rtol"],
            atol=TOL["atol"] * max(1.0, float(scale)),
            msg=lambda m: f"{name}: {m}",
        )


@pytest.mark.parametrize("per_sample", [False, True], ids=["pooled", "per-sample"])
@pytest.mark.parametrize("name", ["five", "six"])
@pytest.mark.parametrize("ratio", [0.6, 0.75])
def test_packed_matches_dense_masked(ratio, name, per_sample):
    encoder, x, active, probes = _case(name, ratio, seed=int(ratio * 100) + len(name))
    expected, expected_grads = _run(
        encoder, x, active, probes, per_sample=per_sample, packed_stages=0
    )
    sparse = SparseResidualEncoder(encoder, per_sample=per_sample)
    assert sparse.layout(active).stages[0].packed  # the cost plan packs stage 0
    features, grads = _run(encoder, x, active, probes, per_sample=per_sample)
    _assert_close(encoder, features, grads, expected, expected_grads)
    for s, (f, masked) in enumerate(zip(features, sparse.masked_stages)):
        if masked:
            hidden = ~upsample_mask(active, tuple(f.shape[2:])).expand_as(f)
            assert not f[hidden].any(), f"stage {s}: hidden positions must be exactly zero"
    assert sparse.masked_stages[-1] == (name == "five")


def test_every_packed_prefix_matches_dense_masked():
    """Every transition packed -> dense-masked, down to one-voxel patches (q = 1)."""
    encoder, x, active, probes = _case("six", 0.6, seed=3)
    expected, expected_grads = _run(encoder, x, active, probes, per_sample=True, packed_stages=0)
    for packed_stages in (1, 3, 5):
        features, grads = _run(
            encoder, x, active, probes, per_sample=True, packed_stages=packed_stages
        )
        _assert_close(encoder, features, grads, expected, expected_grads)


def _real_encoder(arch: ResEncArch, weights: dict) -> nn.Module:
    """dynamic-network-architectures' ResidualEncoderUNet encoder from ``arch``'s plans,
    with ``weights``."""
    get_network = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    architecture = arch.architecture()
    real = get_network.get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        2,
        allow_init=False,
    ).encoder.double()
    real.load_state_dict(weights)
    return real


@contextlib.contextmanager
def _spark(encoder: nn.Module, active: torch.Tensor, per_sample: bool):
    """SparK's conversion by hooks: conv and pooling outputs masked, InstanceNorms
    over visible voxels (the reference's gather / scatter); maps coarser than the
    mask grid stay unmasked (every voxel visible), as nnssl's SparK3D."""

    def visible(t):
        grid, spatial = active.shape[2:], t.shape[2:]
        return (
            active
            if all(s % g == 0 for s, g in zip(spatial, grid))
            else torch.ones(t.shape[0], 1, 1, 1, 1, dtype=torch.bool)
        )

    def mask_output(module, inputs, output):
        return output * upsample_mask(visible(output), tuple(output.shape[2:]))

    def sparse_norm(module, inputs, output):
        return sparse_norm_reference(
            inputs[0],
            visible(inputs[0]),
            module.weight,
            module.bias,
            per_sample=per_sample,
            eps=module.eps,
        )

    handles = [
        m.register_forward_hook(sparse_norm if isinstance(m, nn.InstanceNorm3d) else mask_output)
        for m in encoder.modules()
        if isinstance(m, (nn.Conv3d, nn.AvgPool3d, nn.InstanceNorm3d))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    "name,ratio,per_sample", [("five", 0.75, True), ("six", 0.6, False), ("aniso", 0.6, True)]
)
def test_dense_masked_is_spark_on_the_real_encoder(name, ratio, per_sample):
    encoder, x, active, probes = _case(name, ratio, seed=5)
    real = _real_encoder(CASES[name][0], encoder.state_dict())
    with _spark(real, active, per_sample):
        expected = real(x * upsample_mask(active, tuple(x.shape[2:])))
        expected_grads = _grads(real, expected, probes)
    for packed_stages in (0, None):
        features, grads = _run(
            encoder, x, active, probes, per_sample=per_sample, packed_stages=packed_stages
        )
        _assert_close(encoder, features, grads, expected, expected_grads)


def test_cells_sides_and_packable_stages():
    six = SparseResidualEncoder(ResidualEncoder(SIX))
    assert six.patch == (16, 16, 16) and six.divisor == (32, 32, 32)
    assert six.sides == (16, 8, 4, 2, 1, None) and six.masked_stages[-1] is False
    aniso = SparseResidualEncoder(ResidualEncoder(ANISO))
    assert aniso.patch == aniso.divisor == (4, 8, 8)
    assert aniso.sides == ((4, 8, 8), 4, 2, 1) and aniso.packable == (False, False, False, True)
    active = torch.ones(1, 1, 2, 2, 3, dtype=torch.bool)
    assert not any(p.packed for p in aniso.layout(active).stages)  # packing is a prefix


def test_pretraining_network_matches_its_reference_execution():
    """The whole pretraining network on the ResEnc (densify, the light decoder with
    per-level strides, stride-1 axes included): lean and packed against the published
    execution, reconstruction and every gradient, float64."""
    for arch, spatial, grid in ((SIX, (32, 64, 32), (2, 4, 2)), (ANISO, (8, 16, 24), (2, 2, 3))):
        torch.manual_seed(0)
        # A narrower decoder than the library's (512 wide) keeps float64 quick.
        net = AnatoMaskNet(
            "resenc", 1, encoder=SparseResidualEncoder(ResidualEncoder(arch)), decoder_width=32
        ).double()
        with torch.no_grad():
            for name, p in net.encoder.named_parameters():
                if "norm" in name:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        for unused in net.unused_in_lean_mode():
            unused.requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 1, *spatial, generator=gen, dtype=torch.float64)
        active = _mask(2, grid, 0.6, gen)
        results = []
        for reference in (False, True):
            net.zero_grad()
            with reference_execution(net) if reference else contextlib.nullcontext():
                rec = net(x, active)
                patch_recon_loss(rec, x, active, net.patch_size)[0].backward()
            results.append(
                (rec.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None})
            )
        (rec, grads), (expected, expected_grads) = results
        torch.testing.assert_close(rec, expected, **TOL)
        assert grads.keys() == expected_grads.keys()
        for name, g in grads.items():
            e = expected_grads[name]
            scale = (
                expected_grads[name.replace("conv.bias", "norm.bias")].abs().max()
                if name.startswith("encoder.") and name.endswith("conv.bias")
                else e.abs().max()
            )
            torch.testing.assert_close(
                g,
                e,
                rtol=TOL["rtol"],
                atol=TOL["atol"] * max(1.0, float(scale)),
                msg=lambda m: f"{name}: {m}",
            )


def test_bad_input_is_named():
    sparse = SparseResidualEncoder(ResidualEncoder(SIX))
    with pytest.raises(
        ValueError,
        match=r"spatial shape \(64, 32, 48\) of 'x' must be divisible "
        r"by the total downsampling 32",
    ):
        sparse(torch.randn(1, 1, 64, 32, 48), torch.ones(1, 1, 4, 2, 3, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"'active' must have the grid \(4, 2, 2\).*got \(2, 2, 2\)"
    ):
        sparse(torch.randn(1, 1, 64, 32, 32), torch.ones(1, 1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'encoder' must be a ResidualEncoder"):
        SparseResidualEncoder(nn.Conv3d(1, 1, 3))


@gpu
@pytest.mark.gpu
def test_packed_matches_dense_masked_on_cuda():
    """The CUDA kernels and cuDNN convs in the packed execution (float64)."""
    for name, ratio, per_sample in (("six", 0.6, False), ("five", 0.75, True)):
        encoder, x, active, probes = _case(name, ratio, seed=11)
        encoder, x, active = encoder.cuda(), x.cuda(), active.cuda()
        probes = [p.cuda() for p in probes]
        expected, expected_grads = _run(
            encoder, x, active, probes, per_sample=per_sample, packed_stages=0
        )
        features, grads = _run(encoder, x, active, probes, per_sample=per_sample)
        _assert_close(encoder, features, grads, expected, expected_grads)


@gpu
@pytest.mark.gpu
def test_pretraining_network_on_cuda():
    """The ResEnc pretraining network on the GPU path (packed encoder on the CUDA /
    Triton kernels, lean decoder): fp32 against the reference execution, bf16 finite
    and close."""
    from anatomask_fast.train.runtime import autocast

    torch.manual_seed(0)
    net = AnatoMaskNet(
        "resenc", 1, encoder=SparseResidualEncoder(ResidualEncoder(SIX)), decoder_width=64
    ).cuda()
    for unused in net.unused_in_lean_mode():
        unused.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 64, 64, 64, generator=gen).cuda()
    active = _mask(2, (4, 4, 4), 0.75, gen).cuda()
    losses = {}
    for name, amp in (("fast", "none"), ("reference", "none"), ("bf16", "bf16")):
        with (
            reference_execution(net) if name == "reference" else contextlib.nullcontext(),
            autocast(x.device, amp),
        ):
            rec = net(x, active).float()
        loss = patch_recon_loss(rec, x, active, net.patch_size)[0]
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        net.zero_grad(set_to_none=True)
        losses[name] = loss.item()
    assert losses["fast"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["bf16"] == pytest.approx(losses["fast"], rel=5e-2)
