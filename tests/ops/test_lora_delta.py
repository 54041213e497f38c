"""Serving stacks' delta ops (``lora_shrink``, ``lora_expand``, ``add_lora_delta``) against the float64
reference (``adaptkern.ops.lora_delta.reference``), into wider caller-owned buffers, on both paths."""

import pytest
import torch

from adaptkern.ops import config
from adaptkern.ops.lora_delta import add_lora_delta_op, one_launch
from adaptkern.ops.lora_delta import reference
from adaptkern.serving import add_lora_delta, lora_expand, lora_shrink
from adaptkern.slot_mapping import SlotMapping
from adaptkern.testing import assert_close

from ..helpers import count_launches

WIDTHS = (16, 8, 8)
S, R, K, OFFSET, WIDE = 4, 8, 24, 3, 40  # y has WIDE columns; the slices sit at [OFFSET, OFFSET + 32)
RANKS = [8, 0, 3, 5]


def inputs(m, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

    return dict(x=rnd(m, K), a=[rnd(S, R, K, std=K**-0.5) for _ in WIDTHS],
                b=[rnd(S, w, R, std=R**-0.5) for w in WIDTHS],
                y=rnd(m, WIDE), scales=(torch.rand(S, generator=g) + 0.5).to(device),
                ranks=torch.tensor(RANKS, dtype=torch.int32, device=device),
                ids=torch.randint(-1, S, (m,), generator=g).to(device))


def eager_delta(inp):
    """y + Δ in the test dtype, slice by slice (the error plain PyTorch makes)."""
    y = inp["y"].cpu().clone()
    x, ids = inp["x"].cpu(), inp["ids"].cpu()
    start = OFFSET
    for a, b in zip(inp["a"], inp["b"]):
        for s in range(S):
            rows, r = ids == s, RANKS[s]
            y[rows, start:start + b.shape[1]] += (inp["scales"][s].to(x.dtype) * (x[rows] @ a[s, :r].cpu().t())) @ \
                b[s, :, :r].cpu().t()
        start += b.shape[1]
    return y


def d64(inp):
    return {k: ([t.cpu().double() for t in v] if isinstance(v, list) else
                (v.cpu().double() if v.is_floating_point() else v.cpu())) for k, v in inp.items()}


@pytest.mark.parametrize("m", [6, 90], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_shrink_then_expand(m, dtype, path_device):
    inp = inputs(m, dtype, seed=m, device=path_device)
    o = d64(inp)
    out = torch.full((3, m, R), float("nan"), device=path_device)  # every element must be written
    got = lora_shrink(inp["x"], inp["a"], inp["ids"], scales=inp["scales"], ranks=inp["ranks"], out=out)
    assert got is out
    want = reference.lora_shrink_ref(o["x"], o["a"], o["scales"], inp["ranks"].cpu(), o["ids"])
    eager = reference.lora_shrink_ref(inp["x"].cpu(), [a.cpu() for a in inp["a"]], inp["scales"].cpu(),
                                      inp["ranks"].cpu(), inp["ids"].cpu())
    assert_close("shrink", want, out.cpu(), eager)
    y = inp["y"].clone()
    y[:, :OFFSET] = float("nan")  # outside the slices: must stay as it was
    before = y.clone()
    assert lora_expand(y, out, inp["b"], inp["ids"], ranks=inp["ranks"], offset=OFFSET) is y
    want_y = reference.lora_expand_ref(o["y"], want, o["b"], inp["ranks"].cpu(), o["ids"], OFFSET, True)
    eager_y = reference.lora_expand_ref(inp["y"].cpu(), out.cpu(), [b.cpu() for b in inp["b"]], inp["ranks"].cpu(),
                                        inp["ids"].cpu(), OFFSET, True)
    assert_close("expand", want_y[:, OFFSET:], y[:, OFFSET:].cpu(), eager_y[:, OFFSET:])
    assert torch.equal(y[:, :OFFSET].isnan(), before[:, :OFFSET].isnan()) and torch.equal(y[:, 35:], before[:, 35:])
    base_rows = (inp["ids"] == -1) | (inp["ids"] == 1)  # no slot, and the rank-0 slot: untouched
    assert torch.equal(y[base_rows][:, OFFSET:], before[base_rows][:, OFFSET:])


@pytest.mark.parametrize("m", [1, 6, 90], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_lora_delta(m, dtype, path_device):
    inp = inputs(m, dtype, seed=m + 1, device=path_device)
    o = d64(inp)
    want = reference.add_lora_delta_ref(o["y"], o["x"], o["a"], o["b"], o["scales"], inp["ranks"].cpu(), o["ids"],
                                        OFFSET)
    eager = eager_delta(inp)
    for fused in (True, False):  # one launch (decode) and shrink + expand, through the op itself
        y = inp["y"].clone()
        add_lora_delta_op(y, inp["x"], inp["a"], inp["b"], inp["scales"], inp["ranks"], inp["ids"], None, OFFSET,
                          fused)
        assert_close(f"delta fused={fused}", want, y.cpu(), eager)
        assert torch.equal(y[inp["ids"] == -1], inp["y"][inp["ids"] == -1]), "rows without a slot are untouched"
    y = inp["y"].clone()
    assert add_lora_delta(y, inp["x"], inp["a"], inp["b"], inp["ids"], scales=inp["scales"], ranks=inp["ranks"],
                          output_slices=WIDTHS, offset=OFFSET) is y
    assert_close("delta", want, y.cpu(), eager)


def test_decode_is_one_launch_and_prefill_two(device):
    assert one_launch(8, 32, K, R, S, 4) and not one_launch(200, 32, K, R, S, 4)
    assert not one_launch(64, 4096 + 2048, 4096, 16, 32, 2), "a re-read of A per column tile must not win here"
    for m, want in ((8, {"_mixed_adapter_linear_kernel": 1}),
                    (200, {"_mixed_adapter_linear_shrink_kernel": 1, "_mixed_adapter_linear_kernel": 1})):
        inp = inputs(m, device=device)
        with count_launches() as launches:
            add_lora_delta(inp["y"], inp["x"], inp["a"], inp["b"], inp["ids"], scales=inp["scales"], offset=OFFSET)
        assert dict(launches) == want


def test_single_tensors_add_false_mapping_and_m_zero(path_device):
    inp = inputs(10, seed=3, device=path_device)
    mapping = SlotMapping.from_ids(inp["ids"], S)
    s2 = lora_shrink(inp["x"], inp["a"][0], mapping, scales=inp["scales"])  # one tensor: [M, R]
    assert s2.shape == (10, R) and s2.dtype == torch.float32
    y = torch.full((10, 20), float("nan"), device=path_device)
    lora_expand(y, s2, inp["b"][0], mapping, offset=2, add=False)
    want = reference.lora_expand_ref(torch.zeros(10, 20, dtype=torch.float64), s2.cpu()[None].double(),
                                     [inp["b"][0].cpu().double()], None, inp["ids"].cpu(), 2, False)
    assert_close("expand add=False", want[:, 2:18], y[:, 2:18].cpu())
    assert y[:, :2].isnan().all() and y[:, 18:].isnan().all()
    assert not y[inp["ids"] == -1][:, 2:18].any(), "add=False: rows without a slot get zeros"
    empty = inputs(0, device=path_device)
    assert lora_shrink(empty["x"], empty["a"], empty["ids"]).shape == (3, 0, R)
    assert add_lora_delta(empty["y"], empty["x"], empty["a"], empty["b"], empty["ids"]).shape == (0, WIDE)


def test_compile_fullgraph_on_the_reference_path(monkeypatch):
    monkeypatch.setattr(config, "interpreting", lambda: False)
    inp = inputs(12, seed=4)

    def step(y, x, ids):
        buf = lora_shrink(x, inp["a"], ids, scales=inp["scales"], ranks=inp["ranks"], validate_ids=False)
        lora_expand(y, buf, inp["b"], ids, ranks=inp["ranks"], offset=OFFSET, validate_ids=False)
        return add_lora_delta(y, x, inp["a"], inp["b"], ids, scales=inp["scales"], offset=OFFSET, validate_ids=False)

    y1, y2 = inp["y"].clone(), inp["y"].clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(y1, inp["x"], inp["ids"])
    assert torch.equal(got, step(y2, inp["x"], inp["ids"])) and torch.equal(y1, y2)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda i: lora_shrink(i["x"], i["a"], i["ids"], out=torch.zeros(3, 5, R, dtype=torch.float16)), ValueError,
     r"out must be a torch.float32 tensor of shape \(3, 5, 8\)"),
    (lambda i: lora_expand(i["y"], torch.zeros(2, 5, R), i["b"], i["ids"]), ValueError,
     r"s must have shape \(3, 5, 8\)"),
    (lambda i: lora_expand(i["y"], torch.zeros(3, 5, R), i["b"], i["ids"], offset=9), ValueError,
     r"offset 9 \+ the slices' width 32 exceeds y's 40 columns"),
    (lambda i: add_lora_delta(i["y"], i["x"], i["a"], i["b"], i["ids"], output_slices=(16, 16)), ValueError,
     "output_slices has 2 entries"),
    (lambda i: add_lora_delta(i["y"], i["x"], i["a"], i["b"], torch.tensor([0, 1, 4, 0, 0])), ValueError,
     r"adapter_ids\[2\] = 4 is out of range"),
    (lambda i: add_lora_delta(i["y"], i["x"].requires_grad_(), i["a"], i["b"], i["ids"]), ValueError,
     "not differentiable"),
    (lambda i: add_lora_delta(i["y"], i["x"], i["a"], i["b"], SlotMapping.from_ids(torch.zeros(4, dtype=torch.long),
                                                                                    S)), ValueError, "M=4 rows"),
])
def test_errors_name_the_argument_and_write_nothing(call, exc, pattern):
    inp = inputs(5)
    before = inp["y"].clone()
    with pytest.raises(exc, match=pattern):
        call(inp)
    assert torch.equal(inp["y"], before)
