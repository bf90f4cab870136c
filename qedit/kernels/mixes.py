"""llama.cpp's per-tensor quant mixes: which GGUF type each tensor gets for a file type (Q4_K_M, ...).

Reimplements the rules of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the file
types whose tensor types are all in qedit's registry, for dense models such as llama, qwen2 and
gemma3 (with the falcon and 8-expert special cases that the same rules contain). Not covered:
user overrides (--tensor-type, --output-tensor-type, --token-embedding-type), IQ1/IQ2/IQ3/TQ/MXFP4
file types, layer pruning.

llama.cpp counts attn_v and ffn_down tensors while it walks them in (layer, name) order;
`plan_tensor_types` replays that walk over a whole model. `tensor_type_for` answers for one tensor
and takes the counters from the block number in its name, which is the same for ordinary models
(one attn_v and one ffn_down per block, blocks numbered from 0).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import gguf

from qedit.core.errors import QeditError
from qedit.kernels.registry import check_shape, get_kernel, resolve_type

logger = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

_DEFAULT_TYPE: MappingProxyType[gguf.LlamaFileType, gguf.GGMLQuantizationType] = MappingProxyType({
    F.ALL_F32: T.F32, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
    F.MOSTLY_IQ4_NL: T.IQ4_NL, F.MOSTLY_IQ4_XS: T.IQ4_XS,
})
_STORAGE = frozenset({T.F32, T.F16, T.BF16})

# Substrings of 2-D weights that llama.cpp never quantizes (small, or precision-critical).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{s}.weight" for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2",
                                         "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")),
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
_BLOCK_RE = re.compile(r"^blk\.\s*([+-]?\d+)")


def supported_ftypes() -> tuple[gguf.LlamaFileType, ...]:
    return tuple(sorted(_DEFAULT_TYPE))


def ftype_from_name(ftype: str | int | gguf.LlamaFileType) -> gguf.LlamaFileType:
    """"Q4_K_M", "mostly_q4_k_m", "F16", "ALL_F32", 15 or LlamaFileType.MOSTLY_Q4_K_M -> LlamaFileType."""
    if isinstance(ftype, str):
        key = ftype.strip().upper()
        for candidate in (key, f"MOSTLY_{key}", f"ALL_{key}"):
            if candidate in F.__members__:
                found = F[candidate]
                break
        else:
            found = None
    else:
        try:
            found = F(int(ftype))
        except (ValueError, TypeError):
            found = None
    if found is None or found not in _DEFAULT_TYPE:
        names = ", ".join(f.name.removeprefix("MOSTLY_").removeprefix("ALL_") for f in supported_ftypes())
        raise QeditError(f"ftype: {ftype!r} is not a supported llama.cpp file type; use one of {names}")
    return found


@dataclass(frozen=True)
class MixModel:
    """The model facts that llama.cpp's type choice depends on."""

    arch: str  # general.architecture, e.g. "llama", "qwen2", "gemma3"
    n_layers: int  # <arch>.block_count
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    has_output_tensor: bool = False  # False: embeddings are tied, token_embd gets the output rules
    has_imatrix: bool = False  # llama.cpp picks some types differently when quantizing with an imatrix

    def __post_init__(self) -> None:
        if not self.arch:
            raise QeditError("MixModel.arch: must be the GGUF architecture name, e.g. 'llama'")
        if self.n_layers <= 0:
            raise QeditError(f"MixModel.n_layers: must be positive, got {self.n_layers}")
        if self.n_head <= 0 or self.n_head_kv <= 0:
            raise QeditError(f"MixModel.n_head/n_head_kv: must be positive, got {self.n_head}/{self.n_head_kv}")
        if self.n_expert < 0:
            raise QeditError(f"MixModel.n_expert: must be >= 0, got {self.n_expert}")

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (only this size class changes the mix)."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layers == 80 and self.n_head != self.n_head_kv
        return self.arch == "qwen2" and self.n_layers == 80


