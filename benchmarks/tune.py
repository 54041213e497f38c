"""Measure launch configs on this GPU and write a per-GPU config table.

    python benchmarks/tune.py --out FILE [--kernels gemm,onepass,mixed,route] [--quick]

The table is written to FILE only. The library reads tables from ``adaptkern/ops/configs/
<gpu>.json`` (``<gpu>`` as printed at the end, e.g. ``h100``): copy FILE there, or pass that
path as ``--out``, to make launches use it. Schema: ``benchmarks/tune_table.py``.

What is measured (bf16, Llama-8B-like layers, K = 4096; M ∈ ``M_FULL``)::

    gemm     the split route's main GEMM, y = x·Wᵀ + s·S·Bᵀ (S [M, 16] fp32), N ∈ {4096, 14336}.
             Its entry applies to every launch of that GEMM kernel with that N bucket, backward too.
    onepass  the one-pass forward (``adaptkern.lora_linear(..., route="onepass")``), N ∈ {4096,
             14336}, r ∈ {16, 64}, M <= the heuristic's one-pass limit.
    mixed    the mixed forward (``adaptkern.mixed_lora_linear``), K = N = 4096, 8 adapters with
             uniform ids, r ∈ {16, 64, 256}.
    route    one-pass against split forward at every (N, r <= 64, M), both with the configs this
             run tuned (or the table already in FILE); the faster route is recorded.

Search, per (kernel, shape, M), over candidates the library's shared-memory fit leaves unchanged:

    1. tiles: BLOCK_M by M (M <= 16: 16; M <= 64: 16, 64; else 64, 128) × BLOCK_N {64, 128, 256}
       × BLOCK_K {64, 128} (mixed: 64); 8 warps for tiles of 128×128 and more, else 4; 3 stages.
    2. one change at a time around the best: the other warp count (4 <-> 8); gemm and one-pass
       also the other stage counts of {2, 3, 4}; mixed at M <= 64 also the shrink split {1, 2, 4, 8}.
    --quick: M ∈ {1, 64, 1024, 8192}, N = 4096, r = 16, BLOCK_K 64 only, no step 2.

Every candidate runs once and is checked against a float32 reference with the rule of
``adaptkern.testing`` (twice eager bf16's error plus atol); a wrong or failing candidate is
reported and never kept. The heuristic is measured too, and a candidate replaces it only when
at least ``MIN_GAIN`` faster, so timing noise does not churn the tables. Timing:
``adaptkern.bench.timing.measure`` (``triton.testing.do_bench``), ~20 ms of repetitions.

The run prints an ESTIMATE of its duration first (assumed 1.5 s per Triton compile, 50 ms per
timing, 0.3 s per point: ~8 min for the full run on an H100, ~1.5 min with --quick; not a
measurement) and its real elapsed time at the end. Without CUDA it exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tune_table, when run as a script
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # adaptkern from this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adaptkern  # noqa: E402
import tune_table  # noqa: E402
from adaptkern.bench import env, timing  # noqa: E402
from adaptkern.bench.cases import uniform_adapter_ids  # noqa: E402
from adaptkern.ops import config  # noqa: E402
from adaptkern.ops.common import dot_flags  # noqa: E402
from adaptkern.ops.gemm import gemm  # noqa: E402
from adaptkern.ops.adapter_linear import reference  # noqa: E402
from adaptkern.ops.mixed_adapter_linear import reference as mixed_reference  # noqa: E402
from adaptkern.testing import compare  # noqa: E402


KERNELS = tune_table.KERNELS
M_FULL = (1, 16, 64, 256, 1024, 2048, 4096, 8192)
M_QUICK = (1, 64, 1024, 8192)
K = 4096
N_FULL, N_QUICK = (4096, 14336), (4096,)
RANKS_FULL, RANKS_QUICK = (16, 64, 256), (16,)
MIXED_ADAPTERS = 8
GEMM_RANK = 16  # rank of the second product in the tuned GEMM
SCALE = 2.0
MIN_GAIN = 0.02  # a candidate must beat the heuristic by 2 % to replace it
DTYPE, ELEM = torch.bfloat16, 2
REP_MS, WARMUP_MS = 20.0, 5.0
COMPILE_S, TIMING_S, POINT_S = 1.5, 0.05, 0.3  # assumed costs of the estimate (not measured)
EXIT_USAGE = 2
EMPTY = {"version": tune_table.VERSION, "elem": ELEM}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the plan: points and candidates -----------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One (kernel, shape, M) to tune: ``n`` is N (mixed: K = N = ``K``), ``r`` the rank."""

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
        return f"{self.kernel} K={K} N={self.n}{'' if self.kernel == 'gemm' else f' r={self.r}'} M={self.m}"


