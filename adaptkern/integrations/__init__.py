"""Hugging Face integrations: model patching, the PEFT and AdapterHub checkpoint formats."""

from .patching import (Conv1DAdapter, adapter_parameters, add_bottleneck, add_lora, patch, set_adapter,
                       target_module_names)
from .adapterhub import load_adapterhub
from .peft import from_peft_model, load_peft, save_peft

__all__ = [
    "Conv1DAdapter",
    "adapter_parameters",
    "add_bottleneck",
    "add_lora",
    "from_peft_model",
    "load_adapterhub",
    "load_peft",
    "patch",
    "save_peft",
    "set_adapter",
    "target_module_names",
]
