"""Triton implementations of the fused block ops, with the contracts of the compiled ops
(``torch.ops.fastshift.dwconv_bn`` etc., see csrc/fastshift.cpp).

They are registered as the bodies of the ``fastshift::*_triton`` schemas (declared in
csrc/fastshift.cpp) for CUDA tensors and, when ``TRITON_INTERPRET=1`` was set before the first
use, for CPU tensors (Triton's interpreter: slow, for tests). Activations are channels-last;
outputs too. The launchers below validate shapes (through the same messages as the C++
checks) and add the few partial sums the kernels leave (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    from . import kernels as _k

    TRITON_ERROR = None
except ImportError as exc:  # triton is optional: the backend is then not usable
    triton = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["usable", "dwconv_bn", "dwconv_bn_backward", "pwconv_bn_relu",
           "pwconv_bn_relu_backward", "TRITON_ERROR"]


def usable(device: torch.device | str) -> bool:
    """Triton can run here on ``device``: CUDA with triton installed, or CPU tensors under the
    interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _rows_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _pixel_rows(t):
    """The [R*H*W, C] pixel rows of an [R, C, H, W] tensor (a view when channels-last)."""
    return _rows_last(t).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _empty_rows_last(r, c, h, w, like):
    return torch.empty((r, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def _check_common(op, x, weight, groups):
    if x.dim() != 4:
        raise RuntimeError(f"{op}: x must be 4-D [R, C, H, W], got {x.dim()}-D")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16) or (
            x.dtype in (torch.float16, torch.bfloat16) and x.device.type != "cuda"):
        raise RuntimeError(f"{op}: x must be float32 or float64 (or float16/bfloat16 on CUDA), "
                           f"got {x.dtype}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if groups < 1 or x.shape[0] % groups:
        raise RuntimeError(f"{op}: the {x.shape[0]} rows of x do not split into {groups} equal "
                           "groups")


def _check_stats(op, name, s, groups, channels):
    if tuple(s.shape) != (groups, channels):
        raise RuntimeError(f"{op}: {name} must be [groups, C] = [{groups}, {channels}], got "
                           f"{list(s.shape)}")


def _group_sums(a, b, shift, groups, mode):
    """Per-group channel sums of [M, C] arrays (see _channel_sums_kernel) -> [G, C] (ACC)."""
    m, c = a.shape
    ppg = m // groups
    block_p, block_c = 64, _pow2(c, 16, 64)
    splits = max(1, min(64, triton.cdiv(ppg, block_p * 16)))
    out1 = torch.empty((groups, splits, c), dtype=_acc_torch(a.dtype), device=a.device)
    out2 = torch.empty_like(out1) if mode >= 2 else out1
    grid = (groups * splits, triton.cdiv(c, block_c))
    _k._channel_sums_kernel[grid](a, b, shift, out1, out2, ppg, c, splits, MODE=mode,
                                  ACC=_acc(a.dtype), BLOCK_P=block_p, BLOCK_C=block_c)
    return out1.sum(1), out2.sum(1)


def _moments(z2d, groups):
    """Biased batch mean and variance [G, C] (two passes: mean, then centered squares)."""
    m, c = z2d.shape
    count = max(m // groups, 1)
    if m == 0:
        zeros = torch.zeros((groups, c), dtype=_acc_torch(z2d.dtype), device=z2d.device)
        return zeros, zeros.clone()
    total, _ = _group_sums(z2d, z2d, z2d, groups, 0)
    mean = total / count
    sq, _ = _group_sums(z2d, z2d, mean.contiguous(), groups, 1)
    return mean, sq / count


def _normalize(z2d, y2d, mean, rstd, groups, relu):
    m, c = z2d.shape
    if m == 0:
        return
    block_p, block_c = 64, _pow2(c, 16, 64)
    grid = (triton.cdiv(m, block_p), triton.cdiv(c, block_c))
    _k._normalize_kernel[grid](z2d, y2d, mean.contiguous(), rstd.contiguous(), m, c,
                               m // groups, RELU=relu, ACC=_acc(z2d.dtype), BLOCK_P=block_p,
                               BLOCK_C=block_c)


def _bn_input_grad(dy2d, xh2d, var, eps, groups, training, relu):
    """dz [M, C] of the BN (+ReLU) backward."""
    m, c = dy2d.shape
    dz = torch.empty_like(dy2d)
    if m == 0:
        return dz
    rstd = torch.rsqrt(var.to(_acc_torch(dy2d.dtype)) + eps).contiguous()
    a = b = rstd
    if training:
        s1, s2 = _group_sums(dy2d, xh2d, xh2d, groups, 3 if relu else 2)
        count = m // groups
        a, b = (s1 / count).contiguous(), (s2 / count).contiguous()
    block_p, block_c = 64, _pow2(c, 16, 64)
    grid = (triton.cdiv(m, block_p), triton.cdiv(c, block_c))
    _k._bn_input_grad_kernel[grid](dy2d, xh2d, rstd, a, b, dz, m, c, m // groups,
                                   TRAINING=training, RELU=relu, ACC=_acc(dy2d.dtype),
                                   BLOCK_P=block_p, BLOCK_C=block_c)
    return dz


def _matmul(a, b):
    """a [M, K] @ b [K, N] (any strides) -> [M, N] contiguous, split-K when the output has
    few tiles and K is long."""
    m, k = a.shape
    n = b.shape[1]
    out_dtype = a.dtype
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    bm, bn, bk = 32, 32, 32
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    splits = max(1, min(64, triton.cdiv(k, 8 * bk))) if tiles < 64 else 1
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    part = torch.empty((splits, m, n), dtype=_acc_torch(a.dtype), device=a.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    _k._matmul_kernel[grid](a, b, part, m, n, k, a.stride(0), a.stride(1), b.stride(0),
                            b.stride(1), k_per_split, ACC=_acc(a.dtype), BLOCK_M=bm,
                            BLOCK_N=bn, BLOCK_K=bk)
    return part.sum(0).to(out_dtype)


def _dw_shape(op, x, weight, stride, groups):
    _check_common(op, x, weight, groups)
    c = x.shape[1]
    if (weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1
            or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 != 1):
        raise RuntimeError(f"{op}: weight must be [C, 1, k, k] with C = {c} and k odd, got "
                           f"{list(weight.shape)}")
    if stride not in (1, 2):
        raise RuntimeError(f"{op}: stride must be 1 or 2, got {stride}")
    k = weight.shape[2]
    r, _, h, w = x.shape
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    return r, c, h, w, k, oh, ow


def dwconv_bn(x, weight, mean, var, stride, groups, eps, training):
    """``fastshift::dwconv_bn`` in Triton: -> (y channels-last, mean [G, C], var [G, C])."""
    op = "dwconv_bn"
    r, c, h, w, k, oh, ow = _dw_shape(op, x, weight, stride, groups)
    _check_stats(op, "mean", mean, groups, c)
    _check_stats(op, "var", var, groups, c)
    x = _rows_last(x)
    wt = weight.reshape(c, k * k).t().contiguous()
    y = _empty_rows_last(r, c, oh, ow, x)
    if r == 0:
        if training:
            z = torch.zeros((groups, c), dtype=x.dtype, device=x.device)
            return y, z, z.clone()
        return y, mean.clone(), var.clone()
    block_w, block_c = _pow2(ow, 4, 16), _pow2(c, 16, 64)
    grid = (r * oh * triton.cdiv(ow, block_w), triton.cdiv(c, block_c))
    acc = _acc(x.dtype)
    if not training:
        rstd = torch.rsqrt(var.to(_acc_torch(x.dtype)) + eps).contiguous()
        shift = mean.to(_acc_torch(x.dtype)).contiguous()
        _k._dw_conv_kernel[grid](x, wt, y, shift, rstd, h, w, c, oh, ow, r // groups, K=k,
                                 S=stride, NORMALIZE=True, ACC=acc, BLOCK_W=block_w,
                                 BLOCK_C=block_c)
        return y, mean.clone(), var.clone()
    _k._dw_conv_kernel[grid](x, wt, y, wt, wt, h, w, c, oh, ow, r // groups, K=k, S=stride,
                             NORMALIZE=False, ACC=acc, BLOCK_W=block_w, BLOCK_C=block_c)
    z2d = y.permute(0, 2, 3, 1).reshape(r * oh * ow, c)  # a view of y's storage
    bmean, bvar = _moments(z2d, groups)
    _normalize(z2d, z2d, bmean, torch.rsqrt(bvar + eps), groups, relu=False)
    return y, bmean.to(x.dtype), bvar.to(x.dtype)


def dwconv_bn_backward(grad_y, x, weight, y, var, stride, groups, eps, training):
    """``fastshift::dwconv_bn_backward`` in Triton: -> (grad_x, grad_weight)."""
    op = "dwconv_bn_backward"
    r, c, h, w, k, oh, ow = _dw_shape(op, x, weight, stride, groups)
    if tuple(grad_y.shape) != (r, c, oh, ow):
        raise RuntimeError(f"{op}: grad_y must be [{r}, {c}, {oh}, {ow}], got "
                           f"{list(grad_y.shape)}")
    x = _rows_last(x)
    dx = _empty_rows_last(r, c, h, w, x)
    if r == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format)
    dy2d = _pixel_rows(grad_y)
    xh2d = _pixel_rows(y) if training else dy2d
    dz = _bn_input_grad(dy2d, xh2d, var, eps, groups, training, relu=False)
    wt = weight.reshape(c, k * k).t().contiguous()
    acc = _acc(x.dtype)
    block_w, block_c = _pow2(w, 4, 16), _pow2(c, 16, 64)
    grid = (r * h * triton.cdiv(w, block_w), triton.cdiv(c, block_c))
    _k._dw_input_grad_kernel[grid](dz, wt, dx, h, w, c, oh, ow, K=k, S=stride, ACC=acc,
                                   BLOCK_W=block_w, BLOCK_C=block_c)
    total = r * oh * ow
    block_p = 64
    splits = max(1, min(64, triton.cdiv(total, block_p * 16)))
    part = torch.empty((k * k, splits, c), dtype=_acc_torch(x.dtype), device=x.device)
    grid = (k * k * splits, triton.cdiv(c, block_c))
    _k._dw_weight_grad_kernel[grid](x, dz, part, h, w, c, oh, ow, total, splits, K=k,
                                    S=stride, ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c)
    dw = part.sum(1).t().reshape(c, 1, k, k).to(x.dtype).contiguous()
    return dx, dw


def _pw_shape(op, x, weight, groups):
    _check_common(op, x, weight, groups)
    c = x.shape[1]
    if (weight.dim() != 4 or weight.shape[1] != c or weight.shape[2] != 1
            or weight.shape[3] != 1):
        raise RuntimeError(f"{op}: weight must be [O, C, 1, 1] with C = {c}, got "
                           f"{list(weight.shape)}")
    return x.shape[0], c, x.shape[2], x.shape[3], weight.shape[0]


def pwconv_bn_relu(x, weight, mean, var, groups, eps, training):
    """``fastshift::pwconv_bn_relu`` in Triton: -> (y, xhat (empty in eval), mean, var)."""
    op = "pwconv_bn_relu"
    r, c, h, w, o = _pw_shape(op, x, weight, groups)
    _check_stats(op, "mean", mean, groups, o)
    _check_stats(op, "var", var, groups, o)
    x2d = _pixel_rows(x)
    z = _matmul(x2d, weight.reshape(o, c).t())  # [M, O]
    if training:
        bmean, bvar = _moments(z, groups)
        y = torch.empty_like(z)
        _normalize(z, y, bmean, torch.rsqrt(bvar + eps), groups, relu=True)
        bmean, bvar = bmean.to(x.dtype), bvar.to(x.dtype)
        xhat = z.view(r, h, w, o).permute(0, 3, 1, 2)
    else:
        acc_t = _acc_torch(x.dtype)
        _normalize(z, z, mean.to(acc_t), torch.rsqrt(var.to(acc_t) + eps), groups, relu=True)
        y, bmean, bvar = z, mean.clone(), var.clone()
        xhat = x.new_empty((0,))
    return y.view(r, h, w, o).permute(0, 3, 1, 2), xhat, bmean, bvar


def pwconv_bn_relu_backward(grad_y, x, weight, y, xhat, var, groups, eps, training):
    """``fastshift::pwconv_bn_relu_backward`` in Triton: -> (grad_x, grad_weight)."""
    op = "pwconv_bn_relu_backward"
    r, c, h, w, o = _pw_shape(op, x, weight, groups)
    if tuple(grad_y.shape) != (r, o, h, w):
        raise RuntimeError(f"{op}: grad_y must be [{r}, {o}, {h}, {w}], got "
                           f"{list(grad_y.shape)}")
    dy2d = _pixel_rows(grad_y)
    xh2d = _pixel_rows(xhat if training else y)
    dz = _bn_input_grad(dy2d, xh2d, var, eps, groups, training, relu=True)
    x2d = _pixel_rows(x)
    w2d = weight.reshape(o, c)
    dx = _matmul(dz, w2d)            # [M, C]
    dw = _matmul(dz.t(), x2d)        # [O, C]
    return dx.view(r, h, w, c).permute(0, 3, 1, 2), dw.view(o, c, 1, 1)
