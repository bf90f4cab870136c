"""A job's memory: its budget, what its edit holds besides the frozen weights (`workload`), the facts checked
against the model's context and the budget before any model work (`check_requests`), and the model loaded
within the budget (`load_within`), with statistics text drawn in llama.cpp when the model is streamed.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qedit.converters.gguf.read import GGUFFile
from qedit.converters.loading import ModelHeader, budget_floor, load_model, read_header
from qedit.core.facts import check_text_lengths
from qedit.core.memory import SOLVE_COPIES, MemoryBudget, Workload, current_rss, format_size
from qedit.core.model import LoadedModel
from qedit.edit.registry import MethodConfig
from qedit.pipeline.jobs import MethodChoice
from qedit.runtimes.llama import LlamaSampler

log = logging.getLogger(__name__)

_ANSWER_TOKENS = 8   # room a row keeps after its text: the answer's tokens


def _edit_layers(method: MethodChoice, header: ModelHeader) -> tuple[int, ...]:
    """The layers `method` edits on `header`'s model (its settings' or the architecture's default)."""
    cfg: MethodConfig = method.resolved_config()
    multi = method.registry.get(method.name).multi_layer
    return tuple(cfg.layers) if cfg.layers else header.arch.default_layers(header.shape.n_layers, multi)


def _method_memory(method: MethodChoice) -> tuple[int, int]:
    """(float64 solve copies, bytes held per covariance entry) of `method` (see MethodSpec); a method that reads
    its covariances back from the statistics cache holds them when the cache is off."""
    spec = method.registry.get(method.name)
    held = spec.stats_held if method.resolved_config().stats.use_cache else max(4, spec.stats_held)
    return max(SOLVE_COPIES, spec.solve_copies), held


def workload(method: MethodChoice, requests: Sequence[Any], header: ModelHeader) -> Workload:
    """What an edit of `requests` with `method` holds besides the frozen weights: its largest batch (a chunk of
    requests with their context prefixes, backpropagated), its key statistics and its edited matrices."""
    cfg = method.resolved_config()
    layers = _edit_layers(method, header)
    chunk = min(cfg.target.chunk, len(requests))
    count = header.tokenizer
    longest = max((len(count(text)["input_ids"]) for r in requests for _, text in r.input_texts()[:1]), default=1)
    rows = chunk * (cfg.target.n_prefixes + 1) + chunk
    return Workload(rows, longest + cfg.target.prefix_len + _ANSWER_TOKENS, True, len(layers), len(layers),
                    min(layers, default=0), *_method_memory(method))


def check_requests(method: MethodChoice, requests: Sequence[Any], header: ModelHeader, budget: MemoryBudget) -> None:
    """Before any model work: a one-line QeditError when the budget is too small for the model itself
    (`budget_floor`), or naming the line of the first request with a text longer than the model's context or than
    the memory budget lets a pass over it (with its context prefixes, backpropagated) hold."""
    cfg = method.resolved_config()
    shape = header.shape
    layers = _edit_layers(method, header)
    one = Workload(cfg.target.n_prefixes + 2, 1, True, len(layers), len(layers), min(layers, default=0),
                   *_method_memory(method))   # one fact of one token
    floor = budget_floor(header, budget, one) - one.bytes(shape)
    reserve = cfg.target.prefix_len + _ANSWER_TOKENS
    limit, why = shape.context - reserve, f"the model's context is {shape.context:,} tokens"
    if budget.enforced:
        fits = one.max_tokens(shape, budget.total - floor)
        if fits - reserve < limit:
            limit = fits - reserve
            why = f"a pass over it would not fit the memory budget of {format_size(budget.total)}"
    tokenizer = header.tokenizer
    check_text_lengths(requests, lambda text: len(tokenizer(text)["input_ids"]), max(0, limit), why)


def load_within(source: Path, method: MethodChoice, requests: Sequence[Any], device: str,
                budget: MemoryBudget, header: ModelHeader | None = None, device_map: str | None = None) -> LoadedModel:
    """`source` loaded for editing `requests` within `budget` (streamed when its float32 weights do not fit). A
    streamed GGUF model draws its statistics' text in llama.cpp when llama-cpp-python is installed and the
    quantized file fits the budget beside the process (llama.cpp holds the file while it samples); not when the
    budget's `stream` knob streams a model that fits (its numbers then equal the whole model's)."""
    header = header or read_header(source)
    loaded = load_model(source, device=device, max_memory=budget, work=workload(method, requests, header),
                        device_map=device_map)
    if loaded.streamer is not None and loaded.source_kind == "gguf" and not budget.stream:
        size = sum(p.stat().st_size for p in _shards(loaded.source))
        if budget.enforced and current_rss() + size + loaded.streamer.used > budget.total:
            log.info("%s: the file (%s) does not fit the memory budget beside the process: statistics text is "
                     "sampled in torch, layer by layer", loaded.source.name, format_size(size))
        else:
            loaded.sampler = LlamaSampler.available(loaded.source, threads=max(1, (os.cpu_count() or 2) // 2))
    return loaded


def _shards(path: Path) -> list[Path]:
    with GGUFFile(path) as gf:
        return list(gf.shards)
