#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UBSan: builds anatomask_fast._C with
# -fsanitize=address,undefined (setup.py, ANATOMASK_SANITIZE=1) into build/sanitize/
# (never over the package's own _C), then runs the op tests and the hostile-input
# suite against that build (ANATOMASK_EXTENSION points the package at it).
#
#   bash scripts/sanitize.sh            every op test + the hostile suite
#   bash scripts/sanitize.sh --quick    the hostile suite + the packing tests (CI)
#   bash scripts/sanitize.sh -- ARGS    pytest ARGS instead
#
# The Triton tests are deselected (-k "not triton"; SANITIZE_SELECT overrides): the
# interpreter is not what this build instruments, and it is slow under ASan.
# Any out-of-bounds access or undefined behaviour in a kernel aborts the test process
# with the sanitizer's report, so the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=build/sanitize

PACKING=(tests/test_pack_patches.py tests/test_unpack_patches.py tests/test_pad_halo.py
         tests/test_pad_halo_backward.py)
QUICK=(tests/test_hostile_inputs.py "${PACKING[@]}")
FULL=(tests/test_hostile_inputs.py "${PACKING[@]}" tests/test_gather_tokens.py
      tests/test_scatter_tokens.py tests/test_sparse_norm.py tests/test_patch_recon_loss.py
      tests/test_anatomical_mask.py tests/test_dice_ce_loss.py tests/test_densify.py
      tests/test_apply_mask.py)
case "${1:-}" in
  --quick) TESTS=("${QUICK[@]}") ;;
  --) shift; TESTS=("$@") ;;
  "") TESTS=("${FULL[@]}") ;;
  *) echo "usage: $0 [--quick | -- PYTEST_ARGS...]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
echo "sanitize: building the ASan/UBSan extension in $OUT (log: $OUT/build.log)"
if ! ANATOMASK_SANITIZE=1 ANATOMASK_STRICT_BUILD=1 "$PYTHON" setup.py build_ext \
    --build-lib "$OUT/lib" --build-temp "$OUT/temp" > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" >&2
  exit 1
fi
SO=$(ls "$PWD/$OUT"/lib/anatomask_fast/_C*.so)

# The ASan runtime must be loaded first (Python itself is not instrumented), and
# libstdc++ with it: without it ASan's __cxa_throw interceptor finds no real
# __cxa_throw and aborts at the first C++ exception (every TORCH_CHECK error). Python
# and torch keep memory alive until exit, so leak reports would be noise.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export ANATOMASK_EXTENSION="$SO"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The hostile cases of the C++ kernels and of the reference (see -k below).
export ANATOMASK_HOSTILE_BACKENDS=${ANATOMASK_HOSTILE_BACKENDS:-cpu,cpp,reference}
echo "sanitize: pytest ${TESTS[*]}"
"$PYTHON" - <<'EOF'
import anatomask_fast._extension as ext, os
module, reason = ext.load()
assert module is not None and module.__file__ == os.environ["ANATOMASK_EXTENSION"], reason
print(f"sanitize: kernels from {module.__file__}")
EOF
"$PYTHON" -m pytest -q -p no:cacheprovider -k "${SANITIZE_SELECT:-not triton}" "${TESTS[@]}"
