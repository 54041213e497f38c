"""``adaptkern.quantized``: QLoRA against the real bitsandbytes ``Linear4bit`` plus eager LoRA, and
the weight reader's errors."""

import subprocess
import sys
import types

import pytest
import torch

from adaptkern.ops.common import use_triton
from adaptkern.quantized import QuantizedWeight, qlora_linear
from adaptkern.testing import assert_close

from .helpers import count_launches

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

FWD, DX = "_quantized_lora_linear_fwd_kernel", "_quantized_lora_linear_dx_kernel"


def _linear4bit(k, n, dtype, quant_type="nf4", nested=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type=quant_type,
                            compress_statistics=nested)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=blocksize, module=lin)
    lin.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.5).to(dtype), requires_grad=False)
    return lin.to("cpu").train()


def _adapter(k, n, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, k, generator=g) * k**-0.5).to(dtype), (torch.randn(n, r, generator=g) * r**-0.5).to(dtype)


def _peft_style(lin, x, a_w, b_w, scale):
    """PEFT's QLoRA layer: the bitsandbytes base layer plus the eager adapter branch."""
    return lin(x) + scale * (x @ a_w.t()) @ b_w.t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_matches_linear4bit_plus_eager_lora(quant_type, nested, dtype, path_device):
    m, k, n, r, scale = 27, 128, 45, 8, 0.5
    lin = _linear4bit(k, n, dtype, quant_type, nested)
    a_w, b_w = _adapter(k, n, r, dtype)
    x = torch.randn(3, m // 3, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad_out = torch.randn(3, m // 3, n, generator=torch.Generator().manual_seed(3)).to(dtype)

    ins = [t.clone().requires_grad_() for t in (x, a_w, b_w)]
    eager = _peft_style(lin, *ins, scale)
    eager_g = torch.autograd.grad(eager, ins, grad_out)

    w64 = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(dtype).double()
    ins64 = [t.double().requires_grad_() for t in (x, a_w, b_w)]
    oracle = (torch.nn.functional.linear(ins64[0], w64, lin.bias.double())
              + scale * (ins64[0] @ ins64[1].t()) @ ins64[2].t())
    oracle_g = torch.autograd.grad(oracle, ins64, grad_out.double())

    mine = [t.clone().requires_grad_() for t in (x, a_w, b_w)]
    with count_launches() as launches:
        y = qlora_linear(mine[0], lin.weight, None, lin.bias, mine[1], mine[2], scale=scale)
        grads = torch.autograd.grad(y, mine, grad_out)
    if use_triton(x):
        assert launches[FWD] == 1 and launches[DX] == 1
    else:
        assert not launches
    assert y.shape == (3, m // 3, n) and y.dtype == dtype
    assert_close("y", oracle, y, eager)
    for name, g, eg, og in zip(("x", "lora_a", "lora_b"), grads, eager_g, oracle_g):
        assert_close(f"d{name}", og, g, eg)


def test_bundle_packed_tensor_and_storage_dtypes(path_device):
    """A QuantizedWeight, a packed tensor plus its QuantState and a bf16 quant_storage (as FSDP
    QLoRA stores it) give the same bits."""
    k, n, r = 64, 24, 4
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.1
    packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed_bf16, qs_bf16 = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                            quant_storage=torch.bfloat16)
    a_w, b_w = _adapter(k, n, r, torch.float32)
    x = torch.randn(10, k, generator=torch.Generator().manual_seed(4))
    ys = [qlora_linear(x, packed, qs, None, a_w, b_w),
          qlora_linear(x, QuantizedWeight.from_bnb(packed, qs), None, None, a_w, b_w),
          qlora_linear(x, packed_bf16, qs_bf16, None, a_w, b_w)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_m0_and_no_grad(path_device):
    lin = _linear4bit(64, 16, torch.float32)
    a_w, b_w = _adapter(64, 16, 2, torch.float32)
    y = qlora_linear(torch.empty(0, 64), lin.weight, None, lin.bias, a_w, b_w)
    assert y.shape == (0, 16)
    x = torch.randn(4, 64, requires_grad=True)
    y = qlora_linear(x, lin.weight, None, None, a_w, b_w)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape and bool(torch.isfinite(gx).all())


def _state_like(qs, **changes):
    """A duck-typed copy of a QuantState with some attributes changed."""
    fields = dict(absmax=qs.absmax, shape=qs.shape, blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype,
                  offset=qs.offset, state2=qs.state2, code=qs.code)
    fields.update(changes)
    return types.SimpleNamespace(**fields)


def test_errors():
    k, n = 64, 24
    packed, qs = BF.quantize_4bit(torch.randn(n, k), blocksize=64, compress_statistics=True, quant_type="nf4")
    a_w, b_w = _adapter(k, n, 4, torch.float32)
    x = torch.randn(3, k)
    unquantized = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantized yet"):
        qlora_linear(x, unquantized, None, None, a_w, b_w)
    with pytest.raises(ValueError, match="no quant state"):
        qlora_linear(x, packed, None, None, a_w, b_w)
    with pytest.raises(ValueError, match="packed bytes"):
        qlora_linear(x, packed, _state_like(qs, shape=torch.Size([n + 2, k])), None, a_w, b_w)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        qlora_linear(x, packed, _state_like(qs, shape=torch.Size([n * k])), None, a_w, b_w)
    nested2 = types.SimpleNamespace(absmax=qs.state2.absmax, code=qs.state2.code, blocksize=128)
    for bad, what in ((dict(quant_type="int4"), "quant type 'int4'"), (dict(blocksize=48), "block size 48"),
                      (dict(dtype=torch.float64), "dtype torch.float64"), (dict(state2=nested2), "nested block size"),
                      (dict(packing_format_for_cpu=True), "packing_format_for_cpu")):
        with pytest.raises(NotImplementedError, match=what):
            qlora_linear(x, packed, _state_like(qs, **bad), None, a_w, b_w)
    with pytest.raises(ValueError, match="x's last dim"):
        qlora_linear(torch.randn(3, k + 1), packed, qs, None, a_w, b_w)
    with pytest.raises(ValueError, match="lora_b"):
        qlora_linear(x, packed, qs, None, a_w, b_w[:, :3])
    with pytest.raises(ValueError, match="bias"):
        qlora_linear(x, packed, qs, torch.zeros(n + 1), a_w, b_w)
    with pytest.raises(ValueError, match="quant_state must be None"):
        qlora_linear(x, QuantizedWeight.from_bnb(packed, qs), qs, None, a_w, b_w)
    with pytest.raises(ValueError, match="dropout"):
        qlora_linear(x, packed, qs, None, a_w, b_w, dropout=1.0)


def _hand_built(nested):
    """A QuantizedWeight W [24, 64] (NF4, blocks of 64: 768 bytes, 24 blocks) as from_bnb reads it."""
    packed, qs = BF.quantize_4bit(torch.randn(24, 64, generator=torch.Generator().manual_seed(5)), blocksize=64,
                                  compress_statistics=nested, quant_type="nf4")
    return QuantizedWeight.from_bnb(packed, qs)


# (nested, the fields replaced, the error type, what its message must say)
BAD_WEIGHTS = {
    "data short by 10 bytes": (False, lambda q: dict(data=q.data[:-10]), ValueError, "data has 758 .*768 packed bytes"),
    "data empty": (False, lambda q: dict(data=q.data[:0]), ValueError, "data has 0 entries"),
    "data int8": (False, lambda q: dict(data=q.data.view(torch.int8)), TypeError, "data must be torch.uint8"),
    "data 2-D": (False, lambda q: dict(data=q.data.view(24, 32)), ValueError, r"data must be a contiguous 1-D"),
    "data strided": (False, lambda q: dict(data=torch.cat([q.data, q.data])[::2]), ValueError, "data must be a cont"),
    "data a list": (False, lambda q: dict(data=[0] * 768), TypeError, "data must be a tensor, got list"),
    "absmax short by one block": (False, lambda q: dict(absmax=q.absmax[:-1]), ValueError,
                                  "absmax has 23 entries; shape .24, 64. in blocks of 64 needs 24"),
    "absmax empty": (False, lambda q: dict(absmax=q.absmax[:0]), ValueError, "absmax has 0 entries"),
    "absmax float16": (False, lambda q: dict(absmax=q.absmax.half()), TypeError, "absmax must be torch.float32"),
    "code 8 entries": (False, lambda q: dict(code=q.code[:8]), TypeError, r"code must be a floating tensor \[16\]"),
    "dtype int8": (False, lambda q: dict(dtype=torch.int8), NotImplementedError, "dtype torch.int8"),
    "dtype a string": (False, lambda q: dict(dtype="bfloat16"), TypeError, "dtype must be a torch.dtype"),
    "shape 3-D": (False, lambda q: dict(shape=(1, 24, 64)), ValueError, r"shape must be \[N, K\].*\(1, 24, 64\)"),
    "shape K = 0": (False, lambda q: dict(shape=(24, 0)), ValueError, r"shape must be \[N, K\]"),
    "block size 48": (False, lambda q: dict(blocksize=48), NotImplementedError, "block size 48"),
    "quant type int4": (False, lambda q: dict(quant_type="int4"), NotImplementedError, "quant type 'int4'"),
    "nested without offset": (True, lambda q: dict(offset=None), ValueError,
                              "offset go together.*got nested_absmax, nested_code only"),
    "nested absmax float32": (True, lambda q: dict(absmax=q.absmax.float()), NotImplementedError, "absmax stored as"),
    "nested_absmax short": (True, lambda q: dict(nested_absmax=q.nested_absmax[:0]), ValueError,
                            "nested_absmax has 0 entries; 24 blocks"),
    "nested_code short": (True, lambda q: dict(nested_code=q.nested_code[:255]), ValueError, "nested_code has 255"),
}


@pytest.mark.parametrize("function", ["qlora_linear", "mixed_qlora_linear"])
@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_a_quantized_weight_passed_directly_is_checked_as_from_bnb_checks(case, function):
    """A hand-built QuantizedWeight gets from_bnb's checks (the same function) before anything runs: a short
    data or absmax would have the kernels read out of bounds, a wrong dtype or shape fail unnamed."""
    from adaptkern.quantized import mixed_qlora_linear

    nested, change, error, match = BAD_WEIGHTS[case]
    good = _hand_built(nested)
    bad = good._replace(**change(good))
    x, (a_w, b_w) = torch.randn(3, 64), _adapter(64, 24, 4, torch.float32)
    with count_launches() as launches, pytest.raises(error, match=f"^QuantizedWeight.*{match}"):
        if function == "qlora_linear":
            qlora_linear(x, bad, None, None, a_w, b_w)
        else:
            mixed_qlora_linear(x, bad, None, None, a_w[None], b_w[None], torch.zeros(3, dtype=torch.int64))
    assert not launches
    y = qlora_linear(x, good, None, None, a_w, b_w)  # the weight it came from runs
    assert y.shape == (3, 24) and bool(torch.isfinite(y).all())


def test_import_adaptkern_does_not_import_bitsandbytes():
    code = "import sys, adaptkern, adaptkern.quantized; assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
