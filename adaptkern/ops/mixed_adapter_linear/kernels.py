"""Triton kernels for batches in which every row may use a different adapter (docs/design-notes.md).

Row i with slot s = ids[i] (``-1``: base only) computes::

    z_i = x_i·A_s[:r_s]ᵀ + a_s,   y_i = x_i·Wᵀ + b + scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s)

With per-slot column scales G [S, N] (``HAS_COL_SCALE``: DoRA slots, g_s = m_s / ‖W + s_s·B_s·A_s‖_row)
all but the bias is scaled: y_i = G_s ⊙ (x_i·Wᵀ + scale_s·(…)) + b (rows without a slot: ·1).

With output slices (q/k/v, gate/up: slice i owns columns [o_i, o_i + N_i) and has its own
A_i, B_i), slice i's columns get scale_s·(x_i·A_{i,s}[:r_s]ᵀ)·B_{i,s}[:, :r_s]ᵀ; the slices are a
tuple of tensors (``NS`` of them) walked with a static loop.

Three kernels, each iterating, inside a block of rows, over the slots present in that block
(``_next_slot``), so that every adapter product is a tensor-core ``tl.dot`` on the rows
that use that slot and rows of other slots receive an exact zero:

* ``_mixed_adapter_linear_shrink_kernel``: ``P[i, split] = x·A_{i,s}ᵀ`` over one K range per split
  (partials are reduced in a fixed order by the consumer: no atomics, so the forward is
  bitwise reproducible and batch invariant). With ``SCALE`` and one split it is the
  serving stacks' shrink (``lora_shrink``).
* ``_mixed_adapter_linear_kernel``: per slice and present slot ``z = ΣP + a_s`` → ``f_s`` →
  ``·B_{i,s}ᵀ`` into the accumulator (which starts at zero, or at y's own values, ``ADD``), then
  ``+ x·Wᵀ + b`` on the row block (``BASE``); y is written once. Without ``BASE`` it is the
  expand of serving stacks; with ``FUSED_SHRINK`` it recomputes z from x and A itself (the
  one-launch delta at decode).
* ``_mixed_adapter_linear_segment_kernel``: per-slot reductions over that slot's rows for backward
  (``dA_s = Σ dZᵀ·x``, ``dB_s = scale_s·Σ dYᵀ·f(z)``).

Rows are read through an optional permutation (rows sorted by slot, from the slot metadata,
``rows.py``) so that a block holds few distinct slots at large M; at decode sizes rows stay in order.
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
def _rows_again(pid_m, perm_ptr, M, BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
    """The rows of _block_rows, derived anew from the block's first position: a load Triton's
    CSE does not merge with _block_rows' (a plain reload would be, and held across loops)."""
    i = tl.arange(0, BLOCK_M)
    left = M - pid_m * BLOCK_M
    rows = tl.where(i < left, pid_m * BLOCK_M + i, 0)
    if SORTED:
        rows = tl.load(perm_ptr + pid_m * BLOCK_M + i, mask=i < left, other=0)
    return rows.to(tl.int64)


