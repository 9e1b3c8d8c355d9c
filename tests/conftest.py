"""Shared fixtures: the script under test, real MNIST from data/, and small synthetic data."""

import atexit
import functools
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import lot_improved as lot  # noqa: E402

# In-process runs stay quiet even when tqdm was imported before TQDM_DISABLE was set.
lot.tqdm = functools.partial(lot.tqdm, disable=True)

SCRIPT = ROOT / "lot_improved.py"
MNIST_NPZ = ROOT / "data" / "mnist.npz"


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST on CPU: (train, test) Splits."""
    return lot.load_mnist(str(ROOT / "data"), torch.device("cpu"))


def synthetic_arrays(n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


@pytest.fixture
def synthetic_npz(tmp_path):
    path = tmp_path / "data" / "mnist.npz"
    path.parent.mkdir()
    np.savez(path, **synthetic_arrays())
    return path


TINY = ["--train-subset", "600", "--rounds", "2", "--epochs", "2"]  # a real run of a few seconds


def _small_mnist(train: int = 2000, test: int = 1000) -> Path:
    """Real MNIST, the first 2,000 training and 1,000 test images, as an npz in a temporary folder:
    for runs whose cost is evaluation (paths of 30 networks, torchrun jobs), where the full test set
    would make the suite ten times slower and prove nothing more."""
    folder = Path(tempfile.mkdtemp(prefix="lot_small_mnist_"))
    with np.load(MNIST_NPZ) as full:
        arrays = {
            k: full[k][: train if k.endswith("train") else test] for k in ("x_train", "y_train", "x_test", "y_test")
        }
    np.savez(folder / "mnist.npz", **arrays)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "mnist.npz"


SMALL_NPZ = _small_mnist()
SMALL = ["--data-dir", str(SMALL_NPZ)]  # the flag that points a run at it


@pytest.fixture(scope="session")
def small_mnist():
    """SMALL_NPZ's (train, test) Splits on the CPU, as a run given SMALL loads them."""
    return lot.load_mnist(str(SMALL_NPZ), torch.device("cpu"))


def pause_at_epoch(monkeypatch, n: int):
    """From now on the n-th call of lot.train_epoch raises SIGINT first: the run finishes that step,
    checkpoints and exits 130. Returns the real train_epoch, to put back."""
    calls, real = [], lot.train_epoch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(lot, "train_epoch", interrupted)
    return real


def refused(argv: list[str], capsys, out) -> str:
    """main(argv) is bad input: exit code 2, exactly one error line on stderr, and nothing
    written (out does not exist afterwards). Returns the line."""
    capsys.readouterr()
    assert lot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lot_improved: error:"), err
    assert not out.exists()
    return err[0]
