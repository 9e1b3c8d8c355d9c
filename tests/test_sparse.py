"""--sparse (the default where PyTorch has MKL): fc1 through sparse kernels on CPU computes the dense
engine's maths, within float rounding, touching only live weights; a paused sparse round resumes to
the same bytes. Without MKL the default is the dense engine."""

import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, SMALL, lot, refused

from benchmarks.epoch_throughput import STEP_FLOP_PER_SAMPLE

# 10 steps an epoch; under 20% of the weights are left from round 8 (16.8%): rounds 8 and 9 run sparse.
SPARSE_RUN = ["--train-subset", "600", "--epochs", "2", "--rounds", "9", "--device", "cpu", *SMALL]
# PyTorch's CSR products use MKL; builds without it (macOS, aarch64) train fc1 dense.
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this PyTorch has no MKL")


def engine_of(out) -> tuple[str, list[int]]:
    config = json.loads((out / "config.json").read_text())
    return config["fc1_engine"], config["fc1_csr_rounds"]


def stack_with_masks(density: float, trials: int = 2, per_trial: int = 2, seed: int = 0, rest: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    members = trials * per_trial
    stack = lot.LeNetStack(members, per_trial, torch.device("cpu"))
    masks = [
        torch.rand(members, o, i, generator=gen) < (density if n == 0 else rest) for n, (o, i) in enumerate(lot.SHAPES)
    ]
    inits = [lot.default_init(torch.Generator().manual_seed(seed + m)) for m in range(members)]
    stack.load(
        [w * m for w, m in zip(lot.stack_members(inits, torch.device("cpu"))[:3], masks)]
        + lot.stack_members(inits, torch.device("cpu"))[3:]
    )
    return stack, masks


@needs_mkl
def test_sparse_fc1_gives_the_dense_losses_and_gradients_within_float_rounding(mnist):
    train = mnist[0]
    stack, masks = stack_with_masks(0.1)
    x, y = train.x[:120].view(2, 60, -1), train.y[:120].view(2, 60)
    dense_losses = stack.backprop(x, y)
    dense_grads = [g.clone() for g in stack.grads()]
    opt = lot.MaskedSGD(stack, [m.float() for m in masks], lr=0.01, momentum=0.9)
    sparse = lot.SparseFC1(stack, opt, masks[0], lot.pruning_level(masks))
    stack.flat_grad.zero_()  # every gradient must come from the sparse step
    losses = sparse.backprop(x, y)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    live = masks[0].reshape(-1).nonzero().squeeze(1)
    torch.testing.assert_close(sparse.live_parts[1], dense_grads[0].reshape(-1)[live], rtol=1e-4, atol=1e-6)
    for got, want in zip(stack.grads()[1:], dense_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_mkl
def test_a_member_whose_fc1_is_empty_runs_the_sparse_engine_as_the_dense_one(mnist):
    # Layer collapse (a mask found at initialisation may empty a layer): no live fc1 weight at all.
    train = mnist[0]
    stack, masks = stack_with_masks(0.1)
    masks[0][1] = False
    with torch.no_grad():
        stack.weights[0][1].zero_()
    x, y = train.x[:120].view(2, 60, -1), train.y[:120].view(2, 60)
    dense_losses = stack.backprop(x, y)
    dense_grads = [g.clone() for g in stack.grads()]
    opt = lot.MaskedSGD(stack, [m.float() for m in masks], lr=0.01, momentum=0.9)
    sparse = lot.SparseFC1(stack, opt, masks[0], lot.pruning_level(masks))
    stack.flat_grad.zero_()
    losses = sparse.backprop(x, y)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    for got, want in zip(stack.grads()[1:], dense_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    opt.step()  # an update with nothing live in the member's fc1
    sparse.sync()
    assert not stack.weights[0][1].any() and stack.weights[0][0].abs().sum() > 0


@needs_mkl
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_sparse_step_updates_live_weights_like_the_dense_step_and_never_touches_dead_ones(mnist, optimizer):
    train = mnist[0]
    x, y = train.x[:120].view(2, 60, -1), train.y[:120].view(2, 60)
    results = []
    for sparse in (False, True):
        stack, masks = stack_with_masks(0.05)
        cfg = lot.parse_config(["--optimizer", optimizer])
        opt = lot.make_optimizer(cfg, stack)
        lot.train_on_masks(opt, masks)
        stack.sparse = lot.sparse_fc1(stack, opt, masks, sparse)
        assert (stack.sparse is not None) == sparse
        for _ in range(5):
            (stack.sparse or stack).backprop(x, y)
            opt.step()
        if sparse:
            # what the optimiser steps over: fc1's live weights and everything after fc1, nothing else
            assert (
                sum(s[0].numel() for s in opt.segments) == int(masks[0].sum()) + stack.flat.numel() - masks[0].numel()
            )
            stack.sparse.close()
        results.append([p.detach().clone() for p in stack.parameters()] + [b.clone() for b in opt.state()])
    # Adam divides by the gradient's root mean square: where that is tiny, rounding moves an update
    # by up to lr * 1e-2; a wrong gradient moves it by up to lr (1.2e-3) a step.
    atol = 2e-5 if optimizer == "adam" else 1e-6
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@needs_mkl
def test_the_sparse_forward_reads_the_weights_the_optimiser_has_just_written(mnist):
    # The CSR matrices are built once a round and share fc1's live values with the optimiser.
    train, test = mnist
    stack, masks = stack_with_masks(0.03, rest=0.03)
    opt = lot.MaskedSGD(stack, [m.float() for m in masks], lr=0.5, momentum=0.9)
    sparse = lot.sparse_fc1(stack, opt, masks, True)
    before = lot.members_forward(stack, range(4), test.x[:500], sparse).clone()
    x, y = train.x[:120].view(2, 60, -1), train.y[:120].view(2, 60)
    for _ in range(3):
        sparse.backprop(x, y)
        opt.step()
    got = lot.members_forward(stack, range(4), test.x[:500], sparse)
    sparse.sync()
    torch.testing.assert_close(got, lot.members_forward(stack, range(4), test.x[:500]), rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 0.1  # the steps moved the outputs: the check above could fail


@needs_mkl
def test_a_sparse_run_matches_the_dense_run_within_float_rounding_with_the_same_masks(tmp_path, monkeypatch):
    made = []
    real = lot.SparseFC1.__init__
    monkeypatch.setattr(lot.SparseFC1, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    assert lot.main([*SPARSE_RUN, "--no-sparse", "--out", str(tmp_path / "dense")]) == 0
    assert not made and engine_of(tmp_path / "dense") == ("dense", [])
    assert lot.main([*SPARSE_RUN, "--out", str(tmp_path / "sparse")]) == 0  # --sparse is the default with MKL
    assert len(made) == 2 and engine_of(tmp_path / "sparse") == ("csr", [8, 9])  # config.json: what ran
    dense, sparse = (pd.read_csv(tmp_path / d / "results.csv") for d in ("dense", "sparse"))
    assert (dense.weights == sparse.weights).all()
    # Round 8 trains the same mask both ways; round 9's comes from sparse-trained weights, where a
    # weight at the pruning threshold may go either way.
    dense, sparse = dense[dense["round"] <= 8], sparse[sparse["round"] <= 8]
    assert (dense.test_acc - sparse.test_acc).abs().max() <= 0.5
    assert (dense.test_loss - sparse.test_loss).abs().max() <= 1e-3
    masks = [lot.load_masks(tmp_path / d) for d in ("dense", "sparse")]
    assert all(torch.equal(masks[0][k][:, :9], masks[1][k][:, :9]) for k in masks[0])


@needs_mkl
def test_evaluation_through_a_very_sparse_fc1_gives_the_dense_forward(mnist):
    test = mnist[1]
    stack, masks = stack_with_masks(0.03, rest=0.03)
    opt = lot.MaskedSGD(stack, [m.float() for m in masks], lr=0.01, momentum=0.9)
    sparse = lot.sparse_fc1(stack, opt, masks, True)
    assert sparse.level < lot.SPARSE_EVAL_BELOW  # evaluate() goes through the CSR matrices
    for members in (range(0, 4), range(1, 3)):
        got = lot.members_forward(stack, members, test.x[:500], sparse)
        want = lot.members_forward(stack, members, test.x[:500])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_every_member_switches_to_sparse_steps_in_the_same_round_so_stacking_changes_no_numbers(tmp_path):
    # Trial 0 alone and beside trial 1 (whose masks differ): the same bytes, sparse rounds included.
    assert lot.main([*SPARSE_RUN, "--out", str(tmp_path / "one")]) == 0
    assert lot.main([*SPARSE_RUN, "--trials", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = (pd.read_csv(tmp_path / d / "results.csv", dtype=str) for d in ("one", "two"))
    two = two[two.trial == "0"].reset_index(drop=True)
    assert len(one) == 20 and one.equals(two)


def one_member_masks(fc1: float, rest: float, seed: int = 0) -> list:
    """One member's random masks: fc1 at one density, fc2 and fc3 at another."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(1, o, i, generator=gen) < (fc1 if n == 0 else rest) for n, (o, i) in enumerate(lot.SHAPES)]


def sparse_steps_for(stacked: list) -> lot.SparseFC1 | None:
    stack = lot.LeNetStack(len(stacked[0]), 1, torch.device("cpu"))
    opt = lot.MaskedSGD(stack, [m.float() for m in stacked], lr=0.01, momentum=0.9)
    return lot.sparse_fc1(stack, opt, stacked, True)


def test_the_sparse_steps_begin_at_the_rounds_pruning_level_whatever_else_is_stacked():
    a, b = one_member_masks(0.15, 0.5), one_member_masks(0.21, 0.02, seed=1)  # both ~19% left; b's fc1 over 20%
    assert lot.pruning_level(a) < lot.SPARSE_BELOW and lot.pruning_level(b) < lot.SPARSE_BELOW
    assert sparse_steps_for(a) is not None
    assert sparse_steps_for([torch.cat(pair) for pair in zip(a, b)]) is not None  # a per-member rule: dense
    level_over = one_member_masks(0.15, 0.9)  # fc1 under 20%, the level over it
    assert lot.pruning_level(level_over) > lot.SPARSE_BELOW and sparse_steps_for(level_over) is None


@needs_mkl
def test_a_paused_sparse_round_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    assert lot.main([*SPARSE_RUN, "--out", str(tmp_path / "whole")]) == 0
    calls = {"n": 0}

    def stop_in_round_8(self):  # the 8th step of round 8's second epoch
        calls["n"] += 1
        if calls["n"] == 8 * 20 + 18:
            self.signum = signal.SIGINT
        return self.signum is not None

    monkeypatch.setattr(lot.StopSignal, "__call__", stop_in_round_8)
    out = tmp_path / "paused"
    assert lot.main([*SPARSE_RUN, "--out", str(out)]) == 130
    saved = lot.load_checkpoint(out)[0]
    assert (saved.round, saved.epoch, saved.step) == (8, 2, 8)
    monkeypatch.undo()
    assert lot.main([*SPARSE_RUN, "--out", str(out), "--resume"]) == 0
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@needs_mkl
def test_the_whole_run_benchmark_reports_every_round_against_the_floor_of_the_same_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/run_vs_floor.py", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(
        [*cmd, "--", "--train-subset", "600", "--rounds", "2", *SMALL], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    work = 10 * 2 * 60 * STEP_FLOP_PER_SAMPLE / 1e9  # a round: 10 steps of two members
    mean_rate = sum(figures["matmul_2048_gflops"]) / 2  # the median of two measurements
    assert figures["floor_round_s"] == pytest.approx(work / mean_rate, rel=1e-3)
    assert figures["floor_s"] == pytest.approx(3 * figures["floor_round_s"], rel=1e-3)
    for way in ("dense", "sparse"):
        rounds, ratios = figures[f"{way}_round_s"], figures[f"{way}_round_over_floor"]
        assert len(rounds) == len(ratios) == 3
        # ratios are rounded to 0.01, floor_round_s (about 0.7 ms here) to 1 us: 0.1% of a ratio
        assert ratios == pytest.approx([t / figures["floor_round_s"] for t in rounds], rel=2e-3, abs=0.006)
        assert figures[f"{way}_over_floor"] == pytest.approx(
            figures[f"{way}_wall_s"][0] / figures["floor_s"], rel=0.005
        )
    assert f"{figures['dense_over_floor']:.2f}x" in proc.stdout


@needs_mkl
def test_resuming_a_dense_run_on_the_sparse_engine_says_the_numbers_may_move(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lot.StopSignal, "__call__", lambda self: True)  # pause after the first step
    out = tmp_path / "run"
    assert lot.main([*SPARSE_RUN, "--no-sparse", "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert lot.main([*SPARSE_RUN, "--out", str(out), "--resume"]) == 0
    assert "resuming with --sparse a run begun without it" in capsys.readouterr().err


def test_without_mkl_the_default_is_the_dense_engine_and_sparse_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setattr(lot.SparseFC1, "__init__", lambda *a: pytest.fail("a CSR engine was built"))
    assert lot.main([*SPARSE_RUN, "--out", str(tmp_path / "auto")]) == 0
    assert engine_of(tmp_path / "auto") == ("dense", [])
    line = refused([*SPARSE_RUN, "--sparse", "--out", str(tmp_path / "asked")], capsys, tmp_path / "asked")
    assert "--sparse needs PyTorch built with MKL" in line
