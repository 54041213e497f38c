"""``AdapterLinear`` with DoRA adapters (``add_lora(use_dora=True)``) and over a bitsandbytes 4-bit base
(``from_linear(Linear4bit)``): outputs and gradients against float64, PEFT's DoRA layer and ``Linear4bit`` plus
eager LoRA; DoRA merge/unmerge; the state dict; every refusal."""

import copy

import pytest
import torch
from torch import nn

from adaptkern.adapters import DoraAdapter
from adaptkern.nn import AdapterLinear, adapter_batch
from adaptkern.ops.common import use_triton
from adaptkern.ops.dora_linear import reference
from adaptkern.pool import AdapterPool
from adaptkern.testing import assert_close

from .helpers import count_launches

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

K, N, R, ALPHA = 24, 20, 4, 6


def _dora_layer(dtype=torch.float32, *, bias=True, seed=0):
    """An AdapterLinear with DoRA adapter "a" trained-looking: B non-zero, m ~10 % off ‖W‖_row."""
    torch.manual_seed(seed)
    layer = AdapterLinear.from_linear(nn.Linear(K, N, bias=bias).to(dtype))
    ad = layer.add_lora("a", R, alpha=ALPHA, use_dora=True)
    with torch.no_grad():
        ad.lora_B.normal_(std=0.3)
        ad.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.randn(N).to(dtype))
    return layer, ad


def _dora_ref(layer, ad, x):
    """PEFT's DoRA formula (adaptkern's reference op) on the layer's tensors in x's dtype."""
    cast = [None if t is None else t.to(x.dtype) for t in (layer.weight, layer.bias, ad.lora_A, ad.lora_B,
                                                             ad.lora_magnitude_vector)]
    return reference.dora_linear_ref(x, *cast, ad.scale)


