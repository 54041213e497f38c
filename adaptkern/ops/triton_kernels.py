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

Register budget (docs/compiled-code.md; ``benchmarks/kernel_report.py`` measures it on sm_90a
and CI holds the ceilings): every product accumulates into the one BLOCK_M×BLOCK_N fp32 tile
(the rank product of the split GEMM before the K loop, the one-pass epilogue as
``acc = dot((s·f(z)).to(DOT_DTYPE), Bᵀ, acc)`` except in fp16, where s·f(z) could overflow).
Dropout draws one Philox-4x32-10 call per four neighbouring elements of x, compared as
integers against p·2³² (``_keep_scale``; ``_keep_elem`` reads the same stream element by
element for ``dropout_mask``).
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


if hasattr(triton, "constexpr_function"):

    @triton.constexpr_function
    def _unit(stride):
        """Whether ``stride`` is the compile-time constant 1 (the JIT folds integer arguments
        equal to 1 into constants): the other dimension of that operand is the strided one."""
        return isinstance(stride, int) and stride == 1

else:  # older Triton: no compile-time test, always the masked (always vectorisable) form

    @triton.jit
    def _unit(stride):
        return False


@triton.jit
def _load_rows(idx, n, STRIDED: tl.constexpr):
    """Row (or column) indices to load and the mask for them. Along a strided dimension,
    indices past ``n`` are clamped to n-1 (a valid row, dropped at the store): no mask in
    the K loop. Along the contiguous dimension clamping would hide the contiguity from
    Triton's alignment analysis (16-byte copies become 2-byte loads), so there it masks."""
    if STRIDED:
        return tl.minimum(idx, n - 1), tl.full(idx.shape, True, tl.int1)
    return idx, idx < n


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
        # Φ(z) + z·φ(z), with exp(-z²/2) as exp2(-z²/(2·ln 2)): the 128×128 epilogue of dZ
        # fits in 244 registers (the exp form spilled 12 B a thread).
        g = 0.5 * tl.math.erf(z * 0.7071067811865476) + (
            0.5 + z * 0.3989422804014327 * tl.exp2(-0.7213475204444817 * z * z))
    elif ACT == 3:
        t = 2.0 * _sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        sg = _sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _keep_threshold(p):
    """Dropout keeps x[r, c] when its 32-bit draw is >= p·2³² (integer compare)."""
    return tl.to_tensor(p * 4294967296.0).to(tl.uint32)


