"""``adaptkern.quantized.mixed_qlora_linear``: mixed-adapter LoRA on a bitsandbytes 4-bit weight, against a
float64 oracle built from bitsandbytes' ``dequantize_4bit`` and the mixed formula, on both paths; -1 rows
bit-equal to the 4-bit base alone, and proof that the kernels never hold W in 16 bits."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adaptkern.ops.common import use_triton
from adaptkern.ops.mixed_adapter_linear import reference
from adaptkern.ops.quantized_lora_linear import code_pairs, quantized_linear_op
from adaptkern.quantized import QuantizedWeight, mixed_qlora_linear
from adaptkern.slot_mapping import SlotMapping
from adaptkern.testing import assert_close

from .helpers import count_launches, transposed_storage

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

BASE, DELTA, SHRINK = ("_quantized_lora_linear_fwd_kernel", "_mixed_adapter_linear_kernel",
                       "_mixed_adapter_linear_shrink_kernel")
GQA = (64, 32, 32)  # q, k, v widths of a grouped-query attention projection
S, R, K = 4, 8, 128
RANKS = [8, 0, 3, 5]  # slot 1 has rank 0: adds nothing
DECODE, PREFILL = 9, 70  # the delta in one launch; above 64 rows: sorted rows, shrink + expand
QUANT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quant_id(q):
    return f"{q[0]}-{'dq' if q[1] else 'plain'}"


def quantize(n, k=K, w_dtype=torch.bfloat16, quant_type="nf4", nested=True, blocksize=64, seed=0):
    """(packed, quant_state, W as bitsandbytes dequantizes it) for a random [n, k] weight."""
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5).to(w_dtype)
    packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return packed, qs, BF.dequantize_4bit(packed, qs)


def adapters(m, widths, dtype, seed=1, k=K):
    """x, bias, per-slice A [S, R, K] and B [S, N_i, R], scales, ranks and ids (every slot and -1 present)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    ids = torch.randint(-1, S, (m,), generator=g)
    ids[: min(m, S + 1)] = torch.arange(-1, S)[: min(m, S + 1)]
    return dict(x=rnd(m, k), bias=rnd(sum(widths), std=0.5), a=[rnd(S, R, k, std=k**-0.5) for _ in widths],
                b=[rnd(S, w, R, std=R**-0.5) for w in widths], scales=torch.rand(S, generator=g) + 0.5,
                ranks=torch.tensor(RANKS, dtype=torch.int32), ids=ids)


def to(inp, device):
    return {n: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for n, v in inp.items()}


def run(packed, qs, inp, device, sliced=True, ids=None):
    t = to(inp, device)
    a, b = (t["a"], t["b"]) if sliced else (t["a"][0], t["b"][0])
    widths = tuple(v.shape[1] for v in t["b"]) if sliced else None
    return mixed_qlora_linear(t["x"], packed.to(device), qs, t["bias"], a, b,
                              t["ids"] if ids is None else ids, scales=t["scales"], ranks=t["ranks"],
                              output_slices=widths)


def formula(w_bnb, inp, cast):
    """The mixed formula (per-slot loop) with every floating tensor, W included, passed through ``cast``."""
    return reference.mixed_lora_slices_ref(cast(inp["x"]), cast(w_bnb.to(inp["x"].dtype)), cast(inp["bias"]),
                                           [cast(a) for a in inp["a"]], [cast(b) for b in inp["b"]],
                                           inp["scales"].to(cast(inp["x"]).dtype), inp["ranks"], inp["ids"])


def check(y, w_bnb, inp):
    oracle = formula(w_bnb, inp, lambda v: v.double())
    eager = formula(w_bnb, inp, lambda v: v.clone())
    assert y.dtype == inp["x"].dtype
    assert_close("y", oracle, y.cpu(), eager)


