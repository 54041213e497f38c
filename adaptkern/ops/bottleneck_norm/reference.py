"""PyTorch reference for the norm-fused bottleneck: the spec, the CPU path and the test oracle.

With h = x·Wᵀ + b the sub-block's output Linear (or h = x when there is no weight), r the
sub-block's residual input and N the sub-block's norm (LayerNorm or RMSNorm with γ, β)::

    z   = h + r
    a   = h | z | N(z) | r                     the adapter's input ("output", "sum", "norm", "residual")
    p   = a·Dᵀ + d                              [M, R]
    t   = c_h·h + c_r·r + c_n·N(z) + s ⊙ (f(p)·Uᵀ + u)
    y   = N(t) if final_norm else t

s is a scalar or one value per column ([1] or [N]). Every AdapterHub bottleneck placement is
one choice of (a, c_h, c_r, c_n, final_norm): BERT's Pfeiffer ``seq_bn`` is
(N(z), 1, 1, 0, True), Llama's is (z, 1, 1, 0, False), ``par_bn`` is (r, 1, 1, 0, BERT-style).

:func:`bottleneck_norm_ref` computes in its inputs' precision (float64 tensors: the oracle);
:func:`bottleneck_norm_forward` / :func:`bottleneck_norm_backward` are what CPU tensors run
when the Triton interpreter is off: computed in float64, cast back.
"""

from __future__ import annotations

import torch

from ..common import activation, activation_grad

ADAPTER_INPUTS = ("output", "sum", "norm", "residual")
NORMS = ("layernorm", "rmsnorm", "none")


