"""LoRA on a 4-bit frozen weight: launchers → ``adaptkern::quantized_lora_linear`` custom op → autograd.

Semantics (W dequantized as ``reference.dequantize_4bit_ref`` says, never materialised by the
kernels)::

    z = x̃·Aᵀ,   y = x·Wᵀ + b + s·z·Bᵀ,   x̃ = dropout(x)

Backward (W is frozen: it never gets a gradient; b gets one when it requires it)::

    dZ = s·dY·B                        one GEMM (adaptkern.ops.gemm)
    dX = dY·W + (dZ·A) ⊙ keep/(1-p)     one launch, W dequantized in its N loop
    dA = dZᵀ·x̃,   dB = s·dYᵀ·z,   db = colsum(dY)

Saved for backward: x and z ``[M, R]`` fp32, and the packed weight (no copy).

``adaptkern::quantized_linear`` is the base alone, ``y = x·Wᵀ + b`` (the forward kernel with
its LoRA epilogue compiled out), for callers that add adapters themselves (mixed batches).

CUDA tensors run the Triton kernels; CPU tensors run ``reference.py`` unless the Triton
interpreter is on, in which case the kernels run on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from ..adapter_linear.reference import dropout_keep_mask
from ..common import TL_DTYPES, acc_dtype, dot_flags, elem_size, use_triton
from ..gemm import DROP_NONE, DROP_P1, DROP_Q1, gemm
from . import reference
from .kernels import _quantized_lora_linear_dx_kernel, _quantized_lora_linear_fwd_kernel

ROUTES = ("auto", "onepass", "split")
_TL = {**TL_DTYPES, torch.float32: tl.float32, torch.float64: tl.float64}


def _scales_per_row(k: int, blocksize: int, tile_cols: int) -> int:
    """Quantization blocks per row of a W tile ``tile_cols`` wide when every tile row lies in whole
    blocks or inside one (K % blocksize == 0); 0 when blocks cross rows or tiles (a scale per element)."""
    if k % blocksize:
        return 0
    if blocksize % tile_cols == 0:
        return 1
    return tile_cols // blocksize if tile_cols % blocksize == 0 else 0


def _weight_args(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, k, blocksize, w_dtype, x_dtype,
                 tile_rows, tile_cols):
    """Pointer arguments, the packed row stride and the constexprs that describe W to both kernels
    (a W tile is ``tile_rows`` rows of N by ``tile_cols`` columns of K)."""
    nested = nested_absmax is not None
    ptrs = (qweight, absmax, nested_absmax if nested else absmax, nested_code if nested else absmax,
            offset if nested else absmax, pairs.view(torch.int64).reshape(-1))
    flags = dict(BLOCKSIZE=blocksize, NESTED=nested, EVEN_K=k % 2 == 0,
                 SCALES=_scales_per_row(k, blocksize, tile_cols), MASK=n % tile_rows != 0 or k % tile_cols != 0,
                 W_DTYPE=_TL[w_dtype], X_DTYPE=_TL[x_dtype], BITS_BF16=config.interpreting())
    return ptrs, k // 2, flags


def _plan(cfg, k: int, blocksize: int, dot_dtype: dict, kind: str):
    """(tiles, launch options) of a 4-bit launch, ``kind`` "split", "onepass", "base" (planned as
    "split": the same tiles, so the same sums) or "dx"; ``cfg`` holds the bf16 GEMM's tiles.
    Compiled-code facts behind each choice: docs/compiled-code.md.

    * K % blocksize != 0 (blocks cross rows): every element gathers its byte, code and scale,
      so the W tile shrinks to 64×32 and the loop is not pipelined (a stage of such a 128×64 tile
      holds 80+ KiB of gathered values).
    * float32 dots without tensor cores (FMA, ``PRECISION="ieee"``) hold their operands in
      registers: 64×64×16 tiles of 4 warps (128×128×64 spills kilobytes per thread).
    * 16-bit dots on 128×128 tiles of 8 warps: registers are capped at 128, two CTAs per SM
      (65536 registers), for dX and for the split forward in bf16 at two stages; the one-pass
      forward (x·Aᵀ beside the tile) and the fp16 split forward (its epilogue holds a second
      accumulator) would spill, and keep one CTA per SM.
    """
    if k % blocksize:
        cfg = cfg._replace(block_n=min(cfg.block_n, 64), block_k=min(cfg.block_k, 32), num_stages=1)
    dt = dot_dtype["DOT_DTYPE"]
    if dt == tl.float32 and dot_dtype["PRECISION"] == "ieee" and not config.interpreting():
        cfg = cfg._replace(block_m=min(cfg.block_m, 64), block_n=min(cfg.block_n, 64), block_k=16, num_warps=4)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kind = "split" if kind == "base" else kind
    if (k % blocksize == 0 and cfg.num_warps == 8 and cfg.block_m * cfg.block_n == 128 * 128
            and (kind == "dx" and dt in (tl.bfloat16, tl.float16) or kind == "split" and dt == tl.bfloat16)):
        opts["maxnreg"] = 128
        if kind == "split":
            opts["num_stages"] = 2
    return cfg, opts


def _forward_triton(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, bias,
                    a_w, b_w, scale, dropout_p, seed, need_z, route):
    m, k = x.shape
    r = a_w.shape[0]
    bias = bias.contiguous() if bias is not None else None
    y = x.new_empty((m, n))
    z = x.new_empty((m, r) if need_z else (0,), dtype=acc_dtype(x.dtype))
    if m == 0:
        return y, z
    dropout = dropout_p > 0.0
    dot_dtype = dot_flags(x.dtype)
    if route == "auto":
        route = config.choose_route(m, r, dropout, n=n, device=x.device)
    if dropout or n == 0:  # the split shrink draws the mask once (and writes z when N = 0)
        route = "split"
    onepass = route == "onepass"
    if onepass:
        cfg = config.onepass_config(m, n, r, elem_size(dot_dtype), device=x.device)
        s = z
    else:
        cfg = config.gemm_config(m, n, elem_size(dot_dtype), device=x.device)
        s = z if need_z else x.new_empty((m, r), dtype=z.dtype)
        gemm(s, x, a_w.t(), seed=seed, dropout_p=dropout_p, drop=DROP_P1 if dropout else DROP_NONE, drop_ld=k,
             dot_dtype=dot_dtype)
    if n == 0:
        return y, z
    _launch_forward(y, x, (qweight, absmax, nested_absmax, nested_code, offset, pairs, blocksize, w_dtype), bias,
                    cfg, route, dot_dtype, s, a_w, b_w, scale, need_z)
    return y, z


def _launch_forward(y, x, weight, bias, cfg, kind, dot_dtype, s=None, a_w=None, b_w=None, scale=0.0, need_z=False):
    """One ``_quantized_lora_linear_fwd_kernel`` launch writing y [M, N] (M, N >= 1); ``cfg`` holds
    the bf16 GEMM's tiles (planned here), ``kind`` is "onepass", "split" or "base" (the LoRA
    epilogue compiled out: s, a_w, b_w unused). ``weight``: (qweight, absmax, nested_absmax,
    nested_code, offset, pairs, blocksize, w_dtype)."""
    (m, k), n = x.shape, y.shape[1]
    qweight, absmax, nested_absmax, nested_code, offset, pairs, blocksize, w_dtype = weight
    lora = kind != "base"
    r = a_w.shape[0] if lora else 0
    cfg, opts = _plan(cfg, k, blocksize, dot_dtype, kind)
    ptrs, stride_qw, flags = _weight_args(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, k, blocksize,
                                          w_dtype, x.dtype, cfg.block_n, cfg.block_k)
    zero = (0, 0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _quantized_lora_linear_fwd_kernel[grid](
        y, s if lora else y, x, *ptrs, bias if bias is not None else y, a_w if lora else y, b_w if lora else y,
        m, n, k, r,
        *y.stride(), *(s.stride() if lora and s.dim() == 2 else zero), *x.stride(),
        *(a_w.stride() if lora else zero), *(b_w.stride() if lora else zero), stride_qw,
        scale,
        HAS_BIAS=bias is not None, LORA=lora, ONEPASS=kind == "onepass", STORE_Z=need_z, **flags,
        **dot_dtype, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=config.block_r(r),
        GROUP_M=cfg.group_m, enable_fp_fusion=False, **opts,
    )


def _base_triton(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, bias):
    y = x.new_empty((x.shape[0], n))
    if x.shape[0]:
        dot_dtype = dot_flags(x.dtype)
        cfg = config.gemm_config(x.shape[0], n, elem_size(dot_dtype), device=x.device)
        _launch_forward(y, x, (qweight, absmax, nested_absmax, nested_code, offset, pairs, blocksize, w_dtype),
                        None if bias is None else bias.contiguous(), cfg, "base", dot_dtype)
    return y


def _backward_triton(dy, x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype,
                     a_w, b_w, z, scale, dropout_p, seed, needs):
    m, k = x.shape
    r = a_w.shape[0]
    need_x, need_b, need_a, need_bw = needs
    f32 = dict(dtype=acc_dtype(x.dtype), device=x.device)
    dot_dtype = dot_flags(x.dtype)
    dropout = dropout_p > 0.0
    dz = torch.empty((m, r), **f32)
    if need_x or need_a:
        gemm(dz, dy, b_w, alpha1=scale, dot_dtype=dot_dtype)
    dx = da = dbw = None
    if need_x:
        dx = x.new_empty((m, k))
        if m:
            cfg, opts = _plan(config.gemm_config(m, k, elem_size(dot_dtype), device=x.device), k, blocksize,
                              dot_dtype, "dx")
            ptrs, stride_qw, flags = _weight_args(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, k,
                                                  blocksize, w_dtype, x.dtype, cfg.block_k, cfg.block_n)
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k, cfg.block_n),)
            _quantized_lora_linear_dx_kernel[grid](
                dx, dy, dz, a_w, *ptrs, seed if dropout else dx,
                m, n, k, r,
                *dx.stride(), *dy.stride(), *dz.stride(), *a_w.stride(), stride_qw,
                dropout_p,
                DROPOUT=dropout, **flags, **dot_dtype,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=min(config.block_r(r), 64),
                GROUP_M=cfg.group_m, enable_fp_fusion=False, **opts,
            )
    if need_a:
        da = gemm(torch.empty((r, k), **f32), dz.t(), x, seed=seed, dropout_p=dropout_p,
                  drop=DROP_Q1 if dropout else DROP_NONE, drop_ld=k, dot_dtype=dot_dtype, allow_split_k=True)
    if need_bw:
        dbw = gemm(torch.empty((n, r), **f32), dy.t(), z, alpha1=scale, dot_dtype=dot_dtype, allow_split_k=True)
    db = dy.sum(0, dtype=f32["dtype"]) if need_b else None
    return dx, db, da, dbw


def _keep_mask(seed: Optional[Tensor], m: int, k: int, p: float, device) -> Optional[Tensor]:
    if p == 0.0:
        return None
    return dropout_keep_mask(int(seed.item()), (m, k), p, device)


def _dequantize(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, k, blocksize, w_dtype):
    return reference.dequantize_4bit_ref(qweight, absmax, nested_absmax, nested_code, offset,
                                         reference.code_of_pairs(pairs), (n, k), blocksize, w_dtype)


@torch.library.custom_op("adaptkern::quantized_lora_linear", mutates_args=())
def quantized_lora_linear_op(
    x: Tensor, qweight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
    offset: Optional[Tensor], pairs: Tensor, n: int, blocksize: int, w_dtype: torch.dtype, bias: Optional[Tensor],
    a_w: Tensor, b_w: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor], need_z: bool, route: str,
) -> tuple[Tensor, Tensor]:
    """Semantics: y = x·Wᵀ + b + s·(x̃·Aᵀ)·Bᵀ, W the 4-bit weight dequantized; returns (y [M, N],
    z = x̃·Aᵀ [M, R] fp32, or [0] without ``need_z``).

    Shapes: x [M, K], qweight uint8 [⌈N·K/2⌉], absmax [⌈N·K/blocksize⌉] fp32 (uint8 when
    nested), nested_absmax [⌈B/256⌉] fp32, nested_code [256] fp32, offset [1] fp32, pairs [256, 2]
    fp32 (the code table by byte, ``reference.code_pairs``: the kernels read both codes of a byte
    in one 8-byte load), bias [N], a_w [R, K], b_w [N, R], seed [1] int64 (read when dropout_p >
    0). W's dtype
    ``w_dtype`` is the one bitsandbytes dequantizes to. Validated by the callers
    (``adaptkern.quantized``); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype,
                               bias, a_w, b_w, scale, dropout_p, seed, need_z, route)
    w = _dequantize(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, x.shape[1], blocksize, w_dtype)
    keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    return reference.quantized_lora_linear_forward(x, w, bias, a_w, b_w, scale, keep, dropout_p, need_z)


