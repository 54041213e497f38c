"""Core suite (one adapter): fused vs eager, peft, torch.compile and F.linear alone.

Same cases as ``adaptkern bench --suite core``: M ∈ {2048, 8192}, (K, N) ∈ {(4096, 4096),
(4096, 14336)}, LoRA r ∈ {8, 16, 64}, bottleneck R = 256 GELU sequential and parallel,
bf16, forward and forward_backward. On a CPU only the tiny smoke shapes run.
"""

import pytest

from adaptkern.bench import baselines, cases

from conftest import case_params


@pytest.fixture(scope="module", params=case_params(cases.core_cases(gpu=True), cases.core_cases(gpu=False)))
def case(request):
    return request.param


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("impl", baselines.IMPLS)
def test_core(run_benchmark, case, impl, mode):
    run_benchmark(case, impl, mode)
