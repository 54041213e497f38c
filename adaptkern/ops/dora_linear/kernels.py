"""Triton kernels of the fused DoRA linear (the GEMMs are launches of ``ops/gemm.py``'s dual GEMM).

* ``_dora_linear_norm_kernel``: the detached row norm ``n = ‖W + s·B·A‖_row`` and, when a
  magnitude is given, the output scale ``g = m / n``. Each program owns ``BLOCK_N`` rows; its
  K loop forms the tile ``W + s·(B·A)`` in the accumulator dtype (B·A one rank-sized dot per
  tile, never stored) and sums its squares. Forming the tile, rather than expanding
  ``‖W_n‖² + 2s·W_n·(AᵀB_n) + s²‖B_n·A‖²``, costs the same flops and one read of W but never
  cancels: each squared element is the fp32 value of ``W + s·B·A`` itself, so the norm is as
  exact as fp32 sums of squares, whatever the adapter does to a row.
* ``_dora_linear_colsum_kernel``: ``dm_n = Σ_m dY[m, n]·P[m, n] / n_n`` (fp32 accumulation), the
  magnitude's gradient. Without dropout P is recovered from the saved output, ``P = (y − b) / g``
  (the forward then stores nothing [M, N] but y, which frees the main GEMM's epilogue of a second
  store). y's rounding error u·(|y| + tiny) becomes u·(|y| + tiny)/|g| in that P, which exceeds
  what rounding P itself costs, u·|P| = u·|y − b|/|g|, where the bias dominates g ⊙ P. So the
  slab loop also sums, per column, ``Σ |dY|·(|y| + tiny)`` and ``Σ |dY|·|y − b|`` (the two dm
  error bounds, g cancelled); a column whose first sum passes ``ratio`` (2,
  ``reference.RECOVER_RATIO``) times its second, or whose g is 0 (y = b holds no P), gets its dm
  again from P = x·Wᵀ + s·S·Bᵀ recomputed: a second loop over M, run only by programs holding
  such a column (at worst, every column bias-dominated, one more x·Wᵀ GEMM in this kernel's
  tiles). With dropout y is not g ⊙ P + b, and the forward stores P.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dora_linear_norm_kernel(
    norm_ptr,  # [N] out, ACC: ‖W_n + s·B_n·A‖
    g_ptr,  # [N] out, ACC: m_n / norm_n (HAS_MAG)
    w_ptr,  # [N, K]
    a_ptr,  # [R, K]
    b_ptr,  # [N, R]
    m_ptr,  # [N] (HAS_MAG)
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    HAS_MAG: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    sq = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + rr
            r_ok = r < R
            b = tl.load(b_ptr + rn[:, None] * stride_bn + r[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + r[:, None] * stride_ar + kk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            ba = tl.dot(b.to(DOT_DTYPE), a.to(DOT_DTYPE), ba, input_precision=PRECISION, out_dtype=ACC)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        v = w + scale * ba
        sq += tl.sum(v * v, axis=1)
    if ACC == tl.float64:
        norm = tl.sqrt(sq)
    else:
        norm = tl.sqrt_rn(sq)  # IEEE rounding; tl.sqrt on fp32 may lower to an approximation
    tl.store(norm_ptr + rn, norm, mask=n_ok)
    if HAS_MAG:
        m = tl.load(m_ptr + rn, mask=n_ok, other=0.0).to(ACC)
        tl.store(g_ptr + rn, m / tl.where(n_ok, norm, 1.0), mask=n_ok)


@triton.jit
def _dora_linear_colsum_kernel(
    dm_ptr,  # [N] out, ACC: Σ_m dY ⊙ P / norm
    dy_ptr,  # [M, N]
    p_ptr,  # [M, N]: P = x̃·Wᵀ + s·S·Bᵀ as the forward stored it (not FROM_Y)
    y_ptr,  # [M, N]: the forward's output y = g ⊙ P + b (FROM_Y)
    bias_ptr,  # [N] (FROM_Y and HAS_BIAS)
    g_ptr,  # [N] ACC: m / norm (FROM_Y)
    norm_ptr,  # [N] ACC
    x_ptr,  # [M, K] (FROM_Y: P recomputed for the columns y cannot give it)
    w_ptr,  # [N, K]
    s_ptr,  # [M, R] ACC: S = x·Aᵀ
    b_ptr,  # [N, R]
    M, N, K, R,
    stride_dym, stride_dyn, stride_pm, stride_pn, stride_ym, stride_yn, stride_xm, stride_xk,
    stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    scale, ratio, y_tiny,
    FROM_Y: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M·N may pass 2³¹
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if FROM_Y:
        g = tl.load(g_ptr + rn, mask=n_ok, other=1.0)
        g_safe = tl.where(g == 0.0, 1.0, g)
        bias = tl.zeros((BLOCK_N,), dtype=ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)
        err_y = tl.zeros((BLOCK_N,), dtype=ACC)  # Σ |dY|·(|y| + tiny): recovering P's dm error / u·|g|
        err_p = tl.zeros((BLOCK_N,), dtype=ACC)  # Σ |dY|·|y − b|: rounding P's dm error / u·|g|
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + rm
        m_ok = mm < M
        ok = m_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + mm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=ok, other=0.0).to(ACC)
        if FROM_Y:
            y = tl.load(y_ptr + mm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=ok, other=0.0).to(ACC)
            centred = y - bias[None, :]
            p = centred / g_safe[None, :]
            err_y += tl.sum(tl.abs(dy) * (tl.abs(y) + y_tiny), axis=0)
            err_p += tl.sum(tl.abs(dy) * tl.abs(centred), axis=0)
        else:
            p = tl.load(p_ptr + mm[:, None] * stride_pm + rn[None, :] * stride_pn, mask=ok, other=0.0).to(ACC)
        acc += dy * p
    dm = tl.sum(acc, axis=0)
    if FROM_Y:
        redo = (g == 0.0) | (err_y > ratio * err_p)
        if tl.max(redo.to(tl.int32), axis=0) > 0:  # P itself, x·Wᵀ + s·S·Bᵀ, for this block's columns
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for m0 in range(0, M, BLOCK_M):
                mm = m0 + rm
                m_ok = mm < M
                dy = tl.load(dy_ptr + mm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                             mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                acc += dy.to(ACC) * _dora_linear_recompute_p(
                    x_ptr, w_ptr, s_ptr, b_ptr, mm, rn, m_ok, n_ok, K, R, stride_xm, stride_xk, stride_wn, stride_wk,
                    stride_sm, stride_sr, stride_bn, stride_br, scale, DOT_DTYPE, ACC, PRECISION, BLOCK_M, BLOCK_N,
                    BLOCK_K, BLOCK_R)
            dm = tl.where(redo, tl.sum(acc, axis=0), dm)
    norm = tl.load(norm_ptr + rn, mask=n_ok, other=1.0)
    tl.store(dm_ptr + rn, dm / norm, mask=n_ok)


@triton.jit
def _dora_linear_recompute_p(
    x_ptr, w_ptr, s_ptr, b_ptr, mm, rn, m_ok, n_ok, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, scale,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """P = x·Wᵀ + s·S·Bᵀ [BLOCK_M, BLOCK_N] for rows ``mm`` and columns ``rn``, in ACC."""
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    p = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + mm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        p = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), p, input_precision=PRECISION, out_dtype=ACC)
    for r0 in range(0, R, BLOCK_R):  # into the same accumulator, s on the B tile (S may be large in fp16)
        r = r0 + rr
        r_ok = r < R
        sv = tl.load(s_ptr + mm[:, None] * stride_sm + r[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :],
                     other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + r[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0)
        p = tl.dot(sv.to(DOT_DTYPE), (b.to(ACC) * scale).to(DOT_DTYPE), p, input_precision=PRECISION, out_dtype=ACC)
    return p
