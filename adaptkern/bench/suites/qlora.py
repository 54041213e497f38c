"""QLoRA suite: ``adaptkern.quantized.qlora_linear`` on a bitsandbytes NF4 weight (double
quantization, blocksize 64), LoRA r = 16, scale 2, bf16.

Training (variant ``train``, forward_backward): M ∈ {2048, 8192}; (K, N) ∈ {(4096, 4096),
(4096, 14336), (14336, 4096)}. Decode (variant ``decode``, forward): M ∈ {1, 4, 16, 64};
(K, N) ∈ {(4096, 4096), (4096, 14336)}. ``quick``: training M=8192 and decode M=16, K=N=4096.

Implementations:

* ``fused``        ``qlora_linear`` (W dequantized tile by tile inside the kernels; never a bf16 W);
* ``peft``         PEFT's LoRA layer on a bitsandbytes ``Linear4bit`` holding the same packed
                   weight (``matmul_4bit``, then the eager adapter branch);
* ``dequant``      ``bitsandbytes.functional.dequantize_4bit`` every call, then
                   ``F.linear(x, W) + s·(x·Aᵀ)·Bᵀ`` (``quantized_lora_linear_ref``);
* ``base_linear``  ``F.linear`` with the dequantized W held in bf16: the unquantized layer alone
                   (a decode call reads ≈3.5× the bytes of the 4-bit weight).

The check compares ``fused`` with the float64 oracle (W as bitsandbytes dequantizes it, in
float64), with ``dequant`` in bf16 as the eager error. Needs bitsandbytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptkern.ops.quantized_lora_linear.reference import quantized_lora_linear_ref
from adaptkern.quantized import QuantizedWeight, qlora_linear

from ..base import Case, Unavailable, compare_all, evaluate, missing, randn, with_mode

NAME = "qlora"
KINDS = ("qlora",)
IMPLS = ("fused", "peft", "dequant", "base_linear")
RANK = 16
BLOCKSIZE = 64
TRAIN_M = (2048, 8192)
TRAIN_KN = ((4096, 4096), (4096, 14336), (14336, 4096))
DECODE_M = (1, 4, 16, 64)
DECODE_KN = ((4096, 4096), (4096, 14336))


def requirement():
    """None, or why the suite cannot run here (bitsandbytes quantizes the weight)."""
    return missing("bitsandbytes", "test")


def cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The suite; ``gpu=False`` gives the CPU smoke shapes (one training, one decode case)."""
    if not gpu:
        return [Case(NAME, "qlora", 64, 128, 96, 8, variant="train"),
                Case(NAME, "qlora", 4, 128, 96, 8, variant="decode")]
    if quick:
        return [Case(NAME, "qlora", 8192, 4096, 4096, RANK, variant="train"),
                Case(NAME, "qlora", 16, 4096, 4096, RANK, variant="decode")]
    return ([Case(NAME, "qlora", m, k, n, RANK, variant="train") for m in TRAIN_M for k, n in TRAIN_KN]
            + [Case(NAME, "qlora", m, k, n, RANK, variant="decode") for m in DECODE_M for k, n in DECODE_KN])


@dataclass
class QLoraInputs:
    """x [M, K] (requires grad in training), ``packed`` uint8 and ``quant_state`` as
    ``bitsandbytes.functional.quantize_4bit`` returns them for W [N, K], ``qweight`` the same as a
    :class:`~adaptkern.quantized.QuantizedWeight`, ``w16`` W dequantized in bf16 (the base_linear
    floor and the oracle's W), lora_a [r, K], lora_b [N, r], dy [M, N]."""

    x: torch.Tensor
    packed: torch.Tensor
    quant_state: object
    qweight: QuantizedWeight
    w16: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    dy: torch.Tensor

    @property
    def trainable(self) -> dict:
        return dict(x=self.x, lora_a=self.lora_a, lora_b=self.lora_b)


def make_inputs(case: Case, device, seed: int = 0) -> QLoraInputs:
    import bitsandbytes.functional as bf

    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r = case.torch_dtype, case.M, case.K, case.N, case.rank
    x = randn((m, k), 1.0, dt, device, g)
    w = randn((n, k), k**-0.5, dt, device, g)
    packed, qs = bf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    del w
    w16 = bf.dequantize_4bit(packed, qs).to(dt)
    a, b = randn((r, k), k**-0.5, dt, device, g), randn((n, r), r**-0.5, dt, device, g)
    dy = randn((m, n), 1.0, dt, device, g)
    train = "forward_backward" in case.modes
    for t in (x, a, b):
        t.requires_grad_(train)
    return QLoraInputs(x, packed, qs, QuantizedWeight.from_bnb(packed, qs), w16, a, b, dy)


