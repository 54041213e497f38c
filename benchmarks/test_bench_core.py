"""Core suite (one adapter): fused vs eager, peft, torch.compile and F.linear alone, on the
cases of ``adaptkern bench --suite core`` (on a CPU only the tiny smoke shapes run)."""

import pytest

from adaptkern.bench import cases, impls

from conftest import case_params


@pytest.fixture(scope="module", params=case_params(cases.core_cases))
def case(request):
    return request.param


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("impl", impls.IMPLS)
def test_core(run_benchmark, case, impl, mode):
    run_benchmark(case, impl, mode)
