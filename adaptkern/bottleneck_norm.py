"""Functional API of the norm-fused bottleneck (AdapterHub's ``seq_bn``, ``par_bn`` and their variants
fused with a sub-block's output Linear, residual and norm) onto ``adaptkern::bottleneck_norm``."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from . import validation as check
from .functional import autocast_input, flatten_rows
from .ops.bottleneck_norm import bottleneck_norm_op
from .ops.bottleneck_norm.reference import ADAPTER_INPUTS, NORMS


def bottleneck_norm(x, weight, bias, residual, down_weight, down_bias, up_weight, up_bias, *, scale=1.0,
                    activation="relu", adapter_input="norm", coefficients=(1.0, 1.0, 0.0), norm="layernorm",
                    norm_weight=None, norm_bias=None, eps=1e-5, final_norm=True):
    """A bottleneck adapter fused with the Linear before it, the residual and the norm after it.

    Semantics: h = x·Wᵀ + b (h = x when ``weight`` is None); z = h + r;
    a = h | z | N(z) | r for ``adapter_input`` "output" | "sum" | "norm" | "residual";
    t = c_h·h + c_r·r + c_n·N(z) + scale ⊙ (f(a·Dᵀ + d)·Uᵀ + u) with (c_h, c_r, c_n) = ``coefficients``;
    y = N(t) if ``final_norm`` else t. N is ``norm`` ("layernorm": (v − μ)/√(σ² + eps)·γ + β,
    "rmsnorm": v/√(mean(v²) + eps)·γ + β, "none") with γ = ``norm_weight``, β = ``norm_bias``.
    Examples: BERT Pfeiffer (``seq_bn``) is adapter_input="norm", coefficients (1, 1, 0),
    final_norm=True; Llama ``seq_bn`` is "sum", (1, 1, 0), norm="none", final_norm=False;
    ``par_bn`` is "residual", (1, 1, 0), final_norm as the model's sub-block.

    Shapes: x [..., K] (weight None: [..., N]), weight [N, K] | None, bias [N] | None, residual
    [..., N] (x's leading dims), down_weight [R, N], down_bias [R] | None, up_weight [N, R],
    up_bias [N] | None, scale a number or a tensor [1] or [N] (learned: it gets a gradient),
    norm_weight / norm_bias [N] | None -> y [..., N] in x's dtype. Parameters of another
    floating dtype are cast to x's dtype (differentiably).

    Errors: TypeError/ValueError naming the argument and the shapes, all raised before any
    computation.
    """
    check.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    check.tensor("residual", residual)
    if weight is None:
        if bias is not None:
            raise ValueError("bias needs a weight: with weight=None, x is already the Linear's output h")
        n = x.shape[-1]
    else:
        n, _ = check.linear_input(x, weight)
    check.tensor("bias", bias, 1, optional=True)
    check.shape("bias", bias, (n,), "N of weight")
    if tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], n)} (x's leading dims, N), "
                         f"got {tuple(residual.shape)}")
    if n < 1:
        raise ValueError(f"the hidden size N must be at least 1, got residual {tuple(residual.shape)}")
    check.tensor("down_weight", down_weight, 2)
    check.tensor("up_weight", up_weight, 2)
    r = down_weight.shape[0]
    if r < 1:
        raise ValueError(f"the bottleneck size must be at least 1, got down_weight {tuple(down_weight.shape)}")
    check.shape("down_weight", down_weight, (r, n), "[R, N], N the hidden size")
    check.shape("up_weight", up_weight, (n, r), "[N, R], R of down_weight")
    for name, t, size in (("down_bias", down_bias, r), ("up_bias", up_bias, n), ("norm_weight", norm_weight, n),
                          ("norm_bias", norm_bias, n)):
        check.tensor(name, t, 1, optional=True)
        check.shape(name, t, (size,), "R of down_weight" if name == "down_bias" else "N, the hidden size")
    if isinstance(scale, Tensor):
        check.tensor("scale", scale)
        if scale.numel() not in (1, n) or scale.dim() > 1:
            raise ValueError(f"scale as a tensor must have shape (1,) or ({n},), got {tuple(scale.shape)}")
    else:
        scale = check.real("scale", scale)
    act = check.activation(activation)
    if adapter_input not in ADAPTER_INPUTS:
        raise ValueError(f"adapter_input must be one of {ADAPTER_INPUTS}, got {adapter_input!r}")
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise TypeError(f"coefficients must be a triple (c_h, c_r, c_n), got {coefficients!r}")
    c_h, c_r, c_n = (check.real(f"coefficients[{i}]", c) for i, c in enumerate(coefficients))
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "none" and (adapter_input == "norm" or c_n != 0.0 or final_norm):
        raise ValueError("norm='none' leaves nothing to normalise: adapter_input='norm', coefficients[2] != 0 and "
                         "final_norm=True need norm='layernorm' or 'rmsnorm'")
    if not isinstance(final_norm, bool):
        raise TypeError(f"final_norm must be a bool, got {final_norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    check.same_device(dict(x=x, weight=weight, bias=bias, residual=residual, down_weight=down_weight,
                           down_bias=down_bias, up_weight=up_weight, up_bias=up_bias, norm_weight=norm_weight,
                           norm_bias=norm_bias, scale=scale if isinstance(scale, Tensor) else None))

    x = autocast_input(x)
    if not isinstance(scale, Tensor):
        scale = torch.full((1,), scale, dtype=x.dtype, device=x.device)
    params = [None if t is None else t.to(x.dtype) for t in (weight, bias, residual, down_weight, down_bias,
                                                            up_weight, up_bias, scale.reshape(-1), norm_weight,
                                                            norm_bias)]
    x2, lead = flatten_rows(x)
    params[2] = params[2].reshape(x2.shape[0], n)
    y, *_ = bottleneck_norm_op(x2, *params, act, adapter_input, c_h, c_r, c_n, norm, final_norm, float(eps))
    return y.reshape(*lead, n)
