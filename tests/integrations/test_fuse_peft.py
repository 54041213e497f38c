"""fuse_peft: a live PeftModel runs its LoRA layers on adaptkern's kernels, against the real ``peft`` package.

Every comparison is fused PEFT (float32) against PEFT itself in float64 (the oracle), with unfused
PEFT in float32 as the eager error (``adaptkern.testing.assert_close``), and counts the Triton
launches so that a silent fallback to PEFT's forward cannot pass.
"""

import copy
import logging
import pickle

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from adaptkern.functional import lora_linear
from adaptkern.integrations.peft_fuse import FusedForward, fuse_peft, fused_layer_names, unfuse_peft
from adaptkern.testing import assert_close

from ..helpers import count_launches
from ..models import ARCHS, assert_unchanged, model_inputs, randomize_lora_b, snapshot, tiny_llama_seeded

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")

FORWARD_KERNELS = ("_adapter_linear_onepass_kernel", "_adapter_linear_split_kernel")
MIXED_KERNEL = "_mixed_adapter_linear_kernel"


def make_peft(arch="llama", seed=0, name="default", **lora_kwargs):
    """A PeftModel over the ``ARCHS[arch]`` tiny model with non-zero LoRA B."""
    build, targets, extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, **extra)
    cfg.update(lora_kwargs)
    pm = get_peft_model(build().eval(), LoraConfig(**cfg), adapter_name=name)
    randomize_lora_b(pm)
    return pm


def logits_and_grads(model, inputs, grad_seed=3):
    """Logits and, by backward() of sum(logits·G) (G fixed random), the .grad of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_peft(fused, ref32, ref64, inputs, *, grads=True, min_launches=1):
    """Fused logits (and every trainable parameter's gradient) within the rule of PEFT's; adaptkern's
    forward kernels launched at least ``min_launches`` times."""
    with count_launches() as launches:
        if grads:
            out, g = logits_and_grads(fused, inputs)
        else:
            with torch.no_grad():
                out = fused(**inputs).logits
    with torch.no_grad() if not grads else torch.enable_grad():
        if grads:
            out32, g32 = logits_and_grads(ref32, inputs)
            out64, g64 = logits_and_grads(ref64, inputs)
        else:
            out32, out64 = ref32(**inputs).logits, ref64(**inputs).logits
    assert_close("logits", out64, out, out32)
    if grads:
        assert g.keys() == g32.keys() and g
        for n in g:
            assert g[n] is not None, f"{n} got no gradient"
            assert_close(f"d {n}", g64[n], g[n], g32[n])
    assert sum(launches[k] for k in FORWARD_KERNELS) >= min_launches, launches
    return launches


def three(pm):
    """(pm fused, an unfused float32 copy, an unfused float64 copy), taken before fusing."""
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    return fuse_peft(pm), ref32, ref64


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_logits_and_gradients(arch):
    pm = make_peft(arch)
    keys = list(pm.state_dict())
    before = pm(**model_inputs(arch)).logits.detach()
    pm, ref32, ref64 = three(pm)
    layers = lora_layers(pm)
    assert sorted(fused_layer_names(pm)) == sorted(layers) and layers
    assert list(pm.state_dict()) == keys
    for model in (pm, ref32, ref64):
        model.train()  # every dropout is 0; train mode as under a Trainer
    launches = assert_matches_peft(pm, ref32, ref64, model_inputs(arch), min_launches=len(layers))
    assert sum(v for k, v in launches.items() if k not in FORWARD_KERNELS) > 0, launches  # the fused backward ran
    unfuse_peft(pm.eval())
    assert not fused_layer_names(pm) and all("forward" not in vars(m) for m in layers.values())
    with torch.no_grad(), count_launches() as launches:
        assert torch.equal(pm(**model_inputs(arch)).logits, before)
    assert not launches


@pytest.mark.parametrize("case", ["rslora", "patterns", "two_active", "set_scale", "scale_layer", "bias_model"])
def test_peft_layer_features(case):
    kwargs = {"rslora": dict(use_rslora=True, lora_alpha=5),
              "patterns": dict(rank_pattern={"layers.0.self_attn.q_proj": 2, r"layers\.1\.mlp\..*": 6},
                               alpha_pattern={"v_proj": 3, "down_proj": 20})}.get(case, {})
    pm = make_peft("qwen2" if case == "bias_model" else "llama", **kwargs)
    if case == "two_active":
        pm.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "up_proj"]))
        randomize_lora_b(pm)
        pm.base_model.set_adapter(["default", "other"])
    for layer in lora_layers(pm).values():
        if case == "set_scale":
            layer.set_scale("default", 0.5)
        if case == "scale_layer":
            layer.scale_layer(3.0)
    pm, ref32, ref64 = three(pm)
    if case == "two_active":
        both = [m for m in lora_layers(pm).values() if len(m.active_adapters) == 2 and "other" in m.lora_A]
        assert both and all(set(m.active_adapters) == {"default", "other"} for m in both)
    if case == "patterns":
        assert {m.r["default"] for m in lora_layers(pm).values()} == {2, 4, 6}
    assert_matches_peft(pm, ref32, ref64, model_inputs("llama"))


def test_dropout_reaches_the_kernel():
    """Train mode: the layer's dropout p goes to the fused kernel (same seed: the same mask as a direct
    lora_linear call); eval: no dropout, PEFT's result."""
    pm = make_peft(lora_dropout=0.25)
    pm, ref32, ref64 = three(pm)
    name, layer = next(iter(lora_layers(pm).items()))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    pm.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    want = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                       layer.lora_B["default"].weight, scale=layer.scaling["default"], dropout=0.25)
    assert torch.equal(got, want)
    torch.manual_seed(7)
    assert not torch.equal(got, lora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                            layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                            scale=layer.scaling["default"]))
    pm.eval()
    assert_matches_peft(pm, ref32.eval(), ref64.eval(), model_inputs("llama"), grads=False)


