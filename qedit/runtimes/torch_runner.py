"""Runners score continuations on a model in some runtime. The metrics in `qedit.evaluation.metrics` only
see this interface, so they do not know how an artifact was made or where it runs."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from transformers import GenerationConfig

from qedit.core.batching import build_batch, is_marker_token, logits_at, target_index
from qedit.core.chat import chat_ids, no_template_error
from qedit.core.errors import QeditError
from qedit.core.linalg import draw_tokens
from qedit.core.model import LoadedModel

# A generated continuation may run this many tokens past its target's length: room for a leading article
# ("the Rome"), another split of the same word, and the character after the answer.
GEN_EXTRA_TOKENS = 3


@dataclass(frozen=True)
class TokenScore:
    """Teacher-forced scores of one target after one prompt."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]       # log P(target token | prefix), per token
    argmax_ids: tuple[int, ...]       # the runner's top-1 token at each target position
    continuation: str | None = None   # when asked: the greedy continuation of the prompt (`Runner.score`)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(1, len(self.logprobs))

    @property
    def top1(self) -> bool:
        return self.argmax_ids == self.target_ids


def prompt_seed(seed: int, prompt: str) -> int:
    """The seed of one prompt's samples: from `seed` and the prompt's text, so that a prompt draws the same
    random numbers whatever else is sampled with it, and every model (rung) is sampled with the same ones."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:4], "little")


def check_sampling(n: int, temperature: float) -> None:
    if n < 1 or not temperature > 0.0:
        raise QeditError(f"sampling needs n >= 1 samples and a temperature > 0, got n={n}, temperature={temperature}")


class Runner(Protocol):
    name: str

    def score(self, pairs: Sequence[tuple[str, str]], generate: Sequence[bool] | None = None) -> list[TokenScore]:
        """Score each (prompt, target) pair; where `generate[i]`, its TokenScore also carries the greedy
        continuation of the prompt, at most the target's token count + GEN_EXTRA_TOKENS tokens long."""

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        """Greedy continuation of `prompt`, at most `max_tokens` tokens. Every runner's continuation ends
        before the first special token (end of text, a control token, a marker such as <start_of_image>)
        and is decoded without special tokens."""

    def chat(self, items: Sequence[tuple[str, int]]) -> list[str]:
        """The assistant's greedy reply to each (user message, max_tokens) asked as a one-turn chat, formatted
        with the model's chat template as this runtime applies it (the generation prompt added), ending and
        decoded as `complete` does. A QeditError when the model has no chat template (empty `items`: only that
        check)."""

    def sample(self, items: Sequence[tuple[str, int]], n: int, temperature: float, seed: int) -> list[list[str]]:
        """`n` sampled continuations of each (prompt, max_tokens), drawn from softmax(logits / temperature) over the
        whole vocabulary (no top-k or top-p), each ending and decoded as `complete`'s; a prompt's draws are seeded
        by `prompt_seed(seed, prompt)`, so the same call gives the same texts."""

    def nll(self, text: str) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of `text`'s tokens after BOS, and their count."""

    def describe(self) -> dict[str, str]:
        """Runner name, runtime versions and the artifact it runs, for reports."""


