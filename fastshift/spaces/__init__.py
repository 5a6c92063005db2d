"""Built-in search spaces.

- :func:`spos_shufflenetv2`: the SPOS ShuffleNetV2 one-shot space of the released code, 20 layers
  x 4 choices (Shuffle3x3/5x5/7x7/Xception), 224x224 BGR input, 1000 classes.
- :func:`small`: the same building blocks at CPU scale (32x32 or 8x8 input), 4 layers x 4
  choices = 256 architectures by default; ``small(8, in_channels=1)`` fits the 8x8 grayscale
  ``sklearn.datasets.load_digits`` images (see :func:`digits`).

A custom space is a :class:`fastshift.SearchSpace` built from the same pieces, e.g.
``SearchSpace(input_size=64, stage_repeats=(2, 3), stage_channels=(48, 96), last_channels=256,
choices=("shuffle3", "xception"))``.
"""

from __future__ import annotations

from ..space import SHUFFLE3, SHUFFLE5, SHUFFLE7, XCEPTION, SearchSpace

__all__ = ["spos_shufflenetv2", "small", "digits", "get", "BUILTIN"]


def spos_shufflenetv2(input_size: int = 224, num_classes: int = 1000) -> SearchSpace:
    """SPOS ShuffleNetV2: stem 3->16 (stride 2), stages [4, 4, 8, 4] x [64, 160, 320, 640],
    conv 1x1 -> 1024, 4 choices per layer. FLOPs at 224x224 with 1000 classes match the
    released counter (the 330M search limit applies to this count)."""
    return SearchSpace(
        input_size=input_size,
        in_channels=3,
        stem_channels=16,
        stem_stride=2,
        stage_repeats=(4, 4, 8, 4),
        stage_channels=(64, 160, 320, 640),
        last_channels=1024,
        choices=(SHUFFLE3, SHUFFLE5, SHUFFLE7, XCEPTION),
        num_classes=num_classes,
        name="spos_shufflenetv2",
    )


def small(
    input_size: int = 32,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    stage_repeats=(2, 2),
    stage_channels=(32, 64),
    last_channels: int = 128,
) -> SearchSpace:
    """A CPU-scale space with the SPOS blocks: stem -> 16 channels (stride 1 for inputs of at
    most 16 pixels, else 2), two stages of 2 layers, 4 choices: 256 architectures."""
    return SearchSpace(
        input_size=input_size,
        in_channels=in_channels,
        stem_channels=16,
        stem_stride=1 if input_size <= 16 else 2,
        stage_repeats=stage_repeats,
        stage_channels=stage_channels,
        last_channels=last_channels,
        choices=(SHUFFLE3, SHUFFLE5, SHUFFLE7, XCEPTION),
        num_classes=num_classes,
        name=f"small{input_size}",
    )


def digits(num_classes: int = 10) -> SearchSpace:
    """``small(8, in_channels=1)``: the space for the built-in digits data (8x8 grayscale)."""
    space = small(8, in_channels=1, num_classes=num_classes)
    space.name = "digits"
    return space


BUILTIN = {"spos_shufflenetv2": spos_shufflenetv2, "small32": small, "digits": digits}


def get(name: str, **kwargs) -> SearchSpace:
    """A built-in space by name: spos_shufflenetv2, small32 or digits."""
    try:
        return BUILTIN[name](**kwargs)
    except KeyError:
        raise ValueError(
            f"unknown search space {name!r}: built-in spaces are {sorted(BUILTIN)}"
        ) from None
