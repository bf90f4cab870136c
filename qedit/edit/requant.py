"""Requantizing edited MLP weights in torch, with qedit's llama.cpp-exact kernels (no llama.cpp needed).

`requantized_changes` answers "what change does a weight really get once W0 + dW is stored in GGUF
type T": Q(W0 + dW) - W0, with Q = quantize then dequantize, rows along the input dimension as in
GGUF files. W0 is the loaded weight; for a model loaded from a quantized GGUF it lies on its source
type's grid, so requantizing to that type ("source") rounds a small dW back to nothing.
`ste_changes` is the same in a form gradients pass through unchanged (a straight-through estimator),
for quantization in a training loop.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from qedit.core.errors import QeditError
from qedit.core.hooks import OutputEdit
from qedit.core.model import LoadedModel
from qedit.kernels import get_kernel, resolve_type
from qedit.kernels.gguf_quants import GGMLQuantizationType

SOURCE = "source"   # the type the loaded GGUF stores the weight in


def source_type(loaded: LoadedModel, layer: int) -> GGMLQuantizationType:
    """The GGML type of the edit-target weight at `layer` in the GGUF file `loaded` came from."""
    name = loaded.arch.weight_name(layer)
    if name not in loaded.stored_types:
        raise QeditError(f"{loaded.source}: not loaded from a GGUF file, so its weights have no source "
                         "quantization type; name a type such as Q4_K or Q4_0 instead of 'source'")
    return GGMLQuantizationType[loaded.stored_types[name]]


def resolve_qtype(loaded: LoadedModel, layer: int, name: str) -> GGMLQuantizationType:
    """"source" or a GGML type name -> the type a `layer` weight gets (with llama.cpp's row-length fallback)."""

    n_in = int(loaded.edit_shape(layer)[1])
    wanted = source_type(loaded, layer) if name == SOURCE else name
    actual, _ = resolve_type(wanted, n_in, tensor_name=loaded.arch.weight_name(layer))
    return actual


def requantize(weight: np.ndarray, qtype: GGMLQuantizationType, n_threads: int | None = None) -> np.ndarray:
    """weight float32 (out, in) -> float32 (out, in): dequantize(quantize(weight, qtype)), rows along `in`."""

    kernel = get_kernel(qtype)
    rows = np.ascontiguousarray(weight, dtype=np.float32)                      # (out, in)
    threads = n_threads if n_threads is not None else torch.get_num_threads()
    return kernel.dequantize(kernel.quantize(rows, n_threads=threads), rows.shape)


@dataclass
class Requantizer:
    """Q(W0 + dW) - W0 for the edit weights of some layers, each with its own GGML type.

    The unedited weights W0 (out, in) are copied once, so the model may be changed afterwards.
    """

    loaded: LoadedModel
    types: dict[int, GGMLQuantizationType]

    def __post_init__(self) -> None:
        self._w0 = {layer: self.loaded.edit_weight(layer).detach().float().cpu().numpy().copy()  # (out, in)
                    for layer in self.types}

    @classmethod
    def for_type(cls, loaded: LoadedModel, layers: tuple[int, ...] | list[int], name: str) -> Requantizer:
        """All `layers` requantized to type `name` ("source" or a GGML type name such as "Q4_0")."""
        return cls(loaded, {layer: resolve_qtype(loaded, layer, name) for layer in layers})

    def describe(self) -> dict[int, str]:
        return {layer: t.name for layer, t in self.types.items()}

    @torch.no_grad()
    def changes(self, changes: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """dW (out, in) per layer -> the change the requantized weight really has, Q(W0 + dW) - W0."""
        out = {}
        for layer, qtype in self.types.items():
            w0 = self._w0[layer]                                                # (out, in)
            c = changes.get(layer)
            edited = w0 if c is None else w0 + c.detach().float().cpu().numpy()
            eff = requantize(edited, qtype) - w0                                # (out, in)
            device = c.device if c is not None else self.loaded.device
            out[layer] = torch.from_numpy(eff).to(device)
        return out

    def ste_changes(self, changes: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Like `changes`, but the gradient passes to dW as if there were no rounding (straight-through)."""
        real = self.changes(changes)
        return {layer: changes[layer] + (real[layer] - changes[layer]).detach() if layer in changes else real[layer]
                for layer in real}


def dense_edits(loaded: LoadedModel, changes: Mapping[int, torch.Tensor]) -> dict[str, OutputEdit]:
    """Hooks that make a forward pass see W + dW at each layer (dW (out, in), math orientation), dW moved to the
    layer's device (differentiably)."""

    def add(dw: torch.Tensor) -> OutputEdit:
        return lambda inp, out: out + inp @ dw.t().to(device=inp.device, dtype=inp.dtype)   # inp (..., in) -> (..., out)

    return {loaded.arch.mlp_out.format(layer): add(dw) for layer, dw in changes.items()}


def requantized_changes(loaded: LoadedModel, changes: Mapping[int, torch.Tensor], name: str) -> dict[int, torch.Tensor]:
    """Q(W0 + dW) - W0 per layer for type `name` ("source" or a GGML type name): what an edit becomes in a
    file of that type. Use with `dense_edits` and `qedit.core.hooks.edit_outputs` to score the requantized model."""
    return Requantizer.for_type(loaded, sorted(changes), name).changes(changes)
