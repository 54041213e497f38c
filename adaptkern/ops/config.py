"""Launch configurations and the one-pass/split route heuristic, in one cached place.

These defaults are reasoned, not yet measured (no GPU was at hand when they were set;
per-GPU tables measured by the tuner replace them):

* route, from a byte/flop model (docs/compiled-code.md): one-pass recomputes ``x·Aᵀ`` for
  every N tile, ``2·M·K·R_pad·N/BLOCK_N`` extra flops (+12.5 % at R_pad=16, BLOCK_N=128:
  310 against split's 277 GFLOP at M=8192, K=N=4096); split pays one more launch and one
  more read of x (2·M·K bytes: 64 MiB, ~20 µs at 3.35 TB/s). Both routes reach the same
  2 CTAs/SM (kernel_report.py), so at ~650 TFLOP/s the extra flops cost
  M·R_pad·0.40 ns and the split M·2.45 ns + ~5 µs: equal at M ≈ 1250 for R_pad=16, 480 for
  32, 210 for 64. The heuristic takes one-pass while M·R_pad <= 16·ONEPASS_MAX_M.
* the one-pass epilogue holds a ``BLOCK_M×BLOCK_R`` accumulator next to the output tile,
  so ranks above 64 always take the split route.

Per-GPU tables (``configs/<gpu>.json``, written by ``benchmarks/tune.py``; schema in
``configs/README.md``) replace these heuristics where they have an entry:

* a lookup needs ``device=`` (the launchers pass their tensor's device); ``device=None``,
  a non-CUDA device, the interpreter, a table tuned for another operand size, a missing
  file, kernel or shape all give the heuristic;
* within a shape, the entry of the measured M nearest to m in log2 distance is taken
  (``m² < M_lo·M_hi`` picks M_lo; a tie goes to the smaller M);
* every entry still passes through :func:`fit`: a table cannot produce a launch whose
  pipelined tiles overflow shared memory;
* a malformed table raises ``ValueError`` naming the file (at the first launch on that GPU),
  rather than silently running untuned; the tuner checks the schema when it writes one;
* files are read once per GPU kind and every lookup is cached: no file I/O per call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch
import triton

ONEPASS_MAX_RANK = 64
ONEPASS_MAX_M = 1024  # at ranks <= 16; M·block_r(rank) <= 16·ONEPASS_MAX_M in general


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _bucket(m: int) -> int:
    return 1 << max(0, (max(m, 1) - 1).bit_length())


# Shared memory a block may use for its pipelined tiles: H100/H200 allow 227 KiB; the
# rest is left to the epilogue's layout conversions.
SMEM_BUDGET = 160 * 1024


def _smem(cfg: GemmConfig, elem: int, extra_cols: int = 0) -> int:
    """Bytes of the pipelined operand tiles: stages × (x tile + W tile + ``extra_cols`` beside W)."""
    return cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * (cfg.block_n + extra_cols)) * elem


def fit(cfg: GemmConfig, elem: int, extra_cols: int = 0) -> GemmConfig:
    """Shrink stages, then BLOCK_K, then BLOCK_N until the pipelined tiles fit SMEM_BUDGET.

    ``elem`` is the dot operands' size in bytes (2 for fp16/bf16, 4 for fp32, 8 for fp64);
    ``extra_cols`` counts columns loaded beside W in the K loop (the one-pass A tile).
    """
    while _smem(cfg, elem, extra_cols) > SMEM_BUDGET and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    while _smem(cfg, elem, extra_cols) > SMEM_BUDGET and cfg.block_k > 16:
        cfg = cfg._replace(block_k=cfg.block_k // 2)
    while _smem(cfg, elem, extra_cols) > SMEM_BUDGET and cfg.block_n > 32:
        cfg = cfg._replace(block_n=cfg.block_n // 2)
    return cfg


# -- per-GPU tables ----------------------------------------------------------------------------

TABLE_DIR = Path(__file__).with_name("configs")
TABLE_KERNELS = ("gemm", "onepass", "mixed", "route")
# Shape keys per kernel: N, K are power-of-two buckets (smallest power of two >= the size),
# R the padded rank tile block_r(rank). The schema of a table (fields, bounds) is checked by
# what writes tables: benchmarks/tune_table.py.
_SHAPE_KEYS = {"gemm": ("N",), "onepass": ("N", "R"), "mixed": ("K", "R"), "route": ("N", "R")}


class Table(NamedTuple):
    """A loaded table: ``kernels[kernel][shape] = (sorted Ms, entries in the same order)``."""

    source: str
    elem: int
    kernels: dict


def gpu_slug(name: str) -> str:
    """Short file-name form of a device name, naming the tables and results files:
    "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA GeForce RTX 4090" -> "rtx4090", "cpu" -> "cpu"."""
    drop = ("NVIDIA", "GEFORCE", "TESLA", "QUADRO")
    tokens = [t for t in re.split(r"[\s\-_]+", name) if t and t.upper() not in drop]
    if not tokens:
        return "gpu"
    slug = tokens[0]
    if slug.upper() in ("RTX", "GTX") and len(tokens) > 1:
        slug += tokens[1]
    return re.sub(r"[^a-z0-9]+", "", slug.lower()) or "gpu"


def shape_key(kernel: str, **sizes: int) -> str:
    """The key of a shape in a table, e.g. ``shape_key("onepass", N=14336, R=16) == "N=16384,R=16"``.

    N and K are bucketed to the next power of two, R to the padded rank tile ``block_r``.
    """
    return ",".join(f"{name}={block_r(sizes[name]) if name == 'R' else _bucket(sizes[name])}"
                    for name in _SHAPE_KEYS[kernel])


def index_table(data: dict, source: str = "<table>") -> Table:
    """Index a table (parsed JSON, as benchmarks/tune.py writes it) by kernel, shape and M."""
    try:
        kernels = {kernel: {key: tuple(zip(*sorted((int(m), entry) for m, entry in by_m.items())))
                            for key, by_m in data.get(kernel, {}).items()} for kernel in TABLE_KERNELS}
        return Table(source, int(data["elem"]), kernels)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config table {source} is malformed ({type(e).__name__}: {e}); check it with "
                         f"benchmarks/tune_table.py") from None


@functools.lru_cache(maxsize=None)
def _load_table(directory: Path, slug: str) -> Optional[Table]:
    """The table of GPU kind ``slug`` in ``directory``, or None when there is no file."""
    path = Path(directory) / f"{slug}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config table {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return index_table(data, str(path))


_override: Optional[Table] = None


@contextlib.contextmanager
def table_override(data: Optional[dict]) -> Iterator[None]:
    """Use ``data`` (a table as parsed JSON; ``{"version": 1, "elem": 2}`` holds no entry) as
    the table of every CUDA device inside the block, instead of the files. The tuner times its
    candidates through it; tests use it as a loader hook. Not thread-safe."""
    global _override
    previous = _override
    _override = index_table(data, "<override>") if data is not None else None
    clear_caches()
    try:
        yield
    finally:
        _override = previous
        clear_caches()


@functools.lru_cache(maxsize=None)
def _device_slug(index: int) -> str:
    return gpu_slug(torch.cuda.get_device_name(index))


def _gpu(device) -> Optional[str]:
    """The table's GPU kind for ``device`` (e.g. "h100"), or None: no table applies."""
    if device is None:
        return None
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    return _device_slug(device.index if device.index is not None else torch.cuda.current_device())


