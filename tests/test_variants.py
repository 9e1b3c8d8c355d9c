"""The paper's other experiments, as flags: each variant keeps its defining invariant."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL, TINY, lot, pause_at_epoch, refused
from test_model import random_stack
from torch import nn

CPU = torch.device("cpu")


def cfg_of(*flags):
    return lot.parse_config(list(flags))


def trained_weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, i, generator=g) for o, i in lot.SHAPES]


def full():
    return [torch.ones(o, i, dtype=torch.bool) for o, i in lot.SHAPES]


# --- pruning variants -------------------------------------------------------------------------


def test_layerwise_pruning_removes_exactly_each_layers_rate_round_after_round():
    rates = (0.2, 0.2, 0.1)
    masks = full()
    for r in range(1, 8):
        weights = [w * m for w, m in zip(trained_weights(r), masks)]
        new = lot.layerwise_prune([w.abs() for w in weights], masks, rates)
        for n, m, rate in zip(new, masks, rates):
            assert int(n.sum()) == lot.surviving_schedule(m.numel(), rate, r)[-1]
            assert not (n & ~m).any()
        masks = new


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_oneshot_masks_keep_exactly_the_iterative_count_of_each_level(scope):
    flags = ["--scope", scope] + (["--layer-rates", "0.2,0.2,0.1"] if scope == "layer" else [])
    cfg = cfg_of(*flags)
    dense = trained_weights(0)
    previous = full()
    for r in range(1, 12):
        masks = lot.oneshot_masks(cfg, dense, trained_weights(1), r)
        if scope == "global":
            assert sum(int(m.sum()) for m in masks) == lot.surviving_schedule(lot.PRUNABLE, 0.2, r)[-1]
        else:
            for m, rate in zip(masks, (0.2, 0.2, 0.1)):
                assert int(m.sum()) == lot.surviving_schedule(m.numel(), rate, r)[-1]
        kept = torch.cat([w[m].abs() for w, m in zip(dense, masks)]) if scope == "global" else dense[0][masks[0]].abs()
        dropped = (
            torch.cat([w[~m].abs() for w, m in zip(dense, masks)]) if scope == "global" else dense[0][~masks[0]].abs()
        )
        assert kept.min() >= dropped.max()  # one cut through the dense magnitudes
        assert all(not (m & ~p).any() for m, p in zip(masks, previous))  # levels nest
        previous = masks


def test_random_control_has_the_tickets_per_layer_counts_but_not_its_mask():
    cfg = cfg_of("--controls", "reinit,random", "--trials", "2")
    state = lot.fresh_state(cfg)
    for t in range(2):  # prune the ticket twice, as two rounds would
        for r in (1, 2):
            alive = lot.member_masks(cfg, state, t, "ticket", r - 1)
            kept = lot.global_prune([(w * a).abs() for w, a in zip(trained_weights(10 * t + r), alive)], alive, 0.2)
            for p, a, k in zip(state.pruned_at["ticket"], alive, kept):
                p[t][a & ~k] = r
    for t in range(2):
        ticket = lot.member_masks(cfg, state, t, "ticket", 2)
        control = lot.member_masks(cfg, state, t, "control", 2)
        random = lot.member_masks(cfg, state, t, "random", 2)
        again = lot.member_masks(cfg, state, t, "random", 2)
        assert all(torch.equal(a, b) for a, b in zip(ticket, control))
        assert [int(m.sum()) for m in random] == [int(m.sum()) for m in ticket]
        assert not torch.equal(random[0], ticket[0])
        assert all(torch.equal(a, b) for a, b in zip(random, again))  # redrawn identically from its seed
    assert not torch.equal(
        lot.member_masks(cfg, state, 0, "random", 2)[0], lot.member_masks(cfg, state, 1, "random", 2)[0]
    )


# --- late rewinding ---------------------------------------------------------------------------


def test_late_rewind_point_is_the_weights_after_k_iterations_and_the_ticket_restarts_there(mnist):
    train, test = mnist
    train = lot.Split(train.x[:600], train.y[:600])
    cfg = cfg_of("--rounds", "0", "--epochs", "1", "--rewind-to", "4it", "--trials", "2")
    state = lot.run_experiment(
        lot.make_plan(cfg, len(train.y) - cfg.val_size), train, test, lot.fresh_state(cfg), progress=False
    )

    # the same 4 steps by hand, on one trial's ticket alone
    net = lot.LeNetStack(1, 1, CPU)
    net.load([w[1:2] for w in state.w0])
    opt = lot.MaskedSGD(net, [torch.ones_like(w) for w in net.weights], 0.01, 0.9)
    order = lot.epoch_order(600, [lot.make_generator(0, 1, "data")], CPU)
    lot.train_epoch(net, opt, train, order, 60, range(4))
    for saved, mine in zip(state.rewind_point, net.parameters()):
        torch.testing.assert_close(saved[1], mine.detach()[0], rtol=1e-5, atol=1e-7)

    # round 1 starts the late-rewound ticket at those weights times its own mask
    cfg1 = cfg_of("--rounds", "1", "--epochs", "1", "--rewind-to", "4it", "--trials", "2")
    stack = lot.LeNetStack(2 * 3, 3, CPU)
    stack.load(state.params)
    lot.begin_round(lot.make_plan(cfg1, len(train.y)), state, stack, lot.generators(state.control_rng))
    names = lot.variants(cfg1)
    for t in range(2):
        late = lot.member_masks(cfg1, state, t, "late_rewind", 1)
        ticket = lot.member_masks(cfg1, state, t, "ticket", 1)
        m_late, m_ticket = t * 3 + names.index("late_rewind"), t * 3 + names.index("ticket")
        for w, saved, w0, ml, mt in zip(stack.weights, state.rewind_point, state.w0, late, ticket):
            assert torch.equal(w[m_late].detach(), saved[t] * ml)
            assert torch.equal(w[m_ticket].detach(), w0[t] * mt)
        for b, saved in zip(stack.biases, state.rewind_point[3:]):
            assert torch.equal(b[m_late].detach(), saved[t])


# --- optimiser, init, presets -----------------------------------------------------------------


def test_masked_adam_with_full_masks_reproduces_torch_optim_adam():
    net = random_stack(1, 2)
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ours = lot.MaskedAdam(net, [torch.ones_like(w) for w in net.weights], lr=1.2e-3)
    theirs = torch.optim.Adam(ref, lr=1.2e-3, foreach=True)
    torch.manual_seed(2)
    for _ in range(6):
        net.backprop(torch.randn(1, 60, 784), torch.randint(0, 10, (1, 60)))
        for r, p in zip(ref, net.parameters()):
            r.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for r, p in zip(ref, net.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-7)


def test_masked_adam_keeps_pruned_weights_exactly_zero():
    net = random_stack(1, 2)
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(w.shape, generator=g) > 0.5 for w in net.weights]
    with torch.no_grad():
        for w, m in zip(net.weights, masks):
            w.mul_(m)
    opt = lot.MaskedAdam(net, [m.float() for m in masks], lr=1e-2)
    for _ in range(5):
        net.backprop(torch.randn(1, 60, 784), torch.randint(0, 10, (1, 60)))
        opt.step()
    for w, m, m1, m2 in zip(net.weights, masks, opt.bufs, opt.squares):
        assert (w[~m] == 0).all() and (m1[~m] == 0).all() and (m2[~m] == 0).all()


def test_xavier_normal_init_is_glorots_with_zero_biases():
    ours = lot.default_init(torch.Generator().manual_seed(4), "xavier-normal")
    g = torch.Generator().manual_seed(4)
    for w, (out, inp) in zip(ours[:3], lot.SHAPES):
        assert torch.equal(w, nn.init.xavier_normal_(torch.empty(out, inp), generator=g))
        assert abs(w.std().item() - math.sqrt(2 / (out + inp))) < 0.1 * math.sqrt(2 / (out + inp))
    assert all((b == 0).all() for b in ours[3:])


def test_presets_resolve_to_the_documented_settings_and_explicit_flags_win():
    assert cfg_of() == lot.Config()
    proto = cfg_of("--preset", "prototype")
    assert (
        proto.scope,
        proto.layer_rates,
        proto.optimizer,
        proto.lr,
        proto.batch_size,
        proto.epochs,
        proto.rounds,
    ) == ("layer", "0.2", "adam", 1.2e-3, 64, 5, 10)
    paper = cfg_of("--preset", "paper")
    assert (
        paper.scope,
        paper.layer_rates,
        paper.optimizer,
        paper.lr,
        paper.batch_size,
        paper.iterations,
        paper.init,
        paper.val_size,
        paper.eval_every,
    ) == ("layer", "0.2,0.2,0.1", "adam", 1.2e-3, 60, 50_000, "xavier-normal", 5000, 100)
    assert lot.layer_rates(paper) == (0.2, 0.2, 0.1)
    mine = cfg_of("--preset", "paper", "--lr", "0.005", "--iterations", "100")
    assert (mine.lr, mine.iterations, mine.optimizer) == (0.005, 100, "adam")
    assert mine.momentum == 0.9 and lot.layer_rates(cfg_of("--preset", "prototype")) == (0.2, 0.2, 0.2)


# --- end to end -------------------------------------------------------------------------------


def test_every_variant_flag_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "all"
    flags = [*TINY, *SMALL, "--controls", "reinit,random", "--oneshot", "--rewind-to", "5it", "--trials", "2"]
    trained_on, real = [], lot.train_on_masks  # each round's stacked masks, as the optimiser got them
    monkeypatch.setattr(lot, "train_on_masks", lambda opt, masks: trained_on.append(masks) or real(opt, masks))
    assert lot.main([*flags, "--out", str(out)]) == 0
    names, saved = lot.variants(cfg_of(*flags)), lot.load_masks(out)  # masks.pt decoded
    for rnd, stacked in enumerate(trained_on):
        for m in range(len(stacked[0])):
            trial, variant = divmod(m, len(names))
            key = "" if names[variant] in ("ticket", "control") else f"{names[variant]}."
            for layer, mask in zip(lot.LAYERS, stacked):
                assert torch.equal(saved[f"{key}{layer}"][trial, rnd], mask[m]), (rnd, m, layer)
    assert (out / "masks.pt").stat().st_size < 2 * 1.6e6  # nested masks a byte a weight, random ones a bit
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.variant.unique()) == ["ticket", "control", "random", "oneshot", "late_rewind"]
    assert (rows.groupby(["trial", "round"]).weights.nunique() == 1).all()  # every variant at the level
    for png in ("graph_improved.png", "random_control.png", "oneshot.png", "rewind.png", "layers.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    masks = lot.load_masks(out)
    assert {"fc1", "random.fc1", "oneshot.fc1", "late_rewind.fc1"} <= set(masks)
    counts = lambda key, t, r: [int(masks[f"{key}{n}"][t, r].sum()) for n in ("fc1", "fc2", "fc3")]
    assert counts("random.", 1, 2) == counts("", 1, 2)
    header = (out / "summary.md").read_text().splitlines()[0]
    assert header == "| Round | Weights Remaining | Ticket | Control | Delta | Random mask | One-shot | Late rewind |"


def test_paper_preset_end_to_end_with_layer_rates_adam_iterations_and_early_stopping(tmp_path):
    out = tmp_path / "paper"
    flags = ["--preset", "paper", "--train-subset", "600", "--val-size", "100", "--eval-every", "5", *SMALL]
    assert lot.main([*flags, "--iterations", "25", "--rounds", "2", "--reinit-draws", "2", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "results.csv")
    last = rows[(rows["round"] == 2) & (rows.variant == "ticket")].iloc[0]
    assert (last.fc1_pct, last.fc2_pct, last.fc3_pct) == (64.0, 64.0, 81.0)  # 0.8^2, 0.8^2, 0.9^2
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(curves.epoch.unique()) == [1, 2, 3]  # 25 iterations of 9 per epoch: 9 + 9 + 7
    assert rows.early_stop_iter.isin([5, 10, 15, 20, 25]).all()
    for png in ("early_stop.png", "test_acc_over_iterations.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_several_reinit_draws_are_fresh_inits_of_one_mask_and_the_summary_averages_them(tmp_path):
    out = tmp_path / "draws"
    assert lot.main([*TINY, *SMALL, "--trials", "2", "--reinit-draws", "3", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "results.csv")
    controls = rows[rows.variant == "control"]
    assert sorted(controls.draw.unique()) == [0, 1, 2] and len(controls) == 2 * 3 * 3
    assert (rows[rows.variant == "ticket"].draw == 0).all()
    assert controls.groupby(["trial", "round"]).test_acc.nunique().min() > 1  # three different inits
    assert (rows.groupby(["trial", "round"]).weights.nunique() == 1).all()  # on the ticket's mask
    table = lot.summary_frame(rows)[0].set_index("round")
    expected = controls.groupby(["round", "trial"]).test_acc.mean().groupby("round").mean()
    assert np.allclose(table.control_mean, expected)
    assert "the mean of 3 reinit draws within each trial" in (out / "summary.md").read_text()


def test_the_paper_figures_levels_map_to_the_rounds_of_its_layerwise_schedule():
    # fc1 and fc2 lose 20% a round, fc3 10%: 51.3% is round 3, 21.1% round 7, ... 1.9% round 18.
    fc = [(0.8, 235_200), (0.8, 30_000), (0.9, 1_000)]
    pct = [100 * sum(n * r**k for r, n in fc) / lot.PRUNABLE for k in range(21)]
    rows = pd.DataFrame({"round": range(21), "variant": "ticket", "weights_pct": pct})
    assert lot.nearest_rounds(rows) == [0, 3, 7, 12, 15, 18]


def test_a_run_with_every_variant_paused_anywhere_resumes_byte_identical(tmp_path, monkeypatch):
    flags = [*TINY, *SMALL, "--controls", "reinit,random", "--oneshot", "--rewind-to", "13it", "--batch-size", "30"]
    assert lot.main([*flags, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "paused"
    real = lot.train_epoch
    # Each run pauses after the first step of its n-th train_epoch call: round 0 before the rewind
    # point (13 of 20 steps); then (13.., ..20, epoch 2) round 0 epoch 2; then (rest, r1e1, r1e2,
    # r2e1) round 2, by when the one-shot and late-rewind tickets have their own masks.
    for pause_at in (1, 3, 4):
        pause_at_epoch(monkeypatch, pause_at)
        assert lot.main([*flags, "--out", str(out), *(["--resume"] if pause_at > 1 else [])]) == 130
        monkeypatch.setattr(lot, "train_epoch", real)
    assert lot.main([*flags, "--out", str(out), "--resume"]) == 0
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


BAD = {
    "rewind unit": ["--rewind-to", "5xx"],
    "rewind past the round": ["--rewind-to", "3ep"],
    "unknown preset": ["--preset", "fancy"],
    "layer rates length": ["--scope", "layer", "--layer-rates", "0.2,0.1"],
    "layer rate 1": ["--scope", "layer", "--layer-rates", "0.2,1.0,0.1"],
    "layer rates words": ["--scope", "layer", "--layer-rates", "a,b,c"],
    "layer rates with global": ["--layer-rates", "0.1"],
    "unknown optimizer": ["--optimizer", "rmsprop"],
    "unknown scope": ["--scope", "neuron"],
    "unknown control": ["--controls", "reinit,shuffle"],
    "unknown init": ["--init", "orthogonal"],
    "zero iterations": ["--iterations", "0"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_variant_settings_get_one_line_and_exit_2(case, tmp_path, capsys):
    out = tmp_path / "out"
    refused([*TINY, *BAD[case], "--out", str(out)], capsys, out)
