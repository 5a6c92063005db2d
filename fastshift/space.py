"""Search spaces: layers and choices, architecture encoding, sampling, mutation, crossover, and
analytic FLOPs / parameter counts.

A :class:`SearchSpace` is pure data: it builds no module (``fastshift.blocks`` reads it to build
the supernet). An architecture is a tuple of ``num_layers`` ints, gene ``l`` being the index of
the choice taken at layer ``l`` (``0 <= gene < num_choices``).

The network family is the SPOS ShuffleNetV2 one-shot space: a stem conv3x3 (stride
``stem_stride``) + BN + ReLU, stages of choice layers (the first of a stage has stride 2 and takes
the whole input; the others split the channels and take half), then conv1x1 -> ``last_channels``
+ BN + ReLU, global average pool, dropout and a bias-free linear classifier.

FLOPs follow the released convention: multiply-adds of conv and linear layers only
(conv = out_h * out_w * k_h * k_w * (c_in / groups) * c_out, linear = in * out), nothing for
BN, ReLU, pooling or shuffles, at the space's ``input_size``. Every layer's cost depends only on
its own choice, so FLOPs and parameters are sums of per-(layer, choice) table entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Arch = tuple[int, ...]

__all__ = ["Arch", "Choice", "LayerSpec", "SearchSpace", "SHUFFLE3", "SHUFFLE5", "SHUFFLE7",
           "XCEPTION"]


@dataclass(frozen=True)
class Choice:
    """One candidate block of a choice layer.

    ``kind="shuffle"``: ShuffleNetV2 unit, pw -> dw(kernel) -> pw on the main branch.
    ``kind="xception"``: Shuffle-Xception unit, three (dw3x3 -> pw) pairs; ``kernel`` must be 3.
    Stride-2 units of either kind add a projection branch dw(kernel) -> pw.
    """

    kind: str
    kernel: int = 3

    def __post_init__(self):
        if self.kind not in ("shuffle", "xception"):
            raise ValueError(f"Choice.kind must be 'shuffle' or 'xception', got {self.kind!r}")
        if self.kernel not in (3, 5, 7):
            raise ValueError(f"Choice.kernel must be 3, 5 or 7, got {self.kernel!r}")
        if self.kind == "xception" and self.kernel != 3:
            raise ValueError("the xception choice uses 3x3 depthwise convs: kernel must be 3")

    @property
    def name(self) -> str:
        return "xception" if self.kind == "xception" else f"shuffle{self.kernel}"

    @classmethod
    def from_name(cls, name: str) -> Choice:
        """``"shuffle3" | "shuffle5" | "shuffle7" | "xception"`` -> Choice."""
        if name == "xception":
            return cls("xception", 3)
        if name.startswith("shuffle") and name[7:] in ("3", "5", "7"):
            return cls("shuffle", int(name[7:]))
        raise ValueError(
            f"unknown choice name {name!r}: expected shuffle3, shuffle5, shuffle7 or xception"
        )


SHUFFLE3 = Choice("shuffle", 3)
SHUFFLE5 = Choice("shuffle", 5)
SHUFFLE7 = Choice("shuffle", 7)
XCEPTION = Choice("xception", 3)


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one choice layer.

    ``in_channels`` is the channel count the block's branches take (the whole input for stride
    2, half of it after the channel split for stride 1); the layer's output has ``out_channels``
    channels at ``out_size`` x ``out_size``.
    """

    index: int
    stage: int
    in_channels: int
    out_channels: int
    mid_channels: int
    stride: int
    in_size: int
    out_size: int


def _conv_out(size: int, kernel: int, stride: int) -> int:
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


