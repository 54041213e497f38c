"""The functional API (``adaptkern.functional``: adapter_linear, lora_linear, bottleneck_linear;
``adaptkern.mixed``: mixed_lora_linear, mixed_adapter_linear) at its edges.

Cases that once went wrong: pool gradients of W and b, sequential pool slots with a trainable
base, ids as lists, K = 0, scales the kernels would turn into inf or that raised the wrong
exception, a ``scales`` tensor whose requires_grad was silently ignored, and refused calls that
changed something. Oracles are float64 formulas written out here, differentiated by autograd.
"""

import pytest
import torch
import torch.nn.functional as F

import adaptkern
from adaptkern import validation
from adaptkern.ops import config
from adaptkern.ops.adapter_linear import reference
from adaptkern.testing import assert_close

F64 = torch.float64


def _rnd(gen, *shape, std=0.4):
    return torch.randn(*shape, generator=gen, dtype=F64) * std


# --- pool gradients for W and b -------------------------------------------------------------


def _pool_case(m, sequential):
    """fp64 pool on a [7, 11] layer: slot 0 LoRA, 1 parallel gelu bottleneck, 2 empty, 3 sequential
    silu bottleneck (when ``sequential``). Returns (x, W, b, pool, ids, per-slot oracle)."""
    gen = torch.Generator().manual_seed(20 + m)
    k, n = 11, 7
    x, w, b = _rnd(gen, m, k, std=1.0), _rnd(gen, n, k), _rnd(gen, n)
    pool = adaptkern.AdapterPool(k, n, num_slots=4, max_rank=5, dtype=F64)
    la, lb = _rnd(gen, 3, k), _rnd(gen, n, 3)
    pd, pdb, pu, pub = _rnd(gen, 2, k), _rnd(gen, 2), _rnd(gen, n, 2), _rnd(gen, n)
    sd, sdb, su, sub = _rnd(gen, 5, n), _rnd(gen, 5), _rnd(gen, n, 5), _rnd(gen, n)
    pool.load_lora(0, la, lb, scale=2.0)
    pool.load_bottleneck(1, pd, pdb, pu, pub, activation="gelu", placement="parallel", scale=0.5)
    if sequential:
        pool.load_bottleneck(3, sd, sdb, su, sub, activation="silu", placement="sequential", scale=1.5,
                             base_weight=w, base_bias=b)
    ids = (torch.arange(m) % 5 - 1).to(torch.int32)  # -1, 0, 1, 2, 3, -1, ...

    def oracle(x, w, b):
        """Row by row, each slot's unfused, unfolded formula (sequential through h = x·Wᵀ + b)."""
        rows = []
        for i in range(m):
            xi, s = x[i:i + 1], int(ids[i])
            if s == 0:
                rows.append(reference.lora_linear_ref(xi, w, b, la, lb, 2.0))
            elif s == 1:
                rows.append(reference.bottleneck_linear_ref(xi, w, b, pd, pdb, pu, pub, 0.5, "gelu", "parallel"))
            elif s == 3 and sequential:
                rows.append(reference.bottleneck_linear_ref(xi, w, b, sd, sdb, su, sub, 1.5, "silu", "sequential"))
            else:
                rows.append(F.linear(xi, w, b))
        return torch.cat(rows) if rows else F.linear(x, w, b)

    return x, w, b, pool, ids, oracle


