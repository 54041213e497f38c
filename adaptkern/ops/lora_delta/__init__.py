"""The adapter delta alone, into a caller's buffers (shrink, expand, both): reference and ops."""

from .op import add_lora_delta_op, lora_expand_op, lora_shrink_op, one_launch

__all__ = ["add_lora_delta_op", "lora_expand_op", "lora_shrink_op", "one_launch"]
