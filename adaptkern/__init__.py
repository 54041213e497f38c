"""adaptkern: fused Triton kernels for LoRA and bottleneck adapters."""

from .functional import adapter_linear, bottleneck_linear, lora_linear

__all__ = ["adapter_linear", "bottleneck_linear", "lora_linear"]
__version__ = "0.1.0"
