"""Two-stage training: supernet (stage I), BN recalibration, gate (stage II)."""
