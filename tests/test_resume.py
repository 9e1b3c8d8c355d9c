"""Never lose a run: a resumed run is indistinguishable from one that never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT, SCRIPT, lot

# Long enough (2,400 steps, about 2 s of training) for kills to land mid-training.
ARGS = ["--train-subset", "3000", "--batch-size", "10", "--rounds", "3", "--epochs", "2"]
OUTPUTS = ("results.csv", "curves.csv", "masks.pt")


def launch(out, *extra):
    # Every epoch checkpointed: a kill can land between any two checkpoints, not only rounds.
    env = {**os.environ, "TQDM_DISABLE": "1", "LOT_CHECKPOINT_EVERY_S": "0"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *ARGS, "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_training(proc, out, since):
    """Training starts right after config.json is (re)written."""
    config = out / "config.json"
    while proc.poll() is None:
        if config.exists() and config.stat().st_mtime >= since:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = launch(out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def assert_identical(out, reference):
    for name in OUTPUTS:
        assert (out / name).read_bytes() == reference[name], name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_sigkill_at_random_moments_and_resume_ends_byte_identical(tmp_path, reference):
    out, rng = tmp_path / "out", random.Random(2019)
    kills, resume = 0, []
    for _ in range(12):
        since = time.time() - 1
        proc = launch(out, *resume)
        started = wait_until_training(proc, out, since)
        if started and kills < 4:
            time.sleep(rng.uniform(0.0, 1.0))  # the whole run trains for about 5 s: 3 kills always land
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        code = proc.wait(timeout=300)
        if code == 0:
            break
        assert code == -signal.SIGKILL, proc.stderr.read()
        resume = ["--resume"]
    assert kills >= 3 and code == 0
    assert_identical(out, reference)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_says_how_to_resume_and_exits(tmp_path, reference, sig, code):
    out = tmp_path / "out"
    since = time.time() - 1
    proc = launch(out)
    assert wait_until_training(proc, out, since)
    time.sleep(0.5)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    err = proc.stderr.read()
    assert "resume with: python lot_improved.py" in err and "--resume" in err and "Traceback" not in err
    state, _ = lot.load_checkpoint(out)
    assert state.step > 0 or state.epoch > 1 or state.round > 0  # some work was kept
    interrupted = json.loads((out / "config.json").read_text())
    assert interrupted["status"] == "interrupted"
    # The checkpoint carries the time spent so far (config.json rounds it to 0.1 s).
    assert 0 < state.elapsed_s <= interrupted["wall_time_s"] + 0.05
    proc = launch(out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_identical(out, reference)
    finished = json.loads((out / "config.json").read_text())  # the whole run's time, not the last process's
    assert finished["wall_time_s"] == pytest.approx(state.elapsed_s + finished["wall_time_this_process_s"], abs=0.2)


TINY = ["--train-subset", "600", "--epochs", "2"]


@pytest.mark.parametrize("every_s,saved", [(0.0, [(0, 2), (1, 1), (1, 2), (2, 1)]), (1e9, [(1, 1), (2, 1)])])
def test_a_finished_round_is_always_checkpointed_an_epoch_once_the_interval_has_passed(
    tmp_path, monkeypatch, every_s, saved
):
    # A GPU finishes an epoch of the paper's rounds every second; its checkpoint is tens of MB.
    positions, real = [], lot.save_checkpoint
    monkeypatch.setenv("LOT_CHECKPOINT_EVERY_S", str(every_s))
    monkeypatch.setattr(
        lot, "save_checkpoint", lambda *a, **k: positions.append((a[4].round, a[4].epoch)) or real(*a, **k)
    )
    assert lot.main([*TINY, "--rounds", "1", "--out", str(tmp_path / "out")]) == 0
    assert positions == saved  # (round, epoch) to continue from


def test_more_rounds_on_resume_extends_the_run_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(a)]) == 0
    assert lot.main([*TINY, "--rounds", "2", "--out", str(a), "--resume"]) == 0
    assert lot.main([*TINY, "--rounds", "2", "--out", str(b)]) == 0
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_finished_run_without_its_checkpoint_is_never_trained_again(tmp_path, capsys):
    # Committed runs leave checkpoint.pt out: --resume (to extend, or to add a transfer) must not
    # start round 0 over their finished tables.
    out = tmp_path / "out"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert lot.main([*TINY, "--rounds", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint.pt to continue from" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_other_settings_names_each_one(tmp_path, capsys):
    out = tmp_path / "out"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert lot.main([*TINY, "--rounds", "1", "--lr", "0.05", "--seed", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr 0.05 (the run in --out has 0.01)" in err[0] and "--seed 3" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "out"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert lot.main([*TINY, "--rounds", "1", "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trials 2 (the run in --out has 1)" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert lot.main([*TINY, "--rounds", "1", "--trials", "2", "--out", str(out), "--overwrite"]) == 0
    assert pd.read_csv(out / "results.csv").trial.nunique() == 2
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces only its own files


def test_divergence_stops_with_the_member_round_epoch_and_lr_keeping_finished_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = lot.train_epoch
    calls = []

    def poisoned(*args, **kwargs):  # round 1, epoch 2: the control of trial 0 blows up
        loss_sum, step = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            loss_sum = loss_sum.clone()
            loss_sum[1] = float("nan")
        return loss_sum, step

    monkeypatch.setattr(lot, "train_epoch", poisoned)
    monkeypatch.setenv("LOT_CHECKPOINT_EVERY_S", "0")  # every epoch's end is checkpointed
    assert lot.main([*TINY, "--rounds", "2", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "member 1 (control of trial 0) diverged in round 1, epoch 2" in err and "--lr 0.01" in err
    rows = pd.read_csv(out / "results.csv")
    assert rows["round"].tolist() == [0, 0]  # round 0 kept
    state, _ = lot.load_checkpoint(out)
    assert (state.round, state.epoch, state.step) == (1, 2, 0)  # the last good epoch
    assert json.loads((out / "config.json").read_text())["status"] == "diverged"
    monkeypatch.setattr(lot, "train_epoch", real)
    assert lot.main([*TINY, "--rounds", "2", "--out", str(out), "--resume"]) == 0


def test_a_real_divergence_exits_3_with_one_line(tmp_path, capsys):
    assert lot.main([*TINY, "--rounds", "1", "--lr", "1e4", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lot_improved: error: member") and "--lr 10000.0" in err[-1]


def test_checkpoint_holds_only_plain_tensors_and_containers(tmp_path):
    out = tmp_path / "out"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["format"] == 2 and payload["config"]["rounds"] == 1
    assert payload["state"]["round"] == 2 and len(payload["state"]["rows"]) == 4


def test_unrelated_files_in_out_neither_block_a_run_nor_get_touched(tmp_path):
    out = tmp_path / "out"
    (out / "committed_run").mkdir(parents=True)
    (out / "committed_run" / "results.csv").write_text("theirs")
    (out / "notes.txt").write_text("mine")
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "committed_run" / "results.csv").read_text() == "theirs"