@quantized_lora_linear_op.register_fake
def _(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, bias, a_w, b_w, scale,
      dropout_p, seed, need_z, route):
    m, r = x.shape[0], a_w.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, r) if need_z else (0,), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("adaptkern::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: Tensor, qweight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
    offset: Optional[Tensor], pairs: Tensor, n: int, blocksize: int, w_dtype: torch.dtype, bias: Optional[Tensor],
) -> Tensor:
    """Semantics: y = x·Wᵀ + b, the base GEMM of ``adaptkern::quantized_lora_linear`` alone: one
    launch of its forward kernel with the LoRA epilogue compiled out (W dequantized in the K
    loop, never materialised), on the split route's tiles, so its sums are those of that route.

    Shapes: x [M, K], the weight tensors as in ``quantized_lora_linear_op``, bias [N] | None ->
    y [M, N] in x's dtype. Not differentiable (no autograd is registered: callers refuse inputs
    that require grad). Validated by the callers (``adaptkern.quantized``).
    """
    if use_triton(x):
        return _base_triton(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype,
                            bias)
    w = _dequantize(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, x.shape[1], blocksize, w_dtype)
    return reference.quantized_linear_forward(x, w, bias)


@quantized_linear_op.register_fake
def _(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, bias):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("adaptkern::quantized_lora_linear_backward", mutates_args=())
def quantized_lora_linear_backward_op(
    dy: Tensor, x: Tensor, qweight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], offset: Optional[Tensor], pairs: Tensor, n: int, blocksize: int,
    w_dtype: torch.dtype, a_w: Tensor, b_w: Tensor, z: Tensor, scale: float, dropout_p: float,
    seed: Optional[Tensor], needs: list[bool],
) -> list[Tensor]:
    """Gradients of ``adaptkern::quantized_lora_linear`` for (x, bias, a_w, b_w), in x's dtype; an
    entry of ``needs`` that is False gets an empty tensor."""
    if use_triton(x):
        grads = _backward_triton(dy, x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize,
                                 w_dtype, a_w, b_w, z, scale, dropout_p, seed, needs)
    else:
        w = _dequantize(qweight, absmax, nested_absmax, nested_code, offset, pairs, n, x.shape[1], blocksize, w_dtype)
        keep = _keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        grads = reference.quantized_lora_linear_backward(dy, x, w, a_w, b_w, z, scale, keep, dropout_p, needs)
    return [g.to(x.dtype) if g is not None else x.new_empty(0) for g in grads]


