"""`qedit.edit_model(...)`: the Python form of `qedit edit`, the same job through the same pipeline.

    from qedit import edit_model
    run = edit_model("model.Q4_K_M.gguf", "facts.jsonl", "edited.Q4_K_M.gguf", method="memit")
    run = edit_model("model.gguf", "facts.jsonl", "e.Q3_K_M.gguf", quant="Q3_K_M", settings={"target_margin": 2.0})
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qedit.converters.ollama import as_source
from qedit.core.facts import EditRequest, load_requests
from qedit.pipeline.jobs import EditJob, MethodChoice, Output, make_config
from qedit.pipeline.run import EditRun, run_edit

log = logging.getLogger(__name__)


def edit_model(model: str | Path, facts: str | Path | Sequence[EditRequest], output: str | Path, *, method: str = "memit",
         settings: Mapping[str, Any] | None = None, batch_size: int | None = None, quant: str | None = None,
         as_lora: bool = False, format: str | None = None, naive: bool = False, verify: bool | None = None,
         evaluate: bool = False, device: str = "cpu", device_map: str | None = None, chat: bool = False,
         notify: Callable[[str], None] = log.info) -> EditRun:
    """Edit `facts` (a JSONL path or EditRequests) into `model` (a path, or ollama:NAME[:TAG]) and write `output`,
    as `qedit edit` does.

    `settings` are the method's config fields (`make_config`); the other keywords are the command's options.
    Returns the run: the plan, the edit written, where it was computed and what the llama.cpp check did."""
    requests = load_requests(facts) if isinstance(facts, (str, Path)) else list(facts)
    choice = MethodChoice(method, make_config(method, **dict(settings or {})), batch_size)
    out = Output(Path(output), quant=quant, as_lora=as_lora, format=format, naive=naive, verify=verify)
    source, ollama = as_source(model)
    return run_edit(EditJob(source, requests, choice, out, device=device, device_map=device_map, evaluate=evaluate,
                            ollama=ollama, chat=chat), notify=notify)
