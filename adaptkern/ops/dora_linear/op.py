"""The fused DoRA linear: launchers → ``adaptkern::dora_linear`` custom op → autograd.

Semantics (``reference.py`` is the spec; x̃ = dropout(x) on the adapter branch)::

    n = ‖W + s·B·A‖_row (detached),  g = m / n
    y = x·Wᵀ + b + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ        (= g ⊙ (x·Wᵀ + s·S·Bᵀ) + b, p = 0)

Forward launches, without dropout: the norm kernel (n and g, one read of W), the shrink
``S = x·Aᵀ`` and one main GEMM ``y = g ⊙ (x·Wᵀ + s·S·Bᵀ) + b`` (the dual GEMM with its
per-column scale) — LoRA's split route plus one read of W. ``dm`` needs ``P = x·Wᵀ + s·S·Bᵀ``:
without dropout backward recovers it from the saved output, ``P = (y − b) / g`` (recomputed
as x·Wᵀ + s·S·Bᵀ for a column where the bias dominates g ⊙ P, or g = 0, where that would lose
precision: ``reference.recover_p``), so the forward writes nothing ``[M, N]`` but y (autograd
then holds y: modifying y in place before backward is an error, as for any op that saves its
output).
With dropout y needs x·Wᵀ and x̃·Wᵀ (two base GEMMs, as in PEFT), in one launch and one
accumulator: ``P = x̃·Wᵀ + s·S·Bᵀ`` (written, x's dtype), then ``y = (g − 1) ⊙ P + x·Wᵀ +
s·S·Bᵀ + b`` by a second pass over W and B with x undropped (no fp32 ``[M, N]`` temporaries;
the mask is drawn in the first pass only).

Backward (the chain rule of ``reference.dora_linear_backward``)::

    dZ = s·dY·(g ⊙ B)                               dual GEMM
    dX = dY·(g ⊙ W) + dZ·A                          one GEMM, the rank chunk as extra K
       = dY·W + (dY·((g − 1) ⊙ W) + dZ·A) ⊙ keep/(1 − p)      (dropout: two GEMMs, mask applied after)
    dA = dZᵀ·x̃,  dB = g ⊙ (s·dYᵀ·S),  dm = colsum(dY ⊙ P) / n   (column-sum kernel)
    dW = g ⊙ (dYᵀ·x)  (dropout: dYᵀ·x + (g − 1) ⊙ (dYᵀ·x̃)),  db = colsum(dY)

Compiled for sm_90a (bf16, M = 8192, K = N = 4096, r = 16; benchmarks/kernel_report.py's
compiler path): the main GEMM with the column scale takes 126 registers, 2 CTAs/SM (LoRA's
main GEMM: 119), in training too (writing P as well took 140 and 1 CTA/SM before P was
recovered from y). With dropout the one main launch takes 229 and 1 CTA/SM (it was two: 215
and 117, plus the fp32 temporaries and their sum). The norm kernel: 64 registers, 128 CTAs;
the column sum: 121 on 8 warps, 2 CTAs/SM (108 before it summed its two error bounds per
column; fp32: 182, 1 CTA/SM; its recompute loop's tiles: 4 warps spilled in fp32). No spills.

``g ⊙ W`` and ``g ⊙ B`` are materialised in x's dtype per backward (N·K + N·R elements): the
dual GEMM has a per-output-column scale, and g sits on the reduction dimension of these products.

CUDA tensors run the Triton kernels; CPU tensors run ``reference.py`` unless the Triton
interpreter is on (``TRITON_INTERPRET=1``), in which case the kernels run on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from ..adapter_linear import dropout_mask
from ..common import acc_dtype, dot_flags, use_triton
from ..gemm import DROP_NONE, DROP_P1, DROP_Q1, gemm
from . import reference
from .kernels import _dora_linear_colsum_kernel, _dora_linear_norm_kernel

# Norm kernel tiles: 32 rows a program (128 programs stream W at N = 4096), a 64-wide K tile;
# column-sum kernel: 32 columns a program over 64-row slabs. Reasoned, not yet measured.
# The column sum's recompute of P (columns with small g) runs 32-wide K tiles (64: fp32 spills).
NORM_BLOCK_N, NORM_BLOCK_K, COLSUM_BLOCK_M, COLSUM_BLOCK_N, COLSUM_BLOCK_K = 32, 64, 64, 32, 32
COLSUM_WARPS = 8  # 4 warps: the fp32 recompute spills (255 registers)


def weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                magnitude: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Semantics: n = ‖W + s·B·A‖_row and, with a magnitude m, g = m / n; B·A is never formed.

    Shapes: weight [N, K], lora_a [R, K], lora_b [N, R], magnitude [N] -> (n [N], g [N] | None),
    float32 (float64 for float64 weights). Not differentiable (DoRA detaches the norm).
    """
    acc = acc_dtype(weight.dtype)
    if not use_triton(weight):
        w, a, b = (t.detach().to(acc) for t in (weight, lora_a, lora_b))
        norm = torch.linalg.norm(w + scale * (b @ a), dim=1)
        return norm, None if magnitude is None else magnitude.detach().to(acc) / norm
    n, k = weight.shape
    r = lora_a.shape[0]
    norm = torch.empty(n, dtype=acc, device=weight.device)
    g = torch.empty(n, dtype=acc, device=weight.device) if magnitude is not None else None
    if n == 0:
        return norm, g
    flags = dot_flags(weight.dtype)
    if flags["DOT_DTYPE"] == tl.float32:
        flags["PRECISION"] = "ieee"  # the norm feeds a scale: no tf32 rounding of B·A
    _dora_linear_norm_kernel[(triton.cdiv(n, NORM_BLOCK_N),)](
        norm, g if g is not None else norm, weight, lora_a, lora_b,
        magnitude.contiguous() if magnitude is not None else norm,
        n, k, r, *weight.stride(), *lora_a.stride(), *lora_b.stride(), scale,
        HAS_MAG=magnitude is not None, **flags,
        BLOCK_N=NORM_BLOCK_N, BLOCK_K=NORM_BLOCK_K, BLOCK_R=min(config.block_r(r), 64),
    )
    return norm, g


