"""One pipeline for every output: plan, pick the model the edit is computed on, compute, write, check.

`qedit edit`, `qedit forget`, `qedit survival` (each rung's edited file) and the Python API all call
`run_edit`, so the file a survival rung measures is the file `qedit edit --quant RUNG` writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qedit.converters.gguf.keys import carried_after
from qedit.converters.gguf.patch import stored_edits
from qedit.converters.gguf.rows import same_tensor_data
from qedit.converters.gptq.export import GPTQWriteConfig, calibration_tokens, write_gptq
from qedit.converters.loading import load_model, read_header
from qedit.core.memory import format_size
from qedit.core.model import LoadedModel, is_gguf_file
from qedit.edit.compute import EditOutcome, compute_edits
from qedit.edit.keys import context_prefixes, edit_keys
from qedit.evaluation.forget import evaluate_forget
from qedit.evaluation.gate import Requirement
from qedit.evaluation.metrics import evaluate
from qedit.pipeline.budget import check_requests, load_within
from qedit.pipeline.chat import chat_requests
from qedit.pipeline.conflicts import EarlierFact, check_batch, conflicts, earlier_facts
from qedit.pipeline.jobs import EditJob, MethodChoice
from qedit.pipeline.measure import EditMeasurement, ForgetMeasurement, measure_edit, measure_forget
from qedit.pipeline.plan import OutputKind, Plan, plan_job
from qedit.pipeline.verify import Verified, verify_in_llama_cpp
from qedit.pipeline.write import ModelfileWritten, Written, export, refuse_streamed, write_modelfile, write_output
from qedit.runtimes.torch_runner import TorchRunner
from qedit.unlearn.requests import RetainItem

log = logging.getLogger(__name__)

Notify = Callable[[str], None]


@dataclass
class EditRun:
    """What a job did: its plan, the edit written (`outcome`, scaled by the llama.cpp check where it had to be;
    `computed` before that), where it was computed, and what was measured."""

    plan: Plan
    computed: EditOutcome
    outcome: EditOutcome
    written: Written
    computed_on: Path
    verified: Verified | None = None
    measured: EditMeasurement | None = None
    forget: ForgetMeasurement | None = None
    modelfile: ModelfileWritten | None = None


def run_edit(job: EditJob, notify: Notify = log.info, *, inputs: Sequence[Path] = (),
             loaded: LoadedModel | None = None, source_outcome: EditOutcome | None = None,
             retain: Sequence[RetainItem] = (), requirements: Sequence[Requirement] = ()) -> EditRun:
    """Run `job` and write its output.

    `inputs`: other files the run reads, which no output may overwrite. `loaded`: `job.model` already loaded
    (it is used, never changed, when the edit is computed on the source). `source_outcome`: the edit already
    computed on `job.model` with the job's method and requests (reused when the edit is computed there).
    `retain` and `requirements`: the retain items a forget job scores and the gates it checks.
    """
    plan = plan_job(job, inputs)
    header = None
    if loaded is None:   # the facts against the model's context and the memory budget, before any model work
        header = read_header(job.model)
        check_requests(job.method, job.requests, header, job.budget)
        if job.chat:   # the chat template, and each fact's subject in its chat question
            chat_requests(header.tokenizer, str(job.model), job.requests)
    with unedited_base(plan, notify) as base:
        source = job.model
        if plan.on_quantized and base is not None:
            if same_weights(base, job.model):   # e.g. Q4_K_M of a Q4_K_M file: every tensor copied
                notify(f"{base.name}: the weights equal the source's; the edit is computed on the source")
            else:
                source = base
        if loaded is not None and source == job.model:
            model = loaded
        else:
            model = load_within(source, job.method, job.requests, job.device, job.budget,
                                header if source == job.model else None, job.device_map)
            refuse_streamed(plan.write_kind, model)
            if model.streamer is not None:
                notify(f"{source.name}: does not fit the memory budget of {format_size(job.budget.total)} in float32"
                       f"; its layers are decoded from the file as the edit needs them")
        before = _before(plan, model, retain)
        if job.outcome is not None:
            outcome = job.outcome
        elif source_outcome is not None and source == job.model:
            outcome = source_outcome
        else:
            outcome = compute_for(job.method, model, job.requests, notify, chat=job.chat)
        if source != job.model:
            outcome.info["computed_on"] = f"{job.model} exported at {_level(plan)}"
        written = write_output(plan, model, outcome, base)
        run = EditRun(plan, outcome, outcome, written, source)
        if plan.verify:
            run.verified = verify_in_llama_cpp(lambda o: write_output(plan, model, o, base), outcome, job.output.path,
                                               job.output.hold_margin, notify)
            run.outcome = run.verified.outcome
        if job.output.is_gguf and job.output.modelfile:
            run.modelfile = write_modelfile(job.output.path, job.model, job.ollama, job.output.as_lora, inputs)
            written.lines.extend(run.modelfile.lines)
        if before is not None and job.method.unlearns:
            run.forget = measure_forget(plan, model, run.outcome, retain, before, requirements, base)
        elif before is not None:
            run.measured = measure_edit(model, run.outcome, before, job.requests, chat=job.chat)
    return run


def compute_for(method: MethodChoice, model: LoadedModel, requests: Sequence[Any],
                notify: Notify = log.info, chat: bool = False) -> EditOutcome:
    """The edit `method` computes for `requests` on `model`; the keys of edits an earlier patch recorded in a
    GGUF source are protected. `chat`: computed on each fact's one-turn chat as `model`'s template formats it."""
    if chat:
        requests = chat_requests(model.tokenizer, str(model.source), requests)
        notify(f"editing {len(requests)} fact(s) in their chat form, e.g. {requests[0].prompt!r}")
    cfg = method.resolved_config()
    manifests, carried = stored_edits(model.source)
    replaced: list[tuple[EarlierFact, Any]] = []
    removed: dict[int, torch.Tensor] = {}
    if not method.unlearns:
        check_batch(requests)
        replaced = conflicts(requests, earlier_facts(manifests))
    if replaced:   # the new facts win: the old ones' keys, on the current weights, leave the protected history
        prefixes = context_prefixes(model, cfg)
        old = [e.request for e, _ in replaced]
        removed = {layer: edit_keys(model, old, layer, prefixes).float().cpu() for layer in sorted(carried)}
        carried = carried_after(carried, {}, removed=removed)
        for e, new in replaced:
            notify(f"{new.origin or repr(new.prompt)}: replaces fact {e.fact + 1} of edit {e.patch} in "
                   f"{model.source.name} ({e.request.subject}: {e.request.target_new!r} -> {new.target_new!r})")
    if carried:
        notify(f"{model.source.name}: protecting the keys of earlier edits recorded in the file "
               f"({', '.join(f'blk.{layer}: {c.facts}' for layer, c in sorted(carried.items()))})")
    earlier = {layer: torch.from_numpy(c.keys()) for layer, c in carried.items()}   # (rows, d) each
    outcome = compute_edits(model, requests, method.name, cfg, batch_size=method.batch_size, earlier_keys=earlier,
                            registry=method.registry)
    if replaced:
        outcome.info["replaces"] = [e.record(new) for e, new in replaced]
        outcome.replaced_keys = removed
    return outcome


def _before(plan: Plan, model: LoadedModel, retain: Sequence[RetainItem]):  # noqa: ANN202  (report of either kind)
    job = plan.job
    if not job.evaluate:
        return None
    if job.method.unlearns:
        return evaluate_forget(TorchRunner(model), job.requests, retain, progress="unedited")
    return evaluate(TorchRunner(model), job.requests, chat=job.chat)


def _level(plan: Plan) -> str:
    out = plan.job.output
    return (out.quant or "").upper() if plan.kind is OutputKind.GGUF_EXPORT else f"GPTQ {out.gptq.bits}-bit"


@contextlib.contextmanager
def unedited_base(plan: Plan, notify: Notify = log.info) -> Iterator[Path | None]:
    """The unedited model as the output will ship, when the plan patches the edit into one (None otherwise):
    `job.quantized_base`, or a temporary export beside the output, removed afterwards."""
    job, out = plan.job, plan.job.output
    if not plan.via_base:
        yield None
        return
    if job.quantized_base is not None:
        yield job.quantized_base
        return
    if plan.on_quantized:
        notify(f"exporting the unedited model at {_level(plan)} to compute the edit on its quantized weights "
               "(--naive: edit the source weights instead)")
    tmp = out.path.with_name(f".{out.path.name}.unedited.{os.getpid()}{'.gguf' if out.is_gguf else ''}")
    try:
        write_unedited(plan, tmp, notify)
        yield tmp
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_unedited(plan: Plan, path: Path, notify: Notify = log.info, loaded: LoadedModel | None = None) -> None:
    """Write the unedited model at the job's output level (GGUF file type, or GPTQ bits) to `path`."""
    job, out = plan.job, plan.job.output
    if plan.kind is OutputKind.GGUF_EXPORT:
        for line in export(job.model, path, out.quant or "", out.tensor_types, budget=job.budget).lines:
            notify(line)
        return
    model = loaded if loaded is not None else load_model(job.model, device=job.device, max_memory=job.budget,
                                                         device_map=job.device_map)
    refuse_streamed(OutputKind.GPTQ_WRITE, model)
    cfg = job.method.resolved_config()
    write_gptq(model, path, GPTQWriteConfig(out.gptq), calibration_tokens(model, cfg.stats))


def same_weights(a: Path, b: Path) -> bool:
    """Whether two model files hold the same weights (both GGUF, every tensor the same bytes)."""
    return is_gguf_file(a) and is_gguf_file(b) and same_tensor_data(a, b)
