"""Certificates of equivalence: :func:`compare`, :func:`assert_equivalent`, the report, the error
ratio, ULP distances.

``certify`` is used by every other part of fcconv and uses none of them (only ``fcconv.errors``).
"""

from fcconv.certify._ratio import RatioMeasure, error_ratio
from fcconv.certify.compare import assert_equivalent, compare
from fcconv.certify.report import (
    ERROR_RATIO_MAX,
    FLOAT64_RTOL,
    VACUOUS_FACTOR,
    Agreement,
    EquivalenceReport,
    Location,
)
from fcconv.certify.ulp import ulp_distance

__all__ = [
    "ERROR_RATIO_MAX",
    "FLOAT64_RTOL",
    "VACUOUS_FACTOR",
    "Agreement",
    "EquivalenceReport",
    "Location",
    "RatioMeasure",
    "assert_equivalent",
    "compare",
    "error_ratio",
    "ulp_distance",
]
