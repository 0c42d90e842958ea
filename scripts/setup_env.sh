#!/usr/bin/env bash
# Creates .venv with everything the package, its tests and its benchmarks need, on a
# fresh CPU machine, and builds the C++ extension into the source tree (editable).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build on local disk; an unpinned torch would pull CUDA wheels.
.venv/bin/python -m pip install -q -c requirements/constraints.txt -r requirements/cpu.txt
# nnU-Net v2 and its readers (pre-processed input, loader interop tests), same torch.
.venv/bin/python -m pip install -q -c requirements/constraints.txt -r requirements/nnunet.txt
# ruff (Python lint and format) and clang-format (csrc), the versions CI checks with.
.venv/bin/python -m pip install -q -c requirements/constraints.txt -r requirements/lint.txt
ANATOMASK_STRICT_BUILD=1 .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
