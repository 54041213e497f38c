"""Train LoRA adapters on a tiny Llama with adaptkern, hand them to PEFT, serve a mixed batch.

1. Build a tiny Llama from a config (nothing is downloaded) and add LoRA r=8 to every
   linear layer with ``adaptkern.add_lora`` (the base is frozen).
2. Train two adapters, "up" and "down", for a few dozen steps each on synthetic tasks
   (count up / count down modulo the vocabulary).
3. Save both in PEFT format with ``adaptkern.save_peft``; reload them with the real
   ``peft`` package (``PeftModel.from_pretrained``) and check "up" gives the same logits.
4. Serve one batch in which the rows use "up", the base model and "down"
   (``adaptkern.adapter_batch``) and check it against PEFT's own mixed-batch inference.

Runs on a CPU in seconds; exits non-zero if any output disagrees. Needs ``peft``.
"""

import sys
import tempfile
import warnings

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import adaptkern

warnings.filterwarnings("ignore", ".*deprecated and will be removed in v6", FutureWarning)  # peft on transformers 5
VOCAB, SEQ, BATCH, STEPS = 64, 16, 8, 40
RTOL, ATOL = 1e-4, 1e-5  # fp32, two evaluation orders of the same sum (fused vs PEFT's eager adds)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def task_batch(task, gen):
    """Sequences counting up ("up") or down ("down") by one, modulo VOCAB, from a random start. Shape [BATCH, SEQ]."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    step = 1 if task == "up" else -1
    return (start + step * torch.arange(SEQ)) % VOCAB


def train(model, name, seed):
    """Train adapter ``name`` alone (the others are inactive); True if its loss fell."""
    adaptkern.set_adapter(model, name)
    opt = torch.optim.AdamW(adaptkern.adapter_parameters(model, name), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(STEPS):
        ids = task_batch(name, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps")
    return losses[-1] < losses[0] - 0.5


def check(what, got, want):
    ok = torch.allclose(got, want, rtol=RTOL, atol=ATOL)
    print(f"{what}: max |diff| {(got - want).abs().max().item():.2e} -> {'OK' if ok else 'MISMATCH'}")
    return ok


def main():
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared CI runner
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("up", "down"):
        adaptkern.add_lora(model, name, r=8, alpha=16)  # target_modules=None: every linear but lm_head
    ok = all([train(model, "up", seed=1), train(model, "down", seed=2)])
    ok &= all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base untouched
    model.eval()
    ids = task_batch("up", torch.Generator().manual_seed(3))[:3]
    names = ["up", None, "down"]

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name in ("up", "down"):
            adaptkern.save_peft(model, f"{tmp}/{name}", adapter_name=name)
        peft_model = PeftModel.from_pretrained(tiny_llama(), f"{tmp}/up", adapter_name="up").eval()
        peft_model.load_adapter(f"{tmp}/down", adapter_name="down")
        adaptkern.set_adapter(model, "up")
        ok &= check("adapter 'up' vs PEFT reloaded", model(ids).logits, peft_model(ids).logits)

        with adaptkern.adapter_batch(model, names):
            mixed = model(ids).logits
        want = peft_model(ids, adapter_names=[n or "__base__" for n in names]).logits
        ok &= check(f"mixed batch {names} vs PEFT adapter_names=", mixed, want)
        adaptkern.set_adapter(model, None)
        base = model(ids).logits
        ok &= torch.equal(mixed[1], base[1]) and bool((mixed[[0, 2]] - base[[0, 2]]).abs().max() > 0.1)
    print("all outputs match" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
