"""AdapterLinear against eager compositions of plain nn.Linear modules (as PEFT and AdapterHub compute)."""

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptkern
from adaptkern.ops import common
from adaptkern.testing import assert_close


class EagerLora(nn.Module):
    """PEFT's LoRA layer, spelled out: base(x) + lora_B(lora_A(dropout(x))) * scale."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, adapter.r, bias=False)
        self.lora_B = nn.Linear(adapter.r, base.out_features, bias=False)
        self.lora_A.weight.data.copy_(adapter.lora_A.data)
        self.lora_B.weight.data.copy_(adapter.lora_B.data)
        self.scale = adapter.scale

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


class EagerBottleneck(nn.Module):
    """AdapterHub's bottleneck: down (Linear) -> f -> up (Linear), scaled, on h (sequential) or x (parallel)."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base = base
        self.down = nn.Linear(*adapter.down_weight.shape[::-1])
        self.up = nn.Linear(*adapter.up_weight.shape[::-1])
        for lin, w, b in ((self.down, adapter.down_weight, adapter.down_bias), (self.up, adapter.up_weight,
                                                                                 adapter.up_bias)):
            lin.weight.data.copy_(w.data)
            lin.bias.data.copy_(b.data)
        self.act, self.placement, self.scale = adapter.activation, adapter.placement, adapter.scale

    def forward(self, x):
        h = self.base(x)
        src = h if self.placement == "sequential" else x
        return h + self.scale * self.up(common.activation(self.down(src), self.act))


def _make(kind, in_f=37, out_f=29, device="cpu"):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(device)
    m = adaptkern.AdapterLinear.from_linear(copy.deepcopy(base))
    if kind == "lora":
        ad = m.add_lora("a", r=5, alpha=10)
        nn.init.normal_(ad.lora_B, std=0.2)  # fresh B is zero: make the comparison non-vacuous
        eager = EagerLora(base, ad)
    else:
        placement, act = kind.split("-")
        ad = m.add_bottleneck("a", rank=6, activation=act, placement=placement, scale=0.8)
        nn.init.normal_(ad.up_weight, std=0.2)
        nn.init.normal_(ad.up_bias, std=0.2)
        eager = EagerBottleneck(base, ad)
    for p in eager.base.parameters():
        p.requires_grad_(False)
    return m, eager


def _params(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "sequential-gelu", "parallel-relu", "sequential-silu"])
def test_matches_eager_composition_outputs_and_gradients(kind, device):
    m, eager = _make(kind, device=device)
    x = torch.randn(3, 11, 37, device=device)
    oracle = copy.deepcopy(eager).double()
    outs, grads = [], []
    for mod, inp in ((m, x), (eager, x), (oracle, x.double())):
        inp = inp.clone().requires_grad_()
        y = mod(inp)
        g = torch.autograd.grad(y, [inp, *_params(mod).values()], torch.ones_like(y) * 0.5 + inp[..., :1])
        outs.append(y.detach())
        grads.append(g)
    assert_close("y", outs[2], outs[0], outs[1])
    names = ["x", *_params(m)]
    assert len(grads[0]) == len(grads[2]) == len(names)  # x + every adapter parameter, nothing else
    for name, g, ge, go in zip(names, *grads):
        assert_close(f"d{name}", go, g, ge)


def test_from_linear_shares_and_freezes():
    lin = nn.Linear(4, 3)
    m = adaptkern.AdapterLinear.from_linear(lin)
    assert isinstance(m, nn.Linear) and m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    m2 = adaptkern.AdapterLinear.from_linear(nn.Linear(4, 3, bias=False), freeze=False)
    assert m2.weight.requires_grad and m2.bias is None
    assert list(adaptkern.AdapterLinear(4, 3).state_dict()) == ["weight", "bias"]


def test_new_adapters_change_nothing_until_trained():
    lin = nn.Linear(16, 12)
    m = adaptkern.AdapterLinear.from_linear(lin)
    x = torch.randn(5, 16)
    oracle = copy.deepcopy(lin).double()(x.double()).detach()
    for add in (lambda: m.add_lora("l", 4), lambda: m.add_bottleneck("b", 3, activation="gelu")):
        add()
        assert_close("y", oracle, m(x).detach())


def test_base_gradients_only_when_required():
    m, _ = _make("lora")
    x = torch.randn(4, 37)
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    assert m.adapters["a"].lora_A.grad is not None
    m.weight.requires_grad_(True)
    m.bias.requires_grad_(True)
    m(x).sum().backward()
    assert_close("dW", torch.ones(4, 29, dtype=torch.float64).t() @ x.double(), m.weight.grad)
    assert_close("db", torch.full((29,), 4.0, dtype=torch.float64), m.bias.grad)


