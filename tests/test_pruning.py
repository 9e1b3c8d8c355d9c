"""Global iterative magnitude pruning: exact counts, nested masks, the same choice as torch's pruner."""

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
        masks = lot.global_magnitude_prune(weights, masks, 0.2)
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
    a = lot.global_magnitude_prune(weights, full_masks(), 0.2)
    b = lot.global_magnitude_prune(weights, full_masks(), 0.2)
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
        ours = lot.global_magnitude_prune([l.weight.detach().clone() for l in layers], masks, 0.2)
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
