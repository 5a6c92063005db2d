"""Fused block ops (dwconv_bn, pwconv_bn_relu, conv_bn_chain) against ops.reference: values, running
statistics and gradients over backend x dtype x shape x mode, gradcheck in float64, opcheck,
torch.compile parity, argument errors, and the fused supernet / engine paths against the
reference backend."""

import copy
import functools

import pytest
import torch

import fastshift
from fastshift import ops

needs_c = pytest.mark.skipif(not ops.HAVE_C, reason=f"fastshift._C not built: {ops.BUILD_ERROR}")

# (backend, device) pairs usable here; the Triton backend runs on CPU tensors in the interpreter
PAIRS = [("cpu", "cpu")]
if torch.cuda.is_available() and ops.cuda_built():
    PAIRS.append(("cuda", "cuda"))
if "triton" in ops.BACKENDS and ops.triton_usable("cpu"):
    PAIRS.append(("triton", "cpu"))
if "triton" in ops.BACKENDS and torch.cuda.is_available() and ops.triton_usable("cuda"):
    PAIRS.append(("triton", "cuda"))

# one tolerance table: max |error| allowed relative to max(1, max |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (rows, channels, height, width, kernel, stride, groups)
# (59 channels: every channel block of the CPU kernels at 64-byte vectors, float and double:
# two vectors, one, a 32-byte vector, single channels)
DW_SHAPES = [(4, 8, 8, 8, 3, 1, 2), (3, 5, 7, 9, 5, 2, 1), (6, 19, 5, 6, 7, 1, 3),
             (1, 3, 4, 4, 3, 1, 1), (0, 4, 4, 4, 3, 1, 1), (2, 33, 1, 1, 7, 1, 1),
             (4, 16, 3, 3, 7, 2, 2), (2, 40, 9, 9, 3, 2, 1), (2, 59, 3, 4, 5, 1, 1)]
# (rows, in channels, out channels, height, width, groups)
# (13 -> 19 channels: whole 8 x 8 blocks and both tails of the CPU body's weight transpose)
PW_SHAPES = [(4, 8, 6, 4, 4, 2), (3, 5, 11, 7, 3, 1), (1, 3, 3, 1, 1, 1), (0, 4, 4, 2, 2, 1),
             (6, 40, 24, 2, 5, 3), (2, 13, 19, 3, 2, 1)]


def _dtypes(device):
    return [torch.float32, torch.float64] + (list(LOW_PRECISION) if device == "cuda" else [])


# The Triton interpreter (CPU) costs seconds per call: there, the two largest shapes are left out
# and the layout variants run on the first shape only (CUDA runs everything).
INTERPRETED_SKIP = {(6, 19, 5, 6, 7, 1, 3), (2, 40, 9, 9, 3, 2, 1), (2, 59, 3, 4, 5, 1, 1),
                    (6, 40, 24, 2, 5, 3), (2, 13, 19, 3, 2, 1)}


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _skip_interpreted_layout(backend, device, shape, shapes, layout):
    if _interpreted(backend, device) and layout != "channels_last" and shape != shapes[0]:
        pytest.skip("interpreted Triton: layout variants run on the first shape only")


def _cases(shapes):
    for backend, device in PAIRS:
        for dtype in _dtypes(device):
            for shape in shapes:
                if _interpreted(backend, device) and shape in INTERPRETED_SKIP:
                    continue
                name = str(dtype).removeprefix("torch.")
                yield pytest.param(backend, device, dtype, shape,
                                   id=f"{backend}-{device}-{name}-{'x'.join(map(str, shape))}")


def _input(shape, dtype, device, layout):
    """An input of that layout in dtype on device (drawn in float64 and converted first, so the
    conversion cannot make a strided layout dense)."""
    r, c, h, w = shape
    if layout == "noncontiguous":  # every other channel of a wider tensor
        x = torch.randn(r, 2 * c, h, w, dtype=torch.float64).to(device, dtype)[:, 1::2]
    elif layout == "channel_range":  # second half of a split-ready (shuffle_cat) tensor
        x = torch.randn(r, 2 * c + 1, h, w, dtype=torch.float64).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)[:, c + 1:]
    else:
        x = torch.randn(r, c, h, w, dtype=torch.float64).to(device, dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def _assert_close(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _run(op, backend, x, weight, stats, extra, training, grad_out=None):
    mean, var = (s.clone() for s in stats)
    x = x.detach().requires_grad_(True)  # keeps x's layout (a clone would make a view dense)
    weight = weight.detach().clone().requires_grad_(True)
    y = op(x, weight, *extra, mean, var, groups=stats[0].shape[0], training=training,
           backend=backend)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(y, (x, weight), grad_out)
    return y, mean, var, grads


def _check_against_reference(op, backend, x, weight, extra, groups, dtype, device, training,
                             grad_layout="dense"):
    channels = weight.shape[0]
    stats = (torch.randn(groups, channels, dtype=dtype, device=device),
             torch.rand(groups, channels, dtype=dtype, device=device) + 0.5)
    ref = _run(op, "reference", x, weight, stats, extra, training)
    g = torch.randn_like(ref[0])
    if grad_layout == "channel_range":  # as a concat's backward hands it to a branch's last layer
        r, o, h, w = g.shape
        wide = torch.zeros(r, 2 * o + 1, h, w, dtype=dtype, device=device)
        wide = wide.contiguous(memory_format=torch.channels_last)
        wide[:, o + 1:] = g
        g = wide[:, o + 1:]
        assert not g.is_contiguous(memory_format=torch.channels_last) or g.numel() <= o
    y_ref, m_ref, v_ref, (gx_ref, gw_ref) = _run(op, "reference", x, weight, stats, extra,
                                                 training, g)
    y, m, v, (gx, gw) = _run(op, backend, x, weight, stats, extra, training, g)
    _assert_close(y, y_ref, dtype, "output")
    _assert_close(m, m_ref, dtype, "running_mean")
    _assert_close(v, v_ref, dtype, "running_var")
    _assert_close(gx, gx_ref, dtype, "grad x")
    _assert_close(gw, gw_ref, dtype, "grad weight")


@needs_c
@pytest.mark.parametrize("backend,device,dtype,shape", list(_cases(DW_SHAPES)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous",
                                    "channel_range"])
def test_dwconv_bn_matches_reference(backend, device, dtype, shape, training, layout):
    if dtype in LOW_PRECISION:
        pytest.skip("float16/bfloat16 are checked against float64 by test_low_precision_error")
    _skip_interpreted_layout(backend, device, shape, DW_SHAPES, layout)
    r, c, h, w, k, stride, groups = shape
    torch.manual_seed(0)
    x = _input((r, c, h, w), dtype, device, layout)
    weight = torch.randn(c, 1, k, k, dtype=dtype, device=device)
    _check_against_reference(ops.dwconv_bn, backend, x, weight, (stride,), groups, dtype,
                             device, training)


@needs_c
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if not _interpreted(*p)])
@pytest.mark.parametrize("k,stride", [(1, 2), (3, 2), (5, 2), (7, 2), (3, 1), (5, 1), (7, 1)])
def test_dwconv_bn_every_small_map(backend, device, k, stride):
    """Every map size from 1x1 to 8x8 at stride 2 (6x6 at stride 1; even and odd, wider and
    taller than the kernel). Stride 2: the input gradient of the CPU body works phase by phase
    (the four parities of the input pixels), whose sub-kernels and borders depend on k, the
    map size and its parity. Both strides: where most taps fall on the zero border (4x4 with
    5x5 or 7x7 kernels, 2x2, 3x3) the CPU body's forward (and stride-1 input gradient) take
    only the taps inside the image, elsewhere the zero-bordered copy."""
    torch.manual_seed(k * 10 + stride)
    size = 8 if stride == 2 else 6
    for h in range(1, size + 1):
        for w in range(1, size + 1):
            x = _input((2, 9, h, w), torch.float64, device, "channels_last")
            weight = torch.randn(9, 1, k, k, dtype=torch.float64, device=device)
            for training in (True, False):
                _check_against_reference(ops.dwconv_bn, backend, x, weight, (stride,), 1,
                                         torch.float64, device, training)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,stride", [(7, 1), (5, 1), (3, 1), (7, 2), (5, 2)])
