"""``adaptkern::dora_linear``: kernels and reference against the float64 oracle, and against PEFT's DoRA layer."""

import pytest
import torch

from adaptkern.dora import dora_linear, dora_weight_norm
from adaptkern.ops.adapter_linear import dropout_mask
from adaptkern.ops.common import use_triton
from adaptkern.ops.dora_linear import dora_linear_backward_op, dora_linear_op, reference
from adaptkern.testing import assert_close

from ..helpers import count_launches, eager_and_oracle, make_inputs, transposed_storage

NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "magnitude")
TRAINABLE = (0, 3, 4, 5)  # x, A, B, m; W and b frozen
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, N, R): odd sizes, block edges 63/64/65 (interpreter blocks are 64; norm tiles 32 rows), M=0, rank 1,
# and a rank above the norm kernel's 64-wide rank chunk.
SHAPES = [(1, 16, 16, 1), (37, 70, 53, 5), (65, 64, 63, 16), (0, 32, 48, 4), (23, 40, 33, 70)]


def _ids(p):
    return "M{}-K{}-N{}-R{}".format(*p)


def dora_inputs(m, k, n, r, dtype, *, seed=0, bias=True):
    """(x, W, b, A, B, m): a trained-looking DoRA layer, B non-zero and m off ‖W‖ by ~10 %."""
    x, w, b, a_w, _, b_w, _ = make_inputs(m, k, n, r, torch.float64, bias=bias, adapter_bias=False, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    mag = torch.linalg.norm(w, dim=1) * (1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    return tuple(None if t is None else t.to(dtype) for t in (x, w, b, a_w, b_w, mag))


def ref_fn(scale, keep=None, p=0.0):
    return lambda x, w, b, a, bb, mag: reference.dora_linear_ref(x, w, b, a, bb, mag, scale, keep, p)


def _run(inputs, wrt, grad_out, device, **kw):
    ins = [None if t is None else t.detach().to(device).requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    y = dora_linear(*ins, **kw)
    grads = torch.autograd.grad(y, [ins[i] for i in wrt], grad_out.to(device))
    return y.detach().cpu(), [g.cpu() for g in grads]


def _check_all(inputs, scale, device, wrt=TRAINABLE, seed=1):
    wrt = tuple(i for i in wrt if inputs[i] is not None)
    m, n = inputs[0].shape[0], inputs[1].shape[0]
    grad_out = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(inputs[0].dtype)
    y, grads = _run(inputs, wrt, grad_out, device, scale=scale)
    eager, oracle, eager_g, oracle_g = eager_and_oracle(ref_fn(scale), inputs, grad_out, wrt)
    assert y.dtype == inputs[0].dtype
    assert_close("y", oracle, y, eager)
    for i, g, eg, og in zip(wrt, grads, eager_g, oracle_g):
        assert g.dtype == inputs[i].dtype
        assert_close(f"d{NAMES[i]}", og, g, eg)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_matches_fp64_oracle(shape, dtype, path_device):
    _check_all(dora_inputs(*shape, dtype), 0.75, path_device)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weight_and_bias_gradients_when_trainable(dtype, path_device):
    _check_all(dora_inputs(33, 20, 18, 4, dtype, seed=5), 0.5, path_device, wrt=tuple(range(6)))


def test_no_bias(path_device):
    _check_all(dora_inputs(17, 24, 40, 3, torch.float32, bias=False), 2.0, path_device)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(dtype, path_device):
    """y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙s·(x̃·Aᵀ)·Bᵀ and every gradient, with the mask the op draws."""
    p, scale = 0.3, 0.5
    inputs = dora_inputs(45, 38, 27, 5, dtype, seed=8)
    seed = torch.tensor([1234], dtype=torch.int64, device=path_device)
    keep = dropout_mask(seed, 45, 38, p).cpu()
    wrt = tuple(range(6))
    ins = [t.detach().to(path_device).requires_grad_() for t in inputs]
    y = dora_linear_op(ins[0], *ins[1:], scale, p, seed, True, True)[0]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(y, ins, gy.to(path_device))
    eager, oracle, eager_g, oracle_g = eager_and_oracle(ref_fn(scale, keep, p), inputs, gy, wrt)
    assert_close("y", oracle, y.detach().cpu(), eager)
    for name, g, eg, og in zip(NAMES, grads, eager_g, oracle_g):
        assert_close(f"d{name}", og, g.cpu(), eg)


def test_dropout_draws_a_fresh_mask_and_leaves_eval_alone(path_device):
    x, w, b, a, bb, mag = (t.to(path_device) for t in dora_inputs(30, 20, 10, 4, torch.float32))
    torch.manual_seed(0)
    y1, y2 = (dora_linear(x, w, b, a, bb, mag, dropout=0.5) for _ in range(2))
    assert not torch.equal(y1, y2), "a fresh seed per call"
    y0 = dora_linear(x, w, b, a, bb, mag)
    want = reference.dora_linear_ref(*(t.double().cpu() for t in (x, w, b, a, bb, mag)))
    assert_close("y", want, y0.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(53, 70, 5), (33, 129, 70), (1, 16, 1)], ids=lambda s: "N{}-K{}-R{}".format(*s))
def test_weight_norm_never_forms_ba(shape, dtype, path_device):
    n, k, r = shape
    _, w, _, a, b, _ = dora_inputs(1, k, n, r, dtype, seed=3)
    with count_launches() as launches:
        got = dora_weight_norm(w.to(path_device), a.to(path_device), b.to(path_device), scale=1.7)
    want = reference.dora_weight_norm_ref(w.double(), a.double(), b.double(), 1.7)
    eager = reference.dora_weight_norm_ref(w, a, b, 1.7)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and not got.requires_grad
    assert_close("norm", want, got.cpu(), eager)
    assert launches["_dora_linear_norm_kernel"] == (1 if use_triton(w.to(path_device)) else 0)


def test_weight_norm_with_zero_lora_b_is_the_row_norm(path_device):
    _, w, _, a, b, _ = dora_inputs(1, 40, 24, 4, torch.float32)
    got = dora_weight_norm(w.to(path_device), a.to(path_device), torch.zeros_like(b, device=path_device))
    assert_close("norm", torch.linalg.norm(w.double(), dim=1), got.cpu())


@pytest.mark.usefixtures("nan_poison")
def test_m_zero_forward_and_backward(path_device):
    ins = [t.to(path_device).requires_grad_(i in TRAINABLE) for i, t in enumerate(dora_inputs(0, 20, 30, 4,
                                                                                              torch.float32))]
    y = dora_linear(*ins)
    assert y.shape == (0, 30)
    grads = torch.autograd.grad(y.sum(), [ins[i] for i in TRAINABLE])
    assert grads[0].shape == (0, 20)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g)), "no rows: adapter and magnitude gradients must be exactly zero"


