"""Sliceable layers and the dynamic gate: the building blocks of every dsnet model."""

from dsnet.layers.gate import DynamicGate, SqueezeExcite, make_divisible, straight_through_gumbel
from dsnet.layers.sliced import (
    SliceableModule,
    SlicedBatchNorm2d,
    SlicedConv2d,
    SlicedLayerNorm,
    SlicedLinear,
)

__all__ = [
    "DynamicGate",
    "SqueezeExcite",
    "SliceableModule",
    "SlicedBatchNorm2d",
    "SlicedConv2d",
    "SlicedLayerNorm",
    "SlicedLinear",
    "make_divisible",
    "straight_through_gumbel",
]
