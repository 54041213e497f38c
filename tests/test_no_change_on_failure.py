"""Nothing changes on failure: every mutating public call that refuses its arguments leaves all state bitwise as
it was ("all checks first, then the write").

For each call (AdapterPool.load_lora / load_bottleneck / evict; AdapterLinear.add_lora / add_bottleneck /
delete_adapter / merge / unmerge / set_adapter; the model-level patch / add_lora / add_bottleneck /
set_adapter / load_peft / load_adapterhub / from_peft_model) a snapshot takes every tensor bitwise (with its
dtype, shape, storage address and requires_grad: the state dict, the pool's stacks, non-persistent buffers)
and every plain Python attribute of every module and of the pool (active and merged adapter, pool.kinds,
adapter hyper-parameters, training flags, module types). Then the call is provoked to fail (bad types,
NaN/Inf, alpha=nan, scale="1", dropout=None, wrong shapes, overflow on the cast to an fp16 pool or model,
scale=1e39, unknown names, broken checkpoint files), and the test asserts that it raised a ValueError,
TypeError or NotImplementedError (FileNotFoundError for a missing file) naming the culprit - not an
AttributeError, IndexError or RuntimeError from deep inside - and that the snapshot is bitwise the same.

The functional and serving ops (dora_linear, dora_weight_norm, qlora_linear, bottleneck_norm, lora_shrink,
lora_expand, add_lora_delta, mixed_lora_embedding, mixed_lora_linear with output_slices) and
SlotMapping.update_ are held to the same: their arguments (the caller's out / y buffers, a SlotMapping's
buffers) and the global RNG state stay bitwise as they were, and no kernel launches before the error.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptkern import AdapterLinear, AdapterPool

from .helpers import count_launches

CLEAN = (ValueError, TypeError, NotImplementedError)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapterhub")

# -- the snapshot ------------------------------------------------------------------------------------------------


def canon(v, depth=0, ptr=True):
    """A comparable, bitwise picture of ``v``: tensors by dtype, shape, address (with ``ptr``), requires_grad
    and bytes; containers and adaptkern objects recursively."""
    if isinstance(v, torch.Tensor):
        t = v.detach()
        raw = t.cpu().contiguous().reshape(-1)
        raw = raw.view(torch.uint8) if raw.numel() else raw
        return ("tensor", str(t.dtype), tuple(t.shape), str(t.device), t.data_ptr() if ptr else None,
                v.requires_grad, bytes(raw.numpy().tobytes()) if raw.numel() else b"")
    if isinstance(v, float):
        return ("float", repr(v))  # nan == nan here
    if v is None or isinstance(v, (bool, int, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, dict):
        return ("dict", tuple((canon(k), canon(x, depth + 1, ptr)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(canon(x, depth + 1, ptr) for x in v))
    if isinstance(v, nn.Module):
        return ("module", type(v).__qualname__)  # its own contents come from named_modules()
    if type(v).__module__.startswith("adaptkern") and hasattr(v, "__dict__") and depth < 4:
        return (type(v).__qualname__, canon(vars(v), depth + 1, ptr))
    return ("object", type(v).__qualname__)


def snapshot_module(model: nn.Module):
    """Every module's attributes (parameters, buffers, python state) and the state dict, bitwise."""
    modules = {name or "<root>": {"type": type(m).__qualname__, **{k: v for k, v in vars(m).items() if k != "_modules"}}
               for name, m in model.named_modules()}
    # the state dict may hold tensors made for it (a merged layer saves W unmerged): no addresses there
    return ("dict", (("modules", canon(modules)), ("state_dict", canon(dict(model.state_dict()), ptr=False))))


def snapshot_pool(pool: AdapterPool):
    return canon(vars(pool))


TENSOR_FIELDS = ("kind", "dtype", "shape", "device", "data_ptr", "requires_grad", "bytes")


def first_difference(a, b, path="state"):
    """Where two canon() pictures first differ (None if they are the same)."""
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("tensor",):
        for name, x, y in zip(TENSOR_FIELDS, a, b):
            if x != y:
                return f"{path}: tensor {name} changed" + ("" if name == "bytes" else f": {x} -> {y}")
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("dict",):
        keys_a, keys_b = [k for k, _ in a[1]], [k for k, _ in b[1]]
        if keys_a != keys_b:
            gone, new = [k for k in keys_a if k not in keys_b], [k for k in keys_b if k not in keys_a]
            return f"{path}: keys removed {gone[:6]}, added {new[:6]}" if gone or new else f"{path}: keys reordered"
        for (k, x), (_, y) in zip(a[1], b[1]):
            diff = first_difference(x, y, f"{path}.{k}")
            if diff:
                return diff
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r:.200} -> {b!r:.200}"


def assert_fails_cleanly(snap, call, match=None, exc=CLEAN):
    """``call()`` raises one of ``exc`` (its message matching ``match``) and ``snap()`` does not change."""
    before = snap()
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is the assertion
        assert isinstance(e, exc), f"raised {type(e).__name__}: {e} (want one of {[t.__name__ for t in exc]})"
        assert match is None or re.search(match, str(e)), f"the error does not name {match!r}: {e}"
    else:
        after = snap()
        raise AssertionError(f"did not raise; state change: {first_difference(before, after) or 'none'}")
    after = snap()
    diff = first_difference(before, after)
    assert diff is None, f"raised, but changed the state: {diff}"


