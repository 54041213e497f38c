"""PEFT LoRA interop against the real ``peft`` package, on tiny random models built from configs.

Tolerance: the package's rule (``adaptkern.testing.assert_close``): adaptkern's fp32 logits and
LoRA gradients may be at most 2× further from PEFT-in-float64 than PEFT-in-float32 is, plus
2e-6 × max|ref|. Both fp32 runs round differently (fused epilogue vs eager adds), so
neither is the oracle; float64 is.
"""

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from adaptkern import AdapterLinear
from adaptkern.integrations import Conv1DAdapter, adapter_parameters, add_lora, from_peft_model, load_peft, save_peft
from adaptkern.integrations.patching import set_adapter
from adaptkern.testing import assert_close

from ..helpers import count_launches
from ..models import (ARCHS, assert_unchanged, edit_peft_config, model_inputs, outputs_match_peft, perturb_trainable,
                      randomize_lora_b, seq_cls_model, snapshot, tiny_llama, tiny_llama_seeded)

# transformers 5 renames gradient_checkpointing_* (PEFT still calls the old names)
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")


def peft_pair(arch, tmp_path, seed=0, **lora_kwargs):
    """(base, PEFT model with random non-zero LoRA B, adaptkern model loaded from what PEFT saved)."""
    build, targets, extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    base = build().eval()
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **extra)
    cfg.update(lora_kwargs)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    randomize_lora_b(pm)
    pm.save_pretrained(tmp_path)
    return base, pm, load_peft(copy.deepcopy(base), str(tmp_path))


def peft_key(name):
    """adaptkern's ``X.adapters.<a>.lora_A`` -> PEFT's ``base_model.model.X.lora_A.<a>.weight``."""
    path, _, rest = name.partition(".adapters.")
    adapter, _, which = rest.partition(".")
    return f"base_model.model.{path}.{which}.{adapter}.weight"


