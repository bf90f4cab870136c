"""The writers: an `EditOutcome` on a `LoadedModel` -> the output a `Plan` names, with a summary of it; and the
Ollama Modelfile beside a GGUF output.

Every writer leaves the torch model as it was: where a writer needs the edited weights (HF directories,
GPTQ checkpoints written from the model) the deltas are applied for the write and removed again.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qedit.converters.gguf.aware import EditEncoding, encoding_for
from qedit.converters.gguf.export import export_gguf
from qedit.converters.gguf.keys import merged_keys
from qedit.converters.gguf.lora import write_lora_gguf
from qedit.converters.gguf.names import gguf_tensor_name
from qedit.converters.gguf.patch import patch_gguf
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.write import ENCODE_CHUNK_BYTES
from qedit.converters.gptq.export import GPTQWriteConfig, calibration_tokens, patch_gptq, write_gptq
from qedit.converters.loading import read_header
from qedit.converters.ollama import OllamaModel, candidates, model_name, modelfile_text, written_by_qedit_for
from qedit.core.delta import applied, save_deltas
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path, staged_dir
from qedit.core.memory import MemoryBudget, current_rss, too_small
from qedit.core.model import LoadedModel, is_gguf_file
from qedit.edit.compute import EditOutcome
from qedit.pipeline.plan import OutputKind, Plan, match_types

log = logging.getLogger(__name__)


@dataclass
class Written:
    """What a writer wrote: its kind, path, the converter's report and a human summary."""

    kind: OutputKind
    path: Path
    report: Any = None
    lines: list[str] = field(default_factory=list)


def edit_encoding(loaded: LoadedModel, outcome: EditOutcome, naive: bool) -> EditEncoding | None:
    """The edit-aware encoding of an outcome's edited tensors, or None for naive outputs and edits with no keys.

    Its keys are the outcome's and those of earlier edits in the source (`outcome.earlier_keys`), so
    re-encoding a tensor keeps both the new edit and the earlier ones at their keys."""
    if naive or not outcome.keys:
        return None
    return encoding_for(loaded, merged_keys(outcome.earlier_keys, outcome.keys), outcome.config.stats)


def refuse_streamed(kind: OutputKind, loaded: LoadedModel) -> None:
    """Writers that save the torch model's weights (an HF directory, a GPTQ checkpoint written from the model) need
    them in memory: a model streamed from its file (over the memory budget) is refused before the edit is made."""
    if loaded.streamer is not None and kind in (OutputKind.HF, OutputKind.GPTQ_WRITE):
        what = "an HF directory" if kind is OutputKind.HF else "a GPTQ checkpoint"
        raise QeditError(f"{loaded.source.name}: writing {what} needs the whole model in memory in float32, over the "
                         "memory budget; raise --max-memory, or write a GGUF (-o X.gguf, with --quant TYPE to export)")


def write_output(plan: Plan, loaded: LoadedModel, outcome: EditOutcome, base: Path | None = None) -> Written:
    """Write `outcome` to the job's output path as the plan says. `base`: the unedited model at the output's
    level that a patch goes into (default: the model the edit was computed on)."""
    kind = plan.write_kind
    base = base or loaded.source
    out = plan.job.output
    manifest = outcome.manifest(loaded)
    if kind is OutputKind.HF:
        save_edited(loaded, outcome, out.path)
        return Written(kind, out.path, None, [f"wrote {out.path} (HF safetensors, deltas and manifest)"])
    if kind in (OutputKind.GPTQ_WRITE, OutputKind.GPTQ_PATCH):
        return _write_gptq(kind, loaded, outcome, base, manifest, plan)
    encoding = None if kind is OutputKind.GGUF_LORA else edit_encoding(loaded, outcome, out.naive)
    manifest["encoding"] = {"path": "naive"} if encoding is None else encoding.describe()
    if kind is OutputKind.GGUF_LORA:
        rep = write_lora_gguf(loaded.source, out.path, outcome.deltas, manifest=manifest)
        return Written(kind, out.path, rep, [
            f"wrote LoRA adapter {out.path} ({rep.size:,} bytes, {len(rep.tensors)} weights, rank {rep.rank}); "
            f"run: llama-cli -m {loaded.source} --lora {out.path}"])
    if kind is OutputKind.GGUF_EXPORT:
        return export(loaded.source, out.path, out.quant or "", plan.job.output.tensor_types, outcome=outcome,
                      manifest=manifest, encoding=encoding)
    return _patch(base, loaded, outcome, out.path, manifest, encoding, plan.job.output.tensor_types)


