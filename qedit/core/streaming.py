"""Streamed weights: a torch model whose large matrices stay where they are stored (a quantized file) and are
decoded when a pass needs them, so that a model larger than the memory budget can be edited.

`stream(model, source, ...)` takes a model whose streamed parameters are placeholders (on the meta device) and a
`WeightSource` that decodes any of them by name. Then:
- each decoder layer's forward materialises its streamed matrices (from the pins, else the cache, else the
  source) for the duration of the call and puts the placeholders back afterwards, whatever way the call ends
  (`qedit.core.hooks.stop_after` ends a pass by raising);
- a backward pass does not keep every layer's matrices alive: while a layer runs, autograd's saved tensors go
  through `saved_tensors_hooks`, which store a streamed matrix as a handle (its name and view geometry) and
  decode it again when the backward pass needs it;
- the embedding decodes only the rows of the tokens looked up;
- the LM head (the largest matrix, often the embedding itself) computes its logits, and their backward, a chunk
  of vocabulary rows at a time (`chunked_linear`, `_ChunkedLinear`).

The cache keeps decoded matrices while its byte capacity allows: the LM head first when it takes at most half of
the capacity, then matrices in the order passes first need them, never evicted (passes scan the layers in
order, where evicting the least recently used matrix would evict the one needed next). A pinned matrix is held
in full precision outside the cache until unpinned: the edited matrices (`LoadedModel.edit_weight`,
`qedit.core.delta.applied`). One-dimensional parameters (norms, biases) are never streamed.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from qedit.core.hooks import wrap_forward
from qedit.core.linalg import chunked_linear


class WeightSource(Protocol):
    """Decodes a model's stored parameters by HF name, in the model's dtype, on its device."""

    def tensor(self, name: str) -> torch.Tensor:
        """The whole parameter."""

    def rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (sorted, distinct) of a 2-D parameter: (len(ids), cols)."""

    def row_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a 2-D parameter: (hi - lo, cols)."""


@dataclass(frozen=True)
class _Handle:
    """A streamed matrix saved for backward: decoded again, as the same view, when autograd needs it."""

    name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


_STREAMERS: "weakref.WeakKeyDictionary[nn.Module, Streamer]" = weakref.WeakKeyDictionary()


def streamer_of(model: nn.Module) -> Streamer | None:
    """The streamer of a model loaded with streamed weights, or None for a model held in memory."""
    return _STREAMERS.get(model)


def _placeholder(p: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A stand-in of p's shape on `device` holding one NaN (expanded, no memory): what `model.device` sees first."""
    return nn.Parameter(torch.full((1,), float("nan"), dtype=p.dtype, device=device).expand(p.shape),
                        requires_grad=False)


