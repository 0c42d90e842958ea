#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the device tool runs it in a
# copy of the working tree, with python3 holding a CUDA torch and Triton):
#   bash scripts/gpu_check.sh [TEST_SECONDS] [BENCH_SECONDS] [BENCH_FILE[:FILTER]...]
# (FILTER: a pytest -k expression that narrows a file's GPU cases, e.g. "112 or 128")
# 1. makes the package importable from the tree (extension: a prebuilt .so carried in
#    .gpubuild/ when it loads there, else built for sm_90 here);
# 2. runs the GPU tests (`-m gpu`) for at most TEST_SECONDS (0: skip);
# 3. runs the GPU benchmarks (`-k cuda`) for at most BENCH_SECONDS (0: skip) through
#    `python -m benchmarks.report`, which merges them into benchmarks/results.json and
#    rewrites RESULTS.md, ratios.png and the README table;
# 4. profiles the training steps for at most PROFILE_SECONDS (environment, default 150;
#    0: skip): whole-step allocator peaks and step times (benchmarks.training_memory:
#    STU-Net-B with the lean decoder's default and a GPU-sized slice budget, STU-Net-L; models and
#    optimizer state included) and, per step, the kernels with the most device time and
#    the live tensors at the peak (benchmarks.memory_timeline --kernels).
# Logs and the rewritten files land in $OUT (default /tmp/gpu_check).
#
# Prebuilding here saves device time (a build there takes minutes): in a Python 3.12
# venv with the device's torch (torch==2.11.0, the cu130 wheel) and CUDA_HOME set to
# nvcc 13.0, `TORCH_CUDA_ARCH_LIST=9.0 ANATOMASK_BUILD_CUDA=1 python setup.py build_ext
# --inplace`, then copy anatomask_fast/_C.cpython-312-*.so into .gpubuild/ (ignored by
# git, named in the device call's carry, with the wheels in .whl/).
set -u
TEST_SECONDS=${1:-240}
BENCH_SECONDS=${2:-240}
shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# Packages the image lacks (monai, nibabel, expecttest), carried as wheels in .whl/.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The tree as the installed package: kernels/ is installed as anatomask_fast.kernels.
ln -sfn ../kernels anatomask_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

cuda_ready() {
  $PY -c "import sys, anatomask_fast as a; r = a.backends(); print({k: (v.available, v.detail) for k, v in r.items()}); sys.exit(0 if r['cuda'].available else 1)"
}
cp .gpubuild/_C*.so anatomask_fast/ 2>/dev/null
if ! cuda_ready 2>&1 | tee -a "$OUT/env.txt"; then
  echo "prebuilt extension unusable here: building for sm_90" | tee -a "$OUT/env.txt"
  rm -f anatomask_fast/_C*.so
  start=$(date +%s)
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 ANATOMASK_BUILD_CUDA=1 ANATOMASK_STRICT_BUILD=1 \
    $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
  tail -20 "$OUT/build.log"
  cuda_ready 2>&1 | tee -a "$OUT/env.txt" || exit 1
fi

if [ "$TEST_SECONDS" != 0 ]; then
  start=$(date +%s)
  timeout "$TEST_SECONDS" $PY -m pytest tests -m gpu -q -n 8 -p no:cacheprovider --tb=short \
    -rf >"$OUT/tests.log" 2>&1
  echo "tests: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40
fi

if [ "$BENCH_SECONDS" != 0 ]; then
  # One report per file, so that a file cut off by the time limit loses only itself.
  deadline=$(( $(date +%s) + BENCH_SECONDS ))
  files=("$@")
  [ ${#files[@]} = 0 ] && files=(benchmarks/bench_{anatomical_mask,patch_recon_loss,gather_tokens,scatter_tokens,densify,sparse_norm,apply_mask,pack_patches,unpack_patches,pad_halo,pad_halo_backward,dice_ce_loss,sparse_encoder,pretrain_step,finetune_step,resenc_pretrain_step}.py)
  for entry in "${files[@]}"; do
    file=${entry%%:*}
    filter=cuda
    [ "$file" != "$entry" ] && filter="cuda and (${entry#*:})"
    left=$(( deadline - $(date +%s) ))
    [ $left -lt 20 ] && { echo "benchmarks: no time left for $file" | tee -a "$OUT/env.txt"; continue; }
    start=$(date +%s)
    timeout $left $PY -m benchmarks.report "$file" -k "$filter" >>"$OUT/bench.log" 2>&1
    echo "benchmark $file: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
    cp benchmarks/results.json benchmarks/RESULTS.md benchmarks/ratios.png "$OUT/"
  done
  grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/bench.log" | tail -20
fi

PROFILE_SECONDS=${PROFILE_SECONDS:-150}
profile_deadline=$(( $(date +%s) + PROFILE_SECONDS ))
profile() {   # profile MODULE ARGS...: python -m benchmarks.MODULE ARGS, within the budget
  local module=$1 left=$(( profile_deadline - $(date +%s) ))
  shift
  [ $left -lt 15 ] && { echo "profile: no time left for $module $*" | tee -a "$OUT/env.txt"; return; }
  echo "== $module $*" >>"$OUT/profile.log"
  timeout $left $PY -m "benchmarks.$module" "$@" >>"$OUT/profile.log" 2>&1
  echo "profile $module: rc=$?" | tee -a "$OUT/env.txt"
}
if [ "$PROFILE_SECONDS" != 0 ]; then
  # The lean decoder's slice budget: the default (16 MiB) against a GPU-sized one.
  profile training_memory --model B --batch 4 --amp none
  profile training_memory --model B --batch 4 --amp none --decoder-slice-mib 512
  profile training_memory --model B --batch 4 --amp bf16
  profile training_memory --model B --batch 4 --amp bf16 --decoder-slice-mib 512
  profile training_memory --model L --batch 4 --amp bf16
  step_b4='{"model": "B", "B": 4, "spatial": [112, 112, 128]'
  timeline=(--device cuda --kernels 30 --size)
  profile memory_timeline bench_pretrain_step pretrain_step --backend cuda "${timeline[@]}" "$step_b4, \"amp\": \"bf16\"}"
  profile memory_timeline bench_finetune_step finetune_step --backend cuda "${timeline[@]}" \
    '{"model": "B", "B": 2, "spatial": [128, 128, 128], "classes": 14}'
  profile memory_timeline bench_pretrain_step pretrain_step --backend cuda "${timeline[@]}" "$step_b4}"
  profile memory_timeline bench_pretrain_step pretrain_step --backend reference "${timeline[@]}" "$step_b4}"
  grep -E "^(==|training_memory|bench_)|peak|Error" "$OUT/profile.log" | tail -40
fi
