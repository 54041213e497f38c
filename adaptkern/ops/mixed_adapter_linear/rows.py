"""Row alignment for mixed-adapter batches (docs/design-notes.md).

Rows of a batch that use different adapters are grouped by slot so that the prefill
kernel can run one slot per ``block_m``-row block: histogram of slots -> exclusive scan of
the padded bin sizes -> scatter of row indices (the MoE token-alignment trick).

Chain: ``align_rows_reference`` (PyTorch spec, fallback and oracle) and the native op
``torch.ops.adaptkern_native.align_rows_`` (csrc/align.cpp for CPU, csrc/align_cuda.cu for
CUDA, built lazily on first use) -> ``adaptkern::align_rows_`` (torch.library custom op,
mutates the buffers; works under ``torch.compile(fullgraph=True)``) -> ``align_rows``.

Nothing here syncs with the host or allocates data-dependent shapes: with buffers from
``alignment_buffers`` the whole path can be captured in a CUDA graph and replayed with a
new mapping.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AlignedRows",
    "align_rows",
    "align_rows_reference",
    "alignment_buffers",
    "max_aligned_blocks",
    "native_available",
]

_CSRC = Path(__file__).resolve().parents[3] / "csrc"
_CUDA_MAX_SLOTS = 10239  # align_cuda.cu: kMaxBins - 1 (one shared-memory histogram of S + 1 bins)
_NATIVE: frozenset[str] | None = None  # device types of the loaded native op; None = not tried
_NATIVE_ERROR: str | None = None  # why the native op is unavailable (for tests and `info`)
_NATIVE_LOCK = threading.Lock()


class AlignedRows(NamedTuple):
    """Output of :func:`align_rows`; fixed-size buffers sized for ``max_tokens`` rows.

    Shape:
        sorted_rows: ``[max_blocks * block_m]`` int32, row index per entry; -1 = padding.
        block_slots: ``[max_blocks]`` int32, slot of each used block; -1 = base-only/unused.
        num_blocks: ``[1]`` int32, number of used blocks.
    """

    sorted_rows: Tensor
    block_slots: Tensor
    num_blocks: Tensor


def max_aligned_blocks(max_tokens: int, num_slots: int, block_m: int) -> int:
    """Number of blocks that any alignment of ``max_tokens`` rows fits in.

    Semantics: ``cdiv(max_tokens + (num_slots + 1) * (block_m - 1), block_m)`` — each of the
    ``num_slots + 1`` bins wastes at most ``block_m - 1`` entries of padding.
    """
    return -(-(max_tokens + (num_slots + 1) * (block_m - 1)) // block_m)


def _check_params(num_slots: int, block_m: int) -> None:
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")


def alignment_buffers(
    max_tokens: int, num_slots: int, block_m: int, device: torch.device | str | None = None
) -> AlignedRows:
    """Preallocate output buffers for :func:`align_rows` (fixed addresses for CUDA graphs).

    Semantics: buffers for any batch of ``M <= max_tokens`` rows (rounding up to whole
    blocks may admit up to ``block_m - 1`` more; :func:`align_rows` checks the real
    capacity), filled with -1 and ``num_blocks = 0`` until the first call.
    Shape: ``sorted_rows [max_blocks * block_m]``, ``block_slots [max_blocks]``,
    ``num_blocks [1]``, all int32, with ``max_blocks = max_aligned_blocks(max_tokens,
    num_slots, block_m)``.
    """
    _check_params(num_slots, block_m)
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    nb = max_aligned_blocks(max_tokens, num_slots, block_m)
    i32 = dict(dtype=torch.int32, device=device)
    return AlignedRows(
        torch.full((nb * block_m,), -1, **i32),
        torch.full((nb,), -1, **i32),
        torch.zeros((1,), **i32),
    )


def _check_inputs(adapter_ids: Tensor, num_slots: int, block_m: int) -> None:
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
        what = adapter_ids.dtype if isinstance(adapter_ids, Tensor) else type(adapter_ids).__name__
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {what}")
    if adapter_ids.dim() != 1:
        raise ValueError(f"adapter_ids must be 1-D [M], got shape {tuple(adapter_ids.shape)}")
    _check_params(num_slots, block_m)


def _check_out(out: AlignedRows, adapter_ids: Tensor, num_slots: int, block_m: int) -> None:
    for name, t in zip(AlignedRows._fields, out):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"out.{name} must be an int32 tensor, got {getattr(t, 'dtype', t)}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous 1-D, got shape {tuple(t.shape)}")
        if t.device != adapter_ids.device:
            raise ValueError(f"out.{name} is on {t.device} but adapter_ids is on {adapter_ids.device}")
    sorted_rows, block_slots, num_blocks = out
    nb = block_slots.shape[0]
    if sorted_rows.shape[0] != nb * block_m or num_blocks.shape[0] != 1:
        raise ValueError(
            f"out buffers do not match block_m={block_m}: sorted_rows {tuple(sorted_rows.shape)},"
            f" block_slots {tuple(block_slots.shape)}, num_blocks {tuple(num_blocks.shape)}"
        )
    # Largest M these buffers hold: the max_tokens they were made for, rounded up by
    # max_aligned_blocks (by up to block_m - 1 rows); the buffers cannot record the original.
    max_tokens = nb * block_m - (num_slots + 1) * (block_m - 1)
    m = adapter_ids.shape[0]
    if m > max_tokens:
        raise ValueError(
            f"M={m} rows exceed the out buffers' capacity: max_tokens={max_tokens}"
            f" ({nb} blocks of block_m={block_m}, num_slots={num_slots}); see alignment_buffers"
        )


def _align_rows_reference_(
    ids: Tensor, num_slots: int, block_m: int, sorted_rows: Tensor, block_slots: Tensor, num_blocks: Tensor
) -> None:
    """In-place PyTorch alignment, sync-free (every shape is known on the host)."""
    S, dev, m = num_slots, ids.device, ids.shape[0]
    ids = ids.long()
    bins = torch.where((ids >= 0) & (ids < S), ids, S)  # [M] in [0, S]; S = base-only
    counts = torch.zeros(S + 1, dtype=torch.long, device=dev).scatter_add_(0, bins, torch.ones_like(bins))
    nblk = (counts + block_m - 1) // block_m  # [S+1] blocks per bin
    blk_end = torch.cumsum(nblk, 0)  # [S+1] inclusive scan, in blocks
    entry_start = (blk_end - nblk) * block_m  # [S+1] first entry of each bin
    row_start = torch.cumsum(counts, 0) - counts  # [S+1] first position of each bin in sort order
    sorted_bins, order = torch.sort(bins, stable=True)  # [M], [M]
    dest = entry_start[sorted_bins] + torch.arange(m, device=dev) - row_start[sorted_bins]  # [M]
    sorted_rows.fill_(-1).scatter_(0, dest, order.to(torch.int32))
    k = torch.arange(block_slots.shape[0], device=dev)  # [max_blocks]
    bin_of_block = torch.searchsorted(blk_end, k, right=True)  # [max_blocks] in [0, S+1]
    block_slots.copy_(torch.where(bin_of_block < S, bin_of_block, -1))
    num_blocks.copy_(blk_end[-1:])


def align_rows_reference(
    adapter_ids: Tensor, num_slots: int, block_m: int, *, out: AlignedRows | None = None
) -> AlignedRows:
    """Pure-PyTorch alignment: the spec, the fallback and the test oracle.

    Semantics: bin rows by slot (bins ``0..S-1``; ids of -1 — and, unvalidated, any id
    outside ``[0, S)`` — form the last bin, slot -1). Each non-empty bin, in bin order,
    takes ``ceil(count / block_m)`` blocks holding its row indices in ascending order,
    padded with -1; ``block_slots[k]`` is the slot of block ``k``; entries and blocks past
    ``num_blocks`` are -1.
    Shape: ``adapter_ids [M]`` int32/int64 -> :class:`AlignedRows` (see its docstring), sized
    for ``M`` rows, or written into ``out`` (from :func:`alignment_buffers`) when given.
    """
    _check_inputs(adapter_ids, num_slots, block_m)
    if out is None:
        out = alignment_buffers(adapter_ids.shape[0], num_slots, block_m, adapter_ids.device)
    _check_out(out, adapter_ids, num_slots, block_m)
    _align_rows_reference_(adapter_ids, num_slots, block_m, *out)
    return out


# ---------------------------------------------------------------------------------------
# Native op: built on first use, never at import.


def _native() -> frozenset[str]:
    """Device types that ``torch.ops.adaptkern_native`` serves; builds/loads it on first call.

    Loaded at most once per process: torch renames a rebuilt extension whose sources
    changed (``adaptkern_native_v1``), and a second library defining the same
    ``TORCH_LIBRARY`` namespace aborts the process.
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
    cpp, cu = _CSRC / "align.cpp", _CSRC / "align_cuda.cu"
    if not cpp.is_file():
        _NATIVE_ERROR = f"{cpp} not found (adaptkern installed without csrc/)"
        return frozenset()
    from torch.utils import cpp_extension

    attempts = [({"cpu"}, [cpp])]
    if torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME and cu.is_file():
        attempts.insert(0, ({"cpu", "cuda"}, [cpp, cu]))  # if nvcc fails, still try CPU only
    errors = []
    for devices, sources in attempts:
        try:  # a failed build loads nothing, so trying again is safe
            cpp_extension.load(
                name="adaptkern_native",
                sources=[str(s) for s in sources],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                is_python_module=False,
                verbose=os.environ.get("ADAPTKERN_NATIVE_VERBOSE", "") not in ("", "0"),
            )
            torch.ops.adaptkern_native.align_rows_  # noqa: B018 (raises if nothing registered)
            break
        except Exception as e:  # any build or load failure: fall back
            errors.append(f"{'+'.join(sorted(devices))}: {type(e).__name__}: {e}")
    else:
        devices = set()
    if errors:
        _NATIVE_ERROR = "; ".join(errors)
        warnings.warn(
            f"adaptkern: native alignment op unavailable for {sorted(attempts[0][0] - devices)},"
            f" using the PyTorch reference there ({_NATIVE_ERROR})",
            RuntimeWarning,
            stacklevel=3,
        )
    return frozenset(devices)


