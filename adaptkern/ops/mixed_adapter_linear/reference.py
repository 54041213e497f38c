"""PyTorch reference of the mixed-adapter linear: the spec, the CPU path and the test oracle.

Row i with slot s = ids[i] computes z_i = x_i·A_s[:r_s]ᵀ + a_s, y_i = x_i·Wᵀ + b +
scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s); any id outside [0, S) is a base-only row, as in the kernels.
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


def _slot_z(x_rows, a_all, a_bias, s, r):
    """z = x·A_s[:r]ᵀ + a_s[:r] for the rows of slot s: [n, r]."""
    z = x_rows @ a_all[s, :r].t()
    return z if a_bias is None else z + a_bias[s, :r]


def mixed_adapter_linear_ref(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids):
    """Semantics: row i with s = ids[i] in [0, S) gets
    y_i = x_i·Wᵀ + b + scales[s]·(f_s(x_i·A_s[:r_s]ᵀ + a_s[:r_s])·B_s[:, :r_s]ᵀ + c_s); any other id
    (-1, or out of range as the kernels read it): base only.

    Shapes: x [M, K], weight [N, K], bias [N] | None, a_all [S, R, K], a_bias [S, R] | None,
    b_all [S, N, R], b_bias [S, N] | None, scales [S], ranks [S] int | None (None: R),
    acts [S] int activation codes | None (identity), ids [M] int. Computed in the inputs'
    precision, one slot at a time (differentiable: the float64 oracle and the CPU path).
    """
    y = x @ weight.t()
    if bias is not None:
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
    return y


def mixed_adapter_linear_forward(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z):
    """The CPU path of ``adaptkern::mixed_adapter_linear``: (y [M, N] in x's dtype, z).

    z is what the kernels store: [M, R] in float32 (float64 for float64 x), row i holding
    x_i·A_s[:r_s]ᵀ + a_s in its first r_s columns and zeros elsewhere (base-only rows: all
    zeros); [0] when not ``need_z``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32, w32, bias32, a32, ab32, b32, bb32 = (None if t is None else t.to(acc)
                                              for t in (x, weight, bias, a_all, a_bias, b_all, b_bias))
    y = mixed_adapter_linear_ref(x32, w32, bias32, a32, ab32, b32, bb32, scales, ranks, acts, ids).to(x.dtype)
    if not need_z:
        return y, x32.new_empty(0)
    z = x32.new_zeros(x.shape[0], a_all.shape[1])
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        z[rows, :r] = _slot_z(x32[rows], a32, ab32, s, r)
    return y, z


def mixed_adapter_linear_backward(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, needs):
    """Explicit gradients of :func:`mixed_adapter_linear_ref` (the CPU path's backward), per slot:

    dZ = scale_s·(dY·B_s) ⊙ f_s'(z);  dX = dY·W + dZ·A_s;  dA_s = dZᵀ·x;  da_s = ΣdZ;
    dB_s = scale_s·dYᵀ·f_s(z);  dc_s = scale_s·ΣdY;  dW = dYᵀ·x;  db = ΣdY (over all rows).

    ``needs`` is (x, weight, bias, a_all, a_bias, b_all, b_bias); returns the seven gradients
    in float32 (float64 for float64 inputs), contiguous, None where not needed.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy, x, weight, a_all, b_all = (t.to(acc) for t in (dy, x, weight, a_all, b_all))
    a_bias = None if a_bias is None else a_bias.to(acc)
    dx = dy @ weight
    zeros = dict(dtype=acc, device=x.device)
    da_all, dab = torch.zeros(a_all.shape, **zeros), torch.zeros(a_all.shape[:2], **zeros)
    dbw, dbb = torch.zeros(b_all.shape, **zeros), torch.zeros(b_all.shape[:2], **zeros)
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        act = "identity" if acts is None else ACTIVATIONS[int(acts[s])]
        scale = float(scales[s])
        xs, dys = x[rows], dy[rows]
        z = _slot_z(xs, a_all, a_bias, s, r)
        dz = scale * (dys @ b_all[s, :, :r]) * activation_grad(z, act)
        dx[rows] += dz @ a_all[s, :r]
        da_all[s, :r] = dz.t() @ xs
        dab[s, :r] = dz.sum(0)
        dbw[s, :, :r] = scale * dys.t() @ activation(z, act)
        dbb[s] = scale * dys.sum(0)
    grads = (dx, dy.t() @ x, dy.sum(0), da_all, dab, dbw, dbb)
    return tuple(g if need else None for g, need in zip(grads, needs))
