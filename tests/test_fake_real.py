"""Fake and real agree, for every custom op under ``torch.ops.adaptkern``, on both CPU paths.

torch.compile traces an op through its registered fake implementation and then runs the real one; when the
two disagree on an output's shape, dtype, device or strides, compiled code breaks or, worse, reads the wrong
memory (the mixed op returned z as [0] on the reference path while its fake said [M, R]).

For each op found in adaptkern/ops/*.py (the list is enumerated from the dispatcher, and a test fails when an
op has no cases here), on the kernel path (Triton interpreter on CPU, the GPU when there is one) and on the
reference path, with need_z (DoRA: need_s, need_p) / needs on and off and inputs that do or do not require
grad, in fp32, bf16 and fp64, with M > 0 and M = 0: the op runs for real and under FakeTensorMode (inputs
converted with ``from_tensor``); every output must agree in shape, dtype, device and strides (on dims longer
than 1). Then ``torch.library.opcheck`` runs the op's schema, autograd-registration, fake-tensor and
AOT-dispatch checks.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

import adaptkern.ops
from adaptkern.ops import config

for _info in pkgutil.iter_modules(adaptkern.ops.__path__):  # every module that may register an op
    importlib.import_module(f"adaptkern.ops.{_info.name}")

NAMESPACE = "adaptkern"
REGISTERED = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith(f"{NAMESPACE}::"))
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["kernels", "reference"]


@contextlib.contextmanager
def on_path(path):
    if path == "reference":
        with mock.patch.object(config, "interpreting", lambda: False):
            yield "cpu"
    else:
        yield KERNEL_DEVICE


def op(name):
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# -- inputs ----------------------------------------------------------------------------------------------------

M, K, N, R, S = 5, 6, 7, 3, 3


def _rnd(gen, *shape, dtype, device, grad=False, std=0.5):
    return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device).requires_grad_(grad)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def adapter_linear_args(dev, dtype, m, need_z, grad, route="split", dropout=0.0):
    g = torch.Generator().manual_seed(0)
    x = _rnd(g, m, K, dtype=dtype, device=dev, grad=grad)
    w, b = _rnd(g, N, K, dtype=dtype, device=dev), _rnd(g, N, dtype=dtype, device=dev)
    a_w, a_b = _rnd(g, R, K, dtype=dtype, device=dev, grad=grad), _rnd(g, R, dtype=dtype, device=dev, grad=grad)
    b_w, b_b = _rnd(g, N, R, dtype=dtype, device=dev, grad=grad), _rnd(g, N, dtype=dtype, device=dev, grad=grad)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev) if dropout else None
    return [x, w, b, a_w, a_b, b_w, b_b, 0.5, "gelu", dropout, seed, need_z, route]


def adapter_linear_backward_args(dev, dtype, m, needs, grad):
    fwd = adapter_linear_args(dev, dtype, m, True, False)
    _, z = op("adapter_linear")(*fwd)
    g = torch.Generator().manual_seed(1)
    dy = _rnd(g, m, N, dtype=dtype, device=dev, grad=grad)
    x, w, _, a_w, _, b_w = fwd[:6]
    return [dy, x.requires_grad_(grad), w, a_w, b_w, z, 0.5, "gelu", 0.0, None, list(needs)]


def mixed_args(dev, dtype, m, need_z, grad, lora_only=False, slices=1, mapping=False, col_scales=False):
    g = torch.Generator().manual_seed(2)
    x = _rnd(g, m, K, dtype=dtype, device=dev, grad=grad)
    widths = (N,) if slices == 1 else (4, 2, 1)
    w, b = _rnd(g, sum(widths), K, dtype=dtype, device=dev), _rnd(g, sum(widths), dtype=dtype, device=dev)
    a_all = [_rnd(g, S, R, K, dtype=dtype, device=dev, grad=grad) for _ in widths]
    b_all = [_rnd(g, S, n, R, dtype=dtype, device=dev, grad=grad) for n in widths]
    a_bias = None if lora_only else _rnd(g, S, R, dtype=dtype, device=dev, grad=grad)
    b_bias = None if lora_only else _rnd(g, S, N, dtype=dtype, device=dev, grad=grad)
    scales = torch.tensor([0.5, -1.0, 2.0], dtype=acc(dtype), device=dev)
    ranks = torch.tensor([3, 1, 2], dtype=torch.int32, device=dev)
    acts = None if lora_only else torch.tensor([0, 2, 4], dtype=torch.int32, device=dev)
    ids = _ids(m, dev)
    sorted_rows, offsets = _metadata(ids) if mapping else (None, None)
    cs = (torch.rand(S, sum(widths), generator=g) + 0.5).to(dtype=acc(dtype), device=dev) if col_scales else None
    return [x, w, b, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, need_z, cs]


def _ids(m, dev, dtype=torch.int32):
    return torch.tensor([i % (S + 1) - 1 for i in range(m)], dtype=dtype, device=dev)


def _metadata(ids):
    from adaptkern.ops.mixed_adapter_linear.rows import slot_metadata

    meta = slot_metadata(ids, S)
    return meta.sorted_rows, meta.offsets


def mixed_backward_args(dev, dtype, m, needs, grad, lora_only=False, slices=1, col_scales=False):
    fwd = mixed_args(dev, dtype, m, True, False, lora_only, slices, col_scales=col_scales)
    _, z = op("mixed_adapter_linear")(*fwd)
    g = torch.Generator().manual_seed(3)
    x, w, b, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, _, cs = fwd
    dy = _rnd(g, m, w.shape[0], dtype=dtype, device=dev, grad=grad)
    needs = [need and t is not None for need, t in zip(needs, (x, w, b, a_all, a_bias, b_all, b_bias))]
    return [dy, x.requires_grad_(grad), w, b, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows,
            offsets, z, needs, cs]


def delta_args(kind, dev, dtype, m, grad):
    """Inputs of the serving ops (lora_shrink_, lora_expand_, add_lora_delta_): three slices, y wider than them."""
    g = torch.Generator().manual_seed(4)
    widths = (4, 2, 2)
    x = _rnd(g, m, K, dtype=dtype, device=dev)
    a_all = [_rnd(g, S, R, K, dtype=dtype, device=dev) for _ in widths]
    b_all = [_rnd(g, S, n, R, dtype=dtype, device=dev) for n in widths]
    scales = torch.tensor([0.5, -1.0, 2.0], dtype=acc(dtype), device=dev)
    ranks = torch.tensor([3, 0, 2], dtype=torch.int32, device=dev)
    ids = _ids(m, dev, torch.int64)
    y = _rnd(g, m, 11, dtype=dtype, device=dev)
    if kind == "shrink":
        return [torch.zeros(3, m, R, dtype=acc(dtype), device=dev), x, a_all, scales, ranks, ids, None]
    if kind == "expand":
        return [y, _rnd(g, 3, m, R, dtype=acc(dtype), device=dev), b_all, ranks, ids, None, 2, True]
    return [y, x, a_all, b_all, scales, ranks, ids, None, 1, None if kind == "auto" else kind == "fused"]


def embedding_args(dev, dtype, m, grad, mapping=False):
    g = torch.Generator().manual_seed(5)
    v = 9
    tokens = torch.tensor([i % v for i in range(m)], dtype=torch.int64, device=dev)
    ids = _ids(m, dev)
    sorted_rows = _metadata(ids)[0] if mapping else None
    return [tokens, _rnd(g, v, N, dtype=dtype, device=dev), _rnd(g, S, R, v, dtype=dtype, device=dev),
            _rnd(g, S, N, R, dtype=dtype, device=dev), torch.tensor([0.5, -1.0, 2.0], device=dev),
            torch.tensor([3, 1, 2], dtype=torch.int32, device=dev), ids, sorted_rows]


def dora_args(dev, dtype, m, grad, need_s=True, need_p=True, dropout=0.0):
    g = torch.Generator().manual_seed(6)
    x = _rnd(g, m, K, dtype=dtype, device=dev, grad=grad)
    w, b = _rnd(g, N, K, dtype=dtype, device=dev, grad=grad), _rnd(g, N, dtype=dtype, device=dev, grad=grad)
    a_w, b_w = _rnd(g, R, K, dtype=dtype, device=dev, grad=grad), _rnd(g, N, R, dtype=dtype, device=dev, grad=grad)
    mag = (1.0 + _rnd(g, N, dtype=torch.float32, device="cpu")).to(dtype=dtype, device=dev).requires_grad_(grad)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev) if dropout else None
    return [x, w, b, a_w, b_w, mag, 0.5, dropout, seed, need_s, need_p]


def dora_backward_args(dev, dtype, m, needs, grad, dropout=0.0):
    fwd = dora_args(dev, dtype, m, False, dropout=dropout)
    y, norm, s, p = op("dora_linear")(*fwd)
    dy = _rnd(torch.Generator().manual_seed(7), m, N, dtype=dtype, device=dev, grad=grad)
    x, w, b, a_w, b_w, mag, scale, _, seed = fwd[:9]
    y = y if not dropout else y.new_empty(0)  # as the autograd wrapper saves it: y is read without dropout only
    return [dy, x.requires_grad_(grad), w, b, a_w, b_w, mag, norm, s, p, y, scale, dropout, seed, list(needs)]


BLOCKSIZE = 32  # blocks of the flat [N, K] weight cross its rows (N·K = 42)


def quantized_args(dev, dtype, m, need_z, grad, route="auto", nested=False, dropout=0.0):
    """Packed 4-bit NF4 weight [N, K] as plain tensors (random codes and scales: any bytes are a weight)."""
    from adaptkern.ops.quantized_lora_linear import code_pairs, code_table

    g = torch.Generator().manual_seed(8)
    x = _rnd(g, m, K, dtype=dtype, device=dev, grad=grad)
    qweight = torch.randint(0, 256, ((N * K + 1) // 2,), generator=g, dtype=torch.uint8).to(dev)
    blocks = -(-N * K // BLOCKSIZE)
    if nested:
        absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8).to(dev)
        extra = [torch.rand(1, generator=g).to(dev) + 0.5, torch.linspace(-1, 1, 256).to(dev),
                 torch.tensor([0.25], device=dev)]
    else:
        absmax, extra = (torch.rand(blocks, generator=g) + 0.5).to(dev), [None, None, None]
    b = _rnd(g, N, dtype=dtype, device=dev, grad=grad)
    a_w, b_w = _rnd(g, R, K, dtype=dtype, device=dev, grad=grad), _rnd(g, N, R, dtype=dtype, device=dev, grad=grad)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev) if dropout else None
    return [x, qweight, absmax, *extra, code_pairs(code_table("nf4", dev)), N, BLOCKSIZE, torch.bfloat16, b, a_w, b_w,
            0.5, dropout, seed, need_z, route]


def quantized_base_args(dev, dtype, m, nested=False, bias=True):
    """The base-only 4-bit op takes quantized_lora_linear's first eleven inputs (not differentiable: no grad)."""
    args = quantized_args(dev, dtype, m, False, False, nested=nested)[:11]
    return args if bias else [*args[:10], None]


