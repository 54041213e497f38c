"""fuse_peft on PEFT's DoRA layers (``use_dora=True``) and QLoRA layers (``peft.tuners.lora.bnb.Linear4bit``
over a bitsandbytes NF4 ``Linear4bit``), against the real ``peft`` and ``bitsandbytes`` packages on a CPU.

Every comparison: fused PEFT (float32) against a float64 oracle, with unfused PEFT in float32 as the eager
error (``adaptkern.testing.assert_close``); launch counts prove the fused kernels ran. The QLoRA oracle is
PEFT's plain LoRA model over the dequantized weights (bit-equal to ``dequantize_4bit``) in float64.
"""

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adaptkern.integrations.peft_fuse import fuse_peft, fused_layer_names
from adaptkern.testing import assert_close

from ..helpers import count_launches
from ..models import ARCHS, build, model_inputs, perturb_trainable, quantize_linears, tiny_llama_qlora

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")

DORA_NORM = "_dora_linear_norm_kernel"
QLORA_FWD = "_quantized_lora_linear_fwd_kernel"
QLORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_dora(arch, seed=0, **kwargs):
    """A PeftModel with DoRA adapters whose B and magnitude m are moved off their initial values."""
    build, targets, extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    pm = get_peft_model(build().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                   **extra, **kwargs))
    perturb_trainable(pm, std=0.1)
    return pm


def make_qlora(seed=0, **kwargs):
    """(PEFT QLoRA model over NF4 Linear4bit bases, the float64 oracle: the same LoRA over the dequantized W)."""
    base = tiny_llama_qlora(seed)
    plain = copy.deepcopy(base)
    quantize_linears(base, QLORA_TARGETS)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS, **kwargs))
    perturb_trainable(pm, std=0.1)
    with torch.no_grad():
        for n, m in base.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                plain.get_submodule(n.replace(".base_layer", "")).weight.copy_(w)
    oracle = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS, **kwargs))
    lora = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    result = oracle.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys and not any("lora_" in k for k in result.missing_keys)
    return pm, oracle.double()


def logits_and_grads(model, inputs, grad_seed=3):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches(fused, ref32, ref64, inputs):
    """Logits and every trainable parameter's gradient of ``fused`` within the rule; returns the launches."""
    for model in (fused, ref32, ref64):
        model.train()  # every dropout is 0: train mode as under a Trainer
    with count_launches() as launches:
        out, g = logits_and_grads(fused, inputs)
    out32, g32 = logits_and_grads(ref32, inputs)
    out64, g64 = logits_and_grads(ref64, inputs)
    assert_close("logits", out64, out, out32)
    assert g.keys() == g32.keys() and g
    for n in g:
        assert_close(f"d {n}", g64[n], g[n], g32[n])
    return launches


def optimizer_curves(models, inputs, steps=3):
    """Loss curves and final trainable parameters after ``steps`` AdamW steps of each model."""
    curves, finals = [], []
    for model in models:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        curves.append(torch.stack(losses))
        finals.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    return curves, finals


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_logits_and_gradients_of_a_b_and_m(arch):
    """PEFT DoRA layers (GPT-2: Conv1D bases, fan_in_fan_out) run adaptkern's dora_linear: logits and the
    gradients of A, B and the magnitude m equal PEFT's."""
    pm = make_dora(arch)
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fuse_peft(pm, strict=True)
    layers = fused_layer_names(pm)
    assert layers and all(pm.get_submodule(n).use_dora["default"] for n in layers)
    launches = assert_matches(pm, ref32, ref64, model_inputs(arch))
    assert launches[DORA_NORM] >= len(layers), launches
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert any("lora_magnitude_vector" in n for n in grads)


def test_dora_optimizer_steps_and_round_trip(tmp_path):
    """Three AdamW steps fused equal PEFT's (losses and trained A, B, m); the trained adapter saved by PEFT
    loads back into PEFT and, fused again, gives the same logits."""
    pm = make_dora("llama")
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fuse_peft(pm, strict=True)
    inputs = model_inputs("llama", batch=2, seq=8)
    with count_launches() as launches:
        curves, finals = optimizer_curves((pm, ref32, ref64), inputs)
    assert launches[DORA_NORM] > 0 and curves[2][-1] < curves[2][0]
    assert_close("loss curve", curves[2], curves[0], curves[1])
    for n in finals[0]:
        assert_close(n, finals[2][n], finals[0][n], finals[1][n])
    pm.save_pretrained(tmp_path)
    back = fuse_peft(PeftModel.from_pretrained(build("llama", seed=0), str(tmp_path)), strict=True)
    pm.eval()
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, pm(**inputs).logits)


