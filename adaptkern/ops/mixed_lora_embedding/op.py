"""Mixed LoRA embedding: launcher → ``adaptkern::mixed_lora_embedding`` custom op (not differentiable)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .. import config
from ..common import dot_flags, use_triton, vectors
from ..mixed_adapter_linear.rows import slot_metadata
from . import reference
from .kernels import _mixed_lora_embedding_kernel


def _tiles(m: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, warps): a gather plus rank-r dots, memory-bound."""
    if interpret:
        return 32, 64, 4
    return (16, 128, 4) if m <= 16 else (64, 128, 4)


@torch.library.custom_op("adaptkern::mixed_lora_embedding", mutates_args=())
def mixed_lora_embedding_op(tokens: Tensor, weight: Tensor, a_all: Tensor, b_all: Tensor, scales: Optional[Tensor],
                            ranks: Optional[Tensor], ids: Tensor, sorted_rows: Optional[Tensor]) -> Tensor:
    """y [M, D] in weight's dtype (``reference.mixed_lora_embedding_ref``).

    Shapes: tokens [M] int, weight [V, D], a_all [S, R, V] and b_all [S, D, R] in weight's dtype, scales [S]
    fp32 | None, ranks [S] int32 | None, ids [M], sorted_rows [M] | None (a SlotMapping's). Validated by
    ``adaptkern.serving``.
    """
    if not use_triton(weight):
        return reference.mixed_lora_embedding_ref(tokens, weight, a_all, b_all, scales, ranks, ids)
    tokens, scales, ranks, ids = vectors(tokens, scales, ranks, ids)
    m, (v, d) = tokens.shape[0], weight.shape
    s_count, r, _ = a_all.shape
    y = weight.new_empty((m, d))
    if m == 0:
        return y
    perm = None
    if m > config.MIXED_SORT_MIN_M:
        perm = sorted_rows if sorted_rows is not None else slot_metadata(ids, s_count).sorted_rows
    bm, bn, warps = _tiles(m, config.interpreting())
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bn))
    _mixed_lora_embedding_kernel[grid](
        y, tokens, weight, a_all, b_all, scales if scales is not None else y, ranks if ranks is not None else ids,
        ids, perm if perm is not None else ids, m, d, v, r, s_count,
        *y.stride(), *weight.stride(), *a_all.stride(), *b_all.stride(),
        SORTED=perm is not None, HAS_SCALES=scales is not None, HAS_RANKS=ranks is not None,
        **dot_flags(weight.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=min(config.block_r(r), 64),
        num_warps=warps, num_stages=1,
    )
    return y


@mixed_lora_embedding_op.register_fake
def _(tokens, weight, a_all, b_all, scales, ranks, ids, sorted_rows):
    return weight.new_empty((tokens.shape[0], weight.shape[1]))
