"""``AdapterLinear`` edge cases that once went wrong: stale sequential folds, merging, merged state
dicts, which adapter is active, argument checks, adapter_ids as lists.

Outputs are compared with a float64 eager oracle built from the layer's current parameters.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import adaptkern
from adaptkern.ops.adapter_linear import reference
from adaptkern.testing import assert_close

K, N, R = 37, 29, 4


def _eager(m, x, name, dtype=torch.float64):
    """The layer with adapter ``name`` (None: base) active, as PEFT/AdapterHub compute it, in ``dtype``."""
    c = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    x, w, b = c(x), c(m.weight), c(m.bias)
    if name is None:
        return F.linear(x, w, b)
    a = m.adapters[name]
    if a.kind == "lora":
        return reference.lora_linear_ref(x, w, b, c(a.lora_A), c(a.lora_B), a.scale)
    return reference.bottleneck_linear_ref(x, w, b, c(a.down_weight), c(a.down_bias), c(a.up_weight), c(a.up_bias),
                                           a.scale, a.activation, a.placement)


def _assert_matches(what, m, x, name, y):
    assert_close(what, _eager(m, x, name), y.detach(), _eager(m, x, name, x.dtype))


def _layer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = adaptkern.AdapterLinear(K, N, dtype=dtype)
    seq = m.add_bottleneck("seq", R, activation="gelu", placement="sequential", scale=0.8)
    torch.nn.init.normal_(seq.up_weight, std=0.3)
    torch.nn.init.normal_(seq.up_bias, std=0.3)
    lora = m.add_lora("lora", r=3, alpha=6)
    torch.nn.init.normal_(lora.lora_B, std=0.3)
    return m.eval()


# -- a .data write between two no-grad forwards never meets a stale sequential fold ------------

DATA_WRITES = {
    "weight.copy_": lambda m, a: m.weight.data.copy_(torch.randn_like(m.weight) * K**-0.5),
    "weight.mul_": lambda m, a: m.weight.data.mul_(2.0),
    "bias.copy_": lambda m, a: m.bias.data.copy_(torch.randn_like(m.bias)),
    "bias.add_": lambda m, a: m.bias.data.add_(1.0),
    "down_weight.copy_": lambda m, a: a.down_weight.data.copy_(torch.randn_like(a.down_weight)),
    "down_weight.mul_": lambda m, a: a.down_weight.data.mul_(2.0),
    "down_bias.copy_": lambda m, a: a.down_bias.data.copy_(torch.randn_like(a.down_bias)),
    "down_bias.mul_": lambda m, a: a.down_bias.data.mul_(-3.0),
}


@pytest.mark.parametrize("write", list(DATA_WRITES))
@pytest.mark.parametrize("rows", [3, 8 * R], ids=["decode_M<8R", "prefill_M>=8R"])
def test_sequential_forward_sees_data_writes(write, rows):
    """Both regimes (unfolded below 8·R rows, folded per call at or above) follow a ``.data``
    write, which changes neither ``_version`` nor ``data_ptr``."""
    m = _layer()
    m.set_adapter("seq")
    x = torch.randn(rows, K)
    with torch.no_grad():
        _assert_matches("before", m, x, "seq", m(x))
        DATA_WRITES[write](m, m.adapters["seq"])
        _assert_matches(f"after {write}", m, x, "seq", m(x))


@pytest.mark.parametrize("write", ["weight.copy_", "down_weight.mul_", "bias.add_", "down_bias.copy_"])
def test_mixed_batch_sequential_slot_sees_data_writes(write):
    m = _layer()
    x = torch.randn(5, K)
    ids = torch.tensor([0, 1, -1, 0, 1])
    names = [None, *m.adapters]  # id -1 -> base
    with torch.no_grad():
        for when in ("before", f"after {write}"):
            y = m(x, ids)
            for i, s in enumerate(ids.tolist()):
                _assert_matches(f"{when}: row {i}", m, x[i:i + 1], names[s + 1], y[i:i + 1])
            DATA_WRITES[write](m, m.adapters["seq"])


# -- set_adapter while merged unmerges first (as PEFT), with a warning --------------------------

@pytest.mark.parametrize("target", [None, "seq"])
def test_set_adapter_while_merged_unmerges_with_warning(target):
    m = _layer()
    m.set_adapter("lora")
    x = torch.randn(6, K)
    m.merge("lora")
    with pytest.warns(UserWarning, match="unmerging"):
        m.set_adapter(target)
    assert m.merged_adapter is None and m.active_adapter == target
    with torch.no_grad():
        _assert_matches(f"after set_adapter({target!r})", m, x, target, m(x))


def test_set_adapter_to_the_merged_adapter_keeps_it_merged():
    m = _layer()
    m.set_adapter("seq")
    m.merge("lora")
    assert m.active_adapter == "lora"  # merge makes the merged adapter the active one
    w = m.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.set_adapter("lora")
    assert m.merged_adapter == "lora" and torch.equal(m.weight, w)


# -- merge precision and safe merge -------------------------------------------------------------

def test_float64_merge_and_unmerge_stay_float64():
    m = _layer(torch.float64)
    w0 = m.weight.detach().clone()
    a = m.adapters["lora"]
    delta = a.scale * (a.lora_B.detach() @ a.lora_A.detach())
    m.merge("lora")
    torch.testing.assert_close(m.weight.detach(), w0 + delta, rtol=0, atol=1e-15)  # fp32 would be ~1e-8 off
    m.unmerge()
    torch.testing.assert_close(m.weight.detach(), w0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype,poison", [(torch.float32, float("nan")), (torch.float32, 1e30),
                                          (torch.float16, 300.0)], ids=["fp32-nan", "fp32-inf", "fp16-overflow"])
def test_merge_refuses_non_finite_and_changes_nothing(dtype, poison):
    """A NaN in B, a product overflowing fp32, and a Δ finite in fp32 but past fp16's max after the cast."""
    m = _layer(dtype)
    m.set_adapter("lora")
    a = m.adapters["lora"]
    with torch.no_grad():
        a.lora_A.fill_(1.0 if math.isnan(poison) else poison)
        a.lora_B.fill_(poison)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.merge("lora")
    assert m.merged_adapter is None and m.active_adapter == "lora"
    torch.testing.assert_close(m.state_dict(), before, rtol=0, atol=0, equal_nan=True)