def _table(gpu: Optional[str]) -> Optional[Table]:
    if gpu is None:
        return None
    return _override if _override is not None else _load_table(TABLE_DIR, gpu)


def nearest_m(ms: tuple, m: int) -> int:
    """Index into the sorted ``ms`` of the M nearest to ``m`` in log2 distance, ties to the smaller.

    Between neighbours lo < m < hi, |log2 m − log2 lo| <= |log2 hi − log2 m| ⟺ m² <= lo·hi
    (exact in integers).
    """
    m = max(m, 1)
    i = 0
    while i + 1 < len(ms) and ms[i + 1] <= m:
        i += 1
    if ms[i] >= m or i + 1 == len(ms):
        return i
    return i if m * m <= ms[i] * ms[i + 1] else i + 1


def _entry(gpu: Optional[str], kernel: str, key: str, m: int, elem: Optional[int]) -> Optional[dict]:
    """The table entry for (kernel, shape, nearest M), or None (no table, kernel, shape or elem)."""
    table = _table(gpu)
    if table is None or (elem is not None and table.elem != elem):
        return None
    found = table.kernels.get(kernel, {}).get(key)
    if found is None:
        return None
    ms, entries = found
    return entries[nearest_m(ms, m)]


def _from_entry(entry: dict, elem: int, extra_cols: int = 0) -> GemmConfig:
    cfg = GemmConfig(entry["block_m"], entry["block_n"], entry["block_k"], entry.get("group_m", 8),
                     entry["num_warps"], entry["num_stages"])
    return fit(cfg, elem, extra_cols)


def clear_caches() -> None:
    """Forget loaded tables and every cached lookup (after the files or TABLE_DIR change)."""
    for fn in (_load_table, _gemm_cached, _onepass_cached, _mixed_cached, _route_cached):
        fn.cache_clear()