def _conv_cost(h_out: int, kernel: int, c_in: int, c_out: int, groups: int = 1):
    """(multiply-adds, weights) of a square conv with output h_out x h_out."""
    weights = kernel * kernel * (c_in // groups) * c_out
    return h_out * h_out * weights, weights


class SearchSpace:
    """A one-shot ShuffleNetV2-style space of ``num_layers`` choice layers.

    Args:
        input_size: input height = width the FLOPs are counted at (the supernet accepts other
            sizes: the final pool is global).
        in_channels: image channels (3 for RGB/BGR, 1 for grayscale).
        stem_channels, stem_stride: the stem conv3x3 -> BN -> ReLU.
        stage_repeats, stage_channels: choice layers per stage and each stage's out channels;
            the first layer of every stage has stride 2.
        last_channels: channels of the final conv1x1.
        choices: the candidate blocks, the same list at every layer.
        num_classes: class count FLOPs/params are counted with by default (the classifier).
        dropout: dropout probability before the classifier.
        name: a label stored in checkpoints.
    """

    def __init__(
        self,
        *,
        input_size: int = 224,
        in_channels: int = 3,
        stem_channels: int = 16,
        stem_stride: int = 2,
        stage_repeats: Sequence[int] = (4, 4, 8, 4),
        stage_channels: Sequence[int] = (64, 160, 320, 640),
        last_channels: int = 1024,
        choices: Sequence[Choice | str] = (SHUFFLE3, SHUFFLE5, SHUFFLE7, XCEPTION),
        num_classes: int = 1000,
        dropout: float = 0.1,
        name: str = "custom",
    ):
        def positive(label, value):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SearchSpace: {label} must be a positive int, got {value!r}")
            return int(value)

        self.input_size = positive("input_size", input_size)
        self.in_channels = positive("in_channels", in_channels)
        self.stem_channels = positive("stem_channels", stem_channels)
        if stem_stride not in (1, 2):
            raise ValueError(f"SearchSpace: stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = int(stem_stride)
        if len(stage_repeats) == 0 or len(stage_repeats) != len(stage_channels):
            raise ValueError(
                "SearchSpace: stage_repeats and stage_channels must be non-empty and of equal "
                f"length, got {list(stage_repeats)} and {list(stage_channels)}"
            )
        self.stage_repeats = tuple(positive("stage_repeats[i]", r) for r in stage_repeats)
        self.stage_channels = tuple(positive("stage_channels[i]", c) for c in stage_channels)
        for c in self.stage_channels:
            if c % 4:
                raise ValueError(
                    f"SearchSpace: stage channels must be multiples of 4 (split and mid "
                    f"channels halve them), got {c}"
                )
        self.last_channels = positive("last_channels", last_channels)
        if len(choices) == 0:
            raise ValueError("SearchSpace: choices must not be empty")
        self.choices = tuple(Choice.from_name(c) if isinstance(c, str) else c for c in choices)
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"SearchSpace: duplicate choices in {[c.name for c in self.choices]}")
        self.num_classes = positive("num_classes", num_classes)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"SearchSpace: dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.name = str(name)

        self.stem_size = _conv_out(self.input_size, 3, self.stem_stride)
        layers = []
        channels, size = self.stem_channels, self.stem_size
        for stage, (repeats, out_ch) in enumerate(zip(self.stage_repeats, self.stage_channels)):
            for i in range(repeats):
                stride = 2 if i == 0 else 1
                inp = channels if stride == 2 else channels // 2
                if stride == 2 and out_ch <= inp:
                    raise ValueError(
                        f"SearchSpace: stage {stage} must widen its input ({inp} channels) "
                        f"to make room for the main branch, got {out_ch} out channels"
                    )
                out_size = _conv_out(size, 3, stride)
                layers.append(
                    LayerSpec(len(layers), stage, inp, out_ch, out_ch // 2, stride, size, out_size)
                )
                channels, size = out_ch, out_size
        self.layers: tuple[LayerSpec, ...] = tuple(layers)
        self.final_channels = channels
        self.final_size = size
        costs = [[self._block_cost(layer, c) for c in self.choices] for layer in self.layers]
        self._flops_table = np.array([[f for f, _ in row] for row in costs], dtype=np.int64)
        self._params_table = np.array([[p for _, p in row] for row in costs], dtype=np.int64)
        stem_f, stem_p = _conv_cost(self.stem_size, 3, self.in_channels, self.stem_channels)
        last_f, last_p = _conv_cost(self.final_size, 1, self.final_channels, self.last_channels)
        self._fixed_flops = stem_f + last_f
        self._stem_flops, self._last_flops = stem_f, last_f
        self._fixed_params = stem_p + last_p

    # -- structure --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def size(self) -> int:
        """Number of architectures in the space (num_choices ** num_layers)."""
        return self.num_choices**self.num_layers

    def config(self) -> dict:
        """A JSON-able description; ``SearchSpace.from_config(space.config())`` rebuilds it."""
        return {
            "name": self.name,
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "stem_channels": self.stem_channels,
            "stem_stride": self.stem_stride,
            "stage_repeats": list(self.stage_repeats),
            "stage_channels": list(self.stage_channels),
            "last_channels": self.last_channels,
            "choices": [c.name for c in self.choices],
            "num_classes": self.num_classes,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict) -> SearchSpace:
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, SearchSpace) and self.config() == other.config()

    def __hash__(self):
        return hash(repr(self.config()))

    def __repr__(self):
        return (
            f"SearchSpace({self.name!r}: {self.num_layers} layers x {self.num_choices} choices "
            f"[{', '.join(c.name for c in self.choices)}], input {self.in_channels}x"
            f"{self.input_size}x{self.input_size})"
        )

    # -- encoding ---------------------------------------------------------------------------
    def validate(self, arch) -> Arch:
        """Return ``arch`` as a tuple of ints, or raise ValueError naming what is wrong."""
        if isinstance(arch, (str, bytes)) or not hasattr(arch, "__len__"):
            raise ValueError(
                f"architecture must be a sequence of {self.num_layers} ints, got {arch!r}"
            )
        if len(arch) != self.num_layers:
            raise ValueError(
                f"architecture has {len(arch)} genes but the space {self.name!r} has "
                f"{self.num_layers} layers: {tuple(arch)!r}"
            )
        out = []
        for i, g in enumerate(arch):
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)):
                raise ValueError(f"architecture gene {i} must be an int, got {g!r}")
            if not 0 <= g < self.num_choices:
                raise ValueError(
                    f"architecture gene {i} is {int(g)}, outside the {self.num_choices} choices "
                    f"(0..{self.num_choices - 1}) of layer {i}"
                )
            out.append(int(g))
        return tuple(out)

    def describe(self, arch) -> list[str]:
        """Choice names of an architecture, layer by layer."""
        return [self.choices[g].name for g in self.validate(arch)]

    def all_archs(self):
        """Iterate over every architecture (lexicographic order). Small spaces only."""
        return itertools.product(range(self.num_choices), repeat=self.num_layers)

    # -- random operators (explicit numpy Generator) ----------------------------------------
    def sample(self, rng: np.random.Generator) -> Arch:
        """A uniformly random architecture."""
        return tuple(int(g) for g in rng.integers(0, self.num_choices, self.num_layers))

    def mutate(self, arch, rng: np.random.Generator, p: float) -> Arch:
        """Each gene is resampled uniformly (possibly to the same value) with probability p."""
        out = list(self.validate(arch))
        for i in range(self.num_layers):
            if rng.random() < p:
                out[i] = int(rng.integers(0, self.num_choices))
        return tuple(out)

    def crossover(self, a, b, rng: np.random.Generator) -> Arch:
        """Each gene taken from ``a`` or ``b`` with probability 1/2."""
        a, b = self.validate(a), self.validate(b)
        pick = rng.integers(0, 2, self.num_layers)
        return tuple(x if k == 0 else y for x, y, k in zip(a, b, pick))

    # -- costs ------------------------------------------------------------------------------
    def _block_parts(self, layer: LayerSpec, choice: Choice) -> list[tuple[str, int, int]]:
        """``[(kind, multiply-adds, weights)]`` of each conv of a block, kind "pointwise" (1x1,
        a matmul) or "depthwise"."""
        inp, mid, out = layer.in_channels, layer.mid_channels, layer.out_channels
        main_out = out - inp
        h_in, h = layer.in_size, layer.out_size
        pw = lambda size, c_in, c_out: ("pointwise", *_conv_cost(size, 1, c_in, c_out))  # noqa: E731
        dw = lambda k, c: ("depthwise", *_conv_cost(h, k, c, c, groups=c))  # noqa: E731
        if choice.kind == "shuffle":
            k = choice.kernel
            parts = [pw(h_in, inp, mid), dw(k, mid), pw(h, mid, main_out)]
        else:
            parts = [dw(3, inp), pw(h, inp, mid), dw(3, mid), pw(h, mid, mid), dw(3, mid),
                     pw(h, mid, main_out)]
        if layer.stride == 2:
            parts += [dw(choice.kernel, inp), pw(h, inp, inp)]
        return parts

    def _block_cost(self, layer: LayerSpec, choice: Choice):
        parts = self._block_parts(layer, choice)
        return sum(f for _, f, _ in parts), sum(p for _, _, p in parts)

    def _head(self, num_classes):
        n = self.num_classes if num_classes is None else int(num_classes)
        return self.last_channels * n

    def flops(self, arch, num_classes: int | None = None) -> int:
        """Multiply-adds of the architecture at ``input_size`` (released convention)."""
        arch = self.validate(arch)
        body = int(self._flops_table[np.arange(self.num_layers), arch].sum())
        return self._fixed_flops + body + self._head(num_classes)

    def flops_by_kind(self, arch, num_classes: int | None = None) -> dict[str, int]:
        """``flops(arch)`` split by kind of op: ``stem`` (the dense 3x3 conv), ``pointwise``
        (every 1x1 conv, conv_last included: the matmul-shaped work), ``depthwise`` and
        ``classifier``. The values sum to ``flops(arch, num_classes)``."""
        arch = self.validate(arch)
        out = {"stem": int(self._stem_flops), "pointwise": int(self._last_flops),
               "depthwise": 0, "classifier": int(self._head(num_classes))}
        for layer, c in zip(self.layers, arch):
            for kind, f, _ in self._block_parts(layer, self.choices[c]):
                out[kind] += int(f)
        return out

    def params(self, arch, num_classes: int | None = None) -> int:
        """Weights of the standalone subnet (conv and linear; BN has no affine parameters)."""
        arch = self.validate(arch)
        body = int(self._params_table[np.arange(self.num_layers), arch].sum())
        return self._fixed_params + body + self._head(num_classes)

    def flops_range(self, num_classes: int | None = None) -> tuple[int, int]:
        """(min, max) FLOPs over the whole space, exact (costs add up layer by layer)."""
        base = self._fixed_flops + self._head(num_classes)
        return (
            base + int(self._flops_table.min(axis=1).sum()),
            base + int(self._flops_table.max(axis=1).sum()),
        )

    def params_range(self, num_classes: int | None = None) -> tuple[int, int]:
        """(min, max) parameter counts over the whole space, exact."""
        base = self._fixed_params + self._head(num_classes)
        return (
            base + int(self._params_table.min(axis=1).sum()),
            base + int(self._params_table.max(axis=1).sum()),
        )

    def layer_table(self) -> list[dict]:
        """Per-layer shapes and the FLOPs of every choice there (for ``fastshift info``)."""
        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row["flops"] = {c.name: int(f) for c, f in
                            zip(self.choices, self._flops_table[layer.index])}
            rows.append(row)
        return rows
