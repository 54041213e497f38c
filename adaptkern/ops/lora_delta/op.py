"""Serving stacks' LoRA delta: launchers → ``adaptkern::lora_shrink_`` / ``lora_expand_`` / ``add_lora_delta_``.

Semantics in ``reference.py``. The engines own the base GEMM (often quantized) and the output
buffer; these ops write only the adapter part, in place, through the mixed-adapter kernels:
the shrink is ``_mixed_adapter_linear_shrink_kernel`` with the scale applied and one K split, the expand is
``_mixed_adapter_linear_kernel`` without the base GEMM (``ADD``: y's own values are the accumulator's
start). ``add_lora_delta_`` runs both, or at decode sizes one launch that recomputes the shrink in
the expand's epilogue (:func:`one_launch`). Not differentiable: they mutate the caller's buffers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .. import config
from ..common import dot_flags, elem_size, use_triton, vectors
from ..mixed_adapter_linear.op import launch_linear, launch_shrink
from ..mixed_adapter_linear.rows import slot_metadata
from . import reference

# Extra bytes of A the one-launch delta may re-read (once per output tile after the first)
# before two launches win: ~3 µs of HBM at 3 TB/s, under the 5–10 µs a second launch costs
# between shrink and expand at decode (the re-reads mostly hit L2, so this is conservative).
ONE_LAUNCH_MAX_REREAD = 8 << 20


def one_launch(m: int, n: int, k: int, r: int, num_slots: int, elem: int, *, device=None) -> bool:
    """Whether ``add_lora_delta_`` recomputes the shrink inside the expand (one launch).

    Each output tile of the one-launch kernel recomputes x·A_sᵀ for the slots in its rows: the A
    of every present slot (at most min(M, S) of them, r·K elements each) is read once per
    column tile instead of once. One launch when that re-read is at most ONE_LAUNCH_MAX_REREAD
    bytes and the rows are not sorted (decode sizes).
    """
    plan = config.mixed_plan(m, k, r, elem, device=device)
    tiles = triton.cdiv(max(n, 1), plan.block_n)
    return not plan.sort_rows and (tiles - 1) * min(m, num_slots) * r * k * elem <= ONE_LAUNCH_MAX_REREAD


def _plan_and_perm(x, r, ids, num_slots, sorted_rows):
    plan = config.mixed_plan(x.shape[0], x.shape[1], r, elem_size(dot_flags(x.dtype)), device=x.device)
    perm = None
    if plan.sort_rows:
        perm = sorted_rows if sorted_rows is not None else slot_metadata(ids, num_slots).sorted_rows
    return plan, perm


def _slice_view(y, b_all, offset):
    return y.narrow(1, offset, sum(b.shape[1] for b in b_all))


@torch.library.custom_op("adaptkern::lora_shrink_", mutates_args=("out",))
def lora_shrink_op(out: Tensor, x: Tensor, a_all: list[Tensor], scales: Optional[Tensor], ranks: Optional[Tensor],
                   ids: Tensor, sorted_rows: Optional[Tensor]) -> None:
    """out [n, M, R] (fp32; fp64 for fp64 x, unit stride in R) = the shrink of ``reference.lora_shrink_ref``.

    Shapes: x [M, K], a_all n × [S, R, K] in x's dtype, scales [S] fp32 | None, ranks [S] int32 | None,
    ids [M], sorted_rows [M] | None (a SlotMapping's). Inputs are validated by ``adaptkern.serving``.
    """
    if x.shape[0] == 0:
        return
    if not use_triton(x):
        out.copy_(reference.lora_shrink_ref(x, a_all, scales, ranks, ids))
        return
    scales, ranks, ids = vectors(scales, ranks, ids)
    plan, perm = _plan_and_perm(x, a_all[0].shape[1], ids, a_all[0].shape[0], sorted_rows)
    launch_shrink(x, a_all, ids, ranks, perm, plan,
                  scales=scales if scales is not None else torch.ones(a_all[0].shape[0], device=x.device), out=out)


@lora_shrink_op.register_fake
def _(out, x, a_all, scales, ranks, ids, sorted_rows) -> None:
    return None


@torch.library.custom_op("adaptkern::lora_expand_", mutates_args=("y",))
def lora_expand_op(y: Tensor, shrunk: Tensor, b_all: list[Tensor], ranks: Optional[Tensor], ids: Tensor,
                   sorted_rows: Optional[Tensor], offset: int, add: bool) -> None:
    """y's slice columns (+)= the expand of ``reference.lora_expand_ref``, in place.

    Shapes: y [M, ≥ offset + ΣN_i], shrunk [n, M, R] fp32 (unit stride in R), b_all n × [S, N_i, R] in
    y's dtype, ranks [S] int32 | None, ids [M], sorted_rows [M] | None.
    """
    if y.shape[0] == 0:
        return
    if not use_triton(y):
        y.copy_(reference.lora_expand_ref(y, shrunk, b_all, ranks, ids, offset, add))
        return
    ranks, ids = vectors(ranks, ids)
    view = _slice_view(y, b_all, offset)
    plan, perm = _plan_and_perm(view, b_all[0].shape[2], ids, b_all[0].shape[0], sorted_rows)
    launch_linear(view, view, None, None, shrunk[:, None], b_all, ids, perm, plan, ranks=ranks, add=add)


@lora_expand_op.register_fake
def _(y, shrunk, b_all, ranks, ids, sorted_rows, offset, add) -> None:
    return None


@torch.library.custom_op("adaptkern::add_lora_delta_", mutates_args=("y",))
def add_lora_delta_op(y: Tensor, x: Tensor, a_all: list[Tensor], b_all: list[Tensor], scales: Optional[Tensor],
                      ranks: Optional[Tensor], ids: Tensor, sorted_rows: Optional[Tensor], offset: int,
                      fused: Optional[bool]) -> None:
    """y += Δ (``reference.add_lora_delta_ref``), in place: one launch when ``fused`` (the shrink recomputed
    in the expand's epilogue), else shrink then expand; None: :func:`one_launch` decides.

    Shapes: y [M, ≥ offset + ΣN_i] in x's dtype, x [M, K], a_all n × [S, R, K], b_all n × [S, N_i, R]
    (both in x's dtype), scales [S] fp32 | None, ranks [S] int32 | None, ids [M], sorted_rows [M] | None.
    """
    if y.shape[0] == 0:
        return
    if not use_triton(x):
        y.copy_(reference.add_lora_delta_ref(y, x, a_all, b_all, scales, ranks, ids, offset))
        return
    scales, ranks, ids = vectors(scales, ranks, ids)
    view = _slice_view(y, b_all, offset)
    plan, perm = _plan_and_perm(x, a_all[0].shape[1], ids, a_all[0].shape[0], sorted_rows)
    if fused is None:
        fused = one_launch(x.shape[0], view.shape[1], x.shape[1], a_all[0].shape[1], a_all[0].shape[0],
                           elem_size(dot_flags(x.dtype)), device=x.device)
    if fused:
        launch_linear(view, x, None, None, None, b_all, ids, None, plan, scales=scales, ranks=ranks, add=True,
                      a_views=a_all)
    else:
        parts = launch_shrink(x, a_all, ids, ranks, perm, plan)
        launch_linear(view, x, None, None, parts, b_all, ids, perm, plan, scales=scales, ranks=ranks, add=True)


@add_lora_delta_op.register_fake
def _(y, x, a_all, b_all, scales, ranks, ids, sorted_rows, offset, fused) -> None:
    return None
