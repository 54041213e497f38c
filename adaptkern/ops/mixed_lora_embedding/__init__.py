"""Embedding lookup plus, per row, the LoRA of the slot that row names: reference, kernel, op."""

from .op import mixed_lora_embedding_op

__all__ = ["mixed_lora_embedding_op"]
