"""AdapterLinear and a patched tiny Llama under DistributedDataParallel and FSDP2, two CPU processes (gloo).

Each rank gets half of a fixed batch; its loss is the mean over its half, so DDP's and
FSDP2's gradient averaging must give the gradient of the mean over the full batch, which a
single process computes here. After one optimizer step (SGD with weight decay, given *all*
parameters), adapter parameters must equal the single-process step and every frozen base
parameter must be bit-identical to its initial value (no gradient reached it, no decay
applied to it).

The two ranks are spawned once per module (``torch.multiprocessing.spawn``; children import
this file, and inherit ``TRITON_INTERPRET=1`` through ``os.environ``, set by conftest before
the spawn; each rank reports what it saw). The kernels run in the interpreter in each rank.

Tolerance: fp32; the distributed gradient is a different summation order of the same sum
(two halves averaged), so it matches to rounding (rtol 1e-5, atol 1e-6 on values of ~1e-2–1).
"""

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
BATCH = 8  # rows (linear model) or sequences (Llama), split in halves
SCENARIOS = ("ddp-linear", "ddp-llama", "fsdp2-linear", "fsdp2-llama")
LR, WD = 0.1, 0.01


# -- models, data and one training step, shared by the ranks and the single-process reference --------


def build_linear():
    """Two AdapterLinear layers: LoRA on the first, a sequential bottleneck on the second; base frozen."""
    from adaptkern.nn import AdapterLinear

    torch.manual_seed(0)
    model = nn.Sequential(AdapterLinear(12, 20), nn.Tanh(), AdapterLinear(20, 10))
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].add_lora("l", r=4, alpha=8)
    model[2].add_bottleneck("b", 6, activation="gelu", scale=0.5)
    with torch.no_grad():  # non-zero up-projections, so every adapter parameter gets a gradient
        model[0].adapters["l"].lora_B.normal_(0, 0.3)
        model[2].adapters["b"].up_weight.normal_(0, 0.3)
        model[2].adapters["b"].up_bias.normal_(0, 0.1)
    return model


def linear_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 5, 12, generator=g), torch.randn(BATCH, 5, 10, generator=g)


def linear_loss(model, batch):
    x, target = batch
    return nn.functional.mse_loss(model(x), target)


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptkern.integrations.patching import add_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    add_lora(model, "l", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    return model


def llama_batch():
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, 64, (BATCH, 6), generator=g),)


def llama_loss(model, batch):
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


BUILD = {"linear": (build_linear, linear_batch, linear_loss), "llama": (build_llama, llama_batch, llama_loss)}


def full(t):
    """A plain tensor from a parameter or gradient (FSDP2 holds sharded DTensors)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train_step(model, batch, loss_fn):
    """Forward, backward, one SGD step over all parameters; returns the state the tests compare."""
    initial = {n: full(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    after = {n: full(p) for n, p in model.named_parameters()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return dict(grads=grads, initial=initial, after=after, trainable=trainable, loss=loss.detach())


def canonical(name):
    """Parameter name without the wrappers' prefixes (DDP's ``module.``)."""
    return name[len("module."):] if name.startswith("module.") else name


# -- the ranks ------------------------------------------------------------------------------------------


def _run_scenario(scenario, rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    wrapper, kind = scenario.split("-")
    build, make_batch, loss_fn = BUILD[kind]
    model = build()
    half = BATCH // WORLD
    batch = tuple(t[rank * half:(rank + 1) * half] for t in make_batch())
    if wrapper == "ddp":
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
        blocks = model.model.layers if kind == "llama" else [model[0], model[2]]
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    from torch.distributed.tensor import DTensor

    sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    result = train_step(model, batch, loss_fn)
    result["sharded"] = sharded
    for key in ("grads", "initial", "after"):
        result[key] = {canonical(n): t for n, t in result[key].items()}
    result["trainable"] = [canonical(n) for n in result["trainable"]]
    result["sharded"] = {canonical(n): v for n, v in result["sharded"].items()}
    return result


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    report = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    from adaptkern.ops.common import use_triton

    report["use_triton_cpu"] = use_triton(torch.zeros(1))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        for scenario in SCENARIOS:
            try:
                report[scenario] = _run_scenario(scenario, rank)
            except Exception:
                report[scenario] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the two ranks once; returns their reports."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    out_dir = str(tmp_path_factory.mktemp("dist"))
    context = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            pytest.fail("the distributed ranks did not finish within 300 s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The single-process run on the full batch."""
    out = {}
    for kind, (build, make_batch, loss_fn) in BUILD.items():
        out[kind] = train_step(build(), make_batch(), loss_fn)
    return out


def _result(ranks, scenario):
    results = [r[scenario] for r in ranks]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        pytest.fail(f"{scenario} failed in a rank:\n{errors[0]}")
    return results


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, conftest leaves the interpreter off")
def test_ranks_run_the_kernels_in_the_interpreter(ranks):
    for r in ranks:
        assert r["TRITON_INTERPRET"] == "1" and r["use_triton_cpu"], r


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_wrapping_took_effect(ranks, scenario):
    for res in _result(ranks, scenario):
        # FSDP2: every parameter, frozen base and adapter alike, is a sharded DTensor; DDP: none is
        assert set(res["sharded"].values()) == {scenario.startswith("fsdp2")}, res["sharded"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_adapter_grads_equal_single_process(ranks, single, scenario):
    ref = single[scenario.split("-")[1]]
    for rank, res in enumerate(_result(ranks, scenario)):
        assert res["trainable"] == ref["trainable"]
        assert sorted(res["grads"]) == ref["trainable"] == sorted(ref["grads"]), "only adapter parameters get grads"
        assert all(".adapters." in n for n in ref["trainable"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"{scenario} rank {r} grad {n}: {m}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_step_matches_and_frozen_base_is_bit_identical(ranks, single, scenario):
    ref = single[scenario.split("-")[1]]
    results = _result(ranks, scenario)
    for rank, res in enumerate(results):
        assert sorted(res["after"]) == sorted(ref["after"])
        for name, value in res["after"].items():
            if name in ref["trainable"]:
                assert not torch.equal(value, res["initial"][name]), f"{name} did not train"
                torch.testing.assert_close(value, ref["after"][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, r=rank: f"{scenario} rank {r} {n}: {m}")
            else:
                assert torch.equal(value, res["initial"][name]), f"{scenario} rank {rank}: frozen {name} changed"
                assert torch.equal(value, ref["initial"][name]), f"{scenario} rank {rank}: {name} differs at init"
    for name in results[0]["after"]:  # the ranks agree exactly
        assert torch.equal(results[0]["after"][name], results[1]["after"][name]), f"{scenario}: ranks differ on {name}"
