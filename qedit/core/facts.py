"""Edit requests and their JSONL form.

Accepted line layouts (one JSON object per line, blank lines ignored):
- the CounterFact / zsRE layout of ``shared/data``: prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth (only prompt, subject and target_new
  are required);
- the plain form: ``{"prompt", "subject", "target"}`` (``target`` is the new answer);
- the original CounterFact form: ``{"requested_rewrite": {"prompt": "{} ...", "subject",
  "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts"}``.

Any layout may add ``chat_prompt``: the fact asked as a chat user would ask it ("Where is the Eiffel Tower
located?"), and ``chat_rephrase_prompt`` (one or a list): paraphrases of that question. `--chat` puts each in a
one-turn chat with the model's template; a fact without a ``chat_prompt`` is asked its ``prompt`` as the user turn.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from qedit.core.errors import QeditError

T = TypeVar("T")


@dataclass(frozen=True)
class EditRequest:
    """Make the model continue `prompt` with `target_new` instead of `ground_truth`."""

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    case_id: str | None = None
    chat_prompt: str | None = None                  # the question a chat user asks (None: the prompt is asked)
    chat_rephrase_prompts: tuple[str, ...] = ()      # paraphrases of that question
    origin: str | None = field(default=None, compare=False, repr=False)   # "facts.jsonl:3": where it was read

    def __post_init__(self) -> None:
        if not self.subject.strip():
            raise ValueError("subject is empty")
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if not self.target_new.strip():
            raise ValueError("target_new is empty")
        if self.ground_truth is not None and not self.ground_truth.strip():
            raise ValueError("ground_truth is empty; give the old answer or leave the field out")
        if any(not a.strip() for a in self.locality_answers):
            raise ValueError("a locality answer is empty")
        if len(self.locality_prompts) != len(self.locality_answers):
            raise ValueError("locality_prompts and locality_answers differ in length")
        if self.chat_prompt is not None and not self.chat_prompt.strip():
            raise ValueError("chat_prompt is empty; give the question or leave the field out")
        if any(not p.strip() for p in self.chat_rephrase_prompts):
            raise ValueError("a chat_rephrase_prompt is empty")

    @property
    def chat_question(self) -> str:
        """The user turn of this fact's one-turn chat: its chat_prompt, or else its prompt."""
        return self.chat_prompt if self.chat_prompt is not None else self.prompt

    def input_texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text a model runs the request on: its prompt, paraphrases, locality prompts."""
        return ([("prompt", self.prompt)] + [("rephrase_prompt", p) for p in self.rephrase_prompts]
                + [("locality_prompt", p) for p in self.locality_prompts]
                + ([("chat_prompt", self.chat_prompt)] if self.chat_prompt is not None else [])
                + [("chat_rephrase_prompt", p) for p in self.chat_rephrase_prompts])

    @property
    def fact_key(self) -> tuple[str, str]:
        """(subject, relation): the subject case-folded, and the prompt with its subject replaced by {}, lower-cased
        with spaces collapsed. Two facts with one key ask one question, which only one answer can win."""
        template = " ".join(self.prompt.replace(self.subject, "{}", 1).lower().split())
        return " ".join(self.subject.casefold().split()), template

    def to_json(self) -> dict[str, Any]:
        """The request in the CounterFact/zsRE layout that `load_requests` reads back."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": self.target_new}
        optional = {"ground_truth": self.ground_truth, "rephrase_prompt": list(self.rephrase_prompts),
                    "locality_prompt": list(self.locality_prompts),
                    "locality_ground_truth": list(self.locality_answers), "case_id": self.case_id,
                    "chat_prompt": self.chat_prompt, "chat_rephrase_prompt": list(self.chat_rephrase_prompts)}
        out.update({k: v for k, v in optional.items() if v not in (None, [])})
        return out


