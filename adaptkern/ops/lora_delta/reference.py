"""PyTorch reference of the serving stacks' LoRA delta ops: the spec, the CPU path and the test oracle.

For row m with slot s = ids[m] in [0, S) (any other id: no slot), slice i and rank r_s::

    shrink:  S[i, m, :r_s] = scale_s·x_m·A_{i,s}[:r_s]ᵀ          (zeros elsewhere)
    expand:  y[m, offset+o_i : offset+o_i+N_i] (+)= S[i, m, :r_s]·B_{i,s}[:, :r_s]ᵀ
    delta:   expand(shrink(x)) added into y

with o_i = N_0 + … + N_{i-1}. Computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slots(ids, num_slots):
    """ids with every id outside [0, num_slots) made -1 (int64)."""
    ids = ids.long()
    return torch.where((ids >= 0) & (ids < num_slots), ids, -1)


def lora_shrink_ref(x, a_list, scales, ranks, ids):
    """S [n, M, R] in float32 (float64 for float64 x): S[i, m, :r_s] = scale_s·x_m·A_{i,s}[:r_s]ᵀ, zeros
    for rows without a slot and columns >= r_s. Shapes: x [M, K], a_list n × [S, R, K], scales [S] | None
    (1), ranks [S] | None (R), ids [M]."""
    acc = _acc(x.dtype)
    s_count, r, _ = a_list[0].shape
    slot = _slots(ids, s_count)
    out = torch.zeros(len(a_list), x.shape[0], r, dtype=acc, device=x.device)
    for s in sorted(set(slot.tolist()) - {-1}):
        rows = (slot == s).nonzero().squeeze(1)
        rank = r if ranks is None else int(ranks[s])
        scale = 1.0 if scales is None else scales[s].to(acc)
        for i, a in enumerate(a_list):
            out[i, rows, :rank] = scale * (x[rows].to(acc) @ a[s, :rank].to(acc).t())
    return out


def lora_expand_ref(y, shrunk, b_list, ranks, ids, offset, add):
    """y after the expand (a new tensor in y's dtype): slice i's columns get (add: y's own plus)
    S[i, m, :r_s]·B_{i,s}[:, :r_s]ᵀ; rows without a slot keep y (add) or get zeros; columns outside
    the slices keep y. Shapes: y [M, ≥ offset + ΣN_i], shrunk [n, M, R], b_list n × [S, N_i, R]."""
    acc = _acc(y.dtype)
    s_count, _, r = b_list[0].shape
    slot = _slots(ids, s_count)
    out = y.clone()
    start = offset
    for i, b in enumerate(b_list):
        cols = slice(start, start + b.shape[1])
        start += b.shape[1]
        block = out[:, cols].to(acc) if add else torch.zeros_like(out[:, cols], dtype=acc)
        for s in sorted(set(slot.tolist()) - {-1}):
            rows = (slot == s).nonzero().squeeze(1)
            rank = r if ranks is None else int(ranks[s])
            block[rows] += shrunk[i, rows, :rank].to(acc) @ b[s, :, :rank].to(acc).t()
        out[:, cols] = block.to(y.dtype)
    return out


def add_lora_delta_ref(y, x, a_list, b_list, scales, ranks, ids, offset):
    """y + Δ (a new tensor in y's dtype): :func:`lora_expand_ref` (add) of :func:`lora_shrink_ref`."""
    return lora_expand_ref(y, lora_shrink_ref(x, a_list, scales, ranks, ids), b_list, ranks, ids, offset, True)
