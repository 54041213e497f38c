"""Slot metadata of a mixed-adapter batch: what the kernels read besides the ids (docs/design-notes.md).

Semantics, for ids [M] and S slots (any id outside [0, S) is -1, base only)::

    slots[i]        = ids[i] if 0 <= ids[i] < S else -1
    counts[s]       = #{i : slots[i] = s}
    offsets[s]      = counts[0] + ... + counts[s-1]             (offsets[S] = rows with a slot)
    sorted_rows     = rows ordered by slot, base-only rows last; stable (ascending within a slot)
    active_slots    = the slots with counts[s] > 0, ascending, then -1;  num_active = their number

Rows of slot s sit at sorted positions [offsets[s], offsets[s+1]). A counting sort on the
device: every shape is known on the host, nothing syncs, and with preallocated buffers
(``adaptkern.SlotMapping``) it is CUDA-graph capturable. Two producers give identical bits:
``write_slot_metadata_`` (PyTorch, 27 device ops including two sorts: the spec and the
fallback) and ``torch.ops.adaptkern_native.slot_mapping_update_`` (csrc/: one C++ loop on a CPU,
one CUDA launch for S <= 2047), built lazily on first use. ``update_slot_metadata_`` runs the
native one where it is built, through the custom op ``adaptkern::slot_metadata_update_``, so
``torch.compile(fullgraph=True)`` keeps it in the graph. A stable order makes backward's
per-slot sums deterministic.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SlotMetadata", "native_available", "slot_metadata", "slot_metadata_buffers", "update_slot_metadata_",
           "write_slot_metadata_"]

_CSRC = Path(__file__).resolve().parents[3] / "csrc"
_CUDA_MAX_SLOTS = 2047  # csrc/slot_mapping_cuda.cu: kMaxSlots (bins in shared memory)
_NATIVE: frozenset[str] | None = None  # device types the loaded native op serves; None = not tried yet
_NATIVE_ERROR: str | None = None  # why it serves no device (or fewer than asked)
_NATIVE_LOCK = threading.Lock()


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


# ---------------------------------------------------------------------------------------
# Native producer: csrc/, built on first use, never at import.


def _native() -> frozenset[str]:
    """Device types that ``torch.ops.adaptkern_native`` serves; builds and loads it on the first call.

    Loaded at most once per process: a second library defining the ``adaptkern_native``
    namespace would abort the process, and torch renames an extension rebuilt from changed sources.
    """
    global _NATIVE
    if _NATIVE is None:
        with _NATIVE_LOCK:  # concurrent first calls build once
            if _NATIVE is None:
                _NATIVE = _load_native()
    return _NATIVE


def _load_native() -> frozenset[str]:
    global _NATIVE_ERROR
    if os.environ.get("ADAPTKERN_NO_NATIVE", "") not in ("", "0"):
        _NATIVE_ERROR = "disabled by ADAPTKERN_NO_NATIVE"
        return frozenset()
    cpp, cu = _CSRC / "slot_mapping.cpp", _CSRC / "slot_mapping_cuda.cu"
    if not cpp.is_file():
        _NATIVE_ERROR = f"{cpp} not found (adaptkern installed without csrc/)"
        return frozenset()
    from torch.utils import cpp_extension

    attempts = [({"cpu"}, [cpp])]
    if torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME and cu.is_file():
        attempts.insert(0, ({"cpu", "cuda"}, [cpp, cu]))  # if nvcc fails, the CPU kernel alone
    errors = []
    for devices, sources in attempts:
        try:  # a failed build loads nothing, so the next attempt is safe
            cpp_extension.load(name="adaptkern_native", sources=[str(s) for s in sources], extra_cflags=["-O2"],
                               extra_cuda_cflags=["-O3"], is_python_module=False,
                               verbose=os.environ.get("ADAPTKERN_NATIVE_VERBOSE", "") not in ("", "0"))
            torch.ops.adaptkern_native.slot_mapping_update_  # noqa: B018 (raises if nothing registered)
            break
        except Exception as e:  # any build or load failure: the PyTorch producer
            errors.append(f"{'+'.join(sorted(devices))}: {type(e).__name__}: {e}")
    else:
        devices = set()
    if errors:
        _NATIVE_ERROR = "; ".join(errors)
        warnings.warn(f"adaptkern: native slot metadata op unavailable for {sorted(attempts[0][0] - devices)}, "
                      f"using the PyTorch producer there ({_NATIVE_ERROR})", RuntimeWarning, stacklevel=3)
    return frozenset(devices)


def native_available(device="cpu") -> bool:
    """Whether the compiled producer serves ``device``'s type (builds it on the first call).

    Semantics: ``True`` iff ``torch.ops.adaptkern_native.slot_mapping_update_`` is loaded with a
    kernel for ``torch.device(device).type``; ``False`` under ``ADAPTKERN_NO_NATIVE=1``, after a
    failed build (one RuntimeWarning per process) or without ``csrc/``.
    """
    return torch.device(device).type in _native()


@torch.library.custom_op("adaptkern::slot_metadata_update_",
                         mutates_args=("slots", "sorted_rows", "counts", "offsets", "active_slots", "num_active"))
def _slot_metadata_update(ids: Tensor, slots: Tensor, sorted_rows: Tensor, counts: Tensor, offsets: Tensor,
                          active_slots: Tensor, num_active: Tensor) -> None:
    """``adaptkern::slot_metadata_update_``: the native producer where built (CUDA: S <= 2047), else PyTorch."""
    out = SlotMetadata(slots, sorted_rows, counts, offsets, active_slots, num_active)
    dev = ids.device
    if native_available(dev) and (dev.type != "cuda" or counts.shape[0] <= _CUDA_MAX_SLOTS):
        torch.ops.adaptkern_native.slot_mapping_update_(ids, *out)
    else:
        write_slot_metadata_(ids, out)


@_slot_metadata_update.register_fake
def _(ids, slots, sorted_rows, counts, offsets, active_slots, num_active) -> None:
    return None


def update_slot_metadata_(ids: Tensor, out: SlotMetadata) -> SlotMetadata:
    """Fill ``out`` (from :func:`slot_metadata_buffers`) for ids [M] (int32/int64, M <= max_tokens) in place.

    Semantics: as :func:`write_slot_metadata_`, bit for bit, in one native call where
    :func:`native_available` (one CUDA launch for S <= 2047), else by :func:`write_slot_metadata_`.
    No sync; a torch.library custom op with a fake, so ``torch.compile(fullgraph=True)`` and CUDA
    graphs keep it. The caller checks shapes (the native op checks them again and raises RuntimeError).
    """
    torch.ops.adaptkern.slot_metadata_update_(ids, *out)
    return out
