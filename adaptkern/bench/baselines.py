"""What is timed: the fused op and its baselines, and the correctness check that comes first.

Implementations (``impl`` in the results file):

* ``fused``          ``adaptkern.lora_linear`` / ``bottleneck_linear`` / ``mixed_lora_linear``.
                     Forward mode of a sequential bottleneck passes the folded down-projection
                     precomputed, as ``AdapterLinear`` caches it for inference; forward_backward
                     folds inside every call (the fold is differentiated).
* ``eager``          PyTorch as PEFT and AdapterHub compute it: ``F.linear`` for the frozen layer,
                     then the adapter as separate ops (LoRA: ``result + lora_B(lora_A(x)) * scaling``;
                     bottleneck: ``h + up(act(down(src))) * scaling``). Mixed batches: the base
                     once, then per distinct adapter index its rows, ``lora_B(lora_A(rows)) * scale``
                     and ``index_add_`` into the result (the row indices are built once, outside
                     the timing; PEFT rebuilds them on the host at every call).
* ``peft``           the real ``peft`` LoRA layer (``peft.tuners.lora.Linear`` from
                     ``inject_adapter_in_model``) holding the same weights, adapter weights in the
                     base's dtype. LoRA, core suite only; absent when peft is not importable.
* ``compiled_eager`` ``torch.compile(eager, dynamic=False)`` (dynamo reset before each case).
                     Core suite only; left out on a CPU (inductor's C++ build takes ~20 s a shape).
* ``base_linear``    the frozen ``F.linear`` alone: the floor.

Modes: ``forward`` runs under ``torch.no_grad()`` (inference); ``forward_backward`` runs the
forward with autograd and ``torch.autograd.grad`` of the output against ``dy`` with respect to
x and the adapter's parameters (the frozen weight takes no gradient; ``base_linear`` differentiates x).

Correctness (:func:`check`) follows DESIGN §6: each output and gradient of ``fused`` may differ
from a float64 evaluation of ``eager`` by at most 2× what ``eager`` in the same dtype does, plus
a small atol scaled by the output's magnitude.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import adaptkern
from adaptkern.ops import reference

from .cases import Case, CoreInputs, MixedInputs

IMPLS = ("fused", "eager", "peft", "compiled_eager", "base_linear")
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


class Unavailable(Exception):
    """This implementation does not apply to the case, or cannot run here (the message says why)."""


def has_mixed() -> bool:
    """Whether ``adaptkern.mixed_lora_linear`` exists yet."""
    return hasattr(adaptkern, "mixed_lora_linear")


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:
        return False
    return True


# -- eager (as PEFT and AdapterHub compute it) ------------------------------------------


def eager_lora(x, weight, bias, lora_a, lora_b, scale):
    """PEFT's LoRA Linear: result = base(x); result = result + lora_B(lora_A(x)) * scaling."""
    result = F.linear(x, weight, bias)
    return result + F.linear(F.linear(x, lora_a), lora_b) * scale


def eager_bottleneck(x, weight, bias, down_w, down_b, up_w, up_b, scale, activation, placement):
    """AdapterHub's bottleneck: h = base(x); h + up(act(down(src))) * scaling, src = h or x."""
    h = F.linear(x, weight, bias)
    src = h if placement == "sequential" else x
    return h + F.linear(reference.activation(F.linear(src, down_w, down_b), activation), up_w, up_b) * scale


def eager_mixed(x, weight, bias, lora_a, lora_b, groups, scales):
    """PEFT's mixed batch: the base once, then per distinct adapter its rows' LoRA term,
    index-added into the result. ``groups`` = [(slot, row indices)], ``scales`` floats."""
    result = F.linear(x, weight, bias)
    for slot, rows in groups:
        sub = x.index_select(0, rows)
        result.index_add_(0, rows, F.linear(F.linear(sub, lora_a[slot]), lora_b[slot]) * scales[slot])
    return result


