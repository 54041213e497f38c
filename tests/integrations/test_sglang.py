"""The SGLang LoRA backend against a float64 re-derivation of SGLang's semantics, in SGLang's layouts
(A slices packed at each adapter's actual rank, B slices by output offset, per-slot ranks and
scalings, rank 0 a no-op), on both paths. SGLang does not install on these CPU machines (it pins
CUDA builds), so its LoRA layers, quant methods, registry and CLI choices are stand-ins shaped like
SGLang's."""

import argparse
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from adaptkern.integrations.sglang import BACKEND_NAME, AdaptkernLoRABackend, register
from adaptkern.ops import config
from adaptkern.testing import assert_close
from tests.helpers import count_launches

S, R, K = 3, 4, 20
RANKS = [4, 0, 2]  # slot 1: no adapter (rank 0)
SCALINGS = [0.5, 3.0, 2.0]


def _batch(lens, extend=True):
    mode = types.SimpleNamespace(is_extend=lambda: extend)
    return types.SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=lens, batch_size=len(lens))


def _backend(device, weight_indices=(0, 1, 2, 0), lens=(2, 1, 3, 1)):
    be = AdaptkernLoRABackend(S, device)
    be.prepare_lora_batch(_batch(list(lens)), list(weight_indices), RANKS, SCALINGS)
    tokens = [w for w, n in zip(weight_indices, lens) for _ in range(n)]
    return be, tokens


def _packed_a(c, seed):
    """SGLang's A buffer [S, c·R, K]: slot l's slice j at rows [j·r_l, (j+1)·r_l), garbage beyond."""
    return torch.randn(S, c * R, K, generator=torch.Generator().manual_seed(seed)) / 3


def _reference(x, a, b, tokens, offsets, base, dtype=torch.float64):
    """SGLang's semantics, plain PyTorch in ``dtype`` (float64: the oracle)."""
    out = base.to(dtype).clone()
    for t, slot in enumerate(tokens):
        r = RANKS[slot]
        for j in range(len(offsets) - 1):
            a_j = a[slot, j * r:(j + 1) * r].to(dtype)
            b_j = b[slot, offsets[j]:offsets[j + 1], :r].to(dtype)
            out[t, offsets[j]:offsets[j + 1]] += SCALINGS[slot] * (x[t].to(dtype) @ a_j.t()) @ b_j.t()
    return out


def test_qkv_and_gate_up(path_device):
    be, tokens = _backend(path_device)
    x = torch.randn(len(tokens), K, generator=torch.Generator().manual_seed(1))
    offsets = [0, 16, 24, 32]  # GQA: q 16, k 8, v 8
    a = _packed_a(3, 2)
    b = torch.randn(S, 32, R, generator=torch.Generator().manual_seed(3)) / 3
    base = torch.randn(len(tokens), 32, generator=torch.Generator().manual_seed(4))
    dev = lambda t: t.to(path_device)  # noqa: E731
    y = be.run_qkv_lora(dev(x), dev(a), dev(b), dev(torch.tensor(offsets)), torch.tensor(offsets), 16,
                        base_output=dev(base.clone()))
    want = _reference(x, a, b, tokens, offsets, base)
    assert_close("qkv", want, y.cpu(), want.float())
    assert torch.equal(y.cpu()[2], base[2])  # slot 1 has rank 0: a no-op
    a2 = _packed_a(2, 5)
    b2 = torch.randn(S, 24, R, generator=torch.Generator().manual_seed(6)) / 3
    y = be.run_gate_up_lora(dev(x), dev(a2), dev(b2))
    want = _reference(x, a2, b2, tokens, [0, 12, 24], torch.zeros(len(tokens), 24))
    assert_close("gate_up", want, y.cpu(), want.float())