def quantized_backward_args(dev, dtype, m, needs, grad, nested=False, dropout=0.0):
    fwd = quantized_args(dev, dtype, m, True, False, nested=nested, dropout=dropout)
    _, z = op("quantized_lora_linear")(*fwd)
    dy = _rnd(torch.Generator().manual_seed(9), m, N, dtype=dtype, device=dev, grad=grad)
    x, *weight_args, bias, a_w, b_w, scale, dropout_p, seed, _, _ = fwd
    needs = [need and t is not None for need, t in zip(needs, (x, bias, a_w, b_w))]
    return [dy, x.requires_grad_(grad), *weight_args, a_w, b_w, z, scale, dropout_p, seed, needs]


# the AdapterHub placements bottleneck_norm fuses: (has weight, adapter_input, (c_h, c_r, c_n), norm, final_norm)
NORM_SETUPS = {
    "pfeiffer": (True, "norm", (1.0, 1.0, 0.0), "layernorm", True),
    "llama-sum": (True, "sum", (1.0, 1.0, 0.0), "none", False),
    "parallel-rms": (True, "residual", (1.0, 1.0, 0.0), "rmsnorm", True),
    "no-weight": (False, "output", (1.0, 0.5, 0.25), "layernorm", False),
}


def bottleneck_norm_args(dev, dtype, m, grad, setup="pfeiffer", column_scale=False):
    has_w, adapter_input, (c_h, c_r, c_n), norm, final_norm = NORM_SETUPS[setup]
    g = torch.Generator().manual_seed(10)
    x = _rnd(g, m, K if has_w else N, dtype=dtype, device=dev, grad=grad)
    w = _rnd(g, N, K, dtype=dtype, device=dev, grad=grad) if has_w else None
    b = _rnd(g, N, dtype=dtype, device=dev, grad=grad) if has_w else None
    residual = _rnd(g, m, N, dtype=dtype, device=dev, grad=grad)
    down_w, down_b = _rnd(g, R, N, dtype=dtype, device=dev, grad=grad), _rnd(g, R, dtype=dtype, device=dev, grad=grad)
    up_w, up_b = _rnd(g, N, R, dtype=dtype, device=dev, grad=grad), _rnd(g, N, dtype=dtype, device=dev, grad=grad)
    scale = _rnd(g, N if column_scale else 1, dtype=dtype, device=dev, grad=grad)
    gamma, beta = (None, None) if norm == "none" else (_rnd(g, N, dtype=dtype, device=dev, grad=grad),
                                                        _rnd(g, N, dtype=dtype, device=dev, grad=grad))
    return [x, w, b, residual, down_w, down_b, up_w, up_b, scale, gamma, beta, "gelu", adapter_input, c_h, c_r, c_n,
            norm, final_norm, 1e-5]


