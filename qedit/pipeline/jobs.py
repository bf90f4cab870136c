"""What a user asks qedit to do, as typed data: the model, the requests, the method and the output.

The CLI turns its flags into these at the boundary; the Python API builds them directly. Nothing
below this layer sees a command-line namespace. Checks that need no model run in `__post_init__`; checks against the
files on disk run in `qedit.pipeline.plan` before any model work starts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qedit.converters.ollama import OllamaModel
from qedit.core.errors import QeditError
from qedit.core.memory import MemoryBudget
from qedit.edit.compute import EditOutcome
from qedit.edit.registry import EDIT_METHODS, MethodConfig, MethodRegistry
from qedit.kernels.gptq import GPTQConfig
from qedit.unlearn.registry import UNLEARN_METHODS

OUTPUT_FORMATS = ("hf", "gptq")


@dataclass(frozen=True)
class MethodChoice:
    """Which method computes the deltas, with which settings, in batches of which size."""

    name: str
    config: MethodConfig | None = None       # None: the method's defaults
    batch_size: int | None = None            # sequential batches (None: all requests at once)

    def __post_init__(self) -> None:
        if self.name not in EDIT_METHODS and self.name not in UNLEARN_METHODS:
            names = EDIT_METHODS.names() + UNLEARN_METHODS.names()
            raise QeditError(f"unknown method {self.name!r}; choose one of: {', '.join(names)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise QeditError(f"batch size must be at least 1, got {self.batch_size}")
        if self.config is not None and not isinstance(self.config, self.registry.get(self.name).config_cls):
            raise QeditError(f"method {self.name} needs a {self.registry.get(self.name).config_cls.__name__}, "
                             f"not {type(self.config).__name__}")

    @property
    def unlearns(self) -> bool:
        return self.name in UNLEARN_METHODS

    @property
    def registry(self) -> MethodRegistry[Any]:
        return UNLEARN_METHODS if self.unlearns else EDIT_METHODS

    def resolved_config(self) -> MethodConfig:
        return self.config if self.config is not None else self.registry.get(self.name).config_cls()


@dataclass(frozen=True)
class Output:
    """Where and how the edited model is written.

    A path ending in .gguf is a GGUF file: a patch of a GGUF source, a whole-model export at `quant`, or a
    LoRA adapter (`as_lora`). Any other path is a directory: HF safetensors, or a GPTQ checkpoint
    (`format="gptq"`, or by default when the source is one).
    """

    path: Path
    quant: str | None = None                                 # llama.cpp file type of a GGUF export
    as_lora: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()           # (fnmatch pattern on GGUF names, GGML type name)
    format: str | None = None                                # directory outputs: "hf" or "gptq" (None: by source)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    naive: bool = False                                      # plain requantization, edit computed on the source
    verify: bool | None = None                               # the llama.cpp check (None: where it applies)
    hold_margin: float = 1.0                                 # nats each edit must keep in llama.cpp
    modelfile: bool = True                                   # a GGUF output: an Ollama Modelfile beside it

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.format is not None and self.format not in OUTPUT_FORMATS:
            raise QeditError(f"output format {self.format!r} is unknown; use one of {', '.join(OUTPUT_FORMATS)}")
        if not math.isfinite(self.hold_margin) or self.hold_margin < 0:
            raise QeditError(f"--hold-margin must be >= 0 nats, got {self.hold_margin}")
        if self.is_gguf:
            if self.format is not None:
                raise QeditError(f"{self.path}: --format applies to directory outputs; a .gguf output is always GGUF")
            if self.quant is not None and self.as_lora:
                raise QeditError("--quant and --as-lora are exclusive: an adapter is not quantized; choose one")
        else:
            if self.quant is not None or self.as_lora:
                raise QeditError(f"{self.path}: --quant and --as-lora write a GGUF file; give an output ending in .gguf")
            if self.tensor_types:
                raise QeditError("--tensor-type applies to GGUF outputs; give -o X.gguf")

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


@dataclass(frozen=True)
class EditJob:
    """One run of `qedit edit` or `qedit forget`: compute deltas for `requests` on `model`, write `output`.

    `outcome` replaces the method: an edit already computed on `model` (e.g. deltas saved by an earlier run),
    written as it is at every output. `quantized_base`, for an output the plan writes by patching the unedited
    model at the output's level (`Plan.via_base`), is a file that already holds that unedited model as the
    export writes it (the survival ladder's cache); without it the pipeline writes one to a temporary path
    beside the output. `ollama`: the Ollama model `model` is the GGUF blob of, whose TEMPLATE, PARAMETER and SYSTEM
    the Modelfile beside a GGUF output carries over. `max_memory` becomes a `MemoryBudget` (`budget`). `chat`: the
    edit is computed on each fact's one-turn chat as the model's chat template formats it (`qedit.pipeline.chat`),
    and `evaluate` adds the chat metrics.
    """

    model: Path
    requests: Sequence[Any]                                  # EditRequests, or ForgetRequests to unlearn
    method: MethodChoice
    output: Output
    device: str = "cpu"
    device_map: str | None = None                            # "auto": spread over the GPUs (converters.loading.spread)
    evaluate: bool = False                                   # measure before and after (torch, and the output)
    outcome: EditOutcome | None = None
    quantized_base: Path | None = None
    ollama: OllamaModel | None = None
    # the most memory the run may hold: bytes, text such as "10GiB", or a MemoryBudget; None: the machine's
    # available memory less room for the OS. A GGUF model whose float32 weights do not fit is streamed from the file.
    max_memory: int | str | MemoryBudget | None = None
    chat: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        if not isinstance(self.max_memory, MemoryBudget):
            object.__setattr__(self, "max_memory", MemoryBudget.resolve(self.max_memory))
        object.__setattr__(self, "requests", tuple(self.requests))
        if not self.requests:
            raise QeditError("no edit requests: give at least one fact")
        if self.method.unlearns and self.chat:
            raise QeditError("--chat edits facts in their chat form; unlearning has no chat form")
        if self.method.unlearns and self.output.verify:
            raise QeditError("--verify checks edits in llama.cpp; for unlearning use --require output:recovery_rate<=X, "
                             "which scores the written file in llama.cpp")

    @property
    def budget(self) -> MemoryBudget:
        assert isinstance(self.max_memory, MemoryBudget)
        return self.max_memory


def make_config(method: str, **overrides: Any) -> MethodConfig:
    """The config of any edit or unlearning method, with `overrides` (unknown keys are an error)."""
    return MethodChoice(method).registry.make_config(method, **overrides)
