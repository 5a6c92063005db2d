"""The choice blocks of the SPOS ShuffleNetV2 space, laid out exactly as the released code so
that state-dict keys match (``branch_main.{i}`` / ``branch_proj.{i}`` indices included).

All BatchNorms are ``affine=False`` (running statistics only), as in the released supernet.
Tensors are NCHW; the blocks work for any float dtype and device the convs support.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import ops
from .space import Choice, LayerSpec

__all__ = ["ShuffleUnit", "XceptionUnit", "build_block", "run_sequential", "run_fused",
           "module_stats", "uses_fused", "split_ready", "run_units_fused", "run_head"]


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


def uses_fused(backend: str | None, x: torch.Tensor, network: bool = False) -> bool:
    """Whether ``backend`` (None: FASTSHIFT_BACKEND or auto) runs the fused ops on x's device
    for this workload: x ``[N, C, H, W]`` is a block's input, or with ``network`` the images
    of a whole network (``auto`` on CUDA weighs its size: ``ops.resolve_backend``)."""
    rows = x.shape[0] * x.shape[-2] * x.shape[-1] if x.dim() == 4 else None
    if network:
        return ops.resolve_backend(backend, x.device, rows,
                                   ops.AUTO_CUDA_MIN_NETWORK_ROWS) != "reference"
    return ops.resolve_backend(backend, x.device, rows) != "reference"


def module_stats(bn: nn.BatchNorm2d):
    """``norm_stats`` for :func:`run_fused` that uses a BN module's own running buffers (one
    group), as ``bn(x)`` does."""
    mean, var = bn.running_mean.view(1, -1), bn.running_var.view(1, -1)

    def done():
        tracked = bn.num_batches_tracked
        if bn.training and tracked is not None:
            tracked.add_(1)  # in place, as `+= 1` (without Module.__setattr__)

    return mean, var, 1, done


def _is_depthwise(m: nn.Conv2d) -> bool:
    k = m.kernel_size
    return (m.groups == m.in_channels == m.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and m.padding == (k[0] // 2,) * 2 and m.stride[0] == m.stride[1] in (1, 2)
            and m.dilation == (1, 1) and m.bias is None)


def _is_pointwise(m: nn.Conv2d) -> bool:
    return (m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)
            and m.padding == (0, 0) and m.bias is None)


def _layers(mods) -> list:
    """``mods`` read as layers ``(module, bn, kind)``: kind 0 for (1x1 conv, BN, ReLU), 1 or 2
    for (depthwise conv of that stride, BN), None for any other (conv, BN) pair; a module
    outside such a pair is ``(module, None, None)``."""
    layers, i = [], 0
    while i < len(mods):
        m = mods[i]
        bn = mods[i + 1] if i + 1 < len(mods) else None
        if not (isinstance(m, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            layers.append((m, None, None))
            i += 1
            continue
        relu = i + 2 < len(mods) and isinstance(mods[i + 2], nn.ReLU)
        if _is_depthwise(m) and not relu:
            layers.append((m, bn, m.stride[0]))
            i += 2
        elif _is_pointwise(m) and relu:
            layers.append((m, bn, 0))
            i += 3
        else:
            layers.append((m, bn, None))
            i += 2
    return layers


def _momentum(bn: nn.BatchNorm2d, norm_stats) -> float:
    """The running-statistics momentum of ``bn``: its own, or for ``momentum=None``
    nn.BatchNorm2d's cumulative average over the module's own batches; grouped (per-subnet)
    statistics keep no batch count and use the default 0.1."""
    if bn.momentum is not None:
        return bn.momentum
    tracked = bn.num_batches_tracked
    return (1.0 / (int(tracked) + 1) if norm_stats is module_stats and tracked is not None
            else 0.1)


# seq -> (its children's ids, _layers of them, whether they run as one conv_bn_chain): the
# parse of a Sequential, redone only when its children change
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(seq: nn.Sequential):
    """``(_layers(seq), chain)`` for :func:`run_fused`, cached per module; chain: every layer
    a fused kind, at least two, one eps."""
    mods = list(seq)
    key = tuple(map(id, mods))
    hit = _PLANS.get(seq)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    layers = _layers(mods)
    chain = (len(layers) > 1 and all(kind is not None for _, _, kind in layers)
             and len({bn.eps for _, bn, _ in layers}) == 1)
    _PLANS[seq] = (key, layers, chain)
    return layers, chain


def _is_stem(stem: nn.Sequential) -> bool:
    """(k x k conv of odd k, padding k // 2, one stride, no bias; BN without affine with
    running statistics; ReLU): the SPOS stem's form, which ``ops.stem_conv_bn_relu`` runs."""
    if len(stem) != 3 or not isinstance(stem[2], nn.ReLU):
        return False
    conv, bn = stem[0], stem[1]
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return False
    k = conv.kernel_size
    return (k[0] == k[1] and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 2
            and conv.stride[0] == conv.stride[1] and conv.groups == 1 and conv.bias is None
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not bn.affine
            and bn.track_running_stats and bn.running_mean is not None)


