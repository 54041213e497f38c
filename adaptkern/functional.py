"""Functional API: validated entry points onto ``adaptkern::adapter_linear``.

Every function here checks its inputs on the host and raises ``TypeError``/``ValueError``
naming the argument and the shapes; the kernels behind them trust what they are given.
"""

from __future__ import annotations


import torch
from torch import Tensor

from . import validation as check
from .ops import common
from .ops.adapter_linear import ROUTES, adapter_linear_op
from .ops.config import ONEPASS_MAX_RANK


def flatten_rows(x: Tensor) -> tuple[Tensor, torch.Size]:
    """(x as [M, K], x's leading dims): M is their product, so K = 0 flattens too."""
    lead = x.shape[:-1]
    return x.reshape(lead.numel(), x.shape[-1]), lead


def any_requires_grad(*tensors) -> bool:
    """Whether autograd will need a backward through these (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_input(x: Tensor) -> Tensor:
    """Semantics: x cast to the autocast dtype when autocast is on for x's device (as F.linear
    would run), else x itself."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


def adapter_linear(x, weight, bias, a_w, a_b, b_w, b_b, *, scale=1.0, activation="identity", dropout=0.0,
                   route="auto"):
    """The general fused adapter linear; LoRA and both bottleneck placements reduce to it.

    Semantics: y = x·Wᵀ + b + scale·(f(dropout(x)·Aᵀ + a)·Bᵀ + c).

    Shapes: x [..., K], weight [N, K], bias [N] | None, a_w [R, K], a_b [R] | None,
    b_w [N, R], b_b [N] | None -> y [..., N] in x's dtype. Parameters of another floating
    dtype are cast to x's dtype (differentiably). ``route`` forces the one-pass or split
    forward kernel ("auto": the heuristic of ``adaptkern.ops.config``). K = 0 (and M = 0)
    give what the formula gives: y = b + scale·(f(a)·Bᵀ + c) on every row, with gradients.

    Errors: TypeError/ValueError naming the argument, all raised before any computation:
    shapes, dtypes, devices, activation, route, ``scale`` (a real number, not a bool, finite
    in float32), ``dropout`` (a real number in [0, 1)).
    """
    n, k = check.linear_input(x, weight)
    check.tensor("bias", bias, 1, optional=True)
    check.tensor("a_w", a_w, 2)
    check.tensor("a_b", a_b, 1, optional=True)
    check.tensor("b_w", b_w, 2)
    check.tensor("b_b", b_b, 1, optional=True)
    r = a_w.shape[0]
    check.shape("bias", bias, (n,), "N of weight")
    check.shape("a_w", a_w, (r, k), "[R, K], K of x and weight")
    check.shape("a_b", a_b, (r,), "R of a_w")
    if b_w.shape[0] != n:
        raise ValueError(f"b_w's first dim must equal N: b_w {tuple(b_w.shape)}, weight {tuple(weight.shape)}")
    if b_w.shape[1] != r:
        raise ValueError(f"rank mismatch: a_w {tuple(a_w.shape)} has R={r}, b_w {tuple(b_w.shape)} has {b_w.shape[1]}")
    check.shape("b_b", b_b, (n,), "N of weight")
    if r < 1:
        raise ValueError(f"the adapter rank must be at least 1, got a_w {tuple(a_w.shape)}")
    check.same_device(dict(x=x, weight=weight, bias=bias, a_w=a_w, a_b=a_b, b_w=b_w, b_b=b_b))
    act = check.activation(activation)
    scale = check.real("scale", scale)
    dropout = check.dropout("dropout", dropout)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "onepass" and r > 2 * ONEPASS_MAX_RANK:
        raise ValueError(f"route='onepass' supports R <= {2 * ONEPASS_MAX_RANK}, got R={r}")

    x = autocast_input(x)
    params = [None if t is None else t.to(x.dtype) for t in (weight, bias, a_w, a_b, b_w, b_b)]
    x2, lead = flatten_rows(x)
    seed = None
    if dropout > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    y, _ = adapter_linear_op(x2, *params, scale, act, dropout, seed, any_requires_grad(x, *params), route)
    return y.reshape(*lead, n)


