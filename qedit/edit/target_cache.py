"""On-disk cache of optimised targets (ROME's v*, MEMIT's z), one small file per chunk of requests.

The targets of a chunk depend on the model's current weights, the site, the context prefixes, the
target settings and the chunk's requests in order (the chunk stops when all of them are below the
threshold), and on nothing else. The key covers all of them; the weights enter through a digest of
every parameter's float64 sum and sum of squares, so a model with edits folded in, or folded and
reverted, never reuses the unedited model's targets. Targets computed on top of applied deltas
(ROME's sequential edits) are not cached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from qedit.core.facts import EditRequest
from qedit.core.files import atomic_path
from qedit.core.model import LoadedModel
from qedit.core.stats import model_cache_dir
from qedit.edit.registry import MethodConfig, TargetConfig

log = logging.getLogger(__name__)

# TargetConfig fields that do not change a chunk's targets (the chunk is in the key itself)
_NEUTRAL_FIELDS = ("chunk",)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype, float64 sum and sum of squares."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = squares = 0.0
            for part in p.detach().reshape(-1).split(1 << 20):      # float64 in pieces: no full copy
                x = part.double()
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
        if directory is not None:
            settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NEUTRAL_FIELDS}
            settings.update(tag or {})   # another objective's targets (unlearning) never answer for an edit's
            self._base = json.dumps({"weights": weights_digest(loaded.model), "site": site, "prefixes": list(prefixes),
                                     "settings": settings, "dtype": str(next(loaded.model.parameters()).dtype)},
                                    sort_keys=True)

    def _path(self, chunk: Sequence[EditRequest]) -> Path:
        assert self.dir is not None
        key = json.dumps([self._base] + [[r.prompt, r.subject, r.target_new] for r in chunk])
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def get(self, chunk: Sequence[EditRequest]) -> tuple[torch.Tensor, list[float]] | None:
        """The chunk's targets (n, d) and NLLs, or None when not cached."""
        if self.dir is None:
            return None
        path = self._path(chunk)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, weights_only=True)
            deltas, nlls = data["deltas"], data["nll"].tolist()
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("%s: unreadable cached targets (%s); computing them again", path, exc)
            return None
        if deltas.shape[0] != len(chunk) or len(nlls) != len(chunk):
            log.warning("%s: cached targets do not match the chunk; computing them again", path)
            return None
        return deltas, nlls

    def put(self, chunk: Sequence[EditRequest], deltas: torch.Tensor, nlls: Sequence[float]) -> None:
        if self.dir is None:
            return
        with atomic_path(self._path(chunk)) as tmp:
            torch.save({"deltas": deltas.detach().cpu().clone(), "nll": torch.tensor(list(nlls), dtype=torch.float64)}, tmp)


def target_cache_dir(loaded: LoadedModel, cfg: MethodConfig) -> Path | None:
    """Where the targets of `loaded` are cached (beside its key statistics), or None when caching is off."""
    if not cfg.stats.use_cache:
        return None
    return model_cache_dir(loaded, cfg.stats) / "targets"
