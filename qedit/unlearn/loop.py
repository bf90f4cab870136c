"""The training loop that GA, NPO and qforget share (and FT's retain term and hooks).

A method trains a dense change dW (out, in) of the MLP output weight at each chosen layer, seen by
the model through forward hooks (the weights are never changed), then `finish_delta` projects each
dW to low rank by SVD. The loss is a method's forget objective on the answer tokens of the facts
(and the tokens of the texts) to forget, evaluated in one or more *views* of dW (the full-precision
change, or the change after requantization), plus a retain term:

- retain_kl: KL(unedited || edited) of the next-token distributions at the retain answers' tokens;
- retain_nll: NLL of the retain answers;
- corpus_kl: KL to the unedited model on snippets of the statistics corpus (FT's retain term).

The retain items are the requests' own (their lines' locality prompts) plus the config's `retain`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qedit.core.batching import Batch, continuation_ids, logits_at, padded
from qedit.core.errors import QeditError
from qedit.core.hooks import edit_outputs
from qedit.core.model import LoadedModel
from qedit.edit.registry import EditResult, MethodConfig, finish_delta, resolve_layers
from qedit.edit.requant import dense_edits
from qedit.edit.retain import corpus_retain, kl_to
from qedit.unlearn.requests import ForgetRequest, RetainItem, check_retain_setting, default_retain

log = logging.getLogger(__name__)

__all__ = ["UnlearnConfig", "Targets", "RetainTerm", "View", "dense_edits", "forget_targets", "retain_targets",
           "corpus_retain", "train", "token_logprobs"]


@dataclass(frozen=True)
class UnlearnConfig(MethodConfig):
    """Settings GA, NPO and qforget share. layers=None: the architecture's default (multi-layer) edit layers."""

    steps: int = 30
    lr: float = 1e-4                       # Adam step on dW
    energy: float | None = 0.9             # low-rank projection keeps this share of dW's energy
    linf: float | None = None              # bound on every entry of dW (None: no bound)
    retain: tuple[RetainItem, ...] = ()    # a shared retain set, used besides each request's own retain items
    retain_kl: float = 1.0                 # weight of the KL to the unedited model at the retain answers
    retain_nll: float = 0.0                # weight of the retain answers' NLL
    corpus_kl: float = 0.0                 # weight of the KL on corpus snippets (0: off, no corpus needed)
    n_corpus: int = 16                     # corpus snippets
    corpus_len: int = 24                   # tokens per snippet
    stop_forgotten: bool = True            # stop once no fact's answer (first token) is top-1 any more
    drop_forgotten: bool = True            # a fact leaves the forget loss once its answer is no longer top-1

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.steps, int) or self.steps < 1:
            raise QeditError(f"{name}.steps: must be an integer >= 1, got {self.steps!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise QeditError(f"{name}.lr: must be a finite number > 0, got {self.lr!r}")
        if self.linf is not None and not self.linf > 0:
            raise QeditError(f"{name}.linf: must be > 0 or None, got {self.linf!r}")
        for key in ("retain_kl", "retain_nll", "corpus_kl"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QeditError(f"{name}.{key}: must be a finite number >= 0 (0 switches it off), got {value!r}")
        if self.n_corpus < 0 or self.corpus_len < 2:
            raise QeditError(f"{name}: n_corpus >= 0 and corpus_len >= 2 are required")
        check_retain_setting(f"{name}.retain", self.retain)


@dataclass
class Targets:
    """Teacher-forced token targets: a batch and, per scored token, its (row, col), id and sequence."""

    batch: Batch
    rows: torch.Tensor      # (n_tok,)
    cols: torch.Tensor      # (n_tok,)
    ids: torch.Tensor       # (n_tok,)
    owner: torch.Tensor     # (n_tok,) index of the sequence (fact or text) the token belongs to
    first: torch.Tensor     # (n_tok,) bool: first target token of a fact's answer
    n_seq: int
    fact: torch.Tensor      # (n_tok,) bool: the token belongs to a fact (not a text)


def _pack(loaded: LoadedModel, seqs: Sequence[tuple[list[int], list[int]]], facts: Sequence[bool]) -> Targets:
    """(prefix ids, target ids) per sequence -> a right-padded batch scoring each target token (every tensor on the
    model's input device)."""
    device = loaded.device
    ids, mask = padded([p + t[:-1] for p, t in seqs], loaded.tokenizer.pad_token_id, device)   # (b, s) each
    rows, cols, tids, owner, first, fact = [], [], [], [], [], []
    for i, ((p, t), is_fact) in enumerate(zip(seqs, facts)):
        for j, tok in enumerate(t):
            rows.append(i), cols.append(len(p) - 1 + j), tids.append(tok), owner.append(i)
            first.append(is_fact and j == 0)
            fact.append(is_fact)
    batch = Batch(ids, mask)
    long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    flags = lambda xs: torch.tensor(xs, dtype=torch.bool, device=device)  # noqa: E731
    return Targets(batch, long(rows), long(cols), long(tids), long(owner), flags(first), len(seqs), flags(fact))


def _text_ids(loaded: LoadedModel, text: str) -> tuple[list[int], list[int]]:
    ids = loaded.tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise QeditError(f"text to forget {text[:40]!r} has fewer than two tokens; give a longer text")
    return ids[:1], ids[1:]


def forget_targets(loaded: LoadedModel, requests: Sequence[ForgetRequest]) -> Targets:
    """The facts' answers after their prompts, then the texts (every token after the first)."""
    tok = loaded.tokenizer
    seqs = [continuation_ids(tok, r.prompt, r.answer) for r in requests if r.is_fact]
    facts = [True] * len(seqs)
    for r in requests:
        for text in r.texts:
            seqs.append(_text_ids(loaded, text))
            facts.append(False)
    if not seqs:
        raise QeditError("nothing to forget: give at least one fact or text")
    return _pack(loaded, seqs, facts)


def retain_targets(loaded: LoadedModel, items: Sequence[RetainItem]) -> Targets | None:
    if not items:
        return None
    seqs = [continuation_ids(loaded.tokenizer, x.prompt, x.answer) for x in items]
    return _pack(loaded, seqs, [True] * len(seqs))


def logits_with(loaded: LoadedModel, changes: Mapping[int, torch.Tensor], t: Targets) -> torch.Tensor:
    """Logits (n_tok, vocab) at t's scored tokens with dW = changes applied through hooks."""
    with edit_outputs(loaded.model, dense_edits(loaded, changes)):
        return logits_at(loaded, t.batch, t.rows, t.cols)


def token_logprobs(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """log P(target token) (n_tok,) from logits (n_tok, vocab)."""
    return F.log_softmax(logits, -1).gather(1, t.ids[:, None])[:, 0]


def seq_logprobs(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Summed log P per sequence (n_seq,)."""
    return logits.new_zeros(t.n_seq).index_add(0, t.owner, token_logprobs(logits, t))


def still_known(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per fact: its answer's first token is top-1 (n_facts,) bool."""
    return (logits[t.first].argmax(-1) == t.ids[t.first])


@torch.no_grad()
def active_sequences(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """(n_seq,) bool: facts whose answer's first token is still top-1, and every text."""
    active = torch.ones(t.n_seq, dtype=torch.bool, device=logits.device)
    active[t.owner[t.first]] = still_known(logits.detach(), t)
    return active


class RetainTerm:
    """The retain loss, with the unedited model's reference distributions computed once."""

    @torch.no_grad()
    def __init__(self, loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: UnlearnConfig) -> None:
        self.loaded, self.cfg = loaded, cfg
        self.items = items = default_retain(requests, cfg.retain)
        use = cfg.retain_kl > 0 or cfg.retain_nll > 0
        self.targets = retain_targets(loaded, items) if use else None
        self.ref = None if self.targets is None else F.log_softmax(logits_with(loaded, {}, self.targets), -1)
        self.corpus = corpus_retain(loaded, cfg.stats, cfg.n_corpus, cfg.corpus_len) if cfg.corpus_kl > 0 else None

    def loss(self, changes: Mapping[int, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.loaded.device)   # where the logits are (logits_at)
        if self.targets is not None and self.ref is not None:
            logits = logits_with(self.loaded, changes, self.targets)                 # (n_tok, vocab)
            if self.cfg.retain_kl > 0:
                total = total + self.cfg.retain_kl * kl_to(logits, self.ref)
            if self.cfg.retain_nll > 0:
                total = total - self.cfg.retain_nll * token_logprobs(logits, self.targets).mean()
        if self.corpus is not None:
            batch, rows, cols, ref = self.corpus
            with edit_outputs(self.loaded.model, dense_edits(self.loaded, changes)):
                logits = logits_at(self.loaded, batch, rows, cols)                  # (n_pos, vocab)
            total = total + self.cfg.corpus_kl * kl_to(logits, ref)
        return total


# A view of dW: the change the model sees (identity, or requantized with a straight-through gradient).
View = Callable[[Mapping[int, torch.Tensor]], Mapping[int, torch.Tensor]]
Objective = Callable[[torch.Tensor, Targets], torch.Tensor]      # forget logits (n_tok, vocab) -> loss
StopTest = Callable[[Sequence[torch.Tensor], Targets], bool]     # forget logits per view -> done?


def full_precision(changes: Mapping[int, torch.Tensor]) -> Mapping[int, torch.Tensor]:
    return changes


def all_forgotten(logits_per_view: Sequence[torch.Tensor], t: Targets) -> bool:
    """Done when no fact's first answer token is top-1 in any view (texts have no such test: never done)."""
    if not bool(t.first.any()):
        return False
    return not any(bool(still_known(lg.detach(), t).any()) for lg in logits_per_view)


def train(loaded: LoadedModel, layers: Sequence[int], cfg: UnlearnConfig, forget: Targets, retain: RetainTerm,
          objective: Objective, views: Sequence[View] = (full_precision,), stop: StopTest | None = None,
          masks: Mapping[int, torch.Tensor] | None = None, init: Mapping[int, torch.Tensor] | None = None,
          polish: int = 0, basis: Mapping[int, torch.Tensor] | None = None,
          desc: str = "unlearning") -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Adam on dW (out, in) per layer: objective summed over views + retain term, until `stop` holds.

    polish: steps to go on after `stop` first holds (the retain term keeps pulling dW back); the result
    is then the last dW at which `stop` held. masks: layer -> (out, in) 0/1, the entries dW may use
    (others keep their initial value). init: the starting dW (default 0). basis: layer -> B (r, in);
    then dW = A B and only A (out, r) is trained (init and masks then refer to A).
    Returns the trained dW per layer and training info.
    """
    def shape(layer: int) -> tuple[int, int]:
        out_dim, in_dim = loaded.edit_shape(layer)
        return (int(out_dim), int(basis[layer].shape[0]) if basis is not None else int(in_dim))

    params = {layer: (init[layer].detach().to(loaded.layer_device(layer), copy=True) if init and layer in init
                      else torch.zeros(shape(layer), device=loaded.layer_device(layer))).requires_grad_(True)
              for layer in layers}                                                                # (out, in) or (out, r)
    dense = (lambda: params) if basis is None else \
        (lambda: {layer: a @ basis[layer].to(a.device) for layer, a in params.items()})      # (out, in) per layer
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    info: dict[str, Any] = {"steps": 0, "stopped": False}
    best: dict[int, torch.Tensor] | None = None
    first_done: int | None = None
    for step in tqdm(range(cfg.steps + 1), desc=desc, unit="step", leave=False):
        opt.zero_grad()
        changes = dense()
        logits = [logits_with(loaded, view(changes), forget) for view in views]
        info["forget_loss"] = float(sum(float(objective(lg.detach(), forget)) for lg in logits))
        if stop is not None and stop(logits, forget):
            best = {layer: c.detach().clone() for layer, c in changes.items()}
            first_done = step if first_done is None else first_done
            info.update(stopped=True, done_at=step)
            if step - first_done >= polish:
                break
        if step == cfg.steps:
            break
        kept = retain.loss(changes)
        info["retain_loss"] = float(kept.detach())
        log.debug("%s step %d: forget %.4f retain %.4f", desc, step, info["forget_loss"], info["retain_loss"])
        loss = sum(objective(lg, forget) for lg in logits) + kept
        loss.backward()
        if masks is not None:
            for layer, p in params.items():
                p.grad.mul_(masks[layer].to(p.grad.device))
        opt.step()
        info["steps"] = step + 1
        if cfg.linf is not None:
            with torch.no_grad():
                for p in params.values():
                    p.clamp_(-cfg.linf, cfg.linf)
    log.info("%s: %d steps, forget loss %.4f, stopped=%s", desc, info["steps"], info["forget_loss"], info["stopped"])
    return best if best is not None else {layer: c.detach() for layer, c in dense().items()}, info


def unlearn(loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: UnlearnConfig, forget: Targets,
            objective: Objective, desc: str) -> EditResult:
    """GA's and NPO's whole run: train dW on the default (multi-layer) edit layers against `objective`
    plus the retain term, stop once every fact is forgotten (cfg.stop_forgotten), project to low rank."""
    layers = resolve_layers(loaded, cfg, multi_layer=True)
    retain = RetainTerm(loaded, requests, cfg)
    stop = all_forgotten if cfg.stop_forgotten else None
    changes, info = train(loaded, layers, cfg, forget, retain, objective, stop=stop, desc=desc)
    deltas = [finish_delta(loaded, layer, changes[layer], cfg, {"n_requests": len(requests)}) for layer in layers]
    return EditResult(deltas, {}, {"layers": list(layers), "n_retain": len(retain.items), **info})
