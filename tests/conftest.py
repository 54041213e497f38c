"""Test setup: without a GPU, the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and so adaptkern) is imported (DESIGN §6).
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
