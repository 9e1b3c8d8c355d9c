"""torchrun: trials sharded over processes (CPU, gloo) give the single process's outputs, byte for
byte; a stopped job resumes per rank; a failed rank fails the job and is named."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SCRIPT, SMALL, lot

FILES = ("results.csv", "curves.csv", "masks.pt", "validation.csv")
# 3 trials on 2 ranks (shards of 2 and 1): 12 members in one process, at most 8 on a rank. Small
# batches and frequent evaluations make the job long enough for a stop to land mid-training.
# --prune-rate 0.6 leaves 16% of the weights at round 2: its steps go through the sparse engine.
RUN = [
    "--prune-rate",
    "0.6",
    "--trials",
    "3",
    "--train-subset",
    "1100",
    "--batch-size",
    "10",
    "--rounds",
    "2",
    "--epochs",
    "1",
    "--controls",
    "reinit,random",
    "--criterion",
    "same-sign",  # untrained_acc rows and the criterion's masks, gathered across ranks
    "--oneshot",
    "--val-size",
    "100",
    "--eval-every",
    "50",
    *SMALL,
]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(SCRIPT)]
    cmd += args
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def single(out, args):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_a_job_stopped_and_resumed_on_two_processes_writes_exactly_what_one_process_writes(tmp_path):
    single(tmp_path / "one", RUN)
    out = tmp_path / "two"
    proc = torchrun(*RUN, "--out", str(out))
    assert wait_for(out / "checkpoint.rank1.pt", proc)  # both ranks are past round 0
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempting the job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "resume with:" in err, err
    assert (out / "checkpoint.rank0.pt").exists() and (out / "checkpoint.rank1.pt").exists()
    proc = torchrun(*RUN, "--out", str(out), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.rank0.pt", "checkpoint.rank1.pt"]


def test_torchrun_with_one_process_joins_a_group_of_one_and_writes_what_one_process_writes(tmp_path):
    # A one-GPU box runs the multi-GPU recipe so; on a GPU this is NCCL with a group of one.
    run = ["--train-subset", "120", "--rounds", "1", "--epochs", "1", "--trials", "2", *SMALL]
    single(tmp_path / "one", run)
    proc = torchrun(*run, "--out", str(tmp_path / "alone"), nproc=1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    recorded = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("alone", "one")]
    assert [r["process_group"] for r in recorded] == ["gloo", None]  # it joined a group; one process does not
    assert recorded[0]["cuda_graphs_by_rank"] == ["off: the CPU"] and "cuda_graphs_by_rank" not in recorded[1]


def test_a_failed_rank_fails_the_job_names_the_rank_and_leaves_only_whole_files(tmp_path):
    out = tmp_path / "out"
    proc = torchrun(*RUN, "--out", str(out))
    assert wait_for(out / "config.json", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [
        p for p in workers if "RANK=1" in open(f"/proc/{p}/environ", "rb").read().decode(errors="ignore").split("\0")
    ]
    assert rank1, workers
    time.sleep(1.0)
    os.kill(int(rank1[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1\b", err), err[-2000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "flags,message",
    [(["--trials", "1"], "fewer than the 2 torchrun processes"), (["--trials", "2", "--data-parallel"], "do not mix")],
)
def test_impossible_sharding_is_refused_by_every_rank(tmp_path, flags, message):
    proc = torchrun("--train-subset", "300", "--rounds", "1", "--epochs", "1", *flags, "--out", str(tmp_path / "o"))
    _, err = proc.communicate(timeout=120)
    # Every rank refuses on its own before any collective; which prints before torchrun stops
    # the other is a race, so each error line present must be this one, and at least one is.
    # (torchrun itself then prints its own traceback, naming each rank's exit code.)
    assert proc.returncode != 0 and 'lot_improved.py", line' not in err  # no traceback of ours
    codes = re.findall(r"exitcode\s*: (-?\d+)", err)  # 2, or a signal's -N where torchrun stopped that rank first
    assert "2" in codes and all(c == "2" or c.startswith("-") for c in codes), codes
    errors = [line for line in err.splitlines() if re.match(r"lot_improved: rank \d: error", line)]
    assert errors and all(message in line for line in errors), err
    assert not (tmp_path / "o").exists()


def test_shards_are_contiguous_and_cover_every_trial_once():
    for trials in range(1, 9):
        for world in range(1, trials + 1):
            parts = [lot.shard(trials, lot.Ranks(r, world)) for r in range(world)]
            assert [t for p in parts for t in p] == list(range(trials))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
