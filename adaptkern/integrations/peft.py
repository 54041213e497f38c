"""PEFT LoRA checkpoints: load, save, and convert live ``PeftModel`` objects.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``) with, for every targeted module ``<path>`` of the base model,
``base_model.model.<path>.lora_A.weight`` [r, in] and ``base_model.model.<path>.lora_B.weight``
[out, r]; the module computes y = base(x) + scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r
(alpha/√r with rsLoRA). ``AdapterLinear`` stores the same two tensors as
``<path>.adapters.<name>.lora_A`` / ``lora_B``, in the file's dtype, bit for bit. DoRA adds
``base_model.model.<path>.lora_magnitude_vector`` [out]; ``modules_to_save`` adds the saved
modules' state under ``base_model.model.<module>.<key>`` and ``bias`` the trained biases
(``<path>.base_layer.bias`` on LoRA layers).

Loading is strict and atomic: the config, the file and every tensor are validated before
the model is touched, so a failed load leaves the model exactly as it was. The ``peft``
package is optional: where it imports, its own config parsing, target matching and weight
reader decide (see :mod:`.peft_config`) and :func:`save_peft` writes every field of its
``LoraConfig``; :func:`from_peft_model` needs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import validation as check
from ..nn import AdapterLinear
from .patching import (Conv1DAdapter, adapter_modules, freeze_base, guard_save_pretrained, name_matches, patch,
                       peft_fields, refuse_peft_layers, saved_modules, set_adapter)
from .peft_config import (CONFIG_NAME, MAGNITUDE, PREFIX, SAFETENSORS_NAME, base_module_names, init_keeps_base,
                          pattern_get, read_config, read_weights, select_modules_to_save, select_targets)

def load_peft(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Load the PEFT LoRA adapter saved in directory ``path`` into ``model`` as adapter ``adapter_name``.

    Semantics: every module PEFT would target (target_modules, exclude_modules,
    layers_to_transform / layers_pattern; never a module of modules_to_save) becomes an
    ``AdapterLinear`` (patched as needed) computing y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ
    with r, alpha from rank_pattern / alpha_pattern or r / lora_alpha, scale = alpha/r
    (alpha/√r with use_rslora) and dropout = lora_dropout; with ``use_dora`` a DoRA adapter,
    y = (m / ‖W + scale·B·A‖_row) ⊙ (x·Wᵀ + scale·(x̃·Aᵀ)·Bᵀ) + b, m the saved
    ``lora_magnitude_vector`` [out]. Shapes: A [r, in], B [out, r], m [out],
    kept in the file's dtype. As PEFT: each module named by ``modules_to_save`` (e.g. the
    SEQ_CLS head PEFT adds itself) runs the saved copy while this adapter is active (the model's
    own when another adapter or none is, see :func:`set_adapter`); ``bias="all"`` /
    ``"lora_only"`` copy the saved biases (of every module / of the LoRA layers) into the model.
    ``fan_in_fan_out`` describes the base weight's layout, which adaptkern reads from the module
    type (Conv1D: [in, out]); a disagreeing value warns, as PEFT does. Afterwards the adapter is
    active everywhere and only what it trains (LoRA, saved modules, those biases) requires grad.
    Where peft imports, its LoraConfig, target matcher and ``load_peft_weights`` are used.
    Returns ``model``.

    Raises (leaving the model unchanged): FileNotFoundError for a missing file; ValueError for
    an invalid config, missing or unexpected keys, a shape mismatch (naming the key and both
    shapes), non-finite or non-floating weights, or a corrupt file; NotImplementedError for
    a non-LoRA peft_type or an unsupported feature (naming the config field), including an
    ``init_lora_weights`` that changes the base weight (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ):
    convert such an adapter with PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` first.
    """
    refuse_peft_layers(model, "load_peft")
    cfg, peft_cfg = read_config(path)
    names = select_targets(model, cfg, peft_cfg)
    saved_names = select_modules_to_save(model, cfg)
    _check_free_name(model, adapter_name)
    weights = read_weights(path)

    expected, plan = {}, {}
    for n in names:
        module = model.get_submodule(n)
        # Conv1D stores W [in, out]; Linear4bit a packed W, so its shape comes from the module
        in_f, out_f = module.weight.shape if isinstance(module, Conv1D) else (module.in_features, module.out_features)
        r = pattern_get(cfg["rank_pattern"], n, cfg["r"])
        plan[n] = (r, pattern_get(cfg["alpha_pattern"], n, cfg["alpha"]))
        expected[f"{PREFIX}{n}.lora_A.weight"] = (r, in_f)
        expected[f"{PREFIX}{n}.lora_B.weight"] = (out_f, r)
        if cfg["dora"]:
            expected[f"{PREFIX}{n}.{MAGNITUDE}"] = (out_f,)
    own = {n: _own_state(model, n) for n in saved_names}
    expected |= {f"{PREFIX}{n}.{k}": tuple(t.shape) for n, state in own.items() for k, t in state.items()}
    biases = _bias_keys(model, cfg["bias"], names, saved_names)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected |= {key: tuple(params[p].shape) for key, p in biases.items()}
    conv = (Conv1D, Conv1DAdapter)
    layouts = [n for n in names if isinstance(model.get_submodule(n), conv) != cfg["fan_in_fan_out"]]
    if layouts:
        warnings.warn(f"{CONFIG_NAME}: fan_in_fan_out={cfg['fan_in_fan_out']} but {layouts[0]!r} is a "
                      f"{type(model.get_submodule(layouts[0])).__name__} ({len(layouts)} such modules); using "
                      f"each module's own weight layout, as PEFT does", stacklevel=2)
    # PEFT's bias="all" also writes the biases of a saved module's wrapper internals; PEFT ignores them on load.
    wrapper = tuple(f"{PREFIX}{n}.{part}." for n in saved_names for part in ("original_module", "modules_to_save"))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not k.startswith(wrapper))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for key, shape in expected.items():
        t = weights[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{key}: shape mismatch: checkpoint has {tuple(t.shape)}, the model needs {shape}")
        if not t.is_floating_point() and (key.endswith((".lora_A.weight", ".lora_B.weight", MAGNITUDE))
                                          or key in biases):
            raise ValueError(f"{key}: adapter weights must be floating point, got {t.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{key}: adapter weights contain NaN or Inf")

    patch(model, names)
    for n, (r, alpha) in plan.items():
        module = model.get_submodule(n)
        dora = dict(use_dora=True) if cfg["dora"] else {}
        adapter = module.add_lora(adapter_name, r, alpha=alpha, dropout=cfg["dropout"], use_rslora=cfg["rslora"],
                                  **dora)
        device = module.weight.device
        adapter.lora_A = nn.Parameter(weights[f"{PREFIX}{n}.lora_A.weight"].to(device))
        adapter.lora_B = nn.Parameter(weights[f"{PREFIX}{n}.lora_B.weight"].to(device))
        if cfg["dora"]:
            adapter.lora_magnitude_vector = nn.Parameter(weights[f"{PREFIX}{n}.{MAGNITUDE}"].to(device))
    with torch.no_grad():
        for key, p in biases.items():
            params[p].copy_(weights[key])
    for n, state in own.items():
        saved_modules(model).setdefault(n, {None: state})[adapter_name] = {
            k: _like(t, weights[f"{PREFIX}{n}.{k}"]) for k, t in state.items()}
    peft_fields(model)[adapter_name] = dict(bias=cfg["bias"], biases=sorted(set(biases.values())),
                                            modules_to_save=list(cfg["modules_to_save"]))
    set_adapter(model, adapter_name)
    freeze_base(model)
    return model


def _own_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The model's own tensors (Parameters as they are) of module ``name``: its persistent state keys."""
    versions = saved_modules(model).get(name)
    if versions is not None:
        return versions[None]
    state = model.get_submodule(name).state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if ".adapters." not in f".{k}"}


