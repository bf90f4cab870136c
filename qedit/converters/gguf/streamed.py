"""A GGUF model edited within a memory budget: the plan (the whole model in float32 when it fits, else its
frozen weights streamed from the file), and the streamed model itself.

`memory_plan` sizes the model from the file's tensor table alone. When the float32 model, the process as it is
and the job's workload fit in the budget, the model is loaded whole (`to_torch.build_model`, as without a
budget). Otherwise `build_streamed` builds it on the meta device, decodes only the small parameters (norms,
biases) and hands the rest to `qedit.core.streaming`, with `GGUFWeights` as its source: each HF parameter
decoded by pread from the file (`rows.TensorReader`, nothing left in the resident set) with llama.cpp's
conversion undone (`to_torch.as_parameter`); rows of a fused attn_qkv, of the embedding and of the LM head are
decoded alone. A budget too small even for that is one line naming the model, the budget and what it lacks.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from qedit.converters.gguf.archs import GGUFArch, to_hf
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.gguf.to_torch import as_parameter, check_unused, meta_model, parameter_sources
from qedit.core.arch import arch_for_model_type
from qedit.core.memory import MemoryBudget, MiB, Shape, Workload, current_rss, format_size, too_small
from qedit.core.streaming import Streamer, stream

log = logging.getLogger(__name__)

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
_EMBEDDING, _HEAD = "token_embd.weight", "output.weight"
HEAD_CHUNK_BYTES = 32 * MiB   # decoded LM head rows per chunk of a streamed logits pass
SLACK = 64 * MiB              # allocator and interpreter headroom kept out of every plan


@dataclass(frozen=True)
class MemoryPlan:
    """How a model is held: `whole` in float32, or streamed with a cache of `cache_bytes` decoded matrices."""

    whole: bool
    budget: MemoryBudget
    model_bytes: int              # the whole model in the load dtype
    needed: int                   # what the process needs at least, this way
    cache_bytes: int = 0
    head_chunk_rows: int = 0
    work_bytes: int = 0           # what the job's passes (or solves) may take besides what it holds throughout
    stats_dtype: torch.dtype = torch.float64

    def describe(self, label: str) -> str:
        if self.whole:
            return f"{label}: {format_size(self.model_bytes)} in float32, held whole"
        return (f"{label}: {format_size(self.model_bytes)} in float32 does not fit the memory budget of "
                f"{format_size(self.budget.total)}; its layers are decoded from the file as passes need them "
                f"(a cache of {format_size(self.cache_bytes)} keeps the ones that fit)")


def _sizes(gf: GGUFFile, size: int) -> tuple[int, int, int, int]:
    """(the whole model, its resident parameters, its largest decoder layer, its largest matrix) in bytes at `size`
    bytes per value, from the tensor table."""
    layers: dict[int, int] = {}
    largest = resident = total = 0
    for name, info in gf.tensors.items():
        n = int(np.prod(info.shape, dtype=np.int64)) * size
        total += n
        m = _LAYER_TENSOR.match(name)
        if m and len(info.shape) >= 2:
            layers[int(m[1])] = layers.get(int(m[1]), 0) + n
            largest = max(largest, n)
        elif name not in (_EMBEDDING, _HEAD):
            resident += n
    return total, resident, max(layers.values(), default=0), largest


def stream_floor(gf: GGUFFile, config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(what the process needs at least to run `gf` streamed, its LM head rows per chunk), bytes: the process as it
    is, the resident parameters, one decoder layer and one more matrix (a backward pass decodes one again while
    the next is in use), a chunk of LM head rows, and headroom; the edit's workload comes on top."""
    size = dtype.itemsize
    _, resident, layer, largest = _sizes(gf, size)
    shape = Shape.of(config)
    chunk_rows = max(1, min(shape.vocab, HEAD_CHUNK_BYTES // (shape.d_model * size)))
    return current_rss() + resident + layer + largest + 2 * chunk_rows * shape.d_model * size + SLACK, chunk_rows


def memory_plan(gf: GGUFFile, config: PretrainedConfig, budget: MemoryBudget, work: Workload,
                dtype: torch.dtype = torch.float32, stream_anyway: bool = False,
                cache_limit: int | None = None) -> MemoryPlan:
    """The plan for `gf` under `budget` with `work` on top (see the module's docstring). `stream_anyway` streams
    even a model that fits; `cache_limit` caps the cache (both for tests and for keeping memory low)."""
    size = dtype.itemsize
    model_bytes, _, layer, _ = _sizes(gf, size)
    shape = Shape.of(config)
    work_bytes = work.bytes(shape)
    whole_needs = current_rss() + model_bytes + work_bytes + SLACK
    if not stream_anyway and (not budget.enforced or whole_needs <= budget.total):
        return MemoryPlan(True, budget, model_bytes, whole_needs)
    floor, chunk_rows = stream_floor(gf, config, dtype)
    needed = floor + work_bytes
    if budget.enforced and needed > budget.total:
        raise too_small(gf.path.name, budget, needed, f"editing this model layer by layer (its layers are "
                        f"{format_size(layer)} each in float32, the edit's batches, statistics and edited matrices "
                        f"{format_size(work_bytes)})")
    room = budget.total - needed if budget.enforced else 1 << 62
    wide = 4 * work.stats_layers * shape.d_ff ** 2     # float64 sums instead of float32 ones, when they fit
    stats_dtype = torch.float64 if room >= wide else torch.float32
    room -= wide if stats_dtype == torch.float64 and budget.enforced else 0
    cache = max(0, min(room, model_bytes if cache_limit is None else cache_limit))
    return MemoryPlan(False, budget, model_bytes, needed, cache, chunk_rows, work_bytes - work.held(shape), stats_dtype)


class GGUFWeights:
    """`qedit.core.streaming.WeightSource` of a GGUF file: HF parameters decoded on demand."""

    def __init__(self, gf: GGUFFile, spec: GGUFArch, model: PreTrainedModel, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.gf, self.spec, self.config = gf, spec, model.config
        self.sources = parameter_sources(gf, spec, model)
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.reader = TensorReader(gf)
        self.device, self.dtype = torch.device(device), dtype

    def _out(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(device=self.device, dtype=self.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        source = self.sources[name]
        if source.rows is not None:   # one of q, k, v of a fused attn_qkv: only its rows
            parts = [torch.from_numpy(self.reader.rows(source.parts[0], *source.rows))]
        else:
            parts = [torch.from_numpy(self.reader.tensor(part)) for part in source.parts]
        values = as_parameter(self.gf, self.spec, self.config, source, name, parts, self.shapes[name], cut=False)
        return values.to(device=self.device, dtype=self.dtype)

    def _plain(self, name: str) -> str:
        """The one GGUF tensor a row-read parameter is stored in, as it is (no conversion applies)."""
        source = self.sources[name]
        probe = torch.zeros(1, 1, device="meta")   # only its identity matters
        if source.rows is not None or len(source.parts) != 1 or to_hf(self.spec, source.name, probe, 1, 1) is not probe:
            raise ValueError(f"{name}: stored as {source.parts}, not as one plain GGUF tensor; rows cannot be read alone")
        return source.parts[0]

    def rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        return self._out(self.reader.row_ids(self._plain(name), ids))

    def row_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self._out(self.reader.rows(self._plain(name), lo, hi))


def build_streamed(gf: GGUFFile, config: PretrainedConfig, plan: MemoryPlan, dtype: torch.dtype = torch.float32,
                   device: torch.device = torch.device("cpu")) -> tuple[PreTrainedModel, Streamer]:
    """The model for `config` with its small parameters decoded and its matrices streamed from `gf`."""
    spec, model = meta_model(gf, config, dtype)
    weights = GGUFWeights(gf, spec, model, device, dtype)
    arch = arch_for_model_type(config.model_type, source=gf.path.name)
    layers = [model.get_submodule(arch.layer.format(i)) for i in range(int(getattr(config, arch.n_layers_attr)))]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    layer_params = {id(p) for layer in layers for p in layer.parameters() if p.dim() >= 2}
    streamed = layer_params | {id(embedding.weight), id(head.weight)}
    state = {name: weights.tensor(name) for name, p in model.named_parameters() if id(p) not in streamed}
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():   # the buffers (rotary frequencies) were made on the CPU: to the model's device
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)
    check_unused(gf, weights.sources)
    streamer = stream(model, weights, layers, (embedding, "weight"), (head, "weight"), device, plan.cache_bytes,
                      plan.head_chunk_rows, dtype, plan.work_bytes if plan.budget.enforced else 1 << 62,
                      plan.stats_dtype)
    model.config.dtype = dtype
    log.info("%s", plan.describe(gf.path.name))
    return model.eval(), streamer
