"""Launch configurations and the one-pass/split route heuristic, in one cached place.

These defaults are reasoned, not yet measured (no GPU was at hand when they were set; the
tuning issue replaces them with per-GPU tables):

* route, from a byte/flop model (docs/compiled-code.md): one-pass recomputes ``x·Aᵀ`` for
  every N tile, ``2·M·K·R_pad·N/BLOCK_N`` extra flops (+12.5 % at R_pad=16, BLOCK_N=128:
  310 against split's 277 GFLOP at M=8192, K=N=4096); split pays one more launch and one
  more read of x (2·M·K bytes: 64 MiB, ~20 µs at 3.35 TB/s). Both routes reach the same
  2 CTAs/SM (kernel_report.py), so at ~650 TFLOP/s the extra flops cost
  M·R_pad·0.40 ns and the split M·2.45 ns + ~5 µs: equal at M ≈ 1250 for R_pad=16, 480 for
  32, 210 for 64. The heuristic takes one-pass while M·R_pad <= 16·ONEPASS_MAX_M.
* the one-pass epilogue holds a ``BLOCK_M×BLOCK_R`` accumulator next to the output tile,
  so ranks above 64 always take the split route.

Per-GPU tables (``configs/<gpu>.json``, written by ``adaptkern tune``; schema in
``configs/README.md``) replace these heuristics where they have an entry:

* a lookup needs ``device=`` (the launchers pass their tensor's device); ``device=None``,
  a non-CUDA device, the interpreter, a table tuned for another operand size, a missing
  file, kernel or shape all give the heuristic;
* within a shape, the entry of the measured M nearest to m in log2 distance is taken
  (``m² < M_lo·M_hi`` picks M_lo; a tie goes to the smaller M);
* every entry still passes through :func:`_fit`: a table cannot produce a launch whose
  pipelined tiles overflow shared memory;
* a malformed table raises ``ValueError`` naming the file and the field (at the first
  launch on that GPU; ``tests/test_config_tables.py`` validates every shipped table on CPU),
  rather than silently running untuned;
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


def _fit(cfg: GemmConfig, elem: int, extra_cols: int = 0) -> GemmConfig:
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
TABLE_VERSION = 1
TABLE_KERNELS = ("gemm", "onepass", "mixed", "route")
ROUTE_NAMES = ("onepass", "split")
# Shape keys per kernel: N, K are power-of-two buckets (smallest power of two >= the size),
# R the padded rank tile block_r(rank). The launch parameters each entry must hold, and the
# informational fields it may hold (measurements written by ``adaptkern tune``).
_SHAPE_KEYS = {"gemm": ("N",), "onepass": ("N", "R"), "mixed": ("K", "R"), "route": ("N", "R")}
_TILE_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
_REQUIRED = {"gemm": _TILE_FIELDS + ("group_m",), "onepass": _TILE_FIELDS + ("group_m",), "mixed": _TILE_FIELDS,
             "route": ("route",)}
_OPTIONAL = {"mixed": ("split",)}
_INFO_FIELDS = ("ms", "heuristic_ms", "onepass_ms", "split_ms", "candidates", "heuristic")
_TOP_FIELDS = ("version", "elem", "env") + TABLE_KERNELS
# Bounds that keep every entry launchable: with every block <= 256 and BLOCK_K >= 16, _fit
# can always reach SMEM_BUDGET; tl.dot needs every block >= 16.
_BOUNDS = {"block_m": (16, 256), "block_n": (16, 256), "block_k": (16, 256), "group_m": (1, 64),
           "num_warps": (1, 16), "num_stages": (1, 8), "split": (1, 16)}
_POW2 = ("block_m", "block_n", "block_k", "num_warps")


class Table(NamedTuple):
    """A parsed table: ``kernels[kernel][shape] = (sorted Ms, entries in the same order)``."""

    source: str
    elem: int
    kernels: dict


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _table_error(source: str, where: str, msg: str) -> ValueError:
    return ValueError(f"config table {source}: {where}: {msg} (schema: adaptkern/ops/configs/README.md)")


def shape_key(kernel: str, **sizes: int) -> str:
    """The key of a shape in a table, e.g. ``shape_key("onepass", N=14336, R=16) == "N=16384,R=16"``.

    N and K are bucketed to the next power of two, R to the padded rank tile ``block_r``.
    """
    parts = []
    for name in _SHAPE_KEYS[kernel]:
        v = sizes[name]
        parts.append(f"{name}={block_r(v) if name == 'R' else _bucket(v)}")
    return ",".join(parts)


def _parse_shape(kernel: str, key: str, source: str) -> str:
    names = _SHAPE_KEYS[kernel]
    pattern = ",".join(rf"{n}=(\d+)" for n in names)
    match = re.fullmatch(pattern, key) if isinstance(key, str) else None
    example = shape_key(kernel, N=4096, K=4096, R=16)
    if match is None:
        raise _table_error(source, f"{kernel}[{key!r}]", f"shape key must look like {example!r}")
    for name, v in zip(names, match.groups()):
        v = int(v)
        if not _is_pow2(v) or (name == "R" and v < 16):
            raise _table_error(source, f"{kernel}[{key!r}]",
                               f"{name}={v} is not a bucket (a power of two{', >= 16' if name == 'R' else ''})")
        if kernel == "route" and name == "R" and v > ONEPASS_MAX_RANK:
            raise _table_error(source, f"{kernel}[{key!r}]",
                               f"R={v}: ranks above {ONEPASS_MAX_RANK} always take the split route")
    return key


def _parse_entry(kernel: str, where: str, entry, source: str) -> dict:
    if not isinstance(entry, dict):
        raise _table_error(source, where, f"entry must be an object, got {type(entry).__name__}")
    allowed = set(_REQUIRED[kernel]) | set(_OPTIONAL.get(kernel, ())) | set(_INFO_FIELDS)
    for name in entry:
        if name not in allowed:
            raise _table_error(source, f"{where}.{name}", f"unknown field; {kernel} entries hold "
                               f"{', '.join(_REQUIRED[kernel] + _OPTIONAL.get(kernel, ()))}")
    for name in _REQUIRED[kernel]:
        if name not in entry:
            raise _table_error(source, f"{where}.{name}", "missing")
    out = {}
    for name in _REQUIRED[kernel] + _OPTIONAL.get(kernel, ()):
        if name not in entry:
            continue
        v = entry[name]
        if name == "route":
            if v not in ROUTE_NAMES:
                raise _table_error(source, f"{where}.route", f"must be one of {ROUTE_NAMES}, got {v!r}")
            out[name] = v
            continue
        lo, hi = _BOUNDS[name]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _table_error(source, f"{where}.{name}", f"must be an integer in [{lo}, {hi}], got {v!r}")
        if name in _POW2 and not _is_pow2(v):
            raise _table_error(source, f"{where}.{name}", f"must be a power of two, got {v}")
        out[name] = v
    return out


def parse_table(data, source: str = "<table>") -> Table:
    """Validate a table (the parsed JSON) and index it for lookup; ``ValueError`` names the
    file (``source``) and the field at fault."""
    if not isinstance(data, dict):
        raise _table_error(source, "top level", f"must be an object, got {type(data).__name__}")
    for name in data:
        if name not in _TOP_FIELDS:
            raise _table_error(source, name, f"unknown top-level field; expected some of {_TOP_FIELDS}")
    if data.get("version") != TABLE_VERSION:
        raise _table_error(source, "version", f"must be {TABLE_VERSION}, got {data.get('version')!r}")
    elem = data.get("elem")
    if elem not in (2, 4, 8) or isinstance(elem, bool):
        raise _table_error(source, "elem", f"must be the dot operand size in bytes (2, 4 or 8), got {elem!r}")
    if not isinstance(data.get("env", {}), dict):
        raise _table_error(source, "env", "must be an object")
    kernels = {}
    for kernel in TABLE_KERNELS:
        shapes = data.get(kernel, {})
        if not isinstance(shapes, dict):
            raise _table_error(source, kernel, "must be an object keyed by shape")
        parsed = {}
        for key, by_m in shapes.items():
            _parse_shape(kernel, key, source)
            if not isinstance(by_m, dict) or not by_m:
                raise _table_error(source, f"{kernel}[{key!r}]", "must be a non-empty object keyed by M")
            rows = []
            for m_key, entry in by_m.items():
                where = f"{kernel}[{key!r}][{m_key!r}]"
                if not (isinstance(m_key, str) and m_key.isdigit() and int(m_key) >= 1):
                    raise _table_error(source, where, "M keys must be positive integers written as strings")
                rows.append((int(m_key), _parse_entry(kernel, where, entry, source)))
            rows.sort(key=lambda r: r[0])
            parsed[key] = (tuple(m for m, _ in rows), tuple(e for _, e in rows))
        kernels[kernel] = parsed
    return Table(source, elem, kernels)


@functools.lru_cache(maxsize=None)
def _load_table(directory: Path, slug: str) -> Optional[Table]:
    """The table of GPU kind ``slug`` in ``directory``, or None when there is no file."""
    path = Path(directory) / f"{slug}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _table_error(str(path), f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
    return parse_table(data, str(path))


_override: Optional[Table] = None


@contextlib.contextmanager
def table_override(data: Optional[dict]) -> Iterator[None]:
    """Use ``data`` (a table as parsed JSON; ``{"version": 1, "elem": 2}`` holds no entry) as
    the table of every CUDA device inside the block, instead of the files. ``adaptkern tune``
    times its candidates through it; tests use it as a loader hook. Not thread-safe."""
    global _override
    previous = _override
    _override = parse_table(data, "<override>") if data is not None else None
    clear_caches()
    try:
        yield
    finally:
        _override = previous
        clear_caches()


@functools.lru_cache(maxsize=None)
def _device_slug(index: int) -> str:
    from adaptkern.bench.report import gpu_slug  # lazy: only on a GPU, at its first launch

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
    return _fit(cfg, elem, extra_cols)


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
    return _fit(cfg, elem)


@functools.lru_cache(maxsize=4096)
def _gemm_cached(m: int, n_bucket: int, elem: int, interpret: bool, gpu: Optional[str]) -> GemmConfig:
    entry = None if interpret else _entry(gpu, "gemm", f"N={n_bucket}", m, elem)
    if entry is not None:
        return _from_entry(entry, elem)
    return _gemm_config(_bucket(m), min(n_bucket, 128), elem, interpret)


def gemm_config(m: int, n: int, elem: int = 2, *, device=None) -> GemmConfig:
    """Block shape for an [m, n] output of ``_gemm_kernel`` with ``elem``-byte dot operands:
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
        return _fit(GemmConfig(64, 32, 128, 1, 4, 4), elem, extra_cols=br)
    return _fit(_gemm_cached(m, n_bucket, elem, False, None), elem, extra_cols=br)


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
        cfg = _fit(GemmConfig(bm, 64 if m <= 16 else 128, 64, 8, 4 if bm <= 64 else 8, 3), elem)
    shrink = cfg
    if sort_rows:
        shrink = _fit(GemmConfig(32, tile_r, 128, 1, 4, 4), elem)
    return MixedPlan(sort_rows, split, cfg.block_m, cfg.block_n, cfg.block_k, tile_r, cfg.num_warps, cfg.num_stages,
                     shrink.block_m, shrink.block_k, shrink.num_warps, shrink.num_stages)


def mixed_plan(m: int, k: int, max_rank: int, elem: int = 2, *, device=None) -> MixedPlan:
    """Launch plan of the mixed-adapter kernels.

    * Rows are sorted by slot (counting sort, the alignment op with block_m=1) above
      MIXED_SORT_MIN_M rows, so that a block meets few distinct slots. Rows are *not*
      padded to one slot per block as DESIGN §3 proposed: padding costs (S+1)·(BLOCK_M-1)
      extra rows of base GEMM, +200 % at M=8192, S=128, BLOCK_M=128, where a block of
      sorted rows meets about BLOCK_M·S/M + 1 = 3 slots, each one extra rank-R dot.
    * At decode sizes the shrink's K loop is split across programs (partials summed in a
      fixed order by the consumer: deterministic, batch invariant), for parallelism.
    * A table entry (keyed by the K bucket and block_r(max_rank)) sets the tiles, warps,
      stages and optionally the split; the row sort and the rank tile stay as above.
    * With sorted rows the shrink has tiles of its own (``shrink_*``): 32 rows, BLOCK_K 128.
    """
    return _mixed_cached(max(m, 1), k, block_r(max_rank), elem, interpreting(), _gpu(device))
