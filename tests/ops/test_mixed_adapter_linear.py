"""``adaptkern::mixed_adapter_linear``: mixed-adapter batches against the float64 per-adapter loop
(``mixed_reference.mixed_adapter_linear_ref``), through the public functions and the raw op."""

import pytest
import torch
from torch import nn

import adaptkern
from adaptkern.ops import config
from adaptkern.ops.adapter_linear import reference
from adaptkern.ops.mixed_adapter_linear import reference as mixed_reference
from adaptkern.ops.mixed_adapter_linear import mixed_adapter_linear_backward_op, mixed_adapter_linear_op
from adaptkern.testing import assert_close

from ..helpers import transposed_storage


def popularity(kind, m, s, gen):
    """adapter_ids [M] int32 for an adapter popularity pattern (Punica's sweep), with some -1 rows."""
    if kind == "distinct":
        ids = torch.arange(m) % s
    elif kind == "uniform":
        ids = torch.randint(-1, s, (m,), generator=gen)
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, s + 2, dtype=torch.float64)
        ids = torch.multinomial(p, m, replacement=True, generator=gen) - 1
    elif kind == "identical":
        ids = torch.full((m,), s - 1)
    elif kind == "skewed":
        ids = torch.where(torch.rand(m, generator=gen) < 0.9, 0, torch.randint(-1, s, (m,), generator=gen))
    else:
        raise ValueError(kind)
    return ids.to(torch.int32)


def make_stack(s, r, k, n, dtype, gen):
    a = (torch.randn(s, r, k, generator=gen) * k**-0.5).to(dtype)
    b = (torch.randn(s, n, r, generator=gen) * r**-0.5).to(dtype)
    scales = torch.rand(s, generator=gen) + 0.5
    return a, b, scales


def _oracle(x, w, bias, a, b, scales, ranks, ids, wrt_grad=None):
    ins = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y = mixed_reference.mixed_adapter_linear_ref(ins[0], w.double(), bias.double(), ins[1], None, ins[2], None,
                                           scales.double(), ranks, None, ids)
    grads = torch.autograd.grad(y, ins, wrt_grad.double()) if wrt_grad is not None else None
    return y.detach(), grads


def _eager(x, w, bias, a, b, scales, ranks, ids, grad):
    """The same loop in the test dtype: the error eager PyTorch makes."""
    ins = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    y = mixed_reference.mixed_adapter_linear_ref(ins[0], w, bias, ins[1], None, ins[2], None, scales.to(x.dtype), ranks,
                                           None, ids)
    return y.detach(), torch.autograd.grad(y, ins, grad)


