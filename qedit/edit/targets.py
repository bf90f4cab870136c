"""Target optimisation (ROME's v*, MEMIT's z): the vector that, added to a module's output at the
subject's last token, reaches the request's objective, with a KL term that keeps the subject's other
properties and a norm bound. The objective is data: `REACH_TARGET` (the edits') makes the model answer
target_new; unlearning passes its own (`qedit.unlearn.objectives`), e.g. pushing the answer to erase
below the best other token.

Requests are optimised together in chunks (one batch per step); the layers under the site run once per
chunk, not per step (`qedit.core.hooks.replay`). For an objective whose edit is scaled to a margin afterwards
(`minimal_strength`, the edits' own), each request leaves the optimisation once its own loss is below the
threshold: its target is the one it would get alone (to float rounding), the forward runs on fewer rows as
requests finish, and what the others' extra steps would add is scaled away anyway. For any other objective
(unlearning's) the chunk stops once all of its requests are below the threshold, so a target depends on its
chunk-mates: the extra steps are the only margin such a target gets beyond the threshold."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qedit.core.batching import Batch, build_batch, logits_at, target_index
from qedit.core.delta import LowRankDelta
from qedit.core.facts import EditRequest
from qedit.core.hooks import OutputEdit, add_at_positions, at_positions, edit_outputs, record, record_whole, replay
from qedit.core.model import LoadedModel
from qedit.edit.keys import delta_edits
from qedit.edit.registry import TargetConfig
from qedit.edit.target_cache import TargetCache

log = logging.getLogger(__name__)


class TargetObjective(Protocol):
    """What a target must achieve, as a loss per scored target token (0 where it is met)."""

    name: str                    # "NLL", "hinge", ...: for logs
    first_token_only: bool       # score only the first token of each target
    minimal_strength: bool       # an edit towards it may be scaled down to a margin (qedit.edit.strength)
    contrast: bool               # token_loss gets contrast ids: the first token of each request's ground_truth
    paraphrases: bool            # also optimised on the request's rephrase prompts that hold the subject

    def token_loss(self, logp_all: torch.Tensor, t_ids: torch.Tensor,
                   contrast_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logp_all (n_t, vocab) log-probs at the scored positions, t_ids (n_t,) -> loss (n_t,). With `contrast`
        (first_token_only): contrast_ids (n_t,), the first token of the row's ground_truth there (-1: none)."""

    def cache_tag(self) -> dict[str, float]:
        """What the target cache key adds for this objective ({} for the edits' own)."""


@dataclass(frozen=True)
class ReachTarget:
    """The edits' objective: the NLL of target_new, every token."""

    name: str = "NLL"
    first_token_only: bool = False
    minimal_strength: bool = True
    contrast: bool = False
    paraphrases: bool = False

    def token_loss(self, logp_all: torch.Tensor, t_ids: torch.Tensor,
                   contrast_ids: torch.Tensor | None = None) -> torch.Tensor:
        return -logp_all.gather(1, t_ids[:, None])[:, 0]                                   # (n_t,)

    def cache_tag(self) -> dict[str, float]:
        return {}


REACH_TARGET = ReachTarget()


@dataclass
class _Rows:
    """The forward batch of the requests still optimised: every row belongs to one of them (`owner`, an index
    into the active requests); the text rows first, then one KL row per request, in request order."""

    batch: Batch                 # ids, mask (rows, seq)
    owner: torch.Tensor          # (rows,)
    lookup: torch.Tensor         # (rows,) the subject's last token
    q_rows: torch.Tensor         # (n_t + n,) the scored target tokens' rows, then the KL rows
    q_cols: torch.Tensor         # (n_t + n,)
    t_ids: torch.Tensor          # (n_t,)
    contrast: torch.Tensor | None  # (n_t,)
    under: object                # the output of the layer under the site on these rows, for `replay`

    def keep(self, keep: torch.Tensor) -> _Rows:
        """The rows of the requests `keep` (bool (n,)), renumbered."""
        rows = keep[self.owner]                                                          # (rows,) bool
        renum = torch.cumsum(rows.long(), 0) - 1                                         # old row -> new row
        t = rows[self.q_rows]                                                            # (n_t + n,) bool
        n_t = len(self.t_ids)
        width = int(self.batch.attention_mask[rows].sum(1).max())   # right-padded: trailing columns drop out
        under = self.under
        if under is not None:
            first = under[0] if isinstance(under, tuple) else under
            sub = first[rows.to(first.device), :width]                                   # (rows', width, d)
            under = (sub, *under[1:]) if isinstance(under, tuple) else sub
        return _Rows(Batch(self.batch.input_ids[rows, :width], self.batch.attention_mask[rows, :width]),
                     (torch.cumsum(keep.long(), 0) - 1)[self.owner[rows]], self.lookup[rows],
                     renum[self.q_rows[t]], self.q_cols[t], self.t_ids[t[:n_t]],
                     None if self.contrast is None else self.contrast[t[:n_t]], under)


