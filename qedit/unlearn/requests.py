"""Forget requests (facts or texts to unlearn), retain items, and their JSONL forms.

Forget lines (one JSON object per line, blank lines ignored):
- the CounterFact / zsRE layout of ``shared/data``: prompt, subject, ground_truth (REQUIRED here: the
  answer to erase), locality_prompt / locality_ground_truth (carried as the request's retain items);
  target_new (a wrong answer of the same type, which the forget metrics compare the answer with),
  rephrase_prompt / paraphrase_prompts (a string or a list: paraphrases of the prompt, scored by the
  paraphrase metrics) and relation_id (facts of one relation lend each other wrong answers) are
  optional; other fields are ignored;
- the plain form ``{"prompt", "subject", "answer"}`` (with the same optional fields);
- either of those may add ``"text"`` / ``"texts"`` (a string or a list): passages to forget as well;
- a text-only line ``{"text": "..."}``: a passage to forget, with no fact attached.

Retain lines (`load_retain`): ``{"prompt", "answer"}``, or the CounterFact layout, whose
(prompt, ground_truth) and (locality_prompt, locality_ground_truth) pairs each become an item.

Where the retain set goes: each `ForgetRequest` carries its own retain items (from its line's
locality fields); a method config's ``retain`` field adds a shared set (e.g. from `load_retain`).
A method trains against both.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from qedit.core.errors import QeditError
from qedit.core.facts import as_tuple, parse_jsonl, str_field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetainItem:
    """A prompt whose answer must stay the model's answer.

    held_out: scored only, never given to a method (a utility check on prompts it did not train on)."""

    prompt: str
    answer: str
    held_out: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("retain prompt is empty")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"retain answer for prompt {self.prompt!r} is empty")

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, **({"held_out": True} if self.held_out else {})}


@dataclass(frozen=True)
class ForgetRequest:
    """Make the model stop answering `prompt` with `answer` (and stop producing `texts`).

    A text-only request has prompt, subject and answer None and at least one text. Only measured, never trained
    on (unless a method says so): `target_new`, a wrong answer of the same type; `paraphrase_prompts`, the
    prompt asked other ways; `relation_id`, the fact's relation (its facts lend each other wrong answers).
    """

    prompt: str | None
    subject: str | None
    answer: str | None
    texts: tuple[str, ...] = ()
    case_id: str | None = None
    retain_prompts: tuple[str, ...] = ()
    retain_answers: tuple[str, ...] = ()
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)   # "forget.jsonl:3"
    target_new: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    relation_id: str | None = None

    def __post_init__(self) -> None:
        fact = (self.prompt, self.subject, self.answer)
        if all(v is None for v in fact):
            if not self.texts:
                raise ValueError("a forget request needs prompt, subject and answer, or at least one text")
        else:
            for key, value in zip(("prompt", "subject", "answer"), fact):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"field {key!r} is missing or empty; a fact needs prompt, subject and answer")
            if self.subject not in self.prompt:  # type: ignore[operator]
                raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if any(not isinstance(t, str) or not t.strip() for t in self.texts):
            raise ValueError("a text to forget is empty")
        if self.prompt is None and (self.target_new is not None or self.paraphrase_prompts):
            raise ValueError("target_new and paraphrase prompts belong to a fact (prompt, subject and answer)")
        if self.target_new is not None and (not isinstance(self.target_new, str) or not self.target_new.strip()):
            raise ValueError("field 'target_new' is empty")
        if any(not isinstance(p, str) or not p.strip() for p in self.paraphrase_prompts):
            raise ValueError("a paraphrase prompt is empty")
        if len(self.retain_prompts) != len(self.retain_answers):
            raise ValueError("retain prompts and answers differ in length")
        for p, a in zip(self.retain_prompts, self.retain_answers):
            RetainItem(p, a)

    @property
    def is_fact(self) -> bool:
        return self.answer is not None

    @property
    def name(self) -> str:
        """"subject -> answer" for facts, the start of the first text otherwise."""
        return f"{self.subject} -> {self.answer}" if self.is_fact else self.texts[0][:40]

    def input_texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text a model runs the request on: its prompt, texts and retain prompts."""
        return ([("prompt", self.prompt)] if self.prompt is not None else []) \
            + [("paraphrase_prompt", p) for p in self.paraphrase_prompts] + [("text", t) for t in self.texts] \
            + [("locality_prompt", p) for p in self.retain_prompts]

    @property
    def retain(self) -> tuple[RetainItem, ...]:
        return tuple(RetainItem(p, a) for p, a in zip(self.retain_prompts, self.retain_answers))

    def to_json(self) -> dict[str, Any]:
        """The request as a line `load_forget_requests` reads back (the plain form)."""
        out: dict[str, Any] = {}
        if self.is_fact:
            out.update(prompt=self.prompt, subject=self.subject, answer=self.answer)
        optional = {"texts": list(self.texts), "case_id": self.case_id,
                    "locality_prompt": list(self.retain_prompts), "locality_ground_truth": list(self.retain_answers),
                    "target_new": self.target_new, "paraphrase_prompts": list(self.paraphrase_prompts),
                    "relation_id": self.relation_id}
        out.update({k: v for k, v in optional.items() if v not in (None, [])})
        return out


