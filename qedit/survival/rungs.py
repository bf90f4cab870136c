"""Rungs of the survival ladder: the quantized formats an edit is checked in.

A GGUF rung is a llama.cpp file type (its per-tensor mix), run in llama.cpp. A LoRA rung runs the
unedited model quantized at a file type with the edit applied at run time as a GGUF LoRA adapter.
A GPTQ rung (GPTQ-4) is an HF GPTQ checkpoint at that many bits, run in the GPTQ loader (GPTQModel;
qedit's dequantizing runner where it is not installed). A bitsandbytes rung (BNB-nf4) quantizes the
model in memory with bitsandbytes (int8 = LLM.int8, nf4, fp4).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qedit.core.errors import QeditError
from qedit.kernels.gptq import BITS
from qedit.kernels.mixes import supported_ftypes
from qedit.runtimes.bnb import BNB_MODES

DEFAULT_LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"


GPTQ_PREFIX = "GPTQ-"
BNB_PREFIX = "BNB-"


class RungKind(str, Enum):
    GGUF = "gguf"
    GGUF_LORA = "gguf-lora"
    GPTQ = "gptq"
    BNB = "bitsandbytes"


_RUNTIMES = {RungKind.GGUF: "llama.cpp", RungKind.GGUF_LORA: "llama.cpp", RungKind.GPTQ: "GPTQ loader",
             RungKind.BNB: "bitsandbytes"}


@dataclass(frozen=True)
class Rung:
    """One format of the ladder. `name` is what reports and --require use (Q4_K_M, LORA@Q4_K_M, GPTQ-4, BNB-nf4)."""

    name: str
    kind: RungKind
    spec: str                        # llama.cpp file type ("Q4_K_M"), GPTQ bits ("4") or bitsandbytes mode ("nf4")

    def __post_init__(self) -> None:
        if not self.name or not self.spec:
            raise ValueError("Rung: name and spec must be non-empty")

    @property
    def runtime(self) -> str:
        return _RUNTIMES[self.kind]


def gguf_rung_names() -> list[str]:
    """The GGUF file types the ladder accepts, in llama.cpp's spelling."""

    return [f.name.removeprefix("MOSTLY_").removeprefix("ALL_") for f in supported_ftypes()]


def _gguf_rung(text: str, what: str) -> str:
    names = gguf_rung_names()
    key = text.strip().upper()
    if key not in names:
        raise QeditError(f"{what}: unknown rung {text.strip()!r}; valid rungs are {', '.join(names)} "
                         f"(and LORA@<type> with --lora)")
    return key


def _gptq_rung(text: str, what: str) -> Rung:

    bits = text.strip().upper().removeprefix(GPTQ_PREFIX).removesuffix("BIT")
    if not bits.isdigit() or int(bits) not in BITS:
        raise QeditError(f"{what}: GPTQ rung {text.strip()!r} is unknown; give bits out of {', '.join(map(str, BITS))}, "
                         "e.g. --gptq 8,4,3,2")
    return Rung(f"{GPTQ_PREFIX}{int(bits)}", RungKind.GPTQ, str(int(bits)))


def _bnb_rung(text: str, what: str) -> Rung:

    mode = text.strip().lower().removeprefix(BNB_PREFIX.lower())
    if mode not in BNB_MODES:
        raise QeditError(f"{what}: bitsandbytes rung {text.strip()!r} is unknown; give modes out of "
                         f"{', '.join(BNB_MODES)}, e.g. --bnb int8,nf4")
    return Rung(f"{BNB_PREFIX}{mode}", RungKind.BNB, mode)


def _ladder_rung(part: str) -> Rung:
    text = part.strip()
    upper = text.upper()
    if upper.startswith("LORA@"):
        ftype = _gguf_rung(text[5:], "--ladder")
        return Rung(f"LORA@{ftype}", RungKind.GGUF_LORA, ftype)
    if upper.startswith(GPTQ_PREFIX):
        return _gptq_rung(text, "--ladder")
    if upper.startswith(BNB_PREFIX):
        return _bnb_rung(text, "--ladder")
    ftype = _gguf_rung(text, "--ladder")
    return Rung(ftype, RungKind.GGUF, ftype)


def _items(text: str | None) -> list[str]:
    """Comma-separated items; 'none' is no items (e.g. --ladder none --gptq 4)."""
    if text is None or text.strip().lower() == "none":
        return []
    return [p for p in text.split(",") if p.strip()]


def parse_ladder(text: str, lora: str | None = None, gptq: str | None = None, bnb: str | None = None) -> list[Rung]:
    """`--ladder F16,Q8_0,...` (GGUF types, LORA@TYPE, GPTQ-N, BNB-MODE), `--lora TYPE`, `--gptq 8,4,3,2` and
    `--bnb int8,nf4,fp4` -> rungs, in that order, without repeats."""
    rungs = [_ladder_rung(p) for p in _items(text)]
    if lora is not None:
        ftype = _gguf_rung(lora, "--lora")
        rungs.append(Rung(f"LORA@{ftype}", RungKind.GGUF_LORA, ftype))
    rungs += [_gptq_rung(p, "--gptq") for p in _items(gptq)]
    rungs += [_bnb_rung(p, "--bnb") for p in _items(bnb)]
    seen: set[str] = set()
    unique = [r for r in rungs if not (r.name in seen or seen.add(r.name))]
    if not unique:
        raise QeditError(f"--ladder: no rungs given; for example --ladder {DEFAULT_LADDER}")
    return unique
