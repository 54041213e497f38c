"""Run a live ``PeftModel``'s LoRA layers on adaptkern's fused kernels, in place.

:func:`fuse_peft` gives each fusable PEFT LoRA layer an instance ``forward`` (a
:class:`FusedForward` holding the layer) that computes what PEFT's ``Linear.forward`` computes,

    y = base(x) + Σ_{a active} scaling[a]·(dropout_a(x)·A_aᵀ)·B_aᵀ,

through ``adaptkern.functional.lora_linear`` (one launch for the base and every active
adapter) or, for ``adapter_names=`` batches, ``adaptkern.mixed.mixed_lora_linear``. It reads
the layer's own ``lora_A``/``lora_B`` Parameters, ``scaling``, dropout modules, merged and
disabled state at every call, so everything PEFT does to the layer afterwards (load_adapter,
set_adapter, set_scale, merge, save_pretrained, ...) is seen; the module tree, parameters and
state dict keys never change. :func:`unfuse_peft` deletes the instance attribute: the class's
own forward is back, exactly.

What a layer kind can fuse is a :class:`FusedKind` in :data:`KINDS`: :data:`DENSE` (``lora.Linear``
over ``nn.Linear`` or transformers ``Conv1D``), :data:`DORA` (the same with ``use_dora=True``
adapters, through ``adaptkern.dora.dora_linear``) and :data:`QLORA` (PEFT's ``bnb.Linear4bit`` over
a bitsandbytes 4-bit ``Linear4bit``, through ``adaptkern.quantized.qlora_linear``; DoRA on it,
QDoRA, stays with PEFT); :func:`register_kind` adds one ahead of the built-in ones. A call the
kind cannot run (a LoRA variant or extra base arguments that appeared after fusing, dropout on
several adapters at once, dropout in a training mixed batch) runs PEFT's own forward for that call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..dora import dora_linear
from ..functional import autocast_input, lora_linear
from ..mixed import mixed_lora_linear
from ..quantized import QuantizedWeight, qlora_linear

logger = logging.getLogger("adaptkern")

BASE = "__base__"  # PEFT's adapter_names entry for "base model only"


@dataclass(frozen=True)
class FusedKind:
    """How one kind of PEFT LoRA layer runs fused.

    ``claims(layer)``: whether this kind handles the layer (its class and base layer type).
    ``unsupported(layer, names)``: why adapters ``names`` of a claimed layer cannot run fused
    (a short reason), or None. ``forward(layer, x, names)``: y [..., out] for the active
    adapters ``names`` (unmerged, adapters enabled). ``mixed_forward(layer, x, names)``: y
    for PEFT's ``adapter_names`` (one name per row of x's first dim), or None: PEFT runs those.
    """

    name: str
    claims: Callable[[nn.Module], bool]
    unsupported: Callable[[nn.Module, list], Optional[str]]
    forward: Callable[[nn.Module, Tensor, list], Tensor]
    mixed_forward: Optional[Callable[[nn.Module, Tensor, list], Tensor]] = None


def _weight_and_bias(layer: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """The base layer's W [out, in] (a transpose view of a Conv1D's [in, out] Parameter) and b."""
    from transformers.pytorch_utils import Conv1D

    base = layer.base_layer
    return (base.weight.t() if isinstance(base, Conv1D) else base.weight), base.bias


def _dropout_p(layer: nn.Module, name: str) -> Optional[float]:
    """The dropout probability applied now by adapter ``name`` (0 for Identity or eval), None if the
    module is neither nn.Dropout nor nn.Identity."""
    module = layer.lora_dropout[name]
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def _dense_claims(layer: nn.Module) -> bool:
    from peft.tuners.lora import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, LoraLinear) and type(layer.base_layer) in (nn.Linear, Conv1D)


def _is_dora(layer: nn.Module, name: str) -> bool:
    """Adapter ``name`` is PEFT's plain DoRA on a linear layer (DoraLinearVariant, DoraLinearLayer magnitude)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    return (bool(layer.use_dora.get(name)) and type(layer.lora_variant.get(name)) is DoraLinearVariant
            and type(layer.lora_magnitude_vector[name]) is DoraLinearLayer)


