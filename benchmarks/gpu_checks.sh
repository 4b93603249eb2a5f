#!/usr/bin/env bash
# What to run when a CUDA GPU is at hand, in one go (a lent GPU is short-lived): build the
# extension against that machine's torch, run the GPU-marked tests, then the GPU benchmarks.
# Each stage has its own time cap, so one that hangs leaves the others their time.
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]      # logs and results land in OUTDIR (default gpu_out)
#   STAGES="gpu_tests per_event" bash benchmarks/gpu_checks.sh OUTDIR   # some stages only
#
# Stages run in this order: build (always), estimate_on_gpu (estimates vs the allocator),
# gpu_tests, attention_kernels (kernels section, then the DCAL step), per_event (with the CUDA
# history). On an H200 (2026-12-04): build 26 s, estimate_on_gpu 114 s, attention_kernels 35 s,
# the GPU tests about 4 minutes (the Triton tests compile their kernels), per_event more than
# the 50 s it was first given; the caps leave room for a slower machine.
set -u
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)   # the stages run from the repository root
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

STAGES=${STAGES:-estimate_on_gpu gpu_tests attention_kernels per_event}

stage() {   # stage NAME SECONDS COMMAND...: run it capped, its output to OUT_DIR/NAME.log
  local name=$1 secs=$2
  shift 2
  case " $STAGES build build_jit " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout -k 5 "$secs" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s (cap $secs s)"
  tail -n "${TAIL:-6}" "$OUT_DIR/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__)"; } 2>&1 | tee "$OUT_DIR/machine.txt"

TAIL=4 stage build 300 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
if ! $PY -c "import memprof._C" > /dev/null 2>&1; then
  # no scikit-build-core / CMake route there: build the same sources with torch's own helper
  # and import the package from the tree (tritonkernels linked where the wheel would put it)
  [ -e profiler/memprof/tritonkernels ] || ln -s ../../tritonkernels profiler/memprof/tritonkernels
  mkdir -p build/jit
  TAIL=8 stage build_jit 200 $PY -c "import glob, shutil, sysconfig
from torch.utils.cpp_extension import load
m = load('_C', sorted(glob.glob('csrc/*.cpp')), extra_cflags=['-O3', '-std=c++20'],
         build_directory='build/jit', verbose=True)
shutil.copy(m.__file__, 'profiler/memprof/_C' + sysconfig.get_config_var('EXT_SUFFIX'))"
  export PYTHONPATH=$PWD/profiler
fi
$PY -c "import memprof, memprof._C as c; print('memprof native:', c.__file__)" || exit 1

TAIL=14 stage estimate_on_gpu 400 bash -c "cd benchmarks && $PY estimate_on_gpu.py"
TAIL=12 stage gpu_tests 900 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 100 \
  -o addopts="" tests/test_gpu.py tests/test_attention_double_backward.py \
  tests/report/test_report_snapshot_segments.py tests/plan/test_gpus.py \
  tests/analyse/test_throughput.py tests/analyse/test_health.py tests/analyse/test_oom_cuda.py \
  tests/test_attention_op.py tests/test_attention_kernels.py tests/distributed/test_nccl_gpu.py \
  tests/benchmarks/test_estimate_on_gpu.py
TAIL=30 stage attention_kernels 300 bash -c "cd benchmarks && $PY attention_kernels.py"
TAIL=14 stage per_event 300 bash -c "cd benchmarks && $PY per_event.py --events 50000 \
  --reference-events 20000 --rounds 3 --pairs 6 --chunk 5000 --out results/per_event_cuda"
ls benchmarks/results | grep -i -e cuda -e h200 > "$OUT_DIR/new_results.txt"
tar czf "$OUT_DIR/results.tgz" -C benchmarks/results $(cat "$OUT_DIR/new_results.txt") \
  2>/dev/null
echo "results: $(tr '\n' ' ' < "$OUT_DIR/new_results.txt")"