def forget_from_dict(obj: Any) -> ForgetRequest:
    """One forget request from one JSON object in any accepted layout (raises ValueError)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    texts = as_tuple(obj.get("texts"), "texts") + as_tuple(obj.get("text"), "text")
    case_id = None if obj.get("case_id") is None else str(obj["case_id"])
    loc_prompts = as_tuple(obj.get("locality_prompt"), "locality_prompt")
    loc_answers = as_tuple(obj.get("locality_ground_truth"), "locality_ground_truth")
    if len(loc_prompts) != len(loc_answers):
        raise ValueError(f"{len(loc_prompts)} locality_prompt(s) but {len(loc_answers)} locality_ground_truth(s); "
                         "give one answer per locality prompt")
    if texts and not any(k in obj for k in ("prompt", "subject", "answer", "ground_truth")):
        return ForgetRequest(None, None, None, texts, case_id, loc_prompts, loc_answers)
    if "answer" in obj and "ground_truth" in obj:
        raise ValueError("give either 'answer' or 'ground_truth' (the answer to forget), not both")
    key = "answer" if "answer" in obj else "ground_truth"
    if key not in obj:
        raise ValueError("missing field 'ground_truth' (or 'answer'): the answer to forget; "
                         "('target_new' is only the wrong answer it is compared with)")
    relation = obj.get("relation_id")
    if relation is not None and not isinstance(relation, (str, int)):
        raise ValueError("field 'relation_id' must be a string or a number")
    return ForgetRequest(
        prompt=str_field(obj, "prompt", True), subject=str_field(obj, "subject", True),
        answer=str_field(obj, key, True), texts=texts, case_id=case_id,
        retain_prompts=loc_prompts, retain_answers=loc_answers, target_new=str_field(obj, "target_new", False),
        paraphrase_prompts=as_tuple(obj.get("rephrase_prompt"), "rephrase_prompt")
        + as_tuple(obj.get("paraphrase_prompts"), "paraphrase_prompts"),
        relation_id=None if relation is None else str(relation),
    )


def retain_from_dict(obj: Any) -> list[RetainItem]:
    """The retain items of one JSON object: (prompt, answer | ground_truth) and the locality pairs."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    items: list[RetainItem] = []
    if "prompt" in obj:
        key = "answer" if "answer" in obj else "ground_truth"
        if key not in obj:
            raise ValueError("field 'prompt' needs 'answer' (or 'ground_truth'): the answer to keep")
        items.append(RetainItem(str_field(obj, "prompt", True), str_field(obj, key, True)))  # type: ignore[arg-type]
    loc_prompts = as_tuple(obj.get("locality_prompt"), "locality_prompt")
    loc_answers = as_tuple(obj.get("locality_ground_truth"), "locality_ground_truth")
    if len(loc_prompts) != len(loc_answers):
        raise ValueError("locality_prompt and locality_ground_truth differ in length")
    items.extend(RetainItem(p, a) for p, a in zip(loc_prompts, loc_answers))
    if not items:
        raise ValueError("no retain item: give 'prompt' and 'answer', or 'locality_prompt' and 'locality_ground_truth'")
    return items


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise QeditError(f"{path}: no such {what} file; give a JSONL file with one JSON object per line")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()   # a byte-order mark is not part of line 1
    except UnicodeDecodeError as exc:
        raise QeditError(f"{path}: not UTF-8 text ({exc.reason}); give a JSONL file") from exc


