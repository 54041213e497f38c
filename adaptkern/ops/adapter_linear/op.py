"""The fused adapter linear: launchers → ``adaptkern::adapter_linear`` custom op → autograd.

Semantics::

    z = x̃·Aᵀ + a,   y = x·Wᵀ + b + s·(f(z)·Bᵀ + c),   x̃ = dropout(x)

Backward (the chain rule ``adapter_linear_backward`` implements; W and b get gradients
only when they require them)::

    dZ = s·(dY·B) ⊙ f'(z)                 one GEMM, f' in its epilogue
    dX = dY·W + (dZ·A) ⊙ keep/(1-p)        one GEMM, the rank chunk as extra K
    dA = dZᵀ·x̃,   da = colsum(dZ)
    dB = s·dYᵀ·f(z),   dc = s·colsum(dY)
    dW = dYᵀ·x,   db = colsum(dY)

Saved for backward: x and z ``[M, R]`` (float32) — nothing ``[M, N]``. The dropout mask is
regenerated from (seed, row·K + col) instead of being stored.

CUDA tensors run the Triton kernels; CPU tensors run ``reference.py`` unless the Triton
interpreter is on (``TRITON_INTERPRET=1``), in which case the kernels run on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .. import config
from ..common import ACT_CODES, acc_dtype, dot_flags, elem_size, strides_of, use_triton, vectors
from ..gemm import DROP_ACC2, DROP_NONE, DROP_P1, DROP_Q1, EPI_ACT, EPI_ACT_GRAD, EPI_NONE, gemm
from . import reference
from .kernels import _adapter_linear_dropout_mask_kernel, _adapter_linear_onepass_kernel


ROUTES = ("auto", "onepass", "split")


def _forward_triton(x, weight, bias, a_w, a_b, b_w, b_b, scale, act, dropout_p, seed, need_z, route):
    bias, a_b, b_b = vectors(bias, a_b, b_b)
    m, k = x.shape
    n, r = weight.shape[0], a_w.shape[0]
    y = x.new_empty((m, n))
    z = x.new_empty((m, r) if need_z else (0,), dtype=acc_dtype(x.dtype))
    if m == 0:
        return y, z
    code = ACT_CODES[act]
    dropout = dropout_p > 0.0
    dot_dtype = dot_flags(x.dtype)
    if route == "auto":
        route = config.choose_route(m, r, dropout, n=n, device=x.device)
    if n == 0:  # no output tile, so no one-pass program would write z: the split shrink does
        route = "split"
    if route == "onepass":
        cfg = config.onepass_config(m, n, r, elem_size(dot_dtype), device=x.device)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _adapter_linear_onepass_kernel[grid](
            y, z, x, weight,
            bias if bias is not None else y, a_w, a_b if a_b is not None else y,
            b_w, b_b if b_b is not None else y, seed if dropout else y,
            m, n, k, r,
            *y.stride(), *strides_of(z if need_z else None), *x.stride(), *weight.stride(),
            *a_w.stride(), *b_w.stride(),
            scale, dropout_p,
            HAS_BIAS=bias is not None, HAS_AB=a_b is not None, HAS_BB=b_b is not None,
            STORE_Z=need_z, ACT=code, DROPOUT=dropout,
            **dot_dtype, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_R=config.block_r(r), GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return y, z
    # split: S = f(x̃·Aᵀ + a) [M, R] fp32, then y = x·Wᵀ + (s·S)·Bᵀ + b + s·c.
    identity = act == "identity"
    s = z if (identity and need_z) else x.new_empty((m, r), dtype=z.dtype)
    gemm(s, x, a_w.t(), bias1=a_b, z=z if need_z else None, store_z=need_z and not identity,
         epilogue=EPI_NONE if identity else EPI_ACT, act=code, seed=seed, dropout_p=dropout_p,
         drop=DROP_P1 if dropout else DROP_NONE, drop_ld=k, dot_dtype=dot_dtype)
    gemm(y, x, weight.t(), p2=s, q2=b_w.t(), bias1=bias, bias2=b_b, alpha2=scale, dot_dtype=dot_dtype)
    return y, z


def _backward_triton(dy, x, weight, a_w, b_w, z, scale, act, dropout_p, seed, needs):
    m, k = x.shape
    n, r = weight.shape[0], a_w.shape[0]
    need_x, need_w, need_b, need_aw, need_ab, need_bw, need_bb = needs
    f32 = dict(dtype=acc_dtype(x.dtype), device=x.device)
    dot_dtype = dot_flags(x.dtype)
    dropout = dropout_p > 0.0
    code = ACT_CODES[act]
    dy32_sum = dy.sum(0, dtype=f32["dtype"]) if (need_b or need_bb) else None

    dz = torch.empty((m, r), **f32)
    if need_x or need_aw or need_ab:
        gemm(dz, dy, b_w, z=z, epilogue=EPI_NONE if act == "identity" else EPI_ACT_GRAD, act=code,
             alpha1=scale, dot_dtype=dot_dtype)
    dx = dw = daw = dbw = None
    if need_x:
        dx = x.new_empty((m, k))
        gemm(dx, dy, weight, p2=dz, q2=a_w, seed=seed, dropout_p=dropout_p,
             drop=DROP_ACC2 if dropout else DROP_NONE, drop_ld=k, dot_dtype=dot_dtype)
    if need_w:
        dw = gemm(torch.empty((n, k), **f32), dy.t(), x, dot_dtype=dot_dtype, allow_split_k=True)
    if need_aw:
        daw = gemm(torch.empty((r, k), **f32), dz.t(), x, seed=seed, dropout_p=dropout_p,
                   drop=DROP_Q1 if dropout else DROP_NONE, drop_ld=k, dot_dtype=dot_dtype, allow_split_k=True)
    if need_bw:
        s = reference.activation(z, act)
        dbw = gemm(torch.empty((n, r), **f32), dy.t(), s, alpha1=scale, dot_dtype=dot_dtype, allow_split_k=True)
    return (
        dx, dw, dy32_sum if need_b else None, daw, dz.sum(0) if need_ab else None,
        dbw, scale * dy32_sum if need_bb else None,
    )


def _keep_mask(seed: Optional[Tensor], m: int, k: int, p: float, device) -> Optional[Tensor]:
    if p == 0.0:
        return None
    return reference.dropout_keep_mask(int(seed.item()), (m, k), p, device)


@torch.library.custom_op("adaptkern::adapter_linear", mutates_args=())
def adapter_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], a_w: Tensor, a_b: Optional[Tensor],
    b_w: Tensor, b_b: Optional[Tensor], scale: float, activation: str, dropout_p: float,
    seed: Optional[Tensor], need_z: bool, route: str,
) -> tuple[Tensor, Tensor]:
    """Semantics: y = x·Wᵀ + b + s·(f(x̃·Aᵀ + a)·Bᵀ + c); returns (y [M, N], z [M, R] fp32 or [0]).

    Shapes: x [M, K], weight [N, K], bias [N], a_w [R, K], a_b [R], b_w [N, R], b_b [N],
    seed [1] int64 (only read when dropout_p > 0). Inputs are validated by the callers
    (``adaptkern.functional``); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, weight, bias, a_w, a_b, b_w, b_b, scale, activation, dropout_p, seed, need_z, route)
    keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    return reference.adapter_linear_forward(x, weight, bias, a_w, a_b, b_w, b_b, scale, activation, keep, dropout_p,
                                            need_z)


