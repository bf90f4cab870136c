"""llama.cpp's GGUF architectures as qedit reads and writes them: one `GGUFArch` per architecture (the HF class,
the conversion transforms llama.cpp's converter applies), the refusals (mixture-of-experts, embedding models,
unknown architectures) and the tensor transforms in both directions.

What each architecture stores (from llama.cpp's `convert_hf_to_gguf.py` and `src/models/*.cpp`):
- NORM rope (llama, smollm3, granite): attn_q/attn_k rows (weights and biases) are permuted per head from
  HF's [first half | second half] into interleaved pairs; NEOX rope archs are stored as in HF.
- Gemma (gemma2, gemma3): every `*norm.weight` is stored as 1 + w.
- Fused attention: `attn_qkv` = [q; k; v] rows may replace attn_q/k/v in any architecture (`--fuse-qkv`, and
  always for phi3, whose HF model is fused the same way); phi3's `ffn_up` is HF's gate_up_proj, [gate; up].
- The LM head: `output.weight` is written iff the HF model has its own lm_head; gemma2 never stores it, olmo2
  always needs it.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import gguf

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError


class Tied(str, enum.Enum):
    OPTIONAL = "optional"  # output.weight present iff the LM head is not the embedding matrix
    ALWAYS = "always"      # never stored: the embedding is the LM head (gemma2)
    NEVER = "never"        # always stored, required by llama.cpp (olmo2)


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture (`general.architecture`) and the transformers model it holds."""

    name: str                        # general.architecture
    model_type: str                  # HF config.model_type of the loaded model
    hf_class: str                    # transformers causal-LM class
    hf_model_types: tuple[str, ...]  # HF model types exported as this architecture
    rope_permuted: bool = False      # NORM rope: llama.cpp permutes attn_q/attn_k rows per head
    norm_offset: bool = False        # Gemma: llama.cpp stores 1 + w for every *norm.weight
    tied: Tied = Tied.OPTIONAL
    partial_rotary: bool = False     # rope.dimension_count may be less than the head size
    conv1d: tuple[str, ...] = ()     # GGUF tensors stored (out, in) that HF keeps as Conv1D (in, out)


ARCHS: dict[str, GGUFArch] = {a.name: a for a in (
    GGUFArch("llama", "llama", "LlamaForCausalLM", ("llama", "mistral"), rope_permuted=True),
    GGUFArch("qwen2", "qwen2", "Qwen2ForCausalLM", ("qwen2",)),
    GGUFArch("qwen3", "qwen3", "Qwen3ForCausalLM", ("qwen3",)),
    GGUFArch("gemma2", "gemma2", "Gemma2ForCausalLM", ("gemma2",), norm_offset=True, tied=Tied.ALWAYS),
    GGUFArch("gemma3", "gemma3_text", "Gemma3ForCausalLM", ("gemma3_text",), norm_offset=True),
    GGUFArch("phi3", "phi3", "Phi3ForCausalLM", ("phi3",), partial_rotary=True),
    GGUFArch("smollm3", "smollm3", "SmolLM3ForCausalLM", ("smollm3",), rope_permuted=True),
    GGUFArch("granite", "granite", "GraniteForCausalLM", ("granite",), rope_permuted=True),
    GGUFArch("olmo2", "olmo2", "Olmo2ForCausalLM", ("olmo2",), tied=Tied.NEVER),
    GGUFArch("gpt2", "gpt2", "GPT2LMHeadModel", (),
             conv1d=(".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")),
)}
SUPPORTED_ARCHITECTURES = tuple(ARCHS)
_GGUF_PY = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
EXPORTABLE_MODEL_TYPES = {t: a.name for a in ARCHS.values() for t in a.hf_model_types}

# llama.cpp architectures whose MLPs are routed experts
MOE_ARCHS = frozenset({
    "qwen2moe", "qwen3moe", "qwen3next", "qwen35moe", "qwen3vlmoe", "gpt-oss", "olmoe", "granitemoe",
    "granitehybrid", "phimoe", "deepseek", "deepseek2", "dbrx", "grok", "arctic", "llama4", "jamba", "dots1",
    "bailingmoe", "bailingmoe2", "ernie4_5-moe", "hunyuan-moe", "glm4moe", "minimax-m2", "lfm2moe", "mistral4",
    "afmoe", "smallthinker", "grovemoe",
})
_EXPERT_TENSOR = re.compile(r"_(exps|shexp|chexps)\.|\.ffn_gate_inp\.|\.ffn_(gate|up|down)\.\d+\.weight$")


