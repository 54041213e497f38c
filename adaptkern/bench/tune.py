"""``adaptkern tune``: measure launch configs on this GPU and write ``configs/<gpu>.json``.

What is measured (bf16, Llama-8B-like layers, K = 4096; M ∈ ``M_FULL``)::

    gemm     the split route's main GEMM, y = x·Wᵀ + s·S·Bᵀ (S [M, 16] fp32), N ∈ {4096, 14336}.
             Its entry applies to every ``_gemm_kernel`` launch with that N bucket, backward too.
    onepass  the one-pass forward, N ∈ {4096, 14336}, r ∈ {16, 64}, M <= 1024 (the heuristic's
             one-pass limit; the route step uses the M = 1024 entry above it).
    mixed    the mixed forward (shrink + linear), K = N = 4096, 8 adapters with uniform ids,
             r ∈ {16, 64, 256}.
    route    one-pass against split forward at every (N, r <= 64, M), both with the configs
             this run tuned (or the table already on disk); the faster route is recorded.

Search, per (kernel, shape, M), over candidates that ``config._fit`` leaves unchanged (one it
would shrink duplicates a smaller one):

    1. tiles: BLOCK_M by M (M <= 16: 16; M <= 64: 16, 64; else 64, 128) × BLOCK_N {64, 128, 256}
       × BLOCK_K {64, 128} (mixed: 64); 8 warps for tiles of 128×128 and more, else 4;
       3 stages; GROUP_M 8.
    2. one change at a time around the best: the other warp count (4 <-> 8); gemm and
       one-pass also the other stage counts of {2, 3, 4}; mixed at M <= 64 also the shrink
       split {1, 2, 4, 8} (a grid size: no compile).
    --quick: M ∈ {1, 64, 1024, 8192}, N = 4096, r = 16, BLOCK_K 64 only, no step 2.

BLOCK_K 32 and the mixed kernels' stage counts are left out to keep the run short: Triton
compiles every distinct config (see the time estimate below).

Every candidate runs once and is compared with a float32 reference first (bound: twice the
error of the same computation in eager bf16, plus 4e-3 × max(1, max|ref|)); a wrong or failing
candidate is reported and never kept. The current heuristic is measured too, and a candidate replaces it
only when it is at least ``MIN_GAIN`` faster (so timing noise does not churn the tables).
Each entry records the winner's median ms (``ms``), the heuristic's (``heuristic_ms``) and
its launch parameters (``heuristic``), so configs/NOTES.md can put predicted beside measured.

Timing: ``bench.timing.Timer`` (CUDA events, L2 flushed before every call), ~20 ms of
repetitions per candidate. Run time is dominated by Triton compiling each distinct config.
:func:`estimate` counts compiles (an upper bound) and timings and prints an ESTIMATE at the
start: ~7.9 min for the full run on an H100, ~1.5 min with --quick. It is not a
measurement: no GPU run has been made. It assumes 1.5 s per compile (compiling 107 of the
candidates for sm_90 ahead of time on the CPU-only development machine averaged 1.2 s,
0.4 to 1.8 s by kernel), 50 ms per timing and 0.3 s per point for inputs and references;
the run prints its real elapsed time at the end, to correct these figures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from adaptkern.ops import config

KERNELS = ("gemm", "onepass", "mixed", "route")
M_FULL = (1, 16, 64, 256, 1024, 2048, 4096, 8192)
M_QUICK = (1, 64, 1024, 8192)
K = 4096
N_FULL = (4096, 14336)
N_QUICK = (4096,)
RANKS_FULL = (16, 64, 256)
RANKS_QUICK = (16,)
ONEPASS_M_MAX = config.ONEPASS_MAX_M  # above it one-pass is predicted to lose (config docstring)
MIXED_ADAPTERS = 8
GEMM_RANK = 16  # rank of the second product in the tuned GEMM
SCALE = 2.0
MIN_GAIN = 0.02  # a candidate must beat the heuristic by 2 % to replace it
ATOL = 4e-3  # bf16, as bench.baselines
DTYPE = torch.bfloat16
ELEM = 2
REP_MS, WARMUP_MS = 20.0, 5.0
# Assumed costs for the estimate (no GPU run yet; see the module docstring).
COMPILE_S, TIMING_S, POINT_S = 1.5, 0.05, 0.3
EXIT_NO_CUDA = 2


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the plan: points and candidates -----------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One (kernel, shape, M) to tune. ``n`` is N (K for mixed is ``K``); ``r`` the rank."""

    kernel: str
    m: int
    n: int
    r: int

    @property
    def key(self) -> str:
        if self.kernel == "gemm":
            return config.shape_key("gemm", N=self.n)
        if self.kernel == "mixed":
            return config.shape_key("mixed", K=K, R=self.r)
        return config.shape_key(self.kernel, N=self.n, R=self.r)

    @property
    def label(self) -> str:
        rank = "" if self.kernel == "gemm" else f" r={self.r}"
        return f"{self.kernel} K={K} N={self.n}{rank} M={self.m}"


