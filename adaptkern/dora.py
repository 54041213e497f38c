"""DoRA (weight-decomposed LoRA): validated entry points onto ``adaptkern::dora_linear``.

DoRA, as PEFT's ``LoraConfig(use_dora=True)`` computes it: the adapted weight ``W + s·B·A`` is
split into a direction (each row normalised, the norm detached) and a trained per-output
magnitude ``m`` (PEFT's ``lora_magnitude_vector``, initialised to ``‖W‖_row``)::

    y = (m / ‖W + s·B·A‖_row) ⊙ (x·Wᵀ + s·x̃·Aᵀ·Bᵀ) + b

with x̃ = dropout(x) on the adapter branch (then the base product is split as PEFT splits
it: ``x·Wᵀ + (g − 1)⊙(x̃·Wᵀ)``, see ``adaptkern.ops.dora_linear.reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation as check
from .functional import any_requires_grad, autocast_input, flatten_rows
from .ops.dora_linear import dora_linear_op, weight_norm


def _adapter(weight, lora_a, lora_b, magnitude=None) -> tuple[int, int, int]:
    """Shapes of W [N, K], A [R, K], B [N, R] (and m [N]) -> (N, K, R); raises before any work."""
    check.tensor("weight", weight, 2)
    check.tensor("lora_a", lora_a, 2)
    check.tensor("lora_b", lora_b, 2)
    n, k = weight.shape
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"the adapter rank must be at least 1, got lora_a {tuple(lora_a.shape)}")
    check.shape("lora_a", lora_a, (r, k), "[r, K], K of weight")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape ({n}, {r}) ([N, r]: N of weight {tuple(weight.shape)}, r of "
                         f"lora_a {tuple(lora_a.shape)}), got {tuple(lora_b.shape)}")
    if magnitude is not None:
        check.tensor("magnitude", magnitude, 1)
        check.shape("magnitude", magnitude, (n,), "N of weight")
    return n, k, r


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, *, scale: float = 1.0) -> Tensor:
    """The row norm DoRA divides by, computed without forming B·A.

    Semantics: n = ‖W + s·B·A‖_row (detached: no gradient). With a zero ``lora_b`` this is
    ‖W‖_row, PEFT's initial ``lora_magnitude_vector``.

    Shapes: weight [N, K], lora_a [r, K], lora_b [N, r] -> [N] float32 (float64 for float64
    weights). The three tensors are cast to weight's dtype.

    Errors: TypeError/ValueError naming the argument (shapes, dtypes, devices, ``scale``).
    """
    _adapter(weight, lora_a, lora_b)
    check.same_device(dict(weight=weight, lora_a=lora_a, lora_b=lora_b))
    scale = check.real("scale", scale)
    with torch.no_grad():
        return weight_norm(weight, lora_a.to(weight.dtype), lora_b.to(weight.dtype), scale)[0]


def dora_linear(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, *,
                scale: float = 1.0, dropout: float = 0.0) -> Tensor:
    """Fused DoRA linear, training and inference.

    Semantics: y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙scale·(x̃·Aᵀ)·Bᵀ with g = m / ‖W + scale·B·A‖_row
    (the norm detached) and x̃ = dropout(x); without dropout, y = g ⊙ (x·Wᵀ + scale·x·Aᵀ·Bᵀ) + b.
    This is PEFT's DoRA layer (``lora_magnitude_vector`` is m); the bias is not scaled.

    Shapes: x [..., K], weight [N, K], bias [N] | None, lora_a [r, K], lora_b [N, r],
    magnitude [N] -> y [..., N] in x's dtype. Parameters of another floating dtype are cast
    to x's dtype (differentiably). Gradients flow to x, lora_a, lora_b, magnitude and, when
    they require it, weight and bias (through the products only: the norm is detached).
    A row whose norm is 0 gives g = m / 0, as PEFT does. M = 0 gives an empty y.

    Errors: TypeError/ValueError naming the argument, all raised before any computation:
    shapes, dtypes, devices, ``scale`` (a real number finite in float32), ``dropout`` (in [0, 1)).
    """
    n, k = check.linear_input(x, weight)
    check.tensor("magnitude", magnitude, 1)  # required here (None would silently give plain LoRA)
    _adapter(weight, lora_a, lora_b, magnitude)
    check.tensor("bias", bias, 1, optional=True)
    check.shape("bias", bias, (n,), "N of weight")
    check.same_device(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude))
    scale = check.real("scale", scale)
    dropout = check.dropout("dropout", dropout)

    x = autocast_input(x)
    params = [None if t is None else t.to(x.dtype) for t in (weight, bias, lora_a, lora_b, magnitude)]
    x2, lead = flatten_rows(x)
    seed = None
    if dropout > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    need_s = any_requires_grad(x, *params)
    need_p = any_requires_grad(params[4])
    y = dora_linear_op(x2, *params, scale, dropout, seed, need_s, need_p)[0]
    return y.reshape(*lead, n)
