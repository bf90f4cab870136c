"""File formats: GGUF (`gguf`) and GPTQ (`gptq`) readers and writers, and `loading`, which opens any
supported model source as a `LoadedModel`."""