@pytest.mark.parametrize("path", ["kernels", "cpu-reference"])
@pytest.mark.parametrize("m", [0, 13])
def test_pool_lora_and_parallel_slots_give_true_weight_and_bias_gradients(m, path, monkeypatch):
    """W and b trainable with LoRA/parallel slots: y, dx, dW, db all match the float64 oracle."""
    if path == "cpu-reference":
        monkeypatch.setattr(config, "interpreting", lambda: False)
    x, w, b, pool, ids, oracle = _pool_case(m, sequential=False)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = adaptkern.mixed_adapter_linear(*leaves, pool, ids)
    gy = torch.randn(m, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = oracle(*ref_leaves)
    want_grads = torch.autograd.grad(want, ref_leaves, gy, allow_unused=True, materialize_grads=True)
    assert_close("y", want.detach(), y.detach())
    for name, g, wg in zip(("dx", "dW", "db"), grads, want_grads):
        assert_close(name, wg, g)


def test_pool_sequential_slot_with_trainable_base_raises():
    """The fold D·W was taken at load time: dW/db would miss its path, so the call is refused."""
    x, w, b, pool, ids, _ = _pool_case(13, sequential=True)
    for trainable in ((1,), (2,), (1, 2)):  # W, b, both
        args = [t.clone().requires_grad_(i in trainable) for i, t in enumerate((x, w, b))]
        with pytest.raises(ValueError, match=r"pool slots \[3\] hold sequential bottlenecks.*folded.*weight/bias"
                                             r".*freeze them.*AdapterLinear"):
            adaptkern.mixed_adapter_linear(*args, pool, ids)


@pytest.mark.parametrize("path", ["kernels", "cpu-reference"])
def test_pool_sequential_slot_with_frozen_base_or_no_grad_is_right(path, monkeypatch):
    """Frozen W/b (dx only), or W trainable under no_grad: no error, and the float64 answer."""
    if path == "cpu-reference":
        monkeypatch.setattr(config, "interpreting", lambda: False)
    x, w, b, pool, ids, oracle = _pool_case(13, sequential=True)
    xl = x.clone().requires_grad_()
    y = adaptkern.mixed_adapter_linear(xl, w, b, pool, ids)
    gy = torch.randn(13, 7, generator=torch.Generator().manual_seed(2), dtype=F64)
    (dx,) = torch.autograd.grad(y, [xl], gy)
    xr = x.clone().requires_grad_()
    want = oracle(xr, w, b)
    assert_close("y", want.detach(), y.detach())
    assert_close("dx", torch.autograd.grad(want, [xr], gy)[0], dx)
    with torch.no_grad():
        y2 = adaptkern.mixed_adapter_linear(x, w.clone().requires_grad_(), b, pool, ids)
    assert_close("y (no_grad)", want.detach(), y2)


# --- ids as lists, ids on another device ----------------------------------------------------


def _lora_stack(m, k=9, n=5, s=3, r=2, lead=None, dtype=F64):
    gen = torch.Generator().manual_seed(3)
    x = _rnd(gen, m, k, std=1.0).to(dtype)
    if lead is not None:
        x = x.reshape(*lead, k)
    return (x, _rnd(gen, n, k).to(dtype), _rnd(gen, n).to(dtype), _rnd(gen, s, r, k).to(dtype),
            _rnd(gen, s, n, r).to(dtype), torch.tensor([0.5, 2.0, 1.25]))


def test_ids_as_python_lists_and_tuples():
    x, w, b, a, bb, scales = _lora_stack(5)
    ids = [2, -1, 0, 1, 2]
    want = adaptkern.mixed_lora_linear(x, w, b, a, bb, torch.tensor(ids), scales=scales)
    for given in (ids, tuple(ids)):
        assert torch.equal(adaptkern.mixed_lora_linear(x, w, b, a, bb, given, scales=scales), want)
    x3 = x[:4].reshape(2, 2, 9)  # ids shaped like x's leading dims, as a nested list
    nested = [[2, -1], [0, 1]]
    assert torch.equal(adaptkern.mixed_lora_linear(x3, w, b, a, bb, nested, scales=scales),
                       want[:4].reshape(2, 2, 5))
    # M = 0 with an empty list, and the pool op with a list.
    y0 = adaptkern.mixed_lora_linear(x[:0], w, b, a, bb, [], scales=scales)
    assert y0.shape == (0, 5)
    pool = adaptkern.AdapterPool(9, 5, num_slots=3, max_rank=2, dtype=F64)
    for s in range(3):
        pool.load_lora(s, a[s], bb[s], scale=float(scales[s]))
    assert_close("pool, list ids", want, adaptkern.mixed_adapter_linear(x, w, b, pool, ids))
    flat = validation.adapter_ids(ids, 5, 3, validate=True, lead=(5,), device=x.device)
    assert flat.dtype == torch.int64 and flat.device == x.device and flat.tolist() == ids


@pytest.mark.parametrize("bad, exc, pattern", [
    ([0, 1.5, 1], TypeError, r"adapter_ids as a list must hold ints, got torch.float32"),
    ([True, False, True], TypeError, r"adapter_ids as a list must hold ints, got torch.bool"),
    ([[0, 1], [2]], TypeError, r"adapter_ids as a list must hold ints"),
    ([0, "a", 1], TypeError, r"adapter_ids as a list must hold ints"),
    ([0, 3, 1], ValueError, r"adapter_ids\[1\] = 3 is out of range"),
    ([0, 1], ValueError, r"adapter_ids must have shape \(3,\).*got \(2,\)"),
    ({0, 1, 2}, TypeError, r"adapter_ids must be a torch.Tensor or a list of ints, got set"),
    (torch.zeros(3, dtype=torch.int16), TypeError, r"adapter_ids must be int32 or int64, got torch.int16"),
    (torch.zeros(3, dtype=torch.int32, device="meta"), ValueError,
     r"adapter_ids must be on x's device cpu, got meta"),
])
@pytest.mark.parametrize("op", ["mixed_lora_linear", "mixed_adapter_linear"])
def test_bad_ids_raise_naming_adapter_ids(op, bad, exc, pattern):
    x, w, b, a, bb, scales = _lora_stack(3)
    if op == "mixed_lora_linear":
        call = lambda: adaptkern.mixed_lora_linear(x, w, b, a, bb, bad, scales=scales)  # noqa: E731
    else:
        pool = adaptkern.AdapterPool(9, 5, num_slots=3, max_rank=2, dtype=F64)
        call = lambda: adaptkern.mixed_adapter_linear(x, w, b, pool, bad)  # noqa: E731
    with pytest.raises(exc, match=pattern):
        call()


# --- K = 0 (and M = 0) -------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(4,), (2, 3), (0,)], ids=lambda s: "x" + "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["adapter", "lora", "sequential", "parallel"])
def test_k_zero_is_the_formula_with_gradients(kind, lead):
    """in_features = 0: x·Wᵀ = 0 and x·Aᵀ = 0, so every row is b + scale·(f(a)·Bᵀ + c)
    (sequential: a = D·b + d), as F.linear gives b; outputs and gradients against float64."""
    gen = torch.Generator().manual_seed(4)
    n, r, scale = 6, 3, 1.75
    x, w = torch.zeros(*lead, 0, dtype=F64), torch.zeros(n, 0, dtype=F64)
    b, bb, c = _rnd(gen, n), _rnd(gen, n, r), _rnd(gen, n)
    ab = _rnd(gen, r)
    d = _rnd(gen, r, n)  # sequential down-projection [R, N]
    if kind == "adapter":
        a = torch.zeros(r, 0, dtype=F64)
        inputs = [x, w, b, a, ab, bb, c]
        fn = lambda x, w, b, a, ab, bb, c: adaptkern.adapter_linear(  # noqa: E731
            x, w, b, a, ab, bb, c, scale=scale, activation="gelu")
        formula = lambda x, w, b, a, ab, bb, c: b + scale * (F.gelu(ab) @ bb.t() + c)  # noqa: E731
    elif kind == "lora":
        a = torch.zeros(r, 0, dtype=F64)
        inputs = [x, w, b, a, bb]
        fn = lambda x, w, b, a, bb: adaptkern.lora_linear(x, w, b, a, bb, scale=scale, dropout=0.3)  # noqa: E731
        formula = lambda x, w, b, a, bb: b  # noqa: E731
    elif kind == "sequential":
        inputs = [x, w, b, d, ab, bb, c]
        fn = lambda x, w, b, d, ab, bb, c: adaptkern.bottleneck_linear(  # noqa: E731
            x, w, b, d, ab, bb, c, scale=scale, activation="silu", placement="sequential")
        formula = lambda x, w, b, d, ab, bb, c: b + scale * (F.silu(d @ b + ab) @ bb.t() + c)  # noqa: E731
    else:
        inputs = [x, w, b, torch.zeros(r, 0, dtype=F64), ab, bb, c]
        fn = lambda x, w, b, d, ab, bb, c: adaptkern.bottleneck_linear(  # noqa: E731
            x, w, b, d, ab, bb, c, scale=scale, activation="relu", placement="parallel")
        formula = lambda x, w, b, d, ab, bb, c: b + scale * (F.relu(ab) @ bb.t() + c)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    assert y.shape == (*lead, n) and y.dtype == F64
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    want = formula(*ref_leaves).expand(*lead, n)
    assert_close("y", want.detach(), y.detach())
    if kind == "lora":
        assert torch.equal(y, F.linear(x, w, b)), "LoRA on K = 0 is the base: F.linear's b"
    gy = torch.randn(*lead, n, generator=gen, dtype=F64)
    grads = torch.autograd.grad(y, leaves, gy, allow_unused=True, materialize_grads=True)
    want_g = torch.autograd.grad(want, ref_leaves, gy, allow_unused=True, materialize_grads=True)
    for i, (g, wg) in enumerate(zip(grads, want_g)):
        assert_close(f"grad of input {i}", wg, g)
    # fp32 x: computed in fp32, returned in x's dtype.
    y32 = fn(*(t.float() for t in inputs))
    assert y32.dtype == torch.float32
    assert_close("y fp32", want.detach(), y32)


@pytest.mark.parametrize("m", [0, 5])
def test_k_zero_mixed_lora(m):
    """Mixed LoRA on K = 0 is the base result b on every row; db = colsum(dy), dB = 0."""
    x, w, b, a, bb, scales = _lora_stack(m, k=0)
    ids = torch.tensor([1, -1, 0, 2, 7][:m], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    y = adaptkern.mixed_lora_linear(*leaves, ids[:m].clamp(max=2), scales=scales)
    assert y.shape == (m, 5) and torch.equal(y, b.expand(m, 5))
    gy = torch.randn(m, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    gx, gw, gb, ga, gbb = torch.autograd.grad(y, leaves, gy, allow_unused=True, materialize_grads=True)
    assert gx.shape == (m, 0) and gw.shape == (5, 0) and ga.shape == a.shape
    assert_close("db", gy.sum(0), gb)
    assert not gbb.any()
    # Unchecked ids (validate_ids=False): out of range means base only, as in the kernels.
    y2 = adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=scales, validate_ids=False)
    assert torch.equal(y2, b.expand(m, 5))


# --- scale, dropout, scales -----------------------------------------------------------------


_K, _N, _R = 7, 5, 3
_CALLS = {
    "lora_linear": lambda **kw: adaptkern.lora_linear(
        torch.randn(3, _K), torch.randn(_N, _K), None, torch.randn(_R, _K), torch.randn(_N, _R), **kw),
    "bottleneck_linear": lambda **kw: adaptkern.bottleneck_linear(
        torch.randn(3, _K), torch.randn(_N, _K), torch.randn(_N), torch.randn(_R, _N), None,
        torch.randn(_N, _R), None, **kw),
    "adapter_linear": lambda **kw: adaptkern.adapter_linear(
        torch.randn(3, _K), torch.randn(_N, _K), None, torch.randn(_R, _K), None, torch.randn(_N, _R), None, **kw),
}


@pytest.mark.parametrize("scale, exc, pattern", [
    ("1", TypeError, r"scale must be a real number, got str"),
    (True, TypeError, r"scale must be a real number, got bool"),
    (None, TypeError, r"scale must be a real number, got NoneType"),
    (torch.tensor(1.0), TypeError, r"scale must be a real number, got Tensor"),
    (float("nan"), ValueError, r"scale must be finite in float32, got nan"),
    (float("inf"), ValueError, r"scale must be finite in float32, got inf"),
    (-float("inf"), ValueError, r"scale must be finite in float32, got -inf"),
    (1e39, ValueError, r"scale must be finite in float32, got 1e\+39"),  # the kernels read scale as fp32
    (10**400, ValueError, r"scale must be finite in float32"),  # float() would overflow
])
@pytest.mark.parametrize("op", sorted(_CALLS))
def test_bad_scale_raises_naming_scale(op, scale, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _CALLS[op](scale=scale)


@pytest.mark.parametrize("p, exc, pattern", [
    (None, TypeError, r"dropout must be a real number, got NoneType"),
    ("0.1", TypeError, r"dropout must be a real number, got str"),
    (False, TypeError, r"dropout must be a real number, got bool"),
    (float("nan"), ValueError, r"dropout must be finite in float32, got nan"),
])
def test_bad_dropout_raises_naming_dropout(p, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _CALLS["lora_linear"](dropout=p)


def test_finite_scale_rule_is_the_same_for_scalar_and_per_slot_scales():
    """One rule: finite in the dtype the kernels apply the scale in. A float64 scales tensor with a
    value past float32's range is refused for float32 x (it would become inf), kept for float64 x."""
    x, w, b, a, bb, _ = _lora_stack(4, dtype=torch.float32)
    ids = torch.tensor([0, 1, 2, -1])
    big = torch.tensor([1e39, 1.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"scales must be finite in torch.float32, got \[1e\+39, 1.0, 1.0\]"):
        adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=big)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scales must be finite in torch.float32"):
            adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=torch.tensor([1.0, bad, 1.0]))
    x64, w64, b64, a64, bb64, _ = _lora_stack(4)
    y = adaptkern.mixed_lora_linear(x64, w64, b64, a64, bb64, ids, scales=big * 1e-300)
    assert torch.isfinite(y).all()


def test_scales_requiring_grad_are_refused_not_silently_ignored():
    x, w, b, a, bb, scales = _lora_stack(4)
    ids = torch.tensor([0, 1, 2, -1])
    trainable = scales.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"scales is not differentiable here; detach it"):
        adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=trainable)
    want = adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=scales)
    assert torch.equal(adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=trainable.detach()), want)
    with torch.no_grad():  # nothing to differentiate: accepted
        assert torch.equal(adaptkern.mixed_lora_linear(x, w, b, a, bb, ids, scales=trainable), want)


