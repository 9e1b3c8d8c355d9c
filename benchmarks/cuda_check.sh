#!/usr/bin/env bash
# Every GPU check and measurement in one device call (600 s at most), most important first. One
# wrapper runs each step under its limit; the limits of the steps that always run add up to at most
# 540 s, and a step marked "if time is left" runs only if its limit fits in what is left of 540 s:
#   1. the CUDA tests: a graph replay does what an eager step does on the last GPU, --device cuda:0
#      equals the default's bytes, --data-parallel matches the graphed engine, the benchmark's graph
#      ways replay eager bit for bit; with two GPUs, cuda:1 and torchrun on 2 ranks against cuda:0;
#   2. the full default run, timed, into results/trials1_cuda (replaced only by a finished run);
#   3. the notebook flow in a real kernel on the GPU: the pasted cell, main([...]), %run with flags;
#   4. torchrun with one rank (NCCL, a group of one) against one process;
#   5. one epoch a round, timed: the graphed engine, then --data-parallel (DataParallel over one GPU);
#   6. the step five ways (benchmarks/step_kernels.py);
#   7. if time is left: five trials stacked, timed (the goal: at most 1.3x one trial);
#   8. if time is left: the epoch benchmark.
# Each step appends its last lines, exit code and wall time to $OUT/cuda_check.log as it ends, so a
# call cut off at its limit still returns every finished step; the log starts with the date, the GPU
# and the torch/CUDA versions, and is copied to results/cuda_check.log at the end. CUDA_CHECK_DRY=1
# prints the steps and their limits, and runs and writes nothing.
set -uo pipefail
BUDGET=540
OUT=${OUT:-/tmp/cuda_out}
LOG="$OUT/cuda_check.log"
WORK=/tmp/lot_cuda
DRY=${CUDA_CHECK_DRY:-0}
BEGAN=$(date +%s)
n=0

step() {  # step LIMIT LABEL COMMAND: COMMAND (a bash line) under LIMIT seconds, its end into the log
  local limit=$1 label=$2 command=$3 start code
  n=$((n + 1))
  if [ "$DRY" = 1 ]; then
    echo "$n. $label: $limit s"
    return 0
  fi
  start=$(date +%s%N)
  timeout "$limit" bash -c "$command" >"$WORK/step.txt" 2>&1
  code=$?
  {
    echo "== $n. $label"
    tr '\r' '\n' <"$WORK/step.txt" | grep -v "it/s\]$" | tail -15
    echo "$n. $label: exit $code$([ "$code" = 124 ] && echo " (past its $limit s limit)"), $(
      awk "BEGIN { printf \"%.1f\", ($(date +%s%N) - $start) / 1e9 }") s"
  } >>"$LOG"
}

if_time_left() {  # if_time_left LIMIT LABEL COMMAND: step, only if LIMIT fits in what is left of BUDGET
  local left=$((BUDGET - $(date +%s) + BEGAN))
  if [ "$DRY" = 1 ]; then
    n=$((n + 1))
    echo "$n. $2: up to $1 s, only if time is left"
  elif [ "$1" -le "$left" ]; then
    step "$@"
  else
    n=$((n + 1))
    echo "$n. $2: not run, $left s left of $BUDGET" >>"$LOG"
  fi
}

if [ "$DRY" != 1 ]; then
  mkdir -p "$OUT" results
  rm -rf "$WORK" && mkdir -p "$WORK"
  export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
  {
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi -L
    python3 -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'python', sys.version.split()[0])"
  } >"$LOG" 2>&1
fi
GRAPHS='python3 -c "import json, sys; c = json.load(open(sys.argv[1])); print(\"cuda_graphs:\", c[\"cuda_graphs\"], \"| device:\", c[\"device\"])"'

step 120 "CUDA tests" \
  "python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_training.py tests/test_benchmark.py -k 'cuda or gpu'"
step 110 "the full default run" \
  "python3 lot_improved.py --out $WORK/trials1_cuda && $GRAPHS $WORK/trials1_cuda/config.json \
   && rm -f $WORK/trials1_cuda/checkpoint*.pt && rm -rf results/trials1_cuda && mv $WORK/trials1_cuda results/ \
   && tar -czf $OUT/trials1_cuda.tar.gz -C results trials1_cuda"
step 80 "the notebook flow on the GPU" \
  "python3 -c 'import nbclient, ipykernel' && python3 -m pytest -q -p no:cacheprovider tests/test_notebook.py"
step 60 "torchrun, one rank (NCCL), against one process" \
  "python3 -m torch.distributed.run --standalone --nproc-per-node 1 lot_improved.py --train-subset 6000 --rounds 2 \
   --epochs 2 --out $WORK/torchrun1 && python3 lot_improved.py --train-subset 6000 --rounds 2 --epochs 2 \
   --out $WORK/one && $GRAPHS $WORK/torchrun1/config.json && grep -h process_group $WORK/torchrun1/config.json \
   && cmp $WORK/torchrun1/results.csv $WORK/one/results.csv && echo 'torchrun, one rank: same bytes'"
step 100 "--data-parallel against the graphed engine, one epoch a round" \
  "SECONDS=0; python3 lot_improved.py --epochs 1 --out $WORK/e1 && echo \"graphed engine: \$SECONDS s\" \
   && SECONDS=0 && python3 lot_improved.py --epochs 1 --data-parallel --out $WORK/dp \
   && echo \"--data-parallel: \$SECONDS s\" && $GRAPHS $WORK/e1/config.json && $GRAPHS $WORK/dp/config.json"
step 60 "the step five ways" \
  "python3 benchmarks/step_kernels.py --device cuda --steps 200 --repeats 2 --json $OUT/step_kernels_cuda.json"
if_time_left 100 "five trials stacked" "python3 lot_improved.py --trials 5 --out $WORK/trials5 && $GRAPHS $WORK/trials5/config.json"
if_time_left 60 "the epoch benchmark" \
  "python3 benchmarks/epoch_throughput.py --device cuda --repeats 3 --json $OUT/benchmark_cuda.json"

if [ "$DRY" != 1 ]; then
  echo "all steps: $(($(date +%s) - BEGAN)) s of $BUDGET" >>"$LOG"
  cp "$LOG" results/cuda_check.log
  cat "$LOG"
fi
