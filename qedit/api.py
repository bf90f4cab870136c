"""The Python API: compute edits, fold them, save an edited model with its deltas and manifest.

    from qedit import load_model, load_requests, edit, save_edited
    loaded = load_model("model.gguf")
    outcome = edit(loaded, load_requests("facts.jsonl"), "alphaedit")
    save_edited(loaded, outcome, "edited/")
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from qedit.delta import LowRankDelta, fold, save_deltas
from qedit.errors import QeditError
from qedit.facts import EditRequest
from qedit.io_utils import check_output_dir, staged_dir  # noqa: F401  (check_output_dir re-exported)
from qedit.methods.base import EditContext, EditMethod, MethodConfig, get_method
from qedit.model import LoadedModel

log = logging.getLogger(__name__)


def qedit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qedit")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class EditOutcome:
    method: EditMethod
    config: MethodConfig
    requests: list[EditRequest]
    deltas: list[LowRankDelta]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    keys: dict[int, Any] = field(default_factory=dict)   # layer -> (n, d_in) float32 keys of every edit there
    earlier_keys: dict[int, Any] = field(default_factory=dict)  # layer -> (m, d_in) keys of edits made before

    def manifest(self, loaded: LoadedModel) -> dict[str, Any]:
        return {
            "qedit_version": qedit_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": self.method.value,
            "config": _jsonable(dataclasses.asdict(self.config)),
            "source": str(loaded.source),
            "source_kind": loaded.source_kind,
            "source_sha256": loaded.fingerprint,
            "architecture": loaded.arch.name,
            "layers": sorted({d.layer for d in self.deltas}),
            "ranks": {d.name: d.rank for d in self.deltas},
            "seconds": round(self.seconds, 2),
            "info": _jsonable(self.info),
            "facts": [r.to_json() for r in self.requests],
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def make_config(method: str | EditMethod, **overrides: Any) -> MethodConfig:
    """The method's config with `overrides` (unknown keys are an error)."""
    spec = get_method(method)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = set(overrides) - names
    if unknown:
        raise QeditError(f"{spec.method.value} has no setting(s) {sorted(unknown)}; known: {sorted(names)}")
    return spec.config_cls(**overrides)


def edit(loaded: LoadedModel, requests: Sequence[EditRequest], method: str | EditMethod,
         cfg: MethodConfig | None = None, batch_size: int | None = None,
         earlier_keys: Mapping[int, torch.Tensor] | None = None) -> EditOutcome:
    """Compute the edits and fold them into `loaded.model`.

    With batch_size, requests are edited in sequential batches: each batch is computed on the
    model with the earlier batches folded in, and the keys of earlier batches are passed on
    (MEMIT and AlphaEdit keep their updates off them). `earlier_keys` (layer -> (m, d_in)) are the
    keys of edits already in the model, e.g. recorded in a patched GGUF (`stored_edit_keys`): they
    start that history.
    """
    spec = get_method(method)
    cfg = cfg or spec.config_cls()
    if not isinstance(cfg, spec.config_cls):
        raise QeditError(f"method {spec.method.value} needs a {spec.config_cls.__name__}, not {type(cfg).__name__}")
    if batch_size is not None and batch_size < 1:
        raise QeditError("batch size must be at least 1")
    if not requests:
        raise QeditError("no edit requests: give at least one fact")
    ctx = EditContext(device=loaded.device)
    earlier = {int(layer): k.detach().float().cpu() for layer, k in (earlier_keys or {}).items()}
    for layer, keys in earlier.items():          # keys (m, d_in)
        _add_history(ctx, layer, keys.to(ctx.device))
    size = batch_size or len(requests)
    deltas: list[LowRankDelta] = []
    info: dict[str, Any] = {"batches": []}
    all_keys: dict[int, list[torch.Tensor]] = {}
    start = time.perf_counter()
    for lo in range(0, len(requests), size):
        batch = list(requests[lo:lo + size])
        result = spec.compute(loaded, batch, cfg, ctx)
        fold(loaded.model, result.deltas)
        deltas.extend(result.deltas)
        for layer, keys in result.keys.items():      # keys (n, d_in)
            all_keys.setdefault(layer, []).append(keys.detach().float().cpu())
            _add_history(ctx, layer, keys)
        info["batches"].append(result.info)
    return EditOutcome(spec.method, cfg, list(requests), deltas, time.perf_counter() - start, info,
                       {layer: torch.cat(ks) for layer, ks in all_keys.items()}, earlier)


def _add_history(ctx: EditContext, layer: int, keys: torch.Tensor) -> None:
    """Add sum_i k_i k_i^T over `keys` (n, d_in) to the layer's history of earlier edits (float64)."""
    gram = keys.double().t() @ keys.double()                                    # (d_in, d_in)
    ctx.history[layer] = ctx.history[layer] + gram if layer in ctx.history else gram


def save_edited(loaded: LoadedModel, outcome: EditOutcome, out_dir: str | Path) -> Path:
    """Write the edited model (safetensors + tokenizer, loadable by from_pretrained) and the deltas.

    The directory is written beside its final place and renamed into it, so a failure leaves nothing.
    """
    out = Path(out_dir)
    with staged_dir(out, loaded.source, "the edited model") as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_deltas(tmp, outcome.deltas, outcome.manifest(loaded), keys=outcome.keys)
    log.info("wrote %s", out)
    return out