# M=37 runs the decode plan (rows in order, split shrink), M=150 the sorted prefill plan.
@pytest.mark.parametrize("m", [37, 150], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_popularity_patterns_outputs_and_gradients(kind, m, dtype, device, nan_poison):
    assert (m > config.MIXED_SORT_MIN_M) == (m == 150)
    gen = torch.Generator().manual_seed(hash((kind, m)) % 1000)
    k, n, s, r = 48, 40, 6, 8
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    a, b, scales = make_stack(s, r, k, n, dtype, gen)
    ranks = torch.tensor([8, 1, 5, 8, 3, 7], dtype=torch.int32)  # mixed ranks 1..R_max
    ids = popularity(kind, m, s, gen)
    gy = torch.randn(m, n, generator=gen).to(dtype)

    leaves = [t.to(device).requires_grad_() for t in (x, a, b)]
    y = adaptkern.mixed_lora_linear(leaves[0], w.to(device), bias.to(device), leaves[1], leaves[2], ids.to(device),
                                    scales=scales.to(device), ranks=ranks.to(device))
    grads = torch.autograd.grad(y, leaves, gy.to(device))
    oracle, oracle_g = _oracle(x, w, bias, a, b, scales, ranks, ids, gy)
    eager, eager_g = _eager(x, w, bias, a, b, scales, ranks, ids, gy)
    assert_close("y", oracle, y.detach().cpu(), eager)
    for name, g, og, eg in zip(("dx", "dlora_a", "dlora_b"), grads, oracle_g, eager_g):
        assert_close(name, og, g.cpu(), eg)
    # Each slot's gradient comes only from its own rows: unused slots and padded ranks get zeros.
    used = set(ids.tolist())
    for slot in range(s):
        if slot not in used:
            assert not grads[1][slot].any() and not grads[2][slot].any()
        assert not grads[1][slot, ranks[slot]:].any() and not grads[2][slot, :, ranks[slot]:].any()


def _setup(m=70, k=40, n=36, s=5, r=8, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    a, b, scales = (t.to(device) for t in make_stack(s, r, k, n, torch.float32, gen))
    return x, w, bias, a, b, scales


@pytest.mark.parametrize("m", [9, 100])
def test_base_rows_and_batch_invariance(m, device):
    x, w, bias, a, b, scales = _setup(m=m, device=device)
    run = lambda ids: adaptkern.mixed_lora_linear(x, w, bias, a, b, ids.to(device), scales=scales)  # noqa: E731
    base = run(torch.full((m,), -1, dtype=torch.int32))
    assert_close("all -1", nn.functional.linear(x.double(), w.double(), bias.double()).cpu(), base.cpu())
    gen = torch.Generator().manual_seed(1)
    first = popularity("uniform", m, 5, gen)
    y1 = run(first)
    for _ in range(3):  # a mapping that changes between calls
        other = popularity("uniform", m, 5, gen)
        other[0], other[m - 1] = first[0], first[m - 1]
        y2 = run(other)
        for row in (0, m - 1):  # same adapter, same M: the same bits whatever the neighbours use
            assert torch.equal(y1[row], y2[row])
        base_rows = (other == -1).nonzero().squeeze(1)
        assert torch.equal(y2[base_rows], base[base_rows]), "-1 rows must get exactly the base result"
        want = _oracle(x.cpu(), w.cpu(), bias.cpu(), a.cpu(), b.cpu(), scales.cpu(), None, other)[0]
        assert_close("changed mapping", want, y2.cpu())


def test_every_slot_including_the_last(device):
    x, w, bias, a, b, scales = _setup(m=20, s=7, device=device)
    for slot in range(7):
        ids = torch.full((20,), slot, dtype=torch.int32)
        y = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids.to(device), scales=scales)
        single = adaptkern.lora_linear(x, w, bias, a[slot], b[slot], scale=float(scales[slot]))
        torch.testing.assert_close(y, single, rtol=1e-5, atol=1e-5)


def test_m_zero_and_int64_ids(device):
    x, w, bias, a, b, scales = _setup(m=0, device=device)
    y = adaptkern.mixed_lora_linear(x, w, bias, a, b, torch.zeros(0, dtype=torch.int64, device=device), scales=scales)
    assert y.shape == (0, 36)
    x, w, bias, a, b, scales = _setup(m=12, device=device)
    ids = torch.tensor([0, 4, -1] * 4, dtype=torch.int64, device=device)
    torch.testing.assert_close(
        adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales),
        adaptkern.mixed_lora_linear(x, w, bias, a, b, ids.int(), scales=scales), rtol=0, atol=0)


def _pool_with_mixed_kinds(k, n, dtype, device, base_w, base_b, gen):
    pool = adaptkern.AdapterPool(k, n, num_slots=5, max_rank=12, dtype=dtype, device=device)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

    pool.load_lora(0, rnd(4, k), rnd(n, 4), scale=2.0)
    pool.load_bottleneck(1, rnd(12, k), rnd(12), rnd(n, 12), rnd(n), activation="gelu", placement="parallel",
                         scale=0.5)
    pool.load_bottleneck(3, rnd(7, n), rnd(7), rnd(n, 7), rnd(n), activation="silu", placement="sequential",
                         scale=1.5, base_weight=base_w, base_bias=base_b)
    pool.load_lora(4, rnd(1, k), rnd(n, 1), scale=0.25)
    return pool


