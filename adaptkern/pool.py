"""``AdapterPool``: stacked adapter slots for one layer shape, driven by serving stacks."""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation as check
from .ops import common
from .ops.common import ACT_CODES
from .ops.dora_linear import weight_norm
from .ops.mixed_adapter_linear import SlotStack


class AdapterPool:
    """Fixed-size storage of ``num_slots`` adapters for [out_features, in_features] layers.

    Semantics: slot s adds scale_s·(f_s(x·A_sᵀ + a_s)·B_sᵀ + c_s) to the rows whose adapter id
    is s (see :func:`adaptkern.mixed_adapter_linear`); an empty slot (rank 0) adds nothing.
    Each slot holds (A [R_max, K], a [R_max], B [N, R_max], c [N], scale, rank, activation):
    a LoRA adapter (a = c = 0, identity), a parallel bottleneck (A = D), or a sequential
    bottleneck with its down-projection folded through the base (A = D·W, a = D·b + d).
    A DoRA slot is LoRA plus a per-output scale g_s = m_s / ‖W + scale_s·B_s·A_s‖_row, computed
    when it is loaded (:meth:`load_dora`): its rows get g_s ⊙ (x·Wᵀ + scale_s·(x·A_sᵀ)·B_sᵀ) + b.
    Slots of different kinds and ranks mix freely in one batch; a slot's real rank bounds
    the kernels' rank loop. Tensors keep fixed addresses across load/evict, so a captured
    CUDA graph sees new adapters without re-capture.

    Shapes: down_weight [S, R_max, K], up_weight [S, N, R_max], down_bias [S, R_max],
    up_bias [S, N] (LoRA slots store lora_A as down_weight, lora_B as up_weight) in
    ``dtype`` (a floating dtype), scales [S] in the kernels' accumulate dtype (float64 for a
    float64 pool, else float32), ranks [S] int32, acts [S] int32, col_scales [S, N] in the
    scales' dtype (g_s of DoRA slots, ones for every other slot).

    Every mutating call checks all its arguments, including that what would be stored is
    finite in the pool's dtypes, before it changes anything: a failed call leaves the pool
    as it was.
    """

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int, *, dtype=None,
                 device=None):
        for name, v in (("in_features", in_features), ("out_features", out_features), ("num_slots", num_slots),
                        ("max_rank", max_rank)):
            check.positive_int(name, v)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.max_rank = num_slots, max_rank
        f = dict(dtype=dtype, device=device)
        self.down_weight = torch.zeros(num_slots, max_rank, in_features, **f)
        self.down_bias = torch.zeros(num_slots, max_rank, **f)
        self.up_weight = torch.zeros(num_slots, out_features, max_rank, **f)
        self.up_bias = torch.zeros(num_slots, out_features, **f)
        scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.scales = torch.zeros(num_slots, dtype=scale_dtype, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.acts = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.col_scales = torch.ones(num_slots, out_features, dtype=scale_dtype, device=device)
        self.kinds: list = [None] * num_slots  # host-side: None, "lora", "bottleneck_parallel", ...

    @property
    def dtype(self) -> torch.dtype:
        """The adapter tensors' dtype."""
        return self.down_weight.dtype

    @property
    def device(self) -> torch.device:
        """The device every pool tensor lives on."""
        return self.down_weight.device

    def _slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    def _check(self, name: str, t, shape: tuple, values: bool = True) -> Tensor:
        """``t`` (detached) after checking its type and shape, and with ``values`` its finiteness
        (a host read), then moved to the pool's device; without ``values`` it stays where it is
        (the slot write copies it across)."""
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if not values:
            return t.detach()
        return check.finite_tensor(name, t).detach().to(device=self.device)

    def _cast(self, name: str, t, values: bool = True):
        """``t`` (or None) in the pool's dtype, refused if the cast (or a fold before it) overflowed;
        unchanged without ``values`` (the slot write casts)."""
        if t is None or not values:
            return t
        t = t.to(self.dtype)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf in the pool's dtype {self.dtype} (values beyond its range "
                             f"overflow to Inf)")
        return t

    def _rank(self, name: str, t) -> int:
        """The rank of a 2-D adapter matrix ``t`` [r, ...]: in [1, max_rank]."""
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [r, features], got shape {tuple(t.shape)}")
        r = t.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"{name} rank {r} is outside [1, max_rank={self.max_rank}]")
        return r

    def _scale(self, scale) -> float:
        """``scale``: a real number finite in the scales' dtype."""
        return check.real("scale", scale, self.scales.dtype)

    @torch.no_grad()
    def _store(self, slot, kind, a_w, a_b, b_w, b_b, scale, act, non_blocking=False, col_scale=None):
        """Write a checked adapter into ``slot`` (copy_ casts and moves it): cannot fail."""
        r = a_w.shape[0]
        self._clear(slot)
        if col_scale is not None:
            self.col_scales[slot].copy_(col_scale, non_blocking=non_blocking)
        self.down_weight[slot, :r].copy_(a_w, non_blocking=non_blocking)
        self.up_weight[slot, :, :r].copy_(b_w, non_blocking=non_blocking)
        if a_b is not None:
            self.down_bias[slot, :r].copy_(a_b, non_blocking=non_blocking)
        if b_b is not None:
            self.up_bias[slot].copy_(b_b, non_blocking=non_blocking)
        self.scales[slot] = scale
        self.ranks[slot] = r
        self.acts[slot] = ACT_CODES[act]
        self.kinds[slot] = kind

    def load_lora(self, slot: int, lora_a: Tensor, lora_b: Tensor, scale: float, *, validate_values: bool = True,
                  non_blocking: bool = False) -> None:
        """Put LoRA (lora_a [r, K], lora_b [N, r], scale) in ``slot``, replacing what was there.

        ``validate_values=False`` skips the finiteness checks (host reads of every value) for
        weights the caller already checked; the slot write then casts them. ``non_blocking``
        copies from pinned host memory asynchronously on the current stream (CUDA).
        """
        slot = self._slot(slot)
        r = self._rank("lora_a", lora_a)
        a = self._cast("lora_a", self._check("lora_a", lora_a, (r, self.in_features), validate_values),
                       validate_values)
        b = self._cast("lora_b", self._check("lora_b", lora_b, (self.out_features, r), validate_values),
                       validate_values)
        self._store(slot, "lora", a, None, b, None, self._scale(scale), "identity", non_blocking)

    def load_dora(self, slot: int, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scale: float, *,
                  base_weight: Tensor) -> None:
        """Put DoRA (lora_a [r, K], lora_b [N, r], magnitude m [N], scale) in ``slot``, replacing what
        was there.

        Semantics: rows of the slot get g ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b with g = m / ‖W + scale·B·A‖_row
        (PEFT's DoRA in eval mode, ``lora_magnitude_vector`` = m; the bias is not scaled). g is
        computed here, from ``base_weight`` W [N, K] (the layer's weight) and A, B, m cast to the
        pool's dtype, and stored in ``col_scales``: reload the slot whenever W (or the adapter) changes.

        Errors: ValueError/TypeError naming the argument (shapes, non-finite values, a g that is not
        finite in the scales' dtype, e.g. a row whose norm is 0), before the slot changes.
        """
        slot = self._slot(slot)
        r = self._rank("lora_a", lora_a)
        a = self._cast("lora_a", self._check("lora_a", lora_a, (r, self.in_features)))
        b = self._cast("lora_b", self._check("lora_b", lora_b, (self.out_features, r)))
        m = self._cast("magnitude", self._check("magnitude", magnitude, (self.out_features,)))
        w = self._cast("base_weight", self._check("base_weight", base_weight, (self.out_features, self.in_features)))
        scale = self._scale(scale)
        g = weight_norm(w, a, b, scale, m)[1].to(self.scales.dtype)
        if not check.finite_in(g, self.scales.dtype):
            raise ValueError(f"the DoRA scale magnitude / ‖base_weight + scale·lora_b·lora_a‖_row is not finite in "
                             f"{self.scales.dtype} (a row of norm 0, or an overflow): rows "
                             f"{(~torch.isfinite(g)).nonzero().squeeze(1).tolist()[:8]}")
        self._store(slot, "dora", a, None, b, None, scale, "identity", col_scale=g)

    def load_bottleneck(self, slot: int, down_weight: Tensor, down_bias, up_weight: Tensor, up_bias, *,
                        activation: str, placement: str, scale: float, base_weight=None, base_bias=None,
                        validate_values: bool = True) -> None:
        """Put a bottleneck adapter in ``slot``.

        Semantics: parallel adds scale·(f(x·Dᵀ + d)·Uᵀ + u); sequential adds
        scale·(f(h·Dᵀ + d)·Uᵀ + u) with h = x·Wᵀ + b, stored folded (A = D·W, a = D·b + d),
        so it needs the layer's ``base_weight`` [N, K] (and ``base_bias`` [N]); reload the
        slot if the base changes. Shapes: down_weight [R, N] (sequential) or [R, K]
        (parallel), down_bias [R] | None, up_weight [N, R], up_bias [N] | None.
        ``validate_values`` as in :meth:`load_lora`.
        """
        v = validate_values
        slot = self._slot(slot)
        placement = check.placement(placement)
        act = check.activation(activation)
        reads = self.out_features if placement == "sequential" else self.in_features
        r = self._rank("down_weight", down_weight)
        d = self._check("down_weight", down_weight, (r, reads), v)
        db = None if down_bias is None else self._check("down_bias", down_bias, (r,), v)
        u = self._check("up_weight", up_weight, (self.out_features, r), v)
        ub = None if up_bias is None else self._check("up_bias", up_bias, (self.out_features,), v)
        names = ("down_weight", "down_bias")
        if placement == "sequential":
            if base_weight is None:
                raise ValueError("a sequential bottleneck needs base_weight (the layer's [N, K] weight) to fold D·W")
            w = self._check("base_weight", base_weight, (self.out_features, self.in_features), v)
            b = None if base_bias is None else self._check("base_bias", base_bias, (self.out_features,), v)
            d, db = common.fold_sequential(w.to(d.dtype), None if b is None else b.to(d.dtype), d, db)
            names = ("the folded down_weight·base_weight", "the folded down_weight·base_bias + down_bias")
        d, db = self._cast(names[0], d, v), self._cast(names[1], db, v)
        u, ub = self._cast("up_weight", u, v), self._cast("up_bias", ub, v)
        self._store(slot, f"bottleneck_{placement}", d, db, u, ub, self._scale(scale), act)

    @torch.no_grad()
    def evict(self, slot: int) -> None:
        """Empty ``slot``: rank 0, so rows that still name it get the base result."""
        self._clear(self._slot(slot))

    def _clear(self, slot: int) -> None:
        for t in (self.down_weight, self.down_bias, self.up_weight, self.up_bias):
            t[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0
        self.acts[slot] = 0
        self.col_scales[slot] = 1.0
        self.kinds[slot] = None

    def slot_stack(self, dtype: torch.dtype, *, full: bool = True) -> SlotStack:
        """The pool as the mixed op reads it, adapter tensors in ``dtype`` (x's dtype).

        ``full`` (the default): always the full set, whatever kinds are loaded now: a CUDA graph
        captured while the pool held only LoRA slots must stay right after a bottleneck or a DoRA
        adapter is loaded. ``full=False``: while every loaded slot is LoRA or DoRA, the biases and
        activations are left out (None), and while none is DoRA the column scales too, so the
        kernels skip reading them; the result is the same.
        """
        acc = torch.promote_types(dtype, torch.float32)
        lora = not full and all(kind in (None, "lora", "dora") for kind in self.kinds)
        dora = full or "dora" in self.kinds
        return SlotStack(self.down_weight.to(dtype), None if lora else self.down_bias.to(dtype),
                         self.up_weight.to(dtype), None if lora else self.up_bias.to(dtype), self.scales.to(acc),
                         self.ranks, None if lora else self.acts, self.col_scales.to(acc) if dora else None)

    def __repr__(self) -> str:
        used = sum(k is not None for k in self.kinds)
        return (f"AdapterPool(in={self.in_features}, out={self.out_features}, slots={used}/{self.num_slots} used, "
                f"max_rank={self.max_rank}, dtype={self.dtype})")
