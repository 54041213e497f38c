"""Shared builders for the integration tests: tiny random transformers models, their inputs, PEFT
LoRA weights that are not vacuous, and a snapshot that proves a failed call changed nothing.

Every model is built from a config (no download); each has 2 layers and hidden size 32.
"""

import copy
import json

import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from adaptkern.nn import AdapterLinear
from adaptkern.testing import assert_close

from .helpers import count_launches

DEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None)


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(**DEC))


def tiny_llama_seeded(seed=0):
    torch.manual_seed(seed)
    return tiny_llama().eval()


# name -> (builder, PEFT target_modules, extra LoraConfig kwargs, does generate())
ARCHS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}, True),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**DEC)), ["q_proj", "v_proj", "down_proj"], {}, True),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**DEC)), ["q_proj", "o_proj", "up_proj"], {}, True),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                                bos_token_id=None, eos_token_id=None)),
             ["c_attn", "c_proj", "c_fc"], dict(fan_in_fan_out=True), True),
    "bert": (lambda: BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)),
             ["query", "value", "dense"], {}, False),
    "t5": (lambda: T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)),
           ["q", "v", "o", "wi", "wo"], {}, True),
}


def build(arch="llama", seed=0):
    """The ``ARCHS[arch]`` model, seeded, in eval mode."""
    torch.manual_seed(seed)
    return ARCHS[arch][0]().eval()


def model_inputs(arch, batch=2, seq=6, seed=1):
    """Keyword inputs of an ``ARCHS`` model: random token ids (and decoder ids for T5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    if arch == "t5":
        return dict(input_ids=ids, decoder_input_ids=torch.randint(1, 64, (batch, 4), generator=g))
    return dict(input_ids=ids)


def randomize_lora_b(model, std=0.1):
    """Fresh LoRA B is zero, which would make every comparison vacuous."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, std)


def outputs_match_peft(pm, ours, arch="llama"):
    """``ours`` (adaptkern) gives PEFT's logits under the tolerance rule: against PEFT in float64,
    at most twice PEFT-in-float32's error (plus atol); every layer running an adapter launched
    adaptkern's kernels (no silent fallback)."""
    inputs = model_inputs(arch)
    adapted = [m for m in ours.modules() if isinstance(m, AdapterLinear)
               and m.active_adapter is not None and m.active_adapter != m.merged_adapter]
    with torch.no_grad():
        with count_launches() as launches:
            out = ours(**inputs).logits
        out32 = pm(**inputs).logits
        out64 = copy.deepcopy(pm).double()(**inputs).logits
    assert_close("logits", out64.double(), out, out32)
    assert sum(launches.values()) >= len(adapted), (len(adapted), launches)


def edit_peft_config(path, **changes):
    """Change fields of the adapter_config.json that PEFT saved in ``path``."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def snapshot(model):
    """(state dict copy, module types, requires_grad flags), in module order: see ``assert_unchanged``."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model, snap):
    """``model`` has the modules, flags and bitwise state it had when ``snap`` was taken."""
    state, types, grads = snapshot(model)
    assert types == snap[1] and grads == snap[2]
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
