"""Triton kernels of LoRA on a 4-bit frozen weight: W is dequantized tile by tile inside the K
loop (``reference.py`` gives the layout and the roundings) and never exists in memory.

* ``_quantized_lora_linear_fwd_kernel``: each program owns a ``BLOCK_M×BLOCK_N`` tile of
  ``y = x·Wᵀ + b + s·z·Bᵀ``. One-pass (``ONEPASS``): the K loop also accumulates
  ``z = x·Aᵀ`` from the same x tile (the program with ``pid_n == 0`` stores it for backward);
  split: z ``[M, R]`` fp32 was written by a shrink launch (with dropout, when on) and is read
  in the epilogue. Base only (``LORA`` off: ``adaptkern::quantized_linear``): ``y = x·Wᵀ + b``,
  the epilogue's rank product compiled out (z, A and B are never read).
* ``_quantized_lora_linear_dx_kernel``: ``dX = dY·W + (dZ·A) ⊙ keep/(1-p)``: the rank product
  first, into the one accumulator, then the loop over N dequantizing W ``[BLOCK_K, BLOCK_N]``
  tiles in the order that loop reads them.

Dequantization (``_quantized_lora_linear_dequant``). When K % blocksize == 0 (``SCALES`` > 0:
the blocks of a tile row are whole, or the row lies inside one) each row loads BLOCK/2 bytes,
and one 8-byte gather per byte from the byte table ``pairs[256]`` (both codes, high nibble
first) gives two codes; the tile is viewed as [rows·SCALES, BLOCK/SCALES], one row per block,
and multiplied by one scale per block (SCALES loads per tile row, not one per element).
Otherwise (blocks cross rows; odd K, where a row may start inside a byte) every element
gathers its byte, its code and its scale. ``MASK`` is off when the tiles never cross W's
edges. The nested scale
``nested_code[q]·nested_absmax + offset`` must round twice: the launchers compile these
kernels with ``enable_fp_fusion=False`` so the multiply and add are not contracted into
an FMA (the dots are tensor-core MMAs, which the flag does not touch).

Values are rounded to the weight's dtype, then to x's dtype (``_quantized_lora_linear_round``),
round-to-nearest-even as bitsandbytes (and ``Tensor.to``) round; the Triton interpreter's
float32 → bfloat16 cast truncates, so under the interpreter bfloat16 is rounded on the bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_common import keep_scale, tile_ids


@triton.jit
def _quantized_lora_linear_round(v, DT: tl.constexpr, BITS_BF16: tl.constexpr):
    """v (float32) rounded to nearest-even in DT, returned as float32 (float64 DT: unchanged)."""
    if DT == tl.float64 or DT == tl.float32:
        return v
    elif DT == tl.bfloat16 and BITS_BF16:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return v.to(DT).to(tl.float32)


@triton.jit
def _quantized_lora_linear_dequant(
    qw_ptr, absmax_ptr, nabs_ptr, ncode_ptr, pairs_ptr, offset,
    rows, c0, N, K, stride_qw,
    BC: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr,
    SCALES: tl.constexpr, MASK: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
    BITS_BF16: tl.constexpr,
):
    """W[rows, c0:c0+BC] dequantized, float32 [len(rows), BC] holding values of x's dtype; 0 outside W
    (``MASK``: the tile may cross W's edges)."""
    R: tl.constexpr = rows.shape[0]
    rows = rows.to(tl.int64)
    cols = c0 + tl.arange(0, BC)
    r_ok = rows < N
    ok = r_ok[:, None] & (cols < K)[None, :]
    if EVEN_K:  # rows start on a byte: BC/2 bytes per row
        bc = c0 // 2 + tl.arange(0, BC // 2)
        b_ptrs = qw_ptr + rows[:, None] * stride_qw + bc[None, :]
        if MASK:
            byte = tl.load(b_ptrs, mask=r_ok[:, None] & (bc < K // 2)[None, :], other=0).to(tl.int32)
        else:
            byte = tl.load(b_ptrs).to(tl.int32)
    if SCALES > 0:  # one 8-byte load gives a byte's two codes (the high nibble's in the low word)
        pair = tl.load(pairs_ptr + byte)
        code = tl.join(pair.to(tl.int32).to(tl.float32, bitcast=True),
                       (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True))
        code = tl.reshape(code, (R * SCALES, BC // SCALES))  # a row per quantization block
        blk = rows[:, None] * (K // BLOCKSIZE) + (c0 // BLOCKSIZE + tl.arange(0, SCALES))[None, :]
        b_ok = r_ok[:, None]
    else:
        if EVEN_K:  # nibbles interleaved high-first
            q = tl.reshape(tl.join(byte >> 4, byte & 15), (R, BC))
        else:  # a row may start in the middle of a byte: each element reads its own
            flat = rows[:, None] * K + cols[None, :]
            byte = tl.load(qw_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
            q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        code = (tl.load(pairs_ptr + q) >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # pairs[q] = (code[0], code[q])
        blk = (rows[:, None] * K + cols[None, :]) // BLOCKSIZE
        b_ok = ok
    if NESTED:
        q2 = tl.load(absmax_ptr + blk, mask=b_ok, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + q2) * tl.load(nabs_ptr + blk // 256, mask=b_ok, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=b_ok, other=0.0)
    if SCALES > 0:
        w = tl.reshape(code * tl.reshape(scale, (R * SCALES, 1)), (R, BC))
    else:
        w = code * scale
    w = _quantized_lora_linear_round(w, W_DTYPE, BITS_BF16)
    w = _quantized_lora_linear_round(w, X_DTYPE, BITS_BF16)
    if MASK:
        w = tl.where(ok, w, 0.0)
    return w


@triton.jit
def _quantized_lora_linear_fwd_kernel(
    y_ptr,  # [M, N] out, x's dtype
    z_ptr,  # [M, R] fp32: written (ONEPASS and STORE_Z) or read (split); unused without LORA
    x_ptr,  # [M, K]
    qw_ptr,  # [⌈N·K/2⌉] uint8
    absmax_ptr,  # [B] fp32, or uint8 when NESTED
    nabs_ptr,  # [⌈B/256⌉] fp32 (NESTED)
    ncode_ptr,  # [256] fp32 (NESTED)
    offset_ptr,  # [1] fp32 (NESTED)
    pairs_ptr,  # [256] int64: the code pairs of each byte
    bias_ptr,  # [N]
    aw_ptr,  # [R, K] (LORA)
    bw_ptr,  # [N, R] (LORA)
    M, N, K, R,
    stride_ym, stride_yn, stride_zm, stride_zr, stride_xm, stride_xk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_qw,
    scale,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, ONEPASS: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, SCALES: tl.constexpr, MASK: tl.constexpr,
    W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, BITS_BF16: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_z = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        if MASK:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk, mask=m_ok[:, None],
                        other=0.0).to(DOT_DTYPE)
        w = _quantized_lora_linear_dequant(qw_ptr, absmax_ptr, nabs_ptr, ncode_ptr, pairs_ptr, offset, rn, k0, N, K,
                                           stride_qw, BLOCK_K, BLOCKSIZE, NESTED, EVEN_K, SCALES, MASK, W_DTYPE,
                                           X_DTYPE, BITS_BF16)
        acc = tl.dot(x, tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION, out_dtype=ACC)
        if ONEPASS:
            a_mask = r_ok[None, :] & k_ok[:, None] if MASK else r_ok[None, :]
            at = tl.load(aw_ptr + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak, mask=a_mask, other=0.0)
            acc_z = tl.dot(x, at.to(DOT_DTYPE), acc_z, input_precision=PRECISION, out_dtype=ACC)

    if LORA:
        z_ptrs = z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr
        z_mask = m_ok[:, None] & r_ok[None, :]
        if ONEPASS:
            if STORE_Z:
                if pid_n == 0:
                    tl.store(z_ptrs, acc_z, mask=z_mask)
        else:
            acc_z = tl.load(z_ptrs, mask=z_mask, other=0.0).to(ACC)
        bt = tl.load(bw_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                     mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        if DOT_DTYPE == tl.float16:  # scale·z rounded to fp16 could overflow: scale the fp32 product
            acc += scale * tl.dot(acc_z.to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=ACC)
        else:
            acc = tl.dot((scale * acc_z).to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION,
                         out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quantized_lora_linear_dx_kernel(
    dx_ptr,  # [M, K] out, x's dtype
    dy_ptr,  # [M, N]
    dz_ptr,  # [M, R] fp32: s·dY·B
    aw_ptr,  # [R, K]
    qw_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, pairs_ptr,  # W as in the forward kernel
    seed_ptr,  # [1] int64 (DROPOUT)
    M, N, K, R,
    stride_dxm, stride_dxk, stride_dym, stride_dyn, stride_dzm, stride_dzr, stride_ar, stride_ak, stride_qw,
    dropout_p,
    DROPOUT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr,
    SCALES: tl.constexpr, MASK: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, BITS_BF16: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Output tile [BLOCK_M, BLOCK_N] of dX (columns are K); the reduction runs over N in BLOCK_K steps.
    pid_m, pid_n = tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c0 = pid_n * BLOCK_N
    rc = c0 + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rj = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    c_ok = rc < K
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rr < R
        dz = tl.load(dz_ptr + rm[:, None] * stride_dzm + (r0 + rr)[None, :] * stride_dzr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(aw_ptr + (r0 + rr)[:, None] * stride_ar + rc[None, :] * stride_ak,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(dz.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
    if DROPOUT:  # the rank product is a gradient of dropout(x): mask it before adding dY·W
        acc = acc * keep_scale(tl.load(seed_ptr), rm, c0, K, dropout_p, BLOCK_N)
    for j0 in range(0, N, BLOCK_K):
        if MASK:
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + (j0 + rj)[None, :] * stride_dyn,
                         mask=m_ok[:, None] & (j0 + rj < N)[None, :], other=0.0)
        else:
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + (j0 + rj)[None, :] * stride_dyn, mask=m_ok[:, None],
                         other=0.0)
        w = _quantized_lora_linear_dequant(qw_ptr, absmax_ptr, nabs_ptr, ncode_ptr, pairs_ptr, offset, j0 + rj, c0,
                                           N, K, stride_qw, BLOCK_N, BLOCKSIZE, NESTED, EVEN_K, SCALES, MASK, W_DTYPE,
                                           X_DTYPE, BITS_BF16)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rc[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