# -- a merged layer's state dict loads correctly ------------------------------------------------

def test_merged_state_dict_round_trip():
    m = _layer()
    m.set_adapter("lora")
    x = torch.randn(6, K)
    m.merge("lora")
    with torch.no_grad():
        y_merged = m(x)
    w_merged = m.weight.detach().clone()
    sd = m.state_dict()
    assert m.merged_adapter == "lora" and torch.equal(m.weight, w_merged)  # state_dict() changed nothing
    with torch.no_grad():
        assert torch.equal(m(x), y_merged)
    unmerged = copy.deepcopy(m)
    unmerged.unmerge()
    assert torch.equal(sd["weight"], unmerged.weight)  # exactly what unmerge() restores

    fresh = adaptkern.AdapterLinear(K, N)
    fresh.add_bottleneck("seq", R, activation="gelu", placement="sequential", scale=0.8)
    fresh.add_lora("lora", r=3, alpha=6)
    fresh.set_adapter("lora")
    fresh.load_state_dict(sd)
    with torch.no_grad():
        _assert_matches("merged layer", unmerged, x, "lora", y_merged)
        _assert_matches("fresh layer", unmerged, x, "lora", fresh(x))


def test_load_state_dict_into_merged_layer_unmerges():
    src = _layer(seed=1)
    src.set_adapter("lora")
    m = _layer()
    m.merge("lora")
    m.load_state_dict(src.state_dict())
    assert m.merged_adapter is None and m.active_adapter == "lora"
    x = torch.randn(4, K)
    with torch.no_grad():
        _assert_matches("loaded", src, x, "lora", m(x))


