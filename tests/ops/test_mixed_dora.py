"""DoRA slots in mixed batches: ``adaptkern::mixed_adapter_linear`` with per-slot column scales G [S, N]
(g_s = m_s / ‖W + s·B_s·A_s‖_row, ones for LoRA slots), through ``AdapterPool.load_dora`` +
``mixed_adapter_linear``, ``mixed_lora_linear(col_scales=…)`` and ``AdapterLinear``, against a
float64 per-row oracle (``dora_linear_ref`` for DoRA rows) and against the real PEFT."""

import pytest
import torch
from torch import nn

from adaptkern.mixed import mixed_adapter_linear, mixed_lora_linear
from adaptkern.mixed_batches import adapter_batch
from adaptkern.nn import AdapterLinear
from adaptkern.ops.common import use_triton
from adaptkern.ops.dora_linear.reference import dora_linear_ref
from adaptkern.pool import AdapterPool
from adaptkern.testing import assert_close

from ..helpers import count_launches

K, N, S, R = 37, 29, 4, 5  # odd sizes; slot 0 DoRA r5, slot 1 LoRA r3, slot 2 DoRA r2, slot 3 empty
DORA, LORA = (0, 2), (1,)


def _problem(m, dtype, seed=0):
    """x [m, K], W, b, per-slot (A, B, m, scale) and ids mixing DoRA, LoRA, empty and -1 rows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    w, b = rnd(N, K, std=K**-0.5), rnd(N, std=0.5)
    slots = {}
    for s, r in ((0, 5), (1, 3), (2, 2)):
        a, bb = rnd(r, K, std=K**-0.5), rnd(N, r, std=r**-0.5)
        mag = None
        if s in DORA:
            norm = torch.linalg.norm(w.double() + 0.7 * bb.double() @ a.double(), dim=1)
            mag = (norm * (1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64))).to(dtype)
        slots[s] = (a, bb, mag, 0.7 + 0.4 * s)
    ids = torch.randint(-1, S, (m,), generator=g, dtype=torch.int32)
    ids[:4] = torch.tensor([0, 1, 2, -1])[:m] if m >= 4 else ids[:4]
    return rnd(m, K), w, b, slots, ids


def _per_row(x, w, b, slots, ids):
    """The per-row formula in x's dtype: dora_linear_ref for DoRA rows, LoRA for LoRA rows, base for the rest."""
    y = nn.functional.linear(x, w, b)
    rows = []
    for s, (a, bb, mag, scale) in slots.items():
        sel = (ids == s).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        if mag is not None:
            out = dora_linear_ref(x[sel], w, b, a, bb, mag, scale)
        else:
            out = y[sel] + scale * (x[sel] @ a.t()) @ bb.t()
        rows.append((sel, out))
    for sel, out in rows:
        y = y.index_copy(0, sel, out)
    return y


def _oracle_and_eager(x, w, b, slots, ids):
    f64 = {s: tuple(t.double() if torch.is_tensor(t) else t for t in v) for s, v in slots.items()}
    return _per_row(x.double(), w.double(), b.double(), f64, ids), _per_row(x, w, b, slots, ids)


def _pool(w, slots, dtype, device):
    pool = AdapterPool(K, N, S, R, dtype=dtype, device=device)
    for s, (a, bb, mag, scale) in slots.items():
        if mag is None:
            pool.load_lora(s, a.to(device), bb.to(device), scale)
        else:
            pool.load_dora(s, a.to(device), bb.to(device), mag.to(device), scale, base_weight=w.to(device))
    return pool


def _col_scales(w, slots):
    """G [S, N] float64: g_s of the DoRA slots, ones elsewhere."""
    g = torch.ones(S, N, dtype=torch.float64)
    for s, (a, bb, mag, scale) in slots.items():
        if mag is not None:
            g[s] = mag.double() / torch.linalg.norm(w.double() + scale * bb.double() @ a.double(), dim=1)
    return g


