"""add_bottleneck(model, name, config=...): AdapterHub's placement, defaults and initialisation for training
from scratch, against what the real ``adapters`` 1.3 library does (tests/fixtures/adapterhub/init,
written by ``generate_init.py``: the adapter_config.json ``save_adapter`` writes after
``model.add_adapter(name, config=AdapterConfig.load(config, **overrides))``, and per saved tensor
its shape and statistics, on hidden-256 BERT and Llama models).

Placement and defaults are compared exactly (the saved config and the saved keys and shapes);
initial values are random on both sides, so their distributions are compared: zeros exactly,
standard deviations within 6% (pooled samples of ≥ 8192 values: the sampling error of either
side is ≤ 1.6%), Kaiming-uniform draws inside ±1/√H.
"""

import copy
import json
import math
import os

import pytest
import torch
from transformers import BertConfig, BertModel, GPTNeoXConfig, GPTNeoXModel, LlamaConfig, LlamaForCausalLM

from adaptkern.integrations.adapterhub_save import save_adapterhub
from adaptkern.integrations.bottleneck_config import add_bottleneck
from adaptkern.integrations.fused_bottleneck import fused_modules, set_fused_adapter
from adaptkern.integrations.patching import adapter_modules
from adaptkern.testing import assert_close

from ..helpers import count_launches
from ..models import assert_unchanged, build, model_inputs, snapshot

INIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "adapterhub", "init")
LIBRARY = [(family, case[:-5]) for family in ("bert", "llama")
           for case in sorted(os.listdir(os.path.join(INIT, family)))]
CLASSES = {"bert": (BertConfig, BertModel), "llama": (LlamaConfig, LlamaForCausalLM)}


def record(family, case):
    with open(os.path.join(INIT, family, f"{case}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("family,case", LIBRARY, ids=[f"{f}-{c}" for f, c in LIBRARY])
def test_placement_defaults_and_init_match_the_library(tmp_path, family, case):
    rec = record(family, case)
    config_cls, model_cls = CLASSES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**rec["model_config"]))
    add_bottleneck(model, case, rec["config"], **rec["overrides"])
    save_adapterhub(model, tmp_path, case)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved == rec["adapter_config"]  # every BnConfig field (defaults included), name, model fields
    state = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    assert {k: list(v.shape) for k, v in state.items()} == {k: s["shape"] for k, s in rec["tensors"].items()}

    hidden = rec["model_config"]["hidden_size"]
    for kind, theirs in rec["pooled"].items():
        ours = torch.cat([v.flatten() for k, v in state.items() if k.endswith(f".{case}.{kind}")]).double()
        assert bool((ours == 0).all()) == theirs["zero"], kind
        if kind == "scaling":
            assert bool((ours == 1).all()) and theirs["mean"] == 1.0 and theirs["std"] == 0.0
        elif not theirs["zero"]:
            assert abs(ours.std().item() / theirs["std"] - 1) < 0.06, (kind, ours.std().item(), theirs["std"])
            assert abs(ours.mean().item()) < 5 * theirs["std"] / math.sqrt(ours.numel()), kind
            if saved["config"]["init_weights"] == "mam_adapter":  # Kaiming-uniform(a=√5): U(±1/√fan_in)
                assert ours.abs().max().item() <= 1 / math.sqrt(hidden) and theirs["absmax"] <= 1 / math.sqrt(hidden)