def _eager_core(case: Case, inp: CoreInputs, cast=None):
    t = [inp.x, inp.weight, inp.bias, inp.down_w, inp.down_b, inp.up_w, inp.up_b]
    if cast is not None:
        t = [None if v is None else cast(v) for v in t]
    x, w, b, dw, db, uw, ub = t
    if case.kind == "lora":
        return eager_lora(x, w, b, dw, uw, case.scale)
    return eager_bottleneck(x, w, b, dw, db, uw, ub, case.scale, case.activation, case.placement)


# -- fused ------------------------------------------------------------------------------


def _fused_core(case: Case, inp: CoreInputs, folded=None, route: str = "auto", cast=None):
    t = [inp.x, inp.weight, inp.bias, inp.down_w, inp.down_b, inp.up_w, inp.up_b]
    if cast is not None:
        t = [None if v is None else cast(v) for v in t]
    x, w, b, dw, db, uw, ub = t
    if case.kind == "lora":
        return adaptkern.lora_linear(x, w, b, dw, uw, scale=case.scale, route=route)
    return adaptkern.bottleneck_linear(x, w, b, dw, db, uw, ub, scale=case.scale, activation=case.activation,
                                       placement=case.placement, folded=folded, route=route)


def _fold(inp: CoreInputs):
    with torch.no_grad():
        return reference.fold_sequential(inp.weight, inp.bias, inp.down_w, inp.down_b)


def _mixed_extra() -> dict:
    """``validate_ids=False`` where the op takes it: its id check reads the ids on the host (a
    sync), which must stay out of the timed region (the ids are valid by construction)."""
    try:
        params = inspect.signature(adaptkern.mixed_lora_linear).parameters
    except (TypeError, ValueError):
        return {}
    return {"validate_ids": False} if "validate_ids" in params else {}


def _fused_mixed(inp: MixedInputs, extra: Optional[dict] = None):
    return adaptkern.mixed_lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.adapter_ids,
                                       scales=inp.scales, ranks=None, **(extra or {}))


# -- peft -----------------------------------------------------------------------------------


def make_peft_lora(inp: CoreInputs, scale: float) -> nn.Module:
    """The real peft LoRA layer around a frozen nn.Linear holding ``inp.weight``, with
    lora_A/lora_B sharing ``inp``'s adapter tensors (same dtype as the base) and scaling = scale."""
    try:
        import peft
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"peft is not importable ({type(e).__name__}: {e})") from None
    n, k = inp.weight.shape
    r = inp.down_w.shape[0]
    holder = nn.Module()
    holder.base = nn.Linear(k, n, bias=inp.bias is not None, device=inp.weight.device, dtype=inp.weight.dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=scale * r, target_modules=["base"], lora_dropout=0.0, bias="none")
    holder = peft.inject_adapter_in_model(cfg, holder)
    layer = holder.base
    base = layer.get_base_layer()
    base.weight = nn.Parameter(inp.weight.detach(), requires_grad=False)
    if inp.bias is not None:
        base.bias = nn.Parameter(inp.bias.detach(), requires_grad=False)
    layer.lora_A["default"].weight = nn.Parameter(inp.down_w.detach())
    layer.lora_B["default"].weight = nn.Parameter(inp.up_w.detach())
    layer.scaling["default"] = scale
    return layer


# -- building the timed callables ------------------------------------------------------------


def _with_mode(forward: Callable[[], torch.Tensor], wrt: list, dy, mode: str) -> Callable[[], object]:
    if mode == "forward":
        def fn():
            with torch.no_grad():
                return forward()
    elif mode == "forward_backward":
        def fn():
            return torch.autograd.grad(forward(), wrt, dy)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return fn


