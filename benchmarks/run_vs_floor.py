"""The whole default run at one epoch a round, dense and sparse, against the machine's floor, in one run.

Each way runs `python lot_improved.py --epochs 1 --device cpu` as a separate process, timed from
outside (start-up, data, all 21 rounds, evaluations, figures): `dense` with --no-sparse, `sparse`
as it is (--sparse is the default). Between runs the 2048x2048 float32 matmul rate is measured;
the floor is the run's dense matmul work (every step of every member: forward, weight gradients,
fc2 and fc3 activation gradients) at that rate; it leaves out the evaluations (at these settings a
10,000-image test pass an epoch, about 7% more) and the masks' sparsity, so sparse rounds can beat
it. Prints each round's training time (round_s in the run's config.json) and its ratio to the
round's floor, and the whole process's ratio to the whole floor.

    python benchmarks/run_vs_floor.py --json results/benchmark_run_cpu.json
    python benchmarks/run_vs_floor.py --repeats 1 -- --train-subset 600 --rounds 2   # flags for the run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lot_improved as lot  # noqa: E402
from benchmarks.epoch_throughput import STEP_FLOP_PER_SAMPLE, matmul_gflops  # noqa: E402

WAYS = {"dense": ["--no-sparse"], "sparse": []}
MNIST_TRAIN = 60_000


def run_once(flags: list[str], out: Path) -> tuple[float, dict]:
    """Wall time of one whole run and its config.json."""
    cmd = [sys.executable, str(ROOT / "lot_improved.py"), "--epochs", "1", "--device", "cpu", *flags, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"run_vs_floor: {' '.join(cmd[1:])} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
        )
    return wall, json.loads((out / "config.json").read_text())


def round_gflop(config: dict) -> float:
    """Dense matmul work of one round of the run described by config.json, in GFLOP."""
    cfg = lot.Config(**{k: v for k, v in config["config"].items() if k in lot.Config.__dataclass_fields__})
    plan = lot.make_plan(cfg, (cfg.train_subset or MNIST_TRAIN) - cfg.val_size)
    members = cfg.trials * len(lot.variants(cfg))
    return plan.round_steps * members * cfg.batch_size * STEP_FLOP_PER_SAMPLE / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every way; best reported")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("flags", nargs="*", help="after --: more flags for lot_improved.py")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    walls: dict[str, list[float]] = {w: [] for w in WAYS}
    rounds: dict[str, list[list[float]]] = {w: [] for w in WAYS}
    rates, config = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for way, extra in WAYS.items():
                rates.append(matmul_gflops(torch.device("cpu")))
                wall, config = run_once([*args.flags, *extra], Path(tmp) / f"{way}{r}")
                walls[way].append(wall)
                rounds[way].append(config["round_s"])
    rate = statistics.median(rates)
    per_round = round_gflop(config) / rate
    n_rounds = len(rounds["dense"][0])
    floor = per_round * n_rounds
    best = {w: min(range(args.repeats), key=lambda i: walls[w][i]) for w in WAYS}
    print(
        f"{lot.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}: 2048x2048 matmul "
        f"{rate:.0f} GFLOP/s (median of {len(rates)}); floor {per_round:.2f} s a round, {floor:.1f} s in all"
    )
    print("round  " + "  ".join(f"{w + ' s':>9} {'/floor':>7}" for w in WAYS))
    for i in range(n_rounds):
        cells = [f"{rounds[w][best[w]][i]:9.2f} {rounds[w][best[w]][i] / per_round:6.2f}x" for w in WAYS]
        print(f"{i:5d}  " + "  ".join(cells))
    cells = [f"{walls[w][best[w]]:9.1f} {walls[w][best[w]] / floor:6.2f}x" for w in WAYS]
    print("whole  " + "  ".join(cells) + "   (the whole process: start-up, data, rounds, outputs)")
    if args.json:
        payload = {
            "device_model": lot.cpu_model(),
            **lot.environment(),
            "command": " ".join(["python lot_improved.py --epochs 1 --device cpu", *args.flags]),
            "matmul_2048_gflops": [round(g, 1) for g in rates],
            "floor_round_s": round(per_round, 6),
            "floor_s": round(floor, 5),
            **{f"{w}_wall_s": [round(t, 2) for t in walls[w]] for w in WAYS},
            **{f"{w}_round_s": rounds[w][best[w]] for w in WAYS},
            **{f"{w}_over_floor": round(walls[w][best[w]] / floor, 2) for w in WAYS},
            **{f"{w}_round_over_floor": [round(t / per_round, 2) for t in rounds[w][best[w]]] for w in WAYS},
        }
        lot.write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
