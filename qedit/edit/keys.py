"""Pieces the locate-then-edit methods share: context prefixes, edit keys, applying deltas on the fly."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch

from qedit.core.batching import build_batch
from qedit.core.delta import LowRankDelta, combine
from qedit.core.facts import EditRequest
from qedit.core.hooks import OutputEdit, add_at_positions, at_positions, edit_outputs, record, stop_after
from qedit.core.model import LoadedModel
from qedit.core.stats import corpus_tokens
from qedit.edit.registry import MethodConfig

ROWS_PER_FORWARD = 64


def context_prefixes(loaded: LoadedModel, cfg: MethodConfig) -> list[str]:
    """The bare prompt plus short prefixes cut from the statistics corpus (ROME's context templates)."""
    n, length = cfg.target.n_prefixes, cfg.target.prefix_len
    if n == 0:
        return [""]
    tok = loaded.tokenizer
    prefixes = [""]
    for seq in corpus_tokens(loaded, cfg.stats)[:n]:
        body = [t for t in seq if t not in tok.all_special_ids][:length]
        text = tok.decode(body, skip_special_tokens=True).replace("\n", " ").strip()
        prefixes.append(f"{text}. " if text else "")
    return prefixes


def low_rank_edit(delta: LowRankDelta) -> OutputEdit:
    """An OutputEdit that adds delta's change: out += scale * (x b^T) a^T, x the module input (the factors moved to
    its device)."""
    a, b, scale = delta.a, delta.b, delta.scale

    def fn(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # inp (..., d_in), out (..., d_out)
        to = dict(device=inp.device, dtype=inp.dtype)
        return out + scale * ((inp @ b.t().to(**to)) @ a.t().to(**to))

    return fn


def delta_edits(loaded: LoadedModel, deltas: Sequence[LowRankDelta]) -> dict[str, OutputEdit]:
    """Hooks that make a forward pass see `deltas` applied, without touching the weights."""
    by_module = {}
    for d in combine(deltas):
        by_module[loaded.arch.mlp_out.format(d.layer)] = low_rank_edit(d)
    return by_module


@torch.no_grad()
def site_values_many(loaded: LoadedModel, requests: Sequence[EditRequest], sites: Sequence[tuple[str, str]],
                     prefixes: Sequence[str], applied: Sequence[LowRankDelta] = (),
                     inject: tuple[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """For each (module, "input"|"output") site, its value at each request's subject-last token,
    averaged over prefixes, from one forward pass per chunk. Returns [(n_requests, dim)] per site.

    inject=(module, vectors (n_requests, dim)) adds each request's vector to that module's output
    at its subject-last token. The forward stops after the last site's module (sites in forward order).
    """
    texts = [pre + r.prompt for r in requests for pre in prefixes]
    subjects = [r.subject for r in requests for _ in prefixes]
    collected: list[list[torch.Tensor]] = [[] for _ in sites]
    for lo in range(0, len(texts), ROWS_PER_FORWARD):
        chunk = texts[lo:lo + ROWS_PER_FORWARD]
        batch = build_batch(loaded, chunk, [None] * len(chunk), subjects[lo:lo + ROWS_PER_FORWARD])
        with ExitStack() as stack:
            device = batch.input_ids.device
            rows = torch.arange(len(batch.lookup), device=device)
            cols = torch.tensor(batch.lookup, device=device)
            stack.enter_context(edit_outputs(loaded.model, delta_edits(loaded, applied)))
            if inject is not None:  # registered after the deltas, so it sees their output
                owner = torch.arange(lo, lo + len(chunk), device=inject[1].device) // len(prefixes)   # (rows,)
                stack.enter_context(edit_outputs(loaded.model, {inject[0]: add_at_positions(inject[1][owner], rows, cols)}))
            recs = [stack.enter_context(record(loaded.model, [m], kind)) for m, kind in sites]
            stack.enter_context(stop_after(loaded.model, sites[-1][0]))
            loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for out, rec, (m, _) in zip(collected, recs, sites):
            out.append(at_positions(rec[m], rows, cols).float())                    # (rows, dim)
    return [torch.cat(c).view(len(requests), len(prefixes), -1).mean(1) for c in collected]


def site_values(loaded: LoadedModel, requests: Sequence[EditRequest], module: str, kind: str,
                prefixes: Sequence[str], applied: Sequence[LowRankDelta] = (),
                inject: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One site's value at each request's subject-last token, averaged over prefixes: (n, dim)."""
    return site_values_many(loaded, requests, [(module, kind)], prefixes, applied, inject)[0]


def edit_keys(loaded: LoadedModel, requests: Sequence[EditRequest], layer: int, prefixes: Sequence[str],
              applied: Sequence[LowRankDelta] = ()) -> torch.Tensor:
    """Keys k* (n, d_in): inputs of the layer's MLP output projection at the subject's last token."""
    return site_values(loaded, requests, loaded.arch.mlp_out.format(layer), "input", prefixes, applied)
