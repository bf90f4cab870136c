"""Open any model source qedit edits as a `LoadedModel`: an HF directory, a GGUF file or a GPTQ checkpoint
(dequantized by qedit's reader), in full precision and eval mode, within a memory budget.

A GGUF model whose float32 weights do not fit the budget is loaded streamed (`converters/gguf/streamed.py`):
its frozen weights stay in the file and are decoded layer by layer as passes need them. `read_header` gives a
model's config and tokenizer without its weights, for checks that must come before any model work.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qedit.converters.gguf.config import build_config
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.streamed import build_streamed, memory_plan, stream_floor
from qedit.converters.gguf.to_torch import build_model, build_tokenizer, stored_types
from qedit.converters.gptq.checkpoint import is_gptq_checkpoint
from qedit.converters.gptq.export import load_dequantized
from qedit.converters.ollama import blob_label
from qedit.core.arch import ArchSpec, arch_for_model_type
from qedit.core.errors import QeditError
from qedit.core.memory import MemoryBudget, Shape, Workload, current_rss, format_size, too_small
from qedit.core.model import LoadedModel, finish_tokenizer, is_gguf_file

log = logging.getLogger(__name__)


def load_hf_dir(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """An HF model directory (config.json, safetensors, tokenizer files)."""
    from transformers import AutoModelForCausalLM

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QeditError(f"{path}: not a model directory (no config.json); give an HF directory or a .gguf file")
    try:
        model_type = json.loads(cfg_path.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise QeditError(f"{cfg_path}: unreadable config ({exc}); expected an HF config.json with model_type") from exc
    arch = arch_for_model_type(model_type, source=str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = load_hf_tokenizer(path)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, finish_tokenizer(tokenizer), arch, path, "hf", device)


def load_hf_tokenizer(path: Path) -> Any:
    """The tokenizer saved in `path`. One saved as a plain `TokenizersBackend` (qedit's llama.cpp-exact tokenizer
    of a GGUF, see converters/gguf/tokenizer.py) is loaded as saved: AutoTokenizer would rebuild qwen2's and phi3's
    from vocabulary and merges alone, dropping the pre-tokenizer and added tokens that make it exact."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cfg_path = path / "tokenizer_config.json"
    try:
        saved_class = json.loads(cfg_path.read_text()).get("tokenizer_class") if cfg_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeditError(f"{cfg_path}: unreadable tokenizer config ({exc})") from None
    if saved_class == "TokenizersBackend" and (path / "tokenizer.json").is_file():
        return TokenizersBackend.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass(frozen=True)
class ModelHeader:
    """A model's config and tokenizer, read without its weights."""

    source: Path
    config: Any
    tokenizer: Any
    arch: ArchSpec

    @property
    def shape(self) -> Shape:
        return Shape.of(self.config)


def _kind(path: Path) -> str:
    if not path.exists():
        raise QeditError(f"{path}: no such file or directory; give an HF model directory or a .gguf file")
    if path.is_dir():
        return "gptq" if is_gptq_checkpoint(path) else "hf"
    if path.suffix.lower() == ".gguf" or is_gguf_file(path):
        return "gguf"
    raise QeditError(f"{path}: not a model directory or a GGUF file; give an HF model directory or a .gguf file")


def read_header(source: str | Path) -> ModelHeader:
    """The config and tokenizer of a model source (no weight is read)."""
    from transformers import AutoConfig

    path = Path(source)
    if _kind(path) == "gguf":
        with GGUFFile(path) as gf:
            config = build_config(gf)
            tokenizer = build_tokenizer(gf, config)
    else:
        if not (path / "config.json").is_file():
            raise QeditError(f"{path}: not a model directory (no config.json); give an HF directory or a .gguf file")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = load_hf_tokenizer(path)
    arch = arch_for_model_type(config.model_type, source=str(path))
    return ModelHeader(path, config, finish_tokenizer(tokenizer), arch)


