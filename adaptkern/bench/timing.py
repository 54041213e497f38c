"""Timing: ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` on a CPU.

Every measurement reports the quantiles [0.5, 0.2, 0.8] of the per-call time in ms:

* GPU: ``do_bench`` (warm-up, L2 cache cleared before every call, CUDA events), or with
  ``graph=True`` ``do_bench_cudagraph`` (replays of a CUDA graph: GPU time without host
  overhead, as serving stacks run decode; L2 is not cleared between its calls). Peak
  memory comes from one more call, apart: ``max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call (resident inputs
  and weights are not counted).
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; the quantiles are over its
  blocks (each block's mean per call). No memory figure. A smoke test, not a measurement.

``ceilings`` measures, on a GPU, the two rates a roofline divides by: a large bf16 matmul
(TFLOP/s) and a device-to-device copy (GB/s, bytes read plus written).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)
NOISY_SPREAD = 1.5  # p80/p20 above this: the measurement is flagged as noisy
CPU_MIN_RUN_S = 0.2


@dataclass(frozen=True)
class Timing:
    """Quantiles of one measurement (ms), peak memory above the resident inputs (MiB, GPU only)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: Optional[float] = None

    @property
    def spread(self) -> float:
        """p80 / p20 (1.0: every call took the same time)."""
        return self.p80_ms / self.p20_ms if self.p20_ms > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def method(device: torch.device, graph: bool = False) -> str:
    """The name of the timing method used on ``device`` (stored with the results)."""
    if device.type != "cuda":
        return "torch.utils.benchmark.Timer.blocked_autorange (CPU)"
    if graph:
        return "triton.testing.do_bench_cudagraph (L2 not cleared)"
    return "triton.testing.do_bench (L2 cleared before each call)"


def measure(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0, warmup_ms: float = 25.0,
            graph: bool = False, memory: bool = True) -> Timing:
    """Time the zero-argument ``fn`` on ``device`` (``graph`` and ``memory`` apply on a GPU)."""
    if device.type != "cuda":
        return _cpu(fn)
    import triton.testing

    fn()  # compiles (Triton, torch.compile) before anything is timed
    torch.cuda.synchronize(device)
    peak = peak_memory_mb(fn, device) if memory else None
    if graph:
        q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=list(QUANTILES))
    else:
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(*(float(v) for v in q), peak_mem_mb=peak)


def _cpu(fn) -> Timing:
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=CPU_MIN_RUN_S)
    times = [t * 1e3 for t in m.times]
    if len(times) < 2:
        return Timing(times[0], times[0], times[0])
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(v) for v in q))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory one call of ``fn`` allocates at its peak, above what was allocated before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - before) / 2**20


def l2_flusher(device: torch.device, nbytes: int = 256 * 2**20) -> Callable[[], None]:
    """A callable that writes ``nbytes`` on ``device`` so nothing of the last call stays in L2
    (for timers other than ``do_bench``, which clears the cache itself)."""
    buf = torch.empty(nbytes, dtype=torch.int8, device=device)
    return buf.zero_


def ceilings(device: torch.device) -> dict:
    """{"bf16_tflops": rate of an 8192³ bf16 ``torch.matmul``, "copy_gbps": bandwidth of a
    512 MiB device-to-device copy counting bytes read + written (GB/s = 1e9 B/s)}. GPU only."""
    n, copy_bytes = 8192, 512 * 2**20
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn((n, n), generator=g, device=device).to(torch.bfloat16) for _ in range(2))
    matmul_ms = measure(lambda: torch.matmul(a, b), device, memory=False).median_ms
    src = torch.ones(copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device, memory=False).median_ms
    return {"bf16_tflops": 2.0 * n**3 / (matmul_ms * 1e-3) / 1e12,
            "copy_gbps": 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9}


def roofline_fraction(flops: float, nbytes: float, median_ms: Optional[float], ceil: Optional[dict]) -> Optional[float]:
    """max(flops / matmul rate, bytes / bandwidth) / measured time: 1.0 is the roofline."""
    if not median_ms or not ceil or not ceil.get("bf16_tflops") or not ceil.get("copy_gbps"):
        return None
    ideal_s = max(flops / (ceil["bf16_tflops"] * 1e12), nbytes / (ceil["copy_gbps"] * 1e9))
    return ideal_s / (median_ms * 1e-3)
