"""Norm-fused bottleneck suite: ``adaptkern.bottleneck_norm.bottleneck_norm`` (a bottleneck adapter
fused with the dense before it, the residual add and the norm after it), relu, bf16, forward
and forward_backward, peak memory recorded on a GPU.

Variants (kinds ``norm_seq_bn`` — AdapterHub's ``seq_bn`` — and ``norm_par_bn`` — ``par_bn``):

* ``bert``   BERT-large-like output sub-block: M = 8192, x [M, 4096] → hidden 1024 (W [1024, 4096],
             with bias), post-LN LayerNorm; reduction factor 16 (R = 64). seq_bn reads N(h + r)
             (Pfeiffer), par_bn reads r; both end with the LayerNorm.
* ``llama``  Llama-8B-like MLP down_proj: M = 8192, K = 14336 → N = 4096, no bias, pre-norm (no norm
             at that point); R = 256 (reduction 16). seq_bn reads h + r, par_bn reads r.

``quick``: seq_bn, bert.

Implementations: ``fused``; ``eager``, the composition AdapterHub runs (dense, adds, LN, down,
act, up, scale, adds, LN) as ``adaptkern.ops.bottleneck_norm.reference.bottleneck_norm_ref``
writes it; ``base_linear``, the dense ``F.linear`` alone. In forward_backward the dense's W and
b are frozen; x, the residual, the adapter's parameters and the norm's γ, β take gradients.
The check compares ``fused`` with the reference in float64 (bf16: the eager error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from adaptkern.bottleneck_norm import bottleneck_norm
from adaptkern.ops.bottleneck_norm.reference import bottleneck_norm_ref

from ..base import Case, Unavailable, compare_all, evaluate, randn, with_mode

NAME = "bottleneck_norm"
KINDS = ("norm_seq_bn", "norm_par_bn")
IMPLS = ("fused", "eager", "base_linear")
ACTIVATION = "relu"
EPS = 1e-5
SHAPES = {"bert": (8192, 4096, 1024, 64), "llama": (8192, 14336, 4096, 256)}  # M, K, N, R
# (adapter_input, coefficients, norm, final_norm) per (kind, variant): the op's placements.
PLACEMENTS = {
    ("norm_seq_bn", "bert"): ("norm", (1.0, 1.0, 0.0), "layernorm", True),
    ("norm_par_bn", "bert"): ("residual", (1.0, 1.0, 0.0), "layernorm", True),
    ("norm_seq_bn", "llama"): ("sum", (1.0, 1.0, 0.0), "none", False),
    ("norm_par_bn", "llama"): ("residual", (1.0, 1.0, 0.0), "none", False),
}


def requirement():
    """None: the suite needs nothing beyond adaptkern."""
    return None


def cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The suite; ``gpu=False`` gives CPU smoke shapes (every kind and variant, tiny)."""
    if quick:
        picks = [("norm_seq_bn", "bert")]
    else:
        picks = [(kind, variant) for variant in SHAPES for kind in KINDS]
    out = []
    for kind, variant in picks:
        m, k, n, r = SHAPES[variant] if gpu else (64, 128, 96, 16)
        out.append(Case(NAME, kind, m, k, n, r, activation=ACTIVATION, variant=variant))
    return out


