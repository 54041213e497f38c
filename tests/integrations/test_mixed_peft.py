"""Mixed batches against a real peer: PEFT's own mixed-batch inference (``adapter_names=``), for the
logits and for generate(), which expands the batch (beams, num_return_sequences)."""

import copy

import pytest
import torch

import adaptkern

from ..helpers import count_launches

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


ADAPTERS = {  # different ranks, alphas and targets, so the batch mixes ranks and layers
    "task_x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "task_y": dict(r=2, lora_alpha=3, target_modules=["k_proj", "v_proj", "o_proj", "up_proj"]),
}


def _peft_and_adaptkern():
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    first, *rest = ADAPTERS
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[first]),
                                adapter_name=first)
    for name in rest:
        model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    model.eval()
    for name, spec in ADAPTERS.items():
        adaptkern.add_lora(ours, name, spec["r"], alpha=spec["lora_alpha"], target_modules=spec["target_modules"])
    for path, layer in model.base_model.model.named_modules():
        if hasattr(layer, "lora_A"):
            target = ours.get_submodule(path)
            for name in layer.lora_A:
                target.adapters[name].lora_A.data.copy_(layer.lora_A[name].weight)
                target.adapters[name].lora_B.data.copy_(layer.lora_B[name].weight)
    return model, ours.eval()


def test_mixed_batch_logits_match_peft():
    model, ours = _peft_and_adaptkern()
    input_ids = torch.randint(0, 96, (4, 7), generator=torch.Generator().manual_seed(2))
    names = ["task_x", None, "task_y", "task_x"]
    with torch.no_grad():
        want = model(input_ids, adapter_names=[n or "__base__" for n in names]).logits
        with adaptkern.adapter_batch(ours, names), count_launches() as launches:
            got = ours(input_ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            base_logits = base(input_ids).logits
    assert (want - base_logits).abs().amax() > 1e-2, "the adapters must change the logits"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert launches["_mixed_adapter_linear_kernel"] > 0, launches  # the fused mixed path ran


def test_mixed_batch_generate_matches_peft():
    model, ours = _peft_and_adaptkern()
    input_ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["task_y", "task_x", None]
    with torch.no_grad():
        want = model.generate(input_ids=input_ids, adapter_names=[n or "__base__" for n in names], max_new_tokens=4,
                              do_sample=False)
        with adaptkern.adapter_batch(ours, names), count_launches() as launches:
            got = ours.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert launches["_mixed_adapter_linear_kernel"] > 0, launches


@pytest.mark.parametrize("kwargs", [dict(num_beams=2, do_sample=False, max_new_tokens=4),
                                    dict(do_sample=True, num_return_sequences=2, max_new_tokens=4)],
                         ids=["beams", "samples"])
def test_adapter_batch_generate_expanded_batch_matches_peft(kwargs):
    """generate() repeats each row (beams, num_return_sequences): each copy keeps its row's adapter."""
    model, ours = _peft_and_adaptkern()
    input_ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(input_ids)
    names = ["task_y", "task_x", None]
    peft_names = [n or "__base__" for n in names]
    if "num_return_sequences" in kwargs:  # PEFT expands adapter_names for beams only: give it one per sample
        peft_names = [n for n in peft_names for _ in range(kwargs["num_return_sequences"])]
    with torch.no_grad():
        torch.manual_seed(4)
        want = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=peft_names, **kwargs)
        torch.manual_seed(4)
        with adaptkern.adapter_batch(ours, names):
            got = ours.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    assert want.shape[0] == 3 * kwargs.get("num_return_sequences", 1) and torch.equal(got, want)
