"""Lottery tickets in LeNet-300-100 on MNIST (Frankle & Carbin, ICLR 2019), in one file.

Claim. A dense network contains a sparse subnetwork (a "winning ticket") that, reset to the
network's original initialisation W0 and trained alone, matches the dense network's accuracy,
while the same sparse structure with a fresh random initialisation (the control) falls behind
as sparsity grows.

Method. Train LeNet-300-100 from W0; remove the 20% smallest-magnitude surviving weights,
ranked globally across all three layers; rewind the survivors to W0; train again; repeat for
20 rounds (down to 1.15% of the weights). Beside every ticket a control trains with the same
mask from a fresh random init, on the same batches. Every trial's tickets and controls train in
lock-step as one stacked network (batched matrix multiplies), which is what makes the full run
take minutes on a laptop CPU.

Run:
    pip install -r requirements.txt
    python lot_improved.py                 # full default run: 21 trainings of ticket + control
    python lot_improved.py --trials 3      # mean +- sd over 3 independent trials
    python lot_improved.py --help          # every flag
    torchrun --standalone --nproc-per-node 4 lot_improved.py --trials 8   # trials spread over processes

Result (results/trials3/summary.md, 3 trials, 2-core AMD EPYC, 17 min): at 1.15% of the weights
the ticket reaches 97.52 +- 0.23% test accuracy and the control 96.35 +- 0.31% (dense: 98.29 +- 0.03%).

Beside tickets and controls it trains, on request, random-mask controls, one-shot and
late-rewound tickets (--controls, --oneshot, --rewind-to), with early stopping on a validation
split (--val-size), the paper's own protocol (--preset paper) and a Fashion-MNIST transfer
(--transfer); and Zhou et al.'s (2019) sign-keeping controls, accuracy before training
(supermasks) and mask criteria (--controls signs,constant, --criterion); Frankle et al.'s (2020)
instability analysis, every member beside a twin on another data order (--stability); and masks
found at initialisation, SNIP, GraSP and SynFlow, with Frankle et al.'s (2021) shuffle and reinit
ablations (--controls snip,grasp,synflow,snip-shuffled,...,snip-reinit,...). Outputs land in --out
(default results/): results.csv, curves.csv, masks.pt, tickets.pt (load_ticket() turns any round
into a plain nn.Sequential), figures, summary.md, config.json and checkpoint.pt (--resume
continues from it). The README explains each one and
shows the runs committed in results/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import re
import shlex
import signal
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

Tensor = torch.Tensor

# ==================================================================================================
# Config
# ==================================================================================================


# --sparse: the pruning level (fraction of prunable weights alive) under which fc1, 88% of the
# weights, trains through sparse kernels on a CPU; they beat a dense matmul below about 20% of fc1,
# which global pruning reaches a round earlier (fc1 is pruned hardest). A level, not each mask's
# density: every member of a round shares it, so all switch in the same round whatever the stack
# holds (--trials, torchrun ranks, variants). Tuned on a 2-core AMD EPYC.
SPARSE_BELOW = 0.2
SPARSE_EVAL_BELOW = 0.05  # ... and under which they also carry evaluate()'s 10,000-image forward passes


@dataclass
class Config:
    """Every setting of a run. Each field is a command-line flag: `batch_size` is --batch-size.
    The defaults are the `improved` preset; --preset picks another, and explicit flags win."""

    preset: str = field(
        default="improved",
        metadata={
            "help": "improved (these defaults) | prototype (the original lot.py) | paper (Frankle & Carbin's "
            "LeNet setup); explicit flags override the preset"
        },
    )
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adam"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    batch_size: int = field(default=60, metadata={"help": "minibatch size"})
    epochs: int = field(default=20, metadata={"help": "training epochs per round"})
    iterations: int | None = field(
        default=None, metadata={"help": "training length per round in iterations, instead of --epochs"}
    )
    rounds: int = field(default=20, metadata={"help": "pruning rounds after the dense round 0 (rounds+1 trainings)"})
    prune_rate: float = field(
        default=0.2, metadata={"help": "fraction of the surviving weights removed per round, in (0, 1)"}
    )
    scope: str = field(
        default="global", metadata={"help": "global (one ranking across fc1, fc2, fc3) | layer (a rate per layer)"}
    )
    layer_rates: str | None = field(
        default=None,
        metadata={"help": "with --scope layer: prune rates of fc1,fc2,fc3, or one for all; none: --prune-rate for all"},
    )
    init: str = field(
        default="kaiming-uniform",
        metadata={"help": "kaiming-uniform (PyTorch's nn.Linear default) | xavier-normal (the paper's Glorot init)"},
    )
    controls: str = field(
        default="reinit",
        metadata={
            "help": "comma list of controls beside each ticket: reinit (its mask, a fresh init), random (a random "
            "mask with its per-layer counts, trained from W0), signs (its mask, fresh magnitudes with W0's signs), "
            "constant (its mask, W0's signs times the init's per-layer sd); snip, grasp, synflow (a mask found at "
            "W0 before any training, with the ticket's count of weights, trained from W0); snip-shuffled, ... (that "
            "mask shuffled within each layer), snip-reinit, ... (that mask, a fresh init); with signs, constant or "
            "the pruning-at-init controls, results.csv adds untrained_acc (and untrained_val_acc with --val-size)"
        },
    )
    criterion: str = field(
        default="magnitude",
        metadata={
            "help": "which weights pruning keeps: magnitude (largest |w_final|) | same-sign (largest |w_final| "
            "among those that kept W0's sign; the others go first) | increase (largest |w_final| - |w_initial|); "
            "other than magnitude, results.csv adds untrained_acc"
        },
    )
    reinit_draws: int = field(
        default=1,
        metadata={
            "help": "reinit controls per ticket, each a fresh draw (the paper draws several); the statistics "
            "average a trial's draws"
        },
    )
    oneshot: bool = field(
        default=False,
        metadata={"help": "also train one-shot tickets: pruned once from the dense round-0 weights to each level"},
    )
    rewind_to: str = field(
        default="0it",
        metadata={
            "help": "0it rewinds tickets to W0; e.g. 500it or 2ep adds a ticket rewound to that point of round-0 "
            "training (variant late_rewind)"
        },
    )
    stability: bool = field(
        default=False,
        metadata={
            "help": "instability analysis (Frankle et al. 2020): every member gets a twin with its mask, start and "
            "optimiser on a data order of its own; after each round the error along the straight line between the "
            "two (stability.csv, instability.png); twins double the members trained"
        },
    )
    val_size: int = field(
        default=0,
        metadata={"help": "hold out N training images per trial (seeded) for validation and early stopping; 0: off"},
    )
    eval_every: int = field(
        default=100, metadata={"help": "with --val-size: evaluate validation and test sets every N iterations"}
    )
    transfer: str | None = field(
        default=None,
        metadata={"help": "fashion-mnist: after the rounds, retrain every round's ticket mask on Fashion-MNIST"},
    )
    transfer_data: str | None = field(
        default=None, metadata={"help": "npz for --transfer (same keys as mnist.npz); else torchvision downloads it"}
    )
    seed: int = field(default=0, metadata={"help": "master seed: W0, controls and data order derive from it"})
    trials: int = field(default=1, metadata={"help": "independent trials (own W0, control draws, data order), stacked"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (auto picks CUDA when present)"})
    out: str = field(default="results", metadata={"help": "output directory"})
    data_dir: str = field(
        default="data",
        metadata={"help": "folder holding mnist.npz (or the npz itself); else torchvision downloads MNIST here"},
    )
    train_subset: int | None = field(
        default=None, metadata={"help": "train on the first N training images only (quick runs, tests)"}
    )
    data_parallel: bool = field(
        default=False, metadata={"help": "wrap the network in nn.DataParallel across all visible GPUs"}
    )
    sparse: bool | None = field(
        default=None,
        metadata={
            "help": f"on CPU, train fc1 through sparse CSR kernels in rounds with under {SPARSE_BELOW:.0%}% of the "
            "weights left: faster; equal to the dense engine (--no-sparse) within float rounding, not bit for bit; "
            "uses MKL"
        },
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run's files in --out"})
    replot: bool = field(
        default=False, metadata={"help": "only redraw summary.md and the figures from results.csv in --out"}
    )


PRESETS: dict[str, dict[str, Any]] = {
    "improved": {},  # the original lot_improved.py: global pruning, SGD, 20 epochs
    "prototype": {  # the original lot.py
        "scope": "layer",
        "layer_rates": "0.2",
        "optimizer": "adam",
        "lr": 1.2e-3,
        "batch_size": 64,
        "epochs": 5,
        "rounds": 10,
    },
    "paper": {  # Frankle & Carbin, LeNet-300-100 on MNIST
        "scope": "layer",
        "layer_rates": "0.2,0.2,0.1",
        "optimizer": "adam",
        "lr": 1.2e-3,
        "batch_size": 60,
        "iterations": 50_000,
        "init": "xavier-normal",
        "val_size": 5000,  # held out of the training set for early stopping
        "eval_every": 100,
    },
}
CHOICES = {
    "optimizer": ("sgd", "adam"),
    "scope": ("global", "layer"),
    "init": ("kaiming-uniform", "xavier-normal"),
    "criterion": ("magnitude", "same-sign", "increase"),
}
AT_INIT = ("snip", "grasp", "synflow")  # masks found at initialisation, from W0 alone
ABLATIONS = ("shuffled", "reinit")  # Frankle et al. (2021)'s: the mask shuffled within each layer; a fresh init
AT_INIT_VARIANTS = (*AT_INIT, *(f"{m}-{a}" for a in ABLATIONS for m in AT_INIT))  # in stacking order
CONTROLS = ("reinit", "random", "signs", "constant", *AT_INIT_VARIANTS)

# Settings that may differ when resuming: they change where files go or how the work is spread,
# not what is computed (a different device changes only the last bits; resuming warns).
RESUME_NEUTRAL = (
    "out",
    "data_dir",
    "device",
    "data_parallel",
    "sparse",
    "resume",
    "overwrite",
    "replot",
    "transfer",
    "transfer_data",
)


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def validate(cfg: Config) -> None:
    if not 0.0 < cfg.prune_rate < 1.0:
        raise UsageError(f"--prune-rate must be in (0, 1), got {cfg.prune_rate}")
    for name in ("rounds", "epochs", "batch_size", "trials", "reinit_draws"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.train_subset is not None and cfg.train_subset <= 0:
        raise UsageError(f"--train-subset must be a positive integer, got {cfg.train_subset}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if not (math.isfinite(cfg.momentum) and 0.0 <= cfg.momentum < 1.0):
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {cfg.seed}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: choose one")
    if cfg.val_size < 0:
        raise UsageError(f"--val-size must be 0 (off) or a positive number of images, got {cfg.val_size}")
    if cfg.eval_every <= 0:
        raise UsageError(f"--eval-every must be a positive number of iterations, got {cfg.eval_every}")
    if cfg.transfer not in (None, "fashion-mnist"):
        raise UsageError(f"--transfer must be fashion-mnist, got {cfg.transfer!r}")
    if cfg.transfer_data is not None and cfg.transfer is None:
        raise UsageError("--transfer-data needs --transfer fashion-mnist")
    if cfg.iterations is not None and cfg.iterations <= 0:
        raise UsageError(f"--iterations must be a positive integer, got {cfg.iterations}")
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise UsageError(f"--{name} must be one of {', '.join(options)}, got {getattr(cfg, name)!r}")
    layer_rates(cfg)  # each of these raises on a malformed value
    controls(cfg)
    rewind_point(cfg)
    if cfg.reinit_draws > 1 and "reinit" not in controls(cfg):
        raise UsageError("--reinit-draws needs the reinit control (--controls reinit,...)")
    if cfg.layer_rates is not None and cfg.scope == "global":
        raise UsageError("--layer-rates needs --scope layer (global pruning ranks all layers with --prune-rate)")
    if cfg.sparse and not torch.backends.mkl.is_available():
        raise UsageError(
            "--sparse needs PyTorch built with MKL, whose CSR kernels it uses; this build has none "
            "(torch.backends.mkl.is_available() is False): leave the flag out and fc1 trains dense"
        )


def sparse_engine(cfg: Config) -> bool:
    """--sparse as given, else on where PyTorch has MKL: its CSR products were tuned against MKL,
    and builds without it (macOS, aarch64) fall back to slower kernels or refuse."""
    return torch.backends.mkl.is_available() if cfg.sparse is None else cfg.sparse


def layer_rates(cfg: Config) -> tuple[float, ...]:
    """Prune rate of each layer under --scope layer: three values, or one for all."""
    if cfg.layer_rates is None:
        return (cfg.prune_rate,) * len(LAYERS)
    try:
        rates = tuple(float(v) for v in cfg.layer_rates.split(","))
    except ValueError:
        raise UsageError(f"--layer-rates must be numbers separated by commas, got {cfg.layer_rates!r}") from None
    rates = rates * len(LAYERS) if len(rates) == 1 else rates
    if len(rates) != len(LAYERS) or not all(0.0 < r < 1.0 for r in rates):
        raise UsageError(f"--layer-rates must be 1 or {len(LAYERS)} rates in (0, 1), got {cfg.layer_rates!r}")
    return rates


def controls(cfg: Config) -> tuple[str, ...]:
    chosen = tuple(c.strip() for c in cfg.controls.split(","))
    unknown = [c for c in chosen if c not in CONTROLS]
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if unknown or twice:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"{', '.join(twice)} given twice"
        raise UsageError(f"--controls must be a comma list of {', '.join(CONTROLS)}, got {cfg.controls!r} ({what})")
    return chosen


def rewind_point(cfg: Config) -> tuple[int, str]:
    """--rewind-to as (count, unit): 500it is (500, "it"), 2ep is (2, "ep")."""
    match = re.fullmatch(r"(\d+)(it|ep)", cfg.rewind_to)
    if not match:
        raise UsageError(
            f"--rewind-to must be a count of iterations or epochs like 0it, 500it or 2ep, got {cfg.rewind_to!r}"
        )
    return int(match[1]), match[2]


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return math.ceil(n_train / cfg.batch_size)


def round_steps(cfg: Config, n_train: int) -> int:
    """Training length of every round in iterations: --iterations, else --epochs full epochs."""
    return cfg.iterations or cfg.epochs * steps_per_epoch(cfg, n_train)


def rewind_iteration(cfg: Config, n_train: int) -> int:
    count, unit = rewind_point(cfg)
    k = count * (steps_per_epoch(cfg, n_train) if unit == "ep" else 1)
    if k > round_steps(cfg, n_train):
        raise UsageError(
            f"--rewind-to {cfg.rewind_to} is past the end of a round ({round_steps(cfg, n_train)} iterations)"
        )
    return k


@dataclass(frozen=True)
class Plan:
    """A run's settings resolved once, for n_train training images per trial: each trial's
    members in stacking order, the per-layer prune rates, and the lengths of epochs and rounds in
    steps (and where round 0's late-rewind point lies)."""

    cfg: Config
    names: tuple[str, ...]
    rates: tuple[float, ...]
    n_train: int
    epoch_steps: int
    round_steps: int
    late_rewind_step: int | None

    @property
    def epochs(self) -> int:
        return math.ceil(self.round_steps / self.epoch_steps)

    def steps_in(self, epoch: int) -> int:
        """Steps of epoch (1-based): whole epochs, then what is left of the round."""
        return min(self.epoch_steps, self.round_steps - (epoch - 1) * self.epoch_steps)


def make_plan(cfg: Config, n_train: int) -> Plan:
    names = variants(cfg)
    late = rewind_iteration(cfg, n_train) if "late_rewind" in names else None  # raises if past a round's end
    return Plan(cfg, names, layer_rates(cfg), n_train, steps_per_epoch(cfg, n_train), round_steps(cfg, n_train), late)


def variants(cfg: Config) -> tuple[str, ...]:
    """The members trained beside each other in every trial, in stacking order; the reinit
    control once per draw."""
    chosen = controls(cfg)
    late = rewind_point(cfg)[0] > 0
    return (
        "ticket",
        *(["control"] * cfg.reinit_draws if "reinit" in chosen else []),
        *(["random"] if "random" in chosen else []),
        *(["signs"] if "signs" in chosen else []),
        *(["constant"] if "constant" in chosen else []),
        *(v for v in AT_INIT_VARIANTS if v in chosen),
        *(["oneshot"] if cfg.oneshot else []),
        *(["late_rewind"] if late else []),
    )


def records_untrained(cfg: Config) -> bool:
    """Whether results.csv carries untrained_acc: with the controls and criteria that ask what a
    mask does before training (Zhou et al.'s supermasks, the masks found at initialisation); other
    runs keep their columns."""
    return bool({"signs", "constant", *AT_INIT_VARIANTS} & set(controls(cfg))) or cfg.criterion != "magnitude"


def at_init_parts(variant: str) -> tuple[str, str]:
    """(method, ablation) of a pruning-at-init variant: snip-shuffled is (snip, shuffled), snip
    (snip, ""); of any other variant ("", "")."""
    method, _, ablation = variant.partition("-")
    return (method, ablation) if variant in AT_INIT_VARIANTS else ("", "")


def at_init_methods(cfg: Config) -> tuple[str, ...]:
    """The methods whose masks the run needs: those trained, and those an ablation starts from (a
    shuffle or reinit without its method is allowed: the method's mask is found, not trained)."""
    needed = {at_init_parts(c)[0] for c in controls(cfg)}
    return tuple(m for m in AT_INIT if m in needed)


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The training device. Under torchrun (local_rank given) CUDA means this worker's own GPU."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if local_rank is not None and spec.startswith("cuda:"):
        raise UsageError("under torchrun use --device cuda (or auto): each process takes cuda:LOCAL_RANK")
    if local_rank is not None and spec in ("auto", "cuda") and (spec == "cuda" or torch.cuda.is_available()):
        spec = f"cuda:{local_rank}"
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)  # always with its index: the run's work is scoped to it
    return torch.device(spec)


def derive_seed(seed: int, trial: int, stream: str, *more: int) -> int:
    """Independent 63-bit seeds per (trial, stream, ...), so streams never disturb each other."""
    streams = ("init", "control", "data", "random", "split", "transfer", "signs", "twin", "shuffle", "fresh")
    stream_id = streams.index(stream)
    return int(np.random.SeedSequence([seed, trial, stream_id, *more]).generate_state(1, np.uint64)[0]) >> 1


def make_generator(seed: int, trial: int, stream: str, *more: int) -> torch.Generator:
    # CPU generators: the same draws on every device, then moved.
    return torch.Generator().manual_seed(derive_seed(seed, trial, stream, *more))


# ==================================================================================================
# Data
# ==================================================================================================

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NPZ_NAME = "mnist.npz"


@dataclass
class Split:
    x: Tensor  # [N, 784] float32, normalised, on the training device
    y: Tensor  # [N] int64


