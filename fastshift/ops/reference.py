"""Plain-PyTorch references of fastshift's fused ops.

These are the oracle of the tests, the ``reference`` backend and the benchmark baseline. They
are written for clarity and use only differentiable torch ops, so autograd is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_split", "channel_interleave", "grouped_batch_norm", "dwconv_bn",
           "pwconv_bn_relu", "update_running_stats"]


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


def channel_interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`channel_split`: ``out[:, 0::2] = even``, ``out[:, 1::2] = odd``."""
    if even.shape != odd.shape or even.dim() != 4:
        raise ValueError(
            "channel_interleave: even and odd must be 4-D of equal shape, got "
            f"{tuple(even.shape)} and {tuple(odd.shape)}"
        )
    b, c, h, w = even.shape
    return torch.stack((even, odd), dim=2).reshape(b, 2 * c, h, w)


class _GroupedBatchNorm(torch.autograd.Function):
    """y = (x - mean) * rstd with per-(group, channel) statistics, and the textbook backward
    dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) (means over the group's rows and
    pixels), written as dx = dy * rstd + x * beta + gamma with per-(group, channel) beta and
    gamma, so that x, not the output (which a following in-place ReLU overwrites), is saved.

    ``xg`` is ``[G, N, C, P]`` (NCHW rows) or ``[G, M, C]`` (channels-last rows); ``dims`` are the
    reduction dims and ``view`` the shape that broadcasts ``[G, C]`` statistics against ``xg``.
    """

    @staticmethod
    def forward(ctx, xg, mean, rstd, training, dims, view):
        ctx.training, ctx.dims, ctx.view = training, dims, view
        ctx.save_for_backward(xg, mean, rstd)
        return (xg - mean.view(view)) * rstd.view(view)

    @staticmethod
    def backward(ctx, gy):
        xg, mean, rstd = ctx.saved_tensors
        view = ctx.view
        if not ctx.training:  # the statistics are constants
            return gy * rstd.view(view), None, None, None, None, None
        count = 1
        for d in ctx.dims:
            count *= xg.shape[d]
        sum_gy = gy.sum(ctx.dims)
        sum_gy_x = (gy * xg).sum(ctx.dims)
        sum_gy_xhat = rstd * (sum_gy_x - mean * sum_gy)
        beta = -(rstd * rstd) * sum_gy_xhat / count
        gamma = -rstd * sum_gy / count - beta * mean
        dx = torch.addcmul(gy * rstd.view(view) + gamma.view(view), xg, beta.view(view))
        return dx, None, None, None, None, None


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
    running_var.lerp_(var * (count / max(count - 1, 1)), momentum)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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
    if _is_channels_last(x):  # rows of a group are contiguous [N*H*W, C] blocks
        xg = x.permute(0, 2, 3, 1).reshape(groups, n * h * w, c)
        dims, view = (1,), (groups, 1, c)
    else:
        xg = x.reshape(groups, n, c, h * w)
        dims, view = (1, 3), (groups, 1, c, 1)
    if training:
        with torch.no_grad():
            var, mean = torch.var_mean(xg, dim=dims, unbiased=False)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, n * h * w, momentum)
    else:
        mean, var = running_mean, running_var
    rstd = torch.rsqrt(var.detach() + eps)
    y = _GroupedBatchNorm.apply(xg, mean.detach(), rstd, training, dims, view)
    if len(dims) == 1:
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


def _as_groups(stats: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """``[C]`` statistics (one group) as a ``[1, C]`` view, so in-place updates reach them."""
    if stats is None or stats.dim() == 2:
        return stats
    return stats.view(groups, -1)