def normalize(v, weight, bias, norm, eps):
    """Semantics: LayerNorm (v − μ)/√(σ² + ε)·γ + β or RMSNorm v/√(mean(v²) + ε)·γ (+ β), over
    the last dim; γ, β optional. Shapes: v [M, N], weight/bias [N] | None."""
    if norm == "layernorm":
        mu = v.mean(-1, keepdim=True)
        out = (v - mu) * torch.rsqrt(((v - mu) ** 2).mean(-1, keepdim=True) + eps)
    else:
        out = v * torch.rsqrt((v * v).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def needs_input_norm(adapter_input: str, c_n: float) -> bool:
    """Whether N(z) enters the formula (as the adapter's input or in the base)."""
    return adapter_input == "norm" or c_n != 0.0


def bottleneck_norm_ref(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b, *,
                        act="relu", adapter_input="norm", coeffs=(1.0, 1.0, 0.0), norm="layernorm",
                        final_norm=True, eps=1e-5):
    """Semantics: the module docstring's formula, in the inputs' own precision (differentiable).

    Shapes: x [M, K] (or [M, N] with weight None), weight [N, K] | None, bias [N] | None,
    residual [M, N], down_w [R, N], down_b [R] | None, up_w [N, R], up_b [N] | None,
    scale [1] or [N] tensor, norm_w / norm_b [N] | None. Returns y [M, N].
    """
    c_h, c_r, c_n = coeffs
    h = x if weight is None else x @ weight.t()
    if weight is not None and bias is not None:
        h = h + bias
    z = h + residual
    n = normalize(z, norm_w, norm_b, norm, eps) if needs_input_norm(adapter_input, c_n) else None
    a = {"output": h, "sum": z, "norm": n, "residual": residual}[adapter_input]
    p = a @ down_w.t()
    if down_b is not None:
        p = p + down_b
    branch = activation(p, act) @ up_w.t()
    if up_b is not None:
        branch = branch + up_b
    t = scale * branch
    for c, v in ((c_h, h), (c_r, residual), (c_n, n)):
        if c != 0.0:
            t = t + c * v
    return normalize(t, norm_w, norm_b, norm, eps) if final_norm else t


def _acc(dtype):
    """The CPU path computes in float64: its row statistics and scalar gradients (ds sums M·N terms)
    then carry no error of their own (CPU tensors run it only without a GPU and the interpreter)."""
    return torch.float64


def bottleneck_norm_forward(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b, **kw):
    """The CPU path of the forward op: :func:`bottleneck_norm_ref` in float64; returns y in x's dtype."""
    acc = _acc(x.dtype)
    args = [None if t is None else t.to(acc) for t in (x, weight, bias, residual, down_w, down_b, up_w, up_b, scale,
                                                        norm_w, norm_b)]
    return bottleneck_norm_ref(*args, **kw).to(x.dtype)


def _norm_backward(dout, hat, rstd, weight, norm):
    """dL/dv of out = v̂·γ + β given dL/dout; v̂ = ``hat``, rstd [M, 1]."""
    g = dout if weight is None else dout * weight
    dv = g - hat * (g * hat).mean(-1, keepdim=True)
    if norm == "layernorm":
        dv = dv - g.mean(-1, keepdim=True)
    return rstd * dv


def _hat(v, norm, eps):
    mu = v.mean(-1, keepdim=True) if norm == "layernorm" else v.new_zeros((v.shape[0], 1))
    rstd = torch.rsqrt(((v - mu) ** 2).mean(-1, keepdim=True) + eps)
    return (v - mu) * rstd, rstd


def bottleneck_norm_backward(dy, inputs, needs, *, act, adapter_input, coeffs, norm, final_norm, eps):
    """The CPU path of the backward op: explicit gradients of :func:`bottleneck_norm_ref` (the chain rule
    of ``op.py``'s docstring, which the kernels implement), in float64, for
    the eleven ``inputs`` (x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b);
    None where ``needs`` is False."""
    acc = _acc(dy.dtype)
    x, weight, bias, r, dw, db, uw, ub, s, gw, gb = (None if t is None else t.to(acc) for t in inputs)
    dy = dy.to(acc)
    c_h, c_r, c_n = coeffs
    h = x if weight is None else x @ weight.t() + (0 if bias is None else bias)
    z = h + r
    use_in = norm != "none" and needs_input_norm(adapter_input, c_n)
    zh, rstd1 = _hat(z, norm, eps) if use_in else (None, None)
    n = None if zh is None else zh * (1 if gw is None else gw) + (0 if gb is None else gb)
    a = {"output": h, "sum": z, "norm": n, "residual": r}[adapter_input]
    p = a @ dw.t() + (0 if db is None else db)
    sa = activation(p, act)
    branch = sa @ uw.t() + (0 if ub is None else ub)
    t = s * branch + c_h * h + c_r * r + (c_n * n if c_n != 0.0 else 0)
    dg = t.new_zeros(t.shape[-1]) if gw is not None else None
    dbeta = t.new_zeros(t.shape[-1]) if gb is not None else None
    dt = dy
    if final_norm:
        th, rstd2 = _hat(t, norm, eps)
        dt = _norm_backward(dy, th, rstd2, gw, norm)
        dg = None if dg is None else dg + (dy * th).sum(0)
        dbeta = None if dbeta is None else dbeta + dy.sum(0)
    dp = ((s * dt) @ uw) * activation_grad(p, act)
    da = dp @ dw
    dh, dr = c_h * dt, c_r * dt
    if adapter_input in ("output", "sum"):
        dh = dh + da
    if adapter_input in ("sum", "residual"):
        dr = dr + da
    if use_in:
        dn = c_n * dt + (da if adapter_input == "norm" else 0)
        dz = _norm_backward(dn, zh, rstd1, gw, norm)
        dh, dr = dh + dz, dr + dz
        dg = None if dg is None else dg + (dn * zh).sum(0)
        dbeta = None if dbeta is None else dbeta + dn.sum(0)
    ds = (dt * branch).sum(0)
    grads = (
        dh if weight is None else dh @ weight, None if weight is None else dh.t() @ x, dh.sum(0), dr,
        dp.t() @ a, dp.sum(0), s[:, None] * (dt.t() @ sa) if s.numel() > 1 else s * (dt.t() @ sa),
        s * dt.sum(0), ds.sum().reshape(1) if s.numel() == 1 else ds, dg, dbeta,
    )
    return [g if need else None for g, need in zip(grads, needs)]
