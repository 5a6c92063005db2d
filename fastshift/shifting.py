"""Fitness evaluation of candidate architectures on a supernet, with or without shifting.

With shifting (the released Supernet Shifting code, "paper" mode), evaluating a candidate is:
train mode; ``train_steps`` times: a training batch through the candidate's path, label-smoothed
cross-entropy, ``zero_grad``, backward, SGD step; then eval mode and top-1 / top-5 error on the
fixed validation batches, BN running statistics being those left by the training steps
(momentum 0.1). One optimizer (SGD lr 1e-4, momentum 0.9, weight decay 4e-5 on weights of
dim > 1 only) lives for the whole search.

Without shifting (SPOS): weights frozen; the BN statistics of the path are reset and recomputed
on ``train_steps`` batches in train mode under no_grad (momentum 0.1, as released), the error is
measured, and the supernet's previous BN statistics are put back.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .data import BatchStream, EvalSet
from .engine import PathStats, plan_chunks
from .ops import frozen_weights, tune_cpu_allocator
from .space import Arch

__all__ = ["FitnessConfig", "Shifter", "make_optimizer", "load_optimizer_state", "seeded_rng",
           "score_architectures", "UPDATE_MODES", "ZERO_GRAD_MODES"]

UPDATE_MODES = ("step", "candidate", "generation")
ZERO_GRAD_MODES = ("none", "zeros")


@dataclass
class FitnessConfig:
    """Per-candidate work and the shifting optimizer.

    ``train_steps`` / ``train_batch_size`` default to 20 x 150 with shifting (released Supernet
    Shifting) and 200 x 128 without (released SPOS BN recalibration).
    ``update``: ``step`` = an SGD step after every training batch (released); ``candidate`` =
    gradients averaged over the candidate's batches, one step per candidate; ``generation`` =
    gradients averaged over every batch of every candidate of a generation, one step at its end.
    ``zero_grad``: ``none`` = gradients set to None (torch >= 2: SGD skips blocks off the current
    path); ``zeros`` = gradients zeroed (torch 1.x: momentum and weight decay keep moving every
    block visited before).
    """

    shifting: bool = True
    update: str = "step"
    train_steps: int | None = None
    train_batch_size: int | None = None
    val_batches: int = 25
    val_batch_size: int = 500
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    zero_grad: str = "none"

    def __post_init__(self):
        if self.train_steps is None:
            self.train_steps = 20 if self.shifting else 200
        if self.train_batch_size is None:
            self.train_batch_size = 150 if self.shifting else 128
        if self.update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {self.update!r}")
        if self.zero_grad not in ZERO_GRAD_MODES:
            raise ValueError(f"zero_grad must be one of {ZERO_GRAD_MODES}, got {self.zero_grad!r}")
        for name in ("train_steps", "train_batch_size", "val_batches", "val_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(net: nn.Module, lr: float, momentum: float, weight_decay: float):
    """SGD with weight decay on parameters of dim > 1 only (the released ``get_parameters``).

    With every parameter on the CPU, PyTorch's fused SGD kernel (``fused=True``): one pass over
    parameter, gradient and momentum buffer per tensor instead of the four elementwise ops of
    the default per-tensor loop, which on a CPU are memory-bound (the whole SPOS supernet, 8.4M
    parameters, 9.4 -> 5.0 ms per step on the 2-core CPU of the README). Same formulas; the
    values equal the loop's except in the last bit of some elements of a tensor's last
    partial vector, where the two kernels round differently. Elsewhere PyTorch's default."""
    params = list(net.parameters())
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = bool(params) and all(p.device.type == "cpu" and p.is_floating_point() for p in params)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused or None)
    if fused:
        optimizer.register_step_pre_hook(_start_momentum_buffers)
    return optimizer


def _start_momentum_buffers(optimizer, args, kwargs):
    """Zero momentum buffers for the parameters about to take their first step. PyTorch's
    fused SGD starts buffers (buffer = gradient) only when no parameter of a group has one yet,
    and fails on a group where some have; in a supernet blocks get their first gradient at
    different steps. A zero buffer gives the same first step: 0 * momentum + gradient (with
    no dampening, as make_optimizer sets: the loop's first step ignores dampening)."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            if p.grad is not None:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """``optimizer.load_state_dict(state)`` keeping the optimizer's own implementation choice
    (``fused`` / ``foreach``, see :func:`make_optimizer`): a state saved on another device
    brings its device's choice in its parameter groups."""
    keep = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep):
        group.update(flags)


