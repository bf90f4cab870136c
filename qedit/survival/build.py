"""Building and measuring one rung: its unedited baseline (cached), its edited artifact (written by the
pipeline as `qedit edit` writes it, cached by the edit's content), both run in the rung's runtime."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from qedit.converters.gguf.patch import read_manifests
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gptq.calibrate import quantizable_linears
from qedit.converters.gptq.export import calibration_tokens, read_manifest
from qedit.core.delta import applied
from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel
from qedit.edit.compute import EditOutcome
from qedit.evaluation.scoring import Scoring
from qedit.kernels.gptq import GPTQConfig
from qedit.pipeline.jobs import EditJob, Output
from qedit.pipeline.run import EditRun, run_edit
from qedit.runtimes.bnb import BitsAndBytesRunner
from qedit.runtimes.gptq import gptq_runner
from qedit.runtimes.llama import LlamaCppRunner
from qedit.runtimes.torch_runner import Runner
from qedit.survival.artifacts import ArtifactStore, bits_per_weight, gptq_bits_per_weight
from qedit.survival.measure import RungResult, SurvivalConfig, SurvivalJob, cached_measure, measure
from qedit.survival.rungs import Rung, RungKind

log = logging.getLogger(__name__)


@dataclass
class RungContext:
    """What every rung is built and measured from."""

    job: SurvivalJob
    cfg: SurvivalConfig
    loaded: LoadedModel
    outcome: EditOutcome          # the edit computed on the source (or given)
    scoring: Scoring
    text: str
    store: ArtifactStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = ArtifactStore(self.cfg.artifacts, self.loaded.source, self.loaded.fingerprint)

    def label(self, rung: Rung, what: str) -> str | None:
        return f"{rung.name} {what}" if self.cfg.progress else None

    def llama(self, path: Path, lora: Path | None = None) -> Runner:
        return LlamaCppRunner(path, n_ctx=self.cfg.n_ctx, n_threads=self.cfg.n_threads, lora=lora)

    def edit_job(self, output: Output, base: Path) -> EditJob:
        """The job `qedit edit SOURCE FACTS -o OUTPUT` runs for this ladder's facts and settings."""
        job = self.job
        return EditJob(job.model, job.requests, job.method, output, device=job.device, device_map=job.device_map,
                       outcome=job.outcome, quantized_base=base, max_memory=job.max_memory, chat=job.chat)


def run_rung(rung: Rung, ctx: RungContext) -> RungResult:
    start = time.perf_counter()
    result = RungResult(rung, "ok")
    try:
        {RungKind.GGUF: _gguf_rung, RungKind.GGUF_LORA: _lora_rung, RungKind.GPTQ: _gptq_rung,
         RungKind.BNB: _bnb_rung}[rung.kind](rung, ctx, result)
    except QeditError as exc:
        result.status, result.reason = "skipped", str(exc)
        log.warning("rung %s skipped: %s", rung.name, exc)
    result.seconds = time.perf_counter() - start
    log.info("%s: %s%s", rung.name, result.status, f" ({result.reason})" if result.reason else "")
    return result


def _edited(rung: Rung, ctx: RungContext, output: Output, base: Path, result: RungResult) -> Path:
    """The rung's edited artifact, written by the pipeline (or reused), with what it records of the edit."""
    path = output.path
    if (path / "config.json").is_file() if output.format == "gptq" else path.is_file():
        log.info("reusing %s", path)
        manifest = _last_manifest(path)
    else:
        run: EditRun = run_edit(ctx.edit_job(output, base), loaded=ctx.loaded, source_outcome=ctx.outcome)
        manifest = {"info": run.outcome.info, "delta_norm": run.outcome.delta_norm,
                    "encoding": {"path": "naive" if output.naive or not run.outcome.keys else "aware"}}
        result.built.append("edited")
    info = manifest.get("info") or {}
    result.computed_on = "rung" if info.get("computed_on") else "source"
    result.delta_norm = float(manifest.get("delta_norm", ctx.outcome.delta_norm))
    result.verify_scale = info.get("verify_scale")
    path_kind = str((manifest.get("encoding") or {}).get("path", "naive"))
    result.encoding = "naive" if path_kind == "naive" else "aware"
    result.artifacts["edited"] = str(path)
    return path


def _last_manifest(path: Path) -> dict:
    if path.is_dir():
        return read_manifest(path) or {}
    with GGUFFile(path) as gf:
        manifests = read_manifests(gf)
    return manifests[-1] if manifests else {}