def bottleneck_norm_backward_args(dev, dtype, m, needs, grad, setup="pfeiffer"):
    fwd = bottleneck_norm_args(dev, dtype, m, False, setup)
    _, h, p, stats = op("bottleneck_norm")(*fwd)
    dy = _rnd(torch.Generator().manual_seed(11), m, N, dtype=dtype, device=dev, grad=grad)
    tensors, consts = fwd[:11], fwd[11:]
    needs = [need and t is not None for need, t in zip(needs, tensors)]
    return [dy, tensors[0].requires_grad_(grad), *tensors[1:], h, p, stats, *consts, needs]


def slot_metadata_args(dev, m, ids_dtype, spare):
    """ids [M] (some out of range: they read as -1) and the six metadata buffers for M + ``spare`` rows."""
    from adaptkern.ops.mixed_adapter_linear.rows import slot_metadata_buffers

    ids = torch.tensor([i % (S + 3) - 2 for i in range(m)], dtype=ids_dtype, device=dev)
    return [ids, *slot_metadata_buffers(m + spare, S, dev)]


ALL = (True,) * 7
X_ONLY = (True,) + (False,) * 6
ADAPTER_ONLY = (False, False, False, True, True, True, True)
NONE = (False,) * 7
DORA_ADAPTER = (False, False, False, True, True, True)  # lora_a, lora_b, magnitude
QUANT_ADAPTER = (False, True, True, True)  # bias, lora_a, lora_b (x, bias, lora_a, lora_b; W is frozen)
NORM_ALL = (True,) * 11
NORM_X = (True,) + (False,) * 10
NORM_ADAPTER = (False,) * 4 + (True,) * 7  # down_w, down_b, up_w, up_b, scale, norm_w, norm_b

