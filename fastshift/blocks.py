"""The choice blocks of the SPOS ShuffleNetV2 space, laid out exactly as the released code so
that state-dict keys match (``branch_main.{i}`` / ``branch_proj.{i}`` indices included).

All BatchNorms are ``affine=False`` (running statistics only), as in the released supernet.
Tensors are NCHW; the blocks work for any float dtype and device the convs support.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .space import Choice, LayerSpec

__all__ = ["ShuffleUnit", "XceptionUnit", "build_block", "run_sequential"]


def _dw(channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)


def _pw(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=False)


def run_sequential(seq: nn.Sequential, x: torch.Tensor, batch_norm, conv=None) -> torch.Tensor:
    """Apply ``seq`` with its BatchNorms replaced by ``batch_norm(module, x)`` and, when given,
    its convs by ``conv(module, x)``."""
    for m in seq:
        if isinstance(m, nn.BatchNorm2d):
            x = batch_norm(m, x)
        elif conv is not None and isinstance(m, nn.Conv2d):
            x = conv(m, x)
        else:
            x = m(x)
    return x


class _Unit(nn.Module):
    """Shared forward of both units.

    stride 1: ``x [B, 2*inp, H, W]`` -> split even/odd channels -> ``cat(even, main(odd))``.
    stride 2: ``x [B, inp, H, W]`` -> ``cat(proj(x), main(x))`` at half resolution.
    Output: ``[B, oup, H', W']``.
    """

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, backend: str | None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"block stride must be 1 or 2, got {stride}")
        self.inp, self.oup, self.stride = inp, oup, stride
        self.backend = backend
        if stride == 2:
            self.branch_proj = nn.Sequential(
                _dw(inp, kernel, stride), _bn(inp), _pw(inp, inp), _bn(inp), nn.ReLU(inplace=True)
            )
        else:
            self.branch_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x_proj, x_main = ops.channel_split(x, backend=self.backend)
            return torch.cat((x_proj, self.branch_main(x_main)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)

    def forward_grouped(self, x: torch.Tensor, batch_norm, conv=None) -> torch.Tensor:
        """``forward`` on rows of several subnets stacked along the batch: convs, ReLU and the
        channel split act per row; every BatchNorm goes through ``batch_norm(module, x)``, which
        normalises each row group with its own statistics, and convs through ``conv(module, x)``
        when given (see ``fastshift.engine``)."""
        if self.stride == 1:
            x_proj, x_main = ops.channel_split(x, backend=self.backend)
            return torch.cat((x_proj, run_sequential(self.branch_main, x_main, batch_norm, conv)),
                             1)
        return torch.cat((run_sequential(self.branch_proj, x, batch_norm, conv),
                          run_sequential(self.branch_main, x, batch_norm, conv)), 1)


class ShuffleUnit(_Unit):
    """ShuffleNetV2 unit, main branch: pw(inp->mid) BN ReLU, dw(k, stride) BN,
    pw(mid->oup-inp) BN ReLU."""

    def __init__(self, inp: int, oup: int, mid: int, *, kernel: int, stride: int,
                 backend: str | None = None):
        super().__init__(inp, oup, kernel, stride, backend)
        self.kernel = kernel
        self.branch_main = nn.Sequential(
            _pw(inp, mid), _bn(mid), nn.ReLU(inplace=True),
            _dw(mid, kernel, stride), _bn(mid),
            _pw(mid, oup - inp), _bn(oup - inp), nn.ReLU(inplace=True),
        )


class XceptionUnit(_Unit):
    """Shuffle-Xception unit: main = [dw3(stride) BN, pw(inp->mid) BN ReLU, dw3 BN, pw(mid->mid)
    BN ReLU, dw3 BN, pw(mid->oup-inp) BN ReLU]."""

    def __init__(self, inp: int, oup: int, mid: int, *, stride: int, backend: str | None = None):
        super().__init__(inp, oup, 3, stride, backend)
        self.kernel = 3
        self.branch_main = nn.Sequential(
            _dw(inp, 3, stride), _bn(inp),
            _pw(inp, mid), _bn(mid), nn.ReLU(inplace=True),
            _dw(mid, 3, 1), _bn(mid),
            _pw(mid, mid), _bn(mid), nn.ReLU(inplace=True),
            _dw(mid, 3, 1), _bn(mid),
            _pw(mid, oup - inp), _bn(oup - inp), nn.ReLU(inplace=True),
        )


def build_block(layer: LayerSpec, choice: Choice, backend: str | None = None) -> nn.Module:
    """The module of ``choice`` at ``layer`` (shapes from the space's LayerSpec)."""
    args = (layer.in_channels, layer.out_channels, layer.mid_channels)
    if choice.kind == "shuffle":
        return ShuffleUnit(*args, kernel=choice.kernel, stride=layer.stride, backend=backend)
    return XceptionUnit(*args, stride=layer.stride, backend=backend)