def test_non_contiguous_inputs_and_transposed_weights(path_device):
    x, w, b, a, bb, mag = dora_inputs(21, 30, 26, 7, torch.float32, seed=6)
    x_nc = torch.cat([x, torch.randn_like(x)], dim=1)[:, ::2]
    x_nc[:, :] = x
    w_t, a_t, b_t = transposed_storage(w), transposed_storage(a), transposed_storage(bb)
    mag_nc = torch.stack([mag, mag], dim=1)[:, 0]
    assert not any(t.is_contiguous() for t in (x_nc, w_t, a_t, b_t, mag_nc))
    leaves = [t.to(path_device).requires_grad_() for t in (x_nc, a_t, b_t, mag_nc)]
    y = dora_linear(leaves[0], w_t.to(path_device), b.to(path_device), *leaves[1:], scale=0.5)
    gy = torch.randn(y.shape[1], y.shape[0], device=path_device).t()  # a non-contiguous incoming gradient
    grads = torch.autograd.grad(y, leaves, gy)
    _, oracle, _, og = eager_and_oracle(ref_fn(0.5), (x, w, b, a, bb, mag), gy.cpu(), TRAINABLE)
    assert_close("y", oracle, y.detach().cpu())
    for i, g, o in zip(TRAINABLE, grads, og):
        assert_close(f"d{NAMES[i]}", o, g.cpu())


