"""What is timed: the fused op and its baselines, as zero-argument callables.

Implementations (``impl`` in the results file):

* ``fused``          ``adaptkern.lora_linear`` / ``bottleneck_linear`` / ``mixed_lora_linear``.
                     Forward mode of a sequential bottleneck passes the folded down-projection
                     precomputed, as ``AdapterLinear`` caches it for inference; forward_backward
                     folds inside every call (the fold is differentiated).
* ``eager``          plain PyTorch ops, as PEFT and AdapterHub compute an adapter: the formulas of
                     ``adaptkern.ops.adapter_linear.reference`` (``lora_linear_ref``, ``bottleneck_linear_ref``).
                     Mixed batches: :func:`eager_mixed_lora` (the base once, then per distinct
                     adapter its rows, with row indices built once outside the timing).
* ``peft``           the real ``peft`` LoRA layer (``inject_adapter_in_model``) holding the same
                     weights. LoRA, core suite only; absent when peft is not importable.
* ``fuse_peft``      that same peft layer after ``adaptkern.integrations.peft_fuse.fuse_peft``: what a
                     PEFT user gets from one call (PEFT's control flow around the fused op).
* ``compiled_eager`` ``torch.compile(eager, dynamic=False)`` (dynamo reset before each case).
                     Core suite only; left out on a CPU (inductor's C++ build takes ~20 s a shape).
* ``base_linear``    the frozen ``F.linear`` alone: the floor.

The suites of :mod:`adaptkern.bench.suites` build their own (each module's docstring says what
its columns are): ``dequant`` (QLoRA: bitsandbytes' dequantize, then the eager LoRA), ``lora``
(DoRA's yardstick: adaptkern's LoRA at the same shape), ``vllm`` (vLLM's PyTorch LoRA ops),
``delta`` (``F.linear`` then ``add_lora_delta``), ``two_launch`` (``lora_shrink`` then
``lora_expand``), ``graph_replay`` (a CUDA graph replayed with a refilled ``SlotMapping``); there
``peft`` is PEFT's QLoRA or DoRA layer and ``eager`` the op's reference composition.

Modes: ``forward`` runs under ``torch.no_grad()`` (inference); ``forward_backward`` runs the
forward with autograd and ``torch.autograd.grad`` of the output against ``dy`` with respect to
x and the adapter's parameters (the frozen weight takes no gradient; ``base_linear``
differentiates x alone).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import adaptkern
from adaptkern.ops import common
from adaptkern.ops.adapter_linear import reference

from .base import Unavailable, with_mode
from .cases import SUITE_MODULES, Case, CoreInputs, MixedInputs

CORE_IMPLS = ("fused", "eager", "peft", "fuse_peft", "compiled_eager", "base_linear")
MIXED_IMPLS = ("fused", "eager", "base_linear")  # what applies to the mixed suite
IMPLS = CORE_IMPLS + tuple(dict.fromkeys(i for m in SUITE_MODULES.values() for i in m.IMPLS if i not in CORE_IMPLS))
SELF_GRAPHED = ("graph_replay",)  # replays a CUDA graph of its own: never captured again (--cuda-graph)


def for_case(case: Case) -> tuple[str, ...]:
    """The implementations that apply to ``case``'s suite (and kind)."""
    if case.suite == "mixed":
        return MIXED_IMPLS
    if case.suite in SUITE_MODULES:
        module = SUITE_MODULES[case.suite]
        return getattr(module, "KIND_IMPLS", {}).get(case.kind, module.IMPLS)
    return CORE_IMPLS


def peft_available() -> bool:
    """Whether ``peft`` imports."""
    try:
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


# -- the computations ------------------------------------------------------------------------


def fused_core(case: Case, inp: CoreInputs, folded=None, route: str = "auto") -> torch.Tensor:
    """The fused op on a single-adapter case."""
    if case.kind == "lora":
        return adaptkern.lora_linear(inp.x, inp.weight, inp.bias, inp.down_w, inp.up_w, scale=case.scale, route=route)
    return adaptkern.bottleneck_linear(inp.x, inp.weight, inp.bias, inp.down_w, inp.down_b, inp.up_w, inp.up_b,
                                       scale=case.scale, activation=case.activation, placement=case.placement,
                                       folded=folded, route=route)


def _eager(case: Case, x, weight, bias, down_w, down_b, up_w, up_b) -> torch.Tensor:
    if case.kind == "lora":
        return reference.lora_linear_ref(x, weight, bias, down_w, up_w, case.scale)
    return reference.bottleneck_linear_ref(x, weight, bias, down_w, down_b, up_w, up_b, case.scale, case.activation,
                                           case.placement)


def _tensors(inp: CoreInputs) -> tuple:
    return inp.x, inp.weight, inp.bias, inp.down_w, inp.down_b, inp.up_w, inp.up_b


def eager_core(case: Case, inp: CoreInputs) -> torch.Tensor:
    """The eager composition (``adaptkern.ops.adapter_linear.reference``) on a single-adapter case, in the
    inputs' dtype."""
    return _eager(case, *_tensors(inp))


def fold(inp: CoreInputs):
    """The sequential bottleneck's folded down-projection (A = D·W, a = D·b + d), no autograd."""
    with torch.no_grad():
        return common.fold_sequential(inp.weight, inp.bias, inp.down_w, inp.down_b)


