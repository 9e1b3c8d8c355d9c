"""What makes a ticket (Zhou et al., NeurIPS 2019): the sign-keeping controls start where their rules
say, untrained_acc is an evaluation of each member's starting weights on its mask, and the new flags
work with resuming and refuse what they cannot honour."""

import math

import pandas as pd
import pytest
import torch
from conftest import SMALL, TINY, lot, pause_at_epoch, refused
from test_training import half_masks

RUN = [*TINY, *SMALL, "--controls", "reinit,signs,constant", "--criterion", "same-sign"]


@pytest.mark.parametrize("init", ["kaiming-uniform", "xavier-normal"])
def test_the_signs_control_draws_fresh_magnitudes_and_keeps_w0s_signs_on_the_tickets_mask(init):
    w0 = lot.default_init(torch.Generator().manual_seed(0), init)
    masks = [m[0] for m in half_masks(1)]
    signs = lot.member_start("signs", masks, w0, torch.Generator().manual_seed(7), init)
    fresh = lot.default_init(torch.Generator().manual_seed(7), init)  # the same stream, drawn by hand
    for s, f, w, m in zip(signs, fresh, w0, masks):
        assert torch.equal(s, f.abs() * w.sign() * m)
        assert torch.equal(s[m].sign(), w[m].sign()) and (s[~m] == 0).all()
        assert not torch.equal(s[m].abs(), w[m].abs())  # magnitudes are not W0's
    for s, f in zip(signs[3:], fresh[3:]):
        assert torch.equal(s, f)  # biases drawn as the reinit control's


@pytest.mark.parametrize("init", ["kaiming-uniform", "xavier-normal"])
def test_the_signed_constant_is_w0s_sign_times_the_inits_sd_in_each_layer(init):
    w0 = lot.default_init(torch.Generator().manual_seed(0), init)
    masks = [m[0] for m in half_masks(1)]
    constant = lot.member_start("constant", masks, w0, torch.Generator(), init)
    for c, w, m in zip(constant, w0, masks):
        sd = lot.init_std(init, *w.shape)
        assert sd == pytest.approx(w.std().item(), rel=5 / math.sqrt(2 * w.numel()))  # measured, within 5 sigma
        assert torch.equal(c[m], w[m].sign() * sd) and (c[~m] == 0).all()
    for c, b in zip(constant[3:], w0[3:]):
        assert torch.equal(c, b)  # biases as the ticket's


def test_init_std_is_the_closed_form_of_each_init():
    assert lot.init_std("kaiming-uniform", 300, 784) == pytest.approx(1 / math.sqrt(3 * 784))
    assert lot.init_std("xavier-normal", 300, 784) == pytest.approx(math.sqrt(2 / 1084))


@pytest.fixture(scope="module")
def zhou_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zhou") / "out"
    assert lot.main([*RUN, "--out", str(out)]) == 0
    return out


def test_untrained_acc_is_the_test_accuracy_of_w0_on_the_mask_evaluated_by_hand(zhou_run, small_mnist):
    rows, test = pd.read_csv(zhou_run / "results.csv"), small_mnist[1]
    w0, masks = torch.load(zhou_run / "tickets.pt", weights_only=True), lot.load_masks(zhou_run)

    def recorded(rnd, variant):
        return rows[(rows["round"] == rnd) & (rows.variant == variant)].untrained_acc.item()

    for rnd in (0, 2):
        with torch.no_grad():
            ticket = lot.load_ticket(zhou_run, round=rnd)(test.x)  # W0 x mask, by hand
            constant = lot.member_start(
                "constant",
                [masks[n][0, rnd] for n in lot.LAYERS],
                [w0[p][0] for p in lot.PARAMS],
                None,
                lot.Config.init,
            )
            constant = lot.lenet_forward(test.x[None], [w[None] for w in constant[:3]], [b[None] for b in constant[3:]])
        for variant, logits in (("ticket", ticket), ("constant", constant[2][0])):
            by_hand = 100.0 * (logits.argmax(1) == test.y).float().mean().item()
            assert recorded(rnd, variant) == pytest.approx(by_hand, abs=0.11), (rnd, variant)  # an image of 1,000


def test_a_run_with_the_new_controls_writes_their_rows_figures_and_paired_table(zhou_run):
    rows = pd.read_csv(zhou_run / "results.csv")
    assert list(rows.variant.unique()) == ["ticket", "control", "signs", "constant"]
    assert rows.untrained_acc.between(0, 100).all()
    assert (rows.groupby(["trial", "round"]).weights.nunique() == 1).all()  # all on the ticket's mask
    for png in ("signs.png", "supermask.png"):
        assert (zhou_run / png).read_bytes()[:4] == b"\x89PNG"
    table = (zhou_run / "signs.md").read_text()
    assert "| Signs - Ticket | Signs - Control | Signed constant - Ticket | Signed constant - Control |" in table
    assert "Test accuracy (%) before training" in table


