"""The llama.cpp check: score every edit on the written GGUF in llama.cpp and scale the edit up while one
does not hold. On minimal edits it keeps edits that the aware encoding alone loses at coarse types
(benchmarks/RESULTS.md, "Quantization-aware editing")."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qedit.core.errors import QeditError
from qedit.edit.compute import EditOutcome
from qedit.evaluation.metrics import evaluate
from qedit.runtimes.llama import LlamaCppRunner

log = logging.getLogger(__name__)

VERIFY_SCALES = (1.5, 2.25)   # the strengths tried, in order, for an edit that does not hold in llama.cpp


@dataclass
class Verified:
    """The outcome left written and how many of its edits hold."""

    outcome: EditOutcome
    held: int
    total: int


def verify_in_llama_cpp(rewrite: Callable[[EditOutcome], object], outcome: EditOutcome, out: Path,
                        hold_margin: float, notify: Callable[[str], None] = log.info) -> Verified:
    """Score `outcome`'s requests on the written GGUF `out` in llama.cpp; while one's margin over its true
    answer (or, without a true answer, its top-1 target) falls short of `hold_margin`, scale every delta by
    the next of VERIFY_SCALES and `rewrite` the output. When no scale makes every edit hold, the smallest
    scale with the fewest failing edits is the one left written."""

    if not outcome.requests:
        raise QeditError(f"{out}: the llama.cpp check needs the edit's facts, and this edit carries none")

    def short(current: EditOutcome) -> list[str]:
        cases = evaluate(LlamaCppRunner(out), current.requests, generate=False).cases
        return [c.subject for c in cases if (c.efficacy_top1 < 1.0 if c.margin is None else c.margin < hold_margin)]

    base = outcome
    failing = short(outcome)
    best, best_failing = outcome, failing   # the smallest scale with the fewest failing edits so far
    for factor in VERIFY_SCALES:
        if not failing:
            break
        shown = ", ".join(failing[:3]) + (", ..." if len(failing) > 3 else "")
        notify(f"verify: {len(failing)} of {len(outcome.requests)} edit(s) hold by less than {hold_margin:g} nats in "
               f"llama.cpp ({shown}); writing the edit x{factor:g}")
        outcome = base.scaled(factor)
        rewrite(outcome)
        failing = short(outcome)
        if len(failing) < len(best_failing):
            best, best_failing = outcome, failing
    if best is not outcome:
        outcome, failing = best, best_failing
        notify("verify: no scale holds every edit; writing the edit again at the smallest scale with the fewest "
               f"failing (x{outcome.info.get('verify_scale', 1):g})")
        rewrite(outcome)
    held = len(outcome.requests) - len(failing)
    notify(f"verify: {held} of {len(outcome.requests)} edit(s) hold by >= {hold_margin:g} nats in llama.cpp"
           + (f" (edit scaled x{outcome.info['verify_scale']:g})" if "verify_scale" in outcome.info else ""))
    return Verified(outcome, held, len(outcome.requests))
