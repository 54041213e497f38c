"""Model patching: which modules are replaced, what is shared, Conv1D, adapters at model level."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptkern import AdapterLinear
from adaptkern.integrations import (Conv1DAdapter, adapter_parameters, add_bottleneck, add_lora, patch, set_adapter,
                                    target_module_names)

from adaptkern.integrations.patching import adapter_modules
from adaptkern.testing import assert_close

from ..models import build, model_inputs, tiny_llama

LLAMA_LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]


def adapter_layer_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLinear))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_patch_shares_parameters_and_keeps_outputs(arch):
    model = build(arch)
    next(m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))).weight.requires_grad_(False)
    inputs = model_inputs(arch)
    with torch.no_grad():
        before = model(**inputs).logits
        oracle = copy.deepcopy(model).double()(**inputs).logits.double()
    params = [(n, id(p)) for n, p in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert patch(model) is model
    assert [(n, id(p)) for n, p in model.named_parameters()] == params  # same names, same Parameter objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    head = model.get_output_embeddings()
    assert not isinstance(head, AdapterLinear)
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    assert adapter_layer_names(model) == sorted(linears) and linears
    if arch == "gpt2":
        assert all(isinstance(m, Conv1DAdapter) for n, m in model.named_modules() if n in linears)
    with torch.no_grad():
        after = model(**inputs).logits
    assert_close("logits", oracle, after, before)


@pytest.mark.parametrize("targets, expected", [
    (["q_proj"], [n for n in LLAMA_LINEARS if n.endswith("q_proj")]),
    (["mlp.up_proj", "model.layers.0.self_attn.o_proj"],
     ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj"]),
    (r"model\.layers\.1\..*_proj", [n for n in LLAMA_LINEARS if n.startswith("model.layers.1.")]),
    ("all-linear", LLAMA_LINEARS),
    (None, LLAMA_LINEARS),
    (["lm_head"], ["lm_head"]),
], ids=["suffix", "suffix-and-exact", "regex", "all-linear", "none", "head"])
def test_target_selection_follows_peft(targets, expected):
    model = tiny_llama()
    assert sorted(target_module_names(model, targets)) == sorted(expected)
    patch(model, targets)
    assert adapter_layer_names(model) == sorted(expected)


def test_target_errors_and_head_fallback():
    model = tiny_llama()
    for targets in (["proj"], "q_proj", ["embed_tokens"]):  # suffixes end at a '.', regexes match the full name
        with pytest.raises(ValueError, match="matches no nn.Linear"):
            patch(model, targets)
    with pytest.raises(ValueError, match="not a valid regex"):
        patch(model, "(")
    for bad in (3, [1], {"q_proj": 1}):
        with pytest.raises(TypeError, match="target_modules"):
            patch(model, bad)
    assert adapter_layer_names(model) == []
    plain = nn.Sequential()
    plain.add_module("body", nn.Linear(4, 4))
    plain.add_module("classifier", nn.Linear(4, 2))  # no get_output_embeddings(): excluded by name
    assert adapter_layer_names(patch(plain)) == ["body"]


def test_patch_is_idempotent_and_keeps_adapters():
    model = add_lora(tiny_llama(), "a", r=2, target_modules=["q_proj"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    patch(model)
    patch(model, ["q_proj"])
    assert all(model.get_submodule(n) is m and "a" in m.adapters for n, m in layers.items())
    assert len(adapter_layer_names(model)) == len(LLAMA_LINEARS)


def test_tied_head_stays_tied_when_patched():
    model = build("gpt2")
    patch(model, ["lm_head"])
    assert isinstance(model.lm_head, AdapterLinear) and model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(list(build("gpt2").parameters()))


def test_conv1d_adapter_keeps_layout_and_gradients():
    torch.manual_seed(0)
    conv = Conv1D(12, 7)
    ref = copy.deepcopy(conv).double()
    m = Conv1DAdapter.from_conv1d(conv)
    assert m._parameters["weight"] is conv.weight and m.bias is conv.bias and isinstance(m, nn.Linear)
    assert (m.in_features, m.out_features) == (7, 12) and m.weight.shape == (12, 7)
    assert m.weight.data_ptr() == conv.weight.data_ptr() and list(m.state_dict()) == ["weight", "bias"]
    assert m.state_dict()["weight"].shape == (7, 12)
    x = torch.randn(3, 5, 7)
    y = m(x)
    y64 = ref(x.double())
    assert_close("y", y64.detach(), y.detach(), conv(x).detach())
    ad = m.add_lora("a", r=3, alpha=6)
    nn.init.normal_(ad.lora_B, std=0.2)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    a64, b64 = (t.detach().double().requires_grad_() for t in (ad.lora_A, ad.lora_B))
    ref.weight.grad = None
    y64 = ref(x.double()) + 2.0 * (x.double() @ a64.t()) @ b64.t()
    y64.backward(g.double())
    assert_close("y lora", y64.detach(), y.detach())
    assert conv.weight.grad.shape == (7, 12)  # base trainable here: its gradient keeps Conv1D's layout
    for name, got, want in (("dW", conv.weight.grad, ref.weight.grad), ("dA", ad.lora_A.grad, a64.grad),
                            ("dB", ad.lora_B.grad, b64.grad)):
        assert_close(name, want, got)
    with torch.no_grad():
        unmerged = m(x)
        m.merge("a")
        assert_close("merged W", ref.weight.t() + 2.0 * b64.detach() @ a64.detach(), conv.weight.t().detach())
        assert_close("y merged", unmerged.double(), m(x))  # merge made "a" the active adapter
        m.unmerge()
    m.load_state_dict({"weight": ref.weight.float().detach(), "bias": ref.bias.float().detach(),
                       "adapters.a.lora_A": ad.lora_A.detach(), "adapters.a.lora_B": ad.lora_B.detach()})
    assert torch.equal(conv.weight, ref.weight.float())
    with pytest.raises(TypeError, match="Conv1D"):
        Conv1DAdapter.from_conv1d(nn.Linear(3, 3))


def test_add_lora_freezes_base_and_lists_adapter_parameters():
    model = tiny_llama()
    ids = model_inputs("llama")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    add_lora(model, "a", r=4, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", r=2, alpha=4, target_modules=["v_proj"], use_rslora=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model)}
    assert len(adapter_parameters(model, "a")) == 8 and len(adapter_parameters(model, "b")) == 4
    assert len(trainable) == 12
    v = model.model.layers[0].self_attn.v_proj
    assert v.active_adapter == "a"  # adding "b" keeps "a" active (as PEFT)
    assert v.adapters["b"].scale == 4 / 2 ** 0.5
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # fresh B = 0
        set_adapter(model, "b")
        assert v.active_adapter == "b" and model.model.layers[0].self_attn.q_proj.active_adapter is None
        set_adapter(model, "a")
        assert model.model.layers[1].self_attn.q_proj.active_adapter == "a" and v.active_adapter == "a"
    with pytest.raises(ValueError, match="no adapter named 'c'.*'a', 'b'"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="no adapter named"):
        adapter_parameters(model, "c")


def test_add_adapter_errors_leave_model_unchanged():
    model = add_lora(tiny_llama(), "a", r=2, target_modules=["q_proj"])
    types = [type(m) for m in model.modules()]
    for call, match in ((lambda: add_lora(model, "a", r=2, target_modules=["q_proj", "k_proj"]), "already exists"),
                        (lambda: add_lora(model, "x", r=0), "r must be"),
                        (lambda: add_lora(model, "x.y", r=2), "adapter name"),
                        (lambda: add_lora(model, "x", r=2, dropout=1.0), "dropout"),
                        (lambda: add_bottleneck(model, "x", 4, target_modules=None, activation="tanhh"), "activation"),
                        (lambda: add_bottleneck(model, "x", 4, target_modules=None, placement="inside"), "placement")):
        with pytest.raises(ValueError, match=match):
            call()
        assert [type(m) for m in model.modules()] == types


def test_bottleneck_and_lora_switching():
    model = tiny_llama()
    ids = model_inputs("llama")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    add_bottleneck(model, "bn", 8, target_modules=["down_proj"], activation="gelu", placement="parallel", scale=0.5)
    add_lora(model, "lora", r=2, target_modules=["q_proj"])
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter_parameters(model)}
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0.0, 0.2)
        outs = {}
        for name in ("bn", "lora", None):
            set_adapter(model, name)
            outs[name] = model(ids).logits
    assert torch.equal(outs[None], base)
    assert not torch.allclose(outs["bn"], base) and not torch.allclose(outs["lora"], base)
    assert not torch.allclose(outs["bn"], outs["lora"])


def test_adding_a_second_adapter_keeps_the_active_one_everywhere():
    """As PEFT's add_adapter: the first adapter becomes active; a second one, on other
    layers too, changes nothing until set_adapter selects it."""
    model = build()
    add_lora(model, "a", r=2, target_modules=["q_proj"])
    inputs = model_inputs("llama")
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.adapters["a"].lora_B.normal_()
        y_a = model(**inputs).logits
    add_lora(model, "b", r=2, target_modules=["q_proj", "v_proj"])
    active = {n: m.active_adapter for n, m in adapter_modules(model).items()}
    assert {v for n, v in active.items() if "q_proj" in n} == {"a"}
    assert {v for n, v in active.items() if "v_proj" in n} == {None}
    with torch.no_grad():
        for m in adapter_modules(model, "b").values():
            m.adapters["b"].lora_B.normal_()
        assert torch.equal(model(**inputs).logits, y_a)
    set_adapter(model, "b")
    assert {m.active_adapter for m in adapter_modules(model).values()} == {"b"}


# -- model-level verbs PEFT users expect ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_gives_the_plain_merged_model(arch):
    from adaptkern.integrations.patching import merge_and_unload

    from ..models import randomize_lora_b

    base = build(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "down_proj"]
    model = add_lora(copy.deepcopy(base), "a", r=4, alpha=8, target_modules=targets)
    randomize_lora_b(model)
    inputs = model_inputs(arch)
    with torch.no_grad():
        want = model(**inputs).logits
        want64 = copy.deepcopy(model).double()(**inputs).logits
        plain = merge_and_unload(model)
        got = plain(**inputs).logits
    assert plain is model and not adapter_modules(plain)
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert list(plain.state_dict()) == list(base.state_dict())
    assert_close("merged logits", want64, got, want)


def test_merge_and_unload_refuses_bottleneck_unchanged():
    from adaptkern.integrations.patching import merge_and_unload

    model = add_lora(tiny_llama(), "a", r=2, target_modules=["q_proj"])
    add_bottleneck(model, "bn", 4, target_modules=["v_proj"])
    set_adapter(model, "bn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="bottleneck adapter, which cannot be merged"):
        merge_and_unload(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and adapter_modules(model)


def test_disable_delete_and_trainable_summary():
    from peft import LoraConfig, get_peft_model

    from adaptkern.integrations.patching import delete_adapter, disable_adapters, trainable_summary

    from ..models import randomize_lora_b

    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = add_lora(copy.deepcopy(base), "a", r=4, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["v_proj", "up_proj"])
    randomize_lora_b(model)
    assert {m.active_adapter for m in adapter_modules(model).values()} == {"a", None}  # adding kept "a" active
    inputs = model_inputs("llama")
    with torch.no_grad():
        adapted = model(**inputs).logits
        with disable_adapters(model):
            assert torch.equal(model(**inputs).logits, base(**inputs).logits)
        assert torch.equal(model(**inputs).logits, adapted)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "up_proj"]))
    for n, p in pm.named_parameters():
        p.requires_grad_(".a." in n or "lora_" in n)
    peft_trainable, peft_total = pm.get_nb_trainable_parameters()
    assert trainable_summary(model) == (f"trainable params: {peft_trainable:,d} || all params: {peft_total:,d} || "
                                        f"trainable%: {100 * peft_trainable / peft_total:.4f}")
    delete_adapter(model, "a")
    assert {m.active_adapter for m in adapter_modules(model).values()} == {"b", None}
    assert not any(".adapters.a." in k for k in model.state_dict())
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        delete_adapter(model, "a")


def test_peft_models_are_refused_with_a_pointer_to_fuse_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    from adaptkern.integrations import load_peft

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    types = [type(m) for m in pm.modules()]
    for model in (pm, pm.get_base_model()):
        with pytest.raises(TypeError, match="fuse_peft"):
            add_lora(model, "x", r=2, target_modules=["k_proj"])
        with pytest.raises(TypeError, match="fuse_peft"):
            load_peft(model, str(tmp_path), adapter_name="x")
    assert [type(m) for m in pm.modules()] == types
