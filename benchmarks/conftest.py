"""pytest-benchmark suites over the cases of ``adaptkern.bench.cases`` (the same cases as
``adaptkern bench``), e.g. ``pytest benchmarks/ --benchmark-json=bench.json``.

* GPU-size cases are marked ``gpu`` and skipped without CUDA; the tiny CPU smoke cases are
  marked ``cpu_smoke`` and skipped when a GPU is present.
* Every case is checked against float64 first (once per case); a fused kernel that fails
  is never timed (its tests fail).
* On a GPU each round is ``fn(); torch.cuda.synchronize()`` after an untimed setup that
  flushes L2 (writes 256 MB) and synchronises; warm-up rounds (Triton and torch.compile
  compilation) are not timed. Peak memory goes to ``extra_info``.
* ``extra_info`` holds the results-file fields of the row (suite, impl, mode, kind, M, K,
  N, rank, num_adapters, activation, dtype, peak_mem_mb) so the JSON can be compared with
  ``adaptkern bench``'s.

The Triton interpreter is not switched on here: on a CPU the fused ops run the PyTorch
reference, unless TRITON_INTERPRET=1 is set by the caller.
"""

import pytest
import torch

from adaptkern.bench import baselines, cases, timing

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
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


def case_params(gpu_cases, smoke_cases):
    """pytest params for a module-scoped ``case`` fixture: GPU cases marked ``gpu``, smoke cases ``cpu_smoke``."""
    return ([pytest.param(c, marks=pytest.mark.gpu, id=c.id) for c in gpu_cases]
            + [pytest.param(c, marks=pytest.mark.cpu_smoke, id=f"smoke-{c.id}") for c in smoke_cases])


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def timer():
    t = timing.Timer(DEVICE)
    yield t
    t.release()


@pytest.fixture(scope="module")
def inputs(case):
    """The case's inputs, built once per case (tests are grouped by the module-scoped ``case``)."""
    inp = cases.make_inputs(case, DEVICE)
    yield inp
    del inp
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def checked(case, inputs):
    """The float64 check of the fused op on these inputs, run once per case."""
    return baselines.check(case, inputs)


@pytest.fixture
def run_benchmark(benchmark, device, timer, checked, inputs):
    """run_benchmark(case, impl, mode): check, build, then time with ``benchmark.pedantic``."""

    def run(case, impl, mode):
        if impl == "fused" and not checked.ok:
            pytest.fail(f"{case.id}: the fused op failed its float64 check, not timed: "
                        f"{checked.error or checked.details()}")
        try:
            fn = baselines.build(case, impl, mode, inputs, device)
        except baselines.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = f"{case.id} {mode}"
        benchmark.extra_info.update({"impl": impl, "mode": mode, **case.fields(),
                                     "device": torch.cuda.get_device_name(device) if CUDA else "cpu"})
        if CUDA:
            fn()  # compile outside the rounds

            def setup():
                timer.flush()
                torch.cuda.synchronize(device)

            def target():
                fn()
                torch.cuda.synchronize(device)

            benchmark.pedantic(target, setup=setup, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP, iterations=1)
            benchmark.extra_info["peak_mem_mb"] = timer.peak_memory_mb(fn)
        else:
            benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP, iterations=1)
            benchmark.extra_info["peak_mem_mb"] = None

    return run