@quantized_lora_linear_backward_op.register_fake
def _(dy, x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, a_w, b_w, z, scale,
      dropout_p, seed, needs):
    m, k = x.shape
    r = a_w.shape[0]
    shapes = [(m, k), (n,), (r, k), (n, r)]
    return [x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]


# Input positions of the op that take gradients: x, bias, a_w, b_w.
_GRAD_INPUTS = (0, 10, 11, 12)
_NUM_INPUTS = 18


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n, blocksize, w_dtype, bias, a_w, b_w, scale,
     dropout_p, seed, need_z, route) = inputs
    ctx.save_for_backward(x, qweight, absmax, nested_absmax, nested_code, offset, pairs, a_w, b_w, output[1], seed)
    ctx.args = (n, blocksize, w_dtype, scale, dropout_p)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dz):
    x, qweight, absmax, nested_absmax, nested_code, offset, pairs, a_w, b_w, z, seed = ctx.saved_tensors
    n, blocksize, w_dtype, scale, dropout_p = ctx.args
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUTS]
    needs[1] = needs[1] and ctx.has_bias
    out = [None] * _NUM_INPUTS
    if not any(needs):
        return tuple(out)
    if z.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("adaptkern::quantized_lora_linear was run with need_z=False; it cannot be differentiated")
    grads = quantized_lora_linear_backward_op(dy, x, qweight, absmax, nested_absmax, nested_code, offset, pairs, n,
                                              blocksize, w_dtype, a_w, b_w, z, scale, dropout_p, seed, needs)
    for i, g, need in zip(_GRAD_INPUTS, grads, needs):
        out[i] = g if need else None
    return tuple(out)


quantized_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
