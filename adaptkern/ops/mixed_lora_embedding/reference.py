"""PyTorch reference of the mixed LoRA embedding: the spec, the CPU path and the test oracle.

Row m with token t = tokens[m] and slot s = ids[m] in [0, S)::

    y_m = E[t] + scale_s·A_s[:r_s, t]ᵀ·B_s[:, :r_s]ᵀ

(PEFT's embedding LoRA: A [R, V] is indexed by the token, not multiplied). A row whose id is
outside [0, S) gets E[t] exactly; a token outside [0, V) (unchecked) gives a zero row.
"""

from __future__ import annotations

import torch


def mixed_lora_embedding_ref(tokens, weight, a_all, b_all, scales, ranks, ids):
    """y [M, D] in weight's dtype, computed in float32 (float64 for a float64 weight).

    Shapes: tokens [M] int, weight [V, D], a_all [S, R, V], b_all [S, D, R], scales [S] | None (1),
    ranks [S] int | None (R), ids [M] int.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    v, s_count, r = weight.shape[0], a_all.shape[0], a_all.shape[1]
    tokens = tokens.long()
    t_ok = (tokens >= 0) & (tokens < v)
    tok = torch.where(t_ok, tokens, 0)
    y = torch.where(t_ok[:, None], weight[tok].to(acc), 0.0)
    slot = torch.where((ids >= 0) & (ids < s_count) & t_ok, ids.long(), -1)
    for s in sorted(set(slot.tolist()) - {-1}):
        rows = (slot == s).nonzero().squeeze(1)
        rank = r if ranks is None else int(ranks[s])
        scale = 1.0 if scales is None else scales[s].to(acc)
        y[rows] += scale * (a_all[s, :rank][:, tok[rows]].t().to(acc) @ b_all[s, :, :rank].t().to(acc))
    return y.to(weight.dtype)
