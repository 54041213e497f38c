"""PyTorch reference for LoRA on a 4-bit (bitsandbytes NF4/FP4) frozen weight: the spec, the CPU
path and the test oracle.

The weight ``W [N, K]`` is stored as bitsandbytes stores it:

* ``qweight`` uint8 ``[⌈N·K/2⌉]``: the 4-bit codes of W flattened row-major, two per byte,
  element 2i in the high nibble and 2i+1 in the low one;
* ``absmax`` ``[B]``, ``B = ⌈N·K/blocksize⌉``: one scale per block of ``blocksize`` consecutive
  elements of the flat W (a block may span rows), float32; or, double-quantized, uint8 codes
  of ``absmax − offset`` in the 256-entry ``nested_code`` table with one float32
  ``nested_absmax`` per 256 blocks;
* the 16-entry code table of the quant type (:data:`NF4_CODE`, :data:`FP4_CODE`).

Dequantization, with every rounding where bitsandbytes' ``dequantize_4bit`` has it::

    absmax[b] = fl32(fl32(nested_code[q2[b]] · nested_absmax[b // 256]) + offset)   (nested)
    W[i]      = fl_w(fl32(code[q[i]] · absmax[i // blocksize]))                       (then fl_x)

``fl_w`` rounds to the weight's dtype (the dtype ``dequantize_4bit`` returns), ``fl_x`` to the
compute dtype (x's), both round-to-nearest-even. Then the LoRA linear of
``adaptkern.ops.adapter_linear``: ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``.
"""

from __future__ import annotations

import torch

from ..adapter_linear.reference import adapter_linear_backward, adapter_linear_forward, lora_linear_ref

# The code tables of bitsandbytes (its ``get_4bit_type``), as float32. NF4: quantiles of N(0, 1).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit), in bit-pattern order, divided by 12 in float32. Code 8
# is +0.0 in bitsandbytes' table too (its source writes the integer -0).
FP4_CODE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type`` ("nf4" or "fp4"), bit-equal to bitsandbytes'."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32, device=device) / 12.0
    raise ValueError(f"unknown quant type {quant_type!r}; expected one of {QUANT_TYPES}")


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """Semantics: the code table by byte, float32 [256, 2]: pairs[b] = (code[b >> 4], code[b & 15]),
    the values of byte b's two elements (high nibble first). Shapes: code [16] -> [256, 2]."""
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), 1)


def code_of_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """The 16-entry table back from :func:`code_pairs`: code[j] = pairs[j, 1] (byte j, low nibble)."""
    return pairs[:16, 1]


def dequantize_absmax(absmax, nested_absmax, nested_code, offset) -> torch.Tensor:
    """Semantics: the float32 block scales [B]: ``absmax`` itself, or (nested: uint8 ``absmax``)
    fl32(fl32(nested_code[absmax] · nested_absmax[b // 256]) + offset).

    Shapes: absmax [B] float32 or uint8, nested_absmax [⌈B/256⌉] float32 | None, nested_code
    [256] float32 | None, offset [1] float32 | None.
    """
    if nested_absmax is None:
        return absmax.float()
    blocks = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCKSIZE
    return nested_code[absmax.long()] * nested_absmax[blocks] + offset


def dequantize_4bit_ref(qweight, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, w_dtype):
    """Semantics: W [N, K] in ``w_dtype`` exactly as bitsandbytes' ``dequantize_4bit`` returns it
    (module docstring). Shapes: qweight uint8 [⌈N·K/2⌉], absmax [⌈N·K/blocksize⌉], code [16]."""
    n, k = shape
    numel = n * k
    q = torch.stack([qweight >> 4, qweight & 15], 1).reshape(-1)[:numel].long()
    scales = dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    blocks = torch.arange(numel, device=qweight.device) // blocksize
    return (code[q] * scales[blocks]).to(w_dtype).reshape(n, k)


def quantized_lora_linear_ref(x, w_dequant, bias, lora_a, lora_b, scale=1.0, keep=None, dropout_p=0.0):
    """Semantics: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W = ``w_dequant`` (from
    :func:`dequantize_4bit_ref`) cast to x's dtype — PEFT's eager QLoRA layer. Pass float64
    tensors for the oracle. Shapes: x [M, K], w_dequant [N, K], bias [N] | None, lora_a [R, K],
    lora_b [N, R], keep [M, K] bool | None -> y [M, N]."""
    return lora_linear_ref(x, w_dequant.to(x.dtype), bias, lora_a, lora_b, scale, keep, dropout_p)


def quantized_lora_linear_forward(x, w_dequant, bias, lora_a, lora_b, scale, keep, dropout_p, need_z):
    """The CPU path of the op's forward: ``adapter_linear_forward`` on the dequantized weight
    (the reference path materialises W; the kernels never do). Returns (y [M, N], z [M, R] | [0])."""
    return adapter_linear_forward(x, w_dequant.to(x.dtype), bias, lora_a, None, lora_b, None, scale, "identity",
                                  keep, dropout_p, need_z)


def quantized_linear_forward(x, w_dequant, bias):
    """Semantics: y = x·Wᵀ + b (the base alone), W = ``w_dequant`` cast to x's dtype, summed in
    float32 (float64 for float64 x): the CPU path of ``adaptkern::quantized_linear``.
    Shapes: x [M, K], w_dequant [N, K], bias [N] | None -> y [M, N] in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ w_dequant.to(x.dtype).to(acc).t()
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)


def quantized_lora_linear_backward(dy, x, w_dequant, lora_a, lora_b, z, scale, keep, dropout_p, needs):
    """The CPU path of the op's backward: gradients of (x, bias, lora_a, lora_b) for ``needs``
    (four bools), float32 (float64 for float64 inputs), None where not needed."""
    need_x, need_b, need_a, need_bw = needs
    grads = adapter_linear_backward(dy, x, w_dequant.to(x.dtype), lora_a, lora_b, z, scale, "identity", keep,
                                    dropout_p, (need_x, False, need_b, need_a, False, need_bw, False))
    return grads[0], grads[2], grads[3], grads[5]
