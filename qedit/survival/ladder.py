"""The survival ladder: does each edit survive quantization at each rung, in the runtime users run?

For every rung, the edited model and the unedited baseline are quantized the same way and both run
in llama.cpp. Locality compares the edited artifact with the baseline at the same rung, so
quantization noise is not blamed on the edit. Full precision (torch, float32) is the reference every
"_kept" ratio divides by. Fluency drift is the perplexity of a fixed text, edited over baseline.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qedit.delta import LowRankDelta, fold
from qedit.errors import QeditError
from qedit.evaluate import EvalReport, evaluate
from qedit.facts import EditRequest
from qedit.model import LoadedModel
from qedit.runners import Runner, TorchRunner
from qedit.survival.artifacts import ArtifactStore, bits_per_weight
from qedit.survival.rungs import Rung, RungKind

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

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError("SurvivalConfig: at least one rung is needed")
        if self.n_threads < 1 or self.n_ctx < 64:
            raise ValueError(f"SurvivalConfig: n_threads must be >= 1 and n_ctx >= 64, got {self.n_threads}, {self.n_ctx}")
        self.artifacts = Path(self.artifacts)


@dataclass
class Measured:
    """One model (edited or baseline) measured in one runtime."""

    report: EvalReport
    nll: float                             # summed NLL of the fluency text (nats)
    n_tokens: int

    @property
    def perplexity(self) -> float:
        import math

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


@dataclass
class SurvivalResult:
    source: Path
    source_sha256: str
    method: str
    requests: list[EditRequest]
    reference: Measured                           # edited model at full precision (torch)
    reference_baseline: Measured                  # unedited model at full precision (torch)
    rungs: list[RungResult]
    versions: dict[str, str]
    delta_norm: float = 0.0
    encoding: str = "naive"                       # how edited tensors were encoded: "aware" or "naive"


def _measure(runner: Runner, requests: Sequence[EditRequest], text: str,
             baseline: Measured | None, label: str | None) -> Measured:
    report = evaluate(runner, requests, baseline=None if baseline is None else baseline.report, progress=label)
    nll, n = runner.nll(text)
    return Measured(report, nll, n)


def _cached_measure(path: Path, make_runner: Callable[..., Runner], requests: Sequence[EditRequest], text: str,
                    label: str | None) -> Measured:
    """The unedited artifact's measurement, kept beside it: every method and rerun checked against the
    same baseline file reuses it. Keyed by the facts, the text and the runner's versions."""
    import hashlib
    import json

    from qedit.io_utils import atomic_path

    blob = json.dumps([[r.to_json() for r in requests], text, versions()], sort_keys=True)
    cache = path.with_name(f"{path.name}.eval-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return Measured(EvalReport.from_json(data["report"]), float(data["nll"]), int(data["n_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable cached evaluation (%s); measuring again", cache, exc)
    measured = _measure(make_runner(path), requests, text, None, label)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"report": measured.report.to_json(), "nll": measured.nll,
                                   "n_tokens": measured.n_tokens}))
    return measured


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from qedit.api import qedit_version

    out = {"qedit": qedit_version()}
    for pkg in ("torch", "transformers", "llama-cpp-python", "libgguf", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _llama_runner(cfg: SurvivalConfig) -> Callable[..., Runner]:
    from qedit.runners_llama import LlamaCppRunner

    def make(path: Path, lora: Path | None = None) -> Runner:
        return LlamaCppRunner(path, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, lora=lora)

    return make


def run_survival(loaded: LoadedModel, requests: Sequence[EditRequest], deltas: Sequence[LowRankDelta],
                 cfg: SurvivalConfig, method: str, manifest: dict[str, Any] | None = None,
                 encoding: Any = None) -> SurvivalResult:
    """Measure `deltas` (not folded into `loaded.model`) at full precision and at every rung.

    The torch model is left as it was given (the deltas are folded for the reference run, then taken
    out again). A rung that cannot be built is reported as skipped with the reason. `encoding`
    (qedit.converters.gguf_aware.EditEncoding) encodes the edited tensors edit-aware; None: plainly.
    """
    if not deltas:
        raise QeditError("survival: no deltas to check; run an edit or give --from-deltas DIR")
    requests = list(requests)
    text = cfg.text if cfg.text is not None else fluency_text()
    torch_runner = TorchRunner(loaded)
    ref_base = _measure(torch_runner, requests, text, None, "fp32 unedited" if cfg.progress else None)
    fold(loaded.model, deltas)
    try:
        reference = _measure(torch_runner, requests, text, ref_base, "fp32 edited" if cfg.progress else None)
    finally:
        fold(loaded.model, deltas, sign=-1.0)
    store = ArtifactStore(cfg.artifacts, loaded.source, loaded.fingerprint)
    make_runner = _llama_runner(cfg)
    results: list[RungResult] = []
    rungs: Any = cfg.rungs
    if cfg.progress:
        from tqdm.auto import tqdm

        rungs = tqdm(cfg.rungs, desc="rungs", unit="rung")
    for rung in rungs:
        results.append(_run_rung(rung, store, make_runner, requests, deltas, text, manifest, cfg.progress, encoding))
        r = results[-1]
        log.info("%s: %s%s", rung.name, r.status, f" ({r.reason})" if r.reason else "")
    return SurvivalResult(
        source=loaded.source, source_sha256=loaded.fingerprint, method=method, requests=requests,
        reference=reference, reference_baseline=ref_base, rungs=results, versions=versions(),
        delta_norm=sum(d.norm() for d in deltas), encoding="naive" if encoding is None else "aware",
    )


def _run_rung(rung: Rung, store: ArtifactStore, make_runner: Callable[..., Runner],
              requests: list[EditRequest], deltas: Sequence[LowRankDelta], text: str,
              manifest: dict[str, Any] | None, progress: bool, encoding: Any = None) -> RungResult:
    start = time.perf_counter()
    result = RungResult(rung, "ok")
    try:
        base_path, built = store.gguf(rung.ftype)
        result.artifacts["baseline"] = str(base_path)
        result.built += ["baseline"] if built else []
        if rung.kind is RungKind.GGUF:
            edit_path, built = store.gguf(rung.ftype, deltas, manifest, encoding)
            result.artifacts["edited"] = str(edit_path)
            edited_runner = make_runner(edit_path)
            measured_path = edit_path
        elif rung.kind is RungKind.GGUF_LORA:
            lora_path, built = store.lora(base_path, deltas, manifest)
            result.artifacts["lora"] = str(lora_path)
            edited_runner = make_runner(base_path, lora=lora_path)
            measured_path = base_path
        else:  # pragma: no cover - every kind is handled above
            raise QeditError(f"rung {rung.name}: kind {rung.kind} has no builder")
        result.built += ["edited"] if built else []
        result.bits_per_weight, result.size_bytes = bits_per_weight(measured_path)
        label = (lambda what: f"{rung.name} {what}") if progress else (lambda what: None)
        result.baseline = _cached_measure(base_path, make_runner, requests, text, label("baseline"))
        result.edited = _measure(edited_runner, requests, text, result.baseline, label("edited"))
    except QeditError as exc:
        result.status, result.reason = "skipped", str(exc)
        log.warning("rung %s skipped: %s", rung.name, exc)
    result.seconds = time.perf_counter() - start
    return result