def _lora_unsupported(layer: nn.Module, names: list, dora: bool = False) -> Optional[str]:
    """Why adapters ``names`` of a LoRA layer cannot run fused (None: they can); DoRA allowed if ``dora``."""
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
        return "the base layer has forward hooks"
    for a in names:
        if a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a):
            if not (dora and _is_dora(layer, a)):
                variant = layer.lora_variant.get(a)
                return f"LoRA variant {'DoRA' if layer.use_dora.get(a) else type(variant).__name__} (adapter {a!r})"
        if getattr(layer, "lora_bias", {}).get(a):
            return f"lora_bias (adapter {a!r})"
        if type(layer.lora_A[a]) is not nn.Linear or type(layer.lora_B[a]) is not nn.Linear:
            return f"lora_A/lora_B of adapter {a!r} are not plain nn.Linear"
        if _dropout_p(layer, a) is None:
            return f"dropout module {type(layer.lora_dropout[a]).__name__} (adapter {a!r})"
    if dora and len(names) > 1 and set(names) <= set(layer.active_adapters) and any(layer.use_dora.get(a)
                                                                                    for a in names):
        return "several active adapters, one of them DoRA"
    return None


def _dense_unsupported(layer: nn.Module, names: list) -> Optional[str]:
    return _lora_unsupported(layer, names)


def _adapter_operands(layer: nn.Module, names: list, dtype: torch.dtype) -> tuple:
    """(A, B, scale, dropout p) for the fused LoRA epilogue of active adapters ``names``. One adapter:
    its own A, B, scaling and dropout. Several (no dropout active): their ranks are concatenated,
    A = [A_1; …; A_n] [Σr, K], B = [s_1·B_1, …, s_n·B_n] [N, Σr] (scaled in ≥ fp32), scale 1."""
    if len(names) == 1:
        a = names[0]
        return layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a], _dropout_p(layer, a)
    acc = torch.promote_types(dtype, torch.float32)
    lora_a = torch.cat([layer.lora_A[a].weight.to(dtype) for a in names])
    lora_b = torch.cat([(layer.lora_B[a].weight.to(acc) * layer.scaling[a]).to(dtype) for a in names], dim=1)
    return lora_a, lora_b, 1.0, 0.0


def _dense_forward(layer: nn.Module, x: Tensor, names: list) -> Tensor:
    """Semantics: y = x·Wᵀ + b + Σ_a scaling[a]·(dropout_a(x)·A_aᵀ)·B_aᵀ in one fused launch (several
    adapters: see :func:`_adapter_operands`)."""
    weight, bias = _weight_and_bias(layer)
    lora_a, lora_b, scale, dropout = _adapter_operands(layer, names, autocast_input(x).dtype)
    return lora_linear(x, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout)


def _dense_mixed_forward(layer: nn.Module, x: Tensor, adapter_names: list) -> Tensor:
    """Semantics: row i (x's first dim) gets y_i = x_i·Wᵀ + b + scaling[a]·(x_i·A_aᵀ)·B_aᵀ with
    a = adapter_names[i]; "__base__" or an adapter this layer lacks: the base alone. The used
    adapters are stacked (ranks zero-padded to the largest) for one mixed-kernel launch."""
    weight, bias = _weight_and_bias(layer)
    used = sorted({a for a in adapter_names if a != BASE and a in layer.lora_A})
    if not used:
        return layer.base_layer(x)
    dtype = autocast_input(x).dtype
    r_max = max(layer.r[a] for a in used)
    lora_a = torch.stack([nn.functional.pad(layer.lora_A[a].weight.to(dtype), (0, 0, 0, r_max - layer.r[a]))
                          for a in used])
    lora_b = torch.stack([nn.functional.pad(layer.lora_B[a].weight.to(dtype), (0, r_max - layer.r[a]))
                          for a in used])
    slot = {a: i for i, a in enumerate(used)}
    ids = torch.tensor([slot.get(a, -1) for a in adapter_names], dtype=torch.int32, device=x.device)
    ids = ids.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
    scales = torch.tensor([float(layer.scaling[a]) for a in used], dtype=torch.float64, device=x.device)
    ranks = torch.tensor([layer.r[a] for a in used], dtype=torch.int32, device=x.device)
    return mixed_lora_linear(x, weight, bias, lora_a, lora_b, ids, scales=scales, ranks=ranks)


DENSE = FusedKind("lora.Linear over nn.Linear / Conv1D", _dense_claims, _dense_unsupported, _dense_forward,
                  _dense_mixed_forward)



def _dora_claims(layer: nn.Module) -> bool:
    return _dense_claims(layer) and any(layer.use_dora.values())


def _dora_unsupported(layer: nn.Module, names: list) -> Optional[str]:
    return _lora_unsupported(layer, names, dora=True)


def _dora_forward(layer: nn.Module, x: Tensor, names: list) -> Tensor:
    """Semantics: PEFT's DoRA layer, y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙s·(x̃·Aᵀ)·Bᵀ with
    g = m / ‖W + s·B·A‖_row (detached), x̃ = dropout(x), m = ``lora_magnitude_vector[a].weight`` [N],
    through ``adaptkern.dora.dora_linear``; a plain LoRA adapter active on the layer runs as DENSE."""
    if not layer.use_dora.get(names[0]):
        return _dense_forward(layer, x, names)
    a = names[0]
    weight, bias = _weight_and_bias(layer)
    return dora_linear(x, weight, bias, layer.lora_A[a].weight, layer.lora_B[a].weight,
                       layer.lora_magnitude_vector[a].weight, scale=layer.scaling[a], dropout=_dropout_p(layer, a))


