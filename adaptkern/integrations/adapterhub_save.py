"""Save bottleneck adapters in AdapterHub's format, for the ``adapters`` library's ``model.load_adapter(path)``.

What ``adapters`` 1.3's ``save_adapter`` writes and ``load_adapter`` reads: ``adapter_config.json``
(the full BnConfig under ``config``, the adapter's ``name``, ``hidden_size``, ``model_type``,
``model_class``, ``model_name`` and ``version``; a config without ``version`` is read as one from
adapter-transformers v2, where "gelu" meant "gelu_new") and the adapter's weights under the full
model's state dict keys (``<layer>.output.adapters.<name>.adapter_down.0.weight`` on BERT-style
layers, ``<layer>.output_adapters.adapters.<name>.…`` on Llama-style ones) in ``pytorch_adapter.bin``
(``torch.load(weights_only=True)``; ``load_adapter``'s default) or ``adapter.safetensors``
(``load_adapter(path, use_safetensors=True)``). No head files: ``load_adapter`` then loads the
adapter alone.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from .. import validation as check
from ..nn import AdapterLinear
from . import adapterhub, fused_bottleneck

# the AdapterHub format version these files follow (its presence also fixes the activation names)
FORMAT_VERSION = "adapters.1.3.0"


def save_adapterhub(model: nn.Module, path, adapter_name: str, *, use_safetensors: bool = False) -> str:
    """Write bottleneck adapter ``adapter_name`` of ``model`` to the directory ``path`` in AdapterHub's
    format (``adapter_config.json`` + ``pytorch_adapter.bin``, or ``adapter.safetensors`` with
    ``use_safetensors``), so that ``adapters``' ``model.load_adapter(path)`` gives the same outputs.

    Semantics: the config is the one the adapter was created from (``add_bottleneck(model, name,
    config=...)`` or ``load_adapterhub``, kept in ``model.adapterhub_configs``); for every site it
    places (see ``load_adapterhub``) the holder's D [R, H], d [R], U [H, R], u [H] (and a learned
    scaling [1] or [H]) are written, in the model's dtype, on the CPU, as
    ``adapter_down.0.weight``, ``adapter_down.0.bias``, ``adapter_up.weight``, ``adapter_up.bias``
    (``scaling``) under the full model's keys. The ``.bin`` holds a plain dict of tensors (readable
    with ``torch.load(weights_only=True)``). ``load_adapterhub(model2, path)`` restores it exactly.

    Raises ValueError, before writing anything, if the adapter has no recorded AdapterHub config
    (e.g. one added by the per-Linear ``add_bottleneck(model, name, rank, target_modules=...)``), if
    a site lacks it or holds it with another placement, activation or scale than its config, or
    holds it somewhere the config does not place it, or if a tensor is not finite. Returns ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    check.adapter_name(adapter_name)
    configs = getattr(model, adapterhub.CONFIGS_ATTR, None) or {}
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} has no AdapterHub config on {type(model).__name__} (it has "
                         f"{sorted(configs)}): save_adapterhub saves adapters added with add_bottleneck(model, name, "
                         f"config=...) or loaded with load_adapterhub")
    cfg = configs[adapter_name]
    spec = adapterhub.check_bn_config(cfg, legacy=False)
    layout = adapterhub.bottleneck_layout(model, spec)
    keys = adapterhub.weight_keys(layout, spec, adapter_name)
    holders = {holder for holder, _, _ in keys.values()}
    for holder in holders:
        _check_holder(model, holder, adapter_name, spec, layout)
    elsewhere = sorted((set(fused_bottleneck.fused_modules(model, adapter_name))
                        | {n for n, m in model.named_modules()
                           if isinstance(m, AdapterLinear) and adapter_name in m.adapters}) - holders)
    if elsewhere:
        raise ValueError(f"adapter {adapter_name!r} is also on {elsewhere[:4]}, where its AdapterHub config does not "
                         f"place it; the saved adapter would not reproduce the model")
    state = {}
    for key, (holder, attr, shape) in keys.items():
        tensor = getattr(model.get_submodule(holder).adapters[adapter_name], attr).detach()
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{holder!r}: adapter {adapter_name!r} has {attr} of shape {tuple(tensor.shape)}, its "
                             f"config needs {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{holder!r}: adapter {adapter_name!r} has NaN or Inf in {attr}")
        state[layout["prefix"] + key] = tensor.to("cpu", copy=True).contiguous()

    config = getattr(model, "config", None)
    saved = {"config": cfg, "hidden_size": layout["hidden"], "model_class": type(model).__name__,
             "model_name": getattr(config, "name_or_path", "") or "", "model_type": config.model_type,
             "name": adapter_name, "version": FORMAT_VERSION}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, adapterhub.CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
    if use_safetensors:
        save_file(state, os.path.join(path, adapterhub.SAFE_WEIGHTS_NAME))
    else:
        torch.save(state, os.path.join(path, adapterhub.WEIGHTS_NAME))
    return path


def _check_holder(model: nn.Module, holder: str, name: str, spec: dict, layout: dict) -> None:
    """The module at ``holder`` runs adapter ``name`` as ``spec`` places it."""
    module = model.get_submodule(holder)
    if name not in getattr(module, "adapters", {}):
        raise ValueError(f"{holder!r} has no adapter {name!r}, but its AdapterHub config places one there (was it "
                         f"deleted?)")
    adapter = module.adapters[name]
    if layout["where"] is not None:
        adapter_input, coefficients, final_norm = layout["where"]
        got = (getattr(adapter, "adapter_input", None), getattr(adapter, "coefficients", None),
               getattr(adapter, "final_norm", None), getattr(adapter, "activation", None))
        want = (adapter_input, coefficients, final_norm, spec["activation"])
        scaled = isinstance(spec["scaling"], str) or adapter.scale == spec["scaling"]
    else:
        got = (getattr(adapter, "placement", None), getattr(adapter, "activation", None))
        want = ("sequential", spec["activation"])
        scaled = getattr(adapter, "scale", None) == spec["scaling"]
    if got != want or not scaled:
        raise ValueError(f"{holder!r}: adapter {name!r} is {type(adapter).__name__} {got}, its AdapterHub config "
                         f"places {want} with scaling {spec['scaling']!r}")
