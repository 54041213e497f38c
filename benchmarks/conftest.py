"""pytest-benchmark suites over the cases of ``adaptkern.bench.cases`` (the same cases, the same
check and the same timed callables as ``adaptkern bench``), e.g.
``pytest benchmarks/ --benchmark-json=bench.json``.

* GPU-size cases are marked ``gpu`` and skipped without CUDA; the tiny CPU smoke cases are
  marked ``cpu_smoke`` and skipped when a GPU is present.
* Every case is checked against float64 first (once per case, ``adaptkern.bench.check``); a
  fused op that fails is never timed (its tests fail).
* On a GPU each round is ``fn(); torch.cuda.synchronize()`` after an untimed setup that
  clears L2 and synchronises; warm-up rounds (Triton and torch.compile compilation) are not
  timed. Peak memory goes to ``extra_info``, with the case's fields.
"""

import pytest
import torch

from adaptkern.bench import cases, env, impls, timing
from adaptkern.bench.check import check_case

CUDA = torch.cuda.is_available()
DEVICE = env.default_device()
GPU_ROUNDS, GPU_WARMUP = 30, 5
CPU_ROUNDS, CPU_WARMUP = 3, 1


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (large shapes); skipped without one")
    config.addinivalue_line("markers", "cpu_smoke: tiny shapes for a CPU smoke test; skipped on a GPU")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="GPU-size case: needs a CUDA GPU")
    skip_smoke = pytest.mark.skip(reason="CPU smoke shape: a GPU runs the real shapes")
    for item in items:
        if not CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if CUDA and "cpu_smoke" in item.keywords:
            item.add_marker(skip_smoke)


def case_params(suite_cases):
    """pytest params for a module-scoped ``case`` fixture: ``suite_cases(gpu=...)`` for both
    kinds of machine, GPU cases marked ``gpu``, smoke cases ``cpu_smoke``."""
    return ([pytest.param(c, marks=pytest.mark.gpu, id=c.id) for c in suite_cases(gpu=True)]
            + [pytest.param(c, marks=pytest.mark.cpu_smoke, id=f"smoke-{c.id}") for c in suite_cases(gpu=False)])


@pytest.fixture(scope="module")
def inputs(case):
    """The case's inputs, built once per case (tests are grouped by the module-scoped ``case``);
    a suite whose package is missing here (bitsandbytes for qlora) is skipped."""
    why = cases.requirement(case.suite)
    if why:
        pytest.skip(why)
    inp = cases.make_inputs(case, DEVICE)
    yield inp
    del inp
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def checked(case, inputs):
    """The float64 check of the fused op on these inputs, run once per case."""
    return check_case(case, inputs)


@pytest.fixture(scope="session")
def flush():
    return timing.l2_flusher(DEVICE) if CUDA else None


@pytest.fixture
def run_benchmark(benchmark, checked, inputs, flush):
    """run_benchmark(case, impl, mode): check, build, then time with ``benchmark.pedantic``."""

    def run(case, impl, mode):
        if impl == "fused" and not checked.ok:
            pytest.fail(f"{case.id}: the fused op failed its float64 check, not timed:\n{checked.failures()}")
        try:
            fn = impls.build(case, impl, mode, inputs, DEVICE)
        except impls.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = f"{case.id} {mode}"
        benchmark.extra_info.update({"impl": impl, "mode": mode, **case.fields(), "device": env.device_name(DEVICE)})
        if CUDA:
            fn()  # compile outside the rounds

            def setup():
                flush()
                torch.cuda.synchronize(DEVICE)

            def target():
                fn()
                torch.cuda.synchronize(DEVICE)

            benchmark.pedantic(target, setup=setup, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP, iterations=1)
            benchmark.extra_info["peak_mem_mb"] = timing.peak_memory_mb(fn, DEVICE)
        else:
            benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP, iterations=1)
            benchmark.extra_info["peak_mem_mb"] = None

    return run