def loss_and_grads(model, inputs, grad_seed=3):
    """Logits and, by backward() of sum(logits·G) (G fixed random), the .grad of every parameter that got one."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_only_adapters_trainable(model):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)} and trainable


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_matches_peft(arch, tmp_path):
    base, pm, ours = peft_pair(arch, tmp_path)
    targets = ARCHS[arch][1]
    assert_only_adapters_trainable(ours)
    assert all(isinstance(m, Conv1DAdapter if arch == "gpt2" else AdapterLinear)
               for n, m in ours.named_modules() if n.rsplit(".", 1)[-1] in targets)
    inputs = model_inputs(arch)
    pm.train()
    ours.train()  # every dropout is 0: train mode so that checkpointing below is active
    ours.config.use_cache = False  # as checkpointing forces (T5's cached path rounds differently)
    logits, grads = loss_and_grads(ours, inputs)
    peft32, grads32 = loss_and_grads(pm, inputs)
    peft64, grads64 = loss_and_grads(copy.deepcopy(pm).double(), inputs)
    assert_close("logits", peft64.double(), logits, peft32)
    adapter_names = {n for n, _ in ours.named_parameters() if ".adapters." in n}
    assert set(grads) == adapter_names and len(grads32) == len(adapter_names)  # only adapters get gradients
    for name, g in grads.items():
        key = peft_key(name)
        assert_close(f"d {name}", grads64[key].double(), g, grads32[key])

    ours.gradient_checkpointing_enable()
    calls = []
    layer = next(m for m in ours.modules() if isinstance(m, AdapterLinear))
    layer.register_forward_hook(lambda *_: calls.append(1))
    logits_ckpt, grads_ckpt = loss_and_grads(ours, inputs)
    assert len(calls) == 2, "gradient checkpointing did not recompute the layer"
    assert_close("logits (checkpointed)", peft64.double(), logits_ckpt, peft32)
    for name, g in grads_ckpt.items():  # not bitwise: T5's checkpointed path rounds differently even without LoRA
        key = peft_key(name)
        assert_close(f"d {name} (checkpointed)", grads64[key].double(), g, grads32[key])
    assert set(grads_ckpt) == adapter_names

    if ARCHS[arch][3]:
        ours.gradient_checkpointing_disable()
        ours.eval()
        pm.eval()
        ids = model_inputs(arch, seq=5, seed=2)["input_ids"]
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kw), pm.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("case", ["patterns", "rslora", "regex", "exclude"])
def test_load_peft_config_features(case, tmp_path):
    kwargs = {
        "patterns": dict(rank_pattern={"layers.0.self_attn.q_proj": 2, r"layers\.1\.mlp\..*": 6},
                         alpha_pattern={"v_proj": 3, "down_proj": 20}),
        "rslora": dict(use_rslora=True, lora_alpha=5),
        "regex": dict(target_modules=r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.gate_proj)"),
        "exclude": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    }[case]
    _, pm, ours = peft_pair("llama", tmp_path, **kwargs)
    layers = {n: m.adapters["default"] for n, m in ours.named_modules() if isinstance(m, AdapterLinear)}
    peft_layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert set(layers) == set(peft_layers)
    for n, a in layers.items():
        assert (a.r, a.scale) == (peft_layers[n].r["default"], peft_layers[n].scaling["default"]), n
    if case == "patterns":
        assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.1.mlp.up_proj"].r == 6
    if case == "regex":
        assert sorted(layers) == ["model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.k_proj",
                                  "model.layers.1.self_attn.o_proj"]
    if case == "exclude":
        assert "model.layers.0.self_attn.q_proj" not in layers and len(layers) == 3
    outputs_match_peft(pm, ours)


def test_gpt2_fan_in_fan_out_and_tied_head(tmp_path):
    """Conv1D keeps its [in, out] Parameter (state dict unchanged), the tied head stays tied and unpatched."""
    base, _, ours = peft_pair("gpt2", tmp_path)
    attn = ours.transformer.h[0].attn.c_attn
    assert attn._parameters["weight"].shape == (32, 96) and attn.weight.shape == (96, 32)
    assert ours.lm_head.weight is ours.transformer.wte.weight and not isinstance(ours.lm_head, AdapterLinear)
    state = ours.state_dict()
    assert {k for k in state if ".adapters." not in k} == set(base.state_dict())
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    edit_peft_config(tmp_path, fan_in_fan_out=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False but 'transformer.h.0.attn.c_attn' is a Conv1D"):
        load_peft(copy.deepcopy(base), str(tmp_path))


def test_save_peft_loads_in_peft(tmp_path):
    """Mixed ranks and alphas (rank_pattern / alpha_pattern on save) and a bias-carrying model (Qwen2)."""
    torch.manual_seed(0)
    base = ARCHS["qwen2"][0]().eval()
    ours = add_lora(copy.deepcopy(base), "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(ours, "a", r=2, alpha=3, target_modules=["model.layers.1.mlp.down_proj"])
    randomize_lora_b(ours)
    save_peft(ours, str(tmp_path), adapter_name="a")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8, ["model.layers.1.mlp.down_proj", "q_proj",
                                                                          "v_proj"])
    assert list(cfg["rank_pattern"].values()) == [2] and list(cfg["alpha_pattern"].values()) == [3]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    outputs_match_peft(pm, ours)


def test_save_peft_conv1d_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = ARCHS["gpt2"][0]().eval()
    ours = add_lora(copy.deepcopy(base), "default", r=3, alpha=6, target_modules=["c_attn", "mlp.c_proj"],
                    use_rslora=True)
    randomize_lora_b(ours)
    save_peft(ours, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["use_rslora"]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    outputs_match_peft(pm, ours, "gpt2")


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype, tmp_path):
    """PEFT file -> load_peft -> save_peft -> load_peft: every tensor keeps its dtype and its bits."""
    torch.manual_seed(0)
    src = tmp_path / "peft"
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 rank_pattern={"down_proj": 3}))
    randomize_lora_b(pm)
    pm.to(dtype).save_pretrained(src)
    ours = load_peft(tiny_llama(), str(src), adapter_name="mine")
    save_peft(ours, str(tmp_path / "ours"), adapter_name="mine")
    original = load_file(src / "adapter_model.safetensors")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert written.keys() == original.keys()
    for k, v in original.items():
        assert written[k].dtype == v.dtype == dtype and torch.equal(bits(written[k]), bits(v)), k
    again = load_peft(tiny_llama(), str(tmp_path / "ours"))
    for n, p in again.named_parameters():
        if ".adapters." in n:
            assert torch.equal(bits(p.detach()), bits(original[peft_key(n).replace(".default.", ".")])), n


def test_load_legacy_bin_weights_only(tmp_path):
    _, pm, _ = peft_pair("llama", tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(weights, tmp_path / "adapter_model.bin")
    outputs_match_peft(pm, load_peft(tiny_llama_seeded(), str(tmp_path)))


# -- strictness: every failure leaves the model exactly as it was --------------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _edit_weights(path, fn):
    w = load_file(path / "adapter_model.safetensors")
    fn(w)
    save_file(w, path / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "missing key": (lambda p: _edit_weights(p, lambda w: w.pop(KEY)), ValueError, "missing .*q_proj.lora_A"),
    "unexpected key": (lambda p: _edit_weights(p, lambda w: w.update(extra=torch.zeros(2))), ValueError,
                       "unexpected \\['extra'\\]"),
    "shape": (lambda p: _edit_weights(p, lambda w: w.update({KEY: torch.zeros(4, 31)})), ValueError,
              r"q_proj.lora_A.weight: shape mismatch: checkpoint has \(4, 31\), the model needs \(4, 32\)"),
    "rank in config": (lambda p: edit_peft_config(p, r=5), ValueError,
                       r"checkpoint has \(4, 32\), the model needs \(5"),
    "nan": (lambda p: _edit_weights(p, lambda w: w[KEY].__setitem__((0, 0), float("nan"))), ValueError, "NaN or Inf"),
    "inf": (lambda p: _edit_weights(p, lambda w: w[KEY].__setitem__((1, 2), float("-inf"))), ValueError,
            "NaN or Inf"),
    "integer weights": (lambda p: _edit_weights(p, lambda w: w.update({KEY: torch.zeros(4, 32, dtype=torch.int32)})),
                        ValueError, "floating point"),
    "truncated": (lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:-50]), ValueError, "not a valid safetensors"),
    "corrupt": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"),
                ValueError, "not a valid safetensors"),
    "pickle": (lambda p: (os.remove(p / "adapter_model.safetensors"),
                          (p / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))),
               ValueError, "weights_only"),
    "no weights": (lambda p: os.remove(p / "adapter_model.safetensors"), FileNotFoundError, "neither"),
    "bad json": (lambda p: (p / "adapter_config.json").write_text("{"), ValueError, "not valid JSON"),
    "peft_type": (lambda p: edit_peft_config(p, peft_type="IA3"), NotImplementedError, "peft_type='IA3'"),
    "no peft_type": (lambda p: edit_peft_config(p, peft_type=None), ValueError, "peft_type must be"),
    "bias": (lambda p: edit_peft_config(p, bias="some"), ValueError, "bias must be one of"),
    "dora without magnitudes": (lambda p: edit_peft_config(p, use_dora=True), ValueError,
                                "missing .*q_proj.lora_magnitude_vector"),
    "use_dora type": (lambda p: edit_peft_config(p, use_dora="yes"), ValueError, "use_dora must be a bool"),
    "modules_to_save without its weights": (lambda p: edit_peft_config(p, modules_to_save=["lm_head"]), ValueError,
                                            r"missing \['base_model.model.lm_head.weight'\]"),
    "modules_to_save type": (lambda p: edit_peft_config(p, modules_to_save="lm_head"), ValueError,
                             "modules_to_save must be a list of str"),
    "layers_to_transform": (lambda p: edit_peft_config(p, layers_to_transform=[1]), ValueError,
                            "unexpected .*layers.0.self_attn.q_proj.lora_A"),
    "r": (lambda p: edit_peft_config(p, r=0), ValueError, "r must be a positive int"),
    "dropout": (lambda p: edit_peft_config(p, lora_dropout=1.5), ValueError, "lora_dropout"),
    "targets nothing": (lambda p: edit_peft_config(p, target_modules=["nope"]), ValueError, "matches no module"),
    "targets embedding": (lambda p: edit_peft_config(p, target_modules=["q_proj", "embed_tokens"]), NotImplementedError,
                          "Embedding"),
    "rank_pattern type": (lambda p: edit_peft_config(p, rank_pattern={"q_proj": "2"}), ValueError, "rank_pattern"),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    peft_pair("llama", path, target_modules=["q_proj", "v_proj"])
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_strict_load_errors_leave_model_unchanged(case, saved_llama, tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    path.mkdir()
    for f in os.listdir(saved_llama):
        (path / f).write_bytes((saved_llama / f).read_bytes())
    corrupt, exc, match = BAD[case]
    corrupt(path)
    model = add_lora(tiny_llama_seeded(), "other", r=2, target_modules=["k_proj"])  # partly patched already
    snap = snapshot(model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=match):
        load_peft(model, str(path))
    assert not (tmp_path / "pwned").exists()
    assert_unchanged(model, snap)


def test_name_clash_and_unknown_fields(saved_llama):
    model = load_peft(tiny_llama_seeded(), str(saved_llama))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already used"):
        load_peft(model, str(saved_llama))
    assert_unchanged(model, snap)
    cfg = json.loads((saved_llama / "adapter_config.json").read_text())
    assert "loftq_config" in cfg  # known, ignored fields load silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_peft(tiny_llama_seeded(), str(saved_llama))


def test_unknown_config_field_warns(saved_llama, tmp_path):
    for f in os.listdir(saved_llama):
        (tmp_path / f).write_bytes((saved_llama / f).read_bytes())
    edit_peft_config(tmp_path, shiny_new_option=3)
    with pytest.warns(UserWarning, match="shiny_new_option"):
        load_peft(tiny_llama_seeded(), str(tmp_path))


def test_save_peft_errors(tmp_path):
    model = add_lora(tiny_llama_seeded(), "a", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no layer"):
        save_peft(model, str(tmp_path), adapter_name="default")
    add_lora(model, "a", r=2, target_modules=["k_proj"], dropout=0.1)
    with pytest.raises(ValueError, match="disagree on dropout"):
        save_peft(model, str(tmp_path), adapter_name="a")
    from adaptkern.integrations import add_bottleneck
    add_bottleneck(model, "bn", 4, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="bottleneck"):
        save_peft(model, str(tmp_path), adapter_name="bn")


# -- from_peft_model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_peft_model_keeps_adapters_and_active(arch):
    build, targets, extra, _ = ARCHS[arch]
    torch.manual_seed(0)
    pm = get_peft_model(build().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets[:2], **extra),
                        adapter_name="one")
    pm.add_adapter("two", LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=targets[1:3], **extra))
    randomize_lora_b(pm)
    inputs = model_inputs(arch)
    expected = {}
    with torch.no_grad():
        for name in ("one", "two"):
            pm.set_adapter(name)
            expected[name] = (pm(**inputs).logits, copy.deepcopy(pm).double()(**inputs).logits)
    lora_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    model = from_peft_model(pm)
    assert model is pm.get_base_model()
    converted = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert converted and all(m.active_adapter in ("two", None) for m in converted)
    assert {id(p) for p in adapter_parameters(model)} == {id(p) for p in lora_params.values()}
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    for name in ("two", "one"):
        set_adapter(model, name)
        with torch.no_grad():
            out = model(**inputs).logits
        assert_close(f"logits {name}", expected[name][1].double(), out, expected[name][0])


def test_from_peft_model_refuses_unsupported_unchanged():
    with pytest.raises(TypeError, match="PeftModel"):
        from_peft_model(tiny_llama())
    for kwargs in (dict(use_dora=True), dict(modules_to_save=["lm_head"])):
        pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=2, target_modules=["q_proj"], **kwargs))
        types = [type(m) for m in pm.modules()]
        with pytest.raises(NotImplementedError):
            from_peft_model(pm)
        assert types == [type(m) for m in pm.modules()]
    pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.merge_adapter()
    with pytest.raises(NotImplementedError, match="merged"):
        from_peft_model(pm)


@pytest.mark.parametrize("arch, task", [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", None)])
def test_save_peft_task_type_and_auto_peft_model(arch, task, tmp_path):
    """save_peft infers PEFT's task_type from the model class and writes PEFT's own config fields, so
    AutoPeftModelFor* loads the directory (the base model from base_model_name_or_path)."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

    build, targets, extra, _ = ARCHS[arch]
    torch.manual_seed(0)
    base = build().eval()
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    ours = add_lora(copy.deepcopy(base), "default", r=4, alpha=8, target_modules=targets[:2])
    randomize_lora_b(ours)
    save_peft(ours, str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    assert {"peft_version", "modules_to_save", "use_dora", "layers_to_transform"} <= set(cfg)
    if task is not None:
        auto = {"CAUSAL_LM": AutoPeftModelForCausalLM, "SEQ_2_SEQ_LM": AutoPeftModelForSeq2SeqLM}[task]
        outputs_match_peft(auto.from_pretrained(tmp_path / "adapter"), ours, arch)
    save_peft(ours, str(tmp_path / "seq_cls"), task_type="SEQ_CLS")
    assert json.loads((tmp_path / "seq_cls" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        save_peft(ours, str(tmp_path / "bad"), task_type="causal")


# -- SEQ_CLS adapters: modules_to_save, bias, layers_to_transform --------------------------------------------

SEQ_CLS = {  # (arch, LoraConfig kwargs)
    "bert lora_only bias": ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
    "bert all biases": ("bert", dict(target_modules=["query", "value", "dense"], bias="all")),
    "llama layers_to_transform": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"],
                                                layers_to_transform=[1], layers_pattern="layers")),
}


def seq_cls_pair(case, tmp_path):
    """(base, trained PEFT SEQ_CLS model, its saved directory): LoRA B, the head copy PEFT saves
    (modules_to_save) and the trained biases all moved off their initial values."""
    arch, kwargs = SEQ_CLS[case]
    base = seq_cls_model(arch)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, **kwargs))
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path / "peft")
    return base, pm.eval(), tmp_path / "peft"


