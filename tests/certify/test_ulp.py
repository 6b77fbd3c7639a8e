"""Tests of fcconv.certify.ulp: ULP distances counted by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fcconv.certify import ulp_distance
from fcconv.errors import FcconvError

# ------------------------------------------------------------------------------------------------
# ULP distance, by hand
# ------------------------------------------------------------------------------------------------


def bits_to(value: int, dtype: torch.dtype) -> torch.Tensor:
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                 torch.float64: torch.int64}[dtype]
    width = torch.iinfo(int_dtype).bits
    signed = value - (1 << width) if value >= 1 << (width - 1) else value
    return torch.tensor([signed], dtype=int_dtype).view(dtype)


@pytest.mark.parametrize(("dtype", "a", "b", "expected"), [
    # float32: neighbours, 5 apart, across the binade boundary 2 = 0x40000000
    (torch.float32, 0x3F800000, 0x3F800001, 1),
    (torch.float32, 0x3F800000, 0x3F800005, 5),
    (torch.float32, 0x3FFFFFFF, 0x40000000, 1),
    # across zero: 1.0 and -1.0 are 2 * 0x3F800000 apart; +0 / -0 are equal
    (torch.float32, 0x3F800000, 0xBF800000, 2 * 0x3F800000),
    (torch.float32, 0x00000000, 0x80000000, 0),
    (torch.float32, 0x00000001, 0x80000001, 2),  # smallest subnormals +-1.4e-45
    (torch.float32, 0x80000000, 0x00000001, 1),  # -0 to the smallest positive subnormal
    (torch.float32, 0x7F7FFFFF, 0x7F800000, 1),  # largest finite to +inf
    # bfloat16: 1.0 = 0x3F80, its neighbour 1.0078125, 2.0 = 0x4000, -1.0
    (torch.bfloat16, 0x3F80, 0x3F81, 1),
    (torch.bfloat16, 0x3F80, 0x4000, 0x80),
    (torch.bfloat16, 0x3F80, 0xBF80, 2 * 0x3F80),
    (torch.bfloat16, 0x0001, 0x8001, 2),
    # float16: 1.0 = 0x3C00 and 2.0 = 0x4000 are 1024 apart (10 mantissa bits)
    (torch.float16, 0x3C00, 0x4000, 1024),
    # float64: 1.0 and the next double; -1.0 and 1.0
    (torch.float64, 0x3FF0000000000000, 0x3FF0000000000001, 1),
    (torch.float64, 0x3FF0000000000000, 0xBFF0000000000000, 2 * 0x3FF0000000000000),
    (torch.float64, 0x0000000000000000, 0x8000000000000000, 0),
])
def test_ulp_distance_hand_computed(dtype, a, b, expected):
    x, y = bits_to(a, dtype), bits_to(b, dtype)
    assert int(ulp_distance(x, y)) == expected
    assert int(ulp_distance(y, x)) == expected


def test_ulp_distance_values_saturation_and_nan():
    # Values, not bit patterns: 1.0 and 1 + 2**-23 in float32; 1 + 2**-8 rounds to 1 in bfloat16.
    assert ulp_distance(torch.tensor([1.0]), torch.tensor([1.0 + 2**-23])).tolist() == [1]
    assert ulp_distance(torch.tensor([1.0 + 2**-8], dtype=torch.bfloat16),
                        torch.tensor([1.0], dtype=torch.bfloat16)).tolist() == [0]
    big = torch.finfo(torch.float64).max
    assert int(ulp_distance(torch.tensor([-big], dtype=torch.float64),
                            torch.tensor([big], dtype=torch.float64))) == 2**63 - 1
    nan = torch.tensor([math.nan, math.nan, 1.0])
    assert ulp_distance(nan, torch.tensor([math.nan, 1.0, 1.0])).tolist() == [0, 2**63 - 1, 0]
    assert ulp_distance(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 2.0])).shape == (2, 2)


def test_ulp_distance_rejects_mixed_dtypes():
    with pytest.raises(FcconvError, match="ulp_distance expects two floating-point tensors of one dtype"):
        ulp_distance(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(FcconvError, match="ulp_distance expects two tensors"):
        ulp_distance(torch.zeros(2), [0.0, 0.0])
