"""adaptkern::bottleneck_norm (the norm-fused bottleneck) against its float64 reference: outputs and every
gradient, on the reference path and on the kernels, for every AdapterHub placement it expresses."""

import pytest
import torch

from adaptkern.bottleneck_norm import bottleneck_norm
from adaptkern.ops.bottleneck_norm import bottleneck_norm_op
from adaptkern.ops.bottleneck_norm.reference import bottleneck_norm_ref
from adaptkern.testing import assert_close

from ..helpers import count_launches, eager_and_oracle

NAMES = ("x", "weight", "bias", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale", "norm_weight",
         "norm_bias")

# id -> (adapter_input, coefficients, norm, final_norm, activation, scale kind)
CASES = {
    "seq_bn-bert": ("norm", (1.0, 1.0, 0.0), "layernorm", True, "relu", "float"),
    "seq_bn-bert-res-after-ln": ("norm", (0.0, 1.0, 1.0), "layernorm", True, "gelu", "float"),
    "seq_bn-bert-post_add-no-ln-after": ("norm", (1.0, 1.0, 0.0), "layernorm", False, "silu", "float"),
    "seq_bn-llama": ("sum", (1.0, 1.0, 0.0), "none", False, "silu", "float"),
    "seq_bn-llama-res-after": ("sum", (1.0, 2.0, 0.0), "none", False, "gelu_tanh", "float"),
    "houlsby-bert": ("output", (1.0, 1.0, 0.0), "layernorm", True, "relu", "float"),
    "par_bn-bert": ("residual", (1.0, 1.0, 0.0), "layernorm", True, "relu", "float"),
    "scaled_par_bn-llama": ("residual", (1.0, 1.0, 0.0), "none", False, "relu", "learned"),
    "seq_bn-rmsnorm-channel": ("norm", (1.0, 1.0, 0.0), "rmsnorm", True, "gelu", "channel"),
    "rmsnorm-base-norm": ("norm", (0.0, 2.0, 1.0), "rmsnorm", False, "identity", "learned"),
}


FIXED_SCALE = 0.7  # the "float" scale kind; make() leaves its slot None


def make(m, k, n, r, dtype, scale_kind, *, weight=True, norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return (mean + torch.randn(*shape, generator=g) * std).to(dtype)

    scale = {"float": None, "learned": rnd(1, std=0.3, mean=1.0), "channel": rnd(n, std=0.3, mean=1.0)}[scale_kind]
    return [rnd(m, k if weight else n), rnd(n, k, std=k**-0.5) if weight else None, rnd(n, std=0.5) if weight else None,
            rnd(m, n), rnd(r, n, std=n**-0.5), rnd(r, std=0.5), rnd(n, r, std=r**-0.5), rnd(n, std=0.5), scale,
            rnd(n, std=0.2, mean=1.0) if norm else None, rnd(n, std=0.2) if norm else None]


def fused(case):
    a_in, coeffs, norm, final, act, _ = CASES[case]

    def fn(x, w, b, res, dw, db, uw, ub, s, gw, gb):
        return bottleneck_norm(x, w, b, res, dw, db, uw, ub, scale=FIXED_SCALE if s is None else s, activation=act,
                               adapter_input=a_in, coefficients=coeffs, norm=norm, norm_weight=gw, norm_bias=gb,
                               final_norm=final)
    return fn


def ref(case):
    a_in, coeffs, norm, final, act, _ = CASES[case]

    def fn(x, w, b, res, dw, db, uw, ub, s, gw, gb):
        if s is None:
            s = torch.tensor([FIXED_SCALE], dtype=x.dtype)
        return bottleneck_norm_ref(x, w, b, res, dw, db, uw, ub, s, gw, gb, act=act, adapter_input=a_in,
                                   coeffs=coeffs, norm=norm, final_norm=final, eps=1e-5)
    return fn


def check(case, inputs, grad_seed=1, what=""):
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    dy_shape = (*inputs[0].shape[:-1], inputs[3].shape[-1])
    dy = torch.randn(dy_shape, generator=torch.Generator().manual_seed(grad_seed)).to(inputs[0].dtype)
    eager, oracle, eager_g, oracle_g = eager_and_oracle(ref(case), inputs, dy, wrt)
    leaves = [t.detach().clone().requires_grad_(i in wrt) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    out = fused(case)(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], dy)
    assert_close(f"{case}{what} y", oracle, out, eager)
    for i, g, eg, og in zip(wrt, grads, eager_g, oracle_g):
        assert_close(f"{case}{what} d{NAMES[i]}", og, g, eg)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, path_device):
    # odd sizes: M, K, N, R none a power of two; N spans several 128-wide chunks of the kernels
    _, _, norm, _, _, scale_kind = CASES[case]
    inputs = make(37, 24, 131, 5, torch.float32, scale_kind, norm=norm != "none")
    check(case, [t.to(path_device) if isinstance(t, torch.Tensor) else t for t in inputs])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["seq_bn-bert", "par_bn-bert", "seq_bn-llama", "seq_bn-rmsnorm-channel"])
