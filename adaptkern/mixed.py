"""Mixed-adapter batches: every row of a batch may use a different adapter, or none.

The raw-tensor op serving stacks call (``mixed_lora_linear``, with output slices for packed
q/k/v and gate/up projections) and the pool-driven op (``mixed_adapter_linear``); both run
``adaptkern::mixed_adapter_linear``, the latter through :func:`run_mixed`, the launch path
``AdapterLinear``'s mixed forward uses too. An adapter id is a slot index; -1 (or any id
outside [0, S)) means base only. Wherever adapter ids are accepted, a ``SlotMapping`` is too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import validation as check
from .functional import any_requires_grad, autocast_input, flatten_rows
from .ops.common import acc_dtype
from .ops.mixed_adapter_linear import mixed_adapter_linear_op
from .ops.mixed_adapter_linear import SlotStack
from .pool import AdapterPool
from .slot_mapping import SlotMapping, resolve_ids


def run_mixed(x2: Tensor, weight: Tensor, bias: Optional[Tensor], stack: SlotStack, ids) -> Tensor:
    """The one launch path of mixed batches: y [M, N] from ``adaptkern::mixed_adapter_linear``
    (tensors already checked and in x's dtype). ``ids``: checked adapter ids [M], or a
    :class:`~adaptkern.slot_mapping.SlotMapping` of M rows (its metadata is used, not rebuilt)."""
    ids, sorted_rows, offsets = resolve_ids(ids, x2.shape[0], stack.down_weight.shape[0], validate=False,
                                            device=x2.device)
    return _run(x2, weight, bias, [stack.down_weight], stack.down_bias, [stack.up_weight], stack.up_bias,
                stack.scales, stack.ranks, stack.acts, ids, sorted_rows, offsets, stack.col_scales)


def _run(x2, weight, bias, a_list, a_bias, b_list, b_bias, scales, ranks, acts, ids, sorted_rows, offsets,
         col_scales=None):
    need_z = any_requires_grad(x2, weight, bias, *a_list, a_bias, *b_list, b_bias)
    return mixed_adapter_linear_op(x2, weight, bias, list(a_list), a_bias, list(b_list), b_bias, scales, ranks, acts,
                                   ids, sorted_rows, offsets, need_z, col_scales)[0]


def mixed_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, *, scales=None, ranks=None, output_slices=None,
                      col_scales=None, validate_ids=True):
    """LoRA linear where every row picks its adapter, optionally with one LoRA per output slice.

    Semantics: for row i with slot s = adapter_ids[i] in [0, S) and every slice j (columns
    o_j = N_0 + … + N_{j-1} to o_j + N_j; one slice of all N columns without ``output_slices``):
    y[i, o_j:o_j+N_j] = x_i·W_jᵀ + b_j + scales[s]·(x_i·A_{j,s}[:r_s]ᵀ)·B_{j,s}[:, :r_s]ᵀ;
    adapter_ids[i] = -1 (or, unchecked, any id outside [0, S)) gives exactly the base result.
    A slice a slot does not adapt is all zeros in that slot (so it adds nothing).
    With ``col_scales`` G (DoRA slots: g_s = m_s / ‖W + scales[s]·B_s·A_s‖_row, ones for LoRA
    slots) row i gets y_i = G_s ⊙ (x_i·Wᵀ + scales[s]·(x_i·A_sᵀ)·B_sᵀ) + b: all but the bias is
    scaled; rows with id -1 are not (G ≡ 1).

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]), weight [N, K], bias [N] | None;
    without output_slices lora_a [S, R_max, K], lora_b [S, N, R_max]; with output_slices
    (N_0, …, N_{n-1}) (sum N, e.g. q/k/v widths) lora_a and lora_b are sequences of n tensors,
    lora_a[j] [S, R_max, K], lora_b[j] [S, N_j, R_max]; adapter_ids [M] int32/int64 (or a list
    of ints) in [-1, S), or a :class:`~adaptkern.slot_mapping.SlotMapping` of M rows; scales [S]
    float tensor (None: 1), ranks [S] int tensor in [0, R_max] (None: R_max for every slot),
    col_scales [S, N] float tensor | None (cast to float32; float64 for float64 x) ->
    y [M, N] in x's dtype; M = 0 and K = 0 (y_i = b) included. One fused launch family for the
    base GEMM and every slice; a slot's rank bounds its work.
    Differentiable in x, lora_a, lora_b (and W, b when they require grad): each slot gets
    exactly the gradient of the rows that used it (with col_scales: of dY_i ⊙ G_s). ``scales``
    and ``col_scales`` are not differentiable: one that requires grad is refused.

    Errors: TypeError/ValueError naming the argument, all raised before any computation.
    The value checks (ids and ranks in range, scales and col_scales finite in the compute
    dtype: float64 for float64 x, else float32) read tensors on the host; ``validate_ids=False``,
    torch.compile and CUDA graph capture skip them.
    """
    n, k = check.linear_input(x, weight)
    check.tensor("bias", bias, 1, optional=True)
    sliced = output_slices is not None
    a_list = check.slices("lora_a", lora_a, 3, single=not sliced)
    b_list = check.slices("lora_b", lora_b, 3, single=not sliced)
    widths = check.output_slices(output_slices, len(a_list), n) if sliced else (n,)
    if len(b_list) != len(a_list):
        raise ValueError(f"lora_a has {len(a_list)} slices but lora_b has {len(b_list)}")
    if not sliced:
        s, r = lora_a.shape[:2]
        if lora_a.shape[2] != k:
            raise ValueError(f"lora_a must be [S, R_max, K] with K={k}: lora_a {tuple(lora_a.shape)}, "
                             f"weight {tuple(weight.shape)}")
        if tuple(lora_b.shape) != (s, n, r):
            raise ValueError(f"lora_b must be [S, N, R_max] = {(s, n, r)} to match lora_a {tuple(lora_a.shape)} and "
                             f"weight {tuple(weight.shape)}, got {tuple(lora_b.shape)}")
    s, r = check.lora_stacks(a_list, b_list, k, widths)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    x = autocast_input(x)
    acc = acc_dtype(x.dtype)
    scales = check.slot_vector("scales", scales, s, floating=True, optional=True)
    ranks = check.slot_vector("ranks", ranks, s, floating=False, optional=True)
    check.tensor("col_scales", col_scales, 2, optional=True)
    check.shape("col_scales", col_scales, (s, n), "[S, N]: S of lora_a, N of weight")
    for name, t in (("scales", scales), ("col_scales", col_scales)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} is not differentiable here; detach it ({name}.detach())")
    check.same_device(dict(x=x, weight=weight, bias=bias, scales=scales, ranks=ranks, col_scales=col_scales,
                           **{f"lora_a[{i}]": t for i, t in enumerate(a_list)},
                           **{f"lora_b[{i}]": t for i, t in enumerate(b_list)}))
    if check.value_checks_enabled(validate_ids):
        check_slot_values(scales, ranks, r, acc, f"lora_a {tuple(a_list[0].shape)}")
        if col_scales is not None and not check.finite_in(col_scales, acc):
            raise ValueError(f"col_scales must be finite in {acc}")
    x2, lead = flatten_rows(x)
    ids, sorted_rows, offsets = resolve_ids(adapter_ids, x2.shape[0], s, validate=validate_ids, lead=lead,
                                            device=x.device)
    scales = torch.ones(s, dtype=acc, device=x.device) if scales is None else scales.to(acc)
    y = _run(x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), [a.to(x.dtype) for a in a_list],
             None, [b.to(x.dtype) for b in b_list], None, scales, None if ranks is None else ranks.to(torch.int32),
             None, ids, sorted_rows, offsets, None if col_scales is None else col_scales.detach().to(acc))
    return y.reshape(*lead, n)


def check_slot_values(scales, ranks, r: int, acc, what: str) -> None:
    """Host-side value checks (a sync): ranks in [0, r], scales finite in ``acc``."""
    if ranks is not None and bool(((ranks < 0) | (ranks > r)).any()):
        raise ValueError(f"ranks must lie in [0, {r}] (R_max of {what}), got {ranks.tolist()}")
    if scales is not None and not check.finite_in(scales, acc):
        raise ValueError(f"scales must be finite in {acc}, got {scales.tolist()}")


def mixed_adapter_linear(x, weight, bias, pool: AdapterPool, adapter_ids, *, validate_ids=True):
    """Linear layer plus, per row, the adapter in the pool slot that row names.

    Semantics: y_i = x_i·Wᵀ + b + scale_s·(f_s(x_i·A_sᵀ + a_s)·B_sᵀ + c_s), s = adapter_ids[i]
    (-1: base only), with (A, a, B, c, f, scale) as the pool stores slot s: LoRA, parallel
    bottleneck, or a sequential bottleneck folded through the base (A = D·W, a = D·b + d);
    a DoRA slot (:meth:`AdapterPool.load_dora`) gives y_i = g_s ⊙ (x_i·Wᵀ + scale_s·(x_i·A_sᵀ)·B_sᵀ) + b
    with g_s = m_s / ‖W + scale_s·B_s·A_s‖_row as computed at load time. LoRA, bottleneck and DoRA
    slots mix in one batch.

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]), weight [N, K], bias [N] | None,
    adapter_ids [M] int (or a list of ints) in [-1, pool.num_slots), or a SlotMapping of M rows
    and pool.num_slots slots -> y [M, N] in x's dtype;
    M = 0 and K = 0 included. Differentiable in x, and in W and b while the pool holds no
    sequential bottleneck: a sequential slot's fold A = D·W, a = D·b + d was computed at load
    time, outside autograd, so with grad enabled and W or b requiring grad such a pool raises
    ValueError rather than return dW/db without the fold's path.
    """
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    n, k = check.linear_input(x, weight)
    if (pool.out_features, pool.in_features) != (n, k):
        raise ValueError(f"pool is for [{pool.out_features}, {pool.in_features}] layers, "
                         f"weight is {tuple(weight.shape)}")
    check.tensor("bias", bias, 1, optional=True)
    check.same_device(dict(x=x, weight=weight, bias=bias, pool=pool.down_weight))
    sequential = [i for i, kind in enumerate(pool.kinds) if kind == "bottleneck_sequential"]
    if sequential and any_requires_grad(weight, bias):
        raise ValueError(f"pool slots {sequential} hold sequential bottlenecks, folded through the base weight at "
                         f"load time (A = D·W, a = D·b + d), so mixed_adapter_linear cannot give weight/bias their "
                         f"true gradient: freeze them (weight.requires_grad_(False), bias too), or train with "
                         f"AdapterLinear, whose fold is differentiable")
    x = autocast_input(x)
    x2, lead = flatten_rows(x)
    ids = adapter_ids
    if not isinstance(adapter_ids, SlotMapping):
        ids = check.adapter_ids(adapter_ids, x2.shape[0], pool.num_slots, validate=validate_ids, lead=lead,
                                device=x.device)
    y = run_mixed(x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), pool.slot_stack(x.dtype), ids)
    return y.reshape(*lead, n)
