"""Slot metadata of mixed batches (adaptkern.ops.mixed_adapter_linear.rows): the device counting sort
against a plain-Python loop, buffer reuse, out-of-range ids, torch.compile."""

from __future__ import annotations

import pytest
import torch

from adaptkern.ops.mixed_adapter_linear.rows import SlotMetadata, slot_metadata, slot_metadata_buffers, \
    write_slot_metadata_

PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed", "all_base", "out_of_range"]
SHAPES = [(0, 4), (1, 4), (17, 3), (123, 1), (431, 200), (257, 7)]


def make_ids(pattern: str, m: int, s: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    """Adapter "popularity" patterns (Punica); -1 = base-only rows. Shape: [m]."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "distinct":
        ids = torch.randperm(max(m, s), generator=g)[:m] % s
    elif pattern == "uniform":
        ids = torch.randint(-1, s, (m,), generator=g)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, s + 2, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, m, replacement=True, generator=g) - 1 if m else torch.zeros(0, dtype=torch.long)
    elif pattern == "identical":
        ids = torch.full((m,), s - 1)
    elif pattern == "skewed":
        ids = torch.where(torch.rand(m, generator=g) < 0.9, s // 2, torch.randint(-1, s, (m,), generator=g))
    elif pattern == "all_base":
        ids = torch.full((m,), -1)
    else:  # unchecked ids: everything outside [0, S) is base only
        ids = torch.randint(-5, s + 5, (m,), generator=g)
    return ids.to(dtype)


def oracle(ids: torch.Tensor, s: int, max_tokens: int) -> SlotMetadata:
    """The contract as a plain loop."""
    slots = [i if 0 <= i < s else -1 for i in ids.tolist()]
    order = [r for slot in range(s) for r, v in enumerate(slots) if v == slot] + \
            [r for r, v in enumerate(slots) if v == -1]
    counts = [slots.count(slot) for slot in range(s)]
    offsets = [sum(counts[:i]) for i in range(s + 1)]
    active = [slot for slot in range(s) if counts[slot]]
    pad = max_tokens - len(slots)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return SlotMetadata(i32(slots + [-1] * pad), i32(order + [-1] * pad), i32(counts), i32(offsets),
                        i32(active + [-1] * (s - len(active))), i32([len(active)]))


def assert_same(got: SlotMetadata, want: SlotMetadata) -> None:
    for name, g, w in zip(SlotMetadata._fields, got, want):
        g = g.cpu()
        assert g.dtype == torch.int32 and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        bad = (g != w).nonzero().flatten()
        assert bad.numel() == 0, f"{name}: {bad.numel()} mismatches, first at {bad[:8].tolist()}: " \
                                 f"got {g[bad[:8]].tolist()} want {w[bad[:8]].tolist()}"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("m,s", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_oracle(pattern, m, s, dtype):
    ids = make_ids(pattern, m, s, dtype)
    assert_same(slot_metadata(ids, s), oracle(ids, s, m))


def test_buffers_reused_with_new_mappings():
    """Smaller M and new mappings into the same buffers: fixed addresses, stale entries cleared."""
    s, cap = 20, 300
    buf = slot_metadata_buffers(cap, s)
    ptrs = [t.data_ptr() for t in buf]
    for seed, (pattern, m) in enumerate([("distinct", 300), ("uniform", 37), ("identical", 5), ("all_base", 0),
                                         ("zipf", 299), ("out_of_range", 64)]):
        ids = make_ids(pattern, m, s, seed=seed)
        out = write_slot_metadata_(ids, buf)
        assert [t.data_ptr() for t in out] == ptrs
        assert_same(out, oracle(ids, s, cap))


def test_compile_fullgraph():
    s = 6
    buf = slot_metadata_buffers(64, s)
    fn = torch.compile(lambda ids: write_slot_metadata_(ids, buf), fullgraph=True, backend="aot_eager")
    for seed, m in enumerate([64, 33]):
        ids = make_ids("uniform", m, s, seed=seed)
        assert_same(fn(ids), oracle(ids, s, 64))


@pytest.mark.gpu
def test_cuda_no_host_sync_and_matches():
    s = 12
    buf = slot_metadata_buffers(500, s, "cuda")
    ids = make_ids("zipf", 500, s).cuda()
    write_slot_metadata_(ids, buf)  # warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        write_slot_metadata_(ids, buf)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(buf, oracle(ids.cpu(), s, 500))