def build(case: Case, impl: str, mode: str, inp, device) -> Callable[[], object]:
    """The zero-argument callable that ``impl`` times for ``case`` in ``mode``.

    Raises :class:`Unavailable` when the implementation does not apply here.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if case.suite == "mixed":
        return _build_mixed(case, impl, mode, inp)
    if impl == "base_linear":
        return _with_mode(lambda: F.linear(inp.x, inp.weight, inp.bias), [inp.x], inp.dy, mode)
    if impl == "fused":
        folded = _fold(inp) if (mode == "forward" and case.placement == "sequential") else None
        return _with_mode(lambda: _fused_core(case, inp, folded), inp.trainable, inp.dy, mode)
    if impl == "eager":
        return _with_mode(lambda: _eager_core(case, inp), inp.trainable, inp.dy, mode)
    if impl == "peft":
        if case.kind != "lora":
            raise Unavailable("peft has no bottleneck adapters")
        layer = make_peft_lora(inp, case.scale)
        wrt = [inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return _with_mode(lambda: layer(inp.x), wrt, inp.dy, mode)
    # compiled_eager
    if torch.device(device).type != "cuda":
        raise Unavailable("compiled_eager is left out on a CPU (inductor's C++ build takes ~20 s a shape)")
    torch._dynamo.reset()
    if case.kind == "lora":
        scale = case.scale
        compiled = torch.compile(lambda x, w, b, a, bb: eager_lora(x, w, b, a, bb, scale), dynamic=False)
        args = (inp.x, inp.weight, inp.bias, inp.down_w, inp.up_w)
    else:
        scale, act, placement = case.scale, case.activation, case.placement
        compiled = torch.compile(lambda x, w, b, dw, db, uw, ub: eager_bottleneck(x, w, b, dw, db, uw, ub, scale,
                                                                                 act, placement), dynamic=False)
        args = (inp.x, inp.weight, inp.bias, inp.down_w, inp.down_b, inp.up_w, inp.up_b)
    return _with_mode(lambda: compiled(*args), inp.trainable, inp.dy, mode)


def _build_mixed(case: Case, impl: str, mode: str, inp: MixedInputs):
    if mode != "forward":
        raise Unavailable("the mixed suite times forward only")
    if impl == "base_linear":
        return _with_mode(lambda: F.linear(inp.x, inp.weight, inp.bias), [], None, mode)
    if impl == "eager":
        scales = inp.scales.tolist()
        return _with_mode(lambda: eager_mixed(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.groups,
                                              scales), [], None, mode)
    if impl == "fused":
        if not has_mixed():
            raise Unavailable("adaptkern.mixed_lora_linear does not exist yet")
        extra = _mixed_extra()
        return _with_mode(lambda: _fused_mixed(inp, extra), [], None, mode)
    raise Unavailable(f"{impl} is not part of the mixed suite")


# -- correctness ------------------------------------------------------------------------------


@dataclass
class Check:
    """Outcome of :func:`check`: ``ok``, one line per compared tensor, and an error if it raised."""

    case: Case
    ok: bool = True
    lines: list = field(default_factory=list)
    error: Optional[str] = None

    def summary(self) -> str:
        if self.error:
            return f"FAILED ({self.error})"
        worst = max(self.lines, key=lambda t: t[1] / t[2] if t[2] else 0.0, default=None)
        if worst is None:
            return "ok" if self.ok else "FAILED"
        name, err, bound = worst
        return f"{'ok' if self.ok else 'FAILED'} (worst {name}: err {err:.2e} vs bound {bound:.2e})"

    def compare(self, name: str, out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor) -> None:
        if tuple(out.shape) != tuple(ref64.shape):
            self.ok = False
            self.lines.append((name, float("inf"), 0.0))
            return
        if out.numel() == 0:
            return
        ref = ref64.double()
        err = (out.double() - ref).abs().nan_to_num(nan=float("inf")).max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        bound = 2.0 * eager_err + ATOL[out.dtype] * max(1.0, ref.abs().max().item())
        self.lines.append((name, err, bound))
        if not err <= bound:
            self.ok = False

    def details(self) -> str:
        return "; ".join(f"{n}: err {e:.2e} {'<=' if e <= b else '>'} bound {b:.2e}" for n, e, b in self.lines)


_GRAD_NAMES = ("x", "down_w", "down_b", "up_w", "up_b")


def check(case: Case, inp, route: str = "auto", mixed_grads: bool = False) -> Check:
    """Fused against float64 eager on the same inputs: the output and every gradient (x and
    the adapter's parameters) plus the inference-path output; for mixed batches the output,
    and the gradients with ``mixed_grads`` (the mixed suite times forward only)."""
    res = Check(case)
    try:
        if case.suite == "mixed":
            _check_mixed(res, inp, mixed_grads)
        else:
            _check_core(res, case, inp, route)
    except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed check
        res.ok, res.error = False, f"{type(e).__name__}: {e}"
    return res


def _check_core(res: Check, case: Case, inp: CoreInputs, route: str) -> None:
    names = [n for n, t in zip(_GRAD_NAMES, (inp.x, inp.down_w, inp.down_b, inp.up_w, inp.up_b)) if t is not None]

    def run(fn, cast):
        leaves = {}

        def c(t):
            v = cast(t.detach()).requires_grad_(t.requires_grad)
            leaves[id(t)] = v
            return v

        y = fn(c)
        ins = [leaves[id(t)] for t in inp.trainable]
        grads = torch.autograd.grad(y, ins, cast(inp.dy))
        return y.detach(), [g.detach() for g in grads]

    y_f, g_f = run(lambda c: _fused_core(case, inp, route=route, cast=c), lambda t: t)
    y_e, g_e = run(lambda c: _eager_core(case, inp, cast=c), lambda t: t)
    y_o, g_o = run(lambda c: _eager_core(case, inp, cast=c), lambda t: t.double())
    res.compare("y", y_f, y_o, y_e)
    for name, gf, ge, go in zip(names, g_f, g_e, g_o):
        res.compare(f"d{name}", gf, go, ge)
    with torch.no_grad():  # the forward mode's path (cached fold for a sequential bottleneck)
        folded = _fold(inp) if case.placement == "sequential" else None
        res.compare("y (no_grad)", _fused_core(case, inp, folded, route=route), y_o, y_e)


def _check_mixed(res: Check, inp: MixedInputs, grads: bool = False) -> None:
    """Output (and with ``grads``, the gradients of x, lora_a, lora_b) against float64."""
    scales = inp.scales.tolist()
    dy = None
    if grads:
        g = torch.Generator(device=inp.x.device).manual_seed(7)
        dy = torch.randn(inp.x.shape[0], inp.weight.shape[0], generator=g, device=inp.x.device).to(inp.x.dtype)

    def run(fn, cast):
        x, a, b = (cast(t.detach()).requires_grad_(grads) for t in (inp.x, inp.lora_a, inp.lora_b))
        w = cast(inp.weight)
        bias = None if inp.bias is None else cast(inp.bias)
        with torch.set_grad_enabled(grads):
            y = fn(x, w, bias, a, b)
        gr = torch.autograd.grad(y, (x, a, b), cast(dy)) if grads else ()
        return y.detach(), gr

    extra = _mixed_extra()
    fused = lambda x, w, bias, a, b: adaptkern.mixed_lora_linear(  # noqa: E731
        x, w, bias, a, b, inp.adapter_ids, scales=inp.scales, ranks=None, **extra)
    eager = lambda x, w, bias, a, b: eager_mixed(x, w, bias, a, b, inp.groups, scales)  # noqa: E731
    y_f, g_f = run(fused, lambda t: t)
    y_e, g_e = run(eager, lambda t: t)
    y_o, g_o = run(eager, lambda t: t.double())
    res.compare("y", y_f, y_o, y_e)
    for name, gf, ge, go in zip(("dx", "dlora_a", "dlora_b"), g_f, g_e, g_o):
        res.compare(name, gf, go, ge)