def test_cpu_dwconv_small_map_equals_its_zero_bordered_form(dtype, k, stride):
    """The CPU body's small-map form (only the taps inside the image) against the padded form
    on the same image set in a zero border wide enough for the padded form to run: the
    outputs over the image (eval: fixed statistics) and, at stride 1, the input gradient for
    an output gradient that is zero outside them, are equal bit for bit (the skipped taps
    multiply zeros into the same sums in the same order)."""
    torch.manual_seed(k * 10 + stride)
    b, c, n = 3, 37, 4  # a 4x4 map: 37 channels meet every channel block of the kernels
    pad = 2 * (k // 2) * stride  # wide border, even for the stride's phase
    x = torch.randn(b, c, n, n, dtype=dtype).contiguous(memory_format=torch.channels_last)
    big = torch.zeros(b, c, n + 2 * pad, n + 2 * pad, dtype=dtype)
    big[:, :, pad:pad + n, pad:pad + n] = x
    big = big.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, dtype=dtype)
    mean, var = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    x.requires_grad_(True)
    big.requires_grad_(True)
    y = ops.dwconv_bn(x, weight, stride, mean, var, training=False, backend="cpu")
    y_big = ops.dwconv_bn(big, weight, stride, mean, var, training=False, backend="cpu")
    o = pad // stride
    inner = y_big[:, :, o:o + y.shape[2], o:o + y.shape[3]]
    assert torch.equal(y, inner)
    if stride == 1:
        g = torch.randn_like(y)
        g_big = torch.zeros_like(y_big)
        g_big[:, :, o:o + y.shape[2], o:o + y.shape[3]] = g
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_big,) = torch.autograd.grad(y_big, big, g_big)
        assert torch.equal(gx, gx_big[:, :, pad:pad + n, pad:pad + n])


@needs_c
@pytest.mark.parametrize("backend,device,dtype,shape", list(_cases(PW_SHAPES)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous",
                                    "channel_range"])
def test_pwconv_bn_relu_matches_reference(backend, device, dtype, shape, training, layout):
    if dtype in LOW_PRECISION:
        pytest.skip("float16/bfloat16 are checked against float64 by test_low_precision_error")
    _skip_interpreted_layout(backend, device, shape, PW_SHAPES, layout)
    r, c, o, h, w, groups = shape
    torch.manual_seed(0)
    x = _input((r, c, h, w), dtype, device, layout)
    weight = torch.randn(o, c, 1, 1, dtype=dtype, device=device)
    _check_against_reference(ops.pwconv_bn_relu, backend, x, weight, (), groups, dtype, device,
                             training)


@needs_c
@pytest.mark.parametrize("backend,device,dtype,shape", list(_cases(PW_SHAPES)))
@pytest.mark.parametrize("training", [True, False])
def test_pwconv_bn_relu_output_grad_as_channel_range(backend, device, dtype, shape, training):
    """The output gradient as a channel range of a wider channels-last tensor, as the concat
    of a unit's backward hands it to a branch's last 1x1 layer (the CUDA body reads it in place
    at its pixel stride), with the input a channel range too: same gradients as the
    reference."""
    if dtype in LOW_PRECISION:
        pytest.skip("float16/bfloat16 are checked against float64 by test_low_precision_error")
    _skip_interpreted_layout(backend, device, shape, PW_SHAPES, "channel_range")
    r, c, o, h, w, groups = shape
    torch.manual_seed(0)
    x = _input((r, c, h, w), dtype, device, "channel_range")
    weight = torch.randn(o, c, 1, 1, dtype=dtype, device=device)
    _check_against_reference(ops.pwconv_bn_relu, backend, x, weight, (), groups, dtype, device,
                             training, grad_layout="channel_range")


@needs_c
@pytest.mark.skipif(("cuda", "cuda") not in PAIRS, reason="needs a GPU and the CUDA bodies")
def test_cuda_pwconv_follows_the_cudnn_tf32_flag():
    """The CUDA body's float32 1x1 products run in TF32 exactly while
    torch.backends.cudnn.allow_tf32 is on (PyTorch's default; the tests turn it off), as the
    1x1 conv they replace does in cuDNN: off, the errors against float64 (output, grad x, grad
    weight) are float32's; on, TF32's; with torch's per-operation settings (conv and RNN
    apart) the conv one decides, without an error. Eval mode with the running mean far below
    every output, so no ReLU mask differs between the precisions (a pixel whose normalised
    value is within TF32's error of 0 flips its mask, and its whole row of the input gradient
    with it: an error of about 7 % of the largest gradient, measured on an H200 in training
    mode); the input is a channel range, so the products read rows at their pixel stride."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device="cuda")
    wide = torch.randn(8, 300, 9, 9, **kw)
    w64 = torch.randn(96, 256, 1, 1, **kw) / 16
    g64 = torch.randn(8, 96, 9, 9, **kw)
    shift = 50.0
    mean, var = torch.full((96,), -shift, **kw), torch.ones(96, **kw)

    def run(backend, dtype):
        x = wide.to(dtype).contiguous(memory_format=torch.channels_last)[:, 44:].requires_grad_()
        w = w64.to(dtype).requires_grad_()
        y = ops.pwconv_bn_relu(x, w, mean.to(dtype), var.to(dtype), training=False,
                               backend=backend)
        gx, gw = torch.autograd.grad(y, (x, w), g64.to(dtype))
        return [t.double() for t in (y - shift, gx, gw)]

    want = run("reference", torch.float64)
    assert want[0].min().item() > -shift / 2  # every ReLU passes

    cudnn = torch.backends.cudnn
    per_op = hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision")

    def errors(conv_tf32, rnn_tf32=None):
        """The errors with cuDNN's TF32 flag set (rnn_tf32 None), or its conv and RNN settings
        apart (torch's per-operation API: the conv one must decide)."""
        old = (cudnn.allow_tf32,
               *((cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) if per_op else ()))
        if rnn_tf32 is None:
            cudnn.allow_tf32 = conv_tf32
        else:
            cudnn.conv.fp32_precision = "tf32" if conv_tf32 else "ieee"
            cudnn.rnn.fp32_precision = "tf32" if rnn_tf32 else "ieee"
        try:
            got = run("cuda", torch.float32)
        finally:
            # the flag first (it sets the per-operation settings), then those exactly:
            # restoring only the per-operation ones after the flag was set leaves the flag
            # apart from them, and reading it then raises (torch 2.14.1, checked on CPU)
            cudnn.allow_tf32 = old[0]
            if per_op:
                cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = old[1:]
        return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]

    start = cudnn.allow_tf32
    off = errors(False)
    cases = {"off": (False, off), "on": (True, errors(True))}  # case: (TF32 expected, errors)
    if per_op:
        cases["conv off, rnn on"] = (False, errors(False, True))
        cases["conv on, rnn off"] = (True, errors(True, False))
    names = ("output", "grad x", "grad weight")
    for case, (tf32, errs) in cases.items():
        for name, e, e_off in zip(names, errs, off):
            if not tf32:
                assert e < 1e-4, f"{name}: float32 error {e:.3g} with TF32 {case}"
            else:
                assert 5 * e_off < e < 1e-2, f"{name}: error {e:.3g} with TF32 {case}"
    assert cudnn.allow_tf32 == start, "the test left cuDNN's TF32 setting changed"


