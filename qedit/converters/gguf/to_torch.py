"""Load a llama.cpp GGUF file as a transformers causal LM plus its tokenizer, fast.

transformers' own `from_pretrained(..., gguf_file=...)` spends most of its time in gguf-py's
`GGUFReader` (twice: config and tokenizer) and in random weight init (benchmarks/RESULTS.md, "Loading a
GGUF"). Here the header is parsed once by `GGUFFile`, the model is built with its parameters on the meta
device, and every tensor is decoded by libgguf straight into the buffer that becomes the parameter.

The HF config is rebuilt from GGUF metadata per architecture (`config.py`); tensor names come from gguf-py's
`TensorNameMap`; llama.cpp's conversion transforms are undone (`archs.py`: Gemma norms stored as w + 1, the
q/k rope permutation of NORM-rope architectures, fused attn_qkv split into q/k/v, GPT-2's Conv1D orientation).
The tokenizer reproduces llama.cpp's tokenization of the file (`tokenizer.py`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qedit.converters.gguf.archs import (
    SUPPORTED_ARCHITECTURES,
    GGUFArch,
    check_arch,
    fused_part,
    name_map,
    qkv_rows,
    split_parts,
    to_hf,
)
from qedit.converters.gguf.config import build_config
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.gguf.tokenizer import build_tokenizer
from qedit.core.errors import QeditError

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "build_config", "build_model", "build_tokenizer", "load_gguf", "stored_types"]
# tensors llama.cpp reads besides the HF parameters (rope scaling factors, which the config holds)
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def load_gguf(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, str]]:
    """Model (eval mode, on `device`, in `dtype`), tokenizer, and the GGML type name each HF weight is
    stored in, of a GGUF model."""
    start = time.perf_counter()
    with GGUFFile(path) as gf:
        config = build_config(gf)
        model = build_model(gf, config, dtype=dtype, device=device)
        tokenizer = build_tokenizer(gf, config)
        stored = stored_types(gf, model)
    logger.info("loaded %s (%s) in %.1f s", gf.path.name, gf.architecture, time.perf_counter() - start)
    return model, tokenizer, stored


def stored_types(gf: GGUFFile, model: PreTrainedModel) -> dict[str, str]:
    """HF weight name -> the GGML type name of the GGUF tensor it was read from."""
    spec = check_arch(gf)
    names = name_map(spec.name, model.config.num_hidden_layers)
    out = {}
    for hf_name, _ in model.named_parameters():
        source = _source(gf, hf_name, names, model.config)
        if source is not None and source.parts:
            out[hf_name] = gf.tensors[source.parts[0]].ggml_type.name
    return out


@dataclass(frozen=True)
class _Source:
    """Where an HF parameter is stored: `name` is the GGUF tensor it maps to (whose transforms apply), read
    from `parts` (itself; the three of a fused attn_qkv it is split from; or the separate q/k/v it is fused
    from), `rows` the row range of a fused tensor it takes."""

    name: str
    parts: tuple[str, ...]
    rows: tuple[int, int] | None = None


def _source(gf: GGUFFile, hf_name: str, names: gguf.TensorNameMap, config: PretrainedConfig) -> _Source | None:
    """The stored tensors of HF parameter `hf_name` (parts empty when the file lacks them); None for a
    parameter gguf-py has no GGUF name for."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        return None
    if name in gf.tensors:
        return _Source(name, (name,))
    fused = fused_part(name)  # attn_q/k/v of a file written with fused attn_qkv
    if fused is not None and fused[0] in gf.tensors:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return _Source(name, (fused[0],), qkv_rows(heads, config.num_key_value_heads, head_dim)[fused[1]])
    parts = split_parts(name)  # a fused HF parameter (phi3's qkv_proj) stored as separate attn_q/k/v
    if parts is not None and all(part in gf.tensors for part in parts):
        return _Source(name, tuple(parts))
    return _Source(name, ())


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new nn.Parameter on the meta device (no memory, no init cost); buffers stay real,
    so rotary tables and embedding scales are computed as usual. Patches `nn.Module.register_parameter`
    for the duration: do not build other modules on another thread meanwhile."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_model(gf: GGUFFile, config: PretrainedConfig, dtype: torch.dtype = torch.float32
               ) -> tuple[GGUFArch, PreTrainedModel]:
    """The HF model for `config` with every parameter on the meta device (buffers real, in `dtype`)."""
    import transformers

    spec = check_arch(gf)
    if not dtype.is_floating_point:
        raise QeditError(f"dtype must be a floating point torch dtype, got {dtype}")
    model_cls = getattr(transformers, spec.hf_class)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained does, so float buffers get the model dtype
    try:
        with _parameters_on_meta():
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    return spec, model


