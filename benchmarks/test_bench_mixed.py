"""Mixed-adapter suite (every row its own LoRA adapter, forward): fused
``adaptkern.mixed_lora_linear`` vs the eager per-adapter loop (as PEFT computes mixed
batches) and F.linear alone.

Same cases as ``adaptkern bench --suite mixed``: decode M ∈ {1, 16, 64, 256}, prefill
M ∈ {2048, 8192}, S ∈ {1, 8, 32, 128} distinct adapters (uniform popularity), r ∈ {8, 16, 64},
K = N = 4096, bf16. Skipped while ``adaptkern.mixed_lora_linear`` does not exist.
"""

import pytest

from adaptkern.bench import baselines, cases

from conftest import case_params

pytestmark = pytest.mark.skipif(not baselines.has_mixed(), reason="adaptkern.mixed_lora_linear does not exist yet")

IMPLS = ("fused", "eager", "base_linear")


@pytest.fixture(scope="module", params=case_params(cases.mixed_cases(gpu=True), cases.mixed_cases(gpu=False)))
def case(request):
    return request.param


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed(run_benchmark, case, impl):
    run_benchmark(case, impl, "forward")
