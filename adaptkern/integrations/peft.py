"""PEFT LoRA checkpoints: load, save, and convert live ``PeftModel`` objects.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``) with, for every targeted module ``<path>`` of the base model,
``base_model.model.<path>.lora_A.weight`` [r, in] and ``base_model.model.<path>.lora_B.weight``
[out, r]; the module computes y = base(x) + scale·(dropout(x)·Aᵀ)·Bᵀ, scale = alpha/r
(alpha/√r with rsLoRA). ``AdapterLinear`` stores the same two tensors as
``<path>.adapters.<name>.lora_A`` / ``lora_B``, in the file's dtype, bit for bit.

Loading is strict and atomic: the config, the file and every tensor are validated before
the model is touched, so a failed load leaves the model exactly as it was. The ``peft``
package is needed only by :func:`from_peft_model`; where it imports, :func:`save_peft` writes
every field of its ``LoraConfig``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from numbers import Real

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import validation as check
from ..nn import AdapterLinear
from .checkpoint_io import read_json_object, read_state_dict
from .patching import (Conv1DAdapter, adapter_modules, freeze_base, name_matches, patch, refuse_peft_layers,
                       set_adapter, target_module_names)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# Config fields that only describe provenance, initialisation or training-time tricks:
# they do not change what the saved weights compute, so they are read and ignored.
_IGNORED_FIELDS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "megatron_core", "qalora_group_size", "runtime_config", "layers_pattern", "ensure_weight_tying",
})
# Features that change the computation: supported only at these neutral values.
_NEUTRAL_FIELDS = {
    "use_dora": False, "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
    "target_parameters": None, "layer_replication": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "megatron_config": None,
    "arrow_config": None, "kasa_config": None, "monteclora_config": None,
}
_HONOURED_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "rank_pattern",
    "alpha_pattern", "fan_in_fan_out", "lora_dropout", "bias", "init_lora_weights",
})
# init_lora_weights values (besides true, false, null) that leave the base weight alone. PiSSA ("pissa*"), OLoRA,
# CorDA and LoRA-GA subtract the initial adapter from the base weight and LoftQ replaces it by a quantised residual,
# so their saved lora_A / lora_B apply to that changed base only; PEFT redoes the change when it loads them (except
# LoRA-GA's, which needs the training gradients).
_INIT_KEEPS_BASE = frozenset({"gaussian", "eva", "orthogonal", "mica"})


def _init_keeps_base(init) -> bool:
    return init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _INIT_KEEPS_BASE)


def _is_neutral(value, neutral) -> bool:
    return value == neutral or (neutral is None and value in ([], {}, "")) or (neutral is False and value is None)


def _targets_field(config: dict, field: str):
    value = config.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise ValueError(f"{CONFIG_NAME}: {field} must be a str, a list of str or null, got {value!r}")


def _pattern_field(config: dict, field: str, kind) -> dict:
    value = config.get(field) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
                                              for k, v in value.items()):
        raise ValueError(f"{CONFIG_NAME}: {field} must map regex str -> {kind.__name__}, got {value!r}")
    return value


def _pattern_get(patterns: dict, module_name: str, default):
    """PEFT's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", module_name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_config(config) -> dict:
    """Validate a parsed adapter_config.json; return {r, alpha, rank_pattern, alpha_pattern, rslora, dropout,
    targets, exclude, fan_in_fan_out}. Unknown fields warn; unsupported features raise NotImplementedError."""
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ValueError(f"{CONFIG_NAME}: peft_type must be a str such as 'LORA', got {peft_type!r}")
    if peft_type != "LORA":
        raise NotImplementedError(f"{CONFIG_NAME}: peft_type={peft_type!r} is not supported; only 'LORA' is")
    unknown = sorted(set(config) - _IGNORED_FIELDS - set(_NEUTRAL_FIELDS) - _HONOURED_FIELDS)
    if unknown:
        warnings.warn(f"{CONFIG_NAME}: ignoring unknown fields {unknown}", stacklevel=3)
    for field, neutral in _NEUTRAL_FIELDS.items():
        if not _is_neutral(config.get(field, neutral), neutral):
            raise NotImplementedError(f"{CONFIG_NAME}: {field}={config[field]!r} is not supported "
                                      f"(only {neutral!r})")
    init = config.get("init_lora_weights", True)
    if not _init_keeps_base(init):
        raise NotImplementedError(
            f"{CONFIG_NAME}: init_lora_weights={init!r} is not supported: PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ "
            f"change the base weight, and these lora_A / lora_B fit only the changed base. Convert the adapter into "
            f"plain LoRA for the original base with PEFT's peft_model.save_pretrained(path, "
            f"path_initial_model_for_weight_conversion=<adapter saved right after initialisation>) and load that "
            f"(LoftQ: load an adapter saved with init_lora_weights=True onto the quantised base saved with it). "
            f"Supported: true, false, null, {', '.join(map(repr, sorted(_INIT_KEEPS_BASE)))}")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{CONFIG_NAME}: bias={config['bias']!r} is not supported (only 'none')")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{CONFIG_NAME}: r must be a positive int, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"{CONFIG_NAME}: lora_alpha must be a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{CONFIG_NAME}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    flags = {}
    for field in ("use_rslora", "fan_in_fan_out"):
        flags[field] = config.get(field, False)
        if not isinstance(flags[field], bool):
            raise ValueError(f"{CONFIG_NAME}: {field} must be a bool, got {flags[field]!r}")
    targets = _targets_field(config, "target_modules")
    if targets is None:
        raise ValueError(f"{CONFIG_NAME}: target_modules is null; name the targeted modules (or 'all-linear')")
    rank_pattern = _pattern_field(config, "rank_pattern", int)
    if any(v < 1 for v in rank_pattern.values()):
        raise ValueError(f"{CONFIG_NAME}: rank_pattern ranks must be positive, got {rank_pattern!r}")
    alpha_pattern = _pattern_field(config, "alpha_pattern", Real)
    if not all(math.isfinite(v) for v in alpha_pattern.values()):
        raise ValueError(f"{CONFIG_NAME}: alpha_pattern values must be finite, got {alpha_pattern!r}")
    return dict(r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, rslora=flags["use_rslora"],
                fan_in_fan_out=flags["fan_in_fan_out"], dropout=float(dropout), targets=targets,
                exclude=_targets_field(config, "exclude_modules"))