def native_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled alignment op serves ``device``'s type (builds it on first call).

    Semantics: ``True`` iff ``torch.ops.adaptkern_native.align_rows_`` is loaded with a
    kernel for ``torch.device(device).type``; ``False`` under ``ADAPTKERN_NO_NATIVE=1``, on
    a failed build (one warning) or without ``csrc/``.
    """
    return torch.device(device).type in _native()


# ---------------------------------------------------------------------------------------
# Registered op and public entry.


@torch.library.custom_op(
    "adaptkern::align_rows_",
    mutates_args=("sorted_rows", "block_slots", "num_blocks"),
    device_types=("cpu", "cuda"),
)
def _align_rows_op(
    adapter_ids: Tensor,  # [M] int32/int64
    num_slots: int,
    block_m: int,
    sorted_rows: Tensor,  # [max_blocks * block_m] int32, written
    block_slots: Tensor,  # [max_blocks] int32, written
    num_blocks: Tensor,  # [1] int32, written
) -> None:
    """``adaptkern::align_rows_``: native kernel for the device when built, else the reference."""
    dev = adapter_ids.device
    if native_available(dev) and (dev.type != "cuda" or num_slots <= _CUDA_MAX_SLOTS):
        op = torch.ops.adaptkern_native.align_rows_
    else:
        op = _align_rows_reference_
    op(adapter_ids, num_slots, block_m, sorted_rows, block_slots, num_blocks)


@_align_rows_op.register_fake
def _(adapter_ids, num_slots, block_m, sorted_rows, block_slots, num_blocks) -> None:
    return None


def align_rows(
    adapter_ids: Tensor, num_slots: int, block_m: int, *, out: AlignedRows | None = None
) -> AlignedRows:
    """Group rows by adapter slot into ``block_m``-row blocks for the prefill kernel.

    Semantics: as :func:`align_rows_reference`, except that on CUDA the order of rows
    within a bin is unspecified (atomic scatter); bins, padding, ``block_slots`` and
    ``num_blocks`` are exact. Ids are not validated here (out-of-range ids act as -1).
    Runs the native kernel for the device when built (CUDA: ``num_slots <= 10239``), else
    the reference. No host sync; with ``out`` it is CUDA-graph capturable.
    Shape: ``adapter_ids [M]`` int32/int64, values in ``[-1, num_slots)`` ->
    :class:`AlignedRows` with ``max_blocks = max_aligned_blocks(M or max_tokens, num_slots,
    block_m)``: ``sorted_rows [max_blocks * block_m]``, ``block_slots [max_blocks]``,
    ``num_blocks [1]``.
    Raises: TypeError for non-integer ids; ValueError for non-1-D ids, ``num_slots < 1``,
    ``block_m < 1``, or ``M`` above the capacity of ``out``.
    """
    _check_inputs(adapter_ids, num_slots, block_m)
    if out is None:
        out = alignment_buffers(adapter_ids.shape[0], num_slots, block_m, adapter_ids.device)
    _check_out(out, adapter_ids, num_slots, block_m)
    torch.ops.adaptkern.align_rows_(adapter_ids, num_slots, block_m, *out)
    return out
