"""Compiled ops against the plain-PyTorch reference: values, gradients, gradcheck, opcheck,
torch.compile, odd / empty / non-contiguous inputs."""

import pytest
import torch

from fastshift import ops
from fastshift.ops import reference

BACKENDS = [b for b in ops.available_backends() if b != "reference"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.cuda_built() else [])
TOL = {torch.float32: dict(rtol=0, atol=0), torch.float64: dict(rtol=0, atol=0),
       torch.float16: dict(rtol=0, atol=0), torch.bfloat16: dict(rtol=0, atol=0)}
SHAPES = [(2, 4, 3, 3), (1, 6, 5, 7), (0, 8, 4, 4), (3, 2, 1, 1), (2, 16, 9, 2)]

needs_c = pytest.mark.skipif(not ops.HAVE_C, reason=f"fastshift._C not built: {ops.BUILD_ERROR}")


def _dtypes(device):
    return [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16]
                                             if device == "cuda" else [])


def _cases():
    for device in DEVICES:
        for dtype in _dtypes(device):
            for shape in SHAPES:
                yield device, dtype, shape


def test_extension_is_built():
    """The installed package must carry its compiled extension (README install)."""
    assert ops.HAVE_C, f"fastshift._C failed to import: {ops.BUILD_ERROR}"


@needs_c
@pytest.mark.parametrize("device,dtype,shape", list(_cases()))
@pytest.mark.parametrize("contiguous", [True, False])
def test_channel_split_matches_reference(device, dtype, shape, contiguous):
    b, c, h, w = shape
    if contiguous:
        x = torch.randn(b, c, h, w, dtype=torch.float64).to(device, dtype)
    else:  # every other channel of a wider tensor
        x = torch.randn(b, 2 * c, h, w, dtype=torch.float64).to(device, dtype)[:, ::2]
    if not contiguous and x.numel():
        assert not x.is_contiguous()
    x.requires_grad_(True)
    even, odd = ops.channel_split(x, backend=device)
    ref_even, ref_odd = reference.channel_split(x)
    torch.testing.assert_close(even, ref_even, **TOL[dtype])
    torch.testing.assert_close(odd, ref_odd, **TOL[dtype])
    assert even.is_contiguous() and odd.is_contiguous()
    g_even, g_odd = torch.randn_like(even), torch.randn_like(odd)
    (grad,) = torch.autograd.grad((even, odd), x, (g_even, g_odd))
    (ref_grad,) = torch.autograd.grad((ref_even, ref_odd), x, (g_even, g_odd))
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@needs_c
@pytest.mark.parametrize("device,dtype,shape", list(_cases()))
def test_channel_interleave_matches_reference(device, dtype, shape):
    half = (shape[0], shape[1] // 2, shape[2], shape[3])
    a = torch.randn(*half, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    b = torch.randn(*half, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    out = ops.channel_interleave(a, b, backend=device)
    ref = reference.channel_interleave(a, b)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (a, b), g),
                               torch.autograd.grad(ref, (a, b), g), **TOL[dtype])


@needs_c
@pytest.mark.parametrize("device,dtype,shape", list(_cases()))
def test_channels_last_layout_is_kept(device, dtype, shape):
    """Channels-last input (the fused block path) gives channels-last halves and back, with the
    values of the reference, also for strided channel slices (cat-backward gradients)."""
    b, c, h, w = shape
    x = torch.randn(b, 2 * c, h, w, dtype=torch.float64).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)[:, c // 2: c // 2 + c]
    x.requires_grad_(True)
    even, odd = ops.channel_split(x, backend=device)
    ref_even, ref_odd = reference.channel_split(x)
    torch.testing.assert_close(even, ref_even, **TOL[dtype])
    torch.testing.assert_close(odd, ref_odd, **TOL[dtype])
    if x.numel():
        assert even.is_contiguous(memory_format=torch.channels_last)
    out = ops.channel_interleave(even, odd, backend=device)
    torch.testing.assert_close(out, x, **TOL[dtype])
    g = (torch.randn_like(even), torch.randn_like(odd))
    torch.testing.assert_close(torch.autograd.grad((even, odd), x, g),
                               torch.autograd.grad((ref_even, ref_odd), x, g), **TOL[dtype])


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.fastshift.channel_split(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.fastshift.channel_split(t), (x,))
    a = torch.randn(2, 3, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, 3, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.fastshift.channel_interleave, (a, b))


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastshift.channel_split.default, (x,))
    a = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastshift.channel_interleave.default, (a, b))
    cl = torch.channels_last
    x = torch.randn(2, 8, 3, 3, device=device).contiguous(memory_format=cl).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastshift.channel_split.default, (x,))
    a = torch.randn(2, 4, 3, 3, device=device).contiguous(memory_format=cl).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastshift.channel_interleave.default, (a, b))


