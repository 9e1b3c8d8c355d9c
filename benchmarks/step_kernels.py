"""One training step of ticket + control, five ways, timed per step in one run.

The full default run is 420,000 steps of batch 60; on a GPU a step costs its kernels' launches
and latency, not its arithmetic. Ways (each from the same weights, on the same batches):
- eager:          the engine's step (lot.batch_gradients, then the optimiser's update), kernel
                  by kernel (CPU and CUDA);
- graph:          the engine's StepGraph, one CUDA graph replay a step (what runs today on CUDA);
- graph xK:       K steps captured in one CUDA graph (CUDA);
- compiled:       the step's arithmetic (lot.batch_gradients, then the optimiser's update) through
                  torch.compile, launched eagerly (CPU and CUDA);
- compiled graph: that compiled step captured in a CUDA graph (CUDA).
A way that fails (a compiler missing, say) is reported and skipped. After each way's timed steps its
weights are compared with eager's: graphs replay eager's kernels (difference 0), compiled code fuses
them (float rounding, far below a wrong step's 1e-3). For each trial count: ms per step, kernels per
step (CUDA profiler, eager and compiled; a graph replays the same kernels), each ratio to the
engine's way (graph on CUDA, eager on CPU), and the training part of a full default run at that
rate. Each way is printed, and the JSON rewritten, as it ends: a timeout keeps what was measured.

    python benchmarks/step_kernels.py --device cuda --json step_kernels_cuda.json
    python benchmarks/step_kernels.py --steps 100 --trials 1     # on CPU: eager against compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lot_improved as lot  # noqa: E402
from benchmarks.epoch_throughput import sync  # noqa: E402

FULL_RUN_STEPS = 21 * 20 * 1000  # the default run: 21 rounds of 20 epochs of 1000 steps


class Setup:
    """A stack of ticket + control for each trial, half of every layer pruned, and its batches."""

    def __init__(self, trials: int, train: lot.Split, steps: int, seed: int):
        device = train.x.device
        members = 2 * trials
        gen = torch.Generator().manual_seed(seed)
        masks = [torch.rand(members, o, i, generator=gen) < 0.5 for o, i in lot.SHAPES]
        starts = [lot.default_init(torch.Generator().manual_seed(seed + m)) for m in range(members)]
        stacked = lot.stack_members(starts, torch.device("cpu"))
        self.start = [t.to(device) for t in lot.rewind(stacked[:3], masks) + stacked[3:]]
        self.stack = lot.LeNetStack(members, 2, device)
        self.opt = lot.MaskedSGD(self.stack, [m.float().to(device) for m in masks], lr=0.01, momentum=0.9)
        order = lot.epoch_order(len(train.y), [torch.Generator().manual_seed(seed + t) for t in range(trials)], device)
        self.batches = [order[:, s * 60 : (s + 1) * 60] for s in range(steps)]
        self.train = train
        self.reset()

    def reset(self) -> None:
        self.stack.load(self.start)
        self.opt.reset()


def step_arithmetic(stack: lot.LeNetStack, opt: lot.MaskedSGD, train: lot.Split, idx: torch.Tensor) -> torch.Tensor:
    """A step without its Python bookkeeping (what torch.compile sees): per-member loss sums [M, 1]."""
    losses = lot.batch_gradients(stack, train, idx)
    opt.update()
    return losses.sum(1, keepdim=True)


class Steps:
    """Runs one way's steps: step(idx) for a batch idx [T, B] (or [K, T, B] for graph xK)."""

    def __init__(self, way: str, s: Setup, k: int):
        self.s, self.k, self.graph, self.multi = s, k, None, False
        # dynamic=False: each trial count gets kernels for its own shapes, as a run would
        self.fn = torch.compile(step_arithmetic, dynamic=False) if way.startswith("compiled") else step_arithmetic
        if way == "graph":  # the engine's own graph, unpatched: what runs on CUDA today
            self.graph = lot.StepGraph(s.stack, s.opt, s.train, tuple(s.batches[0].shape), s.train.x.device)
        elif "graph" in way:
            shape = (k, *s.batches[0].shape) if way == "graph xK" else tuple(s.batches[0].shape)
            self.graph = self.capture(shape, way == "graph xK")

    def batched(self, stack: lot.LeNetStack, opt: lot.MaskedSGD, train: lot.Split, idx: torch.Tensor) -> torch.Tensor:
        """What StepGraph captures in place of lot.train_step: one step, or one per row of idx."""
        if not self.multi:
            return self.fn(stack, opt, train, idx)
        return torch.stack([self.fn(stack, opt, train, row) for row in idx]).sum(0)

    def capture(self, shape: tuple[int, ...], multi: bool) -> lot.StepGraph:
        self.multi = multi
        engine_step, lot.train_step = lot.train_step, self.batched  # StepGraph captures lot.train_step
        try:
            return lot.StepGraph(self.s.stack, self.s.opt, self.s.train, shape, self.s.train.x.device)
        finally:
            lot.train_step = engine_step

    def run(self, batches: list[torch.Tensor]) -> None:
        s = self.s
        if self.graph is None:
            for idx in batches:
                self.fn(s.stack, s.opt, s.train, idx)
        elif self.multi:
            for i in range(0, len(batches), self.k):
                self.graph.step(s.opt, torch.stack(batches[i : i + self.k]))
                s.opt.steps += self.k - 1  # StepGraph.step counts one
        else:
            for idx in batches:
                self.graph.step(s.opt, idx)