@pytest.mark.parametrize("m", [33, 130])
def test_pool_mixes_kinds_ranks_and_activations(m, device):
    gen = torch.Generator().manual_seed(5)
    k, n = 24, 20
    w = torch.randn(n, k, generator=gen) * k**-0.5
    bias = torch.randn(n, generator=gen)
    pool = _pool_with_mixed_kinds(k, n, torch.float32, device, w, bias, gen)
    x = torch.randn(m, k, generator=gen)
    ids = torch.randint(-1, 5, (m,), generator=gen, dtype=torch.int32)  # slot 2 is empty: base only
    y = adaptkern.mixed_adapter_linear(x.to(device), w.to(device), bias.to(device), pool, ids.to(device))
    # Oracle: each row through the unfused, unfolded formula of its slot's kind.
    want = torch.empty(m, n, dtype=torch.float64)
    xd, wd, bd = x.double(), w.double(), bias.double()
    gen2 = torch.Generator().manual_seed(5)
    torch.randn(n, k, generator=gen2), torch.randn(n, generator=gen2)  # replay the generator to get the weights
    raw = {}

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen2) * 0.3).double()

    raw[0] = ("lora", rnd(4, k), rnd(n, 4), 2.0)
    raw[1] = ("parallel", rnd(12, k), rnd(12), rnd(n, 12), rnd(n), "gelu", 0.5)
    raw[3] = ("sequential", rnd(7, n), rnd(7), rnd(n, 7), rnd(n), "silu", 1.5)
    raw[4] = ("lora", rnd(1, k), rnd(n, 1), 0.25)
    for i in range(m):
        s = int(ids[i])
        xi = xd[i:i + 1]
        if s in (-1, 2):
            want[i] = (xi @ wd.t() + bd)[0]
        elif raw[s][0] == "lora":
            want[i] = reference.lora_linear_ref(xi, wd, bd, raw[s][1], raw[s][2], raw[s][3])[0]
        else:
            _, d, db, u, ub, act, sc = raw[s]
            want[i] = reference.bottleneck_linear_ref(xi, wd, bd, d, db, u, ub, sc, act, raw[s][0])[0]
    assert_close("y", want, y.cpu())
    pool.evict(3)
    y2 = adaptkern.mixed_adapter_linear(x.to(device), w.to(device), bias.to(device), pool, ids.to(device))
    rows = ids == 3
    torch.testing.assert_close(y2[rows.to(device)].cpu().double(), (xd @ wd.t() + bd)[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["kernels", "cpu-reference"])
def test_adapter_linear_mixed_gradients_per_adapter(path, device, monkeypatch):
    """Several adapters (LoRA and bottlenecks) fine-tune in one batch: each gets its rows' gradient."""
    if path == "cpu-reference":
        monkeypatch.setattr(config, "interpreting", lambda: False)
        device = "cpu"
    torch.manual_seed(3)
    m = adaptkern.AdapterLinear.from_linear(nn.Linear(20, 18)).to(device)
    m.add_lora("l1", 4)
    m.add_bottleneck("seq", 6, activation="gelu", placement="sequential")
    m.add_bottleneck("par", 3, activation="relu", placement="parallel", scale=0.7)
    m.add_lora("l2", 2, alpha=5)
    for p in m.adapters.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 5, 20, device=device)
    per_seq = ["seq", None, "l2", "par"]
    ids = torch.tensor([list(m.adapters).index(n) if n else -1 for n in per_seq], dtype=torch.int32, device=device)
    y = m(x, adapter_ids=ids)  # one id per sequence of a [B, T, K] input
    gy = torch.randn_like(y)
    params = dict(m.adapters.named_parameters())
    grads = torch.autograd.grad(y, list(params.values()), gy, allow_unused=True)

    ref_grads = {n: torch.zeros_like(p) for n, p in params.items()}
    ref_y = torch.empty_like(y)
    for b, name in enumerate(per_seq):
        m.set_adapter(name)
        yb = m(x[b])
        ref_y[b] = yb.detach()
        if name is not None:
            for pn, g in zip(params, torch.autograd.grad(yb, list(params.values()), gy[b], allow_unused=True)):
                if g is not None:
                    ref_grads[pn] += g
    torch.testing.assert_close(y.detach(), ref_y, rtol=1e-5, atol=1e-5)
    for (name, _), g in zip(params.items(), grads):
        g = torch.zeros_like(ref_grads[name]) if g is None else g
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not any(g is not None and g.abs().sum() > 0 for n, g in zip(params, grads) if n.startswith("l1.")), \
        "an adapter no row used gets no gradient"


