"""Bad input gets a ValueError/TypeError naming the argument and the shapes, never a wrong answer."""

import re

import pytest
import torch

import adaptkern

K, N, R = 8, 6, 2


def _lora(**over):
    args = dict(x=torch.randn(3, K), weight=torch.randn(N, K), bias=torch.randn(N), lora_a=torch.randn(R, K),
                lora_b=torch.randn(N, R))
    kw = {k: over.pop(k) for k in ("scale", "dropout") if k in over}
    args.update(over)
    return lambda: adaptkern.lora_linear(*args.values(), **kw)


def _bottleneck(placement="sequential", **over):
    reads = N if placement == "sequential" else K
    args = dict(x=torch.randn(3, K), weight=torch.randn(N, K), bias=torch.randn(N), down_weight=torch.randn(R, reads),
                down_bias=torch.randn(R), up_weight=torch.randn(N, R), up_bias=torch.randn(N))
    kw = {k: over.pop(k) for k in ("scale", "activation") if k in over}
    args.update(over)
    return lambda: adaptkern.bottleneck_linear(*args.values(), placement=placement, **kw)


@pytest.mark.parametrize("call, exc, pattern", [
    (_lora(x=torch.randn(3, K + 1)), ValueError, r"x.*\(3, 9\).*weight.*\(6, 8\)"),
    (_lora(lora_a=torch.randn(R, K + 2)), ValueError, r"lora_a.*\(2, 10\).*weight.*\(6, 8\)"),
    (_lora(lora_b=torch.randn(N + 1, R)), ValueError, r"b_w.*\(7, 2\).*weight.*\(6, 8\)"),
    (_lora(lora_b=torch.randn(N, R + 1)), ValueError, r"rank mismatch.*\(2, 8\).*\(6, 3\)"),
    (_lora(bias=torch.randn(N + 2)), ValueError, r"bias.*\(6,\).*\(8,\)"),
    (_lora(x=torch.randint(0, 3, (3, K))), TypeError, r"x must be a floating tensor.*int64"),
    (_lora(lora_a=torch.ones(R, K, dtype=torch.bool)), TypeError, r"lora_a must be a floating tensor.*bool"),
    (_lora(weight=torch.randn(N, K, device="meta")), ValueError, r"one device.*weight is on meta"),
    (_lora(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (_lora(dropout=-0.1), ValueError, r"dropout"),
    (_lora(scale="2"), TypeError, r"scale must be a real number"),
    (_lora(scale=float("nan")), ValueError, r"scale must be finite"),
    (_lora(weight=torch.randn(N * K)), ValueError, r"weight must be 2-D"),
    (_lora(x=[1.0] * K), TypeError, r"x must be a torch.Tensor, got list"),
    (_bottleneck(down_weight=torch.randn(R, K + 3)), ValueError, r"second dim must be N.*\(2, 11\).*\(6, 8\)"),
    (_bottleneck("parallel", down_weight=torch.randn(R, N)), ValueError, r"second dim must be K.*\(2, 6\)"),
    (_bottleneck(up_weight=torch.randn(N, R + 1)), ValueError, r"rank mismatch.*\(2, 6\).*\(6, 3\)"),
    (_bottleneck(activation="tanhh"), ValueError, r"unknown activation 'tanhh'"),
    (_bottleneck(down_bias=torch.randn(R + 1)), ValueError, r"down_bias.*\(2,\).*\(3,\)"),
])
def test_bad_input_raises_with_names_and_shapes(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_unknown_placement():
    with pytest.raises(ValueError, match=r"placement must be one of.*'serial'"):
        _bottleneck("serial")()


def test_swish_alias_is_silu():
    x = torch.randn(3, K)
    args = (x, torch.randn(N, K), None, torch.randn(R, K), None, torch.randn(N, R), None)
    torch.testing.assert_close(adaptkern.adapter_linear(*args, activation="swish"),
                               adaptkern.adapter_linear(*args, activation="silu"), rtol=0, atol=0)


def test_bad_route():
    x = torch.randn(3, K)
    with pytest.raises(ValueError, match=re.escape("route must be one of")):
        adaptkern.adapter_linear(x, torch.randn(N, K), None, torch.randn(R, K), None, torch.randn(N, R), None,
                                 route="fast")
    with pytest.raises(ValueError, match=re.escape("route='onepass' supports R <= 128, got R=129")):
        adaptkern.lora_linear(x, torch.randn(N, K), None, torch.randn(129, K), torch.randn(N, 129), route="onepass")


class TestModuleErrors:
    def test_names(self):
        m = adaptkern.AdapterLinear(K, N)
        m.add_lora("a", 2)
        with pytest.raises(ValueError, match="already exists"):
            m.add_lora("a", 2)
        with pytest.raises(ValueError, match="non-empty str"):
            m.add_lora("", 2)
        with pytest.raises(ValueError, match="non-empty str"):
            m.add_bottleneck(None, 2)
        with pytest.raises(ValueError, match=r"no adapter named 'b'.*\['a'\]"):
            m.set_adapter("b")
        with pytest.raises(ValueError, match="no adapter named"):
            m.delete_adapter("b")

    def test_bad_rank_and_merge_kinds(self):
        m = adaptkern.AdapterLinear(K, N)
        with pytest.raises(ValueError, match="r must be a positive int"):
            m.add_lora("a", 0)
        m.add_bottleneck("bn", 3)
        with pytest.raises(ValueError, match="only LoRA and DoRA adapters can be merged"):
            m.merge("bn")
        with pytest.raises(ValueError, match="no adapter is merged"):
            m.unmerge()

    def test_from_linear_type(self):
        with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
            adaptkern.AdapterLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
