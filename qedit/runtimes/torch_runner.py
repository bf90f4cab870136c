"""Runners score continuations on a model in some runtime. The metrics in `qedit.evaluation.metrics` only
see this interface, so they do not know how an artifact was made or where it runs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from qedit.core.batching import build_batch, logits_at, target_index
from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel


@dataclass(frozen=True)
class TokenScore:
    """Teacher-forced scores of one target after one prompt."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]       # log P(target token | prefix), per token
    argmax_ids: tuple[int, ...]       # the runner's top-1 token at each target position

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(1, len(self.logprobs))

    @property
    def top1(self) -> bool:
        return self.argmax_ids == self.target_ids


class Runner(Protocol):
    name: str

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScore]:
        """Score each (prompt, target) pair."""

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        """Greedy continuation of `prompt`."""

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

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScore]:
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

    @torch.no_grad()
    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        tok = self.loaded.tokenizer
        enc = tok(prompt, return_tensors="pt").to(self.loaded.device)
        out = self.loaded.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def nll(self, text: str) -> tuple[float, int]:
        ids = self.loaded.tokenizer(text, return_tensors="pt")["input_ids"].to(self.loaded.device)  # (1, seq)
        if ids.shape[1] < 2:
            raise QeditError(f"text {text[:40]!r} has fewer than two tokens; perplexity needs a longer text")
        logits = self.loaded.model(input_ids=ids).logits[0, :-1].float()      # (seq - 1, vocab)
        logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])  # (seq - 1, 1)
        return float(-logp.sum()), int(ids.shape[1] - 1)

    def describe(self) -> dict[str, str]:
        return {"runner": self.name, "torch": torch.__version__, "model": str(self.loaded.source),
                "dtype": str(next(self.loaded.model.parameters()).dtype)}
