"""SPOS supernet pre-training: one uniformly sampled path per iteration.

Released defaults: SGD lr 0.5 decayed linearly to 0, momentum 0.9, weight decay 4e-5 on weights
of dim > 1, label smoothing 0.1, batch 1024, 150,000 iterations. With ``flops_bins`` the SPOS
trick: pick a FLOPs bin uniformly, then draw up to 500 random paths until one lands in it (the
last draw is used if none does).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import FORMAT_VERSION, atomic_save
from .data import BatchStream
from .ops import tune_cpu_allocator
from .shifting import load_optimizer_state, make_optimizer, seeded_rng
from .supernet import Supernet

__all__ = ["train_supernet", "sample_path", "TRAIN_CHECKPOINT_NAME"]

TRAIN_CHECKPOINT_NAME = "supernet_checkpoint.pt"


def sample_path(space, rng: np.random.Generator, flops_bins=None, num_classes=None):
    """A random path; ``flops_bins = (low, high, step)`` samples a FLOPs bin uniformly first."""
    if flops_bins is None:
        return space.sample(rng)
    low, high, step = flops_bins
    if not (step > 0 and high > low):
        raise ValueError(f"flops_bins must be (low, high, step) with high > low, step > 0, "
                         f"got {flops_bins}")
    edges = np.arange(low, high, step)
    b = edges[int(rng.integers(len(edges)))]
    arch = space.sample(rng)
    for _ in range(500):
        if b <= space.flops(arch, num_classes) < b + step:
            break
        arch = space.sample(rng)
    return arch


def train_supernet(
    net: Supernet,
    train_data,
    *,
    iterations: int = 150_000,
    batch_size: int = 1024,
    lr: float = 0.5,
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    label_smoothing: float = 0.1,
    flops_bins: tuple | None = None,
    seed: int = 0,
    device=None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``net`` in place by uniform single-path sampling (SPOS).

    Args:
        net: the supernet.
        train_data: ``(images, labels)`` or a Dataset.
        iterations, batch_size, lr, momentum, weight_decay, label_smoothing: SGD (lr decays
            linearly to 0 over ``iterations``).
        flops_bins: optional ``(low, high, step)`` FLOPs-bin sampling.
        seed: path sampling, batch order and dropout.
        checkpoint_dir: atomic checkpoints every ``checkpoint_every`` iterations and at the end
            (``supernet_checkpoint.pt``: weights, optimizer, schedule, sampler and data state).
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.

    Returns ``{"iterations", "final_loss", "mean_loss_last_100", "seconds"}``.
    """
    if not isinstance(net, Supernet):
        raise TypeError(f"train_supernet needs a fastshift.Supernet, got {type(net).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}")
    device = next(net.parameters()).device if device is None else torch.device(device)
    tune_cpu_allocator(device)
    net.to(device)
    stream = BatchStream(train_data, batch_size, seed=seed, device=device,
                         dtype=next(net.parameters()).dtype)
    optimizer = make_optimizer(net, lr, momentum, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / iterations)
    )
    rng = np.random.default_rng(seed)
    start = 0
    losses: list[float] = []
    ckpt_path = (os.path.join(os.fspath(checkpoint_dir), TRAIN_CHECKPOINT_NAME)
                 if checkpoint_dir is not None else None)
    if resume and ckpt_path and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != "fastshift-train" or state["iterations"] != iterations:
            raise ValueError(f"{ckpt_path} is not a checkpoint of this training run "
                             f"(iterations {state.get('iterations')} vs {iterations})")
        net.load_state_dict(state["supernet"])
        load_optimizer_state(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        stream.load_state_dict(state["stream"])
        rng.bit_generator.state = state["rng"]
        start = int(state["done"])
        losses = list(state["losses"])

    def save(done):
        if not dist.is_main():  # rank 0 writes; every rank holds the same state
            return
        atomic_save({"format": "fastshift-train", "version": FORMAT_VERSION,
                     "iterations": iterations, "done": done, "supernet": net.state_dict(),
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "stream": stream.state_dict(), "rng": rng.bit_generator.state,
                     "losses": losses[-100:]}, ckpt_path)

    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc="train supernet", unit="it",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    net.train()
    try:
        for it in range(start, iterations):
            arch = sample_path(net.space, rng, flops_bins, net.num_classes)
            x, y = stream.next()
            with seeded_rng(net, seed * 1_000_003 + it):
                loss, value = dist.path_loss(net, x, y, arch, label_smoothing)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at iteration {it} (path {arch}): lower lr or "
                    "check the data for NaN/Inf"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.all_reduce_grads(net.parameters())
            optimizer.step()
            schedule.step()
            losses.append(value)
            if bar is not None:
                bar.update(1)
                if it % 10 == 0:
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule.get_last_lr()[0]:.4g}")
            if ckpt_path and (it + 1) % checkpoint_every == 0 and it + 1 < iterations:
                save(it + 1)
    finally:
        if bar is not None:
            bar.close()
    if ckpt_path:
        save(iterations)
    tail = losses[-100:]
    return {
        "iterations": iterations,
        "final_loss": losses[-1] if losses else float("nan"),
        "mean_loss_last_100": float(np.mean(tail)) if tail else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