@triton.jit
def _mixed_adapter_linear_shrink_kernel(
    p_ptr,  # [NS, SPLIT, M, R] out (fp32): x·A_{i,s}ᵀ over this split's K range (SCALE: ·scale_s)
    x_ptr,  # [M, K]
    a_ptrs,  # NS × [S, R, K]
    ids_ptr,  # [M] int32/int64, -1 = base only
    perm_ptr,  # [M] int32 rows sorted by slot (SORTED)
    ranks_ptr,  # [S] int32 (HAS_RANKS)
    scales_ptr,  # [S] fp32 (SCALE)
    M, K, R, S, k_per_split,
    stride_xm, stride_xk,
    a_strides,  # (s, r, k) strides of every slice of A, flattened
    stride_ps, stride_pp, stride_pm, stride_pr,
    NS: tl.constexpr, SORTED: tl.constexpr, HAS_RANKS: tl.constexpr, SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows, ok, slots = _block_rows(tl.program_id(0), perm_ptr, ids_ptr, M, S, BLOCK_M, SORTED)
    split = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    for i in tl.static_range(NS):  # slices in turn: x's tiles come back from cache
        a_ptr = a_ptrs[i]
        stride_as, stride_ar, stride_ak = a_strides[3 * i], a_strides[3 * i + 1], a_strides[3 * i + 2]
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
            if SCALE:  # rank columns past r_s stay exact zeros, whatever the scale
                acc = tl.where(r_ok[None, :], acc * tl.load(scales_ptr + s), 0.0)
            out = tl.where((slots == s)[:, None], acc, out)
            s = _next_slot(slots, s)
        tl.store(p_ptr + i * stride_ps + split * stride_pp + rows[:, None] * stride_pm + rr[None, :] * stride_pr, out,
                 mask=ok[:, None] & (rr < R)[None, :])


@triton.jit
def _mixed_adapter_linear_kernel(
    y_ptr,  # [M, N] out (ADD: read first, rows without a slot left as they were)
    z_ptr,  # [NS, M, R] out (STORE_Z; arrives zero-filled): z = ΣP + a_s for rows with a slot
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (BASE)
    bias_ptr,  # [N]
    p_ptr,  # [NS, SPLIT, M, R] fp32 partials of x·A_{i,s}ᵀ (or dZ, or the caller's shrink output)
    a_ptrs,  # NS × [S, R, K] (FUSED_SHRINK: z = x·A_{i,s}ᵀ recomputed here)
    ab_ptr,  # [S, R]
    b_ptrs,  # NS × [S, N_i, R]
    bb_ptr,  # [S, N]
    scales_ptr,  # [S] fp32
    ranks_ptr,  # [S] int32
    acts_ptr,  # [S] int32 activation codes
    ids_ptr,  # [M]
    perm_ptr,  # [M] int32 (SORTED)
    cs_ptr,  # [S, N] ACC column scales, unit stride in N (HAS_COL_SCALE; BASE and not ADD)
    M, N, K, R, S, SPLIT,
    col_starts, col_widths,  # slice i owns columns [col_starts[i], col_starts[i] + col_widths[i]) of y
    stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk, stride_ps, stride_pp, stride_pm,
    a_strides,  # (s, r, k) strides of every slice of A, flattened
    stride_abs, stride_abr,
    b_strides,  # (s, n, r) strides of every slice of B, flattened
    stride_bbs, stride_bbn, stride_css,
    NS: tl.constexpr, BASE: tl.constexpr, ADD: tl.constexpr, FUSED_SHRINK: tl.constexpr,
    SORTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AB: tl.constexpr, HAS_BB: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_ACTS: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_TILES: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, ok, slots = _block_rows(pid_m, perm_ptr, ids_ptr, M, S, BLOCK_M, SORTED)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N

    if ADD:
        acc = tl.load(y_ptr + rows[:, None] * stride_ym + rn[None, :] * stride_yn,
                      mask=ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # The adapter part first: the K loop below then continues this accumulator, and only the
    # accumulator and the K loop's pointers stay live across it (the rows are loaded anew for
    # the K loop and the store). Per slice and rank tile (R_TILES = ⌈R / BLOCK_R⌉, static), z
    # of the block's rows is read once; each present slot takes its own rows of it (other rows:
    # exact zeros) into one dot.
    for i in tl.static_range(NS):
        b_ptr = b_ptrs[i]
        stride_bs, stride_bn, stride_br = b_strides[3 * i], b_strides[3 * i + 1], b_strides[3 * i + 2]
        if NS == 1:
            cn, c_ok, r_hi = rn, n_ok, R
        else:  # this tile's columns of slice i; a tile that meets no column of it skips it
            cn = rn - col_starts[i]
            c_ok = (cn >= 0) & (cn < col_widths[i])
            meets = (pid_n * BLOCK_N < col_starts[i] + col_widths[i]) & (pid_n * BLOCK_N + BLOCK_N > col_starts[i])
            r_hi = tl.where(meets, R, 0)
        for t in tl.static_range(R_TILES):
            r0 = t * BLOCK_R
            rr = r0 + tl.arange(0, BLOCK_R)
            z_rows = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            if not FUSED_SHRINK:  # rows without a slot hold zeros; masked per slot below
                for sp in tl.range(0, SPLIT, num_stages=1):
                    z_rows += tl.load(p_ptr + i * stride_ps + sp * stride_pp + rows[:, None] * stride_pm
                                      + rr[None, :], mask=ok[:, None] & (rr < r_hi)[None, :], other=0.0)
            s = tl.where(r_hi > 0, _next_slot(slots, -1), NO_SLOT)
            while s < NO_SLOT:
                s64 = s.to(tl.int64)
                rank = R
                if HAS_RANKS:
                    rank = tl.load(ranks_ptr + s)
                if r0 < rank:  # a slot's real rank bounds its rank tiles
                    sel = ok & (slots == s)
                    r_ok = rr < rank
                    zmask = sel[:, None] & r_ok[None, :]
                    scale = 1.0
                    if HAS_SCALES:
                        scale = tl.load(scales_ptr + s)
                    if FUSED_SHRINK:  # decode: recompute x·A_{i,s}ᵀ here rather than launch a shrink
                        a_ptr = a_ptrs[i]
                        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
                        for k0 in range(0, K, BLOCK_K):
                            kk = k0 + rk
                            k_ok = kk < K
                            xs = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                                         mask=sel[:, None] & k_ok[None, :], other=0.0)
                            at = tl.load(a_ptr + s64 * a_strides[3 * i] + rr[None, :] * a_strides[3 * i + 1]
                                         + kk[:, None] * a_strides[3 * i + 2],
                                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)
                            z = tl.dot(xs.to(DOT_DTYPE), at.to(DOT_DTYPE), z, input_precision=PRECISION,
                                       out_dtype=ACC)
                        z = tl.where(zmask, z, 0.0)
                    else:
                        z = tl.where(zmask, z_rows, 0.0)
                    if HAS_AB:
                        ab = tl.load(ab_ptr + s64 * stride_abs + rr * stride_abr, mask=r_ok, other=0.0).to(ACC)
                        z = tl.where(zmask, z + ab[None, :], 0.0)
                    if STORE_Z:
                        if pid_n == col_starts[i] // BLOCK_N:  # the tile holding the slice's first column
                            tl.store(z_ptr + i * M * R + rows[:, None] * R + rr[None, :], z, mask=zmask)
                    if HAS_ACTS:
                        z = tl.where(zmask, _act_by_code(z, tl.load(acts_ptr + s)), 0.0)
                    bt = tl.load(b_ptr + s64 * stride_bs + cn[None, :] * stride_bn + rr[:, None] * stride_br,
                                 mask=c_ok[None, :] & r_ok[:, None], other=0.0)
                    if DOT_DTYPE == tl.float16:
                        # scaled in ACC after the dot: scale·z in fp16 could overflow, and a non-finite
                        # scale must not reach rows of other slots through 0·inf.
                        acc += tl.where(sel[:, None], scale * tl.dot(z.to(DOT_DTYPE), bt.to(DOT_DTYPE),
                                                                     input_precision=PRECISION, out_dtype=ACC), 0.0)
                    else:
                        # Into the one accumulator (no second BLOCK_M×BLOCK_N fp32 tile); rows of other
                        # slots get exact zeros, so a non-finite scale stays in its own rows.
                        zs = tl.where(sel[:, None], scale * z, 0.0)
                        acc = tl.dot(zs.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION,
                                     out_dtype=ACC)
                s = _next_slot(slots, s)
    if HAS_BB:  # one slice only
        s = _next_slot(slots, -1)
        while s < NO_SLOT:
            scale = 1.0
            if HAS_SCALES:
                scale = tl.load(scales_ptr + s)
            bb = tl.load(bb_ptr + s.to(tl.int64) * stride_bbs + rn * stride_bbn, mask=n_ok, other=0.0).to(ACC)
            acc += tl.where((ok & (slots == s))[:, None], scale * bb[None, :], 0.0)
            s = _next_slot(slots, s)

    if BASE:
        # Rows past M read row 0 and, for a row-major W, columns past N column N-1, dropped at
        # the store: the K loop masks K only, and its pointers advance by BLOCK_K. The rows are
        # loaded anew, here and for the store, so that none is held across the adapter part or
        # the K loop (200 → 118 registers, benchmarks/kernel_report.py).
        rn_ld, wn_ok = load_rows(rn, N, unit(stride_wk))
        x_ptrs = x_ptr + _rows_again(pid_m, perm_ptr, M, BLOCK_M, SORTED)[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn_ld[None, :] * stride_wn + rk[:, None] * stride_wk
        for k0 in range(0, K, BLOCK_K):
            k_ok = rk < K - k0
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=wn_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if BASE:  # a load unlike the two above (other=-1, masked off anyway), so none is merged with it
        jj = tl.arange(0, BLOCK_M) + pid_m * BLOCK_M
        ok = jj < M
        rows = jj
        if SORTED:
            rows = tl.load(perm_ptr + jj, mask=ok, other=-1)
        rows = rows.to(tl.int64)
    if HAS_COL_SCALE:  # after the K loop (the adapter part is already in acc), before the bias
        cs = tl.load(ids_ptr + rows, mask=ok, other=-1).to(tl.int32)
        cs = tl.where((cs >= 0) & (cs < S), cs, -1)  # as _block_rows: other ids are base only (·1)
        acc *= tl.load(cs_ptr + cs.to(tl.int64)[:, None] * stride_css + rn[None, :],
                       mask=(cs >= 0)[:, None] & n_ok[None, :], other=1.0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    row_ok = ok & (slots >= 0) if ADD else ok  # adding: rows without a slot are not written
    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


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
