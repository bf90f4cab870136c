"""HF weight names -> GGUF tensor names, for writing deltas back into a GGUF file."""
from __future__ import annotations

from qedit.converters.gguf.archs import check_arch, name_map, permuted_suffixes
from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError


def _block_count(gf: GGUFFile) -> int:
    count = gf.fields.get(f"{gf.architecture}.block_count")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise QeditError(f"{gf.path.name}: metadata {gf.architecture}.block_count is {count!r}; "
                         "expected a positive integer")
    return count


def gguf_tensor_name(gf: GGUFFile, hf_name: str) -> str:
    """The GGUF tensor holding HF weight `hf_name` (e.g. model.layers.6.mlp.down_proj.weight ->
    blk.6.ffn_down.weight). Raises QeditError when there is none or its layout is not plain (out, in)."""
    spec = check_arch(gf)
    arch = spec.name
    name = name_map(arch, _block_count(gf)).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None or name not in gf.tensors:
        raise QeditError(
            f"{gf.path.name}: no GGUF tensor for HF weight {hf_name!r} (mapped to {name!r}; a fused attn_qkv holds "
            f"q, k and v together); the delta does not belong to this {arch} model or cannot be patched into it"
        )
    if name.endswith(permuted_suffixes(spec)):
        raise QeditError(
            f"{gf.path.name}: {name} is stored row-permuted by llama.cpp; patching deltas into it "
            "is not supported, edit MLP weights instead"
        )
    return name