def points(kernel: str, quick: bool) -> list[Point]:
    ms = M_QUICK if quick else M_FULL
    ns = N_QUICK if quick else N_FULL
    ranks = RANKS_QUICK if quick else RANKS_FULL
    if kernel == "gemm":
        return [Point("gemm", m, n, GEMM_RANK) for n in ns for m in ms]
    if kernel == "onepass":
        return [Point("onepass", m, n, r) for n in ns for r in ranks if r <= config.ONEPASS_MAX_RANK
                for m in ms if m <= ONEPASS_M_MAX]
    if kernel == "mixed":
        return [Point("mixed", m, K, r) for r in ranks for m in ms]
    if kernel == "route":
        return [Point("route", m, n, r) for n in ns for r in ranks if r <= config.ONEPASS_MAX_RANK for m in ms]
    raise ValueError(f"unknown kernel {kernel!r}; expected some of {KERNELS}")


def _block_ms(m: int) -> tuple[int, ...]:
    if m <= 16:
        return (16,)
    if m <= 64:
        return (16, 64)
    return (64, 128)


def _fits(p: Point, entry: dict) -> bool:
    """Whether ``config._fit`` leaves the candidate as it is (the launcher would shrink it otherwise)."""
    cfg = config.GemmConfig(entry["block_m"], entry["block_n"], entry["block_k"], entry.get("group_m", 8),
                            entry["num_warps"], entry["num_stages"])
    extra = config.block_r(p.r) if p.kernel == "onepass" else 0
    return config._fit(cfg, ELEM, extra) == cfg


def _entry(p: Point, bm: int, bn: int, bk: int, warps: int, stages: int, split: Optional[int] = None) -> dict:
    e = {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages}
    if p.kernel == "mixed":
        e["split"] = split if split is not None else heuristic_entry(p)["split"]
    else:
        e["group_m"] = 8
    return e


def stage1(p: Point, quick: bool) -> list[dict]:
    out = []
    for bm in _block_ms(p.m):
        for bn in (64, 128, 256):
            for bk in (64,) if quick or p.kernel == "mixed" else (64, 128):
                e = _entry(p, bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3)
                if _fits(p, e):
                    out.append(e)
    return out


def stage2(p: Point, best: dict) -> list[dict]:
    """One change at a time around the best tile: the other warp count and (gemm, one-pass)
    the other stage counts; mixed at decode sizes also the shrink split (no compile)."""
    out = [{**best, "num_warps": 12 - best["num_warps"]}] if best["num_warps"] in (4, 8) else []
    if p.kernel != "mixed":
        out += [{**best, "num_stages": s} for s in (2, 3, 4) if s != best["num_stages"]]
    out = [e for e in out if _fits(p, e)]
    if p.kernel == "mixed" and p.m <= config.MIXED_SORT_MIN_M:
        out += [{**best, "split": s} for s in (1, 2, 4, 8) if s != best["split"]]
    return out


def heuristic_entry(p: Point) -> dict:
    """The launch parameters the heuristic picks (``device=None``: no table)."""
    if p.kernel == "gemm":
        return config.gemm_config(p.m, p.n, ELEM)._asdict()
    if p.kernel == "onepass":
        return config.onepass_config(p.m, p.n, p.r, ELEM)._asdict()
    plan = config.mixed_plan(p.m, K, p.r, ELEM)
    return {"block_m": plan.block_m, "block_n": plan.block_n, "block_k": plan.block_k,
            "num_warps": plan.num_warps, "num_stages": plan.num_stages, "split": plan.split}


