"""Plain-PyTorch references of fastshift's fused ops.

These are the oracle of the tests, the ``reference`` backend and the benchmark baseline. They
are written for clarity and use only differentiable torch ops, so autograd is exact.
"""

from __future__ import annotations

import torch

__all__ = ["channel_split", "channel_interleave"]


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
