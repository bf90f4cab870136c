"""The rules that decide what `qedit edit` and `qedit forget` write, checked before any model work.

- Which writer: a GGUF patch, a GGUF export at a llama.cpp file type, a GGUF LoRA adapter, an HF directory,
  a GPTQ checkpoint written from the model, or a patch of a GPTQ source.
- Which model the edit is computed on. Below 5 bits (GGUF types coarser than Q5_*, GPTQ at 2-4 bits) the
  edit is computed on the model as it will ship: the unedited model is exported first and the edit is patched
  into that file, edit-aware. An edit-aware GPTQ output always patches the unedited checkpoint; at 8 bits
  with the source's edit. There quantizing the rest of the model moves the keys and residuals an edit
  computed in full precision relies on (benchmarks/RESULTS.md, "Quantization-aware editing" and "GPTQ").
  At 5 bits and more the source's edit is kept and encoded edit-aware: the keys barely move there, and an
  edit computed again on slightly different weights only adds its own spread.
- Whether the written file is checked in llama.cpp (`qedit.pipeline.verify`).
"""
from __future__ import annotations

import enum
import fnmatch
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qedit.converters.gptq.checkpoint import is_gptq_checkpoint
from qedit.converters.ollama import refuse_store_output
from qedit.core.errors import QeditError
from qedit.core.files import check_output_dir, refuse_same_file
from qedit.core.model import is_gguf_file
from qedit.kernels.mixes import ftype_from_name
from qedit.kernels.registry import supported_types
from qedit.pipeline.jobs import EditJob

log = logging.getLogger(__name__)

# llama.cpp file types at which the edit is computed on the source weights; coarser ones compute it on the
# quantized model
SOURCE_EDIT_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1"})
SOURCE_EDIT_GPTQ_BITS = frozenset({8})


class OutputKind(str, enum.Enum):
    HF = "hf"                     # full-precision safetensors directory
    GGUF_PATCH = "gguf-patch"     # re-encode only the edited tensors of a GGUF file
    GGUF_EXPORT = "gguf-export"   # a whole GGUF at a llama.cpp file type
    GGUF_LORA = "gguf-lora"       # the edit as a LoRA adapter for the source GGUF
    GPTQ_WRITE = "gptq-write"     # a GPTQ checkpoint of the whole (edited) model
    GPTQ_PATCH = "gptq-patch"     # a GPTQ checkpoint with only the edited Linears requantized


def edits_quantized(file_type: str) -> bool:
    """Whether an edit-aware export at this llama.cpp file type computes the edit on the quantized model."""
    return file_type.upper() not in SOURCE_EDIT_TYPES


def gptq_edits_quantized(bits: int) -> bool:
    """Whether an edit-aware GPTQ output at `bits` computes the edit on the quantized checkpoint."""
    return bits not in SOURCE_EDIT_GPTQ_BITS


@dataclass(frozen=True)
class Plan:
    """The decisions for one job. `kind` is what the user asked for. With `via_base` the unedited model is
    first written at the output's level (GGUF file type, GPTQ bits) and the edit is patched into it; with
    `on_quantized` the edit is also computed on that file's weights. `write_kind` is what is written last."""

    job: EditJob
    kind: OutputKind
    via_base: bool
    on_quantized: bool
    verify: bool

    @property
    def write_kind(self) -> OutputKind:
        if not self.via_base:
            return self.kind
        return OutputKind.GGUF_PATCH if self.kind is OutputKind.GGUF_EXPORT else OutputKind.GPTQ_PATCH


