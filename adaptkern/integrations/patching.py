"""Patch Hugging Face models in place: ``nn.Linear`` (and transformers' ``Conv1D``) -> ``AdapterLinear``.

Modules are replaced by type and name, never by rebinding model code. The replacement
shares the original Parameters, so parameter names, tied weights and the base model's
state dict keys are unchanged; adapters add keys under ``<module>.adapters.<name>.``.

Target selection follows PEFT's ``target_modules``: a list of name suffixes (a module
matches when its full name equals a suffix or ends with ``"." + suffix``), a regex string
matched with ``re.fullmatch`` against the full module name, or None / ``"all-linear"``:
every linear layer except the output head.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import validation as check
from ..dora import dora_weight_norm
from ..nn import AdapterLinear, bottleneck_arguments, lora_arguments

TargetModules = Union[None, str, Iterable[str]]

# Output heads excluded when target_modules is None and the model has no get_output_embeddings().
_HEAD_NAMES = ("lm_head", "classifier", "score")


class Conv1DAdapter(AdapterLinear):
    """``AdapterLinear`` over a transformers ``Conv1D`` (GPT-2), keeping Conv1D's weight layout.

    Semantics: y = x·Wᵀ + b + (the active adapter's term), as ``AdapterLinear``, where
    W [out, in] is the transpose view of the stored Parameter.

    The Parameter registered as ``weight`` is the Conv1D's own ``[in, out]`` tensor, so the
    state dict, tied or shared weights and gradients keep GPT-2's layout. Reading the
    ``.weight`` attribute returns its ``[out, in]`` transpose (a free strided view), which
    is the ``nn.Linear`` contract the fused kernels, ``merge`` and every other reader rely
    on; assigning a Parameter to ``.weight`` stores an ``[in, out]`` one, as on Conv1D.
    """

    @property
    def weight(self) -> Tensor:
        return self._parameters["weight"].t()

    @classmethod
    def from_conv1d(cls, conv: Conv1D) -> "Conv1DAdapter":
        """Wrap ``conv``, sharing (not copying) its weight [in, out] and bias [out] Parameters."""
        if not isinstance(conv, Conv1D):
            raise TypeError(f"from_conv1d expects a transformers Conv1D, got {type(conv).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = conv.weight.shape
        new._parameters["weight"] = conv.weight  # direct: the weight property shadows register_parameter's check
        new.register_parameter("bias", conv.bias)
        new._init_adapter_state()
        new.train(conv.training)
        return new


def _check_targets(target_modules: TargetModules) -> Union[None, str, tuple[str, ...]]:
    if target_modules is None or target_modules == "all-linear":
        return None
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules is not a valid regex: {target_modules!r} ({e})") from None
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in target_modules):
        return tuple(target_modules)
    raise TypeError(f"target_modules must be None, a regex str or a list of str, got {target_modules!r}")


def name_matches(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    """Semantics: PEFT's rule: ``re.fullmatch(target_modules, name)`` for a str, else
    ``name == t or name.endswith("." + t)`` for some t in the list."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        return {n for n, m in model.named_modules() if m is head}
    return {n for n, _ in model.named_modules() if n.split(".")[-1] in _HEAD_NAMES}


def target_module_names(model: nn.Module, target_modules: TargetModules = None) -> list[str]:
    """Names of the linear layers (``nn.Linear``, ``Conv1D``, ``AdapterLinear``) that ``target_modules`` selects.

    Raises ValueError when it selects none.
    """
    targets = _check_targets(target_modules)
    linears = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]
    if targets is None:
        heads = _output_head_names(model)
        names = [n for n in linears if n not in heads]
    else:
        names = [n for n in linears if name_matches(n, targets)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear/Conv1D module of "
                         f"{type(model).__name__}; linear layers are e.g. {linears[:6]}")
    return names