def test_set_delete_and_base_only():
    m, _ = _make("lora")
    x = torch.randn(2, 37)
    base = nn.functional.linear(x, m.weight, m.bias)
    m.add_bottleneck("bn", 3)
    assert m.active_adapter == "a"  # adding an adapter keeps the active one (as PEFT)
    m.set_adapter(None)
    assert torch.equal(m(x), base)
    m.set_adapter("a")
    assert not torch.allclose(m(x), base)
    m.delete_adapter("a")
    assert m.active_adapter is None and list(m.adapters) == ["bn"]
    assert "adapters.a.lora_A" not in m.state_dict()


def test_dropout_only_in_training():
    m, _ = _make("lora")
    m.adapters["a"].dropout = 0.5
    x = torch.randn(8, 37)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_merge_unmerge():
    m, _ = _make("lora")
    x = torch.randn(6, 37)
    w0 = m.weight.detach().clone()
    y = m(x)
    m.merge("a")
    assert m.merged_adapter == "a"
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nn.functional.linear(x, m.weight, m.bias), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        m.delete_adapter("a")
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    m, _ = _make("lora")
    m.add_bottleneck("bn", 4, activation="gelu", placement="parallel")
    nn.init.normal_(m.adapters["bn"].up_weight)
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "adapters.a.lora_A", "adapters.a.lora_B", "adapters.bn.down_weight",
                       "adapters.bn.down_bias", "adapters.bn.up_weight", "adapters.bn.up_bias"}
    assert sd["adapters.a.lora_A"].shape == (5, 37) and sd["adapters.a.lora_B"].shape == (29, 5)
    fresh = adaptkern.AdapterLinear(37, 29)
    fresh.add_lora("a", r=5, alpha=10)
    fresh.add_bottleneck("bn", 4, activation="gelu", placement="parallel")
    fresh.load_state_dict(sd)
    x = torch.randn(3, 37)
    for name in ("a", "bn"):
        m.set_adapter(name)
        fresh.set_adapter(name)
        assert torch.equal(m(x), fresh(x))


def test_sequential_fold_follows_in_place_changes():
    m, eager = _make("sequential-gelu")
    m.eval()
    x = torch.randn(4, 37)
    with torch.no_grad():
        m(x)
        m.adapters["a"].down_weight.mul_(2.0)  # an in-place, optimizer-like update
        eager.down.weight.mul_(2.0)
        assert_close("after D changed", copy.deepcopy(eager).double()(x.double()), m(x))
        m.weight.add_(0.1)  # eager holds its own copy of the base
        eager.base.weight.add_(0.1)
        assert_close("after W changed", copy.deepcopy(eager).double()(x.double()), m(x))