def _base_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees them on the unpatched model: without the adapters inside AdapterLinear."""
    inner = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterLinear))
    return [n for n, _ in model.named_modules() if n and not n.startswith(inner)]


def _select_targets(model: nn.Module, cfg: dict) -> list[str]:
    """The module names PEFT would wrap for this config; every one must be a linear layer."""
    targets = cfg["targets"]
    if targets == "all-linear":
        names = target_module_names(model, None)
    else:
        names = [n for n in _base_module_names(model) if name_matches(n, targets)]
    if cfg["exclude"]:
        names = [n for n in names if not name_matches(n, cfg["exclude"])]
    for n in names:
        module = model.get_submodule(n)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise NotImplementedError(f"{CONFIG_NAME}: target_modules={targets!r} selects {n!r}, a "
                                      f"{type(module).__name__}; only nn.Linear and Conv1D targets are supported")
    if not names:
        raise ValueError(f"{CONFIG_NAME}: target_modules={targets!r} matches no module of {type(model).__name__}")
    return names


def load_peft(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Load the PEFT LoRA adapter saved in directory ``path`` into ``model`` as adapter ``adapter_name``.

    Semantics: every module PEFT would target (target_modules, exclude_modules) becomes an
    ``AdapterLinear`` (patched as needed) computing y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ
    with r, alpha from rank_pattern / alpha_pattern or r / lora_alpha, scale = alpha/r
    (alpha/√r with use_rslora) and dropout = lora_dropout. Shapes: A [r, in], B [out, r],
    kept in the file's dtype. ``fan_in_fan_out`` describes the base weight's layout, which
    adaptkern reads from the module type (Conv1D: [in, out]); a disagreeing value warns, as
    PEFT does. Afterwards the adapter is active everywhere and only adapter parameters
    require grad. Returns ``model``.

    Raises (leaving the model unchanged): FileNotFoundError for a missing file; ValueError for
    an invalid config, missing or unexpected keys, a shape mismatch (naming the key and both
    shapes), non-finite or non-floating weights, or a corrupt file; NotImplementedError for
    a non-LoRA peft_type or an unsupported feature (naming the config field), including an
    ``init_lora_weights`` that changes the base weight (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ):
    convert such an adapter with PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` first.
    """
    refuse_peft_layers(model, "load_peft")
    cfg = _check_config(read_json_object(os.path.join(path, CONFIG_NAME)))
    names = _select_targets(model, cfg)
    _check_free_name(model, adapter_name)
    _, weights = read_state_dict(path, SAFETENSORS_NAME, BIN_NAME)

    expected, plan = {}, {}
    for n in names:
        module = model.get_submodule(n)
        in_f, out_f = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
        r = _pattern_get(cfg["rank_pattern"], n, cfg["r"])
        plan[n] = (r, _pattern_get(cfg["alpha_pattern"], n, cfg["alpha"]))
        expected[f"{PREFIX}{n}.lora_A.weight"] = (r, in_f)
        expected[f"{PREFIX}{n}.lora_B.weight"] = (out_f, r)
    conv = (Conv1D, Conv1DAdapter)
    layouts = [n for n in names if isinstance(model.get_submodule(n), conv) != cfg["fan_in_fan_out"]]
    if layouts:
        warnings.warn(f"{CONFIG_NAME}: fan_in_fan_out={cfg['fan_in_fan_out']} but {layouts[0]!r} is a "
                      f"{type(model.get_submodule(layouts[0])).__name__} ({len(layouts)} such modules); using "
                      f"each module's own weight layout, as PEFT does", stacklevel=2)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for key, shape in expected.items():
        t = weights[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{key}: shape mismatch: checkpoint has {tuple(t.shape)}, the model needs {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{key}: adapter weights must be floating point, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: adapter weights contain NaN or Inf")

    patch(model, names)
    for n, (r, alpha) in plan.items():
        module = model.get_submodule(n)
        adapter = module.add_lora(adapter_name, r, alpha=alpha, dropout=cfg["dropout"], use_rslora=cfg["rslora"])
        device = module.weight.device
        adapter.lora_A = nn.Parameter(weights[f"{PREFIX}{n}.lora_A.weight"].to(device))
        adapter.lora_B = nn.Parameter(weights[f"{PREFIX}{n}.lora_B.weight"].to(device))
    set_adapter(model, adapter_name)
    freeze_base(model)
    return model


def _check_free_name(model: nn.Module, adapter_name: str) -> None:
    check.adapter_name(adapter_name, "adapter_name")
    if adapter_modules(model, adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} is already used in the model; pick another name")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _target_list(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT target_modules selecting exactly ``names``: a leaf name (e.g. "q_proj") where every module it
    selects is targeted, the full module names otherwise."""
    chosen, base_names = set(names), _base_module_names(model)
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
    not a LoRA adapter, or if its layers disagree on use_rslora or dropout (which PEFT
    cannot express per layer). ``task_type`` (one of :data:`TASK_TYPES`; None: inferred from
    the model class by :func:`infer_task_type`) lets ``AutoPeftModelFor*`` load the directory.
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
        if a.kind != "lora":
            raise ValueError(f"adapter_name {adapter_name!r} on {n!r} is a {a.kind} adapter; PEFT LoRA needs LoRA")
    for attr in ("use_rslora", "dropout"):
        values = {getattr(a, attr) for a in adapters.values()}
        if len(values) > 1:
            raise ValueError(f"adapter_name {adapter_name!r}: layers disagree on {attr} ({sorted(values)}); "
                             f"a PEFT config holds one value")
    first = next(iter(adapters.values()))
    r = Counter(a.r for a in adapters.values()).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in adapters.values()).most_common(1)[0][0]
    names = sorted(adapters)
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
        "bias": "none",
        "init_lora_weights": True,
    }
    tensors = {}
    for n in names:
        tensors[f"{PREFIX}{n}.lora_A.weight"] = adapters[n].lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = adapters[n].lora_B.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    _write_config(config, path)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})


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
        if not _init_keeps_base(init):
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