def _gguf_rung(rung: Rung, ctx: RungContext, result: RungResult) -> None:
    base, built = ctx.store.gguf(rung.spec)
    result.artifacts["baseline"] = str(base)
    result.built += ["baseline"] if built else []
    out = Output(ctx.store.edited(rung.name, ctx.outcome, ctx.job.naive, ctx.cfg.hold_margin, ctx.cfg.verify),
                 quant=rung.spec, naive=ctx.job.naive, verify=ctx.cfg.verify, hold_margin=ctx.cfg.hold_margin,
                 modelfile=False)   # a cached artifact: no Modelfile beside it
    edited = _edited(rung, ctx, out, base, result)
    result.bits_per_weight, result.size_bytes = bits_per_weight(edited)
    result.baseline = cached_measure(base, ctx.llama, ctx.scoring, ctx.text, ctx.label(rung, "baseline"))
    result.edited = measure(ctx.llama(edited), ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))


def _lora_rung(rung: Rung, ctx: RungContext, result: RungResult) -> None:
    """The source's edit as a LoRA adapter, applied at run time on the unedited model quantized at the rung."""
    base, built = ctx.store.gguf(rung.spec)
    result.artifacts["baseline"] = str(base)
    result.built += ["baseline"] if built else []
    lora, built = ctx.store.lora(base, ctx.outcome.deltas, ctx.outcome.manifest(ctx.loaded))
    result.artifacts["lora"] = str(lora)
    result.built += ["edited"] if built else []
    result.encoding, result.delta_norm = "lora", ctx.outcome.delta_norm
    result.bits_per_weight, result.size_bytes = bits_per_weight(base)
    result.baseline = cached_measure(base, ctx.llama, ctx.scoring, ctx.text, ctx.label(rung, "baseline"))
    result.edited = measure(ctx.llama(base, lora=lora), ctx.scoring, ctx.text, result.baseline,
                            ctx.label(rung, "edited"))


def _in_memory(rung: Rung, ctx: RungContext) -> None:
    """GPTQ and bitsandbytes rungs quantize the torch model's own weights: skipped for a streamed model."""
    if ctx.loaded.streamer is not None:
        raise QeditError(f"{rung.name} quantizes the whole model in memory, which does not fit the memory budget; "
                         "raise --max-memory to measure it")


def _gptq_rung(rung: Rung, ctx: RungContext, result: RungResult) -> None:
    """The unedited model as a GPTQ checkpoint (built once), and the file `qedit edit --format gptq --bits N`
    writes: below 8 bits the edit computed on that checkpoint and patched into it edit-aware."""
    _in_memory(rung, ctx)
    cfg = ctx.cfg
    quant = GPTQConfig(bits=int(rung.spec), group_size=cfg.gptq_group_size, desc_act=cfg.gptq_act_order)
    seqs = calibration_tokens(ctx.loaded, ctx.job.method.resolved_config().stats)
    base, built = ctx.store.gptq(ctx.loaded, quant, seqs)
    result.artifacts["baseline"] = str(base)
    result.built += ["baseline"] if built else []
    out = Output(ctx.store.edited(rung.name, ctx.outcome, ctx.job.naive, 0.0, False, suffix=""), format="gptq",
                 gptq=quant, naive=ctx.job.naive)
    edited = _edited(rung, ctx, out, base, result)
    result.bits_per_weight, result.size_bytes = gptq_bits_per_weight(edited)
    result.baseline = cached_measure(base, gptq_runner, ctx.scoring, ctx.text, ctx.label(rung, "baseline"))
    result.edited = measure(gptq_runner(edited), ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))


def _bnb_rung(rung: Rung, ctx: RungContext, result: RungResult) -> None:
    """In memory: bitsandbytes quantizes a copy of the unedited and of the edited model (plain rounding,
    no calibration, so there is no edit-aware path)."""
    _in_memory(rung, ctx)
    result.baseline = measure(BitsAndBytesRunner(ctx.loaded, rung.spec), ctx.scoring, ctx.text, None,
                              ctx.label(rung, "baseline"))
    with applied(ctx.loaded.model, ctx.outcome.deltas):
        edited_runner = BitsAndBytesRunner(ctx.loaded, rung.spec)  # quantizes a copy of the edited weights
    result.edited = measure(edited_runner, ctx.scoring, ctx.text, result.baseline, ctx.label(rung, "edited"))
    result.delta_norm = ctx.outcome.delta_norm
    result.bits_per_weight, result.size_bytes = _bnb_size(ctx.loaded, rung.spec)


def _bnb_size(loaded: LoadedModel, mode: str) -> tuple[float, int]:
    """(bits per weight over all parameters, bytes): decoder Linears as bitsandbytes stores them (int8: a byte
    per weight and a float32 scale per row; nf4/fp4: 4 bits per weight and a float32 absmax per 64), the rest
    as loaded."""
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
