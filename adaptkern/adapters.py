"""The adapter modules ``AdapterLinear`` holds: ``LoraAdapter``, ``DoraAdapter`` and
``BottleneckAdapter``, and the checks of their arguments (shared with model patching)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import validation as check
from .dora import dora_weight_norm


def lora_arguments(r, alpha=None, dropout=0.0, use_rslora=False, *, lora_alpha=None, lora_dropout=None) -> dict:
    """Check LoRA arguments (TypeError/ValueError naming each) -> {r, alpha, dropout, use_rslora}.

    ``lora_alpha`` / ``lora_dropout`` are PEFT's names for ``alpha`` / ``dropout``; giving both
    spellings of one is a TypeError. alpha None means alpha = r.
    """
    if lora_alpha is not None:
        if alpha is not None:
            raise TypeError(f"give alpha or lora_alpha (PEFT's name for it), not both: alpha={alpha!r}, "
                            f"lora_alpha={lora_alpha!r}")
        alpha = check.real("lora_alpha", lora_alpha)
    if lora_dropout is not None:
        if dropout != 0.0:
            raise TypeError(f"give dropout or lora_dropout (PEFT's name for it), not both: dropout={dropout!r}, "
                            f"lora_dropout={lora_dropout!r}")
        dropout = check.dropout("lora_dropout", lora_dropout)
    r = check.positive_int("r", r)
    return dict(r=r, alpha=float(r) if alpha is None else check.real("alpha", alpha),
                dropout=check.dropout("dropout", dropout), use_rslora=bool(use_rslora))


def bottleneck_arguments(rank, activation="relu", placement="sequential", scale=1.0) -> dict:
    """Check bottleneck arguments (TypeError/ValueError naming each) -> {rank, activation, placement, scale}."""
    return dict(rank=check.positive_int("rank", rank), activation=check.activation(activation),
                placement=check.placement(placement), scale=check.real("scale", scale))


class LoraAdapter(nn.Module):
    """LoRA weights of one adapter: ``lora_A [r, in]`` (Kaiming-uniform), ``lora_B [out, r]`` (zeros).

    Semantics: adds scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r (alpha/√r with rsLoRA).
    Arguments as :func:`lora_arguments`.
    """

    kind = "lora"

    def __init__(self, in_features, out_features, r, alpha=None, dropout=0.0, use_rslora=False, *,
                 lora_alpha=None, lora_dropout=None, device=None, dtype=None):
        super().__init__()
        args = lora_arguments(r, alpha, dropout, use_rslora, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.r, self.alpha, self.dropout = args["r"], args["alpha"], args["dropout"]
        self.use_rslora = args["use_rslora"]
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0, so no change until trained

    @property
    def rank(self) -> int:
        """r, under the name every other adapter uses."""
        return self.r

    @property
    def scale(self) -> float:
        """Semantics: alpha / r (alpha / √r with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Semantics: scale·B·A [out, in], computed in ``dtype``."""
        return self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, rslora={self.use_rslora}"


class DoraAdapter(LoraAdapter):
    """A LoRA adapter with DoRA's trained magnitude ``lora_magnitude_vector [out]`` (PEFT's name),
    initialised to ‖W + scale·B·A‖_row = ‖W‖_row (B is zero) of the base ``weight [out, in]``.

    Semantics: the layer computes y = (m / ‖W + scale·B·A‖_row) ⊙ (x·Wᵀ + scale·(x̃·Aᵀ)·Bᵀ) + b,
    the norm detached, x̃ = dropout(x) on the adapter branch (see :func:`adaptkern.dora.dora_linear`).
    Arguments as :func:`lora_arguments`.
    """

    kind = "dora"

    def __init__(self, in_features, out_features, r, alpha=None, dropout=0.0, use_rslora=False, *, weight,
                 lora_alpha=None, lora_dropout=None, device=None, dtype=None):
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, device=device, dtype=dtype)
        with torch.no_grad():
            norm = dora_weight_norm(weight.detach(), self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype),
                                    scale=self.scale)
        self.lora_magnitude_vector = nn.Parameter(norm.to(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter weights: ``down_weight [rank, N | K]``, ``down_bias [rank]``,
    ``up_weight [N, rank]`` and ``up_bias [N]`` (both zeros at creation).

    Semantics: sequential adds scale·(f(h·Dᵀ + d)·Uᵀ + u) to h = x·Wᵀ + b; parallel reads x.
    Arguments as :func:`bottleneck_arguments`.
    """

    kind = "bottleneck"

    def __init__(self, in_features, out_features, rank, activation="relu", placement="sequential", scale=1.0, *,
                 device=None, dtype=None):
        super().__init__()
        args = bottleneck_arguments(rank, activation, placement, scale)
        self.activation, self.placement, self.scale = args["activation"], args["placement"], args["scale"]
        reads = out_features if self.placement == "sequential" else in_features
        down = nn.Linear(reads, args["rank"], device=device, dtype=dtype)
        self.down_weight = nn.Parameter(down.weight.detach())
        self.down_bias = nn.Parameter(down.bias.detach())
        self.up_weight = nn.Parameter(torch.zeros(out_features, args["rank"], device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    @property
    def rank(self) -> int:
        """The bottleneck width: down_weight's rows."""
        return self.down_weight.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, activation={self.activation}, placement={self.placement}, scale={self.scale:g}"