def estimate(kernels: Sequence[str], quick: bool) -> dict:
    """An upper-bound count of Triton compiles and timings, and the seconds they would take
    at the assumed costs (COMPILE_S per compile, TIMING_S per timing, POINT_S per point):
    an ESTIMATE, not a measurement."""
    compiles: set = set()
    timings = npoints = 0
    for kernel in kernels:
        for p in points(kernel, quick):
            npoints += 1
            if kernel == "route":
                timings += 3  # one-pass, split (tuned), the heuristic's route (heuristic configs)
                compiles.add(("route shrink", p.r, p.m == 1, _block_ms(p.m)))  # split's heuristic shrink GEMM
                continue
            cands = stage1(p, quick) + [heuristic_entry(p)]
            stage2_max = 1 if kernel == "mixed" else 3
            extra = 0 if quick else stage2_max + (3 if kernel == "mixed" and p.m <= config.MIXED_SORT_MIN_M else 0)
            timings += len(cands) + extra
            # Triton compiles once per constexpr set (BLOCK_R: the mixed kernels cap it at 64)
            # and specializes M == 1 apart.
            tile_r = 0 if kernel == "gemm" else min(config.block_r(p.r), 64 if kernel == "mixed" else 1 << 30)
            variant = (kernel, tile_r, p.m == 1)
            compiles |= {(variant, tuple(sorted((k, v) for k, v in c.items() if k != "split"))) for c in cands}
            if not quick:  # step 2: at most stage2_max new configs per point (fewer where winners repeat)
                compiles |= {(variant, p, i) for i in range(stage2_max)}
    kernels_per_config = {k: 2 if k[0][0] == "mixed" else 1 for k in compiles}  # mixed: shrink + linear
    n_compiles = sum(kernels_per_config.values())
    seconds = n_compiles * COMPILE_S + timings * TIMING_S + npoints * POINT_S
    return {"points": npoints, "compiles": n_compiles, "timings": timings, "seconds": seconds}


# -- inputs, reference and the timed call per point --------------------------------------------


def _randn(shape, std, device, gen, dtype=DTYPE):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


@dataclass
class Problem:
    """The call to time (``fn``), the float32 reference of its output, and eager bf16's output
    (the error bound is twice eager's error)."""

    fn: Callable[[], torch.Tensor]
    ref: torch.Tensor
    eager: torch.Tensor
    route: Optional[Callable[[str], Callable[[], torch.Tensor]]] = None


def _problem(p: Point, device) -> Problem:
    from adaptkern.bench.baselines import eager_mixed
    from adaptkern.bench.cases import uniform_adapter_ids
    from adaptkern.ops.adapter_linear import _dot_dtype, adapter_linear_op, gemm
    from adaptkern.ops.mixed_adapter_linear import mixed_adapter_linear_op

    gen = torch.Generator(device=device).manual_seed(KERNELS.index(p.kernel) * 10**6 + p.m * 7 + p.n * 3 + p.r)
    m, n, r = p.m, p.n, p.r
    x = _randn((m, K), 1.0, device, gen)
    w = _randn((n, K), K**-0.5, device, gen)
    if p.kernel == "gemm":
        s = _randn((m, r), 1.0, device, gen, torch.float32)
        b_w = _randn((n, r), r**-0.5, device, gen)
        y = torch.empty((m, n), dtype=DTYPE, device=device)
        ref = x.float() @ w.float().t() + SCALE * (s @ b_w.float().t())
        eager = F.linear(x, w) + F.linear(s.to(DTYPE), b_w) * SCALE
        dd = _dot_dtype(DTYPE)
        return Problem(lambda: gemm(y, x, w.t(), p2=s, q2=b_w.t(), alpha2=SCALE, dot_dtype=dd), ref, eager)
    if p.kernel in ("onepass", "route"):
        a_w = _randn((r, K), K**-0.5, device, gen)
        b_w = _randn((n, r), r**-0.5, device, gen)
        ref = x.float() @ w.float().t() + SCALE * ((x.float() @ a_w.float().t()) @ b_w.float().t())
        eager = F.linear(x, w) + F.linear(F.linear(x, a_w), b_w) * SCALE

        def call(route):
            return lambda: adapter_linear_op(x, w, None, a_w, None, b_w, None, SCALE, "identity", 0.0, None, False,
                                             route)[0]

        return Problem(call("onepass"), ref, eager, route=call)
    # mixed
    s_count = MIXED_ADAPTERS
    a_all = _randn((s_count, r, K), K**-0.5, device, gen)
    b_all = _randn((s_count, n, r), r**-0.5, device, gen)
    scales = torch.linspace(0.5, 2.0, s_count, dtype=torch.float32, device=device)
    ids_cpu = uniform_adapter_ids(m, s_count, seed=m)
    ids = ids_cpu.to(device)
    groups = [(slot, torch.nonzero(ids_cpu == slot).flatten().to(device)) for slot in sorted(set(ids_cpu.tolist()))]
    ref = x.float() @ w.float().t()
    for slot, rows in groups:
        xs = x.float().index_select(0, rows)
        ref.index_add_(0, rows, (xs @ a_all[slot].float().t()) @ b_all[slot].float().t() * float(scales[slot]))
    eager = eager_mixed(x, w, None, a_all, b_all, groups, scales.tolist())
    return Problem(lambda: mixed_adapter_linear_op(x, w, None, a_all, None, b_all, None, scales, None, None, ids,
                                                   False)[0], ref, eager)