def test_optimizer_steps_match_peft():
    """Three AdamW steps: the loss curve and the trained LoRA weights, fused vs PEFT (float64 oracle)."""
    pm, ref32, ref64 = three(make_peft())
    inputs = model_inputs("llama", batch=2, seq=8)
    curves, finals = [], []
    for model in (pm, ref32, ref64):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        curves.append(torch.stack(losses))
        finals.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert curves[2][-1] < curves[2][0]
    assert_close("loss curve", curves[2], curves[0], curves[1])
    for n in finals[0]:
        assert_close(n, finals[2][n], finals[0][n], finals[1][n])


def test_disable_merge_unmerge_and_unload():
    pm, ref32, ref64 = three(make_peft())
    inputs = model_inputs("llama")
    with torch.no_grad():
        base = ref32.get_base_model()
        with ref32.disable_adapter():
            want = base(**inputs).logits
        with pm.disable_adapter(), count_launches() as launches:
            assert torch.equal(pm(**inputs).logits, want)
        assert not launches
        for model in (pm, ref32, ref64):
            model.merge_adapter()
        with count_launches() as launches:
            merged = pm(**inputs).logits
        assert not launches  # merged: the base alone, as PEFT
        assert torch.equal(merged, ref32(**inputs).logits)
        for model in (pm, ref32, ref64):
            model.unmerge_adapter()
    assert_matches_peft(pm, ref32, ref64, inputs, grads=False, min_launches=len(lora_layers(pm)))
    plain = pm.merge_and_unload()
    assert not lora_layers(plain) and not fused_layer_names(plain)
    with torch.no_grad():
        assert_close("merged logits", ref64.merge_and_unload()(**inputs).logits, plain(**inputs).logits,
                     ref32.merge_and_unload()(**inputs).logits)


