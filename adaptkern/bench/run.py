"""``adaptkern bench``: check every case, time it, print the table, write the results file and the plot.

A fused op that fails its check (or raises) is never timed: its line says FAILED, the results
file lists it under ``failures`` and the run's exit status is 1.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch

from . import cases, env, impls, report, timing
from .check import check_case

ORDER = ("base_linear", "fused", "eager", "peft", "fuse_peft", "compiled_eager", "dequant", "lora", "vllm", "delta",
         "two_launch", "graph_replay")


class UsageError(ValueError):
    """The arguments select nothing to run (an unknown impl or mode, a filter that matches no case)."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stdout(msg: str) -> None:
    print(msg, flush=True)


def plan(suite: str, *, quick: bool, gpu: bool, filter: Optional[str], impl_names: Optional[Sequence[str]],
         modes: Optional[Sequence[str]]) -> tuple[list[cases.Case], list[str]]:
    """(the cases to run, a note per suite left out because a package it needs is missing); raises
    :class:`UsageError` for unknown impls/modes, an empty selection, or one that nothing here can run."""
    for i in impl_names or ():
        if i not in impls.IMPLS:
            raise UsageError(f"unknown impl {i!r}; expected some of {','.join(impls.IMPLS)}")
    for m in modes or ():
        if m not in cases.MODES:
            raise UsageError(f"unknown mode {m!r}; expected some of {','.join(cases.MODES)}")
    todo = cases.select(suite, quick=quick, gpu=gpu, filter=filter)
    if not todo:
        every = cases.select(suite, quick=quick, gpu=gpu)
        raise UsageError(f"--filter {filter!r} matches none of the {len(every)} cases of suite {suite!r}"
                         f"{' with --quick' if quick else ''} on this {'GPU' if gpu else 'CPU'}; ids look like "
                         f"{', '.join(c.id for c in every[:2])} (each comma-separated part must occur in the id)")
    missing = {c.suite: cases.requirement(c.suite) for c in todo}
    notes = [f"suite {s} left out: {why}" for s, why in missing.items() if why]
    runnable = [c for c in todo if not missing[c.suite]]
    if not runnable:
        raise UsageError("; ".join(notes))
    return runnable, notes


def run_bench(suite: str = "all", *, quick: bool = False, out: str = "bench-out",
              impl_names: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
              filter: Optional[str] = None, rep_ms: float = 100.0, plot: bool = True, cuda_graph: bool = False,
              log: Callable[[str], None] = _stderr, show: Callable[[str], None] = _stdout) -> int:
    """Check, then time, every selected case; write ``<out>/<gpu>.json`` and its plot.

    Returns the exit status: 0, or 1 when a fused op failed its check or raised. Raises
    :class:`UsageError` when the arguments select nothing. Progress goes to ``log``
    (stderr), the table to ``show`` (stdout). ``cuda_graph`` times the forward mode as
    CUDA-graph replays and writes ``<gpu>-cudagraph.json``.
    """
    device = env.default_device()
    gpu = device.type == "cuda"
    todo, notes = plan(suite, quick=quick, gpu=gpu, filter=filter, impl_names=impl_names, modes=modes)
    wanted = [i for i in ORDER if i in (impl_names or impls.IMPLS)]
    graph = cuda_graph and gpu
    log(f"adaptkern bench on {env.device_name(device)}: fused ops run {env.execution_path(device)}")
    if not gpu:
        log(f"{report.CPU_CAVEAT}: no GPU here, so tiny shapes run and their times only show that the harness works.")
    if cuda_graph and not gpu:
        log("--cuda-graph ignored: no GPU")
    for note in notes:
        log(note)
    if {"peft", "fuse_peft"} & set(wanted) and not impls.peft_available():
        log("peft and fuse_peft columns left out: the peft package is not importable (pip install -e '.[bench]')")
    ceilings = timing.ceilings(device) if gpu else None
    if ceilings:
        log(f"ceilings: bf16 matmul {ceilings['bf16_tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbps']:.3g} GB/s")

    environment = dict(env.environment(device), method=timing.method(device, graph))  # timestamp: the start
    rows, failures, noted, floor = [], [], set(), {}
    for n, case in enumerate(todo, 1):
        log(f"[{n}/{len(todo)}] {case.id}")
        inp = cases.make_inputs(case, device)
        chk = check_case(case, inp)
        log(f"    check: {chk.summary()}")
        if not chk.ok:
            failures.append({"case": case.id, "error": chk.failures()})
        for mode in [m for m in case.modes if not modes or m in modes]:
            parts = []
            for impl in [i for i in wanted if i in impls.for_case(case)]:
                if impl == "fused" and not chk.ok:
                    parts.append("fused FAILED its check (not timed)")
                    continue
                key = (case.suite, case.M, case.K, case.N, case.dtype, mode)  # F.linear: the same for every adapter
                try:
                    t = floor.get(key) if impl == "base_linear" else None
                    if t is None:
                        fn = impls.build(case, impl, mode, inp, device)
                        replay = graph and mode == "forward" and impl not in impls.SELF_GRAPHED
                        t = timing.measure(fn, device, rep_ms=rep_ms, graph=replay)
                    if impl == "base_linear":
                        floor[key] = t
                except impls.Unavailable as e:
                    if (impl, str(e)) not in noted and impl not in ("peft", "fuse_peft"):
                        log(f"    {impl} not timed: {e}")
                    noted.add((impl, str(e)))
                    continue
                except Exception as e:  # noqa: BLE001 - report and go on; a crashing fused op fails the run
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if impl == "fused":
                        failures.append({"case": case.id, "error": f"{mode}: {msg}"})
                        parts.append("fused CRASHED")
                    log(f"    {impl} {mode} raised {msg}")
                    continue
                rows.append(report.make_row(case, impl, mode, t))
                parts.append(f"{impl} {t.median_ms:.4g} ms" + (" (noisy)" if t.noisy else ""))
            log(f"    {mode}: " + ", ".join(parts))
        del inp
        if gpu:
            torch.cuda.empty_cache()

    data = {"env": environment, "ceilings": ceilings, "rows": rows, "failures": failures}
    path = report.write(report.results_path(out, environment, graph), data)
    log(f"wrote {path} ({len(rows)} rows)")
    show(report.format_table(data))
    if plot:
        from .plot import plot as draw

        draw(data, path.with_suffix(".png"), log)
    if failures:
        log(f"{len(failures)} fused case(s) FAILED their check or raised, and were not timed:")
        for f in failures:
            log(f"  {f['case']}: {f['error']}")
        return 1
    return 0