# --- every validation error comes before anything changes ---------------------------------------


def test_failures_change_nothing():
    """A refused call leaves its inputs, the pool and the global RNG (dropout seeds) bitwise as they were."""
    x, w, b, a, bb, scales = _lora_stack(4, dtype=torch.float32)
    pool = adaptkern.AdapterPool(9, 5, num_slots=3, max_rank=2)
    pool.load_bottleneck(2, torch.randn(2, 5), None, torch.randn(5, 2), None, activation="relu",
                         placement="sequential", scale=1.0, base_weight=w)
    down = torch.randn(2, 5)
    tensors = [x, w, b, a, bb, scales, down, pool.down_weight, pool.up_weight, pool.down_bias, pool.up_bias,
               pool.scales, pool.ranks, pool.acts]
    before = [t.clone() for t in tensors], list(pool.kinds), torch.get_rng_state()
    failing = [
        (ValueError, r"^scale must be finite", lambda: adaptkern.lora_linear(
            x, w, b, a[0], bb[0], scale=float("nan"), dropout=0.5)),
        (TypeError, r"^dropout", lambda: adaptkern.lora_linear(x, w, b, a[0], bb[0], dropout=None)),
        (TypeError, r"^scale must be a real", lambda: adaptkern.bottleneck_linear(
            x, w, b, down, None, bb[0], None, scale="1")),
        (ValueError, r"^adapter_ids\[3\] = 9", lambda: adaptkern.mixed_lora_linear(
            x, w, b, a, bb, [0, 1, 2, 9], scales=scales)),
        (ValueError, r"^scales is not differentiable", lambda: adaptkern.mixed_lora_linear(
            x, w, b, a, bb, [0, 1, 2, -1], scales=scales.clone().requires_grad_())),
        (ValueError, r"^pool slots \[2\]", lambda: adaptkern.mixed_adapter_linear(
            x, w.clone().requires_grad_(), b, pool, [0, 1, 2, -1])),
    ]
    for exc, pattern, call in failing:
        with pytest.raises(exc, match=pattern):
            call()
    assert all(torch.equal(t, t0) for t, t0 in zip(tensors, before[0]))
    assert pool.kinds == before[1] and torch.equal(torch.get_rng_state(), before[2])
