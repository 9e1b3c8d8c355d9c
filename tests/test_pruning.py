"""Global iterative magnitude pruning: exact counts, nested masks, the same choice as torch's pruner;
Zhou et al.'s other criteria on hand-computed examples."""

import pytest
import torch
import torch.nn.utils.prune as prune
from conftest import lot
from torch import nn

PAPER_COUNTS = [
    266200,
    212960,
    170368,
    136294,
    109035,
    87228,
    69782,
    55826,
    44661,
    35729,
    28583,
    22866,
    18293,
    14634,
    11707,
    9366,
    7493,
    5994,
    4795,
    3836,
    3069,
]


def random_weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, i, generator=g) for o, i in lot.SHAPES]


def full_masks():
    return [torch.ones(o, i, dtype=torch.bool) for o, i in lot.SHAPES]


def iterate(rounds: int, seed: int = 0):
    masks, history = full_masks(), []
    for r in range(rounds):
        # a fresh "trained" network every round, as after each retraining
        weights = [w * m for w, m in zip(random_weights(seed + r), masks)]
        masks = lot.global_prune([w.abs() for w in weights], masks, 0.2)
        history.append((weights, masks))
    return history


def test_schedule_leaves_exactly_the_paper_counts_ending_at_1_15_percent():
    assert lot.surviving_schedule(lot.PRUNABLE, 0.2, 20) == PAPER_COUNTS
    assert round(100 * PAPER_COUNTS[-1] / lot.PRUNABLE, 2) == 1.15


def test_each_round_removes_exactly_20_percent_of_survivors_and_masks_only_shrink():
    previous = full_masks()
    for r, (_, masks) in enumerate(iterate(20)):
        assert sum(int(m.sum()) for m in masks) == PAPER_COUNTS[r + 1]
        for new, old in zip(masks, previous):
            assert not (new & ~old).any()  # nothing revived
        previous = masks


def test_threshold_separates_pruned_from_kept_weights_across_layers():
    for weights, masks in iterate(3):
        flat_w = torch.cat([w.flatten() for w in weights]).abs()
        flat_m = torch.cat([m.flatten() for m in masks])
        was_alive = flat_w != 0
        removed = was_alive & ~flat_m
        assert flat_w[removed].max() <= flat_w[flat_m].min()


def test_ties_are_broken_deterministically_by_position():
    weights = [torch.ones(o, i) for o, i in lot.SHAPES]  # every weight ties
    a = lot.global_prune(weights, full_masks(), 0.2)
    b = lot.global_prune(weights, full_masks(), 0.2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat([m.flatten() for m in a])
    k = PAPER_COUNTS[0] - PAPER_COUNTS[1]
    assert not flat[:k].any() and flat[k:].all()  # earliest positions go first


def test_global_mask_equals_torch_global_unstructured_l1_round_after_round():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    layers = [model[0], model[2], model[4]]
    masks = full_masks()
    for r in range(6):
        with torch.no_grad():  # "retraining": new surviving values, pruned stay pruned
            for layer in layers:
                target = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
                target.copy_(torch.randn(target.shape, generator=g))
        ours = lot.global_prune([l.weight.detach().abs() for l in layers], masks, 0.2)
        prune.global_unstructured([(l, "weight") for l in layers], pruning_method=prune.L1Unstructured, amount=0.2)
        for mine, layer in zip(ours, layers):
            assert torch.equal(mine, layer.weight_mask.bool()), f"round {r + 1}"
        masks = ours


def test_rewound_weights_equal_w0_times_mask_and_biases_are_untouched():
    w0 = lot.default_init(torch.Generator().manual_seed(0))
    masks = iterate(2)[-1][1]
    start = lot.rewind(w0, masks)
    for got, w, m in zip(start[:3], w0[:3], masks):
        assert torch.equal(got, w * m)
    for got, b in zip(start[3:], w0[3:]):
        assert torch.equal(got, b)


# Zhou et al.'s criteria on six weights in two layers: final (trained) against initial (W0).
FINAL = [torch.tensor([0.5, -0.4, 0.3, -0.2]), torch.tensor([0.05, -0.6])]
INITIAL = [torch.tensor([0.1, 0.6, -0.2, -0.3]), torch.tensor([0.01, -0.1])]
ALL = [torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
KEPT_GLOBAL = {  # three of six go, lowest score first, across both layers
    "magnitude": [[1, 1, 0, 0], [0, 1]],  # |w|: 0.05, 0.2 and 0.3 go
    "same-sign": [[1, 0, 0, 1], [0, 1]],  # the two flipped weights first, then the smallest same-sign |w|, 0.05
    "increase": [[1, 0, 1, 0], [0, 1]],  # |w_final| - |w_initial|: -0.2, -0.1 and 0.04 go
}
KEPT_LAYERWISE = {  # half of each layer goes
    "magnitude": [[1, 1, 0, 0], [0, 1]],
    "same-sign": [[1, 0, 0, 1], [0, 1]],
    "increase": [[1, 0, 1, 0], [0, 1]],
}


def as_bool(masks):
    return [torch.tensor(m, dtype=torch.bool) for m in masks]


@pytest.mark.parametrize("criterion", KEPT_GLOBAL)
def test_each_criterion_keeps_the_hand_computed_weights_globally_and_layer_by_layer(criterion):
    cfg = lot.parse_config(["--criterion", criterion, "--prune-rate", "0.5"])
    kept = lot.prune(cfg, FINAL, INITIAL, ALL)
    assert all(torch.equal(k, e) for k, e in zip(kept, as_bool(KEPT_GLOBAL[criterion])))
    scores = lot.prune_scores(criterion, FINAL, INITIAL)
    kept = lot.layerwise_prune(scores, ALL, (0.5, 0.5))
    assert all(torch.equal(k, e) for k, e in zip(kept, as_bool(KEPT_LAYERWISE[criterion])))


def test_same_sign_prunes_the_flipped_weights_smallest_first_not_by_position():
    kept = lot.global_prune(lot.prune_scores("same-sign", FINAL, INITIAL), ALL, 1 / 6)  # one of six goes
    assert all(torch.equal(k, e) for k, e in zip(kept, as_bool([[1, 1, 0, 1], [1, 1]])))  # 0.3 before 0.4


def test_a_pruned_weight_stays_pruned_whatever_its_criterion_score():
    alive = as_bool([[1, 0, 1, 1], [1, 1]])  # the flipped -0.4 is already gone
    kept = lot.global_prune(lot.prune_scores("same-sign", FINAL, INITIAL), alive, 0.2)  # one of five goes
    assert all(torch.equal(k, e) for k, e in zip(kept, as_bool([[1, 0, 0, 1], [1, 1]])))


def test_magnitude_criterion_is_the_plain_magnitude_ranking():
    weights, masks = random_weights(5), full_masks()
    a = lot.prune(lot.parse_config([]), weights, random_weights(6), masks)
    b = lot.global_prune([w.abs() for w in weights], masks, 0.2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
