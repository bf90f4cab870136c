"""The survival ladder: does each edit survive quantization at each rung, in the runtime users run?

For every rung, the edited model and the unedited baseline are quantized the same way and both run
in the rung's runtime: llama.cpp for GGUF rungs, the GPTQ loader for GPTQ checkpoints, bitsandbytes
modules for in-memory int8/nf4/fp4. Locality compares the edited artifact with the baseline at the same rung, so
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
from qedit.evaluate import EvalReport
from qedit.facts import EditRequest
from qedit.forget import ForgetRequest, RetainItem
from qedit.forget_eval import ForgetReport
from qedit.model import LoadedModel
from qedit.runners import Runner, TorchRunner
from qedit.survival.artifacts import ArtifactStore, bits_per_weight
from qedit.survival.on_rung import EditFn
from qedit.survival.rungs import Rung, RungKind
from qedit.survival.scoring import Scoring, scoring_for

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
    stats: Any = None                     # StatsConfig of the calibration text for GPTQ rungs (None: default)

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError("SurvivalConfig: at least one rung is needed")
        from qedit.kernels.gptq import GROUP_SIZES

        if self.gptq_group_size not in GROUP_SIZES:
            raise ValueError(f"SurvivalConfig: gptq_group_size {self.gptq_group_size} is not one of {GROUP_SIZES}")
        if self.n_threads < 1 or self.n_ctx < 64:
            raise ValueError(f"SurvivalConfig: n_threads must be >= 1 and n_ctx >= 64, got {self.n_threads}, {self.n_ctx}")
        self.artifacts = Path(self.artifacts)


@dataclass
class Measured:
    """One model (edited or baseline) measured in one runtime."""

    report: EvalReport | ForgetReport             # ForgetReport when the ladder checks unlearning
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
    encoding: str = "naive"                       # how this rung encoded the edited weights: "aware" or "naive"
    computed_on: str = "source"                   # "rung": the edit was computed on this rung's unedited artifact
    delta_norm: float | None = None               # sum of |dW| of the edit this rung measures


@dataclass
class SurvivalResult:
    source: Path
    source_sha256: str
    method: str
    requests: list[EditRequest] | list[ForgetRequest]
    reference: Measured                           # edited model at full precision (torch)
    reference_baseline: Measured                  # unedited model at full precision (torch)
    rungs: list[RungResult]
    versions: dict[str, str]
    delta_norm: float = 0.0
    encoding: str = "naive"                       # how edited tensors were encoded: "aware" or "naive"
    mode: str = "edit"                            # "edit", or "forget" for unlearning


def _measure(runner: Runner, scoring: Scoring, text: str, baseline: Measured | None, label: str | None) -> Measured:
    report = scoring.evaluate(runner, None if baseline is None else baseline.report, label)
    nll, n = runner.nll(text)
    return Measured(report, nll, n)


def _cached_measure(path: Path, make_runner: Callable[..., Runner], scoring: Scoring, text: str,
                    label: str | None) -> Measured:
    """The unedited artifact's measurement, kept beside it: every method and rerun checked against the
    same baseline file reuses it. Keyed by the requests, the text and the runner's versions."""
    import hashlib
    import json

    from qedit.io_utils import atomic_path

    blob = json.dumps([scoring.cache_parts(), text, versions()], sort_keys=True)
    cache = path.with_name(f"{path.name}.eval-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return Measured(scoring.report_from_json(data["report"]), float(data["nll"]), int(data["n_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable cached evaluation (%s); measuring again", cache, exc)
    measured = _measure(make_runner(path), scoring, text, None, label)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"report": measured.report.to_json(), "nll": measured.nll,
                                   "n_tokens": measured.n_tokens}))
    return measured


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from qedit.api import qedit_version

    out = {"qedit": qedit_version()}
    for pkg in ("torch", "transformers", "llama-cpp-python", "libgguf", "gguf", "gptqmodel", "bitsandbytes"):
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


