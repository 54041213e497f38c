"""Correctness before speed: the fused op of a case against a float64 evaluation of the same math.

Each output and gradient must satisfy the rule of :mod:`adaptkern.testing` (error at most twice
what the eager composition makes in the same dtype, plus a small atol). ``adaptkern bench``
checks every case before timing it (a fused op that fails is never timed); ``adaptkern check``
runs :func:`run_check`, a sweep of small odd shapes in every dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import adaptkern
from adaptkern.ops.mixed_adapter_linear import reference as mixed_reference
from adaptkern.ops.config import interpreting
from adaptkern.testing import Comparison, compare

from . import cases, env, impls
from .cases import Case, CoreInputs, MixedInputs


@dataclasses.dataclass
class CheckResult:
    """The comparisons of one case (one per output and gradient), or the error it raised."""

    case: Case
    comparisons: list = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.comparisons)

    def summary(self) -> str:
        """One line: ok/FAILED and the comparison closest to (or furthest past) its bound."""
        if self.error:
            return f"FAILED ({self.error})"
        if not self.comparisons:
            return "ok (nothing compared)"
        worst = max(self.comparisons, key=lambda c: c.error / c.bound if c.bound else float(c.error > 0))
        return f"{'ok' if self.ok else 'FAILED'} (closest to its bound: {worst})"

    def failures(self) -> str:
        """The failing comparisons (or the error), one per line."""
        return self.error or "\n".join(str(c) for c in self.comparisons if not c.ok)


def check_case(case: Case, inp, *, route: str = "auto", grads: Optional[bool] = None) -> CheckResult:
    """Compare the fused op with float64 on ``inp``: the output, with ``grads`` (default: when the
    case times forward_backward) every gradient (x and the adapter's parameters), and for
    single-adapter cases the no-grad inference path; the other suites' ``check`` compares every
    adaptkern implementation of the case. A fused op that raises is a failed check (the error is
    kept)."""
    res = CheckResult(case)
    grads = "forward_backward" in case.modes if grads is None else grads
    try:
        if case.suite in cases.SUITE_MODULES:
            res.comparisons = cases.SUITE_MODULES[case.suite].check(case, inp, grads)
        elif case.suite == "mixed":
            res.comparisons = _check_mixed(inp, grads)
        else:
            res.comparisons = _check_core(case, inp, route, grads)
    except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed check
        res.error = f"{type(e).__name__}: {e}"
    return res


def _recast(inp: CoreInputs, dtype: Optional[torch.dtype] = None) -> CoreInputs:
    """Fresh leaves with ``inp``'s values (in ``dtype``), the trainable ones requiring grad."""
    trainable = set(inp.trainable)

    def leaf(name, t):
        if t is None:
            return None
        return t.detach().to(dtype or t.dtype).requires_grad_(name in trainable)

    return CoreInputs(**{f.name: leaf(f.name, getattr(inp, f.name)) for f in dataclasses.fields(inp)})


def _run_core(fn: Callable[[CoreInputs], torch.Tensor], inp: CoreInputs, grads: bool):
    with torch.set_grad_enabled(grads):
        y = fn(inp)
    wrt = list(inp.trainable.values())
    return y.detach(), (torch.autograd.grad(y, wrt, inp.dy) if grads else ())


def _check_core(case: Case, inp: CoreInputs, route: str, grads: bool) -> list[Comparison]:
    y_f, g_f = _run_core(lambda i: impls.fused_core(case, i, route=route), _recast(inp), grads)
    y_e, g_e = _run_core(lambda i: impls.eager_core(case, i), _recast(inp), grads)
    y_o, g_o = _run_core(lambda i: impls.eager_core(case, i), _recast(inp, torch.float64), grads)
    out = [compare("y", y_o, y_f, y_e)]
    out += [compare(f"{name}.grad", go, gf, ge) for name, gf, ge, go in zip(inp.trainable, g_f, g_e, g_o)]
    with torch.no_grad():  # the inference path (a sequential bottleneck's cached fold)
        folded = impls.fold(inp) if case.placement == "sequential" else None
        out.append(compare("y (no_grad)", y_o, impls.fused_core(case, inp, folded, route=route), y_e))
    return out


def _check_mixed(inp: MixedInputs, grads: bool) -> list[Comparison]:
    """Output (and with ``grads`` the gradients of x, lora_a, lora_b) against float64."""
    dy = None
    if grads:
        g = torch.Generator(device=inp.x.device).manual_seed(7)
        dy = torch.randn(inp.x.shape[0], inp.weight.shape[0], generator=g, device=inp.x.device).to(inp.x.dtype)

    def run(fused: bool, dtype: Optional[torch.dtype] = None):
        x, a, b = (t.detach().to(dtype or t.dtype).requires_grad_(grads) for t in (inp.x, inp.lora_a, inp.lora_b))
        w = inp.weight.to(dtype or inp.weight.dtype)
        with torch.set_grad_enabled(grads):
            if fused:
                y = adaptkern.mixed_lora_linear(x, w, None, a, b, inp.adapter_ids, scales=inp.scales,
                                                validate_ids=False)
            else:
                scales = inp.scales.to(dtype or inp.scales.dtype)
                y = mixed_reference.mixed_adapter_linear_ref(x, w, None, a, None, b, None, scales, None, None,
                                                       inp.adapter_ids)
        gr = torch.autograd.grad(y, (x, a, b), dy.to(y.dtype)) if grads else ()
        return y.detach(), gr

    (y_f, g_f), (y_e, g_e), (y_o, g_o) = run(True), run(False), run(False, torch.float64)
    out = [compare("y", y_o, y_f, y_e)]
    names = ("x.grad", "lora_a.grad", "lora_b.grad")
    return out + [compare(n, go, gf, ge) for n, gf, ge, go in zip(names, g_f, g_e, g_o)]


def _dtypes(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ("float32", "float16")
    return ("float32", "float16", "bfloat16")


def run_check(*, log: Callable[[str], None] = lambda s: print(s, flush=True)) -> int:
    """Correctness sweep of the fused ops against float64 on the current device: outputs and
    gradients of LoRA, both bottleneck placements and mixed batches (every 5th row base only),
    in every dtype available; both forward routes where the Triton kernels run.
    Returns the exit status: 0 when everything passes, else 1."""
    device = env.default_device()
    log(f"adaptkern check on {env.device_name(device)}: fused ops run {env.execution_path(device)}")
    routes = ("onepass", "split") if device.type == "cuda" or interpreting() else ("auto",)
    failed = total = 0
    for case in cases.check_cases(_dtypes(device), gpu=device.type == "cuda"):
        mixed = case.suite == "mixed"
        for route in ("auto",) if mixed else routes:
            if mixed:
                inp = cases.make_mixed_inputs(case, device, 1, base_every=5)
                res, label = check_case(case, inp, grads=True), f"{case.id} (-1 every 5th row)"
            else:
                res, label = check_case(case, cases.make_core_inputs(case, device, 1), route=route, grads=True), case.id
                label += f" route={route}"
            total += 1
            log(f"{'PASS' if res.ok else 'FAIL'}  {label}: {res.summary()}")
            if not res.ok:
                failed += 1
                log("      " + res.failures().replace("\n", "\n      "))
    log(f"{total - failed}/{total} passed" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0