def test_leading_dims_and_parameter_dtypes(path_device):
    """x [2, 3, 4, K] is flattened; an fp32 magnitude with bf16 activations is cast (differentiably)."""
    x, w, b, a, bb, mag = dora_inputs(24, 16, 12, 4, torch.bfloat16)
    m32 = mag.float().to(path_device).requires_grad_()
    y = dora_linear(x.view(2, 3, 4, 16).to(path_device), w.to(path_device), b.to(path_device), a.to(path_device),
                    bb.to(path_device), m32, scale=2.0)
    assert y.shape == (2, 3, 4, 12) and y.dtype == torch.bfloat16
    (dm,) = torch.autograd.grad(y.float().sum(), m32)
    assert dm.dtype == torch.float32 and torch.isfinite(dm).all()


def test_kernels_pass_gradcheck_in_float64(device):
    """The magnitude and x (the inputs the detached norm does not depend on) against finite differences."""
    x, w, b, a, bb, mag = (t.to(device) for t in dora_inputs(6, 9, 7, 2, torch.float64, seed=9))
    fn = lambda x_, m_: dora_linear(x_, w, b, a, bb, m_, scale=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), mag.requires_grad_()), fast_mode=True)


def test_nan_in_one_row_stays_in_that_row(device):
    x, w, b, a, bb, mag = (t.to(device) for t in dora_inputs(70, 20, 30, 4, torch.float32))
    x[13, 5] = float("nan")
    y = dora_linear(x, w, b, a, bb, mag)
    bad = torch.isnan(y).any(dim=1).cpu()
    assert bad[13] and bad.sum() == 1


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("need_p", [True, False], ids=["need_p", "no_p"])
def test_opcheck_dora_ops_on_both_paths(need_p, dropout, path_device):
    x, w, b, a, bb, mag = (t.to(path_device) for t in dora_inputs(9, 12, 10, 3, torch.float32))
    a, bb = transposed_storage(a), transposed_storage(bb)
    seed = torch.tensor([7], device=path_device)
    leaves = [t.requires_grad_() for t in (x, a, bb)] + [mag.requires_grad_(need_p)]
    args = (leaves[0], w, b, leaves[1], leaves[2], leaves[3], 0.5, dropout, seed, True, need_p)
    torch.library.opcheck(dora_linear_op, args)
    y, norm, s, p = dora_linear_op(*args)
    stored = need_p and dropout > 0  # without dropout backward recovers P from y
    assert y.shape == (9, 10) and norm.shape == (10,) and s.shape == (9, 3) and p.shape == ((9, 10) if stored else (0,))
    dy = torch.randn(9, 10, generator=torch.Generator().manual_seed(3)).to(path_device)
    needs = [True, False, False, True, True, need_p]
    saved = [t.detach() for t in (x, a, bb, mag, norm, s, p, y)]
    args = (dy, saved[0], w, b, *saved[1:], 0.5, dropout, seed, needs)
    torch.library.opcheck(dora_linear_backward_op, args)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_magnitude_gradient_where_y_cannot_give_p(bias, dtype, path_device):
    """Backward recovers P = (y − b) / g from the output; where g = m / n is 0 (y = b holds no P) or small with a
    bias (P would carry ulp(|b|) / |g|: 5× eager's error at g = 0.1 with a bias of 4) those columns' P is
    recomputed. The columns sit in one block of the column sum (its recompute loop) and the others read y."""
    x, w, b, a, bb, mag = dora_inputs(70, 40, 70, 5, torch.float64, seed=4, bias=bias)
    mag[[3, 40, 41]] = 0.0
    mag[[5, 6, 50]] *= 0.1
    b = None if b is None else b * 8.0
    _check_all(tuple(None if t is None else t.to(dtype) for t in (x, w, b, a, bb, mag)), 0.5, path_device)


