"""Test setup and shared fixtures: without a GPU, the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and so adaptkern) is imported: triton reads it at import.
Shared builders that are not fixtures live in tests/helpers.py (op inputs) and tests/models.py
(tiny transformers models, PEFT adapters); test files never import from each other.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["reference", "kernels"])
def path_device(request, monkeypatch, device):
    """Runs a test on both paths of an op; returns the device to run on. "reference": CPU tensors
    with the interpreter switched off run the op's reference.py; "kernels": the Triton kernels
    (the interpreter on a CPU, CUDA on a GPU)."""
    if request.param == "reference":
        from adaptkern.ops import config

        monkeypatch.setattr(config, "interpreting", lambda: False)
        return "cpu"
    return device


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / Tensor.new_empty return NaN-filled floating memory (as fla does),
    so an output element a kernel forgets to write shows up as NaN."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))


# -- hypothesis profiles (tests/test_properties.py) ---------------------------------------------------------
# "ci" (the default): derandomized (a fixed seed: every run draws the same examples), 48 examples per property
# on the reference path and 12 on the kernels (the interpreter is slow), no deadline (its timings are uneven),
# no example database.
# "long": many random examples for local bug hunts: pytest tests/test_properties.py --hypothesis-profile=long
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=48, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
if settings.get_current_profile_name() == "default":  # --hypothesis-profile=... (loaded first) wins
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
