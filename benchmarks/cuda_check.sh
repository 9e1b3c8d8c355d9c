#!/usr/bin/env bash
# Every GPU check and measurement in one call, for a machine with CUDA (see README "Speed"):
#   1. the CUDA tests (graph replay bit-identical to eager steps, SGD and Adam);
#   2. the step five ways, 1 and 5 trials (benchmarks/step_kernels.py: the present graph against K steps
#      per graph and torch.compile, with and without a graph), into $OUT/step_kernels_cuda.json;
#   3. the full default run, timed:     python lot_improved.py --out results/trials1_cuda
#   4. five trials stacked, timed:      python lot_improved.py --trials 5 (the goal: at most 1.3x one trial)
#   5. the epoch benchmark on CUDA;
#   6. with PAPER_S=450 (seconds; off by default: steps 1-5 take about 10 minutes of a 15-minute
#      device budget), the paper's experiment with the paper's five trials, timed:
#      python lot_improved.py --preset paper --trials 5 --reinit-draws 2 --out results/paper_cuda
# Outputs (without checkpoints) come back as tarballs in $OUT, with the log.
set -uo pipefail
OUT=${OUT:-/tmp/cuda_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
rm -rf results/paper_cuda results/trials1_cuda
{
  nvidia-smi -L
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name(0))"
  if ! timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda; then
    echo "CUDA graph test FAILED: running eagerly"
    export LOT_CUDA_GRAPHS=0
  fi
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_benchmark.py -k cuda || echo "step_kernels graph test FAILED"
  timeout "${STEPS_S:-240}" python3 benchmarks/step_kernels.py --device cuda --json "$OUT/step_kernels_cuda.json"
  start=$(date +%s)
  timeout "${DEFAULT_S:-100}" python3 lot_improved.py --out results/trials1_cuda 2>&1 | tr '\r' '\n' | tail -30
  echo "default run: exit ${PIPESTATUS[0]}, $(($(date +%s) - start)) s"
  start=$(date +%s)
  timeout "${DEFAULT_S:-100}" python3 lot_improved.py --trials 5 --overwrite --out /tmp/trials5_cuda 2>&1 | tr '\r' '\n' | tail -5
  echo "five trials: exit ${PIPESTATUS[0]}, $(($(date +%s) - start)) s"
  timeout 90 python3 benchmarks/epoch_throughput.py --device cuda --repeats 3 --json "$OUT/benchmark_cuda.json"
  if [ "${PAPER_S:-0}" -gt 0 ]; then
    start=$(date +%s)
    timeout "${PAPER_S:-0}" python3 lot_improved.py --preset paper --trials 5 --reinit-draws 2 --out results/paper_cuda 2>&1 |
      tr '\r' '\n' | grep -v "^rounds:.*it/s\]$" | tail -45
    echo "paper run: exit ${PIPESTATUS[0]}, $(($(date +%s) - start)) s"
  fi
} 2>&1 | tee "$OUT/log.txt"
for run in paper_cuda trials1_cuda; do
  [ -d "results/$run" ] && tar -czf "$OUT/$run.tar.gz" --exclude='checkpoint*.pt' -C results "$run"
done
ls -la "$OUT"
