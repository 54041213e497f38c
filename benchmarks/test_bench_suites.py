"""The suites of the newer ops (qlora, dora, bottleneck_norm, serving): fused vs each suite's
baselines, on the cases of ``adaptkern bench --suite <name>`` (on a CPU only the tiny smoke
shapes run). An implementation that does not apply to a case (or cannot run here, e.g. a CUDA
graph on a CPU) is skipped with the reason."""

import pytest

from adaptkern.bench import cases, impls

from conftest import case_params

SUITES = tuple(cases.SUITE_MODULES)
IMPLS = tuple(dict.fromkeys(i for s in SUITES for i in cases.SUITE_MODULES[s].IMPLS))


def _suite_cases(*, gpu):
    return [c for s in SUITES for c in cases.suite_cases(s, gpu=gpu)]


@pytest.fixture(scope="module", params=case_params(_suite_cases))
def case(request):
    return request.param


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_suite(run_benchmark, case, impl, mode):
    if impl not in impls.for_case(case) or mode not in case.modes:
        pytest.skip(f"{impl} {mode} is not timed for {case.kind} ({case.suite} suite)")
    run_benchmark(case, impl, mode)
