"""Builds anatomask_fast._C: the C++ CPU kernels always, the CUDA kernels when torch
has CUDA and nvcc is found.

Environment:
  ANATOMASK_BUILD_CUDA=auto|1|0   build the CUDA kernels when possible (default),
                                  always (fail if impossible), or never.
  ANATOMASK_STRICT_BUILD=1        fail the install when the extension does not
                                  compile (by default the package installs without
                                  it and runs the reference backend).
  ANATOMASK_DEBUG=1               -O0 -g.
  ANATOMASK_SANITIZE=1            the CPU kernels with AddressSanitizer and UBSan
                                  (-O1 -g, no CUDA); build it elsewhere than the
                                  normal one: scripts/sanitize.sh.
Install with `pip install --no-build-isolation -e .` so that the build uses the torch
already installed (build isolation would download a CUDA torch).
"""

from __future__ import annotations

import glob
import os
import warnings

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def sanitize() -> bool:
    return os.environ.get("ANATOMASK_SANITIZE") == "1"


def build_cuda() -> bool:
    if sanitize():
        return False
    choice = os.environ.get("ANATOMASK_BUILD_CUDA", "auto")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1" and not possible:
        raise RuntimeError(
            "ANATOMASK_BUILD_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc is missing "
            f"(CUDA_HOME={CUDA_HOME})"
        )
    return possible and choice != "0"


class OptionalBuildExtension(BuildExtension):
    """Lets the package install without its extension unless ANATOMASK_STRICT_BUILD=1."""

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler failure
            if os.environ.get("ANATOMASK_STRICT_BUILD") == "1":
                raise
            warnings.warn(
                f"anatomask_fast: building {ext.name} failed ({error}); "
                "the package will run its reference backend"
            )


def extension():
    debug = os.environ.get("ANATOMASK_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    link = ["-fopenmp"]
    if sanitize():
        # Every UB report aborts (the tests then fail); vptr checks would see libtorch's
        # classes, which are outside this build.
        checks = [
            "-fsanitize=address,undefined",
            "-fno-sanitize=vptr",
            "-fno-sanitize-recover=undefined",
        ]
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", *checks]
        link = [*link, *checks]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # Selects (masks, clamps, activation slopes) in the voxel loops vectorize only when
    # comparisons may run speculatively; no kernel reads floating-point exception flags
    # or errno.
    cxx = [*opt, "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if not build_cuda():
        return CppExtension(
            "anatomask_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return CUDAExtension(
        "anatomask_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("ANATOMASK_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": [*cxx, "-DANATOMASK_WITH_CUDA"],
            "nvcc": [*opt, "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=[
        "anatomask_fast",
        "anatomask_fast.ops",
        "anatomask_fast.reference",
        "anatomask_fast.kernels",
        "anatomask_fast.models",
        "anatomask_fast.train",
    ],
    package_dir={"anatomask_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
)
