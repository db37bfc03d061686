#!/usr/bin/env bash
# Issue 18 study: when do LM-BFF's demonstrations help the embedded Gemma 3 270M?
# Phase 1 chooses settings one factor at a time on SST-2 and trec, on DEV scores only (each cell keeps
# its best-on-dev checkpoint; test is scored on a 100-example stratified sample that no choice reads).
# Phase 2 scores the chosen setting and plain prompt FT on SST-2, sst-5, trec and RTE, 3 seeds, on
# >= 500-example stratified test samples. Every cell is cached under studies/demos/<level>/cells and
# committed, so the study resumes where it stopped (no finished cell is recomputed).
#   studies/demos/run.sh phase1 [LEVEL...]   # default: every level, in the order below
#   studies/demos/run.sh phase2 LEVEL [METHODS]  # the chosen level, on the four tasks, into studies/demos/phase2
# Phase 2 has one folder for the one chosen level. Prompt FT and standard FT cells do not read the
# demonstration options (their cache key leaves them out), so with lr and steps chosen they can run
# before the demonstration format is: `run.sh phase2 base prompt,finetune`.
set -euo pipefail
cd "$(dirname "$0")/../.."
FS="${FSSERVE:-.venv/bin/fsserve}"
SEEDS=13,21,42
BASE=(--max-steps 100 --eval-steps 25 --lr 1e-5 --batch-size 8 --freeze-embeddings --num-sample 4 --filter-rate 0.5 --demo-max-length 256)
# Phase 2's lengths follow the prompts' token counts (studies/demos/lengths.py -> lengths.json; no score read):
# 128 tokens cut 13-14% of RTE's plain prompts, 256 cut 0.3%; with demonstrations 256 cut 14-40% of RTE's
# prompts (one per class) and 512 up to 14% (two per class; sst-5's longest is 408); 768 cuts none (RTE's
# longest is 704). SST-2 and trec never reach 256 (so len512 = base there). Batches pad to their longest.
PHASE2=(--max-length 256 --demo-max-length 768)

# level name -> the options that differ from BASE (one factor at a time)
declare -A LEVELS=(
  [base]=""
  [steps20]="--max-steps 20 --eval-steps 5"
  [steps300]="--max-steps 300 --eval-steps 75"
  [draws1]="--num-sample 1"
  [draws16]="--num-sample 16"
  [filter1]="--filter-rate 1.0"
  [lr2e-5]="--lr 2e-5"
  [lr5e-5]="--lr 5e-5"
  [order-shuffle]="--demo-order shuffle"
  [order-similar-last]="--demo-order similar-last"
  [sep-newline]="--demo-separator \\n"
  [two-per-class]="--demos-per-class 2 --demo-max-length 384"
  [no-label]="--no-demo-label-after"
  [len512]="--demo-max-length 512"
  # draws1 and two-per-class passed the choice rule (README): their combination, checked on dev before phase 2
  [chosen]="--num-sample 1 --demos-per-class 2"
  # phase 2's demonstration level: two-per-class (4 averaged draws), the best on dev (chosen fell below it), without
  # its 384-token cap, so that PHASE2's 768 holds (RTE's longest prompt with two per class is 704 tokens)
  [final]="--demos-per-class 2"
)
ORDER=(base draws1 draws16 steps20 steps300 order-similar-last sep-newline no-label order-shuffle filter1 lr2e-5 lr5e-5 len512 two-per-class chosen)  # two-per-class last: twice the tokens

run_level() {  # $1 phase tasks, $2 level, $3 methods, $4 max-test, $5 output folder (default: the level's), $6... options after BASE
  [ -n "${LEVELS[$2]+set}" ] || { echo "unknown level: $2 (one of: ${!LEVELS[*]})" >&2; exit 2; }
  local tasks=$1 level=$2 methods=$3 max_test=$4 out=${5:-$2}; shift 5 || shift $#
  local extra; read -r -a extra <<<"${LEVELS[$level]}"
  "$FS" experiment --tasks "$tasks" --methods "$methods" --seeds "$SEEDS" --max-test "$max_test" "${BASE[@]}" "$@" "${extra[@]}" --out "studies/demos/$out"
}

case "${1:-phase1}" in
  phase1)
    shift || true
    if [ $# -gt 0 ]; then levels=("$@"); else levels=("${ORDER[@]}"); fi
    for level in "${levels[@]}"; do
      methods=prompt-demo-similar
      [ "$level" = base ] && methods=prompt,prompt-demo-similar  # prompt FT at the same budget, for reference
      run_level SST-2,trec "$level" "$methods" 100
    done ;;
  phase2)
    [ $# -ge 2 ] || { echo "usage: $0 phase2 LEVEL [METHODS]" >&2; exit 2; }
    run_level SST-2,sst-5,trec,RTE "$2" "${3:-prompt,prompt-demo-similar,finetune}" 500 phase2 "${PHASE2[@]}" ;;
  *) echo "usage: $0 phase1 [LEVEL...] | phase2 LEVEL [METHODS]" >&2; exit 2 ;;
esac
