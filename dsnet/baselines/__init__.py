"""Baselines of the comparison (SPEC 6.3): US-Nets and networks trained alone."""

from dsnet.baselines.alone import alone_config, alone_kernels, alone_widths
from dsnet.baselines.usnet import usnet_config, usnet_widths

__all__ = ["alone_config", "alone_kernels", "alone_widths", "usnet_config", "usnet_widths"]