# op -> {variant id: build(device, dtype, m, grad) -> args}
VARIANTS = {
    "adapter_linear": {
        "split-z": lambda d, t, m, g: adapter_linear_args(d, t, m, True, g),
        "split-noz": lambda d, t, m, g: adapter_linear_args(d, t, m, False, g),
        "onepass-z": lambda d, t, m, g: adapter_linear_args(d, t, m, True, g, route="onepass"),
        "onepass-noz": lambda d, t, m, g: adapter_linear_args(d, t, m, False, g, route="onepass"),
        "dropout-z": lambda d, t, m, g: adapter_linear_args(d, t, m, True, g, dropout=0.25),
    },
    "adapter_linear_backward": {
        "needs-all": lambda d, t, m, g: adapter_linear_backward_args(d, t, m, ALL, g),
        "needs-x": lambda d, t, m, g: adapter_linear_backward_args(d, t, m, X_ONLY, g),
        "needs-adapter": lambda d, t, m, g: adapter_linear_backward_args(d, t, m, ADAPTER_ONLY, g),
        "needs-none": lambda d, t, m, g: adapter_linear_backward_args(d, t, m, NONE, g),
    },
    "mixed_adapter_linear": {
        "full-z": lambda d, t, m, g: mixed_args(d, t, m, True, g),
        "full-noz": lambda d, t, m, g: mixed_args(d, t, m, False, g),
        "lora-z": lambda d, t, m, g: mixed_args(d, t, m, True, g, lora_only=True),
        "lora-noz": lambda d, t, m, g: mixed_args(d, t, m, False, g, lora_only=True),
        "slices-z": lambda d, t, m, g: mixed_args(d, t, m, True, g, lora_only=True, slices=3),
        "slices-mapping-z": lambda d, t, m, g: mixed_args(d, t, m, True, g, lora_only=True, slices=3, mapping=True),
        "dora-scaled-z": lambda d, t, m, g: mixed_args(d, t, m, True, g, lora_only=True, col_scales=True),
    },
    "mixed_adapter_linear_backward": {
        "needs-all": lambda d, t, m, g: mixed_backward_args(d, t, m, ALL, g),
        "needs-x": lambda d, t, m, g: mixed_backward_args(d, t, m, X_ONLY, g),
        "needs-adapter": lambda d, t, m, g: mixed_backward_args(d, t, m, ADAPTER_ONLY, g),
        "lora-needs-all": lambda d, t, m, g: mixed_backward_args(d, t, m, ALL, g, lora_only=True),
        "needs-none": lambda d, t, m, g: mixed_backward_args(d, t, m, NONE, g),
        "slices-needs-all": lambda d, t, m, g: mixed_backward_args(d, t, m, ALL, g, lora_only=True, slices=3),
        "dora-scaled-needs-all": lambda d, t, m, g: mixed_backward_args(d, t, m, ALL, g, lora_only=True,
                                                                        col_scales=True),
    },
    "dora_linear": {
        "saved": lambda d, t, m, g: dora_args(d, t, m, g),
        "saved-dropout": lambda d, t, m, g: dora_args(d, t, m, g, dropout=0.25),
        "s-only": lambda d, t, m, g: dora_args(d, t, m, g, need_p=False),
        "inference-noz": lambda d, t, m, g: dora_args(d, t, m, g, need_s=False, need_p=False),
    },
    "dora_linear_backward": {
        "needs-all": lambda d, t, m, g: dora_backward_args(d, t, m, ALL[:6], g),
        "needs-x": lambda d, t, m, g: dora_backward_args(d, t, m, X_ONLY[:6], g),
        "needs-adapter": lambda d, t, m, g: dora_backward_args(d, t, m, DORA_ADAPTER, g),
        "needs-none": lambda d, t, m, g: dora_backward_args(d, t, m, NONE[:6], g),
        "dropout-needs-all": lambda d, t, m, g: dora_backward_args(d, t, m, ALL[:6], g, dropout=0.25),
    },
    "quantized_lora_linear": {
        "onepass-z": lambda d, t, m, g: quantized_args(d, t, m, True, g, route="onepass"),
        "split-noz": lambda d, t, m, g: quantized_args(d, t, m, False, g, route="split"),
        "nested-z": lambda d, t, m, g: quantized_args(d, t, m, True, g, nested=True),
        "dropout-z": lambda d, t, m, g: quantized_args(d, t, m, True, g, dropout=0.25),
    },
    "quantized_linear": {
        "plain": lambda d, t, m, g: quantized_base_args(d, t, m),
        "nested-no-bias": lambda d, t, m, g: quantized_base_args(d, t, m, nested=True, bias=False),
    },
    "quantized_lora_linear_backward": {
        "needs-all": lambda d, t, m, g: quantized_backward_args(d, t, m, ALL[:4], g),
        "needs-x": lambda d, t, m, g: quantized_backward_args(d, t, m, X_ONLY[:4], g),
        "needs-adapter": lambda d, t, m, g: quantized_backward_args(d, t, m, QUANT_ADAPTER, g),
        "needs-none": lambda d, t, m, g: quantized_backward_args(d, t, m, NONE[:4], g),
        "nested-dropout-needs-all": lambda d, t, m, g: quantized_backward_args(d, t, m, ALL[:4], g, nested=True,
                                                                               dropout=0.25),
    },
    "bottleneck_norm": {
        **{setup: (lambda s: lambda d, t, m, g: bottleneck_norm_args(d, t, m, g, s))(setup) for setup in NORM_SETUPS},
        "parallel-rms-column-scale": lambda d, t, m, g: bottleneck_norm_args(d, t, m, g, "parallel-rms",
                                                                             column_scale=True),
    },
    "bottleneck_norm_backward": {
        "needs-all": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, NORM_ALL, g),
        "needs-x": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, NORM_X, g),
        "needs-adapter": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, NORM_ADAPTER, g),
        "needs-none": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, (False,) * 11, g),
        "llama-sum-needs-all": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, NORM_ALL, g, "llama-sum"),
        "no-weight-needs-all": lambda d, t, m, g: bottleneck_norm_backward_args(d, t, m, NORM_ALL, g, "no-weight"),
    },
    "slot_metadata_update_": {
        "int32-spare": lambda d, t, m, g: slot_metadata_args(d, m, torch.int32, 3),
        "int64-exact": lambda d, t, m, g: slot_metadata_args(d, m, torch.int64, 0),
    },
    "lora_shrink_": {"slices": lambda d, t, m, g: delta_args("shrink", d, t, m, g)},
    "lora_expand_": {"slices": lambda d, t, m, g: delta_args("expand", d, t, m, g)},
    "add_lora_delta_": {
        "fused": lambda d, t, m, g: delta_args("fused", d, t, m, g),
        "two-launch": lambda d, t, m, g: delta_args("two-launch", d, t, m, g),
        "auto": lambda d, t, m, g: delta_args("auto", d, t, m, g),
    },
    "mixed_lora_embedding": {
        "ids": lambda d, t, m, g: embedding_args(d, t, m, g),
        "mapping": lambda d, t, m, g: embedding_args(d, t, m, g, mapping=True),
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def test_every_registered_op_has_cases():
    assert REGISTERED, "no op registered under torch.ops.adaptkern"
    assert set(REGISTERED) == set(VARIANTS), (f"ops without fake-vs-real cases: {set(REGISTERED) - set(VARIANTS)}; "
                                              f"cases for unregistered ops: {set(VARIANTS) - set(REGISTERED)}")


INTEGER_ONLY = ("slot_metadata_update_",)  # no float inputs: one dtype, no grad


def _cases(dtypes, rows, grads):
    for name in sorted(VARIANTS):
        for variant in VARIANTS[name]:
            for path in PATHS:
                for dt in list(dtypes)[:1] if name in INTEGER_ONLY else dtypes:
                    for m in rows:
                        for grad in grads[:1] if name in INTEGER_ONLY else grads:
                            yield pytest.param(name, variant, path, dt, m, grad,
                                               id=f"{name}-{variant}-{path}-{dt}-M{m}-{'grad' if grad else 'nograd'}")


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, strides {t.stride()}"


def _strides(t):
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def assert_fake_matches_real(label, real, fake):
    real_flat, real_spec = tree_flatten(real)
    fake_flat, fake_spec = tree_flatten(fake)
    assert real_spec == fake_spec, f"{label}: real returns {real_spec}, fake {fake_spec}"
    for i, (r, f) in enumerate(zip(real_flat, fake_flat)):
        if not isinstance(r, torch.Tensor):
            assert r == f, f"{label}: output {i}: real {r!r}, fake {f!r}"
            continue
        where = f"{label}: output {i}: real {_describe(r)} vs fake {_describe(f)}"
        assert tuple(r.shape) == tuple(f.shape), where
        assert r.dtype == f.dtype, where
        assert r.device == f.device, where
        assert _strides(r) == _strides(f), where
        assert r.is_contiguous() == f.is_contiguous(), where


def _fake_run(fn, args):
    with FakeTensorMode() as mode:
        fargs = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)
        return fn(*fargs), fargs