class TorchRunner:
    """Runs a `LoadedModel` in torch (full precision, or whatever dtype it was loaded in)."""

    name = "torch"

    def __init__(self, loaded: LoadedModel, batch_size: int = 32) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        self._stop: frozenset[int] | None = None

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]], generate: Sequence[bool] | None = None) -> list[TokenScore]:
        out = self._score(pairs)
        asked = [i for i, g in enumerate(generate or ()) if g]
        texts = self.generate([(pairs[i][0], len(out[i].target_ids) + GEN_EXTRA_TOKENS) for i in asked])
        for i, text in zip(asked, texts):
            out[i] = replace(out[i], continuation=text)
        return out

    def _score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScore]:
        out: list[TokenScore] = []
        for lo in range(0, len(pairs), self.batch_size):
            chunk = pairs[lo:lo + self.batch_size]
            batch = build_batch(self.loaded, [p for p, _ in chunk], [t for _, t in chunk])
            rows, cols, ids = target_index(batch)
            logp = torch.log_softmax(logits_at(self.loaded, batch, rows, cols), dim=-1)   # (n_tokens, vocab)
            tok_lp = logp.gather(1, ids[:, None])[:, 0].tolist()
            tok_arg = logp.argmax(-1).tolist()
            pos = 0
            for tids in batch.target_ids:
                n = len(tids)
                out.append(TokenScore(tuple(tids), tuple(tok_lp[pos:pos + n]), tuple(tok_arg[pos:pos + n])))
                pos += n
        return out

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        return self.generate([(prompt, max_tokens)])[0]

    def generate(self, items: Sequence[tuple[str, int]]) -> list[str]:
        """Greedy continuations of (prompt, max_tokens) items, `batch_size` left-padded prompts at a time."""
        tok = self.loaded.tokenizer
        return self._generate([(tok(p)["input_ids"], n) for p, n in items])

    def chat(self, items: Sequence[tuple[str, int]]) -> list[str]:
        tok, model = self.loaded.tokenizer, str(self.loaded.source)
        if not getattr(tok, "chat_template", None):
            raise no_template_error(model)
        return self._generate([(chat_ids(tok, question, model), n) for question, n in items])

    @torch.no_grad()
    def _generate(self, items: Sequence[tuple[list[int], int]]) -> list[str]:
        """Greedy continuations of (prompt ids, max_tokens) items, `batch_size` left-padded prompts at a time."""
        tok, out = self.loaded.tokenizer, []
        stop = self._stop_ids()
        for lo in range(0, len(items), self.batch_size):
            chunk = items[lo:lo + self.batch_size]
            ids = [x for x, _ in chunk]
            width = max(len(x) for x in ids)
            device = self.loaded.device
            batch = torch.tensor([[tok.pad_token_id] * (width - len(x)) + list(x) for x in ids], dtype=torch.long,
                                 device=device)                                          # (b, width), left-padded
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long, device=device)
            cfg = GenerationConfig(max_new_tokens=max(n for _, n in chunk), do_sample=False, eos_token_id=sorted(stop),
                                   pad_token_id=tok.pad_token_id)
            new = self.loaded.model.generate(input_ids=batch, attention_mask=mask,
                                             generation_config=cfg)[:, width:].tolist()    # (b, <= max_new_tokens)
            for row, (_, n) in zip(new, chunk):
                kept = next((row[:j] for j, t in enumerate(row[:n]) if t in stop), row[:n])
                out.append(tok.decode(kept, skip_special_tokens=True))
        return out

    @torch.no_grad()
    def sample(self, items: Sequence[tuple[str, int]], n: int, temperature: float, seed: int) -> list[list[str]]:
        """The `n` samples of one prompt are one batch, decoded with the KV cache; each token drawn by inverse CDF
        (`qedit.core.linalg.draw_tokens`) from a CPU generator seeded by `prompt_seed(seed, prompt)`."""
        check_sampling(n, temperature)
        tok, model, stop = self.loaded.tokenizer, self.loaded.model, self._stop_ids()
        out = []
        for prompt, max_tokens in items:
            generator = torch.Generator().manual_seed(prompt_seed(seed, prompt))
            ids = torch.tensor([tok(prompt)["input_ids"]] * n, dtype=torch.long, device=self.loaded.device)  # (n, seq)
            cache, drawn = None, []
            for _ in range(max_tokens):
                res = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = res.cache
                logits = res.logits[:, -1].float() / temperature                      # (n, vocab)
                ids = draw_tokens(logits, generator).to(self.loaded.device)          # (n, 1)
                drawn.append(ids)
            rows = torch.cat(drawn, dim=1).tolist() if drawn else [[] for _ in range(n)]   # (n, max_tokens)
            out.append([tok.decode(next((row[:j] for j, t in enumerate(row) if t in stop), row), skip_special_tokens=True)
                        for row in rows])
        return out

    def _stop_ids(self) -> frozenset[int]:
        """Ids a continuation ends before: the tokenizer's special tokens, end-of-text ids and markers."""
        if self._stop is None:
            tok: Any = self.loaded.tokenizer
            eos = self.loaded.model.generation_config.eos_token_id if self.loaded.model.generation_config else None
            ids = set(tok.all_special_ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            ids |= {i for i, t in tok.added_tokens_decoder.items() if t.special or is_marker_token(t.content)}
            self._stop = frozenset(i for i in ids if i is not None)
        return self._stop

    @torch.no_grad()
    def nll(self, text: str) -> tuple[float, int]:
        ids = torch.tensor([self.loaded.tokenizer(text)["input_ids"]], dtype=torch.long, device=self.loaded.device)  # (1, seq)
        if ids.shape[1] < 2:
            raise QeditError(f"text {text[:40]!r} has fewer than two tokens; perplexity needs a longer text")
        logits = self.loaded.model(input_ids=ids).logits[0, :-1].float()      # (seq - 1, vocab)
        logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None].to(logits.device))  # (seq - 1, 1)
        return float(-logp.sum()), int(ids.shape[1] - 1)

    def describe(self) -> dict[str, str]:
        return {"runner": self.name, "torch": torch.__version__, "model": str(self.loaded.source),
                "dtype": str(next(self.loaded.model.parameters()).dtype)}