def test_qlora_logits_and_gradients():
    """PEFT QLoRA layers run adaptkern's qlora_linear (W dequantized inside the kernel): logits and LoRA
    gradients equal PEFT + bitsandbytes within the rule against the float64 dequantized oracle."""
    pm, ref64 = make_qlora()
    ref32 = copy.deepcopy(pm)
    fuse_peft(pm, strict=True)
    layers = fused_layer_names(pm)
    assert len(layers) == 6
    launches = assert_matches(pm, ref32, ref64, model_inputs("llama"))
    assert launches[QLORA_FWD] >= len(layers), launches


def test_qlora_optimizer_steps():
    pm, ref64 = make_qlora(seed=1)
    ref32 = copy.deepcopy(pm)
    fuse_peft(pm, strict=True)
    with count_launches() as launches:
        curves, finals = optimizer_curves((pm, ref32, ref64), model_inputs("llama", batch=2, seq=8))
    assert launches[QLORA_FWD] > 0 and curves[2][-1] < curves[2][0]
    assert_close("loss curve", curves[2], curves[0], curves[1])
    for n in finals[0]:
        assert_close(n, finals[2][n], finals[0][n], finals[1][n])


def test_qdora_is_left_to_peft_and_listed(caplog):
    """DoRA on a 4-bit base (QDoRA) keeps PEFT's forward, named in the summary; strict=True refuses it."""
    base = quantize_linears(tiny_llama_qlora(), QLORA_TARGETS)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="QDoRA"):
        fuse_peft(pm, strict=True)
    assert not fused_layer_names(pm)
    with caplog.at_level(logging.WARNING, logger="adaptkern"):
        fuse_peft(pm)
    assert "fused 0 of 6 LoRA layers; kept PEFT for: QDoRA (DoRA on a 4-bit base): 6 layers" in caplog.text


def test_dora_and_lora_adapters_on_one_model(caplog):
    """A DoRA and a plain LoRA adapter on the same layers: each runs fused when active (set_adapter), with
    PEFT's logits; both active at once is left to PEFT for that call, and logged."""
    pm = make_dora("llama")
    pm.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=ARCHS["llama"][1]))
    perturb_trainable(pm, std=0.1, seed=11)
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fuse_peft(pm, strict=True)
    inputs = model_inputs("llama")
    for name, kernel in (("plain", "_adapter_linear_onepass_kernel"), ("default", DORA_NORM)):
        for model in (pm, ref32, ref64):
            model.set_adapter(name)
        with count_launches() as launches, torch.no_grad():
            out = pm(**inputs).logits
            assert_close(f"logits ({name})", ref64(**inputs).logits, out, ref32(**inputs).logits)
        assert launches[kernel] >= 7, (name, launches)
    for model in (pm, ref32):
        model.base_model.set_adapter(["default", "plain"])
    with caplog.at_level(logging.WARNING, logger="adaptkern"), torch.no_grad():
        assert torch.equal(pm(**inputs).logits, ref32(**inputs).logits)
    assert "several active adapters, one of them DoRA" in caplog.text


