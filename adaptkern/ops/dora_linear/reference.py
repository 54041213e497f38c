"""PyTorch reference for the fused DoRA linear: the spec, the CPU path and the test oracle.

DoRA (weight-decomposed LoRA) as PEFT computes it, with x̃ = dropout(x) on the adapter branch::

    n = ‖W + s·B·A‖_row                 [N]     detached: no gradient flows through it
    g = m / n                            [N]     m: the trained magnitude vector
    y = x·Wᵀ + b + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ

Without dropout (x̃ = x, and always in PEFT's eval mode) this is ``y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b``:
the magnitude rescales each output of the adapted layer; the bias is not scaled.

:func:`dora_linear_ref` computes in its inputs' precision in PEFT's order of operations (pass
float64 tensors for an oracle; autograd gives its gradients); :func:`dora_linear_forward` and
:func:`dora_linear_backward` are what CPU tensors run when the Triton interpreter is off,
computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_weight_norm_ref(weight, lora_a, lora_b, scale=1.0):
    """Semantics: n = ‖W + s·B·A‖ per row (B·A materialised: the spec). Shapes: weight [N, K],
    lora_a [R, K], lora_b [N, R] -> [N] in weight's dtype, detached."""
    with torch.no_grad():
        return torch.linalg.norm(weight + scale * (lora_b @ lora_a), dim=1)


def dora_linear_ref(x, weight, bias, lora_a, lora_b, magnitude, scale=1.0, keep=None, dropout_p=0.0):
    """Semantics: y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙s·(x̃·Aᵀ)·Bᵀ, g = m / ‖W + s·B·A‖_row
    (detached), x̃ = x ⊙ keep / (1 − p); as PEFT's DoRA layer composes it.

    Shapes: x [M, K], weight [N, K], bias [N] | None, lora_a [R, K], lora_b [N, R],
    magnitude [N], keep [M, K] bool | None -> y [M, N] in x's dtype (differentiable).
    """
    g = (magnitude / dora_weight_norm_ref(weight, lora_a.detach(), lora_b.detach(), scale).to(x.dtype))
    result = F.linear(x, weight, bias)
    if keep is None:  # PEFT reuses the base result: y = result + (g − 1)⊙(result − b) + …
        x_ad = x
        base = result if bias is None else result - bias
    else:
        x_ad = x * keep.to(x.dtype) / (1.0 - dropout_p)
        base = F.linear(x_ad, weight)
    lora = F.linear(F.linear(x_ad, lora_a), lora_b)
    return result + ((g - 1) * base + g * lora * scale)


def dropped(x32, keep, dropout_p):
    """x̃ = x ⊙ keep / (1 − p) (x itself without a mask)."""
    return x32 if keep is None else x32 * keep.to(x32.dtype) / (1.0 - dropout_p)


def dora_linear_forward(x, weight, bias, lora_a, lora_b, magnitude, scale, keep, dropout_p, need_s, need_p):
    """The CPU path of ``adaptkern::dora_linear``: (y [M, N] in x's dtype, norm [N], S = x̃·Aᵀ
    [M, R] or empty, P = x̃·Wᵀ + s·S·Bᵀ [M, N] in x's dtype with dropout and ``need_p``, else
    empty: without dropout backward recovers P from y, see :func:`recover_p`); norm and S in
    float32 (float64 for float64 inputs)."""
    acc = _acc(x.dtype)
    x32, w32, a32, b32, m32 = (t.to(acc) for t in (x, weight, lora_a, lora_b, magnitude))
    norm = torch.linalg.norm(w32 + scale * (b32 @ a32), dim=1)
    g = m32 / norm
    x_ad = dropped(x32, keep, dropout_p)
    s = x_ad @ a32.t()
    p = x_ad @ w32.t() + scale * (s @ b32.t())
    y = g * p if keep is None else x32 @ w32.t() + (g - 1) * (x_ad @ w32.t()) + g * scale * (s @ b32.t())
    if bias is not None:
        y = y + bias.to(acc)
    return (y.to(x.dtype), norm, s if need_s else s.new_empty(0),
            p.to(x.dtype) if need_p and keep is not None else x.new_empty(0))


