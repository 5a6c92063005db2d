"""Plain-PyTorch references of fastshift's fused ops.

These are the oracle of the tests, the ``reference`` backend and the benchmark baseline. They
are written for clarity and use only differentiable torch ops, so autograd is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_split", "channel_interleave", "shuffle_cat", "shuffle_cat_pair",
           "shuffle_regroup", "grouped_batch_norm", "dwconv_bn", "pwconv_bn_relu", "linear",
           "stem_conv_bn_relu", "update_running_stats"]


def channel_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ShuffleNetV2 channel shuffle as released: ``x [B, C, H, W]`` (C even) ->
    ``(x[:, 0::2], x[:, 1::2])``, each ``[B, C/2, H, W]``.

    The released ``channel_shuffle`` reshapes to ``[B*C/2, 2, H*W]``, permutes and splits, which
    is exactly this even/odd split. Returns strided views (no copy).
    """
    if x.dim() != 4:
        raise ValueError(f"channel_split: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] % 2:
        raise ValueError(f"channel_split: the channel count of x must be even, got {x.shape[1]}")
    return x[:, 0::2], x[:, 1::2]


def _check_shuffle_cat(name: str, a: torch.Tensor, b: torch.Tensor):
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"{name}: a and b must be 4-D, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if (a.shape[1] + b.shape[1]) % 2:
        raise ValueError(f"{name}: the channel count of cat(a, b) must be even, got "
                         f"{a.shape[1] + b.shape[1]}")


def shuffle_cat_pair(a: torch.Tensor, b: torch.Tensor):
    """:func:`shuffle_cat`'s two halves as two tensors: ``channel_split(cat((a, b), 1))``,
    a ShuffleNetV2 unit's concat and the next unit's split (``x_proj``, ``x_main``)."""
    _check_shuffle_cat("shuffle_cat_pair", a, b)
    return channel_split(torch.cat((a, b), 1))


def regroup_routes(routes) -> list[list[tuple[int, int, int]]]:
    """The flat ``routes`` of :func:`shuffle_regroup` (per destination its run count n, then n
    triples) as one list of ``(source, first block, end block)`` runs per destination."""
    routes = [int(v) for v in routes]
    dest, k = [], 0
    while k < len(routes):
        n = routes[k]
        if n < 0 or k + 1 + 3 * n > len(routes):
            raise ValueError(f"shuffle_regroup: routes: destination {len(dest)} is cut short")
        dest.append([tuple(routes[k + 1 + 3 * r:k + 4 + 3 * r]) for r in range(n)])
        k += 1 + 3 * n
    return dest


def shuffle_regroup(a: list[torch.Tensor], b: list[torch.Tensor], routes, batch: int):
    """The batched engine's hand-over between two layers. Sources ``i``: ``a[i] [R_i, Ca, H,
    W]`` and ``b[i] [R_i, Cb, H, W]``, stacks of ``R_i / batch`` row blocks; ``routes`` (see
    :func:`regroup_routes`) lists each destination's runs of blocks. Returns ``[lo_0, hi_0,
    lo_1, hi_1, ...]`` with ``(lo_d, hi_d) = shuffle_cat_pair(cat(a's runs), cat(b's runs))``."""
    if len(a) != len(b) or not a:
        raise ValueError("shuffle_regroup: a and b must be two non-empty lists of one length")
    out = []
    for runs in regroup_routes(routes):
        for i, b0, b1 in runs:
            if not (0 <= i < len(a) and 0 <= b0 < b1 <= a[i].shape[0] // batch):
                raise ValueError(f"shuffle_regroup: run {(i, b0, b1)} is outside the sources")
        pick = [(i, b0 * batch, (b1 - b0) * batch) for i, b0, b1 in runs] or [(0, 0, 0)]
        out.extend(shuffle_cat_pair(torch.cat([a[i].narrow(0, r, n) for i, r, n in pick]),
                                    torch.cat([b[i].narrow(0, r, n) for i, r, n in pick])))
    return out


def channel_interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`channel_split`: ``out[:, 0::2] = even``, ``out[:, 1::2] = odd``."""
    if even.shape != odd.shape or even.dim() != 4:
        raise ValueError(
            "channel_interleave: even and odd must be 4-D of equal shape, got "
            f"{tuple(even.shape)} and {tuple(odd.shape)}"
        )
    b, c, h, w = even.shape
    return torch.stack((even, odd), dim=2).reshape(b, 2 * c, h, w)


def shuffle_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A ShuffleNetV2 unit's concat followed by the next unit's channel split, laid out as one
    tensor: with ``t = cat((a, b), 1)`` (``a [B, Ca, H, W]``, ``b [B, Cb, H, W]``, ``C = Ca + Cb``
    even), returns ``cat(channel_split(t), 1)``, i.e. ``out[:, :C/2] = t[:, 0::2]`` and
    ``out[:, C/2:] = t[:, 1::2]``. The next unit's two halves are then the channel ranges
    ``out[:, :C/2]`` and ``out[:, C/2:]``."""
    _check_shuffle_cat("shuffle_cat", a, b)
    return torch.cat(channel_split(torch.cat((a, b), 1)), 1)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The network's classifier: ``x [B, C]``, ``weight [O, C]`` -> ``x @ weight.T [B, O]``
    (``nn.Linear`` without bias)."""
    return F.linear(x, weight)


def unbiased_factor(count: int) -> float:
    """The factor that makes a biased variance over ``count`` values unbiased (1 for one)."""
    return count / max(count - 1, 1)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         mean: torch.Tensor, var: torch.Tensor, count: int,
                         momentum: float) -> None:
    """In place, as ``F.batch_norm`` in training: ``running = (1 - momentum) * running +
    momentum * batch`` with the batch variance made unbiased over ``count`` values. ``mean``
    and ``var`` must not require grad (batch statistics are constants here); the running
    tensors are buffers. (Written without a no_grad context: this runs once per fused op.)"""
    if mean.shape != running_mean.shape:
        mean, var = mean.view_as(running_mean), var.view_as(running_var)
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * unbiased_factor(count), momentum)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _saved_stat_dtype(x: torch.Tensor, running: torch.Tensor | None) -> torch.dtype:
    """dtype of the batch mean / inverse std that ``aten.native_batch_norm`` saves: float32 for
    float16 / bfloat16 input on CUDA, and on CPU when float32 running statistics are given;
    else the input's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16) and (
            x.is_cuda or (running is not None and running.dtype == torch.float32)):
        return torch.float32
    return x.dtype


class _GroupedTrainBatchNorm(torch.autograd.Function):
    """Training-mode batch norm per row group with PyTorch's own kernels: each group's rows
    are a contiguous slice of the batch and go through ``aten.native_batch_norm`` (its batch
    statistics; its row of the running statistics updated in place) and, backward, through
    ``aten.native_batch_norm_backward``, written straight into one output (no concatenation).
    With one value per channel (which ``F.batch_norm`` refuses) the output is 0 and the
    running statistics take mean = x, variance 0."""

    @staticmethod
    def forward(ctx, x, groups, running_mean, running_var, momentum, eps):
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        n = x.shape[0] // groups
        track = running_mean is not None and x[:n].numel() > x.shape[1]
        y = torch.empty_like(x)
        stat = _saved_stat_dtype(x, running_mean if track else None)
        save_mean = x.new_empty(groups, x.shape[1], dtype=stat)
        save_invstd = x.new_empty(groups, x.shape[1], dtype=stat)
        for g, (xg, yg) in enumerate(zip(x.split(n, 0), y.split(n, 0))):
            torch.ops.aten.native_batch_norm.out(
                xg, None, None, running_mean[g] if track else None,
                running_var[g] if track else None, True, momentum, eps,
                out=yg, save_mean=save_mean[g], save_invstd=save_invstd[g])
        if running_mean is not None and not track:
            mean = x.detach().reshape(groups, x.shape[1])
            update_running_stats(running_mean, running_var, mean, torch.zeros_like(mean), 1,
                                 momentum)
        ctx.save_for_backward(x, save_mean, save_invstd)
        ctx.n, ctx.eps, ctx.fmt = n, eps, fmt
        return y

    @staticmethod
    def backward(ctx, gy):
        x, save_mean, save_invstd = ctx.saved_tensors
        gy = gy.contiguous(memory_format=ctx.fmt)
        gx = torch.empty_like(x)
        n = ctx.n
        for g, (gyg, xg, gxg) in enumerate(zip(gy.split(n, 0), x.split(n, 0), gx.split(n, 0))):
            gxg.copy_(torch.ops.aten.native_batch_norm_backward(
                gyg, xg, None, None, None, save_mean[g], save_invstd[g], True, ctx.eps,
                [True, False, False])[0])
        return gx, None, None, None, None, None


def grouped_batch_norm(x: torch.Tensor, groups: int, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, training: bool,
                       momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm without affine, with separate statistics for each of ``groups`` row groups.

    ``x [G*N, C, H, W]`` (contiguous or channels-last) holds G stacked batches of N rows
    (group g = rows g*N .. g*N+N-1); ``running_mean`` / ``running_var`` are ``[G, C]``.
    Training: each group is normalised by its own batch mean and biased variance, and its
    running statistics are updated in place with the unbiased variance (as ``F.batch_norm``).
    Eval: each group is normalised by its own running statistics. Equivalent to
    ``F.batch_norm`` applied to every group separately, values and gradients (tested against
    it, and by gradcheck in float64).
    """
    gn, c, h, w = x.shape
    if gn % groups:
        raise ValueError(f"grouped_batch_norm: {gn} rows do not split into {groups} groups")
    n = gn // groups
    if gn == 0:  # as F.batch_norm: an empty batch leaves the running statistics alone
        return x.clone()
    if training:
        return _GroupedTrainBatchNorm.apply(x, groups, running_mean, running_var, momentum, eps)
    # eval: the running statistics are constants
    channels_last = _is_channels_last(x)
    if channels_last:  # rows of a group are contiguous [N*H*W, C] blocks
        xg, view = x.permute(0, 2, 3, 1).reshape(groups, n * h * w, c), (groups, 1, c)
    else:
        xg, view = x.reshape(groups, n, c, h * w), (groups, 1, c, 1)
    rstd = torch.rsqrt(running_var.detach() + eps)
    y = (xg - running_mean.detach().view(view)) * rstd.view(view)
    if channels_last:
        return y.reshape(gn, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(gn, c, h, w)


def dwconv_bn(x: torch.Tensor, weight: torch.Tensor, stride: int,
              running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
              groups: int = 1, training: bool, momentum: float = 0.1,
              eps: float = 1e-5) -> torch.Tensor:
    """Depthwise conv + BatchNorm without affine, per row group.

    ``x [G*N, C, H, W]``, ``weight [C, 1, k, k]`` (k odd; padding k // 2, no bias), stride 1 or
    2; ``running_mean`` / ``running_var`` ``[G, C]`` (or ``[C]`` when G = 1). Equals
    ``grouped_batch_norm(F.conv2d(x, weight, stride=stride, padding=k // 2, groups=C), ...)``,
    which is how it is computed here.
    """
    y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])
    return grouped_batch_norm(y, groups, _as_groups(running_mean, groups),
                              _as_groups(running_var, groups), training, momentum, eps)


def pwconv_bn_relu(x: torch.Tensor, weight: torch.Tensor,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                   groups: int = 1, training: bool, momentum: float = 0.1,
                   eps: float = 1e-5) -> torch.Tensor:
    """1x1 conv (``weight [O, C, 1, 1]``, no bias) + BatchNorm without affine per row group +
    ReLU: ``relu(grouped_batch_norm(F.conv2d(x, weight), ...))``."""
    y = F.conv2d(x, weight)
    return torch.relu(grouped_batch_norm(y, groups, _as_groups(running_mean, groups),
                                         _as_groups(running_var, groups), training, momentum,
                                         eps))


def stem_conv_bn_relu(x: torch.Tensor, weight: torch.Tensor,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                      stride: int, training: bool, momentum: float = 0.1,
                      eps: float = 1e-5) -> torch.Tensor:
    """The network's stem: ``k x k`` conv (``weight [O, C, k, k]``, odd k, padding ``k // 2``,
    no bias) + BatchNorm without affine + ReLU: ``relu(grouped_batch_norm(F.conv2d(x, weight,
    stride=stride, padding=k // 2), 1, ...))``."""
    y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2)
    return torch.relu(grouped_batch_norm(y, 1, _as_groups(running_mean, 1),
                                         _as_groups(running_var, 1), training, momentum, eps))


def conv_bn_chain(x: torch.Tensor, weights, layers, running_means, running_vars, *,
                  groups: int = 1, training: bool, momentums, eps: float = 1e-5) -> torch.Tensor:
    """A chain of the two layer ops: for each layer i in turn, ``pwconv_bn_relu`` when
    ``layers[i] == 0``, else ``dwconv_bn`` of stride ``layers[i]`` (1 or 2), with
    ``weights[i]``, statistics ``running_means[i]`` / ``running_vars[i]`` and ``momentums[i]``.
    This is the definition of ``fastshift.ops.conv_bn_chain``."""
    for w, kind, mean, var, momentum in zip(weights, layers, running_means, running_vars,
                                            momentums, strict=True):
        kw = dict(groups=groups, training=training, momentum=momentum, eps=eps)
        x = (pwconv_bn_relu(x, w, mean, var, **kw) if kind == 0
             else dwconv_bn(x, w, kind, mean, var, **kw))
    return x


def _as_groups(stats: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """``[C]`` statistics (one group) as a ``[1, C]`` view, so in-place updates reach them."""
    if stats is None or stats.dim() == 2:
        return stats
    return stats.view(groups, -1)
