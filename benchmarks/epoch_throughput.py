"""One epoch of ticket + control, three ways and against the machine's floor, timed in one run.

- reference: how a lottery-ticket script is usually written: torchvision's MNIST dataset with
  ToTensor/Normalize, DataLoader(batch_size=60, shuffle=True), an nn.Sequential LeNet-300-100,
  torch.optim.SGD, the weights multiplied by their mask after every step; ticket, then control.
- peer: the same two trainings written plainly with the data already on the device (no
  DataLoader): the fair comparison for the engine.
- engine: both members as one stacked network (lot_improved.train_epoch).
- floor: the steps' dense matmul work at the rate of one large 2048x2048 float32 matmul on the
  same device, measured in every repeat: no engine of dense steps can be faster.

Repeats are interleaved, so a slow spell of the machine hits every way alike. Prints each time,
the ratios peer/engine, reference/engine and engine/floor.

    python benchmarks/epoch_throughput.py                 # full epoch (1000 steps), 3 repeats, CPU
    python benchmarks/epoch_throughput.py --steps 200     # quicker, fewer steps
    python benchmarks/epoch_throughput.py --device cuda --json benchmark_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

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


def masked_step(
    model: nn.Sequential, opt: torch.optim.Optimizer, masks: list, x: torch.Tensor, y: torch.Tensor
) -> None:
    """One plain training step, then each Linear's weights times its mask: how such scripts prune."""
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        for layer, mask in zip([m for m in model if isinstance(m, nn.Linear)], masks):
            layer.weight.mul_(mask)


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
            masked_step(model, opt, masks, x.to(device), y.to(device))
        sync(device)
        elapsed += time.perf_counter() - start
    return elapsed


def peer_epoch(train: lot.Split, device: torch.device, steps: int, seed: int) -> float:
    """The same two trainings written plainly, with the data already on the device."""
    elapsed = 0.0
    for variant in range(2):
        torch.manual_seed(seed + variant)
        model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        model = model.to(device)
        layers = [m for m in model if isinstance(m, nn.Linear)]
        masks = [torch.ones_like(layer.weight) for layer in layers]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        order = torch.randperm(len(train.y), device=device)
        sync(device)
        start = time.perf_counter()
        for step in range(steps):
            idx = order[step * 60 : (step + 1) * 60]
            masked_step(model, opt, masks, train.x[idx], train.y[idx])
        sync(device)
        elapsed += time.perf_counter() - start
    return elapsed


def engine_epoch(train: lot.Split, device: torch.device, steps: int, seed: int) -> float:
    """Both trainings as one stacked network, after a short warm-up (allocator, kernels, graphs)."""
    net = lot.LeNetStack(2, 2, device)
    starts = [lot.default_init(torch.Generator().manual_seed(seed + v)) for v in range(2)]
    net.load(lot.stack_members(starts, device))
    opt = lot.MaskedSGD(net, [torch.ones(2, o, i, device=device) for o, i in lot.SHAPES], lr=0.01, momentum=0.9)
    order = lot.epoch_order(len(train.y), [torch.Generator().manual_seed(seed)], device)
    lot.train_epoch(net, opt, train, order[:, : 20 * 60], 60)
    sync(device)
    start = time.perf_counter()
    lot.train_epoch(net, opt, train, order[:, : steps * 60], 60)
    sync(device)
    return time.perf_counter() - start


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


WAYS = {
    "reference": "reference (DataLoader + nn.Sequential x2)",
    "peer": "peer (device tensors + nn.Sequential x2)",
    "engine": "engine (stacked, device tensors)",
    "floor": "floor (dense FLOPs at the 2048 matmul rate)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=1000, help="steps per member (1000 = one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; best and median reported")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--npz", default=str(ROOT / "data" / "mnist.npz"), help="MNIST npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.steps <= 1000 or args.repeats < 1:
        parser.error("--steps must be in 1..1000 and --repeats positive")
    if not Path(args.npz).is_file():
        parser.error(f"--npz: no such file {args.npz}")
    device = lot.resolve_device(args.device)
    train = lot.load_mnist(args.npz, device)[0]
    work = 60 * STEP_FLOP_PER_SAMPLE * args.steps * 2 / 1e9  # GFLOP of matmul in the timed steps, 2 members
    times: dict[str, list[float]] = {k: [] for k in WAYS}
    ceiling = []
    with tempfile.TemporaryDirectory() as tmp:
        write_idx_files(Path(args.npz), Path(tmp))
        for r in range(args.repeats):
            times["reference"].append(reference_epoch(Path(tmp), device, args.steps, args.seed + r))
            times["peer"].append(peer_epoch(train, device, args.steps, args.seed + r))
            times["engine"].append(engine_epoch(train, device, args.steps, args.seed + r))
            ceiling.append(matmul_gflops(device))
            times["floor"].append(work / ceiling[-1])
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    env = lot.environment()
    model = env["cuda_device"] or lot.cpu_model()
    print(
        f"device {device} ({model}, {env['cpu_threads']} threads), torch {env['torch']}, "
        f"{args.steps} steps of batch 60, ticket + control, {args.repeats} repeats"
    )
    for name, label in WAYS.items():
        print(
            f"{label:46s} best {best[name]:7.3f} s ({1e3 * best[name] / args.steps:.3f} ms/step), "
            f"median {median[name]:7.3f} s"
        )
    ratios = {
        "peer_over_engine": best["peer"] / best["engine"],
        "reference_over_engine": best["reference"] / best["engine"],
        "engine_over_floor": best["engine"] / best["floor"],
    }
    print(
        f"{'ratios (best times)':46s} peer/engine {ratios['peer_over_engine']:.2f}x, "
        f"reference/engine {ratios['reference_over_engine']:.2f}x, engine/floor {ratios['engine_over_floor']:.2f}x"
    )
    if args.json:
        payload = {
            "device": str(device),
            "device_model": model,
            **env,
            "steps": args.steps,
            "repeats": args.repeats,
            **{f"{k}_s": [round(t, 6) for t in v] for k, v in times.items()},  # to 1 us: a 5-step test run takes ms
            "matmul_2048_gflops": [round(g, 1) for g in ceiling],
            **{k: round(v, 2) for k, v in ratios.items()},
        }
        lot.write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
