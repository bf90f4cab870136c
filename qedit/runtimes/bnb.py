"""bitsandbytes quantization in memory, with TorchRunner's interface.

`BitsAndBytesRunner(loaded, "int8" | "nf4" | "fp4")`: a copy of an (edited) model whose decoder Linears are
quantized in memory by bitsandbytes (LLM.int8 with outlier threshold 6, or 4-bit NF4 / FP4 with blocks of 64,
as transformers' BitsAndBytesConfig does); lm_head and embeddings stay as they are.
"""
from __future__ import annotations

import copy
import logging

import torch

from qedit.converters.gptq.calibrate import quantizable_linears, weight_math
from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel
from qedit.runtimes.torch_runner import TorchRunner

log = logging.getLogger(__name__)

BNB_MODES = ("int8", "nf4", "fp4")


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
        self.version = check_bitsandbytes(mode)
        self.mode = mode
        if mode == "int8":
            bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
            if not any(isinstance(f, _DropCastWarning) for f in bnb_log.filters):
                bnb_log.addFilter(_DropCastWarning())
        self.name = f"bitsandbytes-{mode}"
        model = copy.deepcopy(loaded.model)
        if getattr(model, "hf_device_map", None) is not None:   # spread by a device map: one piece on the CPU here
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
        model = model.cpu()
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
