"""The memory budget on the packaged Gemma 3 270M (integration tier): a budget under its float32 size streams it,
and the statistics text of a streamed model is drawn in llama.cpp from the file itself."""
from __future__ import annotations

import torch

from qedit.converters.gguf.streamed import memory_plan
from qedit.converters.loading import read_header
from qedit.core.facts import EditRequest
from qedit.core.memory import MemoryBudget
from qedit.pipeline.budget import load_within, workload
from qedit.pipeline.jobs import MethodChoice, make_config
from qedit.runtimes.llama import LlamaSampler

FACT = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")


def test_llama_sampler_draws_seeded_sequences_from_bos(gemma_gguf):
    sampler = LlamaSampler(gemma_gguf)
    first, again = sampler(3, 12, seed=0), sampler(3, 12, seed=0)
    assert first == again and len(first) == 3 and all(len(s) == 12 and s[0] == 2 for s in first)
    assert sampler(3, 12, seed=1) != first


def test_a_budget_under_the_float32_size_streams_gemma_with_the_llama_sampler(gemma_gguf):
    from qedit.converters.gguf.read import GGUFFile

    method = MethodChoice("rome", make_config("rome"))
    header = read_header(gemma_gguf)
    work = workload(method, [FACT], header)
    with GGUFFile(gemma_gguf) as gf:
        whole = memory_plan(gf, header.config, MemoryBudget(0), work)
        streamed = memory_plan(gf, header.config, MemoryBudget(0), work, stream_anyway=True)
    budget = MemoryBudget((whole.needed + streamed.needed) // 2, explicit=True)   # between the two
    loaded = load_within(gemma_gguf, method, [FACT], "cpu", budget, header)
    assert loaded.streamer is not None and isinstance(loaded.sampler, LlamaSampler)
    assert loaded.streamer.capacity <= budget.total - streamed.needed
    with torch.no_grad():
        ids = loaded.tokenizer("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
        top = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
    assert loaded.tokenizer.decode([top]).strip()
