"""Mixed-adapter batches: every row of a batch may use a different adapter, or none.

The raw-tensor op serving stacks call (``mixed_lora_linear``), the pool-driven op
(``mixed_adapter_linear``) and ``adapter_batch``, which gives each sequence of a model
call its own adapter by name.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .functional import _check_devices, _check_tensor, _check_x, _finite_in, _flatten_rows, autocast_input
from .ops import reference
from .ops.adapter_linear import acc_dtype
from .ops.mixed_adapter_linear import mixed_adapter_linear_op
from .pool import AdapterPool


def _ids_checking_enabled(validate: bool) -> bool:
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_adapter_ids(ids, m: int, num_slots: int, validate: bool = True, lead: tuple = (), device=None) -> Tensor:
    """Validate ``adapter_ids`` and return it flat.

    Semantics: ids [M] (or shaped like x's leading dims ``lead``), int32/int64, values in
    [-1, num_slots), on ``device`` (None: any) -> ids [M]. A list or tuple of ints becomes an
    int64 tensor on ``device``.

    Errors: TypeError for another type or a non-integer dtype, ValueError for a wrong shape,
    a tensor on another device, or a value out of range. The value check reads the ids on
    the host (a sync): it runs in eager mode only, and is skipped under torch.compile, during
    CUDA graph capture, or with ``validate=False``; the kernels then treat an out-of-range id
    as -1 rather than read out of bounds.
    """
    if isinstance(ids, (list, tuple)):
        try:
            ids = torch.tensor(ids, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"adapter_ids as a list must hold ints: {e}") from None
        if ids.numel() == 0:
            ids = ids.long()
        elif ids.dtype != torch.int64:
            raise TypeError(f"adapter_ids as a list must hold ints, got {ids.dtype} values")
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor or a list of ints, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {ids.dtype}")
    if device is not None and ids.device != torch.device(device):
        raise ValueError(f"adapter_ids must be on x's device {device}, got {ids.device}")
    if ids.numel() != m or (ids.dim() != 1 and tuple(ids.shape) != tuple(lead)):
        raise ValueError(f"adapter_ids must have shape ({m},) (one id per row of x) or {tuple(lead)}, "
                         f"got {tuple(ids.shape)}")
    ids = ids.reshape(m)
    if _ids_checking_enabled(validate) and m > 0:
        bad = (ids < -1) | (ids >= num_slots)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"adapter_ids[{row}] = {int(ids[row])} is out of range: valid ids are -1 (base only) "
                             f"and 0..{num_slots - 1} ({num_slots} slots)")
    return ids


def _any_requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(x2, params, scales, ranks, acts, ids, need_z) -> Tensor:
    """y [M, N] from ``adaptkern::mixed_adapter_linear``, or, for K = 0 (x·Wᵀ and x·A_sᵀ vanish),
    from the differentiable reference loop with out-of-range ids as -1, as the kernels treat them."""
    if x2.shape[1]:
        return mixed_adapter_linear_op(x2, *params, scales, ranks, acts, ids, need_z)[0]
    ids = torch.where((ids >= 0) & (ids < params[2].shape[0]), ids, -1)
    acc = acc_dtype(x2.dtype)
    cast = [None if t is None else t.to(acc) for t in (x2, *params)]
    return reference.mixed_adapter_linear_ref(*cast, scales, ranks, acts, ids).to(x2.dtype)


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
    n, k = _check_x(x, weight)
    _check_tensor("bias", bias, 1, optional=True)
    _check_tensor("lora_a", lora_a, 3)
    _check_tensor("lora_b", lora_b, 3)
    s, r = lora_a.shape[:2]
    if lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be [S, R_max, K] with K={k}: lora_a {tuple(lora_a.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if tuple(lora_b.shape) != (s, n, r):
        raise ValueError(f"lora_b must be [S, N, R_max] = {(s, n, r)} to match lora_a {tuple(lora_a.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    scales = _check_slot_vector("scales", scales, s, floating=True)
    ranks = _check_slot_vector("ranks", ranks, s, floating=False)
    if scales.requires_grad and torch.is_grad_enabled():
        raise ValueError("scales is not differentiable here; detach it (scales.detach())")
    _check_devices(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scales=scales, ranks=ranks))
    x = autocast_input(x)
    acc = acc_dtype(x.dtype)
    if _ids_checking_enabled(validate_ids):
        if ranks is not None and bool(((ranks < 0) | (ranks > r)).any()):
            raise ValueError(f"ranks must lie in [0, {r}] (R_max of lora_a {tuple(lora_a.shape)}), "
                             f"got {ranks.tolist()}")
        if not _finite_in(scales, acc):
            raise ValueError(f"scales must be finite in {acc}, got {scales.tolist()}")
    x2, lead = _flatten_rows(x)
    ids = check_adapter_ids(adapter_ids, x2.shape[0], s, validate_ids, lead, device=x.device)
    params = [None if t is None else t.to(x.dtype) for t in (weight, bias, lora_a, None, lora_b, None)]
    y = _run(x2, params, scales.to(acc), None if ranks is None else ranks.to(torch.int32), None, ids,
             _any_requires_grad(x, *params))
    return y.reshape(*lead, n)


def _check_slot_vector(name, t, num_slots, floating):
    if t is None:
        if floating:
            raise TypeError(f"{name} must be a [S] tensor, got None")
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({num_slots},), got {type(t).__name__}")
    if floating != t.is_floating_point() or t.dtype == torch.bool:
        kind = "floating" if floating else "integer"
        raise TypeError(f"{name} must be a {kind} tensor, got {t.dtype}")
    if tuple(t.shape) != (num_slots,):
        raise ValueError(f"{name} must have shape ({num_slots},) (one per slot), got {tuple(t.shape)}")
    return t


def mixed_adapter_linear(x, weight, bias, pool: AdapterPool, adapter_ids, *, validate_ids=True):
    """Linear layer plus, per row, the adapter in the pool slot that row names.

    Semantics: y_i = x_i·Wᵀ + b + scale_s·(f_s(x_i·A_sᵀ + a_s)·B_sᵀ + c_s), s = adapter_ids[i]
    (-1: base only), with (A, a, B, c, f, scale) as the pool stores slot s: LoRA, parallel
    bottleneck, or a sequential bottleneck folded through the base (DESIGN §1).

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]), weight [N, K], bias [N] | None,
    adapter_ids [M] int (or a list of ints) in [-1, pool.num_slots) -> y [M, N] in x's dtype;
    M = 0 and K = 0 included. Differentiable in x, and in W and b while the pool holds no
    sequential bottleneck: a sequential slot's fold A = D·W, a = D·b + d was computed at load
    time, outside autograd, so with grad enabled and W or b requiring grad such a pool raises
    ValueError rather than return dW/db without the fold's path.
    """
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    n, k = _check_x(x, weight)
    if (pool.out_features, pool.in_features) != (n, k):
        raise ValueError(f"pool is for [{pool.out_features}, {pool.in_features}] layers, "
                         f"weight is {tuple(weight.shape)}")
    _check_tensor("bias", bias, 1, optional=True)
    _check_devices(dict(x=x, weight=weight, bias=bias, pool=pool.lora_a))
    sequential = [i for i, kind in enumerate(pool.kinds) if kind == "bottleneck_sequential"]
    if sequential and _any_requires_grad(weight, bias):
        raise ValueError(f"pool slots {sequential} hold sequential bottlenecks, folded through the base weight at "
                         f"load time (A = D·W, a = D·b + d), so mixed_adapter_linear cannot give weight/bias their "
                         f"true gradient: freeze them (weight.requires_grad_(False), bias too), or train with "
                         f"AdapterLinear, whose fold is differentiable")
    x = autocast_input(x)
    x2, lead = _flatten_rows(x)
    ids = check_adapter_ids(adapter_ids, x2.shape[0], pool.num_slots, validate_ids, lead, device=x.device)
    a_all, a_bias, b_all, b_bias, scales, ranks, acts = pool.kernel_tensors(x.dtype)
    params = [weight.to(x.dtype), None if bias is None else bias.to(x.dtype), a_all, a_bias, b_all, b_bias]
    y = _run(x2, params, scales, ranks, acts, ids, _any_requires_grad(x, weight, bias))
    return y.reshape(*lead, n)


@contextlib.contextmanager
def adapter_batch(module: torch.nn.Module, names: Sequence[Optional[str]]):
    """Within the block, row b of every batch (sequence b of a [B, T, K] input) uses adapter
    ``names[b]`` (None: base only) in every AdapterLinear of ``module``.

    A layer that does not hold a named adapter runs its base for those rows, as PEFT does
    for modules an adapter does not target. Works for ``model(...)`` and ``model.generate``.
    """
    from .nn import AdapterLinear

    layers = [m for m in module.modules() if isinstance(m, AdapterLinear)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no AdapterLinear layers")
    if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of adapter names or None, got {names!r}")
    known = set().union(*(m.adapters.keys() for m in layers))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model has {sorted(known)}")
    previous = [m._batch_ids for m in layers]
    for m in layers:
        index = {name: i for i, name in enumerate(m.adapters)}
        m._batch_ids = torch.tensor([index.get(n, -1) if n is not None else -1 for n in names], dtype=torch.int32,
                                    device=m.weight.device)
    try:
        yield module
    finally:
        for m, ids in zip(layers, previous):
            m._batch_ids = ids
