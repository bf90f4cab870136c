"""The flags `edit`, `forget`, `survival` and `demo` share, and their conversion to typed requests.

This is the boundary: argparse namespaces end here; what goes below is `qedit.pipeline.jobs` data.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qedit.converters.ollama import OllamaModel, as_source
from qedit.core.errors import QeditError
from qedit.core.memory import MemoryBudget
from qedit.core.stats import StatsConfig
from qedit.edit.registry import EDIT_METHODS, MethodConfig
from qedit.kernels.gptq import GPTQConfig
from qedit.pipeline.jobs import OUTPUT_FORMATS, MethodChoice, Output
from qedit.pipeline.verify import VERIFY_SCALES
from qedit.unlearn.registry import UNLEARN_METHODS


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


MODEL_HELP = ("an HF model directory, a .gguf file, a GPTQ checkpoint, a qedit output, or ollama:NAME[:TAG] (the GGUF "
              "in Ollama's model store, $OLLAMA_MODELS or its default; read only)")


def resolve_model(path: Path | None, notify: Callable[[str], None] = print) -> tuple[Path | None, OllamaModel | None]:
    """A model argument as a path: ollama:NAME[:TAG] becomes the GGUF blob in Ollama's store (and the model)."""
    if path is None:
        return None, None
    source, model = as_source(path)
    if model is not None:
        notify(f"{path}: {model.gguf} ({model.gguf.stat().st_size:,} bytes, in Ollama's store {model.store})")
    return source, model


MEMORY_HELP = ("the most memory qedit may use, e.g. 10GiB or 12GB (default: the available memory less max(2 GiB, 10%%) "
               "for the OS). A GGUF model whose float32 weights do not fit is edited layer by layer from the file; a "
               "budget too small even for that is refused at the start, saying by how much")


def add_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", default=None, metavar="SIZE", help=MEMORY_HELP)


def budget_from(args: argparse.Namespace) -> MemoryBudget:
    """--max-memory as a MemoryBudget (the machine's default when not given)."""
    try:
        return MemoryBudget.resolve(args.max_memory)
    except QeditError as exc:
        raise QeditError(f"--max-memory: {exc}") from None


CHAT_HELP = ("ask each fact as a one-turn chat with the model's chat template, as the runtime applies it (llama.cpp: "
             "llama-cpp-python's chat completion; torch: the tokenizer's apply_chat_template), the fact's chat_prompt "
             "(or else its prompt) the user turn, and report chat_efficacy_gen: the greedy reply starts with the new "
             "answer (chat_generalization_gen on chat_rephrase_prompt). A model without a chat template is refused")


def add_chat_arg(p: argparse.ArgumentParser, edits: bool = False) -> None:
    p.add_argument("--chat", action="store_true",
                   help=CHAT_HELP + ("; the edit itself is computed on that chat text (the subject must occur in "
                                     "the chat prompt)" if edits else ""))


DEVICE_MAP_HELP = ("spread the model's layers over the machine's GPUs with accelerate's device map (infer_auto_device_map "
                   "and dispatch_model, as transformers' device_map='auto'); without a GPU, the CPU. A model that does "
                   "not fit the GPUs, or one streamed layer by layer (--max-memory), is refused")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device for full-precision work, as torch names it "
                                                   "(default: cpu)")
    p.add_argument("--device-map", default=None, choices=("auto",), help=DEVICE_MAP_HELP)


def device_map_from(args: argparse.Namespace) -> str | None:
    """--device-map, refused beside a --device other than the CPU (the map places the layers itself)."""
    if args.device_map is not None and args.device != "cpu":
        raise QeditError(f"--device-map {args.device_map} places the model's layers itself; leave out --device {args.device}")
    return args.device_map


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.add_argument("facts", type=Path, help="facts JSONL file")
    p.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    add_device_args(p)


