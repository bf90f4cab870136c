"""Open any model source qedit edits as a `LoadedModel`: an HF directory, a GGUF file or a GPTQ checkpoint
(dequantized by qedit's reader), in full precision and eval mode, within a memory budget.

A GGUF model whose float32 weights do not fit the budget is loaded streamed (`converters/gguf/streamed.py`):
its frozen weights stay in the file and are decoded layer by layer as passes need them. `read_header` gives a
model's config and tokenizer without its weights, for checks that must come before any model work.

`device_map="auto"` spreads a model held whole over the machine's accelerators with accelerate's device map
(`spread`); its hooks move each layer's inputs to that layer's device. A streamed model is not spread.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qedit.converters.gguf.config import build_config
from qedit.converters.gguf.patch import read_manifests
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.streamed import build_streamed, memory_plan, stream_floor
from qedit.converters.gguf.to_torch import build_model, build_tokenizer, stored_types
from qedit.converters.gptq.checkpoint import is_gptq_checkpoint
from qedit.converters.gptq.export import load_dequantized
from qedit.converters.ollama import blob_label
from qedit.core.arch import ArchSpec, arch_for_model_type
from qedit.core.errors import QeditError
from qedit.core.memory import (
    MemoryBudget,
    Shape,
    Workload,
    current_rss,
    format_size,
    return_freed_memory,
    too_small,
)
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
                    work: Workload | None = None, device_map: str | None = None) -> LoadedModel:
    """A GGUF file, every tensor dequantized (the types it is stored in are kept in `stored_types`), or, when its
    float32 weights do not fit `budget` besides `work`, streamed from the file (refused with a `device_map`)."""
    budget = budget or MemoryBudget(0)
    with GGUFFile(path) as gf:
        config = build_config(gf)
        tokenizer = build_tokenizer(gf, config)
        plan = memory_plan(gf, config, budget, work or Workload(), dtype, budget.stream, budget.cache_limit)
        if device_map is not None and not plan.whole:
            raise QeditError(f"{path.name}: --device-map {device_map} spreads a model held whole, but this one does not "
                             f"fit the memory budget of {format_size(budget.total)} and would be streamed layer by layer "
                             "from the file; raise --max-memory, or leave out --device-map")
        streamer = None
        if plan.whole:
            model = build_model(gf, config, dtype=dtype, device=device)
        else:
            # a streamed edit runs close to its budget: freed temporaries must leave RSS (at some cost in speed,
            # so only here)
            return_freed_memory()
            model, streamer = build_streamed(gf, config, plan, dtype=dtype, device=device)
        stored = stored_types(gf, model)
        manifests = read_manifests(gf)
    arch = arch_for_model_type(model.config.model_type, source=str(path))
    model.eval().requires_grad_(False)  # methods train their own delta tensors, never the weights
    return LoadedModel(model, finish_tokenizer(tokenizer), arch, path, "gguf", device, stored_types=stored,
                       label=blob_label(path) or "", streamer=streamer,
                       lineage=str(manifests[0].get("source_sha256") or "") if manifests else "")


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
               max_memory: MemoryBudget | int | str | None = None, work: Workload | None = None,
               device_map: str | None = None) -> LoadedModel:
    """Load an HF model directory, a .gguf file or a GPTQ checkpoint for editing (full precision, eval mode).

    `max_memory` (bytes, text such as '10GiB', or a MemoryBudget; None: no budget) bounds what the process holds
    with `work` (the edit's batches, statistics and edited matrices) on top: a GGUF model that does not fit
    whole is streamed, anything else that does not fit is a one-line error. `device_map="auto"`: the model is
    loaded on the CPU and then spread over the available devices (`spread`); `device` must be the CPU then."""
    path = Path(source)
    device = torch.device(device)
    if device_map is not None:
        check_device_map(device_map)
        if device.type != "cpu":
            raise QeditError(f"--device-map {device_map} places the model's layers itself; leave out --device {device}")
    kind = _kind(path)
    budget = max_memory if isinstance(max_memory, MemoryBudget) or max_memory is None else MemoryBudget.resolve(max_memory)
    log.info("loading %s", path)
    if kind == "gguf":
        loaded = load_gguf_model(path, device, dtype, budget, work, device_map)
    else:
        if budget is not None:
            _check_fits(path, budget, work or Workload())
        # a GPTQ checkpoint is dequantized by qedit's reader: full-precision work needs no GPTQ kernels
        loaded = load_dequantized(path, device, dtype) if kind == "gptq" else load_hf_dir(path, device, dtype)
    return spread(loaded, device_map) if device_map is not None else loaded


DEVICE_MAPS = ("auto",)


def check_device_map(device_map: str) -> None:
    if device_map not in DEVICE_MAPS:
        raise QeditError(f"--device-map {device_map!r}: the supported maps are {', '.join(DEVICE_MAPS)}")


def spread(loaded: LoadedModel, device_map: str = "auto") -> LoadedModel:
    """`loaded` (held whole, on the CPU) spread over the machine's devices with accelerate's device map, as
    transformers' device_map="auto" does: `infer_auto_device_map` over the accelerators' memory balanced by
    `get_balanced_memory`, decoder layers kept whole (the model's `_no_split_modules`), then `dispatch_model`, whose
    hooks move each module's inputs to its device. Without an accelerator the map is the CPU alone. A model that
    does not fit the accelerators is refused: accelerate would offload the rest to the CPU or disk, leaving weights
    on the meta device that an edit cannot read or change. The returned model's `device` is its input embedding's."""
    check_device_map(device_map)
    if loaded.streamer is not None:
        raise QeditError(f"{loaded.source.name}: --device-map {device_map} cannot spread a model streamed layer by layer "
                         "from its file; raise --max-memory, or leave out --device-map")
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory, get_max_memory
    except ImportError:
        raise QeditError(f"--device-map {device_map} needs accelerate: pip install accelerate") from None
    model = loaded.model
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    accelerators = {k: v for k, v in get_max_memory().items() if k not in ("cpu", "disk")}
    if accelerators:
        budget = get_balanced_memory(model, max_memory=accelerators, no_split_module_classes=no_split, dtype=dtype)
    else:   # the CPU alone, which holds the model already
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = {"cpu": 2 * held + (1 << 30)}
    placement = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    offloaded = sorted({str(d) for d in placement.values()} & {"cpu", "disk"}) if accelerators else []
    if offloaded:
        free = format_size(sum(int(v) for v in accelerators.values()))
        raise QeditError(f"{loaded.source.name}: does not fit the {len(accelerators)} accelerator(s) ({free} free); "
                         f"--device-map {device_map} would offload part of it to the {' and '.join(offloaded)}, which "
                         "qedit does not do; use a machine with more accelerator memory, or --device cpu")
    dispatch_model(model, placement)
    device = model.get_input_embeddings().weight.device
    log.info("%s spread over %s with accelerate's device map", loaded.source.name,
             ", ".join(sorted({str(d) for d in placement.values()})))
    return dataclasses.replace(loaded, device=device)
