"""``AdapterLinear``: a drop-in ``nn.Linear`` whose adapters run in the fused kernels."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import _check_placement, bottleneck_linear, lora_linear
from .ops import reference
from .ops.mixed_adapter_linear import mixed_adapter_linear_op
from .ops.triton_kernels import ACT_CODES


class LoraAdapter(nn.Module):
    """LoRA weights of one adapter: ``lora_A [r, in]`` (Kaiming-uniform), ``lora_B [out, r]`` (zeros).

    Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA).
    """

    kind = "lora"

    def __init__(self, in_features, out_features, r, alpha=None, dropout=0.0, use_rslora=False, *,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0, so no change until trained

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta_weight(self) -> Tensor:
        """scale·B·A [out, in], computed in float32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, rslora={self.use_rslora}"


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter weights: ``down_weight [size, N | K]``, ``down_bias [size]``,
    ``up_weight [N, size]`` and ``up_bias [N]`` (both zeros at creation).

    Semantics: sequential adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b; parallel reads x.
    """

    kind = "bottleneck"

    def __init__(self, in_features, out_features, size, activation="relu", placement="sequential", scale=1.0, *,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.activation = reference.canonical_activation(activation)
        self.placement = _check_placement(placement)
        self.scale = float(scale)
        reads = out_features if placement == "sequential" else in_features
        down = nn.Linear(reads, size, device=device, dtype=dtype)
        self.down_weight = nn.Parameter(down.weight.detach())
        self.down_bias = nn.Parameter(down.bias.detach())
        self.up_weight = nn.Parameter(torch.zeros(out_features, size, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"size={self.down_weight.shape[0]}, activation={self.activation}, placement={self.placement}, " \
               f"scale={self.scale:g}"


class _FoldCache:
    """A sequential adapter's folded (A = D·W, a = D·b + d), reused while no input changed.

    Keyed by storage address, shape and ``_version`` of D, d, W, b: an in-place update
    (optimizer step, ``load_state_dict``, merge) bumps the version and the next call refolds.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, weight, bias, down_weight, down_bias):
        key = tuple((t.data_ptr(), t.device, t.dtype, t.shape, t._version) if t is not None else None
                    for t in (weight, bias, down_weight, down_bias))
        if key != self.key:
            with torch.no_grad():
                self.value = reference.fold_sequential(weight, bias, down_weight, down_bias)
            self.key = key
        return self.value


