"""qedit: edit facts into local LLMs in full precision, export them, and check they survive quantization.

Public API (imported lazily, so `import qedit` stays cheap):

    edit_model(model, facts, output, method=..., ...)  what `qedit edit` does, returning an EditRun
    load_model, load_requests, compute_edits, applied    the steps: a LoadedModel, EditRequests, an
                                                         EditOutcome of deltas, their reversible application
    evaluate, TorchRunner, LlamaCppRunner                metrics on a runner
    EditJob, Output, MethodChoice, run_edit, make_config the pipeline's typed job, for full control
    LowRankDelta, EditOutcome, EditRequest, QeditError
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "edit_model": "qedit.pipeline.api",
    "load_model": "qedit.converters.loading",
    "LoadedModel": "qedit.core.model",
    "load_requests": "qedit.core.facts",
    "EditRequest": "qedit.core.facts",
    "compute_edits": "qedit.edit.compute",
    "EditOutcome": "qedit.edit.compute",
    "applied": "qedit.core.delta",
    "LowRankDelta": "qedit.core.delta",
    "load_deltas": "qedit.core.delta",
    "save_edited": "qedit.pipeline.write",
    "evaluate": "qedit.evaluation.metrics",
    "TorchRunner": "qedit.runtimes.torch_runner",
    "LlamaCppRunner": "qedit.runtimes.llama",
    "EditJob": "qedit.pipeline.jobs",
    "Output": "qedit.pipeline.jobs",
    "MethodChoice": "qedit.pipeline.jobs",
    "make_config": "qedit.pipeline.jobs",
    "run_edit": "qedit.pipeline.run",
    "EditRun": "qedit.pipeline.run",
    "QeditError": "qedit.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qedit' has no attribute {name!r}")
