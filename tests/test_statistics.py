"""Evidence over trials: paired confidence intervals, and the paper's early-stopping criterion on a
held-out validation split."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL, lot, refused

TINY = ["--train-subset", "1200", "--rounds", "2", "--epochs", "2"]


def test_paired_t_interval_matches_hand_computation():
    # d = (0.93, 1.15, 0.47): mean 0.85, sd = sqrt(0.2408 / 2) = 0.346987, se = sd / sqrt 3,
    # t(0.975, 2) = 4.303, half-width 4.303 * 0.200333 = 0.862034
    mean, lo, hi = lot.paired_t_interval([0.93, 1.15, 0.47])
    assert mean == pytest.approx(0.85)
    assert lo == pytest.approx(0.85 - 0.862034, abs=1e-5) and hi == pytest.approx(0.85 + 0.862034, abs=1e-5)
    mean, lo, hi = lot.paired_t_interval([1.0, 1.0])  # no spread, no width
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)


def test_t_critical_values_match_the_tables():
    assert lot.t_critical_95(1) == 12.706 and lot.t_critical_95(4) == 2.776 and lot.t_critical_95(30) == 2.042
    for df, table in ((40, 2.021), (60, 2.000), (120, 1.980), (10_000, 1.960)):
        assert lot.t_critical_95(df) == pytest.approx(table, abs=1.5e-3)


def test_summary_shows_mean_sd_and_a_paired_interval_with_trials_and_the_original_table_without():
    rows = pd.DataFrame(
        [
            {"trial": t, "round": 0, "variant": v, "weights_pct": 100.0, "test_acc": a}
            for t, (ticket, control) in enumerate([(98.0, 97.0), (98.2, 97.1), (97.9, 97.3)])
            for v, a in (("ticket", ticket), ("control", control))
        ]
    )
    table = lot.summary_markdown(rows)
    d = np.array([1.0, 1.1, 0.6])
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    assert f"| 0 | 100.00% | 98.03 ± 0.15 | 97.13 ± 0.15 | +0.90 [{0.9 - half:+.2f}, {0.9 + half:+.2f}] |" in table
    assert "Student-t, df = 2" in table
    single = lot.summary_markdown(rows[rows.trial == 0])
    assert "| 0 | 100.00% | 98.00 | 97.00 | +1.00 |" in single and "±" not in single


def test_validation_split_is_seeded_disjoint_from_training_and_per_trial():
    train, val = lot.validation_split(seed=0, trials=3, n=1000, val_size=100)
    again, _ = lot.validation_split(seed=0, trials=3, n=1000, val_size=100)
    assert torch.equal(train, again) and train.shape == (3, 900) and val.shape == (3, 100)
    for t in range(3):
        assert len(set(train[t].tolist()) | set(val[t].tolist())) == 1000  # a partition
        assert not set(train[t].tolist()) & set(val[t].tolist())
    assert not torch.equal(val[0], val[1])  # each trial holds out its own images
    everything, none = lot.validation_split(seed=0, trials=2, n=50, val_size=0)
    assert torch.equal(everything[1], torch.arange(50)) and none.shape == (2, 0)


def test_ticket_and_control_train_only_on_the_trials_training_images(mnist, monkeypatch):
    train, test = mnist
    cfg = lot.parse_config(["--rounds", "0", "--epochs", "1", "--val-size", "300", "--trials", "2"])
    seen = []
    real = lot.train_epoch

    def spy(net, opt, data, order, *args, **kwargs):
        seen.append(order.clone())
        return real(net, opt, data, order, *args, **kwargs)

    monkeypatch.setattr(lot, "train_epoch", spy)
    small = lot.Split(train.x[:1500], train.y[:1500])
    lot.run_experiment(
        lot.make_plan(cfg, len(small.y) - cfg.val_size), small, test, lot.fresh_state(cfg), progress=False
    )
    index, val = lot.validation_split(0, 2, 1500, 300)
    for t in range(2):
        used = set(torch.cat([o[t] for o in seen]).tolist())
        assert used == set(index[t].tolist()) and not used & set(val[t].tolist())


def test_an_epoch_that_ends_on_an_evaluation_reuses_it_instead_of_testing_twice(mnist, monkeypatch):
    train, test = mnist
    cfg = lot.parse_config(["--rounds", "0", "--epochs", "2", "--val-size", "300", "--eval-every", "10"])
    calls = []
    real = lot.evaluate
    monkeypatch.setattr(lot, "evaluate", lambda net, data: calls.append(data is test) or real(net, data))
    small = lot.Split(train.x[:1500], train.y[:1500])  # 1,200 training images: 20 steps an epoch
    state = lot.run_experiment(
        lot.make_plan(cfg, len(small.y) - cfg.val_size), small, test, lot.fresh_state(cfg), progress=False
    )
    assert calls.count(True) == 4  # at iterations 10, 20, 30, 40; epochs end at 20 and 40
    for curve in state.curves:
        (point,) = [
            e for e in state.evals if e["variant"] == curve["variant"] and e["iteration"] == 20 * curve["epoch"]
        ]
        assert (curve["test_acc"], curve["test_loss"]) == (point["test_acc"], point["test_loss"])


def test_early_stop_iteration_is_the_argmin_of_the_recorded_validation_losses(tmp_path):
    out = tmp_path / "es"
    assert lot.main([*TINY, *SMALL, "--trials", "2", "--val-size", "200", "--eval-every", "5", "--out", str(out)]) == 0
    rows, evals = pd.read_csv(out / "results.csv"), pd.read_csv(out / "validation.csv")
    steps = 2 * math.ceil(1000 / 60)  # two epochs of the 1,000 training images
    assert sorted(evals.iteration.unique()) == [*range(5, steps, 5), steps]  # and the round's end
    for row in rows.itertuples():
        mine = evals[(evals.trial == row.trial) & (evals["round"] == row.round) & (evals.variant == row.variant)]
        best = mine.loc[mine.val_loss.idxmin()]
        assert row.early_stop_iter == best.iteration and row.early_stop_test_acc == best.test_acc
    assert (out / "early_stop.png").read_bytes()[:4] == b"\x89PNG"


def test_early_stop_table_pairs_each_trial_against_its_dense_network_and_its_control():
    rows = pd.DataFrame(
        [
            (trial, rnd, variant, draw, pct, it, acc)
            for trial, scale in ((0, 1.0), (1, 2.0))
            for rnd, pct in ((0, 100.0), (1, 80.0))
            for variant, draw, it, acc in (
                ("ticket", 0, (1000 if rnd == 0 else 600) * scale, 97.0 + rnd + trial),
                ("control", 0, 900 * scale, 96.0),
                ("control", 1, 1500 * scale, 96.5),
            )
        ],
        columns=["trial", "round", "variant", "draw", "weights_pct", "early_stop_iter", "early_stop_test_acc"],
    )
    round1 = lot.early_stop_markdown(rows).splitlines()[3].split(" | ")
    # Ticket stop 600 and 1200: 0.6 of dense in both trials; the control's two draws average 1,200
    # (and 2,400), twice the ticket's; accuracy 98 and 99 against dense 97 and 98; the control 96.25 in both.
    assert round1[1:5] == ["80.00%", "900", "0.60 [0.60, 0.60]", "2.00 [2.00, 2.00]"]
    assert round1[5:] == ["98.50", "+1.00 [+1.00, +1.00]", "-1.25 [-7.60, +5.10]", "+2.25 [-4.10, +8.60] |"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--val-size", "-5"],
        ["--val-size", "1200"],
        ["--val-size", "5000"],
        ["--val-size", "100", "--eval-every", "0"],
        ["--eval-every", "-100"],
    ],
)
def test_bad_validation_settings_get_one_line_and_exit_2(flags, tmp_path, capsys):
    out = tmp_path / "out"
    refused([*TINY, *flags, "--out", str(out)], capsys, out)
