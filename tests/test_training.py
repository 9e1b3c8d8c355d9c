"""Training: pruned weights stay exactly zero, the optimiser is PyTorch's SGD, tickets rewind to W0,
controls share the mask but not the init, and the network really learns MNIST."""

import sys

import pytest
import torch
from conftest import lot
from test_model import random_stack
from torch import nn


def half_masks(members: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(members, o, i, generator=g) > 0.5 for o, i in lot.SHAPES]


def start_on_masks(net, masks):
    with torch.no_grad():
        for w, m in zip(net.weights, masks):
            w.mul_(m)


def test_pruned_weights_and_their_momentum_stay_exactly_zero_through_training():
    torch.manual_seed(0)
    net = random_stack(1, 2)
    masks = half_masks(2)
    start_on_masks(net, masks)
    opt = lot.MaskedSGD(net, [m.float() for m in masks], lr=0.05, momentum=0.9)
    data = lot.Split(torch.randn(600, 784), torch.randint(0, 10, (600,)))
    order = torch.randperm(600).unsqueeze(0)
    before = [w.detach().clone() for w in net.weights]
    for _ in range(3):
        lot.train_epoch(net, opt, data, order, 60)
    for w, m, b, buf in zip(net.weights, masks, before, opt.bufs):
        assert (w[~m] == 0.0).all() and (buf[~m] == 0.0).all()
        assert (w[m] != b[m]).float().mean() > 0.99  # survivors did train


def test_masked_sgd_with_full_masks_reproduces_torch_optim_sgd_exactly():
    net = random_stack(1, 2)
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ours = lot.MaskedSGD(net, [torch.ones_like(w) for w in net.weights], lr=0.01, momentum=0.9)
    theirs = torch.optim.SGD(ref, lr=0.01, momentum=0.9, foreach=True)
    torch.manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(1, 60, 784), torch.randint(0, 10, (1, 60))
        net.backprop(x, y)
        for r, p in zip(ref, net.parameters()):
            r.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for r, p in zip(ref, net.parameters()):
        assert torch.equal(r, p)


def test_ticket_starts_at_w0_on_the_mask_and_control_shares_the_mask_with_a_fresh_init():
    w0 = lot.default_init(torch.Generator().manual_seed(0))
    masks = [m[0] for m in half_masks(1)]
    gen = torch.Generator().manual_seed(1)
    start = lambda variant: lot.member_start(variant, masks, w0, gen, "kaiming-uniform")
    ticket, control = start("ticket"), start("control")
    ticket2, control2 = start("ticket"), start("control")
    for t, c, c2, w, m in zip(ticket, control, control2, w0, masks):
        assert torch.equal(t, w * m)
        assert torch.equal(c == 0, t == 0)  # the same sparsity pattern
        assert not torch.equal(c[m], t[m])  # ... with other values
        assert not torch.equal(c, c2)  # and a new draw every round
    assert torch.equal(ticket2[0], ticket[0])  # the ticket always rewinds to the same W0


def test_one_epoch_on_real_mnist_reaches_95_percent_with_default_hyperparameters(mnist):
    # One epoch of 10k images (167 steps) gives 89.6-92.6% for this engine and for a plain
    # nn.Sequential alike; the full 60k (1000 steps) gives about 96%.
    train, test = mnist
    cpu = torch.device("cpu")
    net = lot.LeNetStack(2, 2, cpu)
    net.load(lot.stack_members([lot.default_init(torch.Generator().manual_seed(s)) for s in (0, 1)], cpu))
    opt = lot.MaskedSGD(net, [torch.ones_like(w) for w in net.weights], lr=0.01, momentum=0.9)
    order = lot.epoch_order(len(train.y), [torch.Generator().manual_seed(0)], cpu)
    loss_sum, steps = lot.train_epoch(net, opt, train, order, 60)
    train_loss = loss_sum / len(train.y)
    test_loss, test_acc = lot.evaluate(net, test)
    assert steps == 1000
    assert (test_acc >= 95.0).all(), test_acc
    assert (train_loss < 0.5).all() and (test_loss < 0.15).all(), (train_loss, test_loss)


