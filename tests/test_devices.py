"""Any CUDA device, not only cuda:0: everything CUDA makes lives on the run's own device, torchrun
binds each rank to its GPU before NCCL starts, and a process that sees several GPUs says how to
use them all. CPU tests fake torch.cuda's objects; the CUDA ones run where a GPU is."""

import contextlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, SCRIPT, TINY, lot, refused
from torch.utils._python_dispatch import TorchDispatchMode


class Recorder(TorchDispatchMode):
    """Notes every ATen operation run inside it, with its arguments and results: a CPU stand-in
    for what a CUDA graph capture records."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


@torch.no_grad()  # as the step itself runs
def rerun(ops) -> None:
    """Runs recorded operations again, as a graph replay does: the same work on the same lasting
    buffers (parameters, optimiser state, the batch index), each intermediate made afresh."""
    fresh = {}

    def swap(value):
        if isinstance(value, torch.Tensor):
            return fresh.get(id(value), value)
        return type(value)(swap(v) for v in value) if isinstance(value, (list, tuple)) else value

    for func, args, kwargs, out in ops:
        new = func(*swap(args), **{k: swap(v) for k, v in kwargs.items()})
        olds, news = (o if isinstance(o, (list, tuple)) else [o] for o in (out, new))
        for old, made in zip(olds, news):
            if isinstance(old, torch.Tensor):
                fresh[id(old)] = made  # the recorded results stay alive in ops: ids stay unique


class FakeCuda:
    """torch.cuda's device scope, streams and graphs on a machine without CUDA. Each object notes
    the device that was current when it was made or entered. A capture records the work done
    inside it and a replay runs it again ("rerun"), or the replay does nothing ("nothing": a capture
    of nothing), or the capture raises ("raise")."""

    def __init__(self, monkeypatch, replay="rerun"):
        self.current, self.made, self.replay, self.replays = 0, [], replay, 0
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.note("Stream", device))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.note("current_stream", device))
        monkeypatch.setattr(torch.cuda, "stream", lambda s: self.scope("stream"))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: self.note("CUDAGraph", None))
        monkeypatch.setattr(torch.cuda, "graph", self.capture)

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = before

    def note(self, what, device):
        index = None if device is None else torch.device(device).index
        self.made.append((what, self.current, index))
        fake = type("Fake", (), {"wait_stream": lambda self, other: None, "ops": []})()
        fake.replay = lambda: self.replayed(fake)
        fake.device = torch.device("cuda", self.current if index is None else index)  # where CUDA would put it
        return fake

    def replayed(self, graph):
        self.replays += 1
        if self.replay == "rerun":
            rerun(graph.ops)

    @contextlib.contextmanager
    def scope(self, what, stream=None):  # a capture given no stream uses torch's cached one: maybe another GPU's
        self.note(what, None if stream is None else stream.device)
        yield

    @contextlib.contextmanager
    def capture(self, graph, stream=None):
        with self.scope("graph", stream), Recorder() as recorder:
            yield
        if self.replay == "raise":  # as a capture does that met an operation it cannot record
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        graph.ops = recorder.ops


def test_a_step_graph_makes_its_streams_and_graph_on_the_runs_own_device(monkeypatch):
    # On cuda:1, a stream or graph made on "the current device" (cuda:0 unless set) would capture
    # nothing of the work queued on cuda:1, and its replays would do nothing.
    cuda = FakeCuda(monkeypatch)
    stack = lot.LeNetStack(2, 2, torch.device("cpu"))
    opt = lot.MaskedSGD(stack, [], lr=0.01, momentum=0.9)
    data = lot.Split(torch.randn(120, 784), torch.randint(0, 10, (120,)))
    lot.StepGraph(stack, opt, data, (1, 60), torch.device("cuda", 1))
    assert {what for what, _, _ in cuda.made} == {"Stream", "current_stream", "stream", "CUDAGraph", "graph"}
    assert all(current == 1 for _, current, _ in cuda.made), cuda.made
    assert all(given in (None, 1) for _, _, given in cuda.made), cuda.made
    assert [given for what, _, given in cuda.made if what == "graph"] == [1]  # captured on a stream of cuda:1
    assert cuda.current == 0  # the scope ends with the capture


def stack_in_training(optimizer="sgd"):
    """Two LeNets on 180 random images, three full batches of 60 an epoch."""
    gen = torch.Generator().manual_seed(0)
    stack = lot.LeNetStack(2, 2, torch.device("cpu"))
    stack.load(lot.stack_members([lot.default_init(gen), lot.default_init(gen)], torch.device("cpu")))
    opt = lot.MaskedAdam(stack, [], lr=1e-3) if optimizer == "adam" else lot.MaskedSGD(stack, [], 0.05, 0.9)
    data = lot.Split(torch.randn(180, 784, generator=gen), torch.randint(0, 10, (180,), generator=gen))
    return stack, opt, data, torch.randperm(180, generator=gen).unsqueeze(0)


def an_epoch(monkeypatch, replay=None, optimizer="sgd"):
    """An epoch's weights and loss sum: eagerly on the CPU (replay None), or through StepGraph with
    a fake CUDA whose replays behave as replay says."""
    cuda = None
    if replay:
        cuda = FakeCuda(monkeypatch, replay)
        monkeypatch.setattr(lot, "graphs_off", lambda device, data_parallel: None)  # graphs on, as on a GPU
    stack, opt, data, order = stack_in_training(optimizer)
    total, _ = lot.train_epoch(stack, opt, data, order, 60)
    return opt.param.clone(), opt.state()[0].clone(), total, stack, cuda


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_graph_whose_replay_reruns_the_captured_step_passes_its_check_and_trains_as_eager_steps(
    monkeypatch, capsys, optimizer
):
    weights, buffers, total, _, _ = an_epoch(monkeypatch, None, optimizer)
    g_weights, g_buffers, g_total, stack, cuda = an_epoch(monkeypatch, "rerun", optimizer)
    assert cuda.replays == 1 + 3  # the check's replay, then one per step
    assert stack.graph_fallbacks == [] and capsys.readouterr().err == ""
    assert torch.equal(g_weights, weights) and torch.equal(g_buffers, buffers) and torch.equal(g_total, total)


@pytest.mark.parametrize(
    "replay,why",
    [
        ("raise", "capture failed (RuntimeError: CUDA error: operation not permitted when stream is capturing)"),
        ("nothing", "a replay's weights differ from an eager step's by 1 of the step"),
    ],
)
def test_a_graph_that_raises_or_replays_nothing_falls_back_to_eager_steps_with_one_line(
    monkeypatch, capsys, replay, why
):
    weights, buffers, total, _, _ = an_epoch(monkeypatch)
    g_weights, g_buffers, g_total, stack, cuda = an_epoch(monkeypatch, replay)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lot_improved: warning: CUDA graphs off") and why in err[0], err
    assert stack.graph_fallbacks == [err[0].split(": ", 3)[-1]]
    # the warm-up, capture and check steps were undone: the epoch is the eager one, bit for bit
    assert torch.equal(g_weights, weights) and torch.equal(g_buffers, buffers) and torch.equal(g_total, total)
    lot.train_epoch(stack, lot.MaskedSGD(stack, [], 0.05, 0.9), *stack_in_training()[2:], 60)
    assert [what for what, _, _ in cuda.made].count("CUDAGraph") == 1  # that stack never tries again


@pytest.mark.parametrize("replay,recorded", [("rerun", "on"), ("raise", "fell back: capture failed (RuntimeError")])
def test_config_json_says_whether_graphs_ran_and_a_fallback_keeps_the_eager_runs_bytes(
    tmp_path, monkeypatch, replay, recorded
):
    assert lot.main([*TINY, "--out", str(tmp_path / "eager")]) == 0
    assert json.loads((tmp_path / "eager" / "config.json").read_text())["cuda_graphs"] == "off: the CPU"
    FakeCuda(monkeypatch, replay)
    monkeypatch.setattr(lot, "graphs_off", lambda device, data_parallel: None)
    assert lot.main([*TINY, "--out", str(tmp_path / "graphs")]) == 0
    assert json.loads((tmp_path / "graphs" / "config.json").read_text())["cuda_graphs"].startswith(recorded)
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (tmp_path / "graphs" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes(), name


def test_config_json_says_why_graphs_are_off():
    cfg, cuda = lot.parse_config([]), torch.device("cuda", 0)
    assert lot.graphs_status(cfg, torch.device("cpu"), []) == "off: the CPU"
    assert lot.graphs_status(lot.parse_config(["--data-parallel"]), cuda, []) == "off: --data-parallel"
    assert lot.graphs_status(cfg, cuda, ["why"]) == "fell back: why" and lot.graphs_status(cfg, cuda, []) == "on"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOT_CUDA_GRAPHS", "0")
        assert lot.graphs_status(cfg, cuda, []) == "off: LOT_CUDA_GRAPHS=0"


def test_every_step_graph_call_site_captures_and_replays_the_eager_steps(monkeypatch, mnist):
    # The benchmark's graph ways make their own StepGraphs (the engine's call site is above).
    from benchmarks.step_kernels import Setup, Steps

    FakeCuda(monkeypatch, "rerun")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the compiled way's call site, uncompiled
    final = {}
    for way in ("eager", "graph", "graph xK", "compiled graph"):
        s = Setup(1, mnist[0], steps=6, seed=0)
        Steps(way, s, k=3).run(s.batches)
        final[way] = s.stack.flat.clone()
    assert all(torch.equal(final[way], final["eager"]) for way in final)
    assert not torch.equal(final["eager"], Setup(1, mnist[0], 6, 0).stack.flat)


def test_under_torchrun_each_rank_binds_its_gpu_before_nccl_starts(monkeypatch):
    calls = []

    def init_process_group(backend, device_id=None):
        calls.append((backend, device_id))

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(lot.dist, "init_process_group", init_process_group)
    lot.join_process_group(torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", torch.device("cuda", 1))]
    calls.clear()
    lot.join_process_group(torch.device("cpu"))
    assert calls == [("gloo", None)]


def test_a_process_that_sees_two_gpus_says_it_uses_one_and_how_to_use_both():
    cfg = lot.parse_config(["--epochs", "5", "--device", "cuda:0"])
    hint = lot.gpu_hint(cfg, lot.Ranks(), torch.device("cuda", 0), visible=2)
    assert hint == (
        "2 GPUs visible, this process uses cuda:0 alone; to train on all 2: "
        "torchrun --standalone --nproc-per-node 2 lot_improved.py --epochs 5 --trials 2"
    )
    assert lot.gpu_hint(cfg, lot.Ranks(), torch.device("cuda", 0), visible=1) is None
    assert lot.gpu_hint(cfg, lot.Ranks(0, 1, 0, True), torch.device("cuda", 0), visible=2) is None  # torchrun
    assert lot.gpu_hint(cfg, lot.Ranks(), torch.device("cpu"), visible=0) is None
    resuming = lot.parse_config(["--resume"])  # its checkpoint holds this process's trials: no new command
    assert lot.gpu_hint(resuming, lot.Ranks(), torch.device("cuda", 0), visible=2) is None


def test_environment_switches_are_read_when_main_runs_and_bad_values_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOT_CHECKPOINT_EVERY_S", "soon")
    assert "LOT_CHECKPOINT_EVERY_S must be a number" in refused(
        [*TINY, "--out", str(tmp_path / "a")], capsys, tmp_path / "a"
    )
    monkeypatch.setenv("LOT_CHECKPOINT_EVERY_S", "0")
    monkeypatch.setenv("LOT_CUDA_GRAPHS", "off")
    assert "LOT_CUDA_GRAPHS must be 0" in refused([*TINY, "--out", str(tmp_path / "b")], capsys, tmp_path / "b")


# ---- on a GPU ---------------------------------------------------------------------------------------

CUDA_RUN = [*TINY, "--trials", "2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def cli(*args):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@needs_cuda
def test_cuda_0_given_explicitly_is_the_defaults_run_byte_for_byte(tmp_path):
    cli(*CUDA_RUN, "--out", str(tmp_path / "default"))
    cli(*CUDA_RUN, "--device", "cuda:0", "--out", str(tmp_path / "cuda0"))
    for name in ("results.csv", "curves.csv", "masks.pt"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "cuda0" / name).read_bytes(), name
    assert json.loads((tmp_path / "cuda0" / "config.json").read_text())["device"] == "cuda:0"


@needs_cuda
def test_a_graph_replay_on_the_last_gpu_does_what_an_eager_step_does():
    # A capture that captured nothing (work queued on another stream or device) replays as a no-op.
    # No device scope here: StepGraph must take its own (cuda:1 where there are two GPUs).
    cuda = torch.device("cuda", torch.cuda.device_count() - 1)
    stack = lot.LeNetStack(2, 2, cuda)
    stack.load(lot.stack_members([lot.default_init(torch.Generator().manual_seed(s)) for s in (0, 1)], cuda))
    opt = lot.MaskedSGD(stack, [], lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    data = lot.Split(
        torch.randn(120, 784, generator=gen).to(cuda), torch.randint(0, 10, (120,), generator=gen).to(cuda)
    )
    graph = lot.StepGraph(stack, opt, data, (1, 60), cuda)
    before, buffers = opt.param.clone(), [b.clone() for b in opt.state()]
    idx = torch.arange(30, 90, device=cuda).unsqueeze(0)
    graph.step(opt, idx)
    torch.cuda.synchronize(cuda)
    replayed = opt.param.clone()
    opt.param.copy_(before)
    opt.restore(buffers, 0)
    lot.train_step(stack, opt, data, idx)
    assert not torch.equal(before, replayed) and torch.isfinite(replayed).all()
    torch.testing.assert_close(replayed, opt.param, rtol=0, atol=1e-6)  # a missed step is off by ~1e-3


@needs_cuda
def test_data_parallel_on_a_single_gpu_trains_as_the_graphed_engine_within_float_rounding(tmp_path):
    cli(*TINY, "--data-parallel", "--out", str(tmp_path / "dp"))
    cli(*TINY, "--out", str(tmp_path / "engine"))
    dp, engine = (pd.read_csv(tmp_path / d / "results.csv") for d in ("dp", "engine"))
    assert len(dp) == len(engine) == 3 * 2 and (dp.weights == engine.weights).all()
    assert (dp.test_acc - engine.test_acc).abs().max() <= 0.5 and (dp.test_loss - engine.test_loss).abs().max() <= 1e-2
    recorded = {d: json.loads((tmp_path / d / "config.json").read_text())["cuda_graphs"] for d in ("dp", "engine")}
    assert recorded == {"dp": "off: --data-parallel", "engine": "on"}


@needs_two
def test_cuda_1_trains_as_cuda_0_does_within_float_rounding(tmp_path):
    for device in ("cuda:0", "cuda:1"):
        cli(*CUDA_RUN, "--device", device, "--out", str(tmp_path / device.replace(":", "")))
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in ("cuda0", "cuda1"))
    assert (a.weights == b.weights).all()
    assert (a.test_acc - b.test_acc).abs().max() <= 0.5 and (a.test_loss - b.test_loss).abs().max() <= 1e-2


@needs_two
def test_torchrun_on_two_gpus_gives_the_single_process_outputs(tmp_path):
    cli(*CUDA_RUN, "--out", str(tmp_path / "one"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)]
    proc = subprocess.run([*cmd, *CUDA_RUN, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in ("one", "two"))
    assert (a.weights == b.weights).all()
    assert (a.test_acc - b.test_acc).abs().max() <= 0.5 and (a.test_loss - b.test_loss).abs().max() <= 1e-2


def test_resuming_warns_only_when_the_device_really_changed(tmp_path, capsys):
    # Runs saved before devices carried their index recorded "cuda": that is cuda:0.
    out = tmp_path / "run"
    assert lot.main([*TINY, "--rounds", "1", "--out", str(out)]) == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = lot.parse_config([*TINY, "--rounds", "1", "--out", str(out), "--resume"])
    for saved, warned in (("cuda", False), ("cuda:0", False), ("cuda:1", True)):
        lot.save_torch(out / "checkpoint.pt", {**payload, "device": saved})
        capsys.readouterr()
        lot.saved_run(cfg, lot.Ranks(), torch.device("cuda", 0))
        assert ("resuming on cuda:0 a run begun on" in capsys.readouterr().err) == warned, saved