@dataclass
class BottleneckNormInputs:
    """x [M, K], weight [N, K] and bias [N] | None (the frozen dense), residual [M, N], down_w [R, N],
    down_b [R], up_w [N, R], up_b [N], norm_w / norm_b [N] | None (the norm's γ, β; None
    without a norm), dy [M, N]."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    norm_w: Optional[torch.Tensor]
    norm_b: Optional[torch.Tensor]
    dy: torch.Tensor

    @property
    def trainable(self) -> dict:
        named = dict(x=self.x, residual=self.residual, down_w=self.down_w, down_b=self.down_b, up_w=self.up_w,
                     up_b=self.up_b, norm_w=self.norm_w, norm_b=self.norm_b)
        return {k: v for k, v in named.items() if v is not None}


def make_inputs(case: Case, device, seed: int = 0) -> BottleneckNormInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r = case.torch_dtype, case.M, case.K, case.N, case.rank
    bert = case.variant == "bert"
    x = randn((m, k), 1.0, dt, device, g)
    weight = randn((n, k), k**-0.5, dt, device, g)
    bias = randn((n,), 0.5, dt, device, g) if bert else None
    residual = randn((m, n), 1.0, dt, device, g)
    down_w, down_b = randn((r, n), n**-0.5, dt, device, g), randn((r,), 0.5, dt, device, g)
    up_w, up_b = randn((n, r), r**-0.5, dt, device, g), randn((n,), 0.5, dt, device, g)
    norm_w = (1.0 + randn((n,), 0.1, torch.float32, device, g)).to(dt) if bert else None
    norm_b = randn((n,), 0.1, dt, device, g) if bert else None
    dy = randn((m, n), 1.0, dt, device, g)
    inp = BottleneckNormInputs(x, weight, bias, residual, down_w, down_b, up_w, up_b, norm_w, norm_b, dy)
    for t in inp.trainable.values():
        t.requires_grad_(True)
    return inp


def _fused(case: Case, weight, bias):
    adapter_input, coeffs, norm, final = PLACEMENTS[(case.kind, case.variant)]

    def run(x, residual, down_w, down_b, up_w, up_b, norm_w=None, norm_b=None):
        return bottleneck_norm(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale=case.scale,
                               activation=case.activation, adapter_input=adapter_input, coefficients=coeffs, norm=norm,
                               norm_weight=norm_w, norm_bias=norm_b, eps=EPS, final_norm=final)
    return run


def _eager(case: Case, weight, bias):
    adapter_input, coeffs, norm, final = PLACEMENTS[(case.kind, case.variant)]
    scale = torch.full((1,), case.scale, dtype=weight.dtype, device=weight.device)

    def run(x, residual, down_w, down_b, up_w, up_b, norm_w=None, norm_b=None):
        return bottleneck_norm_ref(x, weight, bias, residual, down_w, down_b, up_w, up_b, scale, norm_w, norm_b,
                                   act=case.activation, adapter_input=adapter_input, coeffs=coeffs, norm=norm,
                                   final_norm=final, eps=EPS)
    return run


def build(case: Case, impl: str, mode: str, inp: BottleneckNormInputs, device):
    args = inp.trainable
    wrt = list(args.values())
    if impl == "base_linear":
        return with_mode(lambda: F.linear(inp.x, inp.weight, inp.bias), [inp.x], inp.dy, mode)
    if impl in ("fused", "eager"):
        fn = (_fused if impl == "fused" else _eager)(case, inp.weight, inp.bias)
        return with_mode(lambda: fn(**args), wrt, inp.dy, mode)
    raise Unavailable(f"{impl} is not part of the bottleneck_norm suite (it times {', '.join(IMPLS)})")


def check(case: Case, inp: BottleneckNormInputs, grads: bool) -> list:
    """The fused output (and with ``grads`` every gradient, then the no-grad output: the inference
    path) against the reference in float64."""
    names = tuple(inp.trainable) if grads else ()
    fused = evaluate(_fused(case, inp.weight, inp.bias), inp.trainable, names, inp.dy)
    eager = evaluate(_eager(case, inp.weight, inp.bias), inp.trainable, names, inp.dy)
    bias64 = None if inp.bias is None else inp.bias.double()
    oracle = evaluate(_eager(case, inp.weight.double(), bias64), inp.trainable, names, inp.dy, torch.float64)
    out = compare_all(("y", *(f"{n}.grad" for n in names)), oracle, fused, eager)
    if grads:
        inference = evaluate(_fused(case, inp.weight, inp.bias), inp.trainable, (), None)
        out += compare_all(("y (no_grad)",), oracle, inference, eager)
    return out


def work(case: Case, mode: str) -> tuple[float, float]:
    """Forward 2MKN (dense) + 4MRN (down and up); forward_backward adds dX = dH·W (2MKN) and the
    adapter's four backward products (8MRN); norms and adds are O(MN). Bytes: read x, W, the
    residual and the parameters, write y; forward_backward adds read dY, write dX, the residual's
    gradient and the parameters' gradients."""
    m, k, n, r = case.M, case.K, case.N, case.rank
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    params = 2 * r * n + r + 4 * n
    if mode == "forward":
        return 2.0 * m * k * n + 4.0 * m * r * n, float(e * (m * k + n * k + params + 2 * m * n))
    return 4.0 * m * k * n + 12.0 * m * r * n, float(e * (2 * m * k + n * k + 2 * params + 4 * m * n))
