"""Row alignment (adaptkern.ops.mixed_adapter_linear.rows): reference vs a loop oracle, native vs reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from adaptkern.ops.mixed_adapter_linear import rows as al
from adaptkern.ops.mixed_adapter_linear.rows import AlignedRows, align_rows, align_rows_reference, alignment_buffers

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed", "all_base"]
# (M, num_slots, block_m): empty, single row, block edges, S=1, S=200, odd sizes, block_m=1.
SHAPES = [
    (0, 4, 16),
    (1, 4, 16),
    (15, 3, 16),
    (16, 3, 16),
    (17, 3, 16),
    (123, 1, 16),
    (431, 200, 16),
    (2049, 200, 64),
    (257, 7, 1),
]
CASES = [
    pytest.param(p, m, s, bm, dt, id=f"{p}-M{m}-S{s}-B{bm}-{str(dt)[6:]}")
    for p in PATTERNS
    for (m, s, bm) in SHAPES
    for dt in (torch.int32, torch.int64)
]


def make_ids(pattern: str, m: int, s: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    """Adapter "popularity" patterns (Punica); -1 = base-only rows. Shape: [m]."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "distinct":  # every row its own slot, as far as slots go (permuted)
        ids = torch.randperm(max(m, s), generator=g)[:m] % s
    elif pattern == "uniform":
        ids = torch.randint(-1, s, (m,), generator=g)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, s + 2, dtype=torch.float64) ** 1.2  # last bucket -> -1
        ids = torch.multinomial(p, m, replacement=True, generator=g) if m else torch.zeros(0, dtype=torch.long)
        ids = torch.where(ids == s, -1, ids)
    elif pattern == "identical":
        ids = torch.full((m,), s - 1)
    elif pattern == "skewed":  # 90% on one slot, the rest uniform
        ids = torch.where(torch.rand(m, generator=g) < 0.9, s // 2, torch.randint(-1, s, (m,), generator=g))
    elif pattern == "all_base":
        ids = torch.full((m,), -1)
    else:
        raise AssertionError(pattern)
    return ids.to(dtype)


def oracle(ids: torch.Tensor, s: int, bm: int, max_blocks: int) -> AlignedRows:
    """Plain-Python loop: the contract written out."""
    bins = [[] for _ in range(s + 1)]
    for i, a in enumerate(ids.tolist()):
        bins[a if 0 <= a < s else s].append(i)
    rows, slots = [], []
    for b, rs in enumerate(bins):
        n = -(-len(rs) // bm)
        rows += rs + [-1] * (n * bm - len(rs))
        slots += [b if b < s else -1] * n
    nb = len(slots)
    assert nb <= max_blocks
    rows += [-1] * (max_blocks * bm - len(rows))
    slots += [-1] * (max_blocks - nb)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return AlignedRows(i32(rows), i32(slots), i32([nb]))


def assert_same(got: AlignedRows, want: AlignedRows) -> None:
    for name, g, w in zip(AlignedRows._fields, got, want):
        g = g.cpu()
        assert g.dtype == torch.int32 and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        bad = (g != w).nonzero().flatten()
        first = bad[:8]
        assert bad.numel() == 0, (
            f"{name}: {bad.numel()} mismatches, first at {first.tolist()}:"
            f" got {g[first].tolist()} want {w[first].tolist()}"
        )


def bin_segments(out: AlignedRows, bm: int) -> list[tuple[int, list[int]]]:
    """[(slot, entries of that bin)] from consecutive equal block_slots (bins are contiguous)."""
    rows, slots, nb = (t.cpu() for t in out)
    segs: list[tuple[int, list[int]]] = []
    for k in range(int(nb)):
        blk = rows[k * bm : (k + 1) * bm].tolist()
        if segs and segs[-1][0] == int(slots[k]):
            segs[-1][1].extend(blk)
        else:
            segs.append((int(slots[k]), blk))
    return segs


def assert_properties(ids: torch.Tensor, s: int, bm: int, out: AlignedRows) -> None:
    """Every row once, in a block of its own slot; -1 padding only at each bin's end and after."""
    ids = ids.cpu().tolist()
    rows, slots, nb = (t.cpu() for t in out)
    nb = int(nb)
    assert 0 <= nb <= slots.numel()
    assert (slots[nb:] == -1).all() and (rows[nb * bm :] == -1).all()
    seen = sorted(r for r in rows.tolist() if r != -1)
    assert seen == list(range(len(ids))), "each row exactly once"
    segs = bin_segments(out, bm)
    assert [sl for sl, _ in segs] == sorted(sl for sl, _ in segs if sl >= 0) + [sl for sl, _ in segs if sl < 0]
    assert len({sl for sl, _ in segs}) == len(segs), "one contiguous run per bin"
    for sl, entries in segs:
        real = [r for r in entries if r != -1]
        assert entries == real + [-1] * (len(entries) - len(real)), "padding only at the bin's end"
        assert len(entries) - len(real) < bm and real, "no empty or over-padded block"
        assert all((ids[r] if 0 <= ids[r] < s else -1) == sl for r in real), "row in a block of its slot"


def assert_same_modulo_bin_order(got: AlignedRows, want: AlignedRows, bm: int) -> None:
    """Exact bins, blocks and padding; rows within a bin may be permuted (CUDA scatter)."""
    assert torch.equal(got.block_slots.cpu(), want.block_slots.cpu())
    assert torch.equal(got.num_blocks.cpu(), want.num_blocks.cpu())
    assert torch.equal(got.sorted_rows.cpu() == -1, want.sorted_rows.cpu() == -1), "padding positions differ"
    for (gs, ge), (ws, we) in zip(bin_segments(got, bm), bin_segments(want, bm)):
        assert gs == ws and sorted(ge) == sorted(we), f"bin {gs}: rows differ"


def _native_cpu() -> None:
    """Skip only when the native op really cannot build here; a build error otherwise fails."""
    if os.environ.get("ADAPTKERN_NO_NATIVE", "") not in ("", "0"):
        pytest.skip("ADAPTKERN_NO_NATIVE is set")
    if not (al._CSRC / "align.cpp").is_file():
        pytest.skip("csrc/ not present")
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    assert al.native_available("cpu"), f"native build failed: {al._NATIVE_ERROR}"


# --- reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,m,s,bm,dtype", CASES)
def test_reference_matches_oracle(pattern, m, s, bm, dtype):
    ids = make_ids(pattern, m, s, dtype)
    out = align_rows_reference(ids, s, bm)
    assert_same(out, oracle(ids, s, bm, al.max_aligned_blocks(m, s, bm)))
    assert_properties(ids, s, bm, out)


def test_max_blocks_formula():
    for m, s, bm in SHAPES:
        out = alignment_buffers(m, s, bm)
        nb = -(-(m + (s + 1) * (bm - 1)) // bm)
        assert out.block_slots.shape == (nb,) and out.sorted_rows.shape == (nb * bm,)
        assert out.num_blocks.shape == (1,)


@pytest.mark.parametrize("impl", ["reference", "public"])
def test_buffers_reused_with_new_mapping(impl):
    """Smaller M and a new mapping into the same buffers: stale entries are cleared."""
    fn = align_rows_reference if impl == "reference" else align_rows
    s, bm, cap = 20, 16, 300
    buf = alignment_buffers(cap, s, bm)
    ptrs = [t.data_ptr() for t in buf]
    nb = buf.block_slots.numel()
    mappings = [("distinct", 300), ("uniform", 37), ("identical", 5), ("all_base", 0), ("zipf", 299)]
    for seed, (pattern, m) in enumerate(mappings):
        ids = make_ids(pattern, m, s, seed=seed)
        out = fn(ids, s, bm, out=buf)
        assert [t.data_ptr() for t in out] == ptrs
        assert_same(out, oracle(ids, s, bm, nb))


def test_out_of_range_ids_act_as_base():
    """Not validated here, but memory-safe and consistent: they fall in the -1 bin."""
    ids = torch.tensor([3, 7, -5, 0, 2, -1])
    out = align_rows_reference(ids, 4, 2)
    assert_same(out, oracle(ids, 4, 2, al.max_aligned_blocks(6, 4, 2)))
    assert_same(align_rows(ids, 4, 2), out)


def test_errors():
    ids = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="adapter_ids"):
        align_rows(ids.float(), 4, 16)
    with pytest.raises(TypeError, match="adapter_ids"):
        align_rows([0, 1], 4, 16)
    with pytest.raises(ValueError, match=r"adapter_ids.*\(2, 2\)"):
        align_rows(ids.view(2, 2), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        align_rows(ids, 4, 0)
    with pytest.raises(ValueError, match="num_slots"):
        align_rows(ids, 0, 16)
    buf = alignment_buffers(8, 4, 16)  # 6 blocks: capacity 6 * 16 - 5 * 15 = 21 rows
    align_rows(torch.zeros(21, dtype=torch.long), 4, 16, out=buf)
    with pytest.raises(ValueError, match=r"M=22.*max_tokens=21"):
        align_rows(torch.zeros(22, dtype=torch.long), 4, 16, out=buf)
    with pytest.raises(ValueError, match="block_m=8"):  # buffers made for another block_m
        align_rows(ids, 4, 8, out=buf)
    with pytest.raises(TypeError, match="out.block_slots"):
        align_rows(ids, 4, 16, out=buf._replace(block_slots=buf.block_slots.long()))
    with pytest.raises(ValueError, match="max_tokens"):
        alignment_buffers(-1, 4, 16)


# --- torch.library / torch.compile ------------------------------------------------------


@pytest.mark.parametrize("m,s,bm", [(0, 3, 4), (37, 5, 4), (130, 2, 16)])
def test_opcheck(m, s, bm):
    ids = make_ids("uniform", m, s, torch.int32)
    buf = alignment_buffers(m + 3, s, bm)
    torch.library.opcheck(torch.ops.adaptkern.align_rows_.default, (ids, s, bm, *buf))


def test_compile_fullgraph():
    s, bm = 6, 8
    buf = alignment_buffers(64, s, bm)
    fn = torch.compile(lambda ids: align_rows(ids, s, bm, out=buf), fullgraph=True, backend="aot_eager")
    for seed, m in enumerate([64, 33]):
        ids = make_ids("uniform", m, s, seed=seed)
        out = fn(ids)
        assert_same(out, oracle(ids, s, bm, buf.block_slots.numel()))


def test_import_builds_nothing():
    code = "import sys, adaptkern.ops.mixed_adapter_linear.rows; assert 'torch.utils.cpp_extension' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=al._CSRC.parent)


# --- native C++ (CPU) ---------------------------------------------------------------------


@pytest.mark.parametrize("pattern,m,s,bm,dtype", CASES)
def test_native_cpu_matches_reference(pattern, m, s, bm, dtype):
    _native_cpu()
    ids = make_ids(pattern, m, s, dtype)
    want = align_rows_reference(ids, s, bm)
    got = alignment_buffers(m, s, bm)
    for t in got:  # poison: every entry must be written
        t.fill_(12345)
    torch.ops.adaptkern_native.align_rows_(ids, s, bm, *got)
    assert_same(got, want)


def test_native_cpu_buffers_reused_and_bad_ids():
    _native_cpu()
    s, bm = 20, 16
    buf = alignment_buffers(300, s, bm)
    for seed, (pattern, m) in enumerate([("distinct", 300), ("skewed", 41), ("all_base", 0)]):
        ids = make_ids(pattern, m, s, seed=seed)
        torch.ops.adaptkern_native.align_rows_(ids, s, bm, *buf)
        assert_same(buf, oracle(ids, s, bm, buf.block_slots.numel()))
    ids = torch.tensor([3, 70, -5, 0, 2, -1])
    out = alignment_buffers(6, 4, 2)
    torch.ops.adaptkern_native.align_rows_(ids, 4, 2, *out)
    assert_same(out, align_rows_reference(ids, 4, 2))


def test_native_cpu_rejects_bad_buffers():
    _native_cpu()
    ids = torch.zeros(40, dtype=torch.int32)
    small = alignment_buffers(8, 4, 16)
    with pytest.raises(RuntimeError, match="too few"):
        torch.ops.adaptkern_native.align_rows_(ids, 4, 16, *small)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.adaptkern_native.align_rows_(ids[:4], 4, 16, small.sorted_rows.long(), *small[1:])


def test_no_native_env(monkeypatch):
    """ADAPTKERN_NO_NATIVE=1 disables the build; the public op still works (reference)."""
    monkeypatch.setenv("ADAPTKERN_NO_NATIVE", "1")
    monkeypatch.setattr(al, "_NATIVE", None)  # restored after the test
    monkeypatch.setattr(al, "_NATIVE_ERROR", None)
    assert not al.native_available()
    assert "ADAPTKERN_NO_NATIVE" in al._NATIVE_ERROR
    ids = make_ids("zipf", 50, 9)
    assert_same(align_rows(ids, 9, 4), oracle(ids, 9, 4, al.max_aligned_blocks(50, 9, 4)))


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    _native_cpu()  # needs a compiler to get as far as a compile error
    (tmp_path / "align.cpp").write_text("#error deliberately broken\n")
    monkeypatch.setattr(al, "_CSRC", tmp_path)
    monkeypatch.setattr(al, "_NATIVE", None)  # restored (to the loaded op) after the test
    monkeypatch.setattr(al, "_NATIVE_ERROR", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match="native alignment op unavailable"):
        assert not al.native_available()
    assert "deliberately broken" in al._NATIVE_ERROR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not al.native_available()  # remembered: no second build, no second warning
    ids = make_ids("skewed", 40, 3)
    assert_same(align_rows(ids, 3, 8), oracle(ids, 3, 8, al.max_aligned_blocks(40, 3, 8)))


# --- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("pattern,m,s,bm,dtype", CASES + [
    pytest.param("zipf", 16384, 2000, 64, torch.int32, id="zipf-M16384-S2000-B64"),
    pytest.param("uniform", 16384, 4095, 16, torch.int64, id="uniform-M16384-S4095-B16"),
])
def test_cuda_matches_reference(pattern, m, s, bm, dtype):
    assert al.native_available("cuda"), f"CUDA build failed: {al._NATIVE_ERROR}"
    ids = make_ids(pattern, m, s, dtype)
    want = align_rows_reference(ids, s, bm)
    got = alignment_buffers(m, s, bm, "cuda")
    for t in got:
        t.fill_(12345)
    torch.ops.adaptkern_native.align_rows_(ids.cuda(), s, bm, *got)
    assert_same_modulo_bin_order(got, want, bm)
    assert_properties(ids, s, bm, got)
    assert_same(align_rows_reference(ids.cuda(), s, bm), want)  # reference on CUDA: exact


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_cuda_no_host_sync(impl):
    fn = align_rows if impl == "native" else align_rows_reference
    s, bm = 12, 16
    buf = alignment_buffers(500, s, bm, "cuda")
    ids = make_ids("zipf", 500, s).cuda()
    fn(ids, s, bm, out=buf)  # warm up (build, lazy init) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(ids, s, bm, out=buf)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(buf, align_rows_reference(ids.cpu(), s, bm, out=alignment_buffers(500, s, bm)))


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_replay_new_mapping():
    s, bm, cap = 30, 16, 1000
    buf = alignment_buffers(cap, s, bm, "cuda")
    static_ids = torch.full((cap,), -1, dtype=torch.int32, device="cuda")
    align_rows(static_ids, s, bm, out=buf)  # warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        align_rows(static_ids, s, bm, out=buf)
    for seed, pattern in enumerate(["distinct", "zipf", "all_base", "skewed"]):
        ids = make_ids(pattern, cap, s, torch.int32, seed=seed)
        static_ids.copy_(ids)
        g.replay()
        torch.cuda.synchronize()
        assert_same_modulo_bin_order(buf, align_rows_reference(ids, s, bm), bm)


@pytest.mark.gpu
@requires_cuda
def test_cuda_many_slots_falls_back_to_reference():
    s = al._CUDA_MAX_SLOTS + 1  # beyond the kernel's shared-memory histogram
    ids = make_ids("uniform", 3000, s)
    assert_same(align_rows(ids.cuda(), s, 16), align_rows_reference(ids, s, 16))