def test_adapter_batch_context_on_a_module_tree(device):
    torch.manual_seed(4)
    net = nn.Sequential(adaptkern.AdapterLinear(12, 16), nn.ReLU(), adaptkern.AdapterLinear(16, 8)).to(device)
    for layer in (net[0], net[2]):
        layer.add_lora("a", 2)
        nn.init.normal_(layer.adapters["a"].lora_B)
    net[2].add_lora("b", 3)  # "b" only targets the second layer
    nn.init.normal_(net[2].adapters["b"].lora_B)
    x = torch.randn(3, 4, 12, device=device)
    names = ["b", None, "a"]
    with adaptkern.adapter_batch(net, names):
        y = net(x)
    assert net[0]._batch_ids is None and net[2]._batch_ids is None
    for i, name in enumerate(names):
        for layer in (net[0], net[2]):
            layer.set_adapter(name if name in layer.adapters else None)
        torch.testing.assert_close(y[i], net(x[i]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown adapter names \['c'\]"):
        with adaptkern.adapter_batch(net, ["a", "c"]):
            pass


@pytest.mark.parametrize("bad, exc, pattern", [
    (torch.tensor([0, 5, 1]), ValueError, r"adapter_ids\[1\] = 5 is out of range.*-1 \(base only\) and 0\.\.4"),
    (torch.tensor([0, -2, 1]), ValueError, r"adapter_ids\[1\] = -2"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, r"int32 or int64, got torch.float32"),
    (torch.tensor([0, 1]), ValueError, r"shape \(3,\).*got \(2,\)"),
])
def test_bad_ids(bad, exc, pattern):
    x, w, bias, a, b, scales = _setup(m=3)
    with pytest.raises(exc, match=pattern):
        adaptkern.mixed_lora_linear(x, w, bias, a, b, bad, scales=scales)


def test_bad_stacks_and_ranks():
    x, w, bias, a, b, scales = _setup(m=3)
    ids = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"lora_b must be \[S, N, R_max\] = \(5, 36, 8\)"):
        adaptkern.mixed_lora_linear(x, w, bias, a, b[:, :, :4], ids, scales=scales)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 8\]"):
        adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales, ranks=torch.tensor([1, 2, 9, 1, 1]))
    with pytest.raises(ValueError, match=r"scales must have shape \(5,\)"):
        adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales[:2])
    pool = adaptkern.AdapterPool(40, 36, 2, 4)
    with pytest.raises(ValueError, match=r"lora_a rank 5 is outside \[1, max_rank=4\]"):
        pool.load_lora(0, torch.randn(5, 40), torch.randn(36, 5), 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pool.load_lora(0, torch.full((2, 40), float("inf")), torch.randn(36, 2), 1.0)
    with pytest.raises(ValueError, match="needs base_weight"):
        pool.load_bottleneck(1, torch.randn(2, 36), None, torch.randn(36, 2), None, activation="relu",
                             placement="sequential", scale=1.0)


def test_opcheck_and_compile(device):
    x, w, bias, a, b, scales = _setup(m=10, device=device)
    ids = torch.tensor([0, 1, -1, 4, 4, 2, 0, 3, -1, 1], dtype=torch.int32, device=device)
    leaves = [t.requires_grad_() for t in (x, a, b)]
    torch.library.opcheck(mixed_adapter_linear_op, (leaves[0], w, bias, [leaves[1]], None, [leaves[2]], None, scales,
                                                    None, None, ids, None, None, True, None))

    def f(x, a, b, ids):
        return adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves, ids), leaves)
    want = torch.autograd.grad(f(*leaves, ids), leaves)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_mapping_and_inputs():
    m, k, n, s, r = 64, 4096, 4096, 32, 16
    gen = torch.Generator().manual_seed(0)
    x, w, bias, a, b, scales = (t.to(torch.bfloat16) if t.is_floating_point() and t.dim() > 1 else t
                                for t in _setup(m, k, n, s, r, device="cuda"))
    ids = popularity("uniform", m, s, gen).cuda()
    static_x, static_ids = x.clone(), ids.clone()

    def step():
        return adaptkern.mixed_lora_linear(static_x, w, bias, a, b, static_ids, scales=scales, validate_ids=False)

    step()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    for _ in range(3):
        new_ids = popularity("zipf", m, s, gen).cuda()
        new_x = torch.randn_like(x)
        static_ids.copy_(new_ids)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        want = adaptkern.mixed_lora_linear(new_x, w, bias, a, b, new_ids, scales=scales)
        assert torch.equal(static_y, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256, 2048])