def add_method_args(p: argparse.ArgumentParser, default: str = "memit", unlearn: bool | None = False) -> None:
    """--method and its settings. `unlearn`: offer unlearning methods only (True), edit methods only (False),
    or both (None)."""
    names = (EDIT_METHODS.names() if unlearn is not True else []) + (UNLEARN_METHODS.names() if unlearn is not False else [])
    p.add_argument("--method", default=default, choices=names, help=f"method (default: {default})")
    p.add_argument("--layers", type=int_list, default=None,
                   help="edit layers, e.g. 5,6,7 (default: the architecture's layers for the method)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edit in sequential batches of N facts (default: all at once)")
    p.add_argument("--rank", type=int, default=None, help="truncate each weight delta to this rank")
    p.add_argument("--energy", type=float, default=None, help="or keep this share (0-1] of each delta's energy")
    p.add_argument("--corpus", type=Path, default=None,
                   help="plain-text file for key statistics (default: text sampled from the model itself)")
    p.add_argument("--stats-samples", type=int, default=None, help="number of text samples for key statistics")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled text (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a setting of the method's config, nested with dots: --set lr=1e-5, --set target.steps=5, "
                        "--set stats.n_samples=256 (repeatable; an unknown key lists the known ones)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """-o and the output options `edit` and `forget` share: GGUF patch/export/LoRA, GPTQ, HF."""
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output directory (must not exist or be empty), or X.gguf to patch a GGUF source "
                        "(--quant TYPE: export the whole model at a llama.cpp file type)")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="with -o X.gguf: export the whole edited model at this llama.cpp file type "
                        "(F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, ...) instead of patching")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="GGUF type for matching tensors, e.g. 'blk.*.ffn_down.weight=Q8_0' or '*=Q8_0' "
                        "(a patch applies it to edited tensors; repeatable); the size cost is reported")
    p.add_argument("--naive", action="store_true",
                   help="re-encode edited tensors by plain requantization of W + dW instead of the default "
                        "edit-aware encoding, and compute the edit on the source weights even where the default "
                        "computes it on the model as it will ship (GGUF below 5 bits, GPTQ below 8 bits)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="after writing a GGUF patch (or an edit-aware --quant export), score each edit in llama.cpp; "
                        "while one prefers its new target by less than --hold-margin nats, scale the whole edit up "
                        f"({', '.join(f'x{f:g}' for f in VERIFY_SCALES)}) and write it again (`edit` only). Default: "
                        "on for those outputs (not with --naive) when llama-cpp-python is installed")
    p.add_argument("--hold-margin", type=float, default=1.0, metavar="NATS",
                   help="with --verify: the margin log P(new) - log P(true) each edit must keep in llama.cpp "
                        "(default: 1.0)")
    p.add_argument("--as-lora", action="store_true",
                   help="with -o X.gguf: write the edit as a LoRA adapter (F32) for the source GGUF; "
                        "run it with llama.cpp --lora X.gguf on the unedited file")
    g = p.add_argument_group("GPTQ output (-o DIR --format gptq)")
    g.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="directory output: 'hf' (full-precision safetensors) or 'gptq' (an HF GPTQ checkpoint that "
                        "GPTQModel and transformers load). Default: gptq when the source is a GPTQ checkpoint "
                        "(patched: only edited weights are requantized), else hf")
    g.add_argument("--bits", type=int, default=4, help="GPTQ bits: 2, 3, 4 or 8 (default: 4)")
    g.add_argument("--group-size", type=int, default=128,
                   help="GPTQ input columns per scale (-1: one per row; default: 128)")
    g.add_argument("--asym", action="store_true", help="asymmetric grids (stored as gptq_v2); default symmetric (v1)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="quantize columns in their natural order; default: by decreasing Hessian diagonal "
                        "(act-order, desc_act, GPTQModel's default)")
    g.add_argument("--damp", type=float, default=0.05, help="GPTQ dampening, a share of mean diag(H) (default: 0.05)")


def tensor_types(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """['blk.*.ffn_down.weight=Q8_0'] -> ((pattern, TYPE),); the types are checked by the pipeline's plan."""
    out = []
    for item in items:
        pattern, sep, type_name = item.partition("=")
        if not sep or not pattern.strip() or not type_name.strip():
            raise QeditError(f"--tensor-type {item!r}: expected PATTERN=TYPE, e.g. blk.*.ffn_down.weight=Q8_0")
        out.append((pattern.strip(), type_name.strip().upper()))
    return tuple(out)


def output_from(args: argparse.Namespace) -> Output:
    try:
        gptq = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.act_order,
                          damp_percent=args.damp)
    except QeditError as exc:
        raise QeditError(f"--bits/--group-size/--damp: {exc}") from None
    return Output(args.output, quant=args.quant, as_lora=args.as_lora, tensor_types=tensor_types(args.tensor_type),
                  format=args.format, gptq=gptq, naive=args.naive, verify=args.verify, hold_margin=args.hold_margin)