@needs_c
def test_torch_compile_parity():
    def f(x):
        even, odd = torch.ops.fastshift.channel_split(x)
        return torch.ops.fastshift.channel_interleave(odd * 2, even).sum(1)

    x = torch.randn(2, 6, 4, 4)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_op_errors_are_clear(device):
    with pytest.raises(RuntimeError, match="channel count of x must be even"):
        torch.ops.fastshift.channel_split(torch.zeros(1, 3, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="must be 4-D"):
        torch.ops.fastshift.channel_split(torch.zeros(4, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.fastshift.channel_interleave(torch.zeros(1, 2, 2, 2, device=device),
                                               torch.zeros(1, 3, 2, 2, device=device))


# (a channels, b channels, N, H, W): equal halves as in a unit, odd splits, an empty side,
# batch 1, empty batch, 1x1 maps
SHUFFLE_CAT_SHAPES = [(4, 4, 2, 3, 3), (3, 5, 1, 5, 7), (5, 1, 2, 2, 3), (0, 6, 2, 3, 3),
                      (6, 0, 1, 2, 2), (4, 4, 0, 4, 4), (7, 3, 3, 1, 1), (34, 34, 2, 4, 4)]


def _shuffle_inputs(device, dtype, ca, cb, n, h, w, layout):
    """a, b in one of the layouts the fused path hands shuffle_cat: contiguous NCHW,
    channels-last, or channel ranges of a wider channels-last tensor (the split-ready input)."""
    def make(c):
        t = torch.randn(n, c, h, w, dtype=torch.float64).to(device, dtype)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return t
    if layout == "slices":
        wide = torch.randn(n, ca + cb + 3, h, w, dtype=torch.float64).to(device, dtype)
        wide = wide.contiguous(memory_format=torch.channels_last)
        return wide[:, 1:1 + ca], wide[:, 1 + ca:1 + ca + cb]
    return make(ca), make(cb)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHUFFLE_CAT_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slices"])
def test_shuffle_cat_matches_reference(device, dtype, shape, layout):
    """shuffle_cat = cat(channel_split(cat(a, b))) exactly, values and gradients, and its
    output's halves are the next unit's channel_split; the layout follows a."""
    a, b = _shuffle_inputs(device, dtype, *shape, layout)
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = ops.shuffle_cat(a, b, backend=device)
    ref = reference.shuffle_cat(a, b)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    c = shape[0] + shape[1]
    even, odd = reference.channel_split(torch.cat((a, b), 1))
    torch.testing.assert_close(out[:, :c // 2], even, **TOL[dtype])
    torch.testing.assert_close(out[:, c // 2:], odd, **TOL[dtype])
    if layout != "contiguous" and out.numel():
        assert out.is_contiguous(memory_format=torch.channels_last)
    if layout == "contiguous":
        assert out.is_contiguous()
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (a, b), g),
                               torch.autograd.grad(ref, (a, b), g), **TOL[dtype])
    # non-contiguous gradient (a channel range of a wider tensor)
    g = torch.randn(out.shape[0], c + 2, *out.shape[2:], dtype=dtype, device=device)[:, 1:1 + c]
    torch.testing.assert_close(torch.autograd.grad(out, (a, b), g),
                               torch.autograd.grad(ref, (a, b), g), **TOL[dtype])


def _opcheck_pairs(device):
    """(a, b) for opcheck: NCHW of unequal widths, and channels-last halves."""
    cl = torch.channels_last
    return ((torch.randn(2, 4, 3, 3, device=device, requires_grad=True),
             torch.randn(2, 6, 3, 3, device=device, requires_grad=True)),
            (torch.randn(2, 4, 3, 3, device=device).contiguous(memory_format=cl)
             .requires_grad_(True),
             torch.randn(2, 4, 3, 3, device=device).contiguous(memory_format=cl)
             .requires_grad_(True)))


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_cat_gradcheck_opcheck(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    a, b = torch.randn(2, 3, 3, 5, **kw), torch.randn(2, 5, 3, 5, **kw)
    assert torch.autograd.gradcheck(torch.ops.fastshift.shuffle_cat, (a, b))
    assert torch.autograd.gradgradcheck(torch.ops.fastshift.shuffle_cat, (a, b))
    g = torch.randn(2, 8, 3, 5, **kw)
    assert torch.autograd.gradcheck(lambda t: torch.ops.fastshift.shuffle_cat_backward(t, 3),
                                    (g,))
    for a, b in _opcheck_pairs(device):
        torch.library.opcheck(torch.ops.fastshift.shuffle_cat.default, (a, b))
        grad = torch.randn(2, a.shape[1] + b.shape[1], 3, 3, device=device)
        torch.library.opcheck(torch.ops.fastshift.shuffle_cat_backward.default,
                              (grad.contiguous(memory_format=torch.channels_last), a.shape[1]))


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHUFFLE_CAT_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slices"])
def test_shuffle_cat_pair_matches_reference(device, dtype, shape, layout):
    """shuffle_cat_pair = channel_split(cat(a, b)) exactly, the halves of shuffle_cat, values
    and gradients (both halves' gradients, one absent, strided ones); layout as shuffle_cat."""
    a, b = _shuffle_inputs(device, dtype, *shape, layout)
    a.requires_grad_(True)
    b.requires_grad_(True)
    lo, hi = ops.shuffle_cat_pair(a, b, backend=device)
    ref_lo, ref_hi = reference.shuffle_cat_pair(a, b)
    c = shape[0] + shape[1]
    assert lo.shape == hi.shape == (shape[2], c // 2, shape[3], shape[4])
    whole = ops.shuffle_cat(a, b, backend=device)
    assert torch.equal(lo, whole[:, :c // 2]) and torch.equal(hi, whole[:, c // 2:])
    torch.testing.assert_close(lo, ref_lo, **TOL[dtype])
    torch.testing.assert_close(hi, ref_hi, **TOL[dtype])
    if layout != "contiguous" and lo.numel():
        assert lo.is_contiguous(memory_format=torch.channels_last)
    if layout == "contiguous":
        assert lo.is_contiguous() and hi.is_contiguous()
    g_lo, g_hi = torch.randn_like(lo), torch.randn_like(hi)
    want = torch.autograd.grad((ref_lo, ref_hi), (a, b), (g_lo, g_hi))
    torch.testing.assert_close(torch.autograd.grad((lo, hi), (a, b), (g_lo, g_hi),
                                                   retain_graph=True), want, **TOL[dtype])
    # only one half used downstream: the other's gradient is zero
    want = torch.autograd.grad(ref_hi, (a, b), g_hi, allow_unused=True)
    got = torch.autograd.grad(hi, (a, b), g_hi, allow_unused=True, retain_graph=True)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, **TOL[dtype])
    # strided gradients (channel ranges of wider tensors), one in the other layout
    wide = torch.randn(lo.shape[0], c + 2, *lo.shape[2:], dtype=dtype, device=device)
    g_lo = wide.contiguous(memory_format=torch.channels_last)[:, 1:1 + c // 2]
    g_hi = wide[:, 2:2 + c // 2]
    torch.testing.assert_close(torch.autograd.grad((lo, hi), (a, b), (g_lo, g_hi)),
                               torch.autograd.grad((ref_lo, ref_hi), (a, b), (g_lo, g_hi)),
                               **TOL[dtype])


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_cat_pair_gradcheck_opcheck(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    a, b = torch.randn(2, 3, 3, 5, **kw), torch.randn(2, 5, 3, 5, **kw)
    assert torch.autograd.gradcheck(torch.ops.fastshift.shuffle_cat_pair, (a, b))
    assert torch.autograd.gradgradcheck(torch.ops.fastshift.shuffle_cat_pair, (a, b))
    lo, hi = torch.randn(2, 4, 3, 5, **kw), torch.randn(2, 4, 3, 5, **kw)
    assert torch.autograd.gradcheck(
        lambda u, v: torch.ops.fastshift.shuffle_cat_pair_backward(u, v, 3), (lo, hi))
    assert torch.autograd.gradgradcheck(
        lambda u, v: torch.ops.fastshift.shuffle_cat_pair_backward(u, v, 3), (lo, hi))
    for a, b in _opcheck_pairs(device):
        torch.library.opcheck(torch.ops.fastshift.shuffle_cat_pair.default, (a, b))
        half = (a.shape[1] + b.shape[1]) // 2
        g = [torch.randn(2, half, 3, 3, device=device).contiguous(
            memory_format=torch.channels_last) for _ in range(2)]
        torch.library.opcheck(torch.ops.fastshift.shuffle_cat_pair_backward.default,
                              (*g, a.shape[1]))


@needs_c
def test_shuffle_cat_pair_errors_are_clear():
    z = torch.zeros
    with pytest.raises(RuntimeError, match="channel count of cat\\(a, b\\) must be even"):
        torch.ops.fastshift.shuffle_cat_pair(z(1, 3, 2, 2), z(1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="must have the same shape"):
        torch.ops.fastshift.shuffle_cat_pair_backward(z(1, 2, 2, 2), z(1, 3, 2, 2), 2)
    with pytest.raises(RuntimeError, match="split must be in"):
        torch.ops.fastshift.shuffle_cat_pair_backward(z(1, 2, 2, 2), z(1, 2, 2, 2), 5)
    with pytest.raises(ValueError, match="must be even"):
        reference.shuffle_cat_pair(z(1, 3, 2, 2), z(1, 2, 2, 2))


# shuffle_regroup cases: (Ca, Cb, H, W, batch, source block counts, routes as runs per
# destination): single runs, runs across sources, blocks taken twice or three times (their
# gradients summed), a block taken by none, an empty destination, odd Ca, empty channels.
REGROUP_CASES = [
    (4, 4, 3, 3, 2, [3, 2], [[(0, 0, 2)], [(1, 0, 2), (0, 2, 3)], [(0, 1, 3)]]),
    (3, 5, 2, 5, 1, [2, 1, 3], [[(2, 0, 3), (0, 0, 1)], [], [(1, 0, 1), (2, 1, 2)],
                                [(2, 1, 3), (2, 0, 1)]]),
    (6, 0, 1, 1, 3, [1, 2], [[(1, 1, 2)], [(1, 1, 2), (0, 0, 1)]]),
    (16, 48, 2, 2, 2, [4], [[(0, 0, 4)]]),
]


def _regroup_case(case, device, dtype, layout="channels_last"):
    ca, cb, h, w, batch, blocks, runs = case
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    a = [torch.randn(n * batch, ca, h, w, dtype=dtype, device=device).contiguous(
        memory_format=fmt).requires_grad_(True) for n in blocks]
    b = [torch.randn(n * batch, cb, h, w, dtype=dtype, device=device).contiguous(
        memory_format=fmt).requires_grad_(True) for n in blocks]
    routes = [v for rs in runs for v in (len(rs), *(x for r in rs for x in r))]
    return a, b, routes, batch


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(REGROUP_CASES)))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_shuffle_regroup_matches_reference(device, dtype, case, layout):
    """shuffle_regroup = shuffle_cat_pair of each destination's gathered runs, values exactly;
    gradients: a block's gradients summed in destination order (bit for bit; equal to
    autograd's through the reference composition up to the order of those sums), zero for a
    block no run took."""
    a, b, routes, batch = _regroup_case(REGROUP_CASES[case], device, dtype, layout)
    out = ops.shuffle_regroup(a, b, routes, batch, backend=device)
    ref = reference.shuffle_regroup(a, b, routes, batch)
    assert len(out) == len(ref) == 2 * len(reference.regroup_routes(routes))
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert torch.equal(o, r)
        if layout == "channels_last":
            assert o.is_contiguous(memory_format=torch.channels_last)

    def in_destination_order(grads):
        ca = a[0].shape[1]
        sums = [torch.zeros_like(t) for t in a + b]
        for d, runs in enumerate(reference.regroup_routes(routes)):
            row = 0
            for i, b0, b1 in runs:
                n = (b1 - b0) * batch
                t = reference.channel_interleave(grads[2 * d].narrow(0, row, n),
                                                 grads[2 * d + 1].narrow(0, row, n))
                sums[i].narrow(0, b0 * batch, n).add_(t[:, :ca])
                sums[len(a) + i].narrow(0, b0 * batch, n).add_(t[:, ca:])
                row += n
        return sums

    grads = [torch.randn_like(r) for r in ref]
    got = torch.autograd.grad(out, a + b, grads)
    for g, w, r in zip(got, in_destination_order(grads), torch.autograd.grad(ref, a + b, grads)):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, r)
    # only the lo halves used downstream: the hi halves' gradients arrive as zeros
    got = torch.autograd.grad(out[0::2], a + b, grads[0::2])
    zeros = [g if k % 2 == 0 else torch.zeros_like(g) for k, g in enumerate(grads)]
    for g, w in zip(got, in_destination_order(zeros)):
        assert torch.equal(g, w)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_regroup_gradcheck_opcheck(device):
    a, b, routes, batch = _regroup_case(REGROUP_CASES[1], device, torch.float64)
    n = len(a)

    def regroup(*ab):
        return tuple(torch.ops.fastshift.shuffle_regroup(list(ab[:n]), list(ab[n:]), routes,
                                                         batch))

    assert torch.autograd.gradcheck(regroup, (*a, *b))
    assert torch.autograd.gradgradcheck(regroup, (*a, *b))
    outs = regroup(*a, *b)
    g = [torch.randn_like(o).requires_grad_(True) for o in outs]
    rows = [t.shape[0] for t in a]

    def backward(*gs):
        return tuple(torch.ops.fastshift.shuffle_regroup_backward(list(gs), routes, batch, rows,
                                                                  a[0].shape[1]))

    assert torch.autograd.gradcheck(backward, tuple(g))
    assert torch.autograd.gradgradcheck(backward, tuple(g))
    for case in REGROUP_CASES:
        a, b, routes, batch = _regroup_case(case, device, torch.float32)
        torch.library.opcheck(torch.ops.fastshift.shuffle_regroup.default, (a, b, routes, batch))
        g = [torch.randn_like(o) for o in
             torch.ops.fastshift.shuffle_regroup(a, b, routes, batch)]
        torch.library.opcheck(torch.ops.fastshift.shuffle_regroup_backward.default,
                              (g, routes, batch, [t.shape[0] for t in a], a[0].shape[1]))


@needs_c
@pytest.mark.parametrize("case", range(len(REGROUP_CASES)))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_shuffle_regroup_composite_body_matches_cpu_body(case, layout):
    """The composite bodies of shuffle_regroup and its backward (what CUDA and every other
    device run) called directly on CPU tensors: the CPU bodies' values and layouts, a
    destination with no rows and gradients taken several times included (on an H200 the
    composite once gave NCHW results where the fake kernels say channels-last)."""
    key = torch._C.DispatchKey.CompositeExplicitAutograd
    fwd = torch.ops.fastshift.shuffle_regroup.default
    bwd = torch.ops.fastshift.shuffle_regroup_backward.default
    a, b, routes, batch = _regroup_case(REGROUP_CASES[case], "cpu", torch.float64, layout)
    a, b = [t.detach() for t in a], [t.detach() for t in b]
    outs = fwd(a, b, routes, batch)
    for o, c in zip(outs, fwd._op_dk(key, a, b, routes, batch)):
        assert torch.equal(c, o) and c.stride() == o.stride()
    grads = [torch.randn_like(o) for o in outs]
    args = (grads, routes, batch, [t.shape[0] for t in a], a[0].shape[1])
    for g, c in zip(bwd(*args), bwd._op_dk(key, *args)):
        assert torch.equal(c, g) and c.stride() == g.stride()


@needs_c
def test_shuffle_regroup_errors_are_clear():
    z = torch.zeros
    a, b = [z(4, 2, 2, 2)], [z(4, 2, 2, 2)]
    with pytest.raises(RuntimeError, match="names source 1 of 1"):
        torch.ops.fastshift.shuffle_regroup(a, b, [1, 1, 0, 1], 2)
    with pytest.raises(RuntimeError, match="takes row blocks \\[1, 3\\) of source 0, which has 2"):
        torch.ops.fastshift.shuffle_regroup(a, b, [1, 0, 1, 3], 2)
    with pytest.raises(RuntimeError, match="is cut short"):
        torch.ops.fastshift.shuffle_regroup(a, b, [2, 0, 0, 1], 2)
    with pytest.raises(RuntimeError, match="not a multiple of batch 3"):
        torch.ops.fastshift.shuffle_regroup(a, b, [1, 0, 0, 1], 3)
    with pytest.raises(RuntimeError, match="differs from source 0"):
        torch.ops.fastshift.shuffle_regroup(a + [z(2, 4, 2, 2)], b + [z(2, 0, 2, 2)],
                                            [1, 0, 0, 1], 2)
    with pytest.raises(RuntimeError, match="its destination's runs take 2"):
        torch.ops.fastshift.shuffle_regroup_backward([z(4, 2, 2, 2), z(4, 2, 2, 2)],
                                                     [1, 0, 0, 1], 2, [4], 2)
    with pytest.raises(RuntimeError, match="grads must hold"):
        torch.ops.fastshift.shuffle_regroup_backward([z(2, 2, 2, 2)], [1, 0, 0, 1], 2, [4], 2)
    with pytest.raises(ValueError, match="outside the sources"):
        reference.shuffle_regroup(a, b, [1, 0, 1, 3], 2)


@needs_c
def test_shuffle_cat_compile_parity():
    def f(a, b):
        out = torch.ops.fastshift.shuffle_cat(a, b)
        return (out[:, 4:] * 2 + out[:, :4]).sum(1)

    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, b), f(a, b))

    def g(a, b):
        lo, hi = torch.ops.fastshift.shuffle_cat_pair(a, b)
        return (hi * 2 + lo).sum(1)

    a.requires_grad_(True)
    compiled = torch.compile(g, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, b), g(a, b))
    torch.testing.assert_close(torch.autograd.grad(compiled(a, b).sum(), a),
                               torch.autograd.grad(g(a, b).sum(), a))

    def r(a, b):
        routes = [1, 0, 0, 1, 2, 1, 1, 2, 0, 0, 1]
        lo0, hi0, lo1, hi1 = torch.ops.fastshift.shuffle_regroup([a, b[:, :3]], [b, b.flip(1)],
                                                                 routes, 2)
        return (hi0 * 2 + lo0).sum(1), (lo1 - hi1).sum(1)

    compiled = torch.compile(r, backend="aot_eager", fullgraph=True)
    a2, b2 = torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 5, 4, 4)
    torch.testing.assert_close(compiled(a2, b2), r(a2, b2))
    torch.testing.assert_close(torch.autograd.grad(sum(t.sum() for t in compiled(a2, b2)), a2),
                               torch.autograd.grad(sum(t.sum() for t in r(a2, b2)), a2))


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_cat_errors_are_clear(device):
    z = torch.zeros
    with pytest.raises(RuntimeError, match="channel count of cat\\(a, b\\) must be even"):
        torch.ops.fastshift.shuffle_cat(z(1, 3, 2, 2, device=device), z(1, 2, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="agree in batch and spatial sizes"):
        torch.ops.fastshift.shuffle_cat(z(1, 2, 2, 2, device=device), z(1, 2, 3, 2, device=device))
    with pytest.raises(RuntimeError, match="must be 4-D"):
        torch.ops.fastshift.shuffle_cat(z(2, 2, 2, device=device), z(1, 2, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="split must be in"):
        torch.ops.fastshift.shuffle_cat_backward(z(1, 4, 2, 2, device=device), 5)
    with pytest.raises(ValueError, match="must be even"):
        reference.shuffle_cat(z(1, 3, 2, 2), z(1, 2, 2, 2))


def test_cuda_built_traces_under_compile():
    """resolve_backend asks cuda_built() for the 'cuda' backend inside compiled code: it must
    be a constant to dynamo, not an op call (an op returning an int breaks a fullgraph)."""
    f = torch.compile(lambda x: x + 1 if ops.cuda_built() else x - 1, backend="eager",
                      fullgraph=True)
    x = torch.zeros(2)
    torch.testing.assert_close(f(x), x + 1 if ops.cuda_built() else x - 1)


def test_cuda_auto_backend_rule():
    """auto's choice on a GPU: the CUDA bodies only where the build carries code for it."""
    assert ops.cuda_auto_backend((9, 0), (90,)) == "cuda"
    assert ops.cuda_auto_backend((8, 0), (90,)) == "reference"  # built for Hopper only
    assert ops.cuda_auto_backend((9, 0), (80, 1086)) == "cuda"  # PTX of an older GPU
    assert ops.cuda_auto_backend((8, 0), (1086,)) == "reference"  # PTX of a newer one
    assert ops.cuda_auto_backend((9, 0), ()) == "reference"  # no CUDA bodies
    assert ops.cuda_auto_backend(None, (90,)) == "reference"  # capability unknown


def test_auto_on_cuda_weighs_the_workload(monkeypatch):
    """auto on CUDA: the CUDA bodies only for workloads as large as those measured faster than
    cuDNN (block / op input rows, or a whole network's image rows); CPU and explicit backends
    ignore the size. A GPU the bodies were built for is stood in for by auto's per-device
    cache (no GPU here)."""
    monkeypatch.setitem(ops._AUTO_CUDA, None, "cuda")
    cuda = torch.device("cuda")
    big = "cuda" if ops.cuda_built() else "reference"
    assert ops.resolve_backend("auto", cuda) == big
    assert ops.resolve_backend("auto", cuda, rows=ops.AUTO_CUDA_MIN_ROWS) == big
    assert ops.resolve_backend("auto", cuda, rows=ops.AUTO_CUDA_MIN_ROWS - 1) == "reference"
    # a whole network: 150 images of 224x224 (measured 1.19x) yes, 64 images of 32x32 no
    net = ops.AUTO_CUDA_MIN_NETWORK_ROWS
    assert ops.resolve_backend("auto", cuda, 150 * 224 * 224, net) == big
    assert ops.resolve_backend("auto", cuda, 64 * 32 * 32, net) == "reference"
    if ops.cuda_built():
        assert ops.resolve_backend("cuda", cuda, rows=1) == "cuda"
    assert ops.resolve_backend("auto", torch.device("cpu"), rows=1) == (
        "cpu" if ops.HAVE_C else "reference")


def test_auto_on_cuda_traces_under_compile():
    """resolve_backend's auto on a CUDA device is a constant for torch.compile (fullgraph)."""
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return x + 1 if ops.resolve_backend("auto", torch.device("cuda")) == "cuda" else x - 1

    x = torch.zeros(2)
    expected = ops.resolve_backend("auto", torch.device("cuda"))
    torch.testing.assert_close(f(x), x + 1 if expected == "cuda" else x - 1)


def test_backend_choice(monkeypatch):
    assert ops.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown fastshift backend 'fast'"):
        ops.resolve_backend("fast", torch.device("cpu"))
    monkeypatch.setenv("FASTSHIFT_BACKEND", "reference")
    assert ops.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTSHIFT_BACKEND", "auto")
    assert ops.resolve_backend(None, torch.device("cpu")) == ("cpu" if ops.HAVE_C else "reference")
    # on CUDA, auto is the CUDA bodies on a GPU they were compiled for (measured faster than
    # cuDNN end to end, README "GPU"), else PyTorch's path; never Triton
    expected = "reference"
    if torch.cuda.is_available():
        expected = ops.cuda_auto_backend(torch.cuda.get_device_capability())
    assert ops.resolve_backend(None, torch.device("cuda")) == expected
    if ops.cuda_built():
        with pytest.raises(ValueError, match="cannot run tensors on device 'cpu'"):
            ops.resolve_backend("cuda", torch.device("cpu"))
    else:
        with pytest.raises(RuntimeError, match="'cuda' was not built"):
            ops.resolve_backend("cuda", torch.device("cpu"))


# ---- linear (the classifier; CPU body only) ----------------------------------------------------

LINEAR_SHAPES = [(64, 1024, 1000), (37, 33, 19), (1, 7, 3), (0, 5, 4), (17, 1, 2)]


@needs_c
@pytest.mark.parametrize("b,c,o", LINEAR_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_linear_matches_reference(b, c, o, layout):
    """Values and both gradients against nn.functional.linear: float64 to 1e-12; float32 no
    further from the float64 truth than twice PyTorch's own float32 error (plus a few ulp)."""
    gen = torch.Generator().manual_seed(b * 1000 + c)
    x64 = torch.randn(b, c, generator=gen, dtype=torch.float64)
    w64 = torch.randn(o, c, generator=gen, dtype=torch.float64)
    g64 = torch.randn(b, o, generator=gen, dtype=torch.float64)
    truth = [t.detach() for t in _linear_run(reference.linear, x64, w64, g64)]
    for dtype in (torch.float64, torch.float32):
        x, w, g = (t.to(dtype) for t in (x64, w64, g64))
        if layout == "strided":  # x and w as views with a row stride
            x = torch.cat((x, x), 1)[:, :c]
            w = torch.cat((w, w), 1)[:, c:]
        ours = _linear_run(ops.linear, x, w, g, backend="cpu")
        theirs = _linear_run(reference.linear, x, w, g)
        for a, t, r in zip(ours, truth, theirs):
            assert a.dtype == dtype and a.shape == t.shape
            if dtype == torch.float64:
                torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12)
            elif t.numel():
                err, ref_err = (a.double() - t).abs().max(), (r.double() - t).abs().max()
                assert err <= 2 * ref_err + 8 * 2.0 ** -23 * t.abs().max(), (err, ref_err)


def _linear_run(fn, x, w, g, **kw):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = fn(x, w, **kw)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@needs_c
def test_linear_values_do_not_depend_on_the_threads():
    """The products split their work by shape only: the same bits on one thread and on two."""
    x, w, g = torch.randn(64, 1024), torch.randn(1000, 1024), torch.randn(64, 1000)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((torch.ops.fastshift.linear(x, w),
                         *torch.ops.fastshift.linear_backward(g, x, w)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_c
def test_linear_gradcheck_opcheck_compile():
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(5, 7, **kw), torch.randn(3, 7, **kw)
    assert torch.autograd.gradcheck(torch.ops.fastshift.linear, (x, w))
    torch.library.opcheck(torch.ops.fastshift.linear.default, (x, w))
    torch.library.opcheck(torch.ops.fastshift.linear_backward.default,
                          (torch.randn(5, 3, dtype=torch.float64), x.detach(), w.detach()))

    def f(x, w):
        return torch.ops.fastshift.linear(x, w).relu().sum(1)

    x32, w32 = torch.randn(6, 20), torch.randn(9, 20)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x32, w32), f(x32, w32), rtol=0, atol=0)


@needs_c
def test_linear_errors_are_clear():
    z = torch.zeros
    with pytest.raises(RuntimeError, match="linear: x must be 2-D"):
        torch.ops.fastshift.linear(z(2, 3, 4), z(5, 3))
    with pytest.raises(RuntimeError, match=r"weight must be \[O, 3\] for x of 3 features"):
        torch.ops.fastshift.linear(z(2, 3), z(5, 4))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        torch.ops.fastshift.linear(z(2, 3), z(5, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        torch.ops.fastshift.linear(z(2, 3, dtype=torch.int64), z(5, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"grad_y must be \[2, 5\]"):
        torch.ops.fastshift.linear_backward(z(2, 4), z(2, 3), z(5, 3))


def test_linear_runs_pytorch_off_the_cpu_backend():
    """The reference backend, and dtypes the op has no body for, run nn.functional.linear."""
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    assert torch.equal(ops.linear(x, w, backend="reference"), reference.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(ops.linear(xb, wb, backend="cpu"), reference.linear(xb, wb))
