"""Triton kernels for batches in which every row may use a different adapter (docs/design-notes.md).

Row i with slot s = ids[i] (``-1``: base only) computes::

    z_i = x_i·A_s[:r_s]ᵀ + a_s,   y_i = x_i·Wᵀ + b + scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s)

Three kernels, each iterating, inside a block of rows, over the slots present in that block
(``_next_slot``), so that every adapter product is a tensor-core ``tl.dot`` on the rows
that use that slot and rows of other slots receive an exact zero:

* ``_mixed_adapter_linear_shrink_kernel``: ``P[split] = x·A_sᵀ`` over one K range per split (partials are
  reduced in a fixed order by the consumer: no atomics, so the forward is bitwise
  reproducible and batch invariant; backward's per-slot sums follow the row sort, which
  the CUDA alignment op does not keep stable).
* ``_mixed_adapter_linear_kernel``: ``y = x·Wᵀ + b`` on a row block, then per present slot
  ``z = ΣP + a_s`` → ``f_s`` → ``·B_sᵀ`` in the epilogue; y is written once.
* ``_mixed_adapter_linear_segment_kernel``: per-slot reductions over that slot's rows for backward
  (``dA_s = Σ dZᵀ·x``, ``dB_s = scale_s·Σ dYᵀ·f(z)``).

Rows are read through an optional permutation (rows sorted by slot, from the alignment
op) so that a block holds few distinct slots at large M; at decode sizes rows stay in order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_common import act, load_rows, tile_ids, unit


NO_SLOT: tl.constexpr = tl.constexpr(1 << 30)  # "no further slot" sentinel of _next_slot


@triton.jit
def _next_slot(slots, after):
    """Smallest slot in ``slots`` greater than ``after`` (NO_SLOT if none)."""
    return tl.min(tl.where(slots > after, slots, NO_SLOT), axis=0)


@triton.jit
def _act_by_code(z, code):
    """f(z) for a run-time activation code (one per slot in a mixed pool)."""
    out = z
    out = tl.where(code == 1, act(z, 1), out)
    out = tl.where(code == 2, act(z, 2), out)
    out = tl.where(code == 3, act(z, 3), out)
    out = tl.where(code == 4, act(z, 4), out)
    return out


@triton.jit
def _block_rows(pid_m, perm_ptr, ids_ptr, M, S, BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
    """Rows of block ``pid_m`` (through the permutation when SORTED) and their slots.

    Positions past M give row 0 (a valid row: loads need no row mask) with ``ok`` False.

    Ids outside [0, S) count as -1 (base only): the host validates ids in eager mode, and
    under torch.compile or graph capture, where it cannot, nothing is read out of bounds.
    """
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = j < M
    rows = tl.where(ok, j, 0)  # positions past M stand for row 0: always a valid row to read
    if SORTED:
        rows = tl.load(perm_ptr + j, mask=ok, other=0)
    slots = tl.load(ids_ptr + rows, mask=ok, other=-1).to(tl.int32)
    slots = tl.where((slots >= 0) & (slots < S), slots, -1)
    return rows.to(tl.int64), ok, slots


@triton.jit
def _mixed_adapter_linear_shrink_kernel(
    p_ptr,  # [SPLIT, M, R] out (fp32): x·A_sᵀ over this split's K range
    x_ptr,  # [M, K]
    a_ptr,  # [S, R, K]
    ids_ptr,  # [M] int32/int64, -1 = base only
    perm_ptr,  # [M] int32 rows sorted by slot (SORTED)
    ranks_ptr,  # [S] int32 (HAS_RANKS)
    M, K, R, S, k_per_split,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
    SORTED: tl.constexpr, HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows, ok, slots = _block_rows(tl.program_id(0), perm_ptr, ids_ptr, M, S, BLOCK_M, SORTED)
    split = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    out = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    s = _next_slot(slots, -1)
    while s < NO_SLOT:
        rank = R
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + s)
        r_ok = rr < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        k_end = tl.where(tl.program_id(2) * BLOCK_R < rank, k_hi, k_lo)  # rank tile past the slot's rank: skip
        for k0 in range(k_lo, k_end, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + s.to(tl.int64) * stride_as + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), at.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
        out = tl.where((slots == s)[:, None], acc, out)
        s = _next_slot(slots, s)
    tl.store(p_ptr + split * M * R + rows[:, None] * R + rr[None, :], out, mask=ok[:, None] & (rr < R)[None, :])


@triton.jit
def _mixed_adapter_linear_kernel(
    y_ptr,  # [M, N] out
    z_ptr,  # [M, R] out (STORE_Z; arrives zero-filled): z = ΣP + a_s for rows with a slot
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]
    p_ptr,  # [SPLIT, M, R] fp32 partials of x·A_sᵀ (or dZ itself, SPLIT=1, in backward)
    ab_ptr,  # [S, R]
    b_ptr,  # [S, N, R]
    bb_ptr,  # [S, N]
    scales_ptr,  # [S] fp32
    ranks_ptr,  # [S] int32
    acts_ptr,  # [S] int32 activation codes
    ids_ptr,  # [M]
    perm_ptr,  # [M] int32 (SORTED)
    M, N, K, R, S, SPLIT,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_abs, stride_abr, stride_bs, stride_bn, stride_br, stride_bbs, stride_bbn,
    SORTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AB: tl.constexpr, HAS_BB: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_ACTS: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, ok, slots = _block_rows(pid_m, perm_ptr, ids_ptr, M, S, BLOCK_M, SORTED)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # Rows past M read row 0 (_block_rows) and, for a row-major W, columns past N column
    # N-1, dropped at the store: the K loop masks K only, and its pointers advance by
    # BLOCK_K (200 → 126 registers with the epilogue below, benchmarks/kernel_report.py).
    rn_ld, wn_ok = load_rows(rn, N, unit(stride_wk))
    x_ptrs = x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn_ld[None, :] * stride_wn + rk[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=wn_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]

    s = _next_slot(slots, -1)
    while s < NO_SLOT:
        s64 = s.to(tl.int64)
        rank = R
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + s)
        sel = ok & (slots == s)
        scale = 1.0
        if HAS_SCALES:
            scale = tl.load(scales_ptr + s)
        # a slot's real rank bounds its rank loop; one or two iterations: not pipelined
        for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            zmask = sel[:, None] & r_ok[None, :]
            z = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            for sp in tl.range(0, SPLIT, num_stages=1):
                z += tl.load(p_ptr + sp * M * R + rows[:, None] * R + rr[None, :], mask=zmask, other=0.0)
            if HAS_AB:
                ab = tl.load(ab_ptr + s64 * stride_abs + rr * stride_abr, mask=r_ok, other=0.0).to(ACC)
                z = tl.where(zmask, z + ab[None, :], 0.0)
            if STORE_Z:
                if pid_n == 0:
                    tl.store(z_ptr + rows[:, None] * R + rr[None, :], z, mask=zmask)
            if HAS_ACTS:
                z = tl.where(zmask, _act_by_code(z, tl.load(acts_ptr + s)), 0.0)
            bt = tl.load(b_ptr + s64 * stride_bs + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                         mask=n_ok[None, :] & r_ok[:, None], other=0.0)
            if DOT_DTYPE == tl.float16:
                # scaled in ACC after the dot: scale·z in fp16 could overflow, and a non-finite
                # scale must not reach rows of other slots through 0·inf.
                acc += tl.where(sel[:, None], scale * tl.dot(z.to(DOT_DTYPE), bt.to(DOT_DTYPE),
                                                             input_precision=PRECISION, out_dtype=ACC), 0.0)
            else:
                # Into the one accumulator (no second BLOCK_M×BLOCK_N fp32 tile); rows of other
                # slots get exact zeros, so a non-finite scale stays in its own rows.
                zs = tl.where(sel[:, None], scale * z, 0.0)
                acc = tl.dot(zs.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BB:
            bb = tl.load(bb_ptr + s64 * stride_bbs + rn * stride_bbn, mask=n_ok, other=0.0).to(ACC)
            acc += tl.where(sel[:, None], scale * bb[None, :], 0.0)
        s = _next_slot(slots, s)

    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _mixed_adapter_linear_segment_kernel(
    out_ptr,  # [S, P_COLS, Q_COLS] out (fp32): out[s] = alpha_s · Σ_{rows of s} P[row]ᵀ ⊗ Q[row]
    p_ptr,  # [M, P_COLS]
    q_ptr,  # [M, Q_COLS]
    perm_ptr,  # [M] int32 rows sorted by slot
    offsets_ptr,  # [S + 1] int32: slot s owns sorted positions [offsets[s], offsets[s+1])
    scales_ptr,  # [S] fp32 (HAS_SCALES)
    P_COLS, Q_COLS,
    stride_pm, stride_pc, stride_qm, stride_qc,
    HAS_SCALES: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # SPLIT programs share a slot's rows (row blocks part, part + SPLIT, ...) and add their
    # sums atomically into the zero-filled output; SPLIT = 1 stores (deterministic).
    s = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    ri = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_K)
    i_ok = ri < P_COLS
    j_ok = rj < Q_COLS
    lo = tl.load(offsets_ptr + s)
    hi = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for t0 in range(lo + part * BLOCK_K, hi, BLOCK_K * SPLIT):
        t_ok = (t0 + rt) < hi
        rows = tl.load(perm_ptr + t0 + rt, mask=t_ok, other=0).to(tl.int64)
        pt = tl.load(p_ptr + rows[None, :] * stride_pm + ri[:, None] * stride_pc,
                     mask=i_ok[:, None] & t_ok[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + rj[None, :] * stride_qc,
                    mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(pt.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_SCALES:
        acc = acc * tl.load(scales_ptr + s)
    out_ptrs = out_ptr + s.to(tl.int64) * P_COLS * Q_COLS + ri[:, None] * Q_COLS + rj[None, :]
    if SPLIT > 1:
        tl.atomic_add(out_ptrs, acc, mask=i_ok[:, None] & j_ok[None, :])
    else:
        tl.store(out_ptrs, acc, mask=i_ok[:, None] & j_ok[None, :])