def run_survival(loaded: LoadedModel, requests: Sequence[EditRequest] | Sequence[ForgetRequest],
                 deltas: Sequence[LowRankDelta], cfg: SurvivalConfig, method: str,
                 manifest: dict[str, Any] | None = None, encoding: Any = None,
                 retain: Sequence[RetainItem] | None = None, edit_fn: EditFn | None = None) -> SurvivalResult:
    """Measure `deltas` (not folded into `loaded.model`) at full precision and at every rung.

    The torch model is left as it was given (the deltas are folded for the reference run, then taken
    out again). A rung that cannot be built is reported as skipped with the reason. `encoding`
    (qedit.converters.gguf_aware.EditEncoding) encodes the edited tensors edit-aware; None: plainly.
    With ForgetRequests the ladder checks unlearning: forget score, recovery and accuracy on `retain`.
    With `edit_fn` and an `encoding` (the aware ladder), GGUF rungs coarser than 8 bits measure the edit
    computed by `edit_fn` on the rung's unedited artifact, patched onto it (qedit.survival.on_rung).
    """
    if not deltas:
        raise QeditError("survival: no deltas to check; run an edit or give --from-deltas DIR")
    requests = list(requests)
    scoring = scoring_for(requests, retain)
    text = cfg.text if cfg.text is not None else fluency_text()
    torch_runner = TorchRunner(loaded)
    ref_base = _measure(torch_runner, scoring, text, None, "fp32 unedited" if cfg.progress else None)
    fold(loaded.model, deltas)
    try:
        reference = _measure(torch_runner, scoring, text, ref_base, "fp32 edited" if cfg.progress else None)
    finally:
        fold(loaded.model, deltas, sign=-1.0)
    ctx = _RungContext(loaded, scoring, list(deltas), text, manifest, encoding, cfg,
                       ArtifactStore(cfg.artifacts, loaded.source, loaded.fingerprint), _llama_runner(cfg),
                       edit_fn if encoding is not None else None)
    results: list[RungResult] = []
    rungs: Any = cfg.rungs
    if cfg.progress:
        from tqdm.auto import tqdm

        rungs = tqdm(cfg.rungs, desc="rungs", unit="rung")
    for rung in rungs:
        results.append(_run_rung(rung, ctx))
        r = results[-1]
        log.info("%s: %s%s", rung.name, r.status, f" ({r.reason})" if r.reason else "")
    return SurvivalResult(
        source=loaded.source, source_sha256=loaded.fingerprint, method=method, requests=requests,
        reference=reference, reference_baseline=ref_base, rungs=results, versions=versions(),
        delta_norm=sum(d.norm() for d in deltas), encoding="naive" if encoding is None else "aware",
        mode=scoring.kind,
    )


@dataclass
class _RungContext:
    """What every rung is built and measured from."""

    loaded: LoadedModel
    scoring: Scoring
    deltas: list[LowRankDelta]
    text: str
    manifest: dict[str, Any] | None
    encoding: Any                                 # EditEncoding (aware) or None (naive)
    cfg: SurvivalConfig
    store: ArtifactStore
    llama: Callable[..., Runner]
    edit_fn: EditFn | None = None                 # computes the edit on a rung's unedited model (aware ladder)
    _seqs: list[list[int]] | None = None

    def label(self, rung: Rung, what: str) -> str | None:
        return f"{rung.name} {what}" if self.cfg.progress else None

    def calibration(self) -> list[list[int]]:
        if self._seqs is None:
            from qedit.converters.gptq_export import calibration_tokens

            self._seqs = calibration_tokens(self.loaded, self.cfg.stats)
        return self._seqs


def _run_rung(rung: Rung, ctx: _RungContext) -> RungResult:
    start = time.perf_counter()
    result = RungResult(rung, "ok")
    try:
        {RungKind.GGUF: _gguf_rung, RungKind.GGUF_LORA: _gguf_rung, RungKind.GPTQ: _gptq_rung,
         RungKind.BNB: _bnb_rung}[rung.kind](rung, ctx, result)
    except QeditError as exc:
        result.status, result.reason = "skipped", str(exc)
        log.warning("rung %s skipped: %s", rung.name, exc)
    result.seconds = time.perf_counter() - start
    return result


def _gguf_rung(rung: Rung, ctx: _RungContext, result: RungResult) -> None:
    base_path, built = ctx.store.gguf(rung.spec)
    result.artifacts["baseline"] = str(base_path)
    result.built += ["baseline"] if built else []
    if rung.kind is RungKind.GGUF:
        result.encoding = "naive" if ctx.encoding is None else "aware"
        edit_path, built = _edited_gguf(rung, ctx, base_path, result)
        result.artifacts["edited"] = str(edit_path)
        edited_runner = ctx.llama(edit_path)
        measured_path = edit_path
    else:
        lora_path, built = ctx.store.lora(base_path, ctx.deltas, ctx.manifest)
        result.artifacts["lora"] = str(lora_path)
        edited_runner = ctx.llama(base_path, lora=lora_path)
        measured_path = base_path
        result.encoding = "lora"
    result.built += ["edited"] if built else []
    result.bits_per_weight, result.size_bytes = bits_per_weight(measured_path)
    result.baseline = _cached_measure(base_path, ctx.llama, ctx.scoring, ctx.text, ctx.label(rung, "baseline"))
    result.edited = _measure(edited_runner, ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))


