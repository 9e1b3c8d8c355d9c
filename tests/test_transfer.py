"""Transfer: MNIST ticket masks retrained on Fashion-MNIST (here a small synthetic stand-in)."""

import numpy as np
import pandas as pd
import pytest
from conftest import lot, refused, synthetic_arrays

TINY = ["--train-subset", "300", "--rounds", "2", "--epochs", "1"]


@pytest.fixture
def fashion(tmp_path):
    path = tmp_path / "fashion.npz"
    np.savez(path, **synthetic_arrays(n_train=300, n_test=60, seed=9))
    return path


def test_transfer_trains_every_rounds_ticket_mask_from_w0_and_from_a_fresh_init(tmp_path, fashion):
    out = tmp_path / "out"
    assert (
        lot.main(
            [*TINY, "--trials", "2", "--transfer", "fashion-mnist", "--transfer-data", str(fashion), "--out", str(out)]
        )
        == 0
    )
    rows, mnist = pd.read_csv(out / "transfer.csv"), pd.read_csv(out / "results.csv")
    assert len(rows) == 2 * 3 * 2 and set(rows.variant) == {"ticket", "reinit"}
    tickets = mnist[mnist.variant == "ticket"].set_index(["trial", "round"])
    for row in rows.itertuples():  # each member wears the MNIST ticket's mask of its round
        assert row.weights == tickets.loc[(row.trial, row.round), "weights"]
        assert row.fc1_pct == tickets.loc[(row.trial, row.round), "fc1_pct"]
    assert rows.test_acc.between(0, 100).all()
    assert (out / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_finished_run_gains_a_transfer_on_resume_and_offline_fails_with_one_line(
    tmp_path, fashion, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert lot.main([*TINY, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    capsys.readouterr()
    assert lot.main([*TINY, "--out", str(out), "--resume", "--transfer", "fashion-mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Fashion-MNIST not found" in err[0] and "--transfer-data" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the MNIST results stay intact
    assert (
        lot.main([*TINY, "--out", str(out), "--resume", "--transfer", "fashion-mnist", "--transfer-data", str(fashion)])
        == 0
    )
    assert len(pd.read_csv(out / "transfer.csv")) == 6
    assert (out / "results.csv").read_bytes() == before["results.csv"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--transfer", "cifar10"],
        ["--transfer-data", "x.npz"],
        ["--transfer", "fashion-mnist", "--transfer-data", "/nonexistent/f.npz"],
    ],
)
def test_bad_transfer_settings_get_one_line_and_exit_2(flags, tmp_path, capsys):
    out = tmp_path / "out"
    refused([*TINY, *flags, "--out", str(out)], capsys, out)
