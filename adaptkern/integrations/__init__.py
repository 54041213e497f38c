"""Hugging Face integrations: model patching, PEFT and AdapterHub checkpoint formats."""

from .patching import (Conv1DAdapter, adapter_parameters, add_bottleneck, add_lora, patch, set_adapter,
                       target_module_names)

__all__ = [
    "Conv1DAdapter",
    "adapter_parameters",
    "add_bottleneck",
    "add_lora",
    "patch",
    "set_adapter",
    "target_module_names",
]
