"""The quantization-aware ladder's edit: computed on each rung's unedited artifact, then patched onto it.

An edit computed on the full-precision model reads keys, targets and statistics that the quantized
model no longer has: at Q4_0, Q3_K_M and Q2_K every tensor is requantized, the keys k* the edited
layers see drift, and about half of the margin is lost before the edited tensors' own rounding matters.
The aware ladder does what `qedit edit --quant T` does: it loads the rung's unedited file, computes the
edit on those weights, and patches the file edit-aware (only the edited tensors are re-encoded, on the
grid they came from). Types of 5 bits and more (SOURCE_EDIT_TYPES) keep the full-precision edit, encoded
edit-aware: there the keys barely drift (the source edit keeps 0.97 of its margin at Q5_K_M), while
an edit computed again on slightly different weights lands elsewhere (its |dW| is 0.77-1.43x the source
edit's, p10-p90, for ROME at Q5_K_M) and loses locality (200 minimal edits at Q5_K_M: ROME 0.840
recomputed against 0.890 for the source edit; benchmarks/RESULTS.md). Q6_K is not measured apart.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qedit.delta import LowRankDelta
from qedit.model import LoadedModel
from qedit.survival.rungs import Rung, RungKind

log = logging.getLogger(__name__)

# llama.cpp file types at which the edit is the full-precision one; coarser types compute it on the quantized model
SOURCE_EDIT_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1"})

# (the rung's unedited model) -> (deltas, edit keys layer -> (n, d_in)). It may fold the edit into the
# model it is given (qedit.api.edit does): that model is loaded for the call and discarded afterwards.
EditFn = Callable[[LoadedModel], tuple[Sequence[LowRankDelta], Mapping[int, Any]]]


@dataclass(frozen=True)
class RungEdit:
    """The edit a rung measures."""

    deltas: tuple[LowRankDelta, ...]
    encoding: Any            # EditEncoding of the rung's keys and covariances, or None (no keys: plain)
    reused: bool             # the rung's weights equal the source's, so the source edit was kept
    delta_norm: float        # sum of the deltas' Frobenius norms


def edits_quantized(file_type: str) -> bool:
    """Whether the aware path computes the edit on the model quantized at this llama.cpp file type (else on
    the source weights, encoded edit-aware)."""
    return file_type.upper() not in SOURCE_EDIT_TYPES


def recomputes(rung: Rung) -> bool:
    """Whether the aware ladder computes the edit on this rung's unedited artifact."""
    return rung.kind is RungKind.GGUF and edits_quantized(rung.spec)


def same_weights(a: LoadedModel, b: LoadedModel, rel: float = 1e-5) -> bool:
    """True when every parameter of `a` equals `b`'s up to float residue (max |a - b| <= rel * max |b|), e.g.
    Q4_K_M exported from a Q4_K_M source, against a model an edit was folded into and out of again. A
    rounding step of any GGUF type is orders of magnitude larger."""
    pb = dict(b.model.named_parameters())
    with torch.no_grad():
        for n, p in a.model.named_parameters():
            q = pb.get(n)
            if q is None or p.shape != q.shape:
                return False
            if float((p.float() - q.float()).abs().max()) > rel * float(q.float().abs().max()):
                return False
    return True


def edit_on_rung(base: Path, source: LoadedModel, edit_fn: EditFn, deltas: Sequence[LowRankDelta],
                 encoding: Any, stats_cfg: Any) -> RungEdit:
    """The edit computed on the unedited rung file `base` (loaded in torch, float32). When its weights are
    the source's, `deltas` and `encoding` (the source edit) are returned as they are. `stats_cfg`: the
    StatsConfig of the edit's key covariances (None: the default)."""
    from qedit.converters.gguf_aware import encoding_for
    from qedit.model import load_model
    from qedit.stats import StatsConfig

    quantized = load_model(base, device=source.device)
    if same_weights(quantized, source):
        log.info("%s: the weights equal the source's; the source edit is this rung's edit", base.name)
        return RungEdit(tuple(deltas), encoding, True, sum(d.norm() for d in deltas))
    log.info("computing the edit on %s", base.name)
    new, keys = edit_fn(quantized)
    enc = encoding_for(quantized, keys, stats_cfg or StatsConfig()) if keys else None
    if enc is None:
        log.warning("%s: the edit computed on this rung has no keys; its tensors are requantized plainly", base.name)
    return RungEdit(tuple(new), enc, False, sum(d.norm() for d in new))


def edit_with(requests: Sequence[Any], method: str, cfg: Any, batch_size: int | None = None) -> EditFn:
    """The EditFn that runs `qedit.api.edit` with these requests and settings on a rung's model."""
    def run(model: LoadedModel) -> tuple[Sequence[LowRankDelta], Mapping[int, Any]]:
        from qedit.api import edit

        outcome = edit(model, requests, method, cfg, batch_size=batch_size)
        return outcome.deltas, outcome.keys

    return run