# M=37 runs the decode plan (rows in order), M=150 the sorted prefill plan.
@pytest.mark.parametrize("m", [37, 150], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pool_mixes_dora_lora_and_base_rows(m, dtype, path_device, nan_poison):
    x, w, b, slots, ids = _problem(m, dtype)
    pool = _pool(w, slots, dtype, path_device)
    with count_launches() as launches:
        y = mixed_adapter_linear(x.to(path_device), w.to(path_device), b.to(path_device), pool, ids.to(path_device))
    assert launches["_mixed_adapter_linear_kernel"] == (1 if use_triton(y) else 0)
    want, eager = _oracle_and_eager(x, w, b, slots, ids)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert_close("y", want, y.cpu(), eager)


def test_empty_batch(path_device):
    x, w, b, slots, _ = _problem(0, torch.float32)
    pool = _pool(w, slots, torch.float32, path_device)
    y = mixed_adapter_linear(x.to(path_device), w.to(path_device), b.to(path_device), pool,
                             torch.zeros(0, dtype=torch.int32, device=path_device))
    assert y.shape == (0, N)


@pytest.mark.parametrize("m", [9, 100])
def test_base_rows_bit_equal_and_batch_invariance(m, path_device):
    """-1 rows (and rows of the empty slot) are exactly the base result; a row's bits do not depend on
    what the other rows use; LoRA rows are the bits of the same batch without any DoRA slot."""
    x, w, b, slots, ids = _problem(m, torch.float32, seed=3)
    x, w, b, ids = x.to(path_device), w.to(path_device), b.to(path_device), ids.to(path_device)
    pool = _pool(w, slots, torch.float32, path_device)
    run = lambda i: mixed_adapter_linear(x, w, b, pool, i)  # noqa: E731
    base = run(torch.full_like(ids, -1))
    y = run(ids)
    plain = (ids == -1) | (ids == 3)
    assert torch.equal(y[plain], base[plain])
    lora_pool = AdapterPool(K, N, S, R, device=path_device)
    a, bb, _, scale = slots[1]
    lora_pool.load_lora(1, a, bb, scale)
    lora_rows = torch.where(ids == 1, 1, -1).to(ids.dtype)
    assert torch.equal(y[ids == 1], mixed_adapter_linear(x, w, b, lora_pool, lora_rows)[ids == 1])
    other = torch.randint(-1, S, ids.shape, generator=torch.Generator().manual_seed(9), dtype=ids.dtype)
    other[0], other[-1] = ids[0], ids[-1]
    y2 = run(other.to(path_device))
    assert torch.equal(y[0], y2[0]) and torch.equal(y[-1], y2[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_raw_col_scales_outputs_and_gradients(dtype, path_device):
    """mixed_lora_linear(col_scales=G): y_i = G_s ⊙ (x·Wᵀ + s·x·A_sᵀ·B_sᵀ) + b, and the gradients of x, W, b,
    A and B (those of dY ⊙ G; db of dY) against float64 autograd of that formula."""
    m = 23
    gen = torch.Generator().manual_seed(5)
    x, w, b, slots, ids = _problem(m, dtype, seed=5)
    a_all = torch.zeros(S, R, K, dtype=dtype)
    b_all = torch.zeros(S, N, R, dtype=dtype)
    scales = torch.zeros(S)
    for s, (a, bb, _, scale) in slots.items():
        a_all[s, :a.shape[0]], b_all[s, :, :a.shape[0]], scales[s] = a, bb, scale
    g = _col_scales(w, slots)
    gy = torch.randn(m, N, generator=gen).to(dtype)

    def formula(x, w, b, a_all, b_all, g, sc):
        y = x @ w.t()
        for s in range(S):
            sel = (ids == s)[:, None]
            y = y + torch.where(sel, sc[s] * (x @ a_all[s].t()) @ b_all[s].t(), 0.0)
        used = (ids >= 0)[:, None]
        return torch.where(used, g[ids.clamp(min=0).long()], 1.0) * y + b

    def run(ts, g, sc):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        y = formula(*leaves, g, sc)
        return y.detach(), torch.autograd.grad(y, leaves, gy.to(y.dtype))

    want, want_g = run([t.double() for t in (x, w, b, a_all, b_all)], g, scales.double())
    eager, eager_g = run((x, w, b, a_all, b_all), g.to(dtype), scales.to(dtype))
    leaves = [t.to(path_device).requires_grad_() for t in (x, w, b, a_all, b_all)]
    y = mixed_lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], ids.to(path_device),
                          scales=scales.to(path_device), col_scales=g.float().to(path_device))
    got_g = torch.autograd.grad(y, leaves, gy.to(path_device))
    assert_close("y", want, y.detach().cpu(), eager)
    for name, wg, eg, gg in zip(("dx", "dW", "db", "dA", "dB"), want_g, eager_g, got_g):
        assert_close(name, wg, gg.cpu(), eg)


def test_raw_col_scales_with_output_slices(path_device):
    """q/k/v slices: the scales cover all ΣN_i columns."""
    m, widths = 11, (13, 9, 7)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(m, K, generator=gen), torch.randn(N, K, generator=gen) * K**-0.5
    b = torch.randn(N, generator=gen)
    a_list = [torch.randn(S, R, K, generator=gen) * K**-0.5 for _ in widths]
    b_list = [torch.randn(S, n, R, generator=gen) * R**-0.5 for n in widths]
    g = torch.rand(S, N, generator=gen, dtype=torch.float64) + 0.5
    ids = torch.tensor([0, 1, -1, 3, 2, 2, 0, -1, 1, 3, 0], dtype=torch.int32)
    dev = lambda ts: [t.to(path_device) for t in ts]  # noqa: E731
    y = mixed_lora_linear(x.to(path_device), w.to(path_device), b.to(path_device), dev(a_list), dev(b_list),
                          ids.to(path_device), output_slices=widths, col_scales=g.float().to(path_device))
    want = x.double() @ w.double().t()
    want = want + torch.cat([torch.stack([x[i].double() @ a[s].double().t() @ bs[s].double().t() if s >= 0 else
                                          torch.zeros(bs.shape[1], dtype=torch.float64) for i, s in
                                          enumerate(ids.tolist())]) for a, bs in zip(a_list, b_list)], 1)
    want = torch.where((ids >= 0)[:, None], g[ids.clamp(min=0).long()], 1.0) * want + b.double()
    assert_close("y", want, y.cpu())


def test_bad_col_scales_are_refused_naming_them():
    x, w, b, slots, ids = _problem(6, torch.float32)
    a, bb = torch.zeros(S, R, K), torch.zeros(S, N, R)
    with pytest.raises(ValueError, match=r"col_scales must have shape \(4, 29\)"):
        mixed_lora_linear(x, w, b, a, bb, ids, col_scales=torch.ones(S, N + 1))
    with pytest.raises(ValueError, match="col_scales must be 2-D"):
        mixed_lora_linear(x, w, b, a, bb, ids, col_scales=torch.ones(N))
    with pytest.raises(TypeError, match="col_scales must be a floating tensor"):
        mixed_lora_linear(x, w, b, a, bb, ids, col_scales=torch.ones(S, N, dtype=torch.int32))
    with pytest.raises(ValueError, match="col_scales must be finite"):
        mixed_lora_linear(x, w, b, a, bb, ids, col_scales=torch.full((S, N), float("inf")))
    with pytest.raises(ValueError, match="col_scales is not differentiable"):
        mixed_lora_linear(x, w, b, a, bb, ids, col_scales=torch.ones(S, N, requires_grad=True))


# -- AdapterLinear: DoRA and LoRA adapters in one mixed batch -------------------------------------------------


def _layer():
    torch.manual_seed(0)
    layer = AdapterLinear.from_linear(nn.Linear(K, N))
    layer.add_lora("d", 4, use_dora=True)
    layer.add_lora("l", 3)
    layer.add_lora("e", 2, use_dora=True)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora" in name:
                p.add_(0.1 * torch.randn_like(p))
    return layer


def test_adapter_linear_mixed_rows_equal_each_adapter_alone(device):
    """adapter_ids and adapter_batch (the snapshot pool) give every row what its adapter gives alone."""
    layer = _layer().to(device)
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(1)).to(device)
    names = ["d", "l", None, "e", "d"]
    with torch.no_grad():
        alone = {}
        for name in ("d", "l", "e"):
            layer.set_adapter(name)
            alone[name] = layer(x)
        base = nn.functional.linear(x, layer.weight, layer.bias)
        ids = [layer.adapter_slots[n] if n else -1 for n in names]
        y = layer(x.reshape(10, K), adapter_ids=[i for i in ids for _ in range(2)])
        with adapter_batch(nn.Sequential(layer), names[:2]):
            y_batch = nn.Sequential(layer)(x)
    per_row = [n for n in names for _ in range(2)]
    for i, n in enumerate(per_row):
        want = base.reshape(10, N)[i] if n is None else alone[n].reshape(10, N)[i]
        torch.testing.assert_close(y[i], want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y_batch[0], alone["d"][0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y_batch[1], alone["l"][1], rtol=2e-5, atol=2e-5)


def test_adapter_linear_training_a_mixed_dora_batch_is_refused():
    layer = _layer()
    with pytest.raises(NotImplementedError, match=r"DoRA adapters \(\['d', 'e'\]\)"):
        layer(torch.randn(3, K), adapter_ids=[0, 1, -1])
    with pytest.raises(NotImplementedError, match="DoRA"), adapter_batch(nn.Sequential(layer), ["d", None]):
        layer.train()
        layer(torch.randn(2, K))


# -- against the real PEFT ------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_model(dtype, name, seed):
    """A one-linear PEFT model with one DoRA adapter ``name`` (trained-looking B and magnitude)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N))
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg, adapter_name=name).to(dtype).eval()
    with torch.no_grad():
        pm.base_model.model[0].lora_magnitude_vector[name].weight.mul_(1.0 + 0.1 * torch.randn(N).to(dtype))
    return pm


def test_each_peft_dora_adapter_equals_its_rows_of_a_mixed_batch(device):
    """PEFT refuses adapter_names with DoRA, so each adapter runs alone in PEFT (fp64: the oracle; fp32:
    the eager error) and its rows of one mixed batch (two PEFT DoRA adapters, a LoRA slot, -1 rows) match."""
    x = torch.randn(12, K, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([0, 1, 2, -1, 1, 0, 0, 2, -1, 1, 0, 1], dtype=torch.int32)
    pool = AdapterPool(K, N, 3, 4, device=device)
    want = {}
    for slot, seed in ((0, 10), (1, 11)):
        pm = _peft_model(torch.float32, "ad", seed)
        layer = pm.base_model.model[0]
        base = layer.get_base_layer()
        pool.load_dora(slot, layer.lora_A["ad"].weight.detach().to(device),
                       layer.lora_B["ad"].weight.detach().to(device),
                       layer.lora_magnitude_vector["ad"].weight.detach().to(device), layer.scaling["ad"],
                       base_weight=base.weight.detach().to(device))
        with torch.no_grad():
            want[slot] = (_peft_model(torch.float64, "ad", seed)(x.double()), pm(x))
    pool.load_lora(2, torch.randn(3, K) * 0.2, torch.randn(N, 3) * 0.2, 1.5)
    w, b = base.weight.detach().to(device), base.bias.detach().to(device)
    with torch.no_grad(), count_launches() as launches:
        y = mixed_adapter_linear(x.to(device), w, b, pool, ids.to(device))
    assert launches["_mixed_adapter_linear_kernel"] == 1
    for slot, (oracle, eager) in want.items():
        rows = ids == slot
        assert_close(f"slot {slot}", oracle[rows], y.cpu()[rows], eager[rows])
    base_rows = ids == -1
    assert_close("base rows", x[base_rows].double() @ base.weight.double().t() + base.bias.double(),
                 y.cpu()[base_rows])