def kernels_per_step(steps: Steps, batches: list[torch.Tensor]) -> float | None:
    """CUDA kernels launched per step, counted by the profiler over the given steps."""
    if not steps.s.train.x.is_cuda or steps.graph is not None:
        return None
    activity = torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        steps.run(batches)
        sync(steps.s.train.x.device)
    launched = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return len(launched) / len(batches)


def time_way(way: str, s: Setup, k: int, repeats: int) -> dict:
    """Best and median ms per step over repeats of all the setup's batches, from the same start."""
    steps = Steps(way, s, k)
    s.reset()
    steps.run(s.batches[: 2 * k])  # warm-up: compilation, allocator, cuBLAS handles
    kernels = kernels_per_step(steps, s.batches[:k])
    times = []
    for _ in range(repeats):
        s.reset()
        sync(s.train.x.device)
        start = time.perf_counter()
        steps.run(s.batches)
        sync(s.train.x.device)
        times.append(1e3 * (time.perf_counter() - start) / len(s.batches))
    return {"ms_per_step": min(times), "median_ms": statistics.median(times), "kernels_per_step": kernels}


WAYS = ("eager", "graph", "graph xK", "compiled", "compiled graph")
CPU_WAYS = ("eager", "compiled")  # CUDA graphs need CUDA


def measure(trials: int, train: lot.Split, args: argparse.Namespace, done: dict) -> None:
    """Every way for one trial count into done[trials]: timings, and each way's weights against
    eager's. Each way is reported (and the JSON rewritten) as it ends, so a timeout keeps the rest."""
    torch._dynamo.reset()  # compiled code of another trial count would only add guards
    s = Setup(trials, train, args.steps, args.seed)
    figures = done.setdefault(str(trials), {})
    for way in args.ways:
        try:
            figures[way] = time_way(way, s, args.k, args.repeats)
        except Exception as e:  # a way this machine cannot run: say why (here and in the JSON), go on
            if way == "eager":
                raise
            figures[way] = {"skipped": f"{type(e).__name__}: {lot.one_line(e)}"}
            print(f"{trials} trial(s), {way}: skipped: {figures[way]['skipped']}", file=sys.stderr)
            traceback.print_exc(limit=3)
            report(done, args)
            continue
        if way == "eager":
            eager = s.stack.flat.clone()
        figures[way]["max_abs_diff_vs_eager"] = float((s.stack.flat - eager).abs().max())
        report(done, args)


def report(done: dict, args: argparse.Namespace) -> None:
    """Ratios against the engine's way (graph where measured, else eager), printed and written; a
    skipped way stays in the JSON with its reason."""
    for figures in done.values():
        timed = {w: f for w, f in figures.items() if "ms_per_step" in f}
        base = timed.get("graph") or timed["eager"]
        for f in timed.values():
            f["over_engine"] = round(f["ms_per_step"] / base["ms_per_step"], 3)
            f["full_run_training_s"] = round(f["ms_per_step"] * FULL_RUN_STEPS / 1e3, 1)
    t, figures = list(done.items())[-1]
    way, f = list(figures.items())[-1]
    if "ms_per_step" in f:  # a skipped way was reported as it failed
        kernels = f"{f['kernels_per_step']:.0f}" if f["kernels_per_step"] is not None else "-"
        print(
            f"{t} trial(s) {way.replace('xK', f'x{args.k}'):15s} {f['ms_per_step']:.4f} ms/step "
            f"({f['over_engine']:.2f}x the engine so far), kernels/step {kernels:>3s}, full run's training "
            f"{f['full_run_training_s']:.0f} s, max |w - eager| {f['max_abs_diff_vs_eager']:.1e}",
            flush=True,
        )
    if args.json:
        payload = {"device_model": args.model, **args.env, "steps": args.steps, "k": args.k, "repeats": args.repeats}
        lot.write_text(Path(args.json), json.dumps({**payload, "trials": done}, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per repeat (a multiple of --k, <= 1000)")
    parser.add_argument("--k", type=int, default=10, help="steps per graph for graph xK")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 5], help="trial counts (2 members each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", nargs="+", choices=WAYS, help="eager always runs first (default: all the device can)")
    parser.add_argument("--npz", default=str(ROOT / "data" / "mnist.npz"), help="MNIST npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not (args.k >= 1 and 2 * args.k <= args.steps <= 1000 and args.steps % args.k == 0):
        parser.error("--steps must be a multiple of --k, at least 2 --k and at most 1000 (one epoch)")
    if args.repeats < 1 or min(args.trials) < 1:
        parser.error("--repeats and --trials must be positive")
    device = lot.resolve_device(args.device)
    possible = WAYS if device.type == "cuda" else CPU_WAYS
    if not set(args.ways or ()) <= set(possible):
        parser.error(f"on {device.type} the ways are {', '.join(possible)}")
    args.ways = ["eager", *[w for w in args.ways or possible if w != "eager"]]
    train = lot.load_mnist(args.npz, device)[0]
    args.env = lot.environment()
    args.model = args.env["cuda_device"] or lot.cpu_model()
    print(f"device {device} ({args.model}, {args.env['cpu_threads']} threads), torch {args.env['torch']}")
    done: dict = {}
    for t in args.trials:
        measure(t, train, args, done)
    print("ratios against the engine's way, all measured:")
    for t, figures in done.items():
        ratios = [f"{w} {f['over_engine']:.2f}x" if "over_engine" in f else f"{w} skipped" for w, f in figures.items()]
        print(f"  {t} trial(s): " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
