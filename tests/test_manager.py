"""AdapterManager: outputs against a float64 reference on both paths, LRU eviction order, pinning, the
error when a batch needs more adapters than slots, and a step whose work does not depend on how many
adapters the manager holds."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptkern
from adaptkern.manager import AdapterManager
from adaptkern.testing import assert_close

from .helpers import count_launches

DIMS = [(12, 16), (16, 8)]  # (in, out) of the two AdapterLinear layers
PATHS = ["0", "2"]


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(adaptkern.AdapterLinear(*DIMS[0]), nn.ReLU(), adaptkern.AdapterLinear(*DIMS[1])).to(
        device=device, dtype=dtype).eval()


def _weights(rank, seed, paths=PATHS):
    g = torch.Generator().manual_seed(seed)
    every = {p: (torch.randn(rank, DIMS[i][0], generator=g) / 3, torch.randn(DIMS[i][1], rank, generator=g) / 3)
             for i, p in enumerate(PATHS)}
    return {p: w for p, w in every.items() if p in paths}


# name -> (rank, layers it targets, scale): ranks 1..4, one adapter on the first layer only
SPECS = {"a": (4, PATHS, 0.5), "b": (1, PATHS, 2.0), "c": (3, ["0"], 1.0), "d": (2, PATHS, 0.25),
         "e": (4, ["2"], 1.5)}


def _manager(model, num_slots=3, names=SPECS, **kw):
    manager = AdapterManager(model, num_slots=num_slots, max_rank=4, **kw)
    for i, name in enumerate(names):
        rank, paths, scale = SPECS[name]
        manager.add_lora(name, _weights(rank, seed=i, paths=paths), scale)
    return manager


def _eager(model, x, names, dtype):
    """The model with each row's adapter applied eagerly in ``dtype`` (float64: the oracle)."""
    layers = [model[0], model[2]]
    rows = []
    for row, name in zip(x, names):
        h = row.to(dtype)
        for i, (path, layer) in enumerate(zip(PATHS, layers)):
            y = nn.functional.linear(h, layer.weight.to(dtype), layer.bias.to(dtype))
            if name is not None and path in SPECS[name][1]:
                a, b = _weights(SPECS[name][0], seed=list(SPECS).index(name), paths=[path])[path]
                y = y + SPECS[name][2] * (h @ a.to(dtype).t()) @ b.to(dtype).t()
            h = torch.relu(y) if i == 0 else y
        rows.append(h)
    return torch.stack(rows)


def test_batch_matches_float64_reference(path_device):
    model = _model(path_device)
    manager = _manager(model)
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(5))
    for names in (["a", None, "b", "a", "c", None, "b"], ["d", "e", "d", None, None, "e", "c"]):
        with torch.no_grad(), manager.batch(names), count_launches() as launches:
            y = model(x.to(path_device)).cpu()
        assert_close(f"y {names}", _eager(model.cpu(), x, names, torch.float64), y,
                     _eager(model.cpu(), x, names, torch.float32))
        model.to(path_device)
        assert (launches["_mixed_adapter_linear_kernel"] > 0) == (path_device != "cpu" or _interpreting())


def _interpreting():
    from adaptkern.ops import config

    return config.interpreting()


def test_rows_do_not_depend_on_their_neighbours():
    """Base rows are bit-equal whatever their neighbours use; so is an adapter's row."""
    model = _model()
    manager = _manager(model)
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        with manager.batch([None] * 4):
            base = model(x)
        with manager.batch([None, "a", None, "c"]):
            y = model(x)
        with manager.batch(["b", "a", "d", "b"]):
            z = model(x)
    assert torch.equal(y[0], base[0]) and torch.equal(y[2], base[2]) and torch.equal(y[1], z[1])
    assert not torch.equal(y[1], base[1]) and not torch.equal(y[3], base[3])


def test_lru_eviction_order():
    model = _model()
    manager = _manager(model, num_slots=3)
    with manager.batch(["a", "b"]):
        pass
    with manager.batch(["c"]):
        pass
    assert manager.resident == {"a": 0, "b": 1, "c": 2}
    with manager.batch(["a"]):  # a becomes the most recently used
        pass
    with manager.batch(["d"]):  # evicts b, the least recently used
        pass
    assert manager.resident == {"c": 2, "a": 0, "d": 1}
    with manager.batch(["e", "d"]):  # evicts c, not a and not d (in the batch)
        pass
    assert manager.resident == {"a": 0, "e": 2, "d": 1}
    assert manager.pools["0"].kinds[2] is None  # e does not target layer "0": its slot there is empty
    assert manager.pools["2"].ranks.tolist() == [4, 2, 4]


def test_pinned_adapters_stay_and_limit_what_a_batch_may_name():
    model = _model()
    manager = _manager(model, num_slots=3)
    manager.pin("c")
    slot = manager.resident["c"]
    for names in (["a", "b"], ["d", "e"], ["a", "d"], ["b"]):
        with manager.batch(names):
            pass
        assert manager.resident["c"] == slot
    manager.pin("a")
    with pytest.raises(ValueError, match=r"only 1 of the 3 device slots are not held by pinned adapters \['a', 'c'\]"):
        with manager.batch(["b", "d"]):
            pass
    with manager.batch(["c", "a", "b"]):  # pinned adapters may be in the batch
        pass
    manager.unpin("a")
    with manager.batch(["b", "d"]):
        pass
    assert set(manager.resident) == {"c", "b", "d"}


