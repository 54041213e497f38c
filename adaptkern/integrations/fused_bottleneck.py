"""Bottleneck adapters that read the residual stream (AdapterHub ``seq_bn``, ``par_bn``, ``scaled_par_bn``
and their variants), placed in BERT-style, Llama-style and GPT-2 layers on the norm-fused op; on BERT-style and
GPT-2 layers also the Houlsby-style ones (``double_seq_bn``: they read h after the model's dropout on h).

AdapterHub's formula (``adapters`` 1.3, ``methods.modeling``) with h the sub-block's output Linear
(after BERT's hidden dropout), r the sub-block's residual input and LN its LayerNorm (none on
Llama-style models)::

    sequential: x_ad = LN(h + r) if original_ln_before else h    (no LN: h + r)
                res  = h (residual_before_ln true) | x_ad (false) | h + r ("post_add", LN only)
                out  = res + s·A(x_ad)
    parallel:   out  = h + s·A(r)
    both:       y    = LN(out + r) if original_ln_after else out  (no LN: out + r)

Every case is one call of :func:`adaptkern.bottleneck_norm.bottleneck_norm` with the adapter's
input a and the coefficients of (h, r, LN(h + r)) given by :func:`placement`. On BERT-style
layers the sub-block's output module (dense, dropout, LayerNorm) is replaced by
:class:`NormBottleneckOutput` (same parameter names, same dropout: exact in training too). On
Llama-style layers and GPT-2 the decoder adds r itself after the Linear, so
:class:`ResidualBottleneckLinear` replaces the Linear (GPT-2: the Conv1D ``c_proj`` and the residual
dropout after it, which drops h before the adapter reads it) and returns y − r (its coefficient of r
is one less); it reads r from a forward pre-hook on the norm that opens the sub-block, whose input is r.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..bottleneck_norm import bottleneck_norm


def placement(cfg: dict, has_norm: bool) -> tuple[str, tuple[float, float, float], bool]:
    """(adapter_input, (c_h, c_r, c_n), final_norm) of an AdapterHub BnConfig dict on a sub-block with
    (BERT-style) or without (Llama-style) a norm after the residual; y as the module docstring gives it.
    Raises NotImplementedError naming the field where the ``adapters`` library itself fails."""
    rbl = cfg.get("residual_before_ln", True)
    if cfg.get("is_parallel", False):
        adapter_input, coeffs = "residual", [1.0, 0.0, 0.0]
    elif cfg.get("original_ln_before", False):
        adapter_input = "norm" if has_norm else "sum"
        if rbl == "post_add" and not has_norm:
            raise NotImplementedError("adapter config residual_before_ln='post_add' on a model without a norm after "
                                      "the residual: the adapters library itself fails there (no residual is set)")
        coeffs = {True: [1.0, 0.0, 0.0], "post_add": [1.0, 1.0, 0.0],
                  False: [0.0, 0.0, 1.0] if has_norm else [1.0, 1.0, 0.0]}[rbl]
    else:
        if rbl == "post_add":
            raise NotImplementedError("adapter config residual_before_ln='post_add' with original_ln_before=false: "
                                      "the adapters library itself fails there (no residual is set)")
        adapter_input, coeffs = "output", [1.0, 0.0, 0.0]
    final = bool(cfg.get("original_ln_after", True))
    if final:
        coeffs[1] += 1.0
    return adapter_input, tuple(coeffs), final and has_norm


class FusedBottleneck(nn.Module):
    """One adapter's parameters: down [R, H] (+ bias), up [H, R] (+ bias), and, when learned, its
    scaling ([1], or [H] per channel); ``scale`` holds a constant scaling."""

    def __init__(self, hidden: int, size: int, *, activation: str, scaling, adapter_input: str, coefficients,
                 final_norm: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.down_weight = nn.Parameter(torch.zeros(size, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(size, **kw))
        self.up_weight = nn.Parameter(torch.zeros(hidden, size, **kw))
        self.up_bias = nn.Parameter(torch.zeros(hidden, **kw))
        self.scale: Optional[float] = None
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **kw))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden, **kw))
        else:
            self.scale = float(scaling)
        self.activation = activation
        self.adapter_input = adapter_input
        self.coefficients = tuple(coefficients)
        self.final_norm = final_norm

    def scale_value(self):
        return self.scale if self.scale is not None else self.scaling

    def extra_repr(self) -> str:
        return (f"{self.down_weight.shape[1]} -> {self.down_weight.shape[0]} -> {self.up_weight.shape[0]}, "
                f"activation={self.activation!r}, input={self.adapter_input!r}, coefficients={self.coefficients}, "
                f"final_norm={self.final_norm}")


def _run(adapter: FusedBottleneck, x, weight, bias, residual, coefficients, norm: Optional[nn.Module],
         final_norm: bool):
    needs_norm = final_norm or adapter.adapter_input == "norm" or coefficients[2] != 0.0
    return bottleneck_norm(
        x, weight, bias, residual, adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias,
        scale=adapter.scale_value(), activation=adapter.activation, adapter_input=adapter.adapter_input,
        coefficients=coefficients, norm="layernorm" if needs_norm else "none",
        norm_weight=norm.weight if needs_norm else None, norm_bias=norm.bias if needs_norm else None,
        eps=norm.eps if needs_norm else 1e-5, final_norm=final_norm)


class NormBottleneckOutput(nn.Module):
    """A BERT-style sub-block output (``dense`` → ``dropout`` → ``LayerNorm(· + input_tensor)``) with
    fused bottleneck adapters; ``active_adapter`` None runs the original computation."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        if self.active_adapter is None:
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        adapter = self.adapters[self.active_adapter]
        x, weight, bias = hidden_states, self.dense.weight, self.dense.bias
        if self.training and self.dropout.p > 0:  # h is dropped before the adapter reads it
            x, weight, bias = self.dropout(self.dense(hidden_states)), None, None
        return _run(adapter, x, weight, bias, input_tensor, adapter.coefficients, self.LayerNorm, adapter.final_norm)