# Recovering P = (y − b) / g from the output (no dropout). y = fl(g ⊙ P + b) carries an error
# |δy| ≤ u·(|y| + tiny) (u: y's unit roundoff, tiny: its smallest normal, covering underflow), so
# the recovered P carries |δy| / |g| and column n's dm = Σ_m dY·P / n_n is off by at most
#     u · Σ_m |dY|·(|y| + tiny) / |g|,
# against u · Σ_m |dY|·|P| = u · Σ_m |dY|·|y − b| / |g| for P merely rounded to y's dtype (what
# any computation in that dtype pays). A column is recovered only where the first is at most
# RECOVER_RATIO times the second (g cancels):  Σ |dY|·(|y| + tiny) ≤ RECOVER_RATIO · Σ |dY|·|y − b|,
# i.e. where the bias does not dominate g ⊙ P; elsewhere, and where g = 0 (y = b holds no P),
# P = x·Wᵀ + s·S·Bᵀ is recomputed. Without a bias the two sides are equal: y always gives P.
RECOVER_RATIO = 2.0


def recover_p(y, bias, g, dy, x, weight, s, lora_b, scale):
    """Semantics: P = (y − b) / g from the output y = g ⊙ P + b (no dropout), except in the
    columns where that loses precision (RECOVER_RATIO's rule, g = 0 included), which get
    P = x·Wᵀ + s·S·Bᵀ recomputed. Shapes: y [M, N], bias [N] | None, g [N], dy [M, N], x [M, K],
    weight [N, K], s [M, R], lora_b [N, R] -> [M, N] in g's dtype."""
    acc, tiny = g.dtype, torch.finfo(y.dtype).tiny
    y = y.to(acc)
    centred = y - (0.0 if bias is None else bias.to(acc))
    ady = dy.to(acc).abs()
    err = (ady * (y.abs() + tiny)).sum(0)
    redo = (g == 0) | (err > RECOVER_RATIO * (ady * centred.abs()).sum(0))
    p = centred / torch.where(g == 0, 1.0, g)
    if bool(redo.any()):
        cols = redo.nonzero().flatten()
        p[:, cols] = x.to(acc) @ weight[cols].to(acc).t() + scale * (s @ lora_b[cols].to(acc).t())
    return p


def dora_linear_backward(dy, x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, scale, keep, dropout_p,
                         needs):
    """Explicit gradients of :func:`dora_linear_ref` (the chain rule the kernels implement)::

        g = m / n;  dZ = s·(dY ⊙ g)·B;  ks = keep / (1 − p)  (1 without dropout)
        dX = dY·W + ((dY ⊙ (g − 1))·W + dZ·A) ⊙ ks        (= (dY ⊙ g)·W + dZ·A without dropout)
        dW = dYᵀ·x + (dY ⊙ (g − 1))ᵀ·x̃;  db = colsum(dY)
        dA = dZᵀ·x̃;  dB = s·(dY ⊙ g)ᵀ·S;  dm = colsum(dY ⊙ P) / n

    Shapes: dy [M, N], x [M, K], weight [N, K], bias [N] | None, lora_a [R, K], lora_b [N, R],
    magnitude [N], norm [N], s = x̃·Aᵀ [M, R], p = x̃·Wᵀ + s·S·Bᵀ [M, N] (dropout; empty unless
    dm is needed), y [M, N] the forward's output (no dropout: P from :func:`recover_p`).
    ``needs`` is (x, weight, bias, lora_a, lora_b, magnitude). Returns the six gradients in
    float32 (float64 for float64 inputs), None where not needed.
    """
    acc = _acc(x.dtype)
    dy32, x32, w32, a32, b32 = (t.to(acc) for t in (dy, x, weight, lora_a, lora_b))
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    g = magnitude.to(acc) / norm
    x_ad = dropped(x32, keep, dropout_p)
    dyg = dy32 * g
    dz = scale * dyg @ b32
    dx = dw = None
    if need_x:
        dx_ad = (dy32 * (g - 1)) @ w32 + dz @ a32
        dx = dy32 @ w32 + dropped(dx_ad, keep, dropout_p)
    if need_w:
        dw = dy32.t() @ x32 + (dy32 * (g - 1)).t() @ x_ad
    return (
        dx, dw,
        dy32.sum(0) if need_b else None,
        dz.t() @ x_ad if need_a else None,
        scale * dyg.t() @ s if need_bb else None,
        (dy32 * (p.to(acc) if keep is not None else recover_p(y, bias, g, dy, x, weight, s, lora_b, scale))).sum(0)
        / norm if need_m else None,
    )
