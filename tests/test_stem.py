"""ops.stem_conv_bn_relu (the network's stem as one CPU op) against its plain-PyTorch
reference: values, the weight's gradient and running statistics (float64 tight, float32 against
PyTorch's own float32 error), odd shapes, empty batch, gradcheck, opcheck, torch.compile, thread
count invariance, clear errors; and the networks that run it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastshift
from fastshift import SearchSpace, ops, spaces
from fastshift.ops import reference

needs_c = pytest.mark.skipif(not ops.HAVE_C, reason=f"fastshift._C not built: {ops.BUILD_ERROR}")

# (B, C, H, W, O, k, stride)
STEM_SHAPES = [(4, 3, 16, 16, 16, 3, 2), (3, 3, 9, 7, 16, 3, 2), (2, 1, 5, 6, 5, 3, 1),
               (2, 4, 11, 11, 33, 5, 2), (1, 2, 3, 3, 17, 3, 3), (5, 3, 1, 1, 7, 1, 1),
               (0, 3, 8, 8, 16, 3, 2), (2, 3, 70, 33, 16, 3, 2)]


def _run(fn, x, w, g, mean, var, training, **kw):
    w = w.detach().requires_grad_(True)
    y = fn(x, w, mean, var, training=training, momentum=0.1, eps=1e-5, **kw)
    y.backward(g)
    return y.detach(), w.grad


def _case(shape, dtype, layout, seed=0):
    b, c, h, w, o, k, s = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(o, c, k, k, generator=gen, dtype=torch.float64) / (c * k * k) ** 0.5
    ho, wo = ops.conv_out_size(h, k, s), ops.conv_out_size(w, k, s)
    g = torch.randn(b, o, ho, wo, generator=gen, dtype=torch.float64)
    mean = torch.randn(o, generator=gen, dtype=torch.float64) * 0.1
    var = torch.rand(o, generator=gen, dtype=torch.float64) + 0.5
    x, wt, g, mean, var = (t.to(dtype) for t in (x, wt, g, mean, var))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat((x, x), 1)[:, c:]
    return x, wt, g, mean, var


@needs_c
@pytest.mark.parametrize("shape", STEM_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_stem_matches_reference(shape, training, layout):
    """y, the weight's gradient and the updated running statistics: float64 to 1e-10 of the
    reference; float32 no further from the float64 truth than twice PyTorch's own float32
    error (plus a few ulp of the largest value)."""
    stride = shape[-1]
    truth = None
    for dtype in (torch.float64, torch.float32):
        x, w, g, mean, var = _case(shape, dtype, layout)
        runs = []
        for fn, kw in ((ops.stem_conv_bn_relu, dict(backend="cpu")),
                       (reference.stem_conv_bn_relu, {})):
            m, v = mean.clone(), var.clone()
            y, gw = _run(fn, x, w, g, m, v, training, stride=stride, **kw)
            runs.append((y, gw, m, v))
        ours, theirs = runs
        assert ours[0].shape == theirs[0].shape and ours[0].dtype == dtype
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float64:
            truth = theirs
            for a, r in zip(ours, theirs):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
            continue
        for a, t, r in zip(ours, truth, theirs):
            if not t.numel():
                continue
            err, ref_err = (a.double() - t).abs().max(), (r.double() - t).abs().max()
            assert err <= 2 * ref_err + 16 * 2.0 ** -23 * t.abs().max(), (err, ref_err)


@needs_c
@pytest.mark.parametrize("training", [True, False])
def test_stem_gradcheck_opcheck_compile(training):
    kw = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 7, 6, **kw)
    w = torch.randn(5, 3, 3, 3, **kw, requires_grad=True)
    mean, var = torch.randn(5, **kw), torch.rand(5, **kw) + 0.5

    def stem(w):
        return torch.ops.fastshift.stem_conv_bn_relu(x, w, mean, var, 2, 1e-5, training)[0]

    assert torch.autograd.gradcheck(stem, (w,))
    torch.library.opcheck(torch.ops.fastshift.stem_conv_bn_relu.default,
                          (x, w, mean, var, 2, 1e-5, training))
    y, z, m, v = torch.ops.fastshift.stem_conv_bn_relu(x, w.detach(), mean, var, 2, 1e-5,
                                                       training)
    torch.library.opcheck(torch.ops.fastshift.stem_conv_bn_relu_backward.default,
                          (torch.randn_like(y), x, w.detach(), y, z, m, v, 2, 1e-5, training))

    def f(x, w):
        return torch.ops.fastshift.stem_conv_bn_relu(x, w, mean, var, 2, 1e-5,
                                                     training)[0].sum((2, 3))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w), rtol=0, atol=0)


@needs_c
def test_stem_is_thread_count_invariant():
    """Fixed pixel chunks and chunk-order sums: the same bits on one thread and on two (oneDNN's
    weight gradient and ATen's batch norm, which the stem ran as before, differ)."""
    x, w, g, mean, var = _case((8, 3, 64, 64, 16, 3, 2), torch.float32, "channels_last")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            for training in (True, False):
                m, v = mean.clone(), var.clone()
                runs.append((*_run(ops.stem_conv_bn_relu, x, w, g, m, v, training, stride=2,
                                   backend="cpu"), m, v))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(runs[:2], runs[2:4]):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    for a, b in zip(runs[:2], runs[4:]):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@needs_c
def test_stem_errors_are_clear():
    z = torch.zeros
    op = torch.ops.fastshift.stem_conv_bn_relu
    with pytest.raises(RuntimeError, match="x must be"):
        op(z(2, 3, 4), z(4, 3, 3, 3), z(4), z(4), 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="weight has 2 input channels, x has 3"):
        op(z(1, 3, 4, 4), z(4, 2, 3, 3), z(4), z(4), 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="square of odd size"):
        op(z(1, 3, 4, 4), z(4, 3, 2, 2), z(4), z(4), 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="must hold 4 values"):
        op(z(1, 3, 4, 4), z(4, 3, 3, 3), z(3), z(4), 2, 1e-5, False)
    with pytest.raises(RuntimeError, match="both float32 or both float64"):
        op(z(1, 3, 4, 4), z(4, 3, 3, 3, dtype=torch.float64), z(4), z(4), 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="requires grad"):
        op(z(1, 3, 4, 4, requires_grad=True), z(4, 3, 3, 3), z(4), z(4), 2, 1e-5, True)
    # through ops: an x that needs a gradient runs the reference instead
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    ops.stem_conv_bn_relu(x, torch.randn(4, 3, 3, 3), None, None, stride=2, training=True,
                          backend="cpu").sum().backward()
    assert x.grad is not None


def _small_space():
    return SearchSpace(input_size=17, stage_repeats=(2, 1), stage_channels=(24, 48),
                       last_channels=32, stem_channels=8, num_classes=10)


def _net(space, backend, dtype=torch.float32):
    return fastshift.Supernet(space, backend=backend,
                              generator=torch.Generator().manual_seed(0)).to(dtype)


def _stem_calls(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages()
                    if e.key == "fastshift::stem_conv_bn_relu")


@needs_c
@pytest.mark.parametrize("training", [True, False])
def test_networks_run_the_stem_op_and_match_the_modules(training):
    """Supernet.forward, forward_many and Subnet on the cpu backend run the stem as the op in
    training (counted; in eval the modules) with the reference backend's logits, stem gradient
    and running statistics (float64)."""
    space = _small_space()
    archs = [tuple(i % 4 for i in range(space.num_layers)),
             tuple((i + 1) % 4 for i in range(space.num_layers))]
    x = torch.randn(4, space.in_channels, 17, 17, dtype=torch.float64)
    runs = {}
    for backend in ("reference", "cpu"):
        net = _net(space, backend, torch.float64).train(training)
        sub = net.subnet(archs[0]).train(training)
        torch.manual_seed(0)  # the same dropout masks
        out = []
        for fn in (lambda net=net: net(x, archs[0]),
                   lambda net=net: net.forward_many(x, archs), lambda sub=sub: sub(x)):
            logits, calls = _stem_calls(fn)
            assert calls == (1 if backend == "cpu" and training else 0)
            if training:
                logits.sum().backward()
            out.append(logits.detach())
        grads = [m.first_conv[0].weight.grad for m in (net, sub)]
        stats = [m.first_conv[1].running_mean.clone() for m in (net, sub)]
        runs[backend] = out + (grads if training else []) + stats
    for a, b in zip(runs["reference"], runs["cpu"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@needs_c
def test_training_step_is_thread_count_invariant():
    """With the stem as the op, every op of a fused training step splits its work by shape
    only: loss, every gradient and every running statistic are the same bits on one thread and
    on two (they were not while the stem ran as oneDNN's conv and ATen's batch norm)."""
    space = spaces.spos_shufflenetv2(input_size=32, num_classes=10)
    base = _net(space, "cpu")
    arch = tuple((3 * i + 1) % 4 for i in range(space.num_layers))
    x = torch.randn(16, space.in_channels, 32, 32)
    y = torch.randint(0, 10, (16,))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            net = copy.deepcopy(base).train()
            torch.manual_seed(0)
            loss = F.cross_entropy(net(x, arch), y)
            loss.backward()
            runs.append([loss.detach()] + [p.grad for p in net.parameters()
                                           if p.grad is not None] + list(net.buffers()))
    finally:
        torch.set_num_threads(threads)
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_c
@pytest.mark.parametrize("training", [True, False])
def test_stem_keeps_nan_as_the_modules_do(training):
    """A NaN image stays NaN through the ReLU (as torch.relu), so a NaN loss is still seen
    (the search's NaN-loss error)."""
    x, w, g, mean, var = _case((2, 3, 8, 8, 16, 3, 2), torch.float32, "channels_last")
    x[0, 1, 3, 3] = float("nan")
    ours = ops.stem_conv_bn_relu(x, w, mean.clone(), var.clone(), stride=2, training=training,
                                 backend="cpu")
    ref = reference.stem_conv_bn_relu(x, w, mean.clone(), var.clone(), stride=2,
                                      training=training)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().any()
