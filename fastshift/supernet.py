"""The weight-sharing supernet of a :class:`SearchSpace`.

``Supernet(space)(x, arch)`` runs one path: ``x [B, in_channels, H, W]`` float (any float dtype,
CPU or CUDA) -> logits ``[B, num_classes]``. Its ``state_dict()`` has the released layout
(``first_conv.0.weight``, ``features.{layer}.{choice}.branch_main.{i}.weight``,
``...branch_proj...``, ``conv_last.0.weight``, ``classifier.0.weight``), so released SPOS /
Supernet Shifting checkpoints load into ``Supernet(spaces.spos_shufflenetv2())``.

Equivalence: the final pool is a global average, identical to the released ``AvgPool2d(7)`` at
224x224 input (7x7 final maps) and defined for any input size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import (
    build_block,
    module_stats,
    run_fused,
    run_head,
    run_sequential,
    run_stem,
    run_units_fused,
    split_ready,
    uses_fused,
)
from .checkpoint import check_state_dict, normalize_state_dict
from .engine import PathStats, forward_many
from .space import Arch, SearchSpace

__all__ = ["Supernet", "Subnet"]


def _stem(space: SearchSpace) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(space.in_channels, space.stem_channels, 3, space.stem_stride, 1, bias=False),
        nn.BatchNorm2d(space.stem_channels, affine=False),
        nn.ReLU(inplace=True),
    )


def _tail(space: SearchSpace) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(space.final_channels, space.last_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(space.last_channels, affine=False),
        nn.ReLU(inplace=True),
    )


def _head(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, num_classes, bias=False))


def _rows_last(x: torch.Tensor) -> torch.Tensor:
    """The fused path's input layout: channels-last, so that the stem hands the first unit
    channels-last activations (the fused ops would otherwise copy them, and again in backward)."""
    return x.contiguous(memory_format=torch.channels_last)


def _fused_stem(stem: nn.Sequential, x: torch.Tensor, training: bool,
                backend: str | None) -> torch.Tensor:
    """The stem on the fused path: ``ops.stem_conv_bn_relu`` where ``run_stem`` can run it,
    else the modules; on channels-last input (``_rows_last``)."""
    x = _rows_last(x)
    y = run_stem(stem, x, module_stats, training, backend)
    return stem(x) if y is None else y


class _Classify(nn.Module):
    """Shared tail of Supernet and Subnet: conv_last, global pool, dropout, classifier."""

    def _classify(self, x: torch.Tensor, batch_norm=None, rows=None, fused=None) -> torch.Tensor:
        """``fused``: the network's choice of path (None: decide for conv_last's input)."""
        if fused is None:
            fused = batch_norm is None and uses_fused(self.backend, x)
        if batch_norm is not None:
            x = run_sequential(self.conv_last, x, batch_norm)
        elif fused:
            x = run_fused(self.conv_last, x, module_stats, self.training, self.backend)
        else:
            x = self.conv_last(x)
        x = x.mean((2, 3))
        p = self.dropout.p
        if rows is not None and self.training and p > 0:
            # rows (start, total): x holds rows start.. of a batch of `total`; the mask is drawn
            # for the whole batch and sliced (on CPU identical to dropout on the whole batch)
            start, total = rows
            mask = torch.empty((total, x.shape[1]), dtype=x.dtype, device=x.device)
            x = x * mask.bernoulli_(1.0 - p)[start:start + x.shape[0]] / (1.0 - p)
        else:
            x = self.dropout(x)
        return run_head(self.classifier, x, self.backend, fused)

    @property
    def num_classes(self) -> int:
        return self.classifier[0].out_features

    def reset_classifier(self, num_classes: int, generator: torch.Generator | None = None):
        """Replace the head by a fresh ``Linear(last_channels, num_classes, bias=False)`` with
        weights ~ N(0, 0.01) (the released transfer head), on the current device/dtype."""
        old = self.classifier[0].weight
        head = _head(old.shape[1], int(num_classes)).to(device=old.device, dtype=old.dtype)
        with torch.no_grad():
            head[0].weight.normal_(0.0, 0.01, generator=generator)
        self.classifier = head
        return self

    def _check_input(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != self.space.in_channels:
            raise ValueError(
                f"input must be [B, {self.space.in_channels}, H, W], got shape {tuple(x.shape)}"
            )


class Supernet(_Classify):
    """All choices of every layer of ``space``, sharing stem and tail.

    Args:
        space: the search space.
        num_classes: classifier outputs (default ``space.num_classes``).
        backend: ops backend for the blocks (see ``fastshift.ops``); None = FASTSHIFT_BACKEND
            or auto.
        generator: torch.Generator for the weight initialisation (the released scheme:
            stem conv N(0, 0.01), other convs N(0, 1/fan_in_channels), linear N(0, 0.01)).
    """

    def __init__(self, space: SearchSpace, num_classes: int | None = None, *,
                 backend: str | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(space, SearchSpace):
            raise TypeError(f"Supernet needs a SearchSpace, got {type(space).__name__}")
        self.space = space
        self.backend = backend
        num_classes = space.num_classes if num_classes is None else int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.first_conv = _stem(space)
        self.features = nn.ModuleList(
            nn.ModuleList(build_block(layer, c, backend) for c in space.choices)
            for layer in space.layers
        )
        self.conv_last = _tail(space)
        self.dropout = nn.Dropout(space.dropout)
        self.classifier = _head(space.last_channels, num_classes)
        # per layer (shuffled_in, shuffle_out) of the fused units (blocks.split_ready)
        self.unit_layouts = split_ready(layer.stride for layer in space.layers)
        self._initialize_weights(generator)

    def _initialize_weights(self, generator):
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, nn.Conv2d):
                    std = 0.01 if name.startswith("first_conv") else 1.0 / m.weight.shape[1]
                    m.weight.normal_(0.0, std, generator=generator)
                elif isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.01, generator=generator)

    def forward(self, x: torch.Tensor, arch, *, batch_norm=None, rows=None) -> torch.Tensor:
        """One path: ``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``.

        ``batch_norm``: a ``batch_norm(module, x)`` callback that replaces every BatchNorm of
        the path (e.g. ``fastshift.distributed.sync_batch_norm``); the path then runs on the
        plain-PyTorch modules. ``rows=(start, total)``: x is rows ``start..`` of a batch of
        ``total`` rows and the dropout mask is that of the whole batch (sharded training).
        """
        arch = self.space.validate(arch)
        self._check_input(x)
        fused = batch_norm is None and uses_fused(self.backend, x, network=True)
        if fused:
            units = [choices[gene] for choices, gene in zip(self.features, arch)]
            x = run_units_fused(units, _fused_stem(self.first_conv, x, self.training,
                                                   self.backend), module_stats, self.training)
        elif batch_norm is None:
            x = self.first_conv(x)
            for choices, gene in zip(self.features, arch):
                x = choices[gene](x)
        else:
            x = run_sequential(self.first_conv, x, batch_norm)
            for choices, gene in zip(self.features, arch):
                x = choices[gene].forward_grouped(x, batch_norm)
        return self._classify(x, batch_norm, rows, fused)

    def forward_many(self, x: torch.Tensor, archs, *, stats: PathStats | None = None,
                     max_rows: int | None = None, plans: list | None = None) -> torch.Tensor:
        """K paths on one batch: ``x [B, C, H, W]`` -> logits ``[K, B, num_classes]``, sharing
        the stem and common prefixes, with per-subnet BatchNorm statistics. See
        ``fastshift.engine.forward_many``; K identical archs cost exactly ``net(x, arch)``."""
        return forward_many(self, x, archs, stats=stats, max_rows=max_rows, plans=plans)

    def path_modules(self, arch) -> list[nn.Module]:
        """The modules a path uses: stem, one block per layer, tail and head."""
        arch = self.space.validate(arch)
        blocks = [self.features[i][g] for i, g in enumerate(arch)]
        return [self.first_conv, *blocks, self.conv_last, self.classifier]

    def subnet(self, arch) -> Subnet:
        """A standalone copy of one path with the inherited weights and BN statistics."""
        return Subnet(self, self.space.validate(arch))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load our or the released layout (``module.`` prefix and ``{"state_dict": ...}``
        nesting accepted). A mismatch raises ValueError naming the first missing, unexpected or
        mis-shaped key, before any weight is changed."""
        state_dict = normalize_state_dict(state_dict)
        check_state_dict(self.state_dict(), state_dict, what="supernet", strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class Subnet(_Classify):
    """One path of a supernet as a plain module: ``subnet(x)`` -> logits. State-dict keys:
    ``first_conv.*``, ``features.{layer}.*``, ``conv_last.*``, ``classifier.0.weight``."""

    def __init__(self, supernet: Supernet, arch: Arch):
        super().__init__()
        self.space = supernet.space
        self.arch = tuple(arch)
        self.backend = supernet.backend
        self.first_conv = copy.deepcopy(supernet.first_conv)
        self.features = nn.Sequential(
            *(copy.deepcopy(supernet.features[i][g]) for i, g in enumerate(self.arch))
        )
        self.conv_last = copy.deepcopy(supernet.conv_last)
        self.dropout = nn.Dropout(supernet.dropout.p)
        self.classifier = copy.deepcopy(supernet.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if uses_fused(self.backend, x, network=True):
            stem = _fused_stem(self.first_conv, x, self.training, self.backend)
            return self._classify(run_units_fused(self.features, stem, module_stats,
                                                  self.training), fused=True)
        return self._classify(self.features(self.first_conv(x)), fused=False)
