#!/usr/bin/env bash
# One call on a CUDA machine: the codebook-gather ceiling (bench_gather_gpu.py), the native GPU tests of the
# Triton VQLinear kernels and of the CUDA C++ shared-memory GEMV, the kernel benchmark (JSON + PNG), then a summary. At most about 9.5 minutes (each step
# has a timeout: 45 + 230 + 290 + 5 s, checked by tests/test_gpu_check.py; the benchmark stops starting new groups
# after 200 s and lists the skipped ones), so it fits one 10-minute device call.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT if set (device runner), else ./gpu_check_out
#
# Writes OUT_DIR/{env.txt, gather.txt, gather.json, gpu_tests.txt, gpu_tests.xml, bench.txt, bench_kernels_gpu.json,
# bench_kernels_gpu.png, summary.txt, summary.json}.
# Exit status: non-zero if a step failed (all always run); 3 if vqlib.kernels cannot be
# imported (it is run from this folder when vqlib is not installed: see below).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1  # output piped to tee: a step stopped by its timeout still leaves what it printed

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# vqlib.kernels lives in kernels/ and is mapped into the vqlib namespace only by an install (pyproject's
# package-dir), so a bare copy of the repository (as on a lent GPU machine) cannot import it and both steps
# below would fail at import. No pip (offline, maybe no write access to the machine's environment): link the
# mapped folders into vqlib/ for this run, and remove the links on exit.
links=()
trap 'rm -f "${links[@]}"' EXIT
if ! "$PY" -c "import vqlib.kernels" 2>/dev/null; then
  for sub in kernels models training model_cards; do
    [ -e "vqlib/$sub" ] || { ln -s "../$sub" "vqlib/$sub" && links+=("vqlib/$sub"); }
  done
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmark runs as a script: its sys.path[0] is benchmarks/
  if ! "$PY" -c "import vqlib.kernels"; then
    echo "gpu_check: vqlib.kernels is not importable with $PY; nothing was run" >&2
    exit 3
  fi
  echo "gpu_check: vqlib is not installed for $PY: running it from this folder (linked ${links[*]})"
fi

# the ceiling of pointer gathers (docs/kernels.md: the batch-1 risk), first: short, and its numbers explain the rest
timeout 45 "$PY" benchmarks/bench_gather_gpu.py --out "$OUT_DIR/gather.json" 2>&1 | tee "$OUT_DIR/gather.txt"
gather_rc=${PIPESTATUS[0]}

timeout 230 "$PY" -m pytest tests/test_kernels_triton.py tests/test_kernels_triton_crossover.py tests/test_kernels_cuda_smem.py \
  tests/test_kernels_cuda_smem_mma.py \
  -m gpu -q -p no:cacheprovider \
  --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout 290 "$PY" benchmarks/bench_kernels_gpu.py --budget-s 200 --out "$OUT_DIR/bench_kernels_gpu" 2>&1 \
  | tee "$OUT_DIR/bench.txt"
bench_rc=${PIPESTATUS[0]}

# batch 1 at 8192x8192 against the floors its gathers set (reads the two JSON files; no GPU work)
timeout 5 "$PY" benchmarks/gpu_summary.py "$OUT_DIR" 2>&1 | tee "$OUT_DIR/summary.txt"

echo "gpu_check: gather probe rc=$gather_rc, tests rc=$tests_rc, benchmark rc=$bench_rc; results in $OUT_DIR"
[ "$gather_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
