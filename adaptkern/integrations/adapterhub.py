"""Load AdapterHub (``adapters`` library) bottleneck adapters into ``AdapterLinear`` layers.

Where the ``adapters`` library puts a bottleneck (``adapters.methods.bottleneck`` and
``methods.modeling.Adapter``, v1.3), with h the output of a sub-block's last Linear
(after BERT's hidden dropout), r the sub-block's residual input and LN the sub-block's
LayerNorm (BERT-style, post-LN) or none (Llama-style, pre-norm)::

    pre_forward:   x_ad = LN(h + r) if original_ln_before else h          (Llama: h + r)
                   res  = h if residual_before_ln else x_ad               ("post_add": h + r)
    forward:       out  = res + scaling·(f(x_ad·Dᵀ + d)·Uᵀ + u)
    post_forward:  y    = LN(out + r) if original_ln_after else out       (Llama: out + r)

With ``original_ln_before=False``, ``original_ln_after=True`` and a constant scaling (Houlsby,
``double_seq_bn``) this is ``y = LN(h + s·(f(h·Dᵀ + d)·Uᵀ + u) + r)``: a *sequential* adapter on the
Linear that produces h, followed by the model's own residual and LayerNorm. On Llama-style layers
(no dropout after the Linear) :func:`load_adapterhub` builds it as an ``AdapterLinear``. Every other
placement (``seq_bn``: ``original_ln_before=True``, with ``residual_before_ln`` true, false or
"post_add"; ``original_ln_after=False``; ``par_bn``: ``is_parallel=True``; ``scaling`` "learned"
(``scaled_par_bn``) or "channel"), and every placement on BERT-style layers, runs on the norm-fused
op (``fused_bottleneck``: the sub-block's output module is replaced on BERT-style layers, so BERT's
hidden dropout drops h before the adapter reads it, as in the library; the output Linear on
Llama-style layers). Locations:

- BERT-style layers (bert, roberta, xlm-roberta, electra): ``mh_adapter`` on ``attention.output``
  (``.dense``), ``output_adapter`` on ``output`` (``.dense``);
- Llama-style layers (llama, mistral, qwen2: ``adapters`` hooks the same Linears there, to the same
  effect, and refuses ``original_ln_after=False``): ``mh_adapter`` on ``self_attn.o_proj``, ``output_adapter`` on
  ``mlp.down_proj``;
- GPT-2 (pre-norm, as Llama; every placement fused, the adapter reads h after the residual dropout):
  ``mh_adapter`` on ``attn.c_proj``, ``output_adapter`` on ``mlp.c_proj`` (Conv1D).

Refused with NotImplementedError naming the config field: ``residual_before_ln="post_add"`` where
the ``adapters`` library itself fails (no norm, or ``original_ln_before=False``),
``ln_before``/``ln_after``, ``phm_layer``, ``use_gating``, ``inv_adapter``, ``cross_adapter``,
``dropout``/``stochastic_depth`` > 0 and activations without an exact kernel counterpart.

Numerics: the loaded model reproduces the ``adapters`` library's outputs and adapter gradients, in
eval and in training mode with the same dropout masks (fp32, tests/integrations/test_adapterhub.py).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from numbers import Real
from typing import Optional

import torch
from torch import Tensor, nn

from .. import validation as check
from ..nn import AdapterLinear
from . import fused_bottleneck
from .checkpoint_io import read_json_object, read_state_dict
from .patching import adapter_modules, patch, set_adapter

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
WEIGHTS_NAME = "pytorch_adapter.bin"

# model family -> (model_types, the Linear per location, the saved module per location), relative to a layer
_FAMILIES = {
    "bert": (("bert", "roberta", "xlm-roberta", "electra"),
             {"mh_adapter": "attention.output.dense", "output_adapter": "output.dense"},
             {"mh_adapter": "attention.output", "output_adapter": "output"}),
    "llama": (("llama", "mistral", "qwen2"),
              {"mh_adapter": "self_attn.o_proj", "output_adapter": "mlp.down_proj"},
              {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}),
    "gpt2": (("gpt2",), {"mh_adapter": "attn.c_proj", "output_adapter": "mlp.c_proj"},
             {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}),
}

# model types adapters adapts through its plug-in interface (hooks; the model adds the residual itself)
_HOOKED = {"qwen2"}
# adapters' non_linearity (transformers ACT2FN names, lower-cased) -> adaptkern activation, same function
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "swish": "silu", "silu": "silu",
                "linear": "identity"}
# adapters' ACTIVATION_RENAME: configs saved without "version" (adapter-transformers v1/v2)
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
# adapters' legacy_weights_mapping
_LEGACY_KEYS = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
                "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters"}

_TOP_LEVEL_FIELDS = {"config", "hidden_size", "model_class", "model_name", "model_type", "name", "version", "type",
                     "label2id", "config_id"}
_OTHER_ARCHITECTURES = ("lora", "mtl_lora", "prefix_tuning", "prompt_tuning", "reft", "union")

# BnConfig fields (adapters 1.3) and what loading needs from them.
_BN_FIELDS = {
    "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before", "original_ln_after",
    "ln_before", "ln_after", "init_weights", "init_weights_seed", "is_parallel", "scaling", "use_gating",
    "residual_before_ln", "adapter_residual_before_ln", "inv_adapter", "inv_adapter_reduction_factor",
    "cross_adapter", "leave_out", "dropout", "phm_layer", "phm_dim", "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
    "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "stochastic_depth", "architecture"}
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
# field -> (value that works, why any other value is not an adapter on a Linear)
_MUST_BE = {
    "ln_before": (False, "a new LayerNorm before the bottleneck"),
    "ln_after": (False, "a new LayerNorm after the bottleneck"),
    "phm_layer": (False, "PHM (Compacter) projections are not dense down/up matrices"),
    "use_gating": (False, "a learned gate scales the adapter per sequence"),
    "inv_adapter": (None, "an invertible adapter on the embeddings"),
    "cross_adapter": (False, "cross-attention adapters (encoder-decoder models)"),
}


def _bool(cfg: dict, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise ValueError(f"adapter config field {key!r} must be true or false, got {value!r}")
    return value


def _real(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_bn_config(cfg: dict, legacy: bool) -> dict:
    """Validate an adapters BnConfig dict; return what loading needs. Raises NotImplementedError
    for configurations that are not a sequential adapter on a Linear."""
    architecture = cfg.get("architecture")
    if architecture is not None:
        if architecture in _OTHER_ARCHITECTURES:
            raise NotImplementedError(f"adapter config architecture={architecture!r}: load_adapterhub reads "
                                      "bottleneck adapters only (architecture null)")
        raise ValueError(f"unknown adapter config architecture {architecture!r}")
    unknown = sorted(set(cfg) - _BN_FIELDS)
    if unknown:
        warnings.warn(f"AdapterHub adapter config: ignoring unknown fields {unknown}", stacklevel=3)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"adapter config lacks required fields {missing}")

    for key, (ok, why) in _MUST_BE.items():
        value = cfg.get(key, ok)
        if isinstance(ok, bool):
            value = _bool(cfg, key) if key in cfg else ok
        if value != ok:
            raise NotImplementedError(f"adapter config {key}={value!r} is not supported: {why}; load_adapterhub "
                                      f"supports {key}={ok!r}")
    for key in ("dropout", "stochastic_depth"):
        value = _real(cfg.get(key, 0.0) or 0.0, f"adapter config field {key!r}")
        if value != 0.0:
            raise NotImplementedError(f"adapter config {key}={value:g}: AdapterLinear's bottleneck adapters have "
                                      "no adapter dropout, so training would differ; only 0 is supported")
    residual_before_ln = cfg.get("residual_before_ln", True)
    if residual_before_ln not in (True, False, "post_add"):
        raise ValueError(f"adapter config field 'residual_before_ln' must be true, false or 'post_add', "
                         f"got {residual_before_ln!r}")
    # adapter_residual_before_ln only matters with ln_after, the init_* and phm_* fields only at creation /
    # with phm_layer: refused or irrelevant here.
    placement = {key: _bool(cfg, key) if key in cfg else default
                 for key, default in (("original_ln_before", False), ("original_ln_after", True),
                                      ("is_parallel", False))}
    placement["residual_before_ln"] = residual_before_ln

    scaling = cfg.get("scaling", 1.0)
    if isinstance(scaling, str):
        if scaling not in ("learned", "channel"):
            raise ValueError(f"adapter config field 'scaling' must be a number, 'learned' or 'channel', "
                             f"got {scaling!r}")
    else:
        scaling = _real(scaling, "adapter config field 'scaling'")
    # The residual stream, a learned scaling or a dropped residual need the norm-fused op; the rest is a
    # sequential adapter on the Linear (AdapterLinear on Llama-style layers; see bottleneck_layout).
    fused = (placement["original_ln_before"] or placement["is_parallel"] or not placement["original_ln_after"]
             or isinstance(scaling, str))

    act = cfg["non_linearity"]
    if not isinstance(act, str):
        raise ValueError(f"adapter config field 'non_linearity' must be a str, got {act!r}")
    act = act.lower()
    if legacy:
        act = _LEGACY_ACTIVATIONS.get(act, act)
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"adapter config non_linearity={cfg['non_linearity']!r} has no exact adaptkern "
                                  f"kernel activation; supported: {sorted(_ACTIVATIONS)}")

    leave_out = cfg.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
        raise ValueError(f"adapter config field 'leave_out' must be a list of layer ids, got {leave_out!r}")

    rf = cfg["reduction_factor"]
    if isinstance(rf, dict):
        rf = {str(k): _real(v, f"adapter config reduction_factor[{k!r}]") for k, v in rf.items()}
        bad = [v for v in rf.values() if v <= 0]
    else:
        rf = _real(rf, "adapter config field 'reduction_factor'")
        bad = [rf] if rf <= 0 else []
    if bad:
        raise ValueError(f"adapter config reduction_factor must be > 0, got {cfg['reduction_factor']!r}")
    return dict(locations=[loc for loc in ("mh_adapter", "output_adapter") if _bool(cfg, loc)],
                reduction_factor=rf, activation=_ACTIVATIONS[act], non_linearity=act, scaling=scaling,
                leave_out=set(leave_out), placement=placement, fused=fused)


def _bottleneck_size(hidden_size: int, rf, layer: int) -> int:
    """As adapters' BottleneckLayer.add_adapter + Adapter.__init__: int(hidden // rf), at least 1."""
    if isinstance(rf, dict):
        if str(layer) in rf:
            rf = rf[str(layer)]
        elif "default" in rf:
            rf = rf["default"]
        else:
            raise ValueError(f"adapter config reduction_factor {rf} has neither layer {layer} nor 'default'")
    return max(1, int(hidden_size // rf))


def _find_layers(model: nn.Module, family: str) -> tuple[str, dict[int, str]]:
    """(base model prefix, {layer index: layer name relative to the base model}) of the transformer layers."""
    _, linears, _ = _FAMILIES[family]
    base = getattr(model, "base_model", model)
    base_name = next((n for n, m in model.named_modules() if m is base), "")
    layers = {}
    for name, module in base.named_modules():
        if not name:
            continue
        try:
            for rel in linears.values():
                module.get_submodule(rel)
        except AttributeError:
            continue
        last = name.rpartition(".")[2]
        if not last.isdigit():
            continue
        if int(last) in layers:
            raise NotImplementedError(f"{type(model).__name__} has two stacks of {family}-style layers "
                                      f"({layers[int(last)]!r}, {name!r}); load_adapterhub maps one stack only")
        layers[int(last)] = name
    if not layers:
        raise ValueError(f"no {family}-style transformer layers found in {type(model).__name__}")
    return (base_name + "." if base_name else ""), layers


def _model_family(model: nn.Module, saved_type) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or saved_type
    for family, (types, _, _) in _FAMILIES.items():
        if model_type in types:
            if saved_type is not None and saved_type != model_type:
                warnings.warn(f"AdapterHub adapter was saved for model_type {saved_type!r}, loading it into a "
                              f"{model_type!r} model", stacklevel=4)
            return family
    supported = sorted(t for types, _, _ in _FAMILIES.values() for t in types)
    raise NotImplementedError(f"model_type {model_type!r}: adaptkern knows where the adapters library "
                              f"places bottleneck adapters for {supported} only")


def _normalize_key(key: str, base_model_prefix: str) -> str:
    for old, new in _LEGACY_KEYS.items():
        key = key.replace(old, new)
    if base_model_prefix and key.startswith(base_model_prefix + "."):
        key = key[len(base_model_prefix) + 1:]
    return key


def load_adapterhub(model: nn.Module, path: str, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an AdapterHub bottleneck adapter saved by ``adapters``' ``save_adapter`` into ``model``.

    Semantics: for every layer i not in ``leave_out`` and every location the config enables, the
    sub-block computes AdapterHub's formula (module docstring). Houlsby-style configs on Llama-style
    layers: the Linear that produces h becomes an ``AdapterLinear`` (sharing its weights) with a
    sequential adapter ``y = h + scaling·(f(h·Dᵀ + d)·Uᵀ + u)``; the others run on the norm-fused op
    (``adaptkern.integrations.fused_bottleneck``; activate with ``set_fused_adapter``).
    D = ``adapter_down.0.weight`` [R, H],
    d = ``adapter_down.0.bias`` [R], U = ``adapter_up.weight`` [H, R], u = ``adapter_up.bias`` [H],
    R = int(H // reduction_factor), a learned ``scaling`` [1] or [H]. The adapter is made active
    and, as ``add_bottleneck`` does, only adapter parameters keep ``requires_grad``.

    ``path`` holds ``adapter_config.json`` and ``adapter.safetensors`` (preferred) or
    ``pytorch_adapter.bin`` (read with ``torch.load(weights_only=True)`` only); other files
    (a saved head) are ignored. ``adapter_name`` defaults to the name in the saved config.

    Strict: missing or unexpected keys, shape mismatches, non-finite values, non-floating
    tensors, corrupt files and invalid config values raise (ValueError / FileNotFoundError)
    before the model is touched; configurations adaptkern cannot place exactly raise
    NotImplementedError naming the field, the model untouched; unknown config fields warn.
    Returns ``model``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"AdapterHub adapter directory {path!r} does not exist")
    saved = read_json_object(os.path.join(path, CONFIG_NAME))
    cfg = saved.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: 'config' must be the full adapter config object "
                         f"written by save_adapter, got {cfg!r}")
    unknown = sorted(set(saved) - _TOP_LEVEL_FIELDS)
    if unknown:
        warnings.warn(f"AdapterHub adapter_config.json: ignoring unknown fields {unknown}", stacklevel=2)
    spec = check_bn_config(cfg, legacy="version" not in saved)

    saved_name = saved.get("name")
    if not isinstance(saved_name, str) or not saved_name:
        raise ValueError(f"adapter_config.json has no adapter 'name' (got {saved_name!r})")
    name = saved_name if adapter_name is None else adapter_name
    check.adapter_name(name, "adapter name" + (" (from adapter_config.json; pass adapter_name=)"
                                               if adapter_name is None else ""))

    layout = bottleneck_layout(model, spec, saved.get("model_type"), saved.get("hidden_size"))
    expected = weight_keys(layout, spec, saved_name)
    weights_file, raw = read_state_dict(path, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
    base_model_prefix = getattr(model, "base_model_prefix", "") or ""
    state: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        norm = _normalize_key(key, base_model_prefix)
        if norm in state:
            raise ValueError(f"{weights_file}: keys {key!r} and another one both map to {norm!r}")
        state[norm] = tensor
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match the adapter config on {type(model).__name__}: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)})")
    for key, (_, _, shape) in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{weights_file}: {key!r} has shape {tuple(t.shape)}, the model needs {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{weights_file}: {key!r} has dtype {t.dtype}, expected a floating dtype")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_file}: {key!r} contains NaN or Inf")

    check_sites(model, layout, name)
    for key, (target, _, _) in expected.items():
        dtype = _target_weight(model.get_submodule(target)).dtype  # the adapter is stored in its layer's dtype
        if not torch.isfinite(state[key].to(dtype)).all():
            raise ValueError(f"{weights_file}: {key!r} overflows to Inf in the model's dtype {dtype}")

    # Everything checked: now change the model.
    install(model, name, spec, layout)
    with torch.no_grad():
        for key, (target, attr, _) in expected.items():
            param = getattr(model.get_submodule(target).adapters[name], attr)
            param.copy_(state[key].to(device=param.device, dtype=param.dtype))
    record_config(model, name, dict(cfg, non_linearity=spec["non_linearity"]))
    activate(model, name)
    return model