def test_qlora_bfloat16_compute_dtype():
    """NF4 base with compute_dtype bfloat16, float32 LoRA weights and float32 activations (the norms stay
    float32, as prepare_model_for_kbit_training leaves them): bitsandbytes runs the base in bfloat16, PEFT
    the adapter branch in float32; the fused kernel keeps x's float32 for both, so it is never less exact
    than PEFT: logits and LoRA gradients within the rule of PEFT's."""
    base = tiny_llama_qlora()
    plain = copy.deepcopy(base)
    quantize_linears(base, QLORA_TARGETS, compute_dtype=torch.bfloat16)
    base.model.embed_tokens.to(torch.bfloat16)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS))
    perturb_trainable(pm, std=0.1)
    with torch.no_grad():
        for n, m in base.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                plain.get_submodule(n.replace(".base_layer", "")).weight.copy_(w)
        plain.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
    oracle = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS))
    oracle.load_state_dict({k: v for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    ref32 = copy.deepcopy(pm)
    fuse_peft(pm, strict=True)
    launches = assert_matches(pm, ref32, oracle.double(), model_inputs("llama"))
    assert launches[QLORA_FWD] >= 6, launches


def _peft_grad_key(name):
    """adaptkern's ``X.adapters.<a>.<p>`` -> PEFT's ``base_model.model.X.<p>.<a>.weight``."""
    path, _, rest = name.partition(".adapters.")
    adapter, _, which = rest.partition(".")
    return f"base_model.model.{path}.{which}.{adapter}.weight"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_and_save_peft_dora(arch, tmp_path):
    """A DoRA adapter PEFT saved (``lora_magnitude_vector`` [out] per layer) loads into a patched model:
    PEFT's logits and gradients of A, B and m on adaptkern's DoRA kernels; save_peft writes PEFT's keys,
    bit-equal, and PEFT loads that back."""
    from safetensors.torch import load_file

    from adaptkern.integrations.patching import merge_and_unload
    from adaptkern.integrations.peft import load_peft, save_peft
    from adaptkern.nn import AdapterLinear

    pm = make_dora(arch)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_peft(build(arch), str(tmp_path / "peft"))
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    for model in (ours, ref32, ref64):
        model.train()
    inputs = model_inputs(arch)
    with count_launches() as launches:
        out, g = logits_and_grads(ours, inputs)
    out32, g32 = logits_and_grads(ref32, inputs)
    out64, g64 = logits_and_grads(ref64, inputs)
    assert_close("logits", out64, out, out32)
    assert launches[DORA_NORM] >= len([k for k in g if k.endswith("lora_magnitude_vector")]) > 0, launches
    assert {_peft_grad_key(n) for n in g} == set(g32)
    for n, grad in g.items():
        assert_close(f"d {n}", g64[_peft_grad_key(n)], grad, g32[_peft_grad_key(n)])

    save_peft(ours, str(tmp_path / "ours"))
    theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    back = PeftModel.from_pretrained(build(arch), str(tmp_path / "ours")).eval()
    assert back.peft_config["default"].use_dora
    ours.eval()
    with torch.no_grad():
        assert_close("logits (PEFT loads save_peft)", copy.deepcopy(back).double()(**inputs).logits,
                     ours(**inputs).logits, back(**inputs).logits)
        merged = merge_and_unload(ours)  # PEFT's DoRA merge: W <- m/||W + s.B.A||_row * (W + s.B.A)
        assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
        assert_close("logits (merge_and_unload)", copy.deepcopy(back).double().merge_and_unload()(**inputs).logits,
                     merged(**inputs).logits, back.merge_and_unload()(**inputs).logits)


def test_load_and_save_peft_on_a_4bit_model(tmp_path):
    """A PEFT QLoRA adapter loads into a model whose linears are bitsandbytes Linear4bit (patched through
    AdapterLinear.from_linear, W kept 4-bit): PEFT's logits on adaptkern's QLoRA kernel; save_peft writes
    PEFT's keys bit-equal; a DoRA adapter (QDoRA) is refused before the model changes."""
    from safetensors.torch import load_file

    from adaptkern.integrations.patching import merge_and_unload
    from adaptkern.integrations.peft import load_peft, save_peft

    from ..models import assert_unchanged, edit_peft_config, snapshot

    pm, oracle = make_qlora(seed=2)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_peft(quantize_linears(tiny_llama_qlora(2), QLORA_TARGETS), str(tmp_path / "peft"))
    inputs = model_inputs("llama")
    with count_launches() as launches, torch.no_grad():
        out = ours(**inputs).logits
        assert_close("logits", oracle(**inputs).logits, out, pm(**inputs).logits)
    assert launches[QLORA_FWD] >= 6, launches
    save_peft(ours, str(tmp_path / "ours"))
    theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    edit_peft_config(tmp_path / "peft", use_dora=True)
    model = quantize_linears(tiny_llama_qlora(2), QLORA_TARGETS)
    snap = snapshot(model)
    with pytest.raises(NotImplementedError, match="QDoRA"):
        load_peft(model, str(tmp_path / "peft"))
    assert_unchanged(model, snap)
    snap = snapshot(ours)
    with pytest.raises(NotImplementedError, match="4-bit weight"):
        merge_and_unload(ours)
    assert_unchanged(ours, snap)


def _direct_call(layer, x, p):
    """The adaptkern op a fused DoRA / QLoRA layer runs, called directly with dropout ``p``."""
    from adaptkern.dora import dora_linear
    from adaptkern.quantized import QuantizedWeight, qlora_linear

    a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    if isinstance(layer.base_layer, bnb.nn.Linear4bit):
        qw = QuantizedWeight.from_bnb(layer.base_layer.weight)
        return qlora_linear(x, qw, None, layer.base_layer.bias, a, b, scale=scale, dropout=p)
    return dora_linear(x, layer.base_layer.weight, layer.base_layer.bias, a, b,
                       layer.lora_magnitude_vector["default"].weight, scale=scale, dropout=p)


def test_dropout_reaches_the_dora_and_qlora_kernels():
    """Train mode: each layer's lora_dropout p goes to dora_linear / qlora_linear (same seed: the same
    result as the direct call with that p, another than without dropout)."""
    dora = fuse_peft(make_dora("llama", lora_dropout=0.25), strict=True)
    qlora = fuse_peft(make_qlora(lora_dropout=0.25)[0], strict=True)
    for pm, k in ((dora, 32), (qlora, 64)):
        pm.train()
        layer = pm.get_submodule(fused_layer_names(pm)[0])
        x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        assert torch.equal(got, _direct_call(layer, x, 0.25))
        torch.manual_seed(7)
        assert not torch.equal(got, _direct_call(layer, x, 0.0))