# x [12, 1], W, b, A, B, m [1 each], dY [12, 1]: |b| = 0.88 ≫ |g·P| ≤ 0.48 with g ≈ 1.1 (found by the "long"
# hypothesis profile); P recovered as (y − b) / g put dm at −4.594 (kernels) and −4.75 (reference) against
# float64's −4.6987 and eager bf16's −4.6875.
BIAS_DOMINATED = dict(
    x=[0.8359375, 0.09521484375, 0.328125, 2.390625, 0.470703125, -1.875, 0.490234375, -0.94140625, -1.078125,
       0.2421875, 0.74609375, -0.64453125],
    weight=[[0.181640625]], bias=[0.8828125], lora_a=[[0.58984375]], lora_b=[[-1.9765625]], magnitude=[0.2021484375],
    dy=[-2.328125, -2.046875, 0.006683349609375, -1.4140625, 1.390625, -0.466796875, 1.1328125, 0.484375,
        -0.1826171875, 0.341796875, -0.2099609375, 1.4453125])


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("columns", [1, 40], ids=["one-column", "forty-columns"])
def test_magnitude_gradient_where_the_bias_dominates(columns, path_device):
    """bf16, g ≈ 1: a column whose bias dominates g ⊙ P gets its P recomputed (the pinned case); with 40 columns the
    others (a small bias) recover P from y in the same block, and every column stays within the tolerance."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in BIAS_DOMINATED.items()}
    x, dy = t["x"][:, None], t["dy"][:, None]
    inputs = [x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["magnitude"]]
    if columns > 1:
        _, w, b, _, bb, mag = dora_inputs(12, 1, columns - 1, 1, torch.float64, seed=5)
        inputs[1:] = [torch.cat([inputs[1], w]), torch.cat([inputs[2], 0.1 * b]), inputs[3],
                      torch.cat([inputs[4], bb]), torch.cat([inputs[5], mag])]
        dy = torch.cat([dy, torch.randn(12, columns - 1, generator=torch.Generator().manual_seed(6))], 1)
    inputs = tuple(v.to(torch.bfloat16) for v in inputs)
    dy = dy.to(torch.bfloat16)
    wrt = (0, 3, 4, 5)
    y, grads = _run(inputs, wrt, dy, path_device, scale=0.0)
    eager, oracle, eager_g, oracle_g = eager_and_oracle(
        lambda x, w, b, a, bb, mag: (mag / torch.linalg.norm(w + 0.0 * (bb @ a), dim=1).detach())
        * (x @ w.t() + 0.0 * ((x @ a.t()) @ bb.t())) + b, inputs, dy, wrt)  # g ⊙ P + b in that order, scale 0
    assert_close("y", oracle, y, eager)
    for i, g, eg, og in zip(wrt, grads, eager_g, oracle_g):
        assert_close(f"d{NAMES[i]}", og, g, eg)


def test_y_is_saved_only_when_the_magnitude_trains(path_device):
    """Without dropout dm reads P back from y, so autograd holds y then (an in-place change of y is caught, never a
    silently wrong dm); without a magnitude gradient y is not held."""
    x, w, b, a, bb, mag = (t.to(path_device) for t in dora_inputs(12, 16, 10, 3, torch.float32))
    for trains in (True, False):
        leaves = [t.clone().requires_grad_() for t in (a, bb)] + [mag.clone().requires_grad_(trains)]
        y = dora_linear(x, w, b, *leaves)
        y.mul_(2.0)
        if trains:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        else:
            y.sum().backward()
            assert leaves[0].grad is not None


@pytest.mark.parametrize("bad, match", [
    (dict(magnitude=torch.ones(9)), "magnitude must have shape"),
    (dict(lora_b=torch.ones(10, 2)), "lora_b must have shape"),
    (dict(lora_a=torch.ones(3, 11)), "lora_a must have shape"),
    (dict(bias=torch.ones(4)), "bias must have shape"),
    (dict(dropout=1.0), "dropout"),
    (dict(scale=float("inf")), "scale"),
    (dict(magnitude=torch.ones(10, dtype=torch.int64)), "magnitude must be a floating tensor"),
    (dict(magnitude=None), "magnitude must be a tensor, got None"),
])
def test_bad_input_is_refused_naming_the_argument(bad, match):
    args = dict(x=torch.ones(4, 12), weight=torch.ones(10, 12), bias=None, lora_a=torch.ones(3, 12),
                lora_b=torch.ones(10, 3), magnitude=torch.ones(10))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        dora_linear(**args)


# -- against the real PEFT ----------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_dora_layer(dtype, *, k=24, n=20, r=4, alpha=6, seed=0):
    """PEFT's DoRA layer on a one-linear model, with a trained-looking B and magnitude."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(k, n))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).to(dtype)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.1 * torch.randn(n).to(dtype))
    return pm, layer