def _forward_triton(x, weight, bias, a_w, b_w, mag, scale, dropout_p, seed, need_s, need_p):
    bias = bias.contiguous() if bias is not None else None
    m, k = x.shape
    n, r = weight.shape[0], a_w.shape[0]
    acc = acc_dtype(x.dtype)
    norm, g = weight_norm(weight, a_w, b_w, scale, mag)
    y = x.new_empty((m, n))
    p = x.new_empty((m, n) if need_p and dropout_p > 0.0 else (0,))
    s = x.new_empty((m, r), dtype=acc)
    if m == 0:
        return y, norm, s if need_s else s.new_empty(0), p
    dot_dtype = dot_flags(x.dtype)
    dropout = dropout_p > 0.0
    gemm(s, x, a_w.t(), seed=seed, dropout_p=dropout_p, drop=DROP_P1 if dropout else DROP_NONE, drop_ld=k,
         dot_dtype=dot_dtype)
    lora = dict(p2=s, q2=b_w.t(), alpha2=scale, dot_dtype=dot_dtype)
    if not dropout:
        gemm(y, x, weight.t(), bias1=bias, col_scale=g, **lora)
    else:
        gemm(y, x, weight.t(), bias1=bias, col_scale=g - 1, z=p if need_p else None, store_z=need_p, seed=seed,
             dropout_p=dropout_p, drop=DROP_P1, drop_ld=k, plus_undropped=True, **lora)
    return y, norm, s if need_s else s.new_empty(0), p


def _backward_triton(dy, x, weight, bias, a_w, b_w, mag, norm, s, p, y, scale, dropout_p, seed, needs):
    m, k = x.shape
    n, r = weight.shape[0], a_w.shape[0]
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    acc = acc_dtype(x.dtype)
    f32 = dict(dtype=acc, device=x.device)
    dot_dtype = dot_flags(x.dtype)
    dropout = dropout_p > 0.0
    drop = dict(seed=seed, dropout_p=dropout_p, drop=DROP_Q1 if dropout else DROP_NONE, drop_ld=k)
    g = (mag.to(acc) / norm)[:, None]

    dz = torch.empty((m, r), **f32)
    if need_x or need_a:
        gemm(dz, dy, (b_w * g).to(x.dtype), alpha1=scale, dot_dtype=dot_dtype)
    dx = dw = da = db_w = dm = None
    if need_x:
        if not dropout:
            dx = gemm(x.new_empty((m, k)), dy, (weight * g).to(x.dtype), p2=dz, q2=a_w, dot_dtype=dot_dtype)
        else:
            dx_ad = gemm(torch.empty((m, k), **f32), dy, (weight * (g - 1)).to(x.dtype), p2=dz, q2=a_w,
                         dot_dtype=dot_dtype)
            keep = dropout_mask(seed, m, k, dropout_p)
            dx = gemm(torch.empty((m, k), **f32), dy, weight, dot_dtype=dot_dtype)
            dx = dx.add_(dx_ad * keep.to(acc) / (1.0 - dropout_p)).to(x.dtype)
    if need_w:
        dw = gemm(torch.empty((n, k), **f32), dy.t(), x, dot_dtype=dot_dtype, allow_split_k=True)
        if not dropout:
            dw = dw.mul_(g)
        else:
            dw_ad = gemm(torch.empty((n, k), **f32), dy.t(), x, dot_dtype=dot_dtype, allow_split_k=True, **drop)
            dw = dw.add_(dw_ad.mul_(g - 1))
    if need_a:
        da = gemm(torch.empty((r, k), **f32), dz.t(), x, dot_dtype=dot_dtype, allow_split_k=True, **drop)
    if need_bb:
        db_w = gemm(torch.empty((n, r), **f32), dy.t(), s, alpha1=scale, dot_dtype=dot_dtype, allow_split_k=True)
        db_w = db_w.mul_(g)
    if need_m:
        dm = torch.empty(n, **f32)
        if n:
            src = y if not dropout else p
            _dora_linear_colsum_kernel[(triton.cdiv(n, COLSUM_BLOCK_N),)](
                dm, dy, src, src, bias if bias is not None else norm, g.reshape(-1).contiguous(), norm, x, weight,
                s, b_w, m, n, k, r, *dy.stride(), *src.stride(), *src.stride(), *x.stride(), *weight.stride(),
                *s.stride(), *b_w.stride(), scale, reference.RECOVER_RATIO, torch.finfo(src.dtype).tiny,
                FROM_Y=not dropout, HAS_BIAS=bias is not None, **dot_dtype,
                BLOCK_M=COLSUM_BLOCK_M, BLOCK_N=COLSUM_BLOCK_N, BLOCK_K=COLSUM_BLOCK_K,
                BLOCK_R=min(config.block_r(r), 64), num_warps=COLSUM_WARPS,
            )
    return dx, dw, dy.sum(0, dtype=acc) if need_b else None, da, db_w, dm


