"""``AdapterLinear``: a drop-in ``nn.Linear`` whose adapters run in the fused kernels."""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validation as check
from .adapters import BottleneckAdapter, LoraAdapter, bottleneck_arguments, lora_arguments
from .functional import any_requires_grad, autocast_input, bottleneck_linear, lora_linear
from .mixed import run_mixed
from .ops import common
from .ops.adapter_linear import reference
from .ops.common import ACT_CODES
from .ops.mixed_adapter_linear import SlotStack
from .pool import AdapterPool

__all__ = ["AdapterLinear", "BottleneckAdapter", "LoraAdapter", "adapter_batch", "bottleneck_arguments",
           "lora_arguments"]


class _PoolBinding(NamedTuple):
    """What forward runs without adapter_ids: row i uses slot ids[i] of ``pool`` (None: base only,
    every row); ``ready`` a CUDA event the slots' writes recorded; ``live`` when the layer's own
    parameters (read live, by the restacking path) take over in training or when gradients flow."""

    pool: Optional[AdapterPool]
    ids: Optional[Tensor]
    ready: Optional[object]
    live: bool


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
        self._slots: dict[str, int] = {}  # adapter name -> slot index (what adapter_ids name)
        self._batch_ids: Optional[Tensor] = None  # set by adapter_batch: slot ids for the live path
        self._batch_pool: Optional[_PoolBinding] = None  # set by adapter_batch and serving()
        self._snapshot: Optional[AdapterPool] = None  # adapter_batch's pool, reused between blocks
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
        check.adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter it first")
        return name

    def _factory(self) -> dict:
        return dict(device=self.weight.device, dtype=self.weight.dtype)

    def _add(self, name: str, adapter: nn.Module) -> nn.Module:
        self.adapters[name] = adapter
        self._slots[name] = min(set(range(len(self._slots) + 1)) - set(self._slots.values()))
        if self._active is None:
            self._active = name
        return adapter

    def add_lora(self, name: str, r: int, *, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, lora_alpha: Optional[float] = None,
                 lora_dropout: Optional[float] = None) -> LoraAdapter:
        """Add LoRA adapter ``name`` (A Kaiming-uniform, B zeros) in the lowest free slot.

        Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA; alpha
        None: r) when active. As PEFT, adding does not change which adapter is active; ``name``
        becomes active only on a layer with none active. Arguments as :func:`lora_arguments`,
        all checked before anything changes.
        """
        self._new_name(name)
        return self._add(name, LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, **self._factory()))

    def add_bottleneck(self, name: str, rank: int, *, activation: str = "relu", placement: str = "sequential",
                       scale: float = 1.0) -> BottleneckAdapter:
        """Add bottleneck adapter ``name`` (up-projection zeros) in the lowest free slot.

        Semantics: adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b (sequential; parallel reads x)
        when active. As PEFT, adding does not change which adapter is active; ``name`` becomes
        active only on a layer with none active. Arguments as :func:`bottleneck_arguments`, all
        checked before anything changes.
        """
        self._new_name(name)
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
        if name is None or name == self._merged:
            return F.linear(x, self.weight, self.bias)
        adapter = self.adapters[name]
        if adapter.kind == "lora":
            return lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, scale=adapter.scale,
                               dropout=adapter.dropout if self.training else 0.0)
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

    def _slot_tensors(self, adapter, r_max: int):
        """(A [r_max, K], a [r_max], B [N, r_max], c [N], scale, act code, rank): one slot, padded
        to r_max, differentiable; a sequential bottleneck is folded in every call (nothing kept)."""
        if adapter.kind == "lora":
            a_w, a_b, b_w, b_b, act = adapter.lora_A, None, adapter.lora_B, None, "identity"
        else:
            b_w, b_b, act = adapter.up_weight, adapter.up_bias, adapter.activation
            if adapter.placement == "parallel":
                a_w, a_b = adapter.down_weight, adapter.down_bias
            else:
                a_w, a_b = common.fold_sequential(self.weight, self.bias, adapter.down_weight, adapter.down_bias)
        pad = r_max - adapter.rank
        a_b = a_w.new_zeros(adapter.rank) if a_b is None else a_b
        b_b = a_w.new_zeros(self.out_features) if b_b is None else b_b
        return (F.pad(a_w, (0, 0, 0, pad)), F.pad(a_b, (0, pad)), F.pad(b_w, (0, pad)), b_b, adapter.scale,
                ACT_CODES[act], adapter.rank)

    def _slot_stack(self, r_max: int) -> list:
        """One _slot_tensors entry per slot 0..max slot; a free slot is rank 0 (base only)."""
        by_slot = {slot: self.adapters[name] for name, slot in self._slots.items()}
        n, k, f = self.out_features, self.in_features, self._factory()
        empty = None
        stack = []
        for slot in range(max(by_slot) + 1):
            if slot in by_slot:
                stack.append(self._slot_tensors(by_slot[slot], r_max))
                continue
            if empty is None:
                empty = (torch.zeros(r_max, k, **f), torch.zeros(r_max, **f), torch.zeros(n, r_max, **f),
                         torch.zeros(n, **f), 0.0, 0, 0)
            stack.append(empty)
        return stack

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

    def _mixed_ids(self, x: Tensor, adapter_ids, num_slots: int, from_context: bool) -> Tensor:
        """adapter_ids as one slot per row of x: ids set by a block (``from_context``: valid by
        construction) are expanded for generate's repeat_interleave (beams, num_return_sequences);
        for x [B, T, ...], one id per sequence is repeated over its tokens."""
        lead = x.shape[:-1]
        rows = lead.numel()
        ids = adapter_ids
        per_sequence = x.dim() >= 3 and x.shape[0] != rows
        if from_context and x.dim() >= 2 and 0 < ids.numel() < x.shape[0] and x.shape[0] % ids.numel() == 0:
            ids = ids.repeat_interleave(x.shape[0] // ids.numel())
        elif per_sequence and isinstance(ids, (list, tuple)) and len(ids) == x.shape[0] and \
                not isinstance(ids[0], (list, tuple)):
            ids = check.adapter_ids(ids, len(ids), num_slots, validate=False, device=x.device)
        if per_sequence and isinstance(ids, Tensor) and ids.dim() == 1 and ids.numel() == x.shape[0]:
            ids = ids.repeat_interleave(rows // x.shape[0])
        return check.adapter_ids(ids, rows, num_slots, validate=not from_context, lead=lead, device=x.device)

    def _mixed_forward(self, x: Tensor, adapter_ids) -> Tensor:
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged into the weight; unmerge() before mixed batches")
        if self.training and any(getattr(a, "dropout", 0.0) > 0 for a in self.adapters.values()):
            raise NotImplementedError("LoRA dropout is not implemented for mixed-adapter batches; set dropout=0 or "
                                      "call eval()")
        if not self.adapters:
            raise ValueError("adapter_ids given, but this layer has no adapters")
        check.linear_input(x, self.weight)
        x = autocast_input(x)
        ids = self._mixed_ids(x, adapter_ids, max(self._slots.values()) + 1, adapter_ids is self._batch_ids)
        r_max = max(a.rank for a in self.adapters.values())
        slots = self._slot_stack(r_max)
        lora_only = all(a.kind == "lora" for a in self.adapters.values())
        down_w, down_b, up_w, up_b = (None if lora_only and i in (1, 3) else torch.stack([s[i] for s in slots])
                                      .to(x.dtype) for i in range(4))
        scales, acts, ranks = self._slot_metadata(slots, x.device, torch.promote_types(x.dtype, torch.float32))
        stack = SlotStack(down_w, down_b, up_w, up_b, scales, ranks, None if lora_only else acts)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = run_mixed(x.reshape(-1, self.in_features), self.weight.to(x.dtype), bias, stack, ids)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _needs_live(self, bound: _PoolBinding) -> bool:
        """adapter_batch's snapshot yields to the live path in training mode (dropout) and when
        gradients flow to the layer or to its adapters."""
        return self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def _pooled_forward(self, x: Tensor, bound: _PoolBinding) -> Tensor:
        """Semantics: y_i = x_i·Wᵀ + b + the term of slot ids[i] of the bound pool (-1: none); no
        per-call work on the pool, whatever the number of adapters loaded."""
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged into the weight; unmerge() before mixed batches")
        if bound.ready is not None:
            torch.cuda.current_stream(x.device).wait_event(bound.ready)
        if bound.pool is None:
            return F.linear(x, self.weight, self.bias)
        check.linear_input(x, self.weight)
        x = autocast_input(x)
        ids = self._mixed_ids(x, bound.ids, bound.pool.num_slots, True)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = run_mixed(x.reshape(-1, self.in_features), self.weight.to(x.dtype), bias,
                      bound.pool.slot_stack(x.dtype, full=False), ids)
        return y.reshape(*x.shape[:-1], self.out_features)

    @contextlib.contextmanager
    def serving(self, pool: AdapterPool, ids: Tensor, ready=None):
        """Within the block, forward(x) without adapter_ids runs row i with slot ``ids[i]`` of
        ``pool`` (-1: base only) instead of this layer's own adapters: how
        :class:`adaptkern.manager.AdapterManager` serves its adapters.

        Semantics: y_i = x_i·Wᵀ + b + scale_s·(f_s(x_i·A_sᵀ + a_s)·B_sᵀ + c_s), s = ids[i], as
        :func:`adaptkern.mixed_adapter_linear`. Shapes: ``pool`` for [out_features, in_features]
        on the weight's device; ids [B] (one per sequence, expanded as :func:`adapter_batch` does)
        or [rows] int32/int64 in [-1, pool.num_slots), trusted (not read on the host). ``ready``:
        a CUDA event the compute stream waits for before reading the pool (None: no wait).
        """
        if not isinstance(pool, AdapterPool):
            raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
        if (pool.out_features, pool.in_features) != (self.out_features, self.in_features) or \
                pool.device != self.weight.device:
            raise ValueError(f"pool for [{pool.out_features}, {pool.in_features}] on {pool.device} does not fit this "
                             f"layer's weight {tuple(self.weight.shape)} on {self.weight.device}")
        previous = self._batch_pool, self._batch_ids
        self._batch_pool, self._batch_ids = _PoolBinding(pool, ids, ready, False), None
        try:
            yield self
        finally:
            self._batch_pool, self._batch_ids = previous

    @torch.no_grad()
    def _snapshot_binding(self, names: Sequence[Optional[str]]) -> _PoolBinding:
        """adapter_batch's pool: the adapters ``names`` names (and this layer holds), written into
        slots 0..n-1 of a pool kept between blocks; the others are never copied."""
        held = list(dict.fromkeys(n for n in names if n in self.adapters))
        if not held:
            return _PoolBinding(None, None, None, True)
        adapters = [self.adapters[n] for n in held]
        dtype = self.weight.dtype  # as the live path: adapters in their own (promoted) dtype, then x's
        for t in (t for a in adapters for t in a.parameters()):
            dtype = torch.promote_types(dtype, t.dtype)
        pool, rank = self._snapshot, max(a.rank for a in adapters)
        if pool is None or pool.num_slots < len(held) or pool.max_rank < rank or pool.dtype != dtype or \
                pool.device != self.weight.device:
            pool = self._snapshot = AdapterPool(
                self.in_features, self.out_features, max(len(held), 0 if pool is None else pool.num_slots),
                max(rank, 0 if pool is None else pool.max_rank), dtype=dtype, device=self.weight.device)
        for slot, a in enumerate(adapters):
            if a.kind == "lora":
                pool.load_lora(slot, a.lora_A, a.lora_B, a.scale, validate_values=False)
            else:
                pool.load_bottleneck(slot, a.down_weight, a.down_bias, a.up_weight, a.up_bias,
                                     activation=a.activation, placement=a.placement, scale=a.scale,
                                     base_weight=self.weight, base_bias=self.bias, validate_values=False)
        for slot in range(len(held), pool.num_slots):
            if pool.kinds[slot] is not None:
                pool.evict(slot)
        slot_of = {n: i for i, n in enumerate(held)}
        ids = torch.tensor([slot_of.get(n, -1) for n in names], dtype=torch.int32, device=self.weight.device)
        return _PoolBinding(pool, ids, None, True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.adapters)}, active={self._active!r}"


@contextlib.contextmanager
def adapter_batch(module: nn.Module, names: Sequence[Optional[str]]):
    """Within the block, row b of every batch (sequence b of a [B, T, K] input) uses adapter
    ``names[b]`` (None: base only) in every AdapterLinear of ``module``.

    Semantics: each layer maps names to its slots (:attr:`AdapterLinear.adapter_slots`); a
    layer that does not hold a named adapter runs its base for those rows, as PEFT does for
    modules an adapter does not target. Works for ``model(...)`` and ``model.generate``,
    beams and ``num_return_sequences`` included (generate's expanded batch is mapped back).

    Cost: entering the block copies the adapters ``names`` names into a per-layer pool (once;
    the other adapters a layer holds are never touched), so every forward inside the block
    reads that pool with no per-call work on it: a step costs the same whether a layer holds
    2 or 200 adapters. The block reads the adapters' weights as they are when it is entered.
    In training mode, or when gradients flow to the layers or their adapters, forwards read
    the parameters live instead (differentiable; each call restacks them).
    """
    layers = [m for m in module.modules() if isinstance(m, AdapterLinear)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no AdapterLinear layers")
    layers = [m for m in layers if m.adapters]  # a layer without adapters runs its base as it is
    if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of adapter names or None, got {names!r}")
    known = set().union(*(m.adapters.keys() for m in layers))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model has {sorted(known)}")
    previous = [(m._batch_ids, m._batch_pool) for m in layers]
    for m in layers:
        m._batch_ids = torch.tensor([m._slots.get(n, -1) if n is not None else -1 for n in names],
                                    dtype=torch.int32, device=m.weight.device)
        m._batch_pool = m._snapshot_binding(names)
    try:
        yield module
    finally:
        for m, (ids, bound) in zip(layers, previous):
            m._batch_ids, m._batch_pool = ids, bound