def rnd(*shape, std=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


# -- AdapterPool ---------------------------------------------------------------------------------------------

K, N = 6, 5


def make_pool(dtype=torch.float32):
    """Slot 0: LoRA r=2; slot 1: a sequential bottleneck; slot 2: empty."""
    pool = AdapterPool(K, N, num_slots=3, max_rank=4, dtype=dtype)
    pool.load_lora(0, rnd(2, K, dtype=dtype), rnd(N, 2, dtype=dtype), scale=1.5)
    pool.load_bottleneck(1, rnd(3, N, dtype=dtype), rnd(3, dtype=dtype), rnd(N, 3, dtype=dtype), rnd(N, dtype=dtype),
                         activation="gelu", placement="sequential", scale=0.5, base_weight=rnd(N, K, dtype=dtype),
                         base_bias=rnd(N, dtype=dtype))
    return pool


def lora_args(**over):
    args = dict(slot=0, lora_a=rnd(2, K, seed=7), lora_b=rnd(N, 2, seed=8), scale=2.0)
    args.update(over)
    return args


def bottleneck_args(**over):
    args = dict(slot=0, down_weight=rnd(3, N, seed=9), down_bias=rnd(3, seed=10), up_weight=rnd(N, 3, seed=11),
                up_bias=rnd(N, seed=12), activation="silu", placement="sequential", scale=0.75,
                base_weight=rnd(N, K, seed=13), base_bias=rnd(N, seed=14))
    args.update(over)
    return args


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


NAN, INF = float("nan"), float("inf")
POOL_LORA_CASES = {
    "slot -1": (dict(slot=-1), "slot"),
    "slot past the end": (dict(slot=3), "slot"),
    "slot str": (dict(slot="0"), "slot"),
    "slot float": (dict(slot=0.0), "slot"),
    "slot bool": (dict(slot=True), "slot"),
    "slot None": (dict(slot=None), "slot"),
    "lora_a list": (dict(lora_a=[[0.0] * K] * 2), "lora_a"),
    "lora_a int": (dict(lora_a=torch.ones(2, K, dtype=torch.int32)), "lora_a"),
    "lora_a 1-D": (dict(lora_a=rnd(K)), "lora_a"),
    "lora_a wrong K": (dict(lora_a=rnd(2, K + 1)), "lora_a"),
    "rank 0": (dict(lora_a=rnd(0, K), lora_b=rnd(N, 0)), "lora_a|rank"),
    "rank above max_rank": (dict(lora_a=rnd(5, K), lora_b=rnd(N, 5)), "rank"),
    "lora_b rank mismatch": (dict(lora_b=rnd(N, 3)), "lora_b"),
    "lora_b wrong N": (dict(lora_b=rnd(N + 1, 2)), "lora_b"),
    "lora_a NaN": (dict(lora_a=_with(rnd(2, K), (1, 2), NAN)), "lora_a"),
    "lora_b Inf": (dict(lora_b=_with(rnd(N, 2), (0, 1), -INF)), "lora_b"),
    "scale NaN": (dict(scale=NAN), "scale"),
    "scale Inf": (dict(scale=INF), "scale"),
    "scale str": (dict(scale="1"), "scale"),
    "scale None": (dict(scale=None), "scale"),
    "scale 1e39 (not finite in fp32)": (dict(scale=1e39), "scale"),
}


@pytest.mark.parametrize("case", list(POOL_LORA_CASES))
def test_pool_load_lora(case):
    pool = make_pool()
    over, match = POOL_LORA_CASES[case]
    args = lora_args(**over)
    assert_fails_cleanly(lambda: snapshot_pool(pool), lambda: pool.load_lora(**args), match)


POOL_BOTTLENECK_CASES = {
    "slot past the end": (dict(slot=3), "slot"),
    "activation unknown": (dict(activation="nope"), "activation"),
    "activation None": (dict(activation=None), "activation"),
    "placement unknown": (dict(placement="middle"), "placement"),
    "placement None": (dict(placement=None), "placement"),
    "sequential without base_weight": (dict(base_weight=None), "base_weight"),
    "base_weight wrong shape": (dict(base_weight=rnd(K, N)), "base_weight"),
    "base_weight NaN": (dict(base_weight=_with(rnd(N, K), (0, 0), NAN)), "base_weight"),
    "base_weight int": (dict(base_weight=torch.ones(N, K, dtype=torch.int64)), "base_weight"),
    "base_bias wrong shape": (dict(base_bias=rnd(N + 1)), "base_bias"),
    "base_bias Inf": (dict(base_bias=_with(rnd(N), 2, INF)), "base_bias"),
    "down_weight reads K (parallel shape)": (dict(down_weight=rnd(3, K)), "down_weight"),
    "down_weight rank above max_rank": (dict(down_weight=rnd(5, N), down_bias=rnd(5), up_weight=rnd(N, 5)), "rank"),
    "down_bias wrong shape": (dict(down_bias=rnd(4)), "down_bias"),
    "up_weight rank mismatch": (dict(up_weight=rnd(N, 2)), "up_weight"),
    "up_weight NaN": (dict(up_weight=_with(rnd(N, 3), (1, 1), NAN)), "up_weight"),
    "up_bias Inf": (dict(up_bias=_with(rnd(N), 0, INF)), "up_bias"),
    "down_weight list": (dict(down_weight=[[0.0] * N] * 3), "down_weight"),
    "scale Inf": (dict(scale=INF), "scale"),
    "scale NaN": (dict(scale=NAN), "scale"),
    "scale str": (dict(scale="1"), "scale"),
    "scale 1e39 (not finite in fp32)": (dict(scale=1e39), "scale"),
    "fold D·W + d overflows fp32": (dict(down_weight=torch.full((3, N), 1e30), base_weight=torch.full((N, K), 1e30)),
                                    None),
}


@pytest.mark.parametrize("case", list(POOL_BOTTLENECK_CASES))
def test_pool_load_bottleneck(case):
    pool = make_pool()
    over, match = POOL_BOTTLENECK_CASES[case]
    args = bottleneck_args(**over)
    assert_fails_cleanly(lambda: snapshot_pool(pool), lambda: pool.load_bottleneck(**args), match)


FP16_CASES = {
    # values finite as given, not after the cast to the pool's dtype
    "lora_a overflows fp16": lambda p: p.load_lora(0, _with(rnd(2, K), (0, 0), 1e5), rnd(N, 2), scale=1.0),
    "up_bias overflows fp16": lambda p: p.load_bottleneck(0, **bottleneck_args(up_bias=_with(rnd(N), 1, -7e4))),
    "fold D·W overflows fp16": lambda p: p.load_bottleneck(0, **bottleneck_args(down_weight=torch.full((3, N), 200.0),
                                                                                base_weight=torch.full((N, K), 200.0))),
    "scale 1e39": lambda p: p.load_lora(2, rnd(2, K), rnd(N, 2), scale=1e39),
}


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_pool_fp16_overflow(case):
    pool = make_pool(torch.float16)
    assert_fails_cleanly(lambda: snapshot_pool(pool), lambda: FP16_CASES[case](pool))


@pytest.mark.parametrize("slot", [-1, 3, "1", None, 1.0, True])
def test_pool_evict(slot):
    pool = make_pool()
    assert_fails_cleanly(lambda: snapshot_pool(pool), lambda: pool.evict(slot), "slot")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=torch.int32), "dtype"),
    (dict(dtype=torch.bool), "dtype"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(dtype="float32"), "dtype"),
], ids=["int32", "bool", "int64", "str"])
def test_pool_refuses_non_floating_dtype(kwargs, match):
    """an integer pool would truncate every adapter."""
    with pytest.raises(CLEAN, match=match):
        AdapterPool(K, N, num_slots=2, max_rank=2, **kwargs)


# -- AdapterLinear -------------------------------------------------------------------------------------------


def make_layer(dtype=torch.float32, merged=False):
    """Adapters "a" (LoRA r=2, active), "b" (LoRA r=3), "s" (sequential bottleneck), "p" (parallel), all non-zero;
    with ``merged``, "a" is merged into W."""
    torch.manual_seed(0)
    layer = AdapterLinear(K, N, dtype=dtype)
    layer.add_lora("a", 2, alpha=4.0)
    layer.add_lora("b", 3)
    layer.add_bottleneck("s", 3, activation="gelu", placement="sequential", scale=0.5)
    layer.add_bottleneck("p", 2, activation="relu", placement="parallel")
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(0.0, 0.5)
    layer.set_adapter("s")
    with torch.no_grad():  # fill whatever a forward caches (the sequential fold)
        layer(torch.randn(3, K, dtype=dtype))
    layer.set_adapter("a")
    if merged:
        layer.merge("a")
    return layer


