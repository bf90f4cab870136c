"""The one-turn chat llama-cpp-python sends a GGUF model, formatted as its `Llama.create_chat_completion` does.

llama-cpp-python 0.3 (`Llama.__init__`, `llama_chat_format`) picks the chat format of a file from its
`tokenizer.chat_template`: a template equal to one of its built-in ones (ChatML, Llama 3, Mistral Instruct) is
formatted by that built-in Python formatter; any other is rendered with Jinja2 (`Jinja2ChatFormatter`: the file's
template, its BOS and EOS texts, `add_generation_prompt=True`). The text is then tokenized with special tokens
parsed, and a BOS is added only where the formatter says the text does not carry its own (`added_special`).
A file without a template would get llama-cpp-python's fallback, the Llama 2 format, which is not the model's:
qedit refuses it instead. (llama.cpp's C API `llama_chat_apply_template` matches templates against a fixed list
without Jinja; llama-cpp-python's chat completion does not use it, and neither does qedit.)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qedit.core.chat import no_template_error, user_turn
from qedit.core.errors import QeditError

# llama-cpp-python's chat format names that `guess_chat_format_from_gguf_metadata` returns -> their formatters
_BUILT_IN = {"chatml": "format_chatml", "llama-3": "format_llama3", "mistral-instruct": "format_mistral_instruct"}
DEFAULT_FORMAT = "chat_template.default"   # llama-cpp-python's name for the Jinja2 formatter of the file's template


def _token_text(vocab: Any, token: int) -> str:
    """A token's text as llama-cpp-python passes it to templates ("" for a missing token)."""
    import llama_cpp

    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8") if token >= 0 else ""


def chat_formatter(llm: Any, vocab: Any, model: str) -> Callable[[str], list[int]]:
    """user message -> the token ids `llm.create_chat_completion` would evaluate for a one-turn chat (llm: a
    llama_cpp.Llama built without chat_format or chat_handler, as qedit's runners build it). A QeditError naming
    `model` when the file has no chat template."""
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise no_template_error(model)
    name = llm.chat_format
    if name == DEFAULT_FORMAT:
        eos, bos = llm.token_eos(), llm.token_bos()
        formatter: Any = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=_token_text(vocab, eos), bos_token=_token_text(vocab, bos),
            add_generation_prompt=True, stop_token_ids=[eos])
    elif name in _BUILT_IN:
        formatter = getattr(llama_chat_format, _BUILT_IN[name])
    else:
        raise QeditError(f"{model}: llama-cpp-python chose the chat format {name!r} for this file, which qedit does not "
                         "reproduce; report it with the file's tokenizer.chat_template")

    def ids(question: str) -> list[int]:
        try:
            result = formatter(messages=user_turn(question))
        except Exception as exc:   # jinja2's TemplateError, or the template's own raise_exception
            raise QeditError(f"{model}: its chat template failed on a one-turn chat ({exc})") from exc
        return list(llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))

    return ids