def test_merged_conv1d_state_dict_keeps_conv1d_layout():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from adaptkern.integrations.patching import Conv1DAdapter

    torch.manual_seed(0)
    m = Conv1DAdapter.from_conv1d(Conv1D(N, K))
    torch.nn.init.normal_(m.add_lora("lora", r=3, alpha=6).lora_B, std=0.3)
    w0 = m._parameters["weight"].detach().clone()  # [K, N]
    m.merge("lora")
    sd = m.state_dict()
    assert sd["weight"].shape == (K, N)
    torch.testing.assert_close(sd["weight"], w0, rtol=0, atol=1e-6)


# -- adding an adapter does not change which one is active -------------------------------------

def test_adding_adapters_keeps_the_active_one():
    m = adaptkern.AdapterLinear(K, N)
    m.add_lora("a", r=2)
    assert m.active_adapter == "a"  # a layer with none active activates the first added adapter
    m.add_lora("b", r=2)
    m.add_bottleneck("c", 3)
    assert m.active_adapter == "a"
    m.set_adapter(None)
    m.add_lora("d", r=2)
    assert m.active_adapter == "d"


# -- argument checks before any change; PEFT spellings; adapter_ids lists and devices ----------

BAD_ARGS = [
    (lambda m: m.add_lora("x", r=2, alpha=float("nan")), ValueError, "alpha"),
    (lambda m: m.add_lora("x", r=2, alpha="x"), TypeError, "alpha"),
    (lambda m: m.add_lora("x", r=2, dropout=None), TypeError, "dropout"),
    (lambda m: m.add_lora("x", r=2.0), TypeError, "r must"),
    (lambda m: m.add_lora("x", r=True), TypeError, "r must"),
    (lambda m: m.add_lora("x", r=2, lora_alpha=float("inf")), ValueError, "lora_alpha"),
    (lambda m: m.add_lora("x", r=2, lora_dropout=1.5), ValueError, "lora_dropout"),
    (lambda m: m.add_lora("x", r=2, alpha=4, lora_alpha=4), TypeError, "not both"),
    (lambda m: m.add_lora("x", r=2, dropout=0.1, lora_dropout=0.1), TypeError, "not both"),
    (lambda m: m.add_bottleneck("x", 3, scale=float("inf")), ValueError, "scale"),
    (lambda m: m.add_bottleneck("x", 3, scale=1e39), ValueError, "scale"),
    (lambda m: m.add_bottleneck("x", 3, scale="1"), TypeError, "scale"),
    (lambda m: m.add_bottleneck("x", 2.5), TypeError, "rank"),
]


@pytest.mark.parametrize("call,error,match", BAD_ARGS)
def test_bad_adapter_arguments_raise_before_any_change(call, error, match):
    m = _layer()
    m.set_adapter("lora")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        call(m)
    assert list(m.adapters) == ["seq", "lora"] and m.active_adapter == "lora"
    torch.testing.assert_close(m.state_dict(), before, rtol=0, atol=0)


def test_peft_argument_spellings():
    m = adaptkern.AdapterLinear(K, N)
    a = m.add_lora("p", r=4, lora_alpha=8, lora_dropout=0.1)
    assert (a.alpha, a.dropout, a.scale) == (8.0, 0.1, 2.0)


def test_adapter_ids_as_list():
    m = _layer()
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        want = m(x, torch.tensor([1, -1, 0]))
        assert torch.equal(m(x, [1, -1, 0]), want)  # one id per sequence
        assert torch.equal(m(x, [[1] * 5, [-1] * 5, [0] * 5]), want)  # one per token, shaped like x's rows
        assert torch.equal(m(x.reshape(15, K), [1] * 5 + [-1] * 5 + [0] * 5), want.reshape(15, N))


def test_adapter_ids_on_another_device_raise_naming_both():
    m = _layer()
    with pytest.raises(ValueError, match=r"adapter_ids.*device.*cpu.*meta"):
        m(torch.randn(3, 5, K), torch.tensor([1, -1, 0], device="meta"))