LAYER_CASES = {
    # add_lora
    "add_lora existing name": (lambda m: m.add_lora("a", 2), "'a'|name"),
    "add_lora empty name": (lambda m: m.add_lora("", 2), "name"),
    "add_lora dotted name": (lambda m: m.add_lora("x.y", 2), "name"),
    "add_lora name int": (lambda m: m.add_lora(3, 2), "name"),
    "add_lora name None": (lambda m: m.add_lora(None, 2), "name"),
    "add_lora r=0": (lambda m: m.add_lora("n", 0), r"\br\b"),
    "add_lora r=-1": (lambda m: m.add_lora("n", -1), r"\br\b"),
    "add_lora r=1.5": (lambda m: m.add_lora("n", 1.5), r"\br\b"),
    "add_lora r='2'": (lambda m: m.add_lora("n", "2"), r"\br\b"),
    "add_lora r=True": (lambda m: m.add_lora("n", True), r"\br\b"),
    "add_lora r=None": (lambda m: m.add_lora("n", None), r"\br\b"),
    "add_lora alpha=nan": (lambda m: m.add_lora("n", 2, alpha=NAN), "alpha"),
    "add_lora alpha=inf": (lambda m: m.add_lora("n", 2, alpha=INF), "alpha"),
    "add_lora alpha='x'": (lambda m: m.add_lora("n", 2, alpha="x"), "alpha"),
    "add_lora alpha=[]": (lambda m: m.add_lora("n", 2, alpha=[]), "alpha"),
    "add_lora dropout=None": (lambda m: m.add_lora("n", 2, dropout=None), "dropout"),
    "add_lora dropout='0.1'": (lambda m: m.add_lora("n", 2, dropout="0.1"), "dropout"),
    "add_lora dropout=1.0": (lambda m: m.add_lora("n", 2, dropout=1.0), "dropout"),
    "add_lora dropout=-0.1": (lambda m: m.add_lora("n", 2, dropout=-0.1), "dropout"),
    "add_lora dropout=nan": (lambda m: m.add_lora("n", 2, dropout=NAN), "dropout"),
    # add_bottleneck
    "add_bottleneck existing name": (lambda m: m.add_bottleneck("s", 2), "'s'|name"),
    "add_bottleneck size=0": (lambda m: m.add_bottleneck("n", 0), "size|rank"),
    "add_bottleneck size=2.5": (lambda m: m.add_bottleneck("n", 2.5), "size|rank"),
    "add_bottleneck size='4'": (lambda m: m.add_bottleneck("n", "4"), "size|rank"),
    "add_bottleneck activation unknown": (lambda m: m.add_bottleneck("n", 2, activation="nope"), "activation"),
    "add_bottleneck activation None": (lambda m: m.add_bottleneck("n", 2, activation=None), "activation"),
    "add_bottleneck placement unknown": (lambda m: m.add_bottleneck("n", 2, placement="middle"), "placement"),
    "add_bottleneck placement None": (lambda m: m.add_bottleneck("n", 2, placement=None), "placement"),
    "add_bottleneck scale=nan": (lambda m: m.add_bottleneck("n", 2, scale=NAN), "scale"),
    "add_bottleneck scale=inf": (lambda m: m.add_bottleneck("n", 2, scale=INF), "scale"),
    "add_bottleneck scale='1'": (lambda m: m.add_bottleneck("n", 2, scale="1"), "scale"),
    "add_bottleneck scale=None": (lambda m: m.add_bottleneck("n", 2, scale=None), "scale"),
    "add_bottleneck scale=1e39": (lambda m: m.add_bottleneck("n", 2, scale=1e39), "scale"),
    # delete_adapter / set_adapter
    "delete_adapter unknown": (lambda m: m.delete_adapter("nope"), "nope"),
    "delete_adapter None": (lambda m: m.delete_adapter(None), None),
    "delete_adapter int": (lambda m: m.delete_adapter(0), None),
    "set_adapter unknown": (lambda m: m.set_adapter("nope"), "nope"),
    "set_adapter int": (lambda m: m.set_adapter(0), None),
    "set_adapter list": (lambda m: m.set_adapter(["a"]), None),
    # merge / unmerge
    "merge unknown": (lambda m: m.merge("nope"), "nope"),
    "merge a bottleneck": (lambda m: m.merge("s"), "'s'|LoRA"),
    "merge None": (lambda m: m.merge(None), None),
    "unmerge with nothing merged": (lambda m: m.unmerge(), "merged"),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_adapter_linear(case):
    layer = make_layer()
    call, match = LAYER_CASES[case]
    assert_fails_cleanly(lambda: snapshot_module(layer), lambda: call(layer), match)


def _set_huge(name, value):
    def edit(layer):
        with torch.no_grad():
            for p in layer.adapters[name].parameters():
                p.fill_(value)
    return edit


MERGED_CASES = {
    "merge while merged": (lambda m: m.merge("b"), "merged"),
    "merge the merged adapter again": (lambda m: m.merge("a"), "merged"),
    "delete the merged adapter": (lambda m: m.delete_adapter("a"), "merged|unmerge"),
    "add_lora alpha=nan while merged": (lambda m: m.add_lora("n", 2, alpha=NAN), "alpha"),
    "mixed batch while merged": (lambda m: m(torch.randn(2, K), adapter_ids=torch.tensor([0, -1])), "merge"),
}


@pytest.mark.parametrize("case", list(MERGED_CASES))
def test_adapter_linear_merged(case):
    layer = make_layer(merged=True)
    call, match = MERGED_CASES[case]
    assert_fails_cleanly(lambda: snapshot_module(layer), lambda: call(layer), match)


@pytest.mark.parametrize("target", [None, "b", "s"])
def test_set_adapter_while_merged_either_unmerges_or_changes_nothing(target):
    """Either is right: unmerge (then the merged adapter no longer applies) or refuse, untouched."""
    layer = make_layer(merged=True)
    before = snapshot_module(layer)
    try:
        layer.set_adapter(target)
    except CLEAN:
        assert first_difference(before, snapshot_module(layer)) is None
    else:
        assert layer.merged_adapter is None and layer.active_adapter == target


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e30), (torch.float16, 300.0), (torch.bfloat16, 1e30),
                                          (torch.float32, NAN)], ids=["fp32-overflow", "fp16-overflow",
                                                                      "bf16-overflow", "nan-adapter"])
def test_merge_refuses_non_finite_result(dtype, value):
    """PEFT's safe_merge: a merge whose W + s·B·A is not finite raises and leaves W untouched."""
    layer = make_layer(dtype)
    _set_huge("a", value)(layer)
    assert_fails_cleanly(lambda: snapshot_module(layer), lambda: layer.merge("a"))


# -- model level: patch / add_lora / add_bottleneck / set_adapter ---------------------------------------------

DEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**DEC)).eval()


