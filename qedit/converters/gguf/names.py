"""HF weight names -> GGUF tensor names, for writing deltas back into a GGUF file."""
from __future__ import annotations

import gguf

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

# GGUF tensors whose layout differs from HF beyond plain (out, in): llama.cpp permutes llama's
# attn_q/attn_k rows per head, so a delta computed in HF layout cannot be added to them directly.
_PERMUTED: dict[str, tuple[str, ...]] = {"llama": (".attn_q.weight", ".attn_k.weight")}


def _model_arch(arch: str, label: str) -> gguf.MODEL_ARCH:
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise QeditError(f"{label}: architecture {arch!r} is unknown to gguf-py; cannot map weight names")


def _block_count(gf: GGUFFile) -> int:
    count = gf.fields.get(f"{gf.architecture}.block_count")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise QeditError(f"{gf.path.name}: metadata {gf.architecture}.block_count is {count!r}; "
                         "expected a positive integer")
    return count


def gguf_tensor_name(gf: GGUFFile, hf_name: str) -> str:
    """The GGUF tensor holding HF weight `hf_name` (e.g. model.layers.6.mlp.down_proj.weight ->
    blk.6.ffn_down.weight). Raises QeditError when there is none or its layout is not plain (out, in)."""
    arch = gf.architecture
    name_map = gguf.TensorNameMap(_model_arch(arch, gf.path.name), _block_count(gf))
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None or name not in gf.tensors:
        raise QeditError(
            f"{gf.path.name}: no GGUF tensor for HF weight {hf_name!r} (mapped to {name!r}); "
            f"the delta does not belong to this {arch} model"
        )
    if name.endswith(_PERMUTED.get(arch, ())):
        raise QeditError(
            f"{gf.path.name}: {name} is stored row-permuted by llama.cpp; patching deltas into it "
            "is not supported, edit MLP weights instead"
        )
    return name