def test_lora_a_then_b(path_device):
    be, tokens = _backend(path_device, weight_indices=(2, 0), lens=(1, 2))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    a = _packed_a(1, 8)
    b = torch.randn(S, 10, R, generator=torch.Generator().manual_seed(9)) / 3
    mid = be.run_lora_a_sgemm(x.to(path_device), a.to(path_device))
    want_mid = torch.zeros(3, R, dtype=torch.float64)
    for t, slot in enumerate(tokens):
        want_mid[t, :RANKS[slot]] = SCALINGS[slot] * x[t].double() @ a[slot, :RANKS[slot]].double().t()
    assert_close("lora_a", want_mid, mid.cpu())
    y = be.run_lora_b_sgemm(mid, b.to(path_device))
    assert_close("lora_b", _reference(x, a, b, tokens, [0, 10], torch.zeros(3, 10)), y.cpu())


def test_decode_batch_and_graph_mapping():
    be = AdaptkernLoRABackend(S, "cpu")
    be.init_cuda_graph_batch_info(max_bs_in_cuda_graph=8)
    buffers = be.graph_mapping.slots.data_ptr()
    be.prepare_lora_batch(_batch([5, 5, 5], extend=False), [2, 1, 0], RANKS, SCALINGS, use_cuda_graph=True)
    assert be.mapping is be.graph_mapping and be.mapping.slots.data_ptr() == buffers
    assert be.mapping.slots[:3].tolist() == [2, 1, 0]


class UnquantizedLinearMethod:
    """SGLang's plain base GEMM (matched by name, as the backend does)."""

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class Int8LinearMethod:
    """A quantized base: int8 levels held in a float weight of x's dtype, the per-row scale apart
    (a plain-looking weight that is not the layer's W)."""

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight * layer.weight_scale[:, None], bias)


class _LoRALayer:
    """An SGLang ``*WithLoRA`` wrapper at tp=1: ``base_layer``, output offsets (device and CPU),
    ``apply_lora`` calling the backend as SGLang's layer of that kind does, and a forward that hands
    the base GEMM to ``forward_with_base`` as a closure."""

    def __init__(self, backend, base, kind, a, b, offsets):
        self.backend, self.base_layer, self.kind, self.a, self.b = backend, base, kind, a, b
        self.output_offset = torch.tensor(offsets, dtype=torch.int32, device=a.device)
        self.output_offset_cpu = torch.tensor(offsets, dtype=torch.int32)

    def apply_lora(self, base_output, x):
        be, kw = self.backend, dict(output_offset=self.output_offset, output_offset_cpu=self.output_offset_cpu,
                                    base_output=base_output)
        if self.kind == "qkv":
            return be.run_qkv_lora(x=x, qkv_lora_a=self.a, qkv_lora_b=self.b, max_qkv_out_dim=16, **kw)
        if self.kind == "gate_up":
            return be.run_gate_up_lora(x=x, gate_up_lora_a=self.a, gate_up_lora_b=self.b, **kw)
        return be.run_lora_b_sgemm(x=be.run_lora_a_sgemm(x, self.a), weights=self.b, **kw)

    def forward(self, x, all_reduce=None):
        base = self.base_layer
        bias = None if base.skip_bias_add else base.bias
        base_fn = mock.Mock(side_effect=lambda: base.quant_method.apply(base, x, bias))
        y = self.backend.forward_with_base(self, x, base_fn, self.a, self.b, self.output_offset,
                                           self.output_offset_cpu.tolist(), all_reduce=all_reduce, kind=self.kind)
        return y, base_fn.call_count


# kind: (c slices, output offsets, bias, skip_bias_add) — q/k/v with GQA widths, gate/up, plain
# row- and column-parallel linears (the latter returning its bias separately)
LAYERS = {"qkv": (3, [0, 16, 24, 32], True, False), "gate_up": (2, [0, 12, 24], False, False),
          "row": (1, [0, 10], True, False), "column": (1, [0, 10], True, True)}


