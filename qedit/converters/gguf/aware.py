"""Edit-aware encoding of edited GGUF tensors: the bridge from patch/export to `qedit.kernels.aware`.

An `EditEncoding` holds, per edit layer, the edit keys k* (n, in) and the key covariance C (in, in).
Patch and export hand it each edited tensor (its unedited weight W0 and the summed change dW, both
(rows, cols) = (out, in) float32) and get back bytes of the same GGUF type chosen so that the
quantized weight keeps the edit's output change at the keys. Tensors of layers without keys take the
plain path (quantize W0 + dW).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qedit.core.stats import key_covariance
from qedit.kernels.aware import AwareConfig, quantize_edited
from qedit.kernels.gguf_quants import GGMLQuantizationType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedTensor:
    data: np.ndarray                 # uint8 (rows, row_bytes) in the requested type
    kept: float | None = None        # share of the edit's output change at the keys kept (aware path)
    kept_naive: float | None = None  # the same for plain requantization of W0 + dW


@dataclass(frozen=True)
class EditEncoding:
    """Keys (layer -> (n, in)) and covariances (layer -> (in, in)) of an edit, and the aware settings."""

    keys: Mapping[int, Any]
    covs: Mapping[int, Any] = field(default_factory=dict)
    cfg: AwareConfig = field(default_factory=AwareConfig)

    def __post_init__(self) -> None:
        for layer, k in self.keys.items():
            if np.asarray(as_numpy(k)).ndim != 2:
                raise ValueError(f"EditEncoding: keys of layer {layer} must be (n, in)")

    def describe(self) -> dict[str, Any]:
        """For manifests: which path encoded the edited tensors, and with which settings."""
        return {"path": "aware", "layers": sorted(int(x) for x in self.keys), **dataclasses.asdict(self.cfg)}

    def encode(self, name: str, layer: int, w0: np.ndarray, change: np.ndarray,
               ggml_type: GGMLQuantizationType, original: np.ndarray | None = None) -> EncodedTensor | None:
        """Aware bytes for tensor `name` (w0, change: (rows, cols) float32), or None when `layer` has no keys.
        `original`: the file's bytes w0 was dequantized from when they are of `ggml_type` (a patch)."""
        if layer not in self.keys:
            return None
        keys = as_numpy(self.keys[layer])                                   # (n, in)
        cov = as_numpy(self.covs[layer], None) if layer in self.covs else None   # (in, in), not widened
        res = quantize_edited(w0, change, keys, ggml_type, cov=cov, cfg=self.cfg, original=original)
        log.info("%s: edit-aware %s, kept %.3f of the edit at its keys (plain requantization: %.3f)",
                 name, ggml_type.name, res.kept, res.kept_naive)
        return EncodedTensor(res.data, float(res.kept), float(res.kept_naive))


def as_numpy(t: Any, dtype: Any = np.float64) -> np.ndarray:
    """A torch tensor or array-like as a contiguous numpy array of `dtype` (float64 by default; None: the float
    type it has, a CPU tensor's memory shared rather than copied)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        native = dtype is None or np.dtype(dtype) != np.float64
        t = (t if native and str(t.dtype) in ("torch.float32", "torch.float64") else t.double()).numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=dtype))


class CachedCovariances(Mapping[int, Any]):
    """Each layer's key covariance, read from the statistics cache when the encoding of that layer's matrix asks
    for it: an encoding holds one covariance at a time, not every edited layer's (each is d_ff^2 float32)."""

    def __init__(self, loaded: Any, layers: tuple[int, ...], stats_cfg: Any) -> None:
        self._loaded, self._layers, self._cfg = loaded, layers, stats_cfg

    def __getitem__(self, layer: int) -> Any:
        if layer not in self._layers:
            raise KeyError(layer)
        return key_covariance(self._loaded, [layer], self._cfg)[layer]            # (in, in)

    def __contains__(self, layer: object) -> bool:
        return layer in self._layers

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def encoding_for(loaded: Any, keys: Mapping[int, Any], stats_cfg: Any, cfg: AwareConfig | None = None) -> EditEncoding:
    """An EditEncoding with the key covariance of every layer that has keys: read from the statistics cache layer
    by layer as each matrix is encoded, or, without a cache, computed for all layers at once and held."""
    layers = tuple(sorted(int(x) for x in keys))
    if not layers:
        covs: Mapping[int, Any] = {}
    elif stats_cfg.use_cache:   # the edit has cached them; a layer not cached is computed when it is asked for
        covs = CachedCovariances(loaded, layers, stats_cfg)
    else:
        covs = dict(key_covariance(loaded, list(layers), stats_cfg))
    return EditEncoding(dict(keys), covs, cfg or AwareConfig())