def check_output(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor) -> tuple[bool, float, float]:
    """(ok, error, bound): max |out − ref| <= 2·max |eager − ref| + ATOL·max(1, max |ref|)."""
    if tuple(out.shape) != tuple(ref.shape):
        return False, math.inf, 0.0
    err = (out.float() - ref).abs().nan_to_num(nan=math.inf).max().item()
    bound = 2.0 * (eager.float() - ref).abs().max().item() + ATOL * max(1.0, ref.abs().max().item())
    return err <= bound, err, bound


# -- measuring ---------------------------------------------------------------------------------


EMPTY = {"version": config.TABLE_VERSION, "elem": ELEM}


def _one_entry_table(p: Point, entry: dict) -> dict:
    """A table holding ``entry`` alone: every M of p's shape looks it up."""
    return {**EMPTY, p.kernel: {p.key: {"1": entry}}}


def _launched(p: Point, device) -> dict:
    """The launch parameters the launcher looks up for p under the current table (a guard
    that the override reached the lookup)."""
    if p.kernel == "gemm":
        return config.gemm_config(p.m, p.n, ELEM, device=device)._asdict()
    if p.kernel == "onepass":
        return config.onepass_config(p.m, p.n, p.r, ELEM, device=device)._asdict()
    plan = config.mixed_plan(p.m, K, p.r, ELEM, device=device)
    return {"block_m": plan.block_m, "block_n": plan.block_n, "block_k": plan.block_k,
            "num_warps": plan.num_warps, "num_stages": plan.num_stages, "split": plan.split}


def _short(e: dict) -> str:
    s = f"{e['block_m']}x{e['block_n']}x{e['block_k']} w{e['num_warps']} s{e['num_stages']}"
    return s + (f" split{e['split']}" if "split" in e else "")