def _grads_of(fn, x, params, gy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return y.detach(), torch.autograd.grad(y, [x, *params], gy)


NAMES = ("x", "lora_A", "lora_B", "lora_magnitude_vector")


def _dora_run(layer, x, gy, *, ref=False):
    """(y, grads of x, A, B, m): the layer's forward, or (``ref``) the reference formula on its tensors."""
    ad = layer.adapters["a"]
    fn = (lambda t: _dora_ref(layer, ad, t)) if ref else layer
    return _grads_of(fn, x, [getattr(ad, n) for n in NAMES[1:]], gy)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_module_matches_float64_outputs_and_gradients(dtype, path_device):
    layer, _ = _dora_layer(dtype)
    x = torch.randn(2, 7, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    gy = torch.randn(2, 7, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    want, want_g = _dora_run(copy.deepcopy(layer).double(), x.double(), gy.double(), ref=True)
    eager, eager_g = _dora_run(copy.deepcopy(layer), x, gy, ref=True)
    layer = layer.to(path_device)
    with count_launches() as launches:
        y, grads = _dora_run(layer, x.to(path_device), gy.to(path_device))
    assert y.shape == (2, 7, N) and y.dtype == dtype
    assert_close("y", want, y.cpu(), eager)
    for name, g, wg, eg in zip(NAMES, grads, want_g, eager_g):
        assert g.dtype == dtype
        assert_close(f"d{name}", wg, g.cpu(), eg)
    fused = use_triton(x.to(path_device))
    # forward: norm, shrink, main GEMM; backward: dZ, dX, dA, dB and the magnitude's column sum
    assert (launches["_dora_linear_norm_kernel"], launches["_dual_gemm_kernel"],
            launches["_dora_linear_colsum_kernel"]) == ((1, 6, 1) if fused else (0, 0, 0)), dict(launches)


def test_new_dora_adapter_starts_at_the_row_norm_and_changes_nothing():
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    layer = AdapterLinear.from_linear(copy.deepcopy(base))
    ad = layer.add_lora("a", R, use_dora=True)
    assert isinstance(ad, DoraAdapter) and ad.kind == "dora" and ad.lora_magnitude_vector.requires_grad
    assert ad.lora_magnitude_vector.shape == (N,) and ad.lora_magnitude_vector.dtype == base.weight.dtype
    assert_close("m", torch.linalg.norm(base.weight.double(), dim=1), ad.lora_magnitude_vector.detach())
    x = torch.randn(5, K)
    assert_close("y", copy.deepcopy(base).double()(x.double()), layer(x).detach(), base(x).detach())


def test_dora_dropout_only_in_training():
    layer, ad = _dora_layer()
    ad.dropout = 0.5
    x = torch.randn(6, K)
    layer.eval()
    y_eval = layer(x)
    oracle = copy.deepcopy(layer).double()
    assert_close("y", _dora_ref(oracle, oracle.adapters["a"], x.double()), y_eval.detach(),
                 _dora_ref(layer, ad, x).detach())
    layer.train()
    torch.manual_seed(1)
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2) and not torch.equal(y1, y_eval)


# -- against PEFT's DoRA layer ------------------------------------------------------------------------------------

def _peft_dora(dtype, seed=0):
    """PEFT's DoRA layer on a one-linear model (trained-looking B and m) and an AdapterLinear holding the same
    tensors (its adapter named "default", as PEFT's)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(K, N))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"],
                                                                   use_dora=True, init_lora_weights=False))
    pm = pm.to(dtype)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.1 * torch.randn(N).to(dtype))
    ours = AdapterLinear.from_linear(copy.deepcopy(layer.get_base_layer()))
    ad = ours.add_lora("default", R, alpha=ALPHA, use_dora=True)
    with torch.no_grad():
        ad.lora_A.copy_(layer.lora_A["default"].weight)
        ad.lora_B.copy_(layer.lora_B["default"].weight)
        ad.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    return pm, layer, ours


def _peft_params(layer):
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight]


def _our_params(ours):
    ad = ours.adapters["default"]
    return [ad.lora_A, ad.lora_B, ad.lora_magnitude_vector]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_matches_peft_dora_layer(dtype, device):
    """Outputs and gradients of x, A, B and m against PEFT ``use_dora=True`` (PEFT in float64 the oracle, PEFT
    in ``dtype`` the eager error), on the fused kernels."""
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(3, 5, N, generator=torch.Generator().manual_seed(2))
    runs = []
    for dt in (torch.float64, dtype):
        pm, layer, _ = _peft_dora(dt)
        runs.append(_grads_of(pm, x.to(dt), _peft_params(layer), gy.to(dt)))
    (want, want_g), (eager, eager_g) = runs
    _, _, ours = _peft_dora(dtype)
    ours = ours.to(device)
    with count_launches() as launches:
        y, grads = _grads_of(ours, x.to(dtype).to(device), _our_params(ours), gy.to(dtype).to(device))
    if use_triton(x.to(device)):
        assert launches["_dora_linear_norm_kernel"] == 1 and launches["_dora_linear_colsum_kernel"] == 1
    assert_close("y", want, y.cpu(), eager)
    for name, g, wg, eg in zip(("x", "lora_A", "lora_B", "magnitude"), grads, want_g, eager_g):
        assert_close(f"d{name}", wg, g.cpu(), eg)


def test_dora_initial_magnitude_equals_peft():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(K, N))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"],
                                                                   use_dora=True))
    ours = AdapterLinear.from_linear(copy.deepcopy(model[0]))
    ad = ours.add_lora("default", R, alpha=ALPHA, use_dora=True)
    want = pm.base_model.model[0].lora_magnitude_vector["default"].weight
    assert_close("m", torch.linalg.norm(model[0].weight.double(), dim=1), ad.lora_magnitude_vector.detach(), want)


def test_peft_state_dict_keys_map_onto_ours():
    """PEFT's saved keys ``base_model.model.<path>.lora_{A,B}.weight`` / ``.lora_magnitude_vector`` map one to
    one onto ``<path>.adapters.<name>.lora_A`` / ``lora_B`` / ``lora_magnitude_vector``."""
    pm, layer, _ = _peft_dora(torch.float32)
    saved = peft.get_peft_model_state_dict(pm)
    prefix = "base_model.model.0."
    assert set(saved) == {prefix + "lora_A.weight", prefix + "lora_B.weight", prefix + "lora_magnitude_vector"}
    model = nn.Sequential(AdapterLinear.from_linear(copy.deepcopy(layer.get_base_layer())))
    model[0].add_lora("default", R, alpha=ALPHA, use_dora=True)
    ours = model.state_dict()
    renamed = {"0.adapters.default." + k[len(prefix):].removesuffix(".weight"): v for k, v in saved.items()}
    assert all(ours[k].shape == v.shape for k, v in renamed.items())
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and set(missing) == {"0.weight", "0.bias"}
    x = torch.randn(4, K)
    pm.eval()
    assert_close("y", pm.double()(x.double()), model(x).detach(), pm.float()(x).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_merge_unmerge_round_trip_as_peft(dtype):
    pm, layer, ours = _peft_dora(dtype)
    w0 = ours.weight.detach().clone()
    x = torch.randn(6, K).to(dtype)
    unmerged = ours(x).detach()
    ours.merge("default")
    assert ours.merged_adapter == "default" and ours.active_adapter == "default"
    pm64 = copy.deepcopy(pm).double()
    pm64.merge_adapter()
    pm.merge_adapter()  # PEFT's merged W in dtype: the eager error of ours
    want = pm64.base_model.model[0].get_base_layer().weight.detach()
    assert_close("merged W", want, ours.weight.detach(), pm.base_model.model[0].get_base_layer().weight.detach())
    assert_close("y merged", pm64(x.double()).detach(), ours(x).detach(), unmerged)
    sd = ours.state_dict()
    ours.unmerge()
    assert torch.equal(sd["weight"], ours.weight)  # the state dict holds W unmerged, as unmerge restores it
    pm.unmerge_adapter()
    assert ours.merged_adapter is None
    assert_close("W after unmerge", w0.double(), ours.weight.detach(), pm.base_model.model[0].get_base_layer().weight)
    oracle = copy.deepcopy(ours).double()
    assert_close("y unmerged", _dora_ref(oracle, oracle.adapters["default"], x.double()), ours(x).detach(), unmerged)


def test_dora_load_state_dict_into_a_merged_layer_unmerges_first():
    layer, ad = _dora_layer()
    sd = copy.deepcopy(layer.state_dict())
    assert sd["adapters.a.lora_magnitude_vector"].shape == (N,)
    layer.merge("a")
    layer.load_state_dict(sd)
    assert layer.merged_adapter is None
    assert_close("W", sd["weight"].double(), layer.weight.detach())


def test_dora_merge_refusals_leave_the_layer_untouched():
    layer, ad = _dora_layer()
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        ad.lora_magnitude_vector[3] = 0.0
    with pytest.raises(ValueError, match="magnitude / norm = 0 in 1 rows"):
        layer.merge("a")
    with torch.no_grad():
        ad.lora_magnitude_vector[3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge("a")
    assert torch.equal(layer.weight, w0) and layer.merged_adapter is None


def test_dora_mixed_batches_run_without_grad_and_refuse_training():
    layer, _ = _dora_layer()
    layer.add_lora("plain", 2)
    x = torch.randn(4, K)
    with pytest.raises(NotImplementedError, match=r"DoRA adapters \(\['a'\]\)"):
        layer(x, adapter_ids=[0, 1, -1, 1])
    with torch.no_grad():
        assert layer(x, adapter_ids=[0, 1, -1, 1]).shape == (4, layer.out_features)
    with pytest.raises(TypeError, match="use_dora"):
        layer.add_lora("b", 2, use_dora="yes")


# -- over a bitsandbytes 4-bit base -------------------------------------------------------------------------------

def _linear4bit(dtype, *, k=64, n=40, quant_type="nf4", nested=True, compute_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=compute_dtype or dtype, quant_type=quant_type,
                            compress_statistics=nested)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=64, module=lin)
    lin.bias = nn.Parameter((torch.randn(n, generator=g) * 0.5).to(dtype), requires_grad=False)
    lin = lin.to("cpu")
    lin.support_avx512bf16_for_cpu = False  # no CPU repacking of the shared weight in eval
    return lin


def _qlora_layer(lin, r=8, alpha=4.0):
    layer = AdapterLinear.from_linear(lin)
    ad = layer.add_lora("a", r, alpha=alpha)
    with torch.no_grad():
        ad.lora_B.normal_(std=r**-0.5, generator=torch.Generator().manual_seed(3))
    return layer, ad


def test_from_linear4bit_shares_the_quantized_weight():
    lin = _linear4bit(torch.bfloat16)
    layer, ad = _qlora_layer(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias and layer.weight.dtype == torch.uint8
    assert ad.lora_A.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    sd, want = layer.state_dict(), lin.state_dict()
    assert set(want) | {"adapters.a.lora_A", "adapters.a.lora_B"} == set(sd)
    assert all(torch.equal(sd[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))
    assert "4-bit base" in repr(layer)


@pytest.mark.parametrize("dtype, quant_type, nested", [(torch.bfloat16, "nf4", True), (torch.float32, "fp4", False),
                                                       (torch.float16, "nf4", False)], ids=str)
def test_qlora_module_matches_linear4bit_plus_eager_lora(dtype, quant_type, nested, path_device):
    lin = _linear4bit(dtype, quant_type=quant_type, nested=nested)
    layer, ad = _qlora_layer(lin)
    x = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    gy = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    params = [ad.lora_A, ad.lora_B]
    with count_launches() as launches:
        y, grads = _grads_of(layer, x.to(path_device), params, gy.to(path_device))
    eager_params = [p.detach().clone().requires_grad_() for p in params]
    eager, eager_g = _grads_of(lambda t: lin(t) + ad.scale * (t @ eager_params[0].t()) @ eager_params[1].t(),
                               x, eager_params, gy)
    w64 = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(dtype).double()
    p64 = [p.detach().double().requires_grad_() for p in params]
    want, want_g = _grads_of(lambda t: nn.functional.linear(t, w64, lin.bias.double())
                             + ad.scale * (t @ p64[0].t()) @ p64[1].t(), x.double(), p64, gy.double())
    assert y.dtype == dtype and y.shape == (3, 9, 40)
    assert_close("y", want, y.cpu(), eager)
    for name, g, wg, eg in zip(("x", "lora_A", "lora_B"), grads, want_g, eager_g):
        assert_close(f"d{name}", wg, g.cpu(), eg)
    fused = use_triton(x.to(path_device))
    assert (launches["_quantized_lora_linear_fwd_kernel"], launches["_quantized_lora_linear_dx_kernel"]) == \
        ((1, 1) if fused else (0, 0)), dict(launches)


def test_qlora_compute_dtype_and_base_only_follow_linear4bit():
    """fp32 weights with compute_dtype bf16: x is cast to bf16 and y back to x's dtype, as Linear4bit; the base
    alone (no active adapter) gives Linear4bit's output."""
    lin = _linear4bit(torch.float32, compute_dtype=torch.bfloat16)
    layer, ad = _qlora_layer(lin)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    xb = x.to(torch.bfloat16)
    eager = (lin(x).to(torch.bfloat16) + ad.scale * (xb @ ad.lora_A.to(torch.bfloat16).t())
             @ ad.lora_B.to(torch.bfloat16).t()).float()
    w64 = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(torch.bfloat16).double()
    want = (nn.functional.linear(xb.double(), w64, lin.bias.to(torch.bfloat16).double())
            + ad.scale * (xb.double() @ ad.lora_A.to(torch.bfloat16).double().t())
            @ ad.lora_B.to(torch.bfloat16).double().t())
    assert y.dtype == torch.float32
    assert_close("y", want, y.detach(), eager.detach())
    layer.set_adapter(None)
    assert_close("base", nn.functional.linear(xb.double(), w64, lin.bias.to(torch.bfloat16).double()),
                 layer(x).detach(), lin(x).detach())


def test_qlora_dropout_only_in_training():
    lin = _linear4bit(torch.float32)
    layer, ad = _qlora_layer(lin)
    ad.dropout = 0.5
    x = torch.randn(4, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_four_bit_refusals_name_the_combination():
    lin = _linear4bit(torch.float32)
    layer, _ = _qlora_layer(lin)
    x = torch.randn(4, 64)
    for call, match in [
        (lambda: layer.add_lora("d", 2, use_dora=True), "DoRA .*QDoRA.* 4-bit"),
        (lambda: layer.add_bottleneck("b", 2), "bottleneck adapter on a 4-bit"),
        (lambda: layer.merge("a"), "merging on a 4-bit"),
        (lambda: layer(x, adapter_ids=[0, 0, -1, 0]), "mixed-adapter batches on a 4-bit"),
        (lambda: layer.serving(AdapterPool(64, 40, 1, 2), torch.zeros(4, dtype=torch.int32)).__enter__(),
         "mixed-adapter batches on a 4-bit"),
    ]:
        with pytest.raises(NotImplementedError, match=match):
            call()
    with pytest.raises(NotImplementedError, match="mixed-adapter batches on a 4-bit"):
        with adapter_batch(nn.Sequential(layer), ["a"]):
            pass
    assert list(layer.adapters) == ["a"] and layer.merged_adapter is None and layer._batch_pool is None


def test_four_bit_weight_not_quantized_or_int8_is_refused():
    lin = bnb.nn.Linear4bit(64, 40, compute_dtype=torch.float32, quant_type="nf4")  # never moved: not quantized
    layer = AdapterLinear.from_linear(lin)
    layer.add_lora("a", 2)
    with pytest.raises(ValueError, match="not quantized yet"):
        layer(torch.randn(2, 64))
    int8 = nn.Linear(8, 4)
    int8.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError, match="torch.int8 weight"):
        AdapterLinear.from_linear(int8)
