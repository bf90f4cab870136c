"""The survival ladder: edit once at full precision, then build and measure every rung (`qedit.survival.build`)."""
from __future__ import annotations

import logging
from typing import Any

from qedit.converters.loading import load_model
from qedit.core.delta import applied
from qedit.core.errors import QeditError
from qedit.core.memory import MemoryBudget
from qedit.core.model import LoadedModel
from qedit.edit.compute import EditOutcome
from qedit.evaluation.scoring import scoring_for
from qedit.pipeline.run import compute_for
from qedit.runtimes.torch_runner import TorchRunner
from qedit.survival.build import RungContext, run_rung
from qedit.survival.measure import SurvivalConfig, SurvivalJob, SurvivalResult, fluency_text, measure, versions

log = logging.getLogger(__name__)


def run_survival(job: SurvivalJob, cfg: SurvivalConfig, loaded: LoadedModel | None = None,
                 source_outcome: EditOutcome | None = None) -> SurvivalResult:
    """Edit (or take `job.outcome`), measure at full precision, then build and measure every rung.

    `loaded`: `job.model` already loaded; `source_outcome`: the job's edit already computed on it. The torch
    model is left as it was given. A rung that cannot be built is reported as skipped with the reason."""
    requests = list(job.requests)
    scoring = scoring_for(requests, job.retain, chat=job.chat)
    loaded = loaded or load_model(job.model, device=job.device, max_memory=job.max_memory or MemoryBudget.resolve(None),
                                  device_map=job.device_map)
    outcome = job.outcome or source_outcome or compute_for(job.method, loaded, requests, chat=job.chat)
    if not outcome.deltas:
        raise QeditError("survival: no deltas to check; run an edit or give --from-deltas DIR")
    text = cfg.text if cfg.text is not None else fluency_text()
    torch_runner = TorchRunner(loaded)
    ref_base = measure(torch_runner, scoring, text, None, "fp32 unedited" if cfg.progress else None)
    with applied(loaded.model, outcome.deltas):
        reference = measure(torch_runner, scoring, text, ref_base, "fp32 edited" if cfg.progress else None)
    ctx = RungContext(job, cfg, loaded, outcome, scoring, text)
    rungs: Any = cfg.rungs
    if cfg.progress:
        from tqdm.auto import tqdm

        rungs = tqdm(cfg.rungs, desc="rungs", unit="rung")
    results = [run_rung(rung, ctx) for rung in rungs]
    encoding = "naive" if job.naive or not outcome.keys else "aware"
    return SurvivalResult(
        source=loaded.source, source_sha256=loaded.fingerprint, method=outcome.method, requests=requests,
        reference=reference, reference_baseline=ref_base, rungs=results, versions=versions(),
        delta_norm=outcome.delta_norm, encoding=encoding, mode=scoring.kind, chat=job.chat,
    )