def _keep_mask(seed: Optional[Tensor], m: int, k: int, p: float) -> Optional[Tensor]:
    return None if p == 0.0 else dropout_mask(seed, m, k, p)


@torch.library.custom_op("adaptkern::dora_linear", mutates_args=())
def dora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
    scale: float, dropout_p: float, seed: Optional[Tensor], need_s: bool, need_p: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Semantics: y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙s·(x̃·Aᵀ)·Bᵀ, g = m / ‖W + s·B·A‖_row.

    Returns (y [M, N], norm [N] fp32, S = x̃·Aᵀ [M, R] fp32 or [0] unless ``need_s``,
    P = x̃·Wᵀ + s·S·Bᵀ [M, N] in x's dtype or [0] unless ``need_p`` and dropout_p > 0 (without
    dropout backward recovers P from y)); fp64 for fp64 inputs.
    Shapes: x [M, K], weight [N, K], bias [N], lora_a [R, K], lora_b [N, R], magnitude [N],
    seed [1] int64 (read only when dropout_p > 0). Inputs are validated by the callers
    (``adaptkern.dora``); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, need_s, need_p)
    keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
    return reference.dora_linear_forward(x, weight, bias, lora_a, lora_b, magnitude, scale, keep, dropout_p,
                                         need_s, need_p)


@dora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, need_s, need_p):
    m, n, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    acc = acc_dtype(x.dtype)
    return (x.new_empty((m, n)), x.new_empty((n,), dtype=acc), x.new_empty((m, r) if need_s else (0,), dtype=acc),
            x.new_empty((m, n) if need_p and dropout_p > 0.0 else (0,)))


@torch.library.custom_op("adaptkern::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    magnitude: Tensor, norm: Tensor, s: Tensor, p: Tensor, y: Tensor, scale: float, dropout_p: float,
    seed: Optional[Tensor], needs: list[bool],
) -> list[Tensor]:
    """Gradients of ``adaptkern::dora_linear`` for (x, weight, bias, lora_a, lora_b, magnitude).
    ``y`` is the forward's output (read for dm without dropout; [0] otherwise).

    Returns six tensors in x's dtype; an input whose entry of ``needs`` is False gets an
    empty tensor (the autograd wrapper maps it to None).
    """
    if use_triton(x):
        grads = _backward_triton(dy, x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, scale, dropout_p,
                                 seed, needs)
    else:
        keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
        grads = reference.dora_linear_backward(dy, x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, scale,
                                               keep, dropout_p, needs)
    return [g.to(x.dtype) if g is not None else x.new_empty(0) for g in grads]


@dora_linear_backward_op.register_fake
def _(dy, x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, scale, dropout_p, seed, needs):
    m, k = x.shape
    n, r = weight.shape[0], lora_a.shape[0]
    shapes = [(m, k), (n, k), (n,), (r, k), (n, r), (n,)]
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, need_s, need_p = inputs
    y, norm, s, p = output
    if not (need_p and dropout_p == 0.0):
        y = y.new_empty(0)  # y is read for dm only without dropout: don't hold it otherwise
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, seed)
    ctx.args = (scale, dropout_p, need_s, need_p)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dnorm, _ds, _dp):
    x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, seed = ctx.saved_tensors
    scale, dropout_p, need_s, need_p = ctx.args
    needs = [bool(ctx.needs_input_grad[i]) for i in range(6)]
    needs[2] = needs[2] and ctx.has_bias
    if not any(needs):
        return (None,) * 11
    if not need_s or (needs[5] and not need_p):
        raise RuntimeError("adaptkern::dora_linear was run without the tensors its backward needs "
                           f"(need_s={need_s}, need_p={need_p}); it cannot be differentiated")
    grads = dora_linear_backward_op(dy, x, weight, bias, lora_a, lora_b, magnitude, norm, s, p, y, scale, dropout_p,
                                    seed, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None)


dora_linear_op.register_autograd(_backward, setup_context=_setup_context)
