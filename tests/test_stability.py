"""Instability analysis (Frankle et al., ICML 2020): every member's twin has its mask, start and
optimiser and a data order of its own; the path between the two is evaluated as a plain network
would be; the members themselves do not change; resuming and torchrun keep every byte."""

import contextlib
import itertools
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, SCRIPT, SMALL, lot

RUN = ["--train-subset", "600", "--rounds", "1", "--epochs", "1", "--stability", *SMALL]
FILES = ("results.csv", "curves.csv", "masks.pt", "stability.csv")


@pytest.fixture
def few_points(monkeypatch):
    """Three points on each path instead of thirty: the tests that are not about the path run ten
    times faster."""
    monkeypatch.setattr(lot, "PATH_POINTS", 3)


def by_hand_error(params, data, members):
    """Test error (%) of plain nn.Linear networks holding the given members' parameters
    ([w1, w2, w3, b1, b2, b3], each [members, ...])."""
    errors = []
    for m in members:
        layers = [torch.nn.Linear(i, o) for o, i in lot.SHAPES]
        with torch.no_grad():
            for k, layer in enumerate(layers):
                layer.weight.copy_(params[k][m])
                layer.bias.copy_(params[3 + k][m])
        net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        with torch.no_grad():
            wrong = (net(data.x).argmax(1) != data.y).sum().item()
        errors.append(100.0 * wrong / len(data.y))
    return errors


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability") / "out"
    assert lot.main([*RUN, "--out", str(out)]) == 0
    return out


def test_the_path_is_the_interpolated_network_evaluated_by_hand_and_its_ends_are_member_and_twin(twin_run, small_mnist):
    train, test = small_mnist
    state, _ = lot.load_checkpoint(twin_run)
    params = state.params  # round 1's trained weights: ticket, control, then their twins
    assert params[0].shape[0] == 4
    probe = lot.Split(train.x[:600], train.y[:600])  # the trial's first training images (all 600 here)
    alphas = torch.tensor([0.0, 0.5, 1.0])
    engine = lot.path_errors([p[:2] for p in params], [p[2:] for p in params], alphas, [test, probe])
    for i, a in enumerate(alphas.tolist()):
        line = [(1 - a) * p[:2] + a * p[2:] for p in params]  # every parameter, biases too
        for s, data in enumerate((test, probe)):
            # A different computation of the same maths: an image or two of 1,000 may flip, not more.
            assert engine[s, :, i].tolist() == pytest.approx(by_hand_error(line, data, [0, 1]), abs=0.25)
    # The ends in stability.csv: the member's own recorded test error, and the twin's own.
    paths = pd.read_csv(twin_run / "stability.csv")
    rows = pd.read_csv(twin_run / "results.csv")
    twins = by_hand_error(params, test, [2, 3])
    for m, variant in enumerate(("ticket", "control")):
        curve = paths[(paths["round"] == 1) & (paths.variant == variant) & (paths.split == "test")]
        assert curve.alpha.tolist() == pytest.approx(torch.linspace(0, 1, 30).tolist(), abs=1e-6)
        recorded = rows[(rows["round"] == 1) & (rows.variant == variant)].test_acc.item()
        assert curve.error.iloc[0] == pytest.approx(100 - recorded, abs=0.006)
        assert curve.error.iloc[-1] == pytest.approx(twins[m], abs=0.25)
        assert curve.error.iloc[-1] != pytest.approx(curve.error.iloc[0], abs=1e-3)  # the twin is another network
        errors = curve.error.tolist()
        barrier = max(errors) - (errors[0] + errors[-1]) / 2
        assert rows[(rows["round"] == 1) & (rows.variant == variant)].instability.item() == pytest.approx(barrier)


