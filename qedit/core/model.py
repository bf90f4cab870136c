"""`LoadedModel`: a torch causal LM, its tokenizer and where it came from (the loaders live in
`qedit.converters.loading`), and the fingerprint of a source file or directory."""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qedit.core.arch import ArchSpec, Orientation
from qedit.core.errors import QeditError
from qedit.core.streaming import Streamer

log = logging.getLogger(__name__)


class TextSampler(Protocol):
    """Draws text from a model: sampler(n_samples, sample_len, seed) -> n_samples token sequences of sample_len,
    each starting with BOS. `name` tells its corpus apart in caches."""

    name: str

    def __call__(self, n_samples: int, sample_len: int, seed: int) -> list[list[int]]: ...


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the facts about where it came from."""

    model: Any                      # transformers PreTrainedModel, eval mode
    tokenizer: Any                  # transformers PreTrainedTokenizerBase
    arch: ArchSpec
    source: Path
    source_kind: str                # "hf", "gguf" or "gptq"
    # where inputs go: the device of the input embedding (with a device map, the first of the model's devices). A
    # layer's values, weights and edits live on that layer's device (`layer_device`); logits come back here.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # HF weight name -> the GGML type name it is stored in, for a model loaded from a GGUF file ({} otherwise)
    stored_types: dict[str, str] = field(default_factory=dict)
    label: str = ""                 # how the user knows the source when its file name says nothing (ollama:NAME:TAG)
    # the model's frozen weights are decoded from the source layer by layer (qedit.core.streaming), or None when
    # they are held in memory
    streamer: Streamer | None = None
    # draws the statistics' text from the source itself (e.g. in llama.cpp, much faster than a streamed torch
    # model), set by the pipeline for a streamed model: sampler(n_samples, sample_len, seed) -> token sequences
    sampler: TextSampler | None = None
    # sha256 of the unedited file a qedit-patched GGUF descends from (its first manifest's source; "" for other
    # sources): a patch of a patch uses that file's key statistics when the cache holds them (qedit.core.stats)
    lineage: str = ""

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

    def layer_of(self, name: str) -> int | None:
        """The decoder layer that module `name` is (or is inside of); None for modules outside the layers."""
        for i in range(self.n_layers):
            layer = self.arch.layer.format(i)
            if name == layer or name.startswith(layer + "."):
                return i
        return None

    def edit_shape(self, layer: int) -> tuple[int, int]:
        """(out, in) of the edit-target weight at `layer`, without reading it."""
        self.check_layer(layer)
        shape = tuple(self.module(self.arch.mlp_out.format(layer)).weight.shape)
        return shape if self.arch.mlp_out_orientation is Orientation.OUT_IN else shape[::-1]  # type: ignore[return-value]

    def layer_device(self, layer: int) -> torch.device:
        """The device of the edit-target weight at `layer` (its decoder layer's, with a device map), without
        reading it."""
        self.check_layer(layer)
        return self.module(self.arch.mlp_out.format(layer)).weight.device

    def edit_weight(self, layer: int) -> torch.Tensor:
        """The edit-target weight at `layer` in math orientation (out, in); a view, not a copy. A streamed weight is
        pinned (held decoded in full precision from then on)."""
        self.check_layer(layer)
        name = self.arch.weight_name(layer)
        if self.streamer is not None and self.streamer.streams(name):
            w = self.streamer.pin(name)
        else:
            w = self.module(self.arch.mlp_out.format(layer)).weight
        return w if self.arch.mlp_out_orientation is Orientation.OUT_IN else w.t()


_SPLIT_FIRST = re.compile(r"^(.*)-00001-of-(\d{5})\.gguf$")


def fingerprint_source(source: Path) -> str:
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json"
    )
    split = _SPLIT_FIRST.match(source.name) if source.is_file() else None
    if split is not None:  # the first shard of a split GGUF stands for all of them
        shards = (source.with_name(f"{split[1]}-{i:05d}-of-{split[2]}.gguf") for i in range(2, int(split[2]) + 1))
        files += [shard for shard in shards if shard.is_file()]
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def finish_tokenizer(tokenizer: Any) -> Any:
    # Batched evaluation pads on the right; models without a pad token (gpt2) reuse eos.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def is_gguf_file(path: Path) -> bool:
    """True for an existing file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"
