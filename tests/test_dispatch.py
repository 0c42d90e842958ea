"""Backend reporting, selection and the fallback when the extension is missing."""

import os
import subprocess
import sys

import pytest
import torch

import anatomask_fast
from anatomask_fast.dispatch import BACKEND_ENV, use_backend
from anatomask_fast.ops.gather_scatter import APPLY_MASK

from .conftest import HAS_CUDA


def test_backends_report_every_backend_with_a_reason():
    report = anatomask_fast.backends()
    assert list(report) == ["cuda", "triton", "cpu", "reference"]
    assert report["reference"].available
    for status in report.values():
        assert status.detail
    if not HAS_CUDA:
        assert not report["cuda"].available
        assert "interpreted" in report["triton"].detail


@pytest.mark.skipif(
    os.environ.get("ANATOMASK_ALLOW_NO_EXT") == "1", reason="extension deliberately absent"
)
def test_cpu_extension_is_built():
    assert anatomask_fast.backends()["cpu"].available, anatomask_fast.backends()["cpu"].detail


def test_default_choice_on_cpu_is_the_cpp_kernel():
    expected = "cpu" if anatomask_fast.backends()["cpu"].available else "reference"
    assert APPLY_MASK.select(torch.device("cpu")) == expected


def test_use_backend_forces_and_nests():
    with use_backend("reference"):
        assert APPLY_MASK.select(torch.device("cpu")) == "reference"
        with use_backend("triton"):
            assert APPLY_MASK.select(torch.device("cpu")) == "triton"
        assert APPLY_MASK.select(torch.device("cpu")) == "reference"


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert APPLY_MASK.select(torch.device("cpu")) == "reference"
    with use_backend("auto"):
        assert (
            APPLY_MASK.select(torch.device("cpu")) != "reference"
            or not anatomask_fast.backends()["cpu"].available
        )
    monkeypatch.setenv(BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match="ANATOMASK_BACKEND.*'fastest'"):
        APPLY_MASK.select(torch.device("cpu"))


def test_unknown_or_impossible_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with use_backend("gpu"):
            pass
    x = torch.randn(1, 1, 4, 4, 4)
    active = torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="apply_mask: backend 'cuda'"):
        anatomask_fast.apply_mask(x, active)


def test_package_works_without_the_extension():
    """With _C unimportable the package warns once and runs the reference."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['anatomask_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import anatomask_fast as a\n"
        "    report = a.backends()\n"
        "    x = torch.randn(1, 2, 4, 4, 4); m = torch.rand(1, 1, 2, 2, 2) > 0.5\n"
        "    y = a.apply_mask(x, m); a.apply_mask(x, m)\n"
        "assert not report['cpu'].available and 'not built' in report['cpu'].detail\n"
        "from anatomask_fast.reference import apply_mask_reference\n"
        "assert torch.equal(y, apply_mask_reference(x, m))\n"
        "assert sum('not built' in str(w.message) for w in caught) == 1, caught\n"
    )
    env = {**os.environ, "ANATOMASK_BACKEND": "auto"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
