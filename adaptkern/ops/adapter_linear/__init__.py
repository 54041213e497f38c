"""The fused adapter linear y = x·Wᵀ + b + s·(f(dropout(x)·Aᵀ + a)·Bᵀ + c): reference, kernels, op."""

from .op import ROUTES, adapter_linear_backward_op, adapter_linear_op, dropout_mask

__all__ = ["ROUTES", "adapter_linear_backward_op", "adapter_linear_op", "dropout_mask"]