@needs_c
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, device, training):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    # the interpreter is slow: gradcheck's fast mode (random projections of the Jacobian)
    fast = _interpreted(backend, device)
    x = torch.randn(4, 6, 5, 5, **kw, requires_grad=True)
    w_dw = torch.randn(6, 1, 3, 3, **kw, requires_grad=True)
    w_pw = torch.randn(5, 6, 1, 1, **kw, requires_grad=True)
    mean, var = torch.randn(2, 6, **kw), torch.rand(2, 6, **kw) + 0.5
    mean5, var5 = torch.randn(2, 5, **kw), torch.rand(2, 5, **kw) + 0.5

    def dw(x, w):  # fresh statistics every call: gradcheck evaluates many times
        return ops.dwconv_bn(x, w, 2, mean.clone(), var.clone(), groups=2, training=training,
                             backend=backend)

    def pw(x, w):
        return ops.pwconv_bn_relu(x, w, mean5.clone(), var5.clone(), groups=2,
                                  training=training, backend=backend)

    assert torch.autograd.gradcheck(dw, (x, w_dw), fast_mode=fast)
    assert torch.autograd.gradcheck(pw, (x, w_pw), fast_mode=fast)


def _op_samples(device, suffix=""):
    """(op, args) for every block op: forward in both modes, and the backward ops. ``suffix``
    picks the compiled ("") or the Triton ("_triton") schemas."""
    fs = torch.ops.fastshift
    dw, pw = getattr(fs, "dwconv_bn" + suffix), getattr(fs, "pwconv_bn_relu" + suffix)
    dw_back = getattr(fs, "dwconv_bn_backward" + suffix)
    pw_back = getattr(fs, "pwconv_bn_relu_backward" + suffix)
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 6, 5, 5, **kw).contiguous(memory_format=torch.channels_last)
    w_dw = torch.randn(6, 1, 3, 3, **kw)
    w_pw = torch.randn(5, 6, 1, 1, **kw)
    mean, var = torch.randn(2, 6, **kw), torch.rand(2, 6, **kw) + 0.5
    mean5, var5 = torch.randn(2, 5, **kw), torch.rand(2, 5, **kw) + 0.5
    samples = []
    for training in (True, False):
        samples.append((dw, (x.requires_grad_(True), w_dw.requires_grad_(True), mean, var, 2, 2,
                             1e-5, training)))
        samples.append((pw, (x, w_pw.requires_grad_(True), mean5, var5, 2, 1e-5, training)))
        y, _, var_b = dw(x.detach(), w_dw.detach(), mean, var, 2, 2, 1e-5, training)
        samples.append((dw_back, (torch.randn_like(y), x.detach(), w_dw.detach(), y, var_b, 2, 2,
                                  1e-5, training)))
        yp, xh, _, var_p = pw(x.detach(), w_pw.detach(), mean5, var5, 2, 1e-5, training)
        samples.append((pw_back, (torch.randn_like(yp), x.detach(), w_pw.detach(), yp, xh, var_p,
                                  2, 1e-5, training)))
    return samples


@needs_c
@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck(backend, device):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every op, the
    Triton schemas included (on CPU tensors under the interpreter)."""
    for op, args in _op_samples(device, "_triton" if backend == "triton" else ""):
        torch.library.opcheck(op, args)


@needs_c
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[0] != "triton"])
def test_autograd_runs_no_python(backend, device):
    """The ops' autograd is C++ (csrc/autograd.cpp): the backward of a unit through the
    compiled ops calls no Python function of fastshift or torch.library (the register_autograd
    formulas it replaced did, every call; the Triton family's bodies are Python launchers, so
    it is left out), and the values and gradients equal the reference backend's."""
    import os
    import sys

    from torch import _library as torch_library

    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    x0 = torch.randn(3, 8, 5, 5, **kw)
    weights0 = _chain_weights([0, 1, 0], 4, torch.float64, device)

    def run(name):
        x = x0.clone().requires_grad_(True)
        weights = [w.detach().clone().requires_grad_(True) for w in weights0]
        a, b = ops.channel_split(x, backend=name)
        b = ops.conv_bn_chain(b, weights, [0, 1, 0], [None] * 3, [None] * 3, training=True,
                              momentums=[0.1] * 3, backend=name)
        out = ops.shuffle_cat(a, b, backend=name)
        return out, [x, *weights]

    ref_out, ref_inputs = run("reference")
    grad = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad)
    out, inputs = run(backend)
    called = []

    def profiler(frame, event, arg):
        if event == "call":
            called.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profiler)
    try:
        grads = torch.autograd.grad(out, inputs, grad)
    finally:
        sys.setprofile(None)
    assert called, "the profiler saw no call at all (the check could not fail)"
    # by directory, not by name: a checkout (and its .venv) may sit in a folder named fastshift
    watched = tuple(os.path.dirname(m.__file__) + os.sep for m in (fastshift, torch_library))
    ours = [c for c in called if c.startswith(watched)]
    assert not ours, f"the backward ran Python: {ours[:5]}"
    assert "CppNode" in out.grad_fn.name()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@needs_c
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[0] != "triton"])
def test_torch_compile_parity(backend, device):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float32, device=device)
    x = torch.randn(4, 6, 6, 6, **kw).contiguous(memory_format=torch.channels_last)
    w_dw = torch.randn(6, 1, 5, 5, **kw, requires_grad=True)
    w_pw = torch.randn(8, 6, 1, 1, **kw, requires_grad=True)

    def block(x, w_dw, w_pw):
        mean, var = torch.zeros(2, 6, **kw), torch.ones(2, 6, **kw)
        h = ops.dwconv_bn(x, w_dw, 1, mean, var, groups=2, training=True, backend=backend)
        return ops.pwconv_bn_relu(h, w_pw, None, None, groups=2, training=True,
                                  backend=backend).square().sum()

    _assert_compile_parity(block, x, [w_dw, w_pw])

    def branch(x, *weights):  # conv_bn_chain: pointwise, depthwise, pointwise
        means = [torch.zeros(2, wt.shape[0], **kw) for wt in weights]
        vars_ = [torch.ones(2, wt.shape[0], **kw) for wt in weights]
        return ops.conv_bn_chain(x, list(weights), [0, 1, 0], means, vars_, groups=2,
                                 training=True, momentums=[0.1] * 3,
                                 backend=backend).square().sum()

    _assert_compile_parity(branch, x, [w.requires_grad_(True) for w in _chain_weights(
        [0, 1, 0], 6, torch.float32, device)])


