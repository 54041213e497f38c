"""What every suite of the harness shares: the :class:`Case` record, the modes, the input
generator, the wrapper that turns a computation into a timed callable, and :class:`Unavailable`.

A case id reads ``<kind>-M<rows>-K<in>-N<out>-r<rank>[-<activation>][-<variant>][-S<adapters>]-<dtype>``:
the activation when it is not the identity, the variant when the suite has one (``train`` /
``decode``, ``bert`` / ``llama``), S in the suites whose rows pick their adapter (mixed, serving).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from adaptkern.testing import compare

MODES = ("forward", "forward_backward")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
LORA_SCALE = 2.0  # alpha = 2r, a common LoRA setting
BOTTLENECK_SCALE = 1.0
PER_ROW_SUITES = ("mixed", "serving")  # every row picks its adapter: the id carries S
FORWARD_ONLY = ("mixed", "serving")


class Unavailable(Exception):
    """This implementation does not apply to the case, or cannot run here (the message says why)."""


@dataclass(frozen=True)
class Case:
    """One problem. ``rank`` is r (LoRA) or the bottleneck size R; ``num_adapters`` the number
    of adapters a per-row suite's batch draws from (1 elsewhere); ``variant`` a suite's
    setting that the shape does not say (``train``/``decode``, ``bert``/``llama``, ``qkv``)."""

    suite: str
    kind: str
    M: int
    K: int
    N: int
    rank: int
    num_adapters: int = 1
    activation: str = "identity"
    dtype: str = "bfloat16"
    variant: str = ""

    @property
    def id(self) -> str:
        parts = [self.kind, f"M{self.M}", f"K{self.K}", f"N{self.N}", f"r{self.rank}"]
        if self.activation != "identity":
            parts.append(self.activation)
        if self.variant:
            parts.append(self.variant)
        if self.suite in PER_ROW_SUITES:
            parts.append(f"S{self.num_adapters}")
        parts.append(SHORT.get(self.dtype, self.dtype))
        return "-".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def placement(self) -> Optional[str]:
        """"sequential" or "parallel" for a core bottleneck, None otherwise."""
        return self.kind.split("_", 1)[1] if self.kind.startswith("bottleneck_") else None

    @property
    def scale(self) -> float:
        return BOTTLENECK_SCALE if self.kind.startswith(("bottleneck", "norm_")) else LORA_SCALE

    @property
    def modes(self) -> tuple[str, ...]:
        """Forward only for per-row batches and decode; forward_backward only for training
        variants and DoRA (a fine-tuning method); both otherwise."""
        if self.suite in FORWARD_ONLY or self.variant == "decode":
            return ("forward",)
        if self.suite == "dora" or self.variant == "train":
            return ("forward_backward",)
        return MODES

    def fields(self) -> dict:
        """The fields of a results row that describe the case."""
        return asdict(self)


def randn(shape, std, dtype, device, gen) -> torch.Tensor:
    """N(0, std²) drawn in float32 from ``gen``, then cast to ``dtype``."""
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def missing(module: str, extra: str = "bench") -> Optional[str]:
    """None when ``module`` imports, else why not (with the pip extra that brings it)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return f"{module} is not importable ({type(e).__name__}: {e}); pip install -e '.[{extra}]'"
    return None


def with_mode(forward: Callable[[], object], wrt: list, dy, mode: str) -> Callable[[], object]:
    """The timed callable of ``forward`` in ``mode``: under ``torch.no_grad()`` (forward), or
    the forward with autograd and ``torch.autograd.grad`` of its output against ``dy`` with
    respect to ``wrt`` (forward_backward)."""
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


def leaves(tensors: dict, dtype: Optional[torch.dtype] = None, grad: tuple = ()) -> dict:
    """Fresh leaves with the values of ``tensors`` (in ``dtype`` when given; None stays None),
    those named in ``grad`` requiring grad."""
    return {k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(k in grad)
            for k, t in tensors.items()}


def evaluate(fn: Callable[..., torch.Tensor], tensors: dict, grad: tuple, dy: Optional[torch.Tensor],
             dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """[output, gradient of every tensor named in ``grad``] of ``fn(**fresh leaves)`` (in
    ``dtype`` when given), the gradients against ``dy``; no autograd when ``grad`` is empty."""
    t = leaves(tensors, dtype, grad)
    with torch.set_grad_enabled(bool(grad)):
        y = fn(**t)
    grads = torch.autograd.grad(y, [t[n] for n in grad], dy.to(y.dtype)) if grad else ()
    return [y.detach(), *grads]


def compare_all(names, ref: list, out: list, eager: list) -> list:
    """:func:`adaptkern.testing.compare` of each named output: the rule of the tests."""
    return [compare(n, r, o, e) for n, r, o, e in zip(names, ref, out, eager)]
