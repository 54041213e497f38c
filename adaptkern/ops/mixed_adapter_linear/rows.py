"""Slot metadata of a mixed-adapter batch: what the kernels read besides the ids (docs/design-notes.md).

Semantics, for ids [M] and S slots (any id outside [0, S) is -1, base only)::

    slots[i]        = ids[i] if 0 <= ids[i] < S else -1
    counts[s]       = #{i : slots[i] = s}
    offsets[s]      = counts[0] + ... + counts[s-1]             (offsets[S] = rows with a slot)
    sorted_rows     = rows ordered by slot, base-only rows last; stable (ascending within a slot)
    active_slots    = the slots with counts[s] > 0, ascending, then -1;  num_active = their number

Rows of slot s sit at sorted positions [offsets[s], offsets[s+1]). A counting sort on the
device: every shape is known on the host, nothing syncs, and with preallocated buffers
(``adaptkern.SlotMapping``) it is CUDA-graph capturable. The padded row alignment and the
native C++/CUDA sort this file held before are gone: no kernel reads padded blocks, and a
stable order makes backward's per-slot sums deterministic without a second implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SlotMetadata", "slot_metadata", "slot_metadata_buffers", "write_slot_metadata_"]


class SlotMetadata(NamedTuple):
    """The slot metadata buffers, all int32, sized for ``max_tokens`` rows and S slots.

    Shape: slots [max_tokens], sorted_rows [max_tokens], counts [S], offsets [S + 1],
    active_slots [S], num_active [1]. Entries past the batch's M rows are -1.
    """

    slots: Tensor
    sorted_rows: Tensor
    counts: Tensor
    offsets: Tensor
    active_slots: Tensor
    num_active: Tensor


def slot_metadata_buffers(max_tokens: int, num_slots: int, device=None) -> SlotMetadata:
    """Empty metadata (no rows: every slot inactive) for up to ``max_tokens`` rows."""
    i32 = dict(dtype=torch.int32, device=device)
    return SlotMetadata(torch.full((max_tokens,), -1, **i32), torch.full((max_tokens,), -1, **i32),
                        torch.zeros(num_slots, **i32), torch.zeros(num_slots + 1, **i32),
                        torch.full((num_slots,), -1, **i32), torch.zeros(1, **i32))


def write_slot_metadata_(ids: Tensor, out: SlotMetadata) -> SlotMetadata:
    """Fill ``out`` (from :func:`slot_metadata_buffers`) for ids [M], M <= max_tokens, in place.

    The caller checks shapes; ids are read on the device only (no sync, no data-dependent shape).
    """
    num_slots, m = out.counts.shape[0], ids.shape[0]
    dev = ids.device
    ids = ids.long()
    bins = torch.where((ids >= 0) & (ids < num_slots), ids, num_slots)  # [M] in [0, S]; S = base only
    bin_counts = torch.zeros(num_slots + 1, dtype=torch.long, device=dev).scatter_add_(0, bins, torch.ones_like(bins))
    out.slots[:m].copy_(torch.where(bins < num_slots, bins, -1))
    out.slots[m:].fill_(-1)
    out.sorted_rows[:m].copy_(torch.sort(bins, stable=True).indices)
    out.sorted_rows[m:].fill_(-1)
    out.counts.copy_(bin_counts[:num_slots])
    out.offsets[:1].zero_()
    out.offsets[1:].copy_(torch.cumsum(bin_counts[:num_slots], 0))
    used = bin_counts[:num_slots] > 0
    slot_ids = torch.arange(num_slots, device=dev)
    active = torch.sort(torch.where(used, slot_ids, num_slots)).values
    out.active_slots.copy_(torch.where(active < num_slots, active, -1))
    out.num_active.copy_(used.sum().reshape(1))
    return out


def slot_metadata(ids: Tensor, num_slots: int) -> SlotMetadata:
    """Freshly allocated metadata of ids [M] (see the module docstring)."""
    return write_slot_metadata_(ids, slot_metadata_buffers(ids.shape[0], num_slots, ids.device))