@triton.jit
def _keep_scale(seed, rows, c0, ld, p, BC: tl.constexpr):
    """Dropout multiplier [len(rows), BC] of x[rows, c0:c0+BC] (x has leading dim ``ld``;
    c0 % 4 == 0): 1/(1-p) kept, 0 dropped.

    One Philox-4x32-10 call gives the draws of four neighbouring columns: counter
    row·⌈ld/4⌉ + col//4, lane col % 4 (the stream ``_keep_elem`` reads element by element).
    The mask is a pure function of (seed, row, col), so backward regenerates it.
    """
    g = rows.to(tl.int64)[:, None] * ((ld + 3) // 4) + (c0 // 4 + tl.arange(0, BC // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, g)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (g.shape[0], BC))
    return tl.where(r >= _keep_threshold(p), 1.0 / (1.0 - p), 0.0)


@triton.jit
def _keep_elem(seed, rows, cols, ld, p):
    """``_keep_scale`` element by element: True where x[rows, cols] is kept."""
    r0, r1, r2, r3 = tl.randint4x(seed, rows.to(tl.int64) * ((ld + 3) // 4) + cols // 4)
    lane = cols % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r >= _keep_threshold(p)


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
    # Row-major x and W: rows past M (N) read row M-1 (N-1), dropped at the store, so the K
    # loop masks K only; pointers advance by BLOCK_K (as Triton's matmul tutorial): 124 → 120
    # registers and 141 → 117 SASS instructions per iteration at 128×128×64
    # (benchmarks/kernel_report.py).
    rm_ld, xm_ok = _load_rows(rm, M, _unit(stride_xk))
    rn_ld, wn_ok = _load_rows(rn, N, _unit(stride_wk))
    x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn_ld[None, :] * stride_wn + rk[:, None] * stride_wk
    a_ptrs = aw_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=xm_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=wn_ok[None, :] & k_ok[:, None], other=0.0)
        at = tl.load(a_ptrs, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        x = x.to(DOT_DTYPE)
        acc = tl.dot(x, wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            x = (x.to(ACC) * _keep_scale(seed, rm, k0, K, dropout_p, BLOCK_K)).to(DOT_DTYPE)
        acc_z = tl.dot(x, at.to(DOT_DTYPE), acc_z, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    if HAS_AB:
        acc_z += tl.load(ab_ptr + rr, mask=r_ok, other=0.0).to(ACC)[None, :]
    if STORE_Z:
        if pid_n == 0:
            tl.store(z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr, acc_z,
                     mask=m_ok[:, None] & r_ok[None, :])
    bt = tl.load(bw_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                 mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    if DOT_DTYPE == tl.float16:
        # f(z)·Bᵀ in its own accumulator, scaled in ACC: scale·f(z) rounded to fp16 could overflow.
        acc += scale * tl.dot(_act(acc_z, ACT).to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION,
                              out_dtype=ACC)
    else:
        # Into the one accumulator: a second BLOCK_M×BLOCK_N fp32 tile would cost ~40
        # registers a thread and halve occupancy. bf16 has fp32's range: no overflow.
        acc = tl.dot((scale * _act(acc_z, ACT)).to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
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
    BLOCK_K2: tl.constexpr = 16,
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
    if HAS_SECOND:
        # The rank product first, into the one accumulator (a second BLOCK_M×BLOCK_N fp32
        # accumulator costs 64 registers a thread at 128×128 on 8 warps and halves
        # occupancy), over a rank-sized K tile: BLOCK_K2 = 16 = block_r(16), not BLOCK_K=64
        # with 75 % masked (217 → 119 registers, benchmarks/kernel_report.py). Larger ranks
        # loop: P₂ is fp32 in memory, and a 64-wide P₂ tile costs 40 registers (R=256: 117
        # at 16, 160 at 64). Scaled by α₂/α₁ here, so that the final ×α₁ leaves α₂·P₂·Q₂
        # (callers pass α₁ = 1; α₁ must not be 0 with a second product).
        rk2 = tl.arange(0, BLOCK_K2)
        for k0 in range(0, K2, BLOCK_K2):
            kk = k0 + rk2
            k_ok = kk < K2
            p = tl.load(p2_ptr + rm[:, None] * stride_p2m + kk[None, :] * stride_p2k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(q2_ptr + kk[:, None] * stride_q2k + rn[None, :] * stride_q2n,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
        acc = acc * (alpha2 / alpha1)
        if DROP == 3:  # the second product is a gradient of x [M, N]: masked before the K loop
            acc = acc * _keep_scale(seed, rm, pid_n * BLOCK_N, drop_ld, dropout_p, BLOCK_N)

    # Split-K: program pid_k reduces K1 blocks pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BLOCK_K, K1, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        k_ok = kk < K1
        p = tl.load(p1_ptr + rm[:, None] * stride_p1m + kk[None, :] * stride_p1k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q1_ptr + kk[:, None] * stride_q1k + rn[None, :] * stride_q1n,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DROP == 1:  # P1 is x [M, K1]
            p = p.to(ACC) * _keep_scale(seed, rm, k0, drop_ld, dropout_p, BLOCK_K)
        if DROP == 2:  # Q1 is x [K1, N]
            q = q.to(ACC) * _keep_scale(seed, kk, pid_n * BLOCK_N, drop_ld, dropout_p, BLOCK_N)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * alpha1

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
    keep = _keep_elem(tl.load(seed_ptr), offs // K, offs % K, K, p)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=ok)
