"""Triton kernels of the fused adapter linear (DESIGN §2).

Two kernels cover forward and backward:

* ``_onepass_fwd_kernel``: each program owns a ``BLOCK_M×BLOCK_N`` tile of y; one K loop
  accumulates ``x·Wᵀ`` and ``x̃·Aᵀ`` from the same x tile; the epilogue applies a, f,
  multiplies by the B tile and adds b + s·c. y is written once; the program with
  ``pid_n == 0`` also writes z for backward.
* ``_gemm_kernel``: ``C = α₁·P₁·Q₁ + α₂·P₂·Q₂ + bias₁ + α₂·bias₂`` with an optional
  epilogue (store z then apply f; or multiply by f'(z)), optional dropout of whichever
  operand is x (or of the second product, when it is a gradient of x)
  and optional split-K. It is the shrink and the main GEMM of the split route, and every
  backward product (``dX = dY·W + dZ·A`` is one GEMM with the rank chunk as extra K).

Dot operands are cast to ``DOT_DTYPE`` (the input dtype; float32 for bf16 under the Triton
interpreter, whose bf16 ``tl.dot`` multiplies bit patterns); accumulation is ``ACC``:
float32, or float64 for float64 inputs (so gradcheck can run the kernels).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import ACTIVATIONS

# Activation code i is reference.ACTIVATIONS[i] (the kernels branch on the code).
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}

# Dropout sites of _gemm_kernel: which operand is x (dropout applies to x only).
DROP_NONE, DROP_P1, DROP_Q1, DROP_ACC2 = 0, 1, 2, 3
# Epilogues of _gemm_kernel.
EPI_NONE, EPI_ACT, EPI_ACT_GRAD = 0, 1, 2


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """f(z) in fp32; every f has f(0) = 0, so masked (zero) rank columns stay zero."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * _sigmoid(2.0 * u)  # 0.5·z·(1 + tanh(u)) = z·σ(2u)
    elif ACT == 4:
        z = z * _sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """f'(z) in fp32 (relu'(0) = 0)."""
    if ACT == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        t = 2.0 * _sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        sg = _sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _keep_scale(seed, rows, cols, ld, p):
    """Dropout multiplier of x[rows, cols] (x has leading dim ``ld``): 1/(1-p) kept, 0 dropped.

    The mask is a pure function of (seed, row·ld + col), so backward regenerates it.
    """
    r = tl.rand(seed, rows.to(tl.int64) * ld + cols)
    return tl.where(r >= p, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles: GROUP_M row tiles sweep N together."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def _onepass_fwd_kernel(
    y_ptr,  # [M, N] out, x's dtype
    z_ptr,  # [M, R] fp32 out: z = x̃·Aᵀ + a (written when STORE_Z)
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]
    aw_ptr,  # [R, K]
    ab_ptr,  # [R]
    bw_ptr,  # [N, R]
    bb_ptr,  # [N]
    seed_ptr,  # [1] int64
    M, N, K, R,
    stride_ym, stride_yn, stride_zm, stride_zr,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br,
    scale, dropout_p,
    HAS_BIAS: tl.constexpr, HAS_AB: tl.constexpr, HAS_BB: tl.constexpr,
    STORE_Z: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M·N may pass 2³¹
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_z = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        at = tl.load(aw_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        x = x.to(DOT_DTYPE)
        acc = tl.dot(x, wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            x = (x.to(ACC) * _keep_scale(seed, rm[:, None], kk[None, :], K, dropout_p)).to(DOT_DTYPE)
        acc_z = tl.dot(x, at.to(DOT_DTYPE), acc_z, input_precision=PRECISION)

    if HAS_AB:
        acc_z += tl.load(ab_ptr + rr, mask=r_ok, other=0.0).to(ACC)[None, :]
    if STORE_Z:
        if pid_n == 0:
            tl.store(z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr, acc_z,
                     mask=m_ok[:, None] & r_ok[None, :])
    bt = tl.load(bw_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                 mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    # f(z)·Bᵀ in its own accumulator, scaled in ACC: scale·f(z) rounded to fp16 could overflow.
    acc += scale * tl.dot(_act(acc_z, ACT).to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION,
                          out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_BB:
        acc += scale * tl.load(bb_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_kernel(
    c_ptr,  # [M, N] out
    p1_ptr,  # [M, K1]
    q1_ptr,  # [K1, N]
    p2_ptr,  # [M, K2]   (HAS_SECOND)
    q2_ptr,  # [K2, N]   (HAS_SECOND)
    bias1_ptr,  # [N]    added once
    bias2_ptr,  # [N]    added times alpha2
    z_ptr,  # [M, N] fp32: written before f (EPILOGUE 1, STORE_Z) or read for f'(z) (EPILOGUE 2)
    seed_ptr,  # [1] int64 (DROP != 0)
    M, N, K1, K2,
    stride_cm, stride_cn, stride_p1m, stride_p1k, stride_q1k, stride_q1n,
    stride_p2m, stride_p2k, stride_q2k, stride_q2n, stride_zm, stride_zn,
    alpha1, alpha2, dropout_p, drop_ld,
    HAS_SECOND: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_Z: tl.constexpr, ACT: tl.constexpr, DROP: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M·N may pass 2³¹
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rk = rk.to(tl.int64)  # K1 may count tokens (dW = dYᵀ·x): row offsets past 2³¹
    m_ok = rm < M
    n_ok = rn < N
    seed = 0
    if DROP != 0:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # Split-K: program pid_k reduces K1 blocks pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BLOCK_K, K1, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        k_ok = kk < K1
        p = tl.load(p1_ptr + rm[:, None] * stride_p1m + kk[None, :] * stride_p1k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q1_ptr + kk[:, None] * stride_q1k + rn[None, :] * stride_q1n,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DROP == 1:  # P1 is x [M, K1]
            p = p.to(ACC) * _keep_scale(seed, rm[:, None], kk[None, :], drop_ld, dropout_p)
        if DROP == 2:  # Q1 is x [K1, N]
            q = q.to(ACC) * _keep_scale(seed, kk[:, None], rn[None, :], drop_ld, dropout_p)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * alpha1

    if HAS_SECOND:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K2
            p = tl.load(p2_ptr + rm[:, None] * stride_p2m + kk[None, :] * stride_p2k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(q2_ptr + kk[:, None] * stride_q2k + rn[None, :] * stride_q2n,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc2, input_precision=PRECISION)
        acc2 = acc2 * alpha2
        if DROP == 3:  # the second product is a gradient of x [M, N]
            acc2 = acc2 * _keep_scale(seed, rm[:, None], rn[None, :], drop_ld, dropout_p)
        acc += acc2

    if pid_k == 0:
        if HAS_BIAS1:
            acc += tl.load(bias1_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
        if HAS_BIAS2:
            acc += alpha2 * tl.load(bias2_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]

    mask = m_ok[:, None] & n_ok[None, :]
    z_ptrs = z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn
    if EPILOGUE == 1:
        if STORE_Z:
            tl.store(z_ptrs, acc, mask=mask)
        acc = _act(acc, ACT)
    elif EPILOGUE == 2:
        acc = acc * _act_grad(tl.load(z_ptrs, mask=mask, other=0.0), ACT)

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc, mask=mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, M, K, p, BLOCK: tl.constexpr):
    """keep[m, k] as the kernels draw it (for tests and for users who want the mask)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * K
    keep = _keep_scale(tl.load(seed_ptr), offs // K, offs % K, K, p) > 0.0
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=ok)