def test_training_loss_falls_with_only_adapters_trainable():
    torch.manual_seed(1)
    teacher = nn.Linear(24, 16)
    delta = 0.3 * torch.randn(16, 3) @ torch.randn(3, 24) / 24**0.5
    student = adaptkern.AdapterLinear.from_linear(copy.deepcopy(teacher))
    student.add_lora("ft", r=4, alpha=4)
    w0 = student.weight.detach().clone()
    opt = torch.optim.Adam(adaptkern_params := [p for p in student.parameters() if p.requires_grad], lr=3e-2)
    assert len(adaptkern_params) == 2
    x = torch.randn(64, 24)
    target = teacher(x) + x @ delta.t()
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(student(x), target.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    assert torch.equal(student.weight, w0)


@pytest.mark.parametrize("kind", ["lora", "sequential-gelu"])
def test_torch_compile_fullgraph(kind):
    m, _ = _make(kind)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = m

        def forward(self, x):
            return torch.relu(self.proj(x)).sum(-1)

    block = Block()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 37, requires_grad=True)
    y_ref = block(x)
    g_ref = torch.autograd.grad(y_ref.sum(), [x, *_params(m).values()])
    y = compiled(x)
    g = torch.autograd.grad(y.sum(), [x, *_params(m).values()])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_fullgraph():
    """The default backend too: inductor lowers around the custom ops (fake tensors, autograd, fallback kernels)."""
    m, _ = _make("lora")
    x = torch.randn(2, 5, 37, requires_grad=True)
    fn = lambda x: torch.relu(m(x)).square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    g = torch.autograd.grad(compiled(x), [x, *_params(m).values()])
    g_ref = torch.autograd.grad(fn(x), [x, *_params(m).values()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_adapter_ids_are_stable_slots():
    """An adapter keeps its slot when another is deleted; a new adapter takes the lowest free slot;
    a free slot in adapter_ids runs the base."""
    torch.manual_seed(0)
    m = adaptkern.AdapterLinear(13, 11)
    for name in ("a", "b", "c"):
        nn.init.normal_(m.add_lora(name, r=2, alpha=2).lora_B)
    assert m.adapter_slots == {"a": 0, "b": 1, "c": 2}
    x = torch.randn(3, 13)
    with torch.no_grad():
        before = m(x, torch.tensor([0, 1, 2]))
        m.delete_adapter("b")
        assert m.adapter_slots == {"a": 0, "c": 2}
        after = m(x, torch.tensor([0, 1, 2]))
        assert torch.equal(after[[0, 2]], before[[0, 2]])  # "c" is still id 2
        base64 = nn.functional.linear(x.double(), m.weight.double(), m.bias.double())
        eager = nn.functional.linear(x, m.weight, m.bias)
        assert_close("free slot runs the base", base64[1], after[1], eager[1])
        m.add_lora("d", r=3)
        assert m.adapter_slots == {"a": 0, "c": 2, "d": 1}
        with adaptkern.adapter_batch(m, ["c", None, "a"]):
            by_name = m(x)
        assert torch.equal(by_name, m(x, [2, -1, 0]))


def test_adapter_batch_runs_the_base_on_layers_without_adapters():
    """adapter_batch over a model where some patched layers hold no adapter (or lost their
    last one): those layers run their base, the others the named adapters."""
    torch.manual_seed(0)
    first, second = adaptkern.AdapterLinear(9, 7), adaptkern.AdapterLinear(7, 5)
    nn.init.normal_(first.add_lora("t", r=2, alpha=2).lora_B)
    model = nn.Sequential(first, second)
    x = torch.randn(2, 9)
    with torch.no_grad():
        with adaptkern.adapter_batch(model, ["t", None]):
            y = model(x)
        first.set_adapter("t")
        want_t = model(x[:1])
        first.set_adapter(None)
        want_base = model(x[1:])
    assert_close("adapter row", want_t[0].double(), y[0])
    assert_close("base row", want_base[0].double(), y[1])


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _layer_holding(count):
    torch.manual_seed(0)
    m = adaptkern.AdapterLinear(13, 11).eval()
    for i in range(count):
        nn.init.normal_(m.add_lora(f"a{i}", r=1 + i % 4, alpha=2).lora_B)
    return m


@pytest.mark.parametrize("held", [2, 12])
def test_adapter_batch_steps_do_no_work_on_held_adapters(held):
    """Entering the block copies the named adapters only; a step inside it is the same aten ops
    whether the layer holds 2 or 12 adapters, and writes no pool tensor."""
    x = torch.randn(3, 2, 13)
    names = ["a1", None, "a0"]
    profiles = []
    for m in (_layer_holding(2), _layer_holding(held)):
        with torch.no_grad(), _CountOps() as entry, adaptkern.adapter_batch(m, names):
            pool = m._snapshot
            copies = entry.ops["aten.copy_.default"]
            y = m(x)
            versions = [t._version for t in (pool.down_weight, pool.up_weight, pool.scales, pool.ranks)]
            with _CountOps() as step:
                assert torch.equal(m(x), y)
            assert [t._version for t in (pool.down_weight, pool.up_weight, pool.scales, pool.ranks)] == versions
        profiles.append((copies, step.ops, pool.num_slots))
    assert profiles[0] == profiles[1] and profiles[0][2] == 2
    want = torch.stack([m(x[0], [1, 1]), nn.functional.linear(x[1].double(), m.weight.double(), m.bias.double())
                        .float(), m(x[2], [0, 0])])
    assert_close("pooled vs live", want.double(), y)


def test_adapter_batch_reads_adapters_at_entry_and_live_under_grad():
    m = _layer_holding(3)
    x = torch.randn(2, 13)
    with torch.no_grad():
        want = m(x, [2, 0])
        with adaptkern.adapter_batch(m, ["a2", "a0"]):
            first = m(x)
            m.adapters["a2"].lora_B.data.mul_(2.0)  # inside the block: not seen until the next block
            assert torch.equal(m(x), first)
        with adaptkern.adapter_batch(m, ["a2", "a0"]):
            second = m(x)
    assert_close("entry snapshot", want.double(), first)
    assert_close("next block sees the write", m(x, [2, 0]).double(), second)
    with adaptkern.adapter_batch(m, ["a2", "a0"]):  # gradients flow: the live, differentiable path
        m(x).sum().backward()
    assert m.adapters["a2"].lora_B.grad.abs().sum() > 0 and not m.adapters["a1"].lora_B.grad.any()
