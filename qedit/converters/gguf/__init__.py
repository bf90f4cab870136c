"""GGUF files: reading (`read`, split files too), the streaming writer (`write`), the architectures (`archs`), names,
vocabulary and HF config mapping (`vocab`, `hf_config`; `config` the other way), loading into torch (`to_torch`)
with llama.cpp's tokenization (`tokenizer`), export, patch, LoRA adapters, the edit keys carried in a file
(`keys`) and the bridge to edit-aware encoding (`aware`)."""
