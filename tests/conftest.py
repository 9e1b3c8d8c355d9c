"""Shared fixtures: the script under test, real MNIST from data/, and small synthetic data."""

import functools
import os
import sys
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


def refused(argv: list[str], capsys, out) -> str:
    """main(argv) is bad input: exit code 2, exactly one error line on stderr, and nothing
    written (out does not exist afterwards). Returns the line."""
    capsys.readouterr()
    assert lot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lot_improved: error:"), err
    assert not out.exists()
    return err[0]