@contextlib.contextmanager
def seeded_rng(net: nn.Module, seed: int):
    """Run the body with the torch RNG of ``net``'s device seeded by ``seed`` (dropout masks),
    restoring the global RNG state afterwards."""
    device = next(net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _bn_modules(modules):
    return [m for mod in modules for m in mod.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Shifter:
    """Evaluates candidates on ``net`` (see the module docstring), sequentially.

    Args:
        net: a Supernet on its device.
        train_stream: the persistent training BatchStream (batch size = train_batch_size).
        val_set: the fixed EvalSet.
        config: FitnessConfig.
    """

    def __init__(self, net, train_stream: BatchStream, val_set: EvalSet, config: FitnessConfig):
        self.net = net
        self.stream = train_stream
        self.val_set = val_set
        self.config = config
        self.optimizer = (make_optimizer(net, config.lr, config.momentum, config.weight_decay)
                          if config.shifting else None)
        self.version = 0  # optimizer steps taken: tags every fitness with the weights it saw
        self._pending = 0  # candidates accumulated in "generation" mode

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": self.version,
            "pending": self._pending,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "stream": self.stream.state_dict(),
            # zero_grad="zeros" keeps zero gradients on every block visited before; SGD moves
            # exactly those, so which parameters hold a gradient is part of the state.
            "grad_present": [i for i, p in enumerate(self.net.parameters()) if p.grad is not None],
        }

    def load_state_dict(self, state: dict):
        self.version = int(state["version"])
        self._pending = int(state["pending"])
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        present = set(state.get("grad_present", []))
        for i, p in enumerate(self.net.parameters()):
            p.grad = torch.zeros_like(p) if i in present else None

    # -- evaluation -------------------------------------------------------------------------
    @staticmethod
    def _check_finite(value: float, arch, step: int) -> float:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss is {value} at step {step} of candidate {tuple(arch)}: the "
                "supernet diverged (lower lr) or the data hold NaN/Inf"
            )
        return value

    def _zero_grad(self):
        self.optimizer.zero_grad(set_to_none=self.config.zero_grad == "none")

    def _step(self):
        """One optimizer step on the gradients summed over ranks."""
        dist.all_reduce_grads(self.net.parameters())
        self.optimizer.step()
        self.version += 1

    def _train(self, arch: Arch) -> float:
        cfg = self.config
        net = self.net
        net.train()
        total = 0.0
        if cfg.update == "candidate":
            self._zero_grad()
        for step in range(cfg.train_steps):
            x, y = self.stream.next()
            loss, value = dist.path_loss(net, x, y, arch, cfg.label_smoothing)
            total += self._check_finite(value, arch, step)
            if cfg.update == "step":
                self._zero_grad()
                loss.backward()
                self._step()
            else:
                (loss / cfg.train_steps).backward()
        if cfg.update == "candidate":
            self._step()
        elif cfg.update == "generation":
            self._pending += 1
        return total / cfg.train_steps

    @torch.no_grad()
    def _recalibrate(self, arch: Arch):
        """SPOS: reset the path's BN statistics and recompute them in train mode."""
        for bn in _bn_modules(self.net.path_modules(arch)):
            bn.reset_running_stats()
        self.net.train()
        for _ in range(self.config.train_steps):
            x, _ = self.stream.next()
            if dist.active():
                rows = dist.shard(x.shape[0])
                self.net(x[rows], arch, batch_norm=dist.sync_batch_norm)
            else:
                self.net(x, arch)

    @torch.inference_mode()
    def error(self, arch: Arch) -> tuple[float, float]:
        """(top-1, top-5) error of ``arch`` in eval mode on the validation batches (under
        ``torch.inference_mode``: nothing here is differentiated or kept, and the ops skip
        autograd's bookkeeping: about 3 % of an eval forward at batch 128 on the CPU; and
        under ``ops.frozen_weights``: each weight is packed for the CPU products once, not
        once per batch)."""
        self.net.eval()
        top1 = top5 = total = 0
        with frozen_weights():
            for x, y in self.val_set.batches:
                if dist.active():  # each rank scores its share of the rows; hits are summed
                    rows = dist.shard(x.shape[0])
                    x, y = x[rows], y[rows]
                logits = self.net(x, arch)
                k = min(5, logits.shape[1])
                pred = logits.topk(k, dim=1).indices
                hit = pred == y[:, None]
                top1 += int(hit[:, 0].sum())
                top5 += int(hit.any(dim=1).sum())
                total += y.shape[0]
        if dist.active():
            top1, top5, total = dist.all_sum(torch.tensor([top1, top5, total]),
                                             "validation counts").tolist()
        return 1.0 - top1 / total, 1.0 - top5 / total

    def evaluate(self, arch: Arch, *, seed: int) -> dict:
        """Fitness of one candidate. ``seed`` fixes the dropout randomness of its training
        steps (the global torch RNG is left untouched)."""
        t0 = time.perf_counter()
        with seeded_rng(self.net, seed):
            if self.config.shifting:
                train_loss = self._train(arch)
                saved = None
            else:
                saved = [
                    {k: v.clone() for k, v in bn.state_dict().items()}
                    for bn in _bn_modules(self.net.path_modules(arch))
                ]
                self._recalibrate(arch)
                train_loss = float("nan")
        t1 = time.perf_counter()
        top1, top5 = self.error(arch)
        if saved is not None:
            for bn, state in zip(_bn_modules(self.net.path_modules(arch)), saved):
                bn.load_state_dict(state)
        t2 = time.perf_counter()
        return {
            "top1_err": top1,
            "top5_err": top5,
            "train_loss": train_loss,
            "supernet_version": self.version,
            "train_s": t1 - t0,
            "eval_s": t2 - t1,
        }

    # -- batched evaluation ------------------------------------------------------------------
    def evaluate_many(self, archs: list[Arch], *, seed: int, max_rows: int | None = None):
        """Fitness of K candidates evaluated together (batched mode).

        With shifting, each of the ``train_steps`` steps takes one training batch shared by the
        K candidates, sums their K losses, runs one backward and (update="step") one optimizer
        step; then one validation pass scores all K. Every candidate sees ``train_steps``
        batches of ``train_batch_size`` and every validation image, as in sequential mode.
        BN statistics are per candidate (``fastshift.engine.PathStats``), starting from the
        supernet's at the start of the batch; afterwards each BN module holds the mean of the
        statistics of the candidates that used it. Without shifting (SPOS), each candidate's
        path statistics are reset and recomputed on the shared batches, and the supernet's are
        left untouched. ``max_rows`` bounds the rows per layer of a training step (K is then
        processed in chunks, gradients accumulated); the passes without autograd (validation,
        SPOS recalibration) walk the prefix trie depth first and need no bound. Returns one
        dict per candidate, as ``evaluate``.
        """
        cfg = self.config
        net = self.net
        archs = [tuple(a) for a in archs]
        k = len(archs)
        # With several ranks each takes a contiguous part of the K candidates (all ranks see
        # the same batches); gradients are summed over ranks, fitnesses gathered.
        _, mine = dist.split(list(range(k)))
        mine_archs = [archs[i] for i in mine]
        t0 = time.perf_counter()
        stats = PathStats(net, reset=not cfg.shifting)
        losses = {i: 0.0 for i in mine}
        with seeded_rng(net, seed):
            net.train()
            if cfg.shifting and cfg.update == "candidate":
                self._zero_grad()
            for step in range(cfg.train_steps):
                x, y = self.stream.next()
                stats.begin_step()
                if not cfg.shifting:  # no autograd: one depth-first pass, no chunks needed
                    if mine_archs:
                        with torch.no_grad():
                            net.forward_many(x, mine_archs, stats=stats)
                    continue
                chunks = plan_chunks(mine_archs, x.shape[0], max_rows) if mine_archs else []
                if cfg.update == "step":
                    self._zero_grad()
                for chunk in chunks:
                    logits = net.forward_many(x, [mine_archs[i] for i in chunk], stats=stats)
                    per = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(chunk)),
                                          label_smoothing=cfg.label_smoothing,
                                          reduction="none").view(len(chunk), -1).mean(1)
                    for i, value in zip(chunk, per.detach().tolist()):
                        losses[mine[i]] += self._check_finite(value, archs[mine[i]], step)
                    scale = 1.0 if cfg.update == "step" else 1.0 / cfg.train_steps
                    (per.sum() * scale).backward()
                if cfg.update == "step":
                    self._step()
            if cfg.shifting and cfg.update == "candidate":
                self._step()
            elif cfg.shifting and cfg.update == "generation":
                self._pending += k
        t1 = time.perf_counter()
        net.eval()
        top1 = {i: 0 for i in mine}
        top5 = {i: 0 for i in mine}
        total = 0
        # as in error(): nothing here is differentiated or kept, each weight packed once
        with torch.inference_mode(), frozen_weights():
            for x, y in self.val_set.batches:
                if mine_archs:  # no autograd: one depth-first pass over the trie
                    logits = net.forward_many(x, mine_archs, stats=stats)
                    kk = min(5, logits.shape[-1])
                    hit = logits.topk(kk, dim=-1).indices == y[None, :, None]
                    for i, (h1, h5) in enumerate(zip(hit[..., 0].sum(1).tolist(),
                                                   hit.any(-1).sum(1).tolist())):
                        top1[mine[i]] += h1
                        top5[mine[i]] += h5
                total += y.shape[0]
        if dist.active():
            parts = dist.all_gather_objects((losses, top1, top5))
            for part_losses, part_top1, part_top5 in parts:
                losses.update(part_losses)
                top1.update(part_top1)
                top5.update(part_top5)
        if cfg.shifting:
            if dist.active():
                stats.merge(dist.all_gather_objects(stats.export()))
            stats.write_back()
        t2 = time.perf_counter()
        return [
            {
                "top1_err": 1.0 - top1[i] / total,
                "top5_err": 1.0 - top5[i] / total,
                "train_loss": losses[i] / cfg.train_steps if cfg.shifting else float("nan"),
                "supernet_version": self.version,
                "train_s": (t1 - t0) / k,
                "eval_s": (t2 - t1) / k,
            }
            for i in range(k)
        ]

    def end_generation(self):
        """In ``generation`` mode: one SGD step on the gradients accumulated over the
        generation, averaged over its candidates."""
        if self.config.shifting and self.config.update == "generation" and self._pending:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self._pending)
            self._step()
            self._zero_grad()
            self._pending = 0


