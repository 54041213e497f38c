"""adaptkern: fused Triton kernels for LoRA and bottleneck adapters.

The frozen matmul, the adapter bottleneck and its residual run as one fused kernel family
(forward and backward), behind ``AdapterLinear``, a drop-in ``nn.Linear``.
"""

from .functional import adapter_linear, bottleneck_linear, lora_linear
from .nn import AdapterLinear, BottleneckAdapter, LoraAdapter

__all__ = [
    "AdapterLinear",
    "BottleneckAdapter",
    "LoraAdapter",
    "adapter_linear",
    "bottleneck_linear",
    "lora_linear",
]
__version__ = "0.1.0"
