"""The SGLang LoRA backend against a float64 re-derivation of SGLang's semantics, in SGLang's layouts
(A slices packed at each adapter's actual rank, B slices by output offset, per-slot ranks and
scalings, rank 0 a no-op), on both paths. SGLang does not install on these CPU machines (it pins
CUDA builds), so the plug-in is checked against a stand-in registry."""

import sys
import types

import torch

from adaptkern.integrations.sglang import BACKEND_NAME, AdaptkernLoRABackend, register
from adaptkern.testing import assert_close

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


def _reference(x, a, b, tokens, offsets, base):
    out = base.double().clone()
    for t, slot in enumerate(tokens):
        r = RANKS[slot]
        for j in range(len(offsets) - 1):
            a_j = a[slot, j * r:(j + 1) * r].double()
            b_j = b[slot, offsets[j]:offsets[j + 1], :r].double()
            out[t, offsets[j]:offsets[j + 1]] += SCALINGS[slot] * (x[t].double() @ a_j.t()) @ b_j.t()
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


def test_register_adds_the_backend(monkeypatch):
    registry = {}
    mod = types.ModuleType("sglang.srt.lora.backend.lora_registry")
    mod.register_lora_backend = lambda name: (lambda fn: registry.__setitem__(name, fn) or fn)
    for name in ("sglang", "sglang.srt", "sglang.srt.lora", "sglang.srt.lora.backend"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    register()
    assert registry[BACKEND_NAME]() is AdaptkernLoRABackend
