"""Loading an HF directory or a GGUF file into a torch model plus tokenizer (`LoadedModel`)."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qedit.arch import ArchSpec, Orientation, arch_for_model_type
from qedit.errors import QeditError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the facts about where it came from."""

    model: Any                      # transformers PreTrainedModel, eval mode
    tokenizer: Any                  # transformers PreTrainedTokenizerBase
    arch: ArchSpec
    source: Path
    source_kind: str                # "hf" or "gguf"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gguf: Any = None                # qedit.converters.gguf_read.GGUFFile when loaded from GGUF

    @property
    def n_layers(self) -> int:
        return int(getattr(self.model.config, self.arch.n_layers_attr))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the source weights (the GGUF file, or the directory's weight files)."""
        return fingerprint_source(self.source)

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as exc:
            raise QeditError(f"{self.source}: module {name!r} not found for arch {self.arch.name}") from exc

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise QeditError(
                f"layer {layer} is out of range for {self.source.name}: it has {self.n_layers} layers (0..{self.n_layers - 1})"
            )

    def edit_weight(self, layer: int) -> torch.Tensor:
        """The edit-target weight at `layer` in math orientation (out, in); a view, not a copy."""
        self.check_layer(layer)
        w = self.module(self.arch.mlp_out.format(layer)).weight
        return w if self.arch.mlp_out_orientation is Orientation.OUT_IN else w.t()


def fingerprint_source(source: Path) -> str:
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json"
    )
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _finish_tokenizer(tokenizer: Any) -> Any:
    # Batched evaluation pads on the right; models without a pad token (gpt2) reuse eos.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_hf_dir(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QeditError(f"{path}: not a model directory (no config.json); give an HF directory or a .gguf file")
    try:
        model_type = json.loads(cfg_path.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise QeditError(f"{cfg_path}: unreadable config ({exc}); expected an HF config.json with model_type") from exc
    arch = arch_for_model_type(model_type, source=str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, _finish_tokenizer(tokenizer), arch, path, "hf", device)


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from qedit.converters.gguf_to_torch import load_gguf

    model, tokenizer, gguf_file = load_gguf(path, dtype=dtype, device=device)
    arch = arch_for_model_type(model.config.model_type, source=str(path))
    model.eval().requires_grad_(False)  # methods train their own delta tensors, never the weights
    return LoadedModel(model, _finish_tokenizer(tokenizer), arch, path, "gguf", device, gguf=gguf_file)


def load_model(source: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load an HF model directory or a .gguf file for editing (full precision, eval mode)."""
    path = Path(source)
    device = torch.device(device)
    if not path.exists():
        raise QeditError(f"{path}: no such file or directory; give an HF model directory or a .gguf file")
    log.info("loading %s", path)
    if path.is_dir():
        from qedit.converters.gptq import is_gptq_checkpoint

        if is_gptq_checkpoint(path):  # dequantized by qedit's reader: full-precision work needs no GPTQ kernels
            from qedit.converters.gptq_export import load_dequantized

            return load_dequantized(path, device, dtype)
        return _load_hf_dir(path, device, dtype)
    if path.suffix.lower() == ".gguf" or is_gguf_file(path):
        return _load_gguf(path, device, dtype)
    raise QeditError(f"{path}: not a model directory or a GGUF file; give an HF model directory or a .gguf file")


def is_gguf_file(path: Path) -> bool:
    """True for an existing file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"