def llama_with_adapter():
    """A partly patched model: LoRA "a" on q_proj and v_proj (non-zero), active."""
    from adaptkern.integrations import add_lora

    model = add_lora(tiny_llama(), "a", r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return model


def _integrations():
    from adaptkern import integrations

    return integrations


MODEL_CASES = {
    "patch matches nothing": (lambda i, m: i.patch(m, ["nope"]), "nope|match"),
    "patch bad regex": (lambda i, m: i.patch(m, "q_proj["), "regex|target_modules"),
    "patch target_modules int": (lambda i, m: i.patch(m, 3), "target_modules"),
    "add_lora name clash": (lambda i, m: i.add_lora(m, "a", r=2, target_modules=["q_proj"]), "'a'"),
    "add_lora name clash on some targets": (lambda i, m: i.add_lora(m, "a", r=2, target_modules=["k_proj", "q_proj"]),
                                            "'a'"),
    "add_lora dotted name": (lambda i, m: i.add_lora(m, "x.y", r=2, target_modules=["k_proj"]), "name"),
    "add_lora r=0": (lambda i, m: i.add_lora(m, "n", r=0, target_modules=["k_proj"]), r"\br\b"),
    "add_lora r='2'": (lambda i, m: i.add_lora(m, "n", r="2", target_modules=["k_proj"]), r"\br\b"),
    "add_lora alpha=nan": (lambda i, m: i.add_lora(m, "n", r=2, alpha=NAN, target_modules=["k_proj"]), "alpha"),
    "add_lora alpha='x'": (lambda i, m: i.add_lora(m, "n", r=2, alpha="x", target_modules=["k_proj"]), "alpha"),
    "add_lora dropout=None": (lambda i, m: i.add_lora(m, "n", r=2, dropout=None, target_modules=["k_proj"]),
                              "dropout"),
    "add_lora targets nothing": (lambda i, m: i.add_lora(m, "n", r=2, target_modules=["nope"]), "nope|match"),
    "add_bottleneck scale='1'": (lambda i, m: i.add_bottleneck(m, "n", 4, target_modules=["o_proj"], scale="1"),
                                 "scale"),
    "add_bottleneck scale=inf": (lambda i, m: i.add_bottleneck(m, "n", 4, target_modules=["o_proj"], scale=INF),
                                 "scale"),
    "add_bottleneck activation unknown": (
        lambda i, m: i.add_bottleneck(m, "n", 4, target_modules=["o_proj"], activation="nope"), "activation"),
    "add_bottleneck placement unknown": (
        lambda i, m: i.add_bottleneck(m, "n", 4, target_modules=["o_proj"], placement="middle"), "placement"),
    "add_bottleneck size=0": (lambda i, m: i.add_bottleneck(m, "n", 0, target_modules=["o_proj"]), "size|rank"),
    "add_bottleneck name clash": (lambda i, m: i.add_bottleneck(m, "a", 4, target_modules=["v_proj"]), "'a'"),
    "set_adapter unknown": (lambda i, m: i.set_adapter(m, "nope"), "nope"),
    "set_adapter int": (lambda i, m: i.set_adapter(m, 3), None),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_level(case):
    integrations = _integrations()
    model = llama_with_adapter()
    call, match = MODEL_CASES[case]
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: call(integrations, model), match)


# -- load_peft with broken checkpoints ----------------------------------------------------------------------------

PEFT_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def peft_checkpoint(tmp_path_factory):
    """A PEFT LoRA directory written by the real peft package (q_proj and k_proj, r=4, B non-zero)."""
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("peft")
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    pm.save_pretrained(path)
    return path


def _edit_config(**changes):
    def edit(path):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(fn):
    def edit(path):
        w = load_file(path / "adapter_model.safetensors")
        fn(w)
        save_file(w, path / "adapter_model.safetensors")
    return edit


def _truncate(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])


def _set(key, index, value):
    return lambda w: w[key].__setitem__(index, value)


LOAD_PEFT_CASES = {
    "NaN weight": (_edit_weights(_set(PEFT_KEY, (0, 0), NAN)), "NaN|Inf", CLEAN),
    "Inf weight": (_edit_weights(_set(PEFT_KEY, (1, 3), -INF)), "NaN|Inf", CLEAN),
    "shape mismatch": (_edit_weights(lambda w: w.__setitem__(PEFT_KEY, torch.zeros(4, 31))), "shape", CLEAN),
    "missing key": (_edit_weights(lambda w: w.pop(PEFT_KEY)), "missing", CLEAN),
    "truncated file": (_truncate, "safetensors", CLEAN),
    "no weights file": (lambda p: os.remove(p / "adapter_model.safetensors"), None, CLEAN + (FileNotFoundError,)),
    "config r mismatch": (_edit_config(r=5), "shape", CLEAN),
    "config not json": (lambda p: (p / "adapter_config.json").write_text("{"), "JSON", CLEAN),
    "lora_dropout=None": (_edit_config(lora_dropout=None), "lora_dropout", CLEAN),
    "lora_alpha='x'": (_edit_config(lora_alpha="x"), "lora_alpha|alpha", CLEAN),
    # DoRA loads now: a DoRA config over a file without magnitude vectors is refused, naming them
    "use_dora without magnitudes": (_edit_config(use_dora=True), "lora_magnitude_vector", CLEAN),
    # PEFT rewrites the base weight for these initialisations when it loads them saved as is
    "init pissa": (_edit_config(init_lora_weights="pissa"), "init_lora_weights", (NotImplementedError,)),
    "init pissa_niter_4": (_edit_config(init_lora_weights="pissa_niter_4"), "init_lora_weights",
                           (NotImplementedError,)),
    "init olora": (_edit_config(init_lora_weights="olora"), "init_lora_weights", (NotImplementedError,)),
    "init corda": (_edit_config(init_lora_weights="corda"), "init_lora_weights", (NotImplementedError,)),
    "init loftq": (_edit_config(init_lora_weights="loftq"), "init_lora_weights", (NotImplementedError,)),
}


@pytest.mark.parametrize("case", list(LOAD_PEFT_CASES))
def test_load_peft_broken(case, peft_checkpoint, tmp_path):
    from adaptkern.integrations import load_peft

    path = tmp_path / "adapter"
    shutil.copytree(peft_checkpoint, path)
    corrupt, match, exc = LOAD_PEFT_CASES[case]
    corrupt(path)
    model = llama_with_adapter()
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: load_peft(model, str(path), adapter_name="new"),
                         match, exc)


def test_load_peft_name_clash(peft_checkpoint):
    from adaptkern.integrations import load_peft

    model = llama_with_adapter()
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: load_peft(model, str(peft_checkpoint),
                                                                           adapter_name="a"), "'a'")
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: load_peft(model, str(peft_checkpoint),
                                                                           adapter_name="x.y"), "adapter_name")


def test_from_peft_model_refusal_leaves_the_peft_model_alone():
    """A merged PeftModel is refused (NotImplementedError) before any layer is replaced."""
    from peft import LoraConfig, get_peft_model

    from adaptkern.integrations import from_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    pm.base_model.model.model.layers[1].self_attn.v_proj.merge()  # one merged layer, the last one converted
    assert_fails_cleanly(lambda: snapshot_module(pm), lambda: from_peft_model(pm), "merge")


# -- load_adapterhub with broken checkpoints ----------------------------------------------------------------------

HUB_KEY = "encoder.layer.0.output.adapters.houlsby.adapter_down.0.weight"


def bert(dtype=torch.float32):
    from transformers import BertConfig, BertModel

    with open(os.path.join(FIXTURES, "bert", "model_config.json")) as f:
        kwargs = json.load(f)
    model = BertModel(BertConfig(**kwargs, attn_implementation="eager"))
    model.load_state_dict(load_file(os.path.join(FIXTURES, "bert", "base_model.safetensors")), strict=False)
    return model.to(dtype).eval()


def _hub_weights(fn):
    def edit(path):
        w = load_file(path / "adapter.safetensors")
        fn(w)
        save_file(w, path / "adapter.safetensors")
    return edit


def _hub_config(**changes):
    def edit(path):
        saved = json.loads((path / "adapter_config.json").read_text())
        saved["config"].update(changes)
        (path / "adapter_config.json").write_text(json.dumps(saved))
    return edit