def seq_cls_logits(model, seed=1):
    ids = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(SEQ_CLS))
def test_seq_cls_adapter_loads_like_peft_and_round_trips(case, tmp_path):
    """A SEQ_CLS adapter PEFT saved (its head saved whole, biases per ``bias``, LoRA on some layers only)
    loads exactly: PEFT's logits under the tolerance rule with the fused kernels running, PEFT's trainable
    parameters; save_peft writes PEFT's keys with bit-equal tensors, and PEFT loads that back."""
    base, pm, path = seq_cls_pair(case, tmp_path)
    ours = load_peft(copy.deepcopy(base), str(path))
    peft_layers = {n[len("base_model.model."):] for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert {n for n, m in ours.named_modules() if isinstance(m, AdapterLinear)} == peft_layers
    if "layers_to_transform" in case:
        assert peft_layers and all(".layers.1." in n for n in peft_layers)
    with count_launches() as launches:
        out = seq_cls_logits(ours)
    assert sum(launches.values()) >= len(peft_layers)
    assert_close("logits", seq_cls_logits(copy.deepcopy(pm).double()).double(), out, seq_cls_logits(pm))
    trainable = lambda m: sorted(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    pm_train = PeftModel.from_pretrained(copy.deepcopy(base), str(path), is_trainable=True)
    assert trainable(ours) == trainable(pm_train)

    save_peft(ours, str(tmp_path / "ours"))
    theirs = load_file(path / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    wrapper_copies = {k for k in theirs if ".original_module." in k or ".modules_to_save." in k}  # PEFT ignores these
    assert set(mine) == set(theirs) - wrapper_copies
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["bias"]) == ("SEQ_CLS", SEQ_CLS[case][1].get("bias", "none"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_close("logits (PEFT loads save_peft)", seq_cls_logits(copy.deepcopy(back).double()).double(), out,
                 seq_cls_logits(back))


def test_saved_head_follows_the_active_adapter(tmp_path):
    """As PEFT's ModulesToSaveWrapper: the saved head runs while its adapter is active, the model's own
    head with adapters disabled, under another adapter or after delete_adapter; merge_and_unload keeps it."""
    from adaptkern.integrations.patching import delete_adapter, disable_adapters, merge_and_unload

    base, pm, path = seq_cls_pair("bert lora_only bias", tmp_path)
    ours = load_peft(copy.deepcopy(base), str(path))
    add_lora(ours, "other", r=2, target_modules=["key"])
    adapted = seq_cls_logits(ours)
    assert ours.classifier.weight.requires_grad  # the adapter's copy trains, the model's own does not
    with disable_adapters(ours):
        assert torch.equal(ours.classifier.weight, base.classifier.weight) and not ours.classifier.weight.requires_grad
        with pm.disable_adapter():
            assert_close("disabled", seq_cls_logits(copy.deepcopy(pm).double()).double(), seq_cls_logits(ours),
                         seq_cls_logits(pm))
    assert torch.equal(seq_cls_logits(ours), adapted)
    set_adapter(ours, "other")
    assert torch.equal(ours.classifier.weight, base.classifier.weight)
    set_adapter(ours, "default")
    with pytest.warns(UserWarning, match="writes the base model only"):
        ours.save_pretrained(tmp_path / "base")  # the model's own head, not the adapter's
    saved = load_file(tmp_path / "base" / "model.safetensors")
    assert torch.equal(saved["classifier.weight"], base.classifier.weight)
    assert not torch.equal(ours.classifier.weight, base.classifier.weight)
    merged = merge_and_unload(copy.deepcopy(ours))
    assert_close("merged", seq_cls_logits(copy.deepcopy(pm).merge_and_unload().double()).double(),
                 seq_cls_logits(merged), seq_cls_logits(pm))
    delete_adapter(ours, "default")
    assert torch.equal(ours.classifier.weight, base.classifier.weight) and not vars(ours)["adaptkern_saved_modules"]
