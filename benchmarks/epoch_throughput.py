"""One epoch of ticket + control: the stacked engine against the usual way, timed in the same run.

The reference is how a lottery-ticket script is usually written: a torchvision MNIST dataset with
ToTensor/Normalize, DataLoader(batch_size=60, shuffle=True), an nn.Sequential LeNet-300-100,
torch.optim.SGD, and the weights multiplied by their mask after every step, run once for the
ticket and once for the control. The engine trains both members as one stacked network on
device-resident tensors (lot_improved.train_epoch). Prints both times and the ratio.

It also times one large square matmul on the same device in every repeat: the speed the
hardware gives matrix maths, against which the engine's matmul work per second is reported
(how close to the machine's ceiling a step already is).

    python benchmarks/epoch_throughput.py                 # full epoch (1000 steps), 3 repeats, CPU
    python benchmarks/epoch_throughput.py --steps 200     # quicker, fewer steps
    python benchmarks/epoch_throughput.py --device cuda --json results/benchmark_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lot_improved as lot  # noqa: E402


IDX_FILES = {
    "train-images-idx3-ubyte": "x_train",
    "train-labels-idx1-ubyte": "y_train",
    "t10k-images-idx3-ubyte": "x_test",
    "t10k-labels-idx1-ubyte": "y_test",
}


def write_idx(arrays: dict, root: Path) -> None:
    """torchvision's MNIST reads the raw IDX files: write them from arrays like mnist.npz's."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, key in IDX_FILES.items():
        a = np.asarray(arrays[key], dtype=np.uint8)
        header = struct.pack(">IIII", 2051, *a.shape) if a.ndim == 3 else struct.pack(">II", 2049, len(a))
        (raw / name).write_bytes(header + a.tobytes())


def write_idx_files(npz: Path, root: Path) -> None:
    """The bundled npz as torchvision's raw files (no network)."""
    with np.load(npz) as f:
        write_idx({k: f[k] for k in IDX_FILES.values()}, root)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(root: Path, device: torch.device, steps: int, seed: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((lot.MNIST_MEAN,), (lot.MNIST_STD,))])
    dataset = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    elapsed = 0.0
    for variant in range(2):  # ticket, then control: two separate trainings
        torch.manual_seed(seed + variant)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        ).to(device)
        layers = [m for m in model if isinstance(m, nn.Linear)]
        masks = [torch.ones_like(layer.weight) for layer in layers]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loader = torch.utils.data.DataLoader(dataset, batch_size=60, shuffle=True)
        sync(device)
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                for layer, mask in zip(layers, masks):
                    layer.weight.mul_(mask)
        sync(device)
        elapsed += time.perf_counter() - start
    return elapsed


@functools.lru_cache(maxsize=1)
def training_split(npz: Path, device: torch.device) -> lot.Split:
    """MNIST's training split on the device, loaded once for all the engine's epochs."""
    return lot.load_mnist(str(npz), device)[0]


def engine_setup(npz: Path, device: torch.device, seed: int, masks: Optional[list] = None, skip: bool = True) -> tuple:
    """A warmed-up ticket + control stack and its optimiser, data and order. masks: one member's
    boolean mask per layer (default: dense), for both members; skip: let the stack skip fc1's
    dead rows, as a run does on CPU."""
    train = training_split(npz, device)
    net = lot.LeNetStack(2, 2, device)
    starts = [lot.default_init(torch.Generator().manual_seed(seed + v)) for v in range(2)]
    masks = [torch.ones(o, i, dtype=torch.bool) for o, i in lot.SHAPES] if masks is None else masks
    net.load(lot.stack_members([lot.rewind(w, masks) for w in starts], device))
    opt = lot.MaskedSGD(net, [], lr=0.01, momentum=0.9)
    stacked = lot.stack_members([masks, masks], device)
    opt.set_masks([m.float() for m in stacked])
    if skip:
        net.skip_dead_rows(stacked[0])
    order = lot.epoch_order(len(train.y), [torch.Generator().manual_seed(seed)], device)
    lot.train_epoch(net, opt, train, order[:, : 20 * 60], 60)  # warm-up (allocator, kernels)
    return net, opt, train, order


def engine_epoch(npz: Path, device: torch.device, steps: int, seed: int) -> float:
    net, opt, train, order = engine_setup(npz, device, seed)
    sync(device)
    start = time.perf_counter()
    lot.train_epoch(net, opt, train, order[:, : steps * 60], 60)
    sync(device)
    return time.perf_counter() - start


def late_epoch_pair(npz: Path, device: torch.device, steps: int, seed: int, masks: list, chunk: int = 50) -> list:
    """Seconds for the same epoch on masks skipping fc1's dead rows, and computing every row. The
    two alternate every `chunk` steps, so a slow spell of the machine hits both alike; they must
    end with the same weights, bit for bit."""
    runs = [engine_setup(npz, device, seed, masks, skip) for skip in (True, False)]
    times = [0.0, 0.0]
    for first in range(0, steps, chunk):
        for i, (net, opt, train, order) in enumerate(runs):
            sync(device)
            start = time.perf_counter()
            lot.train_epoch(net, opt, train, order[:, : steps * 60], 60, first, until=min(first + chunk, steps))
            sync(device)
            times[i] += time.perf_counter() - start
    if not all(torch.equal(a, b) for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters())):
        raise SystemExit("skipping fc1's dead rows changed the weights")
    return times