def patch(model: nn.Module, target_modules: TargetModules = None) -> nn.Module:
    """Replace, in place, the selected ``nn.Linear``/``Conv1D`` modules with ``AdapterLinear``.

    Semantics: outputs are unchanged (no adapter is added); each replacement shares the
    original weight and bias Parameters, keeps their ``requires_grad`` and training mode, and
    every state dict key. ``Conv1D`` becomes :class:`Conv1DAdapter` (its weight stays
    ``[in, out]``). Modules that already are ``AdapterLinear`` are left alone (idempotent).

    Returns ``model``. Raises ValueError if ``target_modules`` matches nothing.
    """
    for name in target_module_names(model, target_modules):
        module = model.get_submodule(name)
        if isinstance(module, AdapterLinear):
            continue
        if isinstance(module, Conv1D):
            new = Conv1DAdapter.from_conv1d(module)
        else:
            new = AdapterLinear.from_linear(module, freeze=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    guard_save_pretrained(model)
    return model


def guard_save_pretrained(model: nn.Module) -> None:
    """Give a transformers model holding adaptkern adapters the :class:`BaseOnlySave` ``save_pretrained``."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = BaseOnlySave(model)


class BaseOnlySave:
    """A patched transformers model's ``save_pretrained`` (an instance attribute set by :func:`patch`).

    Semantics: writes the base model's checkpoint, exactly what ``from_pretrained`` of the
    unpatched class reads: the ``<module>.adapters.*`` keys are left out (a plain
    ``from_pretrained`` would drop them) and modules replaced for PEFT's ``modules_to_save``
    are written as the model's own; merged layers already save W unmerged. When adapters were
    left out it warns, naming ``adaptkern.save_peft`` (adapters) and
    ``adaptkern.integrations.trainer.AdapterTrainer`` (adapter-only Trainer checkpoints).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, state_dict=None, **kwargs):
        model = self.model
        state = dict(model.state_dict() if state_dict is None else state_dict)
        prefixes = tuple(f"{n}.adapters." for n in adapter_modules(model))
        names = sorted({k[len(p):].split(".")[0] for k in state for p in prefixes if k.startswith(p)})
        for module_name, versions in saved_modules(model).items():
            state.update({f"{module_name}.{k}": t for k, t in versions[None].items()})
        if names:
            warnings.warn(f"save_pretrained of a patched {type(model).__name__} writes the base model only; its "
                          f"adapters {names} are not in {save_directory!r}. Save them with adaptkern.save_peft "
                          f"(a PEFT adapter directory); under the transformers Trainer use adaptkern.integrations."
                          f"trainer.AdapterTrainer for adapter-only checkpoints", stacklevel=2)
        clean = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        return type(model).save_pretrained(model, save_directory, *args, state_dict=clean, **kwargs)


SAVED_MODULES = "adaptkern_saved_modules"
PEFT_FIELDS = "adaptkern_peft_fields"


def saved_modules(model: nn.Module) -> dict[str, dict]:
    """PEFT ``modules_to_save`` of a patched model: {module name: {adapter name, or None for the
    model's own: {state key: tensor}}}; :func:`set_adapter` installs the active adapter's version
    (the model's own where it has none)."""
    return vars(model).setdefault(SAVED_MODULES, {})


def peft_fields(model: nn.Module) -> dict[str, dict]:
    """What PEFT adapters loaded into a patched model train besides LoRA, by adapter name:
    {"bias": "none" | "all" | "lora_only", "biases": [parameter names], "modules_to_save": [config entries]}."""
    return vars(model).setdefault(PEFT_FIELDS, {})


def _slot(module: nn.Module, key: str) -> tuple[dict, str]:
    """(the Parameter or buffer dict holding state key ``key`` of ``module``, its leaf name)."""
    owner, _, leaf = key.rpartition(".")
    sub = module.get_submodule(owner)
    return (sub._parameters if leaf in sub._parameters else sub._buffers), leaf


def _install(model: nn.Module, states: dict[str, dict]) -> None:
    """Put the tensors ``states[module][key]`` into the modules (as Parameters or buffers, as they are)."""
    for module_name, state in states.items():
        module = model.get_submodule(module_name)
        for key, t in state.items():
            holder, leaf = _slot(module, key)
            holder[leaf] = t


def _installed(model: nn.Module) -> dict[str, dict]:
    """The tensors the saved modules hold now, as :func:`_install` takes them."""
    states = {}
    for module_name, versions in vars(model).get(SAVED_MODULES, {}).items():
        module = model.get_submodule(module_name)
        states[module_name] = {}
        for key in versions[None]:
            holder, leaf = _slot(module, key)
            states[module_name][key] = holder[leaf]
    return states


