"""Certificates of equivalence: :func:`compare`, :func:`assert_equivalent`, the report, ULP distances.

``certify`` is used by every other part of fcconv and uses none of them (only ``fcconv.errors``).
"""

from fcconv.certify.compare import assert_equivalent, compare
from fcconv.certify.report import FLOAT64_RTOL, Agreement, EquivalenceReport, Location
from fcconv.certify.ulp import ulp_distance

__all__ = [
    "FLOAT64_RTOL",
    "Agreement",
    "EquivalenceReport",
    "Location",
    "assert_equivalent",
    "compare",
    "ulp_distance",
]