def lora_linear(x, weight, bias, lora_a, lora_b, *, scale=1.0, dropout=0.0, route="auto"):
    """Fused LoRA linear.

    Semantics: y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ.

    Shapes: x [..., K], weight [N, K], bias [N] | None, lora_a [r, K], lora_b [N, r]
    -> y [..., N] in x's dtype. Dropout (when dropout > 0) applies to the adapter
    branch's x only, as PEFT does. K = 0, M = 0 and errors: as :func:`adapter_linear`.
    """
    check.tensor("lora_a", lora_a, 2)
    check.tensor("lora_b", lora_b, 2)
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"rank mismatch: lora_a {tuple(lora_a.shape)} [r, K] vs lora_b {tuple(lora_b.shape)} [N, r]")
    if isinstance(weight, Tensor) and weight.dim() == 2 and lora_a.shape[1] != weight.shape[1]:
        raise ValueError(f"lora_a's K must equal weight's K: lora_a {tuple(lora_a.shape)}, "
                         f"weight {tuple(weight.shape)}")
    return adapter_linear(x, weight, bias, lora_a, None, lora_b, None, scale=scale, dropout=dropout, route=route)


def bottleneck_linear(x, weight, bias, down_weight, down_bias, up_weight, up_bias, *, scale=1.0,
                      activation="relu", placement="sequential", folded=None, route="auto"):
    """Fused bottleneck adapter on a linear layer.

    Semantics:
      sequential (Houlsby/Pfeiffer): h = x·Wᵀ + b; y = h + scale·(f(h·Dᵀ + d)·Uᵀ + u);
      parallel:                      y = x·Wᵀ + b + scale·(f(x·Dᵀ + d)·Uᵀ + u).

    Shapes: x [..., K], weight [N, K], bias [N] | None, down_weight [R, N] (sequential) or
    [R, K] (parallel), down_bias [R] | None, up_weight [N, R], up_bias [N] | None -> y [..., N].
    The sequential adapter runs through the folded down-projection A = D·W, a = D·b + d;
    ``folded`` may pass a precomputed (A [R, K], a [R]) that the caller knows is fresh (a
    benchmark timing inference, say); it is checked for shape, not for freshness.
    K = 0 (then h = b and x·Dᵀ = 0 on every row), M = 0 and errors: as :func:`adapter_linear`.
    """
    placement = check.placement(placement)
    n, k = check.linear_input(x, weight)
    check.tensor("down_weight", down_weight, 2)
    check.tensor("down_bias", down_bias, 1, optional=True)
    check.tensor("up_weight", up_weight, 2)
    want = n if placement == "sequential" else k
    if down_weight.shape[1] != want:
        dim = "N (the linear's output: sequential placement)" if placement == "sequential" else "K (parallel placement)"
        raise ValueError(f"down_weight's second dim must be {dim}: down_weight {tuple(down_weight.shape)}, "
                         f"weight {tuple(weight.shape)} [N, K]")
    if up_weight.shape[1] != down_weight.shape[0]:
        raise ValueError(f"rank mismatch: down_weight {tuple(down_weight.shape)} [R, ·] vs up_weight "
                         f"{tuple(up_weight.shape)} [N, R]")
    if placement == "parallel":
        a_w, a_b = down_weight, down_bias
    elif folded is not None:
        if not isinstance(folded, (tuple, list)) or len(folded) != 2:
            raise TypeError(f"folded must be a pair (A [R, K], a [R]), got {type(folded).__name__}")
        a_w, a_b = folded
        check.tensor("folded[0]", a_w, 2)
        check.tensor("folded[1]", a_b, 1)
        check.shape("folded[0]", a_w, (down_weight.shape[0], k), "[R, K]: D·W")
        check.shape("folded[1]", a_b, (down_weight.shape[0],), "[R]: D·b + d")
    else:
        check.tensor("bias", bias, 1, optional=True)
        check.shape("bias", bias, (n,), "N of weight")
        check.shape("down_bias", down_bias, (down_weight.shape[0],), "R of down_weight")
        check.same_device(dict(weight=weight, bias=bias, down_weight=down_weight, down_bias=down_bias))
        a_w, a_b = common.fold_sequential(weight, bias, down_weight, down_bias)
    return adapter_linear(x, weight, bias, a_w, a_b, up_weight, up_bias, scale=scale, activation=activation,
                          route=route)