def test_large_mixed_on_gpu(m):
    gen = torch.Generator().manual_seed(m)
    k = n = 4096
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to("cuda", torch.bfloat16)
    bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
    a, b, scales = (t.cuda() for t in make_stack(32, 16, k, n, torch.bfloat16, gen))
    ids = popularity("uniform", m, 32, gen)
    y = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids.cuda(), scales=scales.cuda())
    oracle, _ = _oracle(x.cpu().float(), w.cpu().float(), bias.cpu().float(), a.cpu().float(), b.cpu().float(),
                        scales, None, ids)
    eager, _ = _eager(x.cpu().float().to(torch.bfloat16), w.cpu(), bias.cpu(), a.cpu(), b.cpu(), scales, None, ids,
                      torch.zeros(m, n, dtype=torch.bfloat16))
    assert_close("y", oracle, y.cpu(), eager)


def test_reference_path_on_cpu_outputs_and_gradients(monkeypatch):
    """Without the interpreter, CPU tensors run the reference loop; its backward differentiates it."""
    monkeypatch.setattr(config, "interpreting", lambda: False)
    x, w, bias, a, b, scales = _setup(m=30)
    ids = popularity("zipf", 30, 5, torch.Generator().manual_seed(8))
    ranks = torch.tensor([8, 2, 5, 1, 8], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = adaptkern.mixed_lora_linear(leaves[0], w, bias, leaves[1], leaves[2], ids, scales=scales, ranks=ranks)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    oracle, oracle_g = _oracle(x, w, bias, a, b, scales, ranks, ids, gy)
    assert_close("y", oracle, y.detach())
    for name, g, og in zip(("dx", "dlora_a", "dlora_b"), grads, oracle_g):
        assert_close(name, og, g)


def test_strided_and_expanded_vectors_ids_shaped_like_x(device):
    x, w, bias, a, b, scales = _setup(m=12, device=device)
    ids = torch.tensor([3], dtype=torch.int32, device=device).expand(12)  # stride 0
    wide_scales = torch.stack([scales, torch.full_like(scales, 1e3)], 1)[:, 0]
    ranks = torch.tensor([[8, 0], [2, 0], [5, 0], [4, 0], [8, 0]], dtype=torch.int32, device=device)[:, 0]
    y = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=wide_scales, ranks=ranks)
    want = _oracle(x.cpu(), w.cpu(), bias.cpu(), a.cpu(), b.cpu(), scales.cpu(), ranks.cpu().contiguous(),
                   ids.cpu().contiguous())[0]
    assert_close("y", want, y.cpu())
    ids2d = torch.tensor([[0, -1, 4], [2, 2, 1], [3, -1, 0], [4, 4, 4]], dtype=torch.int32, device=device)
    y3 = adaptkern.mixed_lora_linear(x.view(4, 3, 40), w, bias, a, b, ids2d, scales=scales)
    y2 = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids2d.flatten(), scales=scales)
    assert y3.shape == (4, 3, 36) and torch.equal(y3.reshape(12, 36), y2)