@dataclass
class _Walk:
    """llama.cpp's running counters (quantize_state_impl)."""

    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category; fused qkv and MLA kv_b count as attn_v (as there)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims for a numpy-order shape: trailing size-1 ggml dims do not count."""
    for i, size in enumerate(shape):  # shape[0] is ggml's highest dim
        if size > 1:
            return max(1, len(shape) - i)
    return 1


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    if _n_dims(shape) < 2 or not name.endswith("weight") or name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in name for part in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block_index(name: str) -> int | None:
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def _layer(counter: int, name: str, model: MixModel) -> tuple[int, int]:
    """(i_layer, n_layers) as llama.cpp's layer_info: MoE models read the block from the name."""
    if model.n_expert <= 1:
        return counter, model.n_layers
    i_layer = _block_index(name)
    if i_layer is None or not 0 <= i_layer < model.n_layers:
        raise QeditError(f"tensor {name!r}: cannot find its block number in [0, {model.n_layers}); "
                         "expected a name like 'blk.3.ffn_down.weight'")
    return i_layer, model.n_layers


def _mix_rules(ft: gguf.LlamaFileType, new: T, name: str, n_cols: int, model: MixModel, walk: _Walk) -> T:
    """llama_tensor_get_type_impl for the supported file types (before the row-length fallback)."""
    cat = _category(name)
    if cat == "output" or (cat == "token_embd" and not model.has_output_tensor):
        if model.arch == "falcon" or n_cols % get_kernel(new).block_size:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    return _mix_body(ft, new, name, cat, model, walk)


def _mix_body(ft: gguf.LlamaFileType, new: T, name: str, cat: str, model: MixModel, walk: _Walk) -> T:
    falcon = model.arch == "falcon"
    if cat == "token_embd":
        return new  # untied embeddings keep the default type for these file types
    if cat == "attn_v":
        i, n = walk.i_attention_wv, walk.n_attention_wv
        if ft == F.MOSTLY_Q2_K:
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and model.n_gqa >= 4:
            new = T.Q5_K
        elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if model.n_expert == 8:
            new = T.Q8_0
        walk.i_attention_wv += 1
    elif cat == "attn_k":
        if model.n_expert == 8:
            new = T.Q8_0
    elif cat == "ffn_down":
        i, n = _layer(walk.i_ffn_down, name, model)
        more = _use_more_bits(i, n)
        if ft == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else (T.Q4_K if not falcon or more else T.Q3_K)
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ft == F.MOSTLY_Q4_K_M:
            if falcon:
                new = T.Q6_K if i < n // 16 else (T.Q5_K if more else T.Q4_K)
            elif more:
                new = T.Q6_K
        elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not model.has_imatrix:
            new = T.Q5_K
        elif ft == F.MOSTLY_Q5_K_M and more:
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            new = T.Q5_K
        elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and model.has_imatrix and i < n // 8:
            new = T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
        walk.i_ffn_down += 1
    elif cat == "attn_output":
        if falcon:
            new = T.Q4_K if ft == F.MOSTLY_Q3_K_L else new
        elif model.n_expert == 8:
            if ft in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S,
                      F.MOSTLY_Q4_K_M, F.MOSTLY_IQ4_XS):
                new = T.Q5_K
        else:
            new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, new)
    elif cat == "ffn_gate":
        _layer(walk.i_ffn_gate, name, model)
        walk.i_ffn_gate += 1
    elif cat == "ffn_up":
        _layer(walk.i_ffn_up, name, model)
        walk.i_ffn_up += 1
    return new


def _choose(
    ft: gguf.LlamaFileType,
    name: str,
    shape: Sequence[int],
    model: MixModel,
    walk: _Walk,
    source_type: T,
    pure: bool,
) -> T:
    """llama_tensor_get_type: the stored type of one tensor (advances the walk counters)."""
    if not _allows_quantization(name, shape):
        return source_type  # copied as it is (norms, biases, 1-D tensors)
    default = _DEFAULT_TYPE[ft]
    if default in _STORAGE:
        return default
    n_cols = int(shape[-1])
    new = default if pure else _mix_rules(ft, default, name, n_cols, model, walk)
    return resolve_type(new, n_cols, tensor_name=name)[0]


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    return check_shape(shape, f"tensor {name!r}")