def relative(path: Path) -> str:
    """path relative to the repository when inside it (committed figures name no one's home)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def last_round_masks(path: Path) -> tuple[int, list]:
    """(round, [fc1, fc2, fc3] boolean masks) of trial 0's last round in a run's masks.pt."""
    saved = torch.load(path, weights_only=True)
    rnd = saved["fc1"].shape[1] - 1
    return rnd, [saved[layer][0, rnd] for layer in lot.LAYERS]


# A step's matmul work for one member: forward through all three layers, the weight gradients of
# all three, and the activation gradients of fc2 and fc3 (none is needed for the input).
STEP_FLOP_PER_SAMPLE = 2 * (3 * lot.PRUNABLE - lot.SHAPES[0][0] * lot.SHAPES[0][1])


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The device's speed on one large square float32 matmul (GFLOP/s)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per member (1000 = one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; best and median reported")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--npz", default=str(ROOT / "data" / "mnist.npz"), help="MNIST npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(
        "--masks",
        default=str(ROOT / "results" / "trials1" / "masks.pt"),
        help="masks.pt of a run: the engine is also timed on its last round's mask (trial 0), skipping "
        "fc1's dead rows and not (interleaved, checked bit-identical); none: skip this",
    )
    args = parser.parse_args()
    if not 1 <= args.steps <= 1000 or args.repeats < 1:
        parser.error("--steps must be in 1..1000 and --repeats positive")
    if args.masks != "none" and not Path(args.masks).is_file():
        parser.error(f"--masks: no such file {args.masks} (a run's masks.pt, or none)")
    device = lot.resolve_device(args.device)
    late = None if args.masks == "none" else last_round_masks(Path(args.masks))
    reference, engine, ceiling, skipping, all_rows = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_idx_files(Path(args.npz), Path(tmp))
        for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits all
            reference.append(reference_epoch(Path(tmp), device, args.steps, args.seed + r))
            engine.append(engine_epoch(Path(args.npz), device, args.steps, args.seed + r))
            ceiling.append(matmul_gflops(device))
            if late is not None:
                pair = late_epoch_pair(Path(args.npz), device, args.steps, args.seed + r, late[1])
                skipping.append(pair[0])
                all_rows.append(pair[1])
    best = {"reference": min(reference), "engine": min(engine)}
    median = {"reference": statistics.median(reference), "engine": statistics.median(engine)}
    env = lot.environment()
    print(
        f"device {device} ({env['cuda_device'] or env['processor']}, {env['cpu_threads']} threads), "
        f"torch {env['torch']}, {args.steps} steps of batch 60, ticket + control, {args.repeats} repeats"
    )
    for name, label in (
        ("reference", "reference (DataLoader + nn.Sequential x2)"),
        ("engine", "engine (stacked, device tensors)"),
    ):
        print(
            f"{label:42s} best {best[name]:7.3f} s ({1e3 * best[name] / args.steps:.3f} ms/step), "
            f"median {median[name]:7.3f} s"
        )
    ratio, ratio_median = best["reference"] / best["engine"], median["reference"] / median["engine"]
    print(f"{'ratio reference / engine':42s} best {ratio:7.2f}x, median {ratio_median:.2f}x")
    work = 2 * 60 * STEP_FLOP_PER_SAMPLE * args.steps / 1e9  # GFLOP of matmul in the timed steps
    engine_gflops = work / best["engine"]
    print(
        f"{'engine matmul work':42s} {engine_gflops:.0f} GFLOP/s at its best; one 2048x2048 matmul: best "
        f"{max(ceiling):.0f}, median {statistics.median(ceiling):.0f} GFLOP/s "
        f"({100 * engine_gflops / max(ceiling):.0f}% of the best)"
    )
    if late is not None:
        live = int(late[1][0].any(1).sum())
        print(
            f"{'engine on round ' + str(late[0]) + ' mask (' + str(live) + '/300 rows live)':42s} "
            f"best {min(skipping):7.3f} s skipping dead rows, {min(all_rows):.3f} s computing every row: "
            f"{min(all_rows) / min(skipping):.2f}x"
        )
    if args.json:
        payload = {
            "device": str(device),
            **env,
            "steps": args.steps,
            "repeats": args.repeats,
            "reference_s": [round(t, 4) for t in reference],
            "engine_s": [round(t, 4) for t in engine],
            "ratio_best": round(ratio, 2),
            "ratio_median": round(ratio_median, 2),
            "engine_matmul_gflops_best": round(engine_gflops, 1),
            "matmul_2048_gflops": [round(g, 1) for g in ceiling],
        }
        if late is not None:
            payload.update(
                {
                    "late_masks": relative(Path(args.masks)),
                    "late_round": late[0],
                    "late_fc1_live_rows": live,
                    "late_skipping_s": [round(t, 4) for t in skipping],
                    "late_all_rows_s": [round(t, 4) for t in all_rows],
                    "late_skip_ratio_best": round(min(all_rows) / min(skipping), 2),
                }
            )
        lot.write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
