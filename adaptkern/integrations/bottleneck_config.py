"""Bottleneck adapters for training from scratch, placed and initialised as AdapterHub's ``adapters``
library (v1.3) does for its configs ``seq_bn`` (Pfeiffer), ``double_seq_bn`` (Houlsby), ``par_bn``
and ``scaled_par_bn``.

A config is AdapterHub's ``BnConfig`` dict: the named configs below are its ``SeqBnConfig``,
``DoubleSeqBnConfig`` and ``ParBnConfig`` with the library's defaults (they differ: ``par_bn`` has
reduction factor 2, scaling 4.0 and the "mam_adapter" initialisation, so its up-projection is zero
and the model starts at its base output; ``seq_bn``/``double_seq_bn`` draw both projections from
N(0, 0.02)). Placement is :func:`adaptkern.integrations.adapterhub.load_adapterhub`'s: the same
sites, holders and kernels, so an adapter added here saves with ``save_adapterhub`` and loads into
``adapters`` unchanged.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch
from torch import nn

from .. import validation as check
from . import adapterhub, patching

# adapters 1.3 BnConfig field defaults (mh_adapter, output_adapter, reduction_factor and non_linearity
# have none: the named configs set them)
BN_DEFAULTS = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "original_ln_after": True,
    "original_ln_before": False, "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001,
    "phm_layer": False, "phm_rank": 1, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
_SEQ_BN = dict(original_ln_before=True, mh_adapter=False, output_adapter=True, non_linearity="relu",
               reduction_factor=16)
_DOUBLE_SEQ_BN = dict(mh_adapter=True, output_adapter=True, non_linearity="swish", reduction_factor=16)
_PAR_BN = dict(mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2,
               init_weights="mam_adapter", is_parallel=True, scaling=4.0)
# adapters' ADAPTER_CONFIG_MAP names of these configs (the first four are the current ones)
CONFIGS = {
    "seq_bn": _SEQ_BN, "double_seq_bn": _DOUBLE_SEQ_BN, "par_bn": _PAR_BN, "scaled_par_bn": dict(_PAR_BN,
                                                                                                 scaling="learned"),
    "pfeiffer": _SEQ_BN, "houlsby": _DOUBLE_SEQ_BN, "parallel": _PAR_BN,
    "scaled_parallel": dict(_PAR_BN, scaling="learned"),
}
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
_INITS = ("bert", "mam_adapter", "houlsby")
# the per-Linear form of add_bottleneck (adaptkern.integrations.patching.add_bottleneck)
_PER_LINEAR = ("rank", "target_modules", "activation", "placement", "scale")


def adapterhub_config(config: Union[str, dict] = "seq_bn", **fields) -> dict:
    """The full AdapterHub ``BnConfig`` dict of ``config`` (a name of :data:`CONFIGS` or a dict of
    BnConfig fields over the library's defaults) with ``fields`` overriding it, as
    ``adapters.AdapterConfig.load(config, **fields)`` gives it. Raises ValueError/TypeError for an
    unknown name or field; values are checked where they are used."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config={config!r}: not an AdapterHub bottleneck config adaptkern places; "
                             f"choose one of {sorted(CONFIGS)} or pass a dict of BnConfig fields")
        base = CONFIGS[config]
    elif isinstance(config, dict):
        base = config
    else:
        raise TypeError(f"config must be a config name or a dict of BnConfig fields, got {type(config).__name__}")
    cfg = {**BN_DEFAULTS, **base, **fields}
    known = set(BN_DEFAULTS) | set(_REQUIRED) | {"architecture"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise TypeError(f"unknown AdapterHub BnConfig fields {unknown}; known: {sorted(known)}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"a BnConfig dict needs the fields {missing}")
    if isinstance(cfg["scaling"], Real) and not isinstance(cfg["scaling"], bool):
        cfg["scaling"] = float(cfg["scaling"])  # adapters accepts only a float
    cfg["leave_out"] = list(cfg["leave_out"]) if isinstance(cfg["leave_out"], (list, tuple)) else cfg["leave_out"]
    return cfg


def add_bottleneck(model: nn.Module, name: str, config: Union[None, str, dict, int] = None, *,
                   reduction_factor=None, non_linearity: Optional[str] = None, scaling=None, **fields) -> nn.Module:
    """Add a new bottleneck adapter ``name`` to ``model`` where and as AdapterHub's ``adapters`` library
    would (``model.add_adapter(name, config=...)``), make it the active adapter and train only adapters.

    Semantics (AdapterHub form, ``config`` a name or a BnConfig dict, default "seq_bn"): each sub-block
    the config enables (``mh_adapter``: the attention block, ``output_adapter``: the FFN block; layers
    in ``leave_out`` skipped) computes AdapterHub's formula with f = ``non_linearity``, s = ``scaling``,
    h the sub-block's output Linear, r its residual input and LN its norm (BERT-style; none on
    Llama-style models): ``seq_bn`` y = LN(h + r + s·(U·f(D·LN(h + r) + d) + u)) (Llama:
    z + s·(U·f(D·z + d) + u), z = h + r); ``double_seq_bn`` y = LN(h + s·(U·f(D·h + d) + u) + r) in both
    blocks; ``par_bn`` y = LN(h + s·(U·f(D·r + d) + u) + r) (Llama: h + r + s·(…)), ``scaled_par_bn``
    learns s [1]. Shapes per site: D [R, H], d [R], U [H, R], u [H] with R = max(1, int(H //
    reduction_factor)) (``reduction_factor`` a number or {"<layer>": rf, "default": rf}).
    Initialisation is the config's ``init_weights``: "bert" (``seq_bn``, ``double_seq_bn``) D, U ~
    N(0, 0.02); "mam_adapter" (``par_bn``) D Kaiming-uniform (a = √5), U = 0, so the model starts at its
    base output; "houlsby" D, U ~ N(0, 0.01) truncated at ±0.02; biases 0, learned scalings 1. Any other
    BnConfig field may be passed as a keyword (``mh_adapter=True``, ``leave_out=[0]``,
    ``residual_before_ln=False``, ``init_weights_seed=3``, ...); fields adaptkern cannot place exactly
    raise NotImplementedError naming the field. Runs on AdapterLinear (``double_seq_bn`` on Llama-style
    models) or on the norm-fused op (every placement on BERT-style models, and the others; see
    ``adaptkern.integrations.fused_bottleneck``). The config is kept
    in ``model.adapterhub_configs[name]`` for ``save_adapterhub``.

    Per-Linear form (kept from earlier releases): ``add_bottleneck(model, name, rank, *,
    target_modules, activation="relu", placement="sequential", scale=1.0)`` — an int third argument
    or any of ``rank=``/``target_modules=``/``activation=``/``placement=``/``scale=`` — is
    :func:`adaptkern.integrations.patching.add_bottleneck` unchanged: a bottleneck on each selected
    Linear, y = h + scale·(f(h·Dᵀ + d)·Uᵀ + u) (parallel: reads x), U zero.

    Supported architectures: BERT-style (bert, roberta, xlm-roberta, electra) and Llama-style (llama,
    mistral); others raise NotImplementedError listing them. Every check (name free on every site,
    config values, architecture) runs before the model changes. Returns ``model``.
    """
    per_linear = {k: fields.pop(k) for k in _PER_LINEAR if k in fields}
    if (isinstance(config, int) and not isinstance(config, bool)) or per_linear:
        new_form = [k for k, v in (("reduction_factor", reduction_factor), ("non_linearity", non_linearity),
                                   ("scaling", scaling)) if v is not None] + sorted(fields)
        if new_form or (config is not None and not isinstance(config, int)):
            raise TypeError(f"add_bottleneck: the per-Linear form (rank, target_modules=...) and the AdapterHub form "
                            f"(config, {', '.join(new_form) or 'a config name'}) cannot be mixed")
        if isinstance(config, int):
            if "rank" in per_linear:
                raise TypeError("add_bottleneck got rank twice (third argument and rank=)")
            per_linear["rank"] = config
        if "rank" not in per_linear:
            raise TypeError("add_bottleneck's per-Linear form needs rank")
        return patching.add_bottleneck(model, name, **per_linear)

    check.adapter_name(name)
    overrides = {k: v for k, v in (("reduction_factor", reduction_factor), ("non_linearity", non_linearity),
                                   ("scaling", scaling)) if v is not None}
    cfg = adapterhub_config("seq_bn" if config is None else config, **overrides, **fields)
    if cfg["init_weights"] not in _INITS:
        raise ValueError(f"init_weights={cfg['init_weights']!r}: AdapterHub bottlenecks initialise with one of "
                         f"{list(_INITS)}")
    seed = cfg["init_weights_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"init_weights_seed must be an int or None, got {seed!r}")
    patching.refuse_peft_layers(model, "add_bottleneck")
    spec = adapterhub.check_bn_config(cfg, legacy=False)
    layout = adapterhub.bottleneck_layout(model, spec)
    adapterhub.check_sites(model, layout, name)

    adapterhub.install(model, name, spec, layout)
    for _, _, _, holder, _ in layout["sites"]:
        generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        initialize(model.get_submodule(holder).adapters[name], cfg["init_weights"], generator)
    adapterhub.record_config(model, name, dict(cfg, non_linearity=spec["non_linearity"]))
    adapterhub.activate(model, name)
    return model


def initialize(adapter: nn.Module, init_weights: str, generator: Optional[torch.Generator] = None) -> None:
    """AdapterHub's initialisation of a bottleneck's ``down_weight`` [R, H], ``down_bias``, ``up_weight``
    [H, R], ``up_bias`` (see :func:`add_bottleneck`), drawn on the CPU in float32 and copied in."""
    def draw(param, fill):
        value = torch.empty(param.shape, dtype=torch.float32)
        fill(value)
        param.copy_(value)

    with torch.no_grad():
        adapter.down_bias.zero_()
        adapter.up_bias.zero_()
        if init_weights == "bert":
            for p in (adapter.down_weight, adapter.up_weight):
                draw(p, lambda t: t.normal_(0.0, 0.02, generator=generator))
        elif init_weights == "mam_adapter":
            draw(adapter.down_weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
            adapter.up_weight.zero_()
        else:  # "houlsby"
            for p in (adapter.down_weight, adapter.up_weight):
                draw(p, lambda t: nn.init.trunc_normal_(t, 0.0, 1e-2, -2e-2, 2e-2, generator=generator))
