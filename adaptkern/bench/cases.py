"""Benchmark cases: the shapes, their inputs, and their work (flops, bytes).

One list of cases feeds ``adaptkern bench``, ``adaptkern check`` and the pytest-benchmark
suites in ``benchmarks/``, so all three measure the same thing.

Core suite (one adapter, Llama-8B-like layers, bf16):
    M ∈ {2048, 8192} tokens; (K, N) ∈ {(4096, 4096), (4096, 14336)};
    LoRA r ∈ {8, 16, 64}; bottleneck R = 256, GELU, sequential and parallel;
    modes forward (inference, no autograd) and forward_backward (x and the adapter's
    parameters require grad, the base W is frozen, as in fine-tuning).
Mixed suite (every row may use a different LoRA adapter, forward only):
    decode M ∈ {1, 16, 64, 256}, prefill M ∈ {2048, 8192}; S ∈ {1, 8, 32, 128} distinct
    adapters; r ∈ {8, 16, 64}; K = N = 4096. Popularity is uniform: each of the S adapters
    gets M/S rows (±1) in random order, so a batch holds exactly S distinct adapters
    (cases with S > M cannot, and are left out).

The suites of the newer ops live in :mod:`adaptkern.bench.suites` (one module each: ``qlora``,
``dora``, ``bottleneck_norm``, ``serving``; their shapes are in their docstrings); this module
is where all of them are listed (:data:`SUITES`), selected and dispatched.

``quick`` keeps the representative cases of each suite (see :func:`core_cases`, :func:`mixed_cases`
and each suite's ``cases``). Off a GPU, tiny shapes replace all of them: a smoke test of the
harness, not a measurement.

A case id reads ``<kind>-M<rows>-K<in>-N<out>-r<rank>[-<activation>][-<variant>][-S<adapters>]-<dtype>``
(:class:`~adaptkern.bench.base.Case`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from .base import BOTTLENECK_SCALE, DTYPES, LORA_SCALE, MODES, Case, randn  # noqa: F401 - the harness reads them here
from .suites import bottleneck_norm, dora, qlora, serving

SUITE_MODULES = {m.NAME: m for m in (qlora, dora, bottleneck_norm, serving)}
SUITES = ("core", "mixed", *SUITE_MODULES)
KINDS = ("lora", "bottleneck_sequential", "bottleneck_parallel", *(k for m in SUITE_MODULES.values() for k in m.KINDS))

CORE_M = (2048, 8192)
CORE_KN = ((4096, 4096), (4096, 14336))
CORE_LORA_R = (8, 16, 64)
CORE_BOTTLENECK_R = 256
MIXED_DECODE_M = (1, 16, 64, 256)
MIXED_PREFILL_M = (2048, 8192)
MIXED_ADAPTERS = (1, 8, 32, 128)
MIXED_R = (8, 16, 64)
MIXED_KN = 4096


def _core(m, k, n) -> list[Case]:
    out = [Case("core", "lora", m, k, n, r) for r in CORE_LORA_R]
    return out + [Case("core", f"bottleneck_{p}", m, k, n, CORE_BOTTLENECK_R, activation="gelu")
                  for p in ("sequential", "parallel")]


def core_cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The core suite; ``gpu=False`` gives the CPU smoke shapes. ``quick``: LoRA r=16 and the
    sequential bottleneck at M=8192, K=N=4096."""
    if not gpu:
        smoke = [Case("core", "lora", 64, 128, 128, 8),
                 Case("core", "bottleneck_sequential", 64, 128, 128, 16, activation="gelu"),
                 Case("core", "bottleneck_parallel", 64, 128, 128, 16, activation="gelu")]
        return smoke[:2] if quick else smoke
    if quick:
        return [Case("core", "lora", 8192, 4096, 4096, 16),
                Case("core", "bottleneck_sequential", 8192, 4096, 4096, CORE_BOTTLENECK_R, activation="gelu")]
    return [c for m, (k, n) in itertools.product(CORE_M, CORE_KN) for c in _core(m, k, n)]


