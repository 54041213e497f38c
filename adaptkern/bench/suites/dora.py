"""DoRA suite: ``adaptkern.dora.dora_linear`` training steps (forward_backward), r = 16, scale 2,
bf16, M ∈ {2048, 8192}, K = N = 4096. ``quick``: M = 8192.

Implementations:

* ``fused``        ``dora_linear`` (the row norm ‖W + s·B·A‖ without forming B·A);
* ``peft``         PEFT's DoRA layer (``LoraConfig(use_dora=True)``) holding the same tensors;
* ``lora``         ``adaptkern.lora_linear`` at the same shape: plain LoRA's cost, the yardstick
                   (goal: DoRA within 1.1× of it);
* ``base_linear``  the frozen ``F.linear`` alone.

The magnitude m starts at PEFT's initial value ‖W + s·B·A‖_row, perturbed by 10 % so that
g = m / ‖·‖ is not 1. The check compares ``fused`` (output; gradients of x, A, B and m) with
``dora_linear_ref`` in float64, the same reference in bf16 as the eager error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import adaptkern
from adaptkern.dora import dora_linear
from adaptkern.ops.dora_linear.reference import dora_linear_ref, dora_weight_norm_ref

from ..base import Case, Unavailable, compare_all, evaluate, missing, randn, with_mode

NAME = "dora"
KINDS = ("dora",)
IMPLS = ("fused", "peft", "lora", "base_linear")
RANK = 16
M_VALUES = (2048, 8192)
KN = 4096


def requirement():
    """None: the suite needs nothing beyond adaptkern (the peft column needs peft)."""
    return None


def cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The suite; ``gpu=False`` gives the CPU smoke shape."""
    if not gpu:
        return [Case(NAME, "dora", 64, 128, 96, 8)]
    return [Case(NAME, "dora", m, KN, KN, RANK) for m in ((8192,) if quick else M_VALUES)]


@dataclass
class DoraInputs:
    """x [M, K], weight [N, K] (frozen), lora_a [r, K], lora_b [N, r], magnitude [N], dy [M, N];
    x and the adapter's three tensors require grad."""

    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    magnitude: torch.Tensor
    dy: torch.Tensor

    @property
    def trainable(self) -> dict:
        return dict(x=self.x, lora_a=self.lora_a, lora_b=self.lora_b, magnitude=self.magnitude)


def make_inputs(case: Case, device, seed: int = 0) -> DoraInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r = case.torch_dtype, case.M, case.K, case.N, case.rank
    x = randn((m, k), 1.0, dt, device, g)
    w = randn((n, k), k**-0.5, dt, device, g)
    a, b = randn((r, k), k**-0.5, dt, device, g), randn((n, r), r**-0.5, dt, device, g)
    norm = dora_weight_norm_ref(w.float(), a.float(), b.float(), case.scale)
    mag = (norm * (1.0 + 0.1 * randn((n,), 1.0, torch.float32, device, g))).to(dt)
    dy = randn((m, n), 1.0, dt, device, g)
    for t in (x, a, b, mag):
        t.requires_grad_(True)
    return DoraInputs(x, w, a, b, mag, dy)


def make_peft_dora(inp: DoraInputs, scale: float) -> nn.Module:
    """PEFT's DoRA layer around a frozen nn.Linear holding ``inp.weight``; lora_A, lora_B and the
    magnitude vector share ``inp``'s tensors."""
    import peft

    n, k = inp.weight.shape
    r = inp.lora_a.shape[0]
    holder = nn.Module()
    holder.base = nn.Linear(k, n, bias=False, device=inp.weight.device, dtype=inp.weight.dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=scale * r, target_modules=["base"], lora_dropout=0.0, bias="none",
                          use_dora=True)
    layer = peft.inject_adapter_in_model(cfg, holder).base
    layer.get_base_layer().weight = nn.Parameter(inp.weight.detach(), requires_grad=False)
    layer.lora_A["default"].weight = nn.Parameter(inp.lora_a.detach())
    layer.lora_B["default"].weight = nn.Parameter(inp.lora_b.detach())
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(inp.magnitude.detach())
    layer.scaling["default"] = scale
    return layer


def build(case: Case, impl: str, mode: str, inp: DoraInputs, device):
    if mode not in case.modes:
        raise Unavailable("the dora suite times forward_backward only (DoRA is a fine-tuning method)")
    if impl == "base_linear":
        return with_mode(lambda: F.linear(inp.x, inp.weight), [inp.x], inp.dy, mode)
    if impl == "fused":
        args = inp.trainable
        return with_mode(lambda: dora_linear(weight=inp.weight, bias=None, scale=case.scale, **args),
                         list(args.values()), inp.dy, mode)
    if impl == "lora":
        wrt = [inp.x, inp.lora_a, inp.lora_b]
        return with_mode(lambda: adaptkern.lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b,
                                                       scale=case.scale), wrt, inp.dy, mode)
    if impl == "peft":
        why = missing("peft")
        if why:
            raise Unavailable(why)
        layer = make_peft_dora(inp, case.scale)
        wrt = [inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
               layer.lora_magnitude_vector["default"].weight]
        return with_mode(lambda: layer(inp.x), wrt, inp.dy, mode)
    raise Unavailable(f"{impl} is not part of the dora suite (it times {', '.join(IMPLS)})")


def check(case: Case, inp: DoraInputs, grads: bool) -> list:
    """The fused output and gradients against ``dora_linear_ref`` in float64 (bf16: the eager error)."""
    names = tuple(inp.trainable) if grads else ()

    def ref(weight):
        return lambda x, lora_a, lora_b, magnitude: dora_linear_ref(x, weight, None, lora_a, lora_b, magnitude,
                                                                    case.scale)

    fused = evaluate(lambda **t: dora_linear(weight=inp.weight, bias=None, scale=case.scale, **t), inp.trainable,
                     names, inp.dy)
    eager = evaluate(ref(inp.weight), inp.trainable, names, inp.dy)
    oracle = evaluate(ref(inp.weight.double()), inp.trainable, names, inp.dy, torch.float64)
    return compare_all(("y", *(f"{n}.grad" for n in names)), oracle, fused, eager)


def work(case: Case, mode: str) -> tuple[float, float]:
    """forward_backward (the suite's one mode): LoRA's 4MKN + 6Mr(K + N) flops plus the row norm's
    2NKr (B·A tile by tile) and 2NK (squares); bytes: read x, W, the adapter, m and dY, write y,
    dX and the adapter's gradients (LoRA's count with m and its gradient added)."""
    m, k, n, r = case.M, case.K, case.N, case.rank
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    params = r * (k + n) + n
    flops = 4.0 * m * k * n + 6.0 * m * r * (k + n) + 2.0 * n * k * r + 2.0 * n * k
    return flops, float(e * (3 * m * k + 2 * n * k + 3 * params + 2 * m * n))