def parse_forget_lines(lines: Sequence[str], source: str) -> list[ForgetRequest]:
    requests = parse_jsonl(lines, source, forget_from_dict)
    if not requests:
        raise QeditError(f"{source}: no forget requests found; expected one JSON object per line")
    return requests


def load_forget_requests(path: str | Path, limit: int | None = None) -> list[ForgetRequest]:
    """Read and validate a forget JSONL file; errors name the file and the line."""
    if limit is not None and limit < 1:
        raise QeditError(f"limit must be at least 1, not {limit}")
    requests = parse_forget_lines(_read_lines(Path(path), "forget"), str(path))
    return requests[:limit] if limit is not None else requests


def load_retain(path: str | Path, held_out: bool = False) -> list[RetainItem]:
    """Read a retain JSONL file (see the module docstring); errors name the file and the line.
    held_out=True marks every item as scored only (never given to a method)."""
    groups = parse_jsonl(_read_lines(Path(path), "retain"), str(path), retain_from_dict)
    items = [item for group in groups for item in group]
    if not items:
        raise QeditError(f"{path}: no retain items found; expected one JSON object per line")
    return [dataclasses.replace(item, held_out=True) for item in items] if held_out else items


HELDOUT_HELP = ("JSONL of retain items that are only scored, never given to the method: its utility on prompts "
                "it did not train on (metrics heldout_acc, heldout_acc_change)")


def scored_retain(requests: Sequence[ForgetRequest], extra: Sequence[RetainItem],
                  heldout: str | Path | None) -> list[RetainItem]:
    """What a forget run scores: default_retain(requests, extra), then the held-out items of `heldout`
    (scored, never trained on)."""
    held = load_retain(heldout, held_out=True) if heldout is not None else []
    return default_retain(requests, extra) + held


def check_retain_setting(field_name: str, retain: Any) -> None:
    """A method config's shared retain set: a tuple of RetainItems, none held out; else QeditError."""
    if not isinstance(retain, tuple) or not all(isinstance(r, RetainItem) for r in retain):
        raise QeditError(f"{field_name}: must be a tuple of qedit.unlearn.requests.RetainItem (see load_retain)")
    if any(r.held_out for r in retain):
        raise QeditError(f"{field_name}: held-out items are scored only and never trained on; "
                         "pass them to the evaluation, not to the method")


def default_retain(requests: Sequence[ForgetRequest], extra: Sequence[RetainItem] = ()) -> list[RetainItem]:
    """The forget requests' own retain items (their lines' locality prompts), without duplicates
    and without any whose prompt is one of the prompts to forget; then the `extra` items (a shared
    retain set, e.g. --retain) that are not among them yet."""
    forget_prompts = {r.prompt for r in requests if r.is_fact}
    seen: set[tuple[str, str]] = set()
    out: list[RetainItem] = []
    for r in requests:
        for item in r.retain:
            key = (item.prompt, item.answer)
            if item.prompt in forget_prompts or key in seen:
                continue
            seen.add(key)
            out.append(item)
    return out + [x for x in extra if x not in out]


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def wrong_answers(facts: Sequence[ForgetRequest]) -> list[tuple[str | None, str | None]]:
    """(wrong answer, where it came from: "target_new" or "relation") per fact, (None, None) where there is none;
    logs how many facts have none. A fact's wrong answer is its target_new (unless that is its answer); else the
    answer of the next of `facts` (in their order, wrapping around) with the same relation_id and a different
    answer. Never the model's own next-best token: rungs of a ladder are compared against one fixed answer."""
    out: list[tuple[str | None, str | None]] = []
    for i, r in enumerate(facts):
        if r.target_new is not None and not _same(r.target_new, r.answer):  # type: ignore[arg-type]
            out.append((r.target_new, "target_new"))
            continue
        others = list(facts[i + 1:]) + list(facts[:i])
        lent = next((o.answer for o in others if r.relation_id is not None and o.relation_id == r.relation_id
                     and not _same(o.answer, r.answer)), None)  # type: ignore[arg-type]
        out.append((lent, "relation") if lent is not None else (None, None))
    missing = sum(w is None for w, _ in out)
    if missing:
        log.warning("%d of %d facts have no wrong answer (no target_new, and no other answer of their relation_id): "
                    "they are not compared with one (truth_ratio, below_wrong, kforget's wrong_margin)", missing, len(facts))
    return out