def test_a_batch_naming_more_adapters_than_slots_raises_before_any_change():
    model = _model()
    manager = _manager(model, num_slots=3)
    with manager.batch(["a"]):
        pass
    before = (manager.resident, [p.down_weight.clone() for p in manager.pools.values()])
    with pytest.raises(ValueError, match=r"one batch names 4 adapters but the manager has 3 device slots"):
        with manager.batch(["a", "b", "c", None, "d"]):
            pass
    assert manager.resident == before[0]
    assert all(torch.equal(p.down_weight, w) for p, w in zip(manager.pools.values(), before[1]))
    with pytest.raises(ValueError, match=r"unknown adapter 'zz'"):
        with manager.batch(["a", "zz"]):
            pass
    assert model[0]._batch_pool is None  # nothing stays bound after a failed entry


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _step_profile(held):
    """(aten ops of one step inside the block, pool versions before and after two steps)."""
    model = _model()
    manager = _manager(model, num_slots=4, names=list(SPECS)[:held] if held <= 5 else SPECS)
    for i in range(5, held):
        manager.add_lora(f"extra{i}", _weights(2, seed=100 + i), 1.0)
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), manager.batch(["a", "b"]):
        model(x)
        versions = [p.down_weight._version for p in manager.pools.values()]
        with _CountOps() as counter:
            model(x)
        model(x)
        assert [p.down_weight._version for p in manager.pools.values()] == versions
    with manager.batch(["b", "a"]):  # both resident: entering writes no slot
        assert [p.down_weight._version for p in manager.pools.values()] == versions
    return counter.ops


def test_step_work_does_not_depend_on_held_adapters():
    few, many = _step_profile(2), _step_profile(40)
    assert sum(few.values()) > 0 and few == many


def test_add_lora_checks_everything_before_storing():
    model = _model()
    manager = _manager(model, names=["a"])
    bad = [
        (dict(name="a", weights=_weights(2, 0), scale=1.0), ValueError, "already holds an adapter named 'a'"),
        (dict(name="x", weights={"1": _weights(2, 0)["0"]}, scale=1.0), ValueError, "'1' is not an AdapterLinear"),
        (dict(name="x", weights=_weights(5, 0), scale=1.0), ValueError, r"max_rank=4, got \(5, 12\)"),
        (dict(name="x", weights={"0": (torch.ones(2, 12), torch.ones(15, 2))}, scale=1.0), ValueError,
         r"lora_b \[16, r\]"),
        (dict(name="x", weights={"0": (torch.full((2, 12), float("nan")), torch.ones(16, 2))}, scale=1.0),
         ValueError, "NaN or Inf"),
        (dict(name="x", weights=_weights(2, 0), scale={"0": 1.0}), ValueError, "scale has no entry for layer '2'"),
        (dict(name="x", weights=_weights(2, 0), scale="1"), TypeError, "must be a real number"),
        (dict(name="x.y", weights=_weights(2, 0), scale=1.0), ValueError, "without '.'"),
    ]
    for kwargs, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            manager.add_lora(**kwargs)
    assert manager.adapters == ["a"]


def test_add_from_layers_serves_what_adapter_batch_serves():
    model = _model()
    for i, layer in enumerate((model[0], model[2])):
        nn.init.normal_(layer.add_lora("t", r=3, alpha=6).lora_B)
        if i == 1:
            nn.init.normal_(layer.add_lora("u", r=2, alpha=1).lora_B)
    manager = AdapterManager(model, num_slots=2, max_rank=3)
    manager.add_from_layers("t")
    manager.add_from_layers("u")
    x = torch.randn(3, 4, 12)
    names = ["u", None, "t"]
    with torch.no_grad():
        with adaptkern.adapter_batch(model, names):
            want = model(x)
        with manager.batch(names):
            got = model(x)
    assert_close("manager vs adapter_batch", want.double(), got)
    with pytest.raises(ValueError, match="no AdapterLinear of the model holds an adapter named 'v'"):
        manager.add_from_layers("v")


def test_remove_frees_the_slot_and_pinning_refuses_a_full_device():
    model = _model()
    manager = _manager(model, num_slots=2)
    manager.pin("a")
    manager.pin("b")
    with pytest.raises(ValueError, match=r"all 2 slots hold pinned adapters \['a', 'b'\]"):
        manager.pin("c")
    slot = manager.resident["b"]
    manager.remove("b")
    assert "b" not in manager.adapters and manager.pinned == {"a"}
    assert all(p.ranks[slot] == 0 and p.kinds[slot] is None for p in manager.pools.values())
    manager.pin("c")
    assert manager.resident == {"a": 0, "c": slot}


def test_generate_with_a_manager_matches_adapter_batch():
    transformers = pytest.importorskip("transformers")
    from adaptkern.integrations.patching import adapter_modules

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, r in (("p", 2), ("q", 4)):
        adaptkern.add_lora(model, name, r, alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"])
    for layer in adapter_modules(model).values():
        for adapter in layer.adapters.values():
            nn.init.normal_(adapter.lora_B, std=0.3)
    manager = AdapterManager(model, num_slots=2, max_rank=4)
    manager.add_from_layers("p")
    manager.add_from_layers("q")
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["q", None, "p"]
    with torch.no_grad():
        with adaptkern.adapter_batch(model, names):
            want = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2)
        with manager.batch(names):
            got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2)
    assert torch.equal(got, want)