def _assert_compile_parity(fn, x, params):
    """fn(x, *params) (a scalar) and its gradients with respect to params: eager against
    torch.compile (aot_eager, fullgraph)."""
    eager = fn(x, *params)
    g_eager = torch.autograd.grad(eager, params)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, *params)
    g_out = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16/bfloat16 run on CUDA only")
@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cuda"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error(backend, dtype):
    """The kernel's error against float64 is within 2x PyTorch's own (reference ops in dtype)."""
    torch.manual_seed(0)
    x64 = torch.randn(8, 32, 12, 12, dtype=torch.float64, device="cuda")
    w64 = torch.randn(32, 1, 5, 5, dtype=torch.float64, device="cuda")
    p64 = torch.randn(24, 32, 1, 1, dtype=torch.float64, device="cuda")

    def run(name, dt):
        h = ops.dwconv_bn(x64.to(dt), w64.to(dt), 1, None, None, groups=2, training=True,
                          backend=name)
        return ops.pwconv_bn_relu(h, p64.to(dt), None, None, groups=2, training=True,
                                  backend=name).double()

    exact = run("reference", torch.float64)
    torch_err = (run("reference", dtype) - exact).abs().max().item()
    ours = (run(backend, dtype) - exact).abs().max().item()
    assert ours <= 2 * torch_err + 1e-6, (ours, torch_err)


@needs_c
@pytest.mark.parametrize("backend,device", PAIRS)
def test_argument_errors_name_the_problem(backend, device):
    x = torch.randn(4, 6, 5, 5, device=device)
    w = torch.randn(6, 1, 3, 3, device=device)
    st = torch.zeros(6, device=device), torch.ones(6, device=device)
    with pytest.raises(RuntimeError, match=r"stride must be 1 or 2, got 3"):
        ops.dwconv_bn(x, w, 3, *st, training=True, backend=backend)
    with pytest.raises(RuntimeError, match=r"weight must be \[C, 1, k, k\] with C = 6"):
        ops.dwconv_bn(x, torch.randn(5, 1, 3, 3, device=device), 1, None, None, training=True,
                      backend=backend)
    with pytest.raises(RuntimeError, match=r"do not split into 3 equal groups"):
        ops.dwconv_bn(x, w, 1, None, None, groups=3, training=True, backend=backend)
    with pytest.raises(RuntimeError, match=r"weight must be \[O, C, 1, 1\] with C = 6"):
        ops.pwconv_bn_relu(x, torch.randn(4, 5, 1, 1, device=device), None, None,
                           training=True, backend=backend)
    with pytest.raises(RuntimeError, match=r"must be float32 or float64"):
        ops.dwconv_bn(x.long(), w.long(), 1, None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match=r"eval mode needs running_mean and running_var"):
        ops.pwconv_bn_relu(x, torch.randn(4, 6, 1, 1, device=device), None, None,
                           training=False, backend=backend)


# conv_bn_chain: (layers, rows, in channels, height, width, groups); layer codes as the op's
# (0 pointwise, 1/2 depthwise stride), channel counts and kernels from _chain_weights
CHAINS = [((0, 2, 0), 4, 6, 9, 7, 2), ((1, 0, 1, 0, 1, 0), 3, 5, 5, 6, 1), ((2, 0), 6, 8, 4, 4, 3),
          ((0,), 2, 5, 3, 3, 1), ((2, 0, 1), 0, 4, 4, 4, 1), ((0, 2, 0), 1, 3, 3, 2, 1),
          ((2, 1, 0), 2, 4, 3, 3, 1), ((0, 0, 1), 3, 4, 5, 5, 1)]


def _chain_weights(layers, c, dtype, device):
    """Weights of a chain starting at c channels: pointwise layers widen to c + 3, depthwise
    kernels cycle 7, 3, 5 by position (7 or 5 on a map of 1 to 3 pixels exercises the tap
    crop of ops.dwconv_bn)."""
    weights, kernels = [], [7, 3, 5]
    for i, kind in enumerate(layers):
        if kind == 0:
            weights.append(torch.randn(c + 3, c, 1, 1, dtype=dtype, device=device))
            c += 3
        else:
            k = kernels[i % 3]
            weights.append(torch.randn(c, 1, k, k, dtype=dtype, device=device))
    return weights


def _chain_cases():
    for backend, device in PAIRS:
        for dtype in _dtypes(device):
            if _interpreted(backend, device) and dtype != torch.float64:
                continue
            for case in CHAINS:
                if _interpreted(backend, device) and case is not CHAINS[0]:
                    continue
                name = str(dtype).removeprefix("torch.")
                yield pytest.param(backend, device, dtype, case,
                                   id=f"{backend}-{device}-{name}-{''.join(map(str, case[0]))}")


def _run_chain(backend, x, weights, layers, stats, training, grad_out=None):
    means, vars_ = [m.clone() for m in stats[0]], [v.clone() for v in stats[1]]
    x = x.detach().requires_grad_(True)  # keeps x's layout, as in _run
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    y = ops.conv_bn_chain(x, weights, layers, means, vars_, groups=stats[0][0].shape[0],
                          training=training, momentums=[0.1 * (i + 1) for i in range(len(layers))],
                          backend=backend)
    grads = torch.autograd.grad(y, [x] + weights, grad_out) if grad_out is not None else None
    return y, means, vars_, grads


@needs_c
@pytest.mark.parametrize("backend,device,dtype,case", list(_chain_cases()))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channel_range"])
def test_conv_bn_chain_matches_reference(backend, device, dtype, case, training, layout):
    """conv_bn_chain equals the reference chain (the layer ops in turn): output, every layer's
    running statistics, and the gradients of x and every weight."""
    if dtype in LOW_PRECISION:
        pytest.skip("low precision: test_low_precision_error")
    layers, rows, c, h, w, groups = case
    torch.manual_seed(0)
    x = _input((rows, c, h, w), dtype, device, layout)
    weights = _chain_weights(layers, c, dtype, device)
    stats = ([torch.randn(groups, wt.shape[0], dtype=dtype, device=device) for wt in weights],
             [torch.rand(groups, wt.shape[0], dtype=dtype, device=device) + 0.5
              for wt in weights])
    y_ref = _run_chain("reference", x, weights, layers, stats, training)[0]
    g = torch.randn_like(y_ref)
    y_ref, m_ref, v_ref, grads_ref = _run_chain("reference", x, weights, layers, stats, training,
                                                g)
    y, m, v, grads = _run_chain(backend, x, weights, layers, stats, training, g)
    _assert_close(y, y_ref, dtype, "output")
    for i in range(len(layers)):
        _assert_close(m[i], m_ref[i], dtype, f"running_mean {i}")
        _assert_close(v[i], v_ref[i], dtype, f"running_var {i}")
    _assert_close(grads[0], grads_ref[0], dtype, "grad x")
    for i in range(len(layers)):
        _assert_close(grads[i + 1], grads_ref[i + 1], dtype, f"grad weight {i}")