def test_non_finite_scale_is_refused_and_cannot_leak(device):
    x, w, bias, a, b, scales = _setup(m=10, device=device)
    ids = torch.tensor([0, 1, -1, 0, 2, 1, -1, 0, 3, 4], dtype=torch.int32, device=device)
    bad = scales.clone()
    bad[0] = float("inf")
    with pytest.raises(ValueError, match="scales must be finite"):
        adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=bad)
    y = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=bad, validate_ids=False)
    want = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales)
    others = ids != 0
    assert torch.isfinite(y[others]).all(), "a non-finite scale must stay in its own slot's rows"
    assert torch.equal(y[others], want[others])


def test_out_of_range_ids_without_validation_are_base_only(device):
    """Under compile or graph capture ids are not checked on the host: the kernels must not read out of bounds."""
    x, w, bias, a, b, scales = _setup(m=8, device=device)
    ids = torch.tensor([0, 7, -3, 1, 5, 100, 2, -1], dtype=torch.int32, device=device)
    y = adaptkern.mixed_lora_linear(x, w, bias, a, b, ids, scales=scales, validate_ids=False)
    clean = torch.where((ids >= 0) & (ids < 5), ids, -1)
    assert torch.equal(y, adaptkern.mixed_lora_linear(x, w, bias, a, b, clean, scales=scales))


def test_one_slot_over_many_rows_splits_its_reduction(device):
    """dA/dB of a slot used by every row split its rows across programs (atomics); deterministic mode stores."""
    x, w, bias, a, b, scales = _setup(m=300, k=24, n=20, s=2, r=4, device=device)
    assert device == "cuda" or config.split_k(2, 300, config.gemm_config(4, 24).block_k, torch.device("cpu")) > 1
    ids = torch.ones(300, dtype=torch.int32, device=device)
    gy = torch.randn(300, 20, generator=torch.Generator().manual_seed(9))
    oracle_g = _oracle(x.cpu(), w.cpu(), bias.cpu(), a.cpu(), b.cpu(), scales.cpu(), None, ids.cpu(), gy)[1]
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            leaves = [t.clone().requires_grad_() for t in (x, a, b)]
            y = adaptkern.mixed_lora_linear(leaves[0], w, bias, leaves[1], leaves[2], ids, scales=scales)
            grads = torch.autograd.grad(y, leaves, gy.to(device))
        finally:
            torch.use_deterministic_algorithms(False)
        for name, g, og in zip(("dx", "dlora_a", "dlora_b"), grads, oracle_g):
            assert_close(name, og, g.cpu())
        assert not grads[1][0].any() and not grads[2][0].any()


# -- the raw op ``adaptkern::mixed_adapter_linear``, every optional input present ----------------------------
# A [S, R, K] stack with biases, per-slot ranks and activations. A test that takes ``path_device`` runs on both
# paths: "reference" (CPU tensors without the interpreter run reference.py) and "kernels" (Triton kernels).

S, R, K, N = 4, 5, 12, 10  # the raw op's stack: slots, max rank, in/out features
RANKS = [5, 2, 0, 3]  # slot 2 is empty (rank 0) but has a nonzero c: reading it by mistake shows
ACTS = [0, 2, 1, 4]  # identity, gelu, relu, silu (common.ACTIVATIONS codes)


def mixed_inputs(ids, dtype=torch.float32, seed=0, device="cpu"):
    """The eleven tensor inputs of ``adaptkern::mixed_adapter_linear`` with every optional one present."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ts = [rnd(len(ids), K), rnd(N, K, std=K**-0.5), rnd(N, std=0.5), rnd(S, R, K, std=K**-0.5), rnd(S, R, std=0.5),
          rnd(S, N, R, std=R**-0.5), rnd(S, N, std=0.5), (torch.rand(S, generator=g) + 0.5).to(acc),
          torch.tensor(RANKS, dtype=torch.int32), torch.tensor(ACTS, dtype=torch.int32),
          torch.tensor(ids, dtype=torch.int32)]
    return [t.to(device) for t in ts]


def op_args(inputs, *rest):
    """The op's arguments for ``mixed_inputs``: one slice (A and B as one-element lists), no SlotMapping,
    no column scales."""
    x, w, b, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids = inputs
    return [x, w, b, [a_all], a_bias, [b_all], b_bias, scales, ranks, acts, ids, None, None, *rest, None]


def mixed_oracle(inputs, gy):
    """float64 y and the gradients of (x, W, b, A, a, B, c), with every id outside [0, S) made -1."""
    ins = [t.detach().cpu() for t in inputs]
    ids = ins[10]
    ins[10] = torch.where((ids >= 0) & (ids < S), ids, -1)
    leaves = [t.double().requires_grad_() for t in ins[:7]]
    y = mixed_reference.mixed_adapter_linear_ref(*leaves, ins[7].double(), *ins[8:])
    return y.detach(), torch.autograd.grad(y, leaves, gy.cpu().double())


def oracle_z(inputs):
    """The z the kernels store: x_i·A_s[:r_s]ᵀ + a_s in a row's first r_s columns, else 0 (float64)."""
    x, _, _, a_all, a_bias, *_, ids = [t.detach().cpu() for t in inputs]
    z = torch.zeros(x.shape[0], R, dtype=torch.float64)
    for i, s in enumerate(ids.tolist()):
        if 0 <= s < S:
            r = RANKS[s]
            z[i, :r] = x[i].double() @ a_all[s, :r].double().t() + a_bias[s, :r].double()
    return z


