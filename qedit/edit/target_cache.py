"""On-disk cache of optimised targets (ROME's v*, MEMIT's z), one small file per chunk of requests.

The targets of a chunk depend on the model's current weights, the site, the context prefixes, the
target settings and the chunk's requests, and on nothing else. The key covers all of them, and the rule by
which the optimisation stops (`STOP_RULE`: targets computed under an earlier rule are not reused). The
weights enter through a digest of every parameter's float64 sum and sum of squares, so a model with edits
folded in, or folded and reverted, never reuses the unedited model's targets. Targets computed on top of
applied deltas (ROME's sequential edits) are not cached. Files are written as every cache entry's are (qedit.core.cache:
first writer wins, a damaged file is replaced), and a read marks the entry's last use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from qedit.core.cache import CacheEntry, ModelLabel
from qedit.core.facts import EditRequest
from qedit.core.linalg import wide
from qedit.core.model import LoadedModel
from qedit.core.stats import model_cache_dir
from qedit.core.streaming import streamer_of
from qedit.edit.registry import EditContext, MethodConfig, TargetConfig

log = logging.getLogger(__name__)

# TargetConfig fields that do not change a chunk's targets (the chunk is in the key itself)
_NEUTRAL_FIELDS = ("chunk",)
# How a chunk's optimisation stops (qedit.edit.targets): each request once its own loss is met, with minimal
# strength (earlier: the chunk, once all were)
STOP_RULE = "per-request"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype, float64 sum and sum of squares. A streamed weight
    (qedit.core.streaming) enters as "stored" (its file is in the cache directory's key), or by its sums while it
    is pinned (it may carry a change then)."""
    h = hashlib.sha256()
    streamer = streamer_of(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in (streamer.resident() if streamer is not None else params.items()):
            if p is None:
                h.update(f"{name}|{tuple(params[name].shape)}|stored;".encode())
                continue
            total = squares = 0.0
            for part in p.detach().reshape(-1).split(1 << 20):      # float64 in pieces: no full copy
                x = wide(part)
                total += float(x.sum())
                squares += float(x.dot(x))
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{total!r}|{squares!r};".encode())
    return h.hexdigest()


class TargetCache:
    """Targets of one (model state, site, prefixes, settings) in a directory; `None` dir = disabled."""

    def __init__(self, directory: Path | None, loaded: LoadedModel, site: str, prefixes: Sequence[str],
                 cfg: TargetConfig, tag: dict[str, float] | None = None) -> None:
        self.dir = directory
        self._base = ""
        self._entry = None if directory is None else CacheEntry(Path(directory), ModelLabel.of(loaded))
        if directory is not None:
            settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NEUTRAL_FIELDS}
            settings.update(tag or {})   # another objective's targets (unlearning) never answer for an edit's
            self._base = json.dumps({"weights": weights_digest(loaded.model), "site": site, "prefixes": list(prefixes),
                                     "settings": settings, "stop": STOP_RULE,
                                     "dtype": str(next(loaded.model.parameters()).dtype)}, sort_keys=True)

    def _path(self, chunk: Sequence[EditRequest]) -> Path:
        assert self.dir is not None
        key = json.dumps([self._base] + [[r.prompt, r.subject, r.target_new] for r in chunk])
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def get(self, chunk: Sequence[EditRequest]) -> tuple[torch.Tensor, list[float]] | None:
        """The chunk's targets (n, d) and NLLs, or None when not cached."""
        if self._entry is None:
            return None
        found = self._entry.load(self._path(chunk).name, _read)
        if found is not None and (found[0].shape[0] != len(chunk) or len(found[1]) != len(chunk)):
            log.warning("%s: cached targets do not match the chunk; computing them again", self._path(chunk))
            return None
        return found

    def put(self, chunk: Sequence[EditRequest], deltas: torch.Tensor, nlls: Sequence[float]) -> None:
        if self._entry is None:
            return
        payload = {"deltas": deltas.detach().cpu().clone(), "nll": torch.tensor(list(nlls), dtype=torch.float64)}
        self._entry.publish(self._path(chunk).name, lambda tmp: torch.save(payload, tmp), _read)


def _read(path: Path) -> tuple[torch.Tensor, list[float]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["deltas"], data["nll"].tolist()


def target_cache_dir(loaded: LoadedModel, cfg: MethodConfig, ctx: EditContext) -> Path | None:
    """Where the targets of `loaded` are cached (beside its key statistics), or None when caching is off or the
    model's weights are not its source's (a later batch of a sequential run: earlier batches are applied)."""
    if not cfg.stats.use_cache or ctx.earlier_applied:
        return None
    return model_cache_dir(loaded, cfg.stats) / "targets"
