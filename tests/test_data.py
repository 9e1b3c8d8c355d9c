"""Data: the bundled MNIST is the real one, wrong files are refused, the torchvision path works offline
when its files are there and fails with one helpful line when they are not."""

import contextlib
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MNIST_NPZ, lot, refused, synthetic_arrays

from benchmarks.epoch_throughput import write_idx


def test_bundled_npz_is_real_mnist_normalised_with_the_standard_constants(mnist):
    train, test = mnist
    assert train.x.shape == (60_000, 784) and test.x.shape == (10_000, 784)
    assert torch.bincount(train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1.0) < 1e-3


def test_normalising_is_x_over_255_less_the_mean_over_the_std_with_the_same_bits_on_one_thread_or_all():
    images = np.random.default_rng(0).integers(0, 256, size=(1000, 28, 28), dtype=np.uint8)
    images.setflags(write=False)  # as some loaders hand them over: read only, and never written
    want = (images.reshape(1000, -1) / 255.0 - lot.MNIST_MEAN) / lot.MNIST_STD  # numpy, float64: another computation
    got = lot.normalise(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(want).float())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(lot.normalise(images), got)  # the same computation on one thread
    finally:
        torch.set_num_threads(threads)


def test_train_subset_takes_the_first_n_images(tmp_path):
    train, test = lot.load_mnist(str(MNIST_NPZ.parent), torch.device("cpu"), 500)
    with np.load(MNIST_NPZ) as f:
        first = f["y_train"][:500]
    assert len(train.y) == 500 and torch.equal(train.y, torch.from_numpy(first.astype(np.int64)))
    assert len(test.y) == 10_000


def test_data_dir_may_name_the_npz_itself(synthetic_npz):
    train, _ = lot.load_mnist(str(synthetic_npz), torch.device("cpu"))
    assert len(train.y) == 120


def test_without_npz_torchvision_reads_mnist_from_data_dir(tmp_path):
    arrays = synthetic_arrays(n_train=90, n_test=30, seed=4)
    write_idx(arrays, tmp_path)
    train, test = lot.load_mnist(str(tmp_path), torch.device("cpu"))
    assert torch.equal(train.y, torch.from_numpy(arrays["y_train"].astype(np.int64)))
    torch.testing.assert_close(test.x, lot.normalise(arrays["x_test"]))


def test_no_npz_and_no_network_names_both_remedies(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...,\ngot: Name not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    out = tmp_path / "out"
    assert lot.main(["--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "mnist.npz" in err[0] and "--data-dir" in err[0] and "network" in err[0]
    assert not out.exists()


def test_processes_starting_together_download_one_at_a_time(tmp_path, monkeypatch):
    # torchrun's processes all load the data as they start: two writing the same files corrupt them.
    import threading

    import torchvision.datasets

    inside, overlaps, together = [], [], threading.Barrier(2)

    def download(root, train, download):
        if not download:
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        overlaps.append(bool(inside))
        inside.append(root)
        time.sleep(0.2)  # a download under way: another one starting now would overlap it
        inside.pop()
        raise RuntimeError("offline")

    def load():
        together.wait()
        with pytest.raises(lot.UsageError):
            lot.load_torchvision(tmp_path / "data")

    monkeypatch.setattr(torchvision.datasets, "MNIST", download)
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [False, False]


@contextlib.contextmanager
def read_only(folder):
    """The folder, and everything in it, made immutable (as root, permissions alone would not bite)."""
    paths = [folder, *folder.rglob("*")]
    if subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True).returncode:
        pytest.skip("this filesystem cannot make a folder immutable (chattr +i)")
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_bytes(b"")
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


@pytest.mark.parametrize("form", ["torchvision's raw files", "mnist.npz"])
def test_a_read_only_data_folder_loads_and_gets_no_lock(form, tmp_path, capsys):
    # A cluster's shared /datasets, a Kaggle input: readable, never writable.
    data = tmp_path / "datasets"
    data.mkdir()
    arrays = synthetic_arrays(n_train=120, n_test=30, seed=5)
    if form == "mnist.npz":
        np.savez(data / "mnist.npz", **arrays)
    else:
        write_idx(arrays, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "out"
    with read_only(data):
        code = lot.main(["--data-dir", str(data), "--rounds", "1", "--epochs", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no .download.lock, nothing else
    assert len(pd.read_csv(out / "results.csv")) == 2 * 2


def test_a_read_only_folder_without_mnist_is_one_line_naming_the_remedies(tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    with read_only(data):
        line = refused(["--data-dir", str(data), "--out", str(tmp_path / "out")], capsys, tmp_path / "out")
    assert "MNIST not found" in line and "copy mnist.npz into --data-dir" in line
    assert list(data.iterdir()) == []


BAD_FILES = {
    "corrupt bytes": lambda p: p.write_bytes(b"PK\x03\x04 this is no zip archive" * 10),
    "empty file": lambda p: p.write_bytes(b""),
    "truncated archive": lambda p: p.write_bytes(MNIST_NPZ.read_bytes()[:50_000]),
    "missing key": lambda p: np.savez(p, **{k: v for k, v in synthetic_arrays().items() if k != "y_test"}),
    "flat images": lambda p: np.savez(p, **{**synthetic_arrays(), "x_train": np.zeros((120, 784), np.uint8)}),
    "float images": lambda p: np.savez(p, **{**synthetic_arrays(), "x_test": np.zeros((40, 28, 28))}),
    "label 10": lambda p: np.savez(p, **{**synthetic_arrays(), "y_train": np.full(120, 10, np.uint8)}),
    "negative label": lambda p: np.savez(p, **{**synthetic_arrays(), "y_test": np.full(40, -1, np.int64)}),
    "length mismatch": lambda p: np.savez(p, **{**synthetic_arrays(), "y_train": np.zeros(7, np.uint8)}),
    "no images": lambda p: np.savez(p, **synthetic_arrays(n_train=0)),
    "pickled object": lambda p: np.savez(p, **{**synthetic_arrays(), "y_test": np.array([{"a": 1}], dtype=object)}),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_data_file_gets_one_line_and_exit_2_with_out_untouched(case, tmp_path, capsys):
    path = tmp_path / "mnist.npz"
    BAD_FILES[case](path)
    out = tmp_path / "out"
    assert "mnist.npz" in refused(["--data-dir", str(tmp_path), "--out", str(out)], capsys, out)