def test_low_precision_kernels(case, dtype, device):
    _, _, norm, _, _, scale_kind = CASES[case]
    check(case, [t.to(device) if isinstance(t, torch.Tensor) else t
                 for t in make(33, 16, 48, 8, dtype, scale_kind, norm=norm != "none", seed=3)], what=f" {dtype}")


def test_without_weight_x_is_h(path_device):
    inputs = make(19, 0, 40, 3, torch.float32, "learned", weight=False)
    check("seq_bn-bert", [t.to(path_device) if isinstance(t, torch.Tensor) else t for t in inputs])


def test_leading_dims_and_non_contiguous(path_device):
    m, k, n, r = 12, 20, 36, 4
    inputs = make(m, k, n, r, torch.float32, "float")
    x = inputs[0].reshape(3, 4, k)
    residual = inputs[3].t().contiguous().t().reshape(3, 4, n)  # column-major storage
    weight = inputs[1].t().contiguous().t()
    inputs = [x, weight, inputs[2], residual, *inputs[4:]]
    check("seq_bn-bert", [t.to(path_device) if isinstance(t, torch.Tensor) else t for t in inputs])


def test_nan_poisoned_outputs(nan_poison, device):
    check("seq_bn-bert-res-after-ln", [t.to(device) if isinstance(t, torch.Tensor) else t
                                       for t in make(21, 12, 30, 3, torch.float32, "float")])
    check("scaled_par_bn-llama", [t.to(device) if isinstance(t, torch.Tensor) else t
                                  for t in make(21, 12, 30, 3, torch.float32, "learned", norm=False)])


def test_m_zero(path_device):
    inputs = [t.to(path_device) if isinstance(t, torch.Tensor) else t
              for t in make(0, 8, 16, 2, torch.float32, "learned")]
    leaves = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    y = fused("seq_bn-bert")(*leaves)
    assert y.shape == (0, 16)
    grads = torch.autograd.grad(y.sum(), [t for t in leaves if isinstance(t, torch.Tensor)])
    for name, g, t in zip([n for n, t in zip(NAMES, leaves) if isinstance(t, torch.Tensor)], grads,
                          [t for t in leaves if isinstance(t, torch.Tensor)]):
        assert g.shape == t.shape and not g.isnan().any() and not g.abs().sum(), name


def test_launch_count(device):
    """Forward: the dense GEMM and one row kernel; backward: the row kernel and one GEMM per product."""
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in make(16, 8, 32, 4, torch.float32, "float")]
    with count_launches() as launches:
        fused("seq_bn-bert")(*inputs)
    assert launches == {"_dual_gemm_kernel": 1, "_bottleneck_norm_fwd_kernel": 1}, launches
    leaves = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    y = fused("seq_bn-bert")(*leaves)
    with count_launches() as launches:
        y.backward(torch.ones_like(y))
    # dx, dW, dD, dU
    assert launches == {"_bottleneck_norm_bwd_kernel": 1, "_dual_gemm_kernel": 4}, launches


def test_opcheck(device):
    inputs = make(9, 8, 20, 3, torch.float32, "learned")
    args = [t.to(device).requires_grad_() for t in inputs]
    torch.library.opcheck(bottleneck_norm_op, (*args, "relu", "norm", 1.0, 1.0, 0.0, "layernorm", True, 1e-5))


@pytest.mark.parametrize("change,error,match", [
    (dict(residual=torch.zeros(5, 7)), ValueError, r"residual must have shape \(6, 16\)"),
    (dict(down_weight=torch.zeros(3, 15)), ValueError, r"down_weight must have shape \(3, 16\)"),
    (dict(up_weight=torch.zeros(16, 4)), ValueError, r"up_weight must have shape \(16, 3\)"),
    (dict(norm_weight=torch.zeros(15)), ValueError, r"norm_weight must have shape \(16,\)"),
    (dict(scale=torch.ones(3)), ValueError, r"scale as a tensor must have shape"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(adapter_input="input"), ValueError, "adapter_input must be one of"),
    (dict(norm="batchnorm"), ValueError, "norm must be one of"),
    (dict(norm="none"), ValueError, "norm='none' leaves nothing to normalise"),
    (dict(coefficients=(1.0, 1.0)), TypeError, "coefficients must be a triple"),
    (dict(eps=0.0), ValueError, "eps must be a positive number"),
    (dict(activation="tanh"), ValueError, "unknown activation"),
    (dict(weight=None), ValueError, "bias needs a weight"),
    (dict(residual=torch.zeros(6, 16, dtype=torch.int32)), TypeError, "residual must be a floating tensor"),
])
def test_bad_input(change, error, match):
    args = dict(x=torch.zeros(6, 8), weight=torch.zeros(16, 8), bias=torch.zeros(16), residual=torch.zeros(6, 16),
                down_weight=torch.zeros(3, 16), down_bias=None, up_weight=torch.zeros(16, 3), up_bias=None,
                scale=1.0, norm_weight=None, norm_bias=None, adapter_input="norm", norm="layernorm", eps=1e-5,
                coefficients=(1.0, 1.0, 0.0), activation="relu")
    args.update(change)
    positional = [args.pop(k) for k in NAMES[:8]]
    with pytest.raises(error, match=match):
        bottleneck_norm(*positional, **args)
