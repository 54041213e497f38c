"""AdapterPool: what a failed load or evict leaves behind (nothing), the checks on every argument, the
dtype of its scales, and a float64 pool through ``mixed_adapter_linear`` on both paths ("reference":
CPU tensors without the interpreter run reference.py; "kernels": the Triton kernels).
"""

import copy

import pytest
import torch
from torch import Tensor

import adaptkern
from adaptkern.ops.mixed_adapter_linear import reference as mixed_reference
from adaptkern.testing import assert_close

PK, PN = 6, 5  # pool layer: in_features, out_features


def _t(*shape, value=None, dtype=torch.float32, seed=0):
    if value is not None:
        return torch.full(shape, float(value), dtype=dtype)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def loaded_pool(dtype):
    """A pool with a LoRA in slot 0 and a sequential bottleneck in slot 1 (slot 2 empty)."""
    pool = adaptkern.AdapterPool(PK, PN, num_slots=3, max_rank=4, dtype=dtype)
    pool.load_lora(0, _t(2, PK, seed=1), _t(PN, 2, seed=2), scale=0.5)
    pool.load_bottleneck(1, _t(3, PN, seed=3), _t(3, seed=4), _t(PN, 3, seed=5), _t(PN, seed=6), activation="gelu",
                         placement="sequential", scale=2.0, base_weight=_t(PN, PK, seed=7), base_bias=_t(PN, seed=8))
    return pool


def pool_state(pool):
    """Every attribute of the pool: tensors as (dtype, shape, raw bytes), the rest deep-copied."""
    return {k: (v.dtype, tuple(v.shape), bytes(v.detach().cpu().reshape(-1).view(torch.uint8).numpy()))
            if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in vars(pool).items()}


def _lora(slot=0, a=None, b=None, scale=1.0):
    return lambda p: p.load_lora(slot, _t(2, PK) if a is None else a, _t(PN, 2) if b is None else b, scale=scale)


def _bottleneck(slot=1, placement="sequential", down=None, down_bias=None, up_bias=None, w=None, b=None, **kw):
    kw = {"activation": "relu", "scale": 1.0, **kw}
    if placement == "sequential":
        kw.update(base_weight=_t(PN, PK) if w is None else w, base_bias=_t(PN) if b is None else b)
    down = _t(2, PN if placement == "sequential" else PK) if down is None else down
    return lambda p: p.load_bottleneck(slot, down, _t(2) if down_bias is None else down_bias, _t(PN, 2),
                                       _t(PN) if up_bias is None else up_bias, placement=placement, **kw)


def _dora(slot=1, magnitude=None, w=None, b=None, scale=1.0):
    return lambda p: p.load_dora(slot, _t(2, PK, seed=1), _t(PN, 2, seed=2) if b is None else b,
                                 _t(PN, value=2.0) if magnitude is None else magnitude, scale,
                                 base_weight=_t(PN, PK, seed=3) if w is None else w)


