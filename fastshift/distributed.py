"""Scale-out on ``torch.distributed`` (launched by ``torchrun``; NCCL on GPU, gloo on CPU).

What runs where (see the README, "Multi-process and multi-GPU"):
- Paper (sequential) mode and supernet pre-training: every rank draws the same full batch (the
  batch streams are seeded identically) and keeps its contiguous share of the rows
  (:func:`shard`). BatchNorm statistics are synchronized (:func:`sync_batch_norm`: sums over all
  ranks, so every normalisation and running-statistics update equals the one-process one for
  the full batch), the loss of each rank is its rows' share of the full-batch mean, gradients
  are summed over ranks (:func:`all_reduce_grads`) before each optimizer step, and validation
  hits are summed. Dropout masks are drawn for the full batch and sliced, so a CPU run equals
  the one-process run up to floating-point summation order.
- Batched mode: the K candidates of a group are split across ranks (:func:`split`), each rank
  runs its candidates on the full shared batch, the gradients of the summed loss are summed
  over ranks, one optimizer step everywhere; fitnesses are gathered.
- Evolution: every rank runs the same seeded evolution on the same (reduced / gathered)
  fitnesses, so decisions are identical without a broadcast. Rank 0 alone writes
  checkpoints, logs and results; a checkpoint holds nothing world-size specific, so any world
  size resumes it.
- A rank that dies makes the others fail at their next collective (gloo: connection closed;
  otherwise the process-group timeout, ``FASTSHIFT_DIST_TIMEOUT`` seconds, default 600) with a
  :class:`DistributedError` naming the operation, instead of hanging.

Everything here is a no-op in a single process (world size 1 or no process group).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["DistributedError", "init_from_env", "active", "rank", "world_size", "is_main",
           "shard", "split", "all_reduce_grads", "all_sum", "all_gather_objects",
           "sync_batch_norm", "path_loss", "barrier", "timeout_seconds"]


class DistributedError(RuntimeError):
    """A collective failed: another rank died or timed out."""


def timeout_seconds() -> float:
    """The collective timeout: ``FASTSHIFT_DIST_TIMEOUT`` seconds (default 600)."""
    value = os.environ.get("FASTSHIFT_DIST_TIMEOUT", "600")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"FASTSHIFT_DIST_TIMEOUT must be a number of seconds, got {value!r}"
                         ) from None
    if seconds <= 0:
        raise ValueError(f"FASTSHIFT_DIST_TIMEOUT must be positive, got {value!r}")
    return seconds


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by the environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). Returns whether this is
    a multi-process run. ``backend``: default ``nccl`` when CUDA is available, else ``gloo``.
    With NCCL each process uses ``cuda:LOCAL_RANK``."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return True


def active() -> bool:
    """A process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def _bounds(n: int, r: int, w: int) -> tuple[int, int]:
    """Contiguous share of ``n`` items for rank ``r`` of ``w`` (the first ``n % w`` ranks get
    one more), as ``torch.tensor_split``."""
    q, extra = divmod(n, w)
    start = r * q + min(r, extra)
    return start, start + q + (1 if r < extra else 0)


def shard(n: int) -> slice:
    """This rank's rows of a batch of ``n`` (all of them in one process)."""
    return slice(*_bounds(n, rank(), world_size()))


def split(items: list) -> tuple[int, list]:
    """``(offset, part)``: this rank's contiguous part of ``items`` and where it starts."""
    start, stop = _bounds(len(items), rank(), world_size())
    return start, items[start:stop]


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise DistributedError(
            f"rank {rank()}/{world_size()}: collective '{what}' failed (another rank probably "
            f"died or timed out after {timeout_seconds():g} s): {exc}") from exc


