"""Ops for serving stacks that own the base GEMM: the LoRA delta into their buffers, and embeddings.

Every function takes per-row adapter ids (-1: no adapter) or a
:class:`~adaptkern.slot_mapping.SlotMapping`, checks its inputs on the host (TypeError/ValueError
naming the argument, before anything is written) and runs one ``adaptkern::`` custom op. None
of them is differentiable (they fill the caller's buffers); inputs that require grad are refused
while grad mode is on. The value checks (ids, ranks, tokens in range; scales finite) read tensors
on the host: ``validate_ids=False``, torch.compile and CUDA graph capture skip them, and then an
out-of-range id reads as -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation as check
from .mixed import check_slot_values
from .ops.common import acc_dtype
from .ops.lora_delta import add_lora_delta_op, lora_expand_op, lora_shrink_op
from .ops.mixed_lora_embedding import mixed_lora_embedding_op
from .slot_mapping import resolve_ids

__all__ = ["add_lora_delta", "lora_expand", "lora_shrink", "mixed_lora_embedding"]


def _no_grad(**named) -> None:
    if torch.is_grad_enabled():
        bad = [n for n, t in named.items() if isinstance(t, Tensor) and t.requires_grad]
        if bad:
            raise ValueError(f"{', '.join(bad)} require grad, but this op fills a buffer and is not differentiable; "
                             f"detach them or run under torch.no_grad()")


def _matrix(name: str, t) -> Tensor:
    t = check.tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {tuple(t.shape)}")
    return t


def _offset(offset, width: int, y_width: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise TypeError(f"offset must be an int >= 0, got {offset!r}")
    if offset + width > y_width:
        raise ValueError(f"offset {offset} + the slices' width {width} exceeds y's {y_width} columns")
    return offset


def _per_slot(scales, ranks, s: int, r: int, acc, validate: bool, what: str):
    scales = check.slot_vector("scales", scales, s, floating=True, optional=True)
    ranks = check.slot_vector("ranks", ranks, s, floating=False, optional=True)
    if check.value_checks_enabled(validate):
        check_slot_values(scales, ranks, r, acc, what)
    return (None if scales is None else scales.to(acc)), (None if ranks is None else ranks.to(torch.int32))


def _b_slices(lora_b, output_slices) -> tuple[list, tuple]:
    single = isinstance(lora_b, Tensor)
    b_list = check.slices("lora_b", lora_b, 3, single=single)
    widths = tuple(b.shape[1] for b in b_list)
    if output_slices is not None and check.output_slices(output_slices, len(b_list)) != widths:
        raise ValueError(f"output_slices {tuple(output_slices)} do not match lora_b's widths {widths}")
    return b_list, widths


def lora_shrink(x, lora_a, adapter_ids, *, scales=None, ranks=None, out=None, validate_ids=True):
    """The first half of the LoRA delta, into an fp32 buffer.

    Semantics: out[i, m, :r_s] = scales[s]·x_m·A_{i,s}[:r_s]ᵀ for s = adapter_ids[m] in [0, S);
    zeros for rows without a slot and for columns >= r_s. ``out`` given: written in place.

    Shapes: x [M, K]; lora_a a sequence of n tensors [S, R, K] -> out [n, M, R], or one tensor
    [S, R, K] -> out [M, R]; out float32 (float64 for float64 x) with unit stride in R;
    adapter_ids [M] int (or a list) in [-1, S), or a SlotMapping of M rows; scales [S] float
    (None: 1); ranks [S] int in [0, R] (None: R). Returns out.
    """
    x = _matrix("x", x)
    single = isinstance(lora_a, Tensor)
    a_list = check.slices("lora_a", lora_a, 3, single=single)
    m, k = x.shape
    s, r = check.lora_stacks(a_list, [], k, None)
    acc = acc_dtype(x.dtype)
    want = (m, r) if single else (len(a_list), m, r)
    if out is None:
        out = x.new_empty(want, dtype=acc)
    elif (not isinstance(out, Tensor) or out.dtype != acc or tuple(out.shape) != want
          or (out.numel() and out.stride(-1) != 1)):
        raise ValueError(f"out must be a {acc} tensor of shape {want} with unit stride in its last dim, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    scales, ranks = _per_slot(scales, ranks, s, r, acc, validate_ids, f"lora_a {tuple(a_list[0].shape)}")
    check.same_device(dict(x=x, out=out, scales=scales, ranks=ranks,
                           **{f"lora_a[{i}]": a for i, a in enumerate(a_list)}))
    _no_grad(x=x, lora_a=a_list[0], out=out)
    ids, sorted_rows, _ = resolve_ids(adapter_ids, m, s, validate=validate_ids, device=x.device)
    lora_shrink_op(out if not single else out[None], x, [a.to(x.dtype) for a in a_list], scales, ranks, ids,
                   sorted_rows)
    return out


def lora_expand(y, s, lora_b, adapter_ids, *, ranks=None, output_slices=None, offset=0, add=True,
                validate_ids=True):
    """The second half of the LoRA delta, into the caller's (wider) output buffer.

    Semantics: for slice i (o_i = N_0 + … + N_{i-1}) and row m with slot s = adapter_ids[m] in [0, S):
    y[m, offset+o_i : offset+o_i+N_i] (+)= s[i, m, :r_s]·B_{i,s}[:, :r_s]ᵀ (``add``: added, else
    written); rows without a slot are untouched when ``add``, zero in the slices otherwise; columns
    outside the slices are never touched.

    Shapes: y [M, W] (any floating dtype, W >= offset + ΣN_i); lora_b a sequence of n tensors
    [S, N_i, R] with s [n, M, R], or one tensor [S, N, R] with s [M, R] (or [1, M, R]); s floating
    (the fp32 shrink buffer); output_slices (N_0, …) if given must match lora_b; adapter_ids as in
    :func:`lora_shrink`; ranks [S] int in [0, R]. Returns y.
    """
    y = _matrix("y", y)
    b_list, widths = _b_slices(lora_b, output_slices)
    n_slices, r = len(b_list), b_list[0].shape[2]
    slots, _ = check.lora_stacks([], b_list, None, None)
    m = y.shape[0]
    check.tensor("s", s)
    if isinstance(lora_b, Tensor) and s.dim() == 2:
        s = s[None]
    if tuple(s.shape) != (n_slices, m, r):
        raise ValueError(f"s must have shape {(n_slices, m, r)} (slices, rows of y, R of lora_b), got {tuple(s.shape)}")
    offset = _offset(offset, sum(widths), y.shape[1])
    if not isinstance(add, bool):
        raise TypeError(f"add must be a bool, got {add!r}")
    acc = acc_dtype(y.dtype)
    _, ranks = _per_slot(None, ranks, slots, r, acc, validate_ids, f"lora_b {tuple(b_list[0].shape)}")
    check.same_device(dict(y=y, s=s, ranks=ranks, **{f"lora_b[{i}]": b for i, b in enumerate(b_list)}))
    _no_grad(y=y, s=s, lora_b=b_list[0])
    ids, sorted_rows, _ = resolve_ids(adapter_ids, m, slots, validate=validate_ids, device=y.device)
    s = s.to(acc)
    if s.numel() and s.stride(-1) != 1:
        s = s.contiguous()
    lora_expand_op(y, s, [b.to(y.dtype) for b in b_list], ranks, ids, sorted_rows, offset, add)
    return y


def add_lora_delta(y, x, lora_a, lora_b, adapter_ids, *, scales=None, ranks=None, output_slices=None, offset=0,
                   validate_ids=True):
    """y += the LoRA delta of every slice: shrink and expand in one call.

    Semantics: y[m, offset+o_i : offset+o_i+N_i] += scales[s]·(x_m·A_{i,s}[:r_s]ᵀ)·B_{i,s}[:, :r_s]ᵀ for
    s = adapter_ids[m] in [0, S); other rows and columns untouched. At decode sizes one launch
    (the shrink is recomputed inside the expand: no gap between two launches), else two.

    Shapes: y [M, W], x [M, K]; lora_a, lora_b sequences of n tensors [S, R, K] / [S, N_i, R] (or one
    tensor each); output_slices (N_0, …) if given must match lora_b; adapter_ids, scales, ranks as
    in :func:`lora_shrink`. Returns y.
    """
    y, x = _matrix("y", y), _matrix("x", x)
    single = isinstance(lora_a, Tensor)
    a_list = check.slices("lora_a", lora_a, 3, single=single)
    b_list, widths = _b_slices(lora_b, output_slices)
    if len(a_list) != len(b_list):
        raise ValueError(f"lora_a has {len(a_list)} slices but lora_b has {len(b_list)}")
    m, k = x.shape
    if y.shape[0] != m:
        raise ValueError(f"y must have x's M={m} rows, got shape {tuple(y.shape)}")
    s, r = check.lora_stacks(a_list, b_list, k, widths)
    offset = _offset(offset, sum(widths), y.shape[1])
    acc = acc_dtype(x.dtype)
    scales, ranks = _per_slot(scales, ranks, s, r, acc, validate_ids, f"lora_a {tuple(a_list[0].shape)}")
    check.same_device(dict(y=y, x=x, scales=scales, ranks=ranks, **{f"lora_a[{i}]": a for i, a in enumerate(a_list)},
                           **{f"lora_b[{i}]": b for i, b in enumerate(b_list)}))
    _no_grad(y=y, x=x, lora_a=a_list[0], lora_b=b_list[0])
    ids, sorted_rows, _ = resolve_ids(adapter_ids, m, s, validate=validate_ids, device=x.device)
    add_lora_delta_op(y, x, [a.to(x.dtype) for a in a_list], [b.to(x.dtype) for b in b_list], scales, ranks, ids,
                      sorted_rows, offset, None)
    return y


def mixed_lora_embedding(input_ids, weight, lora_a, lora_b, adapter_ids, *, scales=None, ranks=None,
                         validate_ids=True):
    """Embedding lookup where every row adds the LoRA of its adapter slot (PEFT's embedding LoRA).

    Semantics: y[m] = E[t_m] + scales[s]·A_s[:r_s, t_m]ᵀ·B_s[:, :r_s]ᵀ for t_m = input_ids[m] and
    s = adapter_ids[m] in [0, S); rows without a slot get E[t_m] exactly.

    Shapes: input_ids [...] int in [0, V) (unchecked: a token outside gives a zero row), weight [V, D],
    lora_a [S, R, V] (PEFT's lora_embedding_A stacked), lora_b [S, D, R], adapter_ids shaped like
    input_ids (or [M] flat, or a SlotMapping of M rows), scales [S] float (None: 1), ranks [S] int in
    [0, R] -> y [..., D] in weight's dtype.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int32 or int64 tensor, got {getattr(input_ids, 'dtype', input_ids)!r}")
    weight = check.tensor("weight", weight, 2)
    check.tensor("lora_a", lora_a, 3)
    check.tensor("lora_b", lora_b, 3)
    v, d = weight.shape
    s, r = lora_a.shape[:2]
    if lora_a.shape[2] != v:
        raise ValueError(f"lora_a must be [S, R, V] with V={v} (weight {tuple(weight.shape)}), "
                         f"got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (s, d, r):
        raise ValueError(f"lora_b must be [S, D, R] = {(s, d, r)}, got {tuple(lora_b.shape)}")
    acc = acc_dtype(weight.dtype)
    scales, ranks = _per_slot(scales, ranks, s, r, acc, validate_ids, f"lora_a {tuple(lora_a.shape)}")
    check.same_device(dict(input_ids=input_ids, weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales,
                           ranks=ranks))
    _no_grad(weight=weight, lora_a=lora_a, lora_b=lora_b)
    lead = input_ids.shape
    tokens = input_ids.reshape(-1)
    if check.value_checks_enabled(validate_ids) and tokens.numel() and bool(((tokens < 0) | (tokens >= v)).any()):
        bad = int(((tokens < 0) | (tokens >= v)).nonzero()[0, 0])
        raise ValueError(f"input_ids[{bad}] = {int(tokens[bad])} is outside the vocabulary [0, {v})")
    ids, sorted_rows, _ = resolve_ids(adapter_ids, tokens.shape[0], s, validate=validate_ids, lead=lead,
                                      device=weight.device)
    y = mixed_lora_embedding_op(tokens, weight, lora_a.to(weight.dtype), lora_b.to(weight.dtype), scales, ranks, ids,
                                sorted_rows)
    return y.reshape(*lead, d)
