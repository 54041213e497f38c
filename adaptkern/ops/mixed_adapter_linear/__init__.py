"""The mixed-adapter linear (every row picks its adapter slot): reference, kernels, op, row sort."""

from .op import SlotStack, mixed_adapter_linear_backward_op, mixed_adapter_linear_op

__all__ = ["SlotStack", "mixed_adapter_linear_backward_op", "mixed_adapter_linear_op"]
