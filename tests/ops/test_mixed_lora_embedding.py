"""``mixed_lora_embedding`` against the float64 reference (``adaptkern.ops.mixed_lora_embedding.reference``)."""

import pytest
import torch

from adaptkern.ops import config
from adaptkern.ops.mixed_lora_embedding import reference
from adaptkern.serving import mixed_lora_embedding
from adaptkern.slot_mapping import SlotMapping
from adaptkern.testing import assert_close

V, D, S, R = 50, 40, 4, 8
RANKS = [8, 0, 3, 5]


def inputs(lead, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)  # noqa: E731
    tokens = torch.randint(0, V, lead, generator=g)
    tokens.view(-1)[::7] = 0  # padding tokens (id 0) among the rows
    ids = torch.randint(-1, S, lead, generator=g)
    return dict(tokens=tokens.to(device), weight=rnd(V, D), a=rnd(S, R, V), b=rnd(S, D, R, std=R**-0.5),
                scales=(torch.rand(S, generator=g) + 0.5).to(device),
                ranks=torch.tensor(RANKS, dtype=torch.int32, device=device), ids=ids.to(device))


def oracle(inp, cast):
    return reference.mixed_lora_embedding_ref(inp["tokens"].cpu().reshape(-1), cast(inp["weight"].cpu()),
                                              cast(inp["a"].cpu()), cast(inp["b"].cpu()), inp["scales"].cpu(),
                                              inp["ranks"].cpu(), inp["ids"].cpu().reshape(-1))


def eager(inp):
    """E[t] + scale·A[:r, t]ᵀ·B[:, :r]ᵀ in the test dtype."""
    w, a, b = inp["weight"].cpu(), inp["a"].cpu(), inp["b"].cpu()
    tok, ids = inp["tokens"].cpu().reshape(-1), inp["ids"].cpu().reshape(-1)
    y = w[tok].clone()
    for s in range(S):
        rows, r = ids == s, RANKS[s]
        y[rows] += (inp["scales"][s].to(w.dtype) * a[s, :r][:, tok[rows]].t()) @ b[s, :, :r].t()
    return y


@pytest.mark.parametrize("lead", [(6,), (3, 37)], ids=["M6", "B3xT37"])  # decode; sorted rows (M=111)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_outputs_against_the_oracle(lead, dtype, path_device, nan_poison):
    inp = inputs(lead, dtype, seed=len(lead), device=path_device)
    y = mixed_lora_embedding(inp["tokens"], inp["weight"], inp["a"], inp["b"], inp["ids"], scales=inp["scales"],
                             ranks=inp["ranks"])
    assert y.shape == (*lead, D) and y.dtype == dtype
    flat = y.reshape(-1, D).cpu()
    assert_close("y", oracle(inp, lambda t: t.double()), flat, eager(inp))
    base = (inp["ids"].reshape(-1) == -1).cpu()
    assert torch.equal(flat[base], inp["weight"].cpu()[inp["tokens"].cpu().reshape(-1)[base]]), \
        "rows without an adapter get the embedding row exactly"


def test_mapping_m_zero_and_unchecked_tokens(path_device):
    inp = inputs((20,), seed=2, device=path_device)
    mapping = SlotMapping.from_ids(inp["ids"], S)
    args = (inp["weight"], inp["a"], inp["b"])
    y_ids = mixed_lora_embedding(inp["tokens"], *args, inp["ids"], scales=inp["scales"])
    assert torch.equal(y_ids, mixed_lora_embedding(inp["tokens"], *args, mapping, scales=inp["scales"]))
    assert mixed_lora_embedding(inp["tokens"][:0], *args, inp["ids"][:0]).shape == (0, D)
    bad = inp["tokens"].clone()
    bad[3], bad[5] = V, -2
    with pytest.raises(ValueError, match=rf"input_ids\[3\] = {V} is outside the vocabulary \[0, {V}\)"):
        mixed_lora_embedding(bad, *args, inp["ids"])
    y = mixed_lora_embedding(bad, *args, inp["ids"], validate_ids=False)  # unchecked: zero rows, nothing read
    assert not y[3].any() and not y[5].any()
    assert torch.equal(y[:3], y_ids_unscaled := mixed_lora_embedding(inp["tokens"], *args, inp["ids"])[:3]) \
        and y_ids_unscaled.shape == (3, D)


def test_compile_fullgraph_on_the_reference_path(monkeypatch):
    monkeypatch.setattr(config, "interpreting", lambda: False)
    inp = inputs((9,), seed=3)

    def f(tokens, ids):
        return mixed_lora_embedding(tokens, inp["weight"], inp["a"], inp["b"], ids, scales=inp["scales"],
                                    validate_ids=False)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(inp["tokens"], inp["ids"])
    assert torch.equal(got, f(inp["tokens"], inp["ids"]))


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(a=torch.zeros(S, R, V + 1)), ValueError, r"lora_a must be \[S, R, V\] with V=50"),
    (dict(b=torch.zeros(S, D, R + 1)), ValueError, r"lora_b must be \[S, D, R\] = \(4, 40, 8\)"),
    (dict(tokens=torch.zeros(6)), TypeError, "input_ids must be an int32 or int64 tensor"),
    (dict(ids=torch.tensor([0, 0, 9, 0, 0, 0])), ValueError, r"adapter_ids\[2\] = 9 is out of range"),
    (dict(weight=torch.zeros(V, D).requires_grad_()), ValueError, "not differentiable"),
])
def test_errors_name_the_argument(change, exc, pattern):
    inp = dict(inputs((6,)), **change)
    with pytest.raises(exc, match=pattern):
        mixed_lora_embedding(inp["tokens"], inp["weight"], inp["a"], inp["b"], inp["ids"])
