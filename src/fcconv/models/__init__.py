"""Whole models: a classifier becomes fully convolutional (:func:`convolutionalize`), and the naive
reference it is checked against (:func:`sliding_window`)."""

from fcconv.models.cam import ClassActivationMap, class_activation_map
from fcconv.models.fcn import FullyConvolutional, convolutionalize
from fcconv.models.modules import ChannelLayerNorm, UnfoldConv1d, UnfoldConv2d, UnfoldConv3d
from fcconv.models.sliding import SlidingWindow, sliding_window

__all__ = [
    "ChannelLayerNorm",
    "ClassActivationMap",
    "FullyConvolutional",
    "SlidingWindow",
    "UnfoldConv1d",
    "UnfoldConv2d",
    "UnfoldConv3d",
    "class_activation_map",
    "convolutionalize",
    "sliding_window",
]