# -- heuristics and lookups --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gemm_config(m_bucket: int, n: int, elem: int, interpret: bool) -> GemmConfig:
    """The heuristic (no table)."""
    if interpret:  # fewer, larger programs run faster under numpy
        return GemmConfig(64, 64, 64, 4, 4, 1)
    if m_bucket <= 16:  # decode: BLOCK_N 64 gives N/64 programs to stream W
        cfg = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m_bucket <= 64:
        cfg = GemmConfig(64, min(128, max(16, n)), 64, 4, 4, 4)
    elif n <= 64:
        # Thin, memory-bound outputs (x·Aᵀ, dY·B, dYᵀ·S): tiles no wider than the output
        # (a 16-wide output in 64-wide tiles is 4× padded MMA and shared memory) and 32-row
        # tiles, so that M=8192 gives 256 programs (≥ 2× the 132 SMs of an H100) to stream x.
        cfg = GemmConfig(32, max(16, n), 128, 8, 4, 4)
    else:
        cfg = GemmConfig(128, 128, 64, 8, 8, 3)
    return fit(cfg, elem)


@functools.lru_cache(maxsize=4096)
def _gemm_cached(m: int, n_bucket: int, elem: int, interpret: bool, gpu: Optional[str]) -> GemmConfig:
    entry = None if interpret else _entry(gpu, "gemm", f"N={n_bucket}", m, elem)
    if entry is not None:
        return _from_entry(entry, elem)
    return _gemm_config(_bucket(m), min(n_bucket, 128), elem, interpret)


def gemm_config(m: int, n: int, elem: int = 2, *, device=None) -> GemmConfig:
    """Block shape for an [m, n] output of ``_dual_gemm_kernel`` with ``elem``-byte dot operands:
    the table of ``device``'s GPU kind at the nearest measured M, else the heuristic."""
    return _gemm_cached(max(m, 1), _bucket(n), elem, interpreting(), _gpu(device))


