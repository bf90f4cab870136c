"""Tokenizing prompts with continuations, padded batches, and logits at chosen positions.

Shared by the edit methods and the torch runner, so a prompt and its target are tokenized the
same way everywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from qedit.core.model import LoadedModel

# A media or control marker that a converted vocabulary may not flag as special: Gemma 3's <start_of_image>,
# <end_of_image>, <image_soft_token> (user-defined in its GGUF), or <|...|>. HTML-like tokens (<table>, <h1>) are
# text and never match: they carry no underscore or bar.
_MARKER = re.compile(r"^<(\|[^<>]*\||[^<>\s]*_[^<>\s]*)>$")


def is_marker_token(text: str) -> bool:
    """True for a token whose whole text is a marker such as <start_of_image> or <|im_end|>: generated text
    ends before it, as before any special token."""
    return bool(_MARKER.match(text))


def join_target(prompt: str, target: str) -> str:
    """The text of `prompt` followed by `target` as an answer (one space between them)."""
    target = target.strip()
    return prompt + target if prompt.endswith((" ", "\n")) else prompt + " " + target


def continuation_ids(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the tokenizer's BOS) and of `target` as it follows the prompt."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(join_target(prompt, target))["input_ids"]
    if full[: len(p)] == p and len(full) > len(p):
        return p, full[len(p):]
    t = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    return p, t


def subject_last_index(tokenizer: Any, text: str, subject: str) -> int:
    """Index of the last token of the (last occurrence of) `subject` in the tokenized `text`."""
    end = text.rindex(subject) + len(subject)
    enc = tokenizer(text, return_offsets_mapping=True)
    idx = 0
    for i, (start, stop) in enumerate(enc["offset_mapping"]):
        if stop == start:  # special tokens
            continue
        if start < end:
            idx = i
    return idx


@dataclass
class Batch:
    """A right-padded batch: ids/mask (batch, seq) and, per row, the positions of interest."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_pos: list[list[int]] = field(default_factory=list)  # positions whose logits predict target tokens
    target_ids: list[list[int]] = field(default_factory=list)
    lookup: list[int] = field(default_factory=list)            # per row, the subject's last token (or -1)
    last: list[int] = field(default_factory=list)              # per row, the last prompt token


def build_batch(loaded: LoadedModel, prompts: Sequence[str], targets: Sequence[str | None],
                subjects: Sequence[str | None] | None = None, include_last_target: bool = False) -> Batch:
    """Prompts followed by their targets (teacher forcing). A None target means the prompt alone."""
    tok = loaded.tokenizer
    rows, tpos, tids, lookups, lasts = [], [], [], [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        if target is None:
            p, t = tok(prompt)["input_ids"], []
        else:
            p, t = continuation_ids(tok, prompt, target)
        seq = p + (t if include_last_target else t[:-1])
        rows.append(seq)
        tpos.append([len(p) - 1 + j for j in range(len(t))])
        tids.append(t)
        lasts.append(len(p) - 1)
        subj = subjects[i] if subjects is not None else None
        lookups.append(subject_last_index(tok, prompt, subj) if subj else -1)
    ids, mask = padded(rows, tok.pad_token_id, loaded.device)
    return Batch(ids, mask, tpos, tids, lookups, lasts)


def padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: ids and attention mask (len(rows), width) int64, made on `device`."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def logits_at(loaded: LoadedModel, batch: Batch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Next-token logits (n, vocab) float32 at (rows[i], cols[i]), computing the LM head only there; on the model's
    input device (`LoadedModel.device`), wherever a device map put the last layers and the head."""
    base = loaded.model.get_submodule(loaded.arch.base_model)
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (b, s, d)
    h = hidden[rows.to(hidden.device), cols.to(hidden.device)]                                          # (n, d)
    logits = loaded.model.get_submodule(loaded.arch.lm_head)(h)                                         # (n, vocab)
    scaling = getattr(loaded.model.config, "logits_scaling", None)  # Granite divides its logits by this
    if scaling:
        logits = logits / scaling
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float().to(loaded.device)


def best_other(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The largest log-prob (n,) in each row of `logp` (n, vocab) other than the one at `ids` (n,), from the
    top two of each row (no vocabulary-sized copy); differentiable like a max."""
    top2 = logp.topk(2, dim=1)                                                        # values, indices (n, 2)
    return torch.where(top2.indices[:, 0] == ids, top2.values[:, 1], top2.values[:, 0])


def target_index(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (row, col, token id) over every target token of the batch, on the batch's device."""
    rows, cols, ids = [], [], []
    for i, (pos, tid) in enumerate(zip(batch.target_pos, batch.target_ids)):
        rows.extend([i] * len(pos))
        cols.extend(pos)
        ids.extend(tid)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=batch.input_ids.device)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(ids)
