"""anatomical_mask / random_mask on every backend: identical masks given the same noise,
the spec's counts and top-k, uniformity of the random part, seeding, ids, bad input."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

import anatomask_fast
from anatomask_fast import active_to_ids, anatomical_mask, ids_to_active, random_mask, use_backend
from anatomask_fast.ops.mask_select import mask_counts

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS, gpu
from .helpers import opcheck

FIELDS = ("active", "hard", "ids_shuffle", "ids_restore")

# (shape, mask_ratio): odd L, a 5-D grid, len_keep = 1 (L=10, 0.9), L=2.
CASES = [
    ((3, 10), 0.6),
    ((2, 1, 3, 5, 7), 0.6),
    ((4, 10), 0.9),
    ((2, 2), 0.5),
    ((5, 392), 0.6),
    ((2, 1, 7, 7, 8), 0.75),
]


def make_errors(shape, gen, dtype=torch.float32):
    """Random errors with the teacher's ties: a third of the patches exactly zero (one
    of them -0.0), plus a run of equal nonzero values."""
    errors = torch.rand(shape, generator=gen).reshape(shape[0], -1)
    L = errors.shape[1]
    errors[:, : L // 3] = 0.0
    errors[:, 0] = -0.0
    errors[:, L // 3 : L // 3 + 3] = 0.5
    return errors.reshape(shape).to(dtype)


def run(backend, *args, **kwargs):
    with use_backend(backend):
        return anatomical_mask(*args, **kwargs)


def check_invariants(result, errors, mask_ratio, hard_frac):
    """Counts, top-n_hard hidden, ids consistent with the mask."""
    B = errors.shape[0]
    active = result.active.reshape(B, -1)
    hard = result.hard.reshape(B, -1)
    L = active.shape[1]
    len_keep, n_hard = mask_counts(L, mask_ratio, hard_frac)
    assert result.len_keep == len_keep and result.n_hard == n_hard
    assert result.active.shape == errors.shape and result.hard.shape == errors.shape
    assert (active.sum(1) == len_keep).all()
    assert (hard.sum(1) == n_hard).all()
    assert not (hard & active).any()
    # The n_hard largest errors (as float32, ties by lower index) are the hard ones.
    flat = errors.reshape(B, -1).float().cpu()
    top = torch.argsort(-flat, dim=1, stable=True)[:, :n_hard]
    expected = torch.zeros(B, L, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(hard.cpu(), expected)
    # ids: kept first, each part ascending; restore inverts shuffle.
    positions = torch.arange(L, device=active.device).expand(B, L)
    assert torch.equal(result.ids_shuffle.gather(1, result.ids_restore), positions)
    assert torch.equal(result.ids_restore.gather(1, result.ids_shuffle), positions)
    assert active.gather(1, result.ids_keep).all()
    assert not active.gather(1, result.ids_hidden).any()
    assert (result.ids_keep.diff(dim=1) > 0).all() and (result.ids_hidden.diff(dim=1) > 0).all()
    assert torch.equal(ids_to_active(result.ids_keep, errors.shape), result.active)
    shuffle, restore = active_to_ids(result.active)
    assert torch.equal(shuffle, result.ids_shuffle) and torch.equal(restore, result.ids_restore)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hard_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape,mask_ratio", CASES)
def test_identical_to_reference_given_noise(backend, device, dtype, hard_frac, shape, mask_ratio):
    gen = torch.Generator().manual_seed(hash((shape, mask_ratio)) % 2**31)
    errors = make_errors(shape, gen, dtype).to(device)
    noise = torch.rand(shape, generator=gen).to(device)
    noise.view(-1)[:4] = 0.25  # ties in the noise too
    expected = run("reference", errors, mask_ratio, hard_frac, noise=noise)
    result = run(backend, errors, mask_ratio, hard_frac, noise=noise)
    for field in FIELDS:
        assert torch.equal(getattr(result, field), getattr(expected, field)), field
    check_invariants(result, errors, mask_ratio, hard_frac)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("hard_frac", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("shape,mask_ratio", CASES)
def test_invariants_with_internal_randomness(backend, device, hard_frac, shape, mask_ratio):
    gen = torch.Generator().manual_seed(7)
    errors = make_errors(shape, gen).to(device)
    result = run(backend, errors, mask_ratio, hard_frac, seed=11, offset=3)
    check_invariants(result, errors, mask_ratio, hard_frac)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_large_grid_and_batch(backend, device):
    """L = 8192 on every backend; B = 64 on the compiled ones (the interpreter and the
    reference loop get B = 2)."""
    B = 2 if backend in ("triton", "reference") and device == "cpu" else 64
    gen = torch.Generator().manual_seed(3)
    errors = make_errors((B, 1, 16, 16, 32), gen).to(device)
    noise = torch.rand(errors.shape, generator=gen).to(device)
    result = run(backend, errors, 0.6, 0.4, noise=noise)
    expected = run("cpu" if device == "cpu" else "reference", errors, 0.6, 0.4, noise=noise)
    for field in FIELDS:
        assert torch.equal(getattr(result, field), getattr(expected, field)), field
    check_invariants(result, errors, 0.6, 0.4)


def subset_chi_square(hidden: torch.Tensor, k: int) -> float:
    """Pearson's statistic of the observed k-subsets of the m columns (one per row)
    against the uniform distribution over all C(m, k) subsets."""
    m = hidden.shape[1]
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(m), k))}
    codes = [subsets[tuple(torch.nonzero(row).flatten().tolist())] for row in hidden.cpu()]
    counts = torch.bincount(torch.tensor(codes), minlength=len(subsets)).double()
    expected = hidden.shape[0] / len(subsets)
    return float(((counts - expected) ** 2 / expected).sum())


# The 0.999 quantile of chi-square with 19 degrees of freedom (C(6, 3) = 20 subsets):
# a fair generator fails this fixed-seed test with probability 1e-3, a biased one
# (say, by index) gives statistics in the thousands.
CHI2_19_999 = 43.82

UNIFORMITY_BACKENDS = [p for p in BACKEND_DEVICES if p.id != "triton-interpreted"]


@pytest.mark.parametrize("backend,device", UNIFORMITY_BACKENDS)
@pytest.mark.parametrize("hard_frac", [0.0, 0.25], ids=["random", "anatomical"])
def test_random_part_is_uniform(backend, device, hard_frac):
    """L = 7 (or 6), 4000 samples in one call: n_hard = 1 fixed patch, then 3 of the
    other 6 hidden uniformly (or 3 of 6 when purely random): each of the 20 subsets
    ~200 times."""
    B = 4000
    L = 6 if hard_frac == 0 else 7
    errors = torch.zeros(B, L, device=device)
    errors[:, 4] = 1.0
    result = run(backend, errors, 0.5 if L == 6 else 0.6, hard_frac, seed=1234)
    hidden = ~result.active
    if hard_frac:
        assert result.n_hard == 1 and result.hard[:, 4].all()
        hidden = hidden & ~result.hard
    candidates = [l for l in range(L) if not (hard_frac and l == 4)]
    statistic = subset_chi_square(hidden[:, candidates], 3)
    assert statistic < CHI2_19_999, statistic


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_seed_reproducibility(backend, device):
    errors = make_errors((3, 50), torch.Generator().manual_seed(0)).to(device)
    first = run(backend, errors, 0.6, 0.3, seed=5)
    assert torch.equal(run(backend, errors, 0.6, 0.3, seed=5).active, first.active)
    assert not torch.equal(run(backend, errors, 0.6, 0.3, seed=6).active, first.active)
    assert not torch.equal(run(backend, errors, 0.6, 0.3, seed=5, offset=1000).active, first.active)
    # The default seed comes from torch's generator.
    torch.manual_seed(42)
    drawn = run(backend, errors, 0.6, 0.3)
    torch.manual_seed(42)
    assert torch.equal(run(backend, errors, 0.6, 0.3).active, drawn.active)
    assert torch.equal(
        run(backend, errors, 0.6, 0.3, generator=torch.Generator().manual_seed(42)).active,
        drawn.active,
    )
    # Samples of one batch get different masks.
    assert not torch.equal(first.active[0], first.active[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def test_philox_stream_is_shared_by_cpu_cuda_and_triton(device):
    """Without noise the compiled backends draw the same Philox bits: same seed, same
    mask on every backend (the reference uses numpy's generator instead)."""
    errors = make_errors((4, 1, 5, 6, 7), torch.Generator().manual_seed(1))
    expected = run("cpu", errors, 0.6, 0.3, seed=2**40 + 7, offset=2**33 + 1)
    backends = ["triton"] + (["cuda"] if device == "cuda" else [])
    for backend in backends:
        result = run(backend, errors.to(device), 0.6, 0.3, seed=2**40 + 7, offset=2**33 + 1)
        for field in FIELDS:
            assert torch.equal(getattr(result, field).cpu(), getattr(expected, field)), field


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(3, 20), (2, 1, 3, 4, 5)])
def test_random_mask(backend, device, shape):
    with use_backend(backend):
        result = random_mask(shape, 0.6, device=device, seed=9)
        again = random_mask(shape, 0.6, device=device, seed=9)
    L = math.prod(shape[1:])
    assert result.active.shape == shape and result.active.device.type == device
    assert (result.active.reshape(shape[0], -1).sum(1) == round(L * 0.4)).all()
    assert not result.hard.any() and result.n_hard == 0
    assert torch.equal(result.active, again.active)
    noise = torch.rand(shape, device=device)
    with use_backend(backend):
        given = random_mask(shape, 0.6, noise=noise)
    expected = torch.argsort(noise.reshape(shape[0], -1), dim=1, stable=True)[
        :, L - round(L * 0.4) :
    ]
    assert torch.equal(ids_to_active(expected, shape), given.active)


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    errors = torch.rand(3, 37)
    noise = torch.rand(3, 37)
    opcheck("anatomical_mask", backend, device, errors, noise, 15, 5, 1, 0)
    opcheck("anatomical_mask", backend, device, errors, None, 15, 5, 1, 0)


