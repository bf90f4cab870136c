"""Rungs of the survival ladder: the quantized formats an edit is checked in.

A GGUF rung is a llama.cpp file type (its per-tensor mix), run in llama.cpp. A LoRA rung runs the
unedited model quantized at a file type with the edit applied at run time as a GGUF LoRA adapter.
GPTQ and bitsandbytes rungs plug in here as further kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qedit.errors import QeditError

DEFAULT_LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"


class RungKind(str, Enum):
    GGUF = "gguf"
    GGUF_LORA = "gguf-lora"


@dataclass(frozen=True)
class Rung:
    """One format of the ladder. `name` is what reports and --require use (e.g. Q4_K_M, LORA@Q4_K_M)."""

    name: str
    kind: RungKind
    ftype: str                       # llama.cpp file type name, e.g. "Q4_K_M"

    def __post_init__(self) -> None:
        if not self.name or not self.ftype:
            raise ValueError("Rung: name and ftype must be non-empty")

    @property
    def runtime(self) -> str:
        return "llama.cpp"


def gguf_rung_names() -> list[str]:
    """The GGUF file types the ladder accepts, in llama.cpp's spelling."""
    from qedit.kernels.mixes import supported_ftypes

    return [f.name.removeprefix("MOSTLY_").removeprefix("ALL_") for f in supported_ftypes()]


def _gguf_rung(text: str, what: str) -> str:
    names = gguf_rung_names()
    key = text.strip().upper()
    if key not in names:
        raise QeditError(f"{what}: unknown rung {text.strip()!r}; valid rungs are {', '.join(names)} "
                         f"(and LORA@<type> with --lora)")
    return key


def parse_ladder(text: str, lora: str | None = None) -> list[Rung]:
    """`--ladder F16,Q8_0,...` (and `--lora TYPE`) -> rungs, in the given order, without repeats."""
    rungs: list[Rung] = []
    for part in text.split(","):
        if not part.strip():
            continue
        if part.strip().upper().startswith("LORA@"):
            ftype = _gguf_rung(part.strip()[5:], "--ladder")
            rungs.append(Rung(f"LORA@{ftype}", RungKind.GGUF_LORA, ftype))
        else:
            ftype = _gguf_rung(part, "--ladder")
            rungs.append(Rung(ftype, RungKind.GGUF, ftype))
    if lora is not None:
        ftype = _gguf_rung(lora, "--lora")
        rungs.append(Rung(f"LORA@{ftype}", RungKind.GGUF_LORA, ftype))
    seen: set[str] = set()
    unique = [r for r in rungs if not (r.name in seen or seen.add(r.name))]
    if not unique:
        raise QeditError(f"--ladder: no rungs given; for example --ladder {DEFAULT_LADDER}")
    return unique