def check_mnist_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    """Reject anything that is not MNIST-shaped: a wrong file must fail here, not mid-training."""
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise UsageError(f"{what}: images must have shape (N, 28, 28), got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"{what}: labels must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise UsageError(f"{what}: holds no images")
    if x.dtype != np.uint8:
        raise UsageError(f"{what}: images must be uint8 0..255, got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise UsageError(f"{what}: labels must be integers in 0..9")


def load_npz(path: Path) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = tuple(np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    except KeyError as e:
        raise UsageError(f"{path}: not an MNIST npz (missing key {e})") from None
    except Exception as e:  # zip, pickle and format errors all mean the same to the user
        raise UsageError(f"{path}: unreadable or corrupt npz ({type(e).__name__}: {one_line(e)[:160]})") from None
    check_mnist_arrays(arrays[0], arrays[1], f"{path} [train]")
    check_mnist_arrays(arrays[2], arrays[3], f"{path} [test]")
    return arrays


@contextlib.contextmanager
def download_lock(root: Path) -> Iterator[None]:
    """Downloads into root one process at a time: torchrun's processes all load the data as they
    start, and two writing the same files would corrupt them. The first downloads; the others
    then find the files. No lock where root cannot be written (nothing can be downloaded there,
    and the download's own error says so) or the OS has no flock (Windows)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".download.lock", "a")
    except OSError:
        yield
        return
    with lock:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def torchvision_arrays(dataset: Callable, root: Path) -> tuple[np.ndarray, ...]:
    """A torchvision dataset's (x_train, y_train, x_test, y_test) under root: its files as they are
    (a read-only folder is fine), else downloaded first, one process at a time."""
    try:
        parts = [dataset(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError:  # "Dataset not found": only now is anything written
        with download_lock(root):
            parts = [dataset(str(root), train=train, download=True) for train in (True, False)]
    return tuple(a for part in parts for a in (part.data.numpy(), part.targets.numpy()))


def load_torchvision(root: Path) -> tuple[np.ndarray, ...]:
    """The pasted-notebook path: torchvision finds MNIST's raw files under root, or downloads them."""
    try:
        from torchvision import datasets

        arrays = torchvision_arrays(datasets.MNIST, root)
    except Exception as e:
        raise UsageError(
            f"MNIST not found: no {NPZ_NAME} in {root} and torchvision could not download it "
            f"({type(e).__name__}: {one_line(e)[:160]}); copy {NPZ_NAME} into --data-dir or run with network access"
        ) from None
    check_mnist_arrays(arrays[0], arrays[1], f"{root} [torchvision train]")
    check_mnist_arrays(arrays[2], arrays[3], f"{root} [torchvision test]")
    return arrays


def find_npz(data_dir: str) -> Path | None:
    given = Path(data_dir)
    candidates = [given] if given.suffix == ".npz" else [given / NPZ_NAME]
    if data_dir == Config.data_dir:
        # Run from another folder: fall back to the bundle next to the script (absent when pasted).
        script = globals().get("__file__")
        if script:
            candidates.append(Path(script).resolve().parent / "data" / NPZ_NAME)
    return next((p for p in candidates if p.is_file()), None)


def normalise(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> Tensor:
    """uint8 images [N, 28, 28] -> float32 [N, 784], (x / 255 - mean) / std: in place, on all threads."""
    x = torch.tensor(images.reshape(len(images), -1), dtype=torch.float32)  # astype: 10x slower, fresh process
    return x.div_(255.0).sub_(mean).div_(std)


def load_mnist_arrays(data_dir: str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as uint8 arrays, checked: the bundle, else torchvision."""
    npz = find_npz(data_dir)
    return load_npz(npz) if npz else load_torchvision(Path(data_dir))


def load_transfer_arrays(cfg: Config) -> tuple[np.ndarray, ...]:
    """Fashion-MNIST: the --transfer-data npz, else torchvision's download into --data-dir."""
    if cfg.transfer_data:
        if not Path(cfg.transfer_data).is_file():
            raise UsageError(f"--transfer-data {cfg.transfer_data}: no such file")
        return load_npz(Path(cfg.transfer_data))
    try:
        from torchvision import datasets

        root = Path(cfg.data_dir) if Path(cfg.data_dir).suffix != ".npz" else Path(cfg.data_dir).parent
        arrays = torchvision_arrays(datasets.FashionMNIST, root)
    except Exception as e:
        raise UsageError(
            f"Fashion-MNIST not found: torchvision could not download it into {cfg.data_dir} ({type(e).__name__}: "
            f"{one_line(e)[:120]}); pass --transfer-data PATH to an npz with x_train, y_train, x_test, y_test "
            "or run with network access"
        ) from None
    check_mnist_arrays(arrays[0], arrays[1], "Fashion-MNIST [train]")
    check_mnist_arrays(arrays[2], arrays[3], "Fashion-MNIST [test]")
    return arrays


def fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of the arrays: a resumed run must train on the same data, wherever it lives now."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def to_splits(
    arrays: Sequence[np.ndarray], device: torch.device, train_subset: int | None = None, own_stats: bool = False
) -> tuple[Split, Split]:
    """Normalised tensors on the device. MNIST uses its standard constants; another dataset
    (own_stats) the mean and std of its own training pixels."""
    x_tr, y_tr, x_te, y_te = arrays
    if train_subset is not None:
        if train_subset > len(x_tr):
            raise UsageError(f"--train-subset {train_subset} exceeds the {len(x_tr)} training images")
        x_tr, y_tr = x_tr[:train_subset], y_tr[:train_subset]
    mean, std = (float(x_tr.mean()) / 255.0, float(x_tr.std()) / 255.0) if own_stats else (MNIST_MEAN, MNIST_STD)
    labels = [torch.from_numpy(y.astype(np.int64)).to(device) for y in (y_tr, y_te)]
    return Split(normalise(x_tr, mean, std).to(device), labels[0]), Split(
        normalise(x_te, mean, std).to(device), labels[1]
    )


def load_mnist(data_dir: str, device: torch.device, train_subset: int | None = None) -> tuple[Split, Split]:
    return to_splits(load_mnist_arrays(data_dir), device, train_subset)


def epoch_order(index: Tensor | int, generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """Each trial's training images (index [trials, n] into the training split, or n for all of
    them) in a seeded order of its own: [trials, n]. Batches are slices of it."""
    if isinstance(index, int):
        index = torch.arange(index).expand(len(generators), index)
    return torch.stack([i[torch.randperm(len(i), generator=g)] for i, g in zip(index, generators)]).to(device)


def validation_split(seed: int, trials: int | Sequence[int], n: int, val_size: int) -> tuple[Tensor, Tensor]:
    """Per trial, val_size images held out for validation and the rest for training, drawn from
    the trial's own seeded stream: (train index [trials, n - val_size], val index [trials, val_size]).
    With val_size 0 every trial trains on all n images in their original order."""
    ids = range(trials) if isinstance(trials, int) else trials  # trial ids seed the split
    if val_size == 0:
        return torch.arange(n).expand(len(ids), n), torch.zeros(len(ids), 0, dtype=torch.long)
    perms = [torch.randperm(n, generator=make_generator(seed, t, "split")) for t in ids]
    return (
        torch.stack([p[val_size:].sort().values for p in perms]),
        torch.stack([p[:val_size].sort().values for p in perms]),
    )


# ==================================================================================================
# Model: LeNet-300-100, many independent copies stacked into one network
# ==================================================================================================

LAYERS = ("fc1", "fc2", "fc3")
DIMS = (784, 300, 100, 10)
SHAPES = tuple((out, inp) for inp, out in zip(DIMS[:-1], DIMS[1:]))  # (out, in) per layer
PRUNABLE = sum(o * i for o, i in SHAPES)  # 266,200 weights; the 410 biases are never pruned


def default_init(generator: torch.Generator, scheme: str = "kaiming-uniform") -> list[Tensor]:
    """One LeNet's [w1, w2, w3, b1, b2, b3]. kaiming-uniform: exactly what nn.Linear draws (same
    generator state, same numbers): kaiming_uniform(a=sqrt 5) weights, U(+-1/sqrt(fan_in)) biases.
    xavier-normal: Glorot-normal weights and zero biases, the paper's (TensorFlow) default."""
    weights, biases = [], []
    for out, inp in SHAPES:
        w, b = torch.empty(out, inp), torch.empty(out)
        if scheme == "xavier-normal":
            nn.init.xavier_normal_(w, generator=generator)
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            nn.init.uniform_(b, -1 / math.sqrt(inp), 1 / math.sqrt(inp), generator=generator)
        weights.append(w)
        biases.append(b)
    return weights + biases


def init_std(scheme: str, out: int, inp: int) -> float:
    """The standard deviation of default_init's weights in an (out, in) layer: kaiming-uniform
    draws U(+-1/sqrt(in)), sd 1/sqrt(3 in); xavier-normal sd sqrt(2 / (in + out))."""
    return math.sqrt(2 / (inp + out)) if scheme == "xavier-normal" else 1 / math.sqrt(3 * inp)


def lenet_forward(x: Tensor, w: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """x [M,B,784] -> hidden activations h1 [M,B,300], h2 [M,B,100] and log-probabilities [M,B,10]."""
    h1 = torch.baddbmm(b[0].unsqueeze(1), x, w[0].transpose(1, 2)).relu_()
    return (h1, *lenet_upper(h1, w, b))


def lenet_upper(h1: Tensor, w: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """fc2 and fc3: h1 [M,B,300] -> h2 [M,B,100] and log-probabilities [M,B,10]."""
    h2 = torch.baddbmm(b[1].unsqueeze(1), h1, w[1].transpose(1, 2)).relu_()
    return h2, torch.baddbmm(b[2].unsqueeze(1), h2, w[2].transpose(1, 2)).log_softmax(-1)


def nll(logp: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy [M,B] from log-probabilities [M,B,10] and labels [M,B]."""
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def lenet_deltas(
    y: Tensor, w: Sequence[Tensor], h1: Tensor, h2: Tensor, logp: Tensor, dloss: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of sum(dloss * per-sample loss) with respect to each layer's pre-activations
    [M,B,300], [M,B,100], [M,B,10]. Consumes logp."""
    d3 = logp.exp_()  # dloss/dlogits = softmax - onehot
    d3.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(d3[..., :1], -1.0))
    d3.mul_(dloss.unsqueeze(-1) if isinstance(dloss, Tensor) else dloss)
    d2 = torch.ops.aten.threshold_backward(torch.bmm(d3, w[2]), h2, 0)  # ReLU': 1 where h > 0
    return torch.ops.aten.threshold_backward(torch.bmm(d2, w[1]), h1, 0), d2, d3


def lenet_backward(
    x: Tensor,
    y: Tensor,
    w: Sequence[Tensor],
    h1: Tensor,
    h2: Tensor,
    logp: Tensor,
    dloss: Tensor | float,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Gradients [dw1, dw2, dw3, db1, db2, db3] of sum(dloss * per-sample loss): six batched
    matmuls. Consumes logp. out: optional buffers for the six gradients (saves allocations)."""
    deltas = lenet_deltas(y, w, h1, h2, logp, dloss)
    out = out or [None] * 6
    return layer_grads(deltas, (x, h1, h2), out[:3]) + [torch.sum(d, 1, out=o) for d, o in zip(deltas, out[3:])]


def layer_grads(deltas: Sequence[Tensor], inputs: Sequence[Tensor], out: Sequence[Tensor | None]) -> list[Tensor]:
    """Weight gradients d^T a [M,out,in] of layers with pre-activation gradients d and inputs a."""
    return [torch.bmm(d.transpose(1, 2), a, out=o) for d, a, o in zip(deltas, inputs, out)]


class _StackedLeNetLoss(torch.autograd.Function):
    """The same maths behind autograd, for nn.DataParallel, which needs a differentiable forward."""

    @staticmethod
    def forward(ctx, x, y, *params):  # params: w1, w2, w3, b1, b2, b3
        (w1, w2, w3), biases = params[:3], params[3:]
        h1, h2, logp = lenet_forward(x, (w1, w2, w3), biases)
        ctx.save_for_backward(x, y, w2, w3, h1, h2, logp)
        return nll(logp, y)

    @staticmethod
    def backward(ctx, dloss):
        x, y, w2, w3, h1, h2, logp = ctx.saved_tensors
        return (None, None, *lenet_backward(x, y, (None, w2, w3), h1, h2, logp.clone(), dloss))


class LeNetStack(nn.Module):
    """M independent LeNet-300-100s: weights [M, out, in], biases [M, out].

    Members are grouped by trial (members_per_trial consecutive members share a trial's data).
    Inputs are x [T, B, 784] and y [T, B], T = trials, or T = 1 for the same images for every
    member; batch is dim 1, so nn.DataParallel(net, dim=1) splits batches, not members.
    forward(x) gives log-probabilities [M, B, 10]; forward(x, y) per-sample losses [M, B] through autograd;
    backprop(x, y) the same losses, with the gradients of their batch mean written to .grad
    directly (no autograd: about 2x faster per step on CPU at these sizes).

    All parameters are views into one flat tensor, and their gradients into another, so the
    optimiser updates every member's every layer in one pass per operation."""

    def __init__(self, members: int, members_per_trial: int, device: torch.device):
        super().__init__()
        self.members, self.members_per_trial = members, members_per_trial
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(members, o, i, device=device)) for o, i in SHAPES])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(members, o, device=device)) for o, _ in SHAPES])
        self.graph_fallbacks: list[str] = []  # why this stack's CUDA graphs were given up, if they were (step_graph)
        self._pack()

    def _pack(self) -> None:
        """(Re)build the flat parameter and gradient tensors, keeping the current values."""
        params = [*self.weights, *self.biases]
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.flat_grad = torch.zeros_like(self.flat)
        for p, view in zip(params, views_like(self.flat, params)):
            p.data = view
        self._grads = views_like(self.flat_grad, params)
        # Plain tuples for the per-step fast path: ParameterList indexing costs ~5 us a call.
        # (nn.DataParallel replicas do not update these; they only ever run forward().)
        self._w, self._b = tuple(self.weights), tuple(self.biases)
        self._graphs: dict = {}  # CUDA graphs captured on these buffers (step_graph); a re-pack drops them
        self.sparse: SparseFC1 | None = None  # a CPU round's sparse fc1 steps (sparse_fc1), while one runs

    def _apply(self, fn: Callable, recurse: bool = True) -> LeNetStack:
        super()._apply(fn, recurse)  # .to(), .double(), ...: new tensors, so pack them again
        self._pack()
        return self

    def grads(self) -> list[Tensor]:
        """The six gradient views into flat_grad, attached as .grad. A gradient that autograd
        left elsewhere (after zero_grad(set_to_none=True)) is copied in first."""
        for p, g in zip([*self._w, *self._b], self._grads):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g
        return self._grads

    def per_member(self, t: Tensor) -> Tensor:
        """[T, B, ...] -> [M, B, ...]: each trial's batch for each of its members (a view if T=1)."""
        copies = self.members if t.shape[0] == 1 else self.members_per_trial
        return t.unsqueeze(1).expand(t.shape[0], copies, *t.shape[1:]).reshape(self.members, *t.shape[1:])

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        xm = self.per_member(x)
        if y is None:
            return lenet_forward(xm, self.weights, self.biases)[2]
        return _StackedLeNetLoss.apply(xm, self.per_member(y), *self.weights, *self.biases)

    @torch.no_grad()
    def backprop(self, x: Tensor, y: Tensor) -> Tensor:
        w, b = self._w, self._b
        xm, ym = self.per_member(x), self.per_member(y)
        h1, h2, logp = lenet_forward(xm, w, b)
        losses = nll(logp, ym)
        lenet_backward(xm, ym, w, h1, h2, logp, 1.0 / x.shape[1], self.grads())
        return losses

    @torch.no_grad()
    def load(self, params: Sequence[Tensor]) -> None:
        for p, value in zip([*self.weights, *self.biases], params):
            p.copy_(value)


def views_like(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive views of flat shaped like tensors (flat holds them end to end)."""
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def unwrap(net: nn.Module) -> LeNetStack:
    return net.module if isinstance(net, nn.DataParallel) else net


def masked_fraction(masks: Sequence[Tensor]) -> float:
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def pruning_level(stacked: Sequence[Tensor]) -> float:
    """The fraction of prunable weights alive in the stacked masks' fullest member: the round's
    level, which every member of a round shares."""
    live = sum(m.flatten(1).sum(1) for m in stacked)
    return int(live.max()) / sum(m[0].numel() for m in stacked)


# ==================================================================================================
# Pruning: global magnitude pruning (or another criterion) with rewind to W0
# ==================================================================================================


def prune_count(surviving: int, rate: float) -> int:
    """Weights removed this round: round(rate * surviving), as torch.nn.utils.prune counts."""
    return round(rate * surviving)


def surviving_schedule(total: int, rate: float, rounds: int) -> list[int]:
    counts = [total]
    for _ in range(rounds):
        counts.append(counts[-1] - prune_count(counts[-1], rate))
    return counts


def prune_scores(criterion: str, final: Sequence[Tensor], initial: Sequence[Tensor]) -> list[Tensor]:
    """What pruning ranks, per weight, the lowest going first (Zhou et al.'s mask criteria):
    magnitude |w_final| (Frankle & Carbin's); increase |w_final| - |w_initial|; same-sign
    |w_final|, less a constant above every |w| where the weight's sign flipped, so that flipped
    weights go first, the smallest first (not by position: that would strip fc1's first rows)."""
    if criterion == "magnitude":
        return [w.abs() for w in final]
    if criterion == "increase":
        return [f.abs() - i.abs() for f, i in zip(final, initial)]
    above = 1.0 + max(float(f.abs().max()) for f in final)
    return [  # float64: the offset must not blur the order of the flipped weights' magnitudes
        torch.where(torch.sign(f) == torch.sign(i), f.abs().double(), f.abs().double() - above)
        for f, i in zip(final, initial)
    ]


def prune_smallest(scores: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> list[Tensor]:
    """New masks without the k lowest-scoring survivors, ranked across all the given layers
    together. Ties go by position (first layer first, row-major), so the result is
    deterministic. Already-pruned weights score +inf and are never chosen again."""
    ranked = torch.cat([torch.where(m, s, torch.inf).flatten() for s, m in zip(scores, masks)])
    flat = torch.cat([m.flatten() for m in masks])
    flat[torch.sort(ranked, stable=True).indices[:k]] = False
    return [part.view_as(m) for part, m in zip(flat.split([m.numel() for m in masks]), masks)]


def global_prune(scores: Sequence[Tensor], masks: Sequence[Tensor], rate: float) -> list[Tensor]:
    """One network's new masks: drop round(rate * surviving) of its weights, lowest score first,
    all layers ranked together."""
    return prune_smallest(scores, masks, prune_count(sum(int(m.sum()) for m in masks), rate))


def layerwise_prune(scores: Sequence[Tensor], masks: Sequence[Tensor], rates: Sequence[float]) -> list[Tensor]:
    """Each layer loses round(rate_l * its survivors), lowest score first within the layer."""
    return [prune_smallest([s], [m], prune_count(int(m.sum()), r))[0] for s, m, r in zip(scores, masks, rates)]


def prune(cfg: Config, final: Sequence[Tensor], initial: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
    """One network's masks after a round: its trained weights (final) against its starting ones."""
    scores = prune_scores(cfg.criterion, final, initial)
    if cfg.scope == "layer":
        return layerwise_prune(scores, masks, layer_rates(cfg))
    return global_prune(scores, masks, cfg.prune_rate)


def oneshot_masks(cfg: Config, dense: Sequence[Tensor], w0: Sequence[Tensor], rnd: int) -> list[Tensor]:
    """Masks pruned in one go from the dense trained weights (against W0) to round rnd's level of
    the iterative schedule: the same total (global) or per-layer (layer scope) count."""
    full = [torch.ones_like(w, dtype=torch.bool) for w in dense]
    scores = prune_scores(cfg.criterion, dense, w0)
    if cfg.scope == "layer":
        kept = [surviving_schedule(m.numel(), r, rnd)[-1] for m, r in zip(full, layer_rates(cfg))]
        return [prune_smallest([s], [m], m.numel() - k)[0] for s, m, k in zip(scores, full, kept)]
    return prune_smallest(scores, full, PRUNABLE - surviving_schedule(PRUNABLE, cfg.prune_rate, rnd)[-1])


def random_masks(counts: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Uniformly random masks keeping counts[l] weights of layer l."""
    masks = []
    for (out, inp), k in zip(SHAPES, counts):
        flat = torch.zeros(out * inp, dtype=torch.bool)
        flat[torch.randperm(out * inp, generator=generator)[:k]] = True
        masks.append(flat.view(out, inp))
    return masks


# Pruning at initialisation: SNIP (Lee et al., 2019), GraSP (Wang et al., 2020) and SynFlow (Tanaka et
# al., 2020) score W0 before any training, on one plain LeNet in float64 (CPU, autograd): the same
# bits on every device and in every process, however many members are stacked.
SCORE_PER_CLASS = 10  # SNIP's and GraSP's images: the first 10 of each class in a trial's training split
GRASP_TEMPERATURE = 200.0  # the authors' T: logits / T before the cross-entropy
SYNFLOW_STEPS = 100  # SynFlow's iterations per mask, on an exponential schedule


def mlp_logits(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """Logits [N, classes] of a plain ReLU network (any depth), images x [N, in]."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = torch.addmm(b, x, w.t())
        x = x.relu() if i < len(weights) - 1 else x
    return x


def leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().double().requires_grad_() for t in tensors]


def snip_scores(weights: Sequence[Tensor], biases: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """SNIP's connection sensitivity |dL/dw * w| (= |dL/dc| at mask c = 1), L the mean cross-entropy
    on the images x, y. The highest are kept."""
    w = leaves(weights)
    loss = nn.functional.cross_entropy(mlp_logits(x.double(), w, [b.double() for b in biases]), y)
    return [(g * v).abs().detach() for g, v in zip(torch.autograd.grad(loss, w), w)]


def grasp_scores(
    weights: Sequence[Tensor], biases: Sequence[Tensor], x: Tensor, y: Tensor, temperature: float = GRASP_TEMPERATURE
) -> list[Tensor]:
    """GraSP's -w * Hg, g and H the gradient and Hessian (weights only, biases held) of the mean
    cross-entropy of logits / temperature; Hg by double backprop, d(g_stopped . g)/dw. The highest
    are removed: they are the weights whose removal most reduces the gradient flow."""
    w = leaves(weights)
    loss = nn.functional.cross_entropy(mlp_logits(x.double(), w, [b.double() for b in biases]) / temperature, y)
    g = torch.autograd.grad(loss, w, create_graph=True)
    hg = torch.autograd.grad(sum((gi * gi.detach()).sum() for gi in g), w)
    return [-(v * h).detach() for v, h in zip(w, hg)]


def synflow_scores(weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
    """SynFlow's |dR/dw * w|: every parameter (biases too) replaced by its absolute value, R the
    sum of the logits of an all-ones input, in float64. Pruned weights (0) score 0."""
    w = leaves([t.abs() for t in weights])
    r = mlp_logits(torch.ones(1, w[0].shape[1], dtype=torch.float64), w, [b.double().abs() for b in biases]).sum()
    return [(g * v).abs().detach() for g, v in zip(torch.autograd.grad(r, w), w)]


def keep_ranks(keys: Sequence[Tensor]) -> list[Tensor]:
    """Each weight's place in the order of keeping, ranked across the given layers together: 0
    for the highest key; ties by position (first layer first, row-major). The mask keeping k
    weights is rank < k, so the masks of lower counts nest."""
    flat = torch.cat([k.flatten() for k in keys])
    ranks = torch.empty(len(flat), dtype=torch.int32)
    ranks[torch.sort(flat, descending=True, stable=True).indices] = torch.arange(len(flat), dtype=torch.int32)
    return [part.view_as(k) for part, k in zip(ranks.split([k.numel() for k in keys]), keys)]


def ranked_keys(method: str, weights: Sequence[Tensor], biases: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """What SNIP and GraSP keep first, highest first: SNIP's score, GraSP's negated (it removes its highest)."""
    if method == "snip":
        return snip_scores(weights, biases, x, y)
    return [-s for s in grasp_scores(weights, biases, x, y)]


def score_ranks(method: str, params: Sequence[Tensor], x: Tensor, y: Tensor, per_layer: bool) -> list[Tensor]:
    """SNIP's or GraSP's keep ranks of one LeNet's [w1, w2, w3, b1, b2, b3]: across all layers
    (global scope), or within each (layer scope)."""
    keys = ranked_keys(method, params[: len(LAYERS)], params[len(LAYERS) :], x, y)
    return [keep_ranks([k])[0] for k in keys] if per_layer else keep_ranks(keys)


def exponential_count(total: int, kept: int, step: int, steps: int) -> int:
    """Weights alive after step of steps (1-based) when pruning total down to kept on SynFlow's
    exponential schedule, density (kept / total) ** (step / steps); exactly kept at the end."""
    return kept if step == steps else round(total * (kept / total) ** (step / steps))


def synflow_masks(
    params: Sequence[Tensor], counts: Sequence[int], per_layer: bool, steps: int = SYNFLOW_STEPS
) -> list[Tensor]:
    """SynFlow's masks of one network ([w..., b...]) keeping counts[l] weights of layer l (global
    scope: their sum, ranked across layers): steps rounds of scoring the masked network and
    pruning its lowest scores, down an exponential schedule. Scores change as weights go, so
    masks of lower counts need not nest in those of higher ones."""
    n = len(counts)
    weights, biases = [w.double() for w in params[:n]], params[n:]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    for step in range(1, steps + 1):
        scores = synflow_scores([torch.where(m, w, 0.0) for w, m in zip(weights, masks)], biases)
        if per_layer:
            masks = [
                drop_lowest([s], [m], int(m.sum()) - exponential_count(m.numel(), k, step, steps))[0]
                for s, m, k in zip(scores, masks, counts)
            ]
        else:
            alive = sum(int(m.sum()) for m in masks)
            target = exponential_count(sum(m.numel() for m in masks), sum(counts), step, steps)
            masks = drop_lowest(scores, masks, alive - target)
    return masks


def drop_lowest(scores: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> list[Tensor]:
    """prune_smallest's masks, the same weights (ties by position, the first dropped first), by
    selection instead of a sort: several times faster, for SynFlow's hundred steps a mask."""
    flat, alive = torch.cat([s.flatten() for s in scores]), torch.cat([m.flatten() for m in masks])
    if k > 0:
        value = torch.kthvalue(flat[alive], k).values  # the k-th lowest surviving score
        drop = alive & (flat < value)
        ties = (alive & (flat == value)).nonzero().squeeze(1)
        alive &= ~drop
        alive[ties[: k - int(drop.sum())]] = False
    return [part.view_as(m) for part, m in zip(alive.split([m.numel() for m in masks]), masks)]


def shuffle_masks(masks: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Each layer's mask permuted at random (as open_lth's shuffle): its count kept, its positions not."""
    return [m.flatten()[torch.randperm(m.numel(), generator=generator)].view_as(m) for m in masks]


def score_images(train: Split, index: Tensor, per_class: int = SCORE_PER_CLASS) -> tuple[Tensor, Tensor]:
    """SNIP's and GraSP's fixed batch: the first per_class images of each class among index (a
    trial's training images, in dataset order: never its validation images), class by class as
    GraSP's authors batch them; on the CPU."""
    index = index.to(train.y.device)
    labels = train.y[index]
    picked = torch.cat([index[labels == c][:per_class] for c in range(DIMS[-1])])
    return train.x[picked].cpu(), train.y[picked].cpu()


def rewind(init: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
    """Weights reset to their initial values times the mask; biases reset, never masked."""
    n = len(masks)
    return [w * m for w, m in zip(init[:n], masks)] + [b.clone() for b in init[n:]]


# ==================================================================================================
# Training
# ==================================================================================================


class MaskedSGD:
    """torch.optim.SGD's update (buf = momentum * buf + grad; w -= lr * buf), with every weight
    gradient multiplied by its mask first. The masked gradient keeps a pruned weight, and its
    momentum, exactly 0.0 for the whole round. Three passes over the stack's flat parameters
    (the same arithmetic, element by element, as the per-tensor foreach kernels)."""

    def __init__(self, net: LeNetStack, masks: Sequence[Tensor], lr: float, momentum: float):
        self.net = net
        self.param, self.grad = net.flat, net.flat_grad
        self.buf = torch.zeros_like(self.param)
        self.bufs = views_like(self.buf, [*net.weights, *net.biases])  # per parameter, for checkpoints
        self.mask: Tensor | None = None
        self.set_masks(masks)
        self.lr, self.momentum = lr, momentum
        self.steps = 0
        self.segments = self.whole()  # what step() updates: the whole stack, or a sparse round's live part

    def whole(self) -> list[tuple[Tensor, ...]]:
        """The flat tensors step() updates, as one segment: (param, grad, mask, buffers...)."""
        return [(self.param, self.grad, self.mask, self.buf)]

    def set_masks(self, masks: Sequence[Tensor]) -> None:
        """One float mask per weight tensor (none: all ones); flattened beside ones for the biases."""
        weights = sum(w.numel() for w in self.net.weights)
        parts = [m.reshape(-1).to(self.param) for m in masks] or [self.param.new_ones(weights)]
        mask = torch.cat([*parts, self.param.new_ones(self.param.numel() - weights)])
        if self.mask is None:
            self.mask = mask
        else:
            self.mask.copy_(mask)  # in place: a captured CUDA graph reads this very tensor

    def state(self) -> list[Tensor]:
        return self.bufs

    @torch.no_grad()
    def restore(self, state: Sequence[Tensor], steps: int) -> None:
        """Continue from a checkpoint's optimiser buffers and step count."""
        for buf, saved in zip(self.state(), state):
            buf.copy_(saved)
        self.steps = steps

    @torch.no_grad()
    def reset(self) -> None:
        """A fresh optimiser for a new round."""
        for t in self.state():
            t.zero_()
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.update()
        self.steps += 1

    @torch.no_grad()
    def update(self) -> None:
        """The step's arithmetic alone, no Python state: what a CUDA graph or torch.compile captures."""
        for param, grad, mask, buf in self.segments:
            buf.mul_(self.momentum).addcmul_(grad, mask)  # grad * mask is exact: same bits
            param.add_(buf, alpha=-self.lr)


class MaskedAdam(MaskedSGD):
    """torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8) on masked gradients, in the order
    of its capturable foreach kernels: the step count and both bias corrections live on the
    device, so a CUDA graph replays the step with the count it has reached, not the one it was
    captured at. A pruned weight's moments stay 0, so its update 0 / (0 + eps) is 0."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, net: LeNetStack, masks: Sequence[Tensor], lr: float):
        self.square = torch.zeros_like(net.flat)  # second moments; buf holds the first
        self.count = torch.zeros((), device=net.flat.device)  # steps taken, as a device scalar
        super().__init__(net, masks, lr, momentum=0.0)
        self.squares = views_like(self.square, self.bufs)

    def whole(self) -> list[tuple[Tensor, ...]]:
        return [(self.param, self.grad, self.mask, self.buf, self.square)]

    def state(self) -> list[Tensor]:
        return self.bufs + self.squares

    def restore(self, state: Sequence[Tensor], steps: int) -> None:
        super().restore(state, steps)
        self.count.fill_(steps)

    @torch.no_grad()
    def reset(self) -> None:
        super().reset()
        self.count.zero_()

    @torch.no_grad()
    def update(self) -> None:
        (beta1, beta2), lr = self.betas, self.lr
        self.count.add_(1)
        step_size = torch.pow(beta1, self.count).sub_(1).div_(lr).reciprocal_()  # -lr / (1 - beta1^t)
        correction2 = torch.pow(beta2, self.count).sub_(1).neg_().sqrt_()  # sqrt(1 - beta2^t)
        for param, grad, mask, buf, square in self.segments:
            grad.mul_(mask)
            buf.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            param.addcdiv_(buf, square.sqrt().div_(correction2).add_(self.eps).div_(step_size))


def make_optimizer(cfg: Config, net: LeNetStack) -> MaskedSGD:
    if cfg.optimizer == "adam":
        return MaskedAdam(net, [], cfg.lr)
    return MaskedSGD(net, [], cfg.lr, cfg.momentum)


def train_on_masks(opt: MaskedSGD, masks: Sequence[Tensor]) -> None:
    """Train on these stacked boolean masks from now on: the optimiser masks the gradients."""
    opt.set_masks([m.float() for m in masks])


def train_step(net: nn.Module, opt: MaskedSGD, train: Split, idx: Tensor) -> Tensor:
    """One optimiser step of every member on the batch idx [trials, B]: per-sample losses [M, B]."""
    losses = batch_gradients(net, train, idx)
    opt.step()
    return losses


def batch_gradients(net: nn.Module, train: Split, idx: Tensor) -> Tensor:
    """Per-sample losses [M, B] of every member on the batch idx [trials, B], the gradients of
    their batch means left in the stack's flat gradient."""
    stack = unwrap(net)
    flat = idx.reshape(-1)  # index_select copies a batch twice as fast as x[idx]
    x, y = train.x.index_select(0, flat).view(*idx.shape, -1), train.y.index_select(0, flat).view(idx.shape)
    if net is stack:
        losses = (stack.sparse or stack).backprop(x, y)
    else:  # nn.DataParallel: autograd splits the batch over GPUs and sums the gradients back
        losses = net(x, y)
        stack.zero_grad(set_to_none=True)
        (losses.sum() / idx.shape[1]).backward()
        stack.grads()  # into the flat gradient the optimiser reads
        losses = losses.detach()
    return losses


def cuda_graphs() -> bool:
    """LOT_CUDA_GRAPHS=0 runs CUDA steps eagerly (same numbers). Read when used, not at import:
    a notebook sets it in a cell after pasting the script."""
    return os.environ.get("LOT_CUDA_GRAPHS", "1") != "0"


def graphs_off(device: torch.device, data_parallel: bool) -> str | None:
    """Why full-batch steps on device run eagerly, or None where each is one CUDA graph replay."""
    if device.type != "cuda":
        return "the CPU"
    if not cuda_graphs():
        return "LOT_CUDA_GRAPHS=0"
    if data_parallel:  # replicas are made anew each step: nothing stays put to capture
        return "--data-parallel"
    return None


def graphs_status(cfg: Config, device: torch.device, fallbacks: Sequence[str]) -> str:
    """config.json's cuda_graphs for one process: "on", "off: <why>", or "fell back: <why>" if any
    stack gave its graphs up (its numbers are then the eager engine's: still valid)."""
    off = graphs_off(device, cfg.data_parallel)
    if off:
        return f"off: {off}"
    return "fell back: " + "; ".join(fallbacks) if fallbacks else "on"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes device the current CUDA device, for what CUDA creates on "the current device"
    (streams, graphs and their memory pools): on cuda:1 they must live on cuda:1, not cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class GraphFallback(Exception):
    """A CUDA graph that cannot be trusted: its capture raised, or a replay did not do an eager
    step's work. Its stack trains eagerly instead: the same numbers, launched kernel by kernel."""


# A replay runs the eager step's kernels on the same buffers: equal, or within rounding if the
# capture picked other cuBLAS algorithms. A capture of nothing (or of half a step) misses by the
# whole step, 100x more than this fraction of what the step changed.
GRAPH_CHECK_RTOL = 1e-2


def step_difference(after: Sequence[Tensor], expected: Sequence[Tensor], before: Sequence[Tensor]) -> float:
    """How far one way of taking a step (after) lands from another (expected), as a fraction of
    how far expected moved from before: 0 for the same bits, 1 for a step that did nothing."""
    moved = max(float((e - b).abs().max()) for e, b in zip(expected, before) if e.numel())
    missed = max(float((a - e).abs().max()) for a, e in zip(after, expected) if e.numel())
    return missed / moved if moved > 0 else (0.0 if missed == 0 else math.inf)


class StepGraph:
    """A full-batch optimiser step of a stack, and the running loss sum, captured as one CUDA graph
    on the run's device. A GPU step of these small layers costs its kernel launches, not its
    arithmetic; a replay launches them all at once, on the same buffers (the parameters, optimiser
    and masks are updated in place).

    A graph checks itself before it is used: from the same state, one replay must do what one
    eager step does (parameters, optimiser buffers and loss sum). A capture that raises or a
    replay that differs raises GraphFallback, with the stack's state as it was before the capture."""

    def __init__(self, stack: LeNetStack, opt: MaskedSGD, train: Split, shape: tuple[int, int], device: torch.device):
        self.idx = torch.zeros(shape, dtype=torch.long, device=train.x.device)
        self.total = torch.zeros(stack.members, device=train.x.device)
        saved = (opt.param.clone(), [t.clone() for t in opt.state()], opt.steps)
        try:
            with on_device(device):  # streams, graph and its memory pool on the run's GPU
                self.capture(stack, opt, train, device)
                self.check(stack, opt, train, saved)
        except GraphFallback:
            raise
        except Exception as e:  # a driver or PyTorch that cannot capture this step
            raise GraphFallback(f"capture failed ({type(e).__name__}: {one_line(e)[:160]})") from None
        finally:  # the warm-up, capture and check steps leave no trace
            self.restore(opt, saved)

    def capture(self, stack: LeNetStack, opt: MaskedSGD, train: Split, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up steps, as capture requires
            for _ in range(2):
                self.total += train_step(stack, opt, train, self.idx).sum(1)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):  # not torch's cached stream: that one may be another GPU's
            self.total += train_step(stack, opt, train, self.idx).sum(1)

    def check(self, stack: LeNetStack, opt: MaskedSGD, train: Split, saved: tuple) -> None:
        """One replay against one eager step on a real batch (the first images), from saved."""
        self.idx.copy_(torch.arange(self.idx.shape[-1], device=self.idx.device).remainder(len(train.y)))
        ends = []
        for replay in (True, False):
            self.restore(opt, saved)
            if replay:
                self.graph.replay()
            else:
                self.total += train_step(stack, opt, train, self.idx).sum(1)
            ends.append([[t.clone() for t in part] for part in ([opt.param], opt.state(), [self.total])])
        (p_graph, s_graph, t_graph), (p_eager, s_eager, t_eager) = ends
        for what, graph, eager, before in (
            ("weights", p_graph, p_eager, [saved[0]]),
            ("optimiser state", s_graph, s_eager, saved[1]),
            ("loss sum", t_graph, t_eager, [torch.zeros_like(self.total)]),
        ):
            off = step_difference(graph, eager, before)
            if not off <= GRAPH_CHECK_RTOL:
                raise GraphFallback(
                    f"a replay's {what} differ from an eager step's by {off:.2g} of the step (a capture of "
                    "nothing misses by 1)"
                )

    def restore(self, opt: MaskedSGD, saved: tuple) -> None:
        opt.param.copy_(saved[0])
        opt.restore(saved[1], saved[2])
        self.total.zero_()

    def step(self, opt: MaskedSGD, idx: Tensor) -> None:
        self.idx.copy_(idx)
        self.graph.replay()  # on its capture device, whichever is current
        opt.steps += 1


def step_graph(net: nn.Module, opt: MaskedSGD, train: Split, shape: tuple[int, int]) -> StepGraph | None:
    """The stack's graph for this optimiser, data and batch shape (captured and checked once), where
    one applies (graphs_off). A graph that fails its check is reported in one line, and its stack
    trains eagerly from then on (stack.graph_fallbacks says why)."""
    stack = unwrap(net)
    if graphs_off(train.x.device, net is not stack) or stack.graph_fallbacks:
        return None
    key = (id(opt), id(train), shape)
    if key not in stack._graphs:
        try:
            graph = StepGraph(stack, opt, train, shape, train.x.device)
        except GraphFallback as e:
            warn(f"CUDA graphs off for this run's {stack.members}-member stack, eager steps from here on: {e}")
            stack.graph_fallbacks.append(str(e))
            return None
        stack._graphs[key] = (opt, train, graph)  # opt, train kept: ids stay theirs
    return stack._graphs[key][2]


class SparseFC1:
    """A round of CPU steps that touch fc1's live weights only. Each member's fc1 is a CSR matrix
    over its mask: the forward pass is a sparse-dense product, fc1's weight gradient the dense
    product sampled at the mask (SDDMM), and the optimiser updates two segments, fc1's live
    weights (gathered into one vector) and everything after fc1 (the stack's own tensors).

    While active, the gathered vector holds fc1's true values; sync() writes them, and their
    optimiser buffers, back into the stack's dense tensors, which evaluate() and checkpoints read."""

    def __init__(self, stack: LeNetStack, opt: MaskedSGD, fc1_masks: Tensor, level: float):
        self.stack, self.opt, self.level = stack, opt, level  # level: the round's pruning_level
        self.live = fc1_masks.reshape(-1).nonzero().squeeze(1)  # member-major, then row-major: CSR order
        self.counts = fc1_masks.flatten(1).sum(1).tolist()
        self.tail = fc1_masks.numel()  # where fc2 begins in the flat tensors
        shape = tuple(fc1_masks.shape[1:])
        self.csr = []  # per member: (crow, col) of its mask
        for mask, cols in zip(fc1_masks, (self.live % shape[1]).split(self.counts)):
            crow = torch.cat([cols.new_zeros(1), mask.sum(1).cumsum(0)])
            self.csr.append((crow, cols.contiguous()))
        self.shape = shape
        whole = opt.whole()[0]  # (param, grad, mask, buffers...)
        self.live_parts = [t[: self.tail][self.live] for t in whole]  # gathered copies
        self.live_parts[1].zero_()
        self.values = self.live_parts[0].split(self.counts)
        self.grads = self.live_parts[1].split(self.counts)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": said once, to no one who can act on it
            warnings.simplefilter("ignore")
            self.pattern = [self.csr_tensor(m, stack.flat.new_ones(len(c[1]))) for m, c in enumerate(self.csr)]
            # Built once: a CSR tensor shares its values, which the optimiser updates in place.
            self.weights = [self.csr_tensor(m, v) for m, v in enumerate(self.values)]
        opt.segments = [tuple(self.live_parts), tuple(t[self.tail :] for t in whole)]

    def sync(self) -> None:
        """Write fc1's live values and optimiser buffers into the dense tensors."""
        whole = self.opt.whole()[0]
        for dense, live in zip(whole[:1] + whole[3:], self.live_parts[:1] + self.live_parts[3:]):
            dense[: self.tail].index_copy_(0, self.live, live)

    def close(self) -> None:
        """sync() and hand the whole stack back to the dense steps."""
        self.sync()
        self.opt.segments = self.opt.whole()

    def csr_tensor(self, m: int, values: Tensor) -> Tensor:
        crow, col = self.csr[m]
        return torch.sparse_csr_tensor(crow, col, values, self.shape, check_invariants=False)

    def hidden(self, members: range, xts: Sequence[Tensor], bias: Tensor) -> Tensor:
        """fc1's ReLU activations [len(members), N, 300] of the given members, member i's from
        transposed images xts[i] [784, N], contiguous: the layout the sparse kernels read (given
        x.t(), each call would copy it first, often at more than the cost of the product itself)."""
        h1 = torch.stack([torch.sparse.mm(self.weights[m], xt) for m, xt in zip(members, xts)])
        return h1.transpose(1, 2).add_(bias.unsqueeze(1)).relu_()

    @torch.no_grad()
    def backprop(self, x: Tensor, y: Tensor) -> Tensor:
        """LeNetStack.backprop's losses and gradients, fc1's at its live weights only."""
        stack = self.stack
        w, b = stack._w, stack._b
        per_trial = stack.members if x.shape[0] == 1 else stack.members_per_trial
        xt = x.transpose(1, 2).contiguous()  # [T, 784, B]: once per trial, not once per member and kernel
        xts = [xt[m // per_trial] for m in range(stack.members)]
        h1 = self.hidden(range(stack.members), xts, b[0])
        h2, logp = lenet_upper(h1, w, b)
        ym = stack.per_member(y)
        losses = nll(logp, ym)
        d1, d2, d3 = lenet_deltas(ym, w, h1, h2, logp, 1.0 / x.shape[1])
        g = stack._grads
        layer_grads((d2, d3), (h1, h2), g[1:3])
        for d, out in zip((d1, d2, d3), g[3:]):
            torch.sum(d, 1, out=out)
        d1t = d1.transpose(1, 2).contiguous()  # [M, 300, B]
        for m, xt in enumerate(xts):
            sampled = torch.sparse.sampled_addmm(self.pattern[m], d1t[m], xt.t(), beta=0.0)
            self.grads[m].copy_(sampled.values())
        return losses


def sparse_fc1(stack: LeNetStack, opt: MaskedSGD, masks: Sequence[Tensor], enabled: bool) -> SparseFC1 | None:
    """A SparseFC1 for this round's stacked masks where it pays: enabled, on CPU, and the round's
    pruning level under SPARSE_BELOW."""
    level = pruning_level(masks)
    if not (enabled and masks[0].device.type == "cpu" and level < SPARSE_BELOW):
        return None
    return SparseFC1(stack, opt, masks[0], level)


def train_epoch(
    net: nn.Module,
    opt: MaskedSGD,
    train: Split,
    order: Tensor,
    batch_size: int,
    steps: range | None = None,
    loss_sum: Tensor | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[Tensor, int]:
    """The given steps of one epoch (default: all of it; batches are slices of order [trials, n])
    for every member.

    Returns the per-member sum of training losses (added to loss_sum) and the next step: the end
    of steps, or earlier if stop() asked to pause. Nothing here reads a tensor back to the host,
    so GPU steps queue without waiting; on CUDA each full batch is one graph replay (StepGraph)."""
    stack = unwrap(net)
    steps = range(math.ceil(order.shape[1] / batch_size)) if steps is None else steps
    first_step, until = steps.start, steps.stop
    total = torch.zeros(stack.members, device=order.device) if loss_sum is None else loss_sum
    graph = step_graph(net, opt, train, (order.shape[0], batch_size)) if first_step < until else None
    if graph is not None:  # the graph adds into its own buffer; eager steps add to the same one
        graph.total.copy_(total)
        total, result = graph.total, total
    for step in range(first_step, until):
        idx = order[:, step * batch_size : (step + 1) * batch_size]
        if graph is not None and idx.shape[1] == batch_size:
            graph.step(opt, idx)
        else:
            total += train_step(net, opt, train, idx).sum(1)
        if stop():
            until = step + 1
            break
    if graph is not None:
        total = result.copy_(total)
    return total, until


def members_forward(stack: LeNetStack, members: range, x: Tensor, sparse: SparseFC1 | None = None) -> Tensor:
    """Log-probabilities [len(members), N, 10] of a contiguous range of members on images x [N, 784],
    fc1 through sparse's CSR matrices if given."""
    a, b = members.start, members.stop
    w, bias = [t[a:b] for t in stack._w], [t[a:b] for t in stack._b]
    if sparse is None:
        return lenet_forward(x.expand(b - a, *x.shape), w, bias)[2]
    return lenet_upper(sparse.hidden(members, [x.t().contiguous()] * (b - a), bias[0]), w, bias)[1]


EVAL_CHUNK, EVAL_GROUP = 10_000, 8  # images and members per forward pass: bounded memory


@torch.inference_mode()
def evaluate(net: nn.Module, data: Split) -> tuple[Tensor, Tensor]:
    """Per-member mean cross-entropy and accuracy (%) on a whole split, on device: x [N, 784]
    for every member, or [trials, N, 784] for each trial's own members. Members go through in
    small groups over the same image chunks, so a member's numbers never depend on how many
    others are stacked (a torchrun rank holds fewer than a single process)."""
    stack = unwrap(net)
    sparse = stack.sparse if stack.sparse and stack.sparse.level < SPARSE_EVAL_BELOW else None
    if stack.sparse and not sparse:
        stack.sparse.sync()  # the dense forward reads the dense fc1
    x, y = (data.x, data.y) if data.x.dim() == 3 else (data.x.unsqueeze(0), data.y.unsqueeze(0))  # [T or 1, N, ..]
    loss = torch.zeros(stack.members, device=x.device)
    correct = torch.zeros(stack.members, device=x.device)
    group = stack.members if x.shape[0] == 1 else stack.members_per_trial  # members sharing images
    for first in range(0, stack.members, group):  # one trial's members (all members if T = 1)
        t = first // group if x.shape[0] > 1 else 0
        for a in range(first, first + group, EVAL_GROUP):
            b = min(a + EVAL_GROUP, first + group)
            for start in range(0, y.shape[1], EVAL_CHUNK):
                xs, ys = x[t, start : start + EVAL_CHUNK], y[t, start : start + EVAL_CHUNK]
                logp = members_forward(stack, range(a, b), xs, sparse)
                target = ys.expand(b - a, -1)
                loss[a:b] += nll(logp, target).sum(1)
                correct[a:b] += (logp.argmax(-1) == target).sum(1)
    return loss / y.shape[1], 100.0 * correct / y.shape[1]


PATH_POINTS = 30  # networks on the straight line between a member and its twin, both ends included
PATH_NETWORKS = 64  # interpolated networks stacked at once: bounded memory whatever the members
PATH_TRAIN = 10_000  # training images the path is also evaluated on: the first of each trial's training index
STABLE_BELOW = 2.0  # percentage points of error barrier under which a pair is stable (Frankle et al. 2020)


def path_alphas(points: int | None = None) -> Tensor:
    """Evenly spaced points of [0, 1], 0 and 1 included: PATH_POINTS of them unless told."""
    return torch.linspace(0.0, 1.0, PATH_POINTS if points is None else points)


def interpolate(start: Tensor, end: Tensor, alphas: Tensor) -> Tensor:
    """(1 - a) * start + a * end for each a: [len(alphas), *start.shape]. a = 0 gives start and a = 1
    gives end exactly (0 * w adds a zero), so the path's ends are the two trained networks themselves."""
    a = alphas.to(start).view(-1, *([1] * start.dim()))
    return (1 - a) * start + a * end


def instability(errors: Sequence[float]) -> float:
    """The error barrier of a path: its highest error minus the mean of its two ends' errors."""
    return max(errors) - (errors[0] + errors[-1]) / 2


PATH_CHUNK = 2_000  # images per pass along a path: [networks, images, 300] activations stay small


@torch.no_grad()
def path_errors(starts: Sequence[Tensor], ends: Sequence[Tensor], alphas: Tensor, splits: Sequence[Split]) -> Tensor:
    """Error (%) of every network on the straight lines between K members (starts, per parameter
    [K, ...]) and K others (ends), at each alpha, on each split (x [N, 784]): [splits, K, alphas].
    fc1 is linear in its parameters: on the line its pre-activations are (1 - a) (W1 x + b1) +
    a (W1' x + b1'), so two products per pair serve every point and only fc2 and fc3 (12% of the
    weights) run once per point. Masks need no care: a weight pruned at both ends is 0 all along."""
    k, n = starts[0].shape[0], len(alphas)
    a = alphas.to(starts[0]).view(1, n, 1, 1)
    line = [interpolate(s, e, alphas).transpose(0, 1).reshape(k * n, *s.shape[1:]) for s, e in zip(starts, ends)]
    upper_w, upper_b = (None, line[1], line[2]), (None, line[4], line[5])
    errors = []
    for split in splits:
        wrong = torch.zeros(k * n, device=split.x.device)
        for first in range(0, len(split.y), PATH_CHUNK):
            x, y = split.x[first : first + PATH_CHUNK], split.y[first : first + PATH_CHUNK]
            pre = [
                torch.baddbmm(p[3].unsqueeze(1), x.expand(k, *x.shape), p[0].transpose(1, 2)) for p in (starts, ends)
            ]
            h1 = ((1 - a) * pre[0].unsqueeze(1) + a * pre[1].unsqueeze(1)).relu_().view(k * n, len(y), -1)
            wrong += (lenet_upper(h1, upper_w, upper_b)[1].argmax(-1) != y).sum(1)
        errors.append(100.0 * wrong / len(split.y))
    return torch.stack(errors).view(len(splits), k, n)


# ==================================================================================================
# Experiment: iterative magnitude pruning, a ticket and a control per trial, all stacked
# ==================================================================================================

NEVER = torch.iinfo(torch.int32).max  # pruned_at of a weight that is still alive
ITERATIVE = ("ticket", "late_rewind")  # variants that prune themselves, round after round
LABELS = {
    "ticket": "Ticket",
    "control": "Control",
    "random": "Random mask",
    "signs": "Signs",
    "constant": "Signed constant",
    "oneshot": "One-shot",
    "late_rewind": "Late rewind",
    **{v: v.replace("snip", "SNIP").replace("grasp", "GraSP").replace("synflow", "SynFlow") for v in AT_INIT_VARIANTS},
}
SHARES_MASK = ("control", "signs", "constant")  # controls on the ticket's own mask


@dataclass
class RunState:
    """Everything a run needs to continue exactly where it stopped; a checkpoint is this on disk.

    (round, epoch, step) is the next step to take; epoch 1 step 0 means the round has not begun
    (its pruning and rewind are still to do). Masks nest, so one integer per weight, the round it
    was pruned in, stores every round's mask: mask of round r = pruned_at > r. The other
    variants' masks follow from these, the seed and `dense`."""

    round: int
    epoch: int
    step: int
    w0: list[Tensor]  # per parameter [trials, ...]: each trial's W0 (kept: rewinding is a copy)
    pruned_at: dict[str, list[Tensor]]  # per ITERATIVE variant, per layer [trials, out, in] int32
    control_rng: list[Tensor]  # generator states of the control draws
    data_rng: list[Tensor]  # generator states of the data order, at the start of the current epoch
    dense: list[Tensor] = field(default_factory=list)  # the tickets' trained round-0 weights (one-shot)
    rewind_point: list[Tensor] = field(default_factory=list)  # weights at --rewind-to in round 0
    params: list[Tensor] = field(default_factory=list)  # per parameter [members, ...]: current weights
    opt_state: list[Tensor] = field(default_factory=list)  # the optimiser's buffers
    opt_steps: int = 0
    loss_sum: Tensor | None = None  # training-loss sum of the epoch in progress
    rows: list[dict] = field(default_factory=list)  # results.csv
    curves: list[dict] = field(default_factory=list)  # curves.csv
    evals: list[dict] = field(default_factory=list)  # validation.csv (with --val-size)
    trials: list[int] = field(default_factory=list)  # the trial ids this process runs (torchrun shards them)
    elapsed_s: float = 0.0  # wall time of the run so far, every process up to its last checkpoint
    round_s: list[float] = field(
        default_factory=list
    )  # wall time of each finished round (of a resumed one: since resuming)
    csr_rounds: list[int] = field(default_factory=list)  # rounds whose fc1 trained through CSR kernels (--sparse)
    signs_rng: list[Tensor] = field(default_factory=list)  # generator states of the signs control's magnitudes
    untrained: list[float] = field(default_factory=list)  # this round's untrained_acc per member (supermasks)
    untrained_val: list[float] = field(default_factory=list)  # ... on the validation images (with --val-size)
    graph_fallbacks: list[str] = field(default_factory=list)  # why CUDA graphs were given up, if they were
    twin_rng: list[Tensor] = field(default_factory=list)  # --stability: the twins' data-order generator states
    stability: list[dict] = field(default_factory=list)  # stability.csv
    # Masks found at W0, per method, per layer: SNIP's and GraSP's keep ranks [trials, out, in] int32
    # (one score per trial; a round's mask is rank < its count); SynFlow's every begun round's mask,
    # 8 weights a byte, [trials, rounds, ceil(out * in / 8)] uint8.
    at_init: dict[str, list[Tensor]] = field(default_factory=dict)


class Paused(Exception):
    """A signal asked the run to stop; the state was checkpointed after the last finished step."""


class Diverged(Exception):
    """A member's loss became NaN or infinite; the previous epoch's checkpoint is the last good one."""


def fresh_state(cfg: Config, trials: Sequence[int] | None = None) -> RunState:
    """Round 0 of the given trials (all by default). A trial's ids seed all its random streams,
    so trial 2 is the same run in one process or on the third torchrun rank."""
    trials = list(range(cfg.trials) if trials is None else trials)
    w0 = [default_init(make_generator(cfg.seed, t, "init"), cfg.init) for t in trials]
    return RunState(
        round=0,
        epoch=1,
        step=0,
        w0=[torch.stack([w[i] for w in w0]) for i in range(len(w0[0]))],
        pruned_at={
            v: [torch.full((len(trials), o, i), NEVER, dtype=torch.int32) for o, i in SHAPES]
            for v in variants(cfg)
            if v in ITERATIVE
        },
        control_rng=[make_generator(cfg.seed, t, "control").get_state() for t in trials],
        data_rng=[make_generator(cfg.seed, t, "data").get_state() for t in trials],
        trials=trials,
        signs_rng=[make_generator(cfg.seed, t, "signs").get_state() for t in trials],
    )


def trial_ids(state: RunState) -> list[int]:
    return state.trials or list(range(len(state.data_rng)))


def member_masks(cfg: Config, state: RunState, trial: int, variant: str, rnd: int) -> list[Tensor]:
    # trial: the position in state; its id seeds the random control
    """A member's masks in round rnd. The controls on the ticket's mask share it; the random
    control draws a mask with the ticket's per-layer counts (from its own seeded stream, so any
    round's can be drawn again); the one-shot ticket prunes the dense trained weights straight to
    the level."""
    if variant in state.pruned_at:
        return [p[trial] > rnd for p in state.pruned_at[variant]]
    ticket = [p[trial] > rnd for p in state.pruned_at["ticket"]]
    if variant in SHARES_MASK or rnd == 0:
        return ticket
    method, ablation = at_init_parts(variant)
    if method:  # a mask found at W0; its shuffle redrawn from its own stream, as the random control's
        masks = at_init_masks(cfg, state.at_init[method], trial, rnd, ticket)
        if ablation != "shuffled":
            return masks
        trial_id = trial_ids(state)[trial]
        return shuffle_masks(masks, make_generator(cfg.seed, trial_id, "shuffle", AT_INIT.index(method), rnd))
    if variant == "random":
        return random_masks(
            [int(m.sum()) for m in ticket], make_generator(cfg.seed, trial_ids(state)[trial], "random", rnd)
        )
    return oneshot_masks(cfg, [w[trial] for w in state.dense[: len(LAYERS)]], [w[trial] for w in state.w0], rnd)


def at_init_masks(
    cfg: Config, stored: Sequence[Tensor], trial: int, rnd: int, ticket: Sequence[Tensor]
) -> list[Tensor]:
    """A method's masks of round rnd from RunState.at_init's stored form: SynFlow's as stored;
    SNIP's and GraSP's the ticket's count of lowest ranks (per layer under --scope layer)."""
    if stored[0].dtype == torch.uint8:
        return [unpack_bits(bits[trial, rnd], shape) for bits, shape in zip(stored, SHAPES)]
    if cfg.scope == "layer":
        return [r[trial] < int(m.sum()) for r, m in zip(stored, ticket)]
    kept = sum(int(m.sum()) for m in ticket)
    return [r[trial] < kept for r in stored]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The scores on one CPU thread: the same bits whatever the machine's thread count (a torchrun
    rank or a laptop), and faster than two threads on these small tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def find_at_init(cfg: Config, state: RunState, images: Sequence[tuple[Tensor, Tensor]]) -> None:
    """The masks found at W0 that round state.round needs (after the tickets' pruning, whose
    counts they keep): SNIP's and GraSP's ranks once per trial, on its images (x, y); SynFlow's
    mask of this round, its iterations run again for each round's count. Resuming a begun round
    finds its masks already there."""
    if not at_init_methods(cfg):
        return
    with one_thread():
        for method in at_init_methods(cfg):
            find_masks(cfg, state, method, images)


def find_masks(cfg: Config, state: RunState, method: str, images: Sequence[tuple[Tensor, Tensor]]) -> None:
    """One method's part of find_at_init, into state.at_init[method]."""
    rnd, per_layer = state.round, cfg.scope == "layer"
    params = [[w[t] for w in state.w0] for t in range(len(trial_ids(state)))]
    stored = state.at_init.get(method)
    if method != "synflow":
        if not stored:
            ranks = [score_ranks(method, p, *xy, per_layer) for p, xy in zip(params, images)]
            state.at_init[method] = [torch.stack(r) for r in zip(*ranks)]
        return
    if stored and stored[0].shape[1] > rnd:
        return
    masks = []
    for t, p in enumerate(params):
        ticket = member_masks(cfg, state, t, "ticket", rnd)
        masks.append(ticket if rnd == 0 else synflow_masks(p, [int(m.sum()) for m in ticket], per_layer))
    bits = [pack_bits(torch.stack(layer)).unsqueeze(1) for layer in zip(*masks)]
    state.at_init[method] = [torch.cat([s, b], 1) for s, b in zip(stored, bits)] if stored else bits


def member_start(
    variant: str,
    masks: Sequence[Tensor],
    w0: Sequence[Tensor],
    control_gen: torch.Generator,
    init: str,
    rewind_point: Sequence[Tensor] = (),
) -> list[Tensor]:
    """A member's weights at the start of a round, always times the mask: tickets (iterative,
    one-shot), the random control and the masks found at W0 (and their shuffles) rewind to W0,
    the late-rewound ticket to its rewind point once it has one; the reinit control, and each
    found mask's reinit, get a fresh draw from the same init (from control_gen, their own
    stream); the signs control such a draw's magnitudes with W0's signs, biases drawn as the
    reinit's; the signed constant W0's signs times the init's sd in each layer, W0's biases."""
    n = len(masks)
    if variant in ("control", "signs") or at_init_parts(variant)[1] == "reinit":
        fresh = default_init(control_gen, init)
        if variant == "signs":
            fresh = [f.abs() * w.sign() for f, w in zip(fresh[:n], w0)] + fresh[n:]
        return rewind(fresh, masks)
    if variant == "constant":
        return rewind([w.sign() * init_std(init, *w.shape) for w in w0[:n]] + list(w0[n:]), masks)
    return rewind(rewind_point if variant == "late_rewind" and len(rewind_point) else w0, masks)


def generators(states: Sequence[Tensor]) -> list[torch.Generator]:
    gens = [torch.Generator() for _ in states]
    for g, st in zip(gens, states):
        g.set_state(st)
    return gens


def stack_members(per_member: Sequence[Sequence[Tensor]], device: torch.device) -> list[Tensor]:
    return [torch.stack([m[i] for m in per_member]).to(device) for i in range(len(per_member[0]))]


def layer_percentages(masks: Sequence[Tensor]) -> dict[str, float]:
    pct = {f"{name}_pct": round(100.0 * float(m.float().mean()), 4) for name, m in zip(LAYERS, masks)}
    return {"weights": sum(int(m.sum()) for m in masks), "weights_pct": round(100.0 * masked_fraction(masks), 4), **pct}


def last_accuracies(names: Sequence[str], test_acc: Sequence[float], masks: Sequence[Tensor]) -> dict[str, str]:
    """Progress-bar postfix: weights remaining and each variant's test accuracy, mean of trials."""
    accs = {v: f"{np.mean(test_acc[i :: len(names)]):.2f}" for i, v in enumerate(names)}
    return {"weights": f"{100 * masked_fraction(masks):.2f}%", **accs}


def member_ids(names: Sequence[str], trials: Sequence[int], m: int, rnd: int) -> dict:
    """Who member m is in round rnd: trial id, round, variant and, where a variant has several
    members (reinit draws), which draw."""
    trial, position = divmod(m, len(names))
    variant = names[position]
    draw = {"draw": names[:position].count(variant)} if len(set(names)) < len(names) else {}
    return {"trial": trials[trial], "round": rnd, "variant": variant, **draw}


def member_records(
    names: Sequence[str],
    trials: Sequence[int],
    stats: Sequence[Sequence[float]],
    rnd: int,
    extra: Callable[[int], dict],
) -> list[dict]:
    """One tidy row per member: who it is (trial id, round, variant), extra(member), then its
    losses and test accuracy."""
    return [
        {
            **member_ids(names, trials, m, rnd),
            **extra(m),
            "train_loss": round(stats[0][m], 6),
            "test_loss": round(stats[1][m], 6),
            "test_acc": round(stats[2][m], 2),
        }
        for m in range(len(stats[0]))
    ]


def check_finite(
    names: Sequence[str], trials: Sequence[int], stats: Sequence[Sequence[float]], rnd: int, epoch: int, lr: float
) -> None:
    for m, (train_loss, test_loss) in enumerate(zip(stats[0], stats[1])):
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
            group, position = divmod(m, len(names))  # --stability stacks the twins after every trial's members
            who = f"{names[position]}{' twin' if group >= len(trials) else ''} of trial {trials[group % len(trials)]}"
            raise Diverged(
                f"member {m} ({who}) diverged in round {rnd}, "
                f"epoch {epoch} (training loss {train_loss}) at --lr {lr}; try a smaller --lr"
            )


def members_of(names: Sequence[str], variant: str, trials: int) -> list[int]:
    return [t * len(names) + names.index(variant) for t in range(trials)]


def begin_round(
    plan: Plan,
    state: RunState,
    stack: LeNetStack,
    control_gens: Sequence[torch.Generator],
    signs_gens: Sequence[torch.Generator] = (),
    images: Sequence[tuple[Tensor, Tensor]] = (),
) -> None:
    """Prune each iterative ticket (its trained weights, still in the stack, scored against the
    weights it rewinds to: W0, or the late-rewound ticket's rewind point), find the masks at W0
    with the tickets' new counts (SNIP's and GraSP's on each trial's images), then load every
    member's starting weights on its mask (and its twin's, the same, with --stability)."""
    cfg, rnd, names, n = plan.cfg, state.round, plan.names, len(trial_ids(state))
    trained = [w.detach().cpu() for w in stack._w + stack._b]
    if rnd == 1 and "oneshot" in names:  # one-shot tickets prune the tickets' dense trained weights
        state.dense = [p[members_of(names, "ticket", n)].clone() for p in trained]
    for variant in state.pruned_at if rnd > 0 else ():
        for t, m in enumerate(members_of(names, variant, n)):
            alive = member_masks(cfg, state, t, variant, rnd - 1)
            start = state.rewind_point if variant == "late_rewind" else state.w0
            kept = prune(cfg, [w[m] for w in trained[: len(LAYERS)]], [w[t] for w in start], alive)
            for p, a, k in zip(state.pruned_at[variant], alive, kept):
                p[t][a & ~k] = rnd
    find_at_init(cfg, state, images)
    starts = []
    for t in range(n):
        w0 = [w[t] for w in state.w0]
        late = [w[t] for w in state.rewind_point]
        for v in names:
            gen = signs_gens[t] if v == "signs" else control_gens[t]
            if at_init_parts(v)[1] == "reinit":  # a stream per method and round: the others' draws stay theirs
                method = AT_INIT.index(at_init_parts(v)[0])
                gen = make_generator(cfg.seed, trial_ids(state)[t], "fresh", method, rnd)
            starts.append(member_start(v, member_masks(cfg, state, t, v, rnd), w0, gen, cfg.init, late))
    stack.load(stack_members(starts * copies(cfg), stack._w[0].device))


def copies(cfg: Config) -> int:
    """Networks trained per member: itself, and with --stability its twin, stacked after all members."""
    return 2 if cfg.stability else 1


def member_key(record: dict) -> tuple[int, str, int]:
    """(trial, variant, draw) of a results or validation row: which member it is."""
    return record["trial"], record["variant"], record.get("draw", 0)


def early_stops(evals: Sequence[dict], rnd: int) -> dict[tuple[int, str, int], dict]:
    """Per (trial, variant, draw) of round rnd: the evaluation with the lowest validation loss (the
    first, on ties), as the paper's early-stopping point."""
    best: dict[tuple[int, str, int], dict] = {}
    for e in evals:
        key = member_key(e)
        if e["round"] == rnd and (key not in best or e["val_loss"] < best[key]["val_loss"]):
            best[key] = e
    return {
        k: {
            "early_stop_iter": e["iteration"],
            "early_stop_val_loss": e["val_loss"],
            "early_stop_test_acc": e["test_acc"],
        }
        for k, e in best.items()
    }


@dataclass
class Position:
    """Where training stands inside a round: the epoch (1-based), the next step of it, and the
    running sum of the epoch's training losses per member (None before its first step)."""

    epoch: int = 1
    step: int = 0
    loss_sum: Tensor | None = None


@dataclass
class Trainee:
    """A stack in training: the network (maybe wrapped in nn.DataParallel), its optimiser, its
    training split and, per trial, its training images and data-order generator."""

    net: nn.Module
    opt: MaskedSGD
    train: Split
    index: Tensor | int  # [trials, n] indices into train, or n: all of it
    data_gens: list[torch.Generator]
    twin_gens: list[torch.Generator] = field(default_factory=list)  # --stability: the twins' own orders

    def order(self) -> Tensor:
        """The next epoch's batch order of every order group: [trials, n], or with twins [2 * trials, n],
        the twins' orders after the members'. A group's members share each batch (one gather)."""
        order = epoch_order(self.index, self.data_gens, self.train.x.device)
        if self.twin_gens:
            order = torch.cat([order, epoch_order(self.index, self.twin_gens, self.train.x.device)])
        return order


def round_schedule(plan: Plan, epoch: int, rewind_step: int | None) -> list[tuple[int, str]]:
    """What happens inside an epoch of a round, computed up front: (step of the epoch, event) in
    order. "rewind": take the late-rewind point (round 0, iteration rewind_step); "eval": evaluate
    validation and test sets (every --eval-every iterations and at the round's end, with
    --val-size); "end": the epoch is over."""
    first, steps = (epoch - 1) * plan.epoch_steps, plan.steps_in(epoch)
    events = []
    if rewind_step is not None and first <= rewind_step <= first + steps:
        events.append((rewind_step - first, "rewind"))
    if plan.cfg.val_size:
        every = plan.cfg.eval_every
        points = set(range(every * (first // every + 1), first + steps + 1, every))
        points |= {plan.round_steps} if first + steps == plan.round_steps else set()
        events += [(point - first, "eval") for point in sorted(points)]
    order = {"eval": 0, "rewind": 1, "end": 2}
    return sorted([*events, (steps, "end")], key=lambda e: (e[0], order[e[1]]))


def train_round(
    trainee: Trainee,
    plan: Plan,
    at: Position,
    schedule: Callable[[int], list[tuple[int, str]]],
    on_event: Callable[[str, int], None],
    stop: Callable[[], bool],
) -> Iterator[Tensor]:
    """Train a round from position `at` (updated as it goes) to its end, yielding each finished
    epoch's training-loss sums. Inside an epoch, training stops at each scheduled step and calls
    on_event(event, iteration of the round). If stop() asks for a pause, `at` is where to go on
    from and Paused is raised; the epoch's data order is drawn again on resume, as it was."""
    for epoch in range(at.epoch, plan.epochs + 1):
        at.epoch, order = epoch, trainee.order()
        for until, event in schedule(epoch):
            if until < at.step:  # passed before a pause
                continue
            at.loss_sum, at.step = train_epoch(
                trainee.net,
                trainee.opt,
                trainee.train,
                order,
                plan.cfg.batch_size,
                range(at.step, until),
                at.loss_sum,
                stop,
            )
            if at.step < until:
                raise Paused(f"epoch {epoch}, step {at.step}/{plan.steps_in(epoch)}")
            if event != "end":
                on_event(event, (epoch - 1) * plan.epoch_steps + until)
        yield at.loss_sum
        at.step, at.loss_sum = 0, None


class Experiment:
    """Iterative magnitude pruning of a RunState's trials, all members stacked: for each round,
    prune and rewind, train the round, record. With --stability the stack holds every member's
    twin after all the members (member m's twin is m + primaries), in order groups of their own:
    the batch index is [2 * trials, B], each trial's members on the first trials rows."""

    def __init__(self, plan: Plan, train: Split, test: Split, state: RunState):
        cfg, device = plan.cfg, train.x.device
        self.plan, self.test, self.state = plan, test, state
        self.trials = trial_ids(state)
        index, val_index = validation_split(cfg.seed, self.trials, len(train.y), cfg.val_size)
        val_index = val_index.repeat(copies(cfg), 1)  # one per order group: the twins validate on their trial's
        self.val = Split(train.x[val_index.to(device)], train.y[val_index.to(device)])  # [groups, val_size, ...]
        self.primaries = len(self.trials) * len(plan.names)  # the members; their twins follow
        net: nn.Module = LeNetStack(self.primaries * copies(cfg), len(plan.names), device)
        if cfg.data_parallel:
            if device.type == "cuda":  # every visible GPU, the run's own first (it gathers the gradients)
                first = torch.cuda.current_device() if device.index is None else device.index
                others = [i for i in range(torch.cuda.device_count()) if i != first]
                net = nn.DataParallel(net, device_ids=[first, *others], dim=1)
            else:
                warn("--data-parallel needs CUDA; training on the CPU without it")
        self.stack = unwrap(net)
        opt = make_optimizer(cfg, self.stack)
        if state.params:
            self.stack.load(state.params)
            opt.restore(state.opt_state, state.opt_steps)
        self.control_gens = generators(state.control_rng)
        self.signs_gens = generators(state.signs_rng)
        self.trainee = Trainee(net, opt, train, index, generators(state.data_rng), generators(state.twin_rng))
        self.index = index  # per trial, its training images (without --val-size's)
        self.evaluations: list[tuple[int, Tensor]] = []  # (iteration, [val loss, val acc, test loss, test acc])

    def snapshot(self) -> RunState:
        """The state with the members' weights, optimiser and generators copied in, to save."""
        state, opt = self.state, self.trainee.opt
        if self.stack.sparse:
            self.stack.sparse.sync()
        state.params = [p.detach().cpu().clone() for p in self.stack.parameters()]
        state.opt_state, state.opt_steps = [b.cpu().clone() for b in opt.state()], opt.steps
        state.control_rng = [g.get_state() for g in self.control_gens]
        state.signs_rng = [g.get_state() for g in self.signs_gens]
        self.note_fallbacks()
        return state

    def note_fallbacks(self) -> None:
        """The stack's given-up CUDA graphs, into the state (and so the checkpoint): once each."""
        state = self.state
        state.graph_fallbacks += [r for r in self.stack.graph_fallbacks if r not in state.graph_fallbacks]

    def on_event(self, event: str, iteration: int) -> None:
        if event == "rewind":  # the late-rewound tickets' weights at this point of round 0
            late = members_of(self.plan.names, "late_rewind", len(self.trials))
            self.state.rewind_point = [p.detach()[late].cpu().clone() for p in self.stack.parameters()]
        else:
            net = self.trainee.net
            self.evaluations.append((iteration, torch.stack([*evaluate(net, self.val), *evaluate(net, self.test)])))

    def eval_records(self) -> list[dict]:
        """The evaluations since the last call, as validation.csv rows (one read from the device)."""
        records, names, rnd = [], self.plan.names, self.state.round
        for iteration, values in self.evaluations:
            v = values.cpu().tolist()
            records += [
                {
                    **member_ids(names, self.trials, m, rnd),
                    "iteration": iteration,
                    "val_loss": round(v[0][m], 6),
                    "val_acc": round(v[1][m], 2),
                    "test_loss": round(v[2][m], 6),
                    "test_acc": round(v[3][m], 2),
                }
                for m in range(self.primaries)
            ]
        self.evaluations.clear()
        return records

    def epoch_stats(self, epoch: int, loss_sum: Tensor) -> list[list[float]]:
        """[train loss, test loss, test acc] per member after an epoch (twins checked, not returned);
        an epoch that ended on an evaluation takes its test numbers from it (the same weights)."""
        plan = self.plan
        samples = min(plan.steps_in(epoch) * plan.cfg.batch_size, plan.n_train)
        if self.evaluations and self.evaluations[-1][0] == (epoch - 1) * plan.epoch_steps + plan.steps_in(epoch):
            test_loss, test_acc = self.evaluations[-1][1][2:]
        else:
            test_loss, test_acc = evaluate(self.trainee.net, self.test)
        stats = torch.stack([loss_sum / samples, test_loss, test_acc]).cpu().tolist()  # one sync per epoch
        check_finite(plan.names, self.trials, stats, self.state.round, epoch, plan.cfg.lr)
        return [s[: self.primaries] for s in stats]

    def schedule(self, epoch: int) -> list[tuple[int, str]]:
        state = self.state
        rewinding = state.round == 0 and "late_rewind" in self.plan.names and not state.rewind_point
        return round_schedule(self.plan, epoch, self.plan.late_rewind_step if rewinding else None)

    def run_round(
        self, on_epoch: Callable[[Callable[[], RunState], str], None], stop: Callable[[], bool], bar: Any
    ) -> None:
        """One round: prune and rewind (unless resuming inside it), train it, record its rows."""
        state, plan, opt = self.state, self.plan, self.trainee.opt
        if state.epoch == 1 and state.step == 0:
            images = [score_images(self.trainee.train, i) for i in self.index] if at_init_methods(plan.cfg) else []
            begin_round(plan, state, self.stack, self.control_gens, self.signs_gens, images)
            opt.reset()
            if records_untrained(plan.cfg):  # each member's starting weights on its mask, before any step
                state.untrained = evaluate(self.trainee.net, self.test)[1].cpu().tolist()[: self.primaries]
                if plan.cfg.val_size:  # where a run can pick its best level without looking at the test set
                    state.untrained_val = evaluate(self.trainee.net, self.val)[1].cpu().tolist()[: self.primaries]
            if plan.cfg.stability:  # the twins' data orders: a stream of their own per (trial, round)
                self.trainee.twin_gens = [make_generator(plan.cfg.seed, t, "twin", state.round) for t in self.trials]
                state.twin_rng = [g.get_state() for g in self.trainee.twin_gens]
        masks = [member_masks(plan.cfg, state, t, v, state.round) for t in range(len(self.trials)) for v in plan.names]
        stacked = stack_members(masks * copies(plan.cfg), self.stack.flat.device)
        train_on_masks(opt, stacked)
        self.stack.sparse = sparse_fc1(
            self.stack, opt, stacked, sparse_engine(plan.cfg) and self.trainee.net is self.stack
        )
        if self.stack.sparse and state.round not in state.csr_rounds:
            state.csr_rounds.append(state.round)
        loss = None if state.loss_sum is None else state.loss_sum.to(self.stack.flat.device)
        at = Position(state.epoch, state.step, loss)
        try:
            for loss_sum in train_round(self.trainee, plan, at, self.schedule, self.on_event, stop):
                stats = self.epoch_stats(at.epoch, loss_sum)
                bar.set_postfix(
                    {
                        "round": state.round,
                        "epoch": f"{at.epoch}/{plan.epochs}",
                        **last_accuracies(plan.names, stats[2], masks[0]),
                    }
                )
                state.curves += member_records(
                    plan.names, self.trials, stats, state.round, lambda m: {"epoch": at.epoch}
                )
                state.evals += self.eval_records()
                state.data_rng = [g.get_state() for g in self.trainee.data_gens]
                state.twin_rng = [g.get_state() for g in self.trainee.twin_gens]
                state.step, state.loss_sum = 0, None
                if at.epoch < plan.epochs:
                    state.epoch = at.epoch + 1
                    on_epoch(self.snapshot, "epoch")
        except Paused as e:  # save the position inside this epoch; its data order is drawn again
            state.epoch, state.step, state.loss_sum = at.epoch, at.step, at.loss_sum.cpu()
            state.evals += self.eval_records()
            on_epoch(self.snapshot, "pause")
            raise Paused(f"round {state.round}, {e}") from None
        finally:
            if self.stack.sparse:
                self.stack.sparse.close()
                self.stack.sparse = None
            self.note_fallbacks()
        self.record(stats, masks, self.paths() if plan.cfg.stability else [])

    def paths(self) -> list[dict]:
        """After a round with --stability: the straight line from every member to its twin, on the test
        set and on its trial's first PATH_TRAIN training images, as stability.csv rows; returns each
        member's instability (test and train, in points), in member order."""
        state, names, alphas = self.state, self.plan.names, path_alphas()
        params = [p.detach() for p in (*self.stack._w, *self.stack._b)]
        train, per_chunk = self.trainee.train, max(1, PATH_NETWORKS // len(alphas))
        barriers = []
        for t in range(len(self.trials)):
            rows = self.trainee.index[t, :PATH_TRAIN].to(train.x.device)
            probe = Split(train.x[rows], train.y[rows])
            for a in range(t * len(names), (t + 1) * len(names), per_chunk):
                b = min(a + per_chunk, (t + 1) * len(names))
                twins = [p[a + self.primaries : b + self.primaries] for p in params]
                errors = path_errors([p[a:b] for p in params], twins, alphas, [self.test, probe]).cpu().tolist()
                for m in range(a, b):
                    ids, found = member_ids(names, self.trials, m, state.round), {}
                    for split, key, curve in zip(("test", "train"), ("instability", "instability_train"), errors):
                        line = [round(e, 4) for e in curve[m - a]]  # the barrier is computed from what is written
                        state.stability += [
                            {**ids, "split": split, "alpha": round(alpha, 6), "error": e}
                            for alpha, e in zip(alphas.tolist(), line)
                        ]
                        found[key] = round(instability(line), 4)
                    barriers.append(found)
        return barriers

    def record(self, stats: list[list[float]], masks: list[list[Tensor]], barriers: Sequence[dict] = ()) -> None:
        """The finished round's results.csv rows, with each member's early-stopping point (and its
        instability, with --stability)."""
        state = self.state
        extra = [layer_percentages(m) for m in masks]
        if state.untrained:  # the starting weights on the mask, before training: Zhou et al.'s supermask accuracy
            extra = [{**e, "untrained_acc": round(u, 2)} for e, u in zip(extra, state.untrained)]
        if state.untrained_val:
            extra = [{**e, "untrained_val_acc": round(u, 2)} for e, u in zip(extra, state.untrained_val)]
        rows = member_records(self.plan.names, self.trials, stats, state.round, extra.__getitem__)
        rows = [{**row, **barrier} for row, barrier in zip(rows, barriers)] if barriers else rows
        stops = early_stops(state.evals, state.round)
        state.rows += [{**row, **stops.get(member_key(row), {})} for row in rows]


def run_experiment(
    plan: Plan,
    train: Split,
    test: Split,
    state: RunState,
    on_epoch: Callable[[Callable[[], RunState], str], None] = lambda snapshot, event: None,
    stop: Callable[[], bool] = lambda: False,
    progress: bool = True,
) -> RunState:
    """The iterative-pruning loop, from state's position to the last round. After every epoch
    on_epoch(snapshot, event) is told why ("epoch"; "round" when a round has finished; "pause")
    and may call snapshot() for the state with the members' weights copied in, to save it."""
    experiment = Experiment(plan, train, test, state)
    bar_options = {} if progress else {"disable": True}  # else TQDM_DISABLE decides
    with tqdm(
        total=plan.cfg.rounds + 1, initial=state.round, desc="rounds", unit="round", dynamic_ncols=True, **bar_options
    ) as bar:
        while state.round <= plan.cfg.rounds:
            experiment.run_round(on_epoch, stop, bar)  # prune and rewind, train, record
            state.round, state.epoch = state.round + 1, 1
            on_epoch(experiment.snapshot, "round")
            bar.update()
    return state


def run_transfer(cfg: Config, state: RunState, train: Split, test: Split, progress: bool = True) -> list[dict]:
    """Do the MNIST tickets transfer? Every finished round's ticket mask is trained on another
    dataset twice, from the trial's W0 (variant ticket) and from a fresh init (reinit), with the
    optimiser and length of an MNIST round. All of a trial's members share its batches; all are
    stacked. Round 0's ticket is the dense network. Returns one row per member."""
    rounds, trials, device = state.round, trial_ids(state), train.x.device
    per_trial = 2 * rounds  # a ticket and a reinit for each finished round
    stack = LeNetStack(len(trials) * per_trial, per_trial, device)
    starts, masks = [], []
    for t, trial in enumerate(trials):
        reinit = make_generator(cfg.seed, trial, "transfer", 1)
        w0 = [w[t] for w in state.w0]
        for r in range(rounds):
            m = member_masks(cfg, state, t, "ticket", r)
            starts += [rewind(w0, m), rewind(default_init(reinit, cfg.init), m)]
            masks += [m, m]
    stack.load(stack_members(starts, device))
    opt = make_optimizer(cfg, stack)
    train_on_masks(opt, stack_members(masks, device))
    plan = make_plan(dataclasses.replace(cfg, rewind_to="0it", val_size=0), len(train.y))
    trainee = Trainee(stack, opt, train, len(train.y), [make_generator(cfg.seed, t, "transfer", 0) for t in trials])
    at, bar_options = Position(), {} if progress else {"disable": True}
    with tqdm(total=plan.epochs, desc="transfer", unit="epoch", dynamic_ncols=True, **bar_options) as bar:
        for epoch_loss in train_round(
            trainee, plan, at, lambda e: [(plan.steps_in(e), "end")], lambda *_: None, lambda: False
        ):
            loss_sum = epoch_loss
            bar.update()
    test_loss, test_acc = evaluate(stack, test)
    samples = min(plan.steps_in(plan.epochs) * cfg.batch_size, plan.n_train)
    stats = torch.stack([loss_sum / samples, test_loss, test_acc]).cpu().tolist()
    names = [f"{v} of round {r}" for r in range(rounds) for v in ("ticket", "reinit")]
    check_finite(names, trials, stats, -1, plan.epochs, cfg.lr)
    return [
        {
            "trial": trials[m // per_trial],
            "round": (m % per_trial) // 2,
            "variant": ("ticket", "reinit")[m % 2],
            **layer_percentages(masks[m]),
            "train_loss": round(stats[0][m], 6),
            "test_loss": round(stats[1][m], 6),
            "test_acc": round(stats[2][m], 2),
        }
        for m in range(len(trials) * per_trial)
    ]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; rank 0 of 1 when run alone."""

    rank: int = 0
    world: int = 1
    local: int = 0
    launched: bool = False  # started by torchrun (even alone): joins a process group

    @property
    def leader(self) -> bool:
        """Rank 0: gathers every rank's work and alone writes the outputs."""
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every worker it starts (and its own
    TORCHELASTIC_RUN_ID, which tells a group of one from a plain process)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Ranks(
        int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), world > 1 or "TORCHELASTIC_RUN_ID" in env
    )


def shard(trials: int, ranks: Ranks) -> list[int]:
    """This rank's trials: contiguous blocks, the first ranks one larger, so that the ranks in
    order hold the trials in order and the merged outputs equal a single process's."""
    base, extra = divmod(trials, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return list(range(start, start + base + (ranks.rank < extra)))


def outputs_view(state: RunState) -> RunState:
    """What the outputs need of a state (W0 and the masks, not the trained weights): small
    enough to send to rank 0."""
    return dataclasses.replace(
        state,
        control_rng=[],
        signs_rng=[],
        data_rng=[],
        twin_rng=[],
        params=[],
        opt_state=[],
        loss_sum=None,
        trials=trial_ids(state),
    )


class RankLost(Exception):
    """Another torchrun process stopped (failed, or was stopped by a signal) while this one waited."""


def gather_objects(obj: Any, ranks: Ranks) -> list | None:
    """obj of every rank, in rank order, on rank 0 (None elsewhere). A collective."""
    parts = [None] * ranks.world if ranks.leader else None
    try:
        dist.gather_object(obj, parts, dst=0)
    except RuntimeError as e:  # gloo and NCCL report a vanished peer so
        raise RankLost(one_line(e)[:160]) from None
    return parts


def cat(parts: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per-trial tensors of several ranks, joined along the trial dimension."""
    return [torch.cat(ts) for ts in zip(*parts)] if parts[0] else []


def ordered(parts: Sequence[Sequence[dict]], *fields: str) -> list[dict]:
    """Several ranks' rows as one process writes them: sorted (stably) by the given fields."""
    return sorted((r for rows in parts for r in rows), key=lambda r: [r[f] for f in fields])


def gather_states(state: RunState, ranks: Ranks) -> RunState | None:
    """Every rank's finished work, merged on rank 0 in a single process's order (None elsewhere).
    Alone, the state itself. A collective: every rank calls it at the same point."""
    if not ranks.launched:
        return state
    parts = gather_objects(outputs_view(state), ranks)
    if not ranks.leader:
        return None
    return dataclasses.replace(
        parts[0],
        round=min(p.round for p in parts),
        pruned_at={v: cat([p.pruned_at[v] for p in parts]) for v in parts[0].pruned_at},
        w0=cat([p.w0 for p in parts]),
        rewind_point=cat([p.rewind_point for p in parts]),
        dense=cat([p.dense for p in parts]),
        at_init={m: cat([p.at_init[m] for p in parts]) for m in parts[0].at_init},
        trials=[t for p in parts for t in p.trials],
        rows=ordered([p.rows for p in parts], "round", "trial"),  # stable: variants stay in their order
        curves=ordered([p.curves for p in parts], "round", "epoch", "trial"),
        evals=ordered([p.evals for p in parts], "round", "iteration", "trial"),
        stability=ordered([p.stability for p in parts], "round", "trial"),  # stable: variant, split, alpha stay
    )


# ==================================================================================================
# Outputs: tidy CSVs, masks, plots, summary, all written atomically
# ==================================================================================================


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def warn(message: str) -> None:
    print(f"lot_improved: warning: {message}", file=sys.stderr)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over path: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_tables(cfg: Config, state: RunState, out: Path) -> None:
    """results.csv, curves.csv and masks.pt of every finished round."""
    atomic_write(out / "results.csv", lambda tmp: pd.DataFrame(state.rows).to_csv(tmp, index=False))
    atomic_write(out / "curves.csv", lambda tmp: pd.DataFrame(state.curves).to_csv(tmp, index=False))
    save_torch(out / "masks.pt", pack_masks(masks_payload(cfg, state)))
    save_torch(out / "tickets.pt", tickets_payload(state))
    if state.evals:
        atomic_write(out / "validation.csv", lambda tmp: pd.DataFrame(state.evals).to_csv(tmp, index=False))
    if state.stability:
        atomic_write(out / "stability.csv", lambda tmp: pd.DataFrame(state.stability).to_csv(tmp, index=False))


def save_torch(path: Path, obj: Any) -> None:
    # Through a buffer: torch.save to a path names the archive after the (temporary) file, which
    # would make two identical runs' files differ.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def masks_payload(cfg: Config, state: RunState) -> dict[str, Tensor]:
    """Every finished round's masks as bool [trials, rounds, out, in] per layer: "fc1", "fc2",
    "fc3" for the ticket (and its reinit control); "<variant>.fc1" ... for each variant that has
    masks of its own (random, oneshot, late_rewind, snip, grasp, synflow; not the found masks'
    shuffles and reinits, redrawn from their streams and the found masks)."""
    past = torch.arange(state.round).view(1, -1, 1, 1)
    payload = {name: p.unsqueeze(1) > past for name, p in zip(LAYERS, state.pruned_at["ticket"])}
    for variant in variants(cfg):
        if variant == "ticket" or variant in SHARES_MASK or at_init_parts(variant)[1]:
            continue
        per_round = [
            [member_masks(cfg, state, t, variant, r) for r in range(state.round)] for t in range(len(trial_ids(state)))
        ]
        for i, name in enumerate(LAYERS):
            payload[f"{variant}.{name}"] = torch.stack([torch.stack([m[i] for m in rounds]) for rounds in per_round])
    return payload


def pack_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """masks.pt's compact form of masks_payload's bool [trials, rounds, out, in] tensors. Nested
    masks (each round's inside the last: IMP's, one-shot's, SNIP's, GraSP's) become one small
    integer per weight, the rounds it survived (mask of round r = survived > r). Masks that nest
    but for a few weights (SynFlow's) keep that form, with "<name>.flips" listing the flat positions
    in [trials, rounds, out * in] where the mask differs from it. Others (random masks) keep every
    round, 8 weights a byte, as "<name>.bits" [trials, rounds, ceil(out * in / 8)]. "rounds" holds
    the number of rounds. load_masks() gives back the bool tensors."""
    rounds = next(iter(masks.values())).shape[1]
    packed = {"rounds": torch.tensor(rounds)}
    for name, m in masks.items():
        survived = m.sum(1, dtype=torch.uint8 if rounds < 256 else torch.int16)
        flips = ((survived.unsqueeze(1) > torch.arange(rounds).view(1, -1, 1, 1)) ^ m).flatten().nonzero().squeeze(1)
        if not len(flips) or survived.nbytes + flips.nbytes < m.numel() / 8:
            packed[name] = survived
            if len(flips):
                packed[f"{name}.flips"] = flips
        else:
            packed[f"{name}.bits"] = pack_bits(m)
    return packed


def pack_bits(masks: Tensor) -> Tensor:
    """Bool masks [..., out, in] as uint8 [..., ceil(out * in / 8)], 8 weights a byte."""
    return torch.from_numpy(np.packbits(masks.flatten(-2).numpy(), axis=-1))


def unpack_bits(bits: Tensor, shape: tuple[int, int]) -> Tensor:
    """pack_bits' inverse, for masks of the given (out, in) shape."""
    masks = np.unpackbits(bits.numpy(), axis=-1, count=shape[0] * shape[1]).astype(bool)
    return torch.from_numpy(masks).view(*bits.shape[:-1], *shape)


def unpack_masks(packed: dict[str, Tensor]) -> dict[str, Tensor]:
    """pack_masks' inverse: every mask as bool [trials, rounds, out, in] under its own name (a
    file of plain bool tensors, as older runs wrote, is returned as it is)."""
    if "rounds" not in packed:
        return packed
    rounds, masks = int(packed["rounds"]), {}
    for key, t in packed.items():
        if key.endswith(".bits"):
            name = key.removesuffix(".bits")
            masks[name] = unpack_bits(t, SHAPES[LAYERS.index(name.split(".")[-1])])
        elif key != "rounds" and not key.endswith(".flips"):
            masks[key] = t.unsqueeze(1) > torch.arange(rounds).view(1, -1, 1, 1)
            if f"{key}.flips" in packed:
                masks[key].view(-1)[packed[f"{key}.flips"]] ^= True
    return masks


def load_masks(out: str | Path) -> dict[str, Tensor]:
    """The masks of a run in out/ (its masks.pt) as bool [trials, rounds, out, in] tensors: "fc1",
    "fc2", "fc3" for the ticket (and its reinit control), "<variant>.fc1" ... for variants with masks
    of their own."""
    return unpack_masks(torch.load(Path(out) / "masks.pt", weights_only=True))


PARAMS = tuple(f"{layer}.{kind}" for kind in ("weight", "bias") for layer in LAYERS)  # nn.Linear's names


def tickets_payload(state: RunState) -> dict[str, Tensor]:
    """Each trial's W0 in nn.Linear layout, [trials, out, in] and [trials, out] ("fc1.weight",
    "fc1.bias", ...), and, for the late-rewound ticket, its rewind point ("late_rewind.fc1.weight",
    ...). With masks.pt this defines every ticket: weights = W0 * mask."""
    payload = dict(zip(PARAMS, state.w0))
    payload.update({f"late_rewind.{name}": p for name, p in zip(PARAMS, state.rewind_point)})
    return payload


def load_ticket(out: str | Path, round: int, trial: int = 0, variant: str = "ticket") -> nn.Sequential:
    """A ticket of a run in out/ as a plain PyTorch model, Linear-ReLU-Linear-ReLU-Linear, with the
    run's starting weights (W0; for late_rewind its rewind point) and the round's masks. Each
    Linear carries its mask through torch.nn.utils.prune (weight = weight_orig * weight_mask), so
    the ticket stays sparse under any optimiser; prune.remove(layer, "weight") makes it permanent.
    Inputs are flattened images normalised as the run's (lot_improved.normalise). variant:
    ticket, random, oneshot, late_rewind, snip, grasp or synflow, where the run trained it; round:
    any finished round."""
    from torch.nn.utils import prune

    out = Path(out)
    method, ablation = at_init_parts(variant)
    if ablation:
        raise ValueError(
            f"masks of {variant} are not stored: they are {method}'s"
            + (", shuffled from the run's seeded stream" if ablation == "shuffled" else ", with a fresh init")
            + f" (load_ticket(..., variant={method!r}))"
        )
    masks = load_masks(out)
    start = torch.load(out / "tickets.pt", weights_only=True)
    key = "" if variant == "ticket" else f"{variant}."
    if variant in SHARES_MASK or f"{key}fc1" not in masks:
        trained = sorted({"ticket", *(k.split(".")[0] for k in masks if k.count(".") == 1)})
        raise ValueError(f"no masks of variant {variant!r} in {out}/masks.pt (it has {', '.join(trained)})")
    if not (0 <= round < masks["fc1"].shape[1] and 0 <= trial < masks["fc1"].shape[0]):
        raise ValueError(
            f"{out}/masks.pt holds rounds 0..{masks['fc1'].shape[1] - 1}, trials 0..{masks['fc1'].shape[0] - 1}"
        )
    weights = "late_rewind." if variant == "late_rewind" else ""
    layers = []
    for layer in LAYERS:
        linear = nn.Linear(*start[f"{layer}.weight"].shape[:0:-1])
        mask = masks[f"{key}{layer}"][trial, round]
        with torch.no_grad():
            linear.weight.copy_(start[f"{weights}{layer}.weight"][trial] * mask)
            linear.bias.copy_(start[f"{weights}{layer}.bias"][trial])
        layers.append(prune.custom_from_mask(linear, "weight", mask))
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])


# Two-sided 95% Student-t critical values for 1..30 degrees of freedom; beyond, a Cornish-Fisher
# expansion around the normal quantile (error < 1e-4 at 30 and shrinking).
T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_critical_95(df: int) -> float:
    if df <= len(T95):
        return T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_t_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% confidence interval of paired differences (one per trial): the Student-t
    interval mean +- t(0.975, K-1) * sd / sqrt(K). Needs K >= 2."""
    d = np.asarray(differences, dtype=float)
    mean, half = d.mean(), t_critical_95(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(mean), float(mean - half), float(mean + half)


def summary_frame(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per round: weights remaining, each variant's accuracy (mean, sd) and the paired delta
    ticket - control; and the columns present, in table order."""
    wide = rows.pivot_table(index=["round", "trial"], columns="variant", values="test_acc").reset_index()
    columns = [v for v in LABELS if v in wide.columns]
    if {"ticket", "control"} <= set(columns):
        wide["delta"] = wide["ticket"] - wide["control"]
        columns.insert(columns.index("control") + 1, "delta")
    pct = rows[rows.variant == "ticket"].groupby("round")["weights_pct"].mean()
    stats = wide.groupby("round")[columns].agg(["mean", "std"])
    stats.columns = [f"{a}_{b}" for a, b in stats.columns]
    if "delta" in columns and rows.trial.nunique() > 1:
        ci = wide.groupby("round")["delta"].apply(lambda d: paired_t_interval(d.tolist()))
        stats["delta_lo"], stats["delta_hi"] = ci.str[1], ci.str[2]
    return stats.assign(weights_pct=pct).reset_index(), columns


def summary_markdown(rows: pd.DataFrame) -> str:
    table, columns = summary_frame(rows)
    trials = rows.trial.nunique()
    fmt = (lambda m, s: f"{m:.2f}") if trials == 1 else (lambda m, s: f"{m:.2f} ± {s:.2f}")
    header = ["Round", "Weights Remaining", *(LABELS.get(c, "Delta") for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in table.to_dict("records"):
        cells = [str(r["round"]), f"{r['weights_pct']:.2f}%"]
        for c in columns:
            if c == "delta":
                cells.append(
                    f"{r['delta_mean']:+.2f}" + (f" [{r['delta_lo']:+.2f}, {r['delta_hi']:+.2f}]" if trials > 1 else "")
                )
            else:
                cells.append(fmt(r[f"{c}_mean"], r[f"{c}_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    note = "Test accuracy (%) after the last epoch of each round"
    if trials > 1:
        note += (
            f"; mean ± sd over {trials} trials. Delta: ticket - control paired within each trial, mean "
            f"[95% confidence interval: Student-t, df = {trials - 1}]."
        )
    else:
        note += "."
    if "draw" in rows and rows["draw"].max() > 0:
        note += f" Control: the mean of {int(rows['draw'].max()) + 1} reinit draws within each trial."
    if collapse_note(rows):
        note += " " + collapse_note(rows)
    return "\n".join(lines) + "\n\n" + note + "\n"


def interval_cell(values: Sequence[float], fmt: str, bounds: tuple[float, float] | None = None) -> str:
    """'mean [lo, hi]' (95% Student-t over trials), or the mean alone for one trial; an interval of a
    bounded quantity (an accuracy: 0 to 100) is clipped to its bounds."""
    if len(values) < 2:
        return format(float(np.mean(values)), fmt)
    mean, lo, hi = paired_t_interval(values)
    if bounds:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


ACCURACY = (0.0, 100.0)


def early_stop_markdown(rows: pd.DataFrame) -> str:
    """The paper's early-stopping comparisons per round, each paired within a trial (a trial's
    reinit draws averaged first): how soon the ticket stops against the dense network (round 0)
    and against its control, and its test accuracy at the stop against both."""
    stops = per_trial(rows, ["round", "trial", "variant"], ["weights_pct", "early_stop_iter", "early_stop_test_acc"])
    wide = stops.pivot_table(
        index=["round", "trial"], columns="variant", values=["early_stop_iter", "early_stop_test_acc"]
    )
    it, acc = wide["early_stop_iter"], wide["early_stop_test_acc"]
    dense_it, dense_acc = it["ticket"].xs(0, level="round"), acc["ticket"].xs(0, level="round")
    pct = stops[stops.variant == "ticket"].groupby("round").weights_pct.mean()
    has_control = "control" in it.columns
    header = ["Round", "Weights Remaining", "Ticket stop", "Ticket / dense"]
    header += ["Control / ticket"] if has_control else []
    header += ["Ticket acc", "Ticket - dense"] + (["Control - dense", "Ticket - control"] if has_control else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for rnd in sorted(pct.index):
        t_it, t_acc = it["ticket"].xs(rnd, level="round"), acc["ticket"].xs(rnd, level="round")
        cells = [str(rnd), f"{pct[rnd]:.2f}%", f"{t_it.mean():,.0f}", interval_cell(t_it / dense_it, ".2f")]
        if has_control:
            c_it, c_acc = it["control"].xs(rnd, level="round"), acc["control"].xs(rnd, level="round")
            cells.append(interval_cell(c_it / t_it, ".2f"))
        cells += [f"{t_acc.mean():.2f}", interval_cell(t_acc - dense_acc, "+.2f")]
        if has_control:
            cells += [interval_cell(c_acc - dense_acc, "+.2f"), interval_cell(t_acc - c_acc, "+.2f")]
        lines.append("| " + " | ".join(cells) + " |")
    trials = rows.trial.nunique()
    note = (
        "Early stop: the iteration of minimum validation loss (Ticket stop: mean iteration); test accuracy (%) "
        "there. Ratios and differences are paired within each trial against the dense network (the ticket at "
        "round 0) or the control"
    )
    note += f"; mean [95% confidence interval: Student-t, df = {trials - 1}]." if trials > 1 else "."
    return "\n".join(lines) + "\n\n" + note + "\n"


def signs_markdown(rows: pd.DataFrame) -> str:
    """Zhou et al.'s comparisons per round, paired within each trial (a trial's reinit draws
    averaged first): the sign-keeping controls against the ticket and the plain reinit after
    training, then every member's accuracy before training (its starting weights on its mask)."""
    present = set(rows.variant)
    pairs = [(a, b) for a in ("signs", "constant") for b in ("ticket", "control") if {a, b} <= present]
    return paired_markdown(rows, pairs, "(the signed constant's is Zhou et al.'s supermask)")


def at_init_markdown(rows: pd.DataFrame) -> str:
    """Frankle et al. (2021)'s comparisons per round, paired within each trial: each mask found at
    initialisation against the ticket, the random control and its own shuffle and reinit; every member's
    accuracy before training; and any member whose mask left a layer empty."""
    by_method = sorted(
        at_init_pairs(set(rows.variant)), key=lambda p: AT_INIT.index(p[0]) if p[0] in AT_INIT else len(AT_INIT)
    )
    table = paired_markdown(rows, by_method, "(the masks found at W0, on W0)")
    collapse = collapse_note(rows) or "No member's mask left a layer without weights."
    return at_init_findings(rows) + table + "\n" + collapse + "\n\n" + AT_INIT_METHOD


def at_init_pairs(present: set[str]) -> list[tuple[str, str]]:
    """The (a, b) comparisons a - b among the variants present, by kind: each method against the
    ticket, then the random control, its shuffle, its reinit; last the ticket's own two ablations
    (the random control is its shuffle, the control its reinit) against it."""
    kinds = ("ticket", "random", *(f"{{}}-{a}" for a in ABLATIONS))
    pairs = [(m, k.format(m)) for k in kinds for m in AT_INIT if {m, k.format(m)} <= present]
    return pairs + [(a, "ticket") for a in ("random", "control") if a in present]


FINDINGS_LEVELS = (13.0, 3.5, 1.15)  # weights remaining (%) of the findings table
SNIP_TABLE_1 = {5.0: 1.6, 2.0: 2.4}  # Lee et al. (2019), Table 1: LeNet-300-100's test error (%) at 5% and 2% left


def at_init_findings(rows: pd.DataFrame) -> str:
    """Frankle et al. (2021)'s claims at the rounds nearest FINDINGS_LEVELS: each method against
    the ticket, the random control and its own shuffle and reinit, and the ticket against its
    shuffle (the random control) and its reinit, paired within each trial; then SNIP's test error at the
    rounds nearest Lee et al.'s 5% and 2%."""
    acc = per_trial(rows, ["round", "trial", "variant"], ["weights_pct", "test_acc"])
    wide = acc.pivot_table(index=["round", "trial"], columns="variant", values="test_acc")
    pct = acc[acc.variant == "ticket"].groupby("round").weights_pct.mean()
    rounds = nearest_rounds(rows, FINDINGS_LEVELS)
    present, pairs = set(wide.columns), at_init_pairs(set(wide.columns))
    if not pairs:
        return ""
    header = ["Difference (points)", *(f"{pct[r]:.2f}% (round {r})" for r in rounds)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(rounds)]
    for a, b in pairs:
        cells = [interval_cell(wide[a].xs(r, level="round") - wide[b].xs(r, level="round"), "+.2f") for r in rounds]
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | " + " | ".join(cells) + " |")
    trials = rows.trial.nunique()
    text = (
        f"## At the levels nearest {', '.join(f'{x:g}%' for x in FINDINGS_LEVELS)}\n\nTest accuracy differences, "
        "paired within each trial"
        + (f"; mean [95% confidence interval: Student-t, df = {trials - 1}]" if trials > 1 else "")
        + ". Random mask is the ticket's mask shuffled within each layer; Control, its reinit.\n\n"
        + "\n".join(lines)
        + "\n\n"
    )
    if "snip" in present:
        snip = [
            f"{interval_cell(100 - wide['snip'].xs(r, level='round'), '.2f')} at {pct[r]:.2f}% "
            f"(Lee et al., 2019: {error} at {level:g}%)"
            for level, error in SNIP_TABLE_1.items()
            for r in [nearest_round(pct, level)]
        ]
        text += f"SNIP's test error (%): {'; '.join(snip)}. Their recipe differs: see below.\n\n"
    return text


AT_INIT_METHOD = """## How each mask is found

Every mask keeps exactly the ticket's count of weights in its round, ranked across the three layers (under
`--scope layer`: at the ticket's per-layer counts), ties by position. Biases are never pruned; nothing is
trained before scoring. Scores are computed on the CPU on one thread in float64: every device and torchrun
find the same masks.

- SNIP (Lee et al., 2019): keeps the highest |dL/dw * w|, L the cross-entropy at W0 on 100 training images,
  the first 10 of each class in the trial's training split (never a validation image), the same every round.
  One score per trial, lower thresholds each round: its masks nest.
- GraSP (Wang et al., 2020): the score -w * Hg on those images, logits divided by the authors' temperature
  200, Hg by double backprop; removes the highest scores, as the authors' code does. Its masks nest.
- SynFlow (Tanaka et al., 2020): no data. Every parameter, biases too, replaced by its absolute value; R the
  sum of the logits of an all-ones input; score |dR/dw * w|; 100 pruning steps a round on an exponential
  schedule down to the round's count, so its masks need not nest.
- `-shuffled`: the method's mask permuted within each layer (the same per-layer counts) from its own seeded
  stream, trained from W0. `-reinit`: the method's mask with a fresh init. For the ticket these two are the
  `random` and `reinit` controls. A shuffle or reinit without its method is allowed; under `--scope layer` a
  shuffle is `random` by construction.

Departures from the authors' code: scores are of W0 as it is (GraSP's code draws a fresh Glorot init
first); GraSP scores 100 images (10 per class; its code 25 per class) as one batch, not two halves summed
(which scales g and Hg by 2 each: the same ranking); every method keeps exactly the ticket's count, ties by
position (GraSP's code keeps a weight equal to its threshold; SynFlow's removes every weight tied at it);
SynFlow runs in float64 (its code: float32).

Lee et al. (2019)'s LeNet-300-100 errors (their Table 1; 1.7% dense) come from another recipe: SGD with
momentum 0.9, learning rate 0.1 divided by 10 every 25k iterations, batch 100, weight decay 0.0005, 90% of
the training images, a variance-scaling init, 20 runs a level, exactly 5% and 2% of the weights. This run's
recipe is in config.json (the default: SGD 0.01, momentum 0.9, batch 60, no weight decay, 20 epochs on all
60,000 images, Kaiming-uniform init), at the levels its pruning schedule reaches.
"""


def collapse_note(rows: pd.DataFrame) -> str:
    """One sentence naming each variant whose mask left a layer with no weights (which then passes
    no signal: layer collapse), the layer, the first round and how many trials; '' if none."""
    shares = [f"{n}_pct" for n in LAYERS]
    if not set(shares) <= set(rows.columns):  # a table without per-layer shares cannot show a collapse
        return ""
    empty = rows[shares].eq(0)
    if not empty.any(axis=None):
        return ""
    hit = rows[empty.any(axis=1)].assign(
        layer=[" and ".join(e.index[e]) for _, e in empty[empty.any(axis=1)].iterrows()]
    )
    groups = hit.groupby(["variant", "layer"], sort=False)
    cases = [
        f"{LABELS.get(v, v)} ({layer.replace('_pct', '')} from round {g['round'].min()}, {g.trial.nunique()} "
        f"of {rows.trial.nunique()} trial(s))"
        for (v, layer), g in groups
    ]
    return "Layer collapse (a layer left with no weights passes no signal): " + "; ".join(cases) + "."


def paired_markdown(rows: pd.DataFrame, pairs: Sequence[tuple[str, str]], supermask: str) -> str:
    """Per round: every variant's test accuracy and the differences a - b of the given pairs,
    paired within each trial (a trial's reinit draws averaged first); then every member's
    accuracy before training (its starting weights on its mask)."""
    validated = ["untrained_val_acc"] if "untrained_val_acc" in rows else []
    acc = per_trial(rows, ["round", "trial", "variant"], ["weights_pct", "test_acc", "untrained_acc", *validated])
    wide = acc.pivot_table(index=["round", "trial"], columns="variant", values=["test_acc", "untrained_acc"])
    trained, untrained = wide["test_acc"], wide["untrained_acc"]
    shown = [v for v in LABELS if v in trained.columns]
    pct = acc[acc.variant == "ticket"].groupby("round").weights_pct.mean()
    header = [
        "Round",
        "Weights Remaining",
        *(LABELS[v] for v in shown),
        *(f"{LABELS[a]} - {LABELS[b]}" for a, b in pairs),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    before = [
        "| Round | Weights Remaining | " + " | ".join(LABELS[v] for v in shown) + " |",
        "|" + "---:|" * (2 + len(shown)),
    ]
    for rnd in sorted(pct.index):
        t, u = trained.xs(rnd, level="round"), untrained.xs(rnd, level="round")
        cells = [str(rnd), f"{pct[rnd]:.2f}%", *(f"{t[v].mean():.2f}" for v in shown)]
        lines.append("| " + " | ".join(cells + [interval_cell(t[a] - t[b], "+.2f") for a, b in pairs]) + " |")
        before.append("| " + " | ".join(cells[:2] + [interval_cell(u[v], ".2f", ACCURACY) for v in shown]) + " |")
    trials = rows.trial.nunique()
    spread = f"; mean [95% confidence interval: Student-t, df = {trials - 1}]" if trials > 1 else ""
    return (
        "Test accuracy (%) after training; differences paired within each trial"
        + spread
        + ".\n\n"
        + "\n".join(lines)
        + f"\n\nTest accuracy (%) before training: each member's starting weights on its mask {supermask}"
        + spread
        + (", clipped to [0, 100]" if trials > 1 else "")
        + ".\n\n"
        + "\n".join(before)
        + "\n\n"
        + best_untrained_markdown(acc, shown, pct)
    )


def best_untrained_markdown(acc: pd.DataFrame, shown: Sequence[str], pct: pd.Series) -> str:
    """Each member's best level before training and its test accuracy there. The level is picked on
    the validation images where the run has them (untrained_val_acc); picked on the test set it is
    the best of every round's test accuracy, biased upwards, and the line says so."""
    on_val = "untrained_val_acc" in acc
    pick = "untrained_val_acc" if on_val else "untrained_acc"
    lines = []
    for v in shown:
        mine = acc[acc.variant == v]
        rnd = int(mine.groupby("round")[pick].mean().idxmax())
        at = mine[mine["round"] == rnd].sort_values("trial").untrained_acc.tolist()
        lines.append(f"- {LABELS[v]}: {interval_cell(at, '.2f', ACCURACY)} at {pct[rnd]:.2f}% (round {rnd})")
    how = (
        "picked by the validation images' accuracy before training (untrained_val_acc), test accuracy there"
        if on_val
        else "picked by this same test accuracy: the best of every round, an optimistic figure (a run with "
        "--val-size picks it on validation images)"
    )
    return f"Best level before training, {how}:\n\n" + "\n".join(lines) + "\n"


def instability_markdown(rows: pd.DataFrame) -> str:
    """Per round and variant, the instability of the path between each member and its twin, on
    the test set and on the training images (a trial's reinit draws averaged first)."""
    values = per_trial(rows, ["round", "trial", "variant"], ["weights_pct", "instability", "instability_train"])
    wide = values.pivot_table(index=["round", "trial"], columns="variant", values=["instability", "instability_train"])
    shown = [v for v in LABELS if v in wide["instability"].columns]
    pct = values[values.variant == "ticket"].groupby("round").weights_pct.mean()
    trials = rows.trial.nunique()
    header = ["Round", "Weights Remaining", *(f"{LABELS[v]} {split}" for v in shown for split in ("test", "train"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for rnd in sorted(pct.index):
        cells = [str(rnd), f"{pct[rnd]:.2f}%"]
        for v in shown:
            for column in ("instability", "instability_train"):
                d = wide[column][v].xs(rnd, level="round")
                cells.append(f"{d.mean():.2f}" + (f" ± {d.std():.2f}" if trials > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    spread = f"; mean ± sd over {trials} trials" if trials > 1 else ""
    return (
        "Instability (Frankle et al. 2020): the highest error on the straight line between a member and its twin "
        "(same mask, start and optimiser, another data order), minus the mean of the two ends' errors, in "
        f"percentage points, on the test set and on the trial's first {PATH_TRAIN:,} training images (all, if fewer)"
        f"{spread}. Stable: under "
        f"{STABLE_BELOW:g} points.\n\n" + "\n".join(lines) + "\n"
    )


def stability_verdicts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (round, variant): mean test accuracy and test instability over trials (a trial's reinit
    draws averaged first), and Frankle et al. (2020)'s two verdicts: matching (mean test accuracy at
    least the dense network's mean minus one sd over trials; the dense network is round 0's ticket)
    and stable (mean instability under STABLE_BELOW points)."""
    values = per_trial(rows, ["round", "variant", "trial"], ["weights_pct", "test_acc", "instability"])
    dense = values[(values["round"] == 0) & (values.variant == "ticket")].test_acc
    bar = dense.mean() - (dense.std() if len(dense) > 1 else 0.0)
    verdicts = values.groupby(["round", "variant"], sort=False).agg(
        weights_pct=("weights_pct", "mean"), test_acc=("test_acc", "mean"), instability=("instability", "mean")
    )
    verdicts["matching"] = verdicts.test_acc >= bar
    verdicts["stable"] = verdicts.instability < STABLE_BELOW
    return verdicts.reset_index()


def stability_markdown(rows: pd.DataFrame) -> str:
    """stability.md: per round, every variant's test instability, mean [95% t-interval], and its
    verdicts; then, per variant, how many levels are matching against how many are stable, which
    tests the paper's central claim (a subnetwork is matching only where it is stable)."""
    values = per_trial(rows, ["round", "variant", "trial"], ["instability"])
    verdicts = stability_verdicts(rows).set_index(["round", "variant"])
    shown = [v for v in LABELS if v in set(rows.variant)]
    trials = rows.trial.nunique()
    header = ["Round", "Weights Remaining", *(LABELS[v] for v in shown)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for rnd in sorted(set(rows["round"])):
        cells = [str(rnd), f"{verdicts.weights_pct[rnd, 'ticket']:.2f}%"]
        for v in shown:
            mine = values[(values["round"] == rnd) & (values.variant == v)].instability
            verdict = verdicts.loc[(rnd, v)]
            marks = ("M" if verdict.matching else "-") + ("S" if verdict.stable else "-")
            cells.append(f"{interval_cell(mine.tolist(), '.2f', bounds=(0.0, 100.0))} {marks}")
        lines.append("| " + " | ".join(cells) + " |")
    # The claim is about subnetworks: round 0's members are dense (and the dense ticket the reference).
    sparse = verdicts[verdicts.index.get_level_values("round") > 0]
    counts = ["| Variant | matching, stable | matching, unstable | not matching, stable | not matching, unstable |"]
    counts.append("|---|---:|---:|---:|---:|")
    for v in shown:
        mine = sparse[sparse.index.get_level_values("variant") == v]
        cells = [int((mine.matching == m).mul(mine.stable == s).sum()) for m in (True, False) for s in (True, False)]
        counts.append(f"| {LABELS[v]} | " + " | ".join(map(str, cells)) + " |")
    against = sparse[sparse.matching & ~sparse.stable]
    claim = (
        "No sparse level has finished yet."
        if sparse.empty
        else "The claim holds here: no sparse level of any variant is matching and unstable."
        if against.empty
        else "The claim fails here at: "
        + ", ".join(f"{LABELS[v]} at {sparse.weights_pct[r, v]:.2f}%" for r, v in against.index)
        + "."
    )
    spread = f"mean [95% confidence interval: Student-t, df = {trials - 1}]" if trials > 1 else "one trial"
    return (
        "# Instability analysis\n\n"
        "Test instability (Frankle et al. 2020): the highest test error on the straight line between a member and "
        "its twin (same mask, start and optimiser, another data order), minus the mean of the two ends' errors, "
        f"in percentage points; {spread}. M: matching, the mean test accuracy at least the dense network's mean "
        "minus one standard deviation over trials (the dense network: round 0's ticket). S: stable, the mean "
        f"instability under {STABLE_BELOW:g} points.\n\n" + "\n".join(lines) + "\n\n"
        "Sparse levels (rounds 1 on) of each variant, matching against stable:\n\n" + "\n".join(counts) + "\n\n"
        "The paper's central claim: a subnetwork is matching only where it is stable. " + claim + "\n"
    )


PERCENT_TICKS = (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def percent_log_axis(axis: Any, low: float) -> None:
    """A log-scale percent axis labelled 100, 50, 20, 10 ... down to low, as a paper would."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_major_locator(FixedLocator([t for t in PERCENT_TICKS if t >= low / 1.5]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def new_axes() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=150)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


# Each figure: file, the variants it compares (those present are drawn), the variants whose
# presence asks for it (none: always), and its title.
FIGURES = (
    ("graph_improved.png", ("ticket", "control"), (), "winning ticket vs random reinit"),
    ("random_control.png", ("ticket", "control", "random"), ("random",), "ticket vs random-mask control"),
    ("signs.png", ("ticket", "control", "signs", "constant"), ("signs", "constant"), "what W0's signs carry"),
    ("oneshot.png", ("ticket", "oneshot", "control"), ("oneshot",), "iterative vs one-shot pruning"),
    ("rewind.png", ("ticket", "late_rewind", "control"), ("late_rewind",), "rewind to W0 vs late rewinding"),
    ("at_init.png", ("ticket", "control", "random", *AT_INIT), AT_INIT, "masks found at initialisation vs the ticket"),
)
COLORS = dict(zip(LABELS, ("tab:blue", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:red", "tab:purple")))
COLORS["reinit"] = COLORS["control"]  # the transfer's fresh-init control
COLORS.update(zip(AT_INIT_VARIANTS, ("tab:olive", "tab:cyan", "tab:gray") * len(AT_INIT_VARIANTS)))


def plot_vs_weights(
    rows: pd.DataFrame,
    path: Path,
    y: str,
    shown: Sequence[str],
    ylabel: str,
    title: str,
    xlabel: str = "weights remaining (%)",
    reference: tuple[float, str] | None = None,
) -> None:
    """One line per variant (mean, with a ± sd band over trials) against weights remaining on a
    reversed log axis, 100% on the left; reference adds a labelled horizontal line."""
    import seaborn as sns

    fig, ax = new_axes()
    trials = rows.trial.nunique()
    shown = [v for v in shown if v in set(rows.variant)]
    sns.lineplot(
        data=rows[rows.variant.isin(shown)],
        x="weights_pct",
        y=y,
        hue="variant",
        hue_order=shown,
        palette=COLORS,
        marker="o",
        errorbar="sd" if trials > 1 else None,
        ax=ax,
    )
    if reference:
        ax.axhline(reference[0], color="gray", linestyle="--", label=reference[1])
        ax.legend()
    ax.set_xscale("log")
    low = rows.weights_pct.min()
    ax.set_xlim(100 * 1.15, low / 1.15)  # reversed: sparser to the right
    percent_log_axis(ax.xaxis, low)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    spread = f", mean ± sd over {trials} trials" if trials > 1 else ""
    ax.set_title(f"{title}{spread}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def per_trial(rows: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """One value per trial: a trial's reinit draws averaged, as the statistics treat them."""
    return rows.groupby(list(keys), as_index=False)[list(values)].mean()


def plot_early_stopping(rows: pd.DataFrame, path: Path) -> None:
    """The paper's Figure 4: the iteration of minimum validation loss, and the test accuracy
    there, against weights remaining; mean over trials with min-max bars, as the paper draws."""
    from matplotlib.figure import Figure

    stops = per_trial(rows, ["variant", "trial", "round"], ["weights_pct", "early_stop_iter", "early_stop_test_acc"])
    fig = Figure(figsize=(11, 4.2), dpi=150)
    axes = fig.subplots(1, 2)
    panels = (
        ("early_stop_iter", "early-stop iteration (min. validation loss)"),
        ("early_stop_test_acc", "test accuracy at early stop (%)"),
    )
    for ax, (column, label) in zip(axes, panels):
        for variant in [v for v in LABELS if v in set(stops.variant)]:
            g = stops[stops.variant == variant].groupby("round")
            pct, mean, low, high = g.weights_pct.mean(), g[column].mean(), g[column].min(), g[column].max()
            ax.errorbar(
                pct,
                mean,
                yerr=[mean - low, high - mean],
                marker="o",
                ms=3,
                capsize=2,
                color=COLORS[variant],
                label=LABELS[variant],
            )
        ax.set_xscale("log")
        ax.set_xlim(100 * 1.15, stops.weights_pct.min() / 1.15)
        percent_log_axis(ax.xaxis, stops.weights_pct.min())
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    trials = rows.trial.nunique()
    fig.suptitle(f"Early stopping (paper's Figure 4): mean over {trials} trial(s), bars min to max", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


PAPER_LEVELS = (100.0, 51.3, 21.1, 7.0, 3.6, 1.9)  # weights remaining (%) in the paper's Figure 3


def nearest_rounds(rows: pd.DataFrame, levels: Sequence[float] = PAPER_LEVELS) -> list[int]:
    """The finished rounds whose weights remaining are nearest the given levels (log distance)."""
    pct = rows[rows.variant == "ticket"].groupby("round").weights_pct.mean()
    return sorted({nearest_round(pct, level) for level in levels})


def nearest_round(pct: pd.Series, level: float) -> int:
    """The round (pct's index) whose weights remaining (%) is nearest the level, in log distance."""
    return int((np.log(pct) - math.log(level)).abs().idxmin())


def plot_over_iterations(evals: pd.DataFrame, rows: pd.DataFrame, path: Path) -> None:
    """The paper's Figure 3: test accuracy as training proceeds, at the paper's levels of
    weights remaining (or the nearest rounds), for the ticket and the reinit control; mean over
    trials (a trial's reinit draws averaged first)."""
    from matplotlib.figure import Figure

    rounds = nearest_rounds(rows)
    pct = rows[rows.variant == "ticket"].groupby("round").weights_pct.mean()
    curves = per_trial(evals[evals["round"].isin(rounds)], ["variant", "round", "trial", "iteration"], ["test_acc"])
    shown = [v for v in ("ticket", "control") if v in set(curves.variant)]
    fig = Figure(figsize=(5.5 * len(shown), 4.2), dpi=150)
    axes = fig.subplots(1, len(shown), sharey=True, squeeze=False)[0]
    colors = dict(zip(rounds, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    for ax, variant in zip(axes, shown):
        for rnd in rounds:
            mean = curves[(curves.variant == variant) & (curves["round"] == rnd)].groupby("iteration").test_acc.mean()
            ax.plot(mean.index, mean.values, lw=1, color=colors.get(rnd), label=f"{pct[rnd]:.1f}% (round {rnd})")
        ax.set_title(LABELS[variant], fontsize=10)
        ax.set_xlabel("training iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="weights remaining", title_fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    low = curves.test_acc.quantile(0.02) if len(curves) else 90
    axes[0].set_ylim(max(low - 1, 0), min(curves.test_acc.max() + 0.5, 100) if len(curves) else 100)
    fig.suptitle(
        f"Test accuracy during training (paper's Figure 3), mean over {rows.trial.nunique()} trial(s)", fontsize=10
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


INTERPOLATION_LEVELS = (100.0, 13.0, 3.5, 1.15)  # weights remaining (%) drawn in interpolation.png


def plot_interpolation(paths: pd.DataFrame, rows: pd.DataFrame, path: Path) -> None:
    """Test error along the straight line from member (a = 0) to twin (a = 1), ticket against
    control, at the rounds nearest a few levels of weights remaining; mean ± sd over trials (a
    trial's reinit draws averaged first)."""
    from matplotlib.figure import Figure

    rounds = nearest_rounds(rows, INTERPOLATION_LEVELS)
    pct = rows[rows.variant == "ticket"].groupby("round").weights_pct.mean()
    test = paths[(paths.split == "test") & paths["round"].isin(rounds)]
    curves = per_trial(test, ["variant", "round", "trial", "alpha"], ["error"])
    shown = [v for v in ("ticket", "control") if v in set(curves.variant)]
    fig = Figure(figsize=(3.2 * len(rounds) + 0.8, 3.8), dpi=150)
    axes = fig.subplots(1, len(rounds), sharey=True, squeeze=False)[0]
    for ax, rnd in zip(axes, rounds):
        for variant in shown:
            g = curves[(curves.variant == variant) & (curves["round"] == rnd)].groupby("alpha").error
            mean, sd = g.mean(), g.std()
            ax.plot(mean.index, mean.values, marker=".", ms=3, lw=1, color=COLORS[variant], label=LABELS[variant])
            if rows.trial.nunique() > 1:
                ax.fill_between(mean.index, mean - sd, mean + sd, color=COLORS[variant], alpha=0.2, lw=0)
        ax.set_title(f"{pct[rnd]:.2f}% of weights (round {rnd})", fontsize=9)
        ax.set_xlabel("a: member (0) to twin (1)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Linear interpolation between two copies trained on different data orders, {rows.trial.nunique()} trial(s)",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def plot_layers(rows: pd.DataFrame, path: Path) -> None:
    """Weights remaining per layer against the round: the ticket's, and beside it each mask found at
    initialisation (their shuffles and reinits share its per-layer counts). A layer at 0% has
    collapsed: its line stops (a log axis has no 0) and the panel's title says so."""
    from matplotlib.figure import Figure

    shown = [v for v in ("ticket", *AT_INIT) if v in set(rows.variant)]
    if shown == ["ticket"]:
        fig, ax = new_axes()
        layer_panel(ax, rows[rows.variant == "ticket"], "Global pruning strips fc1 first and spares the output layer")
    else:
        fig = Figure(figsize=(4.2 * len(shown), 4.2), dpi=150)
        for ax, variant in zip(fig.subplots(1, len(shown), sharey=True), shown):
            members = rows[rows.variant == variant]
            empty = collapse_note(members)
            layer_panel(ax, members, LABELS[variant] + (": a layer collapses" if empty else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def layer_panel(ax: Any, rows: pd.DataFrame, title: str) -> None:
    """One variant's weights remaining per layer (and overall), mean ± sd over trials, per round."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    long = rows.melt(
        id_vars=["trial", "round"],
        value_vars=[f"{n}_pct" for n in LAYERS] + ["weights_pct"],
        var_name="layer",
        value_name="pct",
    )
    long["layer"] = long.layer.str.replace("_pct", "").replace({"weights": "overall"})
    sns.lineplot(data=long, x="round", y="pct", hue="layer", marker="o", errorbar="sd", ax=ax)
    ax.set_yscale("log", nonpositive="mask")
    percent_log_axis(ax.yaxis, long.pct[long.pct > 0].min())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("pruning round")
    ax.set_ylabel("weights remaining (%)")
    ax.set_title(title, fontsize=10)


PIXEL_ROUNDS = (0, 5, 10, 15, 20)


def plot_pixels(masks: dict[str, Tensor], path: Path) -> None:
    """What fc1 keeps, per input pixel, as 28x28 maps at a few rounds (trial 0), for the ticket and
    the random-mask control: the pixel's surviving connections over fc1's average per pixel, so
    1 is an average pixel at any sparsity, 0 a pixel cut off, and a random mask is near 1 everywhere."""
    shown = [(LABELS["ticket"], masks["fc1"])]
    if "random.fc1" in masks:
        shown.append((LABELS["random"], masks["random.fc1"]))
    done = masks["fc1"].shape[1]
    rounds = sorted({r for r in PIXEL_ROUNDS if r < done} | {done - 1})
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.9 * len(rounds) + 0.8, 2.1 * len(shown) + 0.4), dpi=150)
    axes = fig.subplots(len(shown), len(rounds), squeeze=False)
    for (label, fc1), row in zip(shown, axes):
        for r, ax in zip(rounds, row):
            kept = fc1[0, r].float()  # [300, 784]
            relative = kept.mean(0) / kept.mean()
            image = ax.imshow(relative.view(28, 28).numpy(), vmin=0, vmax=3, cmap="magma")
            ax.set_title(f"round {r}: {100 * kept.mean():.1f}% of fc1", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label)
    fig.colorbar(image, ax=axes, shrink=0.8, label="connections kept / fc1's mean")
    fig.suptitle("Which input pixels fc1 keeps (trial 0)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    return bool(shell and getattr(shell, "get_ipython", lambda: None)())


def show_inline(paths: Sequence[Path]) -> None:
    if in_notebook():
        from IPython.display import Image, display

        for p in paths:
            display(Image(filename=str(p)))


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what platform knows: speed figures name their machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict[str, Any]:
    gpu = device if device is not None and device.type == "cuda" else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(gpu) if torch.cuda.is_available() else None,
    }


def write_config(cfg: Config, device: torch.device, out: Path, **extra: Any) -> None:
    payload = {"config": dataclasses.asdict(cfg), "device": str(device), **environment(device), **extra}
    write_text(out / "config.json", json.dumps(payload, indent=2) + "\n")


def write_outputs(rows: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """summary.md and the figures, from the rows of every finished round."""
    summary = summary_markdown(rows)
    if "instability" in rows:
        summary += "\n" + instability_markdown(rows)
    write_text(out / "summary.md", summary)
    present, figures = set(rows.variant), []
    for name, shown, needs, title in FIGURES:
        if not needs or present & set(needs):
            figures.append(out / name)
            plot_vs_weights(
                rows, figures[-1], "test_acc", shown, "test accuracy (%)", f"LeNet-300-100 on MNIST: {title}"
            )
    if "untrained_acc" in rows:
        criterion = ((read_config_json(out) or {}).get("config") or {}).get("criterion", "magnitude")
        figures.append(out / "supermask.png")
        plot_vs_weights(
            rows,
            figures[-1],
            "untrained_acc",
            list(LABELS),
            "test accuracy before training (%)",
            f"Supermasks: accuracy before training ({criterion} masks)",
            reference=(10.0, "chance"),
        )
    if {"signs", "constant"} & present:
        write_text(out / "signs.md", signs_markdown(rows))
    if set(AT_INIT) & present and "untrained_acc" in rows:
        write_text(out / "at_init.md", at_init_markdown(rows))
    if "early_stop_iter" in rows:
        write_text(out / "early_stop.md", early_stop_markdown(rows))
        figures.append(out / "early_stop.png")
        plot_early_stopping(rows, figures[-1])
    if (out / "validation.csv").exists():
        figures.append(out / "test_acc_over_iterations.png")
        plot_over_iterations(pd.read_csv(out / "validation.csv"), rows, figures[-1])
    if "instability" in rows:
        write_text(out / "stability.md", stability_markdown(rows))
        figures += stability_figures(rows, out)
    figures.append(out / "layers.png")
    plot_layers(rows, figures[-1])
    if (out / "masks.pt").exists():
        figures.append(out / "pixels.png")
        plot_pixels(load_masks(out), figures[-1])
    return summary, figures


def stability_figures(rows: pd.DataFrame, out: Path) -> list[Path]:
    """--stability: instability.png from the rows, interpolation.png from stability.csv."""
    plot_vs_weights(
        rows,
        out / "instability.png",
        "instability",
        list(LABELS),
        "instability: test error barrier (points)",
        "Is the network stable to SGD noise? (Frankle et al. 2020)",
        reference=(STABLE_BELOW, f"stable: under {STABLE_BELOW:g} points"),
    )
    if not (out / "stability.csv").exists():
        return [out / "instability.png"]
    plot_interpolation(pd.read_csv(out / "stability.csv"), rows, out / "interpolation.png")
    return [out / "instability.png", out / "interpolation.png"]


CHECKPOINT = "checkpoint.pt"


def checkpoint_every_s() -> float:
    """Within a round, an epoch's end is checkpointed once this many seconds (LOT_CHECKPOINT_EVERY_S,
    default 60) have passed since the last checkpoint; a finished round and a pause always are."""
    text = os.environ.get("LOT_CHECKPOINT_EVERY_S", "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UsageError(f"LOT_CHECKPOINT_EVERY_S must be a number of seconds, 0 or more, got {text!r}")
    return seconds


OUTPUT_FILES = (
    "results.csv",
    "curves.csv",
    "validation.csv",
    "masks.pt",
    "tickets.pt",
    *(f[0] for f in FIGURES),
    "supermask.png",
    "signs.md",
    "at_init.md",
    "pixels.png",
    "early_stop.png",
    "test_acc_over_iterations.png",
    "layers.png",
    "summary.md",
    "early_stop.md",
    "config.json",
    "transfer.csv",
    "transfer.png",
    "stability.csv",
    "stability.md",
    "instability.png",
    "interpolation.png",
    CHECKPOINT,
)


def checkpoint_name(ranks: Ranks) -> str:
    return CHECKPOINT if ranks.world == 1 else f"checkpoint.rank{ranks.rank}.pt"


def save_checkpoint(
    out: Path, cfg: Config, device: torch.device, data_sha256: str, state: RunState, name: str = CHECKPOINT
) -> None:
    payload = {
        "format": 2,
        "config": {**dataclasses.asdict(cfg), "sparse": sparse_engine(cfg)},  # auto resolved on this machine
        "device": str(device),
        "data_sha256": data_sha256,
        "state": {f.name: getattr(state, f.name) for f in dataclasses.fields(RunState)},
    }
    save_torch(out / name, payload)


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """Settings of cfg that would change the saved run's numbers. More --rounds only extends it;
    a setting the saved run predates counts as its default."""
    now, defaults = dataclasses.asdict(cfg), dataclasses.asdict(Config())
    then = {k: saved.get(k, defaults[k]) for k in now}
    return [
        f"--{k.replace('_', '-')} {now[k]} (the run in --out has {then[k]})"
        for k in now
        if k not in RESUME_NEUTRAL
        and then[k] != now[k]
        and not (k == "rounds" and isinstance(then[k], int) and now[k] >= then[k])
    ]


def load_checkpoint(out: Path, name: str = CHECKPOINT) -> tuple[RunState, dict]:
    """The state saved in out/checkpoint.pt and the rest of it (config, device, data_sha256),
    refusing anything but plain tensors and containers (weights_only: no pickled object runs)."""
    path = out / name
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"refusing {path}: it holds pickled Python objects, not a checkpoint of plain tensors"
        ) from None
    except Exception as e:  # zip, EOF and format errors: a truncated or damaged file
        raise UsageError(f"{path} is corrupt or truncated ({type(e).__name__}: {one_line(e)[:120]})") from None
    try:
        state = RunState(**payload["state"])
        meta = {
            "config": dict(payload["config"]),
            "device": str(payload["device"]),
            "data_sha256": str(payload["data_sha256"]),
        }
        trials = len(state.trials) if state.trials else meta["config"]["trials"]  # this process's trials
        saved_cfg = Config(
            **{k: v for k, v in meta["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
        )
        members = trials * len(variants(saved_cfg)) * copies(saved_cfg)
        layer_shapes = [(trials, o, i) for o, i in SHAPES]
        shapes_ok = (
            payload["format"] == 2
            and all([tuple(p.shape) for p in ps] == layer_shapes for ps in state.pruned_at.values())
            and all(p.shape[0] == members for p in state.params)
            and len(state.control_rng) == len(state.data_rng) == trials
        )
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, UsageError):
        shapes_ok = False
    if not shapes_ok:
        raise UsageError(f"{path} is not a checkpoint of this script (unexpected contents)")
    return state, meta


def read_config_json(out: Path) -> dict | None:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def check_out(cfg: Config) -> None:
    """Before anything is computed: --out must be a directory this run may write into. Files of
    an earlier run there are never replaced silently; other files and folders are never touched."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()] + [
        p.name for p in out.glob("checkpoint.rank*.pt")
    ]
    if cfg.resume or cfg.overwrite or not earlier:
        return
    saved = read_config_json(out)
    what = f"files of an earlier run ({', '.join(earlier)})"
    if saved and isinstance(saved.get("config"), dict):
        diffs = config_differences(saved["config"], cfg)
        status = saved.get("status", "earlier")
        what = f"a {status} run with other settings: {', '.join(diffs)}" if diffs else f"a {status} run like this one"
    raise UsageError(
        f"--out {out}/ already holds {what}; pass --resume to continue it, --overwrite to replace it, "
        f"or choose another --out"
    )


def prepare_out(cfg: Config, ranks: Ranks = Ranks()) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {cfg.out} is not writable ({e.strerror or one_line(e)})") from None
    if not ranks.leader:
        return out
    for name in [*OUTPUT_FILES, *(p.name for p in out.glob("checkpoint.rank*.pt"))]:
        for tmp in out.glob(f".{Path(name).stem}.tmp*{Path(name).suffix}"):  # a kill mid-write leaves one
            tmp.unlink(missing_ok=True)
        if cfg.overwrite:  # only what this script writes; anything else stays
            (out / name).unlink(missing_ok=True)
    return out


class StopSignal:
    """Ctrl-C or SIGTERM asks the run to stop after the current step, checkpointed; a second
    signal stops at once (KeyboardInterrupt). Calling the object says whether a stop was asked."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nlot_improved: {signal.Signals(signum).name}: stopping after this step (again to stop at once)",
            file=sys.stderr,
        )


@contextlib.contextmanager
def stop_on_signals():
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_as_script() -> bool:
    """This file is the program: `python lot_improved.py`, or `%run lot_improved.py` in a notebook
    (which sets sys.argv and __file__ as a shell would). Pasted into a cell, it has no __file__."""
    script = globals().get("__file__")
    return bool(script and sys.argv and sys.argv[0]) and Path(sys.argv[0]).resolve() == Path(script).resolve()


def command_line() -> list[str]:
    """The user's flags: sys.argv, except in a notebook cell, where sys.argv holds the kernel's own
    arguments (-f kernel.json) and settings come only from main([...]); `%run lot_improved.py FLAGS`
    passes FLAGS, as a command line does."""
    return sys.argv[1:] if run_as_script() or not in_notebook() else []


def cli_flags(cfg: Config) -> list[str]:
    """The flags that give cfg: only the settings that differ from the preset's (and the preset)."""
    flags, preset = [], Config(**PRESETS[cfg.preset])
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name not in ("resume", "overwrite") and (
            value != getattr(preset, f.name) or f.name == "preset" and value != f.default
        ):
            flag = "--" + f.name.replace("_", "-")
            flags += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return flags


def resume_command(cfg: Config) -> str:
    """How to continue this run, as the user would type it here: a shell command, `%run` in a
    notebook that ran the file so, else the main([...]) call of a notebook cell."""
    flags = [*cli_flags(cfg), "--resume"]
    if in_notebook() and not run_as_script():
        return "main([" + ", ".join(json.dumps(f) for f in flags) + "])"
    return " ".join(["%run" if in_notebook() else "python", "lot_improved.py", *map(shlex.quote, flags)])


def gpu_hint(cfg: Config, ranks: Ranks, device: torch.device, visible: int) -> str | None:
    """With several GPUs visible a process trains on one (the stack's steps are launch-bound;
    DataParallel would only add copies): the line that says so, with the command that uses all."""
    if device.type != "cuda" or ranks.launched or visible < 2 or cfg.data_parallel or cfg.resume:
        return None
    flags = cli_flags(dataclasses.replace(cfg, trials=max(cfg.trials, visible), device="auto"))
    command = shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(visible), "lot_improved.py", *flags])
    if in_notebook():
        command = f"!{command} (with the file on disk: %%writefile lot_improved.py)"
    return f"{visible} GPUs visible, this process uses {device} alone; to train on all {visible}: {command}"


# ==================================================================================================
# CLI and main
# ==================================================================================================


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; users get one line
        print(f"lot_improved: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field. Defaults are left out of the namespace (SUPPRESS), so that
    parse_config can tell an explicit flag, which beats the preset, from a default."""
    parser = _Parser(
        prog="lot_improved.py",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # an abbreviation could also swallow a notebook kernel's own argument
    )
    types = typing.get_type_hints(Config, globals())  # this namespace, also when pasted into a cell
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = "off" if f.default is False else "on" if f.default is True else f.default
        default = "all" if f.name == "train_subset" else default
        default = "on where PyTorch has MKL, else off" if f.name == "sparse" else default
        default = "none" if default is None else default
        text = f"{f.metadata['help']} (default: {default})"
        kind = next((t for t in typing.get_args(types[f.name]) if t is not type(None)), types[f.name])  # Optional[X]: X
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), help=text)
    return parser


def closest_flag(arg: str, parser: argparse.ArgumentParser) -> str:
    """The real flag a mistyped one most likely meant: '--trails' -> '--trials',
    '--prune_rate' -> '--prune-rate', '--ep' -> '--epochs'; '' if none is close."""
    flags = [f for action in parser._actions for f in action.option_strings if f.startswith("--")]
    typed = arg.split("=", 1)[0].replace("_", "-")
    prefixed = [f for f in flags if f.startswith(typed) and not f.startswith("--no-")]
    match = prefixed if len(prefixed) == 1 else difflib.get_close_matches(typed, flags, n=1, cutoff=0.6)
    return match[0] if match else ""


def parse_config(argv: Sequence[str]) -> Config:
    """The run's settings: Config's defaults, then the --preset's values, then explicit flags.
    Any argument that is not a flag of this script, spelt out in full, is bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        near = closest_flag(unknown[0], parser)
        raise UsageError(f"unrecognised argument {unknown[0]!r}" + (f"; did you mean {near}?" if near else ""))
    explicit = vars(args)
    preset = explicit.get("preset", Config.preset)
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return Config(**{**PRESETS[preset], **explicit})


def replot(out: Path) -> int:
    """Redraw summary.md and the figures of a finished (or interrupted) run from its results.csv."""
    path = out / "results.csv"
    try:
        rows = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--replot: cannot read {path} ({type(e).__name__}: {one_line(e)[:120]})") from None
    missing = {"trial", "round", "variant", "weights_pct", "test_acc", *(f"{n}_pct" for n in LAYERS)} - set(rows)
    if missing or rows.empty:
        raise UsageError(f"--replot: {path} is not a results.csv of this script (missing {sorted(missing)})")
    summary, figures = write_outputs(rows, out)
    print(summary)
    show_inline(figures)
    return EXIT_CODES["finished"]


EXIT_CODES = {
    "finished": 0,
    "cannot write": 1,
    "bad input": 2,
    "diverged": 3,
    "rank lost": 4,
    "SIGINT": 130,
    "SIGTERM": 143,
}


@dataclass
class Job:
    """A run resolved before any training: settings, this process's place, device, data, where
    it writes and the state it starts from (fresh, or a checkpoint's)."""

    plan: Plan
    ranks: Ranks
    device: torch.device
    out: Path
    checkpoint: str
    state: RunState
    train: Split
    test: Split
    transfer: tuple[Split, Split] | None
    data_sha: str
    stop_signal: int | None = None  # the signal that stopped training, if one did

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def speaker(self) -> str:
        return f"lot_improved: rank {self.ranks.rank}" if self.ranks.world > 1 else "lot_improved"


def check_torchrun(cfg: Config, ranks: Ranks) -> None:
    if ranks.launched and cfg.data_parallel:
        raise UsageError("--data-parallel and torchrun do not mix: torchrun already gives each GPU a process")
    if cfg.trials < ranks.world:
        raise UsageError(f"--trials {cfg.trials} is fewer than the {ranks.world} torchrun processes")


def saved_run(cfg: Config, ranks: Ranks, device: torch.device) -> tuple[RunState | None, dict]:
    """With --resume: the checkpointed state (None if the run was stopped before its first
    checkpoint) and what the run in --out recorded, refusing settings that would change it."""
    out, name = Path(cfg.out), checkpoint_name(ranks)
    if not cfg.resume:
        return None, {}
    state, saved = None, {}
    if (out / name).exists():
        state, saved = load_checkpoint(out, name)
        if trial_ids(state) != shard(cfg.trials, ranks):
            raise UsageError(
                f"--resume: {name} holds trials {trial_ids(state)}, this process runs "
                f"{shard(cfg.trials, ranks)}: resume with as many processes as before"
            )
    else:  # stopped before its first checkpoint: nothing to lose, start again
        saved = read_config_json(out) or {}
        if not isinstance(saved.get("config"), dict):
            raise UsageError(f"--resume: {cfg.out}/ holds no {name} and no run of this script")
        if saved.get("status") == "finished":  # its state is gone: never train its rounds over again
            raise UsageError(
                f"--resume: {cfg.out}/ holds a finished run but no {name} to continue from (committed runs "
                "leave it out); rerun with --overwrite or choose another --out"
            )
    diffs = config_differences(saved["config"], cfg)
    if diffs:
        raise UsageError(f"--resume: settings differ from the run in {cfg.out}/: {', '.join(diffs)}")
    then = torch.device(saved["device"])  # older runs saved "cuda": cuda:0
    if state and (torch.device("cuda", 0) if then == torch.device("cuda") else then) != device:
        warn(
            f"resuming on {device} a run begun on {saved['device']}: later numbers may differ in the "
            "last bits from an uninterrupted run"
        )
    then = saved["config"].get("sparse", False)  # runs from before --sparse were dense
    then, now = torch.backends.mkl.is_available() if then is None else then, sparse_engine(cfg)
    if state and then != now:
        warn(
            f"resuming {'with' if now else 'without'} --sparse a run begun "
            f"{'without' if now else 'with'} it: later sparse rounds may differ in the last bits"
        )
    return state, saved


def prepare(cfg: Config, ranks: Ranks, device: torch.device) -> Job:
    """Everything that can be refused as bad input, checked before --out is touched."""
    check_out(cfg)
    state, saved = saved_run(cfg, ranks, device)
    arrays = load_mnist_arrays(cfg.data_dir)
    data_sha = fingerprint(arrays)
    if state and saved["data_sha256"] != data_sha:
        raise UsageError(f"--resume: the MNIST found via --data-dir {cfg.data_dir} is not the data the run began with")
    train, test = to_splits(arrays, device, cfg.train_subset)
    transfer = to_splits(load_transfer_arrays(cfg), device, cfg.train_subset, own_stats=True) if cfg.transfer else None
    if cfg.val_size >= len(train.y):
        raise UsageError(f"--val-size {cfg.val_size} leaves no training images (of {len(train.y)})")
    plan = make_plan(cfg, len(train.y) - cfg.val_size)
    out = prepare_out(cfg, ranks)
    state = state or fresh_state(cfg, shard(cfg.trials, ranks))
    return Job(plan, ranks, device, out, checkpoint_name(ranks), state, train, test, transfer, data_sha)


class Session:
    """What a run writes, and when: config.json with its status and times, the tables after every
    round (gathered from every torchrun rank), and checkpoints."""

    def __init__(self, job: Job, started: float):
        self.job, self.started = job, started
        self.earlier_s = job.state.elapsed_s  # spent by the processes this one resumes
        self.merged: RunState | None = None  # every rank's finished rounds, on rank 0
        self.graphs: list[str] | None = None  # every rank's cuda_graphs (graphs_status), on rank 0
        self.every_s = checkpoint_every_s()
        self.last_save = self.round_began = time.perf_counter()

    def elapsed(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def timing(self) -> dict[str, float]:
        """A resumed run reports its whole time, and this process's."""
        this = round(time.perf_counter() - self.started, 1)
        return {
            "wall_time_s": round(self.elapsed(), 1),
            **({"wall_time_this_process_s": this} if self.earlier_s else {}),
            "round_s": self.job.state.round_s,
        }

    def config(self, status: str, **extra: Any) -> None:
        job = self.job
        if job.ranks.leader:
            write_config(
                job.cfg,
                job.device,
                job.out,
                status=status,
                data_sha256=job.data_sha,
                world_size=job.ranks.world,
                process_group=dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                fc1_engine="csr" if job.state.csr_rounds else "dense",  # what ran, not what was asked
                fc1_csr_rounds=job.state.csr_rounds,
                **self.graphs_record(),
                **extra,
            )

    def graphs_record(self) -> dict[str, Any]:
        """cuda_graphs of the run: this process's, or under torchrun the ranks' common value, else
        each rank that differs named (and cuda_graphs_by_rank, every rank's)."""
        job = self.job
        ranks = self.graphs or [graphs_status(job.cfg, job.device, job.state.graph_fallbacks)]
        if self.graphs is None or not job.ranks.launched:  # before the first gather: this process's
            return {"cuda_graphs": ranks[0]}
        differ = "; ".join(f"rank {i}: {s.removeprefix('fell back: ')}" for i, s in enumerate(ranks) if s != "on")
        return {
            "cuda_graphs": ranks[0] if len(set(ranks)) == 1 else f"fell back: {differ}",
            "cuda_graphs_by_rank": ranks,
        }

    def tables(self, state: RunState) -> None:
        """A collective under torchrun: rank 0 gathers and writes."""
        job = self.job
        graphs = graphs_status(job.cfg, job.device, state.graph_fallbacks)
        self.graphs = gather_objects(graphs, job.ranks) if job.ranks.launched else [graphs]
        self.merged = gather_states(state, self.job.ranks)
        if self.job.ranks.leader:
            write_tables(self.job.cfg, self.merged, self.job.out)

    def save(self, snapshot: Callable[[], RunState], event: str) -> None:
        """run_experiment's on_epoch: a finished round's tables, then the checkpoint."""
        if event == "epoch" and time.perf_counter() - self.last_save < self.every_s:
            return  # a long round's epochs are seconds apart on a GPU; its checkpoint is megabytes
        state = snapshot()
        if event == "round":  # first: a round is checkpointed as done once every rank has finished it
            state.round_s.append(round(time.perf_counter() - self.round_began, 2))  # its training, not its writing
            self.tables(state)
        state.elapsed_s = self.elapsed()
        save_checkpoint(self.job.out, self.job.cfg, self.job.device, self.job.data_sha, state, self.job.checkpoint)
        self.last_save = time.perf_counter()
        if event == "round":
            self.round_began = self.last_save


def announce(job: Job) -> None:
    cfg, ranks = job.cfg, job.ranks
    length = f"{cfg.iterations} iterations" if cfg.iterations else f"{cfg.epochs} epochs"
    print(
        f"lot_improved: {cfg.trials} trial(s) x {len(variants(cfg))} variants"
        + (" x 2 (each with its twin: --stability)" if cfg.stability else "")
        + (f" on {ranks.world} processes" if ranks.world > 1 else "")
        + f", {cfg.rounds + 1} rounds x {length} on {len(job.train.y) - cfg.val_size} images, device {job.device}, "
        f"writing to {job.out}/"
        + (f", resuming at round {job.state.round} epoch {job.state.epoch}" if cfg.resume else ""),
        file=sys.stderr,
    )
    hint = gpu_hint(cfg, ranks, job.device, torch.cuda.device_count() if job.device.type == "cuda" else 0)
    if hint:
        print(f"lot_improved: {hint}", file=sys.stderr)


def transfer_outputs(job: Job, state: RunState) -> list[Path]:
    """--transfer: every round's ticket mask retrained on Fashion-MNIST; transfer.csv and its figure."""
    rows = gather_rows(run_transfer(job.cfg, state, *job.transfer, progress=job.ranks.leader), job.ranks)
    if not job.ranks.leader:
        return []
    frame = pd.DataFrame(rows)
    atomic_write(job.out / "transfer.csv", lambda tmp: frame.to_csv(tmp, index=False))
    dense = frame[(frame["round"] == 0) & (frame.variant == "ticket")].test_acc.mean()
    plot_vs_weights(
        frame,
        job.out / "transfer.png",
        "test_acc",
        ("ticket", "reinit"),
        "Fashion-MNIST test accuracy (%)",
        "MNIST tickets retrained on Fashion-MNIST",
        xlabel="weights remaining (%), masks found on MNIST",
        reference=(dense, "dense (round 0 ticket)"),
    )
    return [job.out / "transfer.png"]


class Stopped(Exception):
    """Training ended early on purpose: a signal, or the other torchrun processes being stopped."""


def stop_reason(e: BaseException, job: Job, signum: int | None) -> tuple[str, str]:
    """How each way of ending early is reported: (EXIT_CODES key, the one line printed)."""
    resume = resume_command(job.cfg)
    signal_name = signal.Signals(signum or signal.SIGINT).name
    if isinstance(e, (Paused, KeyboardInterrupt)):
        where = f"checkpoint at {e}" if isinstance(e, Paused) else "last checkpoint kept"
        return (
            signal_name,
            f"{job.speaker}: {signal_name}: stopped, {job.state.round} round(s) finished, {where}; "
            f"resume with: {resume}",
        )
    if isinstance(e, Stopped):
        return (
            signal_name,
            f"{job.speaker}: {signal_name}: stopped while waiting for the other processes; every checkpoint is "
            f"complete; resume with: {resume}",
        )
    if isinstance(e, Diverged):
        return (
            "diverged",
            f"{job.speaker}: error: {e}; finished rounds and the last good checkpoint are kept in {job.out}/",
        )
    if isinstance(e, RankLost):
        return "rank lost", (
            f"{job.speaker}: error: lost contact with the other torchrun processes ({one_line(e)[:160]}); every "
            f"checkpoint is complete; resume with: {resume}"
        )
    reason = e.strerror or one_line(e)  # OSError: a full disk, a vanished directory
    return "cannot write", (
        f"{job.speaker}: error: cannot write to {job.cfg.out}/ ({reason}); every file already there is complete; "
        f"free space and resume with: {resume}"
    )


def train(job: Job, session: Session) -> RunState:
    """Every round from the job's state to the last, stopping cleanly on a signal."""
    with stop_on_signals() as stop:
        try:
            return run_experiment(job.plan, job.train, job.test, job.state, session.save, stop, job.ranks.leader)
        except (Paused, KeyboardInterrupt):
            job.stop_signal = stop.signum
            raise
        except RankLost:
            if not stop():
                raise
            job.stop_signal = stop.signum  # the others were stopped too, mid-epoch
            raise Stopped() from None


def run(job: Job, started: float) -> int:
    """Train (or continue), checkpoint, write the outputs and report; each early end is one line
    and its exit code."""
    session = Session(job, started)
    try:
        session.config("running")
        if job.state.round > 0:  # a kill may have come between a checkpoint and the tables
            session.tables(job.state)
        if job.ranks.leader:
            announce(job)
        state = train(job, session)
        summary, figures = write_outputs(pd.DataFrame(session.merged.rows), job.out) if job.ranks.leader else ("", [])
        if job.transfer is not None:
            figures += transfer_outputs(job, state)
        session.config("finished", **session.timing())
    except KeyboardInterrupt as e:
        if job.state.round > job.cfg.rounds:  # the MNIST rounds were done: only the transfer stopped
            print(
                f"\n{job.speaker}: SIGINT: transfer stopped; the MNIST results in {job.out}/ are complete; to redo the "
                f"transfer: {resume_command(job.cfg)}",
                file=sys.stderr,
            )
            return EXIT_CODES["SIGINT"]
        return report_stop(e, job, session)
    except (Paused, Stopped, Diverged, RankLost, OSError) as e:
        return report_stop(e, job, session)
    if job.ranks.leader:
        print("\n" + summary)
        times = session.timing()
        took = duration(times["wall_time_s"])
        if "wall_time_this_process_s" in times:
            took += f" ({duration(times['wall_time_this_process_s'])} in this process)"
        print(f"lot_improved: finished in {took}; outputs in {job.out}/", file=sys.stderr)
        show_inline(figures)
    return EXIT_CODES["finished"]


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def report_stop(e: BaseException, job: Job, session: Session) -> int:
    """An early end: the finished rounds' figures and config.json as they stand, then one line."""
    code, line = stop_reason(e, job, job.stop_signal)
    if isinstance(e, (Paused, KeyboardInterrupt)):
        if job.ranks.leader and (job.out / "results.csv").exists():  # the finished rounds, as written
            write_outputs(pd.read_csv(job.out / "results.csv"), job.out)
        session.config("interrupted", **session.timing())
    elif isinstance(e, Diverged):
        session.config("diverged")
    print(line, file=sys.stderr)
    return EXIT_CODES[code]


def check_switches() -> None:
    """The environment's switches are read as main runs (a notebook sets them in a cell): bad
    values are bad input, like a flag's."""
    checkpoint_every_s()
    if os.environ.get("LOT_CUDA_GRAPHS", "1") not in ("0", "1"):
        raise UsageError(f"LOT_CUDA_GRAPHS must be 0 (eager CUDA steps) or 1, got {os.environ['LOT_CUDA_GRAPHS']!r}")


def join_process_group(device: torch.device) -> None:
    """Under torchrun: gloo between CPUs; NCCL between GPUs, each rank bound to its own GPU first
    (cuda:LOCAL_RANK), so that NCCL's buffers and gather_object's tensors live there, not all on GPU 0."""
    if device.type != "cuda":
        dist.init_process_group("gloo")
        return
    torch.cuda.set_device(device)
    bound = "device_id" in inspect.signature(dist.init_process_group).parameters  # PyTorch 2.3 on
    dist.init_process_group("nccl", **({"device_id": device} if bound else {}))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, prepare, run, write. argv defaults to the command line (in a
    notebook, none); returns the exit code (EXIT_CODES) instead of exiting. Bad input is found
    before anything in --out is touched. Under torchrun every rank runs this on its own trials;
    rank 0 alone writes the merged outputs."""
    started, ranks = time.perf_counter(), ranks_from_env()
    try:
        cfg = parse_config(command_line() if argv is None else argv)
        validate(cfg)
        check_switches()
        check_torchrun(cfg, ranks)
        device = resolve_device(cfg.device, ranks.local if ranks.launched else None)
        if cfg.replot:
            return replot(Path(cfg.out))
        job = prepare(cfg, ranks, device)
    except UsageError as e:
        speaker = f"lot_improved: rank {ranks.rank}" if ranks.world > 1 else "lot_improved"
        print(f"{speaker}: error: {e}", file=sys.stderr)
        return EXIT_CODES["bad input"]
    except SystemExit as e:  # argparse: --help (0)
        return int(e.code or 0)
    if ranks.launched:
        join_process_group(device)
    try:
        with on_device(device):
            return run(job, started)
    finally:
        if ranks.launched:
            dist.destroy_process_group()


def gather_rows(rows: list[dict], ranks: Ranks) -> list[dict] | None:
    """Every rank's rows on rank 0, in rank (= trial) order; None elsewhere."""
    if not ranks.launched:
        return rows
    parts = gather_objects(rows, ranks)
    return [r for p in parts for r in p] if ranks.leader else None


if __name__ == "__main__":
    _code = main()
    if _code and not in_notebook():  # a notebook cell must not raise SystemExit
        sys.exit(_code)
