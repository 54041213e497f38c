"""Triton kernels of the fused DoRA linear (the GEMMs are launches of ``ops/gemm.py``'s dual GEMM).

* ``_dora_linear_norm_kernel``: the detached row norm ``n = ‖W + s·B·A‖_row`` and, when a
  magnitude is given, the output scale ``g = m / n``. Each program owns ``BLOCK_N`` rows; its
  K loop forms the tile ``W + s·(B·A)`` in the accumulator dtype (B·A one rank-sized dot per
  tile, never stored) and sums its squares. Forming the tile, rather than expanding
  ``‖W_n‖² + 2s·W_n·(AᵀB_n) + s²‖B_n·A‖²``, costs the same flops and one read of W but never
  cancels: each squared element is the fp32 value of ``W + s·B·A`` itself, so the norm is as
  exact as fp32 sums of squares, whatever the adapter does to a row.
* ``_dora_linear_colsum_kernel``: ``dm_n = Σ_m dY[m, n]·P[m, n] / n_n`` (fp32 accumulation), the
  magnitude's gradient from the saved pre-scale output P.
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
    p_ptr,  # [M, N]: x̃·Wᵀ + s·S·Bᵀ as the forward stored it
    norm_ptr,  # [N] ACC
    M, N,
    stride_dym, stride_dyn, stride_pm, stride_pn,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M·N may pass 2³¹
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + rm
        ok = (mm < M)[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + mm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=ok, other=0.0)
        p = tl.load(p_ptr + mm[:, None] * stride_pm + rn[None, :] * stride_pn, mask=ok, other=0.0)
        acc += dy.to(ACC) * p.to(ACC)
    norm = tl.load(norm_ptr + rn, mask=n_ok, other=1.0)
    tl.store(dm_ptr + rn, tl.sum(acc, axis=0) / norm, mask=n_ok)
