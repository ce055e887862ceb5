#!/usr/bin/env bash
# One device-machine call: GPU tests, then the GPU benchmarks; logs and tables go to $OUT.
# Needs the wheels in .whl/ (carried): pytest, pytest-benchmark and friends, pyzmq, pyyaml.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
# An editable install maps kernels/ and radix/ under lmc_transfer (pyproject package-dir),
# also for the daemon subprocesses the tests start from the repo root.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# Unset: the defaults below; set but empty: skip that step. TESTS_TIMEOUT and BENCH_TIMEOUT bound
# the two steps (seconds).
TESTS=${TESTS-tests/test_kernels.py}
BENCH=${BENCH-benchmarks/bench_transfer_gpu.py}
if [ -n "$TESTS" ]; then
  PYTHONFAULTHANDLER=1 timeout -s ABRT -k 10 "${TESTS_TIMEOUT:-300}" python3 -P -m pytest $TESTS -m gpu -q -p no:cacheprovider \
    --import-mode=append 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
python3 -P -c "import sys; sys.path.append('.'); from benchmarks.profile_launch import main; main()" 2>&1 \
  | tee "$OUT/profile.log" | head -45
if [ -n "$BENCH" ]; then
  # SIGABRT past the limit makes faulthandler print every thread's stack (a hang shows where).
  LMC_BENCH_REPORT="$OUT/bench.md" PYTHONFAULTHANDLER=1 timeout -s ABRT -k 10 "${BENCH_TIMEOUT:-480}" python3 -P -m pytest $BENCH --benchmark-only -q -p no:cacheprovider --import-mode=append \
    --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench.log" | tail -80
fi
