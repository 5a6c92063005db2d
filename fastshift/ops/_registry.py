"""Loads ``fastshift._C`` and registers the Python side of its ops: fake (meta) kernels for
``torch.compile`` and autograd formulas whose backward is itself a registered op."""

from __future__ import annotations

import torch

try:
    from .. import _C  # noqa: F401  (registers the TORCH_LIBRARY "fastshift")

    HAVE_C = True
    BUILD_ERROR = None
except ImportError as exc:  # the pure-PyTorch paths keep working without the extension
    HAVE_C = False
    BUILD_ERROR = f"{type(exc).__name__}: {exc}"


def cuda_built() -> bool:
    """Whether fastshift._C was compiled with its CUDA bodies."""
    return HAVE_C and int(torch.ops.fastshift.cuda_version()) > 0


if HAVE_C:

    @torch.library.register_fake("fastshift::channel_split")
    def _channel_split_fake(x):
        torch._check(x.dim() == 4, lambda: "channel_split: x must be 4-D")
        torch._check(x.shape[1] % 2 == 0, lambda: "channel_split: channel count must be even")
        shape = (x.shape[0], x.shape[1] // 2, x.shape[2], x.shape[3])
        return x.new_empty(shape), x.new_empty(shape)

    @torch.library.register_fake("fastshift::channel_interleave")
    def _channel_interleave_fake(even, odd):
        torch._check(even.dim() == 4, lambda: "channel_interleave: even must be 4-D")
        torch._check(even.shape == odd.shape, lambda: "channel_interleave: shapes differ")
        b, c, h, w = even.shape
        return even.new_empty((b, 2 * c, h, w))

    def _channel_split_backward(ctx, grad_even, grad_odd):
        return torch.ops.fastshift.channel_interleave(grad_even, grad_odd)

    def _channel_interleave_backward(ctx, grad):
        return torch.ops.fastshift.channel_split(grad)

    torch.library.register_autograd("fastshift::channel_split", _channel_split_backward)
    torch.library.register_autograd("fastshift::channel_interleave", _channel_interleave_backward)
