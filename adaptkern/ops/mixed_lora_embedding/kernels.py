"""Triton kernel of the mixed LoRA embedding (semantics in ``reference.py``).

A program owns a BLOCK_M×BLOCK_N tile of y: it gathers E[t] for its rows, then, per slot present in
its rows (rows sorted by slot at large M), gathers z = A_s[:r_s, t] [BLOCK_M, r] and adds
scale_s·z·B_sᵀ with one tensor-core dot; rows of other slots get exact zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_SLOT: tl.constexpr = tl.constexpr(1 << 30)


@triton.jit
def _mixed_lora_embedding_kernel(
    y_ptr,  # [M, D] out
    tok_ptr,  # [M] int32/int64 token ids
    e_ptr,  # [V, D]
    a_ptr,  # [S, R, V]
    b_ptr,  # [S, D, R]
    scales_ptr,  # [S] fp32 (HAS_SCALES)
    ranks_ptr,  # [S] int32 (HAS_RANKS)
    ids_ptr,  # [M] slot per row
    perm_ptr,  # [M] int32 rows sorted by slot (SORTED)
    M, D, V, R, S,
    stride_ym, stride_yd, stride_ev, stride_ed, stride_as, stride_ar, stride_av, stride_bs, stride_bd, stride_br,
    SORTED: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = j < M
    rows = tl.where(ok, j, 0)
    if SORTED:
        rows = tl.load(perm_ptr + j, mask=ok, other=0)
    rows = rows.to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=ok, other=-1).to(tl.int64)
    t_ok = ok & (tok >= 0) & (tok < V)  # an unchecked token outside [0, V): a zero row, nothing read
    tok = tl.where(t_ok, tok, 0)
    slots = tl.load(ids_ptr + rows, mask=ok, other=-1).to(tl.int32)
    slots = tl.where(t_ok & (slots >= 0) & (slots < S), slots, -1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D

    acc = tl.load(e_ptr + tok[:, None] * stride_ev + rn[None, :] * stride_ed, mask=t_ok[:, None] & n_ok[None, :],
                  other=0.0).to(ACC)
    s = tl.min(tl.where(slots > -1, slots, NO_SLOT), axis=0)
    while s < NO_SLOT:
        s64 = s.to(tl.int64)
        sel = slots == s
        rank = R
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + s)
        scale = 1.0
        if HAS_SCALES:
            scale = tl.load(scales_ptr + s)
        for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            z = tl.load(a_ptr + s64 * stride_as + rr[None, :] * stride_ar + tok[:, None] * stride_av,
                        mask=sel[:, None] & r_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + s64 * stride_bs + rn[None, :] * stride_bd + rr[:, None] * stride_br,
                         mask=n_ok[None, :] & r_ok[:, None], other=0.0)
            # scaled in ACC after the dot (fp16-safe); rows of other slots get exact zeros
            acc += tl.where(sel[:, None], scale * tl.dot(z.to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION,
                                                         out_dtype=ACC), 0.0)
        s = tl.min(tl.where(slots > s, slots, NO_SLOT), axis=0)
    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :] * stride_yd, acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])
