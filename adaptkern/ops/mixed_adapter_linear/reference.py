"""PyTorch reference of the mixed-adapter linear: the spec, the CPU path and the test oracle.

Row i with slot s = ids[i] computes z_i = x_i·A_s[:r_s]ᵀ + a_s, y_i = x_i·Wᵀ + b +
scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s); any id outside [0, S) is a base-only row, as in the kernels.
With per-slot column scales G [S, N] (DoRA slots) all but the bias is scaled: y_i = G_s ⊙ (…) + b.
"""

from __future__ import annotations

import torch

from ..common import ACTIVATIONS, activation, activation_grad


def _slot_rows(ids, num_slots, ranks, r_max):
    """(slot, rows [n] int64, rank) for every slot in [0, num_slots) that some row names.

    An id outside [0, num_slots) (-1, -2, num_slots, ...) names no slot: its row is base
    only, as in the kernels, which run unchecked ids under torch.compile and graph capture.
    """
    present = sorted(s for s in set(ids.tolist()) if 0 <= s < num_slots)
    return [(s, (ids == s).nonzero().squeeze(1), r_max if ranks is None else int(ranks[s])) for s in present]


def scale_rows(y, col_scales, ids):
    """Semantics: y_i ⊙ G[ids[i]] for ids[i] in [0, S), y_i for any other id. Shapes: y [M, N],
    col_scales G [S, N] (cast to y's dtype), ids [M] -> [M, N] (differentiable in y)."""
    s_count = col_scales.shape[0]
    used = (ids >= 0) & (ids < s_count)
    g = col_scales.to(y.dtype)[torch.where(used, ids, 0).long()]
    return y * torch.where(used[:, None], g, 1.0)


def _with_bias(y, bias, col_scales, ids):
    """y + b, or with column scales G_s ⊙ y + b."""
    if col_scales is not None:
        y = scale_rows(y, col_scales, ids)
    return y if bias is None else y + bias


def _slot_z(x_rows, a_all, a_bias, s, r):
    """z = x·A_s[:r]ᵀ + a_s[:r] for the rows of slot s: [n, r]."""
    z = x_rows @ a_all[s, :r].t()
    return z if a_bias is None else z + a_bias[s, :r]


def mixed_adapter_linear_ref(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids,
                             col_scales=None):
    """Semantics: row i with s = ids[i] in [0, S) gets
    y_i = x_i·Wᵀ + b + scales[s]·(f_s(x_i·A_s[:r_s]ᵀ + a_s[:r_s])·B_s[:, :r_s]ᵀ + c_s); any other id
    (-1, or out of range as the kernels read it): base only. With col_scales G [S, N]:
    y_i = G_s ⊙ (the above without b) + b (other ids: ·1).

    Shapes: x [M, K], weight [N, K], bias [N] | None, a_all [S, R, K], a_bias [S, R] | None,
    b_all [S, N, R], b_bias [S, N] | None, scales [S], ranks [S] int | None (None: R),
    acts [S] int activation codes | None (identity), ids [M] int. Computed in the inputs'
    precision, one slot at a time (differentiable: the float64 oracle and the CPU path).
    """
    y = x @ weight.t()
    if bias is not None and col_scales is None:
        y = y + bias
    rows_out = []
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        act = "identity" if acts is None else ACTIVATIONS[int(acts[s])]
        branch = activation(_slot_z(x[rows], a_all, a_bias, s, r), act) @ b_all[s, :, :r].t()
        if b_bias is not None:
            branch = branch + b_bias[s]
        rows_out.append((rows, scales[s].to(y.dtype) * branch))
    for rows, delta in rows_out:
        y = y.index_add(0, rows, delta)
    return y if col_scales is None else _with_bias(y, bias, col_scales, ids)


def lora_delta_ref(x, a_all, b_all, scales, ranks, ids):
    """Semantics: Δ_i = scales[s]·(x_i·A_s[:r_s]ᵀ)·B_s[:, :r_s]ᵀ for s = ids[i] in [0, S), zeros for other rows.

    Shapes: x [M, K], a_all [S, R, K], b_all [S, N, R], scales [S], ranks [S] | None, ids [M] -> Δ [M, N]
    in x's precision (differentiable).
    """
    delta = x.new_zeros(x.shape[0], b_all.shape[1])
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        delta = delta.index_add(0, rows, scales[s].to(x.dtype) * ((x[rows] @ a_all[s, :r].t()) @ b_all[s, :, :r].t()))
    return delta


def mixed_lora_slices_ref(x, weight, bias, a_list, b_list, scales, ranks, ids, col_scales=None):
    """Semantics: y[:, o_i:o_i+N_i] = x·W_iᵀ + b_i + Δ_i with Δ_i = :func:`lora_delta_ref` of slice i
    (A_i = a_list[i], B_i = b_list[i], o_i = N_0 + … + N_{i-1}); with col_scales G [S, ΣN_i]
    y_m = G_s ⊙ (the above without b) + b.

    Shapes: x [M, K], weight [ΣN_i, K], bias [ΣN_i] | None, a_list n × [S, R, K], b_list n × [S, N_i, R].
    """
    y = x @ weight.t()
    if bias is not None and col_scales is None:
        y = y + bias
    y = y + torch.cat([lora_delta_ref(x, a, b, scales, ranks, ids) for a, b in zip(a_list, b_list)], 1)
    return y if col_scales is None else _with_bias(y, bias, col_scales, ids)


