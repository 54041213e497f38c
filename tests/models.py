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


def seq_cls_model(arch="bert", seed=0, num_labels=3):
    """A tiny ``*ForSequenceClassification`` (BERT or Llama), seeded, in eval mode: PEFT's SEQ_CLS task
    saves its head (``classifier`` / ``score``) whole through ``modules_to_save``."""
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForSequenceClassification(LlamaConfig(**DEC, num_labels=num_labels)).eval()
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, num_labels=num_labels)).eval()


def perturb_trainable(model, std=0.05, seed=7):
    """Add noise to every trainable Parameter of ``model`` (LoRA, saved heads, trained biases) so that
    a comparison cannot pass with their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def tiny_llama_qlora(seed=0):
    """A tiny Llama whose linear layers have K a multiple of 64 (hidden 64, intermediate 128), seeded, eval:
    bitsandbytes 0.50's CPU dequantization reads one absmax per row of W, so a 64-element block that spans
    rows (K < 64) dequantizes wrongly on the CPU (its GPU kernels and adaptkern index blocks flat)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(DEC | dict(hidden_size=64, intermediate_size=128)))).eval()


def quantize_linears(model, targets, compute_dtype=torch.float32, quant_type="nf4"):
    """Replace, in place, each ``nn.Linear`` of ``model`` whose name ends with one of ``targets`` by a
    bitsandbytes ``Linear4bit`` (double-quantized, block size 64) holding its weight quantized on the CPU,
    and mark the model 4-bit as transformers does (PEFT then builds its QLoRA layers on them). The weights
    keep bitsandbytes' standard packed layout: its CPU-only repacking on the first no-grad eval call is off."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or not any(name.endswith(t) for t in targets):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(module.weight.detach().to(compute_dtype), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=True, blocksize=64, module=q)
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        q.support_avx512bf16_for_cpu = False  # keep the standard layout (bnb's CPU repack fails for K < blocksize)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu").train(module.training))
    model.is_loaded_in_4bit = True
    return model


def tiny_word_tokenizer():
    """A word-level fast tokenizer whose ids fit the tiny models' vocabulary of 64: ``<pad>`` 0, ``<unk>`` 1,
    ``</s>`` 2 (eos), then lowercase words split on whitespace. Built in memory, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("the a cat dog bird fish sees eats likes chases runs sleeps on under near big small red blue green "
             "old young happy sad mat tree house river and with fast slowly today").split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