def test_twins_start_where_their_members_start_and_draw_other_batches(mnist):
    train, test = mnist
    orders, starts = [], []
    for stability in (False, True):
        cfg = lot.Config(train_subset=600, trials=2, controls="reinit,random", stability=stability, rounds=1)
        plan = lot.make_plan(cfg, 600)
        state = lot.fresh_state(cfg)
        experiment = lot.Experiment(plan, lot.Split(train.x[:600], train.y[:600]), test, state)
        lot.begin_round(plan, state, experiment.stack, experiment.control_gens, experiment.signs_gens)
        # run_round gives the twins their round's order stream; begin_round only loads the starts
        experiment.trainee.twin_gens = [lot.make_generator(0, t, "twin", 0) for t in range(2)] if stability else []
        orders.append(experiment.trainee.order())
        starts.append([p.detach().clone() for p in experiment.stack.parameters()])
    (alone, twinned), members = orders, 6
    assert twinned.shape == (4, 600) and torch.equal(twinned[:2], alone)  # the members' orders do not change
    for t in range(2):
        assert not torch.equal(twinned[2 + t], twinned[t])  # the twin's order is its own
        assert torch.equal(twinned[2 + t].sort().values, twinned[t].sort().values)  # of the same images
    for single, both in zip(*starts):
        assert torch.equal(both[:members], single) and torch.equal(both[members:], single)


def test_a_members_numbers_are_the_same_with_and_without_twins(tmp_path, few_points):
    run = ["--train-subset", "300", "--rounds", "2", "--epochs", "1", "--trials", "2", *SMALL]
    run += ["--controls", "reinit,random", "--reinit-draws", "2"]
    assert lot.main([*run, "--out", str(tmp_path / "alone")]) == 0
    assert lot.main([*run, "--stability", "--out", str(tmp_path / "twins")]) == 0
    alone, twins = pd.read_csv(tmp_path / "alone" / "results.csv"), pd.read_csv(tmp_path / "twins" / "results.csv")
    assert twins.drop(columns=["instability", "instability_train"]).to_csv() == alone.to_csv()
    for name in ("curves.csv", "masks.pt", "tickets.pt"):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "twins" / name).read_bytes(), name
    assert not (tmp_path / "alone" / "stability.csv").exists() and "instability" not in alone
    paths = pd.read_csv(tmp_path / "twins" / "stability.csv")  # every member has its path: both reinit draws too
    assert len(paths) == 3 * 2 * 4 * 2 * 3  # rounds x trials x members x splits x points
    assert set(paths.draw) == {0, 1}
    summary = (tmp_path / "twins" / "summary.md").read_text()
    assert "Instability" in summary and "Control train" in summary
    assert (tmp_path / "twins" / "instability.png").exists() and (tmp_path / "twins" / "interpolation.png").exists()
    assert "The paper's central claim" in (tmp_path / "twins" / "stability.md").read_text()


class PauseAfter:
    """A stop signal that arrives after the given number of steps (deterministic, unlike a kill)."""

    def __init__(self, steps):
        self.calls, self.steps, self.signum = itertools.count(1), steps, None

    def __call__(self):
        return next(self.calls) >= self.steps


def test_paused_mid_round_and_resumed_twice_a_run_with_twins_ends_byte_identical(tmp_path, monkeypatch, few_points):
    run = [
        "--train-subset",
        "600",
        "--rounds",
        "1",
        "--epochs",
        "2",
        "--trials",
        "2",
        "--stability",
        *SMALL,
    ]  # 10 steps an epoch
    assert lot.main([*run, "--out", str(tmp_path / "ref")]) == 0
    out, resume = tmp_path / "out", []
    for steps, position in ((25, (1, 1, 5)), (12, (1, 2, 7))):  # round 1 epoch 1 step 5, then epoch 2 step 7
        monkeypatch.setattr(lot, "stop_on_signals", lambda steps=steps: contextlib.nullcontext(PauseAfter(steps)))
        assert lot.main([*run, "--out", str(out), *resume]) == 130
        state, _ = lot.load_checkpoint(out)
        assert (state.round, state.epoch, state.step) == position and len(state.twin_rng) == 2
        resume = ["--resume"]
    monkeypatch.setattr(lot, "stop_on_signals", lambda: contextlib.nullcontext(PauseAfter(10**9)))
    assert lot.main([*run, "--out", str(out), "--resume"]) == 0
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


