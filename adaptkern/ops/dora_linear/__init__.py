"""The fused DoRA linear y = g ⊙ (x·Wᵀ + s·x̃·Aᵀ·Bᵀ) + b, g = m / ‖W + s·B·A‖_row: reference, kernels, op."""

from .op import dora_linear_backward_op, dora_linear_op, weight_norm

__all__ = ["dora_linear_backward_op", "dora_linear_op", "weight_norm"]