def parameter_sources(gf: GGUFFile, spec: GGUFArch, model: PreTrainedModel) -> dict[str, _Source]:
    """HF parameter name -> where it is stored, for every parameter of `model` (tied ones once); a parameter the
    file lacks is a QeditError."""
    names = name_map(spec.name, model.config.num_hidden_layers)
    out = {}
    for hf_name, _ in model.named_parameters():
        source = _source(gf, hf_name, names, model.config)
        if source is None or not source.parts:
            expected = None if source is None else source.name
            raise QeditError(
                f"{gf.path.name}: no GGUF tensor for HF parameter {hf_name} (expected {expected}); "
                f"the file is incomplete or not a standard {spec.name} export"
            )
        out[hf_name] = source
    return out


def as_parameter(gf: GGUFFile, spec: GGUFArch, config: PretrainedConfig, source: _Source, hf_name: str,
                 parts: list[torch.Tensor], shape: tuple[int, ...], cut: bool = True) -> torch.Tensor:
    """The stored tensors `parts` of `source` (float32, GGUF numpy order) -> the HF parameter `hf_name` of `shape`:
    joined, cut to the rows of a fused tensor (unless `cut` is False: the parts are those rows already),
    llama.cpp's conversion undone."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    values = parts[0] if len(parts) == 1 else torch.cat(parts)  # shape: GGUF numpy order
    if source.rows is not None and cut:
        values = values[source.rows[0]:source.rows[1]].clone()  # q, k and v must not share storage
    values = to_hf(spec, source.name, values, heads, kv_heads)
    if tuple(values.shape) != tuple(shape):
        raise QeditError(
            f"{gf.path.name}: tensor {source.name} has shape {tuple(values.shape)} but {hf_name} needs "
            f"{tuple(shape)}; the metadata does not match the tensors"
        )
    return values


def check_unused(gf: GGUFFile, sources: dict[str, _Source]) -> None:
    """Warn about GGUF tensors no parameter reads."""
    used = {part for source in sources.values() for part in source.parts}
    unused = [name for name in gf.tensors if name not in used and name not in _CONFIG_TENSORS]
    if unused:
        logger.warning("%s: %d GGUF tensors were not used: %s", gf.path.name, len(unused), ", ".join(unused[:5]))


def build_model(
    gf: GGUFFile,
    config: PretrainedConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> PreTrainedModel:
    """Instantiate the HF model for `config` with its weights decoded from `gf`."""
    spec, model = meta_model(gf, config, dtype)
    sources = parameter_sources(gf, spec, model)
    reader = TensorReader(gf)  # pread: the file's pages never stay in the resident set
    state: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}  # the last stored tensor read: a fused attn_qkv gives q, k and v in turn
    for hf_name, param in model.named_parameters():  # tied parameters are listed once
        source = sources[hf_name]
        parts = [last[part] if part in last else torch.from_numpy(reader.tensor(part)) for part in source.parts]
        last = {source.parts[-1]: parts[-1]}
        values = as_parameter(gf, spec, config, source, hf_name, parts, tuple(param.shape))
        state[hf_name] = values.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise QeditError(f"{gf.path.name}: parameters left without weights: {', '.join(meta[:5])}")
    reader.close()
    check_unused(gf, sources)
    model.config.dtype = dtype
    return model.to(device).eval()