def _layer(kind, be, device, quantized=False):
    c, offsets, has_bias, skip = LAYERS[kind]
    n = offsets[-1]
    g = torch.Generator().manual_seed(11 + c)
    w = torch.randn(n, K, generator=g) / K**0.5
    base = types.SimpleNamespace(bias=torch.randn(n, generator=g) if has_bias else None, skip_bias_add=skip,
                                 tp_size=1, quant_method=UnquantizedLinearMethod(), weight=w)
    if quantized:
        base.weight_scale = w.abs().amax(1) / 127
        base.weight = torch.round(w / base.weight_scale[:, None])
        base.quant_method = Int8LinearMethod()
    a, b = _packed_a(c, 12 + c), torch.randn(S, n, R, generator=g) / 3
    for name in ("weight", "bias", "weight_scale"):
        if getattr(base, name, None) is not None:
            setattr(base, name, getattr(base, name).to(device))
    return _LoRALayer(be, base, kind, a.to(device), b.to(device), offsets), a, b


def _base(layer, x, dtype=torch.float64):
    base = layer.base_layer
    w = base.weight.cpu().to(dtype)
    if hasattr(base, "weight_scale"):
        w = w * base.weight_scale.cpu().to(dtype)[:, None]
    y = x.to(dtype) @ w.t()
    return y if base.bias is None or base.skip_bias_add else y + base.bias.cpu().to(dtype)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_forward_with_base_fused(path_device, kind):
    be, tokens = _backend(path_device)
    layer, a, b = _layer(kind, be, path_device)
    x = torch.randn(len(tokens), K, generator=torch.Generator().manual_seed(13))
    with count_launches() as launches:
        y, base_calls = layer.forward(x.to(path_device))
    assert base_calls == 0  # the engine's base GEMM did not run: the fused op did it
    if config.interpreting() or y.is_cuda:
        assert dict(launches) == {"_mixed_adapter_linear_shrink_kernel": 1, "_mixed_adapter_linear_kernel": 1}
    offsets = layer.output_offset_cpu.tolist()
    want = _reference(x, a, b, tokens, offsets, _base(layer, x))
    assert_close(kind, want, y.cpu(), _reference(x, a, b, tokens, offsets, _base(layer, x, x.dtype), x.dtype))


def test_forward_with_base_quantized_base_falls_back(path_device):
    be, tokens = _backend(path_device)
    layer, a, b = _layer("qkv", be, path_device, quantized=True)
    x = torch.randn(len(tokens), K, generator=torch.Generator().manual_seed(14))
    y, base_calls = layer.forward(x.to(path_device))
    assert base_calls == 1  # the engine's quantized GEMM, then the delta into its output
    want = _reference(x, a, b, tokens, [0, 16, 24, 32], _base(layer, x))
    assert_close("quantized qkv", want, y.cpu(), want.float())


def test_forward_with_base_reduction_keeps_sglang_order(path_device):
    """With a reduction (row-parallel, TP > 1) the base and the shrink are reduced before the expand."""
    be, tokens = _backend(path_device)
    layer, a, b = _layer("row", be, path_device)
    x = torch.randn(len(tokens), K, generator=torch.Generator().manual_seed(15))
    reduce = mock.Mock(side_effect=lambda t: t)
    y, base_calls = layer.forward(x.to(path_device), all_reduce=reduce)
    assert base_calls == 1 and reduce.call_count == 2
    assert [tuple(c.args[0].shape) for c in reduce.call_args_list] == [(len(tokens), 10), (len(tokens), R)]
    want = _reference(x, a, b, tokens, [0, 10], _base(layer, x))
    assert_close("row reduced", want, y.cpu(), want.float())


class BaseLoRABackend:
    """Stand-in for SGLang's base backend: its constructor, capability flags, per-batch state and
    no-op hooks, with the real signatures."""

    supports_lora_a_overlap = False
    skip_inactive_lora_batches = False
    skip_inactive_dense_lora = False
    supports_prefill_cuda_graph = False

    def __init__(self, max_loras_per_batch, device):
        self.max_loras_per_batch, self.device = max_loras_per_batch, device
        self.batch_info = None
        self.lm_head_batch_info = "stale"
        self._is_moe_lora = False

    @property
    def is_moe_lora(self):
        return self._is_moe_lora

    def reset_batch_state(self):
        self.batch_info = self.lm_head_batch_info = None

    def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph, num_tokens_per_req):
        pass

    def init_prefill_cuda_graph_batch_info(self, max_num_tokens, max_num_requests=None):
        raise NotImplementedError

    def prepare_lora_batch(self, forward_batch, weight_indices, lora_ranks, scalings, use_decode_cuda_graph,
                           use_prefill_cuda_graph=False):
        pass

    def run_lora_a_sgemm(self, x, weights, *args, **kwargs):
        pass