# conv_bn_chain_eval: CHAINS and batches that make chunks of several images (every chunk
# shape of product_chunks: 1-2 images of 16x16, a dozen of 2x2, groups)
EVAL_CHAINS = CHAINS + [((0, 1, 0), 70, 16, 16, 16, 1), ((0, 1, 0), 50, 20, 2, 2, 1),
                        ((1, 0, 1, 0, 1, 0), 40, 12, 4, 4, 2), ((2, 0), 9, 8, 5, 5, 3)]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", EVAL_CHAINS,
                         ids=lambda c: f"{''.join(map(str, c[0]))}-{c[1]}-{c[3]}")
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channel_range"])
def test_cpu_eval_chain_without_autograd_equals_the_chain(dtype, case, layout):
    """In eval under no_grad or inference_mode, ops.conv_bn_chain on the cpu backend runs
    conv_bn_chain_eval (the layers chunk by chunk of images, intermediates in cache): the same
    output bit for bit as the chain that keeps its saved tensors, channels-last, and the
    running statistics left as they were."""
    layers, rows, c, h, w, groups = case
    torch.manual_seed(1)
    x = _input((rows, c, h, w), dtype, "cpu", layout)
    weights = _chain_weights(layers, c, dtype, "cpu")
    means = [torch.randn(groups, wt.shape[0], dtype=dtype) for wt in weights]
    vars_ = [torch.rand(groups, wt.shape[0], dtype=dtype) + 0.5 for wt in weights]
    before = [t.clone() for t in means + vars_]

    def run():
        return ops.conv_bn_chain(x, weights, layers, means, vars_, groups=groups, training=False,
                                 momentums=[0.1] * len(layers), backend="cpu")

    want = run()  # grad mode on: conv_bn_chain, with its saved tensors
    with torch.no_grad():
        got = run()
    with torch.inference_mode():
        got_inference = run()
    for y in (got, got_inference):
        assert torch.equal(y, want)
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(before, means + vars_))
    # shuffle_with: the unit's split-ready output, shuffle_cat(a, y), written from the chunks
    # (a: the other half, of either parity: the odd channel counts take the kernel's tmp path)
    _, c_out, h_out, w_out = want.shape
    a = _input((rows, c_out + 2, h_out, w_out), dtype, "cpu", layout)
    with torch.no_grad():
        shuffled = ops.conv_bn_chain(x, weights, layers, means, vars_, groups=groups,
                                     training=False, momentums=[0.1] * len(layers),
                                     backend="cpu", shuffle_with=a)
    assert torch.equal(shuffled, ops.shuffle_cat(a, want, backend="cpu"))
    assert shuffled.is_contiguous(memory_format=torch.channels_last)


