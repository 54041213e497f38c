"""``mixed_lora_linear`` with output slices (packed q/k/v, gate/up): one LoRA per slice, every row its
adapter, against the float64 per-slot loop (``reference.mixed_lora_slices_ref``), on both paths."""

import pytest
import torch

from adaptkern.mixed import mixed_lora_linear
from adaptkern.ops import config
from adaptkern.ops.mixed_adapter_linear import reference
from adaptkern.slot_mapping import SlotMapping
from adaptkern.testing import assert_close

from ..helpers import count_launches

GQA = (64, 32, 32)  # q, k, v widths of a grouped-query attention projection
S, R, K = 5, 8, 24
RANKS = [8, 0, 3, 1, 6]  # ranks 0..R_max: slot 1 adds nothing


def inputs(m, widths=GQA, dtype=torch.float32, seed=0, k=K, s=S, r=R):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    n = sum(widths)
    return dict(x=rnd(m, k), weight=rnd(n, k, std=k**-0.5), bias=rnd(n, std=0.5),
                lora_a=[rnd(s, r, k, std=k**-0.5) for _ in widths], lora_b=[rnd(s, w, r, std=r**-0.5) for w in widths],
                scales=torch.rand(s, generator=g) + 0.5, ranks=torch.tensor(RANKS[:s], dtype=torch.int32),
                ids=torch.randint(-1, s, (m,), generator=g, dtype=torch.int32))


def run(inp, device, widths=GQA, ids=None, grad=False, **kw):
    t = {n: ([v.to(device).requires_grad_(grad) for v in val] if isinstance(val, list) else
             val.to(device).requires_grad_(grad and n == "x")) for n, val in inp.items()}
    y = mixed_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                          t["ids"] if ids is None else ids, scales=t["scales"], ranks=t["ranks"],
                          output_slices=widths, **kw)
    return y, t


def formula(inp, cast):
    """(y, grads of x, A_i, B_i) of the per-slot loop with every tensor passed through ``cast``."""
    leaves = [cast(inp["x"]).requires_grad_(), *[cast(a).requires_grad_() for a in inp["lora_a"]],
              *[cast(b).requires_grad_() for b in inp["lora_b"]]]
    n = len(inp["lora_a"])
    y = reference.mixed_lora_slices_ref(leaves[0], cast(inp["weight"]), cast(inp["bias"]), leaves[1:1 + n],
                                        leaves[1 + n:], inp["scales"].to(leaves[0].dtype), inp["ranks"], inp["ids"])
    return y, leaves