HUB_CASES = {
    "NaN weight": (_hub_weights(_set(HUB_KEY, (1, 2), NAN)), "NaN|Inf", torch.float32),
    "shape mismatch": (_hub_weights(lambda w: w.__setitem__(HUB_KEY, torch.zeros(4, 32))), "shape", torch.float32),
    "missing key": (_hub_weights(lambda w: w.pop(HUB_KEY)), "missing", torch.float32),
    "truncated file": (lambda p: (p / "adapter.safetensors").write_bytes(
        (p / "adapter.safetensors").read_bytes()[:-100]), "safetensors", torch.float32),
    "reduction_factor -2": (_hub_config(reduction_factor=-2), "reduction_factor", torch.float32),
    "non_linearity unknown": (_hub_config(non_linearity="nope"), "non_linearity|activation", torch.float32),
    # finite in the file (fp32), Inf once cast to the fp16 model: must be refused like an Inf in the file
    "overflow on the cast to an fp16 model": (_hub_weights(_set(HUB_KEY, (0, 0), 1e6)), "Inf|overflow|float16",
                                              torch.float16),
}


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_load_adapterhub_broken(case, tmp_path):
    from adaptkern.integrations import load_adapterhub

    path = tmp_path / "houlsby"
    shutil.copytree(os.path.join(FIXTURES, "bert", "houlsby"), path)
    corrupt, match, dtype = HUB_CASES[case]
    corrupt(path)
    model = bert(dtype)
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: load_adapterhub(model, path), match)


def test_load_adapterhub_name_clash_and_missing_dir(tmp_path):
    from adaptkern.integrations import load_adapterhub

    model = bert()
    load_adapterhub(model, os.path.join(FIXTURES, "bert", "seq_relu"), adapter_name="a")
    assert_fails_cleanly(lambda: snapshot_module(model),
                         lambda: load_adapterhub(model, os.path.join(FIXTURES, "bert", "houlsby"), adapter_name="a"),
                         "'a'")
    assert_fails_cleanly(lambda: snapshot_module(model), lambda: load_adapterhub(model, tmp_path / "nowhere"),
                         "nowhere", CLEAN + (FileNotFoundError,))


# -- functional and serving ops: arguments, the caller's buffers and the RNG stay as they were ----------------------


def snapshot_args(args: dict):
    """Every argument bitwise (tensors with their addresses; a SlotMapping's buffers and num_tokens), and the
    global RNG state (dropout draws its seed from it)."""
    return ("dict", (("args", canon(args)), ("rng", canon(torch.get_rng_state(), ptr=False))))


def without_launches(call):
    """``call`` wrapped to fail when any Triton kernel launched before it raised: every check comes first."""
    def run():
        with count_launches() as launches:
            try:
                call()
            finally:
                assert not launches, f"kernels launched before the error: {dict(launches)}"
    return run


def fails_cleanly(fn, args, match):
    assert_fails_cleanly(lambda: snapshot_args(args), without_launches(lambda: fn(**args)), match)


# Cases that fail today (none at present): bugs reported to the owners of those functions, "function: case"
# -> the bug (pinned as strict xfails: fixing one makes its case pass, and then its entry must go).
KNOWN_BUGS: dict[str, str] = {}


def cases(function, table):
    """The parameters of ``function``'s case table; a known bug's case is marked xfail(strict=True), the bug as
    its reason (only the assertions of this file may fail it)."""
    def param(case):
        bug = KNOWN_BUGS.get(f"{function}: {case}")
        return case if bug is None else pytest.param(case, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                                                   reason=bug))
    return [param(c) for c in table]


R, S = 2, 3


def dora_args(**over):
    args = dict(x=rnd(4, K, seed=20), weight=rnd(N, K, seed=21), bias=rnd(N, seed=22), lora_a=rnd(R, K, seed=23),
                lora_b=rnd(N, R, seed=24), magnitude=rnd(N, seed=25) + 1.0, scale=0.5, dropout=0.1)
    args.update(over)
    return args


DORA_CASES = {
    "x wrong K": (dict(x=rnd(4, K + 1)), "x"),
    "x int": (dict(x=torch.ones(4, K, dtype=torch.int64)), "x"),
    "x list": (dict(x=[[0.0] * K] * 4), "x"),
    "weight 1-D": (dict(weight=rnd(K)), "weight"),
    "bias wrong N": (dict(bias=rnd(N + 1)), "bias"),
    "bias int": (dict(bias=torch.ones(N, dtype=torch.int32)), "bias"),
    "lora_a wrong K": (dict(lora_a=rnd(R, K + 1)), "lora_a"),
    "lora_a None": (dict(lora_a=None), "lora_a"),
    "rank 0": (dict(lora_a=rnd(0, K), lora_b=rnd(N, 0)), "rank"),
    "lora_b rank mismatch": (dict(lora_b=rnd(N, R + 1)), "lora_b"),
    "lora_b wrong N": (dict(lora_b=rnd(N + 1, R)), "lora_b"),
    "magnitude wrong N": (dict(magnitude=rnd(N + 1)), "magnitude"),
    "magnitude 2-D": (dict(magnitude=rnd(1, N)), "magnitude"),
    "magnitude None": (dict(magnitude=None), "magnitude"),  # not plain LoRA: m is required
    "scale NaN": (dict(scale=NAN), "scale"),
    "scale 1e39 (not finite in fp32)": (dict(scale=1e39), "scale"),
    "scale str": (dict(scale="1"), "scale"),
    "dropout 1.0": (dict(dropout=1.0), "dropout"),
    "dropout None": (dict(dropout=None), "dropout"),
}


@pytest.mark.parametrize("case", cases("dora_linear", DORA_CASES))
def test_dora_linear(case):
    from adaptkern.dora import dora_linear

    over, match = DORA_CASES[case]
    fails_cleanly(dora_linear, dora_args(**over), match)


DORA_NORM_CASES = {
    "weight int": (dict(weight=torch.ones(N, K, dtype=torch.int64)), "weight"),
    "weight 3-D": (dict(weight=rnd(1, N, K)), "weight"),
    "lora_a wrong K": (dict(lora_a=rnd(R, K - 1)), "lora_a"),
    "lora_b wrong N": (dict(lora_b=rnd(N - 1, R)), "lora_b"),
    "rank 0": (dict(lora_a=rnd(0, K), lora_b=rnd(N, 0)), "rank"),
    "scale Inf": (dict(scale=INF), "scale"),
    "scale None": (dict(scale=None), "scale"),
}


@pytest.mark.parametrize("case", cases("dora_weight_norm", DORA_NORM_CASES))
def test_dora_weight_norm(case):
    from adaptkern.dora import dora_weight_norm

    over, match = DORA_NORM_CASES[case]
    args = {k: v for k, v in dora_args(**over).items() if k in ("weight", "lora_a", "lora_b", "scale")}
    fails_cleanly(dora_weight_norm, args, match)


BLOCK, QK = 32, 16  # W [N, QK]: three blocks of 32