def check_arch(gf: GGUFFile) -> GGUFArch:
    """The architecture of `gf`, or a one-line QeditError: mixture-of-experts (by name, expert_count or
    expert tensors, as Mixtral is `llama` with experts), embedding/reranker heads, or unknown."""
    arch, label = gf.architecture, gf.path.name
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    experts = gf.fields.get(f"{arch}.expert_count")
    expert_tensors = [name for name in gf.tensors if _EXPERT_TENSOR.search(name)]
    if arch in MOE_ARCHS or (isinstance(experts, int) and experts > 0) or expert_tensors:
        count = f" ({experts} experts per layer)" if isinstance(experts, int) and experts > 0 else ""
        raise QeditError(f"{label}: {arch} is a mixture-of-experts model{count}: qedit edits the dense MLP "
                         f"down-projection, which this model replaces with routed experts; supported: {supported}")
    if "cls_out.weight" in gf.tensors or f"{arch}.pooling_type" in gf.fields:
        raise QeditError(f"{label}: an embedding or reranking {arch} model (pooling head); qedit edits causal "
                         f"language models; supported: {supported}")
    if arch not in ARCHS:
        raise QeditError(f"{label}: GGUF architecture {arch!r} is not supported; supported architectures: {supported}")
    return ARCHS[arch]


def arch_for_hf(model_type: Any, label: str) -> GGUFArch:
    """The GGUF architecture an HF `model_type` is exported as."""
    if model_type not in EXPORTABLE_MODEL_TYPES:
        raise QeditError(f"{label}: model_type {model_type!r} cannot be exported to GGUF; "
                         f"supported: {', '.join(sorted(EXPORTABLE_MODEL_TYPES))}")
    return ARCHS[EXPORTABLE_MODEL_TYPES[model_type]]


# ---- tensors ----------------------------------------------------------------------------------------


def gguf_arch(arch: str) -> gguf.MODEL_ARCH | None:
    """gguf-py's enum of a GGUF architecture name, or None when gguf-py does not know it."""
    return _GGUF_PY.get(arch)


def name_map(arch: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's HF -> GGUF tensor names for `arch` (a name gguf-py knows)."""
    return gguf.TensorNameMap(_GGUF_PY[arch], n_layers)

_QKV = re.compile(r"^(blk\.\d+)\.attn_(q|k|v)\.(weight|bias)$")
_FUSED = re.compile(r"^(blk\.\d+)\.attn_qkv\.(weight|bias)$")


def qkv_rows(n_head: int, n_kv: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """Row ranges of q, k and v in a fused attn_qkv tensor: [q: n_head*hd | k: n_kv*hd | v: n_kv*hd]."""
    q, kv = n_head * head_dim, n_kv * head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def fused_part(name: str) -> tuple[str, str] | None:
    """For blk.N.attn_{q,k,v}.X: (blk.N.attn_qkv.X, "q"|"k"|"v"); None otherwise."""
    m = _QKV.match(name)
    return (f"{m[1]}.attn_qkv.{m[3]}", m[2]) if m else None


def split_parts(name: str) -> list[str] | None:
    """For blk.N.attn_qkv.X: the separate [attn_q.X, attn_k.X, attn_v.X]; None otherwise."""
    m = _FUSED.match(name)
    return [f"{m[1]}.attn_{p}.{m[2]}" for p in "qkv"] if m else None


def _permute(w: Any, n_head: int, inverse: bool) -> Any:
    """HF rows per head [first half | second half] -> llama.cpp's interleaved pairs, or back (`inverse`).
    w: (n_head * head_dim, ...), numpy or torch."""
    split = (w.shape[0] // n_head // 2, 2) if inverse else (2, w.shape[0] // n_head // 2)
    return w.reshape(n_head, *split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(spec: GGUFArch, name: str, n_head: int, n_kv: int) -> int | None:
    """The head count a permuted tensor is permuted by, or None when `name` is not permuted."""
    if not spec.rope_permuted:
        return None
    if name.endswith((".attn_q.weight", ".attn_q.bias")):
        return n_head
    if name.endswith((".attn_k.weight", ".attn_k.bias")):
        return n_kv
    return None


def _convert(spec: GGUFArch, name: str, t: Any, n_head: int, n_kv: int, to_hf: bool) -> Any:
    heads = _rope_heads(spec, name, n_head, n_kv)
    if heads is not None:
        return _permute(t, heads, inverse=to_hf)
    if spec.norm_offset and name.endswith("norm.weight"):
        return t - 1.0 if to_hf else t + 1.0  # Gemma's RMSNorm multiplies by (1 + w); float32 stays float32
    return t.T.contiguous() if to_hf and name.endswith(spec.conv1d) else t


def to_hf(spec: GGUFArch, name: str, t: Any, n_head: int, n_kv: int) -> Any:
    """Undo llama.cpp's conversion of GGUF tensor `name` (a float32 torch tensor in GGUF numpy layout)."""
    return _convert(spec, name, t, n_head, n_kv, to_hf=True)


def to_gguf(spec: GGUFArch, name: str, w: Any, n_head: int, n_kv: int) -> Any:
    """llama.cpp's conversion of an HF tensor (numpy, HF layout) stored as GGUF tensor `name`; never in place."""
    return _convert(spec, name, w, n_head, n_kv, to_hf=False)


def permuted_suffixes(spec: GGUFArch) -> tuple[str, ...]:
    """GGUF tensor suffixes stored row-permuted (a delta in HF layout cannot be added to them as is)."""
    return (".attn_q.weight", ".attn_k.weight", ".attn_qkv.weight") if spec.rope_permuted else ()