def _edited_gguf(rung: Rung, ctx: _RungContext, base_path: Path, result: RungResult) -> tuple[Path, bool]:
    """The edited file of a GGUF rung: the full-precision edit exported at the rung, or (aware ladder, rungs
    coarser than 8 bits) the edit computed on the rung's unedited file and patched onto it."""
    from qedit.survival.on_rung import recomputes

    result.delta_norm = sum(d.norm() for d in ctx.deltas)
    if ctx.edit_fn is None or not recomputes(rung):
        return ctx.store.gguf(rung.spec, ctx.deltas, ctx.manifest, ctx.encoding)
    from qedit.converters.gguf_patch import patch_gguf, read_manifests
    from qedit.converters.gguf_read import GGUFFile
    from qedit.survival.on_rung import edit_on_rung

    result.computed_on = "rung"
    path = ctx.store.on_rung(base_path, ctx.deltas)
    if path.is_file():
        log.info("reusing %s", path)
        with GGUFFile(path) as gf:
            last = read_manifests(gf)[-1]
        result.delta_norm, result.encoding = float(last["info"]["rung_delta_norm"]), last["encoding"]["path"]
        return path, False
    made = edit_on_rung(base_path, ctx.loaded, ctx.edit_fn, ctx.deltas, ctx.encoding, ctx.cfg.stats)
    manifest = dict(ctx.manifest or {})
    manifest["info"] = dict(manifest.get("info") or {}, computed_on=f"{rung.name} artifact {base_path.name}",
                            rung_delta_norm=made.delta_norm, source_edit_reused=made.reused)
    manifest["encoding"] = {"path": "naive"} if made.encoding is None else made.encoding.describe()
    patch_gguf(base_path, path, list(made.deltas), manifest, encoding=made.encoding)
    result.delta_norm, result.encoding = made.delta_norm, manifest["encoding"]["path"]
    return path, True


def _gptq_rung(rung: Rung, ctx: _RungContext, result: RungResult) -> None:
    """The unedited model is written as a GPTQ checkpoint once; the edit is patched into a copy of it
    (the edited Linears requantized with their Hessians), as a GPTQ user patches a model."""
    import torch

    from qedit.runners_gptq import gptq_runner
    from qedit.survival.artifacts import gptq_bits_per_weight

    bits, cfg = int(rung.spec), ctx.cfg
    keys = None if ctx.encoding is None else {int(k): torch.as_tensor(v).float() for k, v in ctx.encoding.keys.items()}
    base_path, built = ctx.store.gptq(ctx.loaded, bits, cfg.gptq_group_size, cfg.gptq_act_order, ctx.calibration())
    result.artifacts["baseline"] = str(base_path)
    result.built += ["baseline"] if built else []
    edit_path, built = ctx.store.gptq_patch(base_path, ctx.deltas, ctx.calibration(), ctx.manifest, keys)
    result.artifacts["edited"] = str(edit_path)
    result.built += ["edited"] if built else []
    result.encoding = "naive" if keys is None else "aware"
    result.bits_per_weight, result.size_bytes = gptq_bits_per_weight(edit_path)
    result.baseline = _cached_measure(base_path, gptq_runner, ctx.scoring, ctx.text, ctx.label(rung, "baseline"))
    result.edited = _measure(gptq_runner(edit_path), ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))


def _bnb_rung(rung: Rung, ctx: _RungContext, result: RungResult) -> None:
    """In memory: bitsandbytes quantizes a copy of the unedited and of the edited model (plain rounding,
    no calibration, so there is no edit-aware path)."""
    from qedit.runners_gptq import BitsAndBytesRunner

    result.baseline = _measure(BitsAndBytesRunner(ctx.loaded, rung.spec), ctx.scoring, ctx.text, None,
                               ctx.label(rung, "baseline"))
    fold(ctx.loaded.model, ctx.deltas)
    try:
        edited_runner = BitsAndBytesRunner(ctx.loaded, rung.spec)  # quantizes a copy: the fold is undone below
    finally:
        fold(ctx.loaded.model, ctx.deltas, sign=-1.0)
    result.edited = _measure(edited_runner, ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))
    result.bits_per_weight, result.size_bytes = _bnb_size(ctx.loaded, rung.spec)


def _bnb_size(loaded: LoadedModel, mode: str) -> tuple[float, int]:
    """(bits per weight over all parameters, bytes): decoder Linears as bitsandbytes stores them (int8: a byte
    per weight and a float32 scale per row; nf4/fp4: 4 bits per weight and a float32 absmax per 64), the rest
    as loaded."""
    from qedit.converters.gptq_calibrate import quantizable_linears

    linear = {f"{n}.weight" for n in quantizable_linears(loaded)}
    bits = 0.0
    n = 0
    for name, p in loaded.model.named_parameters():  # tied weights are listed once
        n += p.numel()
        if name not in linear:
            bits += p.numel() * 8 * p.element_size()
        elif mode == "int8":
            bits += p.numel() * 8 + p.shape[0] * 32
        else:
            bits += p.numel() * 4 + -(-p.numel() // 64) * 32
    return bits / max(1, n), int(bits // 8)