def tensor_type_for(
    ftype_name: str | int | gguf.LlamaFileType,
    gguf_tensor_name: str,
    n_layers: int,
    shape: Sequence[int],
    arch: str,
    *,
    n_head: int = 1,
    n_head_kv: int = 1,
    n_expert: int = 0,
    has_output_tensor: bool = False,
    has_imatrix: bool = False,
    source_type: T = T.F32,
    pure: bool = False,
) -> T:
    """The GGUF type llama.cpp gives one tensor when it writes a file of `ftype_name`.

    shape is in numpy order (..., n_rows, n_cols). Tensors llama.cpp does not quantize (1-D, norms)
    keep `source_type`. The attn_v/ffn_down position is taken from the "blk.N." prefix, which is
    what llama.cpp's counters give for ordinary models; use plan_tensor_types for a whole model.
    """
    ft = ftype_from_name(ftype_name)
    dims = _check_shape(gguf_tensor_name, shape)
    model = MixModel(arch, n_layers, n_head, n_head_kv, n_expert, has_output_tensor, has_imatrix)
    block = _block_index(gguf_tensor_name)
    if block is None or not 0 <= block < n_layers:
        block = 0
        if _allows_quantization(gguf_tensor_name, dims) and _category(gguf_tensor_name) in ("attn_v", "ffn_down"):
            raise QeditError(f"tensor {gguf_tensor_name!r}: needs a block number in [0, {n_layers}) like "
                             "'blk.3.'; use plan_tensor_types for unusual layouts")
    walk = _Walk(n_attention_wv=n_layers, i_attention_wv=block, i_ffn_down=block,
                 i_ffn_gate=block, i_ffn_up=block)
    return _choose(ft, gguf_tensor_name, dims, model, walk, source_type, pure)


def plan_tensor_types(
    ftype_name: str | int | gguf.LlamaFileType,
    tensors: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]],
    model: MixModel,
    *,
    source_types: Mapping[str, T] | None = None,
    pure: bool = False,
) -> dict[str, T]:
    """Types for every tensor of a model, replaying llama.cpp's walk in (block, name) order.

    tensors: name -> numpy-order shape. source_types: the types the tensors have now (default F32),
    kept for tensors that llama.cpp copies. Returns name -> type in the order llama.cpp writes them.
    """
    ft = ftype_from_name(ftype_name)
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    shapes = {name: _check_shape(name, shape) for name, shape in items}
    if len(shapes) != len(items):
        raise QeditError("plan_tensor_types: tensor names must be unique")
    has_output = "output.weight" in shapes
    if has_output != model.has_output_tensor:
        logger.info("plan_tensor_types: output.weight %s, so embeddings are %s",
                    "present" if has_output else "absent", "untied" if has_output else "tied")
        model = MixModel(model.arch, model.n_layers, model.n_head, model.n_head_kv, model.n_expert,
                         has_output, model.has_imatrix)
    def walk_key(name: str) -> tuple[int, str]:  # llama.cpp's weight_name_comparer
        block = _block_index(name)
        return (-1 if block is None else block, name)

    order = sorted(shapes, key=walk_key)
    n_attn_v = sum(1 for n in order if _category(n) == "attn_v")
    walk = _Walk(n_attention_wv=n_attn_v)
    sources = source_types or {}
    return {name: _choose(ft, name, shapes[name], model, walk, T(sources.get(name, T.F32)), pure)
            for name in order}


def mix_model_from_metadata(
    fields: Mapping[str, object],
    tensor_names: Sequence[str],
    *,
    has_imatrix: bool = False,
) -> MixModel:
    """MixModel from GGUF key/values ("general.architecture", "<arch>.block_count", ...) and names."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise QeditError("GGUF metadata: general.architecture is missing; is this a model file?")

    def number(key: str, default: int | None) -> int:
        value = fields.get(f"{arch}.{key}", default)
        if isinstance(value, (list, tuple)):  # per-layer arrays: llama.cpp's n_gqa() reads layer 0
            value = value[0] if value else default
        if value is None:
            raise QeditError(f"GGUF metadata: {arch}.{key} is missing")
        return int(value)  # type: ignore[call-overload]

    n_head = number("attention.head_count", 1)
    return MixModel(
        arch=arch,
        n_layers=number("block_count", None),
        n_head=n_head,
        n_head_kv=number("attention.head_count_kv", n_head) or n_head,
        n_expert=number("expert_count", 0),
        has_output_tensor="output.weight" in tensor_names,
        has_imatrix=has_imatrix,
    )