def test_save_and_load_round_trips(tmp_path):
    pm = make_peft()
    ref32 = copy.deepcopy(pm)
    fuse_peft(pm)
    pm.save_pretrained(tmp_path / "fused")
    ref32.save_pretrained(tmp_path / "peft")
    fused_file, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fused", "peft"))
    assert fused_file.keys() == peft_file.keys() and all(torch.equal(fused_file[k], peft_file[k]) for k in peft_file)
    # PeftModel.from_pretrained, then fuse
    loaded = fuse_peft(PeftModel.from_pretrained(tiny_llama_seeded(), tmp_path / "fused"))
    assert_matches_peft(loaded, ref32, copy.deepcopy(ref32).double(), model_inputs("llama"), grads=False)
    # AutoPeftModelForCausalLM reads the base model's path from the adapter config
    base_dir = tmp_path / "base"
    tiny_llama_seeded().save_pretrained(base_dir)
    pm.peft_config["default"].base_model_name_or_path = str(base_dir)
    pm.save_pretrained(tmp_path / "auto")
    auto = fuse_peft(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "auto"))
    assert_matches_peft(auto, ref32, copy.deepcopy(ref32).double(), model_inputs("llama"), grads=False)


def test_load_set_and_add_adapter_after_fusing(tmp_path, caplog):
    other = make_peft(seed=5, name="other", r=3, target_modules=["q_proj", "v_proj"])
    other.save_pretrained(tmp_path)
    pm, ref32, ref64 = three(make_peft())
    for model in (pm, ref32, ref64):
        model.load_adapter(tmp_path / "other", adapter_name="other")
        model.set_adapter("other")
    ref64.double()
    assert_matches_peft(pm, ref32, ref64, model_inputs("llama"), grads=False, min_launches=4)
    # a new target module is a new PEFT layer: unfused until fuse_peft runs again
    for model in (pm, ref32, ref64):
        model.add_adapter("third", LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
        model.set_adapter("third")
    randomize_lora_b(pm)
    ref32.load_state_dict(pm.state_dict())
    ref64.load_state_dict(pm.state_dict())
    assert "base_model.model.lm_head" not in fused_layer_names(pm)
    with caplog.at_level(logging.INFO, logger="adaptkern"):
        fuse_peft(pm)
    assert "fused 15 of 15 LoRA layers; kept PEFT for: none" in caplog.text
    assert_matches_peft(pm, ref32, ref64, model_inputs("llama"), min_launches=3)  # lm_head, 2 q_proj


def mixed_pair():
    pm = make_peft(name="task_x", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    pm.add_adapter("task_y", LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "v_proj", "o_proj", "up_proj"]))
    randomize_lora_b(pm)
    pm.eval()  # PEFT refuses adapter_names in training mode
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    return fuse_peft(pm), ref32, ref64


def test_adapter_names_mixed_batch_forward():
    pm, ref32, ref64 = mixed_pair()
    ids = torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(2))
    names = ["task_x", "__base__", "task_y", "task_x"]
    with torch.no_grad(), count_launches() as launches:
        out = pm(input_ids=ids, adapter_names=names).logits
        out32 = ref32(input_ids=ids, adapter_names=names).logits
        out64 = ref64(input_ids=ids, adapter_names=names).logits
    assert_close("mixed logits", out64, out, out32)
    assert launches[MIXED_KERNEL] >= 7, launches  # every layer holding task_x or task_y ran the mixed kernel


@pytest.mark.parametrize("kwargs", [dict(num_beams=2, do_sample=False), dict(do_sample=True, num_return_sequences=2)],
                         ids=["beams", "samples"])
