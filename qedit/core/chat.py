"""One-turn chats with a model's chat template, as transformers applies it (`apply_chat_template` with
`add_generation_prompt=True`): what a chat front end sends the model when a user asks one question.

The formatted text holds the template's own special tokens (a BOS, turn markers); it is tokenized as
transformers' `apply_chat_template(tokenize=True)` does, without adding special tokens. llama.cpp's side (the
template llama-cpp-python applies to a GGUF) is `qedit.runtimes.llama_chat`.
"""
from __future__ import annotations

import logging
from typing import Any

from qedit.core.errors import QeditError

log = logging.getLogger(__name__)


def user_turn(question: str) -> list[dict[str, str]]:
    """The messages of a one-turn chat: the user asks `question`."""
    return [{"role": "user", "content": question}]


def no_template_error(model: str) -> QeditError:
    return QeditError(f"{model}: the model has no chat template, so --chat cannot ask it anything as a chat; use a chat "
                      "(instruction-tuned) model whose tokenizer or GGUF carries one (tokenizer.chat_template), or "
                      "leave --chat out")


def render_chat(tokenizer: Any, question: str, model: str) -> str:
    """The one-turn chat text for `question`, ending with the template's generation prompt (the assistant's turn
    opened); a QeditError naming `model` when its tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise no_template_error(model)
    try:
        text = tokenizer.apply_chat_template(user_turn(question), tokenize=False, add_generation_prompt=True)
    except Exception as exc:   # jinja2's TemplateError, or the template's own raise_exception
        raise QeditError(f"{model}: its chat template failed on a one-turn chat ({exc})") from exc
    if not isinstance(text, str):
        raise QeditError(f"{model}: its chat template did not render text")
    return text


def chat_ids(tokenizer: Any, question: str, model: str) -> list[int]:
    """Token ids of the one-turn chat, as `apply_chat_template(..., tokenize=True)` gives them."""
    return list(tokenizer(render_chat(tokenizer, question, model), add_special_tokens=False)["input_ids"])


def chat_prompt_text(tokenizer: Any, question: str, model: str) -> str:
    """The one-turn chat as a plain prompt: text that the tokenizer's usual call (BOS added where it adds one)
    turns into the chat's own ids. The template's leading BOS text is left out when the tokenizer adds a BOS
    itself; where no text gives the chat's ids exactly (a template without a BOS for a tokenizer that adds one),
    the closest is used and a warning says so."""
    text = render_chat(tokenizer, question, model)
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token", None)
    candidates = ([text[len(bos):]] if bos and text.startswith(bos) else []) + [text]
    for candidate in candidates:
        if list(tokenizer(candidate)["input_ids"]) == want:
            return candidate
    log.warning("%s: the chat text %r gets a BOS its template does not put there when tokenized as a prompt",
                model, candidates[0][:60])
    return candidates[0]