@pytest.mark.parametrize("m", [13, 150], ids=lambda m: f"M{m}")  # decode plan, sorted prefill plan
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gqa_slices_outputs_and_gradients(m, dtype, path_device, nan_poison):
    inp = inputs(m, dtype=dtype, seed=m)
    y, t = run(inp, path_device, grad=True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(y, [t["x"], *t["lora_a"], *t["lora_b"]], gy.to(path_device))
    (want, w_leaves), (eager, e_leaves) = formula(inp, lambda v: v.double()), formula(inp, lambda v: v.clone())
    want_g = torch.autograd.grad(want, w_leaves, gy.double())
    eager_g = torch.autograd.grad(eager, e_leaves, gy)
    assert_close("y", want, y.detach().cpu(), eager.detach())
    names = ["dx", *[f"dA{i}" for i in range(3)], *[f"dB{i}" for i in range(3)]]
    for name, g, wg, eg in zip(names, got, want_g, eager_g):
        assert_close(name, wg, g.cpu(), eg)
    for i in range(3):  # rank 0 and unused slots, and rank columns past r_s, get exact zeros
        for s in range(S):
            assert not got[1 + i][s, RANKS[s]:].any() and not got[4 + i][s, :, RANKS[s]:].any()
            if s not in inp["ids"].tolist():
                assert not got[1 + i][s].any() and not got[4 + i][s].any()


def test_base_rows_bit_equal_batch_invariance_and_unadapted_slice(path_device):
    inp = inputs(70, seed=3)
    base, _ = run(inp, path_device, ids=torch.full((70,), -1, dtype=torch.int32, device=path_device))
    y1, _ = run(inp, path_device)
    rows = inp["ids"] == -1
    assert torch.equal(y1[rows.to(path_device)], base[rows.to(path_device)]), "-1 rows must be bit-equal to base"
    other = torch.randint(-1, S, (70,), generator=torch.Generator().manual_seed(9), dtype=torch.int32)
    other[:5] = inp["ids"][:5]
    y2, _ = run(inp, path_device, ids=other.to(path_device))
    assert torch.equal(y1[:5], y2[:5]), "a row's output must not depend on its neighbours' adapters"
    zero_v = dict(inp, lora_b=[*inp["lora_b"][:2], torch.zeros_like(inp["lora_b"][2])])  # no slot adapts v
    y3, _ = run(zero_v, path_device)
    assert torch.equal(y3[:, 96:], base[:, 96:])


def test_m_zero_and_mapping_equals_ids(path_device):
    inp = inputs(0)
    y, _ = run(inp, path_device)
    assert y.shape == (0, 128)
    inp = inputs(90, seed=4)
    mapping = SlotMapping.empty(128, S, device=path_device).update_(inp["ids"].to(path_device))
    y_ids, _ = run(inp, path_device)
    y_map, _ = run(inp, path_device, ids=mapping)
    assert torch.equal(y_ids, y_map)


def test_one_fused_launch_family(device):
    inp = inputs(13)
    with count_launches() as launches:
        run(inp, device)
    assert dict(launches) == {"_mixed_adapter_linear_shrink_kernel": 1, "_mixed_adapter_linear_kernel": 1}


def test_lm_head_vocab_32000(path_device):
    """LoRA on lm_head is one slice of N = vocab; K and M kept tiny for the interpreter."""
    m, v = 3, 32003
    inp = inputs(m, widths=(v,), k=8, s=3, r=4, seed=5)
    inp["ranks"] = torch.tensor([4, 2, 0], dtype=torch.int32)
    y = mixed_lora_linear(inp["x"].to(path_device), inp["weight"].to(path_device), inp["bias"].to(path_device),
                          inp["lora_a"][0].to(path_device), inp["lora_b"][0].to(path_device),
                          inp["ids"].to(path_device), scales=inp["scales"].to(path_device), ranks=inp["ranks"])
    want, _ = formula(inp, lambda t: t.double())
    assert_close("logits", want.detach(), y.cpu())


def test_compile_fullgraph_on_the_reference_path(monkeypatch):
    monkeypatch.setattr(config, "interpreting", lambda: False)
    inp = inputs(20, seed=6)
    mapping = SlotMapping.empty(32, S)

    def step(x, ids, a0, a1, a2, b0, b1, b2):
        mapping.update_(ids, validate=False)
        return mixed_lora_linear(x, inp["weight"], inp["bias"], [a0, a1, a2], [b0, b1, b2], mapping,
                                 scales=inp["scales"], ranks=inp["ranks"], output_slices=GQA).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [inp["x"].requires_grad_(), *[a.requires_grad_() for a in inp["lora_a"]],
              *[b.requires_grad_() for b in inp["lora_b"]]]
    for seed in (0, 1):
        ids = torch.randint(-3, S + 3, (20,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        got = torch.autograd.grad(compiled(leaves[0], ids, *leaves[1:]), leaves)
        want = torch.autograd.grad(step(leaves[0], ids, *leaves[1:]), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(output_slices=(64, 32, 31)), ValueError, r"must sum to weight.shape\[0\] = 128"),
    (dict(output_slices=(64, 64)), ValueError, r"output_slices has 2 entries but there are 3"),
    (dict(output_slices=[64, 32, 32.0]), TypeError, "positive ints"),
    (dict(lora_b="drop"), ValueError, r"lora_a has 3 slices but lora_b has 2"),
    (dict(lora_a="tensor"), TypeError, r"lora_a must be a non-empty list"),
    (dict(lora_b="wide"), ValueError, r"lora_b\[1\] must be \[S, N_i, R_max\] = \(5, 32, 8\)"),
    (dict(ranks=torch.tensor([8, 9, 0, 0, 0])), ValueError, r"ranks must lie in \[0, 8\]"),
])
def test_errors_name_the_argument(change, exc, pattern):
    inp = inputs(4)
    kw = dict(output_slices=GQA, scales=inp["scales"], ranks=inp["ranks"])
    a, b = inp["lora_a"], inp["lora_b"]
    if change.get("lora_b") == "drop":
        b = b[:2]
    elif change.get("lora_b") == "wide":
        b = [b[0], torch.zeros(S, 33, R), b[2]]
    elif change.get("lora_a") == "tensor":
        a = a[0]
    else:
        kw.update(change)
    with pytest.raises(exc, match=pattern):
        mixed_lora_linear(inp["x"], inp["weight"], inp["bias"], a, b, inp["ids"], **kw)


@pytest.mark.gpu
def test_qkv_decode_on_gpu_bf16():
    inp = inputs(64, widths=(4096, 1024, 1024), dtype=torch.bfloat16, k=4096, s=32, r=16, seed=7)
    inp["ranks"] = torch.randint(0, 17, (32,), dtype=torch.int32)
    y, _ = run(inp, "cuda", widths=(4096, 1024, 1024))
    want, _ = formula(inp, lambda t: t.double())
    eager, _ = formula(inp, lambda t: t.clone())
    assert_close("y", want.detach(), y.cpu(), eager.detach())


def test_gradient_of_the_base_weight_alone(path_device):
    """Only W requires grad: the slices' gradients come back as lists of None (the inputs' structure)."""
    inp = inputs(9, seed=8)
    w = inp["weight"].to(path_device).requires_grad_()
    y = mixed_lora_linear(inp["x"].to(path_device), w, None, [a.to(path_device) for a in inp["lora_a"]],
                          [b.to(path_device) for b in inp["lora_b"]], inp["ids"].to(path_device), scales=inp["scales"],
                          ranks=inp["ranks"], output_slices=GQA)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (gw,) = torch.autograd.grad(y, [w], gy.to(path_device))
    assert_close("dW", gy.double().t() @ inp["x"].double(), gw.cpu())