def _use_saved_modules(model: nn.Module, name: Optional[str]) -> None:
    saved = vars(model).get(SAVED_MODULES, {})
    _install(model, {n: versions.get(name, versions[None]) for n, versions in saved.items()})


def adapter_modules(model: nn.Module, name: Optional[str] = None) -> dict[str, AdapterLinear]:
    """The model's ``AdapterLinear`` modules by name; only those holding adapter ``name`` unless None."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, AdapterLinear) and (name is None or name in m.adapters)}


def _require_adapter(model: nn.Module, name: str) -> dict[str, AdapterLinear]:
    modules = adapter_modules(model, name)
    if not modules:
        have = sorted({a for m in adapter_modules(model).values() for a in m.adapters})
        raise ValueError(f"no adapter named {name!r} in the model; it has {have}")
    return modules


def freeze_base(model: nn.Module) -> None:
    """Semantics: requires_grad = True for every adapter parameter (with the modules and biases a
    PEFT adapter trains: ``modules_to_save``, ``bias``), False for every other one."""
    adapter_ids = {id(p) for m in adapter_modules(model).values() for p in m.adapters.parameters()}
    for versions in vars(model).get(SAVED_MODULES, {}).values():  # installed or not: the adapters' copies train
        for a, state in versions.items():
            for t in state.values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(a is not None)
                    if a is not None:
                        adapter_ids.add(id(t))
    biases = {n for fields in vars(model).get(PEFT_FIELDS, {}).values() for n in fields["biases"]}
    adapter_ids |= {id(p) for n, p in model.named_parameters() if n in biases}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids)


def add_lora(model: nn.Module, name: str, r: int, *, target_modules: TargetModules = None,
             alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False,
             lora_alpha: Optional[float] = None, lora_dropout: Optional[float] = None) -> nn.Module:
    """Patch the selected linear layers as needed and add LoRA adapter ``name`` to each.

    Semantics: each selected layer computes y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ with
    A [r, in] Kaiming-uniform, B [out, r] zeros, scale = alpha/r (alpha/√r with rsLoRA;
    alpha None: alpha = r; ``lora_alpha``/``lora_dropout``: PEFT's spellings). As in PEFT, the
    first adapter of a model becomes active (see :func:`set_adapter`); adding another keeps the
    active one. Only adapter parameters require grad (the whole base model is frozen, as PEFT
    does). Returns ``model``; raises before changing anything if ``name`` is taken on a
    selected layer or the arguments are invalid, and TypeError for a PeftModel or a model
    holding PEFT layers (pointing at ``fuse_peft``).
    """
    refuse_peft_layers(model, "add_lora")
    args = lora_arguments(r, alpha, dropout, use_rslora, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return _add_adapter(model, name, target_modules, lambda layer: layer.add_lora(name, **args))


def add_bottleneck(model: nn.Module, name: str, rank: int, *, target_modules: TargetModules,
                   activation: str = "relu", placement: str = "sequential", scale: float = 1.0) -> nn.Module:
    """Patch the selected linear layers as needed and add bottleneck adapter ``name`` to each.

    Semantics: sequential: y = h + scale·(f(h·Dᵀ + d)·Uᵀ + u) with h = x·Wᵀ + b; parallel:
    y = x·Wᵀ + b + scale·(f(x·Dᵀ + d)·Uᵀ + u). Shapes per layer: D [rank, out] (sequential)
    or [rank, in] (parallel), d [rank], U [out, rank], u [out] (U, u zeros). The first adapter
    of a model becomes active; adding another keeps the active one. Only adapter parameters
    require grad. Returns ``model``.
    """
    args = bottleneck_arguments(rank, activation, placement, scale)
    rank = args.pop("rank")
    return _add_adapter(model, name, target_modules, lambda layer: layer.add_bottleneck(name, rank, **args))


def refuse_peft_layers(model: nn.Module, verb: str) -> None:
    """Raise TypeError if ``model`` is a PeftModel or holds PEFT tuner layers: adaptkern's patch mode
    would wrap PEFT's inner base layers and PEFT's adapters would run beside its own."""
    kind = type(model).__name__
    if type(model).__module__.startswith("peft."):
        raise TypeError(f"{verb}: model is a PEFT {kind}. To keep PEFT and run its LoRA layers on adaptkern's "
                        f"kernels call adaptkern.fuse_peft(model); to use adaptkern's adapters instead, pass a "
                        f"plain transformers model (model.merge_and_unload() or model.unload() gives one; "
                        f"model.get_base_model() still holds PEFT's layers)")
    inner = next((n for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")), None)
    if inner is not None:
        raise TypeError(f"{verb}: {kind} holds PEFT layers ({inner!r} is a {type(model.get_submodule(inner)).__name__}"
                        f"), e.g. the model of a PeftModel's get_base_model(). Call adaptkern.fuse_peft on the "
                        f"PeftModel to run them on adaptkern's kernels, or pass a plain model (PeftModel."
                        f"merge_and_unload() or unload())")


def _add_adapter(model: nn.Module, name: str, target_modules: TargetModules, add) -> nn.Module:
    """Check the targets and a free name (arguments are checked by the caller), then patch the
    targets, ``add(layer)`` on each, keep or set the active adapter, and freeze the base."""
    names = target_module_names(model, target_modules)
    _check_new_adapter(model, names, name)
    before = {n: m.active_adapter for n, m in adapter_modules(model).items()}
    patch(model, names)
    for n in names:
        add(model.get_submodule(n))
    active = {a for a in before.values() if a is not None}
    if active:  # as PEFT: adding keeps the model's active adapter, also on newly adapted layers
        for n, m in adapter_modules(model).items():
            m.set_adapter(before.get(n) or next((a for a in sorted(active) if a in m.adapters), None))
    else:
        set_adapter(model, name)
    freeze_base(model)
    return model


def _check_new_adapter(model: nn.Module, names: list[str], name: str) -> None:
    check.adapter_name(name)
    for n in names:
        module = model.get_submodule(n)
        if isinstance(module, AdapterLinear) and name in module.adapters:
            raise ValueError(f"an adapter named {name!r} already exists on {n!r}")


def set_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Select the model's active adapter.

    Semantics: every AdapterLinear holding ``name`` runs it; every other layer runs its base
    (as PEFT does for modules an adapter does not target); None: base only everywhere. A
    merged layer unmerges first (see :meth:`AdapterLinear.set_adapter`). Raises ValueError if
    no layer has ``name``."""
    holders = _require_adapter(model, name) if name is not None else {}
    for n, m in adapter_modules(model).items():
        m.set_adapter(name if n in holders else None)
    _use_saved_modules(model, name)


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """The Parameters of adapter ``name`` across the model (of every adapter when None), for an optimizer.

    Semantics: per layer holding it, LoRA's ``lora_A [r, in]``, ``lora_B [out, r]`` or a
    bottleneck's ``down_weight``, ``down_bias``, ``up_weight``, ``up_bias``, in module order.
    Raises ValueError if ``name`` is given and no layer has it.
    """
    modules = _require_adapter(model, name) if name is not None else adapter_modules(model)
    if name is None:
        return [p for m in modules.values() for p in m.adapters.parameters()]
    return [p for m in modules.values() for p in m.adapters[name].parameters()]


def _plain_layer(layer: AdapterLinear) -> nn.Module:
    """An ``nn.Linear`` (a ``Conv1D`` for a :class:`Conv1DAdapter`) holding ``layer``'s own weight and bias."""
    plain = Conv1D.__new__(Conv1D) if isinstance(layer, Conv1DAdapter) else nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(plain)
    if isinstance(layer, Conv1DAdapter):
        plain.nf, plain.nx = layer.out_features, layer.in_features
    else:
        plain.in_features, plain.out_features = layer.in_features, layer.out_features
    plain.register_parameter("weight", layer._parameters["weight"])
    plain.register_parameter("bias", layer.bias)
    plain.train(layer.training)
    return plain


def _merged_weight(w: Tensor, adapter: nn.Module) -> Tensor:
    """W + scale·B·A (DoRA: times m / ‖W + scale·B·A‖_row, row-wise), computed in ≥ float32, in W's dtype."""
    acc = torch.promote_types(w.dtype, torch.float32)
    merged = w.to(acc) + adapter.delta_weight(acc)
    if adapter.kind == "dora":
        norm = dora_weight_norm(w.to(acc), adapter.lora_A.detach().to(acc), adapter.lora_B.detach().to(acc),
                                scale=adapter.scale)
        merged = (adapter.lora_magnitude_vector.detach().to(acc) / norm.to(acc)).unsqueeze(1) * merged
    return merged.to(w.dtype)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold each layer's active LoRA adapter into its weight and put plain layers back, in place.

    Semantics: every ``AdapterLinear`` becomes the ``nn.Linear`` (``Conv1D``) it was, holding its
    own weight and bias Parameters with W ← W + scale·B·A of the layer's active LoRA adapter
    (see :meth:`AdapterLinear.merge`; a layer with none active keeps W); every adapter is
    dropped, so outputs equal the merged model's and the state dict is the base model's (modules
    a PEFT adapter saved whole keep the active adapter's version, as PEFT's merge_and_unload).
    A DoRA adapter merges as PEFT merges it: W ← (m / ‖W + scale·B·A‖_row) ⊙ (W + scale·B·A).
    Returns ``model``. Raises, before changing anything, ValueError if a layer's active adapter
    is a bottleneck (it cannot be folded into W) or if a merge would give NaN or Inf, and
    NotImplementedError for a layer over a 4-bit (bitsandbytes) weight.
    """
    layers = adapter_modules(model)
    merges = {}
    for n, m in layers.items():
        active = m.active_adapter
        if getattr(m.weight, "quant_state", None) is not None:
            raise NotImplementedError(f"{n!r} holds a 4-bit weight: merge_and_unload cannot fold an adapter into "
                                      f"it or give back its Linear4bit; save the adapter with save_peft instead")
        if active is not None and m.adapters[active].kind not in ("lora", "dora"):
            raise ValueError(f"{n!r}: active adapter {active!r} is a {m.adapters[active].kind} adapter, which "
                             f"cannot be merged into the weight; set_adapter(model, None) to drop it")
        if active is not None and active != m.merged_adapter:  # as AdapterLinear.merge: in >= float32
            merges[n] = _merged_weight(m.weight.detach(), m.adapters[active])
            if not bool(torch.isfinite(merges[n]).all()):
                raise ValueError(f"{n!r}: merging adapter {active!r} gives NaN or Inf in {m.weight.dtype}; "
                                 f"nothing changed")
    for n, m in layers.items():
        if n in merges:
            with torch.no_grad():
                m.weight.copy_(merges[n].detach())
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain_layer(m))
    for attr in (SAVED_MODULES, PEFT_FIELDS, "save_pretrained"):  # saved modules keep the active version
        vars(model).pop(attr, None)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every ``AdapterLinear`` of ``model`` runs its base alone; the active
    adapters come back after it.

    Semantics: as PEFT's ``disable_adapter()``: y = x·Wᵀ + b everywhere; a merged layer
    unmerges first (with a warning) and stays unmerged, its adapter active, afterwards. Modules
    an adapter saved whole (PEFT's ``modules_to_save``) are the model's own within the block.
    """
    layers = adapter_modules(model)
    active = {n: m.active_adapter for n, m in layers.items()}
    installed = _installed(model)
    for m in layers.values():
        m.set_adapter(None)
    _use_saved_modules(model, None)
    try:
        yield model
    finally:
        for n, m in layers.items():
            m.set_adapter(active[n])
        _install(model, installed)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (its Parameters and state dict keys) from every layer holding it.

    Semantics: as PEFT: if it was the active adapter, the first remaining adapter of the model
    (in layer order) becomes active where layers hold it, the base elsewhere; base only if none
    remains. Raises ValueError, before changing anything, if no layer has ``name`` or a layer
    has it merged into its weight.
    """
    holders = _require_adapter(model, name)
    merged = [n for n, m in holders.items() if m.merged_adapter == name]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into the weight of {merged[:3]}; unmerge() first")
    was_active = any(m.active_adapter == name for m in holders.values())
    for m in holders.values():
        m.delete_adapter(name)
    peft_fields(model).pop(name, None)
    saved = saved_modules(model)
    for module_name, versions in list(saved.items()):
        versions.pop(name, None)
        if len(versions) == 1:
            _install(model, {module_name: versions[None]})
            del saved[module_name]
    if was_active:
        remaining = [a for m in adapter_modules(model).values() for a in m.adapters]
        set_adapter(model, remaining[0] if remaining else None)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line, returned:
    "trainable params: T || all params: A || trainable%: 100·T/A" (shared Parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