FP16_MAX_PLUS = 7e4  # finite in float32, Inf in float16
FAILURES = {
    "scale-str": (torch.float32, _lora(scale="1"), TypeError, "scale must be a real number, got str"),
    "scale-bool": (torch.float32, _lora(scale=True), TypeError, "scale must be a real number, got bool"),
    "scale-tensor": (torch.float32, _lora(scale=torch.tensor(1.0)), TypeError, "scale must be a real number"),
    "scale-nan": (torch.float32, _lora(scale=float("nan")), ValueError, "scale must be finite"),
    "scale-1e39-fp32": (torch.float32, _lora(scale=1e39), ValueError, "scale must be finite in float32, got 1e\\+39"),
    "scale-1e39-fp16": (torch.float16, _lora(scale=1e39), ValueError, "scale must be finite"),
    "scale-int-beyond-float64": (torch.float64, _lora(scale=10**400), ValueError, "scale must be finite"),
    "bottleneck-scale-1e39": (torch.float32, _bottleneck(scale=1e39), ValueError, "scale must be finite"),
    "nan-lora_a": (torch.float32, _lora(a=_t(2, PK, value="nan")), ValueError, "lora_a contains NaN or Inf"),
    "fp16-cast-overflow-lora_b": (torch.float16, _lora(b=_t(PN, 2, value=FP16_MAX_PLUS)), ValueError,
                                  r"lora_b contains NaN or Inf in the pool's dtype torch.float16"),
    "fp16-cast-overflow-up_bias": (torch.float16, _bottleneck(placement="parallel", up_bias=_t(PN, value=-7e4)),
                                   ValueError, "up_bias contains NaN or Inf in the pool's dtype"),
    "fp16-cast-overflow-fold": (torch.float16, _bottleneck(down=_t(2, PN, value=300), w=_t(PN, PK, value=300)),
                                ValueError, "the folded down_weight·base_weight contains NaN or Inf"),
    "fp16-fold-overflow-in-fp16-inputs": (
        torch.float16, _bottleneck(down=_t(2, PN, value=300, dtype=torch.float16),
                                   w=_t(PN, PK, value=300, dtype=torch.float16)),
        ValueError, "the folded down_weight·base_weight contains NaN or Inf"),
    "fp32-fold-overflow": (torch.float32, _bottleneck(down=_t(2, PN, value=1e20), w=_t(PN, PK, value=1e20)),
                           ValueError, "the folded down_weight·base_weight contains NaN or Inf"),
    "fp32-fold-bias-overflow": (torch.float32, _bottleneck(down=_t(2, PN, value=1e20), w=_t(PN, PK, value=1e-20),
                                                           b=_t(PN, value=1e20)),
                                ValueError, r"the folded down_weight·base_bias \+ down_bias contains NaN or Inf"),
    "lora_b-shape": (torch.float32, _lora(b=_t(PN, 3)), ValueError, r"lora_b must have shape \(5, 2\), got \(5, 3\)"),
    "lora_a-3d": (torch.float32, _lora(a=_t(1, 2, PK)), ValueError, r"lora_a must be 2-D \[r, features\], got shape"),
    "lora_a-list": (torch.float32, _lora(a=[[1.0] * PK]), TypeError, "lora_a must be a torch.Tensor, got list"),
    "lora_a-int": (torch.float32, _lora(a=torch.ones(2, PK, dtype=torch.int32)), TypeError,
                   "lora_a must be a floating torch.Tensor, got torch.int32"),
    "rank-above-max": (torch.float32, _lora(a=_t(5, PK), b=_t(PN, 5)), ValueError,
                       r"lora_a rank 5 is outside \[1, max_rank=4\]"),
    "down_bias-shape": (torch.float32, _bottleneck(down_bias=_t(3)), ValueError, r"down_bias must have shape \(2,\)"),
    "base_weight-shape": (torch.float32, _bottleneck(w=_t(PK, PN)), ValueError,
                          r"base_weight must have shape \(5, 6\)"),
    "down_weight-reads-K-for-sequential": (torch.float32, _bottleneck(down=_t(2, PK)), ValueError,
                                           r"down_weight must have shape \(2, 5\)"),
    "no-base_weight": (torch.float32, lambda p: p.load_bottleneck(1, _t(2, PN), None, _t(PN, 2), None,
                                                                  activation="relu", placement="sequential",
                                                                  scale=1.0), ValueError, "needs base_weight"),
    "activation": (torch.float32, _bottleneck(placement="parallel", activation="tanh"), ValueError,
                   "unknown activation 'tanh'"),
    "placement": (torch.float32, _bottleneck(placement="serial"), ValueError, "placement must be one of"),
    "slot-past-end": (torch.float32, _lora(slot=3), ValueError, r"slot must be an int in \[0, 3\), got 3"),
    "slot-negative": (torch.float32, _lora(slot=-1), ValueError, r"slot must be an int in \[0, 3\), got -1"),
    "slot-str": (torch.float32, _bottleneck(slot="1"), ValueError, r"slot must be an int in \[0, 3\), got '1'"),
    "dora-magnitude-shape": (torch.float32, _dora(magnitude=_t(PN + 1)), ValueError,
                             r"magnitude must have shape \(5,\), got \(6,\)"),
    "dora-magnitude-nan": (torch.float32, _dora(magnitude=_t(PN, value="nan")), ValueError,
                           "magnitude contains NaN or Inf"),
    "dora-base_weight-shape": (torch.float32, _dora(w=_t(PK, PN)), ValueError, r"base_weight must have shape \(5, 6\)"),
    "dora-zero-norm": (torch.float32, _dora(w=_t(PN, PK, value=0.0), b=_t(PN, 2, value=0.0)), ValueError,
                       r"DoRA scale .* is not finite in torch.float32 \(a row of norm 0"),
    "dora-g-overflow": (torch.float32, _dora(magnitude=_t(PN, value=1e30), w=_t(PN, PK, value=1e-12),
                                             b=_t(PN, 2, value=0.0)), ValueError, "is not finite in torch.float32"),
    "dora-fp16-magnitude-overflow": (torch.float16, _dora(magnitude=_t(PN, value=FP16_MAX_PLUS)), ValueError,
                                     "magnitude contains NaN or Inf in the pool's dtype"),
    "dora-scale-nan": (torch.float32, _dora(scale=float("nan")), ValueError, "scale must be finite"),
    "evict-slot-past-end": (torch.float32, lambda p: p.evict(3), ValueError, r"slot must be an int in \[0, 3\)"),
    "evict-slot-bool": (torch.float32, lambda p: p.evict(True), ValueError, r"slot must be an int in \[0, 3\)"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failed_pool_call_changes_nothing(case):
    """Every check runs before the slot is evicted or written: a failed call leaves every pool
    tensor bitwise as it was, and the kinds (1e39 scales, fp16 overflow on the cast or the fold
    used to evict the slot and store Inf)."""
    dtype, call, exc, pattern = FAILURES[case]
    pool = loaded_pool(dtype)
    before = pool_state(pool)
    with pytest.raises(exc, match=pattern):
        call(pool)
    assert pool_state(pool) == before


def test_checked_loads_still_write():
    """The failure cases' valid neighbours load: values at the edge of fp16, and evict empties."""
    pool = loaded_pool(torch.float16)
    b = _t(PN, 2, value=6.5e4)
    pool.load_lora(0, _t(2, PK), b, scale=6.5e4)
    assert torch.equal(pool.up_weight[0, :, :2], b.half()) and pool.scales[0].item() == 6.5e4
    assert pool.kinds == ["lora", "bottleneck_sequential", None]
    pool.evict(1)
    assert pool.kinds == ["lora", None, None] and not pool.down_weight[1].any() and pool.ranks[1] == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, "float32"],
                         ids=str)