def _peft_run(dtype, x, gy):
    """PEFT's output and its gradients of (A, B, m), in ``dtype``; the layer's tensors for ours."""
    pm, layer = _peft_dora_layer(dtype)
    pm.train()
    xx = x.to(dtype)
    y = pm(xx)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    grads = torch.autograd.grad(y, params, gy.to(dtype))
    base = layer.get_base_layer()
    return y.detach(), grads, (xx, base.weight.detach(), base.bias.detach(), *(t.detach() for t in params)), \
        layer.scaling["default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_peft_dora_layer(dtype, device):
    """Same output and gradients of A, B and m as PEFT's ``use_dora=True`` layer (fp64 PEFT is the oracle,
    PEFT in ``dtype`` the eager error), on the fused kernels."""
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(2))
    want_y, want_g, _, _ = _peft_run(torch.float64, x, gy)
    eager_y, eager_g, tensors, scaling = _peft_run(dtype, x, gy)
    xx, w, b, a, bb, mag = (t.to(device) for t in tensors)
    leaves = [t.clone().requires_grad_() for t in (a, bb, mag)]
    with count_launches() as launches:
        y = dora_linear(xx, w, b, *leaves, scale=scaling)
        got_g = torch.autograd.grad(y, leaves, gy.to(dtype).to(device))
    # forward: norm, shrink, main GEMM; backward: dZ, dA, dB (x takes no gradient) and the magnitude's column sum
    assert (launches["_dora_linear_norm_kernel"], launches["_dual_gemm_kernel"],
            launches["_dora_linear_colsum_kernel"]) == (1, 5, 1), dict(launches)
    assert_close("y", want_y, y.detach().cpu(), eager_y)
    for name, want, eager, got in zip(("dlora_A", "dlora_B", "dmagnitude"), want_g, eager_g, got_g):
        assert_close(name, want, got.cpu(), eager)


def test_initial_magnitude_is_our_weight_norm():
    """PEFT initialises ``lora_magnitude_vector`` to ‖W + s·B·A‖_row (fp64 of the same W, A, B the oracle, PEFT's
    own fp32 value the eager error)."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 20)), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = pm.base_model.model[0]
    w, a, b = layer.get_base_layer().weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    got = dora_weight_norm(w, a, b, scale=layer.scaling["default"])
    want = reference.dora_weight_norm_ref(w.double(), a.double(), b.double(), layer.scaling["default"])
    assert_close("magnitude", want, got, layer.lora_magnitude_vector["default"].weight.detach())