def test_torch_compile_fullgraph_on_cpu():
    def step(errors, noise):
        given = anatomical_mask(errors * 2.0, mask_ratio=0.6, hard_frac=0.3, noise=noise)
        seeded = anatomical_mask(errors, mask_ratio=0.6, hard_frac=0.5, seed=3, offset=1)
        return given.active, given.ids_keep, given.hard, seeded.active, seeded.ids_restore

    errors, noise = torch.rand(2, 1, 3, 4, 5), torch.rand(2, 60)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(errors, noise), step(errors, noise)):
        assert torch.equal(got, want)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_synchronization(backend):
    errors = torch.rand(8, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with use_backend(backend):
            result = anatomical_mask(errors, 0.6, 0.3)
            random_mask((8, 4096), 0.6, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_invariants(result, errors, 0.6, 0.3)


CPU_BACKENDS = [p for p in BACKEND_DEVICES if p.values[1] == "cpu"]


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_errors_are_rejected(backend, device, bad):
    errors = torch.rand(2, 20, device=device)
    errors[1, 7] = bad
    with pytest.raises(ValueError, match=r"'errors' must be finite"):
        run(backend, errors, 0.6, 0.3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_non_finite_errors_fail_on_the_device(backend):
    """On a GPU the check is a device-side assertion (a host-side one would
    synchronize), which ends the CUDA context: run it in a separate process."""
    script = (
        "import torch, anatomask_fast as af\n"
        "e = torch.rand(2, 20, device='cuda'); e[1, 7] = float('nan')\n"
        f"with af.use_backend('{backend}'):\n"
        "    af.anatomical_mask(e, 0.6, 0.3)\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0 and "assert" in done.stderr.lower(), done.stderr[-2000:]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda e: anatomical_mask(e, 0.0, 0.3),
            ValueError,
            r"'mask_ratio' must be in \(0, 1\), got 0.0",
        ),
        (
            lambda e: anatomical_mask(e, 1.0, 0.3),
            ValueError,
            r"'mask_ratio' must be in \(0, 1\), got 1.0",
        ),
        (lambda e: anatomical_mask(e, -0.2, 0.3), ValueError, r"'mask_ratio'.*got -0.2"),
        (
            lambda e: anatomical_mask(e, "0.6", 0.3),
            TypeError,
            r"'mask_ratio' must be a real number, got str",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, -0.1),
            ValueError,
            r"'hard_frac' must be in \[0, 1\], got -0.1",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 1.5),
            ValueError,
            r"'hard_frac' must be in \[0, 1\], got 1.5",
        ),
        (lambda e: anatomical_mask(e, 0.99, 0.3), ValueError, r"keeps 0 of L=20"),
        (
            lambda e: anatomical_mask(e.reshape(2, 2, 2, 5, 1), 0.6, 0.3),
            ValueError,
            r"'errors' must have shape \(B, L\) or \(B, 1, h, w, d\), got \(2, 2, 2, 5, 1\)",
        ),
        (
            lambda e: anatomical_mask(e.reshape(40), 0.6, 0.3),
            ValueError,
            r"'errors' must have shape.*\(40,\)",
        ),
        (lambda e: anatomical_mask(e.reshape(2, 4, 5), 0.6, 0.3), ValueError, r"got \(2, 4, 5\)"),
        (lambda e: anatomical_mask(e[:, :1], 0.6, 0.3), ValueError, r"L >= 2.*\(2, 1\)"),
        (
            lambda e: anatomical_mask(e.long(), 0.6, 0.3),
            TypeError,
            r"'errors' must have dtype.*torch.int64",
        ),
        (
            lambda e: anatomical_mask(e.tolist(), 0.6, 0.3),
            TypeError,
            r"'errors' must be a torch.Tensor, got list",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 0.3, noise=torch.rand(2, 19)),
            ValueError,
            r"'noise' must have shape \(2, 20\)",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 0.3, noise=torch.rand(2, 20, device="meta")),
            ValueError,
            r"'noise' is on meta",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 0.3, noise=torch.full((2, 20), float("nan"))),
            ValueError,
            r"'noise' must be finite",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 0.3, seed=-1),
            ValueError,
            r"'seed' must be in \[0, 2\*\*63\), got -1",
        ),
        (
            lambda e: anatomical_mask(e, 0.6, 0.3, seed=1.5),
            TypeError,
            r"'seed' must be an int, got float",
        ),
        (lambda e: anatomical_mask(e, 0.6, 0.3, offset=-3), ValueError, r"'offset' must be in"),
        (
            lambda e: random_mask((2, 1, 4, 5), 0.6),
            ValueError,
            r"random_mask: argument 'shape' must have shape",
        ),
        (lambda e: random_mask((2, 20), 1.2), ValueError, r"random_mask: argument 'mask_ratio'"),
        (
            lambda e: ids_to_active(torch.zeros(3, 4, dtype=torch.long), (2, 20)),
            ValueError,
            r"'ids_keep' must be \(2, len_keep <= 20\)",
        ),
        (
            lambda e: ids_to_active(torch.zeros(2, 4, dtype=torch.int32), (2, 20)),
            TypeError,
            r"'ids_keep' must have dtype",
        ),
        (
            lambda e: active_to_ids(e),
            TypeError,
            r"'active' must have dtype in \(torch.bool\), got torch.float32",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    errors = torch.rand(2, 20)
    with pytest.raises(error, match=match):
        call(errors)


def test_cpp_operator_checks_its_arguments():
    op = torch.ops.anatomask_fast.anatomical_mask
    errors = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"'len_keep' must be in \[1, L=10\), got 10"):
        op(errors, None, 10, 0, 0, 0)
    with pytest.raises(ValueError, match=r"'n_hard' must be in \[0, L - len_keep=6\], got 7"):
        op(errors, None, 4, 7, 0, 0)
    with pytest.raises(TypeError, match=r"'noise' must be float32"):
        op(errors, errors.double(), 4, 1, 0, 0)


def test_exports():
    assert anatomask_fast.anatomical_mask is anatomical_mask
    assert anatomask_fast.MaskResult.__dataclass_params__.frozen


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_non_finite_errors_stop_the_device(backend):
    """On a GPU the check is a device-side assertion (a host check would synchronize);
    it poisons the CUDA context, so it runs in a fresh process."""
    code = (
        "import torch, anatomask_fast as a\n"
        "e = torch.rand(2, 64, device='cuda'); e[1, 5] = float('nan')\n"
        f"with a.use_backend({backend!r}):\n"
        "    a.anatomical_mask(e, 0.6, 0.5).active.cpu()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "device-side assert" in done.stderr or "must be finite" in done.stderr, done.stderr
