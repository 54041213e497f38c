"""Triton kernels of the fused adapter linear (docs/design-notes.md, docs/compiled-code.md).

Two kernels cover forward and backward:

* ``_adapter_linear_onepass_kernel``: each program owns a ``BLOCK_M×BLOCK_N`` tile of y; one K loop
  accumulates ``x·Wᵀ`` and ``x̃·Aᵀ`` from the same x tile; the epilogue applies a, f,
  multiplies by the B tile and adds b + s·c. y is written once; the program with
  ``pid_n == 0`` also writes z for backward.
* ``_dual_gemm_kernel``: ``C = α₁·P₁·Q₁ + α₂·P₂·Q₂ + bias₁ + α₂·bias₂`` with an optional
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

from ..triton_common import act, keep_elem, keep_scale, load_rows, tile_ids, unit


@triton.jit
def _adapter_linear_onepass_kernel(
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
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    rm_ld, xm_ok = load_rows(rm, M, unit(stride_xk))
    rn_ld, wn_ok = load_rows(rn, N, unit(stride_wk))
    x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn_ld[None, :] * stride_wn + rk[:, None] * stride_wk
    a_ptrs = aw_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=xm_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=wn_ok[None, :] & k_ok[:, None], other=0.0)
        at = tl.load(a_ptrs, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        x = x.to(DOT_DTYPE)
        acc = tl.dot(x, wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
        if DROPOUT:
            x = (x.to(ACC) * keep_scale(seed, rm, k0, K, dropout_p, BLOCK_K)).to(DOT_DTYPE)
        acc_z = tl.dot(x, at.to(DOT_DTYPE), acc_z, input_precision=PRECISION, out_dtype=ACC)
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
        acc += scale * tl.dot(act(acc_z, ACT).to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION,
                              out_dtype=ACC)
    else:
        # Into the one accumulator: a second BLOCK_M×BLOCK_N fp32 tile would cost ~40
        # registers a thread and halve occupancy. bf16 has fp32's range: no overflow.
        acc = tl.dot((scale * act(acc_z, ACT)).to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_BB:
        acc += scale * tl.load(bb_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _adapter_linear_dropout_mask_kernel(out_ptr, seed_ptr, M, K, p, BLOCK: tl.constexpr):
    """keep[m, k] as the kernels draw it (for tests and for users who want the mask)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * K
    keep = keep_elem(tl.load(seed_ptr), offs // K, offs % K, K, p)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=ok)