# members SGLang's LoRA layers, manager and graph runners read from a backend
READ_MEMBERS = ("get_batch_info", "batch_info", "reset_batch_state", "supports_lora_a_overlap",
                "skip_inactive_lora_batches", "skip_inactive_dense_lora", "supports_prefill_cuda_graph",
                "prepare_lora_batch", "init_decode_cuda_graph_batch_info", "init_prefill_cuda_graph_batch_info",
                "forward_with_base", "run_lora_a_sgemm", "run_lora_b_sgemm", "run_qkv_lora", "run_gate_up_lora",
                "is_moe_lora")


def _lora_active(layer_set_lora, backend):
    """SGLang's layer rule: LoRA runs when set and a batch is prepared, unless the backend skips
    adapter-free batches."""
    info = backend.get_batch_info()
    skips = backend.skip_inactive_lora_batches or backend.skip_inactive_dense_lora
    return layer_set_lora and info is not None and (info.has_active_lora or not skips)


def _fake_sglang(monkeypatch, choices):
    """Stand-in modules for SGLang's base backend, its backend registry and (when ``choices`` is not
    None) the ``server_args`` module keeping ``LORA_BACKEND_CHOICES``; returns the registry dict."""
    registry = {}
    mod = types.ModuleType("sglang.srt.lora.backend.lora_registry")
    mod.register_lora_backend = lambda name: (lambda fn: registry.__setitem__(name, fn) or fn)
    for name in ("sglang", "sglang.srt", "sglang.srt.lora", "sglang.srt.lora.backend"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    base = types.ModuleType("sglang.srt.lora.backend.base_backend")
    base.BaseLoRABackend = BaseLoRABackend
    monkeypatch.setitem(sys.modules, base.__name__, base)
    if choices is not None:
        args = types.ModuleType("sglang.srt.server_args")
        args.LORA_BACKEND_CHOICES = choices
        monkeypatch.setitem(sys.modules, args.__name__, args)
    return registry


def test_register_adds_the_backend_and_widens_the_cli(monkeypatch):
    choices = ["triton", "csgmv", "ascend", "torch_native"]
    registry = _fake_sglang(monkeypatch, choices)
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-backend", choices=choices)  # as SGLang's CLI holds the list
    with pytest.raises(SystemExit), mock.patch("sys.stderr"):
        parser.parse_args(["--lora-backend", BACKEND_NAME])
    register()
    cls = registry[BACKEND_NAME]()
    register()  # plug-ins load again in every worker: no duplicate, the same class
    assert registry[BACKEND_NAME]() is cls
    assert issubclass(cls, AdaptkernLoRABackend) and issubclass(cls, BaseLoRABackend)
    assert choices == ["triton", "csgmv", "ascend", "torch_native", BACKEND_NAME]
    assert parser.parse_args(["--lora-backend", BACKEND_NAME]).lora_backend == BACKEND_NAME


def test_register_without_a_choices_list_warns(monkeypatch):
    registry = _fake_sglang(monkeypatch, None)
    with pytest.warns(UserWarning, match="LORA_BACKEND_CHOICES"):
        register()
    assert issubclass(registry[BACKEND_NAME](), AdaptkernLoRABackend)


def test_registered_class_has_the_members_sglang_reads(monkeypatch):
    registry = _fake_sglang(monkeypatch, [])
    register()
    be = registry[BACKEND_NAME]()(S, "cpu")
    assert all(hasattr(be, name) for name in READ_MEMBERS)
    assert be.batch_info is None and be.get_batch_info() is None and be.lm_head_batch_info == "stale"
    assert not be.supports_lora_a_overlap and not be.skip_inactive_lora_batches
    assert not be.supports_prefill_cuda_graph and not be.is_moe_lora
    assert type(be).prepare_lora_batch is AdaptkernLoRABackend.prepare_lora_batch
    assert type(be).init_decode_cuda_graph_batch_info is AdaptkernLoRABackend.init_decode_cuda_graph_batch_info
    with pytest.raises(NotImplementedError):
        be.init_prefill_cuda_graph_batch_info(64, 8)
    # as SGLang's manager calls it: positional decode-graph flag, then the prefill-graph flag
    be.prepare_lora_batch(_batch([2, 3]), [1, 2], RANKS, SCALINGS, False, False)
    info = be.get_batch_info(None)
    assert info is be.batch_info and info.mapping is be.mapping
    assert info.mapping.slots[:5].tolist() == [1, 1, 2, 2, 2]
    assert (info.bs, info.seg_lens, info.weight_indices) == (2, [2, 3], [1, 2])
    assert info.has_active_lora and info.is_prefill and not info.use_cuda_graph
    assert info.lora_ranks.tolist() == RANKS and info.scalings.tolist() == SCALINGS
    assert _lora_active(True, be) and not _lora_active(False, be)
    be.prepare_lora_batch(_batch([4]), [1], RANKS, SCALINGS, False)  # slot 1 has rank 0
    assert not be.batch_info.has_active_lora and _lora_active(True, be)  # still runs: rank-0 slots add nothing
    be.reset_batch_state()  # an idle forward: no batch, the base's lm_head state cleared too
    assert be.get_batch_info() is None and be.mapping is None and be.lm_head_batch_info is None
    assert not _lora_active(True, be)


@pytest.mark.parametrize("init", ["new", "new_kw", "old_positional", "old_kw"])
def test_decode_graph_init_signatures(init):
    be = AdaptkernLoRABackend(S, "cpu")
    if init == "new":
        be.init_decode_cuda_graph_batch_info(4, 2)
    elif init == "new_kw":
        be.init_decode_cuda_graph_batch_info(max_bs_in_cuda_graph=4, num_tokens_per_req=2)
    elif init == "old_positional":
        be.init_cuda_graph_batch_info(object(), 4, num_tokens_per_bs=2)
    else:
        be.init_cuda_graph_batch_info(max_bs_in_cuda_graph=4, num_tokens_per_bs=2)
    graph = be.decode_cuda_graph_batch_info
    assert graph.use_cuda_graph and graph.tokens_per_request == 2 and graph.mapping.max_tokens == 8
    buffers = graph.mapping.slots.data_ptr()
    # target verification: an extend batch without per-sequence lengths, 2 tokens per request
    verify = _batch([5], extend=True)
    verify.extend_seq_lens_cpu = None
    for indices in ([2, 0, 1], [0, 2, 2]):
        verify.batch_size = len(indices)
        be.prepare_lora_batch(verify, indices, RANKS, SCALINGS, use_decode_cuda_graph=True)
        assert be.batch_info is graph and be.mapping.slots.data_ptr() == buffers
        assert be.mapping.slots[:6].tolist() == [w for w in indices for _ in range(2)]
        assert graph.seg_lens == [2] * 3 and not graph.is_prefill
    be.prepare_lora_batch(_batch([1, 1]), [0, 1], RANKS, SCALINGS, False)  # eager: a fresh batch
    assert be.batch_info is not graph and be.graph_mapping is graph.mapping


def test_prepare_refuses_what_it_cannot_serve():
    be = AdaptkernLoRABackend(S, "cpu")
    with pytest.raises(ValueError, match="init_decode_cuda_graph_batch_info"):
        be.prepare_lora_batch(_batch([1], extend=False), [0], RANKS, SCALINGS, True)
    with pytest.raises(ValueError, match="use_prefill_cuda_graph"):
        be.prepare_lora_batch(_batch([3]), [0], RANKS, SCALINGS, False, True)
    with pytest.raises(ValueError, match="weight_indices"):
        be.prepare_lora_batch(_batch([3, 1]), [0], RANKS, SCALINGS)
    assert be.batch_info is None  # nothing prepared by a refused call