def make_peft_qlora(inp: QLoraInputs, scale: float) -> nn.Module:
    """PEFT's LoRA layer (its bitsandbytes ``Linear4bit`` variant) around a ``Linear4bit`` that holds
    ``inp``'s packed weight, with lora_A/lora_B sharing ``inp``'s adapter tensors."""
    import bitsandbytes as bnb
    import peft

    n, k = inp.w16.shape
    r = inp.lora_a.shape[0]
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=inp.x.dtype, quant_type="nf4", compress_statistics=True,
                             device="meta")
    base.weight = bnb.nn.Params4bit(inp.packed, requires_grad=False, quant_state=inp.quant_state, blocksize=BLOCKSIZE,
                                    compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=base)
    holder = nn.Module()
    holder.base = base
    holder.is_loaded_in_4bit = True  # what PEFT reads to pick its Linear4bit layer
    cfg = peft.LoraConfig(r=r, lora_alpha=scale * r, target_modules=["base"], lora_dropout=0.0, bias="none")
    layer = peft.inject_adapter_in_model(cfg, holder).base
    if type(layer).__module__ != "peft.tuners.lora.bnb":
        raise Unavailable(f"peft wrapped the Linear4bit in {type(layer).__module__}.{type(layer).__name__}, not its "
                          "bitsandbytes layer")
    layer.lora_A["default"].weight = nn.Parameter(inp.lora_a.detach(), requires_grad=inp.lora_a.requires_grad)
    layer.lora_B["default"].weight = nn.Parameter(inp.lora_b.detach(), requires_grad=inp.lora_b.requires_grad)
    layer.lora_A["default"].to(inp.x.device)
    layer.lora_B["default"].to(inp.x.device)
    layer.scaling["default"] = scale
    return layer


def _fused(case: Case, qweight):
    return lambda x, lora_a, lora_b: qlora_linear(x, qweight, None, None, lora_a, lora_b, scale=case.scale)


def _dequant(case: Case, packed, quant_state):
    import bitsandbytes.functional as bf

    return lambda x, lora_a, lora_b: quantized_lora_linear_ref(x, bf.dequantize_4bit(packed, quant_state), None,
                                                               lora_a, lora_b, case.scale)


def build(case: Case, impl: str, mode: str, inp: QLoraInputs, device):
    if mode not in case.modes:
        raise Unavailable(f"{case.variant} cases time {', '.join(case.modes)} only")
    wrt = list(inp.trainable.values())
    if impl == "base_linear":
        return with_mode(lambda: F.linear(inp.x, inp.w16), [inp.x], inp.dy, mode)
    if impl == "fused":
        fn, args = _fused(case, inp.qweight), inp.trainable
        return with_mode(lambda: fn(**args), wrt, inp.dy, mode)
    if impl == "dequant":
        fn, args = _dequant(case, inp.packed, inp.quant_state), inp.trainable
        return with_mode(lambda: fn(**args), wrt, inp.dy, mode)
    if impl == "peft":
        why = missing("peft")
        if why:
            raise Unavailable(why)
        layer = make_peft_qlora(inp, case.scale)
        wrt = [inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return with_mode(lambda: layer(inp.x), wrt, inp.dy, mode)
    raise Unavailable(f"{impl} is not part of the qlora suite (it times {', '.join(IMPLS)})")


def check(case: Case, inp: QLoraInputs, grads: bool) -> list:
    """The fused output (and with ``grads`` the gradients of x, lora_a, lora_b) against float64 on the
    dequantized W, the bf16 dequant-then-matmul composition as the eager error."""
    names = tuple(inp.trainable) if grads else ()
    tensors = inp.trainable
    fused = evaluate(_fused(case, inp.qweight), tensors, names, inp.dy)
    eager = evaluate(_dequant(case, inp.packed, inp.quant_state), tensors, names, inp.dy)
    w64 = inp.w16.double()
    oracle = evaluate(lambda x, lora_a, lora_b: quantized_lora_linear_ref(x, w64, None, lora_a, lora_b, case.scale),
                      tensors, names, inp.dy, torch.float64)
    return compare_all(("y", *(f"{n}.grad" for n in names)), oracle, fused, eager)


def work(case: Case, mode: str) -> tuple[float, float]:
    """LoRA's flops (forward 2MKN + 2Mr(K + N); forward_backward 4MKN + 6Mr(K + N)); bytes with W
    as stored: N·K/2 packed codes plus N·K/64 uint8 block scales (and their float32 scales per
    256 blocks), read once per pass."""
    m, k, n, r = case.M, case.K, case.N, case.rank
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    w_bytes = n * k / 2 + n * k / BLOCKSIZE + 4 * n * k / (BLOCKSIZE * 256)
    params = r * (k + n)
    if mode == "forward":
        return 2.0 * m * k * n + 2.0 * m * r * (k + n), float(e * (m * k + params + m * n) + w_bytes)
    flops = 4.0 * m * k * n + 6.0 * m * r * (k + n)
    return flops, float(e * (3 * m * k + 3 * params + 2 * m * n) + 2 * w_bytes)
