"""Runners for GPTQ checkpoints, with TorchRunner's interface.

- `GPTQModelRunner`: the checkpoint loaded by GPTQModel (its CPU kernels; they compute in bfloat16).
- `DequantizingGPTQRunner`: qedit's reader dequantizes the checkpoint into a plain float32 HF model;
  its reports say that it is one and why GPTQModel was not used.
- `gptq_runner(path)`: GPTQModel when it imports and loads the checkpoint, else the dequantizing one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path

import torch

from qedit.converters.gptq.checkpoint import read_checkpoint_config
from qedit.converters.gptq.export import load_dequantized
from qedit.core.arch import arch_for_model_type
from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel, finish_tokenizer
from qedit.runtimes.torch_runner import TorchRunner

log = logging.getLogger(__name__)

def gptqmodel_version() -> str | None:
    """The installed GPTQModel version, or None when it is not installed."""
    if importlib.util.find_spec("gptqmodel") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptqmodel")
    except PackageNotFoundError:
        return None


class _Float32Head(torch.nn.Module):
    """The output layer in float32, so that bfloat16 logits (steps of 1/8 at 20) do not blur log-probabilities."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)   # (vocab, d)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight, self.bias)


class GPTQModelRunner(TorchRunner):
    """A GPTQ checkpoint run by GPTQModel's own kernels (the output layer in float32)."""

    name = "gptqmodel"

    def __init__(self, directory: str | Path, batch_size: int = 32) -> None:
        path = Path(directory)
        version = gptqmodel_version()
        if version is None:
            raise QeditError("GPTQModel is not installed (pip install gptqmodel==7.6.0, which works with torch 2.13 on CPU)")
        # GPTQModel sizes its CPU worker pool from this; on 2 cores the default of 1 makes loading fail.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
        from gptqmodel import GPTQModel
        from transformers import AutoTokenizer

        self.checkpoint = read_checkpoint_config(path)   # clear errors before GPTQModel sees the files
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # GPTQModel prints the whole model config while loading
                wrapped = GPTQModel.load(str(path), device="cpu")
        except Exception as exc:  # GPTQModel raises many types; report the reason and the file
            raise QeditError(f"{path}: GPTQModel {version} could not load this checkpoint on the CPU ({exc})") from exc
        finally:
            log.debug("GPTQModel.load printed: %s", printed.getvalue())
        model = wrapped.model.eval().requires_grad_(False)
        tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        arch = arch_for_model_type(model.config.model_type, source=str(path))
        parent, _, child = arch.lm_head.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _Float32Head(model.get_submodule(arch.lm_head)))
        self.version = version
        self.kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
        super().__init__(LoadedModel(model, tokenizer, arch, path, "gptq", torch.device("cpu")), batch_size)

    def describe(self) -> dict[str, str]:
        out = super().describe()
        out.update(runner=self.name, gptqmodel=self.version, kernels=",".join(self.kernels),
                   bits=str(self.checkpoint.bits), group_size=str(self.checkpoint.group_size),
                   note="GPTQModel's CPU kernels (bfloat16); qedit computes the output layer in float32")
        return out


class DequantizingGPTQRunner(TorchRunner):
    """A GPTQ checkpoint dequantized by qedit into a float32 HF model and run in torch."""

    name = "gptq-dequantized-torch"

    def __init__(self, directory: str | Path, reason: str = "", batch_size: int = 32,
                 dtype: torch.dtype = torch.float32) -> None:
        self.checkpoint = read_checkpoint_config(Path(directory))
        self.reason = reason
        super().__init__(load_dequantized(directory, dtype=dtype), batch_size)

    def describe(self) -> dict[str, str]:
        out = super().describe()
        out.update(runner=self.name, bits=str(self.checkpoint.bits), group_size=str(self.checkpoint.group_size),
                   note="dequantizing runner: qedit dequantized the GPTQ weights and runs them in torch, "
                        "not a GPTQ kernel" + (f" ({self.reason})" if self.reason else ""))
        return out


def gptq_runner(directory: str | Path, prefer: str = "auto", batch_size: int = 32) -> TorchRunner:
    """"gptqmodel": GPTQModel or an error; "dequantize": qedit's dequantizing runner; "auto": GPTQModel
    when it is installed and loads the checkpoint, else the dequantizing runner (which says why)."""
    if prefer not in ("auto", "gptqmodel", "dequantize"):
        raise QeditError(f"GPTQ runner {prefer!r} is unknown; use auto, gptqmodel or dequantize")
    if prefer == "dequantize":
        return DequantizingGPTQRunner(directory, "", batch_size)
    if prefer == "gptqmodel" or gptqmodel_version() is not None:
        try:
            return GPTQModelRunner(directory, batch_size)
        except QeditError as exc:
            if prefer == "gptqmodel":
                raise
            log.warning("%s; using qedit's dequantizing torch runner instead", exc)
            return DequantizingGPTQRunner(directory, str(exc), batch_size)
    return DequantizingGPTQRunner(directory, "no GPTQ loader installed: gptqmodel is not importable "
                                  "(auto-gptq does not import with transformers 5)", batch_size)