class Tuner:
    def __init__(self, device, quick: bool, log: Callable[[str], None]):
        from adaptkern.bench.timing import Timer

        self.device, self.quick, self.log = device, quick, log
        self.timer = Timer(device, warmup_ms=WARMUP_MS, rep_ms=REP_MS)
        self.rejected = 0

    def measure(self, table: dict, fn: Callable[[], torch.Tensor], prob: Problem, what: str) -> Optional[float]:
        """Check, then time ``fn`` with ``table`` installed; None (logged) when it fails or is wrong."""
        with config.table_override(table):
            try:
                out = fn()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is dropped
                self.log(f"    dropped {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                self.rejected += 1
                return None
            ok, err, bound = check_output(out, prob.ref, prob.eager)
            del out
            if not ok:
                self.log(f"    dropped {what}: WRONG (err {err:.3g} > bound {bound:.3g})")
                self.rejected += 1
                return None
            return self.timer(fn, memory=False).median_ms

    def tune_point(self, p: Point) -> Optional[dict]:
        prob = _problem(p, self.device)
        heur = heuristic_entry(p)
        heur_ms = self.measure(EMPTY, prob.fn, prob, f"heuristic {_short(heur)}")
        results: dict = {}

        def run(cands):
            for e in cands:
                key = tuple(sorted(e.items()))
                if key in results:
                    continue
                if all(heur.get(k) == v for k, v in e.items()):  # the heuristic itself: measured above
                    results[key] = (e, heur_ms)
                    continue
                table = _one_entry_table(p, e)
                with config.table_override(table):
                    launched = _launched(p, self.device)
                if {k: launched[k] for k in e} != e:
                    raise RuntimeError(f"{p.label}: the override did not reach the lookup ({launched} != {e})")
                results[key] = (e, self.measure(table, prob.fn, prob, _short(e)))

        run(stage1(p, self.quick))
        timed = [(ms, e) for e, ms in results.values() if ms is not None]
        if timed and not self.quick:
            run(stage2(p, min(timed, key=lambda t: t[0])[1]))
            timed = [(ms, e) for e, ms in results.values() if ms is not None]
        if heur_ms is None and not timed:
            self.log(f"  {p.label}: nothing passed its check; no entry")
            return None
        best_ms, best = min(timed, key=lambda t: t[0]) if timed else (math.inf, None)
        if heur_ms is not None and not best_ms < heur_ms * (1.0 - MIN_GAIN):
            best_ms, best = heur_ms, {k: heur[k] for k in (_launch_fields(p.kernel))}
        entry = {**best, "ms": round(best_ms, 5), "heuristic_ms": None if heur_ms is None else round(heur_ms, 5),
                 "heuristic": {k: heur[k] for k in _launch_fields(p.kernel)}, "candidates": len(timed)}
        gain = f"{heur_ms / best_ms:.2f}x vs heuristic {heur_ms:.4g} ms" if heur_ms else "heuristic FAILED"
        self.log(f"  {p.label}: {_short(best)} {best_ms:.4g} ms ({gain}; {len(timed)} candidates)")
        return entry

    def tune_route(self, p: Point, table: dict) -> Optional[dict]:
        prob = _problem(p, self.device)
        tuned = {k: v for k, v in table.items() if k != "route"}
        ms = {route: self.measure(tuned, prob.route(route), prob, f"route {route}") for route in config.ROUTE_NAMES}
        heur_route = config.choose_route(p.m, p.r)  # no n/device: the heuristic
        heur_ms = self.measure(EMPTY, prob.route(heur_route), prob, f"heuristic route {heur_route}")
        timed = {r: t for r, t in ms.items() if t is not None}
        if not timed:
            self.log(f"  {p.label}: neither route passed its check; no entry")
            return None
        route = min(timed, key=timed.get)
        entry = {"route": route, "ms": round(timed[route], 5),
                 "heuristic_ms": None if heur_ms is None else round(heur_ms, 5),
                 "heuristic": heur_route, "onepass_ms": _round(ms["onepass"]), "split_ms": _round(ms["split"])}
        self.log(f"  {p.label}: {route} (onepass {_fmt(ms['onepass'])}, split {_fmt(ms['split'])}; heuristic "
                 f"{heur_route} with heuristic configs {_fmt(heur_ms)})")
        return entry


def _launch_fields(kernel: str) -> tuple[str, ...]:
    return config._REQUIRED[kernel] + config._OPTIONAL.get(kernel, ())


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 5)


def _fmt(v: Optional[float]) -> str:
    return "FAILED" if v is None else f"{v:.4g} ms"


# -- the table file ----------------------------------------------------------------------------


def default_out(device) -> Path:
    return config.TABLE_DIR / f"{config._device_slug(device.index if device.index is not None else 0)}.json"


