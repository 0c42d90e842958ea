#!/usr/bin/env bash
# Lint and format checks (CI runs them first): ruff's lint rules and its formatter on
# the Python code, clang-format on csrc/ (configuration: pyproject.toml [tool.ruff],
# .clang-format). `bash scripts/lint.sh --fix` applies the fixes and the formatting.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}    # where ruff and clang-format are (setup_env.sh installs them there)
mapfile -t CPP < <(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' | sort)
if [ "${1:-}" = "--fix" ]; then
  "$BIN/ruff" check --fix .
  "$BIN/ruff" format .
  "$BIN/clang-format" -i "${CPP[@]}"
else
  "$BIN/ruff" check .
  "$BIN/ruff" format --check .
  "$BIN/clang-format" --dry-run --Werror "${CPP[@]}"
fi