def load_gguf_model(path: Path, device: torch.device, dtype: torch.dtype, budget: MemoryBudget | None = None,
                    work: Workload | None = None) -> LoadedModel:
    """A GGUF file, every tensor dequantized (the types it is stored in are kept in `stored_types`), or, when its
    float32 weights do not fit `budget` besides `work`, streamed from the file."""
    budget = budget or MemoryBudget(0)
    with GGUFFile(path) as gf:
        config = build_config(gf)
        tokenizer = build_tokenizer(gf, config)
        plan = memory_plan(gf, config, budget, work or Workload(), dtype, budget.stream, budget.cache_limit)
        streamer = None
        if plan.whole:
            model = build_model(gf, config, dtype=dtype, device=device)
        else:
            model, streamer = build_streamed(gf, config, plan, dtype=dtype, device=device)
        stored = stored_types(gf, model)
    arch = arch_for_model_type(model.config.model_type, source=str(path))
    model.eval().requires_grad_(False)  # methods train their own delta tensors, never the weights
    return LoadedModel(model, finish_tokenizer(tokenizer), arch, path, "gguf", device, stored_types=stored,
                       label=blob_label(path) or "", streamer=streamer)


def _whole_bytes(shape: Shape) -> int:
    """float32 bytes of a model's weights (its layers, embedding and an untied head), from its dimensions."""
    return shape.n_layers * shape.layer_bytes() + 2 * 4 * shape.vocab * shape.d_model


def budget_floor(header: ModelHeader, budget: MemoryBudget, work: Workload | None = None) -> int:
    """What the process needs at least to edit `header`'s model with `work` (its smallest workload: None for none):
    the model streamed from a GGUF file (its tensor table says how much), or held whole in float32 otherwise. A
    one-line QeditError when that is over `budget`, saying by how much."""
    extra = work.bytes(header.shape) if work is not None else 0
    if _kind(header.source) == "gguf":
        with GGUFFile(header.source) as gf:
            floor, _ = stream_floor(gf, header.config)
        what = "editing this model layer by layer"
    else:
        weights = _whole_bytes(header.shape)
        floor = current_rss() + weights
        what = (f"holding its {format_size(weights)} of float32 weights (qedit streams GGUF files layer by layer: "
                "export it first with `qedit export DIR -o model.gguf --quant F16`)")
    if extra:
        what += (f", with the edit's statistics, edited matrices and float64 solves ({format_size(extra)} for a "
                 f"{header.shape.d_ff}-wide MLP)")
    if budget.enforced and floor + extra > budget.total:
        raise too_small(header.source.name, budget, floor + extra, what)
    return floor + extra


def _check_fits(path: Path, budget: MemoryBudget, work: Workload) -> None:
    """An HF or GPTQ directory is held whole in float32: refuse one that does not fit (GGUF files stream)."""
    if not budget.enforced:
        return
    header = read_header(path)
    floor = budget_floor(header, budget)
    needed = floor + work.bytes(header.shape)
    if needed > budget.total:
        raise too_small(path.name, budget, needed, f"holding its {format_size(_whole_bytes(header.shape))} of float32 "
                        "weights and the edit's batches and statistics (qedit streams GGUF files layer by layer: "
                        "export it first with `qedit export DIR -o model.gguf --quant F16`)")


def load_model(source: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               max_memory: MemoryBudget | int | str | None = None, work: Workload | None = None) -> LoadedModel:
    """Load an HF model directory, a .gguf file or a GPTQ checkpoint for editing (full precision, eval mode).

    `max_memory` (bytes, text such as '10GiB', or a MemoryBudget; None: no budget) bounds what the process holds
    with `work` (the edit's batches, statistics and edited matrices) on top: a GGUF model that does not fit
    whole is streamed, anything else that does not fit is a one-line error."""
    path = Path(source)
    device = torch.device(device)
    kind = _kind(path)
    budget = max_memory if isinstance(max_memory, MemoryBudget) or max_memory is None else MemoryBudget.resolve(max_memory)
    log.info("loading %s", path)
    if kind == "gguf":
        return load_gguf_model(path, device, dtype, budget, work)
    if budget is not None:
        _check_fits(path, budget, work or Workload())
    if kind == "gptq":  # dequantized by qedit's reader: full-precision work needs no GPTQ kernels
        return load_dequantized(path, device, dtype)
    return load_hf_dir(path, device, dtype)
