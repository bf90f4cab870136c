"""Deltas are data: a dense `Delta` or a low-rank `LowRankDelta` per weight matrix.

Factors are kept in math orientation: dW = scale * A @ B with A (out, r) and B (r, in), so that
y = (W + dW) x. `orientation` says how the target weight is stored, and only `stored_dense`
and `fold` look at it.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from qedit.core import linalg
from qedit.core.arch import Orientation
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.core.streaming import streamer_of

DELTAS_FILE = "qedit_deltas.safetensors"
MANIFEST_FILE = "qedit_manifest.json"


@dataclass(frozen=True, eq=False)
class Delta:
    """A dense weight change in math orientation, dense (out, in)."""

    name: str
    layer: int
    dense: torch.Tensor
    orientation: Orientation

    def to_low_rank(self, rank: int | None = None, energy: float | None = None) -> "LowRankDelta":
        a, b = linalg.svd_truncate(self.dense, rank=rank, energy=energy)
        return LowRankDelta(self.name, self.layer, a, b, 1.0, self.orientation)


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """dW = scale * a @ b, a (out, r), b (r, in), for the weight called `name` (HF state-dict name)."""

    name: str
    layer: int
    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0
    orientation: Orientation = Orientation.OUT_IN
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(f"{self.name}: factors must be (out, r) and (r, in), got {tuple(self.a.shape)} and {tuple(self.b.shape)}")

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.a.shape[0]), int(self.b.shape[1])

    def dense(self) -> torch.Tensor:
        """(out, in) in float32."""
        return self.scale * (self.a.float() @ self.b.float())

    def stored_dense(self) -> torch.Tensor:
        """The change in the orientation the weight is stored in."""
        d = self.dense()
        return d if self.orientation is Orientation.OUT_IN else d.t()

    def output_change(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (n, in) -> dW keys (n, out)."""
        return self.scale * (keys.float() @ self.b.float().t()) @ self.a.float().t()

    def scaled(self, factor: float) -> "LowRankDelta":
        return LowRankDelta(self.name, self.layer, self.a, self.b, self.scale * factor, self.orientation, dict(self.meta))

    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.dense()))


def combine(deltas: Sequence[LowRankDelta]) -> list[LowRankDelta]:
    """Merge deltas on the same weight by concatenating factors (ranks add)."""
    by_name: dict[str, list[LowRankDelta]] = {}
    for d in deltas:
        by_name.setdefault(d.name, []).append(d)
    merged = []
    for name, group in by_name.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        a = torch.cat([d.scale * d.a.float() for d in group], dim=1)
        b = torch.cat([d.b.float() for d in group], dim=0)
        merged.append(LowRankDelta(name, group[0].layer, a, b, 1.0, group[0].orientation))
    return merged


@contextlib.contextmanager
def applied(model: torch.nn.Module, deltas: Sequence[LowRankDelta]) -> Iterator[torch.nn.Module]:
    """Add each delta to its weight for the duration of the block, then put the original tensors back
    bit for bit. The one place in qedit that changes weights.

    Every delta is checked before any weight changes, so a bad one leaves the model as it was. Only the
    edited weights are copied (one copy each, however many deltas target them). A streamed weight
    (qedit.core.streaming) is pinned for the block and dropped after it: its stored value is the original."""
    params = dict(model.named_parameters())
    streamer = streamer_of(model)
    changes = []
    for d in deltas:
        if d.name not in params:
            raise QeditError(f"delta targets {d.name!r}, which this model does not have")
        change = d.stored_dense()
        if tuple(change.shape) != tuple(params[d.name].shape):
            raise QeditError(f"delta for {d.name} has shape {tuple(change.shape)}, weight is {tuple(params[d.name].shape)}")
        changes.append((d.name, change))
    streamed = {name for name, _ in changes if streamer is not None and streamer.streams(name)}
    pinned_here = {name for name in streamed if name not in streamer.pins} if streamer is not None else set()
    weights = {name: streamer.pin(name) if name in streamed else params[name] for name, _ in changes}
    saved = {name: w.detach().clone() for name, w in weights.items() if name not in pinned_here}
    try:
        with torch.no_grad():
            for name, change in changes:
                weights[name].add_(change.to(device=weights[name].device, dtype=weights[name].dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                weights[name].copy_(original)
        for name in pinned_here:
            streamer.unpin(name)


def save_deltas(directory: Path, deltas: Sequence[LowRankDelta], manifest: dict[str, Any],
                keys: Mapping[int, torch.Tensor] | None = None) -> None:
    """Write the factors (safetensors) and the manifest (JSON) into `directory`, atomically.
    `keys` (layer -> (n, d_in)) are the edit keys, kept for quantization-aware export."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, d in enumerate(deltas):
        tensors[f"{i}.a"] = d.a.detach().float().cpu().contiguous()
        tensors[f"{i}.b"] = d.b.detach().float().cpu().contiguous()
        entries.append({"index": i, "name": d.name, "layer": d.layer, "rank": d.rank, "scale": d.scale,
                        "orientation": d.orientation.value, "norm": d.norm(), "meta": d.meta})
    for layer, k in (keys or {}).items():
        tensors[f"keys.{int(layer)}"] = k.detach().float().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / DELTAS_FILE) as tmp:
        save_file(tensors, str(tmp))
    full = dict(manifest, deltas=entries)
    with atomic_path(directory / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(full, indent=2, default=str))


def load_edit_keys(directory: Path) -> dict[int, torch.Tensor]:
    """The edit keys `save_deltas` stored (layer -> (n, d_in)); {} for outputs saved without them."""
    from safetensors import SafetensorError, safe_open

    path = directory / DELTAS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return {int(k.split(".", 1)[1]): f.get_tensor(k) for k in f.keys() if k.startswith("keys.")}
    except (OSError, SafetensorError, ValueError) as exc:
        raise QeditError(f"{path}: cannot read the edit keys ({exc}); re-run `qedit edit`") from exc


def load_deltas(directory: Path) -> tuple[list[LowRankDelta], dict[str, Any]]:
    """Read what `save_deltas` wrote; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest_path, deltas_path = directory / MANIFEST_FILE, directory / DELTAS_FILE
    for p in (manifest_path, deltas_path):
        if not p.is_file():
            raise QeditError(f"{p}: missing; expected the output directory of `qedit edit`")
    try:
        manifest = json.loads(manifest_path.read_text())
        tensors = load_file(str(deltas_path))
        deltas = [
            LowRankDelta(e["name"], int(e["layer"]), tensors[f"{e['index']}.a"], tensors[f"{e['index']}.b"],
                         float(e["scale"]), Orientation(e["orientation"]), dict(e.get("meta", {})))
            for e in manifest["deltas"]
        ]
    except (json.JSONDecodeError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise QeditError(f"{directory}: corrupt qedit deltas ({exc}); re-run `qedit edit`") from exc
    return deltas, manifest
