"""Launch configurations and the one-pass/split route heuristic, in one cached place.

These defaults are reasoned, not yet measured (no GPU was at hand when they were set; the
tuning issue replaces them with per-GPU tables):

* one-pass recomputes ``x·Aᵀ`` for every N tile: ``R_pad/BLOCK_N`` extra flops over the
  base GEMM (12.5 % at r=16, BLOCK_N=128). At small M the layer is bound by reading W,
  so those flops are free and one launch beats two. At M=8192, K=N=4096 the split route
  pays one more launch and one more read of x (64 MB, ~25 µs at 3 TB/s) against a
  ~390 µs GEMM, less than the one-pass route's 12.5 % (~50 µs): split wins at large M.
* the one-pass epilogue holds a ``BLOCK_M×BLOCK_R`` accumulator next to the output tile,
  so ranks above 64 always take the split route.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton

ONEPASS_MAX_RANK = 64
ONEPASS_MAX_M = 1024


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


def _fit(cfg: GemmConfig, elem: int, extra_cols: int = 0) -> GemmConfig:
    """Shrink stages, then BLOCK_K, then BLOCK_N until the pipelined tiles fit SMEM_BUDGET.

    ``elem`` is the dot operands' size in bytes (2 for fp16/bf16, 4 for fp32, 8 for fp64);
    ``extra_cols`` counts columns loaded beside W in the K loop (the one-pass A tile).
    """
    def smem(c):
        return c.num_stages * (c.block_m * c.block_k + c.block_k * (c.block_n + extra_cols)) * elem

    while smem(cfg) > SMEM_BUDGET and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    while smem(cfg) > SMEM_BUDGET and cfg.block_k > 16:
        cfg = cfg._replace(block_k=cfg.block_k // 2)
    while smem(cfg) > SMEM_BUDGET and cfg.block_n > 32:
        cfg = cfg._replace(block_n=cfg.block_n // 2)
    return cfg


@functools.lru_cache(maxsize=None)
def _gemm_config(m_bucket: int, n: int, elem: int, interpret: bool) -> GemmConfig:
    if interpret:  # fewer, larger programs run faster under numpy
        return GemmConfig(64, 64, 64, 4, 4, 1)
    if m_bucket <= 16:  # decode: BLOCK_N 64 gives N/64 programs to stream W
        cfg = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m_bucket <= 64:
        cfg = GemmConfig(64, 128, 64, 4, 4, 4)
    elif n <= 64:
        cfg = GemmConfig(128, 64, 64, 8, 4, 4)
    else:
        cfg = GemmConfig(128, 128, 64, 8, 8, 3)
    return _fit(cfg, elem)


def gemm_config(m: int, n: int, elem: int = 2) -> GemmConfig:
    """Block shape for an [m, n] output of ``_gemm_kernel`` with ``elem``-byte dot operands."""
    return _gemm_config(_bucket(m), min(n, 128), elem, interpreting())


def block_r(rank: int) -> int:
    """Padded rank tile of the one-pass kernel (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(rank))


def onepass_config(m: int, n: int, rank: int, elem: int = 2) -> GemmConfig:
    """Block shape for the one-pass kernel: the base config, fitted with the A tile beside W."""
    cfg = gemm_config(m, n, elem)
    return cfg if interpreting() else _fit(cfg, elem, extra_cols=block_r(rank))


def choose_route(m: int, rank: int, dropout: bool = False) -> str:
    """'onepass' or 'split' (see the module docstring for the reasoning). Dropout takes the
    split route: one-pass would draw the mask for every x element in every N tile."""
    if rank <= ONEPASS_MAX_RANK and m <= ONEPASS_MAX_M and not dropout:
        return "onepass"
    return "split"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k(tiles: int, k: int, block_k: int, device) -> int:
    """Split the reduction of a thin, deep product (dA = dZᵀ·x, dB = dYᵀ·S) across programs.

    Used only for float32 outputs without epilogue, and never under
    ``torch.use_deterministic_algorithms`` (the atomics change the summation order).
    The interpreter pretends to have 8 SMs so CI exercises the path on small shapes.
    """
    if torch.are_deterministic_algorithms_enabled():
        return 1
    sms = 8 if device.type != "cuda" else _num_sms(device.index or 0)
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


MIXED_SORT_MIN_M = 64


def mixed_plan(m: int, k: int, max_rank: int, elem: int = 2) -> MixedPlan:
    """Launch plan of the mixed-adapter kernels.

    * Rows are sorted by slot (counting sort, the alignment op with block_m=1) above
      MIXED_SORT_MIN_M rows, so that a block meets few distinct slots. Rows are *not*
      padded to one slot per block as DESIGN §3 proposed: padding costs (S+1)·(BLOCK_M-1)
      extra rows of base GEMM, +200 % at M=8192, S=128, BLOCK_M=128, where a block of
      sorted rows meets about BLOCK_M·S/M + 1 = 3 slots, each one extra rank-R dot.
    * At decode sizes the shrink's K loop is split across programs (partials summed in a
      fixed order by the consumer: deterministic, batch invariant), for parallelism.
    """
    interpret = interpreting()
    sort_rows = m > MIXED_SORT_MIN_M
    br = min(block_r(max_rank), 64)
    if interpret:
        return MixedPlan(sort_rows, 2 if k >= 64 and not sort_rows else 1, 32, 64, 32, br, 4, 1)
    split = 1 if sort_rows else max(1, min(8, k // 512))
    bm = 16 if m <= 16 else (64 if m <= 256 else 128)
    cfg = _fit(GemmConfig(bm, 64 if m <= 16 else 128, 64, 8, 4 if bm <= 64 else 8, 3), elem)
    return MixedPlan(sort_rows, split, bm, cfg.block_n, cfg.block_k, br, cfg.num_warps, cfg.num_stages)
