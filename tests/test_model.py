"""The engine: every stacked member is an ordinary LeNet-300-100, with PyTorch's default init."""

import math

import pytest
import torch
from conftest import lot
from torch import nn


def sequential_lenet() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def load_member(seq: nn.Sequential, params, m: int) -> None:
    with torch.no_grad():
        for layer, (w, b) in zip([seq[0], seq[2], seq[4]], zip(params[:3], params[3:])):
            layer.weight.copy_(w[m])
            layer.bias.copy_(b[m])


def random_stack(trials: int, per: int, seed: int = 0, dtype=torch.float32):
    members = trials * per
    net = lot.LeNetStack(members, per, torch.device("cpu")).to(dtype)
    params = lot.stack_members(
        [lot.default_init(torch.Generator().manual_seed(seed + m)) for m in range(members)], torch.device("cpu")
    )
    net.load([p.to(dtype) for p in params])
    return net


def test_lenet_300_100_has_266610_parameters_of_which_266200_prunable():
    net = lot.LeNetStack(1, 1, torch.device("cpu"))
    assert sum(p.numel() for p in net.parameters()) == 266_610
    assert sum(w.numel() for w in net.weights) == lot.PRUNABLE == 266_200
    assert sum(p.numel() for p in sequential_lenet().parameters()) == 266_610


def test_default_init_draws_exactly_what_nn_linear_draws():
    ours = lot.default_init(torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    ref = sequential_lenet()
    for got, layer in zip(zip(ours[:3], ours[3:]), [ref[0], ref[2], ref[4]]):
        assert torch.equal(got[0], layer.weight)
        assert torch.equal(got[1], layer.bias)
        bound = 1 / math.sqrt(layer.in_features)
        assert got[0].abs().max() <= bound


@pytest.mark.parametrize("trials,per", [(1, 2), (3, 2)])
def test_each_stacked_member_equals_nn_sequential_on_its_trials_batch(trials, per):
    torch.manual_seed(0)
    net = random_stack(trials, per)
    x = torch.randn(trials, 60, 784)
    y = torch.randint(0, 10, (trials, 60))
    losses = net.backprop(x, y)
    logp = net(x)
    params = [*net.weights, *net.biases]
    for m in range(trials * per):
        t = m // per
        seq = sequential_lenet()
        load_member(seq, [p.detach() for p in params], m)
        out = seq(x[t])
        loss = nn.functional.cross_entropy(out, y[t])
        loss.backward()
        torch.testing.assert_close(logp[m], out.log_softmax(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses[m].mean(), loss, rtol=1e-5, atol=1e-6)
        for ours, layer in zip(zip(net.weights, net.biases), [seq[0], seq[2], seq[4]]):
            torch.testing.assert_close(ours[0].grad[m], layer.weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ours[1].grad[m], layer.bias.grad, rtol=1e-4, atol=1e-6)


def test_autograd_path_for_data_parallel_gives_the_same_gradients():
    net = random_stack(2, 2, dtype=torch.float64)
    x = torch.randn(2, 17, 784, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 17))
    net.backprop(x, y)
    direct = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    (net(x, y).sum() / 17).backward()
    for a, p in zip(direct, net.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_hand_written_backward_passes_gradcheck():
    torch.manual_seed(1)
    dims = (12, 7, 5, 4)  # the same maths on a tiny MLP, so finite differences stay cheap
    x = torch.randn(2, 5, dims[0], dtype=torch.float64)
    y = torch.randint(0, dims[-1], (2, 5))
    shapes = [(2, o, i) for i, o in zip(dims[:-1], dims[1:])] + [(2, o) for o in dims[1:]]
    params = [(0.1 * torch.randn(s, dtype=torch.float64)).requires_grad_() for s in shapes]
    weights = torch.rand(2, 5, dtype=torch.float64)  # non-uniform upstream gradient
    f = lambda *p: (lot._StackedLeNetLoss.apply(x, y, *p) * weights).sum()
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_single_image_batch_broadcasts_to_every_member():
    net = random_stack(2, 2)
    x = torch.randn(1, 9, 784)
    per_trial = net(x.expand(2, -1, -1))
    torch.testing.assert_close(net(x), per_trial)


def test_every_parameter_and_gradient_is_a_view_of_one_flat_tensor_even_after_to():
    net = random_stack(1, 2, dtype=torch.float64)  # .to() makes new tensors: the stack packs them again
    net.backprop(torch.randn(1, 5, 784, dtype=torch.float64), torch.randint(0, 10, (1, 5)))
    params = [*net.weights, *net.biases]
    assert net.flat.dtype == torch.float64 and net.flat.numel() == 2 * 266_610
    for p in params:
        assert p.untyped_storage().data_ptr() == net.flat.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == net.flat_grad.untyped_storage().data_ptr()
    with torch.no_grad():
        net.flat.fill_(0.5)
    assert all((p == 0.5).all() for p in params)
