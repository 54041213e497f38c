"""``adaptkern::adapter_linear``: kernels (one-pass and split) against the float64 oracle."""

import pytest
import torch

import adaptkern
from adaptkern.ops import config
from adaptkern.ops import common
from adaptkern.ops.adapter_linear import reference
from adaptkern.ops.adapter_linear import adapter_linear_backward_op, adapter_linear_op, dropout_mask
from adaptkern.testing import assert_close

from ..helpers import eager_and_oracle, make_inputs, ref_fn, transposed_storage

NAMES = ("x", "weight", "bias", "a_w", "a_b", "b_w", "b_b")
TRAINABLE = (0, 3, 4, 5, 6)  # x and the adapter's parameters; W, b frozen

# (M, K, N, R, activation): odd sizes, block edges 127/128/129 (interpreter blocks are 64),
# M=0, rank 1, and a rank above the one-pass limit.
SHAPES = [
    (1, 16, 16, 1, "identity"),
    (37, 70, 53, 5, "gelu"),
    (129, 127, 128, 16, "silu"),
    (64, 129, 65, 8, "relu"),
    (0, 32, 48, 4, "gelu_tanh"),
    (23, 40, 72, 130, "gelu"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(p):
    return "M{}-K{}-N{}-R{}-{}".format(*p)


def _trainable(inputs):
    return tuple(i for i in TRAINABLE if inputs[i] is not None)


def _run(inputs, scale, act, route, grad_out, device):
    wrt = _trainable(inputs)
    ins = [None if t is None else t.detach().to(device).requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    y = adaptkern.adapter_linear(*ins, scale=scale, activation=act, route=route)
    grads = torch.autograd.grad(y, [ins[i] for i in wrt], grad_out.to(device))
    return y.detach().cpu(), [g.cpu() for g in grads]


def _check_all(inputs, scale, act, route, device, seed=1):
    m, n = inputs[0].shape[0], inputs[1].shape[0]
    grad_out = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(inputs[0].dtype)
    y, grads = _run(inputs, scale, act, route, grad_out, device)
    wrt = _trainable(inputs)
    eager, oracle, eager_g, oracle_g = eager_and_oracle(ref_fn(scale, act), inputs, grad_out, wrt)
    assert y.dtype == inputs[0].dtype
    assert_close("y", oracle, y, eager)
    for i, g, eg, og in zip(wrt, grads, eager_g, oracle_g):
        assert g.dtype == inputs[i].dtype
        assert_close(f"d{NAMES[i]}", og, g, eg)


# The one-pass route takes R <= 128 (validated), so larger ranks run the split route only.
ROUTED_SHAPES = [(s, route) for s in SHAPES for route in ("onepass", "split")
                 if route == "split" or s[3] <= 2 * config.ONEPASS_MAX_RANK]


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, route", ROUTED_SHAPES, ids=lambda p: _ids(p) if isinstance(p, tuple) else p)
def test_matches_fp64_oracle(shape, route, dtype, device):
    m, k, n, r, act = shape
    inputs = make_inputs(m, k, n, r, dtype, adapter_bias=act != "identity")
    _check_all(inputs, 0.75, act, route, device)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("route", ["onepass", "split"])
@pytest.mark.parametrize("act", common.ACTIVATIONS)
def test_every_activation(act, route, device):
    _check_all(make_inputs(19, 33, 21, 6, torch.float32, seed=3), 1.3, act, route, device)


def test_rank_1024_split(device):
    """A 4096-wide model at reduction factor 4 has R=1024 (scaled down in K and N here)."""
    _check_all(make_inputs(9, 24, 20, 1024, torch.float32, seed=4), 0.5, "gelu", "auto", device)


def test_base_weight_and_bias_gradients_when_trainable(device):
    inputs = make_inputs(33, 20, 18, 4, torch.float32, seed=5)
    ins = [t.detach().to(device).requires_grad_() for t in inputs]
    y = adaptkern.adapter_linear(*ins, scale=0.5, activation="silu")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ins, gy)
    _, oracle, _, og = eager_and_oracle(ref_fn(0.5, "silu"), inputs, gy.cpu(), tuple(range(7)))
    assert_close("y", oracle, y.detach().cpu())
    for name, g, o in zip(NAMES, grads, og):
        assert_close(f"d{name}", o, g.cpu())


def test_no_bias_anywhere(device):
    inputs = make_inputs(17, 24, 40, 3, torch.float32, bias=False, adapter_bias=False)
    _check_all(inputs, 2.0, "identity", "split", device)


@pytest.mark.parametrize("route", ["onepass", "split"])
def test_non_contiguous_inputs_and_transposed_weights(route, device):
    x, w, b, a_w, a_b, b_w, b_b = make_inputs(21, 30, 26, 7, torch.float32, seed=6)
    # x as a strided slice of a wider tensor, weights stored transposed.
    x_nc = torch.cat([x, torch.randn_like(x)], dim=1)[:, ::2]
    x_nc[:, :] = x
    w_t, a_t, b_t = w.t().contiguous().t(), a_w.t().contiguous().t(), b_w.t().contiguous().t()
    assert not (x_nc.is_contiguous() or w_t.is_contiguous() or a_t.is_contiguous() or b_t.is_contiguous())
    leaves = [t.to(device).requires_grad_() for t in (x_nc, a_t, b_t)]
    y = adaptkern.adapter_linear(leaves[0], w_t.to(device), b.to(device), leaves[1], a_b.to(device), leaves[2],
                                 b_b.to(device), scale=0.5, activation="gelu", route=route)
    # A non-contiguous incoming gradient: the transpose of a contiguous [N, M] tensor.
    gy = torch.randn(y.shape[1], y.shape[0], device=device).t()
    grads = torch.autograd.grad(y, leaves, gy)
    inputs = (x, w, b, a_w, a_b, b_w, b_b)
    _, oracle, _, og = eager_and_oracle(ref_fn(0.5, "gelu"), inputs, gy.cpu(), (0, 3, 5))
    assert_close("y", oracle, y.detach().cpu())
    for name, g, o in zip(("dx", "da_w", "db_w"), grads, og):
        assert_close(name, o, g.cpu())


def test_leading_dims_are_flattened(device):
    x, w, b, a_w, a_b, b_w, b_b = make_inputs(24, 16, 12, 4, torch.float32)
    y = adaptkern.lora_linear(x.view(2, 3, 4, 16).to(device), w.to(device), b.to(device), a_w.to(device),
                              b_w.to(device), scale=2.0)
    assert y.shape == (2, 3, 4, 12)
    want = reference.lora_linear_ref(x.double(), w.double(), b.double(), a_w.double(), b_w.double(), 2.0)
    assert_close("y", want, y.reshape(24, 12).cpu())


@pytest.mark.parametrize("route", ["onepass", "split"])
def test_nan_in_one_row_stays_in_that_row(route, device):
    x, w, b, a_w, a_b, b_w, b_b = (t.to(device) for t in make_inputs(70, 20, 30, 4, torch.float32))
    x[13, 5] = float("nan")
    y = adaptkern.adapter_linear(x, w, b, a_w, a_b, b_w, b_b, activation="relu", route=route)
    bad = torch.isnan(y).any(dim=1).cpu()
    assert bad[13] and bad.sum() == 1


@pytest.mark.usefixtures("nan_poison")
def test_m_zero_forward_and_backward(device):
    x, w, b, a_w, a_b, b_w, b_b = (t.to(device) for t in make_inputs(0, 20, 30, 4, torch.float32))
    leaves = [t.requires_grad_() for t in (x, a_w, a_b, b_w, b_b)]
    y = adaptkern.adapter_linear(leaves[0], w, b, *leaves[1:3], *leaves[3:], activation="gelu")
    assert y.shape == (0, 30)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert grads[0].shape == (0, 20)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g)), "no rows: adapter gradients must be exactly zero"


