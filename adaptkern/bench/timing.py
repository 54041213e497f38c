"""Timing: CUDA events with the L2 flushed between iterations, quantiles [0.5, 0.2, 0.8],
peak memory, and the two ceilings (bf16 matmul rate, device-to-device copy bandwidth).

On a GPU (the method of ``triton.testing.do_bench``)::

    fn()                                   # warm-up: Triton / torch.compile compilation
    estimate the time of one call over 5 calls
    run warm-up calls for ~warmup_ms
    repeat n times (~rep_ms in all, 10..1000):
        flush.zero_()                      # write 256 MB: nothing of the last call stays in L2
        start[i].record(); fn(); end[i].record()
    one synchronize, then the events' elapsed times

Nothing inside the timed region waits on the host: the only synchronisations are before
the estimate and after the last iteration. Peak memory is measured in one more call,
apart (after the compiling call, before the timing): ``max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the call (inputs and weights
already resident are not counted).

The 256 MB flush keeps the GPU busy for ~0.1 ms before each timed call, which hides up to
that much host overhead (Python, launches) of the call itself: small decode-size calls are
measured as GPU time plus whatever host time exceeds it. ``graph=True`` times replays of a
CUDA graph instead (how serving stacks run decode): GPU time alone.

On a CPU, ``time.perf_counter`` around each call (no flush, no memory figure): a smoke
test of the harness, not a measurement.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)
FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: Optional[float]
    reps: int


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


class Timer:
    """Times zero-argument callables on ``device`` ("cuda" or "cpu")."""

    def __init__(self, device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10,
                 max_reps: int = 1000, cpu_budget_s: float = 0.2, cpu_min_reps: int = 3, cpu_max_reps: int = 50):
        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self.cpu_budget_s, self.cpu_min_reps, self.cpu_max_reps = cpu_budget_s, cpu_min_reps, cpu_max_reps
        self._flush: Optional[torch.Tensor] = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def flush(self) -> None:
        """Evict L2 by writing 256 MB (enqueued on the stream; no host sync)."""
        if self._flush is None:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._flush.zero_()

    def __call__(self, fn: Callable[[], object], *, memory: bool = True, graph: bool = False) -> Timing:
        """Time ``fn``; ``graph=True`` (GPU only) times replays of a CUDA graph captured from it."""
        return self._cuda(fn, memory, graph) if self.is_cuda else self._cpu(fn)

    def capture(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Capture ``fn`` in a CUDA graph (after warm-up on a side stream, as PyTorch
        requires) and return its ``replay``. Raises if ``fn`` cannot be captured (a host sync)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

        def replay():
            graph.replay()

        replay.keep = (graph, out)  # the graph and its output buffers live as long as replay
        return replay

    def _cuda(self, fn, memory: bool, graph: bool = False) -> Timing:
        fn()  # compiles (Triton, torch.compile) before anything is timed
        torch.cuda.synchronize(self.device)
        timed = self.capture(fn) if graph else fn
        peak = self.peak_memory_mb(fn) if memory else None
        fn = timed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            self.flush()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate))):
            fn()
        reps = max(self.min_reps, min(self.max_reps, int(self.rep_ms / estimate)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        med, p20, p80 = _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])
        return Timing(med, p20, p80, peak, reps)

    def peak_memory_mb(self, fn) -> float:
        """Memory one call allocates at its peak, above what was allocated before it (MiB)."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        return (peak - before) / 2**20

    def _cpu(self, fn) -> Timing:
        fn()
        times = []
        deadline = time.perf_counter() + self.cpu_budget_s
        while len(times) < self.cpu_min_reps or (len(times) < self.cpu_max_reps and time.perf_counter() < deadline):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        med, p20, p80 = _quantiles(times) if len(times) > 1 else (statistics.median(times),) * 3
        return Timing(med, p20, p80, None, len(times))

    def release(self) -> None:
        self._flush = None


def measure_ceilings(timer: Timer) -> dict:
    """{"bf16_tflops": rate of a large bf16 torch.matmul, "copy_gbps": device-to-device
    copy bandwidth counting bytes read + written (GB/s = 1e9 B/s)}.

    GPU: an 8192³ matmul and a 1 GiB copy (512 MiB read + 512 MiB written). CPU: 512³ and
    a 32 MiB copy, for the smoke test only.
    """
    n, copy_bytes = (8192, 512 * 2**20) if timer.is_cuda else (512, 32 * 2**20)
    return {"bf16_tflops": 2.0 * n**3 / (_matmul_ms(timer, n) * 1e-3) / 1e12,
            "copy_gbps": 2.0 * copy_bytes / (_copy_ms(timer, copy_bytes) * 1e-3) / 1e9}


def _matmul_ms(timer: Timer, n: int) -> float:
    g = torch.Generator(device=timer.device).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=timer.device, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn((n, n), generator=g, device=timer.device, dtype=torch.float32).to(torch.bfloat16)
    return timer(lambda: torch.matmul(a, b), memory=False).median_ms


def _copy_ms(timer: Timer, nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=timer.device).fill_(1.0)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src), memory=False).median_ms


def roofline_fraction(flops: float, nbytes: float, median_ms: Optional[float], ceilings: dict) -> Optional[float]:
    """max(flops / matmul rate, bytes / bandwidth) / measured time: 1.0 is the roofline."""
    if not median_ms or not ceilings or not ceilings.get("bf16_tflops") or not ceilings.get("copy_gbps"):
        return None
    ideal_s = max(flops / (ceilings["bf16_tflops"] * 1e12), nbytes / (ceilings["copy_gbps"] * 1e9))
    return ideal_s / (median_ms * 1e-3)
