#!/usr/bin/env bash
# The GPU check, run from anywhere; it works in the repository root:
#
#   experiments/gpu_check.sh --fetch-wheels   # here (PyPI reachable): the wheels the GPU machine lacks, into .whl/
#   experiments/gpu_check.sh                  # on the GPU machine: install .whl/, run the GPU-marked tests, then
#                                             # experiments/gpu_bench.py -> experiments/results/gpu.md
#   experiments/gpu_check.sh --dry-run        # the same steps at tiny shapes on CPU (CI runs this)
#
# Options: --out FILE (the results file; default experiments/results/gpu.md, or gpu_dry_run.md with --dry-run),
# PYTHON=... (default python3). The GPU run is sized to finish in under 5 minutes of GPU time (start-up apart),
# so a 15-minute GPU slot leaves room for a rerun. The GPU machine has torch, transformers, peft, pyarrow, pytest;
# the wheels bring miadpo's other needs, at this checkout's versions (one version of each, no dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) mode=dry ;;
    --fetch-wheels) mode=fetch ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --fetch-wheels, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
WHEELS=(hydra-core omegaconf antlr4-python3-runtime rapidfuzz lightning transformers peft accelerate trl datasets
        dill multiprocess)

if [[ $mode == fetch ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for name in "${WHEELS[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n $version ]] || { echo "gpu_check.sh: $name is not installed here (pip install -e '.[dev,bench]')" >&2; exit 1; }
    # A wheel for CPython 3.12 on x86-64 Linux; a package published only as source (antlr4-python3-runtime 4.9.3,
    # pure Python) is built into a wheel here.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$name==$version" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w .whl "$name==$version"
  done
  ls -la .whl
  exit 0
fi

if [[ $mode == gpu ]] && compgen -G ".whl/*.whl" > /dev/null; then  # the dry run uses this machine's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/miadpo-site .whl/*.whl
  export PYTHONPATH="/tmp/miadpo-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ $mode == dry ]]; then
  out=${out:-experiments/results/gpu_dry_run.md}
  # The GPU-marked tests are collected and skip without CUDA; the benchmarks run at tiny shapes on CPU.
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  OMP_NUM_THREADS=1 "$PY" experiments/gpu_bench.py --dry-run --out "$out"
else
  out=${out:-experiments/results/gpu.md}
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --dry-run")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  set +e  # a failing test is reported, and the benchmarks still run
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "${out%.md}_tests.txt"
  tests=${PIPESTATUS[0]}
  set -e
  "$PY" experiments/gpu_bench.py --out "$out"
  echo "gpu_check.sh: results in $out, GPU tests in ${out%.md}_tests.txt (pytest exit $tests)"
  exit "$tests"
fi
echo "gpu_check.sh: results in $out"
