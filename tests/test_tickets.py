"""A run's tickets leave it as plain PyTorch: tickets.pt holds each trial's W0, load_ticket builds
an nn.Sequential that keeps its mask under any optimiser, and trained with torch.optim alone it
lands where the engine did."""

import pytest
import torch
from conftest import ROOT, lot
from torch import nn
from torch.nn.utils import prune

FLAGS = ["--train-subset", "600", "--rounds", "2", "--epochs", "2", "--trials", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tickets") / "out"
    flags = [*FLAGS, "--controls", "reinit,random", "--rewind-to", "3it", "--data-dir", str(ROOT / "data")]
    assert lot.main([*flags, "--out", str(out)]) == 0
    return out


def test_tickets_pt_holds_each_trials_w0_in_nn_linear_layout_and_loads_safely(run):
    saved = torch.load(run / "tickets.pt", weights_only=True)
    assert set(saved) == {*lot.PARAMS, *(f"late_rewind.{p}" for p in lot.PARAMS)}
    assert saved["fc1.weight"].shape == (2, 300, 784) and saved["fc3.bias"].shape == (2, 10)
    for trial in range(2):
        w0 = lot.default_init(lot.make_generator(0, trial, "init"))
        for name, expected in zip(lot.PARAMS, w0):
            assert torch.equal(saved[name][trial], expected), name
    assert not torch.equal(saved["late_rewind.fc1.weight"], saved["fc1.weight"])  # 3 steps later


def test_a_loaded_ticket_is_w0_times_the_rounds_mask_in_a_plain_sequential(run):
    masks = lot.load_masks(run)
    w0 = torch.load(run / "tickets.pt", weights_only=True)
    model = lot.load_ticket(run, round=2, trial=1)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    for layer, name in zip(model[::2], lot.LAYERS):
        mask = masks[name][1, 2]
        assert torch.equal(layer.weight_mask, mask.float())
        assert torch.equal(layer.weight, w0[f"{name}.weight"][1] * mask)
        assert torch.equal(layer.bias, w0[f"{name}.bias"][1])
    late = lot.load_ticket(run, round=1, variant="late_rewind")
    assert torch.equal(late[0].weight, w0["late_rewind.fc1.weight"][0] * masks["late_rewind.fc1"][0, 1])
    random = lot.load_ticket(run, round=2, variant="random")
    assert torch.equal(random[2].weight_mask, masks["random.fc2"][0, 2].float())


def test_the_mask_stays_in_force_under_any_optimiser_and_prune_remove_makes_it_permanent(run):
    model = lot.load_ticket(run, round=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 784)).logsumexp(1).mean().backward()
        opt.step()
    pruned = [(layer.weight_mask == 0) for layer in model[::2]]
    assert all((layer.weight[p] == 0).all() for layer, p in zip(model[::2], pruned))
    for layer, p in zip(model[::2], pruned):
        prune.remove(layer, "weight")
        assert isinstance(layer.weight, nn.Parameter) and (layer.weight[p] == 0).all()


def test_asking_for_a_variant_the_run_did_not_train_names_those_it_did(run, tmp_path):
    with pytest.raises(ValueError, match="it has late_rewind, random, ticket"):
        lot.load_ticket(run, round=1, variant="oneshot")
    with pytest.raises(ValueError, match="rounds 0..2"):
        lot.load_ticket(run, round=3)


def test_a_ticket_trained_with_plain_torch_optim_lands_where_the_engine_did(tmp_path):
    # Independent of the engine: nn.Linear + prune's parametrisation + torch.optim.SGD, on the run's
    # own batch order (trial 0's data stream, advanced past rounds 0 and 1). The same maths in
    # another order of float operations: after 20 steps the weights agree far inside 1e-5 and the
    # accuracy within a tenth of a point; a wrong mask, start or batch order is off by 1e-3 or more.
    out = tmp_path / "out"
    assert lot.main([*FLAGS[:-2], "--data-dir", str(ROOT / "data"), "--out", str(out)]) == 0
    model = lot.load_ticket(out, round=2)
    train, test = lot.load_mnist(str(ROOT / "data"), torch.device("cpu"), train_subset=600)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = lot.make_generator(0, 0, "data")
    for epoch in range(6):  # two epochs in each of rounds 0, 1 and 2
        order = torch.randperm(600, generator=data)
        if epoch < 4:
            continue
        for batch in order.split(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train.x[batch]), train.y[batch]).backward()
            opt.step()
    engine = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["params"]  # round 2's trained members
    for layer, w, b in zip(model[::2], engine[:3], engine[3:]):
        weight = (layer.weight_orig * layer.weight_mask).detach()  # .weight is refreshed at the next forward
        torch.testing.assert_close(weight, w[0], rtol=0, atol=1e-5)  # member 0: the ticket
        torch.testing.assert_close(layer.bias.detach(), b[0], rtol=0, atol=1e-5)
    with torch.no_grad():
        accuracy = 100.0 * (model(test.x).argmax(1) == test.y).float().mean().item()
    rows = lot.pd.read_csv(out / "results.csv")
    recorded = rows[(rows["round"] == 2) & (rows.variant == "ticket")].test_acc.item()
    assert accuracy == pytest.approx(recorded, abs=0.1)