@pytest.mark.parametrize("route", ["onepass", "split"])
def test_dropout_matches_reference_with_the_kernel_mask(route, device):
    p, scale = 0.3, 0.5
    x, w, b, a_w, a_b, b_w, b_b = make_inputs(45, 38, 27, 5, torch.float32, seed=8)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep = dropout_mask(seed, 45, 38, p).cpu()
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    assert torch.equal(keep, dropout_mask(seed, 45, 38, p).cpu()), "mask must be a pure function of the seed"
    leaves = [t.to(device).requires_grad_() for t in (x, a_w, a_b, b_w, b_b)]
    y, _ = adapter_linear_op(leaves[0], w.to(device), b.to(device), *leaves[1:], scale, "gelu", p, seed, True, route)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)

    ins = [t.double().requires_grad_() for t in (x, a_w, a_b, b_w, b_b)]
    ref = reference.adapter_linear_ref(ins[0], w.double(), b.double(), *ins[1:], scale, "gelu", keep, p)
    ref_g = torch.autograd.grad(ref, ins, gy.double().cpu())
    assert_close("y", ref.detach(), y.detach().cpu())
    for name, g, o in zip(("dx", "da_w", "da_b", "db_w", "db_b"), grads, ref_g):
        assert_close(name, o, g.cpu())