def _previous(path: Path, gpu: str, log) -> dict:
    """The sections of an existing table for the same GPU (kept for kernels not tuned now)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        config.parse_table(data, str(path))
    except (OSError, ValueError) as e:
        log(f"existing {path} is not a valid table ({e}); replacing it")
        return {}
    if data.get("env", {}).get("gpu") != gpu or data.get("elem") != ELEM:
        log(f"existing {path} was tuned on {data.get('env', {}).get('gpu')!r}; replacing it")
        return {}
    return data


def format_table(data: dict) -> str:
    """JSON with one line per M entry (readable diffs)."""
    lines = ["{"]
    top = [(k, data[k]) for k in ("version", "elem", "env") if k in data]
    kernels = [(k, data[k]) for k in config.TABLE_KERNELS if data.get(k)]
    for i, (k, v) in enumerate(top + kernels):
        comma = "," if i < len(top) + len(kernels) - 1 else ""
        if k in config.TABLE_KERNELS:
            lines.append(f" {json.dumps(k)}: {{")
            shapes = sorted(v.items(), key=lambda kv: [int(p.split('=')[1]) for p in kv[0].split(',')])
            for j, (shape, by_m) in enumerate(shapes):
                lines.append(f"  {json.dumps(shape)}: {{")
                ms = sorted(by_m.items(), key=lambda kv: int(kv[0]))
                for t, (m, entry) in enumerate(ms):
                    lines.append(f"   {json.dumps(m)}: {json.dumps(entry)}{',' if t < len(ms) - 1 else ''}")
                lines.append(f"  }}{',' if j < len(shapes) - 1 else ''}")
            lines.append(f" }}{comma}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _write_table(path: Path, env: dict, table: dict) -> bool:
    """Validate and atomically write what has been measured so far; False when it is empty."""
    data = {**EMPTY, "env": env, **table}
    if not any(data.get(k) for k in config.TABLE_KERNELS):
        return False
    config.parse_table(data, str(path))  # what we write must load
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(format_table(data))
    os.replace(tmp, path)
    return True


def run_tune(kernels: Sequence[str] = KERNELS, *, quick: bool = False, out: Optional[str] = None,
             log: Callable[[str], None] = _stderr) -> int:
    """Tune ``kernels`` on the current CUDA device and write the table; returns the exit status
    (0; 2 without CUDA or under the interpreter; 1 when nothing could be measured)."""
    if not torch.cuda.is_available():
        log("adaptkern tune needs a CUDA GPU: it measures launch configs on the GPU the table is for, "
            "and no CUDA device is visible here (torch.cuda.is_available() is False). Nothing was written.")
        return EXIT_NO_CUDA
    if config.interpreting():
        log("adaptkern tune measures compiled kernels: unset TRITON_INTERPRET (it is 1). Nothing was written.")
        return EXIT_NO_CUDA
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r}; expected some of {KERNELS}")
    kernels = [k for k in KERNELS if k in kernels]  # route last: it uses the tuned configs
    from adaptkern.bench import report

    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    path = Path(out) if out else default_out(device)
    est = estimate(kernels, quick)
    log(f"adaptkern tune on {name}: {', '.join(kernels)}{' (--quick)' if quick else ''} -> {path}")
    log(f"ESTIMATE (assumed {COMPILE_S} s per Triton compile, {TIMING_S} s per timing; not measured): "
        f"{est['points']} points, <= {est['compiles']} compiles, <= {est['timings']} timings, "
        f"~{est['seconds'] / 60:.1f} min")

    start = time.perf_counter()
    previous = _previous(path, name, log)
    table = {k: previous[k] for k in config.TABLE_KERNELS if k in previous and k not in kernels}
    env = report.environment(device)
    env.update({"slug": report.gpu_slug(name), "dtype": "bfloat16", "K": K, "quick": quick,
                "kernels": list(kernels), "mixed_adapters": MIXED_ADAPTERS, "cuda": torch.version.cuda})
    if previous.get("env"):
        env["previous"] = {k: v for k, v in previous["env"].items() if k != "previous"}
    tuner = Tuner(device, quick, log)
    summary = []
    for kernel in kernels:
        pts = points(kernel, quick)
        log(f"[{kernel}] {len(pts)} points")
        section: dict = {}
        for i, p in enumerate(pts, 1):
            log(f" ({i}/{len(pts)}) {p.label}")
            entry = tuner.tune_route(p, {**EMPTY, **table}) if kernel == "route" else tuner.tune_point(p)
            if entry is not None:
                section.setdefault(p.key, {})[str(p.m)] = entry
            torch.cuda.empty_cache()
        if section:
            table[kernel] = section
            _write_table(path, env, table)  # after every kernel: a run cut short keeps what it measured
        gains = [e["heuristic_ms"] / e["ms"] for by_m in section.values() for e in by_m.values()
                 if e.get("heuristic_ms") and e.get("ms")]
        if gains:
            geo = math.exp(sum(math.log(g) for g in gains) / len(gains))
            summary.append(f"{kernel}: heuristic/tuned geomean {geo:.3f}x over {len(gains)} points "
                           f"(min {min(gains):.3f}x, max {max(gains):.3f}x)")
    tuner.timer.release()
    elapsed = time.perf_counter() - start
    env["elapsed_s"] = round(elapsed, 1)
    if not _write_table(path, env, table):
        log("no entry could be measured; nothing written")
        return 1
    config.clear_caches()
    for line in summary:
        log(line)
    log(f"{tuner.rejected} candidate(s) dropped (failed or wrong). elapsed {elapsed / 60:.1f} min "
        f"(estimate was ~{est['seconds'] / 60:.1f} min). wrote {path}")
    return 0
