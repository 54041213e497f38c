"""``AdapterLinear``: a drop-in ``nn.Linear`` whose adapters run in the fused kernels."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validation as check
from .adapters import BottleneckAdapter, DoraAdapter, LoraAdapter, bottleneck_arguments, lora_arguments
from .dora import dora_linear
from .functional import any_requires_grad, autocast_input, bottleneck_linear, lora_linear
from .mixed_batches import MixedBatchLayer, adapter_batch
from .ops.adapter_linear import reference
from .ops.quantized_lora_linear import dequantize_4bit_ref
from .quantized import QuantizedWeight, qlora_linear

__all__ = ["AdapterLinear", "BottleneckAdapter", "DoraAdapter", "LoraAdapter", "adapter_batch",
           "bottleneck_arguments", "lora_arguments"]

# Class names of bitsandbytes' 4-bit layers and weights (read by name: bitsandbytes stays optional).
_FOUR_BIT_NAMES = ("Linear4bit", "LinearNF4", "LinearFP4", "Params4bit")


class AdapterLinear(MixedBatchLayer, nn.Linear):
    """``nn.Linear`` plus named LoRA, DoRA and bottleneck adapters, one active at a time.

    Semantics: y = x·Wᵀ + b + (the active adapter's term), computed by the fused kernels
    on CUDA (and under the Triton interpreter), by the PyTorch reference on CPU. A DoRA
    adapter makes it y = (m / ‖W + s·B·A‖_row) ⊙ (x·Wᵀ + s·x̃·Aᵀ·Bᵀ) + b. Over a bitsandbytes
    4-bit base (:meth:`from_linear` of a ``Linear4bit``) LoRA runs in the QLoRA kernels.
    Shapes: x [..., in_features] -> y [..., out_features].

    Adapter parameters live in the state dict as ``adapters.<name>.lora_A`` [r, in],
    ``adapters.<name>.lora_B`` [out, r] (DoRA also ``adapters.<name>.lora_magnitude_vector``
    [out], PEFT's ``lora_magnitude_vector``), or ``adapters.<name>.down_weight`` / ``down_bias`` /
    ``up_weight`` / ``up_bias``; the base keys stay ``weight`` and ``bias`` (a 4-bit base adds
    bitsandbytes' ``weight.<quant state>`` keys, as ``Linear4bit`` saves them). ``weight`` is
    always saved unmerged (see :meth:`merge`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter_state()

    def _init_adapter_state(self) -> None:
        self.adapters = nn.ModuleDict()
        self._active: Optional[str] = None
        self._merged: Optional[str] = None
        self._slots: dict[str, int] = {}  # adapter name -> slot index (what adapter_ids name)
        self._dora_norm: Optional[Tensor] = None  # ‖W + s·B·A‖_row of a merged DoRA adapter, for unmerge
        self._four_bit = False  # weight is a bitsandbytes Params4bit (from_linear of a Linear4bit)
        self.compute_dtype: Optional[torch.dtype] = None  # a 4-bit base's compute dtype (Linear4bit's)
        self._init_batch_state()

    @classmethod
    def from_linear(cls, linear: nn.Linear, freeze: bool = True) -> "AdapterLinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias Parameters.

        A bitsandbytes ``Linear4bit`` (recognised by its weight's ``quant_state`` or the class
        name; bitsandbytes is never imported) keeps its ``Params4bit`` shared: W stays 4-bit, and
        LoRA runs in :func:`adaptkern.quantized.qlora_linear` on x cast to the layer's
        ``compute_dtype`` (when set), the result cast back to x's dtype, as ``Linear4bit`` does.
        On a 4-bit base, DoRA and bottleneck adapters, merging and mixed batches raise
        NotImplementedError. Another non-floating weight (8-bit layers): NotImplementedError.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        four_bit = getattr(linear.weight, "quant_state", None) is not None or \
            type(linear).__name__ in _FOUR_BIT_NAMES or type(linear.weight).__name__ in _FOUR_BIT_NAMES
        if not four_bit and not linear.weight.is_floating_point():
            raise NotImplementedError(f"from_linear: a {type(linear).__name__} with a {linear.weight.dtype} weight; "
                                      "adaptkern runs floating weights and bitsandbytes 4-bit (Linear4bit) weights")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new._init_adapter_state()
        new._four_bit = four_bit
        new.compute_dtype = getattr(linear, "compute_dtype", None) if four_bit else None
        new.train(linear.training)
        if freeze:
            new.weight.requires_grad_(False)
            if new.bias is not None:
                new.bias.requires_grad_(False)
        return new

    # -- adapter management -------------------------------------------------------------

    def _new_name(self, name) -> str:
        check.adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter it first")
        return name

    def _factory(self) -> dict:
        """Device and dtype of new adapters: the weight's (a 4-bit base: the dtype it was quantized from)."""
        dtype = self.weight.dtype
        if self._four_bit and not dtype.is_floating_point:
            dtype = getattr(getattr(self.weight, "quant_state", None), "dtype", torch.float32)
        return dict(device=self.weight.device, dtype=dtype)

    def _refuse_four_bit(self, what: str) -> None:
        if self._four_bit:
            raise NotImplementedError(f"{what} on a 4-bit (bitsandbytes Linear4bit) base is not implemented")

    def _add(self, name: str, adapter: nn.Module) -> nn.Module:
        self.adapters[name] = adapter
        self._slots[name] = min(set(range(len(self._slots) + 1)) - set(self._slots.values()))
        if self._active is None:
            self._active = name
        return adapter

    def add_lora(self, name: str, r: int, *, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, lora_alpha: Optional[float] = None,
                 lora_dropout: Optional[float] = None, use_dora: bool = False) -> LoraAdapter:
        """Add LoRA adapter ``name`` (A Kaiming-uniform, B zeros) in the lowest free slot.

        Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA; alpha
        None: r) when active. With ``use_dora`` (PEFT's DoRA) a :class:`DoraAdapter`: y =
        (m / ‖W + scale·B·A‖_row) ⊙ (x·Wᵀ + scale·(x̃·Aᵀ)·Bᵀ) + b with m = ``lora_magnitude_vector``
        [out] initialised to ‖W‖_row, so the layer is unchanged until trained; dropout only in
        training, on the adapter branch. As PEFT, adding does not change which adapter is active;
        ``name`` becomes active only on a layer with none active. Arguments as
        :func:`lora_arguments`, all checked before anything changes; DoRA on a 4-bit base raises
        NotImplementedError.
        """
        self._new_name(name)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        args = dict(lora_alpha=lora_alpha, lora_dropout=lora_dropout, **self._factory())
        if not use_dora:
            return self._add(name, LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                               **args))
        self._refuse_four_bit("DoRA (use_dora=True, QDoRA)")
        return self._add(name, DoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                           weight=self.weight, **args))

    def add_bottleneck(self, name: str, rank: int, *, activation: str = "relu", placement: str = "sequential",
                       scale: float = 1.0) -> BottleneckAdapter:
        """Add bottleneck adapter ``name`` (up-projection zeros) in the lowest free slot.

        Semantics: adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b (sequential; parallel reads x)
        when active. As PEFT, adding does not change which adapter is active; ``name`` becomes
        active only on a layer with none active. Arguments as :func:`bottleneck_arguments`, all
        checked before anything changes. On a 4-bit base: NotImplementedError.
        """
        self._new_name(name)
        self._refuse_four_bit("a bottleneck adapter")
        return self._add(name, BottleneckAdapter(self.in_features, self.out_features, rank, activation, placement,
                                                 scale, **self._factory()))

    @property
    def adapter_slots(self) -> dict[str, int]:
        """Adapter name -> slot: the id ``forward(x, adapter_ids)`` uses for it. A slot stays
        the adapter's until it is deleted (deleting never renumbers the others); a new adapter
        takes the lowest free slot."""
        return dict(self._slots)

    def _get(self, name: str):
        if not isinstance(name, str) or name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; this layer has {sorted(self.adapters)}")
        return self.adapters[name]

    @property
    def active_adapter(self) -> Optional[str]:
        """Name of the adapter forward applies, or None (base only)."""
        return self._active

    def set_adapter(self, name: Optional[str]) -> None:
        """Select the adapter forward applies; None runs the base layer alone.

        Semantics: as PEFT, selecting another adapter (or None) while one is merged first
        unmerges it, with a warning, so forward computes exactly the selected adapter's term.
        """
        if name is not None:
            self._get(name)
        if self._merged is not None and name != self._merged:
            warnings.warn(f"adapter {self._merged!r} is merged into the weight; unmerging it before setting "
                          f"adapter {name!r}", stacklevel=2)
            self.unmerge()
        self._active = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and its state dict keys); the layer runs base-only if it was active."""
        self._get(name)
        if name == self._merged:
            raise ValueError(f"adapter {name!r} is merged into the weight; unmerge() it before deleting")
        del self.adapters[name]
        del self._slots[name]
        if self._active == name:
            self._active = None

    @property
    def merged_adapter(self) -> Optional[str]:
        """Name of the LoRA or DoRA adapter folded into ``weight`` by :meth:`merge`, or None."""
        return self._merged

    def _finite(self, w: Tensor, what: str) -> Tensor:
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{what} has NaN or Inf in {w.dtype}; the weight is left unchanged")
        return w

    def _merged_weight(self, name: str) -> tuple[Tensor, Optional[Tensor]]:
        """Semantics: (W', n) for merging adapter ``name``, in float32 (W's dtype if wider) rounded
        to W's dtype: LoRA W' = W + Δ (n None); DoRA, as PEFT, n = ‖W + Δ‖_row (detached) and
        W' = (m / n)[:, None]·(W + Δ); Δ = scale·B·A. ValueError if W' holds NaN or Inf, or if a
        DoRA row has m / n = 0 (merging would lose W's row, so unmerge could not restore it)."""
        w, adapter = self.weight, self.adapters[name]
        acc = torch.promote_types(w.dtype, torch.float32)
        out = w.to(acc) + adapter.delta_weight(acc)
        norm = None
        if adapter.kind == "dora":
            norm = torch.linalg.norm(out, dim=1)
            g = adapter.lora_magnitude_vector.to(acc) / norm
            if bool((g == 0).any()):
                raise ValueError(f"DoRA adapter {name!r} has magnitude / norm = 0 in {int((g == 0).sum())} rows: "
                                 f"merging would erase those rows of W, which unmerge cannot restore; the weight is "
                                 f"left unchanged")
            out = g[:, None] * out
        return self._finite(out.to(w.dtype), f"merging adapter {name!r} into W"), norm

    def _unmerged_weight(self) -> Tensor:
        """Semantics: W = W' − Δ (LoRA) or W'/(m / n)[:, None] − Δ (DoRA, n kept by merge) for the
        merged adapter, in merge's precision, rounded to W's dtype. ValueError on NaN or Inf."""
        w, adapter = self.weight, self.adapters[self._merged]
        acc = torch.promote_types(w.dtype, torch.float32)
        out = w.to(acc)
        if adapter.kind == "dora":
            out = out / (adapter.lora_magnitude_vector.to(acc) / self._dora_norm)[:, None]
        out = out - adapter.delta_weight(acc)
        return self._finite(out.to(w.dtype), f"unmerging adapter {self._merged!r} from W")

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold LoRA or DoRA adapter ``name`` into the base weight and make it the active adapter.

        Semantics: W ← W + scale·B·A (DoRA, PEFT's rule: n = ‖W + scale·B·A‖_row, kept for
        :meth:`unmerge`, and W ← (m / n)[:, None]·(W + scale·B·A)), computed in float32 (in W's
        dtype if wider: float64 stays float64) and rounded to W's dtype; forward then runs the
        merged W alone. Refuses (ValueError, W unchanged) a result holding NaN or Inf, as PEFT's
        ``safe_merge``, and a DoRA row with m = 0. The state dict keeps holding the unmerged W;
        loading one unmerges first. A 4-bit base: NotImplementedError.
        """
        adapter = self._get(name)
        self._refuse_four_bit("merging")
        if adapter.kind not in ("lora", "dora"):
            raise ValueError(f"only LoRA and DoRA adapters can be merged; {name!r} is a {adapter.kind} adapter")
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is already merged; unmerge() it first")
        merged, self._dora_norm = self._merged_weight(name)
        self.weight.copy_(merged)
        self._merged = self._active = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`.

        Semantics: W ← W − scale·B·A (DoRA: W ← W / (m / n)[:, None] − scale·B·A with merge's n)
        in merge's precision; the adapter stays active (run unfused). ValueError (W unchanged) if
        the result holds NaN or Inf.
        """
        if self._merged is None:
            raise ValueError("no adapter is merged")
        self.weight.copy_(self._unmerged_weight())
        self._merged = self._dora_norm = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Semantics: nn.Linear's keys, but a merged layer saves W unmerged (exactly what
        :meth:`unmerge` restores), so the state dict loads into any layer holding the adapter; a
        4-bit base adds its quant state under ``weight.<key>``, as bitsandbytes' ``Linear4bit``."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged is not None:
            stored, w = self._parameters["weight"], self.weight  # w: stored, or a view of it (Conv1DAdapter)
            saved = stored.detach().clone()
            with torch.no_grad():
                saved.as_strided(w.shape, w.stride(), w.storage_offset() - stored.storage_offset()).copy_(
                    self._unmerged_weight())
            destination[prefix + "weight"] = saved
        quant_state = getattr(self.weight, "quant_state", None) if self._four_bit else None
        if quant_state is not None:
            for k, v in quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """Semantics: a merged layer given its weight or its merged adapter's values unmerges
        first (the state dict holds them unmerged), so it ends consistent, unmerged."""
        if self._merged is not None and any(prefix + k in state_dict for k in (
                "weight", *(f"adapters.{self._merged}.{p}" for p in ("lora_A", "lora_B", "lora_magnitude_vector")))):
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids=None) -> Tensor:
        """Semantics: y = x·Wᵀ + b + the active adapter's term; with ``adapter_ids``, row i uses
        the adapter in slot ``adapter_ids[i]`` (see :attr:`adapter_slots`; -1, or a free slot
        below the highest used one: base only; an id above it is refused in eager mode and, unchecked,
        runs the base).

        Shapes: x [..., in_features]; adapter_ids (a tensor on x's device, or a list of ints)
        [rows], shaped like x's leading dims, or, for x [B, T, in], [B] (one per sequence) ->
        y [..., out_features]. Ids on another device than x: ValueError naming both.
        """
        bound = self._batch_pool
        if adapter_ids is None and bound is not None and not (bound.live and self._needs_live(bound)):
            return self._pooled_forward(x, bound)
        if adapter_ids is None:
            adapter_ids = self._batch_ids
        if adapter_ids is not None:
            return self._mixed_forward(x, adapter_ids)
        name = self._active
        if self._four_bit:
            return self._quantized_forward(x, None if name is None else self.adapters[name])
        if name is None or name == self._merged:
            return F.linear(x, self.weight, self.bias)
        adapter = self.adapters[name]
        dropout = adapter.dropout if self.training and adapter.kind != "bottleneck" else 0.0
        if adapter.kind == "lora":
            return lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, scale=adapter.scale,
                               dropout=dropout)
        if adapter.kind == "dora":
            return dora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B,
                               adapter.lora_magnitude_vector, scale=adapter.scale, dropout=dropout)
        if adapter.placement == "sequential":
            return self._sequential(x, adapter)
        return bottleneck_linear(x, self.weight, self.bias, adapter.down_weight, adapter.down_bias,
                                 adapter.up_weight, adapter.up_bias, scale=adapter.scale,
                                 activation=adapter.activation, placement="parallel")

    def _sequential(self, x: Tensor, adapter: BottleneckAdapter) -> Tensor:
        """The active sequential bottleneck. No fold is kept between calls: nothing proves one
        fresh (``.data`` writes change neither ``data_ptr`` nor ``_version``).

        Semantics: y = h + s·(f(h·Dᵀ + d)·Uᵀ + u), h = x·Wᵀ + b. With M ≥ 8·R rows, or when
        gradients flow, the fused kernel runs on A = D·W, a = D·b + d folded in this call: 2·R·N·K
        flops, at most 1/8 of the base GEMM's 2·M·N·K. Below (decode, no grad) the layer runs
        unfolded in eager ops: refolding at R = 64, N = K = 4096, M = 1 would cost 2.1 GFLOP and a
        second 32 MiB read of bf16 W (≈2× the base GEMM's time), while unfolded costs the flops
        and bytes the cached fold did (+1 MFLOP, +1 MiB of D and U over the 32 MiB of W), run as
        the base GEMM plus five small eager kernels instead of one fused kernel.
        """
        check.linear_input(x, self.weight)
        r = adapter.rank
        params = (self.weight, self.bias, adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias)
        if x.shape[:-1].numel() >= 8 * r or any_requires_grad(x, *params):
            return bottleneck_linear(x, *params, scale=adapter.scale, activation=adapter.activation)
        x = autocast_input(x)
        return reference.bottleneck_linear_ref(x, *(None if t is None else t.to(x.dtype) for t in params),
                                               adapter.scale, adapter.activation, "sequential")

    def _quantized_forward(self, x: Tensor, adapter: Optional[LoraAdapter]) -> Tensor:
        """A 4-bit base, as ``Linear4bit`` computes it: x cast to ``compute_dtype`` (when set), the
        result cast back to x's dtype. Semantics: y = x·Wᵀ + b (+ scale·(x̃·Aᵀ)·Bᵀ), W =
        dequantize_4bit(weight) in compute precision. LoRA runs in :func:`qlora_linear` (W
        dequantized tile by tile in the kernels); base only dequantizes W whole and calls
        F.linear, which is what bitsandbytes' own ``matmul_4bit`` does for more than one row. The
        quant state is read at every call, so a requantized ``Params4bit`` is picked up."""
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if adapter is None:
            qw = QuantizedWeight.from_bnb(self.weight)
            w = dequantize_4bit_ref(qw.data, qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset, qw.code,
                                    qw.shape, qw.blocksize, qw.dtype)
            check.linear_input(x, w)
            y = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = qlora_linear(x, self.weight, None, self.bias, adapter.lora_A, adapter.lora_B, scale=adapter.scale,
                             dropout=adapter.dropout if self.training else 0.0)
        return y.to(dtype)

    def extra_repr(self) -> str:
        four_bit = ", 4-bit base" if self._four_bit else ""
        return f"{super().extra_repr()}{four_bit}, adapters={list(self.adapters)}, active={self._active!r}"