def test_pool_refuses_non_floating_dtypes(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype, got"):
        adaptkern.AdapterPool(PK, PN, 2, 2, dtype=dtype)


def test_fp64_pool_keeps_scales_in_fp64(path_device):
    """Scales live in the kernels' accumulate dtype: float64 for a float64 pool (it was float32)."""
    pool = adaptkern.AdapterPool(PK, PN, num_slots=2, max_rank=3, dtype=torch.float64, device=path_device)
    assert pool.scales.dtype == torch.float64
    assert adaptkern.AdapterPool(PK, PN, 2, 3, dtype=torch.bfloat16).scales.dtype == torch.float32
    a, b = _t(3, PK, dtype=torch.float64, seed=1), _t(PN, 3, dtype=torch.float64, seed=2)
    pool.load_lora(0, a, b, scale=1 / 3)
    pool.load_lora(1, a, b, scale=1e39)  # finite in float64
    assert pool.scales.tolist() == [1 / 3, 1e39]
    assert pool.slot_stack(torch.float64).scales.dtype == torch.float64
    x, w, bias = (_t(*shape, dtype=torch.float64, seed=i) for i, shape in enumerate([(7, PK), (PN, PK), (PN,)], 3))
    ids = torch.tensor([0, -1, 0, 0, -1, 0, 0], dtype=torch.int32)
    y = adaptkern.mixed_adapter_linear(*(t.to(path_device) for t in (x, w, bias)), pool, ids.to(path_device))
    want = mixed_reference.mixed_adapter_linear_ref(x, w, bias, a[None], None, b[None], None,
                                              torch.tensor([1 / 3], dtype=torch.float64), None, None, ids)
    assert_close("y", want, y.cpu())


def test_load_dora_stores_g_and_evict_resets_it():
    """g = m / ‖W + s·B·A‖_row in the slot's column scales (float64 oracle), ones everywhere else; an
    evicted or overwritten slot is back to ones; slot_stack carries them (full, or while a DoRA slot is held)."""
    pool = loaded_pool(torch.float32)
    a, b, m, w = _t(2, PK, seed=1), _t(PN, 2, seed=2), _t(PN, seed=4).abs() + 0.5, _t(PN, PK, seed=3)
    assert pool.slot_stack(torch.float32, full=False).col_scales is None
    pool.load_dora(2, a, b, m, 0.75, base_weight=w)
    want = m.double() / torch.linalg.norm(w.double() + 0.75 * b.double() @ a.double(), dim=1)
    assert_close("g", want, pool.col_scales[2])
    assert torch.equal(pool.col_scales[:2], torch.ones(2, PN))
    assert pool.kinds[2] == "dora" and pool.ranks[2] == 2 and pool.scales[2] == 0.75
    assert torch.equal(pool.up_weight[2, :, :2], b) and torch.equal(pool.down_weight[2, :2], a)
    assert torch.equal(pool.slot_stack(torch.bfloat16, full=False).col_scales, pool.col_scales)
    pool.load_lora(2, a, b, scale=1.0)
    assert torch.equal(pool.col_scales[2], torch.ones(PN))
    pool.load_dora(2, a, b, m, 0.75, base_weight=w)
    pool.evict(2)
    assert torch.equal(pool.col_scales, torch.ones(3, PN)) and pool.kinds[2] is None
    assert torch.equal(pool.slot_stack(torch.float32).col_scales, torch.ones(3, PN))


def test_fp64_dora_pool_mixed_with_lora_and_bottleneck(path_device):
    """A float64 pool holding LoRA, a sequential bottleneck and DoRA, through mixed_adapter_linear on both paths."""
    pool = loaded_pool(torch.float64)
    a, b, m, w = (t.double() for t in (_t(3, PK, seed=11), _t(PN, 3, seed=12), _t(PN, seed=13).abs() + 0.5,
                                       _t(PN, PK, seed=7)))
    pool.load_dora(2, a, b, m, 1.25, base_weight=w)
    pool = copy.deepcopy(pool)
    for name in ("down_weight", "down_bias", "up_weight", "up_bias", "scales", "ranks", "acts", "col_scales"):
        setattr(pool, name, getattr(pool, name).to(path_device))
    x, bias = _t(8, PK, dtype=torch.float64, seed=20), _t(PN, seed=8, dtype=torch.float64)
    ids = torch.tensor([2, 0, -1, 1, 2, 2, 0, 1], dtype=torch.int32)
    y = adaptkern.mixed_adapter_linear(x.to(path_device), w.to(path_device), bias.to(path_device), pool,
                                       ids.to(path_device))
    g = m / torch.linalg.norm(w + 1.25 * b @ a, dim=1)
    dora_rows = ids == 2
    want = g * (x[dora_rows] @ w.t() + 1.25 * (x[dora_rows] @ a.t()) @ b.t()) + bias
    assert_close("DoRA rows", want, y.cpu()[dora_rows])
    others = ~dora_rows
    stack = pool.slot_stack(torch.float64)
    want_others = mixed_reference.mixed_adapter_linear_ref(
        x, w, bias, *(t.cpu() for t in stack[:5]), stack.ranks.cpu(), stack.acts.cpu(), ids)[others]
    assert_close("other rows", want_others, y.cpu()[others])
