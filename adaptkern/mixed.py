"""Mixed-adapter batches: every row of a batch may use a different adapter, or none.

The raw-tensor op serving stacks call (``mixed_lora_linear``) and the pool-driven op
(``mixed_adapter_linear``); both run ``adaptkern::mixed_adapter_linear`` through
:func:`run_mixed`, the one launch path ``AdapterLinear``'s mixed forward uses too. An
adapter id is a slot index; -1 (or any id outside [0, S)) means base only.
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


def run_mixed(x2: Tensor, weight: Tensor, bias: Optional[Tensor], stack: SlotStack, ids: Tensor) -> Tensor:
    """The one launch path of mixed batches: y [M, N] from ``adaptkern::mixed_adapter_linear``
    (tensors already checked and in x's dtype)."""
    need_z = any_requires_grad(x2, weight, bias, stack.down_weight, stack.down_bias, stack.up_weight, stack.up_bias)
    return mixed_adapter_linear_op(x2, weight, bias, *stack, ids, need_z)[0]


def mixed_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, *, scales, ranks=None, validate_ids=True):
    """LoRA linear where every row picks its adapter.

    Semantics: y_i = x_i·Wᵀ + b + scales[s]·(x_i·A_s[:r_s]ᵀ)·B_s[:, :r_s]ᵀ with s = adapter_ids[i];
    adapter_ids[i] = -1 gives exactly the base result.

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]), weight [N, K], bias [N] | None,
    lora_a [S, R_max, K], lora_b [S, N, R_max], adapter_ids [M] int32/int64 (or a list of
    ints) in [-1, S), scales [S] float tensor, ranks [S] int tensor in [0, R_max] (None: R_max
    for every slot) -> y [M, N] in x's dtype; M = 0 and K = 0 (y_i = b) included.
    Differentiable in x, lora_a, lora_b (and W, b when they require grad): each slot gets
    exactly the gradient of the rows that used it. ``scales`` is not differentiable: one
    that requires grad is refused.

    Errors: TypeError/ValueError naming the argument, all raised before any computation.
    The value checks (ids and ranks in range, scales finite in the compute dtype: float64
    for float64 x, else float32) read tensors on the host; ``validate_ids=False``,
    torch.compile and CUDA graph capture skip them.
    """
    n, k = check.linear_input(x, weight)
    check.tensor("bias", bias, 1, optional=True)
    check.tensor("lora_a", lora_a, 3)
    check.tensor("lora_b", lora_b, 3)
    s, r = lora_a.shape[:2]
    if lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be [S, R_max, K] with K={k}: lora_a {tuple(lora_a.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if tuple(lora_b.shape) != (s, n, r):
        raise ValueError(f"lora_b must be [S, N, R_max] = {(s, n, r)} to match lora_a {tuple(lora_a.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    scales = check.slot_vector("scales", scales, s, floating=True)
    ranks = check.slot_vector("ranks", ranks, s, floating=False, optional=True)
    if scales.requires_grad and torch.is_grad_enabled():
        raise ValueError("scales is not differentiable here; detach it (scales.detach())")
    check.same_device(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scales=scales, ranks=ranks))
    x = autocast_input(x)
    acc = acc_dtype(x.dtype)
    if check.value_checks_enabled(validate_ids):
        if ranks is not None and bool(((ranks < 0) | (ranks > r)).any()):
            raise ValueError(f"ranks must lie in [0, {r}] (R_max of lora_a {tuple(lora_a.shape)}), "
                             f"got {ranks.tolist()}")
        if not check.finite_in(scales, acc):
            raise ValueError(f"scales must be finite in {acc}, got {scales.tolist()}")
    x2, lead = flatten_rows(x)
    ids = check.adapter_ids(adapter_ids, x2.shape[0], s, validate=validate_ids, lead=lead, device=x.device)
    stack = SlotStack(lora_a.to(x.dtype), None, lora_b.to(x.dtype), None, scales.to(acc),
                      None if ranks is None else ranks.to(torch.int32), None)
    y = run_mixed(x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stack, ids)
    return y.reshape(*lead, n)


def mixed_adapter_linear(x, weight, bias, pool: AdapterPool, adapter_ids, *, validate_ids=True):
    """Linear layer plus, per row, the adapter in the pool slot that row names.

    Semantics: y_i = x_i·Wᵀ + b + scale_s·(f_s(x_i·A_sᵀ + a_s)·B_sᵀ + c_s), s = adapter_ids[i]
    (-1: base only), with (A, a, B, c, f, scale) as the pool stores slot s: LoRA, parallel
    bottleneck, or a sequential bottleneck folded through the base (A = D·W, a = D·b + d).

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]), weight [N, K], bias [N] | None,
    adapter_ids [M] int (or a list of ints) in [-1, pool.num_slots) -> y [M, N] in x's dtype;
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
    ids = check.adapter_ids(adapter_ids, x2.shape[0], pool.num_slots, validate=validate_ids, lead=lead, device=x.device)
    y = run_mixed(x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), pool.slot_stack(x.dtype), ids)
    return y.reshape(*lead, n)
