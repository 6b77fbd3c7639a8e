"""Kept so that `from fcconv.verify import compare` (fcconv 0.1) still works: use :mod:`fcconv.certify`."""

from fcconv.certify import (
    FLOAT64_RTOL,
    Agreement,
    EquivalenceReport,
    Location,
    assert_equivalent,
    compare,
    ulp_distance,
)

__all__ = [
    "FLOAT64_RTOL",
    "Agreement",
    "EquivalenceReport",
    "Location",
    "assert_equivalent",
    "compare",
    "ulp_distance",
]
