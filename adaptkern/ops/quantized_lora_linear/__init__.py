"""LoRA on a bitsandbytes 4-bit (NF4/FP4) frozen weight, dequantized inside the GEMM: reference, kernels, op."""

from .op import ROUTES, quantized_linear_op, quantized_lora_linear_backward_op, quantized_lora_linear_op
from .reference import NESTED_BLOCKSIZE, QUANT_TYPES, code_pairs, code_table, dequantize_4bit_ref

__all__ = ["NESTED_BLOCKSIZE", "QUANT_TYPES", "ROUTES", "code_pairs", "code_table", "dequantize_4bit_ref",
           "quantized_linear_op", "quantized_lora_linear_backward_op", "quantized_lora_linear_op"]
