"""The benchmark reports what it measured: both times, their ratio, and the engine's matmul speed."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from benchmarks.epoch_throughput import STEP_FLOP_PER_SAMPLE


def test_a_step_does_the_matmul_work_of_forward_weight_gradients_and_two_activation_gradients():
    forward = 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert STEP_FLOP_PER_SAMPLE == forward + forward + 2 * (300 * 100 + 100 * 10)


def test_the_benchmark_times_both_ways_in_one_run_and_reports_their_ratio(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/epoch_throughput.py", "--steps", "5", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    ref, engine = figures["reference_s"], figures["engine_s"]
    assert len(ref) == len(engine) == len(figures["matmul_2048_gflops"]) == 2
    assert figures["ratio_best"] == pytest.approx(min(ref) / min(engine), rel=0.02)
    work = 2 * 60 * STEP_FLOP_PER_SAMPLE * 5 / 1e9
    assert figures["engine_matmul_gflops_best"] == pytest.approx(work / min(engine), rel=0.02)
    assert f"best {figures['ratio_best']:7.2f}x" in proc.stdout
    # ... and times the last round of results/trials1 with and without skipping fc1's dead rows
    masks = torch.load(ROOT / "results" / "trials1" / "masks.pt", weights_only=True)["fc1"][0, -1]
    assert figures["late_round"] == 20 and figures["late_fc1_live_rows"] == int(masks.any(1).sum()) == 120
    skipping, all_rows = figures["late_skipping_s"], figures["late_all_rows_s"]
    assert len(skipping) == len(all_rows) == 2
    assert figures["late_skip_ratio_best"] == pytest.approx(min(all_rows) / min(skipping), rel=0.02)


def test_a_missing_masks_file_is_one_clear_error_and_exit_2(tmp_path):
    cmd = [sys.executable, "benchmarks/epoch_throughput.py", "--masks", str(tmp_path / "none.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(f"--masks: no such file {tmp_path / 'none.pt'} (a run's masks.pt, or none)")
    )
