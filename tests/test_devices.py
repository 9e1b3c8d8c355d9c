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


class FakeCuda:
    """torch.cuda's device scope, streams and graphs on a machine without CUDA, each object
    noting the device that was current when it was made or entered."""

    def __init__(self, monkeypatch):
        self.current, self.made = 0, []
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.note("Stream", device))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.note("current_stream", device))
        monkeypatch.setattr(torch.cuda, "stream", lambda s: self.scope("stream"))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: self.note("CUDAGraph", None))
        monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: self.scope("graph", stream))

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
        fake = type("Fake", (), {"wait_stream": lambda self, other: None, "replay": lambda self: None})()
        fake.device = torch.device("cuda", self.current if index is None else index)  # where CUDA would put it
        return fake

    @contextlib.contextmanager
    def scope(self, what, stream=None):  # a capture given no stream uses torch's cached one: maybe another GPU's
        self.note(what, None if stream is None else stream.device)
        yield


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
def test_a_graph_replay_moves_the_parameters_as_an_eager_step_does():
    # A capture that captured nothing (work queued on another stream or device) replays as a no-op.
    cuda = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: cuda:1 where there are two
    with lot.on_device(cuda):
        stack = lot.LeNetStack(2, 2, cuda)
        stack.load([t.to(cuda) for t in lot.stack_members([lot.default_init(torch.Generator())] * 2, cuda)])
        opt = lot.MaskedSGD(stack, [], lr=0.05, momentum=0.9)
        data = lot.Split(torch.randn(120, 784, device=cuda), torch.randint(0, 10, (120,), device=cuda))
        graph = lot.StepGraph(stack, opt, data, (1, 60), cuda)
        before = opt.param.clone()
        graph.step(opt, torch.arange(60, device=cuda).unsqueeze(0))
        torch.cuda.synchronize(cuda)
    assert not torch.equal(before, opt.param) and torch.isfinite(opt.param).all()


@needs_cuda
def test_data_parallel_runs_on_a_single_gpu(tmp_path):
    out = tmp_path / "dp"
    cli(*TINY, "--data-parallel", "--out", str(out))
    assert len(pd.read_csv(out / "results.csv")) == 3 * 2


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
