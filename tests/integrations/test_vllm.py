"""The vLLM punica wrapper against a float64 re-derivation of vLLM's punica semantics, in vLLM's
layouts (slices [max_loras, 1, r_max, in] / [max_loras, 1, out_i, r_max], ranks zero-padded,
scale folded into B, fp32 shrink buffer), on both paths. vLLM itself does not install on these
CPU machines (its wheels pin CUDA builds), so the plug-in is checked against a stand-in platform."""

import sys
import types

import pytest
import torch

from adaptkern.integrations.vllm import WRAPPER_QUALNAME, AdaptkernPunicaWrapper, register
from adaptkern.testing import assert_close

from ..helpers import count_launches

MAX_LORAS, R, K = 3, 4, 24
SLICES = (16, 8, 8)  # q, k, v widths (GQA)
LORA_IDS = [7, None, 3]  # vLLM LoRA id held by each slot


def _stacked(seed, rows_cols, ranks=(4, 0, 2)):
    """vLLM's stacked slices with slot s zero-padded beyond its rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in rows_cols:
        t = torch.randn(MAX_LORAS, 1, rows, cols, generator=g) / 3
        for s, r in enumerate(ranks):
            if rows == R:
                t[s, :, r:] = 0
            else:
                t[s, :, :, r:] = 0
        out.append(t)
    return tuple(out)


def _mapping(tokens, prompts):
    return types.SimpleNamespace(index_mapping=tuple(tokens), prompt_mapping=tuple(prompts), is_prefill=False)


def _wrapper(device, tokens=(7, 0, 3, 3, 7, 5), prompts=(3, 0)):
    w = AdaptkernPunicaWrapper(16, 4, device, max_loras=MAX_LORAS)
    w.update_metadata(_mapping(tokens, prompts), LORA_IDS, MAX_LORAS, vocab_size=100)
    return w


def _slots(ids):
    """vLLM's convert_mapping: LoRA id -> slot index, 0 (or a LoRA no slot holds) -> -1."""
    return [LORA_IDS.index(i) if i in LORA_IDS and i > 0 else -1 for i in ids]


def _delta(x, a, b, slots, scale):
    """float64: per row, scale·(x·A[s]ᵀ)·B[s]ᵀ (zeros for -1)."""
    out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64)
    for m, s in enumerate(slots):
        if s >= 0:
            out[m] = scale * (x[m].double() @ a[s, 0].double().t()) @ b[s, 0].double().t()
    return out


def test_metadata_maps_lora_ids_to_slots():
    w = _wrapper("cpu")
    assert w.token_lora_indices.tolist() == _slots((7, 0, 3, 3, 7, 5)) == [0, -1, 2, 2, 0, -1]
    assert w.sampler_indices.tolist() == [2, -1] and not w.no_lora
    # vLLM's LoRA embedding layer reads the wrapper's _embeddings_indices: slot·vocab_size, 0 without a slot
    assert w._embeddings_indices[:6].tolist() == [0, 0, 200, 200, 0, 0]


def test_shrink_expand_and_linear(path_device):
    tokens = (7, 0, 3, 3, 7, 5)
    w = _wrapper(path_device, tokens)
    slots = _slots(tokens)
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(1))
    a = _stacked(2, [(R, K)] * 3)
    b = _stacked(3, [(n, R) for n in SLICES])
    y0 = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))  # wider than the slices
    dev = lambda t: t.to(path_device)  # noqa: E731
    buf = torch.full((3, 6, R), float("nan"), device=path_device)
    w.add_shrink(buf, dev(x), tuple(map(dev, a)), 0.5)
    for i in range(3):
        want = torch.zeros(6, R, dtype=torch.float64)
        for m, s in enumerate(slots):
            if s >= 0:
                want[m] = 0.5 * x[m].double() @ a[i][s, 0].double().t()
        assert_close(f"shrink {i}", want, buf[i].cpu())
    y = dev(y0.clone())
    w.add_expand(y, buf, tuple(map(dev, b)), SLICES, offset_start=4)
    want = y0.double().clone()
    o = 4
    for i, n in enumerate(SLICES):
        want[:, o:o + n] += _delta(x, a[i], b[i], slots, 0.5)
        o += n
    assert_close("expand", want, y.cpu(), want.float())
    y = dev(y0[:, :32].clone())
    with count_launches() as launches:
        w.add_lora_linear(y, dev(x), tuple(map(dev, a)), tuple(map(dev, b)), 0.5, SLICES)
    want = y0[:, :32].double().clone()
    o = 0
    for i, n in enumerate(SLICES):
        want[:, o:o + n] += _delta(x, a[i], b[i], slots, 0.5)
        o += n
    assert_close("add_lora_linear", want, y.cpu(), want.float())
    assert torch.equal(y.cpu()[1], y0[1, :32]) and torch.equal(y.cpu()[5], y0[5, :32])  # -1 rows untouched
    assert (sum(launches.values()) > 0) == (path_device != "cpu" or _interpreting())


def _interpreting():
    from adaptkern.ops import config

    return config.interpreting()


def test_embedding_and_logits(path_device):
    tokens = (3, 7, 0, 3)
    w = _wrapper(path_device, tokens, prompts=(7, 0, 3))
    slots = _slots(tokens)
    b = _stacked(5, [(12, R)])[0]
    xa = torch.randn(4, R, generator=torch.Generator().manual_seed(6))
    y0 = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    for add in (True, False):
        y = y0.clone().to(path_device)
        w.add_lora_embedding(y, xa.to(path_device), b.to(path_device), add_inputs=add)
        want = torch.zeros(4, 12, dtype=torch.float64)
        for m, s in enumerate(slots):
            want[m] = (y0[m].double() if add else 0) + (xa[m].double() @ b[s, 0].double().t() if s >= 0 else 0)
        assert_close(f"embedding add={add}", want, y.cpu())
    a = _stacked(8, [(R, K)])[0]
    bl = _stacked(9, [(50, R)])[0]
    h = torch.randn(3, K, generator=torch.Generator().manual_seed(10))
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(11))  # padded past the vocab
    y = logits.clone().to(path_device)
    w.add_lora_logits(y, h.to(path_device), a.to(path_device), bl.to(path_device), 2.0)
    want = logits.double().clone()
    want[:, :50] += _delta(h, a, bl, _slots((7, 0, 3)), 2.0)
    assert_close("logits", want, y.cpu(), want.float())


def test_register_points_the_platform_at_the_wrapper(monkeypatch):
    class Platform:
        @classmethod
        def get_punica_wrapper(cls):
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"

    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = Platform()
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    register()
    assert Platform.get_punica_wrapper() == WRAPPER_QUALNAME
    module, _, name = WRAPPER_QUALNAME.rpartition(".")
    assert getattr(sys.modules[module], name) is AdaptkernPunicaWrapper


def test_bad_layouts_are_refused():
    w = _wrapper("cpu")
    with pytest.raises(ValueError, match=r"lora_a_stacked\[0\] must be a \[max_loras, 1, rows, cols\] tensor"):
        w.add_shrink(torch.zeros(1, 6, R), torch.zeros(6, K), (torch.zeros(MAX_LORAS, R, K),), 1.0)
    with pytest.raises(TypeError, match="needs lora_config"):
        AdaptkernPunicaWrapper(8, 2, "cpu")
