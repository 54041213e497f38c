"""Mixed-adapter suite (every row its own LoRA adapter, forward): fused
``adaptkern.mixed_lora_linear`` vs the eager per-adapter loop and F.linear alone, on the cases
of ``adaptkern bench --suite mixed`` (on a CPU only the tiny smoke shapes run)."""

import pytest

from adaptkern.bench import cases, impls

from conftest import case_params


@pytest.fixture(scope="module", params=case_params(cases.mixed_cases))
def case(request):
    return request.param


@pytest.mark.parametrize("impl", impls.MIXED_IMPLS)
def test_mixed(run_benchmark, case, impl):
    run_benchmark(case, impl, "forward")
