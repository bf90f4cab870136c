"""Computing edits: requests -> an `EditOutcome` of low-rank deltas, with the model left as it was.

    outcome = compute_edits(loaded, requests, "memit")          # deltas are data
    with applied(loaded.model, outcome.deltas):                  # qedit.core.delta: reversible, bit-exact
        ...

With a batch size, requests are edited in sequential batches: each batch is computed on the model with
the earlier batches applied (and removed again at the end), and the keys of earlier batches are passed
on (MEMIT and AlphaEdit keep their updates off them). The same function runs unlearning methods when
given their registry (`qedit.unlearn.registry.UNLEARN_METHODS`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qedit.core import linalg
from qedit.core.delta import LowRankDelta, applied, load_deltas, load_edit_keys
from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel
from qedit.core.version import qedit_version
from qedit.edit.registry import EDIT_METHODS, EditContext, MethodConfig, MethodRegistry

log = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    method: str
    config: MethodConfig
    requests: list[Any]                   # EditRequests, or ForgetRequests for an unlearning method
    deltas: list[LowRankDelta]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> (n, d_in) float32 keys of every edit
    earlier_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (m, d_in) keys of earlier edits
    # layer -> (r, d_in) keys of earlier facts this edit replaces (same subject and relation): a file written with
    # the edit takes them out of the keys it carries (qedit.pipeline.conflicts)
    replaced_keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def manifest(self, loaded: LoadedModel) -> dict[str, Any]:
        """What an output records about this edit (facts, method, settings, layers, ranks, source)."""
        return {
            "qedit_version": qedit_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "config": jsonable(dataclasses.asdict(self.config)),
            "source": str(loaded.source),
            "source_kind": loaded.source_kind,
            "source_sha256": loaded.fingerprint,
            "architecture": loaded.arch.name,
            "layers": sorted({d.layer for d in self.deltas}),
            "ranks": {d.name: d.rank for d in self.deltas},
            "delta_norm": self.delta_norm,
            "seconds": round(self.seconds, 2),
            "info": jsonable(self.info),
            "facts": [r.to_json() for r in self.requests],
        }

    def scaled(self, factor: float) -> "EditOutcome":
        """The same edit with every delta scaled by `factor` (recorded as `verify_scale`)."""
        return dataclasses.replace(self, deltas=[d.scaled(factor) for d in self.deltas],
                                   info={**self.info, "verify_scale": factor})

    @property
    def delta_norm(self) -> float:
        """Sum of the deltas' Frobenius norms."""
        return sum(d.norm() for d in self.deltas)


def jsonable(obj: Any) -> Any:
    """`obj` with dict keys as strings and anything not JSON-native as its str()."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def compute_edits(loaded: LoadedModel, requests: Sequence[Any], method: str, cfg: MethodConfig | None = None,
                  batch_size: int | None = None, earlier_keys: Mapping[int, torch.Tensor] | None = None,
                  registry: MethodRegistry[Any] = EDIT_METHODS) -> EditOutcome:
    """Compute the deltas of `requests` with `method` from `registry`; the model is unchanged afterwards.

    `earlier_keys` (layer -> (m, d_in)) are the keys of edits already in the model, e.g. recorded in a
    patched GGUF (`qedit.converters.gguf.keys.stored_edit_keys`): they start the history of earlier edits.
    """
    spec = registry.get(method)
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
    with contextlib.ExitStack() as stack:        # earlier batches stay applied while later ones are computed
        for lo in range(0, len(requests), size):
            batch = list(requests[lo:lo + size])
            result = spec.compute(loaded, batch, cfg, ctx)
            if lo + size < len(requests):
                stack.enter_context(applied(loaded.model, result.deltas))
                ctx.earlier_applied = True
            deltas.extend(result.deltas)
            for layer, keys in result.keys.items():      # keys (n, d_in)
                all_keys.setdefault(layer, []).append(keys.detach().float().cpu())
                _add_history(ctx, layer, keys)
            info["batches"].append(result.info)
    return EditOutcome(spec.method.value, cfg, list(requests), deltas, time.perf_counter() - start, info,
                       {layer: torch.cat(ks) for layer, ks in all_keys.items()}, earlier)


def _add_history(ctx: EditContext, layer: int, keys: torch.Tensor) -> None:
    """Add sum_i k_i k_i^T over `keys` (n, d_in) to the layer's history of earlier edits (float64, on the keys'
    device; the solves move it where they run)."""
    k = linalg.wide(keys)
    gram = k.t() @ k                                                            # (d_in, d_in)
    ctx.history[layer] = ctx.history[layer].to(gram.device) + gram if layer in ctx.history else gram


def saved_outcome(directory: Path, requests: Sequence[Any], config: MethodConfig, loaded: LoadedModel) -> EditOutcome:
    """The edit an earlier `qedit edit -o DIR` saved (its deltas, keys and method), for `requests`, checked to
    belong to `loaded` (the manifest records its source's sha256)."""
    if not requests:
        raise QeditError(f"{directory}: no facts given for the saved edit; give the facts file it was made from")
    deltas, manifest = load_deltas(directory)
    sha = manifest.get("source_sha256")
    if sha and sha != loaded.fingerprint:
        raise QeditError(f"{directory}: its deltas were computed on a model with sha256 {sha[:16]}..., not "
                         f"{loaded.source} ({loaded.fingerprint[:16]}...); give the model they were made for")
    return EditOutcome(str(manifest.get("method", "unknown")), config, list(requests), deltas,
                       float(manifest.get("seconds", 0.0)), {"from_deltas": str(directory)}, load_edit_keys(directory))
