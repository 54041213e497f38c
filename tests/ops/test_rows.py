"""Slot metadata of mixed batches (adaptkern.ops.mixed_adapter_linear.rows): the PyTorch producer against
a plain-Python loop, the native producer (csrc/) bit for bit against it, buffer reuse, out-of-range ids,
bad buffers, the build and its fallbacks, torch.compile."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from adaptkern.ops.mixed_adapter_linear import rows
from adaptkern.ops.mixed_adapter_linear.rows import SlotMetadata, native_available, slot_metadata, \
    slot_metadata_buffers, update_slot_metadata_, write_slot_metadata_

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


def test_import_builds_nothing():
    code = ("import sys, adaptkern; from adaptkern.ops.mixed_adapter_linear import rows; "
            "assert rows._NATIVE is None and 'torch.utils.cpp_extension' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=rows._CSRC.parent)


# --- native producer (csrc/slot_mapping.cpp) -----------------------------------------------


def _native_cpu() -> None:
    """Skip only under ADAPTKERN_NO_NATIVE: any other reason the C++ op does not build fails the test."""
    if os.environ.get("ADAPTKERN_NO_NATIVE", "") not in ("", "0"):
        pytest.skip("ADAPTKERN_NO_NATIVE is set")
    assert native_available("cpu"), f"the native slot metadata op did not build: {rows._NATIVE_ERROR}"


def native_update(ids: torch.Tensor, out: SlotMetadata) -> SlotMetadata:
    torch.ops.adaptkern_native.slot_mapping_update_(ids, *out)
    return out


def poisoned(max_tokens: int, s: int, device="cpu") -> SlotMetadata:
    """Buffers holding a value no producer writes: an entry the native op skips shows up."""
    buf = slot_metadata_buffers(max_tokens, s, device)
    for t in buf:
        t.fill_(12345)
    return buf


def test_native_cpu_builds():
    _native_cpu()


EXTREME = [2**40, -(2**40), 2**31, 2**32, -(2**31) - 1, 2**32 + 1, -1, 0]  # int64 ids that truncation would alias


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("m,s", SHAPES + [(1, 1), (64, 1), (300, 5000), (2049, 2047)], ids=lambda v: str(v))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_native_cpu_bit_identical(pattern, m, s, dtype):
    """Every buffer entry (tails past M included) equals the PyTorch producer's and the loop's."""
    _native_cpu()
    ids = make_ids(pattern, m, s, dtype)
    want = write_slot_metadata_(ids, slot_metadata_buffers(m + 3, s))
    assert_same(native_update(ids, poisoned(m + 3, s)), want)
    assert_same(want, oracle(ids, s, m + 3))


def test_native_cpu_extreme_and_noncontiguous_ids():
    _native_cpu()
    ids = torch.tensor(EXTREME * 3, dtype=torch.int64)
    assert_same(native_update(ids, poisoned(24, 3)), oracle(ids, 3, 24))
    wide = make_ids("uniform", 80, 6).view(40, 2)[:, 1]  # stride 2
    assert_same(native_update(wide, poisoned(40, 6)), write_slot_metadata_(wide, slot_metadata_buffers(40, 6)))


def test_native_cpu_buffers_reused_in_place():
    _native_cpu()
    s, cap = 20, 300
    buf = slot_metadata_buffers(cap, s)
    ptrs = [t.data_ptr() for t in buf]
    for seed, (pattern, m) in enumerate([("distinct", 300), ("uniform", 37), ("identical", 5), ("all_base", 0),
                                         ("zipf", 299), ("out_of_range", 64), ("skewed", 1)]):
        ids = make_ids(pattern, m, s, torch.int32 if seed % 2 else torch.int64, seed=seed)
        out = native_update(ids, buf)
        assert [t.data_ptr() for t in out] == ptrs
        assert_same(out, oracle(ids, s, cap))
    ids = make_ids("uniform", cap, s, torch.int32)
    buf.slots.copy_(ids)  # ids aliasing slots: each id is read before its slot is written
    assert_same(native_update(buf.slots, buf), oracle(ids, s, cap))


def test_native_cpu_rejects_bad_buffers_before_writing():
    _native_cpu()
    ids = make_ids("uniform", 6, 4)
    good = slot_metadata_buffers(8, 4)
    cases = [
        (ids.view(2, 3), good, r"adapter_ids must be 1-D \[M\], got shape \[2, 3\]"),
        (ids.float(), good, "adapter_ids must be int32 or int64, got Float"),
        (make_ids("uniform", 9, 4), good, "adapter_ids has M=9 rows, more than the buffers' max_tokens=8"),
        (ids, good._replace(counts=good.counts.long()), r"counts must be a contiguous 1-D int32 tensor, got Long"),
        (ids, good._replace(sorted_rows=torch.zeros(16, dtype=torch.int32)[::2]),
         r"sorted_rows must be a contiguous 1-D int32 tensor, got Int shape \[8\] strides \[2\]"),
        (ids, good._replace(slots=good.slots.view(2, 4)), r"slots must be a contiguous 1-D int32 tensor"),
        (ids, good._replace(sorted_rows=torch.zeros(7, dtype=torch.int32)),
         r"sorted_rows has shape \[7\] but slots has shape \[8\]"),
        (ids, good._replace(offsets=torch.zeros(4, dtype=torch.int32)),
         r"for counts \[S\] = \[4\] expected offsets \[S \+ 1\], active_slots \[S\], num_active \[1\], got \[4\], "
         r"\[4\], \[1\]"),
        (ids, good._replace(num_active=torch.zeros(2, dtype=torch.int32)),
         r"num_active \[1\], got \[5\], \[4\], \[2\]"),
        (ids, slot_metadata_buffers(8, 1)._replace(counts=torch.zeros(0, dtype=torch.int32)),
         r"counts must have shape \[S\] with S >= 1, got \[0\]"),
    ]
    for bad_ids, buf, pattern in cases:
        for t in buf:
            t.fill_(12345)
        with pytest.raises(RuntimeError, match=pattern):
            native_update(bad_ids, buf)
        assert all(bool((t == 12345).all()) for t in buf), f"written before the error: {pattern}"


def test_update_uses_native_and_one_call(monkeypatch):
    """update_slot_metadata_ runs one native call where built, else the PyTorch producer (same bits)."""
    _native_cpu()
    ids = make_ids("zipf", 200, 9)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = update_slot_metadata_(ids, poisoned(210, 9))
    names = [e.name for e in prof.events()]
    assert names.count("adaptkern_native::slot_mapping_update_") == 1 and "aten::sort" not in names
    assert_same(out, oracle(ids, 9, 210))
    monkeypatch.setattr(rows, "_NATIVE", frozenset())  # as after a failed build; restored after the test
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = update_slot_metadata_(ids, poisoned(210, 9))
    names = [e.name for e in prof.events()]
    assert "adaptkern_native::slot_mapping_update_" not in names and "aten::sort" in names
    assert_same(out, oracle(ids, 9, 210))


def test_no_native_env(monkeypatch):
    """ADAPTKERN_NO_NATIVE=1: nothing is built, the PyTorch producer fills the buffers, no warning."""
    monkeypatch.setenv("ADAPTKERN_NO_NATIVE", "1")
    monkeypatch.setattr(rows, "_NATIVE", None)  # restored after the test
    monkeypatch.setattr(rows, "_NATIVE_ERROR", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native_available("cpu")
    assert rows._NATIVE_ERROR == "disabled by ADAPTKERN_NO_NATIVE"
    ids = make_ids("skewed", 50, 9)
    assert_same(update_slot_metadata_(ids, slot_metadata_buffers(50, 9)), oracle(ids, 9, 50))


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    _native_cpu()  # the real op loads first: the broken sources below get another extension name
    (tmp_path / "slot_mapping.cpp").write_text("#error deliberately broken\n")
    monkeypatch.setattr(rows, "_CSRC", tmp_path)
    monkeypatch.setattr(rows, "_NATIVE", None)  # restored (to the loaded op) after the test
    monkeypatch.setattr(rows, "_NATIVE_ERROR", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match=r"native slot metadata op unavailable for \['cpu'\]"):
        assert not native_available("cpu")
    assert "deliberately broken" in rows._NATIVE_ERROR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native_available("cpu")  # remembered: no second build, no second warning
    ids = make_ids("out_of_range", 40, 3)
    assert_same(update_slot_metadata_(ids, slot_metadata_buffers(40, 3)), oracle(ids, 3, 40))


@pytest.mark.parametrize("m,s", [(0, 3), (37, 5), (130, 2)])
def test_opcheck(m, s):
    _native_cpu()
    ids = make_ids("uniform", m, s, torch.int32)
    torch.library.opcheck(torch.ops.adaptkern.slot_metadata_update_.default, (ids, *slot_metadata_buffers(m + 3, s)))


def test_update_compile_fullgraph():
    """The custom op stays in the graph (no break) and the compiled call still runs the native op."""
    _native_cpu()
    s = 6
    buf = slot_metadata_buffers(64, s)
    fn = torch.compile(lambda ids: update_slot_metadata_(ids, buf), fullgraph=True, backend="aot_eager")
    for seed, m in enumerate([64, 33]):
        ids = make_ids("uniform", m, s, seed=seed)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn(ids)
        assert [e.name for e in prof.events()].count("adaptkern_native::slot_mapping_update_") == 1
        assert_same(out, oracle(ids, s, 64))


# --- native producer on CUDA (csrc/slot_mapping_cuda.cu) -----------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("m,s", SHAPES + [(1, 1), (1023, 5), (1024, 5), (1025, 5), (16384, 2047), (5000, 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_native_bit_identical(pattern, m, s, dtype):
    assert native_available("cuda"), f"the CUDA build failed: {rows._NATIVE_ERROR}"
    ids = make_ids(pattern, m, s, dtype)
    want = write_slot_metadata_(ids, slot_metadata_buffers(m + 3, s))
    assert_same(native_update(ids.cuda(), poisoned(m + 3, s, "cuda")), want)


@pytest.mark.gpu
def test_cuda_native_extreme_ids_reuse_and_errors():
    assert native_available("cuda"), f"the CUDA build failed: {rows._NATIVE_ERROR}"
    ids = torch.tensor(EXTREME * 300, dtype=torch.int64)
    buf = slot_metadata_buffers(3000, 3, "cuda")
    ptrs = [t.data_ptr() for t in buf]
    assert_same(native_update(ids.cuda(), buf), oracle(ids, 3, 3000))
    ids = make_ids("zipf", 1500, 3, torch.int32)
    assert_same(native_update(ids.cuda(), buf), oracle(ids, 3, 3000))
    assert [t.data_ptr() for t in buf] == ptrs
    with pytest.raises(RuntimeError, match="counts is on cpu but adapter_ids is on cuda"):
        native_update(ids.cuda(), buf._replace(counts=buf.counts.cpu()))
    big = slot_metadata_buffers(10, rows._CUDA_MAX_SLOTS + 1, "cuda")
    with pytest.raises(RuntimeError, match="S=2048 slots; the CUDA kernel holds at most 2047"):
        native_update(torch.zeros(10, dtype=torch.int32, device="cuda"), big)


@pytest.mark.gpu
def test_cuda_one_kernel_no_sync_and_large_s_fallback():
    """One CUDA kernel per update, no host sync; S above the shared-memory limit: the PyTorch producer."""
    assert native_available("cuda"), f"the CUDA build failed: {rows._NATIVE_ERROR}"
    ids = make_ids("zipf", 4000, 100).cuda()
    buf = slot_metadata_buffers(4096, 100, "cuda")
    update_slot_metadata_(ids, buf)  # warm up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update_slot_metadata_(ids, buf)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        update_slot_metadata_(ids, buf)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "slot_mapping_kernel" in kernels[0], kernels
    assert_same(buf, oracle(ids.cpu(), 100, 4096))
    s = rows._CUDA_MAX_SLOTS + 1
    ids = make_ids("uniform", 3000, s)
    assert_same(update_slot_metadata_(ids.cuda(), slot_metadata_buffers(3000, s, "cuda")), oracle(ids, s, 3000))