def mixed_adapter_linear_forward(x, weight, bias, a_list, a_bias, b_list, b_bias, scales, ranks, acts, ids, need_z,
                                 col_scales=None):
    """The CPU path of ``adaptkern::mixed_adapter_linear``: (y [M, N] in x's dtype, z).

    a_list / b_list: the slices' stacks (one slice: the general formula with biases and
    activations; several: LoRA slices, :func:`mixed_lora_slices_ref`). z is what the kernels
    store: [n, M, R] in float32 (float64 for float64 x), z[i, m] holding x_m·A_{i,s}[:r_s]ᵀ + a_s
    in its first r_s columns and zeros elsewhere (base-only rows: all zeros); [0] when not ``need_z``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32, w32, bias32, ab32, bb32 = (None if t is None else t.to(acc) for t in (x, weight, bias, a_bias, b_bias))
    a32, b32 = [t.to(acc) for t in a_list], [t.to(acc) for t in b_list]
    if len(a32) == 1:
        y = mixed_adapter_linear_ref(x32, w32, bias32, a32[0], ab32, b32[0], bb32, scales, ranks, acts, ids, col_scales)
    else:
        y = mixed_lora_slices_ref(x32, w32, bias32, a32, b32, scales, ranks, ids, col_scales)
    if not need_z:
        return y.to(x.dtype), x32.new_empty(0)
    s_count, r = a_list[0].shape[:2]
    z = x32.new_zeros(len(a32), x.shape[0], r)
    for i, a in enumerate(a32):
        for s, rows, rank in _slot_rows(ids, s_count, ranks, r):
            z[i, rows, :rank] = _slot_z(x32[rows], a, ab32, s, rank)
    return y.to(x.dtype), z


def mixed_adapter_linear_backward(dy, x, weight, a_list, a_bias, b_list, scales, ranks, acts, ids, needs):
    """Explicit gradients of :func:`mixed_adapter_linear_ref` (the CPU path's backward), per slice i
    (columns o_i..o_i+N_i of dY: dY_i) and slot:

    dZ = scale_s·(dY_i·B_{i,s}) ⊙ f_s'(z);  dX = dY·W + Σ_i dZ·A_{i,s};  dA_{i,s} = dZᵀ·x;  da_s = ΣdZ;
    dB_{i,s} = scale_s·dY_iᵀ·f_s(z);  dc_s = scale_s·ΣdY;  dW = dYᵀ·x;  db = ΣdY (over all rows).

    ``needs`` is (x, weight, bias, a_list, a_bias, b_list, b_bias); returns (dx, dW, db, [dA_i], da, [dB_i], dc)
    in float32 (float64 for float64 inputs), contiguous, None (or a list of None) where not needed.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy, x, weight = (t.to(acc) for t in (dy, x, weight))
    a_list, b_list = [t.to(acc) for t in a_list], [t.to(acc) for t in b_list]
    a_bias = None if a_bias is None else a_bias.to(acc)
    s_count, r = a_list[0].shape[:2]
    dx = dy @ weight
    zeros = dict(dtype=acc, device=x.device)
    da_list, db_list = [torch.zeros(a.shape, **zeros) for a in a_list], [torch.zeros(b.shape, **zeros) for b in b_list]
    dab, dbb = torch.zeros((s_count, r), **zeros), torch.zeros(s_count, dy.shape[1], **zeros)
    start = 0
    for a_all, b_all, da_all, dbw in zip(a_list, b_list, da_list, db_list):
        cols = slice(start, start + b_all.shape[1])
        dy_i = dy[:, cols]
        start += b_all.shape[1]
        for s, rows, rank in _slot_rows(ids, s_count, ranks, r):
            act = "identity" if acts is None else ACTIVATIONS[int(acts[s])]
            scale = float(scales[s])
            xs, dys = x[rows], dy_i[rows]
            z = _slot_z(xs, a_all, a_bias, s, rank)
            dz = scale * (dys @ b_all[s, :, :rank]) * activation_grad(z, act)
            dx[rows] += dz @ a_all[s, :rank]
            da_all[s, :rank] = dz.t() @ xs
            dab[s, :rank] = dz.sum(0)
            dbw[s, :, :rank] = scale * dys.t() @ activation(z, act)
            dbb[s, cols] = scale * dys.sum(0)
    grads = (dx, dy.t() @ x, dy.sum(0), da_list, dab, db_list, dbb)
    return tuple((g if need else [None] * len(g)) if isinstance(g, list) else (g if need else None)
                 for g, need in zip(grads, needs))