def fused_mixed(inp: MixedInputs) -> torch.Tensor:
    """``adaptkern.mixed_lora_linear`` without its host-side id check (ids are valid by
    construction; the check reads them on the host, a sync that must stay out of the timing)."""
    return adaptkern.mixed_lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.adapter_ids,
                                       scales=inp.scales, validate_ids=False)


def eager_mixed_lora(x, weight, bias, lora_a, lora_b, groups, scales) -> torch.Tensor:
    """Semantics: y = x·Wᵀ + b, then for each (slot s, rows) of ``groups``:
    y[rows] += scales[s]·(x[rows]·A_sᵀ)·B_sᵀ (``index_add_``), as PEFT computes a mixed batch.

    Shapes: x [M, K], weight [N, K], bias [N] | None, lora_a [S, r, K], lora_b [S, N, r],
    groups [(slot, rows int64)] built once (:func:`cases.row_groups`), scales: S floats.
    Unlike ``mixed_reference.mixed_adapter_linear_ref`` it does not read the ids on the host per call.
    """
    result = F.linear(x, weight, bias)
    for slot, rows in groups:
        sub = x.index_select(0, rows)
        result.index_add_(0, rows, F.linear(F.linear(sub, lora_a[slot]), lora_b[slot]) * scales[slot])
    return result


def make_peft_lora(inp: CoreInputs, scale: float) -> nn.Module:
    """The real peft LoRA layer around a frozen nn.Linear holding ``inp.weight``, with
    lora_A/lora_B sharing ``inp``'s adapter tensors (same dtype as the base) and scaling = scale."""
    try:
        import peft
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"peft is not importable ({type(e).__name__}: {e})") from None
    n, k = inp.weight.shape
    r = inp.down_w.shape[0]
    holder = nn.Module()
    holder.base = nn.Linear(k, n, bias=inp.bias is not None, device=inp.weight.device, dtype=inp.weight.dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=scale * r, target_modules=["base"], lora_dropout=0.0, bias="none")
    layer = peft.inject_adapter_in_model(cfg, holder).base
    base = layer.get_base_layer()
    base.weight = nn.Parameter(inp.weight.detach(), requires_grad=False)
    if inp.bias is not None:
        base.bias = nn.Parameter(inp.bias.detach(), requires_grad=False)
    layer.lora_A["default"].weight = nn.Parameter(inp.down_w.detach())
    layer.lora_B["default"].weight = nn.Parameter(inp.up_w.detach())
    layer.scaling["default"] = scale
    return layer


# -- the timed callables ---------------------------------------------------------------------


def build(case: Case, impl: str, mode: str, inp, device) -> Callable[[], object]:
    """The zero-argument callable that ``impl`` times for ``case`` in ``mode``.

    Raises :class:`Unavailable` when the implementation does not apply here.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if case.suite in SUITE_MODULES:
        return SUITE_MODULES[case.suite].build(case, impl, mode, inp, device)
    if impl not in CORE_IMPLS and case.suite != "mixed":
        raise Unavailable(f"{impl} is not part of the {case.suite} suite (it times {', '.join(CORE_IMPLS)})")
    if case.suite == "mixed":
        return _build_mixed(impl, mode, inp)
    wrt = list(inp.trainable.values())
    if impl == "base_linear":
        return with_mode(lambda: F.linear(inp.x, inp.weight, inp.bias), [inp.x], inp.dy, mode)
    if impl == "fused":
        folded = fold(inp) if (mode == "forward" and case.placement == "sequential") else None
        return with_mode(lambda: fused_core(case, inp, folded), wrt, inp.dy, mode)
    if impl == "eager":
        return with_mode(lambda: eager_core(case, inp), wrt, inp.dy, mode)
    if impl in ("peft", "fuse_peft"):
        if case.kind != "lora":
            raise Unavailable("peft has no bottleneck adapters")
        layer = make_peft_lora(inp, case.scale)
        if impl == "fuse_peft":
            from adaptkern.integrations.peft_fuse import fuse_peft

            fuse_peft(layer, strict=True)
        wrt = [inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return with_mode(lambda: layer(inp.x), wrt, inp.dy, mode)
    if torch.device(device).type != "cuda":  # compiled_eager
        raise Unavailable("left out on a CPU (inductor's C++ build takes ~20 s a shape)")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *tensors: _eager(case, *tensors), dynamic=False)
    args = _tensors(inp)
    return with_mode(lambda: compiled(*args), wrt, inp.dy, mode)


def _build_mixed(impl: str, mode: str, inp: MixedInputs):
    if mode != "forward":
        raise Unavailable("the mixed suite times forward only")
    if impl == "base_linear":
        return with_mode(lambda: F.linear(inp.x, inp.weight, inp.bias), [], None, mode)
    if impl == "eager":
        scales = inp.scales.tolist()
        return with_mode(lambda: eager_mixed_lora(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.groups,
                                                   scales), [], None, mode)
    if impl == "fused":
        return with_mode(lambda: fused_mixed(inp), [], None, mode)
    raise Unavailable(f"{impl} is not part of the mixed suite (it times {', '.join(MIXED_IMPLS)})")
