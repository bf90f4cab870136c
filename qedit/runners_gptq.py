"""Runners for GPTQ checkpoints and for bitsandbytes quantization, with TorchRunner's interface.

- `GPTQModelRunner`: the checkpoint loaded by GPTQModel (its CPU kernels; they compute in bfloat16).
- `DequantizingGPTQRunner`: qedit's reader dequantizes the checkpoint into a plain float32 HF model;
  its reports say that it is one and why GPTQModel was not used.
- `gptq_runner(path)`: GPTQModel when it imports and loads the checkpoint, else the dequantizing one.
- `BitsAndBytesRunner(loaded, "int8" | "nf4" | "fp4")`: a copy of an (edited) model whose decoder
  Linears are quantized in memory by bitsandbytes (LLM.int8 with outlier threshold 6, or 4-bit NF4 /
  FP4 with blocks of 64, as transformers' BitsAndBytesConfig does); lm_head and embeddings stay as they are.
"""
from __future__ import annotations

import contextlib
import copy
import io
import importlib.util
import logging
import os
from pathlib import Path

import torch

from qedit.errors import QeditError
from qedit.model import LoadedModel, _finish_tokenizer
from qedit.runners import TorchRunner

log = logging.getLogger(__name__)

BNB_MODES = ("int8", "nf4", "fp4")


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

        from qedit.arch import arch_for_model_type
        from qedit.converters.gptq import read_checkpoint_config

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
        tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
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
        from qedit.converters.gptq import read_checkpoint_config
        from qedit.converters.gptq_export import load_dequantized

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


def bitsandbytes_version() -> str:
    """The bitsandbytes version, or a QeditError saying why it cannot be used here."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a native-library error raised while importing
        raise QeditError(f"bitsandbytes cannot be imported here ({type(exc).__name__}: {exc}); "
                         "pip install bitsandbytes>=0.45 for CPU support") from exc
    return str(bitsandbytes.__version__)


def _bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> torch.nn.Module:
    """A bitsandbytes module computing x @ weight.T + bias, weight (out, in), quantized on the CPU."""
    import bitsandbytes as bnb

    n_out, n_in = weight.shape
    w = weight.detach().float().cpu().contiguous()
    if mode == "int8":
        mod = bnb.nn.Linear8bitLt(n_in, n_out, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta")
        mod.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        mod = bnb.nn.Linear4bit(n_in, n_out, bias=bias is not None, compute_dtype=torch.float32, quant_type=mode,
                                device="meta")
        mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=mode)
    if bias is not None:
        mod.bias = torch.nn.Parameter(bias.detach().float().cpu().clone(), requires_grad=False)
    return mod.to("cpu")  # .to(device) is where bitsandbytes quantizes


def check_bitsandbytes(mode: str) -> str:
    """Quantize and run one small layer in `mode`; the version, or a QeditError with the exact reason."""
    if mode not in BNB_MODES:
        raise QeditError(f"bitsandbytes mode {mode!r} is unknown; use one of {', '.join(BNB_MODES)}")
    version = bitsandbytes_version()
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 64, generator=gen)
        x = torch.randn(2, 64, generator=gen)
        y = _bnb_linear(w, None, mode)(x)
    except Exception as exc:  # native kernels report missing CPU support in several ways
        raise QeditError(f"bitsandbytes {version} cannot run {mode} on this CPU ({type(exc).__name__}: {exc})") from exc
    err = float((y.float() - x @ w.t()).norm() / (x @ w.t()).norm())
    if not err < 0.5:
        raise QeditError(f"bitsandbytes {version} {mode} gives wrong results on this CPU (relative error {err:.2f})")
    return version


class _DropCastWarning(logging.Filter):
    """bitsandbytes logs this on every int8 matmul; the runner's describe() states it once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


class BitsAndBytesRunner(TorchRunner):
    """A copy of `loaded` with every decoder Linear quantized by bitsandbytes in memory."""

    def __init__(self, loaded: LoadedModel, mode: str, batch_size: int = 32) -> None:
        from qedit.converters.gptq_calibrate import quantizable_linears, weight_math

        self.version = check_bitsandbytes(mode)
        self.mode = mode
        if mode == "int8":
            bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
            if not any(isinstance(f, _DropCastWarning) for f in bnb_log.filters):
                bnb_log.addFilter(_DropCastWarning())
        self.name = f"bitsandbytes-{mode}"
        model = copy.deepcopy(loaded.model).cpu()
        names = quantizable_linears(loaded)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            module = model.get_submodule(name)
            setattr(model.get_submodule(parent_name), child,
                    _bnb_linear(weight_math(module), getattr(module, "bias", None), mode))
        self.n_quantized = len(names)
        super().__init__(LoadedModel(model.eval(), loaded.tokenizer, loaded.arch, loaded.source, loaded.source_kind,
                                     torch.device("cpu")), batch_size)

    def describe(self) -> dict[str, str]:
        out = super().describe()
        out.update(runner=self.name, bitsandbytes=self.version, quantized_linears=str(self.n_quantized),
                   note="decoder Linears quantized in memory by bitsandbytes; lm_head and embeddings as loaded"
                        + ("; LLM.int8 casts matmul inputs to float16" if self.mode == "int8" else ""))
        return out
