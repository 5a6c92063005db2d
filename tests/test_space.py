"""Search space: encoding, operators, analytic FLOPs/params against a hook count."""

import numpy as np
import pytest
import torch
from torch import nn

import fastshift
from fastshift import SearchSpace, spaces


def hook_count(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Released-style counter: conv = oh*ow*kh*kw*cin/groups*cout, linear = in*out; by kind
    (depthwise, pointwise = 1x1, stem = any other conv, classifier = linear)."""
    total = {"stem": 0, "pointwise": 0, "depthwise": 0, "classifier": 0}

    def conv_hook(m, inp, out):
        kh, kw = m.kernel_size
        kind = ("depthwise" if m.groups == m.in_channels > 1 else
                "pointwise" if (kh, kw) == (1, 1) else "stem")
        total[kind] += out.shape[2] * out.shape[3] * kh * kw * (m.in_channels // m.groups) \
            * m.out_channels

    def linear_hook(m, inp, out):
        total["classifier"] += m.in_features * m.out_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    module.eval()
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total


def test_spos_space_structure():
    space = spaces.spos_shufflenetv2()
    assert space.num_layers == 20 and space.num_choices == 4
    assert [c.name for c in space.choices] == ["shuffle3", "shuffle5", "shuffle7", "xception"]
    strides = [layer.stride for layer in space.layers]
    assert strides == [2, 1, 1, 1, 2, 1, 1, 1, 2] + [1] * 7 + [2, 1, 1, 1]
    assert space.final_size == 7 and space.final_channels == 640
    assert space.size == 4**20


@pytest.mark.parametrize("make", [spaces.spos_shufflenetv2, spaces.small, spaces.digits,
                                  lambda: SearchSpace(input_size=37, stage_repeats=(1, 2),
                                                      stage_channels=(24, 40),
                                                      last_channels=64,
                                                      choices=("xception", "shuffle7"))])
def test_flops_and_params_match_hook_count(make):
    space = make()
    # hooks fire on module calls: the reference backend runs every Conv2d module (the fused
    # path reads their weights instead)
    net = fastshift.Supernet(space, backend="reference")
    rng = np.random.default_rng(1)
    archs = [space.sample(rng) for _ in range(4 if space.num_layers > 10 else 8)]
    archs += [tuple([c] * space.num_layers) for c in range(space.num_choices)]
    for arch in archs:
        sub = net.subnet(arch)
        x = torch.zeros(1, space.in_channels, space.input_size, space.input_size)
        counted = hook_count(sub, x)
        assert space.flops(arch) == sum(counted.values()), arch
        assert space.flops_by_kind(arch) == counted, arch
        assert space.params(arch) == sum(p.numel() for p in sub.parameters()), arch


def test_flops_range_is_exact_for_small_space():
    space = spaces.digits()
    all_flops = [space.flops(a) for a in space.all_archs()]
    assert space.flops_range() == (min(all_flops), max(all_flops))
    all_params = [space.params(a) for a in space.all_archs()]
    assert space.params_range() == (min(all_params), max(all_params))


def test_flops_depend_on_num_classes():
    space = spaces.digits()
    arch = (0, 1, 2, 3)
    assert space.flops(arch, num_classes=5) == space.flops(arch) - 5 * space.last_channels


@pytest.mark.parametrize("bad,match", [
    ((0, 1, 2), "has 3 genes"),
    ((0, 1, 2, 4), "gene 3 is 4"),
    ((0, 1, -1, 0), "gene 2 is -1"),
    ((0, 1.0, 2, 3), "gene 1 must be an int"),
    ("0123", "sequence"),
    (None, "sequence"),
])
def test_validate_rejects_bad_archs(bad, match):
    with pytest.raises(ValueError, match=match):
        spaces.digits().validate(bad)


def test_validate_accepts_numpy_ints():
    assert spaces.digits().validate(np.array([0, 1, 2, 3])) == (0, 1, 2, 3)


def test_operators_are_seeded_and_legal():
    space = spaces.spos_shufflenetv2()
    a = space.sample(np.random.default_rng(3))
    assert a == space.sample(np.random.default_rng(3))
    assert a != space.sample(np.random.default_rng(4))
    m1 = space.mutate(a, np.random.default_rng(5), 0.1)
    assert m1 == space.mutate(a, np.random.default_rng(5), 0.1)
    assert space.mutate(a, np.random.default_rng(5), 0.0) == a
    b = space.sample(np.random.default_rng(6))
    c = space.crossover(a, b, np.random.default_rng(7))
    assert all(g in (x, y) for g, x, y in zip(c, a, b))
    space.validate(m1), space.validate(c)


def test_mutation_rate():
    space = spaces.spos_shufflenetv2()
    rng = np.random.default_rng(0)
    a = (0,) * 20
    changed = np.mean([sum(g != 0 for g in space.mutate(a, rng, 0.1)) for _ in range(2000)])
    # each gene resampled w.p. 0.1, to a different value w.p. 3/4: 20 * 0.075 = 1.5
    assert 1.35 < changed < 1.65


def test_config_round_trip():
    space = SearchSpace(input_size=40, stage_repeats=(1, 1), stage_channels=(32, 48),
                        last_channels=96, choices=("shuffle5", "xception"), num_classes=7)
    again = SearchSpace.from_config(space.config())
    assert again == space and again.flops((1, 0)) == space.flops((1, 0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(stage_channels=(30, 64)), "multiples of 4"),
    (dict(stage_repeats=(2,), stage_channels=(32, 64)), "equal"),
    (dict(choices=("shuffle9",)), "unknown choice"),
    (dict(choices=()), "must not be empty"),
    (dict(stem_stride=3), "stem_stride"),
    (dict(stem_channels=64, stage_channels=(32, 64)), "widen"),
])
def test_bad_space_config(kwargs, match):
    base = dict(input_size=16, stage_repeats=(1, 1), stage_channels=(32, 64), last_channels=64)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SearchSpace(**base)


def test_builtin_lookup():
    assert spaces.get("digits").input_size == 8
    with pytest.raises(ValueError, match="unknown search space"):
        spaces.get("nope")
