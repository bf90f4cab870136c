"""qedit: edit facts into local LLMs in full precision, export them, and check they survive quantization.

Public API (imported lazily, so `import qedit` stays cheap):
    load_model, load_requests, edit, save_edited, make_config, evaluate, TorchRunner,
    EditRequest, LowRankDelta, EditMethod, QeditError
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_model": "qedit.core.model",
    "LoadedModel": "qedit.core.model",
    "load_requests": "qedit.core.facts",
    "EditRequest": "qedit.core.facts",
    "edit": "qedit.edit.compute",
    "save_edited": "qedit.edit.compute",
    "make_config": "qedit.edit.compute",
    "evaluate": "qedit.evaluation.metrics",
    "TorchRunner": "qedit.runtimes.torch_runner",
    "LowRankDelta": "qedit.core.delta",
    "load_deltas": "qedit.core.delta",
    "EditMethod": "qedit.edit.registry",
    "QeditError": "qedit.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qedit' has no attribute {name!r}")