def all_sum(t: torch.Tensor, what: str = "all_sum") -> torch.Tensor:
    """In place: ``t`` := the sum of ``t`` over ranks (returned)."""
    if active():
        _collective(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params) -> None:
    """Sum the ``.grad`` of ``params`` over ranks, in one flat buffer. A parameter that has a
    gradient on some ranks only (batched mode: its block is on another rank's candidates) gets
    a zero gradient on the others first, so every rank ends with the same gradients on the
    same parameters, as the one-process run."""
    if not active():
        return
    params = list(params)
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                           device=device)
    _collective("gradient presence", dist.all_reduce, present, op=dist.ReduceOp.MAX)
    grads = []
    for p, used in zip(params, present.tolist()):
        if used and p.grad is None:
            p.grad = torch.zeros_like(p)
        if used:
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective("gradient all-reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _collective("all_gather_object", dist.all_gather_object, out, obj)
    return out


def barrier(what: str = "barrier") -> None:
    if active():
        _collective(what, dist.barrier)


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm without affine over the rows of all ranks (statistics summed over ranks,
    float64 accumulation). Forward saves x, the mean and 1/std; backward sums the two
    reductions of the gradient over ranks as well."""

    @staticmethod
    def forward(ctx, x, eps):
        dims = [0, *range(2, x.dim())]
        n = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        x64 = x.double()
        stats = torch.cat([n, x64.sum(dims), (x64 * x64).sum(dims)])
        all_sum(stats, "batch-norm statistics")
        c = x.shape[1]
        total = stats[0]
        mean = stats[1:1 + c] / total
        var = (stats[1 + c:] / total - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = ((x64 - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        # the output may be modified in place (ReLU(inplace=True)): keep the input instead
        ctx.save_for_backward(x, mean.to(x.dtype), invstd.to(x.dtype))
        ctx.total = float(total)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(mean, var, total)
        return xhat, mean, var, total

    @staticmethod
    def backward(ctx, grad, *_):
        x, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, grad.dim())]
        c = grad.shape[1]
        shape = [1, c] + [1] * (grad.dim() - 2)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        red = torch.cat([grad.double().sum(dims), (grad.double() * xhat.double()).sum(dims)])
        all_sum(red, "batch-norm gradient")
        mean_g = (red[:c] / ctx.total).to(grad.dtype).view(shape)
        mean_gx = (red[c:] / ctx.total).to(grad.dtype).view(shape)
        return (grad - mean_g - xhat * mean_gx) * invstd.view(shape), None


def sync_batch_norm(module: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the statistics of the rows of every rank (a ``batch_norm(module, x)``
    callback for the supernet's ``batch_norm=`` hook). Training: normalise by the global batch
    statistics and update the running ones as ``nn.BatchNorm2d`` would for the whole batch
    (unbiased variance, momentum or cumulative average); eval: the running statistics."""
    if not module.training:
        return F.batch_norm(x, module.running_mean, module.running_var, training=False,
                            eps=module.eps)
    y, mean, var, total = _SyncBatchNorm.apply(x, module.eps)
    if module.track_running_stats and module.running_mean is not None:
        with torch.no_grad():
            module.num_batches_tracked += 1
            momentum = (module.momentum if module.momentum is not None
                        else 1.0 / float(module.num_batches_tracked))
            n = float(total)
            unbiased = var * (n / max(n - 1.0, 1.0))
            module.running_mean.lerp_(mean.to(module.running_mean.dtype), momentum)
            module.running_var.lerp_(unbiased.to(module.running_var.dtype), momentum)
    return y


def path_loss(net, x, y, arch, label_smoothing: float):
    """``(loss to back-propagate, full-batch loss value)`` of ``net(x, arch)`` with
    label-smoothed cross-entropy. One process: the plain mean loss. Several ranks: this rank's
    rows (:func:`shard`), synchronized BN, full-batch dropout masks, and the loss is its rows'
    share of the full-batch mean, so the gradients summed over ranks
    (:func:`all_reduce_grads`) are the one-process ones; the value is summed over ranks."""
    if not active():
        loss = F.cross_entropy(net(x, arch), y, label_smoothing=label_smoothing)
        return loss, float(loss.detach())
    rows = shard(x.shape[0])
    logits = net(x[rows], arch, batch_norm=sync_batch_norm, rows=(rows.start, x.shape[0]))
    loss = F.cross_entropy(logits, y[rows], label_smoothing=label_smoothing,
                           reduction="sum") / x.shape[0]
    return loss, float(all_sum(loss.detach().reshape(1).clone(), "loss"))
