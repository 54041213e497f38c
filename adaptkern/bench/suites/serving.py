"""Serving suite: a packed q/k/v projection where every row picks its LoRA adapter, and the delta
ops serving stacks call on their own base GEMM. bf16, forward, r = 16, K = 4096, output slices
(4096, 1024, 1024) (Llama-8B's GQA: N = 6144), a stack of S adapters with scales over [0.5, 2].

Kinds:

* ``qkv``         decode M = 64 and prefill M = 8192 with S = 32; and S ∈ {1, 128} at M = 64 and
                  M = 8192 (the cost should not grow with S). Rows take the S adapters in turn, in
                  random order, so min(S, M) of them are active (64 of the 128 at M = 64).
* ``lora_delta``  y += the LoRA delta of the three slices at M ∈ {1, 16, 64}, S = 32.

``quick``: ``qkv`` at M = 64 with S = 32.

Implementations (``qkv``):

* ``fused``         ``mixed_lora_linear(..., output_slices=)``: the base GEMM and every slice's
                    adapter in one launch family; the batch's ``SlotMapping`` built once, outside
                    the timing, as a serving stack builds it once per batch for all layers;
* ``vllm``          ``F.linear``, then vLLM's PyTorch LoRA ops per slice: gather every row's A
                    and B, shrink (einsum) into an fp32 buffer, expand (einsum) into y;
* ``delta``         ``F.linear``, then ``add_lora_delta`` into its output;
* ``graph_replay``  (decode, CUDA) ``fused`` captured once in a CUDA graph; each call refills the
                    ``SlotMapping`` in place with another batch's ids and replays the graph;
* ``base_linear``   ``F.linear`` alone.

``lora_delta``: ``fused`` = ``add_lora_delta`` (one launch at decode), ``two_launch`` =
``lora_shrink`` then ``lora_expand``, ``vllm`` the eager shrink/expand; each adds into the same
y buffer call after call (as a serving stack adds into its base output).

The check compares every adaptkern implementation of a case (the graph replay with a changed
mapping included, on a GPU) with float64 (``add_lora_delta_ref`` on the float64 base), with
``vllm`` in bf16 as the eager error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptkern.mixed import mixed_lora_linear
from adaptkern.ops.lora_delta.reference import add_lora_delta_ref
from adaptkern.serving import add_lora_delta, lora_expand, lora_shrink
from adaptkern.slot_mapping import SlotMapping

from ..base import Case, Unavailable, compare_all, randn, with_mode

NAME = "serving"
KINDS = ("qkv", "lora_delta")
IMPLS = ("fused", "vllm", "delta", "two_launch", "graph_replay", "base_linear")
KIND_IMPLS = {"qkv": ("fused", "vllm", "delta", "graph_replay", "base_linear"),
              "lora_delta": ("fused", "two_launch", "vllm")}
RANK = 16
K = 4096
QKV_MS = ((64, 32), (8192, 32), (64, 1), (64, 128), (8192, 1), (8192, 128))
DELTA_M = (1, 16, 64)
DELTA_S = 32
DECODE_MAX_M = 64  # the graph replay variant is for decode batches


def requirement():
    """None: the suite needs nothing beyond adaptkern."""
    return None


def slices(case: Case) -> tuple[int, int, int]:
    """(q, k, v) widths: K, K/4, K/4 (grouped-query attention with 4 query heads per kv head)."""
    return case.K, case.K // 4, case.K // 4


def _case(kind: str, m: int, s: int, k: int, r: int) -> Case:
    return Case(NAME, kind, m, k, k + 2 * (k // 4), r, num_adapters=s)


def cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The suite; ``gpu=False`` gives CPU smoke shapes (K = 128, r = 8, S = 4)."""
    if not gpu:
        smoke = [_case("qkv", 16, 4, 128, 8), _case("qkv", 70, 4, 128, 8), _case("lora_delta", 4, 4, 128, 8)]
        return smoke[:1] if quick else smoke
    if quick:
        return [_case("qkv", 64, 32, K, RANK)]
    return ([_case("qkv", m, s, K, RANK) for m, s in QKV_MS]
            + [_case("lora_delta", m, DELTA_S, K, RANK) for m in DELTA_M])