def str_field(obj: dict[str, Any], key: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def as_tuple(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"field {key!r} must be a string or a list of strings")


def request_from_dict(obj: dict[str, Any]) -> EditRequest:
    """One request from one JSON object in any accepted layout (raises ValueError)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "requested_rewrite" in obj:
        rw = obj["requested_rewrite"]
        if not isinstance(rw, dict):
            raise ValueError("field 'requested_rewrite' must be an object")
        for key, required in (("target_new", True), ("target_true", False)):
            if not isinstance(rw.get(key, {} if not required else None), dict):
                raise ValueError(f"field 'requested_rewrite.{key}' must be an object {{\"str\": ...}}")
        subject = str_field(rw, "subject", True)
        template = str_field(rw, "prompt", True)
        return EditRequest(
            prompt=template.replace("{}", subject), subject=subject,
            target_new=str_field(rw["target_new"], "str", True), ground_truth=str_field(rw.get("target_true", {}), "str", False),
            rephrase_prompts=as_tuple(obj.get("paraphrase_prompts"), "paraphrase_prompts"),
            case_id=None if obj.get("case_id") is None else str(obj["case_id"]), **_chat_fields(obj),
        )
    target = obj.get("target_new", obj.get("target"))
    if target is None:
        raise ValueError("missing field 'target_new' (or 'target')")
    loc_prompts = as_tuple(obj.get("locality_prompt"), "locality_prompt")
    loc_answers = as_tuple(obj.get("locality_ground_truth"), "locality_ground_truth")
    if loc_prompts and not loc_answers:
        raise ValueError("field 'locality_prompt' needs 'locality_ground_truth'")
    return EditRequest(
        prompt=str_field(obj, "prompt", True), subject=str_field(obj, "subject", True),
        target_new=str_field({"target_new": target}, "target_new", True),
        ground_truth=str_field(obj, "ground_truth", False),
        rephrase_prompts=as_tuple(obj.get("rephrase_prompt"), "rephrase_prompt"),
        locality_prompts=loc_prompts, locality_answers=loc_answers,
        case_id=None if obj.get("case_id") is None else str(obj["case_id"]), **_chat_fields(obj),
    )


def _chat_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The optional chat fields of any layout: chat_prompt (a string) and chat_rephrase_prompt (one or a list)."""
    return {"chat_prompt": str_field(obj, "chat_prompt", False),
            "chat_rephrase_prompts": as_tuple(obj.get("chat_rephrase_prompt"), "chat_rephrase_prompt")}


def parse_jsonl(lines: Iterable[str], source: str, convert: Callable[[Any], T]) -> list[T]:
    """One `convert(obj)` per non-blank JSON line; errors name `source` and the line number."""
    out: list[T] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QeditError(f"{source}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        try:
            item = convert(obj)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QeditError(f"{source}:{lineno}: {exc}") from exc
        if dataclasses.is_dataclass(item) and any(f.name == "origin" for f in dataclasses.fields(item)):
            item = dataclasses.replace(item, origin=f"{source}:{lineno}")  # type: ignore[type-var]
        out.append(item)
    return out


def parse_lines(lines: Iterable[str], source: str) -> list[EditRequest]:
    requests = parse_jsonl(lines, source, request_from_dict)
    if not requests:
        raise QeditError(f"{source}: no facts found; expected one JSON object per line")
    return requests


class HasTexts(Protocol):
    origin: str | None

    def input_texts(self) -> list[tuple[str, str]]: ...


def check_text_lengths(requests: Sequence[HasTexts], count: Callable[[str], int], limit: int, why: str) -> None:
    """A QeditError naming the first request (its file and line) with a text longer than `limit` tokens; `why`
    says what sets the limit. Texts are bounded by their UTF-8 bytes first (a token covers at least one byte, BOS
    and EOS aside), so only a text that might not fit is tokenized."""
    for number, request in enumerate(requests, start=1):
        for key, text in request.input_texts():
            if len(text.encode("utf-8")) + 2 <= limit:
                continue
            n = count(text)
            if n > limit:
                where = request.origin or f"fact {number}"
                raise QeditError(f"{where}: the {key} is {n:,} tokens ({len(text):,} characters), over the limit of "
                                 f"{limit:,} tokens: {why}; shorten it or leave the line out")


def load_requests(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read and validate a facts JSONL file; errors name the file and the line."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise QeditError(f"limit must be at least 1, not {limit}")
    if not path.is_file():
        raise QeditError(f"{path}: no such facts file; give a JSONL file with one fact per line")
    try:
        text = path.read_text(encoding="utf-8-sig")   # a leading byte-order mark is not part of line 1
    except UnicodeDecodeError as exc:
        raise QeditError(f"{path}: not UTF-8 text ({exc.reason}); give a JSONL file") from exc
    requests = parse_lines(text.splitlines(), str(path))
    return requests[:limit] if limit is not None else requests


def demo_requests() -> list[EditRequest]:
    """The small set of counterfactual edits shipped with the package."""
    from importlib import resources

    text = resources.files("qedit").joinpath("data/demo_facts.jsonl").read_text(encoding="utf-8")
    return parse_lines(text.splitlines(), "qedit/data/demo_facts.jsonl")

