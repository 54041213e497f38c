"""The generic dual GEMM ``C = α₁·P₁·Q₁ + α₂·P₂·Q₂ + bias₁ + α₂·bias₂`` with optional
activation epilogues, an optional per-column scale (DoRA's ``g ⊙ (…) + b``), dropout of
whichever operand is x, and split-K: the shrink and main GEMM of the split route and every
backward product of the ops."""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import config
from .common import elem_size, strides_of
from .triton_common import act, act_grad, keep_scale, tile_ids


# Dropout sites of _dual_gemm_kernel: which operand is x (dropout applies to x only).
DROP_NONE, DROP_P1, DROP_Q1, DROP_ACC2 = 0, 1, 2, 3

# Epilogues of _dual_gemm_kernel.
EPI_NONE, EPI_ACT, EPI_ACT_GRAD = 0, 1, 2


@triton.jit
def _operand_tiles(p_ptr, q_ptr, rm, kk, rn, stride_pm, stride_pk, stride_qk, stride_qn, m_ok, k_ok, n_ok):
    """The P [BLOCK_M, len(kk)] and Q [len(kk), BLOCK_N] tiles of one K step, zero outside the operands."""
    p = tl.load(p_ptr + rm[:, None] * stride_pm + kk[None, :] * stride_pk, mask=m_ok[:, None] & k_ok[None, :],
                other=0.0)
    q = tl.load(q_ptr + kk[:, None] * stride_qk + rn[None, :] * stride_qn, mask=k_ok[:, None] & n_ok[None, :],
                other=0.0)
    return p, q