class Streamer:
    """The streamed parameters of one model, their cache and pins. Built by `stream`."""

    def __init__(self, model: nn.Module, source: WeightSource, device: torch.device, cache_bytes: int,
                 head_chunk_rows: int, work_room: int = 1 << 62, stats_dtype: torch.dtype = torch.float64) -> None:
        self.model, self.source, self.device = model, source, torch.device(device)
        self.work_room = work_room            # bytes a pass's activations may take (the plan's workload)
        self.stats_dtype = stats_dtype        # what key statistics are summed in
        self.capacity, self.used = max(0, int(cache_bytes)), 0
        self.head_chunk_rows = max(1, int(head_chunk_rows))
        self.cache: dict[str, torch.Tensor] = {}
        self.pins: dict[str, torch.Tensor] = {}
        self.slots: dict[str, tuple[nn.Module, str, nn.Parameter]] = {}   # name -> (module, attribute, placeholder)
        self.sizes: dict[str, int] = {}                                   # name -> decoded bytes
        self.decoded = 0                                                  # matrices decoded so far (for logs)
        self._live: dict[int, str] = {}                                   # storage address -> name, in a layer call
        self.head_name: str | None = None
        self.head_module: nn.Module | None = None
        self.head_size = 0
        self._head: torch.Tensor | None = None                            # the whole LM head, when cached

    # ---- values --------------------------------------------------------------------------------------------

    def streams(self, name: str) -> bool:
        return name in self.slots

    def value(self, name: str, keep: bool = True) -> torch.Tensor:
        """The decoded parameter: pinned, cached, or decoded now (and cached when `keep` and it fits)."""
        if name in self.pins:
            return self.pins[name]
        if name in self.cache:
            return self.cache[name]
        t = self.source.tensor(name)
        self.decoded += 1
        if keep and self.used + self.sizes[name] <= self.capacity:
            self.cache[name] = t
            self.used += self.sizes[name]
        return t

    def pin(self, name: str) -> torch.Tensor:
        """Hold `name` decoded in full precision outside the cache (an edited matrix) until `unpin`."""
        if name not in self.pins:
            cached = self.cache.pop(name, None)
            if cached is not None:
                self.used -= self.sizes[name]
            self.pins[name] = cached if cached is not None else self.value(name, keep=False)
        return self.pins[name]

    def unpin(self, name: str) -> None:
        """Drop a pinned matrix (changes made to it are dropped with it: the stored value is the original)."""
        self.pins.pop(name, None)

    def resident(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, value) of every parameter, the value of a streamed one only when pinned (else None)."""
        for name, p in self.model.named_parameters():
            yield name, (self.pins.get(name) if name in self.slots else p)

    # ---- passes --------------------------------------------------------------------------------------------

    def _materialise(self, names: Sequence[str]) -> None:
        for name in names:
            module, attr, _ = self.slots[name]
            t = self.value(name)
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)
            if name not in self.pins and name not in self.cache:
                self._live[t.untyped_storage().data_ptr()] = name

    def _release(self, names: Sequence[str]) -> None:
        for name in names:
            module, attr, placeholder = self.slots[name]
            module._parameters[attr] = placeholder
        self._live.clear()

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._live or t.device.type == "meta" or t.layout != torch.strided:
            return t
        name = self._live.get(t.untyped_storage().data_ptr())
        if name is None:
            return t
        return _Handle(name, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Handle):
            return saved
        return self.value(saved.name).as_strided(saved.size, saved.stride, saved.offset)

    def wrap_layer(self, module: nn.Module, names: Sequence[str]) -> None:
        """Make `module`'s forward materialise `names` while it runs."""

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            self._materialise(names)
            try:
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                    return original(*args, **kwargs)
            finally:
                self._release(names)

        wrap_forward(module, forward)

    def wrap_embedding(self, module: nn.Module, name: str) -> None:
        """Make an embedding's forward decode only the rows looked up (its own forward runs on those rows, so
        a scaled embedding keeps its scale)."""

        def forward(original: Callable[..., Any], input_ids: torch.Tensor) -> torch.Tensor:
            ids, inverse = torch.unique(input_ids, sorted=True, return_inverse=True)
            rows = self.source.rows(name, ids.tolist())                               # (n_unique, d)
            placeholder, padding = module._parameters["weight"], getattr(module, "padding_idx", None)
            module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
            module.padding_idx = None
            try:
                return original(inverse.to(input_ids.device))
            finally:
                module._parameters["weight"], module.padding_idx = placeholder, padding

        wrap_forward(module, forward)

    def head_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the LM head."""
        assert self.head_name is not None
        if self._head is not None:
            return self._head[lo:hi]
        return self.source.row_range(self.head_name, lo, hi)

    def head_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """hidden (..., d) -> hidden @ head^T (..., vocab) without autograd, the product in `dtype` (default the
        hidden's), returned in float32 when `dtype` is given."""
        bias = getattr(self.head_module, "bias", None)
        out = chunked_linear(hidden, self.head_rows, self.head_size, self.head_chunk_rows, dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.float() if dtype is not None else out

    def wrap_head(self, module: nn.Module, name: str) -> None:
        """Make the LM head's forward compute its logits a chunk of rows at a time, its backward too."""
        self.head_name, self.head_module = name, module
        self.head_size = n_rows = int(module._parameters["weight"].shape[0])
        if self.sizes.get(name, 0) <= self.capacity // 2:
            self._head = self.source.tensor(name)
            self.used += self.sizes.get(name, 0)

        def forward(_original: Callable[..., Any], hidden: torch.Tensor) -> torch.Tensor:
            out = _ChunkedLinear.apply(hidden, self.head_rows, n_rows, self.head_chunk_rows)
            bias = getattr(module, "bias", None)
            return out if bias is None else out + bias

        wrap_forward(module, forward)


class _ChunkedLinear(torch.autograd.Function):
    """hidden @ W^T with W read in row chunks, forward and backward (W itself gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, read: Callable[[int, int], torch.Tensor], n_rows: int,
                chunk: int) -> torch.Tensor:
        ctx.read, ctx.n_rows, ctx.chunk = read, n_rows, chunk
        return chunked_linear(hidden, read, n_rows, chunk)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        out = None
        for lo in range(0, ctx.n_rows, ctx.chunk):
            hi = min(ctx.n_rows, lo + ctx.chunk)
            part = grad[..., lo:hi] @ ctx.read(lo, hi)                                 # (..., d)
            out = part if out is None else out + part
        return out, None, None, None


def stream(model: nn.Module, source: WeightSource, layers: Sequence[nn.Module], embedding: tuple[nn.Module, str],
           head: tuple[nn.Module, str], device: torch.device, cache_bytes: int, head_chunk_rows: int,
           dtype: torch.dtype = torch.float32, work_room: int = 1 << 62,
           stats_dtype: torch.dtype = torch.float64) -> Streamer:
    """Stream `model`'s parameters that are on the meta device: the 2-D ones of each module in `layers` (its
    decoder layers), the embedding (module, parameter name) and the LM head (module, parameter name; the same
    parameter when tied). Every other parameter must already hold its value. `work_room`: the bytes a pass's
    activations may take; `stats_dtype`: what key statistics are summed in (float32 where float64 sums would not
    fit)."""
    streamer = Streamer(model, source, device, cache_bytes, head_chunk_rows, work_room, stats_dtype)
    owner = {id(p): name for name, p in model.named_parameters()}
    size = dtype.itemsize
    ends = [(module, attr, owner[id(module._parameters[attr])]) for module, attr in (embedding, head)]
    for module, attr, name in ends:
        if name not in streamer.slots:
            p = module._parameters[attr]
            streamer.slots[name] = (module, attr, _placeholder(p, streamer.device))
            streamer.sizes[name] = p.numel() * size
        module._parameters[attr] = streamer.slots[name][2]
    streamer.wrap_embedding(embedding[0], ends[0][2])
    for layer in layers:
        names = []
        for sub_name, p in layer.named_parameters():
            if p.is_meta and p.dim() >= 2:
                module_name, _, attr = sub_name.rpartition(".")
                module = layer.get_submodule(module_name) if module_name else layer
                name = owner[id(p)]
                streamer.slots[name] = (module, attr, p)
                streamer.sizes[name] = p.numel() * size
                names.append(name)
        streamer.wrap_layer(layer, names)
    streamer.wrap_head(head[0], ends[1][2])
    _STREAMERS[model] = streamer
    return streamer