def test_with_a_validation_split_the_supermask_level_is_picked_on_validation_images(tmp_path, small_mnist):
    out = tmp_path / "val"
    assert (
        lot.main(
            [*TINY, *SMALL, "--controls", "reinit,constant", "--val-size", "100", "--trials", "2", "--out", str(out)]
        )
        == 0
    )
    rows = pd.read_csv(out / "results.csv")
    _, val_index = lot.validation_split(0, 2, 600, 100)
    for trial in (0, 1):
        images, labels = small_mnist[0].x[val_index[trial]], small_mnist[0].y[val_index[trial]]
        with torch.no_grad():
            by_hand = lot.load_ticket(out, round=1, trial=trial)(images).argmax(1) == labels
        row = rows[(rows["round"] == 1) & (rows.variant == "ticket") & (rows.trial == trial)]
        assert row.untrained_val_acc.item() == pytest.approx(100.0 * by_hand.float().mean().item(), abs=0.011)
    table = (out / "signs.md").read_text()
    assert "picked by the validation images' accuracy before training" in table and "optimistic" not in table


def test_a_level_picked_on_the_test_set_says_it_is_optimistic_and_accuracy_intervals_stay_in_0_to_100(zhou_run):
    assert (
        "picked by this same test accuracy: the best of every round, an optimistic figure"
        in (zhou_run / "signs.md").read_text()
    )
    assert lot.interval_cell([99.9, 99.5, 92.0], ".2f", lot.ACCURACY).endswith(", 100.00]")
    assert lot.interval_cell([0.1, 0.5, 8.0], ".2f", lot.ACCURACY).startswith("2.87 [0.00, ")
    assert not lot.interval_cell([99.9, 99.5, 92.0], ".2f").endswith(", 100.00]")  # unclipped, it runs past


def test_the_controls_on_the_tickets_mask_store_no_masks_of_their_own(zhou_run):
    assert set(lot.load_masks(zhou_run)) == {"fc1", "fc2", "fc3"}
    for variant in ("control", "signs", "constant"):
        with pytest.raises(ValueError, match="no masks of variant"):
            lot.load_ticket(zhou_run, round=1, variant=variant)


@pytest.mark.parametrize("variant", ["ticket", "late_rewind"])
def test_the_criterion_compares_the_trained_weights_with_the_weights_they_rewind_to(variant):
    # Handed the trained weights twice, same-sign would see no flipped weight and prune by magnitude.
    cfg = lot.parse_config(["--criterion", "same-sign", "--rewind-to", "1it"])
    plan = lot.make_plan(cfg, n_train=600)
    state = lot.fresh_state(cfg)
    state.rewind_point = [w * 0.5 for w in state.w0]  # the late-rewound ticket's start: W0's signs too
    start = state.w0 if variant == "ticket" else state.rewind_point
    big = [w.abs() > w.abs().flatten().quantile(0.7) for w in start[:3]]  # trained: the largest 30% flipped
    trained = [torch.where(b, -w, w)[0] * 1.1 for b, w in zip(big, start[:3])]
    stack = lot.LeNetStack(len(plan.names), len(plan.names), torch.device("cpu"))
    stack.load(lot.stack_members([trained + [b[0] for b in start[3:]]] * len(plan.names), torch.device("cpu")))
    state.round = 1
    lot.begin_round(plan, state, stack, lot.generators(state.control_rng))
    kept = [p[0] > 1 for p in state.pruned_at[variant]]
    full = [torch.ones_like(m) for m in kept]
    expected = lot.prune(cfg, trained, [w[0] for w in start[:3]], full)
    assert all(torch.equal(k, e) for k, e in zip(kept, expected))
    assert all((b[0] | k).all() for k, b in zip(kept, big))  # only flipped weights went (20% of 30% flipped)
    by_magnitude = lot.prune(cfg, trained, trained, full)  # what the same criterion sees given no W0
    assert not any(torch.equal(k, m) for k, m in zip(kept, by_magnitude))


def test_a_default_run_has_no_untrained_column(tmp_path):
    assert not lot.records_untrained(lot.parse_config([]))
    assert lot.records_untrained(lot.parse_config(["--controls", "reinit,constant"]))
    assert lot.records_untrained(lot.parse_config(["--criterion", "increase"]))


def test_a_run_with_the_new_flags_paused_inside_round_1_resumes_to_the_same_bytes(zhou_run, tmp_path, monkeypatch):
    # Calls: round 0 epochs 1, 2, round 1 epochs 1, 2: the 4th pauses round 1 after its untrained evaluation.
    out, real = tmp_path / "paused", pause_at_epoch(monkeypatch, 4)
    assert lot.main([*RUN, "--out", str(out)]) == 130
    monkeypatch.setattr(lot, "train_epoch", real)
    assert lot.main([*RUN, "--out", str(out), "--resume"]) == 0
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (out / name).read_bytes() == (zhou_run / name).read_bytes(), name


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--criterion", "bogus"], "--criterion must be one of magnitude, same-sign, increase"),
        (["--controls", "signs,signs"], "--controls must be a comma list"),
        (["--controls", "sign"], "--controls must be a comma list"),
    ],
)
def test_bad_new_flags_are_one_line_and_nothing_written(flags, message, tmp_path, capsys):
    assert message in refused([*flags, "--out", str(tmp_path / "o")], capsys, tmp_path / "o")