def run_stem(stem: nn.Sequential, x: torch.Tensor, norm_stats, training: bool,
             backend: str | None) -> torch.Tensor | None:
    """The stem in training on the fused path as ``ops.stem_conv_bn_relu`` (one op forward and
    backward, values independent of the thread count) where it can run: the ``cpu`` backend,
    a stem of the SPOS form (:func:`_is_stem`), images ``x [B, C, H, W]`` (float32 / float64)
    that need no gradient, one statistics group from ``norm_stats`` (as in :func:`run_fused`).
    Returns None where it cannot, and in eval: the caller then runs the modules (in eval
    oneDNN's conv, whose forward is itself thread-count invariant, and the elementwise
    normalisation take 0.77-0.90 ms per batch of 128 against the op's 1.15-1.19 ms)."""
    if (not training or not _is_stem(stem) or x.requires_grad
            or x.dtype not in (torch.float32, torch.float64)
            or ops.resolve_backend(backend, x.device) != "cpu"):
        return None
    conv, bn = stem[0], stem[1]
    mean, var, groups, done = norm_stats(bn)
    if groups != 1:
        return None
    y = ops.stem_conv_bn_relu(x, conv.weight, mean.view(-1), var.view(-1),
                              stride=conv.stride[0], training=training,
                              momentum=_momentum(bn, norm_stats), eps=bn.eps, backend=backend)
    done()
    return y


def run_head(head: nn.Sequential, x: torch.Tensor, backend: str | None,
             fused: bool) -> torch.Tensor:
    """The classifier ``head`` on pooled features ``x [B, C]`` -> ``[B, classes]``: on the
    fused path, a head that is one bias-free ``nn.Linear`` (the SPOS head) runs as
    ``ops.linear`` (fastshift's own products on the ``cpu`` backend); any other head, or the
    reference path, runs the modules."""
    if fused and len(head) == 1 and isinstance(head[0], nn.Linear) and head[0].bias is None:
        return ops.linear(x, head[0].weight, backend=backend)
    return head(x)