def _holders(model, name):
    return {**adapter_modules(model, name), **fused_modules(model, name)}


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_step_reaches_only_the_adapter(arch, config):
    """A training step: the fused kernels run forward and backward, gradients reach the new adapter's
    parameters and nothing else, and an optimizer step leaves the base model as it was. ``par_bn``'s
    up-projection starts at zero, so the model starts at its base output; ``seq_bn``'s does not."""
    model = build(arch)
    inputs = model_inputs(arch)
    with torch.no_grad():
        base = model(**inputs).logits
        base64 = copy.deepcopy(model).double()(**inputs).logits
    torch.manual_seed(0)
    add_bottleneck(model, "a", config)
    holders = _holders(model, "a")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    model.train()
    with count_launches() as launches:
        out = model(**inputs).logits
        out.square().mean().backward()
    if config == "double_seq_bn" and arch == "llama":
        assert sorted(holders) == sorted(adapter_modules(model, "a")) and sum(launches.values()) >= len(holders)
    else:
        assert sorted(holders) == sorted(fused_modules(model, "a"))
        assert launches["_bottleneck_norm_fwd_kernel"] == launches["_bottleneck_norm_bwd_kernel"] == len(holders)
    if config.endswith("par_bn"):
        assert_close(f"{arch} {config} at init vs the base model", base64, out.detach(), base)
    else:  # N(0, 0.02) up-projections: the adapter acts from the start
        assert all(m.adapters["a"].up_weight.abs().min() > 0 for m in holders.values())
    for n, p in model.named_parameters():
        assert p.requires_grad == (".adapters.a." in n), n
        assert (p.grad is not None) == p.requires_grad, n
    grads = {n.rsplit(".", 1)[1]: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["up_weight"].abs().sum() > 0 and grads["up_bias"].abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_second_adapter_becomes_active_and_switching_back_is_exact():
    model = build("bert")
    inputs = model_inputs("bert")
    torch.manual_seed(0)
    add_bottleneck(model, "a", "seq_bn")
    with torch.no_grad():
        only_a = model(**inputs).logits
    add_bottleneck(model, "b", "par_bn", reduction_factor=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters.b.up_weight" in n:
                p.normal_(0, 0.3)
        with_b = model(**inputs).logits
        set_fused_adapter(model, "a")
        back_to_a = model(**inputs).logits
    assert {m.active_adapter for m in fused_modules(model).values()} == {"a"}
    assert torch.equal(back_to_a, only_a) and (with_b - only_a).abs().max().item() > 1e-3
    assert sorted(model.adapterhub_configs) == ["a", "b"]


def test_per_linear_form_delegates_unchanged():
    model = build("llama")
    add_bottleneck(model, "x", 4, target_modules=["o_proj"])
    holders = adapter_modules(model, "x")
    assert sorted(holders) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    a = holders["model.layers.0.self_attn.o_proj"].adapters["x"]
    assert (a.down_weight.shape[0], a.placement, a.activation, a.scale) == (4, "sequential", "relu", 1.0)
    assert not hasattr(model, "adapterhub_configs")
    model = build("llama")
    add_bottleneck(model, "y", rank=2, target_modules=["down_proj"], activation="gelu", placement="parallel",
                   scale=2.0)
    a = adapter_modules(model, "y")["model.layers.1.mlp.down_proj"].adapters["y"]
    assert (a.down_weight.shape, a.placement, a.activation, a.scale) == ((2, 64), "parallel", "gelu", 2.0)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((4,), dict(reduction_factor=2, target_modules=["o_proj"]), TypeError, "cannot be mixed"),
    (("seq_bn",), dict(rank=4), TypeError, "cannot be mixed"),
    ((), dict(target_modules=["o_proj"]), TypeError, "needs rank"),
    ((4,), dict(rank=4, target_modules=["o_proj"]), TypeError, "rank twice"),
    (("lora",), {}, ValueError, "choose one of"),
    ((3.5,), {}, TypeError, "config must be"),
    (("seq_bn",), dict(bogus=1), TypeError, r"unknown AdapterHub BnConfig fields \['bogus'\]"),
    (("seq_bn",), dict(ln_after=True), NotImplementedError, "ln_after"),
    (("seq_bn",), dict(dropout=0.1), NotImplementedError, "dropout"),
    (("seq_bn",), dict(non_linearity="tanh"), NotImplementedError, "non_linearity"),
    (("seq_bn",), dict(residual_before_ln="post_add"), NotImplementedError, "residual_before_ln"),
    (("seq_bn",), dict(reduction_factor=-1), ValueError, "reduction_factor must be > 0"),
    (("par_bn",), dict(init_weights="xavier"), ValueError, "init_weights='xavier'"),
    (("par_bn",), dict(init_weights_seed="1"), ValueError, "init_weights_seed"),
    (({"reduction_factor": 4},), {}, ValueError, "needs the fields"),
], ids=["mixed-rank", "mixed-config", "no-rank", "rank-twice", "unknown-config", "config-type", "unknown-field",
        "ln_after", "dropout", "activation", "post_add", "rf", "init", "seed", "partial-dict"])
def test_bad_input_raises_and_leaves_the_model_alone(args, kwargs, error, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        add_bottleneck(model, "a", *args, **kwargs)
    assert_unchanged(model, snap)


def test_unsupported_architecture_and_taken_name():
    neox = GPTNeoXModel(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=16))
    snap = snapshot(neox)
    with pytest.raises(NotImplementedError, match=r"model_type 'gpt_neox'.*'gpt2'"):
        add_bottleneck(neox, "a", "par_bn")
    assert_unchanged(neox, snap)
    model = build("bert")
    add_bottleneck(model, "a", "seq_bn")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="an adapter named 'a' already exists on 'bert.encoder.layer.0.output'"):
        add_bottleneck(model, "a", "par_bn")
    assert_unchanged(model, snap)


def test_seeded_init_is_reproducible_and_bf16_models_get_bf16_adapters():
    a, b = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    for m in (a, b):
        add_bottleneck(m, "s", "double_seq_bn", init_weights_seed=7)
    sa = {k: v for k, v in a.state_dict().items() if ".adapters.s." in k}
    sb = {k: v for k, v in b.state_dict().items() if ".adapters.s." in k}
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == torch.bfloat16 for k in sa)