@needs_c
def test_cpu_eval_chain_opcheck_and_errors():
    """conv_bn_chain_eval passes opcheck, and with gradients wanted refuses by name instead of
    returning an output without a graph."""
    torch.manual_seed(0)
    layers = [1, 0, 2, 0]
    weights = _chain_weights(layers, 4, torch.float64, "cpu")
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    total = sum(wt.shape[0] for wt in weights)
    mean = torch.randn(2, total, dtype=torch.float64)
    var = torch.rand(2, total, dtype=torch.float64) + 0.5
    op = torch.ops.fastshift.conv_bn_chain_eval.default
    torch.library.opcheck(op, (x, weights, layers, mean, var, 2, 1e-5))
    want = torch.ops.fastshift.conv_bn_chain.default(x, weights, layers, mean, var, 2, 1e-5,
                                                     False)[0]
    assert torch.equal(op(x, weights, layers, mean, var, 2, 1e-5), want)
    wanting = [wt.clone().requires_grad_(True) for wt in weights]
    with pytest.raises(RuntimeError, match="conv_bn_chain_eval is not differentiable"):
        op(x, wanting, layers, mean, var, 2, 1e-5)
    with torch.no_grad():
        assert torch.equal(op(x, wanting, layers, mean, var, 2, 1e-5), want)
    with pytest.raises(RuntimeError, match="conv_bn_chain_eval: one weight per layer"):
        op(x, weights[:2], layers, mean, var, 2, 1e-5)
    with pytest.raises(RuntimeError, match=r"mean must be \[groups, sum of the layers. channels\]"):
        op(x, weights, layers, mean[:, 1:], var, 2, 1e-5)
    a = torch.randn(4, 6, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(op, (x, weights, layers, mean, var, 2, 1e-5, a))
    assert torch.equal(op(x, weights, layers, mean, var, 2, 1e-5, a),
                       torch.ops.fastshift.shuffle_cat.default(a, want))
    with pytest.raises(RuntimeError, match="shuffle_with must be"):
        op(x, weights, layers, mean, var, 2, 1e-5, a[:, :, :2])
    with pytest.raises(RuntimeError, match="needs an even channel count"):
        op(x, weights, layers, mean, var, 2, 1e-5, a[:, 1:])


@needs_c
@pytest.mark.parametrize("layers", [(0, 2, 0), (0, 1, 0), (1, 0, 1, 0)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (1, 4, 1, 1), (3, 6, 1, 4), (4, 8, 5, 1)])
def test_cpu_chain_reads_a_channel_range_as_its_dense_copy(layers, training, shape):
    """A channel range of a channels-last tensor (the main half of a split-ready ShuffleNetV2
    input), which the CPU bodies of a first 1x1 or depthwise layer read in place at its pixel
    stride, gives bit for bit what its dense copy gives: the chain's and the 1x1 layer op's
    output, running statistics and gradients (x and weights), including maps with a single
    row or column; so does an output gradient given as a channel range (what a concat's
    backward hands a branch), which the chain's last 1x1 layer reads in place."""
    r, c, h, w = shape
    torch.manual_seed(0)
    wide = torch.randn(r, 2 * c + 3, h, w).contiguous(memory_format=torch.channels_last)
    strided = wide[:, c + 3:]
    dense = strided.contiguous(memory_format=torch.channels_last)
    weights = [v * 0.3 for v in _chain_weights(list(layers), c, torch.float32, "cpu")]
    stats = ([torch.randn(1, v.shape[0]) for v in weights],
             [torch.rand(1, v.shape[0]) + 0.5 for v in weights])

    def run(x, ranged=False):  # (_run_chain and _run keep x's strides)
        y = _run_chain("cpu", x, weights, layers, stats, training)[0]
        g = torch.linspace(-1, 1, y.numel()).view_as(y)
        if ranged:  # the same values as a channel range of a wider channels-last tensor
            n, c_out, h_out, w_out = y.shape
            wide_g = torch.zeros(n, c_out + 5, h_out, w_out).contiguous(
                memory_format=torch.channels_last)
            wide_g[:, 5:] = g
            g = wide_g[:, 5:]
        y, means, vars_, grads = _run_chain("cpu", x, weights, layers, stats, training, g)
        return [y, *means, *vars_, *grads]

    def run_layer(x):
        g = torch.linspace(-1, 1, r * weights[0].shape[0] * h * w).view(r, -1, h, w)
        y, mean, var, grads = _run(ops.pwconv_bn_relu, "cpu", x, weights[0],
                                   (stats[0][0], stats[1][0]), (), training, g)
        return [y, mean, var, *grads]

    assert strided.stride(1) == 1
    if r * h * w > 1:  # (a single pixel's channel range is dense)
        assert not strided.is_contiguous(memory_format=torch.channels_last)
    same = functools.partial(torch.testing.assert_close, rtol=0, atol=0, equal_nan=True)
    for got, want in zip(run(strided), run(dense)):
        same(got, want)
    for got, want in zip(run(strided, ranged=True), run(dense)):
        same(got, want)
    if layers[0] == 0:
        for got, want in zip(run_layer(strided), run_layer(dense)):
            same(got, want)


@needs_c
@pytest.mark.parametrize("backend,device", PAIRS)
def test_conv_bn_chain_gradcheck_opcheck(backend, device):
    """float64 gradcheck of the chain (x and every weight), opcheck of its forward and
    backward schemas in both modes."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    layers = [0, 2, 0] if _interpreted(backend, device) else [1, 0, 2, 0]
    weights = _chain_weights(layers, 4, torch.float64, device)
    x = torch.randn(4, 4, 5, 5, **kw)
    stats = [(torch.randn(2, wt.shape[0], **kw), torch.rand(2, wt.shape[0], **kw) + 0.5)
             for wt in weights]
    for training in (True, False):
        def chain(x, *weights, training=training):  # fresh statistics every call
            return ops.conv_bn_chain(x, list(weights), layers, [m.clone() for m, _ in stats],
                                     [v.clone() for _, v in stats], groups=2,
                                     training=training, momentums=[0.1] * len(layers),
                                     backend=backend)

        args = [x.clone().requires_grad_(True)] + [wt.clone().requires_grad_(True)
                                                   for wt in weights]
        assert torch.autograd.gradcheck(chain, args, fast_mode=_interpreted(backend, device))
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.fastshift, "conv_bn_chain" + suffix)
    bwd = getattr(torch.ops.fastshift, "conv_bn_chain_backward" + suffix)
    xc = x.contiguous(memory_format=torch.channels_last)
    means, vars_ = torch.cat([m for m, _ in stats], 1), torch.cat([v for _, v in stats], 1)
    for training in (True, False):
        args = (xc.clone().requires_grad_(True), [wt.clone().requires_grad_(True)
                                                  for wt in weights], layers, means, vars_, 2,
                1e-5, training)
        torch.library.opcheck(fwd, args)
        y, saved, _, var_b = fwd(xc, weights, layers, means, vars_, 2, 1e-5, training)
        torch.library.opcheck(bwd, (torch.randn_like(y), xc, weights, layers, y, saved, var_b,
                                    2, 1e-5, training))


@needs_c
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", [((0, 2, 0), 16, 9, 1), ((2, 0, 1, 0, 1, 0), 12, 7, 2),
                                  ((0, 1), 8, 6, 1)])
def test_cpu_chain_is_the_layer_ops_bit_for_bit(case, training):
    """The CPU chain body (lazy BatchNorm: raw 1x1 outputs normalised while the depthwise layer
    reads them) does the layer ops' arithmetic: float32 output, running statistics and every
    gradient equal calling ``pwconv_bn_relu`` / ``dwconv_bn`` in turn, bit for bit."""
    layers, c, h, groups = case
    torch.manual_seed(0)
    x = torch.randn(4 * groups, c, h, h).contiguous(memory_format=torch.channels_last)
    weights = [w * 0.3 for w in _chain_weights(layers, c, torch.float32, "cpu")]
    stats = [(torch.randn(groups, w.shape[0]), torch.rand(groups, w.shape[0]) + 0.5)
             for w in weights]

    def run(chain):
        xx = x.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in weights]
        means, vars_ = [m.clone() for m, _ in stats], [v.clone() for _, v in stats]
        kw = dict(groups=groups, training=training, backend="cpu")
        if chain:
            y = ops.conv_bn_chain(xx, ws, list(layers), means, vars_,
                                  momentums=[0.1] * len(layers), **kw)
        else:
            y = xx
            for kind, w, m, v in zip(layers, ws, means, vars_):
                y = (ops.pwconv_bn_relu(y, w, m, v, **kw) if kind == 0
                     else ops.dwconv_bn(y, w, kind, m, v, **kw))
        grads = torch.autograd.grad(y, [xx] + ws, torch.linspace(-1, 1, y.numel()).view_as(y))
        return [y, *means, *vars_, *grads]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


@needs_c
@pytest.mark.parametrize("backend,device", PAIRS)
def test_conv_bn_chain_errors_name_the_problem(backend, device):
    x = torch.randn(4, 6, 5, 5, device=device)
    w_pw, w_dw = torch.randn(8, 6, 1, 1, device=device), torch.randn(8, 1, 3, 3, device=device)
    st = [torch.zeros(8, device=device)] * 2, [torch.ones(8, device=device)] * 2
    with pytest.raises(ValueError, match=r"one entry per layer, got \[2, 2, 2, 2, 1\]"):
        ops.conv_bn_chain(x, [w_pw, w_dw], [0, 1], *st, training=True, momentums=[0.1],
                          backend=backend)
    with pytest.raises(RuntimeError, match=r"layers\[1\] must be 0 \(pointwise\), 1 or 2"):
        ops.conv_bn_chain(x, [w_pw, w_dw], [0, 3], *st, training=True, momentums=[0.1] * 2,
                          backend=backend)
    with pytest.raises(ValueError, match=r"eval mode needs every layer's running_mean"):
        ops.conv_bn_chain(x, [w_pw, w_dw], [0, 1], [None, None], [None, None],
                          training=False, momentums=[0.1] * 2, backend=backend)
    op = getattr(torch.ops.fastshift,
                 "conv_bn_chain_triton" if backend == "triton" else "conv_bn_chain")
    with pytest.raises(RuntimeError, match=r"mean must be \[groups, sum of the layers' "
                                           r"channels\] = \[1, 16\], got \[1, 8\]"):
        op(x, [w_pw, w_dw], [0, 1], torch.zeros(1, 8, device=device),
           torch.ones(1, 16, device=device), 1, 1e-5, True)
    with pytest.raises(RuntimeError, match=r": x must be float32 or float64"):
        op(x.long(), [w_pw.long(), w_dw.long()], [0, 1], torch.zeros(1, 16, device=device),
           torch.ones(1, 16, device=device), 1, 1e-5, True)
    # a layer's own check names the layer op and the mismatch
    with pytest.raises(RuntimeError, match=r"dwconv_bn: weight must be \[C, 1, k, k\] with C = 8"):
        ops.conv_bn_chain(x, [w_pw, torch.randn(5, 1, 3, 3, device=device)], [0, 1],
                          [torch.zeros(8, device=device), torch.zeros(5, device=device)],
                          [torch.ones(8, device=device), torch.ones(5, device=device)],
                          training=True, momentums=[0.1] * 2, backend=backend)


def _nets(space, backend_a, backend_b, dtype=torch.float64):
    a = fastshift.Supernet(space, backend=backend_a,
                           generator=torch.Generator().manual_seed(0)).to(dtype)
    b = fastshift.Supernet(space, backend=backend_b).to(dtype)
    b.load_state_dict(a.state_dict())
    a.dropout.p = b.dropout.p = 0.0
    return a, b


def _small_space_input(space, rows=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, space.in_channels, space.input_size, space.input_size,
                       generator=g, dtype=torch.float64)


# whole networks: compiled backends only (the Triton interpreter would take many minutes)
NETWORK_PAIRS = [p for p in PAIRS if p[1] == "cpu" and not _interpreted(*p)]


@needs_c
@pytest.mark.parametrize("backend,device", NETWORK_PAIRS)
def test_supernet_fused_path_equals_reference(backend, device):
    """net(x, arch) through the fused ops: logits, gradients and the BN running statistics
    after a training step equal the reference backend's (float64), for every choice at
    stride 1 and 2; eval-mode logits too."""
    space = fastshift.spaces.small()
    ref, fused = _nets(space, "reference", backend)
    x = _small_space_input(space)
    rng = __import__("numpy").random.default_rng(0)
    archs = [tuple([c] * space.num_layers) for c in range(space.num_choices)]
    archs += [space.sample(rng) for _ in range(3)]
    for arch in archs:
        for net in (ref, fused):
            net.train()
            net.zero_grad()
            net(x, arch).square().sum().backward()
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            if p.grad is None:
                assert q.grad is None, name
                continue
            _assert_close(q.grad, p.grad, torch.float64, f"{arch} grad {name}")
        for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
            _assert_close(c.double(), b.double(), torch.float64, f"{arch} buffer {name}")
        ref.eval()
        fused.eval()
        with torch.no_grad():
            _assert_close(fused(x, arch), ref(x, arch), torch.float64, f"{arch} eval logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 3])
def test_chain_running_update_is_the_per_layer_update_bit_for_bit(dtype, groups):
    """conv_bn_chain's one-multiplication running update (a cached row of unbiasing factors,
    multi-tensor lerps) equals reference.update_running_stats layer by layer, bit for bit, for
    layers with different counts (a stride-2 layer) and a layer without running statistics."""
    torch.manual_seed(0)
    sizes, maps, rows = [4, 4, 6], [(6, 6), (3, 3), (3, 3)], 5
    outs = [torch.empty(groups * rows, c, h, w, dtype=dtype) for c, (h, w) in zip(sizes, maps)]
    mean = torch.randn(groups, sum(sizes), dtype=dtype)
    var = torch.rand(groups, sum(sizes), dtype=dtype) * 3
    for skip in (None, 1):
        start = [(torch.randn(groups * c, dtype=dtype), torch.rand(groups * c, dtype=dtype))
                 for c in sizes]
        got = [(m.clone(), v.clone()) for m, v in start]
        rm = [None if i == skip else m for i, (m, _) in enumerate(got)]
        rv = [None if i == skip else v for i, (_, v) in enumerate(got)]
        ops._update_chain_running(outs, mean, var, sizes, rm, rv, [0.1] * 3, groups, True)
        for i, ((m0, v0), (m, v)) in enumerate(zip(start, got)):
            want_m, want_v = m0.clone(), v0.clone()
            if i != skip:
                ops.reference.update_running_stats(
                    want_m.view(groups, -1), want_v.view(groups, -1),
                    mean.split(sizes, 1)[i], var.split(sizes, 1)[i],
                    rows * maps[i][0] * maps[i][1], 0.1)
            assert torch.equal(m, want_m) and torch.equal(v, want_v), (i, skip)
            assert (i == skip) == torch.equal(m, m0)


@needs_c
def test_run_fused_follows_a_changed_sequential():
    """run_fused caches its parse of a Sequential; replacing a child redoes it: the same values
    and running statistics as the plain modules before and after, and each BN's batch count
    advanced once per call."""
    from torch import nn

    from fastshift.blocks import module_stats, run_fused

    torch.manual_seed(0)

    seq = nn.Sequential(nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False),
                        nn.BatchNorm2d(6, affine=False), nn.Conv2d(6, 8, 1, bias=False),
                        nn.BatchNorm2d(8, affine=False), nn.ReLU()).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for change in (False, True):
        if change:  # a 3x3 full conv: no longer a fused kind, so no chain
            seq[2] = nn.Conv2d(6, 8, 3, 1, 1, bias=False).double()
        plain = copy.deepcopy(seq).train()
        seq.train()
        got = run_fused(seq, x, module_stats, True, "cpu")
        want = plain(x)
        _assert_close(got, want, torch.float64, f"output, changed={change}")
        for (name, b), c in zip(plain.named_buffers(), seq.buffers()):
            _assert_close(c.double(), b.double(), torch.float64, f"{name}, changed={change}")
        assert [int(bn.num_batches_tracked) for bn in (seq[1], seq[3])] == [1 + change] * 2


@needs_c
@pytest.mark.parametrize("backend,device", NETWORK_PAIRS)
def test_engine_fused_path_equals_reference(backend, device):
    """forward_many on the fused ops equals forward_many on the reference backend: logits,
    gradients of the summed loss and per-subnet running statistics (float64)."""
    space = fastshift.spaces.small()
    ref, fused = _nets(space, "reference", backend)
    x = _small_space_input(space)
    rng = __import__("numpy").random.default_rng(1)
    archs = [space.sample(rng) for _ in range(5)]
    archs.append(archs[0])
    archs.append(archs[1][:-1] + ((archs[1][-1] + 1) % space.num_choices,))
    outs = {}
    for name, net in (("reference", ref), ("fused", fused)):
        net.train()
        stats = fastshift.engine.PathStats(net)
        logits = net.forward_many(x, archs, stats=stats)
        logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        outs[name] = (logits.detach(), grads, dict(stats.rows))
        net.eval()
        with torch.no_grad():
            outs[name] += (net.forward_many(x, archs, stats=stats),)
    (l0, g0, s0, e0), (l1, g1, s1, e1) = outs["reference"], outs["fused"]
    _assert_close(l1, l0, torch.float64, "train logits")
    _assert_close(e1, e0, torch.float64, "eval logits")
    assert g0.keys() == g1.keys()
    for n in g0:
        _assert_close(g1[n], g0[n], torch.float64, f"grad {n}")
    assert s0.keys() == s1.keys()
    for key in s0:
        for a, b in zip(s0[key], s1[key]):
            _assert_close(b, a, torch.float64, f"statistics {key}")


def test_split_ready_layouts():
    """Split-ready hand-over exactly between a unit and a following stride-1 unit."""
    from fastshift.blocks import split_ready

    assert split_ready([2, 1, 1, 2, 1]) == [(False, True), (True, True), (True, False),
                                            (False, True), (True, False)]
    assert split_ready([1, 1]) == [(False, True), (True, False)]
    assert split_ready([2]) == [(False, False)]
    net = fastshift.Supernet(fastshift.spaces.spos_shufflenetv2(), backend="reference")
    assert net.unit_layouts == split_ready(layer.stride for layer in net.space.layers)


@needs_c
@pytest.mark.parametrize("backend,device", NETWORK_PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_unit_chain_split_ready_equals_reference(backend, device, training):
    """A chain stride 2 -> 1 -> 1 -> 1 of mixed units through run_units_fused (shuffle_cat
    between units, halves read in place) equals the units applied one by one on the reference
    backend: output, input gradient, weight gradients and running statistics (float64)."""
    from fastshift.blocks import ShuffleUnit, XceptionUnit, module_stats, run_units_fused

    def chain(be):
        torch.manual_seed(0)
        units = torch.nn.ModuleList([
            ShuffleUnit(6, 16, 8, kernel=3, stride=2, backend=be),
            XceptionUnit(8, 16, 8, stride=1, backend=be),
            ShuffleUnit(8, 16, 8, kernel=7, stride=1, backend=be),
            ShuffleUnit(8, 16, 8, kernel=5, stride=1, backend=be)]).double()
        for m in units.modules():  # non-trivial running statistics for eval mode
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        return units.train(training)

    ref_units, units = chain("reference"), chain(backend)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    x_fused = x.clone().requires_grad_(True)
    y_ref = x_ref
    for unit in ref_units:
        y_ref = unit(y_ref)
    y = run_units_fused(units, x_fused, module_stats, training)
    _assert_close(y, y_ref, torch.float64, "output")
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ref_units.parameters()], g)
    grads = torch.autograd.grad(y, [x_fused, *units.parameters()], g)
    for (name, _), a, b in zip([("x", None), *ref_units.named_parameters()], grads_ref, grads):
        _assert_close(b, a, torch.float64, f"grad {name}")
    for (name, a), b in zip(ref_units.named_buffers(), units.buffers()):
        _assert_close(b.double(), a.double(), torch.float64, f"buffer {name}")


_LEVEL_CHECK = r"""
import torch
from fastshift import ops
torch.manual_seed(0)
print("level", int(torch.ops.fastshift.cpu_kernel_level()))
# channel counts that meet every channel block of the kernels at 32- and 64-byte vectors, float
# and double (59: two vectors, one, a 32-byte vector and single channels at 64 bytes), every
# depthwise kernel size and both strides, training and eval, a lazily normalised chain
for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
    worst = 0.0
    cases = [("dw", (3, 59, 7, 6), k, s) for k in (3, 5, 7) for s in (1, 2)]
    cases += [("dw", (2, 8, 5, 5), 3, 1), ("dw", (2, 27, 4, 3), 7, 2),
              ("pw", (3, 19, 5, 4), 59, None), ("pw", (2, 59, 3, 3), 24, None),
              ("chain", (2, 27, 6, 5), 59, None)]
    for kind, (r, c, h, w), k, stride in cases:
        for training in (True, False):
            x = torch.randn(r, c, h, w, dtype=dtype).contiguous(
                memory_format=torch.channels_last).requires_grad_(True)
            if kind == "dw":
                weights, layers = [torch.randn(c, 1, k, k, dtype=dtype)], [stride]
            elif kind == "pw":
                weights, layers = [torch.randn(k, c, 1, 1, dtype=dtype)], [0]
            else:
                weights = [torch.randn(k, c, 1, 1, dtype=dtype), torch.randn(k, 1, 5, 5,
                           dtype=dtype), torch.randn(c, k, 1, 1, dtype=dtype)]
                layers = [0, 1, 0]
            weights = [wt.requires_grad_(True) for wt in weights]
            sizes = [wt.shape[0] for wt in weights]
            stats = ([torch.randn(n, dtype=dtype) for n in sizes],
                     [torch.rand(n, dtype=dtype) + 0.5 for n in sizes])
            outs = []
            for backend in ("cpu", "reference"):
                means, vars_ = ([t.clone() for t in ts] for ts in stats)
                y = ops.conv_bn_chain(x, weights, layers, means, vars_, training=training,
                                      momentums=[0.1] * len(sizes), backend=backend)
                g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
                outs.append([y, *means, *vars_, *torch.autograd.grad(y, [x, *weights], g)])
            for a, b in zip(*outs):
                a, b = a.detach(), b.detach()
                worst = max(worst, float((a - b).abs().max() / (1 + b.abs().max())))
    print(str(dtype), worst, tol)