def _chunk_targets(loaded: LoadedModel, reqs: Sequence[EditRequest], site: str, prefixes: Sequence[str],
                   cfg: TargetConfig, applied: Sequence[LowRankDelta],
                   objective: TargetObjective) -> tuple[torch.Tensor, list[float]]:
    n = len(reqs)
    # per request, its prompt (and, for an objective that asks, its paraphrases with the subject) after each prefix
    rows = [(i, pre + q) for i, r in enumerate(reqs) for q in _prompts(r, objective) for pre in prefixes]
    n_rows = len(rows)
    texts = [t for _, t in rows] + [f"{r.subject} is a" for r in reqs]
    targets: list[str | None] = [reqs[i].target_new for i, _ in rows] + [None] * n
    subjects = [reqs[i].subject for i, _ in rows] + [r.subject for r in reqs]
    batch = build_batch(loaded, texts, targets, subjects)
    device = batch.input_ids.device      # the indices, the logits and the losses: the model's input device
    owner = torch.tensor([i for i, _ in rows] + list(range(n)), device=device)                        # (rows,)
    lookup = torch.tensor(batch.lookup, device=device)
    t_rows, t_cols, t_ids = target_index(batch)
    if objective.first_token_only:
        first = torch.ones_like(t_rows, dtype=torch.bool)
        first[1:] = t_rows[1:] != t_rows[:-1]
        t_rows, t_cols, t_ids = t_rows[first], t_cols[first], t_ids[first]
    contrast_ids = _contrast_ids(loaded, reqs, rows, t_rows) if objective.contrast else None          # (n_t,)
    kl_rows = torch.arange(n_rows, n_rows + n, device=device)
    kl_cols = torch.tensor([batch.last[i] for i in kl_rows.tolist()], device=device)
    q_rows, q_cols = torch.cat([t_rows, kl_rows]), torch.cat([t_cols, kl_cols])
    n_t = len(t_rows)

    base_edits: dict[str, OutputEdit] = delta_edits(loaded, applied)
    # The steps change nothing below the site's layer: the layers under it run once, here, and are replayed
    below = [loaded.arch.layer.format(i) for i in range(loaded.layer_of(site) or 0)]
    with (torch.no_grad(), edit_outputs(loaded.model, base_edits), record(loaded.model, [site], "output") as rec,
          record_whole(loaded.model, below[-1]) if below else nullcontext([None]) as under):
        logits = logits_at(loaded, batch, q_rows, q_cols)
        ref_kl = F.log_softmax(logits[n_t:], dim=-1)                                     # (n, vocab)
        orig = at_positions(rec[site], kl_rows, lookup[kl_rows]).float()                 # (n, d), at the site's device
    orig_norm = orig.norm(dim=-1).clamp(min=1e-6)                                        # (n,)
    full = _Rows(Batch(batch.input_ids, batch.attention_mask), owner, lookup, q_rows, q_cols, t_ids, contrast_ids,
                 under[0])

    # Optimise in units of the site's RMS, so one learning rate fits sites of very different
    # scale (an MLP output near 0.1 per coordinate, Gemma's residual stream near 250).
    unit = (orig_norm / orig.shape[1] ** 0.5)[:, None]                                  # (n, 1)
    theta = torch.zeros_like(orig, requires_grad=True)                                   # (n, d)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    nll_final = torch.zeros(n, device=device)
    # A request leaves the optimisation once its own objective is met (with minimal strength; see the module's
    # docstring); the forward runs on the rows of the requests still in it
    active = torch.ones(n, dtype=torch.bool, device=device)
    cur = full
    for _step in range(cfg.steps):
        opt.zero_grad()
        delta = (theta * unit)[active.to(theta.device)]                                  # (a, d)
        inject = add_at_positions(delta[cur.owner.to(delta.device)], torch.arange(len(cur.owner), device=device),
                                  cur.lookup)
        # hooks on one module chain in registration order: the applied deltas first, then the injection; the
        # layers are swapped out last (their hooks do not run: the replayed output holds what they did)
        with (edit_outputs(loaded.model, base_edits), edit_outputs(loaded.model, {site: inject}),
              replay(loaded.model, below, cur.under)):
            logits = logits_at(loaded, cur.batch, cur.q_rows, cur.q_cols)
        n_ta = len(cur.t_ids)
        logp_all = F.log_softmax(logits[:n_ta], dim=-1)                                  # (n_t', vocab)
        token_loss = objective.token_loss(logp_all, cur.t_ids, cur.contrast)             # (n_t',)
        tok_owner = cur.owner[cur.q_rows[:n_ta]]                                         # (n_t',)
        n_a = int(active.sum())
        counts = torch.bincount(tok_owner, minlength=n_a).clamp(min=1).float()           # (a,)
        nll_per = torch.zeros(n_a, device=device).index_add(0, tok_owner, token_loss) / counts  # (a,) mean over tokens, prefixes
        kl = F.kl_div(F.log_softmax(logits[n_ta:], dim=-1), ref_kl[active], log_target=True,
                      reduction="none").sum(-1)                                          # (a,)
        decay = ((delta.norm(dim=-1) / orig_norm[active.to(orig_norm.device)]) ** 2).to(device)
        nll_final[active] = nll_per.detach()
        met = nll_per.detach() < cfg.stop_nll                                            # (a,)
        if bool(met.all()):
            break
        if not objective.minimal_strength:
            met.zero_()           # the chunk goes on together: the extra steps are all the margin such a target gets
        loss = (nll_per + cfg.kl_factor * kl + cfg.weight_decay * decay)[~met].sum()
        loss.backward()
        with torch.no_grad():
            if bool(met.any()):
                active[active.clone()] = ~met
                cur = full.keep(active)
            still = active.to(theta.device)
            kept = theta[~still].clone()              # Adam's momentum must not move a finished request's target
        opt.step()
        with torch.no_grad():
            limit = cfg.clamp_norm * orig.shape[1] ** 0.5                                # in units: ||theta|| bound
            scale = (limit / theta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
            theta.mul_(scale[:, None])
            theta[~still] = kept
    return (theta * unit).detach(), nll_final.tolist()


def _prompts(r: EditRequest, objective: TargetObjective) -> tuple[str, ...]:
    extra = tuple(q for q in r.rephrase_prompts if r.subject in q) if objective.paraphrases else ()
    return (r.prompt,) + extra


def _contrast_ids(loaded: LoadedModel, reqs: Sequence[EditRequest], rows: Sequence[tuple[int, str]],
                  t_rows: torch.Tensor) -> torch.Tensor:
    """(n_t,) the first token of each scored row's ground_truth after its text (-1 where it has none)."""
    have = [(j, reqs[i].ground_truth) for j, (i, _) in enumerate(rows) if reqs[i].ground_truth is not None]
    first = [-1] * len(rows)
    if have:
        batch = build_batch(loaded, [rows[j][1] for j, _ in have], [g for _, g in have])
        for (j, _), ids in zip(have, batch.target_ids):
            first[j] = ids[0]
    return torch.tensor(first, dtype=torch.long, device=t_rows.device)[t_rows]


def optimize_targets(loaded: LoadedModel, requests: Sequence[EditRequest], site: str, prefixes: Sequence[str],
                     cfg: TargetConfig, applied: Sequence[LowRankDelta] = (),
                     cache_dir: Path | None = None, objective: TargetObjective = REACH_TARGET
                     ) -> tuple[torch.Tensor, list[float]]:
    """delta (n, d) to add to `site`'s output at each request's subject-last token (on the model's input device),
    and the final losses of `objective` per request (NLLs for the edits' own).

    With cache_dir, targets computed on the model as it is (no applied deltas) are read from and
    written to that directory (qedit.edit.target_cache)."""
    cache = TargetCache(cache_dir if not applied else None, loaded, site, prefixes, cfg, objective.cache_tag())
    parts, nlls, hits = [], [], 0
    for lo in tqdm(range(0, len(requests), cfg.chunk), desc="optimising targets", unit="chunk", leave=False):
        chunk = list(requests[lo:lo + cfg.chunk])
        found = cache.get(chunk)
        if found is None:
            found = _chunk_targets(loaded, chunk, site, prefixes, cfg, applied, objective)
            cache.put(chunk, *found)
        else:
            hits += len(chunk)
        parts.append(found[0].to(loaded.device))   # cached targets are read to the CPU
        nlls.extend(found[1])
    if hits:
        log.info("%d of %d targets from the cache %s", hits, len(requests), cache.dir)
    log.info("target %s after optimisation: mean %.3f, max %.3f", objective.name,
             sum(nlls) / len(nlls), max(nlls))
    return torch.cat(parts), nlls                                                        # (n, d)
