"""Mixed-adapter batches on ``AdapterLinear``: rows that use different adapters in one forward
(``adapter_ids``), a bound :class:`~adaptkern.pool.AdapterPool` (``serving``) and
:func:`adapter_batch`, which names one adapter per sequence for a whole model."""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validation as check
from .functional import autocast_input
from .mixed import run_mixed
from .ops import common
from .ops.common import ACT_CODES, acc_dtype
from .ops.dora_linear import weight_norm
from .ops.mixed_adapter_linear import SlotStack
from .pool import AdapterPool

__all__ = ["MixedBatchLayer", "adapter_batch"]


class _PoolBinding(NamedTuple):
    """What forward runs without adapter_ids: row i uses slot ids[i] of ``pool`` (None: base only,
    every row); ``ready`` a CUDA event the slots' writes recorded; ``live`` when the layer's own
    parameters (read live, by the restacking path) take over in training or when gradients flow."""

    pool: Optional[AdapterPool]
    ids: Optional[Tensor]
    ready: Optional[object]
    live: bool


class MixedBatchLayer(nn.Module):
    """What ``AdapterLinear`` adds for mixed batches (it is the one subclass): forward with
    ``adapter_ids``, ``serving`` and the pools of :func:`adapter_batch`. It reads the layer's
    ``adapters``, ``_slots``, ``_merged``, ``weight`` and ``bias``."""

    def _init_batch_state(self) -> None:
        self._batch_ids: Optional[Tensor] = None  # set by adapter_batch: slot ids for the live path
        self._batch_pool: Optional[_PoolBinding] = None  # set by adapter_batch and serving()
        self._snapshot: Optional[AdapterPool] = None  # adapter_batch's pool, reused between blocks
        self._slot_meta = None  # cache of _slot_metadata

    def _refuse_mixed(self) -> None:
        """NotImplementedError for what mixed batches cannot run: a 4-bit base."""
        if self._four_bit:
            raise NotImplementedError("mixed-adapter batches on a 4-bit (bitsandbytes Linear4bit) base are not "
                                      "implemented; run one adapter at a time (set_adapter)")

    def _refuse_dora_training(self) -> None:
        """NotImplementedError when the live path would have to train a DoRA adapter: a DoRA slot's
        scale g = m / ‖W + s·B·A‖_row enters the mixed kernels as a constant, so its magnitude m would
        get no gradient (mixed batches with DoRA are for inference: no_grad, or frozen parameters)."""
        dora = sorted(n for n, a in self.adapters.items() if a.kind == "dora")
        if dora and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise NotImplementedError(f"training mixed-adapter batches with DoRA adapters ({dora}) is not "
                                      f"implemented (their magnitude would get no gradient); run them under "
                                      f"torch.no_grad(), or train a DoRA adapter alone (set_adapter)")

    def _slot_tensors(self, adapter, r_max: int):
        """(A [r_max, K], a [r_max], B [N, r_max], c [N], scale, act code, rank): one slot, padded
        to r_max, differentiable; a sequential bottleneck is folded in every call (nothing kept)."""
        if adapter.kind in ("lora", "dora"):  # DoRA's g: _col_scales
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

    def _col_scales(self, dtype: torch.dtype) -> Optional[Tensor]:
        """G [S, N] (in the accumulate dtype of ``dtype``): g = m / ‖W + s·B·A‖_row of each DoRA slot
        from W, A, B and m in ``dtype``, as the single-adapter DoRA forward computes it; ones for
        the other slots. None while the layer holds no DoRA adapter. Computed anew every call."""
        dora = {slot: self.adapters[name] for name, slot in self._slots.items()
                if self.adapters[name].kind == "dora"}
        if not dora:
            return None
        g = torch.ones(max(self._slots.values()) + 1, self.out_features, dtype=acc_dtype(dtype),
                       device=self.weight.device)
        with torch.no_grad():
            for slot, a in dora.items():
                g[slot] = weight_norm(self.weight.to(dtype), a.lora_A.to(dtype), a.lora_B.to(dtype), a.scale,
                                      a.lora_magnitude_vector.to(dtype))[1]
        return g

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
        self._refuse_mixed()
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged into the weight; unmerge() before mixed batches")
        if self.training and any(getattr(a, "dropout", 0.0) > 0 for a in self.adapters.values()):
            raise NotImplementedError("LoRA dropout is not implemented for mixed-adapter batches; set dropout=0 or "
                                      "call eval()")
        if not self.adapters:
            raise ValueError("adapter_ids given, but this layer has no adapters")
        self._refuse_dora_training()
        check.linear_input(x, self.weight)
        x = autocast_input(x)
        ids = self._mixed_ids(x, adapter_ids, max(self._slots.values()) + 1, adapter_ids is self._batch_ids)
        r_max = max(a.rank for a in self.adapters.values())
        slots = self._slot_stack(r_max)
        lora_only = all(a.kind in ("lora", "dora") for a in self.adapters.values())
        down_w, down_b, up_w, up_b = (None if lora_only and i in (1, 3) else torch.stack([s[i] for s in slots])
                                      .to(x.dtype) for i in range(4))
        scales, acts, ranks = self._slot_metadata(slots, x.device, torch.promote_types(x.dtype, torch.float32))
        stack = SlotStack(down_w, down_b, up_w, up_b, scales, ranks, None if lora_only else acts,
                          self._col_scales(x.dtype))
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
        self._refuse_mixed()
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
            elif a.kind == "dora":  # g from the weights in the pool's dtype, computed here once per block
                pool.load_dora(slot, a.lora_A, a.lora_B, a.lora_magnitude_vector, a.scale, base_weight=self.weight)
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



@contextlib.contextmanager
def adapter_batch(module: nn.Module, names: Sequence[Optional[str]]):
    """Within the block, row b of every batch (sequence b of a [B, T, K] input) uses adapter
    ``names[b]`` (None: base only) in every AdapterLinear of ``module``.

    Semantics: each layer maps names to its slots (:attr:`AdapterLinear.adapter_slots`); a
    layer that does not hold a named adapter runs its base for those rows, as PEFT does for
    modules an adapter does not target. Works for ``model(...)`` and ``model.generate``,
    beams and ``num_return_sequences`` included (generate's expanded batch is mapped back).
    A DoRA adapter's rows get g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, g = m / ‖W + s·B·A‖_row (PEFT's DoRA
    in eval mode), next to LoRA and bottleneck rows; for inference only (see below).

    Cost: entering the block copies the adapters ``names`` names into a per-layer pool (once;
    the other adapters a layer holds are never touched), so every forward inside the block
    reads that pool with no per-call work on it: a step costs the same whether a layer holds
    2 or 200 adapters. The block reads the adapters' weights as they are when it is entered.
    In training mode, or when gradients flow to the layers or their adapters, forwards read
    the parameters live instead (differentiable; each call restacks them); a layer holding a
    DoRA adapter then raises NotImplementedError while gradients flow (its magnitude would get none).
    """
    layers = [m for m in module.modules() if isinstance(m, MixedBatchLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no AdapterLinear layers")
    layers = [m for m in layers if m.adapters]  # a layer without adapters runs its base as it is
    if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of adapter names or None, got {names!r}")
    known = set().union(*(m.adapters.keys() for m in layers))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model has {sorted(known)}")
    for m in layers:
        m._refuse_mixed()
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
