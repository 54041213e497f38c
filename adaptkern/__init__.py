"""adaptkern: fused Triton kernels for LoRA and bottleneck adapters.

The frozen matmul, the adapter bottleneck and its residual run as one fused kernel family
(forward and backward), behind ``AdapterLinear``, a drop-in ``nn.Linear``.
"""

from .bottleneck_norm import bottleneck_norm
from .dora import dora_linear, dora_weight_norm
from .functional import adapter_linear, bottleneck_linear, lora_linear
from .manager import AdapterManager
from .mixed import mixed_adapter_linear, mixed_lora_linear
from .adapters import DoraAdapter
from .nn import AdapterLinear, BottleneckAdapter, LoraAdapter, adapter_batch
from .pool import AdapterPool
from .quantized import QuantizedWeight, mixed_qlora_linear, qlora_linear
from .serving import add_lora_delta, lora_expand, lora_shrink, mixed_lora_embedding
from .slot_mapping import SlotMapping

__all__ = [
    "AdapterLinear",
    "AdapterManager",
    "AdapterPool",
    "BottleneckAdapter",
    "DoraAdapter",
    "LoraAdapter",
    "QuantizedWeight",
    "SlotMapping",
    "adapter_batch",
    "adapter_linear",
    "add_lora_delta",
    "bottleneck_linear",
    "bottleneck_norm",
    "dora_linear",
    "dora_weight_norm",
    "lora_expand",
    "lora_linear",
    "lora_shrink",
    "mixed_lora_embedding",
    "mixed_adapter_linear",
    "mixed_lora_linear",
    "mixed_qlora_linear",
    "qlora_linear",
]
__version__ = "0.1.0"

# Hugging Face integrations import transformers: load them on first use, not with adaptkern.
_INTEGRATIONS = {
    "patch": "patching", "add_lora": "patching", "add_bottleneck": "bottleneck_config", "set_adapter": "patching",
    "adapter_parameters": "patching", "load_peft": "peft", "save_peft": "peft", "from_peft_model": "peft",
    "load_adapterhub": "adapterhub", "save_adapterhub": "adapterhub_save", "adapterhub_config": "bottleneck_config",
    "fuse_peft": "peft_fuse", "unfuse_peft": "peft_fuse",
    "merge_and_unload": "patching", "disable_adapters": "patching", "delete_adapter": "patching",
    "trainable_summary": "patching", "AdapterTrainer": "trainer",
}
__all__ += sorted(_INTEGRATIONS)


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _INTEGRATIONS:
        import importlib

        module = importlib.import_module(f".integrations.{_INTEGRATIONS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'adaptkern' has no attribute {name!r}")