DORA = FusedKind("lora.Linear with DoRA over nn.Linear / Conv1D", _dora_claims, _dora_unsupported, _dora_forward)


def _peft_linear4bit():
    """PEFT's QLoRA layer class (``peft.tuners.lora.bnb.Linear4bit``), None without bitsandbytes."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def _qlora_claims(layer: nn.Module) -> bool:
    cls = _peft_linear4bit()
    if cls is None or not isinstance(layer, cls):
        return False
    import bitsandbytes as bnb

    return type(layer.base_layer) is bnb.nn.Linear4bit


def _qlora_unsupported(layer: nn.Module, names: list) -> Optional[str]:
    if any(layer.use_dora.get(a) for a in names):
        return "QDoRA (DoRA on a 4-bit base)"
    reason = _lora_unsupported(layer, names)
    if reason is None:
        try:
            QuantizedWeight.from_bnb(layer.base_layer.weight)
        except (ValueError, NotImplementedError) as e:
            reason = f"the 4-bit weight: {e}"
    return reason


def _qlora_forward(layer: nn.Module, x: Tensor, names: list) -> Tensor:
    """Semantics: PEFT's QLoRA layer, y = x_c·Wᵀ + b + Σ_a scaling[a]·(dropout_a(x_c)·A_aᵀ)·B_aᵀ with
    W = dequantize_4bit(base weight), through ``adaptkern.quantized.qlora_linear`` (W dequantized inside
    the kernels); y in x's dtype. x_c is x in the wider of its dtype and the base's compute dtype:
    bitsandbytes casts x to the compute dtype (up, e.g. bf16 -> fp32, as here), while PEFT's adapter
    branch keeps x's precision; one fused product cannot split the two, so x wider than the compute
    dtype (fp32 activations after ``prepare_model_for_kbit_training``) runs the base in x's dtype too."""
    base = layer.base_layer
    dtype = x.dtype if base.compute_dtype is None else torch.promote_types(x.dtype, base.compute_dtype)
    lora_a, lora_b, scale, dropout = _adapter_operands(layer, names, dtype)
    y = qlora_linear(x.to(dtype), QuantizedWeight.from_bnb(base.weight), None, base.bias, lora_a, lora_b,
                     scale=scale, dropout=dropout)
    return y.to(x.dtype)


QLORA = FusedKind("bnb.Linear4bit (QLoRA)", _qlora_claims, _qlora_unsupported, _qlora_forward)

KINDS: list[FusedKind] = [DORA, QLORA, DENSE]


def register_kind(kind: FusedKind) -> None:
    """Add ``kind`` ahead of the existing kinds (the first kind that claims a layer runs it)."""
    if not isinstance(kind, FusedKind):
        raise TypeError(f"kind must be a FusedKind, got {type(kind).__name__}")
    KINDS.insert(0, kind)


def _kind_of(layer: nn.Module) -> Optional[FusedKind]:
    return next((k for k in KINDS if k.claims(layer)), None)