def run_fused(seq: nn.Sequential, x: torch.Tensor, norm_stats, training: bool,
              backend: str | None, shuffle_with: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``seq`` with its (depthwise conv, BN) pairs as ``ops.dwconv_bn`` and its
    (1x1 conv, BN, ReLU) triples as ``ops.pwconv_bn_relu``; a ``seq`` made only of such layers
    (every branch of the SPOS blocks) runs as one ``ops.conv_bn_chain``.

    ``norm_stats(bn)`` -> ``(running_mean [G, C], running_var [G, C], G, done)``: the
    statistics of the G row groups of x for that BN (updated in place in training), and
    ``done()`` to call afterwards. Any other module runs as is (a conv + BN pair of another
    shape through ``reference.grouped_batch_norm``). Same values and gradients as
    ``run_sequential`` with the matching grouped ``batch_norm``. ``shuffle_with``: return
    ``ops.shuffle_cat(shuffle_with, result)`` (a chain hands it to ``ops.conv_bn_chain``,
    which in eval on the CPU writes the shuffled output from its chunks in cache).
    """
    layers, chain = _plan(seq)
    if chain:
        stats = [norm_stats(bn) for _, bn, _ in layers]
        if len({groups for _, _, groups, _ in stats}) == 1:
            x = ops.conv_bn_chain(
                x, [conv.weight for conv, _, _ in layers], [kind for _, _, kind in layers],
                [mean for mean, _, _, _ in stats], [var for _, var, _, _ in stats],
                groups=stats[0][2], training=training,
                momentums=[_momentum(bn, norm_stats) for _, bn, _ in layers],
                eps=layers[0][1].eps, backend=backend, shuffle_with=shuffle_with)
            for *_, done in stats:
                done()
            return x
    for m, bn, kind in layers:
        if bn is None:
            x = m(x)
            continue
        mean, var, groups, done = norm_stats(bn)
        kw = dict(groups=groups, training=training, momentum=_momentum(bn, norm_stats),
                  eps=bn.eps, backend=backend)
        if kind == 0:
            x = ops.pwconv_bn_relu(x, m.weight, mean, var, **kw)
        elif kind is not None:
            x = ops.dwconv_bn(x, m.weight, kind, mean, var, **kw)
        else:
            x = ops.reference.grouped_batch_norm(m(x), groups, mean, var, training,
                                                 kw["momentum"], bn.eps)
        done()
    return x if shuffle_with is None else ops.shuffle_cat(shuffle_with, x, backend=backend)


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
        if uses_fused(self.backend, x):
            return self.forward_fused(x, module_stats, self.training)
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


    def forward_fused(self, x, norm_stats, training: bool, *, shuffled_in: bool = False,
                      shuffle_out: bool = False, pair: bool = False, parts: bool = False):
        """``forward`` (or ``forward_grouped``) through the fused ops (:func:`run_fused`),
        channels-last.

        ``shuffled_in`` (stride 1 only): x is split-ready, the layout of ``ops.shuffle_cat``
        (``cat(channel_split(x))``: even channels, then odd), so the split is two channel
        ranges instead of a ``channel_split``; or x is the pair of halves itself
        (``ops.shuffle_cat_pair``). ``shuffle_out``: return the output split-ready for a
        following stride-1 unit (``ops.shuffle_cat``: the concat and that unit's split in one
        copy); with ``pair`` as its two halves (``ops.shuffle_cat_pair``), so that the
        backward never concatenates the halves' gradients (the training path on the CPU).
        With ``parts`` instead of ``pair`` the unit returns ``(a, main branch)`` unshuffled
        (``a``: x_proj for stride 1, the projection branch for stride 2), for the caller to
        shuffle and regroup in one copy (``ops.shuffle_regroup``, the batched engine).
        Without both flags x and the result are in the modules' channel order; with them the
        values are the same channels permuted (``split_ready`` says where each applies).
        """
        if self.stride == 1:
            if shuffled_in and isinstance(x, tuple):
                x_proj, x_main = x
            elif shuffled_in:
                # the halves are channel ranges: x_proj is read in place by shuffle_cat, x_main
                # by the branch's first 1x1 layer on CPU (its products take the pixel stride;
                # other layers and devices copy it dense inside the op); one SplitBackward
                # joins both halves' gradients
                x_proj, x_main = x.split(x.shape[1] // 2, 1)
            else:
                x_proj, x_main = ops.channel_split(x, backend=self.backend)
            a, b_in = x_proj, x_main
        else:
            if shuffled_in:
                raise ValueError("a stride-2 unit takes its input in channel order, not "
                                 "split-ready (see blocks.split_ready)")
            a = run_fused(self.branch_proj, x, norm_stats, training, self.backend)
            b_in = x
        if shuffle_out and (pair or parts):
            b = run_fused(self.branch_main, b_in, norm_stats, training, self.backend)
            return (a, b) if parts else ops.shuffle_cat_pair(a, b, backend=self.backend)
        if shuffle_out:  # shuffle_cat(a, main branch), from the branch's chunks in CPU eval
            return run_fused(self.branch_main, b_in, norm_stats, training, self.backend,
                             shuffle_with=a)
        b = run_fused(self.branch_main, b_in, norm_stats, training, self.backend)
        return torch.cat((a, b), 1).contiguous(memory_format=torch.channels_last)


def split_ready(strides) -> list[tuple[bool, bool]]:
    """``(shuffled_in, shuffle_out)`` of ``forward_fused`` for each unit of a chain with these
    strides: a unit hands a split-ready output (``ops.shuffle_cat``) to a following stride-1
    unit, which reads it in place; the first unit takes the stem's output and the last one
    returns channel order, as does a unit followed by a stride-2 unit."""
    strides = list(strides)
    return [(i > 0 and s == 1, i + 1 < len(strides) and strides[i + 1] == 1)
            for i, s in enumerate(strides)]


def run_units_fused(units, x: torch.Tensor, norm_stats, training: bool) -> torch.Tensor:
    """``x`` through the chain ``units`` by ``forward_fused``, split-ready between units
    (:func:`split_ready`); in and out in channel order, equal to applying each unit in turn.
    Where autograd records on the ``cpu`` backend, a split-ready output passes as its two
    halves (``pair``)."""
    units = list(units)
    pair = (torch.is_grad_enabled() and bool(units)
            and ops.resolve_backend(units[0].backend, x.device) == "cpu")
    for unit, (shuffled_in, shuffle_out) in zip(units, split_ready(u.stride for u in units)):
        x = unit.forward_fused(x, norm_stats, training, shuffled_in=shuffled_in,
                               shuffle_out=shuffle_out, pair=pair)
    return x


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
