"""Readers and writers for quantized model file formats (GGUF, GPTQ) and their conversion to torch."""
