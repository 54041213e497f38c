"""``adaptkern.testing``, the one tolerance rule (tests, ``adaptkern check``, the benchmarks): a
failure names the tensor, the error, where it is and the bound."""

import pytest
import torch

from adaptkern.testing import assert_close, compare


def test_assert_close_names_the_tensor_the_error_and_where():
    ref = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4)
    eager = ref.to(torch.bfloat16)
    out = eager.clone()
    out[2, 1] += 0.5
    result = compare("dx", ref, out, eager)
    assert not result.ok and result.index == (2, 1) and result.error > result.bound
    with pytest.raises(AssertionError) as info:
        assert_close("dx", ref, out, eager)
    text = str(info.value)
    assert text.startswith("dx: max error") and "at index [2, 1]" in text and "allowed" in text
    assert assert_close("y", ref, eager, eager).ok  # eager itself is within 2x its own error
    # the bound: 2 x eager's error + atol x max(1, max|ref|)
    assert compare("y", ref, eager, eager).bound == pytest.approx(2 * compare("y", ref, eager).error + 4e-3 * 2.0)


def test_compare_catches_nan_shape_and_empty():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    bad = compare("y", ref, nan, torch.zeros(2, 3))
    assert not bad.ok and bad.error == float("inf") and bad.index == (1, 2)
    shape = compare("y", ref, torch.zeros(3, 2))
    assert not shape.ok and "shape (3, 2)" in str(shape)
    assert compare("y", ref[:0], nan[:0]).ok
    both_nan = torch.full((2,), float("nan"), dtype=torch.float64)
    assert compare("y", both_nan, both_nan.float()).ok  # NaN where the reference has NaN is no error