def save_edited(loaded: LoadedModel, outcome: EditOutcome, out_dir: str | Path) -> Path:
    """Write the edited model (safetensors + tokenizer, loadable by from_pretrained), the deltas and the
    manifest. The directory is written beside its final place and renamed into it, so a failure leaves
    nothing; the torch model is left unedited."""
    out = Path(out_dir)
    with staged_dir(out, loaded.source, "the edited model") as tmp, applied(loaded.model, outcome.deltas):
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_deltas(tmp, outcome.deltas, outcome.manifest(loaded), keys=outcome.keys)
    log.info("wrote %s", out)
    return out


def _patch(base: Path, loaded: LoadedModel, outcome: EditOutcome, out: Path, manifest: dict[str, Any],
           encoding: EditEncoding | None, tensor_types: tuple[tuple[str, str], ...]) -> Written:
    with GGUFFile(base) as gf:
        edited = sorted({gguf_tensor_name(gf, d.name) for d in outcome.deltas})
    report = patch_gguf(base, out, outcome.deltas, manifest, type_overrides=match_types(edited, tensor_types),
                        encoding=encoding, keys=outcome.keys, replaced_keys=outcome.replaced_keys)
    lines = []
    for t in report.tensors:
        change = "" if t.bytes_after == t.bytes_before else f", {t.bytes_after - t.bytes_before:+,} bytes"
        if t.kept is None:
            kept = ""
        elif math.isnan(t.kept):   # kept_share's NaN: the change is zero at the keys (e.g. the fact already held)
            kept = "; edit-aware: the edit is zero at its keys, nothing to keep"
        else:
            kept = f"; edit-aware: kept {t.kept:.3f} of the edit at its keys (plain: {t.kept_naive:.3f})"
        lines.append(f"  re-encoded {t.name} as {t.type_after}{change}{kept}")
    lines.append(f"size: {report.size_before:,} -> {report.size_after:,} bytes ({report.size_change:+,})")
    return Written(OutputKind.GGUF_PATCH, out, report, lines)


def export_needs(source: Path, outcome: EditOutcome | None = None) -> int:
    """What the process holds at least while exporting `source`: its resident set now and the working set of one
    tensor. A GGUF source is re-encoded a row chunk at a time (an edited tensor whole, with its change and edit
    keys' statistics); an HF directory's tensors are read whole in float32 and converted."""
    shape = read_header(source).shape
    if is_gguf_file(source):
        work = 4 * ENCODE_CHUNK_BYTES
        if outcome is not None and outcome.deltas:
            work += 4 * 4 * shape.d_ff * shape.d_model + 8 * shape.d_ff ** 2
    else:
        work = 3 * 4 * max(shape.vocab, shape.d_ff) * shape.d_model
    return current_rss() + work


def export(source: Path, out: Path, quant: str, tensor_types: tuple[tuple[str, str], ...] = (), *,
           outcome: EditOutcome | None = None, manifest: dict[str, Any] | None = None,
           encoding: EditEncoding | None = None, template: Path | None = None,
           budget: MemoryBudget | None = None) -> Written:
    """Export `source` (a GGUF file, an HF or qedit output directory) at `quant`, with `outcome`'s deltas; a
    one-line QeditError first when `budget` cannot hold the export (`export_needs`)."""
    if budget is not None and budget.enforced:
        needed = export_needs(source, outcome)
        if needed > budget.total:
            raise too_small(source.name, budget, needed, "exporting it one tensor at a time")
    overrides: dict[str, str] = {}
    if tensor_types:
        if is_gguf_file(source):
            with GGUFFile(source) as gf:
                names = list(gf.tensors)
            overrides = match_types(names, tensor_types)
        else:
            overrides = {p: t.upper() for p, t in tensor_types}
    with _fallbacks() as fell_back:
        rep = export_gguf(source, out, quant, deltas=list(outcome.deltas) if outcome else [], manifest=manifest,
                          type_overrides=overrides or None, template=template, progress=True, encoding=encoding,
                          keys=outcome.keys if outcome else None,
                          replaced_keys=outcome.replaced_keys if outcome else None)
    counts: dict[str, int] = {}
    for t in rep.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    lines = [f"exported {out} at {quant.upper()} in {rep.seconds:.1f} s: {rep.size:,} bytes; tensor types "
             + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))]
    if overrides:
        lines.append("  --tensor-type: " + ", ".join(f"{n}={t}" for n, t in overrides.items()))
    if fell_back:
        lines.append(f"  {len(fell_back)} tensor(s) fell back to another type, as llama.cpp does, e.g. {fell_back[0]}")
    return Written(OutputKind.GGUF_EXPORT, out, rep, lines)


