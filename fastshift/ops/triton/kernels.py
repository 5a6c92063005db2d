"""Triton kernels of the fused block ops, on channels-last storage (a pixel's C channels are
contiguous, so every tile is [pixels, channels]).

Formulas as in csrc/cpu/block_cpu.cpp. Reductions are deterministic: each program writes a
partial sum to its own slot and the few partials are added by the launcher (torch), never by
atomics. Accumulation is float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_tile(rows, cols, C, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a grid (R * rows * cdiv(cols, BLOCK_W), cdiv(C, BLOCK_C)) over
    [R, rows, cols, C] maps: image r, row, BLOCK_W column indices, BLOCK_C channel indices and
    the channel mask."""
    pid = tl.program_id(0)
    n_wb = tl.cdiv(cols, BLOCK_W)
    row = (pid // n_wb) % rows
    r = pid // (n_wb * rows)
    col = (pid % n_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, row, col, c, c < C


@triton.jit
def _dw_conv_kernel(x_ptr, w_ptr, out_ptr, shift_ptr, scale_ptr, H, W, C, OH, OW,
                    rows_per_group, K: tl.constexpr, S: tl.constexpr,
                    NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """out[r, oh, ow, c] = sum_{kh,kw} x[r, oh*S - P + kh, ow*S - P + kw, c] * w[kh, kw, c]
    (zero padding P = K // 2); with NORMALIZE, (out - shift[g, c]) * scale[g, c] for the row
    group g = r // rows_per_group. Grid: (R * OH * cdiv(OW, BLOCK_W), cdiv(C, BLOCK_C))."""
    r, oh, ow, c, cmask = _row_tile(OH, OW, C, BLOCK_W, BLOCK_C)
    P: tl.constexpr = K // 2
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        ih = oh * S - P + kh
        hvalid = (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow * S - P + kw
            m = hvalid & (iw >= 0) & (iw < W)
            pix = (r * H + ih) * W + iw
            xv = tl.load(x_ptr + pix[:, None] * C + c[None, :], mask=m[:, None] & cmask[None, :],
                         other=0.0)
            wv = tl.load(w_ptr + (kh * K + kw) * C + c, mask=cmask, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    if NORMALIZE:
        g = r // rows_per_group
        sh = tl.load(shift_ptr + g * C + c, mask=cmask, other=0.0).to(ACC)
        sc = tl.load(scale_ptr + g * C + c, mask=cmask, other=0.0).to(ACC)
        acc = (acc - sh[None, :]) * sc[None, :]
    opix = (r * OH + oh) * OW + ow
    omask = (ow < OW)[:, None] & cmask[None, :]
    tl.store(out_ptr + opix[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=omask)


@triton.jit
def _dw_input_grad_kernel(dz_ptr, w_ptr, dx_ptr, H, W, C, OH, OW, K: tl.constexpr,
                          S: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """dx[r, ih, iw, c] = sum_{kh,kw} dz[r, (ih + P - kh) / S, (iw + P - kw) / S, c] w[kh, kw, c]
    over the taps where the division is exact and in range (the transposed conv).
    Grid: (R * H * cdiv(W, BLOCK_W), cdiv(C, BLOCK_C))."""
    r, ih, iw, c, cmask = _row_tile(H, W, C, BLOCK_W, BLOCK_C)
    P: tl.constexpr = K // 2
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        th = ih + P - kh
        oh = th // S
        hvalid = (th >= 0) & (th % S == 0) & (oh < OH)
        for kw in tl.static_range(K):
            tw = iw + P - kw
            ow = tw // S
            m = hvalid & (tw >= 0) & (tw % S == 0) & (ow < OW)
            pix = (r * OH + oh) * OW + ow
            gv = tl.load(dz_ptr + pix[:, None] * C + c[None, :],
                         mask=m[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * K + kw) * C + c, mask=cmask, other=0.0)
            acc += gv.to(ACC) * wv.to(ACC)[None, :]
    opix = (r * H + ih) * W + iw
    omask = (iw < W)[:, None] & cmask[None, :]
    tl.store(dx_ptr + opix[:, None] * C + c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=omask)


@triton.jit
def _dw_weight_grad_kernel(x_ptr, dz_ptr, out_ptr, H, W, C, OH, OW, total, splits,
                           K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial dw: out[t, s, c] = sum over the s-th slice of the R*OH*OW output pixels o of
    x[r, oh*S - P + kh, ow*S - P + kw, c] * dz[o, c], tap t = kh * K + kw.
    Grid: (K * K * splits, cdiv(C, BLOCK_C))."""
    pid = tl.program_id(0)
    t = pid // splits
    s = pid % splits
    kh = t // K
    kw = t % K
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    P: tl.constexpr = K // 2
    per = tl.cdiv(total, splits)
    start = s * per
    end = tl.minimum(start + per, total)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < end
        ow = p % OW
        oh = (p // OW) % OH
        r = p // (OW * OH)
        ih = oh * S - P + kh
        iw = ow * S - P + kw
        valid = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + ((r * H + ih) * W + iw)[:, None] * C + c[None, :],
                     mask=valid[:, None] & cmask[None, :], other=0.0)
        gv = tl.load(dz_ptr + p[:, None] * C + c[None, :], mask=pm[:, None] & cmask[None, :],
                     other=0.0)
        acc += xv.to(ACC) * gv.to(ACC)
    tl.store(out_ptr + (t * splits + s) * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _channel_sums_kernel(a_ptr, b_ptr, shift_ptr, out1_ptr, out2_ptr, pixels_per_group, C,
                         splits, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Partial per-channel sums over the s-th slice of group g's rows of [M, C] arrays, into
    out1/out2[g, s, c]:
      MODE 0: a                      (mean)
      MODE 1: (a - shift[g])^2       (centered variance)
      MODE 2: a, a * b               (BN backward: a = dy, b = xhat)
      MODE 3: a', a' * b, a' = b > 0 ? a : 0   (ReLU + BN backward)
    Grid: (G * splits, cdiv(C, BLOCK_C))."""
    pid = tl.program_id(0)
    g = pid // splits
    s = pid % splits
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    per = tl.cdiv(pixels_per_group, splits)
    start = s * per
    end = tl.minimum(start + per, pixels_per_group)
    acc1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    if MODE == 1:
        shift = tl.load(shift_ptr + g * C + c, mask=cmask, other=0.0).to(ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < end)[:, None] & cmask[None, :]
        off = (g * pixels_per_group + p)[:, None] * C + c[None, :]
        av = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        if MODE == 0:
            acc1 += av
        elif MODE == 1:
            d = tl.where(m, av - shift[None, :], 0.0)
            acc1 += d * d
        else:
            bv = tl.load(b_ptr + off, mask=m, other=0.0).to(ACC)
            if MODE == 3:
                av = tl.where(bv > 0, av, 0.0)
            else:
                # A no-op (masked loads are 0 already), but without it triton 3.8 crashes
                # (SIGSEGV in make_llir) compiling MODE 2 for sm_90 at BLOCK_C >= 32 with 4
                # warps when the pointers carry no alignment hint (views at unaligned
                # offsets); found by tests/triton_compile.py. Triton 3.6 compiles either form.
                av = tl.where(m, av, 0.0)
            acc1 += av
            acc2 += av * bv
    slot = (g * splits + s) * C + c
    tl.store(out1_ptr + slot, tl.sum(acc1, axis=0), mask=cmask)
    if MODE >= 2:
        tl.store(out2_ptr + slot, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _grouped_tile(M, C, pixels_per_group, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_P, BLOCK_C] tile of a grid (cdiv(M, BLOCK_P), cdiv(C, BLOCK_C))
    over [M, C] rows in groups of pixels_per_group: mask, element offsets, and the offsets of
    each element's [G, C] statistic."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (p < M)[:, None] & (c < C)[None, :]
    g = p // pixels_per_group
    return m, p[:, None] * C + c[None, :], g[:, None] * C + c[None, :]


@triton.jit
def _normalize_kernel(z_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, pixels_per_group,
                      RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """z := (z - mean[g]) * rstd[g] in place; with RELU also y := max(z, 0) (NaN kept).
    Grid: (cdiv(M, BLOCK_P), cdiv(C, BLOCK_C))."""
    m, off, st = _grouped_tile(M, C, pixels_per_group, BLOCK_P, BLOCK_C)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + st, mask=m, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + st, mask=m, other=0.0).to(ACC)
    v = (z - mean) * rstd
    tl.store(z_ptr + off, v.to(z_ptr.dtype.element_ty), mask=m)
    if RELU:
        tl.store(y_ptr + off, tl.where(v < 0, 0.0, v).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_input_grad_kernel(dy_ptr, xh_ptr, rstd_ptr, a_ptr, b_ptr, dz_ptr, M, C,
                          pixels_per_group, TRAINING: tl.constexpr, RELU: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = rstd * (dy' - a - xhat * b) (training) or rstd * dy' (eval), dy' = dy masked by
    xhat > 0 with RELU (in eval xh is the output y, of the same sign where it matters).
    Grid: (cdiv(M, BLOCK_P), cdiv(C, BLOCK_C))."""
    m, off, st = _grouped_tile(M, C, pixels_per_group, BLOCK_P, BLOCK_C)
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + st, mask=m, other=0.0).to(ACC)
    if RELU or TRAINING:
        xh = tl.load(xh_ptr + off, mask=m, other=0.0).to(ACC)
    if RELU:
        dy = tl.where(xh > 0, dy, 0.0)
    if TRAINING:
        a = tl.load(a_ptr + st, mask=m, other=0.0).to(ACC)
        b = tl.load(b_ptr + st, mask=m, other=0.0).to(ACC)
        dz = rstd * (dy - a - xh * b)
    else:
        dz = rstd * dy
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, k_per_split,
                   ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Partial C[s] = A[:, ks] @ B[ks, :] over the s-th K slice (split-K; the launcher adds
    the partials). A and B are strided; C is contiguous [splits, M, N].
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(2)
    k_start = s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < k_end
        a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak,
                    mask=(rm < M)[:, None] & km[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * sbk + rn[None, :] * sbn,
                    mask=km[:, None] & (rn < N)[None, :], other=0.0)
        acc += tl.dot(a.to(ACC), b.to(ACC), input_precision="ieee", out_dtype=ACC)
    out = c_ptr + s * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])
