"""The tolerance rule of adaptkern, in one place: tests, ``adaptkern check``, the benchmark
harness (which checks every case before timing it) and the tuner all call it.

Rule: an output computed in a low precision (``out``) may differ from a high-precision
reference of the same math (``ref``, usually float64) by at most

    bound = ratio · max|eager − ref| + atol(out.dtype) · max(1, max|ref|)

where ``eager`` is the plain PyTorch composition computed in ``out``'s dtype (the error the
dtype itself costs; ``ratio`` is 2 by default) and the atol term keeps the bound from being 0
where eager happens to be exact. ``eager=None`` leaves only the atol term.

:func:`compare` returns the verdict with the tensor's name, its largest error, where that
error is (an index into the tensor), the values there and the bound; :func:`assert_close`
raises ``AssertionError`` with the same text when the verdict is a failure.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["ATOL", "Comparison", "assert_close", "compare"]

# Per-dtype absolute tolerance, scaled by max(1, max|ref|).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


class Comparison(NamedTuple):
    """The outcome of comparing one tensor with its reference.

    ``error`` is max|out − ref| (inf where out is NaN or infinite and ref is not), ``index``
    where it occurs (None for an empty tensor or a shape mismatch), ``actual``/``expected``
    the values of out and ref there, ``bound`` the allowed error and ``eager_error``
    max|eager − ref| (0.0 without eager). ``problem`` says what else went wrong (a shape
    mismatch), or is None.
    """

    name: str
    ok: bool
    error: float
    bound: float
    eager_error: float
    index: Optional[tuple]
    actual: Optional[float]
    expected: Optional[float]
    problem: Optional[str] = None

    def __str__(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        if self.index is None:
            return f"{self.name}: empty, nothing to compare"
        rel = "<=" if self.ok else ">"
        return (f"{self.name}: max error {self.error:.3g} at index {list(self.index)} (got {self.actual:.6g}, "
                f"expected {self.expected:.6g}) {rel} allowed {self.bound:.3g} "
                f"(eager's error {self.eager_error:.3g})")


def _abs_error(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|a − ref| in float64; equal values (infinities, NaN against NaN) count 0, any other NaN inf."""
    a, ref = a.detach().double(), ref.detach().double()
    err = (a - ref).abs()
    same = (a == ref) | (a.isnan() & ref.isnan())
    return torch.where(same, torch.zeros_like(err), err).nan_to_num(nan=float("inf"), posinf=float("inf"))


def compare(name: str, ref: torch.Tensor, out: torch.Tensor, eager: Optional[torch.Tensor] = None, *,
            ratio: float = 2.0, atol: Optional[float] = None) -> Comparison:
    """Compare ``out`` with ``ref`` under the rule of this module; never raises on a mismatch.

    Shapes: ``ref``, ``out`` and ``eager`` alike (any shape). ``atol`` overrides the
    per-dtype ``ATOL[out.dtype]`` (still scaled by max(1, max|ref|)).
    """
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(name, False, float("inf"), 0.0, 0.0, None, None, None,
                          f"shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    if eager is not None and tuple(eager.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: eager has shape {tuple(eager.shape)}, the reference {tuple(ref.shape)}")
    if out.numel() == 0:
        return Comparison(name, True, 0.0, 0.0, 0.0, None, None, None)
    err = _abs_error(out, ref)
    flat = int(err.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    error = float(err.reshape(-1)[flat])
    eager_error = float(_abs_error(eager, ref).max()) if eager is not None else 0.0
    scale = max(1.0, float(ref.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()))
    bound = ratio * eager_error + (ATOL.get(out.dtype, 0.0) if atol is None else atol) * scale
    actual, expected = float(out.detach().reshape(-1)[flat]), float(ref.detach().reshape(-1)[flat])
    return Comparison(name, error <= bound, error, bound, eager_error, index, actual, expected)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, eager: Optional[torch.Tensor] = None, *,
                 ratio: float = 2.0, atol: Optional[float] = None) -> Comparison:
    """:func:`compare`, raising ``AssertionError`` (naming the tensor, the error, its index and
    the bound) when ``out`` is outside the bound. Returns the comparison when it passes."""
    result = compare(name, ref, out, eager, ratio=ratio, atol=atol)
    if not result.ok:
        raise AssertionError(str(result))
    return result
