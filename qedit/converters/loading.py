"""Open any model source qedit edits as a `LoadedModel`: an HF directory, a GGUF file or a GPTQ
checkpoint (dequantized by qedit's reader), in full precision and eval mode."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from qedit.converters.gguf.to_torch import load_gguf
from qedit.converters.gptq.checkpoint import is_gptq_checkpoint
from qedit.converters.gptq.export import load_dequantized
from qedit.converters.ollama import blob_label
from qedit.core.arch import arch_for_model_type
from qedit.core.errors import QeditError
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


def load_gguf_model(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A GGUF file, every tensor dequantized (the types it is stored in are kept in `stored_types`)."""
    model, tokenizer, stored_types = load_gguf(path, dtype=dtype, device=device)
    arch = arch_for_model_type(model.config.model_type, source=str(path))
    model.eval().requires_grad_(False)  # methods train their own delta tensors, never the weights
    return LoadedModel(model, finish_tokenizer(tokenizer), arch, path, "gguf", device, stored_types=stored_types,
                       label=blob_label(path) or "")


def load_model(source: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load an HF model directory, a .gguf file or a GPTQ checkpoint for editing (full precision, eval mode)."""
    path = Path(source)
    device = torch.device(device)
    if not path.exists():
        raise QeditError(f"{path}: no such file or directory; give an HF model directory or a .gguf file")
    log.info("loading %s", path)
    if path.is_dir():
        if is_gptq_checkpoint(path):  # dequantized by qedit's reader: full-precision work needs no GPTQ kernels
            return load_dequantized(path, device, dtype)
        return load_hf_dir(path, device, dtype)
    if path.suffix.lower() == ".gguf" or is_gguf_file(path):
        return load_gguf_model(path, device, dtype)
    raise QeditError(f"{path}: not a model directory or a GGUF file; give an HF model directory or a .gguf file")
