"""Without a GPU the CUDA kernels cannot run here, but nvcc must compile every CUDA
source against the installed torch headers, so that a GPU machine can build them."""

import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))


def nvcc() -> str:
    found = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not installed on this CI machine")
        pytest.skip("nvcc is not installed")
    return found


def compile_command(source: str, out: Path) -> list[str]:
    return [
        nvcc(),
        "-c",
        source,
        "-o",
        str(out),
        "-std=c++20",
        "-arch=sm_90",
        "--expt-relaxed-constexpr",
        # The CPU torch wheel lacks the generated cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DANATOMASK_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcudafe",
        "--diag_suppress=3306",  # bit-field initializers in torch headers
        *[f"-I{path}" for path in include_paths()],
        f"-I{sysconfig.get_paths()['include']}",
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every source compiled once, as many at a time as there are cores (each nvcc run
    is a chain of single-threaded phases: one at a time left CI's cores half idle)."""
    out = tmp_path_factory.mktemp("cuda")
    commands = {
        source: compile_command(source, out / f"{Path(source).stem}.o") for source in SOURCES
    }
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(
            lambda command: subprocess.run(command, capture_output=True, text=True),
            commands.values(),
        )
        return dict(zip(commands, results))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[Path(s).name for s in SOURCES])
def test_cuda_source_compiles(source, compiled):
    result = compiled[source]
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_cuda_family_has_a_cpu_twin():
    cpu = {Path(s).stem for s in glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp"))}
    assert {Path(s).stem for s in SOURCES} <= cpu
