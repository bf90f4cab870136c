"""qedit: edit facts into local LLMs in full precision, export them, and check they survive quantization.

Public API (imported lazily, so `import qedit` stays cheap):
    load_model, load_requests, edit, save_edited, make_config, evaluate, TorchRunner,
    EditRequest, LowRankDelta, EditMethod, QeditError
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_model": "qedit.model",
    "LoadedModel": "qedit.model",
    "load_requests": "qedit.facts",
    "EditRequest": "qedit.facts",
    "edit": "qedit.api",
    "save_edited": "qedit.api",
    "make_config": "qedit.api",
    "evaluate": "qedit.evaluate",
    "TorchRunner": "qedit.runners",
    "LowRankDelta": "qedit.delta",
    "load_deltas": "qedit.delta",
    "EditMethod": "qedit.methods.base",
    "QeditError": "qedit.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qedit' has no attribute {name!r}")