def score_architectures(net, archs, train_data, val_data, *, recalib_steps: int = 200,
                        recalib_batch_size: int = 128, val_batches: int = 25,
                        val_batch_size: int = 500, seed: int = 0, batch_subnets: int = 1,
                        max_rows: int | None = None, device=None,
                        progress: bool = False) -> list[float]:
    """Top-1 accuracy of every arch of ``archs`` as ranked by ``net`` with SPOS evaluation:
    frozen weights, each path's BN statistics reset and recomputed on ``recalib_steps``
    training batches, then the fixed class-balanced validation subset of ``val_batches *
    val_batch_size`` images (``EvalSet.balanced``); images are cast to the supernet's dtype.
    The supernet's weights and BN statistics are left as they were.

    Every architecture is recalibrated on the same ``recalib_steps`` batches (the first of a
    stream seeded by ``seed``), so scores differ only through the architectures.
    ``batch_subnets`` K > 1 scores K architectures at a time (``Shifter.evaluate_many``, the
    batched engine); K = 1 runs ``Shifter.evaluate`` per architecture; both give the same
    scores. Returns one accuracy per arch, in order.
    """
    device = next(net.parameters()).device if device is None else torch.device(device)
    tune_cpu_allocator(device)
    cfg = FitnessConfig(shifting=False, train_steps=recalib_steps,
                        train_batch_size=recalib_batch_size, val_batches=val_batches,
                        val_batch_size=val_batch_size)
    if not isinstance(batch_subnets, int) or batch_subnets < 1:
        raise ValueError(f"batch_subnets must be a positive int, got {batch_subnets!r}")
    archs = [net.space.validate(a) for a in archs]
    dtype = next(net.parameters()).dtype
    shifter = Shifter(net, BatchStream(train_data, recalib_batch_size, seed=seed, device=device,
                                       dtype=dtype),
                      EvalSet.balanced(val_data, val_batches, val_batch_size, seed=seed,
                                       device=device, dtype=dtype), cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(archs), desc="score", unit="arch", dynamic_ncols=True)
    scores: list[float] = []
    was_training = net.training
    try:
        first_batches = shifter.stream.state_dict()
        for start in range(0, len(archs), batch_subnets):
            group = archs[start:start + batch_subnets]
            shifter.stream.load_state_dict(first_batches)  # every arch: the same batches
            if batch_subnets == 1:
                fits = [shifter.evaluate(group[0], seed=seed + start)]
            else:
                fits = shifter.evaluate_many(group, seed=seed + start, max_rows=max_rows)
            scores.extend(1.0 - f["top1_err"] for f in fits)
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    return scores