# -- unchecked ids (validate_ids=False, torch.compile): outside [0, S) means base only ------------------


@pytest.mark.parametrize("bad", [-2, -7, S, S + 5])
def test_unchecked_out_of_range_ids_are_base_only(bad, path_device):
    """validate_ids=False / torch.compile pass ids unchecked: every id outside [0, S) is -1 on
    both paths, forward and backward (the reference read slot S-2 for -2 and raised
    IndexError for -7 and S; the kernels' backward raised IndexError for ids >= S)."""
    ids = [0, bad, 1, -1, 3, bad, 2, 0, bad]
    inputs = mixed_inputs(ids, device=path_device)
    leaves = [t.requires_grad_() if i < 7 else t for i, t in enumerate(inputs)]
    y, _ = mixed_adapter_linear_op(*op_args(leaves, True))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(path_device)
    grads = torch.autograd.grad(y, leaves[:7], gy)
    want, want_grads = mixed_oracle(inputs, gy)
    assert_close("y", want, y.detach().cpu())
    rows = [i for i, s in enumerate(ids) if s == bad]
    x64, w64, b64 = (t.detach().cpu().double() for t in inputs[:3])
    assert_close("out-of-range rows", x64[rows] @ w64.t() + b64, y.detach().cpu()[rows])
    for name, g, wg in zip(("dx", "dW", "db", "dA", "da", "dB", "dc"), grads, want_grads):
        assert_close(name, wg, g.cpu())
    assert not grads[3][2].any() and not grads[5][2].any(), "no row uses slot 2 (rank 0): it gets no gradient"


def test_a_non_finite_scale_of_an_unused_slot_does_not_reach_gradients(path_device):
    """Base-only rows were mapped to slot 0 in the kernels' backward, and 0·inf made its da, dc NaN."""
    inputs = mixed_inputs([1, -1, 3, -2, -1], device=path_device)
    inputs[7][0] = float("inf")
    leaves = [t.requires_grad_() if i < 7 else t for i, t in enumerate(inputs)]
    y, _ = mixed_adapter_linear_op(*op_args(leaves, True))
    grads = torch.autograd.grad(y, leaves[:7], torch.ones_like(y))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert not any(g[0].any() for g in grads[3:])


def test_the_reference_ignores_out_of_range_ids_as_the_kernels_do():
    """The float64 oracle itself: ids -2, -7, S, S+5 give the same result as -1."""
    ids = [0, -2, S, 1, -7, S + 5]
    inputs = [t.double() if t.is_floating_point() else t for t in mixed_inputs(ids)]
    clean = torch.tensor([0, -1, -1, 1, -1, -1], dtype=torch.int32)
    got = mixed_reference.mixed_adapter_linear_ref(*inputs)
    assert torch.equal(got, mixed_reference.mixed_adapter_linear_ref(*inputs[:10], clean))
    x, w, _, a_all, a_bias, b_all, _, scales, ranks, acts, ids = inputs
    dy, needs = torch.ones_like(got), [True] * 7
    backward = mixed_reference.mixed_adapter_linear_backward
    flat = lambda gs: [t for g in gs for t in (g if isinstance(g, (list, tuple)) else [g])]  # noqa: E731
    for g, want in zip(flat(backward(dy, x, w, [a_all], a_bias, [b_all], scales, ranks, acts, ids, needs)),
                       flat(backward(dy, x, w, [a_all], a_bias, [b_all], scales, ranks, acts, clean, needs))):
        assert torch.equal(g, want)


