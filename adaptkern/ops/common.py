"""Pieces every op shares: activations, the sequential fold, dtype rules, dispatch."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from . import config


# The order is the activation code the kernels and AdapterPool store (code i = ACTIVATIONS[i]).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")

_ALIASES = {"swish": "silu", "linear": "identity", "none": "identity", "gelu_new": "gelu_tanh"}

PLACEMENTS = ("sequential", "parallel")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def canonical_activation(name: str) -> str:
    """Return the canonical activation name, resolving aliases ("swish" -> "silu")."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} (or 'swish')")
    return key


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """Semantics: f(z) for f in ACTIVATIONS ("gelu" is the erf form). Shape: any."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """Semantics: f'(z), elementwise (relu'(0) = 0, as autograd). Shape: any."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if name == "silu":
        sig = torch.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    raise ValueError(f"unknown activation {name!r}")


def fold_sequential(weight, bias, down_weight, down_bias):
    """Semantics: A = D·W, a = D·b + d, so that h·Dᵀ + d = x·Aᵀ + a for h = x·Wᵀ + b.

    Shapes: weight [N, K], bias [N] | None, down_weight [R, N], down_bias [R] | None ->
    (A [R, K], a [R] | None). Computed in float32 (or float64 for float64 inputs) and
    differentiable, so autograd yields dD = dA·W... and dd = da as docs/design-notes.md derives.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d32 = down_weight.to(acc)
    a_w = (d32 @ weight.to(acc)).to(down_weight.dtype)
    if bias is None and down_bias is None:
        return a_w, None
    a_b = torch.zeros(d32.shape[0], dtype=acc, device=d32.device)
    if bias is not None:
        a_b = a_b + d32 @ bias.to(acc)
    if down_bias is not None:
        a_b = a_b + down_bias.to(acc)
    return a_w, a_b.to(down_weight.dtype)

# Activation code i is reference.ACTIVATIONS[i] (the kernels branch on the code).
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def use_triton(x: Tensor) -> bool:
    """Whether ``x`` runs the Triton kernels (CUDA, or any device under the interpreter)."""
    return x.is_cuda or config.interpreting()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator and rank-R intermediate dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_flags(dtype: torch.dtype) -> dict:
    """Kernel dtype flags: bf16 is upcast under the interpreter (triton#11584)."""
    if dtype == torch.float64:
        return dict(DOT_DTYPE=tl.float64, ACC=tl.float64, PRECISION="ieee")
    if dtype == torch.float32 or (dtype == torch.bfloat16 and config.interpreting()):
        tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not config.interpreting()
        return dict(DOT_DTYPE=tl.float32, ACC=tl.float32, PRECISION="tf32" if tf32 else "ieee")
    return dict(DOT_DTYPE=TL_DTYPES[dtype], ACC=tl.float32, PRECISION="tf32")


def strides_of(t: Optional[Tensor], ndim: int = 2):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def elem_size(dot_dtype: dict) -> int:
    """Bytes per dot operand, for the shared-memory fit of ``config``."""
    return dot_dtype["DOT_DTYPE"].primitive_bitwidth // 8


def vectors(*ts):
    """1-D operands made contiguous: the kernels index them with unit stride."""
    return [None if t is None else t.contiguous() for t in ts]