@dataclass
class ServingInputs:
    """x [M, K], weight [N, K] (the packed q/k/v base), lora_a 3 × [S, r, K], lora_b 3 × [S, N_i, r],
    ids [M] int32 in [0, S), ids_alt [M] another batch's ids (the graph replay alternates),
    scales [S] float32, mapping the ``SlotMapping`` of ids, y [M, N] the buffer the delta ops add
    into (a base output)."""

    x: torch.Tensor
    weight: torch.Tensor
    lora_a: list
    lora_b: list
    ids: torch.Tensor
    ids_alt: torch.Tensor
    scales: torch.Tensor
    mapping: SlotMapping
    y: torch.Tensor


def _ids(m: int, s: int, seed: int, device) -> torch.Tensor:
    """[m] int32: rows take the s slots in turn (min(s, m) of them active), in random order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(m, dtype=torch.int32) % s
    return ids[torch.randperm(m, generator=g)].to(device)


def make_inputs(case: Case, device, seed: int = 0) -> ServingInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r, s = case.torch_dtype, case.M, case.K, case.N, case.rank, case.num_adapters
    x = randn((m, k), 1.0, dt, device, g)
    weight = randn((n, k), k**-0.5, dt, device, g)
    lora_a = [randn((s, r, k), k**-0.5, dt, device, g) for _ in range(3)]
    lora_b = [randn((s, w, r), r**-0.5, dt, device, g) for w in slices(case)]
    scales = torch.linspace(0.5, 2.0, s, dtype=torch.float32, device=device)
    ids = _ids(m, s, seed, device)
    y = randn((m, n), 1.0, dt, device, g)
    return ServingInputs(x, weight, lora_a, lora_b, ids, _ids(m, s, seed + 1, device), scales,
                         SlotMapping.from_ids(ids, s), y)


def vllm_lora(y, x, lora_a, lora_b, ids, scales) -> torch.Tensor:
    """Semantics: for every slice i (columns o_i to o_i + N_i of y) and row m with slot s = ids[m]
    (ids < 0: no adapter): buf = scales[s]·x_m·A_{i,s}ᵀ (fp32), y[m, o_i:o_i+N_i] += buf·B_{i,s}ᵀ —
    vLLM's PyTorch LoRA ops: gather each row's A and B, then an einsum per product. In place.

    Shapes: y [M, ΣN_i], x [M, K], lora_a n × [S, r, K], lora_b n × [S, N_i, r], ids [M] int,
    scales [S] float32. Returns y.
    """
    slot = ids.long().clamp(min=0)
    row_scale = scales[slot] * (ids >= 0)
    start = 0
    for a, b in zip(lora_a, lora_b):
        buf = torch.einsum("mk,mrk->mr", x, a[slot]).float() * row_scale[:, None]
        width = b.shape[1]
        y[:, start:start + width] += torch.einsum("mr,mnr->mn", buf.to(x.dtype), b[slot])
        start += width
    return y


def _fused(inp: ServingInputs, case: Case, mapping):
    return lambda: mixed_lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, mapping, scales=inp.scales,
                                     output_slices=slices(case), validate_ids=False)


def _impl(case: Case, impl: str, inp: ServingInputs, y):
    """The computation of ``impl`` (other than graph_replay); the delta kinds add into ``y``."""
    kw = dict(scales=inp.scales, validate_ids=False)
    if case.kind == "qkv":
        if impl == "fused":
            return _fused(inp, case, inp.mapping)
        if impl == "base_linear":
            return lambda: F.linear(inp.x, inp.weight)
        if impl == "vllm":
            return lambda: vllm_lora(F.linear(inp.x, inp.weight), inp.x, inp.lora_a, inp.lora_b, inp.ids, inp.scales)
        return lambda: add_lora_delta(F.linear(inp.x, inp.weight), inp.x, inp.lora_a, inp.lora_b, inp.mapping,
                                      output_slices=slices(case), **kw)
    if impl == "fused":
        return lambda: add_lora_delta(y, inp.x, inp.lora_a, inp.lora_b, inp.mapping, **kw)
    if impl == "vllm":
        return lambda: vllm_lora(y, inp.x, inp.lora_a, inp.lora_b, inp.ids, inp.scales)
    buf = torch.empty((3, case.M, case.rank), dtype=torch.float32, device=inp.x.device)

    def two_launch():
        lora_shrink(inp.x, inp.lora_a, inp.mapping, out=buf, **kw)
        return lora_expand(y, buf, inp.lora_b, inp.mapping, validate_ids=False)
    return two_launch


def capture(case: Case, inp: ServingInputs):
    """``fused`` captured in a CUDA graph over a mapping of its own: (replay(ids) -> y, the mapping).
    replay refills the mapping in place from ``ids`` and replays the graph."""
    mapping = SlotMapping.from_ids(inp.ids, case.num_adapters)
    fused = _fused(inp, case, mapping)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # compiles, and warms the allocator outside the capture
            fused()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fused()

    def replay(ids):
        mapping.update_(ids, validate=False)
        graph.replay()
        return out
    return replay, mapping


def _graph_applies(case: Case, device) -> None:
    if case.kind != "qkv" or case.M > DECODE_MAX_M:
        raise Unavailable(f"the CUDA-graph replay is timed for qkv decode (M <= {DECODE_MAX_M})")
    if torch.device(device).type != "cuda":
        raise Unavailable("CUDA graphs need a GPU")


def build(case: Case, impl: str, mode: str, inp: ServingInputs, device):
    if mode != "forward":
        raise Unavailable("the serving suite times forward only")
    if impl not in KIND_IMPLS[case.kind]:
        raise Unavailable(f"{impl} is not timed for {case.kind} (it times {', '.join(KIND_IMPLS[case.kind])})")
    if impl == "graph_replay":
        _graph_applies(case, device)
        replay, _ = capture(case, inp)
        batches, turn = (inp.ids_alt, inp.ids), [0]

        def fn():
            turn[0] ^= 1
            return replay(batches[turn[0]])
        return fn
    return with_mode(_impl(case, impl, inp, inp.y), [], None, mode)


def _oracle(case: Case, inp: ServingInputs, ids) -> torch.Tensor:
    base = inp.y.double() if case.kind == "lora_delta" else F.linear(inp.x.double(), inp.weight.double())
    return add_lora_delta_ref(base, inp.x.double(), [a.double() for a in inp.lora_a],
                              [b.double() for b in inp.lora_b], inp.scales.double(), None, ids, 0)


def check(case: Case, inp: ServingInputs, grads: bool) -> list:
    """Every adaptkern implementation of the case against float64, ``vllm`` in bf16 as the eager
    error; on a GPU for decode qkv also the graph replay after the mapping changed to another batch."""
    oracle = _oracle(case, inp, inp.ids)
    with torch.no_grad():
        eager = _impl(case, "vllm", inp, inp.y.clone())()
        mine = [i for i in KIND_IMPLS[case.kind] if i not in ("vllm", "graph_replay", "base_linear")]
        outs = [_impl(case, i, inp, inp.y.clone())().clone() for i in mine]
    names = ["y" if i == "fused" else f"y ({i})" for i in mine]
    out = compare_all(names, [oracle] * len(outs), outs, [eager] * len(outs))
    try:
        _graph_applies(case, inp.x.device)
    except Unavailable:
        return out
    replay, _ = capture(case, inp)
    y_alt = replay(inp.ids_alt).clone()
    with torch.no_grad():
        eager_alt = vllm_lora(F.linear(inp.x, inp.weight), inp.x, inp.lora_a, inp.lora_b, inp.ids_alt, inp.scales)
    return out + compare_all(("y (graph replay, new SlotMapping)",), [_oracle(case, inp, inp.ids_alt)], [y_alt],
                             [eager_alt])


def work(case: Case, mode: str) -> tuple[float, float]:
    """Forward only. qkv: 2MKN (base) + 2Mr(3K + N) (three shrinks, the expands); lora_delta the
    adapter part alone. Bytes: x, W (qkv), the active adapters' A and B (min(S, M) of them), y
    written (lora_delta: read and written), the ids."""
    m, k, n, r = case.M, case.K, case.N, case.rank
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    active = min(case.num_adapters, m)
    adapters = e * active * r * (3 * k + n) + 4 * m
    if case.kind == "qkv":
        return 2.0 * m * k * n + 2.0 * m * r * (3 * k + n), float(e * (m * k + n * k + m * n) + adapters)
    return 2.0 * m * r * (3 * k + n), float(e * (m * k + 2 * m * n) + adapters)