def points(kernel: str, quick: bool) -> list[Point]:
    ms, ns, ranks = (M_QUICK, N_QUICK, RANKS_QUICK) if quick else (M_FULL, N_FULL, RANKS_FULL)
    if kernel == "gemm":
        return [Point("gemm", m, n, GEMM_RANK) for n in ns for m in ms]
    if kernel == "onepass":
        return [Point("onepass", m, n, r) for n in ns for r in ranks if r <= config.ONEPASS_MAX_RANK
                for m in ms if m <= config.ONEPASS_MAX_M]
    if kernel == "mixed":
        return [Point("mixed", m, K, r) for r in ranks for m in ms]
    if kernel == "route":
        return [Point("route", m, n, r) for n in ns for r in ranks if r <= config.ONEPASS_MAX_RANK for m in ms]
    raise ValueError(f"unknown kernel {kernel!r}; expected some of {KERNELS}")


def _block_ms(m: int) -> tuple[int, ...]:
    return (16,) if m <= 16 else (16, 64) if m <= 64 else (64, 128)


def fits(p: Point, entry: dict) -> bool:
    """Whether the library's shared-memory fit leaves the candidate as it is (else the launch
    would run a smaller config: a duplicate)."""
    cfg = config.GemmConfig(entry["block_m"], entry["block_n"], entry["block_k"], entry.get("group_m", 8),
                            entry["num_warps"], entry["num_stages"])
    return config.fit(cfg, ELEM, config.block_r(p.r) if p.kernel == "onepass" else 0) == cfg


def heuristic_entry(p: Point) -> dict:
    """The launch parameters the heuristic picks (``device=None``: no table)."""
    if p.kernel == "gemm":
        return config.gemm_config(p.m, p.n, ELEM)._asdict()
    if p.kernel == "onepass":
        return config.onepass_config(p.m, p.n, p.r, ELEM)._asdict()
    plan = config.mixed_plan(p.m, K, p.r, ELEM)
    return {f: getattr(plan, f) for f in tune_table.launch_fields("mixed")}


