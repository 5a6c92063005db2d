"""Blocks and supernet against an independent functional construction; state-dict layout,
loading and export."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastshift
from fastshift import SearchSpace, spaces

EPS = 1e-5


def bn(x, train, mean=None, var=None):
    if train:
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS)


def convs_and_bns(seq):
    """Weights of the convs and running stats of the BNs of a Sequential, in order."""
    ws, stats = [], []
    for m in seq:
        if isinstance(m, torch.nn.Conv2d):
            ws.append(m.weight)
        elif isinstance(m, torch.nn.BatchNorm2d):
            stats.append((m.running_mean, m.running_var))
    return ws, stats


def ref_block(block, x, kind, kernel, stride, train):
    """Independent forward of a released ShuffleNetV2 / Xception unit."""
    if stride == 1:
        b, c, h, w = x.shape
        pairs = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
        x_proj, x_main = pairs[0], pairs[1]  # the released channel_shuffle
    else:
        x_proj = x_main = x
    ws, st = convs_and_bns(block.branch_main)
    it = iter(zip(ws, st))

    def step(inp, conv_stride, groups, relu):
        w, (m, v) = next(it)
        out = F.conv2d(inp, w, stride=conv_stride, padding=w.shape[-1] // 2, groups=groups)
        out = bn(out, train, m, v)
        return F.relu(out) if relu else out

    if kind == "shuffle":
        y = step(x_main, 1, 1, True)
        y = step(y, stride, y.shape[1], False)
        y = step(y, 1, 1, True)
    else:
        y = step(x_main, stride, x_main.shape[1], False)
        y = step(y, 1, 1, True)
        y = step(y, 1, y.shape[1], False)
        y = step(y, 1, 1, True)
        y = step(y, 1, y.shape[1], False)
        y = step(y, 1, 1, True)
    if stride == 2:
        pw, pst = convs_and_bns(block.branch_proj)
        p = F.conv2d(x_proj, pw[0], stride=2, padding=kernel // 2, groups=x_proj.shape[1])
        p = bn(p, train, *pst[0])
        p = F.relu(bn(F.conv2d(p, pw[1]), train, *pst[1]))
        x_proj = p
    return torch.cat((x_proj, y), 1)


@pytest.mark.parametrize("backend", fastshift.ops.available_backends("cpu"))
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layer_index", [0, 1])  # stride 2, stride 1
@pytest.mark.parametrize("choice", range(4))
def test_blocks_match_functional_reference(backend, train, layer_index, choice):
    space = SearchSpace(input_size=13, stage_repeats=(2,), stage_channels=(24,),
                        last_channels=32, stem_channels=8)
    torch.manual_seed(choice)
    net = fastshift.Supernet(space, backend=backend).double()
    block = net.features[layer_index][choice]
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    layer = space.layers[layer_index]
    c_in = layer.in_channels if layer.stride == 2 else layer.out_channels
    x = torch.randn(3, c_in, layer.in_size, layer.in_size, dtype=torch.float64)
    block.train(train)
    c = space.choices[choice]
    expected = ref_block(block, x, c.kind, c.kernel, layer.stride, train)
    got = block(x)
    assert got.shape == (3, layer.out_channels, layer.out_size, layer.out_size)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_spos_state_dict_layout():
    net = fastshift.Supernet(spaces.spos_shufflenetv2())
    sd = net.state_dict()
    expect = {
        "first_conv.0.weight": (16, 3, 3, 3),
        "first_conv.1.running_mean": (16,),
        "features.0.0.branch_main.0.weight": (32, 16, 1, 1),
        "features.0.0.branch_main.3.weight": (32, 1, 3, 3),
        "features.0.0.branch_main.5.weight": (48, 32, 1, 1),
        "features.0.0.branch_proj.0.weight": (16, 1, 3, 3),
        "features.0.0.branch_proj.2.weight": (16, 16, 1, 1),
        "features.0.2.branch_main.3.weight": (32, 1, 7, 7),
        "features.0.3.branch_main.0.weight": (16, 1, 3, 3),
        "features.0.3.branch_main.2.weight": (32, 16, 1, 1),
        "features.0.3.branch_main.12.weight": (48, 32, 1, 1),
        "features.1.1.branch_main.0.weight": (32, 32, 1, 1),
        "features.19.3.branch_main.12.weight": (320, 320, 1, 1),
        "conv_last.0.weight": (1024, 640, 1, 1),
        "conv_last.1.running_var": (1024,),
        "classifier.0.weight": (1000, 1024),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert "features.1.0.branch_proj.0.weight" not in sd  # stride-1 units have no projection
    assert not any(k.endswith(".bias") for k in sd)
    assert "first_conv.1.weight" not in sd and "conv_last.1.weight" not in sd  # affine=False
    assert all(not k.startswith("features.20") for k in sd)


def test_state_dict_round_trip_and_module_prefix(tmp_path, digits_space):
    a = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(1))
    b = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 1, 8, 8)
    arch = (0, 3, 2, 1)
    a.eval(), b.eval()
    assert not torch.allclose(a(x, arch), b(x, arch))
    path = tmp_path / "released.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in a.state_dict().items()}}, path)
    b.load_state_dict(fastshift.load_state_dict(path))
    torch.testing.assert_close(a(x, arch), b(x, arch), rtol=0, atol=0)


def test_load_errors_name_the_key(tmp_path, digits_space):
    net = fastshift.Supernet(digits_space)
    sd = net.state_dict()
    missing = {k: v for k, v in sd.items() if k != "features.2.1.branch_main.3.weight"}
    with pytest.raises(ValueError, match="missing key 'features.2.1.branch_main.3.weight'"):
        net.load_state_dict(missing)
    extra = dict(sd, **{"features.9.0.branch_main.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key 'features.9.0"):
        net.load_state_dict(extra)
    wrong = dict(sd, **{"classifier.0.weight": torch.zeros(1000, 128)})
    with pytest.raises(ValueError, match=r"'classifier.0.weight' has shape \(1000, 128\)"):
        net.load_state_dict(wrong)
    other = fastshift.Supernet(spaces.small())
    with pytest.raises(ValueError, match="first_conv.0.weight"):
        net.load_state_dict(other.state_dict())
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fastshift.load_state_dict(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        fastshift.load_state_dict(garbage)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        fastshift.load_state_dict(tmp_path / "list.pth")


def test_forward_rejects_bad_arch_and_input(digits_space):
    net = fastshift.Supernet(digits_space)
    with pytest.raises(ValueError, match="has 3 genes"):
        net(torch.zeros(2, 1, 8, 8), (0, 1, 2))
    with pytest.raises(ValueError, match="gene 0 is 7"):
        net(torch.zeros(2, 1, 8, 8), (7, 1, 2, 0))
    with pytest.raises(ValueError, match=r"input must be \[B, 1, H, W\]"):
        net(torch.zeros(2, 3, 8, 8), (0, 1, 2, 0))


def test_subnet_export_equals_path(digits_space):
    net = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(3)).eval()
    for arch in [(0, 1, 2, 3), (3, 3, 0, 0)]:
        sub = net.subnet(arch).eval()
        x = torch.randn(5, 1, 8, 8)
        torch.testing.assert_close(sub(x), net(x, arch), rtol=0, atol=0)
        assert set(sub.state_dict()) == {
            k.replace(f"features.{i}.{g}.", f"features.{i}.")
            for k in net.state_dict()
            for i, g in enumerate(arch)
            if k.startswith(f"features.{i}.{g}.")
        } | {k for k in net.state_dict() if not k.startswith("features.")}
        # the export is a copy: training it leaves the supernet alone
        before = net.features[0][arch[0]].branch_main[0].weight.clone()
        with torch.no_grad():
            sub.features[0].branch_main[0].weight.add_(1.0)
        torch.testing.assert_close(net.features[0][arch[0]].branch_main[0].weight, before)


def test_reset_classifier(digits_space):
    net = fastshift.Supernet(digits_space)
    body = net.features[0][0].branch_main[0].weight.clone()
    net.reset_classifier(5, torch.Generator().manual_seed(0))
    assert net.num_classes == 5 and net(torch.zeros(2, 1, 8, 8), (0, 0, 0, 0)).shape == (2, 5)
    std = float(net.classifier[0].weight.detach().std())
    assert 0.007 < std < 0.013
    torch.testing.assert_close(net.features[0][0].branch_main[0].weight, body)


def test_init_is_seeded(digits_space):
    a = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(5))
    b = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(5))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert np.isclose(float(a.first_conv[0].weight.detach().std()), 0.01, rtol=0.3)


@pytest.mark.skipif(not fastshift.ops.HAVE_C, reason="fastshift._C not built")
def test_fused_head_runs_fastshift_linear(digits_space):
    """On the cpu backend the SPOS head (one bias-free Linear) runs as fastshift::linear in the
    path forward and in forward_many, with the reference path's logits; any other head runs
    its modules."""
    net = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(1)).double()
    ref = fastshift.Supernet(digits_space, backend="reference").double()
    ref.load_state_dict(net.state_dict())
    net.backend = "cpu"
    x, arch = torch.randn(6, 1, 8, 8, dtype=torch.float64), (0, 1, 2, 3)

    def linear_calls(fn):
        with torch.profiler.profile() as prof:
            out = fn()
        return out, sum(e.name == "fastshift::linear" for e in prof.events())

    for mode in (net.train, net.eval):
        mode(), (ref.train if mode == net.train else ref.eval)()
        torch.manual_seed(0)  # the same dropout mask in both
        out, calls = linear_calls(lambda: net(x, arch))
        torch.manual_seed(0)
        torch.testing.assert_close(out, ref(x, arch), rtol=1e-10, atol=1e-12)
        assert calls == 1
    net.eval()
    out, calls = linear_calls(lambda: net.forward_many(x, [arch, (3, 2, 1, 0)]))
    assert calls == 1 and out.shape == (2, 6, net.num_classes)  # one call: the stacked rows
    # a head with a bias is no fastshift::linear: its modules run
    net.classifier = torch.nn.Sequential(torch.nn.Linear(net.classifier[0].in_features, 4)).double()
    out, calls = linear_calls(lambda: net(x, arch))
    assert calls == 0 and out.shape == (6, 4)


@pytest.mark.skipif(not fastshift.ops.HAVE_C, reason="fastshift._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_weights_reuses_packs_and_sees_in_place_changes(digits_space, dtype):
    """Inside ops.frozen_weights the CPU bodies reuse each weight's packed form: the eval
    forward (path and forward_many) and a training forward give the same values bit for bit
    as outside; a weight changed in place inside the block is packed again; scopes nest and an
    unmatched end is an error."""
    net = fastshift.Supernet(digits_space, backend="cpu",
                             generator=torch.Generator().manual_seed(2)).to(dtype).eval()
    x = torch.randn(5, 1, 8, 8, dtype=dtype)
    archs = [(0, 1, 2, 3), (3, 2, 1, 0), (0, 1, 0, 0)]
    with torch.inference_mode():
        want = [net(x, a) for a in archs], net.forward_many(x, archs)
        with fastshift.ops.frozen_weights():
            for _ in range(2):  # the second round reads the kept packs
                got = [net(x, a) for a in archs], net.forward_many(x, archs)
                assert all(torch.equal(g, w) for g, w in zip(got[0], want[0]))
                assert torch.equal(got[1], want[1])
            with fastshift.ops.frozen_weights():  # nested: the same packs
                assert torch.equal(net(x, archs[0]), want[0][0])
            for p in net.parameters():
                p.mul_(1.5)  # in place: a new version, packed again
            changed = [net(x, a) for a in archs]
    with torch.inference_mode():
        fresh = [net(x, a) for a in archs]
    assert all(torch.equal(c, f) for c, f in zip(changed, fresh))
    assert not torch.equal(changed[0], want[0][0])
    net.train()
    with fastshift.ops.frozen_weights():
        torch.manual_seed(0)
        a = net(x, archs[0])
    torch.manual_seed(0)
    assert torch.equal(a, net(x, archs[0]))
    with pytest.raises(RuntimeError, match="not entered"):
        torch.ops.fastshift.pack_cache(False)


@pytest.mark.skipif(not fastshift.ops.HAVE_C, reason="fastshift._C not built")
def test_frozen_weights_scope_is_per_thread(digits_space):
    """A frozen_weights scope held open on another thread does not reach this one: a weight
    changed through .data (no new version, which a scope would not see) is packed again here."""
    net = fastshift.Supernet(digits_space, backend="cpu",
                             generator=torch.Generator().manual_seed(4)).eval()
    x, arch = torch.randn(3, 1, 8, 8), (0, 1, 2, 3)
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with fastshift.ops.frozen_weights():
            entered.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(30)
        with torch.no_grad():
            before = net(x, arch)
            for p in net.parameters():
                p.data.mul_(1.5)
            after = net(x, arch)
    finally:
        leave.set()
        holder.join()
    with torch.no_grad():
        assert torch.equal(after, net(x, arch)) and not torch.equal(after, before)
