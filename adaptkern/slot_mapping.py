"""``SlotMapping``: the per-batch metadata of mixed-adapter ops, preallocated and refilled in place."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import validation as check
from .ops.mixed_adapter_linear import rows


def _rows(adapter_ids) -> int:
    """M of adapter_ids [M] (a tensor, or a list or tuple of ints), checked before anything reads it."""
    if isinstance(adapter_ids, (list, tuple)):
        return len(adapter_ids)
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor or a list of ints, got {type(adapter_ids).__name__}")
    if adapter_ids.dim() != 1:
        raise ValueError(f"adapter_ids must be 1-D [M], got shape {tuple(adapter_ids.shape)}")
    return adapter_ids.shape[0]


class SlotMapping:
    """Which adapter slot each row of a batch uses, with what the mixed kernels read besides.

    Semantics, for the ids of the last :meth:`update_` (M rows, S slots; any id outside
    [0, S) reads as -1, base only)::

        slots[m]      = ids[m] if 0 <= ids[m] < S else -1          (rows past M: -1)
        sorted_rows   = rows ordered by slot, base-only rows last (stable)
        counts[s]     = rows of slot s;  offsets[s] = counts[0] + … + counts[s-1]  (offsets[S]: rows with a slot)
        active_slots  = slots with counts > 0, ascending, then -1;  num_active[0] = their number

    Built on the ids' device by a stable counting sort, with no host sync: one native launch
    (csrc/, built on first use; ``rows.native_available``), else several PyTorch launches with the
    same bits (``ADAPTKERN_NO_NATIVE=1``, no compiler, CUDA with S > 2047). Every buffer keeps its
    address across :meth:`update_`, so a CUDA graph captured around a mixed op that takes this
    mapping replays with any new mapping and any number of active adapters (one graph per
    batch size, not per active-adapter count). Every mixed op accepts a ``SlotMapping``
    wherever it accepts ``adapter_ids``; its M must equal the op's rows.

    Shapes: slots [max_tokens], sorted_rows [max_tokens], counts [S], offsets [S + 1],
    active_slots [S], num_active [1], all int32 on ``device``.
    """

    def __init__(self, meta: rows.SlotMetadata, num_tokens: int):
        self._meta = meta
        self.num_tokens = num_tokens

    @classmethod
    def empty(cls, max_tokens: int, num_slots: int, *, device=None) -> "SlotMapping":
        """A mapping of 0 rows with buffers for up to ``max_tokens`` rows and ``num_slots`` slots."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        check.positive_int("num_slots", num_slots)
        return cls(rows.slot_metadata_buffers(max_tokens, num_slots, device), 0)

    @classmethod
    def from_ids(cls, adapter_ids, num_slots: int, *, validate: bool = True) -> "SlotMapping":
        """A mapping sized for exactly these ids (``empty(M, num_slots).update_(adapter_ids)``)."""
        m = _rows(adapter_ids)
        device = adapter_ids.device if isinstance(adapter_ids, Tensor) else None
        return cls.empty(m, num_slots, device=device).update_(adapter_ids, validate=validate)

    @torch.no_grad()
    def update_(self, adapter_ids, *, validate: bool = True) -> "SlotMapping":
        """Refill in place from adapter_ids [M] (int32/int64 tensor on the mapping's device, or a
        list of ints), M <= max_tokens. The range check (ids in [-1, S)) reads the ids on the host;
        ``validate=False``, torch.compile and CUDA graph capture skip it (out-of-range ids are -1).
        The metadata comes from ``rows.update_slot_metadata_`` (a custom op: no graph break).
        Errors (all before any buffer changes): TypeError for ids neither a tensor nor a list of
        ints or of a non-integer dtype, ValueError for a shape other than [M], M > max_tokens,
        another device or an id out of range."""
        m = _rows(adapter_ids)
        if m > self.max_tokens:
            raise ValueError(f"adapter_ids has M={m} rows, more than the mapping's max_tokens={self.max_tokens}")
        ids = check.adapter_ids(adapter_ids, m, self.num_slots, validate=validate, device=self.device)
        rows.update_slot_metadata_(ids, self._meta)
        self.num_tokens = m
        return self

    @property
    def max_tokens(self) -> int:
        return self._meta.slots.shape[0]

    @property
    def num_slots(self) -> int:
        return self._meta.counts.shape[0]

    @property
    def device(self) -> torch.device:
        return self._meta.slots.device

    @property
    def slots(self) -> Tensor:
        """[max_tokens] int32: each row's slot, -1 for base-only rows and rows past M."""
        return self._meta.slots

    @property
    def sorted_rows(self) -> Tensor:
        """[max_tokens] int32: the M rows ordered by slot (base-only last), then -1."""
        return self._meta.sorted_rows

    @property
    def counts(self) -> Tensor:
        """[S] int32: rows per slot."""
        return self._meta.counts

    @property
    def offsets(self) -> Tensor:
        """[S + 1] int32: slot s owns positions [offsets[s], offsets[s+1]) of sorted_rows."""
        return self._meta.offsets

    @property
    def active_slots(self) -> Tensor:
        """[S] int32: the slots some row uses, ascending, then -1."""
        return self._meta.active_slots

    @property
    def num_active(self) -> Tensor:
        """[1] int32: how many slots some row uses."""
        return self._meta.num_active

    def for_op(self, m: int, num_slots: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [M], sorted_rows [M], offsets [S + 1]) views for an op over ``m`` rows and ``num_slots``
        slots, after checking that they match this mapping (host-side shapes only, no sync)."""
        if num_slots != self.num_slots:
            raise ValueError(f"the SlotMapping is for {self.num_slots} slots but the adapter stacks have "
                             f"S={num_slots}")
        if m != self.num_tokens:
            raise ValueError(f"the SlotMapping holds M={self.num_tokens} rows (its last update_) but the input "
                             f"has M={m} rows")
        if torch.device(device) != self.device:
            raise ValueError(f"the SlotMapping is on {self.device} but the input is on {device}")
        return self.slots[:m], self.sorted_rows[:m], self.offsets

    def __repr__(self) -> str:
        return (f"SlotMapping(num_tokens={self.num_tokens}, max_tokens={self.max_tokens}, "
                f"num_slots={self.num_slots}, device={self.device})")


def resolve_ids(adapter_ids, m: int, num_slots: int, *, validate: bool = True, lead: tuple = (),
                device=None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(ids [M], sorted_rows [M] | None, offsets [S + 1] | None) for a mixed op's ``adapter_ids``:
    a :class:`SlotMapping` gives its metadata views, ids (a tensor or a list) are checked by
    :func:`adaptkern.validation.adapter_ids` (the op then builds the metadata itself)."""
    if isinstance(adapter_ids, SlotMapping):
        return adapter_ids.for_op(m, num_slots, device if device is not None else adapter_ids.device)
    ids = check.adapter_ids(adapter_ids, m, num_slots, validate=validate, lead=lead, device=device)
    return ids, None, None