def test_adapter_names_generate(kwargs):
    pm, ref32, _ = mixed_pair()
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["task_y", "task_x", "__base__"]
    if "num_return_sequences" in kwargs:  # PEFT expands adapter_names for beams only: give it one per sample
        names = [n for n in names for _ in range(kwargs["num_return_sequences"])]
    runs = []
    for model in (pm, ref32):
        torch.manual_seed(4)
        with torch.no_grad(), count_launches() as launches:
            runs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                       max_new_tokens=3, pad_token_id=0, **kwargs))
        if model is pm:
            assert launches[MIXED_KERNEL] > 0, launches
    assert torch.equal(runs[0], runs[1])


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer")
def test_unfusable_layers_are_kept_and_listed(caplog):
    pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    pm.add_adapter("dora", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    pm.add_adapter("lb", LoraConfig(r=2, target_modules=["up_proj"], lora_bias=True))
    snap = snapshot(pm)
    with pytest.raises(ValueError, match=r"strict=True\): fused 4 of 7 LoRA layers; kept PEFT for: "
                                         r"Embedding over Embedding.*lora_bias"):
        fuse_peft(pm, strict=True)
    assert_unchanged(pm, snap)
    assert not fused_layer_names(pm)
    with caplog.at_level(logging.INFO, logger="adaptkern"):
        fuse_peft(pm)
    lines = [r.getMessage() for r in caplog.records if "fuse_peft" in r.getMessage()]
    assert len(lines) == 1 and "fused 4 of 7 LoRA layers; kept PEFT for: " in lines[0]
    assert "base_model.model.model.layers.0.mlp.up_proj" in lines[0] and "DoRA" not in lines[0]
    assert sorted(fused_layer_names(pm)) == [f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
                                             for i in (0, 1) for p in "qv"]  # v_proj: the DoRA adapter
    with pytest.raises(ValueError, match="holds no PEFT LoRA layer"):
        fuse_peft(tiny_llama_seeded())


def test_variant_added_after_fusing_runs_peft_for_that_call(caplog):
    pm, ref32, _ = three(make_peft(target_modules=["q_proj"]))
    for model in (pm, ref32):
        model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
        model.set_adapter("dora")
    ids = model_inputs("llama")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="adaptkern"), count_launches() as launches:
        assert torch.equal(pm(**ids).logits, ref32(**ids).logits)
    assert not launches and "LoRA variant DoRA (adapter 'dora')" in caplog.text


def test_gradient_checkpointing_deepcopy_and_pickle():
    pm, ref32, ref64 = three(make_peft())
    for model in (pm, ref32, ref64):
        model.train()
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    calls = []
    next(iter(lora_layers(pm).values())).register_forward_hook(lambda *_: calls.append(1))
    assert_matches_peft(pm, ref32, ref64, model_inputs("llama"))
    assert len(calls) == 2, "gradient checkpointing did not recompute the layer"
    fresh = fuse_peft(make_peft())  # (transformers' checkpointing hooks are not picklable)
    for clone in (copy.deepcopy(pm), pickle.loads(pickle.dumps(fresh))):
        layer = next(iter(lora_layers(clone).values()))
        assert isinstance(vars(layer)["forward"], FusedForward) and vars(layer)["forward"].layer is layer
        assert_matches_peft(clone, ref32, ref64, model_inputs("llama"), grads=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_logits_and_gradients(arch):
    """A bfloat16 PeftModel fused: logits and every LoRA gradient against PEFT in float64, at most twice
    PEFT-in-bfloat16's error (the interpreter upcasts the kernels' bf16 dots, as a GPU's tensor cores
    accumulate them in fp32)."""
    pm = make_peft(arch).to(torch.bfloat16)
    assert {p.dtype for p in pm.parameters()} == {torch.bfloat16}
    pm, ref_bf16, ref64 = three(pm)
    for model in (pm, ref_bf16, ref64):
        model.train()
    layers = lora_layers(pm)
    launches = assert_matches_peft(pm, ref_bf16, ref64, model_inputs(arch), min_launches=len(layers))
    assert sum(v for k, v in launches.items() if k not in FORWARD_KERNELS) > 0, launches