@pytest.mark.parametrize("first,then,message", [([], ["--stability"], "True"), (["--stability"], [], "False")])
def test_a_resume_that_adds_or_drops_stability_is_refused_and_names_it(
    tmp_path, capsys, few_points, first, then, message
):
    out = tmp_path / "out"
    base = ["--train-subset", "120", "--rounds", "1", "--epochs", "1", *SMALL, "--out", str(out)]
    assert lot.main([*base, *first]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert lot.main([*base, *then, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--stability {message} (the run in --out has" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_sparse_engine_trains_twins_to_the_dense_engines_numbers(tmp_path, few_points):
    run = ["--train-subset", "300", "--rounds", "3", "--prune-rate", "0.5", "--epochs", "1", "--stability", *SMALL]
    assert lot.main([*run, "--sparse", "--out", str(tmp_path / "csr")]) == 0  # round 3: 12.5% left, sparse
    assert lot.main([*run, "--no-sparse", "--out", str(tmp_path / "dense")]) == 0
    assert json.loads((tmp_path / "csr" / "config.json").read_text())["fc1_csr_rounds"] == [3]
    csr, dense = (pd.read_csv(tmp_path / d / "stability.csv") for d in ("csr", "dense"))
    assert len(csr) == len(dense) == 4 * 2 * 2 * 3
    # Float rounding apart, the same training: a few test images of 1,000 may flip, not more.
    assert (csr.error - dense.error).abs().max() < 0.5


def test_torchrun_with_twins_writes_what_one_process_writes(tmp_path):
    run = ["--train-subset", "120", "--rounds", "1", "--epochs", "1", "--trials", "2", "--stability", *SMALL]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(SCRIPT), *run, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *run]
        + ["--out", str(tmp_path / "two")],
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    assert two.returncode == 0, two.stderr
    for name in FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_stability_md_calls_a_level_matching_within_one_sd_of_dense_and_stable_under_two_points():
    # Dense (round 0's ticket) over three trials: 98.0, 98.2, 98.4: mean 98.2, sd 0.2, so the bar is 98.0.
    acc = {("ticket", 0): 98.2, ("control", 0): 98.2, ("ticket", 1): 98.05, ("control", 1): 98.05}
    acc |= {("ticket", 2): 98.05, ("control", 2): 97.95}
    inst = {("ticket", 0): 0.5, ("control", 0): 2.5, ("ticket", 1): 1.9, ("control", 1): 2.1}
    inst |= {("ticket", 2): 0.3, ("control", 2): 3.0}
    rows = pd.DataFrame(
        [
            {"trial": t, "round": r, "variant": v, "weights_pct": 100.0 - 20 * r}
            | {"test_acc": acc[v, r] + (t - 1) * 0.2, "instability": inst[v, r] + (t - 1) * 0.1}
            for t in range(3)
            for r in (0, 1, 2)
            for v in ("ticket", "control")
        ]
    )
    verdicts = lot.stability_verdicts(rows).set_index(["round", "variant"])
    keys = [(r, v) for r in (0, 1, 2) for v in ("ticket", "control")]
    assert [verdicts.matching[k] for k in keys] == [True, True, True, True, True, False]  # 97.95 < 98.0 <= 98.05
    assert [verdicts.stable[k] for k in keys] == [True, False, True, False, True, False]  # 1.9 < 2 <= 2.1
    table = lot.stability_markdown(rows)
    assert "| 1 | 80.00% | 1.90 [1.65, 2.15] MS | 2.10 [1.85, 2.35] M- |" in table
    # Round 0 is dense: its unstable control is shown but not counted against the claim about subnetworks.
    assert "| 0 | 100.00% | 0.50 [0.25, 0.75] MS | 2.50 [2.25, 2.75] M- |" in table
    assert "| Ticket | 2 | 0 | 0 | 0 |" in table and "| Control | 0 | 1 | 0 | 1 |" in table
    assert "The claim fails here at: Control at 80.00%." in table
    dense_only = lot.stability_markdown(rows[rows["round"] == 0])  # as written when a run stops in round 1
    assert "| Control | 0 | 0 | 0 | 0 |" in dense_only and "No sparse level has finished yet." in dense_only
