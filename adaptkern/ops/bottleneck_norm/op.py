"""The norm-fused bottleneck: launchers → ``adaptkern::bottleneck_norm`` custom op → autograd.

Semantics (``reference.py``)::

    h = x·Wᵀ + b,  z = h + r,  a ∈ {h, z, N(z), r},  p = a·Dᵀ + d
    t = c_h·h + c_r·r + c_n·N(z) + s ⊙ (f(p)·Uᵀ + u),  y = N(t) if final_norm else t

Forward, two launches: the dense GEMM writes h (``_dual_gemm_kernel``, skipped when x is h
already) and ``_bottleneck_norm_fwd_kernel`` does the rest row block by row block (norm
statistics, shrink, f, expand, residual, final norm). Saved for backward: x, r, h, p [M, R]
and four row statistics; nothing is stored for t, N(z) or the adapter's input.

Backward (the chain rule; ``ẑ``, ``t̂`` the normalised z and t)::

    dt = rstd_t·(γ⊙dy − mean(γ⊙dy) − t̂·mean(γ⊙dy⊙t̂))      (dy when not final_norm; RMSNorm: no mean term)
    dp = ((s⊙dt)·U) ⊙ f'(p),   da = dp·D
    dn = c_n·dt (+ da when a = N(z)),   dz = rstd_z·(γ⊙dn − mean(γ⊙dn) − ẑ·mean(γ⊙dn⊙ẑ))
    dh = c_h·dt + dz (+ da when a ∈ {h, z}),   dr = c_r·dt + dz (+ da when a ∈ {z, r})
    dD = dpᵀ·a,  dd = colsum(dp),  dU = s ⊙ (dtᵀ·f(p)),  du = s ⊙ colsum(dt),  ds = colsum(dt ⊙ (f(p)·Uᵀ + u))
    dγ = colsum(dy⊙t̂ + dn⊙ẑ),  dβ = colsum(dy + dn),  dx = dh·W,  dW = dhᵀ·x,  db = colsum(dh)

``_bottleneck_norm_bwd_kernel`` computes dt, dp, dh, dr and per-program column partials of
dγ, dβ, ds in one launch; dx, dW, dD and dU are ``_dual_gemm_kernel`` launches (dD for a = z
is one launch with r as the second product). Launches: forward 2 (1 without W); backward
2 + one per requested weight gradient (dx, dW, dD, dU), plus PyTorch column sums.

CUDA tensors run the kernels; CPU tensors run ``reference.py`` unless the Triton interpreter
is on.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..common import ACT_CODES, acc_dtype, activation as act_fn, dot_flags, use_triton, vectors
from ..gemm import gemm
from . import reference
from .kernels import _bottleneck_norm_bwd_kernel, _bottleneck_norm_fwd_kernel

NORM_CODES = {"layernorm": 0, "rmsnorm": 1, "none": 2}
INPUT_CODES = {name: i for i, name in enumerate(reference.ADAPTER_INPUTS)}
BLOCK_M = 16


def _blocks(n: int, r: int) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=min(128, max(16, triton.next_power_of_2(n))),
                BLOCK_R=max(16, triton.next_power_of_2(r)))


def _flags(adapter_input, c_n, norm, final_norm):
    norm_in = norm != "none" and reference.needs_input_norm(adapter_input, c_n)
    return dict(A_IN=INPUT_CODES[adapter_input], NORM=NORM_CODES[norm], USE_N=c_n != 0.0, FINAL=final_norm), norm_in


def _forward_triton(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b, act,
                    adapter_input, c_h, c_r, c_n, norm, final_norm, eps):
    bias, down_b, up_b, scale, norm_w, norm_b = vectors(bias, down_b, up_b, scale, norm_w, norm_b)
    m, n, r = x.shape[0], residual.shape[1], down_w.shape[0]
    acc = acc_dtype(x.dtype)
    dot = dot_flags(x.dtype)
    h = x if weight is None else gemm(x.new_empty((m, n)), x, weight.t(), bias1=bias, dot_dtype=dot)
    y = x.new_empty((m, n))
    p = torch.empty((m, r), dtype=acc, device=x.device)
    stats = torch.zeros((4, m), dtype=acc, device=x.device)
    if m == 0:
        return y, (h if weight is not None else x.new_empty(0)), p, stats
    flags, norm_in = _flags(adapter_input, c_n, norm, final_norm)
    _bottleneck_norm_fwd_kernel[(triton.cdiv(m, BLOCK_M),)](
        y, p, stats, h, residual, down_w, down_b if down_b is not None else y, up_w,
        up_b if up_b is not None else y, scale, norm_w if norm_w is not None else y,
        norm_b if norm_b is not None else y,
        m, n, r, *y.stride(), *h.stride(), *residual.stride(), p.stride(0), *down_w.stride(), *up_w.stride(),
        0 if scale.numel() == 1 else 1,
        c_h, c_r, c_n, eps,
        NORM_IN=norm_in, HAS_DB=down_b is not None, HAS_UB=up_b is not None, HAS_G=norm_w is not None,
        HAS_B=norm_b is not None, ACT=ACT_CODES[act], **flags, **dot, **_blocks(n, r), num_warps=4,
    )
    return y, (h if weight is not None else x.new_empty(0)), p, stats


def _backward_triton(dy, x, weight, residual, down_w, up_w, up_b, scale, norm_w, norm_b, h, p, stats, act,
                     adapter_input, c_h, c_r, c_n, norm, final_norm, needs):
    up_b, scale, norm_w, norm_b = vectors(up_b, scale, norm_w, norm_b)
    need_x, need_w, need_b, need_r, need_dw, need_db, need_uw, need_ub, need_s, need_g, need_nb = needs
    h = x if weight is None else h
    m, n, r = dy.shape[0], dy.shape[1], down_w.shape[0]
    f32 = dict(dtype=acc_dtype(x.dtype), device=x.device)
    dot = dot_flags(x.dtype)
    flags, norm_in = _flags(adapter_input, c_n, norm, final_norm)
    store_a = norm_in and adapter_input == "norm"
    dh = torch.empty((m, n), **f32)
    dr = residual.new_empty((m, n))
    dt = torch.empty((m, n), **f32)
    dp = torch.empty((m, r), **f32)
    a = torch.empty((m, n), **f32) if store_a else dh
    programs = triton.cdiv(m, BLOCK_M)
    part = torch.zeros((5, programs, n), **f32)
    if m > 0:
        _bottleneck_norm_bwd_kernel[(programs,)](
            dh, dr, dt, dp, a, part, dy, h, residual, p, stats, down_w, up_w, up_b if up_b is not None else dh, scale,
            norm_w if norm_w is not None else dh, norm_b if norm_b is not None else dh,
            m, n, r, programs, *dy.stride(), *h.stride(), *residual.stride(), *dr.stride(), *down_w.stride(),
            *up_w.stride(), 0 if scale.numel() == 1 else 1, c_h, c_r, c_n,
            NORM_IN_BWD=norm_in, HAS_UB=up_b is not None, HAS_G=norm_w is not None, HAS_B=norm_b is not None,
            ACT=ACT_CODES[act], **flags, **dot, **_blocks(n, r), num_warps=4,
        )
    s_col = scale.to(f32["dtype"]).expand(n)
    dx = dw = ddw = duw = None
    if need_x:
        dx = dh if weight is None else gemm(x.new_empty((m, x.shape[1])), dh, weight, dot_dtype=dot)
    if need_w:
        dw = gemm(torch.empty((n, x.shape[1]), **f32), dh.t(), x, dot_dtype=dot, allow_split_k=True)
    if need_dw:
        out = torch.empty((r, n), **f32)
        if adapter_input == "sum":
            ddw = gemm(out, dp.t(), h, p2=dp.t(), q2=residual, dot_dtype=dot)
        else:
            src = {"output": h, "norm": a, "residual": residual}[adapter_input]
            ddw = gemm(out, dp.t(), src, dot_dtype=dot, allow_split_k=True)
    if need_uw:
        duw = gemm(torch.empty((n, r), **f32), dt.t(), act_fn(p, act), dot_dtype=dot, allow_split_k=True)
        duw = duw * s_col[:, None]
    ds = None
    if need_s:
        ds = part[4].sum(0)
        ds = ds.sum().reshape(1) if scale.numel() == 1 else ds
    return (dx, dw, dh.sum(0) if need_b else None, dr if need_r else None, ddw, dp.sum(0) if need_db else None, duw,
            s_col * dt.sum(0) if need_ub else None, ds, (part[0] + part[2]).sum(0) if need_g else None,
            (part[1] + part[3]).sum(0) if need_nb else None)


def _kw(activation, adapter_input, c_h, c_r, c_n, norm, final_norm, eps):
    return dict(act=activation, adapter_input=adapter_input, coeffs=(c_h, c_r, c_n), norm=norm, final_norm=final_norm,
                eps=eps)


@torch.library.custom_op("adaptkern::bottleneck_norm", mutates_args=())
def bottleneck_norm_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Tensor, down_w: Tensor,
    down_b: Optional[Tensor], up_w: Tensor, up_b: Optional[Tensor], scale: Tensor, norm_w: Optional[Tensor],
    norm_b: Optional[Tensor], activation: str, adapter_input: str, c_h: float, c_r: float, c_n: float, norm: str,
    final_norm: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Semantics: the module docstring's y; returns (y [M, N], h [M, N] or [0], p [M, R], stats [4, M])
    (h, p, stats are what backward reads; the reference path returns them empty and recomputes).

    Shapes: x [M, K] (weight None: [M, N]), weight [N, K], bias [N], residual [M, N], down_w [R, N],
    down_b [R], up_w [N, R], up_b [N], scale [1] or [N], norm_w / norm_b [N]. Validated by the
    caller (``adaptkern.bottleneck_norm``); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b,
                               activation, adapter_input, c_h, c_r, c_n, norm, final_norm, eps)
    y = reference.bottleneck_norm_forward(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w,
                                          norm_b, **_kw(activation, adapter_input, c_h, c_r, c_n, norm, final_norm,
                                                        eps))
    return y, x.new_empty(0), x.new_empty(0, dtype=acc_dtype(x.dtype)), x.new_empty(0, dtype=acc_dtype(x.dtype))


@bottleneck_norm_op.register_fake
def _(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b, activation, adapter_input, c_h,
      c_r, c_n, norm, final_norm, eps):
    m, n, r = x.shape[0], residual.shape[1], down_w.shape[0]
    acc = acc_dtype(x.dtype)
    if not use_triton(x):
        return x.new_empty((m, n)), x.new_empty(0), x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    h = x.new_empty((m, n)) if weight is not None else x.new_empty(0)
    return x.new_empty((m, n)), h, x.new_empty((m, r), dtype=acc), x.new_empty((4, m), dtype=acc)


@torch.library.custom_op("adaptkern::bottleneck_norm_backward", mutates_args=())
def bottleneck_norm_backward_op(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Tensor, down_w: Tensor,
    down_b: Optional[Tensor], up_w: Tensor, up_b: Optional[Tensor], scale: Tensor, norm_w: Optional[Tensor],
    norm_b: Optional[Tensor], h: Tensor, p: Tensor, stats: Tensor, activation: str, adapter_input: str, c_h: float,
    c_r: float, c_n: float, norm: str, final_norm: bool, eps: float, needs: list[bool],
) -> list[Tensor]:
    """Gradients of ``adaptkern::bottleneck_norm`` for its eleven tensor inputs (x, weight, bias,
    residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b), each in its input's dtype; an
    input whose entry of ``needs`` is False gets an empty tensor."""
    inputs = (x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b)
    if use_triton(x):
        grads = _backward_triton(dy, x, weight, residual, down_w, up_w, up_b, scale, norm_w, norm_b, h, p, stats,
                                 activation, adapter_input, c_h, c_r, c_n, norm, final_norm, needs)
    else:
        grads = reference.bottleneck_norm_backward(dy, inputs, needs, **_kw(activation, adapter_input, c_h, c_r, c_n,
                                                                             norm, final_norm, eps))
    return [g.to(t.dtype) if g is not None else x.new_empty(0) for g, t in zip(grads, inputs)]


@bottleneck_norm_backward_op.register_fake
def _(dy, x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b, h, p, stats, activation,
      adapter_input, c_h, c_r, c_n, norm, final_norm, eps, needs):
    inputs = (x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    tensors, args = inputs[:11], inputs[11:]
    _, h, p, stats = output
    ctx.save_for_backward(*tensors, h, p, stats)
    ctx.args = args
    ctx.present = tuple(t is not None for t in tensors)


def _backward(ctx, dy, _dh, _dp, _dstats):
    saved = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i] and ctx.present[i]) for i in range(11)]
    if not any(needs):
        return (None,) * 19
    grads = bottleneck_norm_backward_op(dy.contiguous(), *saved, *ctx.args, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], *(None,) * 8)


bottleneck_norm_op.register_autograd(_backward, setup_context=_setup_context)