def _write_gptq(kind: OutputKind, loaded: LoadedModel, outcome: EditOutcome, base: Path, manifest: dict[str, Any],
                plan: Plan) -> Written:
    """A GPTQ checkpoint of the edited model, or a patch of the GPTQ checkpoint `base`; the edit keys make the
    edited Linears' Hessians edit-aware unless the output is naive."""
    out = plan.job.output.path
    keys: Mapping[int, Any] | None = None if plan.job.output.naive or not outcome.keys else outcome.keys
    manifest["encoding"] = {"path": "naive" if keys is None else "edit-aware"}
    seqs = calibration_tokens(loaded, outcome.config.stats)
    if kind is OutputKind.GPTQ_PATCH:
        report = patch_gptq(base, out, outcome.deltas, manifest, seqs, edit_keys=keys)
        what = "patched"
    else:
        with applied(loaded.model, outcome.deltas):
            report = write_gptq(loaded, out, GPTQWriteConfig(plan.job.output.gptq), seqs, deltas=outcome.deltas,
                                manifest=manifest, edit_keys=keys)
        what = "wrote"
    cfg = report.config
    return Written(kind, out, report, [
        f"{what} GPTQ checkpoint {out}: {cfg.bits}-bit, group size {cfg.group_size}, {'sym' if cfg.sym else 'asym'}, "
        f"format {cfg.checkpoint_format}, {len(report.modules)} module(s) quantized in {report.seconds:.1f} s "
        f"({manifest['encoding']['path']})"])


@dataclass
class ModelfileWritten:
    """The Modelfile beside a GGUF output, and the Ollama model name `command` creates from it."""

    path: Path
    name: str
    lines: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return f"ollama create {self.name} -f {shlex.quote(str(self.path))}"


def write_modelfile(output: Path, source: Path, ollama: OllamaModel | None = None, as_lora: bool = False,
                    inputs: Sequence[Path] = ()) -> ModelfileWritten:
    """Write the Ollama Modelfile of the GGUF `output` beside it: FROM the output, or for a LoRA adapter FROM its
    base (the Ollama model when the source was one, else the source GGUF) with ADAPTER the output; the TEMPLATE,
    PARAMETER and SYSTEM of an Ollama source are carried over. A Modelfile there that qedit did not write for this
    output, or an input, is never overwritten: the next free name is taken (OUTPUT.Modelfile), and said."""
    local = f"./{output.name}"
    if as_lora:
        base = ollama.ref if ollama is not None else str(source.resolve())
        text, notes = modelfile_text(output.name, base, adapter=local, model=ollama, inherits=ollama is not None)
    else:
        text, notes = modelfile_text(output.name, local, model=ollama)
    taken = [p for p in (source, output, *inputs) if p.exists()]
    path = next((p for p in candidates(output) if not any(p.exists() and os.path.samefile(p, t) for t in taken)
                 and (not p.exists() or written_by_qedit_for(p, output.name))), None)
    if path is None:
        raise QeditError(f"{output}: every Modelfile name beside it is taken; write the output elsewhere")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    carried = [c for c in ("TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE") if f"\n{c} " in text]
    lines = [f"wrote {path}: FROM {base if as_lora else local}" + (f", ADAPTER {local}" if as_lora else "")
             + (f"; {', '.join(carried)} of ollama:{ollama.ref}" if ollama is not None and carried else "")]
    if path.name != "Modelfile":
        lines.append(f"  {output.with_name('Modelfile')} was not written by qedit for {output.name}: it is kept, "
                     f"this Modelfile is {path.name}")
    return ModelfileWritten(path, model_name(output.stem), lines + [f"  {n}" for n in notes])


@contextlib.contextmanager
def _fallbacks() -> Iterator[list[str]]:
    """Collect the kernels' block-size fallback messages (logged at INFO) while an export runs."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "falling back" in record.getMessage():
                found.append(record.getMessage())

    logger = logging.getLogger("qedit.kernels.registry")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