class FusedForward:
    """A fused layer's instance ``forward``: PEFT's control flow (disabled, merged, ``adapter_names``,
    active adapters), the LoRA math in the fused kernels. Picklable and deep-copyable with its layer."""

    def __init__(self, layer: nn.Module, kind: FusedKind):
        self.layer, self.kind = layer, kind
        self.fallbacks: set = set()  # reasons a call ran PEFT's forward, each logged once

    def _peft(self, reason: str, x: Tensor, args, kwargs) -> Tensor:
        if reason not in self.fallbacks:
            self.fallbacks.add(reason)
            logger.warning("adaptkern fuse_peft: a %s layer ran PEFT's forward: %s", type(self.layer).__name__, reason)
        return type(self.layer).forward(self.layer, x, *args, **kwargs)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layer
        layer._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.get("adapter_names")
        if layer.disable_adapters or (layer.merged and adapter_names is None):
            return type(layer).forward(layer, x, *args, **kwargs)  # base only (disabling unmerges first), as PEFT
        extra = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
        if args or extra:
            return self._peft(f"extra forward arguments {sorted(extra)}", x, args, kwargs)
        if adapter_names is not None:
            names = sorted({a for a in adapter_names if a != BASE and a in layer.lora_A})
            reason = self.kind.unsupported(layer, names)
            if reason is None and self.kind.mixed_forward is None:
                reason = "no fused mixed-batch forward for this kind"
            if reason is None and any(_dropout_p(layer, a) for a in names):
                reason = "dropout in a mixed batch (training mode)"
            if reason is not None:
                return self._peft(reason, x, args, kwargs)
            return self.kind.mixed_forward(layer, x, list(adapter_names))
        names = [a for a in layer.active_adapters if a in layer.lora_A]
        if not names:
            return layer.base_layer(x)
        reason = self.kind.unsupported(layer, names)
        if reason is None and len(names) > 1 and any(_dropout_p(layer, a) for a in names):
            reason = "dropout on several active adapters (training mode)"
        if reason is not None:
            return self._peft(reason, x, args, kwargs)
        return self.kind.forward(layer, x, names)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _plan(model: nn.Module) -> tuple[dict, dict, int]:
    """({name: (layer, kind)} to fuse, {name: reason} kept for PEFT, number of LoRA layers)."""
    fuse, kept = {}, {}
    layers = _lora_layers(model)
    for n, m in layers.items():
        own = vars(m).get("forward")
        if isinstance(own, FusedForward):
            continue  # already fused: fuse_peft is idempotent
        kind = _kind_of(m)
        if own is not None:
            reason = "the layer has its own instance forward (e.g. accelerate hooks)"
        elif kind is None:
            base = getattr(m, "base_layer", None)
            reason = f"{type(m).__name__} over {type(base).__name__}: no fused kind"
        else:
            reason = kind.unsupported(m, list(m.lora_A))
        if reason is None:
            fuse[n] = (m, kind)
        else:
            kept[n] = reason
    return fuse, kept, len(layers)


def _summary(fused: int, total: int, kept: dict) -> str:
    by_reason: dict[str, list] = {}
    for n, reason in kept.items():
        by_reason.setdefault(reason, []).append(n)
    parts = [f"{reason}: {len(ns)} layer{'s' if len(ns) > 1 else ''} "
             f"({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})" for reason, ns in by_reason.items()]
    return f"fused {fused} of {total} LoRA layers; kept PEFT for: {'; '.join(parts) if parts else 'none'}"


def fuse_peft(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Make the PEFT LoRA layers of ``model`` (a ``PeftModel`` or any module holding them) run
    adaptkern's fused kernels, in place.

    Semantics: each fusable layer computes what PEFT's ``lora.Linear`` computes,
    y = base(x) + Σ_{a active} scaling[a]·(dropout_a(x)·A_aᵀ)·B_aᵀ (the base alone when the
    adapters are disabled or merged; per row for ``adapter_names=``), forward and backward,
    from the layer's own Parameters. Shapes: x [..., in] -> y [..., out]; A [r, in], B [out, r]
    (Conv1D bases: W stored [in, out], read as its [out, in] transpose view). Nothing but the
    layer's instance ``forward`` changes: modules, parameters, state dict keys, PEFT's methods.
    DoRA adapters (``use_dora=True``) run ``dora_linear`` with m = ``lora_magnitude_vector``;
    QLoRA layers (4-bit bitsandbytes bases) run ``qlora_linear`` on x cast up to the base's
    compute dtype (never down: fp32 activations keep fp32, as PEFT's adapter branch does). Layers
    already fused are skipped (calling it again fuses layers added since). Layers that cannot run
    fused (QDoRA and other variants, ``lora_bias``, embeddings, Conv2d, 8-bit bases, ...) keep
    PEFT's forward; one log line says "fused N of M LoRA layers; kept PEFT for: ...".

    Returns ``model``. Raises, before changing anything: ValueError if ``model`` holds no PEFT
    LoRA layer, or with ``strict=True`` if any layer would be kept for PEFT (naming them).
    """
    fuse, kept, total = _plan(model)
    if total == 0:
        raise ValueError(f"{type(model).__name__} holds no PEFT LoRA layer (peft.tuners.lora.LoraLayer); "
                         f"build it with peft.get_peft_model or PeftModel.from_pretrained first")
    already = total - len(fuse) - len(kept)
    line = _summary(len(fuse) + already, total, kept)
    if strict and kept:
        raise ValueError(f"fuse_peft(strict=True): {line}")
    for layer, kind in fuse.values():
        layer.forward = FusedForward(layer, kind)
    (logger.warning if kept else logger.info)("adaptkern fuse_peft: %s", line)
    return model


def unfuse_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_peft`: every fused layer of ``model`` runs PEFT's own forward again.

    Semantics: the instance ``forward`` set by fuse_peft is deleted; nothing else changed, so
    the model is exactly as before fusing. Returns ``model``."""
    for m in model.modules():
        if isinstance(vars(m).get("forward"), FusedForward):
            del m.forward
    return model


def fused_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that run fused now."""
    return [n for n, m in model.named_modules() if isinstance(vars(m).get("forward"), FusedForward)]
