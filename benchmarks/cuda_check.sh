#!/usr/bin/env bash
# Every GPU check and measurement in one call, for a machine with CUDA (see README "Speed"), most
# important first, each step under its own time limit (about 9 minutes in all):
#   1. the CUDA tests: graph replay bit-identical to eager steps (SGD and Adam), a replay moves the
#      parameters, --device cuda:0 given explicitly equals the default's bytes, --data-parallel runs on
#      one GPU; with two GPUs, cuda:1 equals cuda:0 and torchrun on 2 ranks equals one process;
#   2. the notebook flow in a real kernel on the GPU: the pasted cell, main([...]), %run with flags;
#   3. torchrun with one rank (NCCL, a group of one) against one process;
#   4. one epoch a round, timed: the graphed engine, then --data-parallel (DataParallel over one GPU);
#   5. the full default run, timed:     python lot_improved.py --out results/trials1_cuda
#   6. five trials stacked, timed:      python lot_improved.py --trials 5 (the goal: at most 1.3x one trial)
#   7. the epoch benchmark, then the step five ways (benchmarks/step_kernels.py).
# The log goes to results/cuda_check.log (GPU model, torch version, date first) and $OUT; outputs
# (without checkpoints) come back as tarballs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/cuda_out}
mkdir -p "$OUT" results
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
rm -rf results/trials1_cuda /tmp/lot_cuda
timed() {  # timed SECONDS LABEL COMMAND...: runs it, prints its last lines, exit code and wall time
  local limit=$1 label=$2 start
  shift 2
  start=$(date +%s%N)
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -8
  echo "$label: exit ${PIPESTATUS[0]}, $(awk "BEGIN { printf \"%.1f\", ($(date +%s%N) - $start) / 1e9 }") s"
}
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi -L
  python3 -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'python', sys.version.split()[0])"
  if ! timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_training.py::test_cuda_graph_steps_train_exactly_like_eager_steps; then
    echo "CUDA tests FAILED: running eagerly from here"
    export LOT_CUDA_GRAPHS=0
  fi
  if python3 -c "import nbclient, ipykernel" 2>/dev/null; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_notebook.py || echo "notebook tests FAILED"
  else
    echo "notebook tests NOT RUN: nbclient or ipykernel missing (pip install -r requirements.txt)"
  fi
  timed 90 "torchrun, one rank (NCCL)" python3 -m torch.distributed.run --standalone --nproc-per-node 1 lot_improved.py \
    --train-subset 6000 --rounds 2 --epochs 2 --out /tmp/lot_cuda/torchrun1
  timed 60 "one process" python3 lot_improved.py --train-subset 6000 --rounds 2 --epochs 2 --out /tmp/lot_cuda/one
  cmp /tmp/lot_cuda/torchrun1/results.csv /tmp/lot_cuda/one/results.csv && echo "torchrun one rank: same bytes"
  timed 60 "engine, --epochs 1" python3 lot_improved.py --epochs 1 --out /tmp/lot_cuda/e1
  timed 120 "--data-parallel, --epochs 1" python3 lot_improved.py --epochs 1 --data-parallel --out /tmp/lot_cuda/dp
  timed "${DEFAULT_S:-100}" "default run" python3 lot_improved.py --out results/trials1_cuda
  timed "${DEFAULT_S:-100}" "five trials" python3 lot_improved.py --trials 5 --out /tmp/lot_cuda/trials5
  timeout 60 python3 benchmarks/epoch_throughput.py --device cuda --repeats 3 --json "$OUT/benchmark_cuda.json"
  timeout "${STEPS_S:-120}" python3 benchmarks/step_kernels.py --device cuda --json "$OUT/step_kernels_cuda.json"
} 2>&1 | tee results/cuda_check.log
cp results/cuda_check.log "$OUT/cuda_check.log"
[ -d results/trials1_cuda ] && tar -czf "$OUT/trials1_cuda.tar.gz" --exclude='checkpoint*.pt' -C results trials1_cuda
ls -la "$OUT"