def _like(own: Tensor, saved: Tensor) -> Tensor:
    """``saved`` on ``own``'s device and dtype (as PEFT's load_state_dict copies it), a Parameter if ``own`` is one."""
    t = saved.to(device=own.device, dtype=own.dtype)
    return nn.Parameter(t, requires_grad=own.requires_grad) if isinstance(own, nn.Parameter) else t


def _bias_keys(model: nn.Module, bias: str, targets: list[str], saved_names: list[str]) -> dict[str, str]:
    """{PEFT state key: model parameter name} of the biases PEFT saves with ``bias``: "lora_only": the LoRA
    layers' (``<layer>.base_layer.bias``); "all": every parameter whose PEFT key holds "bias", but those of
    modules saved whole and of adapters."""
    if bias == "none":
        return {}
    if bias == "lora_only":
        return {f"{PREFIX}{n}.base_layer.bias": f"{n}.bias" for n in targets
                if model.get_submodule(n).bias is not None}
    layers, skip = set(targets), tuple(f"{n}." for n in saved_names)
    keys = {}
    for p, _ in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = p.rpartition(".")
        if ".adapters." in f".{p}" or p.startswith(skip):
            continue
        key = f"{PREFIX}{owner}.base_layer.{leaf}" if owner in layers else f"{PREFIX}{p}"
        if "bias" in key:
            keys[key] = p
    return keys


