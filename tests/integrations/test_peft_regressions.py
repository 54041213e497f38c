"""PEFT integration edge cases that once went wrong, checked against the real ``peft`` package.

Base-changing initialisations: adapters initialised with PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ fit a base
weight PEFT changed; ``load_peft`` must refuse them (before touching the model) and load them once PEFT
converted them into plain LoRA.
The spent wrapper: after ``from_peft_model`` the PeftModel wrapper no longer sees its LoRA layers: saving or
merging through it must raise, never write an empty adapter or merge nothing.
"""

import copy
import importlib.metadata
import os
import re

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import load_file

from adaptkern import AdapterLinear
from adaptkern.integrations import from_peft_model, load_peft, save_peft

from adaptkern.testing import assert_close

from ..models import (assert_unchanged, edit_peft_config, model_inputs, outputs_match_peft, randomize_lora_b, snapshot,
                      tiny_llama_seeded)

pytestmark = [
    # transformers 5 renames gradient_checkpointing_* (PEFT still calls the old names)
    pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning"),
    # PEFT's notes on the configs these tests build on purpose
    pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva' but `eva_config` is not specified:UserWarning"),
    pytest.mark.filterwarnings("ignore:.* changes the base weights of the model:UserWarning"),
]

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_reference_is_the_installed_peft():
    """Every comparison here is against the pip-installed package, not a stand-in shadowing it."""
    dist = importlib.metadata.distribution("peft")
    assert os.path.samefile(dist.locate_file("peft/__init__.py"), peft.__file__) and dist.version == peft.__version__
    assert LoraLinear.__module__ == "peft.tuners.lora.layer" and hasattr(LoraLinear, "pissa_init")