def _entry(p: Point, bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    e = {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages}
    return {**e, "split": heuristic_entry(p)["split"]} if p.kernel == "mixed" else {**e, "group_m": 8}


def stage1(p: Point, quick: bool) -> list[dict]:
    cands = [_entry(p, bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3) for bm in _block_ms(p.m)
             for bn in (64, 128, 256) for bk in ((64,) if quick or p.kernel == "mixed" else (64, 128))]
    return [e for e in cands if fits(p, e)]


def stage2(p: Point, best: dict) -> list[dict]:
    """One change at a time around the best tile (see the module docstring)."""
    out = [{**best, "num_warps": 12 - best["num_warps"]}] if best["num_warps"] in (4, 8) else []
    if p.kernel != "mixed":
        out += [{**best, "num_stages": s} for s in (2, 3, 4) if s != best["num_stages"]]
    out = [e for e in out if fits(p, e)]
    if p.kernel == "mixed" and p.m <= config.MIXED_SORT_MIN_M:
        out += [{**best, "split": s} for s in (1, 2, 4, 8) if s != best["split"]]
    return out


def estimate(kernels: Sequence[str], quick: bool) -> dict:
    """An upper bound of Triton compiles and timings, and the seconds they would take at the
    assumed costs (COMPILE_S, TIMING_S, POINT_S): an ESTIMATE, not a measurement."""
    compiles: set = set()
    timings = npoints = 0
    for kernel in kernels:
        for p in points(kernel, quick):
            npoints += 1
            if kernel == "route":
                timings += 3  # one-pass, split (tuned), the heuristic's route
                compiles.add(("route shrink", p.r, p.m == 1, _block_ms(p.m)))
                continue
            cands = stage1(p, quick) + [heuristic_entry(p)]
            step2 = 1 if kernel == "mixed" else 3
            timings += len(cands) + (0 if quick else step2 + (3 if kernel == "mixed" and
                                                             p.m <= config.MIXED_SORT_MIN_M else 0))
            # Triton compiles once per constexpr set (the mixed kernels cap BLOCK_R at 64) and M == 1 apart.
            tile_r = 0 if kernel == "gemm" else min(config.block_r(p.r), 64 if kernel == "mixed" else 1 << 30)
            variant = (kernel, tile_r, p.m == 1)
            compiles |= {(variant, tuple(sorted((k, v) for k, v in c.items() if k != "split"))) for c in cands}
            if not quick:
                compiles |= {(variant, p, i) for i in range(step2)}
    n_compiles = sum(2 if c[0][0] == "mixed" else 1 for c in compiles)  # mixed: shrink + linear kernels
    return {"points": npoints, "compiles": n_compiles, "timings": timings,
            "seconds": n_compiles * COMPILE_S + timings * TIMING_S + npoints * POINT_S}


# -- the timed call per point, its reference and eager output --------------------------------


@dataclass
class Problem:
    """The call to time (``fn``), the float32 reference of its output and eager bf16's output;
    ``route(name)`` gives the call for a forward route (onepass and route points)."""

    fn: Callable[[], torch.Tensor]
    ref: torch.Tensor
    eager: torch.Tensor
    route: Optional[Callable[[str], Callable[[], torch.Tensor]]] = None


def _randn(shape, std, device, gen, dtype=DTYPE):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def problem(p: Point, device) -> Problem:
    gen = torch.Generator(device=device).manual_seed(KERNELS.index(p.kernel) * 10**6 + p.m * 7 + p.n * 3 + p.r)
    m, n, r = p.m, p.n, p.r
    x, w = _randn((m, K), 1.0, device, gen), _randn((n, K), K**-0.5, device, gen)
    if p.kernel == "gemm":
        s, b_w = _randn((m, r), 1.0, device, gen, torch.float32), _randn((n, r), r**-0.5, device, gen)
        y = torch.empty((m, n), dtype=DTYPE, device=device)
        ref = x.float() @ w.float().t() + SCALE * (s @ b_w.float().t())
        eager = F.linear(x, w) + F.linear(s.to(DTYPE), b_w) * SCALE
        dd = dot_flags(DTYPE)
        return Problem(lambda: gemm(y, x, w.t(), p2=s, q2=b_w.t(), alpha2=SCALE, dot_dtype=dd),
                       ref, eager)
    if p.kernel in ("onepass", "route"):
        a_w, b_w = _randn((r, K), K**-0.5, device, gen), _randn((n, r), r**-0.5, device, gen)
        ref = reference.lora_linear_ref(x.float(), w.float(), None, a_w.float(), b_w.float(), SCALE)
        eager = reference.lora_linear_ref(x, w, None, a_w, b_w, SCALE)

        def call(route):
            return lambda: adaptkern.lora_linear(x, w, None, a_w, b_w, scale=SCALE, route=route)

        return Problem(call("onepass"), ref, eager, route=call)
    lora_a = _randn((MIXED_ADAPTERS, r, K), K**-0.5, device, gen)
    lora_b = _randn((MIXED_ADAPTERS, n, r), r**-0.5, device, gen)
    scales = torch.linspace(0.5, 2.0, MIXED_ADAPTERS, dtype=torch.float32, device=device)
    ids = uniform_adapter_ids(m, MIXED_ADAPTERS, seed=m).to(device)
    ref = mixed_reference.mixed_adapter_linear_ref(x.float(), w.float(), None, lora_a.float(), None, lora_b.float(),
                                                   None, scales, None, None, ids)
    eager = mixed_reference.mixed_adapter_linear_ref(x, w, None, lora_a, None, lora_b, None, scales, None, None, ids)
    return Problem(lambda: adaptkern.mixed_lora_linear(x, w, None, lora_a, lora_b, ids, scales=scales,
                                                       validate_ids=False), ref, eager)


# -- measuring ---------------------------------------------------------------------------------


def one_entry_table(p: Point, entry: dict) -> dict:
    """A table holding ``entry`` alone: every M of p's shape looks it up."""
    return {**EMPTY, p.kernel: {p.key: {"1": entry}}}


def _launched(p: Point, device) -> dict:
    """What the launcher looks up for p under the current table (a guard that the override
    reached the lookup)."""
    if p.kernel == "gemm":
        return config.gemm_config(p.m, p.n, ELEM, device=device)._asdict()
    if p.kernel == "onepass":
        return config.onepass_config(p.m, p.n, p.r, ELEM, device=device)._asdict()
    plan = config.mixed_plan(p.m, K, p.r, ELEM, device=device)
    return {f: getattr(plan, f) for f in tune_table.launch_fields("mixed")}


def _short(e: dict) -> str:
    s = f"{e['block_m']}x{e['block_n']}x{e['block_k']} w{e['num_warps']} s{e['num_stages']}"
    return s + (f" split{e['split']}" if "split" in e else "")


def _fmt(v: Optional[float]) -> str:
    return "FAILED" if v is None else f"{v:.4g} ms"


class Tuner:
    """Checks, then times, candidates of one point at a time on ``device``."""

    def __init__(self, device, quick: bool, log: Callable[[str], None]):
        self.device, self.quick, self.log = device, quick, log
        self.rejected = 0

    def time(self, fn: Callable[[], object]) -> float:
        return timing.measure(fn, self.device, rep_ms=REP_MS, warmup_ms=WARMUP_MS, memory=False).median_ms

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
            verdict = compare("y", prob.ref, out, prob.eager)
            del out
            if not verdict.ok:
                self.log(f"    dropped {what}: WRONG ({verdict})")
                self.rejected += 1
                return None
            return self.time(fn)

    def tune_point(self, p: Point) -> Optional[dict]:
        prob = problem(p, self.device)
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
                table = one_entry_table(p, e)
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
        fields = tune_table.launch_fields(p.kernel)
        best_ms, best = min(timed, key=lambda t: t[0]) if timed else (math.inf, None)
        if heur_ms is not None and not best_ms < heur_ms * (1.0 - MIN_GAIN):
            best_ms, best = heur_ms, {k: heur[k] for k in fields}
        entry = {**best, "ms": round(best_ms, 5), "heuristic_ms": None if heur_ms is None else round(heur_ms, 5),
                 "heuristic": {k: heur[k] for k in fields}, "candidates": len(timed)}
        gain = f"{heur_ms / best_ms:.2f}x vs heuristic {heur_ms:.4g} ms" if heur_ms else "heuristic FAILED"
        self.log(f"  {p.label}: {_short(best)} {best_ms:.4g} ms ({gain}; {len(timed)} candidates)")
        return entry

    def tune_route(self, p: Point, table: dict) -> Optional[dict]:
        prob = problem(p, self.device)
        tuned = {k: v for k, v in table.items() if k != "route"}
        ms = {route: self.measure(tuned, prob.route(route), prob, f"route {route}") for route in tune_table.ROUTES}
        heur_route = config.choose_route(p.m, p.r)  # no n/device: the heuristic
        heur_ms = self.measure(EMPTY, prob.route(heur_route), prob, f"heuristic route {heur_route}")
        timed = {r: t for r, t in ms.items() if t is not None}
        if not timed:
            self.log(f"  {p.label}: neither route passed its check; no entry")
            return None
        route = min(timed, key=timed.get)
        rnd = lambda v: None if v is None else round(v, 5)  # noqa: E731
        self.log(f"  {p.label}: {route} (onepass {_fmt(ms['onepass'])}, split {_fmt(ms['split'])}; heuristic "
                 f"{heur_route} with heuristic configs {_fmt(heur_ms)})")
        return {"route": route, "ms": rnd(timed[route]), "heuristic_ms": rnd(heur_ms), "heuristic": heur_route,
                "onepass_ms": rnd(ms["onepass"]), "split_ms": rnd(ms["split"])}


# -- the run -----------------------------------------------------------------------------------


def _previous(path: Path, gpu: str, log) -> dict:
    """The sections of an existing table of the same GPU in ``path`` (kept for kernels not tuned now)."""
    if not path.is_file():
        return {}
    try:
        data = tune_table.read(path)
    except (OSError, ValueError) as e:
        log(f"existing {path} is not a valid table ({e}); replacing it")
        return {}
    if data.get("env", {}).get("gpu") != gpu or data.get("elem") != ELEM:
        log(f"existing {path} was tuned on {data.get('env', {}).get('gpu')!r}; replacing it")
        return {}
    return data


def run_tune(kernels: Sequence[str], *, out: str, quick: bool = False, log: Callable[[str], None] = _stderr) -> int:
    """Tune ``kernels`` on the current CUDA device and write the table to ``out``; returns the
    exit status (0; 2 without CUDA or under the interpreter; 1 when nothing could be measured)."""
    if not torch.cuda.is_available():
        log("tune.py needs a CUDA GPU: it measures launch configs on the GPU the table is for, and no CUDA "
            "device is visible here (torch.cuda.is_available() is False). Nothing was written.")
        return EXIT_USAGE
    if config.interpreting():
        log("tune.py measures compiled kernels: unset TRITON_INTERPRET (it is 1). Nothing was written.")
        return EXIT_USAGE
    kernels = [k for k in KERNELS if k in kernels]  # route last: it uses the configs just tuned
    device = torch.device("cuda", torch.cuda.current_device())
    name, path = torch.cuda.get_device_name(device), Path(out)
    est = estimate(kernels, quick)
    log(f"tune.py on {name}: {', '.join(kernels)}{' (--quick)' if quick else ''} -> {path}")
    log(f"ESTIMATE (assumed {COMPILE_S} s per Triton compile, {TIMING_S} s per timing; not measured): "
        f"{est['points']} points, <= {est['compiles']} compiles, <= {est['timings']} timings, "
        f"~{est['seconds'] / 60:.1f} min")
    start = time.perf_counter()
    previous = _previous(path, name, log)
    table = {k: previous[k] for k in KERNELS if k in previous and k not in kernels}
    run_env = dict(env.environment(device), slug=config.gpu_slug(name), dtype="bfloat16", K=K, quick=quick,
                   kernels=list(kernels), mixed_adapters=MIXED_ADAPTERS)
    tuner, summary = Tuner(device, quick, log), []
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
            tune_table.write(path, {**EMPTY, "env": run_env, **table})  # a run cut short keeps what it measured
        gains = [e["heuristic_ms"] / e["ms"] for by_m in section.values() for e in by_m.values()
                 if e.get("heuristic_ms") and e.get("ms")]
        if gains:
            geo = math.exp(sum(math.log(g) for g in gains) / len(gains))
            summary.append(f"{kernel}: heuristic/tuned geomean {geo:.3f}x over {len(gains)} points "
                           f"(min {min(gains):.3f}x, max {max(gains):.3f}x)")
    elapsed = time.perf_counter() - start
    if not any(table.get(k) for k in KERNELS):
        log("no entry could be measured; nothing written")
        return 1
    tune_table.write(path, {**EMPTY, "env": dict(run_env, elapsed_s=round(elapsed, 1)), **table})
    for line in summary:
        log(line)
    log(f"{tuner.rejected} candidate(s) dropped (failed or wrong). elapsed {elapsed / 60:.1f} min "
        f"(estimate was ~{est['seconds'] / 60:.1f} min). wrote {path}; the library reads "
        f"adaptkern/ops/configs/{config.gpu_slug(name)}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/tune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the docstring of benchmarks/tune.py for what is searched and checked.")
    p.add_argument("--out", required=True,
                   help="table file to write; the library reads adaptkern/ops/configs/<gpu>.json. Sections for "
                        "kernels not tuned in this run are kept from an existing FILE of the same GPU")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help="comma-separated subset of gemm,onepass,mixed,route (default: all; route runs last, "
                        "with the configs just tuned)")
    p.add_argument("--quick", action="store_true", help="fewer M, N=4096 and r=16 only, no second search step")
    args = p.parse_args(argv)
    kernels = [v.strip() for v in args.kernels.split(",") if v.strip()]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or not kernels:
        p.error(f"unknown kernel(s) {','.join(unknown) or '(none given)'}; expected some of {','.join(KERNELS)}")
    return run_tune(kernels, out=args.out, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