# -- real and fake (torch.library) outputs agree, on both paths -----------------------------------------


@pytest.mark.parametrize("need_z", [True, False], ids=["need_z", "no_z"])
def test_opcheck_mixed_forward_and_z_on_both_paths(need_z, path_device):
    """The reference path returned z = [0] where the fake (and the kernels) give [M, R]."""
    inputs = mixed_inputs([0, 1, -1, 3, 3, 2, 0, S, -2], device=path_device)
    inputs[3], inputs[5] = transposed_storage(inputs[3]), transposed_storage(inputs[5])
    args = [t.requires_grad_(need_z) if i < 7 else t for i, t in enumerate(inputs)]
    torch.library.opcheck(mixed_adapter_linear_op, op_args(args, need_z))
    y, z = mixed_adapter_linear_op(*op_args(args, need_z))
    assert y.shape == (9, N) and y.dtype == torch.float32 and y.is_contiguous()
    assert z.dtype == torch.float32 and z.shape == ((1, 9, R) if need_z else (0,))
    if need_z:  # the same z on both paths: what the kernels store
        assert_close("z", oracle_z(inputs), z[0].detach().cpu())


def test_opcheck_mixed_backward_on_both_paths(path_device):
    """Gradients of A and B come back contiguous (as the fake says) even for A, B laid out transposed."""
    inputs = mixed_inputs([0, 1, -1, 3, 3, 2, 0, S, -2], device=path_device)
    inputs[3], inputs[5] = transposed_storage(inputs[3]), transposed_storage(inputs[5])
    _, z = mixed_adapter_linear_op(*op_args(inputs, True))
    dy = torch.randn(9, N, generator=torch.Generator().manual_seed(2)).to(path_device)
    for needs in ([True] * 7, [False, False, False, True, False, True, True]):
        torch.library.opcheck(mixed_adapter_linear_backward_op, (dy, *op_args(inputs, z, needs)))
        grads = mixed_adapter_linear_backward_op(dy, *op_args(inputs, z, needs))
        for g, t, need in zip(grads, inputs, needs):
            assert g.shape == (t.shape if need else (0,)) and g.is_contiguous()


def test_inductor_compiles_a_differentiable_mixed_batch_on_the_reference_path(monkeypatch):
    """torch.compile(backend="inductor") failed in assert_size_stride on the reference path's z;
    its ids are not checked under compile, so the out-of-range ones must be base only."""
    monkeypatch.setattr(config, "interpreting", lambda: False)
    ids = [0, 1, -1, 3, 2, S, -2, 0]
    inputs = mixed_inputs(ids)
    leaves = [t.requires_grad_() if i < 7 else t for i, t in enumerate(inputs)]

    def loss(*ts):
        y, _ = mixed_adapter_linear_op(*op_args(ts, True))
        return y.relu().square().sum()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves[:7])
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves[:7])
    torch.testing.assert_close(out, eager)
    leaves64 = [t.detach().double().requires_grad_() if i < 7 else t for i, t in enumerate(inputs)]
    leaves64[7] = leaves64[7].double()
    leaves64[10] = torch.where((inputs[10] >= 0) & (inputs[10] < S), inputs[10], -1)
    y64 = mixed_reference.mixed_adapter_linear_ref(*leaves64)
    grads64 = torch.autograd.grad(y64.relu().square().sum(), leaves64[:7])
    for name, g, eg, g64 in zip(("dx", "dW", "db", "dA", "da", "dB", "dc"), grads, eager_grads, grads64):
        torch.testing.assert_close(g, eg, msg=name)
        assert_close(name, g64, g)
