"""adaptkern: fused Triton kernels for LoRA and bottleneck adapters.

The frozen matmul, the adapter bottleneck and its residual run as one fused kernel family
(forward and backward), behind ``AdapterLinear``, a drop-in ``nn.Linear``.
"""

from .functional import adapter_linear, bottleneck_linear, lora_linear
from .mixed import adapter_batch, mixed_adapter_linear, mixed_lora_linear
from .nn import AdapterLinear, BottleneckAdapter, LoraAdapter
from .pool import AdapterPool

__all__ = [
    "AdapterLinear",
    "AdapterPool",
    "BottleneckAdapter",
    "LoraAdapter",
    "adapter_batch",
    "adapter_linear",
    "bottleneck_linear",
    "lora_linear",
    "mixed_adapter_linear",
    "mixed_lora_linear",
]
__version__ = "0.1.0"
