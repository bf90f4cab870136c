"""What the survival ladder measures and reports: its config and job, one model measured in one runtime,
per-rung and whole-run results. The ladder itself is `qedit.survival.ladder`.

The survival ladder: does each edit survive quantization at each rung, in the runtime users run?

For every rung the edited artifact is the file `qedit edit --quant RUNG` writes for the same facts and
settings (`qedit.pipeline.run_edit`, the llama.cpp check and its rewrites included), and the unedited
baseline is the model quantized the same way; both run in the rung's runtime: llama.cpp for GGUF rungs,
the GPTQ loader for GPTQ checkpoints, bitsandbytes modules for in-memory int8/nf4/fp4. Locality compares the
edited artifact with the baseline at the same rung, so quantization noise is not blamed on the edit. Full
precision (torch, float32) is the reference every "_kept" ratio divides by. Fluency drift is the perplexity
of a fixed text, edited over baseline.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qedit.core.files import atomic_path
from qedit.core.memory import MemoryBudget
from qedit.core.version import qedit_version
from qedit.edit.compute import EditOutcome
from qedit.evaluation.forget import ForgetReport
from qedit.evaluation.metrics import EvalReport
from qedit.evaluation.scoring import Scoring
from qedit.kernels.gptq import GROUP_SIZES
from qedit.pipeline.jobs import MethodChoice
from qedit.runtimes.torch_runner import Runner
from qedit.survival.rungs import Rung
from qedit.unlearn.requests import RetainItem

log = logging.getLogger(__name__)

FULL_PRECISION = "fp32"


def fluency_text() -> str:
    """The fixed text shipped with qedit whose perplexity measures fluency drift."""
    return resources.files("qedit").joinpath("data/fluency.txt").read_text(encoding="utf-8")


@dataclass
class SurvivalConfig:
    rungs: list[Rung]
    artifacts: Path                       # cache directory for the quantized files
    text: str | None = None               # fluency text (default: the packaged one)
    n_threads: int = 1                    # llama.cpp threads
    n_ctx: int = 512
    progress: bool = True
    gptq_group_size: int = 128            # GPTQ rungs: input columns per scale
    gptq_act_order: bool = True           # GPTQ rungs: act-order (GPTQModel's default)
    hold_margin: float = 1.0              # the llama.cpp check of each GGUF rung's edited file, as `edit` runs it
    verify: bool | None = None            # None: where it applies (as `edit`); False: off

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError("SurvivalConfig: at least one rung is needed")
        if self.gptq_group_size not in GROUP_SIZES:
            raise ValueError(f"SurvivalConfig: gptq_group_size {self.gptq_group_size} is not one of {GROUP_SIZES}")
        if self.n_threads < 1 or self.n_ctx < 64:
            raise ValueError(f"SurvivalConfig: n_threads must be >= 1 and n_ctx >= 64, got {self.n_threads}, {self.n_ctx}")
        self.artifacts = Path(self.artifacts)


@dataclass(frozen=True)
class SurvivalJob:
    """What the ladder checks: `requests` edited (or unlearned) in `model` by `method`, or `outcome`, an edit
    already computed on `model` (saved deltas), measured as it is at every rung. `naive`: every rung measures
    the source's edit requantized plainly. `retain`: the retain items an unlearning run scores. `chat`: the edit
    `qedit edit --chat` computes (each fact in its one-turn chat), measured with the chat metrics too."""

    model: Path
    requests: Sequence[Any]
    method: MethodChoice
    naive: bool = False
    outcome: EditOutcome | None = None
    retain: Sequence[RetainItem] | None = None
    device: str = "cpu"
    device_map: str | None = None             # "auto": spread over the GPUs (as EditJob)
    max_memory: MemoryBudget | None = None    # None: the machine's default (as EditJob)
    chat: bool = False


@dataclass
class Measured:
    """One model (edited or baseline) measured in one runtime."""

    report: EvalReport | ForgetReport             # ForgetReport when the ladder checks unlearning
    nll: float                             # summed NLL of the fluency text (nats)
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.n_tokens))


@dataclass
class RungResult:
    rung: Rung
    status: str                                   # "ok" or "skipped"
    reason: str = ""
    edited: Measured | None = None
    baseline: Measured | None = None
    bits_per_weight: float | None = None
    size_bytes: int | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0
    encoding: str = "naive"                       # how this rung encoded the edited weights: "aware", "naive", "lora"
    computed_on: str = "source"                   # "rung": the edit was computed on this rung's unedited artifact
    delta_norm: float | None = None               # sum of |dW| of the edit this rung measures
    verify_scale: float | None = None             # the llama.cpp check scaled the edit this much


@dataclass
class SurvivalResult:
    source: Path
    source_sha256: str
    method: str
    requests: list[Any]
    reference: Measured                           # edited model at full precision (torch)
    reference_baseline: Measured                  # unedited model at full precision (torch)
    rungs: list[RungResult]
    versions: dict[str, str]
    delta_norm: float = 0.0
    encoding: str = "naive"                       # how edited tensors were encoded: "aware" or "naive"
    mode: str = "edit"                            # "edit", or "forget" for unlearning
    chat: bool = False                            # the facts were also asked as one-turn chats (chat metrics)


def measure(runner: Runner, scoring: Scoring, text: str, baseline: Measured | None, label: str | None) -> Measured:
    report = scoring.evaluate(runner, None if baseline is None else baseline.report, label)
    nll, n = runner.nll(text)
    return Measured(report, nll, n)


def cached_measure(path: Path, make_runner: Callable[[Path], Runner], scoring: Scoring, text: str,
                   label: str | None) -> Measured:
    """The unedited artifact's measurement, kept beside it: every method and rerun checked against the
    same baseline file reuses it. Keyed by the requests, the text and the runner's versions."""
    import hashlib
    import json


    blob = json.dumps([scoring.cache_parts(), text, versions()], sort_keys=True)
    cache = path.with_name(f"{path.name}.eval-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return Measured(scoring.report_from_json(data["report"]), float(data["nll"]), int(data["n_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable cached evaluation (%s); measuring again", cache, exc)
    measured = measure(make_runner(path), scoring, text, None, label)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"report": measured.report.to_json(), "nll": measured.nll,
                                   "n_tokens": measured.n_tokens}))
    return measured


def versions() -> dict[str, str]:
    out = {"qedit": qedit_version()}
    for pkg in ("torch", "transformers", "llama-cpp-python", "libgguf", "gguf", "gptqmodel", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