class ResidualBottleneckLinear(nn.Module):
    """A pre-norm sub-block's output Linear (or GPT-2's Conv1D ``c_proj``: ``transposed``, weight [K, N])
    with fused bottleneck adapters that read the residual r (set by a forward pre-hook on the sub-block's
    opening norm); ``dropout`` (GPT-2's residual dropout, moved in here) drops h before the adapter reads
    it. Returns y − r: the decoder adds r."""

    def __init__(self, linear: nn.Module, residual_source: nn.Module, *, transposed: bool = False,
                 dropout: Optional[nn.Module] = None):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape[::-1] if transposed else linear.weight.shape
        self.weight = linear.weight
        self.bias = linear.bias
        self.transposed = transposed
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self._residual: Optional[Tensor] = None
        residual_source.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self._residual = args[0]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = (self.weight.t() if self.transposed else self.weight), self.bias
        if self.active_adapter is None:
            return self.dropout(nn.functional.linear(x, weight, bias))
        residual, self._residual = self._residual, None
        if residual is None or residual.shape[:-1] != x.shape[:-1]:
            raise RuntimeError("ResidualBottleneckLinear runs inside its decoder layer only: the residual stream "
                               "(the input of the sub-block's norm) was not seen in this forward")
        if self.training and getattr(self.dropout, "p", 0.0) > 0:
            x, weight, bias = self.dropout(nn.functional.linear(x, weight, bias)), None, None
        adapter = self.adapters[self.active_adapter]
        c_h, c_r, c_n = adapter.coefficients
        return _run(adapter, x, weight, bias, residual, (c_h, c_r - 1.0, c_n), None, False)


# output Linear of a pre-norm decoder layer -> (the norm whose input is r, the dropout on h the adapter reads
# after (moved into the holder), Conv1D weight [K, N])
PRE_NORM_SITES = {"self_attn.o_proj": ("input_layernorm", None, False),
                  "mlp.down_proj": ("post_attention_layernorm", None, False),
                  "attn.c_proj": ("ln_1", "attn.resid_dropout", True), "mlp.c_proj": ("ln_2", "mlp.dropout", True)}


def output_features(module: nn.Module) -> Optional[int]:
    """N of a site's Linear (nn.Linear, a holder, a BERT-style output's dense, GPT-2's Conv1D), else None."""
    if isinstance(module, (nn.Linear, ResidualBottleneckLinear)):
        return module.out_features
    if isinstance(getattr(module, "dense", None), nn.Linear):
        return module.dense.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", torch.empty(0)).dim() == 2:
        return module.weight.shape[1]
    return None


def wrap_pre_norm(layer: nn.Module, rel: str) -> ResidualBottleneckLinear:
    """Replace the output Linear ``rel`` of pre-norm decoder ``layer`` by a ResidualBottleneckLinear
    (returned; an existing one is kept)."""
    module = layer.get_submodule(rel)
    if isinstance(module, ResidualBottleneckLinear):
        return module
    norm, dropout_name, transposed = PRE_NORM_SITES[rel]
    dropout = None
    if dropout_name is not None:
        owner_name, _, attr = dropout_name.rpartition(".")
        owner = layer.get_submodule(owner_name)
        dropout = getattr(owner, attr)
        setattr(owner, attr, nn.Identity())
    holder = ResidualBottleneckLinear(module, layer.get_submodule(norm), transposed=transposed, dropout=dropout)
    parent, _, child = rel.rpartition(".")
    setattr(layer.get_submodule(parent), child, holder)
    return holder


def fused_modules(model: nn.Module, name: Optional[str] = None) -> dict:
    """{module name: module} of the fused-bottleneck holders in ``model`` (those holding ``name``)."""
    kinds = (NormBottleneckOutput, ResidualBottleneckLinear)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, kinds) and (name is None or name in m.adapters)}


def set_fused_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Activate adapter ``name`` (None: none) on every fused-bottleneck holder of ``model``."""
    holders = fused_modules(model)
    if name is not None and not any(name in m.adapters for m in holders.values()):
        raise ValueError(f"no fused bottleneck adapter named {name!r} in {type(model).__name__}")
    for m in holders.values():
        m.active_adapter = name if name in m.adapters else None
