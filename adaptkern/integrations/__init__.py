"""Hugging Face integrations: model patching and the PEFT checkpoint format."""

from .patching import (Conv1DAdapter, adapter_parameters, add_bottleneck, add_lora, patch, set_adapter,
                       target_module_names)
from .peft import from_peft_model, load_peft, save_peft

__all__ = [
    "Conv1DAdapter",
    "adapter_parameters",
    "add_bottleneck",
    "add_lora",
    "from_peft_model",
    "load_peft",
    "patch",
    "save_peft",
    "set_adapter",
    "target_module_names",
]
