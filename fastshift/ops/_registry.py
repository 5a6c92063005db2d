"""Loads ``fastshift._C`` and registers the Python side of its ops: fake (meta) kernels for
``torch.compile`` and opcheck, and the Triton launchers as the bodies of the ``*_triton``
schemas. Autograd is registered in C++ (``csrc/autograd.cpp``): each op's backward is itself
a registered op, and a call runs no Python between the op and its gradient."""

from __future__ import annotations

import os

import torch
from torch._prims_common import suggest_memory_format

from .reference import regroup_routes

try:
    from .. import _C  # noqa: F401  (registers the TORCH_LIBRARY "fastshift")

    HAVE_C = True
    BUILD_ERROR = None
except ImportError as exc:  # the pure-PyTorch paths keep working without the extension
    HAVE_C = False
    BUILD_ERROR = f"{type(exc).__name__}: {exc}"


def conv_out_size(size: int, k: int, stride: int) -> int:
    """Output size of a k-tap conv with padding k // 2 and this stride along one dimension."""
    return (size + 2 * (k // 2) - k) // stride + 1


# Read once: the answer cannot change within a process, and a plain bool keeps
# ``resolve_backend`` traceable by torch.compile (dynamo cannot trace an op returning an int).
_CUDA_BUILT = HAVE_C and int(torch.ops.fastshift.cuda_version()) > 0


def cuda_built() -> bool:
    """Whether fastshift._C was compiled with its CUDA bodies."""
    return _CUDA_BUILT


# The compute capabilities the CUDA bodies were compiled for (major * 10 + minor; 1000 + that
# for PTX), from the build's TORCH_CUDA_ARCH_LIST; () without CUDA bodies.
CUDA_ARCHS = tuple(int(a) for a in torch.ops.fastshift.cuda_archs()) if _CUDA_BUILT else ()

# FASTSHIFT_CPU_ISA caps the instruction-set level of the CPU bodies' kernels
# (csrc/cpu/multiversion.h; the extension reads it once, at the first kernel call), so that
# tests can run each version on one machine; a value the extension would ignore is an error.
CPU_ISA_VALUES = ("x86-64-v4", "x86-64-v3", "generic")
_CPU_ISA = os.environ.get("FASTSHIFT_CPU_ISA")
if _CPU_ISA is not None and _CPU_ISA not in CPU_ISA_VALUES:
    raise ValueError(f"FASTSHIFT_CPU_ISA={_CPU_ISA!r}: expected one of "
                     f"{', '.join(CPU_ISA_VALUES)} (the highest instruction-set level the CPU "
                     "kernels may use), or unset for the CPU's own")

_CPU_LEVEL_NAMES = {4: "x86-64-v4 (AVX-512, 64-byte vectors)",
                    3: "x86-64-v3 (AVX2 + FMA, 32-byte vectors)", 0: "generic"}


def cpu_kernel_level() -> str | None:
    """The version of the CPU bodies' kernels that runs in this process (the highest the CPU
    supports, capped by FASTSHIFT_CPU_ISA), e.g. ``"x86-64-v4 (AVX-512, 64-byte vectors)"``;
    None without the extension."""
    if not HAVE_C:
        return None
    return _CPU_LEVEL_NAMES[int(torch.ops.fastshift.cpu_kernel_level())]


if HAVE_C:

    @torch.library.register_fake("fastshift::channel_split")
    def _channel_split_fake(x):
        torch._check(x.dim() == 4, lambda: "channel_split: x must be 4-D")
        torch._check(x.shape[1] % 2 == 0, lambda: "channel_split: channel count must be even")
        shape = (x.shape[0], x.shape[1] // 2, x.shape[2], x.shape[3])
        fmt = suggest_memory_format(x)
        return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
                torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt))

    @torch.library.register_fake("fastshift::channel_interleave")
    def _channel_interleave_fake(even, odd):
        torch._check(even.dim() == 4, lambda: "channel_interleave: even must be 4-D")
        torch._check(even.shape == odd.shape, lambda: "channel_interleave: shapes differ")
        b, c, h, w = even.shape
        return torch.empty((b, 2 * c, h, w), dtype=even.dtype, device=even.device,
                           memory_format=suggest_memory_format(even))

    @torch.library.register_fake("fastshift::shuffle_cat")
    def _shuffle_cat_fake(a, b):
        torch._check(a.dim() == 4 and b.dim() == 4, lambda: "shuffle_cat: a and b must be 4-D")
        torch._check((a.shape[1] + b.shape[1]) % 2 == 0,
                     lambda: "shuffle_cat: channel count must be even")
        return torch.empty((a.shape[0], a.shape[1] + b.shape[1], a.shape[2], a.shape[3]),
                           dtype=a.dtype, device=a.device,
                           memory_format=suggest_memory_format(a if a.shape[1] else b))

    @torch.library.register_fake("fastshift::shuffle_cat_backward")
    def _shuffle_cat_backward_fake(grad, split):
        torch._check(grad.dim() == 4, lambda: "shuffle_cat_backward: grad must be 4-D")
        n, c, h, w = grad.shape
        fmt = suggest_memory_format(grad)
        return (torch.empty((n, split, h, w), dtype=grad.dtype, device=grad.device,
                            memory_format=fmt),
                torch.empty((n, c - split, h, w), dtype=grad.dtype, device=grad.device,
                            memory_format=fmt))

    @torch.library.register_fake("fastshift::shuffle_cat_pair")
    def _shuffle_cat_pair_fake(a, b):
        torch._check(a.dim() == 4 and b.dim() == 4,
                     lambda: "shuffle_cat_pair: a and b must be 4-D")
        torch._check((a.shape[1] + b.shape[1]) % 2 == 0,
                     lambda: "shuffle_cat_pair: channel count must be even")
        shape = (a.shape[0], (a.shape[1] + b.shape[1]) // 2, a.shape[2], a.shape[3])
        fmt = suggest_memory_format(a if a.shape[1] else b)
        return tuple(torch.empty(shape, dtype=a.dtype, device=a.device, memory_format=fmt)
                     for _ in range(2))

    @torch.library.register_fake("fastshift::shuffle_cat_pair_backward")
    def _shuffle_cat_pair_backward_fake(grad_lo, grad_hi, split):
        torch._check(grad_lo.dim() == 4 and grad_lo.shape == grad_hi.shape,
                     lambda: "shuffle_cat_pair_backward: grad_lo and grad_hi must be 4-D of "
                     "one shape")
        n, c, h, w = grad_lo.shape
        fmt = suggest_memory_format(grad_lo)
        return (torch.empty((n, split, h, w), dtype=grad_lo.dtype, device=grad_lo.device,
                            memory_format=fmt),
                torch.empty((n, 2 * c - split, h, w), dtype=grad_lo.dtype,
                            device=grad_lo.device, memory_format=fmt))

    @torch.library.register_fake("fastshift::shuffle_regroup")
    def _shuffle_regroup_fake(a, b, routes, batch):
        torch._check(len(a) == len(b) and len(a) > 0,
                     lambda: "shuffle_regroup: a and b must be two non-empty lists of one length")
        a0, b0 = a[0], b[0]
        torch._check((a0.shape[1] + b0.shape[1]) % 2 == 0,
                     lambda: "shuffle_regroup: channel count must be even")
        h = (a0.shape[1] + b0.shape[1]) // 2
        fmt = suggest_memory_format(a0 if a0.shape[1] else b0)
        return [torch.empty((r, h, a0.shape[2], a0.shape[3]), dtype=a0.dtype, device=a0.device,
                            memory_format=fmt)
                for runs in regroup_routes(routes)
                for r in [batch * sum(b1 - b0 for _, b0, b1 in runs)] for _ in range(2)]

    @torch.library.register_fake("fastshift::shuffle_regroup_backward")
    def _shuffle_regroup_backward_fake(grads, routes, batch, rows, split):
        g = grads[0]
        fmt = suggest_memory_format(g)
        _, c, h, w = g.shape
        return [torch.empty((r, ch, h, w), dtype=g.dtype, device=g.device, memory_format=fmt)
                for r in rows for ch in (split, 2 * c - split)]

    @torch.library.register_fake("fastshift::stem_conv_bn_relu")
    def _stem_conv_bn_relu_fake(x, weight, mean, var, stride, eps, training):
        torch._check(x.dim() == 4 and weight.dim() == 4,
                     lambda: "stem_conv_bn_relu: x and weight must be 4-D")
        b, _, h, w = x.shape
        o, k = weight.shape[0], weight.shape[-1]
        shape = (b, o, conv_out_size(h, k, stride), conv_out_size(w, k, stride))
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        z = torch.empty_like(y) if training else x.new_empty((0,))
        return y, z, x.new_empty((o,)), x.new_empty((o,))

    @torch.library.register_fake("fastshift::stem_conv_bn_relu_backward")
    def _stem_conv_bn_relu_backward_fake(grad_y, x, weight, y, z, mean, var, stride, eps,
                                         training):
        return torch.empty(tuple(weight.shape), dtype=weight.dtype, device=weight.device)

    @torch.library.register_fake("fastshift::linear")
    def _linear_fake(x, weight):
        torch._check(x.dim() == 2 and weight.dim() == 2,
                     lambda: "linear: x and weight must be 2-D")
        torch._check(x.shape[1] == weight.shape[1],
                     lambda: "linear: weight must have x's feature count")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("fastshift::linear_backward")
    def _linear_backward_fake(grad_y, x, weight):
        return x.new_empty(tuple(x.shape)), weight.new_empty(tuple(weight.shape))

    def _channels_last_empty(like, shape):
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last)

    def _dwconv_bn_fake(x, weight, mean, var, stride, groups, eps, training):
        torch._check(x.dim() == 4, lambda: "dwconv_bn: x must be 4-D")
        r, c, h, w = x.shape
        k = weight.shape[-1]
        y = _channels_last_empty(x, (r, c, conv_out_size(h, k, stride),
                                     conv_out_size(w, k, stride)))
        return y, x.new_empty((groups, c)), x.new_empty((groups, c))

    def _dwconv_bn_backward_fake(grad_y, x, weight, y, var, stride, groups, eps, training):
        return _channels_last_empty(x, tuple(x.shape)), torch.empty_like(
            weight, memory_format=torch.contiguous_format)

    def _pwconv_bn_relu_fake(x, weight, mean, var, groups, eps, training):
        torch._check(x.dim() == 4, lambda: "pwconv_bn_relu: x must be 4-D")
        r, _, h, w = x.shape
        o = weight.shape[0]
        y = _channels_last_empty(x, (r, o, h, w))
        xhat = _channels_last_empty(x, (r, o, h, w)) if training else x.new_empty((0,))
        return y, xhat, x.new_empty((groups, o)), x.new_empty((groups, o))

    def _pwconv_bn_relu_backward_fake(grad_y, x, weight, y, xhat, var, groups, eps, training):
        return _channels_last_empty(x, tuple(x.shape)), torch.empty_like(
            weight, memory_format=torch.contiguous_format)

    def _conv_bn_chain_fake(x, weights, layers, mean, var, groups, eps, training,
                            cpu_body=False):
        """The chain's outputs. ``saved`` is what the backward of the same body reads: the
        composite bodies (CUDA, and the Triton family) keep the outputs of layers 0 .. n-2,
        then the xhat of each pointwise layer (empty in eval); the CPU body (``cpu_body``,
        csrc/cpu/block_cpu.cpp) keeps every layer's stored output (raw for a pointwise
        layer, xhat for a depthwise one; an empty tensor for a last pointwise layer in eval,
        which normalises as it stores), then the ``[G, sum C_i]`` shifts of the lazy
        normalisation."""
        torch._check(len(weights) == len(layers) >= 1,
                     lambda: "conv_bn_chain: one weight per layer, at least one layer")
        h, saved, xhats, off = x, [], [], 0
        for i, (w, kind) in enumerate(zip(weights, layers)):
            c = w.shape[0]
            m, v = mean[:, off:off + c], var[:, off:off + c]
            off += c
            if kind == 0:
                y, xhat, _, _ = _pwconv_bn_relu_fake(h, w, m, v, groups, eps, training)
                xhats.append(xhat)
            else:
                y, _, _ = _dwconv_bn_fake(h, w, m, v, kind, groups, eps, training)
            if cpu_body and i + 1 == len(layers) and kind == 0 and not training:
                saved.append(x.new_empty((0,)))
            elif i + 1 < len(layers) or cpu_body:
                saved.append(y)
            h = y
        if cpu_body:
            saved = saved + [x.new_empty((groups, off))]
            h = _channels_last_empty(x, tuple(h.shape))
        else:
            saved = saved + xhats
        return h, saved, x.new_empty((groups, off)), x.new_empty((groups, off))

    def _conv_bn_chain_compiled_fake(x, weights, layers, mean, var, groups, eps, training):
        return _conv_bn_chain_fake(x, weights, layers, mean, var, groups, eps, training,
                                   cpu_body=x.device.type == "cpu")

    def _conv_bn_chain_eval_fake(x, weights, layers, mean, var, groups, eps,
                                 shuffle_with=None):
        y = _conv_bn_chain_fake(x, weights, layers, mean, var, groups, eps, False,
                                cpu_body=True)[0]
        if shuffle_with is None:
            return y
        r, c, h, w = y.shape
        return _channels_last_empty(x, (r, shuffle_with.shape[1] + c, h, w))

    def _conv_bn_chain_backward_fake(grad_y, x, weights, layers, y, saved, var, groups, eps,
                                     training):
        return _channels_last_empty(x, tuple(x.shape)), [
            torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    def _register_block_ops(suffix: str):
        """The fake kernels of the block ops of one family (their autograd: csrc/autograd.cpp,
        the gradient of x and the weights through y; the statistics, xhat and saved outputs
        are not differentiable)."""
        lib = "fastshift::"
        torch.library.register_fake(lib + "conv_bn_chain" + suffix,
                                    _conv_bn_chain_compiled_fake if suffix == ""
                                    else _conv_bn_chain_fake)
        torch.library.register_fake(lib + "conv_bn_chain_backward" + suffix,
                                    _conv_bn_chain_backward_fake)
        torch.library.register_fake(lib + "dwconv_bn" + suffix, _dwconv_bn_fake)
        torch.library.register_fake(lib + "dwconv_bn_backward" + suffix,
                                    _dwconv_bn_backward_fake)
        torch.library.register_fake(lib + "pwconv_bn_relu" + suffix, _pwconv_bn_relu_fake)
        torch.library.register_fake(lib + "pwconv_bn_relu_backward" + suffix,
                                    _pwconv_bn_relu_backward_fake)

    _register_block_ops("")
    torch.library.register_fake("fastshift::conv_bn_chain_eval", _conv_bn_chain_eval_fake)
    _register_block_ops("_triton")

    def _register_triton_bodies():
        """The Triton launchers as the CPU and CUDA bodies of the *_triton schemas (they raise
        a clear error when Triton cannot run on the tensors' device)."""
        from . import triton as triton_ops

        def guarded(fn):
            def body(*args):
                device = args[0].device
                if not triton_ops.usable(device):
                    raise RuntimeError(
                        f"fastshift backend 'triton' cannot run on {device.type} tensors here: "
                        + (f"triton is not importable ({triton_ops.TRITON_ERROR})"
                           if triton_ops.TRITON_ERROR else
                           "CPU tensors need the interpreter (set TRITON_INTERPRET=1 before "
                           "the first use)"))
                return fn(*args)
            return body

        for name in ("dwconv_bn", "dwconv_bn_backward", "pwconv_bn_relu",
                     "pwconv_bn_relu_backward"):
            torch.library.register_kernel("fastshift::" + name + "_triton", ("cpu", "cuda"),
                                          guarded(getattr(triton_ops, name)))

    _register_triton_bodies()