def block_r(rank: int) -> int:
    """Padded rank tile of the one-pass kernel (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(rank))


@functools.lru_cache(maxsize=4096)
def _onepass_cached(m: int, n_bucket: int, br: int, elem: int, interpret: bool, gpu: Optional[str]) -> GemmConfig:
    if interpret:
        return _gemm_cached(m, n_bucket, elem, True, None)
    entry = _entry(gpu, "onepass", f"N={n_bucket},R={br}", m, elem)
    if entry is not None:
        return _from_entry(entry, elem, extra_cols=br)
    if _bucket(m) <= 16 and elem == 2:
        # Decode. A 16-row tile with chained dots gets warpsPerCTA=[4,1]: every warp computes
        # the whole tile (80 mma.sync per K step where a plain matmul issues 16). 64 rows on
        # one warpgroup run wgmma without the redundancy (16 per K step); BLOCK_N 32 gives
        # N/32 programs to stream W (128 at N=4096).
        return fit(GemmConfig(64, 32, 128, 1, 4, 4), elem, extra_cols=br)
    return fit(_gemm_cached(m, n_bucket, elem, False, None), elem, extra_cols=br)


def onepass_config(m: int, n: int, rank: int, elem: int = 2, *, device=None) -> GemmConfig:
    """Block shape for the one-pass kernel: the table's, else the base heuristic fitted with
    the A tile beside W."""
    return _onepass_cached(max(m, 1), _bucket(n), block_r(rank), elem, interpreting(), _gpu(device))


@functools.lru_cache(maxsize=4096)
def _route_cached(m: int, n_bucket: int, br: int, gpu: Optional[str]) -> Optional[str]:
    entry = _entry(gpu, "route", f"N={n_bucket},R={br}", m, None)
    return None if entry is None else entry["route"]


def choose_route(m: int, rank: int, dropout: bool = False, *, n: Optional[int] = None, device=None) -> str:
    """'onepass' or 'split': the table's winner for (N bucket, rank tile, nearest M) when
    ``n`` and ``device`` are given and the table has it, else the heuristic (module docstring).

    Dropout always takes the split route (one-pass would draw the mask for every x element
    in every N tile), and so do ranks above ONEPASS_MAX_RANK, whatever a table says.
    """
    if dropout or rank > ONEPASS_MAX_RANK:
        return "split"
    if n is not None and not interpreting():
        route = _route_cached(max(m, 1), _bucket(n), block_r(rank), _gpu(device))
        if route is not None:
            return route
    return "onepass" if m * block_r(rank) <= 16 * ONEPASS_MAX_M else "split"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_assumed_sms: Optional[int] = None


@contextlib.contextmanager
def assume_sms(count: int) -> Iterator[None]:
    """Plan non-CUDA launches as for a GPU with ``count`` SMs (the compiled-code report,
    ``benchmarks/kernel_report.py``, captures the launches of an H100 on CPU tensors)."""
    global _assumed_sms
    previous, _assumed_sms = _assumed_sms, count
    try:
        yield
    finally:
        _assumed_sms = previous


def _sm_count(device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index or 0)
    return _assumed_sms if _assumed_sms is not None else 8


def split_k(tiles: int, k: int, block_k: int, device) -> int:
    """Split the reduction of a thin, deep product (dA = dZᵀ·x, dB = dYᵀ·S) across programs.

    Used only for float32 outputs without epilogue, and never under
    ``torch.use_deterministic_algorithms`` (the atomics change the summation order).
    The interpreter pretends to have 8 SMs so CI exercises the path on small shapes.
    """
    if torch.are_deterministic_algorithms_enabled():
        return 1
    sms = _sm_count(device)
    return max(1, min(16, sms // max(tiles, 1), k // (2 * block_k)))


class MixedPlan(NamedTuple):
    sort_rows: bool
    split: int
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int
    # The shrink's own tiles (0: the linear kernel's). Thin and memory-bound: 32-row tiles
    # give M/32 programs (256 at M=8192, where 128-row tiles gave 64 on 132 SMs).
    shrink_block_m: int = 0
    shrink_block_k: int = 0
    shrink_warps: int = 0
    shrink_stages: int = 0
    # The expand's own tiles (no base GEMM; 0: the linear kernel's). Memory-bound, no K loop:
    # 64×64 on 4 warps holds 96 registers (5 CTAs/SM) where 128×128 on 8 warps held 156 (1).
    expand_block_m: int = 0
    expand_block_n: int = 0
    expand_warps: int = 0


MIXED_SORT_MIN_M = 64


@functools.lru_cache(maxsize=4096)
def _mixed_cached(m: int, k: int, br: int, elem: int, interpret: bool, gpu: Optional[str]) -> MixedPlan:
    sort_rows = m > MIXED_SORT_MIN_M
    tile_r = min(br, 64)
    if interpret:
        return MixedPlan(sort_rows, 2 if k >= 64 and not sort_rows else 1, 32, 64, 32, tile_r, 4, 1)
    split = 1 if sort_rows else max(1, min(8, k // 512))
    entry = _entry(gpu, "mixed", f"K={_bucket(k)},R={br}", m, elem)
    if entry is not None:
        cfg = _from_entry(entry, elem)
        split = entry.get("split", split)
    else:
        bm = 16 if m <= 16 else (64 if m <= 256 else 128)
        cfg = fit(GemmConfig(bm, 64 if m <= 16 else 128, 64, 8, 4 if bm <= 64 else 8, 3), elem)
    shrink = cfg
    if sort_rows:
        shrink = fit(GemmConfig(32, tile_r, 128, 1, 4, 4), elem)
    return MixedPlan(sort_rows, split, cfg.block_m, cfg.block_n, cfg.block_k, tile_r, cfg.num_warps, cfg.num_stages,
                     shrink.block_m, shrink.block_k, shrink.num_warps, shrink.num_stages,
                     min(cfg.block_m, 64), min(cfg.block_n, 64), 4)


def mixed_plan(m: int, k: int, max_rank: int, elem: int = 2, *, device=None) -> MixedPlan:
    """Launch plan of the mixed-adapter kernels.

    * Rows are sorted by slot (a stable counting sort: the slot metadata in rows.py) above
      MIXED_SORT_MIN_M rows, so that a block meets few distinct slots. Rows are *not*
      padded to one slot per block: padding costs (S+1)·(BLOCK_M-1)
      extra rows of base GEMM, +200 % at M=8192, S=128, BLOCK_M=128, where a block of
      sorted rows meets about BLOCK_M·S/M + 1 = 3 slots, each one extra rank-R dot.
    * At decode sizes the shrink's K loop is split across programs (partials summed in a
      fixed order by the consumer: deterministic, batch invariant), for parallelism.
    * A table entry (keyed by the K bucket and block_r(max_rank)) sets the tiles, warps,
      stages and optionally the split; the row sort and the rank tile stay as above.
    * With sorted rows the shrink has tiles of its own (``shrink_*``): 32 rows, BLOCK_K 128.
    * The expand alone (no base GEMM) has tiles of its own (``expand_*``): at most 64×64, 4 warps.
    """
    return _mixed_cached(max(m, 1), k, block_r(max_rank), elem, interpreting(), _gpu(device))
