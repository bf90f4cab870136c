"""`qedit export` (a model as a GGUF file at a llama.cpp file type) and `qedit inspect` (what a GGUF holds)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qedit.cli.args import add_memory_arg, budget_from, resolve_model, tensor_types
from qedit.converters.gguf.patch import inspect_lines
from qedit.converters.ollama import refuse_store_output
from qedit.core.errors import QeditError
from qedit.core.files import refuse_same_file
from qedit.kernels.mixes import ftype_from_name
from qedit.pipeline.plan import check_tensor_types
from qedit.pipeline.write import export, write_modelfile


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a model (HF directory, qedit output or GGUF) as a GGUF file at a quant type",
        description="Export a model to GGUF with llama.cpp's per-tensor quant mix for the file type. A qedit "
                    "output directory is exported with its edits; tokenizer metadata comes from the source "
                    "GGUF when there is one (--template), else from the HF tokenizer.")
    p.add_argument("model", type=Path,
                   help="an HF model directory, a qedit output directory, a .gguf file, or ollama:NAME[:TAG]")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--quant", default="Q8_0", metavar="TYPE",
                   help="llama.cpp file type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, "
                        "Q3_K_M, Q3_K_S, Q2_K (default: Q8_0)")
    p.add_argument("--template", type=Path, default=None,
                   help="a GGUF of the same model whose tokenizer metadata is copied unchanged")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the mix for matching tensors, e.g. 'blk.*.ffn_down.weight=Q6_K' (repeatable)")
    add_memory_arg(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("inspect", help="show the qedit manifests and tensor types of a .gguf file",
                       description="Print the qedit edits recorded in a GGUF (method, facts, layers, ranks, "
                                   "source sha256) and a table of tensor types with counts and bytes.")
    p.add_argument("file", type=Path, help="a .gguf file, or ollama:NAME[:TAG]")
    p.set_defaults(run=cmd_inspect)


def cmd_export(args: argparse.Namespace) -> int:
    if args.output.suffix.lower() != ".gguf":
        raise QeditError(f"{args.output}: the output of export is a GGUF file; give a name ending in .gguf")
    args.model, ollama = resolve_model(args.model)
    args.template, _ = resolve_model(args.template)
    if not args.model.exists():
        raise QeditError(f"{args.model}: no such model file or directory")
    refuse_same_file(args.output, args.model, *([args.template] if args.template else []))
    refuse_store_output(args.output, *([ollama.store] if ollama else []))
    if args.model.is_dir() and args.output.resolve().is_relative_to(args.model.resolve()):
        raise QeditError(f"{args.output}: is inside the model directory {args.model}; write it elsewhere")
    ftype_from_name(args.quant)
    rules = tensor_types(args.tensor_type)
    check_tensor_types(rules)
    print("\n".join(export(args.model, args.output, args.quant, rules, template=args.template,
                           budget=budget_from(args)).lines))
    modelfile = write_modelfile(args.output, args.model, ollama, inputs=[args.template] if args.template else [])
    print("\n".join(modelfile.lines + [modelfile.command]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    args.file, _ = resolve_model(args.file)
    print("\n".join(inspect_lines(args.file)))
    return 0