def quantized_weight():
    """A 4-bit NF4 W [N, QK] as plain tensors (random codes and block scales: any bytes are a weight)."""
    from adaptkern.quantized import QuantizedWeight, _code

    g = torch.Generator().manual_seed(30)
    data = torch.randint(0, 256, ((N * QK + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(-(-N * QK // BLOCK), generator=g) + 0.5
    return QuantizedWeight(data, absmax, _code("nf4", data.device), (N, QK), BLOCK, "nf4", torch.bfloat16)


def qlora_args(**over):
    args = dict(x=rnd(4, QK, seed=31), weight=quantized_weight(), quant_state=None, bias=rnd(N, seed=32),
                lora_a=rnd(R, QK, seed=33), lora_b=rnd(N, R, seed=34), scale=0.5, dropout=0.1, route="auto")
    args.update(over)
    return args


QLORA_CASES = {
    "weight list": (dict(weight=[0] * 15), "weight"),
    "packed tensor without a quant state": (dict(weight=torch.zeros(40, dtype=torch.uint8)), "quant state"),
    "quant_state beside a QuantizedWeight": (dict(quant_state=object()), "quant_state"),
    "x wrong K": (dict(x=rnd(4, QK + 2)), "x"),
    "x int": (dict(x=torch.ones(4, QK, dtype=torch.int32)), "x"),
    "x 0-D": (dict(x=torch.tensor(1.0)), "x"),
    "bias wrong N": (dict(bias=rnd(N - 1)), "bias"),
    "lora_a wrong K": (dict(lora_a=rnd(R, QK + 1)), "lora_a"),
    "lora_b rank mismatch": (dict(lora_b=rnd(N, R + 1)), "lora_b"),
    "lora_b 1-D": (dict(lora_b=rnd(N)), "lora_b"),
    "rank 0": (dict(lora_a=rnd(0, QK), lora_b=rnd(N, 0)), "rank"),
    "scale NaN": (dict(scale=NAN), "scale"),
    "scale bool": (dict(scale=True), "scale"),
    "dropout -0.1": (dict(dropout=-0.1), "dropout"),
    "route unknown": (dict(route="fast"), "route"),
    "onepass above its rank": (dict(lora_a=rnd(130, QK), lora_b=rnd(N, 130), route="onepass"), "onepass"),
    # a QuantizedWeight built by hand gets from_bnb's checks too ("Errors: as from_bnb for the weight")
    "QuantizedWeight data short by 10 bytes": (dict(weight=quantized_weight()._replace(
        data=quantized_weight().data[:30])), "bytes|data"),  # a view: the bytes past it exist (no crash)
    "QuantizedWeight absmax short by one block": (dict(weight=quantized_weight()._replace(
        absmax=quantized_weight().absmax[:-1])), "absmax"),  # a view, as above
    "QuantizedWeight dtype int8": (dict(weight=quantized_weight()._replace(dtype=torch.int8)), "dtype"),
    "QuantizedWeight shape 3-D": (dict(weight=quantized_weight()._replace(shape=(1, N, QK))), "shape"),
}


@pytest.mark.parametrize("case", cases("qlora_linear", QLORA_CASES))
def test_qlora_linear(case):
    from adaptkern.quantized import qlora_linear

    over, match = QLORA_CASES[case]
    fails_cleanly(qlora_linear, qlora_args(**over), match)


def _edit_state(**changes):
    def edit(qs):
        for k, v in changes.items():
            setattr(qs, k, v)
    return edit


BNB_CASES = {
    "shape does not match the bytes": (_edit_state(shape=torch.Size([N + 1, QK])), "bytes"),
    "absmax count": (lambda qs: setattr(qs, "absmax", qs.absmax[:-1]), "absmax"),
    "quant type int8": (_edit_state(quant_type="int8"), "quant type"),
    "block size 48": (_edit_state(blocksize=48), "block size"),
    "dtype float64": (_edit_state(dtype=torch.float64), "dtype"),
}


@pytest.mark.parametrize("case", cases("qlora_linear from_bnb", BNB_CASES))
def test_qlora_linear_bad_bnb_quant_state(case):
    """A bitsandbytes QuantState that does not describe its packed bytes (or that adaptkern cannot read)."""
    bf = pytest.importorskip("bitsandbytes.functional")
    from adaptkern.quantized import qlora_linear

    packed, qs = bf.quantize_4bit(rnd(N, QK, seed=35).to(torch.bfloat16), blocksize=64, quant_type="nf4")
    edit, match = BNB_CASES[case]
    edit(qs)
    args = qlora_args(weight=packed, quant_state=qs)
    exc = (ValueError,) if "bytes" in match or "absmax" in match else (NotImplementedError,)
    assert_fails_cleanly(lambda: snapshot_args(args), without_launches(lambda: qlora_linear(**args)), match, exc)


def bottleneck_norm_args(**over):
    args = dict(x=rnd(4, K, seed=40), weight=rnd(N, K, seed=41), bias=rnd(N, seed=42), residual=rnd(4, N, seed=43),
                down_weight=rnd(R, N, seed=44), down_bias=rnd(R, seed=45), up_weight=rnd(N, R, seed=46),
                up_bias=rnd(N, seed=47), scale=0.5, activation="gelu", adapter_input="norm",
                coefficients=(1.0, 1.0, 0.0), norm="layernorm", norm_weight=rnd(N, seed=48) + 1.0,
                norm_bias=rnd(N, seed=49), eps=1e-5, final_norm=True)
    args.update(over)
    return args


BOTTLENECK_NORM_CASES = {
    "x wrong K": (dict(x=rnd(4, K + 1)), "x"),
    "bias without weight": (dict(weight=None, x=rnd(4, N), residual=rnd(4, N)), "bias"),
    "residual wrong rows": (dict(residual=rnd(3, N)), "residual"),
    "residual None": (dict(residual=None), "residual"),
    "down_weight reads K": (dict(down_weight=rnd(R, K)), "down_weight"),
    "down_weight size 0": (dict(down_weight=rnd(0, N), down_bias=rnd(0), up_weight=rnd(N, 0)), "size"),
    "down_bias wrong R": (dict(down_bias=rnd(R + 1)), "down_bias"),
    "up_weight rank mismatch": (dict(up_weight=rnd(N, R + 1)), "up_weight"),
    "up_bias wrong N": (dict(up_bias=rnd(N + 1)), "up_bias"),
    "norm_weight wrong N": (dict(norm_weight=rnd(N - 1)), "norm_weight"),
    "norm_bias int": (dict(norm_bias=torch.ones(N, dtype=torch.int64)), "norm_bias"),
    "scale tensor [2]": (dict(scale=rnd(2)), "scale"),
    "scale NaN": (dict(scale=NAN), "scale"),
    "scale str": (dict(scale="1"), "scale"),
    "activation unknown": (dict(activation="nope"), "activation"),
    "adapter_input unknown": (dict(adapter_input="input"), "adapter_input"),
    "coefficients pair": (dict(coefficients=(1.0, 1.0)), "coefficients"),
    "coefficients NaN": (dict(coefficients=(1.0, NAN, 0.0)), r"coefficients\[1\]"),
    "norm unknown": (dict(norm="batchnorm"), "norm"),
    "norm none with final_norm": (dict(norm="none", adapter_input="sum"), "norm"),
    "final_norm str": (dict(final_norm="yes"), "final_norm"),
    "eps 0": (dict(eps=0.0), "eps"),
    "eps bool": (dict(eps=True), "eps"),
}


@pytest.mark.parametrize("case", cases("bottleneck_norm", BOTTLENECK_NORM_CASES))
def test_bottleneck_norm(case):
    from adaptkern.bottleneck_norm import bottleneck_norm

    over, match = BOTTLENECK_NORM_CASES[case]
    fails_cleanly(bottleneck_norm, bottleneck_norm_args(**over), match)


# serving: three slices of widths (2, 2, 1) into a y [M, 8] buffer at an offset; base-only rows included
M_ROWS, WIDTHS, Y_WIDTH = 4, (2, 2, 1), 8
IDS = torch.tensor([2, -1, 0, 2])


def _stacks(seed):
    a = [rnd(S, R, K, seed=seed + i) for i in range(len(WIDTHS))]
    b = [rnd(S, n, R, seed=seed + 10 + i) for i, n in enumerate(WIDTHS)]
    return a, b


def _mapping(ids=IDS, slots=S):
    from adaptkern.slot_mapping import SlotMapping

    return SlotMapping.from_ids(ids, slots)


COMMON_SLOT_CASES = {  # what every mixed/serving op checks about ids, scales and ranks
    "ids out of range": (dict(adapter_ids=torch.tensor([2, -1, 3, 0])), "adapter_ids"),
    "ids below -1": (dict(adapter_ids=torch.tensor([-2, 0, 0, 0])), "adapter_ids"),
    "ids float": (dict(adapter_ids=torch.tensor([0.0, 1.0, 1.0, 0.0])), "adapter_ids"),
    "ids too few": (dict(adapter_ids=torch.tensor([0, 1])), "adapter_ids"),
    "ids list of str": (dict(adapter_ids=["0"] * M_ROWS), "adapter_ids"),
    "SlotMapping of other M": (dict(adapter_ids="mapping-M3"), "M=3"),
    "SlotMapping of other S": (dict(adapter_ids="mapping-S4"), "4 slots"),
    "ranks above R": (dict(ranks=torch.tensor([1, R + 1, 0], dtype=torch.int32)), "ranks"),
    "ranks negative": (dict(ranks=torch.tensor([1, -1, 0], dtype=torch.int32)), "ranks"),
    "ranks float": (dict(ranks=torch.tensor([1.0, 1.0, 1.0])), "ranks"),
    "ranks wrong length": (dict(ranks=torch.tensor([1, 1], dtype=torch.int32)), "ranks"),
}
SCALE_CASES = {
    "scales NaN": (dict(scales=torch.tensor([0.5, NAN, 1.0])), "scales"),
    "scales 1e39 (not finite in fp32)": (dict(scales=torch.tensor([1e39, 1.0, 1.0], dtype=torch.float64)), "scales"),
    "scales int": (dict(scales=torch.tensor([1, 1, 1])), "scales"),
    "scales wrong length": (dict(scales=torch.tensor([1.0, 1.0])), "scales"),
}


def _resolve(args):
    """Build the SlotMapping a case names (a fresh one per call: its buffers are part of the snapshot)."""
    ids = args.get("adapter_ids")
    if ids == "mapping-M3":
        args["adapter_ids"] = _mapping(IDS[:3])
    elif ids == "mapping-S4":
        args["adapter_ids"] = _mapping(IDS, S + 1)
    elif ids == "mapping":
        args["adapter_ids"] = _mapping()
    return args


def shrink_args(**over):
    a, _ = _stacks(50)
    args = dict(x=rnd(M_ROWS, K, seed=51), lora_a=a, adapter_ids="mapping", scales=torch.tensor([0.5, -1.0, 2.0]),
                ranks=torch.tensor([2, 1, 0], dtype=torch.int32), out=torch.full((len(WIDTHS), M_ROWS, R), 7.0))
    args.update(over)
    return _resolve(args)


SHRINK_CASES = {
    **COMMON_SLOT_CASES, **SCALE_CASES,
    "out fp64 for fp32 x": (dict(out=torch.full((3, M_ROWS, R), 7.0, dtype=torch.float64)), "out"),
    "out wrong shape": (dict(out=torch.full((3, M_ROWS, R + 1), 7.0)), "out"),
    "out strided in R": (dict(out=torch.full((3, M_ROWS, 2 * R), 7.0)[..., ::2]), "out"),
    "x 3-D": (dict(x=rnd(1, M_ROWS, K)), "x"),
    "lora_a empty list": (dict(lora_a=[]), "lora_a"),
    "lora_a slices of two S": (dict(lora_a=[rnd(S, R, K), rnd(S + 1, R, K), rnd(S, R, K)]), r"lora_a\[1\]"),
    "lora_a wrong K": (dict(lora_a=[rnd(S, R, K + 1)] * 3), r"lora_a\[0\]"),
    "x requires grad": (dict(x=rnd(M_ROWS, K).requires_grad_()), "grad"),
}


@pytest.mark.parametrize("case", cases("lora_shrink", SHRINK_CASES))
def test_lora_shrink(case):
    from adaptkern.serving import lora_shrink

    over, match = SHRINK_CASES[case]
    fails_cleanly(lora_shrink, shrink_args(**over), match)


def expand_args(**over):
    _, b = _stacks(60)
    args = dict(y=rnd(M_ROWS, Y_WIDTH, seed=61), s=rnd(len(WIDTHS), M_ROWS, R, seed=62), lora_b=b, adapter_ids=IDS,
                ranks=torch.tensor([2, 1, 0], dtype=torch.int32), output_slices=WIDTHS, offset=1, add=True)
    args.update(over)
    return _resolve(args)


EXPAND_CASES = {
    **COMMON_SLOT_CASES,
    "offset past y": (dict(offset=Y_WIDTH - sum(WIDTHS) + 1), "offset"),
    "offset negative": (dict(offset=-1), "offset"),
    "offset bool": (dict(offset=True), "offset"),
    "output_slices do not match lora_b": (dict(output_slices=(2, 1, 2)), "output_slices"),
    "output_slices too short": (dict(output_slices=(2, 2)), "output_slices"),
    "s wrong R": (dict(s=rnd(3, M_ROWS, R + 1)), r"\bs\b"),
    "s wrong rows": (dict(s=rnd(3, M_ROWS + 1, R)), r"\bs\b"),
    "add str": (dict(add="yes"), "add"),
    "y 1-D": (dict(y=rnd(Y_WIDTH)), r"\by\b"),
    "lora_b slices of two R": (dict(lora_b=[rnd(S, 2, R), rnd(S, 2, R + 1), rnd(S, 1, R)]), r"lora_b\[1\]"),
    "y requires grad": (dict(y=rnd(M_ROWS, Y_WIDTH).requires_grad_()), "grad"),
}


@pytest.mark.parametrize("case", cases("lora_expand", EXPAND_CASES))
def test_lora_expand(case):
    from adaptkern.serving import lora_expand

    over, match = EXPAND_CASES[case]
    fails_cleanly(lora_expand, expand_args(**over), match)


def delta_args(**over):
    a, b = _stacks(70)
    args = dict(y=rnd(M_ROWS, Y_WIDTH, seed=71), x=rnd(M_ROWS, K, seed=72), lora_a=a, lora_b=b, adapter_ids=IDS,
                scales=torch.tensor([0.5, -1.0, 2.0]), ranks=torch.tensor([2, 1, 0], dtype=torch.int32),
                output_slices=WIDTHS, offset=2)
    args.update(over)
    return _resolve(args)


DELTA_CASES = {
    **COMMON_SLOT_CASES, **SCALE_CASES,
    "y rows differ from x": (dict(y=rnd(M_ROWS + 1, Y_WIDTH)), r"\by\b"),
    "offset past y": (dict(offset=Y_WIDTH - sum(WIDTHS) + 1), "offset"),
    "offset float": (dict(offset=1.0), "offset"),
    "lora_a and lora_b slice counts": (dict(lora_a=_stacks(70)[0][:2]), "slices"),
    "output_slices do not match lora_b": (dict(output_slices=(1, 2, 2)), "output_slices"),
    "x wrong K": (dict(x=rnd(M_ROWS, K + 1)), r"lora_a\[0\]"),
    "lora_a single tensor, lora_b list": (dict(lora_a=rnd(S, R, K)), "slices"),
    "x requires grad": (dict(x=rnd(M_ROWS, K).requires_grad_()), "grad"),
}


@pytest.mark.parametrize("case", cases("add_lora_delta", DELTA_CASES))
def test_add_lora_delta(case):
    from adaptkern.serving import add_lora_delta

    over, match = DELTA_CASES[case]
    fails_cleanly(add_lora_delta, delta_args(**over), match)


V, D = 9, 5


def embedding_args(**over):
    args = dict(input_ids=torch.tensor([[0, 8], [3, 3]]), weight=rnd(V, D, seed=80), lora_a=rnd(S, R, V, seed=81),
                lora_b=rnd(S, D, R, seed=82), adapter_ids=torch.tensor([[2, -1], [0, 2]]),
                scales=torch.tensor([0.5, -1.0, 2.0]), ranks=torch.tensor([2, 1, 0], dtype=torch.int32))
    args.update(over)
    return _resolve(args)


EMBEDDING_CASES = {
    **{k: v for k, v in COMMON_SLOT_CASES.items() if k != "SlotMapping of other S"}, **SCALE_CASES,
    "SlotMapping of other S": (dict(adapter_ids=_mapping(IDS, S + 1)), "4 slots"),
    "input_ids float": (dict(input_ids=torch.zeros(2, 2)), "input_ids"),
    "token past the vocabulary": (dict(input_ids=torch.tensor([[0, V], [3, 3]])), "input_ids"),
    "token negative": (dict(input_ids=torch.tensor([[0, 1], [-1, 3]])), "input_ids"),
    "lora_a wrong V": (dict(lora_a=rnd(S, R, V + 1)), "lora_a"),
    "lora_b wrong D": (dict(lora_b=rnd(S, D + 1, R)), "lora_b"),
    "weight 1-D": (dict(weight=rnd(V)), "weight"),
    "weight requires grad": (dict(weight=rnd(V, D).requires_grad_()), "grad"),
}


@pytest.mark.parametrize("case", cases("mixed_lora_embedding", EMBEDDING_CASES))
def test_mixed_lora_embedding(case):
    from adaptkern.serving import mixed_lora_embedding

    over, match = EMBEDDING_CASES[case]
    fails_cleanly(mixed_lora_embedding, embedding_args(**over), match)


def sliced_linear_args(**over):
    a, b = _stacks(90)
    args = dict(x=rnd(M_ROWS, K, seed=91), weight=rnd(sum(WIDTHS), K, seed=92), bias=rnd(sum(WIDTHS), seed=93),
                lora_a=a, lora_b=b, adapter_ids=IDS, scales=torch.tensor([0.5, -1.0, 2.0]),
                ranks=torch.tensor([2, 1, 0], dtype=torch.int32), output_slices=WIDTHS)
    args.update(over)
    return _resolve(args)


SLICED_LINEAR_CASES = {
    **COMMON_SLOT_CASES, **SCALE_CASES,
    "output_slices do not sum to N": (dict(output_slices=(2, 2, 2)), "output_slices"),
    "output_slices count": (dict(output_slices=(3, 2)), "output_slices"),
    "output_slices zero width": (dict(output_slices=(5, 0, 0)), "output_slices"),
    "output_slices float": (dict(output_slices=(2.0, 2, 1)), "output_slices"),
    "output_slices int": (dict(output_slices=5), "output_slices"),
    "lora_b width differs from its slice": (dict(output_slices=(1, 2, 2)), "lora_b"),
    "lora_a one tensor": (dict(lora_a=rnd(S, R, K)), "lora_a"),
    "lora_a and lora_b slice counts": (dict(lora_b=_stacks(90)[1][:2]), "slices|output_slices"),
    "lora_a slices of two R": (dict(lora_a=[rnd(S, R, K), rnd(S, R + 1, K), rnd(S, R, K)]), r"lora_a\[1\]"),
    "bias wrong N": (dict(bias=rnd(sum(WIDTHS) + 1)), "bias"),
    "scales require grad": (dict(scales=torch.tensor([0.5, -1.0, 2.0], requires_grad=True)), "scales"),
}


@pytest.mark.parametrize("case", cases("mixed_lora_linear", SLICED_LINEAR_CASES))
def test_mixed_lora_linear_output_slices(case):
    from adaptkern.mixed import mixed_lora_linear

    over, match = SLICED_LINEAR_CASES[case]
    fails_cleanly(mixed_lora_linear, sliced_linear_args(**over), match)


SLOT_MAPPING_CASES = {
    "id S": (torch.tensor([0, S]), "adapter_ids"),
    "id -2": (torch.tensor([-2, 0]), "adapter_ids"),
    "ids float": (torch.tensor([0.0, 1.0]), "int32 or int64"),
    "ids bool": (torch.tensor([True, False]), "int32 or int64"),
    "ids 2-D": (torch.tensor([[0, 1]]), "1-D"),
    "more rows than max_tokens": (torch.zeros(M_ROWS + 1, dtype=torch.int64), "max_tokens"),
    "list with a float": ([0, 1.5], "ints"),
    "list out of range": ([0, S + 4], "adapter_ids"),
    "None": (None, "adapter_ids"),
    "an int": (3, "adapter_ids"),
    "a string": ("01", "adapter_ids"),
    "a range": (range(2), "adapter_ids"),
    "ids 0-D": (torch.tensor(1), "1-D"),
}


@pytest.mark.parametrize("case", cases("SlotMapping.update_", SLOT_MAPPING_CASES))
def test_slot_mapping_update(case):
    """A refused update_ leaves every buffer and num_tokens as the last good update left them."""
    from adaptkern.slot_mapping import SlotMapping

    mapping = SlotMapping.empty(M_ROWS, S).update_(IDS[:3])
    ids, match = SLOT_MAPPING_CASES[case]
    assert_fails_cleanly(lambda: snapshot_args(dict(mapping=mapping, ids=ids)), lambda: mapping.update_(ids), match)


# -- the snapshot itself sees what it must see ---------------------------------------------------------------------


def test_snapshot_sees_every_kind_of_change():
    """Guard for this file: a .data write, a flag, a Parameter swap, a pool scale and kinds all show."""
    layer = make_layer()
    edits = [lambda m: m.weight.data.__setitem__((0, 0), m.weight.data[0, 0] + 1e-7),
             lambda m: setattr(m, "_active", "b"),
             lambda m: setattr(m, "_merged", "a"),
             lambda m: m.adapters["s"].__setattr__("scale", 0.25),
             lambda m: m.adapters["a"].lora_B.requires_grad_(False),
             lambda m: setattr(m.adapters["a"], "lora_A", nn.Parameter(m.adapters["a"].lora_A.detach().clone())),
             lambda m: m.train(False)]
    for edit in edits:
        copy_ = copy.deepcopy(layer)
        base = snapshot_module(copy_)
        edit(copy_)
        assert first_difference(base, snapshot_module(copy_)) is not None
    pool = make_pool()
    stack = next(t for t in vars(pool).values() if isinstance(t, torch.Tensor) and t.dim() == 3)  # a weight stack
    for edit in (lambda p: p.scales.__setitem__(2, 1.0), lambda p: p.kinds.__setitem__(2, "lora"),
                 lambda p: stack[2, 0, 0].fill_(math.pi)):
        before = snapshot_pool(pool)
        edit(pool)
        assert first_difference(before, snapshot_pool(pool)) is not None