def _perturb_lora(pm, seed=5, std=0.05):
    """Stand-in for training: move every LoRA weight away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


# -- base-changing initialisations -----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_unconverted_base_changing_adapter_raises_before_touching_model(init, tmp_path):
    base = tiny_llama_seeded()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        init_lora_weights=init))
    _perturb_lora(pm)
    pm.save_pretrained(tmp_path)
    # why it must be refused: PEFT itself rewrites the base weight when it loads this adapter
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    q = ref.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q) is LoraLinear and not torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)

    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(NotImplementedError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conv"):
        load_peft(model, str(tmp_path))
    assert_unchanged(model, snap)



@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_from_peft_model_refuses_a_live_base_rewriting_adapter(init):
    """A live PiSSA/OLoRA PeftModel holds the rewritten base: converting it would let save_peft
    write an adapter that is silently wrong on the original base, so it is refused, untouched."""
    pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         init_lora_weights=init))
    snap = snapshot(pm)
    with pytest.raises(NotImplementedError, match=rf"init_lora_weights='{init}'.*rewrote the base weight"):
        from_peft_model(pm)
    assert_unchanged(pm, snap)
    assert type(pm.get_base_model().model.layers[0].self_attn.q_proj) is LoraLinear

@pytest.fixture
def plain_adapter(tmp_path):
    """(base, directory of a plain PEFT LoRA adapter with non-zero B)."""
    base = tiny_llama_seeded()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora_b(pm)
    pm.save_pretrained(tmp_path)
    return base, tmp_path


@pytest.mark.parametrize("init", ["corda", "corda_v2", "loftq", "lora_ga", "pissa_niter_4", "OLoRA", "PiSSA",
                                  "some_future_init", 1, ["pissa"]])
def test_config_init_that_changes_the_base_raises(init, plain_adapter):
    base, path = plain_adapter
    edit_peft_config(path, init_lora_weights=init)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(NotImplementedError, match=re.escape(f"init_lora_weights={init!r} ")):
        load_peft(model, str(path))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("init", [True, False, None, "gaussian", "eva", "orthogonal", "mica"])
def test_config_init_that_keeps_the_base_loads_like_peft(init, plain_adapter):
    base, path = plain_adapter
    edit_peft_config(path, init_lora_weights=init)
    ref = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    assert torch.equal(ref.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                       base.model.layers[0].self_attn.q_proj.weight)
    outputs_match_peft(ref, load_peft(copy.deepcopy(base), str(path)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_loads_and_matches_peft_and_training(init, tmp_path):
    base = tiny_llama_seeded()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        init_lora_weights=init)).eval()
    pm.save_pretrained(tmp_path / "initial")
    _perturb_lora(pm)
    inputs = model_inputs("llama")
    with torch.no_grad():
        trained = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    ours = load_peft(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdapterLinear) and q.adapters["default"].r == 8  # [A | A0], [B | -B0]
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert ref.peft_config["default"].init_lora_weights is True
    outputs_match_peft(ref, ours)
    with torch.no_grad():  # on the original base it computes what the trained PiSSA / OLoRA model computed
        torch.testing.assert_close(ours(**inputs).logits, trained, atol=1e-5, rtol=0)


# -- the spent PeftModel wrapper after from_peft_model ----------------------------------------------------------


def _disabled_forward(pm, inputs):
    with pm.disable_adapter():
        return pm(**inputs)


# every way a user reaches PEFT through the old wrapper; each must raise RuntimeError naming save_peft
SPENT_CALLS = {
    "save_pretrained": lambda pm, path, inputs: pm.save_pretrained(path),
    "get_peft_model_state_dict": lambda pm, path, inputs: get_peft_model_state_dict(pm),
    "merge_and_unload": lambda pm, path, inputs: pm.merge_and_unload(),
    "base_model.merge_and_unload": lambda pm, path, inputs: pm.base_model.merge_and_unload(),
    "merge_adapter": lambda pm, path, inputs: pm.merge_adapter(),
    "unmerge_adapter": lambda pm, path, inputs: pm.unmerge_adapter(),
    "unload": lambda pm, path, inputs: pm.unload(),
    "set_adapter": lambda pm, path, inputs: pm.set_adapter("default"),
    "disable_adapter": lambda pm, path, inputs: _disabled_forward(pm, inputs),
    "forward": lambda pm, path, inputs: pm(**inputs),
    "generate": lambda pm, path, inputs: pm.generate(input_ids=inputs["input_ids"], max_new_tokens=2),
}


@pytest.fixture
def spent():
    """(base, PeftModel after from_peft_model, converted model, inputs, PEFT fp32 and fp64 logits before)."""
    base = tiny_llama_seeded()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    randomize_lora_b(pm)
    inputs = model_inputs("llama")
    with torch.no_grad():
        before, before64 = pm(**inputs).logits, copy.deepcopy(pm).double()(**inputs).logits.double()
    return base, pm, from_peft_model(pm), inputs, before, before64


@pytest.mark.parametrize("call", list(SPENT_CALLS))
def test_spent_peft_wrapper_raises_and_changes_nothing(call, spent, tmp_path):
    _, pm, model, inputs, before, before64 = spent
    with pytest.raises(RuntimeError, match="from_peft_model.*save_peft"):
        SPENT_CALLS[call](pm, tmp_path, inputs)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with torch.no_grad():  # nothing merged, unloaded or disabled
        assert_close("logits", before64, model(**inputs).logits, before)


def test_save_peft_after_from_peft_model_keeps_the_training(spent, tmp_path):
    base, pm, model, inputs, before, _ = spent
    assert pm.get_base_model() is model and not hasattr(model, "peft_config")
    save_peft(model, str(tmp_path))
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 2 * len(TARGETS) * 2  # A and B, 2 layers
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert sum(type(m) is LoraLinear for m in ref.modules()) == len(TARGETS) * 2
    with torch.no_grad():
        assert torch.equal(ref(**inputs).logits, before)


# -- PEFT's own config parsing and target matching where peft imports; the fallback agrees -------------------

FEATURES = {
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(target_modules=["k_proj", "down_proj"], layers_to_transform=0, layers_pattern=["layers"]),
    "regex": dict(target_modules=r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.gate_proj)"),
    "exclude and patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                 exclude_modules=["model.layers.0.self_attn.q_proj"],
                                 rank_pattern={r"layers\.1\.mlp\..*": 6}, alpha_pattern={"v_proj": 3}),
    "all-linear": dict(target_modules="all-linear"),
    "modules_to_save": dict(target_modules="all-linear", modules_to_save=["down_proj"]),  # saved whole, no LoRA
}


def _hide_peft(monkeypatch):
    """Make every ``import peft...`` raise ImportError, as on a machine without peft."""
    import sys

    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)


def _layers(model):
    return {n: (m.adapters["default"].r, m.adapters["default"].scale, m.adapters["default"].lora_A)
            for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


@pytest.mark.parametrize("case", list(FEATURES))
def test_peft_matcher_is_used_and_the_fallback_agrees(case, tmp_path, monkeypatch):
    """With peft, load_peft asks PEFT's LoraConfig.from_pretrained, check_target_module_exists and
    load_peft_weights; with peft hidden, the fallback selects the same layers with the same ranks,
    scales and tensors, and both equal PEFT's model."""
    from peft.tuners import tuners_utils
    from peft.utils import save_and_load

    pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=4, lora_alpha=8, **FEATURES[case]))
    randomize_lora_b(pm)
    with torch.no_grad():  # the copies PEFT saves whole, moved off the base's values
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.05)
    pm.save_pretrained(tmp_path)
    calls = []
    for module, fn in ((tuners_utils, "check_target_module_exists"), (save_and_load, "load_peft_weights"),
                       (peft.LoraConfig, "from_pretrained")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _fn=fn, **k: (calls.append(_fn), _real(*a, **k))[1])
    monkeypatch.setattr(peft.utils, "load_peft_weights", save_and_load.load_peft_weights)
    with_peft = load_peft(tiny_llama_seeded(), str(tmp_path))
    assert {"check_target_module_exists", "load_peft_weights", "from_pretrained"} <= set(calls)
    peft_layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    layers = _layers(with_peft)
    assert set(layers) == set(peft_layers)
    assert all((r, s) == (peft_layers[n].r["default"], peft_layers[n].scaling["default"])
               for n, (r, s, _) in layers.items())
    outputs_match_peft(pm, with_peft)

    _hide_peft(monkeypatch)
    without = _layers(load_peft(tiny_llama_seeded(), str(tmp_path)))
    assert set(without) == set(layers)
    assert all(without[n][:2] == layers[n][:2] and torch.equal(without[n][2], layers[n][2]) for n in layers)
    save_peft(with_peft, str(tmp_path / "fallback"))  # config written without peft's LoraConfig
    assert set(_layers(load_peft(tiny_llama_seeded(), str(tmp_path / "fallback")))) == set(layers)