class AdapterLinear(nn.Linear):
    """``nn.Linear`` plus named LoRA and bottleneck adapters, one active at a time.

    Semantics: y = x·Wᵀ + b + (the active adapter's term), computed by the fused kernels
    on CUDA (and under the Triton interpreter), by the PyTorch reference on CPU.
    Shapes: x [..., in_features] -> y [..., out_features].

    Adapter parameters live in the state dict as ``adapters.<name>.lora_A`` [r, in],
    ``adapters.<name>.lora_B`` [out, r], or ``adapters.<name>.down_weight`` / ``down_bias`` /
    ``up_weight`` / ``up_bias``; the base keys stay ``weight`` and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter_state()

    def _init_adapter_state(self) -> None:
        self.adapters = nn.ModuleDict()
        self._active: Optional[str] = None
        self._merged: Optional[str] = None
        self._fold_caches: dict[str, _FoldCache] = {}
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

    def add_lora(self, name: str, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False) -> LoraAdapter:
        """Add a LoRA adapter (A Kaiming-uniform, B zeros) and make it active."""
        self._new_name(name)
        self.adapters[name] = LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                          **self._factory())
        self._active = name
        return self.adapters[name]

    def add_bottleneck(self, name: str, size: int, activation: str = "relu", placement: str = "sequential",
                       scale: float = 1.0) -> BottleneckAdapter:
        """Add a bottleneck adapter (up-projection zeros) and make it active."""
        self._new_name(name)
        self.adapters[name] = BottleneckAdapter(self.in_features, self.out_features, size, activation, placement,
                                                scale, **self._factory())
        self._active = name
        return self.adapters[name]

    def _get(self, name: str):
        if not isinstance(name, str) or name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; this layer has {sorted(self.adapters)}")
        return self.adapters[name]

    @property
    def active_adapter(self) -> Optional[str]:
        """Name of the adapter forward applies, or None (base only)."""
        return self._active

    def set_adapter(self, name: Optional[str]) -> None:
        """Select the adapter forward applies; None runs the base layer alone."""
        if name is not None:
            self._get(name)
        self._active = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and its state dict keys); the layer runs base-only if it was active."""
        self._get(name)
        if name == self._merged:
            raise ValueError(f"adapter {name!r} is merged into the weight; unmerge() it before deleting")
        del self.adapters[name]
        self._fold_caches.pop(name, None)
        if self._active == name:
            self._active = None

    @property
    def merged_adapter(self) -> Optional[str]:
        """Name of the LoRA adapter folded into ``weight`` by :meth:`merge`, or None."""
        return self._merged

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold LoRA adapter ``name`` into the base weight: W += scale·B·A (in float32)."""
        adapter = self._get(name)
        if adapter.kind != "lora":
            raise ValueError(f"only LoRA adapters can be merged; {name!r} is a {adapter.kind} adapter")
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is already merged; unmerge() it first")
        self.weight.copy_((self.weight.float() + adapter.delta_weight()).to(self.weight.dtype))
        self._merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: W -= scale·B·A."""
        if self._merged is None:
            raise ValueError("no adapter is merged")
        adapter = self.adapters[self._merged]
        self.weight.copy_((self.weight.float() - adapter.delta_weight()).to(self.weight.dtype))
        self._merged = None

    # -- forward ------------------------------------------------------------------------

    def _folded(self, name: str, adapter: BottleneckAdapter):
        """Cached fold for inference; None (fold inline, differentiably) when gradients flow."""
        tensors = (self.weight, self.bias, adapter.down_weight, adapter.down_bias)
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        if grads or torch.compiler.is_compiling():
            return None
        return self._fold_caches.setdefault(name, _FoldCache()).get(*tensors)

    def forward(self, x: Tensor, adapter_ids: Optional[Tensor] = None) -> Tensor:
        """Semantics: y = x·Wᵀ + b + the active adapter's term; with ``adapter_ids``, row i uses
        adapter number ``adapter_ids[i]`` (in ``self.adapters`` order; -1: base only).

        Shapes: x [..., in_features]; adapter_ids [rows] or, for x [B, T, in], [B] (one per
        sequence) -> y [..., out_features].
        """
        if adapter_ids is None:
            adapter_ids = self._batch_ids
        if adapter_ids is not None:
            return self._mixed_forward(x, adapter_ids)
        name = self._active
        if name is None or name == self._merged:
            return nn.functional.linear(x, self.weight, self.bias)
        adapter = self.adapters[name]
        if adapter.kind == "lora":
            return lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, scale=adapter.scale,
                               dropout_p=adapter.dropout if self.training else 0.0)
        folded = self._folded(name, adapter) if adapter.placement == "sequential" else None
        return bottleneck_linear(x, self.weight, self.bias, adapter.down_weight, adapter.down_bias,
                                 adapter.up_weight, adapter.up_bias, scale=adapter.scale,
                                 activation=adapter.activation, placement=adapter.placement, folded=folded)

    def _slot_tensors(self, name: str, adapter, r_max: int):
        """(A [r_max, K], a [r_max], B [N, r_max], c [N], scale, act code, rank): one pool slot, differentiable."""
        n = self.out_features
        if adapter.kind == "lora":
            a_w, a_b, b_w, b_b, act = adapter.lora_A, None, adapter.lora_B, None, "identity"
        else:
            b_w, b_b, act = adapter.up_weight, adapter.up_bias, adapter.activation
            if adapter.placement == "parallel":
                a_w, a_b = adapter.down_weight, adapter.down_bias
            else:
                a_w, a_b = self._folded(name, adapter) or reference.fold_sequential(
                    self.weight, self.bias, adapter.down_weight, adapter.down_bias)
        r = a_w.shape[0]
        pad = r_max - r
        a_b = a_b if a_b is not None else a_w.new_zeros(r)
        b_b = b_b if b_b is not None else a_w.new_zeros(n)
        pad_rows, pad_cols = nn.functional.pad(a_w, (0, 0, 0, pad)), nn.functional.pad(b_w, (0, pad))
        return pad_rows, nn.functional.pad(a_b, (0, pad)), pad_cols, b_b, adapter.scale, ACT_CODES[act], r

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

    def _mixed_forward(self, x: Tensor, adapter_ids: Tensor) -> Tensor:
        from .functional import autocast_input
        from .mixed import check_adapter_ids

        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged into the weight; unmerge() before mixed batches")
        if self.training and any(getattr(a, "dropout", 0.0) > 0 for a in self.adapters.values()):
            raise NotImplementedError("LoRA dropout is not implemented for mixed-adapter batches; set dropout=0 or "
                                      "call eval()")
        if not self.adapters:
            raise ValueError("adapter_ids given, but this layer has no adapters")
        x = autocast_input(x)
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        ids = adapter_ids
        from_context = ids is self._batch_ids  # built by adapter_batch from names: valid by construction
        if isinstance(ids, Tensor) and x.dim() >= 3 and ids.dim() == 1 and ids.numel() == x.shape[0] != rows:
            ids = ids.repeat_interleave(rows // x.shape[0])  # one id per sequence -> one per token
        ids = check_adapter_ids(ids, rows, len(self.adapters), validate=not from_context, lead=x.shape[:-1])
        names = list(self.adapters)
        r_max = max(a.r if a.kind == "lora" else a.down_weight.shape[0] for a in self.adapters.values())
        slots = [self._slot_tensors(nm, self.adapters[nm], r_max) for nm in names]
        lora_only = all(a.kind == "lora" for a in self.adapters.values())
        a_all, a_bias, b_all, b_bias = (None if lora_only and i in (1, 3) else torch.stack([s[i] for s in slots])
                                        for i in range(4))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scales, acts, ranks = self._slot_metadata(slots, x.device, acc)
        params = [self.weight, self.bias, a_all, a_bias, b_all, b_bias]
        params = [None if t is None else t.to(x.dtype) for t in params]
        need_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
        x2 = x.reshape(rows, self.in_features)
        y, _ = mixed_adapter_linear_op(x2, *params, scales, ranks, None if lora_only else acts, ids, need_z)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.adapters)}, active={self._active!r}"
