"""The benchmark harness behind ``adaptkern bench`` and ``adaptkern check``.

* :mod:`.cases`     the shapes (core and mixed suites, CPU smoke shapes), inputs, flops/bytes;
* :mod:`.baselines` fused op, eager (PEFT/AdapterHub), real peft, torch.compile, F.linear;
                    the correctness check against float64;
* :mod:`.timing`    CUDA-event timing with L2 flush, quantiles, peak memory, ceilings;
* :mod:`.report`    the results file, table, targets and plot.

:func:`run_bench` checks every case before timing it: a fused kernel that fails its check
is never timed, its row is marked FAILED and the run ends with a non-zero status.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch

from . import baselines, cases, report, timing

__all__ = ["run_bench", "run_check", "default_device"]

_ORDER = ("base_linear", "fused", "eager", "peft", "compiled_eager")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stdout(msg: str) -> None:
    print(msg, flush=True)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _banner(device: torch.device, log) -> None:
    log(f"adaptkern bench on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
        f"fused ops run {report.execution_path(device)}")
    if device.type != "cuda":
        log("NOTE: no GPU here. This is a smoke test on tiny shapes; the fused timings below are "
            f"{report.execution_path(device)}, not the Triton kernels on a GPU: these timings are "
            "not GPU figures.")


def run_bench(suite: str = "core", *, quick: bool = False, out: str = "bench-out",
              impls: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
              filter: Optional[str] = None, rep_ms: float = 100.0, plot: bool = True, cuda_graph: bool = False,
              log: Callable[[str], None] = _stderr, show: Callable[[str], None] = _stdout) -> int:
    """Check, then time, every case of ``suite``; write ``<out>/<gpu>.json`` and a plot.

    Returns the exit status: 0, or 1 when a fused kernel failed its check or crashed.
    Progress goes to ``log`` (stderr), the table and targets to ``show`` (stdout).
    ``cuda_graph``: time the forward mode as CUDA-graph replays (GPU time without host
    overhead, as serving stacks run decode); results go to ``<gpu>-cudagraph.json``.
    """
    device = default_device()
    gpu = device.type == "cuda"
    impls = tuple(impls) if impls else baselines.IMPLS
    for i in impls:
        if i not in baselines.IMPLS:
            raise ValueError(f"unknown impl {i!r}; expected some of {baselines.IMPLS}")
    for m in modes or ():
        if m not in cases.MODES:
            raise ValueError(f"unknown mode {m!r}; expected some of {cases.MODES}")
    _banner(device, log)
    todo = cases.select(suite, quick=quick, gpu=gpu, filter=filter)
    if any(c.suite == "mixed" for c in todo) and not baselines.has_mixed():
        log("mixed suite skipped: adaptkern.mixed_lora_linear does not exist yet (it is being written)")
        todo = [c for c in todo if c.suite != "mixed"]
    if "peft" in impls and not baselines.has_peft():
        log("peft baseline skipped: the peft package is not importable")
    if not todo:
        log("no cases to run")

    timer = timing.Timer(device, rep_ms=rep_ms)
    ceilings = timing.measure_ceilings(timer)
    log(f"ceilings: bf16 matmul {ceilings['bf16_tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbps']:.3g} GB/s")
    env = report.environment(device)
    graph = cuda_graph and gpu
    if cuda_graph and not gpu:
        log("--cuda-graph ignored: no GPU")
    if graph:
        env["note"] = "forward-mode timings are CUDA-graph replays (adaptkern bench --cuda-graph)"

    rows, failures, noted = [], [], set()
    base_cache: dict = {}
    for n, case in enumerate(todo, 1):
        log(f"[{n}/{len(todo)}] {case.id}")
        inp = cases.make_inputs(case, device)
        chk = baselines.check(case, inp)
        log(f"    check: {chk.summary()}")
        if not chk.ok:
            failures.append({"case": case.id, "error": chk.error or chk.details()})
        for mode in [m for m in case.modes if not modes or m in modes]:
            parts = []
            for impl in [i for i in _ORDER if i in impls]:
                if impl == "fused" and not chk.ok:
                    parts.append("fused FAILED (not timed)")
                    continue
                key = (case.M, case.K, case.N, case.dtype, mode)
                try:
                    if impl == "base_linear" and key in base_cache:  # same for every adapter at this M, K, N
                        t = base_cache[key]
                    else:
                        t = timer(baselines.build(case, impl, mode, inp, device), graph=graph and mode == "forward")
                        if impl == "base_linear":
                            base_cache[key] = t
                except baselines.Unavailable as e:
                    if (impl, str(e)) not in noted and not str(e).startswith(("peft has no", "the mixed suite",
                                                                              f"{impl} is not part")):
                        log(f"    {impl} skipped: {e}")
                    noted.add((impl, str(e)))
                    continue
                except Exception as e:  # noqa: BLE001 - report and go on; a crashing fused op fails the run
                    if impl == "fused":
                        failures.append({"case": case.id, "error": f"{mode}: {type(e).__name__}: {e}"})
                        parts.append("fused CRASHED")
                    log(f"    {impl} {mode} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                rows.append(report.make_row(case, impl, mode, t))
                parts.append(f"{impl} {t.median_ms:.4g} ms")
            log(f"    {mode}: " + ", ".join(parts))
        del inp
        if gpu:
            torch.cuda.empty_cache()
    timer.release()

    path = report.write_results(out, env, ceilings, rows, failures, log, suffix="-cudagraph" if graph else "")
    data = report.load(path)
    show(report.format_table({**data, "rows": rows, "failures": failures}))
    if gpu:
        show(report.format_targets(data["targets"]))
    if env.get("note"):
        show(f"NOTE: {env['note']}.")
    if env.get("native_alignment") is False:
        show(f"WARNING: the native CUDA alignment op did not build; mixed prefill sorted rows with the PyTorch "
             f"reference ({env.get('native_alignment_error')}).")
    if plot:
        report.plot(data, path.with_suffix(".png"), log)
    if failures:
        log(f"{len(failures)} fused case(s) FAILED (wrong against float64, or raised) and were not timed:")
        for f in failures:
            log(f"  {f['case']}: {f['error']}")
        return 1
    return 0


def _check_dtypes(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ("float32", "float16")
    return ("float32", "float16", "bfloat16")


def run_check(*, log: Callable[[str], None] = _stdout) -> int:
    """Small correctness sweep of the fused ops against float64 on the current device:
    outputs and gradients, LoRA and both bottleneck placements, every dtype available, both
    forward routes where the kernels run. Returns 0 when everything passes, else 1."""
    from adaptkern.ops.adapter_linear import use_triton

    device = default_device()
    log(f"adaptkern check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
        f"fused ops run {report.execution_path(device)}")
    routes = ("onepass", "split") if use_triton(torch.empty(0, device=device)) else ("auto",)
    todo = [(c, r) for c in cases.check_cases(_check_dtypes(device), gpu=device.type == "cuda") for r in routes]
    mixed = []
    if baselines.has_mixed():
        sizes = ((5, 3), (70, 4)) + (((600, 7), (2100, 16)) if device.type == "cuda" else ())
        mixed = [cases.Case("mixed", "lora", m, 96, 80, 8, num_adapters=s, dtype=d)
                 for d in _check_dtypes(device) for m, s in sizes]
    else:
        log("mixed_lora_linear: not checked (adaptkern.mixed_lora_linear does not exist yet)")
    failed = 0
    for case, route in todo + [(c, "auto") for c in mixed]:
        inp = cases.make_inputs(case, device, seed=1)
        if case.suite == "mixed":  # every 5th row base only (-1), gradients too
            res = baselines.check(case, cases.with_base_rows(inp, 5), mixed_grads=True)
        else:
            res = baselines.check(case, inp, route=route)
        label = f"{case.id} route={route}" if case.suite != "mixed" else f"{case.id} (-1 every 5th row)"
        log(f"{'PASS' if res.ok else 'FAIL'}  {label}: {res.summary()}")
        if not res.ok:
            failed += 1
            log(f"      {res.error or res.details()}")
    total = len(todo) + len(mixed)
    log(f"{total - failed}/{total} passed" + ("" if not failed else f"; {failed} FAILED"))
    return 1 if failed else 0