@pytest.mark.parametrize("name, variant, path, dt, m, grad", list(_cases(DTYPES, (M, 0), (False, True))))
def test_fake_matches_real(name, variant, path, dt, m, grad):
    fn = op(name)
    with on_path(path) as dev:
        args = VARIANTS[name][variant](dev, DTYPES[dt], m, grad)
        fake_args = tree_map(lambda a: a.clone().detach().requires_grad_(a.requires_grad)
                             if isinstance(a, torch.Tensor) else a, args)
        real = fn(*args)
        fake, fargs = _fake_run(fn, fake_args)
    label = f"adaptkern::{name} [{variant}, {path}, {dt}, M={m}]"
    assert_fake_matches_real(label, real, fake)
    if name.endswith("_"):  # a mutating op: the mutated buffers keep their metadata both ways
        assert_fake_matches_real(label + " (mutated args)", [a for a in args if isinstance(a, torch.Tensor)],
                                 [a for a in fargs if isinstance(a, torch.Tensor)])


DIFFERENTIABLE = ("adapter_linear", "mixed_adapter_linear", "dora_linear", "quantized_lora_linear",
                  "bottleneck_norm")


def _differentiable(param):
    """opcheck differentiates whatever requires grad: only where the op is meant to be differentiated. Run
    without the tensors backward reads (need_z=False; DoRA's need_s=False, "-noz") the forward ops refuse
    backward by design (callers ask for them whenever a gradient is wanted); DoRA run with need_s but not
    need_p is differentiated in everything but the magnitude, which opcheck would differentiate too; the
    backward ops have no double backward."""
    name, variant, _, _, _, grad = param.values
    return not grad or (name in DIFFERENTIABLE and not variant.endswith("-noz") and variant != "s-only")


@pytest.mark.parametrize("name, variant, path, dt, m, grad",
                         [p for p in _cases(("fp32",), (M,), (False, True)) if _differentiable(p)])
def test_opcheck(name, variant, path, dt, m, grad):
    with on_path(path) as dev:
        args = VARIANTS[name][variant](dev, DTYPES[dt], m, grad)
        torch.library.opcheck(op(name), args)
