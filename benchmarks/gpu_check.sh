#!/usr/bin/env bash
# Everything that needs a GPU, in one call: all `gpu`-marked tests, then the GPU benchmarks.
# Run from the repository root on any CUDA machine:   bash benchmarks/gpu_check.sh
# Budget: under 8 minutes on one H100 (tests ~2-3 min, most of it Triton compiling each kernel
# variant per dtype; bench_head ~1-2 min; fsserve bench ~1-2 min). Results go to $OUT (default out/), which the device
# runner copies back. The script keeps going after a failed step so the benchmarks still run, and
# exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
# The first interpreter whose torch sees a GPU ($PYTHON, then the machine's, then a local .venv,
# which on a CPU-only checkout has a CPU torch and is skipped).
PY=
for candidate in ${PYTHON:-} python python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=$candidate
        break
    fi
done
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
if [ -z "$PY" ]; then
    echo "no Python here has a torch that sees a CUDA device: nothing to check" >&2
    exit 2
fi
echo "python: $PY"
# fsserve.kernels is mapped from kernels/ by the install; install in place if it is missing
# (no deps, no build isolation: the machine may be offline and torch/triton/pytest present).
if ! "$PY" -c "import fsserve.kernels.label_logits" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee "$OUT/versions.txt"

step gpu_tests 330 "$PY" -m pytest -m gpu -q -ra tests --junitxml="$OUT/gpu_tests.xml"

step bench_head 150 "$PY" benchmarks/bench_head.py --device cuda --out "$OUT/bench_head_cuda.json"

# End to end on the GPU: the plain-transformers baseline against fsserve's torch backend (torch
# head), torch + the Triton label-logit kernel, onnxruntime CUDA and TensorRT, interleaved, with
# each one's p50 ratio to the baseline. $FSSERVE_BENCH_MODEL picks a bundle, a saved model or an LM
# name (default: the embedded Gemma 3 270M with SST-2's prompt). Writes
# $OUT/fsserve_bench_cuda/bench.{json,md,png}; backends this machine lacks (e.g. no onnxruntime-gpu)
# are listed in the table with the reason. About 1-2 min on an H100 (TensorRT builds an engine per
# new shape during the warm-up runs, cached in $OUT/fsserve_bench_cuda/trt_cache).
step fsserve_bench 150 "$PY" -m fsserve.cli_bench bench "${FSSERVE_BENCH_MODEL:-embedded}" --device cuda \
    --batch-sizes 1,8,32 --seq-lens 32,128 --cell-seconds 4 --no-progress --out "$OUT/fsserve_bench_cuda"

echo "=== done: status=$status; results in $OUT ==="
exit $status