def kernels(device) -> bool:
    return use_triton(torch.empty(0, device=device))


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANT, ids=_quant_id)
def test_matches_fp64_oracle(quant, dtype, path_device):
    """One adapter over all N columns, mixed ranks (0 included), -1 rows; a decode batch: base + one launch."""
    quant_type, nested = quant
    packed, qs, w_bnb = quantize(96, w_dtype=dtype, quant_type=quant_type, nested=nested)
    inp = adapters(DECODE, (96,), dtype)
    with count_launches() as launches:
        y = run(packed, qs, inp, path_device, sliced=False)
    assert dict(launches) == ({BASE: 1, DELTA: 1} if kernels(path_device) else {})
    check(y, w_bnb, inp)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("m", [DECODE, PREFILL], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_slices(m, dtype, path_device):
    """q/k/v slices 64/32/32 of one packed 4-bit projection; K = 70 (blocks of 32 cross rows); the
    weight stored in float16 while computing in another dtype. Decode: 2 launches; prefill: 3."""
    packed, qs, w_bnb = quantize(sum(GQA), k=70, w_dtype=torch.float16, quant_type="fp4", blocksize=32)
    inp = adapters(m, GQA, dtype, seed=m, k=70)
    with count_launches() as launches:
        y = run(packed, qs, inp, path_device)
    if kernels(path_device):
        assert dict(launches) == ({BASE: 1, DELTA: 1} if m == DECODE else {BASE: 1, SHRINK: 1, DELTA: 1})
    check(y, w_bnb, inp)


@pytest.mark.parametrize("m", [DECODE, PREFILL], ids=lambda m: f"M{m}")
def test_base_rows_are_the_4bit_base_bit_for_bit(m, path_device):
    """Rows with id -1 and rows of the rank-0 slot equal ``adaptkern::quantized_linear`` (the 4-bit base
    alone) bit for bit; an all -1 batch is that base exactly."""
    packed, qs, _ = quantize(sum(GQA))
    inp = adapters(m, GQA, torch.bfloat16, seed=5)
    qw = QuantizedWeight.from_bnb(packed.to(path_device), qs)
    x = inp["x"].to(path_device)
    base = quantized_linear_op(x, qw.data, qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset,
                               code_pairs(qw.code), sum(GQA), qw.blocksize, qw.dtype, inp["bias"].to(path_device))
    y = run(packed, qs, inp, path_device)
    plain = (inp["ids"] == -1) | (inp["ids"] == 1)
    assert 0 < int(plain.sum()) < m
    assert torch.equal(y[plain.to(path_device)], base[plain.to(path_device)])
    assert not torch.equal(y[~plain.to(path_device)], base[~plain.to(path_device)])
    none = torch.full((m,), -1, device=path_device)
    assert torch.equal(run(packed, qs, inp, path_device, ids=none), base)


@pytest.mark.parametrize("m", [DECODE, PREFILL], ids=lambda m: f"M{m}")
def test_batch_invariance(m, path_device):
    """A row's output does not depend on which adapters the other rows use (fixed M)."""
    packed, qs, _ = quantize(sum(GQA))
    inp = adapters(m, GQA, torch.bfloat16, seed=6)
    y = run(packed, qs, inp, path_device)
    keep = torch.arange(m) % 3 == 0
    others = torch.randint(-1, S, (m,), generator=torch.Generator().manual_seed(9))
    ids2 = torch.where(keep, inp["ids"], others)
    y2 = run(packed, qs, inp, path_device, ids=ids2.to(path_device))
    assert torch.equal(y[keep.to(path_device)], y2[keep.to(path_device)])


def test_weight_forms_mapping_lead_dims_and_non_contiguous_x(path_device):
    """A Params4bit, a packed tensor plus its QuantState and a QuantizedWeight; a SlotMapping, a list and
    [B, T]-shaped ids with x [B, T, K]; x stored transposed: all the same bits."""
    packed, qs, _ = quantize(sum(GQA))
    inp = to(adapters(12, GQA, torch.float32, seed=7), path_device)
    want = run(packed, qs, inp, path_device)
    param = bnb.nn.Params4bit(packed.to(path_device), requires_grad=False, quant_state=qs, bnb_quantized=True)
    qw = QuantizedWeight.from_bnb(packed.to(path_device), qs)
    mapping = SlotMapping.empty(16, S, device=path_device).update_(inp["ids"])
    widths = dict(output_slices=GQA, scales=inp["scales"], ranks=inp["ranks"])
    for weight, ids, x in ((param, inp["ids"], inp["x"]), (qw, mapping, inp["x"]), (qw, inp["ids"].tolist(), inp["x"]),
                           (qw, inp["ids"], transposed_storage(inp["x"]))):
        y = mixed_qlora_linear(x, weight, None, inp["bias"], inp["a"], inp["b"], ids, **widths)
        assert torch.equal(y, want)
    y3 = mixed_qlora_linear(inp["x"].reshape(3, 4, K), qw, None, inp["bias"], inp["a"], inp["b"],
                            inp["ids"].reshape(3, 4), **widths)
    assert y3.shape == (3, 4, sum(GQA)) and torch.equal(y3.reshape(12, -1), want)


def test_m_zero(path_device):
    packed, qs, _ = quantize(sum(GQA))
    inp = adapters(0, GQA, torch.bfloat16)
    with count_launches() as launches:
        y = run(packed, qs, inp, path_device)
    assert y.shape == (0, sum(GQA)) and y.dtype == torch.bfloat16 and not launches


def largest_allocation(fn) -> int:
    """The largest allocation (bytes) torch's allocators make while ``fn`` runs, inside custom ops too."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), default=0)


@pytest.mark.parametrize("m", [DECODE, PREFILL], ids=lambda m: f"M{m}")
def test_kernels_never_hold_w_in_16_bits(m, device, monkeypatch):
    """The kernels path allocates nothing as large as W [N, K] in 16 bits: W lives only as its 4-bit
    codes, dequantized tile by tile in registers. The same probe on the reference path, which
    dequantizes W, sees such an allocation."""
    n = sum(GQA)
    packed, qs, _ = quantize(n)
    inp = adapters(m, GQA, torch.bfloat16, seed=8)
    w16 = 2 * n * K
    t = to(inp, device)
    with monkeypatch.context() as patch, count_launches() as launches:
        for dequantize in ("adaptkern.ops.quantized_lora_linear.reference.dequantize_4bit_ref",
                           "bitsandbytes.functional.dequantize_4bit"):
            patch.setattr(dequantize, lambda *a, **k: pytest.fail("W was dequantized"))
        largest = largest_allocation(lambda: run(packed, qs, t, device))
    assert largest < w16
    if kernels(device):
        assert dict(launches) == ({BASE: 1, DELTA: 1} if m == DECODE else {BASE: 1, SHRINK: 1, DELTA: 1})
    monkeypatch.setattr("adaptkern.ops.config.interpreting", lambda: False)
    assert largest_allocation(lambda: run(packed, qs, to(inp, "cpu"), "cpu")) >= w16


def test_compile_fullgraph_on_the_reference_path(monkeypatch):
    monkeypatch.setattr("adaptkern.ops.config.interpreting", lambda: False)
    packed, qs, _ = quantize(sum(GQA))
    qw = QuantizedWeight.from_bnb(packed, qs)
    inp = adapters(12, GQA, torch.float32, seed=10)

    def step(x, ids):
        return mixed_qlora_linear(x, qw, None, inp["bias"], inp["a"], inp["b"], ids, scales=inp["scales"],
                                  ranks=inp["ranks"], output_slices=GQA, validate_ids=False)

    with torch.no_grad():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(inp["x"], inp["ids"])
        assert torch.equal(got, step(inp["x"], inp["ids"]))


def test_inference_only():
    packed, qs, _ = quantize(sum(GQA))
    inp = adapters(4, GQA, torch.float32)
    with pytest.raises(ValueError, match=r"inference only, but x require grad.*torch.no_grad"):
        run(packed, qs, dict(inp, x=inp["x"].requires_grad_()), "cpu")
    with pytest.raises(ValueError, match=r"lora_b\[2\] require grad"):
        run(packed, qs, dict(inp, b=[*inp["b"][:2], inp["b"][2].requires_grad_()]), "cpu")
    with torch.no_grad():
        y = run(packed, qs, inp, "cpu")
    assert y.shape == (4, sum(GQA)) and not y.requires_grad


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(x=torch.zeros(4, K + 1)), ValueError, r"x's last dim must equal the weight's K"),
    (dict(bias=torch.zeros(5)), ValueError, "bias"),
    (dict(slices=(64, 64)), ValueError, "output_slices has 2 entries"),
    (dict(slices=(64, 32, 33)), ValueError, "must sum to"),
    (dict(ids=torch.tensor([0, 1, 4, -1])), ValueError, r"adapter_ids\[2\] = 4 is out of range"),
    (dict(ids=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "adapter_ids must be int32 or int64"),
    (dict(ranks=torch.tensor([8, 9, 0, 0], dtype=torch.int32)), ValueError, r"ranks must lie in \[0, 8\]"),
    (dict(scales=torch.tensor([1.0, float("inf"), 1.0, 1.0])), ValueError, "scales must be finite"),
    (dict(scales=torch.ones(3)), ValueError, r"scales must have shape \(4,\)"),
    (dict(b2=torch.zeros(S, 32, R + 1)), ValueError, r"lora_b\[2\] must be \[S, N_i, R_max\]"),
    (dict(mapping=12), ValueError, "M=12 rows"),
    (dict(state=True), ValueError, "quant_state must be None"),
])
def test_errors_name_the_argument_and_launch_nothing(change, exc, pattern):
    packed, qs, _ = quantize(sum(GQA))
    inp = adapters(4, GQA, torch.float32)
    weight, state = (QuantizedWeight.from_bnb(packed, qs), qs) if change.get("state") else (packed, qs)
    b = [*inp["b"][:2], change["b2"]] if "b2" in change else inp["b"]
    ids = change.get("ids", inp["ids"])
    if "mapping" in change:
        ids = SlotMapping.from_ids(torch.zeros(change["mapping"], dtype=torch.long), S)
    with pytest.raises(exc, match=pattern), count_launches() as launches:
        mixed_qlora_linear(change.get("x", inp["x"]), weight, state, change.get("bias", inp["bias"]), inp["a"], b,
                           ids, scales=change.get("scales", inp["scales"]), ranks=change.get("ranks", inp["ranks"]),
                           output_slices=change.get("slices", GQA))
    assert not launches
