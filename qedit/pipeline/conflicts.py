"""Facts of a patch that contradict facts an earlier patch wrote into the file: the new one wins.

A fact contradicts an earlier one when both have the same subject and relation (`EditRequest.fact_key`) and
another target. The earlier fact's keys, recomputed on the current weights, are taken out of the history the
new edit protects: with them kept, the solve would defend the old answer against the new one (the two keys
are nearly the same vector) and write about half the change. The new patch's manifest records what it
replaced (`info.replaces`), and `qedit inspect` shows it.

Two facts of one patch with one key and different targets are refused: which one should win is the user's
choice.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qedit.converters.gguf.patch import replaced_by
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest, request_from_dict


@dataclass(frozen=True)
class EarlierFact:
    """Fact `fact` (0-based) of the file's edit `patch` (1-based, as `qedit inspect` numbers them)."""

    patch: int
    fact: int
    request: EditRequest

    def record(self, new: EditRequest) -> dict[str, Any]:
        relation = self.request.fact_key[1]
        return {"patch": self.patch, "fact": self.fact, "subject": self.request.subject, "relation": relation,
                "old_target": self.request.target_new, "new_target": new.target_new,
                "reason": "same subject and relation"}


def earlier_facts(manifests: Sequence[Mapping[str, Any]]) -> list[EarlierFact]:
    """The edit facts the file's manifests record and no later patch replaced (facts that are not edit requests,
    e.g. of an unlearning patch, are skipped)."""
    gone = replaced_by(manifests)
    out = []
    for i, m in enumerate(manifests, 1):
        for j, fact in enumerate(m.get("facts") or []):
            try:
                request = request_from_dict(fact)
            except (ValueError, TypeError, KeyError):
                continue
            if (i, j) not in gone:
                out.append(EarlierFact(i, j, request))
    return out


def check_batch(requests: Sequence[EditRequest]) -> None:
    """Refuse two facts of one batch with the same subject and relation and different targets."""
    seen: dict[tuple[str, str], EditRequest] = {}
    for r in requests:
        other = seen.setdefault(r.fact_key, r)
        if other is not r and other.target_new.strip() != r.target_new.strip():
            raise QeditError(f"{other.origin or repr(other.prompt)} and {r.origin or repr(r.prompt)}: two facts of "
                             f"{r.subject!r} with the same prompt and different targets ({other.target_new!r}, "
                             f"{r.target_new!r}); keep one of them")


def conflicts(requests: Sequence[EditRequest], earlier: Sequence[EarlierFact]) -> list[tuple[EarlierFact, EditRequest]]:
    """(earlier fact, new request) for every earlier fact a new request contradicts."""
    by_key: dict[tuple[str, str], EditRequest] = {r.fact_key: r for r in requests}
    return [(e, by_key[e.request.fact_key]) for e in earlier
            if e.request.fact_key in by_key and e.request.target_new.strip() != by_key[e.request.fact_key].target_new.strip()]