def method_from(args: argparse.Namespace, **extra: Any) -> MethodChoice:
    """The method, its config (flags, then --set, then `extra`) and the batch size."""
    registry = UNLEARN_METHODS if args.method in UNLEARN_METHODS else EDIT_METHODS
    config_cls = registry.get(args.method).config_cls
    stats_kw: dict[str, Any] = {"corpus": args.corpus, "seed": args.seed}
    if args.stats_samples is not None:
        stats_kw["n_samples"] = args.stats_samples
    overrides: dict[str, Any] = {"layers": args.layers, **extra}
    if args.rank is not None:
        overrides["rank"] = args.rank
    if args.energy is not None:
        overrides["energy"] = args.energy
    try:
        base = {"stats": StatsConfig(**stats_kw)}
    except ValueError as exc:
        raise QeditError(f"--corpus/--stats-samples/--seed: {exc}") from None
    overrides = merge_settings(config_cls, {**base, **overrides}, args.settings)
    return MethodChoice(args.method, registry.make_config(args.method, **overrides), args.batch_size)


def merge_settings(config_cls: type[MethodConfig], overrides: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """`overrides` with the --set KEY=VALUE items applied; a dotted key sets a field of a nested config
    (target.steps, stats.n_samples). Each value is converted to its field's type."""
    out = dict(overrides)
    for item in items:
        key, sep, text = item.partition("=")
        path = [k.strip() for k in key.split(".")]
        if not sep or not all(path):
            raise QeditError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-5 or --set target.steps=5")
        out = _set_path(config_cls, out, path, text.strip(), item)
    return out


def _set_path(cls: type, values: dict[str, Any], path: list[str], text: str, item: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    head = path[0]
    if head not in fields:
        raise QeditError(f"--set {item!r}: {cls.__name__} has no setting {head!r}; known: {', '.join(sorted(fields))}")
    default = _default(fields[head])
    if len(path) == 1:
        if dataclasses.is_dataclass(default):
            raise QeditError(f"--set {item!r}: {head} is a group of settings; set one of them, e.g. "
                             f"{head}.{dataclasses.fields(default)[0].name}=...")
        return {**values, head: _convert(text, default, head, item)}
    if not dataclasses.is_dataclass(default):
        raise QeditError(f"--set {item!r}: {head} has no nested settings")
    current = values.get(head, default)
    nested = _set_path(type(current), {}, path[1:], text, item)
    try:
        return {**values, head: dataclasses.replace(current, **nested)}
    except ValueError as exc:
        raise QeditError(f"--set {item!r}: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _convert(text: str, default: Any, key: str, item: str) -> Any:
    if text.lower() == "none":
        return None
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, (int, float)):
            return type(default)(text)
        if default is None or isinstance(default, (str, Path)):
            return _number_or_text(text) if default is None else type(default)(text)
    except ValueError:
        raise QeditError(f"--set {item!r}: {text!r} is not a valid value for {key} (default {default!r})") from None
    raise QeditError(f"--set {item!r}: {key} is not a number, flag or text setting; use the Python API for it")


def _number_or_text(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