def _check_free_name(model: nn.Module, adapter_name: str) -> None:
    check.adapter_name(adapter_name, "adapter_name")
    if adapter_modules(model, adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} is already used in the model; pick another name")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _target_list(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT target_modules selecting exactly ``names``: a leaf name (e.g. "q_proj") where every module it
    selects is targeted, the full module names otherwise."""
    chosen, base_names = set(names), base_module_names(model)
    targets = set()
    for leaf in {n.rsplit(".", 1)[-1] for n in names}:
        selected = {n for n in base_names if name_matches(n, [leaf])}
        targets |= {leaf} if selected <= chosen else selected & chosen
    return sorted(targets)


# PEFT's TaskType values, and the one a transformers model class implies (by its name's ending).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_BY_SUFFIX = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                   ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def infer_task_type(model: nn.Module):
    """PEFT's task_type for ``model``: CAUSAL_LM for ``*ForCausalLM``, SEQ_CLS, TOKEN_CLS,
    QUESTION_ANS likewise, SEQ_2_SEQ_LM for an encoder-decoder ``*ForConditionalGeneration``,
    FEATURE_EXTRACTION for a bare ``*Model``; None when the class says nothing (e.g. masked LM)."""
    name = type(model).__name__
    for suffix, task in _TASK_BY_SUFFIX:
        if name.endswith(suffix):
            return task
    config = getattr(model, "config", None)
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if name.endswith("Model") and not name.endswith("PreTrainedModel"):
        return "FEATURE_EXTRACTION"
    return None


def _write_config(config: dict, path: str) -> None:
    """adapter_config.json: through PEFT's own ``LoraConfig`` (every field PEFT writes) where peft
    imports, else the fields adaptkern knows."""
    try:
        from peft import LoraConfig
    except ImportError:
        pass
    else:
        full = LoraConfig(**config).to_dict()  # PEFT's defaults for every other field (sets -> sorted lists)
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in full.items()} | config
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_peft(model: nn.Module, path: str, adapter_name: str = "default", *, task_type=None) -> None:
    """Write LoRA adapter ``adapter_name`` of ``model`` as a PEFT LoRA directory at ``path``.

    Semantics: the inverse of :func:`load_peft`: ``PeftModel.from_pretrained(base, path)``
    on the unpatched base model computes the same outputs, and ``load_peft`` reads every
    tensor back bit for bit (dtype kept). The most common rank and alpha become ``r`` and
    ``lora_alpha``; other layers go to ``rank_pattern`` / ``alpha_pattern`` keyed by their
    escaped full module name. Raises ValueError if no layer has ``adapter_name``, if it is
    not a LoRA (or DoRA) adapter, or if its layers disagree on use_rslora, dropout or DoRA (which PEFT
    cannot express per layer). ``task_type`` (one of :data:`TASK_TYPES`; None: inferred from
    the model class by :func:`infer_task_type`) lets ``AutoPeftModelFor*`` load the directory.
    An adapter loaded by :func:`load_peft` with ``modules_to_save`` or ``bias`` writes them back
    (the saved modules' and the biases' current values, under PEFT's keys).
    """
    if task_type is None:
        task_type = infer_task_type(model)
    elif task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    modules = adapter_modules(model, adapter_name)
    if not modules:
        raise ValueError(f"adapter_name {adapter_name!r}: no layer of the model has this adapter")
    adapters = {n: m.adapters[adapter_name] for n, m in modules.items()}
    for n, a in adapters.items():
        if a.kind not in ("lora", "dora"):
            raise ValueError(f"adapter_name {adapter_name!r} on {n!r} is a {a.kind} adapter; PEFT LoRA needs LoRA")
    for attr in ("use_rslora", "dropout", "kind"):
        values = {getattr(a, attr) for a in adapters.values()}
        if len(values) > 1:
            raise ValueError(f"adapter_name {adapter_name!r}: layers disagree on {attr} ({sorted(values)}); "
                             f"a PEFT config holds one value")
    first = next(iter(adapters.values()))
    r = Counter(a.r for a in adapters.values()).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in adapters.values()).most_common(1)[0][0]
    names = sorted(adapters)
    fields = peft_fields(model).get(adapter_name, dict(bias="none", modules_to_save=[]))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": _target_list(model, names),
        "rank_pattern": {re.escape(n): adapters[n].r for n in names if adapters[n].r != r},
        "alpha_pattern": {re.escape(n): _number(adapters[n].alpha) for n in names if adapters[n].alpha != alpha},
        "fan_in_fan_out": any(isinstance(modules[n], Conv1DAdapter) for n in names),
        "use_dora": first.kind == "dora",
        "bias": fields["bias"],
        "modules_to_save": fields["modules_to_save"] or None,
        "init_lora_weights": True,
    }
    tensors = {k: t.detach().cpu().contiguous() for k, t in peft_tensors(model, adapter_name).items()}
    os.makedirs(path, exist_ok=True)
    _write_config(config, path)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})


def peft_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The live tensors :func:`save_peft` writes for ``adapter_name``, by PEFT state key: lora_A / lora_B of
    every layer holding it, the modules it saved whole and the biases it trains (PEFT's ``bias``)."""
    modules = adapter_modules(model, adapter_name)
    tensors = {}
    for n, m in sorted(modules.items()):
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.adapters[adapter_name].lora_A
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.adapters[adapter_name].lora_B
        if m.adapters[adapter_name].kind == "dora":
            tensors[f"{PREFIX}{n}.{MAGNITUDE}"] = m.adapters[adapter_name].lora_magnitude_vector
    saved = {n: versions[adapter_name] for n, versions in saved_modules(model).items() if adapter_name in versions}
    tensors |= {f"{PREFIX}{n}.{k}": t for n, state in saved.items() for k, t in state.items()}
    fields = peft_fields(model).get(adapter_name)
    if fields is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        biases = _bias_keys(model, fields["bias"], sorted(modules), list(saved))
        tensors |= {key: params[p] for key, p in biases.items()}
    return tensors


def from_peft_model(peft_model: nn.Module) -> nn.Module:
    """Convert a ``PeftModel``'s LoRA layers (``peft.tuners.lora.Linear``) in place into ``AdapterLinear``.

    Semantics: each LoRA layer is replaced by an ``AdapterLinear`` (``Conv1DAdapter`` over a
    Conv1D) sharing the base weight and bias and the LoRA Parameters themselves (A [r, in],
    B [out, r], dtype and requires_grad kept), with every adapter under its PEFT name, the
    same r, alpha, rsLoRA flag and dropout, and the active adapter selected (None where
    adapters are disabled). Returns the underlying transformers model
    (``peft_model.get_base_model()``); save it with :func:`save_peft`. The PeftModel wrapper
    is spent: PEFT no longer sees these layers (its ``save_pretrained`` would write 0 tensors,
    ``merge_and_unload`` merge nothing), so apart from ``get_base_model()`` every PEFT call
    on it (save_pretrained, get_peft_model_state_dict, merge_and_unload, merge_adapter,
    set_adapter, forward, ...) raises RuntimeError.

    Raises (before changing anything) TypeError if ``peft_model`` is not a PeftModel;
    NotImplementedError for merged layers, several active adapters, LoRA variants (DoRA,
    lora_bias, ...), modules_to_save / trainable-token wrappers, non-Linear LoRA layers, or an
    adapter initialised by rewriting the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ).
    """
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    base = peft_model.get_base_model()
    lora = {n: m for n, m in base.named_modules() if type(m) is LoraLinear}
    inner = tuple(n + "." for n in lora)
    for n, m in base.named_modules():
        if type(m).__module__.startswith("peft.") and n not in lora and not n.startswith(inner):
            raise NotImplementedError(f"{n!r} is a peft {type(m).__name__}; only LoRA on nn.Linear / Conv1D "
                                      f"converts (no modules_to_save, trainable tokens or other tuners)")
    for a, cfg in getattr(peft_model, "peft_config", {}).items():
        init = getattr(cfg, "init_lora_weights", True)
        if not init_keeps_base(init):
            raise NotImplementedError(f"adapter {a!r} was initialised with init_lora_weights={init!r}, which "
                                      f"rewrote the base weight; save_peft could not record that, so the saved "
                                      f"adapter would be silently wrong on the original base. Keep training it "
                                      f"with PEFT, or convert it first (PEFT's save_pretrained with "
                                      f"path_initial_model_for_weight_conversion) and load that with load_peft")
    layers = {}
    for n, m in lora.items():
        if not isinstance(m.base_layer, (nn.Linear, Conv1D)):
            raise NotImplementedError(f"{n!r} is LoRA over a {type(m.base_layer).__name__}; only nn.Linear / "
                                      f"Conv1D converts")
        if m.merged:
            raise NotImplementedError(f"{n!r} has merged adapters {m.merged_adapters}; unmerge() first")
        active = [a for a in m.active_adapters if a in m.lora_A]
        if len(active) > 1:
            raise NotImplementedError(f"{n!r} has several active adapters {active}; AdapterLinear runs one")
        for a in m.lora_A:
            if m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) or a in getattr(m, "lora_variant", {}):
                raise NotImplementedError(f"{n!r}: adapter {a!r} is a LoRA variant (use_dora / lora_bias / ...)")
            want = m.lora_alpha[a] / (math.sqrt(m.r[a]) if m.use_rslora[a] else m.r[a])
            if m.scaling[a] != want:
                raise NotImplementedError(f"{n!r}: adapter {a!r} has scaling {m.scaling[a]} != its lora_alpha/r "
                                          f"({want}); set_scale() is not supported")
        layers[n] = (m, None if m.disable_adapters or not active else active[0])

    for n, (m, active) in layers.items():
        new = (Conv1DAdapter.from_conv1d(m.base_layer) if isinstance(m.base_layer, Conv1D)
               else AdapterLinear.from_linear(m.base_layer, freeze=False))
        new.train(m.training)
        for a in m.lora_A:
            dropout = m.lora_dropout[a]
            adapter = new.add_lora(a, m.r[a], alpha=m.lora_alpha[a], use_rslora=m.use_rslora[a],
                                   dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
            adapter.lora_A = m.lora_A[a].weight
            adapter.lora_B = m.lora_B[a].weight
        new.set_adapter(active)
        parent, _, child = n.rpartition(".")
        setattr(base.get_submodule(parent), child, new)
    vars(base).pop("peft_config", None)  # PEFT's unload() drops it too
    guard_save_pretrained(base)
    peft_model.base_model = _ConvertedTuner(base)
    peft_model.get_base_model = lambda: base
    return base


_CONVERTED = ("this PeftModel was converted by adaptkern's from_peft_model: its LoRA layers are now AdapterLinear "
              "modules that PEFT cannot see (it would save 0 tensors and merge nothing). Use the model that "
              "from_peft_model returned (peft_model.get_base_model()) and save it with adaptkern's save_peft")


class _ConvertedTuner(nn.Module):
    """Replaces a converted PeftModel's tuner (``peft_model.base_model``). Every PEFT path (peft_config, save,
    state dict, merge, unload, set_adapter, forward) goes through it, so they all raise instead of silently
    acting on no LoRA layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        raise RuntimeError(_CONVERTED)

    def __getattr__(self, name: str):
        if name == "model" or name.startswith("__"):
            return super().__getattr__(name)
        raise RuntimeError(_CONVERTED)
