"""The benchmark reports what it measured: every way's times, the ratios, and the machine's floor."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, lot

from benchmarks.epoch_throughput import STEP_FLOP_PER_SAMPLE


def test_a_step_does_the_matmul_work_of_forward_weight_gradients_and_two_activation_gradients():
    forward = 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert STEP_FLOP_PER_SAMPLE == forward + forward + 2 * (300 * 100 + 100 * 10)


def test_the_benchmark_times_every_way_in_one_run_and_reports_ratios_against_the_same_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/epoch_throughput.py", "--steps", "5", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    ways = {k: figures[f"{k}_s"] for k in ("reference", "peer", "engine", "floor")}
    assert all(len(t) == 2 for t in ways.values()) and len(figures["matmul_2048_gflops"]) == 2
    best = {k: min(t) for k, t in ways.items()}
    assert figures["peer_over_engine"] == pytest.approx(best["peer"] / best["engine"], rel=0.02)
    assert figures["reference_over_engine"] == pytest.approx(best["reference"] / best["engine"], rel=0.02)
    assert figures["engine_over_floor"] == pytest.approx(best["engine"] / best["floor"], rel=0.02)
    work = 2 * 60 * STEP_FLOP_PER_SAMPLE * 5 / 1e9  # two members, five steps (STEP_FLOP counts a multiply-add as 2)
    assert min(ways["floor"]) == pytest.approx(work / max(figures["matmul_2048_gflops"]), rel=0.02)
    assert figures["device_model"] and figures["device_model"] in proc.stdout
    assert f"engine/floor {figures['engine_over_floor']:.2f}x" in proc.stdout


def test_a_missing_data_file_is_one_clear_error_and_exit_2(tmp_path):
    cmd = [sys.executable, "benchmarks/epoch_throughput.py", "--npz", str(tmp_path / "none.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"--npz: no such file {tmp_path / 'none.npz'}")


def test_the_step_benchmark_reports_every_trial_count_with_its_full_run_estimate_and_refuses_graphs_on_cpu(tmp_path):
    out = tmp_path / "steps.json"
    cmd = [sys.executable, "benchmarks/step_kernels.py", "--steps", "20", "--k", "10", "--trials", "1", "2"]
    proc = subprocess.run(
        [*cmd, "--repeats", "1", "--ways", "eager", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert set(figures["trials"]) == {"1", "2"}
    for ways in figures["trials"].values():
        eager = ways["eager"]
        assert eager["full_run_training_s"] == pytest.approx(eager["ms_per_step"] * 420, abs=0.1)
    bad = subprocess.run([*cmd, "--ways", "graph"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "on cpu the ways are" in bad.stderr
    past_an_epoch = [sys.executable, "benchmarks/step_kernels.py", "--steps", "2000"]
    bad = subprocess.run(past_an_epoch, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at most 1000 (one epoch)" in bad.stderr.strip().splitlines()[-1]


def test_the_rows_of_one_k_step_index_are_k_steps_in_order(mnist):
    from benchmarks.step_kernels import Setup, Steps

    results = []
    for multi in (False, True):
        s = Setup(1, mnist[0], steps=4, seed=0)
        steps = Steps("eager", s, k=4)
        steps.multi = multi
        if multi:  # what graph x4 captures: four steps on the rows of one [4, T, B] index
            steps.batched(s.stack, s.opt, s.train, torch.stack(s.batches))
        else:
            steps.run(s.batches)
        results.append(s.stack.flat.clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], Setup(1, mnist[0], 4, 0).stack.flat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_ways_replay_the_eager_steps_bit_for_bit():
    from benchmarks.step_kernels import Setup, Steps

    train = lot.load_mnist(str(ROOT / "data"), torch.device("cuda"))[0]
    final = {}
    for way in ("eager", "graph", "graph xK"):
        s = Setup(1, train, steps=20, seed=0)
        Steps(way, s, k=10).run(s.batches)
        final[way] = s.stack.flat.clone()
    assert torch.equal(final["graph"], final["eager"]) and torch.equal(final["graph xK"], final["eager"])


def test_the_gpu_check_lists_its_steps_most_important_first_within_one_device_call_and_dry_runs_nothing(tmp_path):
    # A device call lasts 600 s at most: the steps that always run must fit in 540 of them.
    spies = tmp_path / "bin"
    spies.mkdir()
    for tool in ("python3", "timeout", "nvidia-smi", "torchrun"):  # any of them run would leave its mark
        (spies / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/ran-{tool}\n")
        (spies / tool).chmod(0o755)
    env = {**os.environ, "CUDA_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "PATH": f"{spies}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "benchmarks/cuda_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    steps = [
        re.fullmatch(r"(\d+)\. (.+): (up to )?(\d+) s(, only if time is left)?", line)
        for line in proc.stdout.splitlines()
    ]
    assert all(steps) and [int(s[1]) for s in steps] == list(range(1, len(steps) + 1)), proc.stdout
    always = [(s[2], int(s[4])) for s in steps if not s[5]]
    assert [label for label, _ in always] == [
        "CUDA tests",
        "the full default run",
        "the notebook flow on the GPU",
        "torchrun, one rank (NCCL), against one process",
        "--data-parallel against the graphed engine, one epoch a round",
        "the step five ways",
    ]
    assert sum(limit for _, limit in always) <= 540
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # nothing ran, no $OUT, no log
    script = (ROOT / "benchmarks" / "cuda_check.sh").read_text()
    assert script.count("timeout ") == 1  # the wrapper's alone: no step keeps a limit the dry mode cannot see
