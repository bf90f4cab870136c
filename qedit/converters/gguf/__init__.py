"""GGUF files: reading (`read`), the streaming writer (`write`), names, vocabulary and HF config mapping,
loading into torch (`to_torch`), export, patch, LoRA adapters, the edit keys carried in a file (`keys`) and
the bridge to edit-aware encoding (`aware`)."""