@triton.jit
def _dual_gemm_kernel(
    c_ptr,  # [M, N] out
    p1_ptr,  # [M, K1]
    q1_ptr,  # [K1, N]
    p2_ptr,  # [M, K2]   (HAS_SECOND)
    q2_ptr,  # [K2, N]   (HAS_SECOND)
    bias1_ptr,  # [N]    added once
    bias2_ptr,  # [N]    added times alpha2
    z_ptr,  # [M, N] fp32: written before f (EPILOGUE 1, STORE_Z) or read for f'(z) (EPILOGUE 2)
    #        (HAS_COL_SCALE with STORE_Z: the unscaled sum, in z's dtype)
    seed_ptr,  # [1] int64 (DROP != 0)
    col_ptr,  # [N] fp32: per-column scale (HAS_COL_SCALE)
    M, N, K1, K2,
    stride_cm, stride_cn, stride_p1m, stride_p1k, stride_q1k, stride_q1n,
    stride_p2m, stride_p2k, stride_q2k, stride_q2n, stride_zm, stride_zn,
    alpha1, alpha2, dropout_p, drop_ld,
    HAS_SECOND: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_Z: tl.constexpr, ACT: tl.constexpr, DROP: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_K2: tl.constexpr = 16, HAS_COL_SCALE: tl.constexpr = False, PLUS_UNDROPPED: tl.constexpr = False,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
            p, q = _operand_tiles(p2_ptr, q2_ptr, rm, kk, rn, stride_p2m, stride_p2k, stride_q2k, stride_q2n,
                                  m_ok, k_ok, n_ok)
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
        acc = acc * (alpha2 / alpha1)
        if DROP == 3:  # the second product is a gradient of x [M, N]: masked before the K loop
            acc = acc * keep_scale(seed, rm, pid_n * BLOCK_N, drop_ld, dropout_p, BLOCK_N)

    # Split-K: program pid_k reduces K1 blocks pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BLOCK_K, K1, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        k_ok = kk < K1
        p, q = _operand_tiles(p1_ptr, q1_ptr, rm, kk, rn, stride_p1m, stride_p1k, stride_q1k, stride_q1n,
                              m_ok, k_ok, n_ok)
        if DROP == 1:  # P1 is x [M, K1]
            p = p.to(ACC) * keep_scale(seed, rm, k0, drop_ld, dropout_p, BLOCK_K)
        if DROP == 2:  # Q1 is x [K1, N]
            q = q.to(ACC) * keep_scale(seed, kk, pid_n * BLOCK_N, drop_ld, dropout_p, BLOCK_N)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * alpha1

    if HAS_COL_SCALE:
        # C = g ⊙ (α₁·P₁·Q₁ + α₂·P₂·Q₂) + biases; with STORE_Z (and no activation epilogue)
        # z keeps the unscaled sum, in z's own dtype.
        if STORE_Z:
            tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, acc,
                     mask=m_ok[:, None] & n_ok[None, :])
        acc = acc * tl.load(col_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
        if PLUS_UNDROPPED:
            # DoRA with dropout (P₁ = x dropped above, α₁ = 1, col = g − 1): C = (g − 1) ⊙ P + x·Q₁ +
            # α₂·P₂·Q₂ + bias, P = x̃·Q₁ + α₂·P₂·Q₂; the passes again, x undropped, into the same
            # accumulator (α₂ scales the Q₂ tile: P₂ may be large in fp16).
            for k0 in range(0, K1, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < K1
                p, q = _operand_tiles(p1_ptr, q1_ptr, rm, kk, rn, stride_p1m, stride_p1k, stride_q1k, stride_q1n,
                                      m_ok, k_ok, n_ok)
                acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
            rk2 = tl.arange(0, BLOCK_K2)
            for k0 in range(0, K2, BLOCK_K2):
                kk = k0 + rk2
                k_ok = kk < K2
                p, q = _operand_tiles(p2_ptr, q2_ptr, rm, kk, rn, stride_p2m, stride_p2k, stride_q2k, stride_q2n,
                                      m_ok, k_ok, n_ok)
                acc = tl.dot(p.to(DOT_DTYPE), (q.to(ACC) * alpha2).to(DOT_DTYPE), acc, input_precision=PRECISION,
                             out_dtype=ACC)

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
        acc = act(acc, ACT)
    elif EPILOGUE == 2:
        acc = acc * act_grad(tl.load(z_ptrs, mask=mask, other=0.0), ACT)

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc, mask=mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# Operands the JIT cannot prove 16-byte aligned are loaded through registers, not cp.async: it
# specialises an integer stride only when it is divisible by 16 (K = 1000 is not), and a base
# address only when 16-byte aligned. At 128×128 tiles with 3 stages the dX launch then spills
# (16/8 B per thread at K = 1000, bf16); 128×64 tiles with 2 stages do not (236 registers).
UNALIGNED_STAGES, UNALIGNED_BLOCK_N = 2, 64
DROP_PER_THREAD = 32  # dropped-operand elements per thread and K step (more: Philox state spills or costs registers)


def _aligned(*operands) -> bool:
    """Whether the JIT can prove every given operand 16-byte aligned: base address a multiple of
    16 bytes, every non-unit stride a multiple of 16 elements."""
    for t in operands:
        if t is None:
            continue
        if t.data_ptr() % 16 or any(st != 1 and st % 16 for st in t.stride()):
            return False
    return True


def gemm(out, p1, q1, *, p2=None, q2=None, bias1=None, bias2=None, z=None, store_z=False,
         epilogue=EPI_NONE, act=0, alpha1=1.0, alpha2=1.0, seed=None, dropout_p=0.0,
         drop=DROP_NONE, drop_ld=0, dot_dtype, allow_split_k=False, col_scale=None, plus_undropped=False):
    """Semantics: out = act-epilogue(α₁·p1·q1 + α₂·p2·q2 + bias1 + α₂·bias2); with
    ``col_scale`` g (and no activation epilogue): out = g ⊙ (α₁·p1·q1 + α₂·p2·q2) + bias1 +
    α₂·bias2, and ``store_z`` writes the unscaled α₁·p1·q1 + α₂·p2·q2 to z (in z's dtype);
    ``plus_undropped`` (with ``col_scale``, p1 = x dropped by ``drop=DROP_P1``, a second product,
    α₁ = 1) adds p1·q1 + α₂·p2·q2 again without dropout: DoRA's y = (g − 1) ⊙ P + x·Wᵀ + s·S·Bᵀ + b.

    Shapes: out [M, N], p1 [M, K1], q1 [K1, N], p2 [M, K2], q2 [K2, N], bias [N], z [M, N]
    fp32 (any floating dtype with ``col_scale``), col_scale [N] fp32 (fp64 for fp64
    operands); any strides (1-D vectors contiguous). With ``allow_split_k`` (backward only:
    the atomics make the summation order vary), a contiguous float32 ``out`` with no
    epilogue, no second product and no z may be reduced with split-K; it is zero-filled first.
    """
    m, n = out.shape
    k1 = p1.shape[1]
    k2 = p2.shape[1] if p2 is not None else 0
    if m == 0 or n == 0:
        return out
    cfg = config.gemm_config(m, n, elem_size(dot_dtype), device=out.device)
    if not _aligned(p1, q1, p2, q2):
        cfg = cfg._replace(num_stages=min(cfg.num_stages, UNALIGNED_STAGES),
                           block_n=min(cfg.block_n, UNALIGNED_BLOCK_N))
    if drop in (DROP_P1, DROP_Q1):  # Philox in the K loop: at most DROP_PER_THREAD elements a thread per step
        width = cfg.block_m if drop == DROP_P1 else cfg.block_n
        while cfg.block_k > 16 and width * cfg.block_k > DROP_PER_THREAD * 32 * cfg.num_warps:
            cfg = cfg._replace(block_k=cfg.block_k // 2)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    splits = 1
    if (allow_split_k and out.dtype in (torch.float32, torch.float64) and epilogue == EPI_NONE and p2 is None
            and out.is_contiguous() and not store_z):
        splits = config.split_k(tiles, k1, cfg.block_k, out.device)
    if splits > 1:
        out.zero_()
    _dual_gemm_kernel[(tiles, splits)](
        out, p1, q1,
        p2 if p2 is not None else out, q2 if q2 is not None else out,
        bias1 if bias1 is not None else out, bias2 if bias2 is not None else out,
        z if z is not None else out, seed if seed is not None else out,
        col_scale if col_scale is not None else out,
        m, n, k1, k2,
        *out.stride(), *p1.stride(), *q1.stride(), *strides_of(p2), *strides_of(q2), *strides_of(z),
        alpha1, alpha2, dropout_p, drop_ld,
        HAS_SECOND=p2 is not None, HAS_BIAS1=bias1 is not None, HAS_BIAS2=bias2 is not None,
        EPILOGUE=epilogue, STORE_Z=store_z, ACT=act, DROP=drop, SPLIT_K=splits, HAS_COL_SCALE=col_scale is not None,
        PLUS_UNDROPPED=plus_undropped,
        **dot_dtype, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