"""


@needs_c
@pytest.mark.parametrize("level", ["x86-64-v4", "x86-64-v3", "generic"])
def test_cpu_kernels_at_every_instruction_set_level(level):
    """The CPU bodies' kernels come in one version per instruction-set level
    (csrc/cpu/multiversion.h; the x86-64-v4 one on 64-byte vectors, the others on 32-byte
    ones), and a machine runs only the highest it supports. FASTSHIFT_CPU_ISA caps the level,
    so each version is checked here against the reference (values, running statistics and
    gradients of depthwise, 1x1 and chained layers over every channel block), in float64 and
    float32; a level above the CPU's runs the CPU's own."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTSHIFT_CPU_ISA=level)
    env.pop("FASTSHIFT_CPU_GEMM", None)
    native = subprocess.run([sys.executable, "-c", "import torch, fastshift; print(int("
                             "torch.ops.fastshift.cpu_kernel_level()))"],
                            env={k: v for k, v in env.items() if k != "FASTSHIFT_CPU_ISA"},
                            capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr
    cap = {"x86-64-v4": 4, "x86-64-v3": 3, "generic": 0}[level]
    want = min(int(native.stdout.split()[-1]), cap)
    out = subprocess.run([sys.executable, "-c", _LEVEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == f"level {want}", out.stdout
    for line in lines[1:]:
        if line:
            dtype, worst, tol = line.split()
            assert float(worst) < float(tol), out.stdout


def test_cpu_isa_env_is_checked():
    """A FASTSHIFT_CPU_ISA value the extension would ignore stops the import with its name."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import fastshift"],
                         env=dict(os.environ, FASTSHIFT_CPU_ISA="avx512"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "FASTSHIFT_CPU_ISA='avx512'" in out.stderr and "x86-64-v3" in out.stderr


_TILE_CHECK = r"""
import torch
from fastshift import ops
torch.manual_seed(0)
worst = 0.0
# odd channel counts (vector tiles, narrower tiles and single columns), odd row counts
# (row-tail tiles), groups, and rows past one reduction block in the weight gradient
for r, c, o, h, w, groups in [(3, 19, 37, 5, 7, 1), (4, 70, 23, 3, 3, 2), (2, 5, 3, 1, 1, 1),
                              (6, 33, 17, 9, 11, 3)]:
    x = torch.randn(r, c, h, w, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    wt = torch.randn(o, c, 1, 1, dtype=torch.float64, requires_grad=True)
    stats = (torch.randn(groups, o, dtype=torch.float64),
             torch.rand(groups, o, dtype=torch.float64) + 0.5)
    for training in (True, False):
        outs = []
        for backend in ("cpu", "reference"):
            m, v = stats[0].clone(), stats[1].clone()
            y = ops.pwconv_bn_relu(x, wt, m, v, groups=groups, training=training,
                                   backend=backend)
            g = torch.autograd.grad(y, [x, wt], torch.randn(y.shape, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(1)))
            outs.append([y, m, v, *g])
        for a, b in zip(*outs):
            worst = max(worst, float((a - b).abs().max() / (1 + b.abs().max())))
print("worst", worst)
"""


@needs_c
@pytest.mark.parametrize("tiles", ["default", "narrow"])
def test_cpu_products_in_both_tile_sizes(tiles):
    """The 1x1 layers' matrix products (csrc/cpu/gemm.h) come in two register tilings, chosen
    by the CPU (AVX-512 or not); FASTSHIFT_CPU_GEMM=narrow forces the narrow one, so both are
    checked against the reference here (float64: values, running statistics, gradients)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("FASTSHIFT_CPU_GEMM", None)
    if tiles == "narrow":
        env["FASTSHIFT_CPU_GEMM"] = "narrow"
    out = subprocess.run([sys.executable, "-c", _TILE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    worst = float(out.stdout.split()[-1])
    assert worst < 1e-12, out.stdout
