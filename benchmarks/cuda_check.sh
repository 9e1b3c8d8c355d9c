#!/usr/bin/env bash
# The CUDA checks in one call, for a session lent a GPU (see README "Measured speed"):
# determinism of a tiny run on CUDA, the epoch benchmark on CUDA, and the timed full default run.
# Writes everything into one archive, $OUT/cuda.tar.gz (the device tool returns few files).
set -uo pipefail
OUT=${OUT:-/tmp/cuda_out}
W=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
{
  nvidia-smi -L
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name(0))"
  for i in 1 2; do
    python3 lot_improved.py --device cuda --rounds 3 --epochs 1 --train-subset 6000 --trials 2 --out "$W/tiny$i" >/dev/null 2>&1 || echo "tiny run $i failed"
  done
  for f in results.csv curves.csv masks.pt; do
    cmp -s "$W/tiny1/$f" "$W/tiny2/$f" && echo "cuda determinism $f: identical" || echo "cuda determinism $f: DIFFERENT"
  done
  python3 -m pytest -q -p no:cacheprovider tests/test_training.py 2>&1 | tail -3
  timeout 200 python3 benchmarks/epoch_throughput.py --device cuda --repeats "${REPEATS:-3}" --json "$W/benchmark_cuda.json"
  mkdir -p "$W/trials1_cuda"
  /usr/bin/time -v timeout 330 python3 lot_improved.py --device cuda --out "$W/trials1_cuda" 2>&1 | tr '\r' '\n' | grep -v "rounds:" | tail -40
  for f in results.csv curves.csv masks.pt summary.md; do  # against the committed CUDA run, if here
    [ -e "results/trials1_cuda/$f" ] || continue
    cmp -s "$W/trials1_cuda/$f" "results/trials1_cuda/$f" && echo "full run $f: as committed" || echo "full run $f: DIFFERENT from committed"
  done
} 2>&1 | tee "$W/log.txt"
rm -rf "$W/tiny1" "$W/tiny2"
tar -czf "$OUT/cuda.tar.gz" -C "$W" .
