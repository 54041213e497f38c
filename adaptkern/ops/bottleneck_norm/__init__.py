"""The norm-fused bottleneck y = N(c_h·h + c_r·r + c_n·N(h + r) + s ⊙ (f(a·Dᵀ + d)·Uᵀ + u)): reference, kernels, op."""

from .op import bottleneck_norm_backward_op, bottleneck_norm_op

__all__ = ["bottleneck_norm_backward_op", "bottleneck_norm_op"]
