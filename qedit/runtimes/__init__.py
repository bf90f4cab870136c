"""Runtimes that score text on a model as users run it: torch (`torch_runner`), llama.cpp (`llama`), GPTQ
checkpoints (`gptq`) and bitsandbytes in memory (`bnb`). All share the `Runner` protocol."""