def test_lora_dropout_changes_only_the_adapter_branch(device):
    inputs = make_inputs(30, 20, 10, 4, torch.float32)
    x, w, b, a_w, _, b_w, _ = (t.to(device) if t is not None else None for t in inputs)
    torch.manual_seed(0)
    y1 = adaptkern.lora_linear(x, w, b, a_w, b_w, dropout=0.5)
    y2 = adaptkern.lora_linear(x, w, b, a_w, b_w, dropout=0.5)
    assert not torch.equal(y1, y2), "a fresh seed per call"
    base = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(adaptkern.lora_linear(x, w, b, a_w, torch.zeros_like(b_w), dropout=0.5), base,
                          rtol=1e-5, atol=1e-5)


def test_split_k_reduction_and_deterministic_mode(device):
    """Thin, deep products (dA over 300 tokens) are split across programs; deterministic mode is exact."""
    inputs = make_inputs(300, 16, 12, 2, torch.float32, seed=9)
    assert config.split_k(1, 300, config.gemm_config(2, 16).block_k, torch.device(device)) > 1 or device == "cuda"
    _check_all(inputs, 1.0, "identity", "split", device)
    torch.use_deterministic_algorithms(True)
    try:
        a = _run(inputs, 1.0, "identity", "split", torch.ones(300, 12), device)[1]
        b = _run(inputs, 1.0, "identity", "split", torch.ones(300, 12), device)[1]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", ["lora-onepass", "lora-split", "parallel-gelu", "sequential-silu"])
def test_gradcheck_float64(kind, device):
    g = torch.Generator().manual_seed(11)

    def leaf(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    m, k, n, r = 5, 7, 6, 3
    x, w, bias = leaf(m, k), leaf(n, k), leaf(n)
    if kind.startswith("lora"):
        route = kind.split("-")[1]
        fn = lambda x, w, bias, a, bb: adaptkern.lora_linear(x, w, bias, a, bb, scale=0.7, route=route)  # noqa: E731
        args = (x, w, bias, leaf(r, k), leaf(n, r))
    else:
        placement, act = kind.split("-")
        down = leaf(r, n if placement == "sequential" else k)
        fn = lambda x, w, bias, d, db, u, ub: adaptkern.bottleneck_linear(  # noqa: E731
            x, w, bias, d, db, u, ub, scale=0.7, activation=act, placement=placement)
        args = (x, w, bias, down, leaf(r), leaf(n, r), leaf(n))
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_opcheck(device):
    x, w, b, a_w, a_b, b_w, b_b = (t.to(device) for t in make_inputs(9, 12, 10, 3, torch.float32))
    leaves = [t.requires_grad_() for t in (x, a_w, a_b, b_w, b_b)]
    args = (leaves[0], w, b, leaves[1], leaves[2], leaves[3], leaves[4], 0.5, "gelu", 0.0, None, True, "auto")
    torch.library.opcheck(adapter_linear_op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_path_on_cpu_matches_oracle(dtype, monkeypatch):
    """Without the interpreter, CPU tensors run reference.py: outputs and gradients."""
    monkeypatch.setattr(config, "interpreting", lambda: False)
    _check_all(make_inputs(31, 22, 17, 6, dtype, seed=12), 0.9, "gelu_tanh", "auto", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2048, 4096, 4096, 16, "identity"), (1024, 4096, 14336, 64, "identity"),
                                   (777, 2048, 2049, 256, "gelu"), (4097, 1024, 1000, 1024, "silu")], ids=_ids)