@adapter_linear_op.register_fake
def _(x, weight, bias, a_w, a_b, b_w, b_b, scale, activation, dropout_p, seed, need_z, route):
    m, r = x.shape[0], a_w.shape[0]
    z_shape = (m, r) if need_z else (0,)
    return x.new_empty((m, weight.shape[0])), x.new_empty(z_shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("adaptkern::adapter_linear_backward", mutates_args=())
def adapter_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, a_w: Tensor, b_w: Tensor, z: Tensor, scale: float,
    activation: str, dropout_p: float, seed: Optional[Tensor], needs: list[bool],
) -> list[Tensor]:
    """Gradients of ``adaptkern::adapter_linear`` for (x, weight, bias, a_w, a_b, b_w, b_b).

    Returns seven tensors in x's dtype; an input whose entry of ``needs`` is False gets an
    empty tensor (the autograd wrapper maps it to None).
    """
    if use_triton(x):
        grads = _backward_triton(dy, x, weight, a_w, b_w, z, scale, activation, dropout_p, seed, needs)
    else:
        keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        grads = reference.adapter_linear_backward(dy, x, weight, a_w, b_w, z, scale, activation, keep, dropout_p, needs)
    return [g.to(x.dtype) if g is not None else x.new_empty(0) for g in grads]


@adapter_linear_backward_op.register_fake
def _(dy, x, weight, a_w, b_w, z, scale, activation, dropout_p, seed, needs):
    m, k = x.shape
    n, r = weight.shape[0], a_w.shape[0]
    shapes = [(m, k), (n, k), (n,), (r, k), (r,), (n, r), (n,)]
    return [x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_w, a_b, b_w, b_b, scale, activation, dropout_p, seed, need_z, route = inputs
    _, z = output
    ctx.save_for_backward(x, weight, a_w, b_w, z, seed)
    ctx.args = (scale, activation, dropout_p)
    ctx.present = (True, True, bias is not None, True, a_b is not None, True, b_b is not None)


def _backward(ctx, dy, _dz):
    x, weight, a_w, b_w, z, seed = ctx.saved_tensors
    scale, activation, dropout_p = ctx.args
    wanted = [ctx.needs_input_grad[i] for i in range(7)]
    needs = [bool(w and p) for w, p in zip(wanted, ctx.present)]
    if not any(needs):
        return (None,) * 13
    if z.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("adaptkern::adapter_linear was run with need_z=False; it cannot be differentiated")
    grads = adapter_linear_backward_op(dy, x, weight, a_w, b_w, z, scale, activation, dropout_p, seed, needs)
    out = [g if need else None for g, need in zip(grads, needs)]
    return (*out, None, None, None, None, None, None)

adapter_linear_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_mask(seed: Tensor, m: int, k: int, p: float) -> Tensor:
    """Semantics: the keep-mask [m, k] (bool) the adapter kernels draw for ``seed`` and p.

    On the reference path (CPU without the interpreter) it is ``reference.dropout_keep_mask``.
    """
    if not use_triton(seed):
        return reference.dropout_keep_mask(int(seed.item()), (m, k), p, seed.device)
    out = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    if m * k:
        block = 1024
        _adapter_linear_dropout_mask_kernel[(triton.cdiv(m * k, block),)](out, seed, m, k, p, BLOCK=block)
    return out.bool()
