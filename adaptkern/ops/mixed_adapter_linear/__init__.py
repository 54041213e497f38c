"""The mixed-adapter linear (every row picks its adapter slot, optionally one per output slice):
reference, kernels, op, slot metadata."""

from .op import SlotStack, launch_linear, launch_shrink, mixed_adapter_linear_backward_op, mixed_adapter_linear_op

__all__ = ["SlotStack", "launch_linear", "launch_shrink", "mixed_adapter_linear_backward_op",
           "mixed_adapter_linear_op"]
