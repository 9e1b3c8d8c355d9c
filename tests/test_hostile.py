"""Hostile input, table-driven: each case gets one line on stderr, its documented exit code, and
leaves every file in --out exactly as it was. The out folder holds a paused run, so --resume is
otherwise valid there."""

import errno
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import MNIST_NPZ, lot, synthetic_arrays

RUN = ["--train-subset", "600", "--rounds", "2", "--epochs", "2"]


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory):
    """A run stopped by SIGINT in round 1 (as if by Ctrl-C): checkpoint, tables, config."""
    out = tmp_path_factory.mktemp("paused") / "out"
    real = lot.train_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # the handler asks for a stop after this step
        return real(*args, **kwargs)

    lot.train_epoch = interrupted
    try:
        assert lot.main([*RUN, "--out", str(out)]) == 130
    finally:
        lot.train_epoch = real
    assert (out / "checkpoint.pt").exists() and (out / "results.csv").exists()
    return out


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def write_npz(path, **changes):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{**synthetic_arrays(), **changes})
    return path


def set_checkpoint(make):
    def setup(out, tmp):
        make(out / "checkpoint.pt")
        return []

    return setup


def flag_case(*flags):
    return lambda out, tmp: list(flags)


def data_case(**changes):
    return lambda out, tmp: ["--data-dir", str(write_npz(tmp / "bad" / "mnist.npz", **changes))]


CASES = {
    # every flag's bad values, wrong types
    "prune rate above 1": (flag_case("--prune-rate", "1.5"), 2),
    "prune rate not a number": (flag_case("--prune-rate", "lots"), 2),
    "zero rounds": (flag_case("--rounds", "0"), 2),
    "negative epochs": (flag_case("--epochs", "-3"), 2),
    "fractional batch size": (flag_case("--batch-size", "2.5"), 2),
    "zero trials": (flag_case("--trials", "0"), 2),
    "negative seed": (flag_case("--seed", "-1"), 2),
    "negative lr": (flag_case("--lr", "-0.1"), 2),
    "momentum 1": (flag_case("--momentum", "1"), 2),
    "zero subset": (flag_case("--train-subset", "0"), 2),
    "unknown device": (flag_case("--device", "gpu0"), 2),
    "resume with another lr": (flag_case("--lr", "0.02"), 2),
    "resume and overwrite": (flag_case("--overwrite"), 2),
    # data files
    "corrupt data file": (lambda out, tmp: ["--data-dir", str(_bytes(tmp / "c" / "mnist.npz", b"garbage" * 99))], 2),
    "truncated data file": (
        lambda out, tmp: ["--data-dir", str(_bytes(tmp / "t" / "mnist.npz", MNIST_NPZ.read_bytes()[:4096]))],
        2,
    ),
    "empty data file": (lambda out, tmp: ["--data-dir", str(_bytes(tmp / "e" / "mnist.npz", b""))], 2),
    "wrong-shaped images": (data_case(x_train=np.zeros((120, 28, 27), np.uint8)), 2),
    "labels out of 0..9": (data_case(y_train=np.arange(120) % 12), 2),
    "other data than the run's": (data_case(), 2),
    # checkpoints
    "corrupt checkpoint": (set_checkpoint(lambda p: p.write_bytes(os.urandom(4096))), 2),
    "truncated checkpoint": (set_checkpoint(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])), 2),
    "empty checkpoint": (set_checkpoint(lambda p: p.write_bytes(b"")), 2),
    "malicious pickle checkpoint": (set_checkpoint(lambda p: torch.save({"state": Evil()}, p)), 2),
    "checkpoint of something else": (set_checkpoint(lambda p: torch.save({"weights": torch.ones(3)}, p)), 2),
}


def _bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", CASES)
def test_hostile_resume_input(case, paused_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(paused_run, out)
    setup, code = CASES[case]
    extra = setup(out, tmp_path)
    before = snapshot(out)
    monkeypatch.chdir(tmp_path)  # where a malicious pickle would drop its file
    capsys.readouterr()
    assert lot.main([*RUN, "--out", str(out), "--resume", *extra]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lot_improved: error:"), err
    assert snapshot(out) == before
    assert not (tmp_path / "PWNED").exists()


def test_malicious_pickle_is_named_as_such(paused_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(paused_run, out)
    torch.save({"state": Evil()}, out / "checkpoint.pt")
    assert lot.main([*RUN, "--out", str(out), "--resume"]) == 2
    assert "pickled Python objects" in capsys.readouterr().err


def test_resume_without_any_earlier_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lot.main([*RUN, "--out", str(empty), "--resume"]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the filesystem say no, as a read-only mount would
        real = lot.Path.write_bytes
        monkeypatch.setattr(
            lot.Path,
            "write_bytes",
            lambda self, data: (
                (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))
                if locked in self.parents
                else real(self, data)
            ),
        )
    assert lot.main([*RUN, "--out", str(locked / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]


def test_a_full_disk_keeps_every_file_complete_and_exits_1(paused_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(paused_run, out)
    before = snapshot(out)
    real, calls = os.fsync, []

    def full(fd):  # the third write of the resumed run finds the disk full
        calls.append(fd)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(lot.os, "fsync", full)
    assert lot.main([*RUN, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[-1] and "--resume" in err[-1]
    after = snapshot(out)
    assert set(after) == set(before)  # no temporary file left behind
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["masks.pt"] == before["masks.pt"]
    assert after["curves.csv"] == before["curves.csv"]  # the write that failed left the old file whole
    monkeypatch.setattr(lot.os, "fsync", real)
    assert lot.main([*RUN, "--out", str(out), "--resume"]) == 0  # and it resumes once there is space
