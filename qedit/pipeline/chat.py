"""`--chat` edits: each fact edited in the one-turn chat a chat front end sends the model, instead of its raw prompt.

The request's prompt becomes the chat text (the model's template, the fact's chat_prompt or else its prompt as the
user turn, the assistant's turn opened), so the edit's keys and targets read the subject in that context: the
template keeps the question's text, and the subject's last token is found in the formatted text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from qedit.core.chat import chat_prompt_text
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest


def chat_requests(tokenizer: Any, model: str, requests: Sequence[Any]) -> list[EditRequest]:
    """`requests` with each prompt replaced by its one-turn chat as the chat template of `tokenizer` (the model
    `model` names) formats it; a QeditError when the model has none, or when a fact's question does not contain its
    subject."""
    out = []
    for number, r in enumerate(requests, start=1):
        if not isinstance(r, EditRequest):
            raise QeditError("--chat edits facts; unlearning has no chat form")
        question = r.chat_question
        if r.subject not in question:
            raise QeditError(f"{r.origin or f'fact {number}'}: --chat edits each fact in its chat prompt, and the "
                             f"subject {r.subject!r} does not occur in {question!r}; name the subject in the chat_prompt")
        text = chat_prompt_text(tokenizer, question, model)
        out.append(dataclasses.replace(r, prompt=text))
    return out
