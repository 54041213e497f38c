"""PEFT LoRA ``adapter_config.json``: strict validation, target matching and weight reading.

Where the ``peft`` package imports, its own code decides what a config means: the config is
parsed by ``LoraConfig.from_pretrained``, a module is a target when PEFT's
``check_target_module_exists`` says so (target_modules, exclude_modules, modules_to_save,
layers_to_transform / layers_pattern), per-layer ranks come from its ``get_pattern_key``, and
the weights are read by its ``load_peft_weights``. Without peft a small fallback follows the
same rules. Either way the raw JSON is validated first, so an unsupported feature or a bad
value raises a clear error before anything else runs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from numbers import Real
from typing import Optional

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..nn import AdapterLinear
from .checkpoint_io import read_json_object, read_state_dict
from .patching import name_matches, target_module_names

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA key suffix: base_model.model.<path>.lora_magnitude_vector [out]
BIAS_MODES = ("none", "all", "lora_only")

# Config fields that only describe provenance, initialisation or training-time tricks:
# they do not change what the saved weights compute, so they are read and ignored.
_IGNORED_FIELDS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
})
# Features that change the computation: supported only at these neutral values.
_NEUTRAL_FIELDS = {
    "lora_bias": False, "target_parameters": None, "layer_replication": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
    "megatron_config": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
}
_HONOURED_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "rank_pattern",
    "alpha_pattern", "fan_in_fan_out", "lora_dropout", "bias", "init_lora_weights", "modules_to_save",
    "layers_to_transform", "layers_pattern", "use_dora",
})
# init_lora_weights values (besides true, false, null) that leave the base weight alone. PiSSA ("pissa*"), OLoRA,
# CorDA and LoRA-GA subtract the initial adapter from the base weight and LoftQ replaces it by a quantised residual,
# so their saved lora_A / lora_B apply to that changed base only; PEFT redoes the change when it loads them (except
# LoRA-GA's, which needs the training gradients).
_INIT_KEEPS_BASE = frozenset({"gaussian", "eva", "orthogonal", "mica"})


def init_keeps_base(init) -> bool:
    """Whether ``init_lora_weights=init`` leaves the base weight as it was (plain LoRA semantics)."""
    return init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _INIT_KEEPS_BASE)


def _is_neutral(value, neutral) -> bool:
    return value == neutral or (neutral is None and value in ([], {}, "")) or (neutral is False and value is None)


def _str_list_field(config: dict, field: str, allow_str: bool = True):
    value = config.get(field)
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise ValueError(f"{CONFIG_NAME}: {field} must be {'a str, ' if allow_str else ''}a list of str or null, "
                     f"got {value!r}")


def _pattern_field(config: dict, field: str, kind) -> dict:
    value = config.get(field) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
                                              for k, v in value.items()):
        raise ValueError(f"{CONFIG_NAME}: {field} must map regex str -> {kind.__name__}, got {value!r}")
    return value


def _layers_field(config: dict):
    value = config.get("layers_to_transform")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return value
    raise ValueError(f"{CONFIG_NAME}: layers_to_transform must be a layer index, a list of them or null, got {value!r}")


def _number_field(config: dict, field: str, default, ok, want: str):
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, Real) or not ok(value):
        raise ValueError(f"{CONFIG_NAME}: {field} must be {want}, got {value!r}")
    return value


def check_config(config) -> dict:
    """Validate a parsed adapter_config.json; return {r, alpha, rank_pattern, alpha_pattern, rslora, dropout,
    targets, exclude, fan_in_fan_out, dora, modules_to_save, layers_to_transform, layers_pattern, bias}. Unknown
    fields warn; unsupported features raise NotImplementedError naming the field."""
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ValueError(f"{CONFIG_NAME}: peft_type must be a str such as 'LORA', got {peft_type!r}")
    if peft_type != "LORA":
        raise NotImplementedError(f"{CONFIG_NAME}: peft_type={peft_type!r} is not supported; only 'LORA' is")
    unknown = sorted(set(config) - _IGNORED_FIELDS - set(_NEUTRAL_FIELDS) - _HONOURED_FIELDS)
    if unknown:
        warnings.warn(f"{CONFIG_NAME}: ignoring unknown fields {unknown}", stacklevel=4)
    for field, neutral in _NEUTRAL_FIELDS.items():
        if not _is_neutral(config.get(field, neutral), neutral):
            raise NotImplementedError(f"{CONFIG_NAME}: {field}={config[field]!r} is not supported "
                                      f"(only {neutral!r})")
    init = config.get("init_lora_weights", True)
    if not init_keeps_base(init):
        raise NotImplementedError(
            f"{CONFIG_NAME}: init_lora_weights={init!r} is not supported: PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ "
            f"change the base weight, and these lora_A / lora_B fit only the changed base. Convert the adapter into "
            f"plain LoRA for the original base with PEFT's peft_model.save_pretrained(path, "
            f"path_initial_model_for_weight_conversion=<adapter saved right after initialisation>) and load that "
            f"(LoftQ: load an adapter saved with init_lora_weights=True onto the quantised base saved with it). "
            f"Supported: true, false, null, {', '.join(map(repr, sorted(_INIT_KEEPS_BASE)))}")
    bias = config.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{CONFIG_NAME}: bias must be one of {BIAS_MODES}, got {bias!r}")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{CONFIG_NAME}: r must be a positive int, got {r!r}")
    alpha = _number_field(config, "lora_alpha", 8, math.isfinite, "a finite number")
    dropout = _number_field(config, "lora_dropout", 0.0, lambda p: 0.0 <= p < 1.0, "a number in [0, 1)")
    flags = {}
    for field in ("use_rslora", "fan_in_fan_out", "use_dora"):
        flags[field] = config.get(field, False)
        if not isinstance(flags[field], bool):
            raise ValueError(f"{CONFIG_NAME}: {field} must be a bool, got {flags[field]!r}")
    targets = _str_list_field(config, "target_modules")
    if targets is None:
        raise ValueError(f"{CONFIG_NAME}: target_modules is null; name the targeted modules (or 'all-linear')")
    rank_pattern = _pattern_field(config, "rank_pattern", int)
    if any(v < 1 for v in rank_pattern.values()):
        raise ValueError(f"{CONFIG_NAME}: rank_pattern ranks must be positive, got {rank_pattern!r}")
    alpha_pattern = _pattern_field(config, "alpha_pattern", Real)
    if not all(math.isfinite(v) for v in alpha_pattern.values()):
        raise ValueError(f"{CONFIG_NAME}: alpha_pattern values must be finite, got {alpha_pattern!r}")
    return dict(r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, rslora=flags["use_rslora"],
                dora=flags["use_dora"],
                fan_in_fan_out=flags["fan_in_fan_out"], dropout=float(dropout), targets=targets,
                exclude=_str_list_field(config, "exclude_modules"), bias=bias,
                modules_to_save=_str_list_field(config, "modules_to_save", allow_str=False) or [],
                layers_to_transform=_layers_field(config), layers_pattern=_str_list_field(config, "layers_pattern"))


def peft_lora_config(path: str):
    """PEFT's own ``LoraConfig.from_pretrained(path)``, or None where peft does not import. Called after
    :func:`check_config` accepted the JSON; an error PEFT raises becomes a ValueError naming ``path``."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    try:
        return LoraConfig.from_pretrained(path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: peft's LoraConfig refuses it: {e}") from e


def base_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees them on the unpatched model: without the adapters inside AdapterLinear."""
    inner = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterLinear))
    return [n for n, _ in model.named_modules() if n and not n.startswith(inner)]


def _layer_index(name: str, patterns) -> Optional[int]:
    """The layer index PEFT reads from a module name: the first ``<pattern>.<digits>.`` (any pattern if none)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def _fallback_is_target(cfg: dict, targets, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` rule, for machines without peft."""
    if cfg["exclude"] and name_matches(name, cfg["exclude"]):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg["modules_to_save"]):
        return False  # PEFT never puts LoRA on (or inside) a module it saves whole
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    found = any(name.endswith("." + t) for t in targets)
    layers = cfg["layers_to_transform"]
    if not found or layers is None or layers == []:
        return found
    index = _layer_index(name, cfg["layers_pattern"])
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def select_targets(model: nn.Module, cfg: dict, peft_cfg=None) -> list[str]:
    """The module names PEFT would wrap for this config (PEFT's matcher where ``peft_cfg`` is given);
    every one must be a linear layer. ``all-linear`` becomes the leaf names of the model's linear
    layers but the output head, as PEFT expands it."""
    targets = cfg["targets"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in target_module_names(model, None)})
    if peft_cfg is not None:
        from peft.tuners.tuners_utils import check_target_module_exists

        peft_cfg.target_modules = targets if isinstance(targets, str) else set(targets)
        names = [n for n in base_module_names(model) if check_target_module_exists(peft_cfg, n)]
    else:
        names = [n for n in base_module_names(model) if _fallback_is_target(cfg, targets, n)]
    for n in names:
        module = model.get_submodule(n)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise NotImplementedError(f"{CONFIG_NAME}: target_modules={cfg['targets']!r} selects {n!r}, a "
                                      f"{type(module).__name__}; only nn.Linear and Conv1D targets are supported")
        if cfg["dora"] and getattr(module.weight, "quant_state", None) is not None:
            raise NotImplementedError(f"{CONFIG_NAME}: use_dora=True on {n!r}, a 4-bit {type(module).__name__}: "
                                      f"DoRA on a quantized base (QDoRA) is not supported; load it with PEFT")
    if not names:
        raise ValueError(f"{CONFIG_NAME}: target_modules={cfg['targets']!r} matches no module of "
                         f"{type(model).__name__}")
    return names


def select_modules_to_save(model: nn.Module, cfg: dict) -> list[str]:
    """Modules PEFT saves whole for ``modules_to_save``: names ending with an entry (PEFT's
    ``_set_trainable`` rule), outermost ones only."""
    chosen = [n for n in base_module_names(model) if any(n.endswith(t) for t in cfg["modules_to_save"])]
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]


def pattern_get(patterns: dict, module_name: str, default):
    """The value of the first key k of ``patterns`` with ``re.match(rf"(.*\\.)?({k})$", module_name)``
    (PEFT's ``get_pattern_key``, used where peft imports), else ``default``."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module_name)), None)
    else:
        key = get_pattern_key(list(patterns), module_name) if patterns else None
    return patterns[key] if key in patterns else default


def read_weights(path: str) -> dict:
    """The adapter state dict saved in directory ``path``, on the CPU: through peft's ``load_peft_weights``
    where it imports (a local file only: its hub fallback is never reached), else safetensors / a
    ``weights_only`` .bin. Errors as :func:`checkpoint_io.read_state_dict`."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in (SAFETENSORS_NAME, BIN_NAME)):
        return read_state_dict(path, SAFETENSORS_NAME, BIN_NAME)[1]  # raises FileNotFoundError
    try:
        from peft.utils import load_peft_weights
    except ImportError:
        return read_state_dict(path, SAFETENSORS_NAME, BIN_NAME)[1]
    try:
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:  # corrupt or refused file: read it again here for the precise message
        read_state_dict(path, SAFETENSORS_NAME, BIN_NAME)
        raise ValueError(f"{path}: peft's load_peft_weights cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in weights.items()):
        raise ValueError(f"{path}: the adapter weights file must hold a dict of str -> Tensor")
    return weights


def read_config(path: str) -> tuple[dict, object]:
    """(:func:`check_config` of ``path``'s adapter_config.json, PEFT's LoraConfig of it or None)."""
    cfg = check_config(read_json_object(os.path.join(path, CONFIG_NAME)))
    return cfg, peft_lora_config(path)