def bottleneck_layout(model: nn.Module, spec: dict, saved_type=None, saved_hidden=None) -> dict:
    """Where a checked config (:func:`check_bn_config`) puts its adapters in ``model``: family, hidden
    size, the base model's name prefix, the fused placement (or None) and the sites
    ``[(layer index, layer name, location, holder name, bottleneck size)]``. Raises (nothing changed)
    for an unsupported architecture, a hidden size mismatch, or a config that enables no site."""
    family = _model_family(model, saved_type)
    if _HOOKED.intersection({getattr(getattr(model, "config", None), "model_type", None), saved_type}) and \
            not spec["placement"]["original_ln_after"]:
        raise NotImplementedError("adapter config original_ln_after=false on qwen2: the adapters library places "
                                  "bottlenecks there through forward hooks and refuses it")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        hidden = saved_hidden
    if saved_hidden is not None and saved_hidden != hidden:
        raise ValueError(f"adapter was saved for hidden_size {saved_hidden}, the model has hidden_size {hidden}")
    if not isinstance(hidden, int):
        raise ValueError("cannot tell the model's hidden_size (model.config.hidden_size)")
    prefix, layers = _find_layers(model, family)
    _, linears, modules = _FAMILIES[family]
    fused = spec["fused"] or family != "llama"  # BERT, GPT-2: the dropout on h must come before the adapter
    where = fused_bottleneck.placement(spec["placement"], has_norm=family == "bert")  # raises where adapters fails
    out_of_range = sorted(i for i in spec["leave_out"] if i not in layers)
    if out_of_range:
        warnings.warn(f"adapter config leave_out names layers {out_of_range} the model does not have", stacklevel=3)
    sites = []
    for i, layer in sorted(layers.items()):
        if i in spec["leave_out"]:
            continue
        size = _bottleneck_size(hidden, spec["reduction_factor"], i)
        for loc in spec["locations"]:
            holder = f"{prefix}{layer}.{(modules if fused and family == 'bert' else linears)[loc]}"
            sites.append((i, layer, loc, holder, size))
    if not sites:
        raise ValueError("the adapter config enables no location (mh_adapter and output_adapter are false, or every "
                         "layer is left out)")
    return dict(family=family, hidden=hidden, prefix=prefix, where=where if fused else None, sites=sites)


