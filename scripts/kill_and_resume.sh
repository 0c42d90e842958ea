#!/usr/bin/env bash
# The kill-and-resume test with many interruptions (SIGKILL / SIGTERM / SIGUSR1 at
# random moments after checkpoint writes, 0 and 2 loader workers): a few minutes on a CPU.
# Usage: scripts/kill_and_resume.sh [interruptions, default 12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
ANATOMASK_RESUME_INTERRUPTIONS="${1:-12}" OMP_NUM_THREADS=1 \
    "$PYTHON" -m pytest -q tests/test_train_resume.py -p no:cacheprovider