def test_large_shapes_on_gpu(shape, dtype):
    m, k, n, r, act = shape
    inputs = make_inputs(m, k, n, r, dtype)
    for route in ("onepass", "split") if r <= 2 * config.ONEPASS_MAX_RANK else ("split",):
        _check_all(inputs, 0.5, act, route, "cuda")


@pytest.mark.parametrize("route", ["onepass", "split"])
def test_strided_bias_vectors(route, device):
    """1-D operands that are views with a stride (bias[::2]) are read correctly."""
    x, w, b, a_w, a_b, b_w, b_b = make_inputs(20, 24, 18, 4, torch.float32, seed=13)
    views = [torch.stack([t, torch.full_like(t, 1e3)], dim=1)[:, 0] for t in (b, a_b, b_b)]
    assert all(v.stride() == (2,) for v in views)
    y = adaptkern.adapter_linear(x.to(device), w.to(device), views[0].to(device), a_w.to(device), views[1].to(device),
                                 b_w.to(device), views[2].to(device), activation="gelu", route=route)
    want = reference.adapter_linear_ref(*(t.double() for t in (x, w, b, a_w, a_b, b_w, b_b)), 1.0, "gelu")
    assert_close("y", want, y.cpu())


@pytest.mark.parametrize("route", ["onepass", "split"])
def test_large_scale_does_not_overflow_fp16(route, device):
    """scale·f(z) is applied in fp32 after the B dot: no inf where the result fits in fp16."""
    x, w, b, a_w, _, b_w, _ = make_inputs(16, 32, 16, 4, torch.float16, seed=14)
    scale = 2.0e4
    y = adaptkern.lora_linear(x.to(device), w.to(device), b.to(device), a_w.to(device), b_w.to(device) * 1e-3,
                              scale=scale, route=route)
    want = reference.lora_linear_ref(x.double(), w.double(), b.double(), a_w.double(), b_w.double() * 1e-3, scale)
    assert torch.isfinite(y).all()
    eager = reference.lora_linear_ref(x, w, b, a_w, b_w * 1e-3, scale)
    assert_close("y", want, y.cpu(), eager)


def test_forward_never_splits_k(monkeypatch, device):
    """Split-K (fp32 atomics) is for backward reductions only: the forward stays bitwise reproducible."""
    def forbidden(*args, **kwargs):
        raise AssertionError("forward used split-K")

    monkeypatch.setattr(config, "split_k", forbidden)
    x, w, b, a_w, a_b, b_w, b_b = (t.to(device) for t in make_inputs(40, 300, 24, 4, torch.float32))
    with torch.no_grad():
        adaptkern.adapter_linear(x, w, b, a_w, a_b, b_w, b_b, activation="identity", route="split")


def test_autocast_runs_in_the_autocast_dtype():
    m = adaptkern.AdapterLinear(16, 8)
    m.add_lora("a", 2)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, m.weight, m.bias).dtype == torch.bfloat16
        assert m(x).dtype == torch.bfloat16


@pytest.mark.parametrize("need_z", [True, False], ids=["need_z", "no_z"])
def test_opcheck_adapter_linear_ops_on_both_paths(need_z, path_device):
    """Real and fake (torch.library) outputs agree on both paths, A and B laid out transposed included."""
    x, w, b, a_w, a_b, b_w, b_b = (t.to(path_device) for t in make_inputs(9, 12, 10, 3, torch.float32))
    a_w, b_w = transposed_storage(a_w), transposed_storage(b_w)
    seed = torch.tensor([7], device=path_device)
    leaves = [t.requires_grad_(need_z) for t in (x, a_w, a_b, b_w, b_b)]
    for route in ("onepass", "split"):
        args = (leaves[0], w, b, *leaves[1:], 0.5, "gelu", 0.25, seed, need_z, route)
        torch.library.opcheck(adapter_linear_op, args)
        y, z = adapter_linear_op(*args)
        assert y.shape == (9, 10) and z.dtype == torch.float32 and z.shape == ((9, 3) if need_z else (0,))
    if need_z:
        dy = torch.randn(9, 10, generator=torch.Generator().manual_seed(3)).to(path_device)
        for needs in ([True] * 7, [False, False, False, True, True, True, False]):
            args = (dy, x.detach(), w, a_w.detach(), b_w.detach(), z.detach(), 0.5, "gelu", 0.25, seed, needs)
            torch.library.opcheck(adapter_linear_backward_op, args)  # (the backward op has no double backward)