def plan_job(job: EditJob, inputs: Sequence[Path] = ()) -> Plan:
    """Check the job against the files on disk and decide how it runs. `inputs`: other files the run reads
    (facts, retain sets), which no output may overwrite."""
    out = job.output
    if not job.model.exists():
        raise QeditError(f"{job.model}: no such file or directory; give an HF model directory, a .gguf file or a "
                         "GPTQ checkpoint")
    kind = _output_kind(job)
    refuse_same_file(out.path, job.model, *inputs)
    refuse_store_output(out.path, *([job.ollama.store] if job.ollama else []))
    if out.is_gguf:
        if out.path.is_dir():
            raise QeditError(f"{out.path}: is a directory; give a file name ending in .gguf")
        if job.model.is_dir() and out.path.resolve().is_relative_to(job.model.resolve()):
            raise QeditError(f"{out.path}: is inside the model directory {job.model}; write it elsewhere")
    else:
        check_output_dir(out.path, job.model)
    check_tensor_types(out.tensor_types)
    recompute = not out.naive and job.outcome is None
    if kind is OutputKind.GGUF_EXPORT:
        # at 5 bits and more the export encodes the source's edit straight from the source weights
        via_base = on_quantized = recompute and edits_quantized(out.quant or "")
    elif kind is OutputKind.GPTQ_WRITE:
        # an edit-aware GPTQ output patches the unedited checkpoint (only the edited Linears requantized)
        via_base = not out.naive
        on_quantized = recompute and gptq_edits_quantized(out.gptq.bits)
    else:
        via_base = on_quantized = False
    return Plan(job, kind, via_base, on_quantized, _resolve_verify(job, kind))


def _output_kind(job: EditJob) -> OutputKind:
    out, source = job.output, job.model
    if out.is_gguf:
        if out.quant is not None:
            ftype_from_name(out.quant)  # a bad name fails before the edit is computed
            return OutputKind.GGUF_EXPORT
        if not is_gguf_file(source):
            what = "--as-lora needs the GGUF the adapter is for" if out.as_lora else "a patch needs a .gguf source"
            raise QeditError(f"{out.path}: {what}, but {source} is not one; give --quant TYPE to export, "
                             "or an output directory")
        return OutputKind.GGUF_LORA if out.as_lora else OutputKind.GGUF_PATCH
    source_gptq = source.is_dir() and is_gptq_checkpoint(source)
    fmt = out.format or ("gptq" if source_gptq else "hf")
    if fmt == "hf":
        return OutputKind.HF
    return OutputKind.GPTQ_PATCH if source_gptq else OutputKind.GPTQ_WRITE


def check_tensor_types(rules: Sequence[tuple[str, str]]) -> None:
    """Every (pattern, type) names a GGML tensor type qedit can write."""
    known = {t.name for t in supported_types()}
    for pattern, type_name in rules:
        if not pattern.strip() or type_name.upper() not in known:
            raise QeditError(f"--tensor-type {pattern}={type_name}: expected PATTERN=TYPE with TYPE one of "
                             f"{', '.join(sorted(known))}")


def match_types(names: Sequence[str], rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Tensor name -> type for every name a rule matches (later rules win)."""
    chosen: dict[str, str] = {}
    for pattern, type_name in rules:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            log.warning("--tensor-type %s=%s matches none of the tensors it can apply to", pattern, type_name)
        chosen.update({n: type_name.upper() for n in hits})
    return chosen


def _resolve_verify(job: EditJob, kind: OutputKind) -> bool:
    """Whether the written file is checked in llama.cpp. It applies to a GGUF patch and to an edit-aware GGUF
    export; `verify=True` where it does not apply is an error; by default it runs where it applies (not for
    --naive outputs, nor for unlearning) when llama-cpp-python is installed."""
    out = job.output
    applies = kind is OutputKind.GGUF_PATCH or (kind is OutputKind.GGUF_EXPORT and not out.naive)
    if out.verify:
        if not applies:
            raise QeditError("--verify checks a GGUF patch in llama.cpp: give a .gguf source and -o X.gguf, or "
                             "--quant without --naive")
        return True
    if out.verify is False or not applies or out.naive or job.method.unlearns:
        return False
    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("llama-cpp-python is not installed: %s is not checked in llama.cpp (pip install 'qedit[llama]' "
                    "to check it; --no-verify silences this)", out.path)
        return False
    return True