def mixed_cases(*, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The mixed-adapter suite (LoRA, forward); ``gpu=False`` gives the CPU smoke shapes.
    ``quick``: decode M=64 with 32 adapters, M=256 with 1 and with 128, prefill M=8192 with 8 (r=16)."""
    if not gpu:
        smoke = [Case("mixed", "lora", 64, 128, 128, 8, num_adapters=4),
                 Case("mixed", "lora", 4, 128, 128, 8, num_adapters=1),
                 Case("mixed", "lora", 64, 128, 128, 8, num_adapters=1)]
        return smoke[:1] if quick else smoke
    kn = MIXED_KN
    if quick:
        return [Case("mixed", "lora", m, kn, kn, 16, num_adapters=s) for m, s in ((64, 32), (256, 1), (256, 128),
                                                                                  (8192, 8))]
    return [Case("mixed", "lora", m, kn, kn, r, num_adapters=s)
            for m in MIXED_DECODE_M + MIXED_PREFILL_M for s in MIXED_ADAPTERS for r in MIXED_R if s <= m]


def suite_cases(suite: str, *, quick: bool = False, gpu: bool = True) -> list[Case]:
    """The cases of one suite (see :data:`SUITES`)."""
    if suite == "core":
        return core_cases(quick=quick, gpu=gpu)
    if suite == "mixed":
        return mixed_cases(quick=quick, gpu=gpu)
    return SUITE_MODULES[suite].cases(quick=quick, gpu=gpu)


def requirement(suite: str) -> Optional[str]:
    """None when ``suite`` can run here, else why not (a package it needs is not importable)."""
    return SUITE_MODULES[suite].requirement() if suite in SUITE_MODULES else None


def select(suite: str, *, quick: bool = False, gpu: bool = True, filter: Optional[str] = None) -> list[Case]:
    """Cases of ``suite`` (one of :data:`SUITES`, or "all"); with ``filter``, only those whose id
    contains every comma-separated part of it (may be empty: the caller decides)."""
    if suite not in (*SUITES, "all"):
        raise ValueError(f"suite must be one of {SUITES + ('all',)}, got {suite!r}")
    cases = [c for name in (SUITES if suite == "all" else (suite,)) for c in suite_cases(name, quick=quick, gpu=gpu)]
    needles = [f.strip() for f in (filter or "").split(",") if f.strip()]
    return [c for c in cases if all(n in c.id for n in needles)]


def check_cases(dtypes: tuple[str, ...], *, gpu: bool = True) -> list[Case]:
    """Small, odd shapes for ``adaptkern check``: LoRA (a one-pass and a split-sized rank),
    both bottleneck placements, and mixed batches, in every dtype asked for. Off a GPU the
    shapes stay small enough for the Triton interpreter (its blocks are 64 wide: 70/129/65
    cross them); on a GPU they cross the 128-wide blocks and the one-pass M limit too."""
    shapes = [(37, 96, 80), (130, 257, 129), (1030, 1024, 1040)] if gpu else [(37, 96, 80), (70, 129, 65)]
    mixed = ((5, 3), (70, 4)) + (((600, 7), (2100, 16)) if gpu else ())
    out = []
    for dtype in dtypes:
        for m, k, n in shapes:
            out += [Case("check", "lora", m, k, n, 8, dtype=dtype),
                    Case("check", "lora", m, k, n, 72, dtype=dtype),
                    Case("check", "bottleneck_sequential", m, k, n, 24, activation="gelu", dtype=dtype),
                    Case("check", "bottleneck_parallel", m, k, n, 24, activation="silu", dtype=dtype)]
        out += [Case("mixed", "lora", m, 96, 80, 8, num_adapters=s, dtype=dtype) for m, s in mixed]
    return out


# -- inputs ---------------------------------------------------------------------------


@dataclass
class CoreInputs:
    """Tensors of a single-adapter case, in the case's dtype, on one device.

    LoRA: ``down_w`` = lora_A [r, K], ``up_w`` = lora_B [N, r], no adapter biases.
    Bottleneck: ``down_w`` [R, N] (sequential) or [R, K] (parallel), ``down_b`` [R],
    ``up_w`` [N, R], ``up_b`` [N]. The base has no bias (Llama's linears have none).
    ``x`` and the adapter's tensors require grad; ``weight`` does not. ``dy`` [M, N] is
    the upstream gradient of forward_backward.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    down_w: torch.Tensor
    down_b: Optional[torch.Tensor]
    up_w: torch.Tensor
    up_b: Optional[torch.Tensor]
    dy: torch.Tensor

    @property
    def trainable(self) -> dict[str, torch.Tensor]:
        """x and the adapter's parameters by name: what forward_backward differentiates."""
        named = dict(x=self.x, down_w=self.down_w, down_b=self.down_b, up_w=self.up_w, up_b=self.up_b)
        return {k: v for k, v in named.items() if v is not None}


@dataclass
class MixedInputs:
    """Tensors of a mixed-adapter case, in the layout of ``adaptkern.mixed_lora_linear``.

    x [M, K], weight [N, K], bias None, lora_a [S, r, K], lora_b [S, N, r],
    adapter_ids [M] int32 in [-1, S) (-1: base only), scales [S] float32; ``groups`` holds,
    for the timed eager loop, (slot, row indices int64) per distinct adapter, built once.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    adapter_ids: torch.Tensor
    scales: torch.Tensor
    groups: list


def make_core_inputs(case: Case, device, seed: int = 0) -> CoreInputs:
    """Inputs with the magnitudes of a trained layer (outputs O(1), B non-zero so the adapter counts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r = case.torch_dtype, case.M, case.K, case.N, case.rank
    x = randn((m, k), 1.0, dt, device, g)
    weight = randn((n, k), k**-0.5, dt, device, g)
    if case.kind == "lora":
        down_w, down_b = randn((r, k), k**-0.5, dt, device, g), None
        up_w, up_b = randn((n, r), r**-0.5, dt, device, g), None
    else:
        reads = n if case.placement == "sequential" else k
        down_w, down_b = randn((r, reads), reads**-0.5, dt, device, g), randn((r,), 0.5, dt, device, g)
        up_w, up_b = randn((n, r), r**-0.5, dt, device, g), randn((n,), 0.5, dt, device, g)
    dy = randn((m, n), 1.0, dt, device, g)
    for t in (x, down_w, down_b, up_w, up_b):
        if t is not None:
            t.requires_grad_(True)
    return CoreInputs(x, weight, None, down_w, down_b, up_w, up_b, dy)


def uniform_adapter_ids(m: int, s: int, seed: int = 0) -> torch.Tensor:
    """[m] int32: each of the s slots gets m/s rows (±1), in random order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(m, dtype=torch.int32) % s
    return ids[torch.randperm(m, generator=g)]


def row_groups(ids: torch.Tensor, device) -> list:
    """[(slot, row indices int64 on ``device``)] for every slot ``ids`` uses (-1 left out)."""
    ids = ids.cpu()
    return [(slot, torch.nonzero(ids == slot).flatten().to(device)) for slot in sorted(set(ids.tolist()) - {-1})]


def make_mixed_inputs(case: Case, device, seed: int = 0, base_every: int = 0) -> MixedInputs:
    """Inputs of a mixed case; ``base_every`` > 0 sets every base_every-th row's id to -1."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt, m, k, n, r, s = case.torch_dtype, case.M, case.K, case.N, case.rank, case.num_adapters
    x = randn((m, k), 1.0, dt, device, g)
    weight = randn((n, k), k**-0.5, dt, device, g)
    lora_a = randn((s, r, k), k**-0.5, dt, device, g)
    lora_b = randn((s, n, r), r**-0.5, dt, device, g)
    scales = torch.linspace(0.5, 2.0, s, dtype=torch.float32, device=device)
    ids = uniform_adapter_ids(m, s, seed)
    if base_every:
        ids[::base_every] = -1
    return MixedInputs(x, weight, None, lora_a, lora_b, ids.to(device), scales, row_groups(ids, device))


def make_inputs(case: Case, device, seed: int = 0):
    """The inputs of ``case``: :func:`make_mixed_inputs`, :func:`make_core_inputs` (core and
    ``adaptkern check``'s cases), or the suite module's ``make_inputs``."""
    if case.suite in SUITE_MODULES:
        return SUITE_MODULES[case.suite].make_inputs(case, device, seed)
    return make_mixed_inputs(case, device, seed) if case.suite == "mixed" else make_core_inputs(case, device, seed)


# -- work model (for the roofline) ----------------------------------------------------


def work(case: Case, mode: str) -> tuple[float, float]:
    """(flops, minimum bytes moved) of the problem, independent of how it is computed.

    Forward: 2MKN + 2MR(K_d + N) flops, K_d the adapter's input width (N for a sequential
    bottleneck); bytes = read x, W, the adapter, write y. forward_backward adds the
    frozen base's dX = dY·W (2MKN) and the adapter's four backward products (4MR(K_d + N));
    its bytes add read dY, x, W, the adapter, write dX and the adapter's gradients.
    Mixed: the S adapters' weights are read once each. The other suites: their module's ``work``.
    """
    if case.suite in SUITE_MODULES:
        return SUITE_MODULES[case.suite].work(case, mode)
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    m, k, n, r = case.M, case.K, case.N, case.rank
    if case.suite == "mixed":
        flops = 2.0 * m * k * n + 2.0 * m * r * (k + n)
        nbytes = e * (m * k + n * k + case.num_adapters * r * (k + n) + m * n) + 4 * (m + case.num_adapters)
        return flops, float(nbytes)
    kd = n if case.placement == "sequential" else k
    params = r * (kd + n) + (0 if case.kind == "lora" else r + n)
    if mode == "forward":
        return 2.0 * m * k * n + 2.0 * m * r * (kd + n), float(e * (m * k + n * k + params + m * n))
    flops = 4.0 * m * k * n + 6.0 * m * r * (kd + n)
    return flops, float(e * (3 * m * k + 2 * n * k + 3 * params + 2 * m * n))