def weight_keys(layout: dict, spec: dict, name: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """AdapterHub's state dict keys of adapter ``name`` (relative to the base model) ->
    (holder module name in the model, attribute of the holder's adapter, shape)."""
    _, _, modules = _FAMILIES[layout["family"]]
    hidden = layout["hidden"]
    keys = {}
    for _, layer, loc, holder, size in layout["sites"]:
        key = f"{layer}.{modules[loc]}.adapters.{name}."
        keys[key + "adapter_down.0.weight"] = (holder, "down_weight", (size, hidden))
        keys[key + "adapter_down.0.bias"] = (holder, "down_bias", (size,))
        keys[key + "adapter_up.weight"] = (holder, "up_weight", (hidden, size))
        keys[key + "adapter_up.bias"] = (holder, "up_bias", (hidden,))
        if isinstance(spec["scaling"], str):
            keys[key + "scaling"] = (holder, "scaling", (1,) if spec["scaling"] == "learned" else (hidden,))
    return keys


def check_sites(model: nn.Module, layout: dict, name: str) -> None:
    """Raise ValueError (nothing changed) unless every site of ``layout`` can take adapter ``name``."""
    for _, _, _, holder, _ in layout["sites"]:
        _check_target(model, holder, layout["hidden"], name, layout["where"] is not None, layout["family"])


def install(model: nn.Module, name: str, spec: dict, layout: dict) -> None:
    """Add adapter ``name`` (zero-initialised) at every site of ``layout``: an ``AdapterLinear`` sequential
    adapter (Houlsby-style placements on Llama-style layers) or a fused-bottleneck holder's adapter."""
    targets = {holder: size for _, _, _, holder, size in layout["sites"]}
    if layout["where"] is not None:
        _add_fused(model, targets, name, spec, layout["where"], layout["family"])
        return
    patch(model, "|".join(re.escape(t) for t in targets))
    for target, size in targets.items():
        model.get_submodule(target).add_bottleneck(name, size, activation=spec["activation"],
                                                   placement="sequential", scale=spec["scaling"])


def activate(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter of every holder (``AdapterLinear`` and fused) that has it, the
    others run their base; only adapter parameters (of either holder kind) keep ``requires_grad``."""
    ids = {id(p) for m in fused_bottleneck.fused_modules(model).values() for p in m.adapters.parameters()}
    ids |= {id(p) for m in adapter_modules(model).values() for p in m.adapters.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    linear = adapter_modules(model, name)
    set_adapter(model, name if linear else None)
    fused_bottleneck.set_fused_adapter(model, name if fused_bottleneck.fused_modules(model, name) else None)


# model attribute holding {adapter name: its AdapterHub BnConfig dict}, read by save_adapterhub
CONFIGS_ATTR = "adapterhub_configs"


def record_config(model: nn.Module, name: str, cfg: dict) -> None:
    """Remember adapter ``name``'s AdapterHub config on ``model`` (``model.adapterhub_configs``)."""
    configs = getattr(model, CONFIGS_ATTR, None)
    if not isinstance(configs, dict):
        configs = {}
        setattr(model, CONFIGS_ATTR, configs)
    configs[name] = dict(cfg)


def _target_weight(module: nn.Module) -> Tensor:
    """The weight of the Linear an adapter holder wraps (the adapter is stored in its dtype)."""
    return module.dense.weight if hasattr(module, "dense") else module.weight


def _check_target(model: nn.Module, target: str, hidden: int, name: str, fused: bool, family: str) -> None:
    try:
        module = model.get_submodule(target)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module {target!r}") from None
    if fused and family == "bert":
        if not isinstance(module, fused_bottleneck.NormBottleneckOutput) and not all(
                isinstance(getattr(module, a, None), t)
                for a, t in (("dense", nn.Linear), ("LayerNorm", nn.LayerNorm), ("dropout", nn.Dropout))):
            raise ValueError(f"{target!r} is a {type(module).__name__}, expected a BERT-style sub-block output "
                             "(dense, dropout, LayerNorm)")
    elif family == "gpt2":
        if fused_bottleneck.output_features(module) is None or isinstance(module, nn.Linear):
            raise ValueError(f"{target!r} is a {type(module).__name__}, expected GPT-2's Conv1D")
    else:
        kinds = (fused_bottleneck.ResidualBottleneckLinear, nn.Linear) if fused else (nn.Linear,)
        if not isinstance(module, kinds) or (fused and isinstance(module, AdapterLinear)):
            raise ValueError(f"{target!r} is a {type(module).__name__}, expected an nn.Linear")
    out_features = fused_bottleneck.output_features(module)
    if out_features != hidden:
        raise ValueError(f"{target!r} has out_features {out_features}, the adapter needs {hidden}")
    holders = getattr(module, "adapters", {})
    if name in holders:
        raise ValueError(f"an adapter named {name!r} already exists on {target!r}")


def _add_fused(model: nn.Module, targets: dict, name: str, spec: dict, where: tuple, family: str) -> None:
    adapter_input, coefficients, final_norm = where
    for target, size in targets.items():
        module = model.get_submodule(target)
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        if family == "bert" and not isinstance(module, fused_bottleneck.NormBottleneckOutput):
            module = fused_bottleneck.NormBottleneckOutput(module)
            setattr(parent, child, module)
        elif family != "bert":
            layer_name, rel = target.rsplit(".", 2)[0], ".".join(target.rsplit(".", 2)[1:])
            module = fused_bottleneck.wrap_pre_norm(model.get_submodule(layer_name), rel)
        weight = _target_weight(module)
        module.adapters[name] = fused_bottleneck.FusedBottleneck(
            fused_bottleneck.output_features(module), size, activation=spec["activation"], scaling=spec["scaling"],
            adapter_input=adapter_input, coefficients=coefficients, final_norm=final_norm, device=weight.device,
            dtype=weight.dtype)
