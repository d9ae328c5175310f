"""Sliceable layers and the dynamic gate: the building blocks of every dsnet model."""

from dsnet.layers.gate import DynamicGate, SqueezeExcite, bias_ramp, make_divisible, straight_through_gumbel
from dsnet.layers.sliced import (
    CacheBudget,
    SliceableModule,
    SlicedBatchNorm2d,
    SlicedConv2d,
    SlicedLayerNorm,
    SlicedLinear,
    TensorCache,
    conv_bn,
    fold_batchnorm,
)
from dsnet.layers.transformer import DSViTBlock, SlicedAttention, SlicedMlp, SlicedQKV, TokenGate

__all__ = [
    "CacheBudget",
    "DSViTBlock",
    "DynamicGate",
    "SlicedAttention",
    "SlicedMlp",
    "SlicedQKV",
    "TensorCache",
    "TokenGate",
    "bias_ramp",
    "conv_bn",
    "fold_batchnorm",
    "SqueezeExcite",
    "SliceableModule",
    "SlicedBatchNorm2d",
    "SlicedConv2d",
    "SlicedLayerNorm",
    "SlicedLinear",
    "make_divisible",
    "straight_through_gumbel",
]
