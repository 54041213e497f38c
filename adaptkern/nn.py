"""``AdapterLinear``: a drop-in ``nn.Linear`` whose adapters run in the fused kernels."""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import _check_placement, _check_x, autocast_input, bottleneck_linear, lora_linear
from .ops import reference
from .ops.mixed_adapter_linear import mixed_adapter_linear_op
from .ops.triton_kernels import ACT_CODES

_FP32_MAX = torch.finfo(torch.float32).max


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    """``value`` as a float: a real number (not a bool), finite in float32, the precision the
    kernels apply scales in; else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not abs(value) <= _FP32_MAX:
        raise ValueError(f"{name} must be finite (in float32), got {value!r}")
    return float(value)


def _dropout(name: str, value) -> float:
    p = _real(name, value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return p


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LoraAdapter(nn.Module):
    """LoRA weights of one adapter: ``lora_A [r, in]`` (Kaiming-uniform), ``lora_B [out, r]`` (zeros).

    Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA).
    Raises TypeError/ValueError naming the argument for a bad r, alpha or dropout.
    """

    kind = "lora"

    def __init__(self, in_features, out_features, r, alpha=None, dropout=0.0, use_rslora=False, *,
                 device=None, dtype=None):
        super().__init__()
        self.r = _positive_int("r", r)
        self.alpha = float(r) if alpha is None else _real("alpha", alpha)
        self.dropout = _dropout("dropout", dropout)
        self.use_rslora = bool(use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0, so no change until trained

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Semantics: scale·B·A [out, in], computed in ``dtype``."""
        return self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, rslora={self.use_rslora}"


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter weights: ``down_weight [size, N | K]``, ``down_bias [size]``,
    ``up_weight [N, size]`` and ``up_bias [N]`` (both zeros at creation).

    Semantics: sequential adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b; parallel reads x.
    Raises TypeError/ValueError naming the argument for a bad size, activation, placement or scale.
    """

    kind = "bottleneck"

    def __init__(self, in_features, out_features, size, activation="relu", placement="sequential", scale=1.0, *,
                 device=None, dtype=None):
        super().__init__()
        size = _positive_int("size", size)
        self.activation = reference.canonical_activation(activation)
        self.placement = _check_placement(placement)
        self.scale = _real("scale", scale)
        reads = out_features if placement == "sequential" else in_features
        down = nn.Linear(reads, size, device=device, dtype=dtype)
        self.down_weight = nn.Parameter(down.weight.detach())
        self.down_bias = nn.Parameter(down.bias.detach())
        self.up_weight = nn.Parameter(torch.zeros(out_features, size, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"size={self.down_weight.shape[0]}, activation={self.activation}, placement={self.placement}, " \
               f"scale={self.scale:g}"


class AdapterLinear(nn.Linear):
    """``nn.Linear`` plus named LoRA and bottleneck adapters, one active at a time.

    Semantics: y = x·Wᵀ + b + (the active adapter's term), computed by the fused kernels
    on CUDA (and under the Triton interpreter), by the PyTorch reference on CPU.
    Shapes: x [..., in_features] -> y [..., out_features].

    Adapter parameters live in the state dict as ``adapters.<name>.lora_A`` [r, in],
    ``adapters.<name>.lora_B`` [out, r], or ``adapters.<name>.down_weight`` / ``down_bias`` /
    ``up_weight`` / ``up_bias``; the base keys stay ``weight`` and ``bias``. ``weight`` is
    always saved unmerged (see :meth:`merge`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter_state()

    def _init_adapter_state(self) -> None:
        self.adapters = nn.ModuleDict()
        self._active: Optional[str] = None
        self._merged: Optional[str] = None
        self._batch_ids: Optional[Tensor] = None  # set by adaptkern.adapter_batch
        self._slot_meta = None  # cache of _slot_metadata

    @classmethod
    def from_linear(cls, linear: nn.Linear, freeze: bool = True) -> "AdapterLinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new._init_adapter_state()
        new.train(linear.training)
        if freeze:
            new.weight.requires_grad_(False)
            if new.bias is not None:
                new.bias.requires_grad_(False)
        return new

    # -- adapter management -------------------------------------------------------------

    def _new_name(self, name) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        if "." in name:
            raise ValueError(f"adapter name may not contain '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter it first")
        return name

    def _factory(self) -> dict:
        return dict(device=self.weight.device, dtype=self.weight.dtype)

    def _add(self, name: str, adapter: nn.Module) -> nn.Module:
        self.adapters[name] = adapter
        if self._active is None:
            self._active = name
        return adapter

    def add_lora(self, name: str, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, *, lora_alpha: Optional[float] = None,
                 lora_dropout: Optional[float] = None) -> LoraAdapter:
        """Add LoRA adapter ``name`` (A Kaiming-uniform, B zeros).

        Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA; alpha
        None: r) when active. As PEFT, adding does not change which adapter is active; ``name``
        becomes active only on a layer with none active. ``lora_alpha`` / ``lora_dropout`` are
        PEFT's names for ``alpha`` / ``dropout``; giving a non-default ``alpha``/``dropout`` too is
        a TypeError. Every argument is checked (TypeError/ValueError naming it) before anything
        changes.
        """
        if lora_alpha is not None:
            if alpha is not None:
                raise TypeError(f"give alpha or lora_alpha (PEFT's name for it), not both: alpha={alpha!r}, "
                                f"lora_alpha={lora_alpha!r}")
            alpha = _real("lora_alpha", lora_alpha)
        if lora_dropout is not None:
            if dropout != 0.0:
                raise TypeError(f"give dropout or lora_dropout (PEFT's name for it), not both: dropout={dropout!r}, "
                                f"lora_dropout={lora_dropout!r}")
            dropout = _dropout("lora_dropout", lora_dropout)
        self._new_name(name)
        return self._add(name, LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                           **self._factory()))

    def add_bottleneck(self, name: str, size: int, activation: str = "relu", placement: str = "sequential",
                       scale: float = 1.0) -> BottleneckAdapter:
        """Add bottleneck adapter ``name`` (up-projection zeros).

        Semantics: adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b (sequential; parallel reads x)
        when active. As PEFT, adding does not change which adapter is active; ``name`` becomes
        active only on a layer with none active. Every argument is checked (TypeError/ValueError
        naming it) before anything changes.
        """
        self._new_name(name)
        return self._add(name, BottleneckAdapter(self.in_features, self.out_features, size, activation, placement,
                                                 scale, **self._factory()))

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
        if self._active == name:
            self._active = None

    @property
    def merged_adapter(self) -> Optional[str]:
        """Name of the LoRA adapter folded into ``weight`` by :meth:`merge`, or None."""
        return self._merged

    def _weight_with(self, name: str, sign: int) -> Tensor:
        """Semantics: W + sign·scale·B·A of LoRA adapter ``name`` [out, in] in W's dtype, computed
        in float32 or in W's dtype if wider. ValueError if any element is NaN or Inf."""
        w = self.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        out = (w.to(acc) + sign * self.adapters[name].delta_weight(acc)).to(w.dtype)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"W {'+' if sign > 0 else '-'} scale·B·A of adapter {name!r} has NaN or Inf in "
                             f"{w.dtype}; the weight is left unchanged")
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold LoRA adapter ``name`` into the base weight and make it the active adapter.

        Semantics: W ← W + scale·B·A, computed in float32 (in W's dtype if wider: float64
        stays float64) and rounded to W's dtype; forward then runs the merged W alone. Refuses
        (ValueError, W unchanged) a result holding NaN or Inf, as PEFT's ``safe_merge``.
        The state dict keeps holding the unmerged W; loading one unmerges first.
        """
        adapter = self._get(name)
        if adapter.kind != "lora":
            raise ValueError(f"only LoRA adapters can be merged; {name!r} is a {adapter.kind} adapter")
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is already merged; unmerge() it first")
        self.weight.copy_(self._weight_with(name, +1))
        self._merged = self._active = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`.

        Semantics: W ← W − scale·B·A in merge's precision; the adapter stays active (run unfused).
        """
        if self._merged is None:
            raise ValueError("no adapter is merged")
        self.weight.copy_(self._weight_with(self._merged, -1))
        self._merged = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Semantics: nn.Linear's keys, but a merged layer saves W unmerged (exactly what
        :meth:`unmerge` restores), so the state dict loads into any layer holding the adapter."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged is not None:
            stored, w = self._parameters["weight"], self.weight  # w: stored, or a view of it (Conv1DAdapter)
            saved = stored.detach().clone()
            with torch.no_grad():
                saved.as_strided(w.shape, w.stride(), w.storage_offset() - stored.storage_offset()).copy_(
                    self._weight_with(self._merged, -1))
            destination[prefix + "weight"] = saved

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """Semantics: a merged layer given its weight or its merged adapter's values unmerges
        first (the state dict holds them unmerged), so it ends consistent, unmerged."""
        if self._merged is not None and any(prefix + k in state_dict for k in (
                "weight", f"adapters.{self._merged}.lora_A", f"adapters.{self._merged}.lora_B")):
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids=None) -> Tensor:
        """Semantics: y = x·Wᵀ + b + the active adapter's term; with ``adapter_ids``, row i uses
        adapter number ``adapter_ids[i]`` (in ``self.adapters`` order; -1: base only).

        Shapes: x [..., in_features]; adapter_ids (a tensor on x's device, or a list of ints)
        [rows], shaped like x's leading dims, or, for x [B, T, in], [B] (one per sequence) ->
        y [..., out_features]. Ids on another device than x: ValueError naming both.
        """
        if adapter_ids is None:
            adapter_ids = self._batch_ids
        if adapter_ids is not None:
            return self._mixed_forward(x, adapter_ids)
        name = self._active
        if name is None or name == self._merged:
            return F.linear(x, self.weight, self.bias)
        adapter = self.adapters[name]
        if adapter.kind == "lora":
            return lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, scale=adapter.scale,
                               dropout_p=adapter.dropout if self.training else 0.0)
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
        _check_x(x, self.weight)
        r = adapter.down_weight.shape[0]
        params = (self.weight, self.bias, adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias)
        if x.shape[:-1].numel() >= 8 * r or _needs_grad(x, *params):
            return bottleneck_linear(x, *params, scale=adapter.scale, activation=adapter.activation)
        x = autocast_input(x)
        w, b, d_w, d_b, u_w, u_b = (None if t is None else t.to(x.dtype) for t in params)
        h = F.linear(x, w, b)
        return h + adapter.scale * F.linear(reference.activation(F.linear(h, d_w, d_b), adapter.activation), u_w, u_b)

    def _slot_tensors(self, adapter, r_max: int):
        """(A [r_max, K], a [r_max], B [N, r_max], c [N], scale, act code, rank): one pool slot,
        differentiable; a sequential bottleneck is folded in every call (nothing kept stale)."""
        n = self.out_features
        if adapter.kind == "lora":
            a_w, a_b, b_w, b_b, act = adapter.lora_A, None, adapter.lora_B, None, "identity"
        else:
            b_w, b_b, act = adapter.up_weight, adapter.up_bias, adapter.activation
            if adapter.placement == "parallel":
                a_w, a_b = adapter.down_weight, adapter.down_bias
            else:
                a_w, a_b = reference.fold_sequential(self.weight, self.bias, adapter.down_weight, adapter.down_bias)
        r = a_w.shape[0]
        pad = r_max - r
        a_b = a_b if a_b is not None else a_w.new_zeros(r)
        b_b = b_b if b_b is not None else a_w.new_zeros(n)
        pad_rows, pad_cols = F.pad(a_w, (0, 0, 0, pad)), F.pad(b_w, (0, pad))
        return pad_rows, F.pad(a_b, (0, pad)), pad_cols, b_b, adapter.scale, ACT_CODES[act], r

    def _slot_metadata(self, slots, device, acc) -> tuple:
        """(scales, acts, ranks) device tensors, rebuilt only when their values change: no
        host-to-device copy per forward (and none inside a CUDA graph capture)."""
        key = (tuple((s[4], s[5], s[6]) for s in slots), device, acc)
        if self._slot_meta is None or self._slot_meta[0] != key:
            values = list(zip(*key[0]))
            self._slot_meta = (key, (torch.tensor(values[0], dtype=acc, device=device),
                                     torch.tensor(values[1], dtype=torch.int32, device=device),
                                     torch.tensor(values[2], dtype=torch.int32, device=device)))
        return self._slot_meta[1]

    def _mixed_forward(self, x: Tensor, adapter_ids) -> Tensor:
        from .mixed import check_adapter_ids

        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged into the weight; unmerge() before mixed batches")
        if self.training and any(getattr(a, "dropout", 0.0) > 0 for a in self.adapters.values()):
            raise NotImplementedError("LoRA dropout is not implemented for mixed-adapter batches; set dropout=0 or "
                                      "call eval()")
        if not self.adapters:
            raise ValueError("adapter_ids given, but this layer has no adapters")
        _check_x(x, self.weight)
        x = autocast_input(x)
        lead = x.shape[:-1]
        rows = lead.numel()
        ids = adapter_ids
        from_context = ids is self._batch_ids  # built by adapter_batch from names: valid by construction
        per_sequence = x.dim() >= 3 and x.shape[0] != rows  # x [B, T, ...]: ids may give one id per sequence
        if from_context and x.dim() >= 2 and 0 < ids.numel() < x.shape[0] and x.shape[0] % ids.numel() == 0:
            ids = ids.repeat_interleave(x.shape[0] // ids.numel())  # generate's repeat_interleave (beams, samples)
        elif per_sequence and isinstance(ids, (list, tuple)) and len(ids) == x.shape[0] and \
                not isinstance(ids[0], (list, tuple)):
            ids = check_adapter_ids(ids, len(ids), len(self.adapters), validate=False, device=x.device)
        if per_sequence and isinstance(ids, Tensor) and ids.dim() == 1 and ids.numel() == x.shape[0]:
            ids = ids.repeat_interleave(rows // x.shape[0])  # one id per sequence -> one per token
        ids = check_adapter_ids(ids, rows, len(self.adapters), validate=not from_context, lead=lead, device=x.device)
        r_max = max(a.r if a.kind == "lora" else a.down_weight.shape[0] for a in self.adapters.values())
        slots = [self._slot_tensors(a, r_max) for a in self.adapters.values()]
        lora_only = all(a.kind == "lora" for a in self.adapters.values())
        a_all, a_bias, b_all, b_bias = (None if lora_only and i in (1, 3) else torch.stack([s[i] for s in slots])
                                        for i in range(4))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scales, acts, ranks = self._slot_metadata(slots, x.device, acc)
        params = [self.weight, self.bias, a_all, a_bias, b_all, b_bias]
        params = [None if t is None else t.to(x.dtype) for t in params]
        y, _ = mixed_adapter_linear_op(x.reshape(rows, self.in_features), *params, scales, ranks,
                                       None if lora_only else acts, ids, _needs_grad(x, *params))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.adapters)}, active={self._active!r}"
