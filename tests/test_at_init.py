"""Pruning at initialisation (SNIP, GraSP, SynFlow) and Frankle et al. (2021)'s ablations of it: each
score equals a computation by hand on a tiny network, the masks keep the ticket's counts, shuffles
keep each layer's count and move its weights, and the new controls resume and shard over torchrun
to the same bytes."""

import pandas as pd
import pytest
import torch
from conftest import SMALL, lot, pause_at_epoch, refused
from test_torchrun import ENV, torchrun

# One run shared by the tests that read outputs, the resumed run and the torchrun job: 2 trials of 6
# members, 2 rounds; on one thread, as torchrun's processes run (the same bits).
RUN = ["--train-subset", "600", "--rounds", "1", "--epochs", "1", "--trials", "2", "--val-size", "100", *SMALL]
RUN += ["--controls", "snip,grasp,synflow,synflow-shuffled,grasp-reinit"]


def tiny_net(seed: int = 0, dims=(6, 5, 4)):
    """A two-layer ReLU network's [w1, w2] and [b1, b2] in float64, and 8 images with labels."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64) for i, o in zip(dims[:-1], dims[1:])]
    biases = [torch.randn(o, generator=g, dtype=torch.float64) * 0.1 for o in dims[1:]]
    x = torch.randn(8, dims[0], generator=g, dtype=torch.float64)
    return weights, biases, x, torch.arange(8) % dims[-1]


def gradient_by_hand(weights, biases, x, y, temperature=1.0):
    """dL/dW1, dL/dW2 of the mean cross-entropy of logits / temperature, backpropagated by hand."""
    (w1, w2), (b1, b2) = weights, biases
    pre = x @ w1.T + b1
    h = pre.clamp(min=0)
    p = torch.softmax((h @ w2.T + b2) / temperature, 1)
    d = (p - torch.nn.functional.one_hot(y, p.shape[1])) / (len(y) * temperature)
    return [((d @ w2) * (pre > 0)).T @ x, d.T @ h]


def test_snip_scores_the_gradient_times_the_weight_in_absolute_value():
    weights, biases, x, y = tiny_net()
    by_hand = [(g * w).abs() for g, w in zip(gradient_by_hand(weights, biases, x, y), weights)]
    for s, h in zip(lot.snip_scores(weights, biases, x, y), by_hand):
        torch.testing.assert_close(s, h, rtol=1e-10, atol=1e-14)


def test_grasp_scores_minus_w_times_the_hessian_vector_product_of_finite_differences():
    weights, biases, x, y = tiny_net(1)
    temperature = 3.0  # Hg shrinks as 1 / T^3: a small T keeps the finite differences well above rounding
    g = gradient_by_hand(weights, biases, x, y, temperature)
    eps = 1e-6  # central differences of the hand-made gradient along g: (g(w + eps g) - g(w - eps g)) / 2 eps
    plus = gradient_by_hand([w + eps * d for w, d in zip(weights, g)], biases, x, y, temperature)
    minus = gradient_by_hand([w - eps * d for w, d in zip(weights, g)], biases, x, y, temperature)
    by_hand = [-w * (p - m) / (2 * eps) for w, p, m in zip(weights, plus, minus)]
    scores = lot.grasp_scores(weights, biases, x, y, temperature)
    for s, h in zip(scores, by_hand):
        assert h.abs().max() > 1e-4  # not vacuous
        torch.testing.assert_close(s, h, rtol=1e-6, atol=1e-9)


def test_grasp_uses_the_authors_temperature():
    weights, biases, x, y = tiny_net(2)
    assert lot.GRASP_TEMPERATURE == 200
    default, explicit = lot.grasp_scores(weights, biases, x, y), lot.grasp_scores(weights, biases, x, y, 200.0)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert not torch.allclose(default[0], lot.grasp_scores(weights, biases, x, y, 1.0)[0])


def test_grasp_removes_its_highest_scores_and_snip_keeps_its_highest():
    params = lot.default_init(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 784, generator=g), torch.arange(30) % 10
    kept = 26_620  # 10%, ranked across the layers
    for method in ("snip", "grasp"):
        scores = (lot.snip_scores if method == "snip" else lot.grasp_scores)(params[:3], params[3:], x, y)
        flat = torch.cat([s.flatten() for s in scores])
        keep = torch.cat([(r < kept).flatten() for r in lot.score_ranks(method, params, x, y, per_layer=False)])
        assert int(keep.sum()) == kept
        if method == "snip":
            assert flat[keep].min() >= flat[~keep].max()
        else:  # removing the highest -w * Hg, as the authors' code does; the lowest would be the known sign bug
            assert flat[keep].max() <= flat[~keep].min()
            assert flat[keep].mean() < 0 < flat[~keep].mean()


def test_snip_and_grasp_masks_of_lower_counts_nest_and_keep_per_layer_counts_under_layer_scope():
    params = lot.default_init(torch.Generator().manual_seed(0))
    x, y = torch.randn(20, 784, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 10
    ranks = lot.score_ranks("grasp", params, x, y, per_layer=True)
    counts = [(23_520, 3_000, 500), (4_000, 700, 450)]
    masks = [[r < k for r, k in zip(ranks, c)] for c in counts]
    assert [[int(m.sum()) for m in ms] for ms in masks] == [list(c) for c in counts]
    assert all(bool((low <= high).all()) for low, high in zip(masks[1], masks[0]))  # nested


def test_synflow_scores_a_two_layer_linear_net_with_biases_as_its_closed_form():
    weights, biases, _, _ = tiny_net(3)  # negative weights and biases: SynFlow takes absolute values of all
    a1, a2, c1 = weights[0].abs(), weights[1].abs(), biases[0].abs()
    # R = 1' (|W2| (|W1| 1 + |b1|) + |b2|): dR/dW2[i, j] = h[j], h = |W1| 1 + |b1|; dR/dW1[i, j] = (1' |W2|)[i]
    h = a1.sum(1) + c1
    by_hand = [a1 * a2.sum(0).unsqueeze(1), a2 * h.unsqueeze(0)]
    for s, b in zip(lot.synflow_scores(weights, biases), by_hand):
        torch.testing.assert_close(s, b, rtol=1e-12, atol=0)
    pruned = [weights[0].clone(), weights[1]]
    pruned[0][2] = 0  # a pruned row: its weights score 0, the next layer's column j = 2 loses a1's part
    s = lot.synflow_scores(pruned, biases)
    assert (s[0][2] == 0).all()
    torch.testing.assert_close(s[1][:, 2], a2[:, 2] * c1[2], rtol=1e-12, atol=0)


def test_synflow_prunes_in_steps_down_an_exponential_schedule_to_the_exact_count(monkeypatch):
    assert [lot.exponential_count(1000, 10, s, 4) for s in (1, 2, 3, 4)] == [316, 100, 32, 10]
    params = lot.default_init(torch.Generator().manual_seed(0))
    seen, real = [], lot.drop_lowest

    def counting(scores, masks, k):
        seen.append(sum(int(m.sum()) for m in masks) - k)
        return real(scores, masks, k)

    monkeypatch.setattr(lot, "drop_lowest", counting)
    masks = lot.synflow_masks(params, (2000, 500, 300), per_layer=False, steps=5)
    assert seen == [lot.exponential_count(lot.PRUNABLE, 2800, s, 5) for s in range(1, 6)]
    assert sum(int(m.sum()) for m in masks) == 2800 and all(m.any() for m in masks)
    seen.clear()
    masks = lot.synflow_masks(params, (2000, 500, 300), per_layer=True, steps=3)
    assert [int(m.sum()) for m in masks] == [2000, 500, 300] and len(seen) == 9


def test_drop_lowest_drops_exactly_the_weights_prune_smallest_drops_ties_included():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = [torch.randint(0, 4, s, generator=g).double() for s in ((5, 7), (3, 5))]  # many ties
        masks = [torch.rand(s, generator=g) > 0.3 for s in ((5, 7), (3, 5))]
        k = int(torch.randint(0, sum(int(m.sum()) for m in masks) + 1, (1,), generator=g))
        expected = lot.prune_smallest(scores, masks, k)
        assert all(torch.equal(a, b) for a, b in zip(lot.drop_lowest(scores, masks, k), expected))


def test_the_scoring_images_are_the_first_ten_of_each_class_of_the_training_part(mnist):
    train, (index, held_out) = mnist[0], lot.validation_split(0, 1, 1000, 300)  # --val-size 300 of 1000 images
    x, y = lot.score_images(train, index[0])
    assert x.shape == (100, 784) and torch.equal(y, torch.arange(10).repeat_interleave(10))
    skipped = 0
    for c in range(10):
        first = [int(i) for i in index[0] if train.y[i] == c][:10]
        assert torch.equal(x[10 * c : 10 * c + 10], train.x[first])
        assert not set(first) & set(held_out[0].tolist())  # never a validation image
        skipped += first != [int(i) for i in range(1000) if train.y[i] == c][:10]
    assert skipped  # the validation images among the first of a class were passed over


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def at_init_run(tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("at_init") / "out", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert lot.main([*RUN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_method_keeps_the_tickets_count_and_a_shuffle_its_methods_per_layer_counts(at_init_run):
    rows = pd.read_csv(at_init_run / "results.csv")
    variants = ["ticket", "snip", "grasp", "synflow", "synflow-shuffled", "grasp-reinit"]
    assert list(rows.variant.unique()) == variants
    assert (rows.groupby(["trial", "round"]).weights.nunique() == 1).all()
    layers = ["fc1_pct", "fc2_pct", "fc3_pct"]
    synflow, shuffled = (rows[rows.variant == v].set_index(["trial", "round"])[layers] for v in variants[3:5])
    pd.testing.assert_frame_equal(synflow, shuffled)
    grasp, reinit = (rows[rows.variant == v].set_index(["trial", "round"])[layers] for v in ("grasp", "grasp-reinit"))
    pd.testing.assert_frame_equal(grasp, reinit)
    later = rows[rows["round"] > 0].set_index(["trial", "round", "variant"]).fc1_pct.unstack()
    assert (later.snip != later.ticket).all() and (later.synflow != later.grasp).any()  # masks of their own
    assert rows.untrained_acc.between(0, 100).all()


def test_a_methods_reinit_starts_from_a_fresh_draw_and_its_untrained_acc_is_w0_on_its_mask(at_init_run, small_mnist):
    rows = pd.read_csv(at_init_run / "results.csv").set_index(["trial", "round", "variant"])
    test = small_mnist[1]
    for trial in (0, 1):
        assert rows.untrained_acc[trial, 0, "grasp"] == rows.untrained_acc[trial, 0, "ticket"]  # dense, on W0
        assert rows.untrained_acc[trial, 0, "grasp-reinit"] != rows.untrained_acc[trial, 0, "ticket"]  # fresh
        for variant in ("snip", "synflow"):
            with torch.no_grad():
                logits = lot.load_ticket(at_init_run, round=1, trial=trial, variant=variant)(test.x)
            by_hand = 100.0 * (logits.argmax(1) == test.y).float().mean().item()
            assert rows.untrained_acc[trial, 1, variant] == pytest.approx(by_hand, abs=0.11)  # an image of 1,000
    w0 = lot.default_init(torch.Generator().manual_seed(0))
    masks = [torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5 for w in w0[:3]]
    start = lot.member_start("grasp-reinit", masks, w0, torch.Generator().manual_seed(7), lot.Config.init)
    fresh = lot.default_init(torch.Generator().manual_seed(7))
    assert all(torch.equal(s, f) for s, f in zip(start, lot.rewind(fresh, masks)))


def test_a_shuffle_keeps_each_layers_count_moves_its_weights_and_is_redrawn_the_same():
    cfg = lot.parse_config(["--controls", "snip,snip-shuffled", "--trials", "2"])
    state = lot.fresh_state(cfg)
    for p in state.pruned_at["ticket"]:
        p[:, : p.shape[1] // 3] = 1  # round 1's ticket: two thirds of every layer
    g = torch.Generator().manual_seed(0)
    images = [(torch.randn(20, 784, generator=g), torch.arange(20) % 10)] * 2
    state.round = 1
    lot.find_at_init(cfg, state, images)
    for t in range(2):
        snip = lot.member_masks(cfg, state, t, "snip", 1)
        shuffled = lot.member_masks(cfg, state, t, "snip-shuffled", 1)
        assert [int(m.sum()) for m in shuffled] == [int(m.sum()) for m in snip]
        assert all(not torch.equal(a, b) for a, b in zip(shuffled, snip))
        own = lot.shuffle_masks(snip, lot.make_generator(cfg.seed, t, "shuffle", 0, 1))  # its trial's stream
        assert all(torch.equal(a, b) for a, b in zip(shuffled, own))


def test_masks_pt_holds_each_methods_masks_and_load_ticket_gives_w0_on_them(at_init_run):
    masks, w0 = lot.load_masks(at_init_run), torch.load(at_init_run / "tickets.pt", weights_only=True)
    assert {k.split(".")[0] for k in masks} == {"fc1", "fc2", "fc3", "snip", "grasp", "synflow"}
    for variant in ("snip", "grasp", "synflow"):
        net = lot.load_ticket(at_init_run, round=1, trial=1, variant=variant)
        mask = masks[f"{variant}.fc2"][1, 1]
        assert torch.equal(net[2].weight, w0["fc2.weight"][1] * mask)
    for variant in ("synflow-shuffled", "grasp-reinit"):
        with pytest.raises(ValueError, match="are not stored") as e:
            lot.load_ticket(at_init_run, round=1, variant=variant)
        assert "\n" not in str(e.value)


def test_masks_that_nest_but_for_a_few_weights_are_stored_as_rounds_survived_and_their_exceptions():
    g, rounds = torch.Generator().manual_seed(0), 12
    survived = torch.randint(0, rounds + 1, (2, 300, 784), generator=g, dtype=torch.uint8)
    nested = survived.unsqueeze(1) > torch.arange(rounds).view(1, -1, 1, 1)
    almost = nested.clone()  # SynFlow's masks: a weight pruned in one round may come back in a later one
    almost[1, 7, 5, 9] ^= True
    almost[0, 11, 0, 0] ^= True
    random = torch.rand(2, rounds, 300, 784, generator=g) < 0.5
    masks = {"fc1": nested, "synflow.fc1": almost, "random.fc1": random}
    packed = lot.pack_masks(masks)
    assert set(packed) == {"rounds", "fc1", "synflow.fc1", "synflow.fc1.flips", "random.fc1.bits"}
    assert 2 <= len(packed["synflow.fc1.flips"]) <= 4  # one toggle moves a count by one: two places at most
    assert packed["synflow.fc1"].dtype == torch.uint8
    assert all(torch.equal(lot.unpack_masks(packed)[name], m) for name, m in masks.items())


def test_a_run_with_the_methods_writes_their_figure_and_paired_table(at_init_run):
    assert (at_init_run / "at_init.png").read_bytes()[:4] == b"\x89PNG"
    table = (at_init_run / "at_init.md").read_text()
    assert (
        "| SNIP - Ticket | GraSP - Ticket | GraSP - GraSP-reinit | SynFlow - Ticket | SynFlow - SynFlow-shuffled |"
        in table
    )
    assert "Test accuracy (%) before training" in table and "No member's mask left a layer" in table
    assert "## How each mask is found" in table and "removes the highest scores" in table  # the method, stated
    rows = pd.read_csv(at_init_run / "results.csv")
    rows = pd.concat([rows, rows[rows.variant == "ticket"].assign(variant="random", test_acc=lambda r: r.test_acc - 1)])
    pairs = "| SNIP - Random mask | GraSP - Ticket | GraSP - Random mask | GraSP - GraSP-reinit | SynFlow - Ticket |"
    assert pairs in lot.at_init_markdown(rows)
    assert "| +1.00 [+1.00, +1.00] |" in lot.at_init_markdown(rows)  # ticket - random, paired
    assert "| SynFlow - SynFlow-shuffled | Random mask - Ticket |" in lot.at_init_markdown(rows)  # its shuffle
    assert table.startswith("## At the levels nearest 13%, 3.5%, 1.15%") and "| SNIP - Ticket | " in table


def test_the_findings_compare_each_method_and_the_ticket_with_their_ablations_at_the_levels_asked():
    acc = {"ticket": 98.0, "random": 97.0, "control": 97.5, "snip": 97.8, "snip-shuffled": 97.6, "snip-reinit": 97.75}
    rows = pd.DataFrame(
        [
            {"trial": t, "round": r, "variant": v, "weights_pct": 100 * 0.8**r, "test_acc": a - 0.1 * t * (v == "snip")}
            for t in range(3)
            for r in range(21)
            for v, a in acc.items()
        ]
    )
    findings = lot.at_init_findings(rows)
    assert "| Difference (points) | 13.42% (round 9) | 3.52% (round 15) | 1.15% (round 20) |" in findings
    assert "| Random mask - Ticket | -1.00 [-1.00, -1.00] | -1.00 [-1.00, -1.00] |" in findings  # its shuffle
    assert "| Control - Ticket | -0.50 [-0.50, -0.50] |" in findings  # its reinit
    assert "| SNIP - Random mask | +0.70 [+0.45, +0.95] |" in findings  # 0.8, 0.7, 0.6 over the trials
    assert "| SNIP - SNIP-shuffled | +0.10 [-0.15, +0.35] |" in findings
    assert "| SNIP - SNIP-reinit | -0.05 [-0.30, +0.20] |" in findings
    assert "GraSP" not in findings  # a method that did not run has no row
    assert "2.30 [2.05, 2.55] at 5.50% (Lee et al., 2019: 1.6 at 5%); 2.30 [2.05, 2.55] at 1.80%" in findings
    assert lot.at_init_findings(rows[rows.variant == "ticket"]) == ""  # nothing to compare


def test_layer_collapse_is_named_with_its_variant_layer_round_and_trials():
    rows = pd.DataFrame(
        [
            {
                "trial": t,
                "round": r,
                "variant": v,
                "fc1_pct": 1.0,
                "fc2_pct": 5.0,
                "fc3_pct": 0.0 if v == "grasp" else 9.0,
            }
            for t in range(3)
            for r in (1, 2)
            for v in ("ticket", "grasp")
            if not (v == "grasp" and r == 1 and t == 0)
        ]
    )
    assert lot.collapse_note(rows) == (
        "Layer collapse (a layer left with no weights passes no signal): GraSP (fc3 from round 1, 3 of 3 trial(s))."
    )
    assert lot.collapse_note(rows[rows.variant == "ticket"]) == ""


def test_a_run_with_the_methods_paused_inside_round_1_resumes_to_the_same_bytes(
    at_init_run, tmp_path, monkeypatch, one_thread
):
    # Calls: round 0, then round 1: the 2nd pauses round 1 after its first step, its masks found.
    out, real = tmp_path / "paused", pause_at_epoch(monkeypatch, 2)
    assert lot.main([*RUN, "--out", str(out)]) == 130
    state, _ = lot.load_checkpoint(out)
    assert (state.round, state.epoch, state.step) == (1, 1, 1) and state.at_init["synflow"][0].shape[1] == 2
    assert not (out / "results.csv").read_text().count(",1,")  # round 1 unfinished
    monkeypatch.setattr(lot, "train_epoch", real)
    assert lot.main([*RUN, "--out", str(out), "--resume"]) == 0
    for name in ("results.csv", "curves.csv", "masks.pt", "validation.csv"):
        assert (out / name).read_bytes() == (at_init_run / name).read_bytes(), name


def test_two_torchrun_processes_write_what_one_process_writes(at_init_run, tmp_path):
    assert ENV["OMP_NUM_THREADS"] == "1"  # as the shared run: one thread
    proc = torchrun(*RUN, "--out", str(tmp_path / "two"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in ("results.csv", "curves.csv", "masks.pt", "validation.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (at_init_run / name).read_bytes(), name


@pytest.mark.parametrize(
    "controls,message",
    [
        ("snip,grasp,synflo", "unknown 'synflo'"),
        ("snip,grasp,snip", "snip given twice"),
        ("random,SNIP", "unknown 'SNIP'"),
    ],
)
def test_a_bad_method_list_is_one_line_naming_the_valid_names(controls, message, tmp_path, capsys):
    flags = [*RUN[:6], "--controls", controls, "--out", str(tmp_path / "o")]  # tiny, should the check fail
    line = refused(flags, capsys, tmp_path / "o")
    assert message in line and "snip, grasp, synflow, snip-shuffled" in line and "synflow-reinit" in line


def test_a_shuffle_or_reinit_without_its_method_is_allowed():
    cfg = lot.parse_config(["--controls", "synflow-shuffled,snip-reinit"])
    lot.validate(cfg)
    assert lot.variants(cfg) == ("ticket", "synflow-shuffled", "snip-reinit")
    assert lot.at_init_methods(cfg) == ("snip", "synflow")


def test_resuming_with_another_method_list_is_refused_and_named(at_init_run, capsys):
    before = {p.name: p.read_bytes() for p in at_init_run.iterdir()}
    capsys.readouterr()
    other = [*RUN[:-1], "snip,grasp,synflow"]
    assert lot.main([*other, "--out", str(at_init_run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--controls snip,grasp,synflow (the run in --out has snip,grasp,synflow," in err[0]
    assert {p.name: p.read_bytes() for p in at_init_run.iterdir()} == before
