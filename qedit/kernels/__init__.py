"""Quantization kernels: the single place where qedit encodes and decodes GGUF tensor data.

- `registry`: per-type `QuantKernel`s keyed by `gguf.GGMLQuantizationType`, the row-length fallback
  (`resolve_type`) and the tensor helpers (`quantize_tensor`, `dequantize_tensor`).
- `mixes`: llama.cpp's per-tensor type choice for a file type (`tensor_type_for`, `plan_tensor_types`).
"""
from __future__ import annotations

from qedit.kernels.mixes import (
    MixModel,
    ftype_from_name,
    mix_model_from_metadata,
    plan_tensor_types,
    supported_ftypes,
    tensor_type_for,
)
from qedit.kernels.registry import (
    QuantizedTensor,
    QuantKernel,
    dequantize_tensor,
    get_kernel,
    quantize_tensor,
    quantize_with_fallback,
    resolve_type,
    supported_types,
)

__all__ = [
    "MixModel",
    "QuantKernel",
    "QuantizedTensor",
    "dequantize_tensor",
    "ftype_from_name",
    "get_kernel",
    "mix_model_from_metadata",
    "plan_tensor_types",
    "quantize_tensor",
    "quantize_with_fallback",
    "resolve_type",
    "supported_ftypes",
    "supported_types",
    "tensor_type_for",
]
