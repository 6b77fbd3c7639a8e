"""fcconv: perform, explain and certify the equivalence of fully connected and convolutional layers.

Example:
    >>> import torch, fcconv
    >>> conv = fcconv.linear_to_conv(torch.nn.Linear(4, 2), (1, 2, 2))
"""

from fcconv.certify import EquivalenceReport, assert_equivalent, compare, ulp_distance
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.explain import Explanation, explain
from fcconv.layers import (
    conv_matrix,
    conv_output_shape,
    conv_to_linear,
    linear_to_conv,
    linear_to_pointwise,
    pointwise_to_linear,
)
from fcconv.models import FullyConvolutional, class_activation_map, convolutionalize, sliding_window
from fcconv.tiling import dask_map, tiled_map

__version__ = "0.2.0"

__all__ = [
    "EquivalenceReport",
    "Explanation",
    "FcconvError",
    "FullyConvolutional",
    "NotEquivalentError",
    "assert_equivalent",
    "class_activation_map",
    "compare",
    "conv_matrix",
    "conv_output_shape",
    "conv_to_linear",
    "convolutionalize",
    "dask_map",
    "explain",
    "linear_to_conv",
    "linear_to_pointwise",
    "pointwise_to_linear",
    "sliding_window",
    "tiled_map",
    "ulp_distance",
]