def test_evaluate_matches_nn_sequential_accuracy_and_loss(mnist):
    _, test = mnist
    small = lot.Split(test.x[:3000], test.y[:3000])
    net = random_stack(1, 2)
    loss, acc = lot.evaluate(net, small)
    from test_model import load_member, sequential_lenet

    for m in range(2):
        seq = sequential_lenet()
        load_member(seq, [p.detach() for p in net.parameters()], m)
        with torch.no_grad():
            out = seq(small.x)
        assert acc[m].item() == pytest.approx(100.0 * (out.argmax(1) == small.y).float().mean().item(), abs=1e-3)
        assert loss[m].item() == pytest.approx(nn.functional.cross_entropy(out, small.y).item(), rel=1e-5)


def test_data_parallel_training_path_matches_the_fast_path(monkeypatch):
    # Without GPUs nn.DataParallel calls the module directly, but train_epoch still takes the
    # autograd branch that several GPUs would use; it must train exactly like the fast path.
    # (On a GPU machine it is made to see none, as these stacks live on the CPU.)
    monkeypatch.setattr(sys.modules["torch.nn.parallel.data_parallel"], "_get_available_device_type", lambda: None)
    torch.manual_seed(3)
    fast, wrapped = random_stack(1, 2), random_stack(1, 2)
    masks = half_masks(2, seed=4)
    start_on_masks(fast, masks)
    start_on_masks(wrapped, masks)
    data = lot.Split(torch.randn(240, 784), torch.randint(0, 10, (240,)))
    order = torch.randperm(240).unsqueeze(0)
    dp = nn.DataParallel(wrapped, dim=1)
    assert lot.unwrap(dp) is wrapped
    for net, stack in ((fast, fast), (dp, wrapped)):
        opt = lot.MaskedSGD(stack, [m.float() for m in masks], lr=0.05, momentum=0.9)
        lot.train_epoch(net, opt, data, order, 60)
    for a, b in zip(fast.parameters(), wrapped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for w, m in zip(wrapped.weights, masks):
        assert (w[~m] == 0.0).all()


def test_the_step_loop_never_reads_a_tensor_back_to_the_host(monkeypatch):
    # On a GPU any of these would stall the queue every step; here they are made to fail.
    net = random_stack(2, 2)
    opt = lot.MaskedSGD(net, [torch.ones_like(w) for w in net.weights], lr=0.01, momentum=0.9)
    data = lot.Split(torch.randn(300, 784), torch.randint(0, 10, (300,)))
    order = lot.epoch_order(300, [torch.Generator().manual_seed(t) for t in range(2)], torch.device("cpu"))

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside the step loop")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss_sum, steps = lot.train_epoch(net, opt, data, order, 60)
    monkeypatch.undo()
    assert steps == 5 and torch.isfinite(loss_sum).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_graph_steps_train_exactly_like_eager_steps(monkeypatch, optimizer):
    # On CUDA each full batch is one graph replay; 630 images also leave an eager partial batch,
    # and the second mask checks that a new round's mask reaches the captured graph.
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    data = lot.Split(torch.randn(630, 784, generator=g).to(cuda), torch.randint(0, 10, (630,), generator=g).to(cuda))
    order = torch.randperm(630, generator=g).unsqueeze(0).to(cuda)
    runs = []
    for graphs in (False, True):
        monkeypatch.setenv("LOT_CUDA_GRAPHS", str(int(graphs)))
        net = random_stack(1, 2).to(cuda)
        masks = [m.to(cuda) for m in half_masks(2)]
        start_on_masks(net, masks)
        if optimizer == "sgd":
            opt = lot.MaskedSGD(net, [m.float() for m in masks], lr=0.05, momentum=0.9)
        else:  # Adam's step count and bias corrections must advance inside the replayed graph
            opt = lot.MaskedAdam(net, [m.float() for m in masks], lr=1e-3)
        losses = [lot.train_epoch(net, opt, data, order, 60)[0]]
        opt.set_masks([(m & n.to(cuda)).float() for m, n in zip(masks, half_masks(2, seed=1))])  # same in both runs
        losses += [lot.train_epoch(net, opt, data, order, 60)[0] for _ in range(2)]
        assert bool(net.__dict__.get("_graphs")) == graphs and opt.steps == 33
        runs.append(([p.detach().cpu() for p in net.parameters()], [t.cpu() for t in losses]))
    (eager, eager_losses), (graphed, graphed_losses) = runs
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert all(torch.equal(a, b) for a, b in zip(eager_losses, graphed_losses))
