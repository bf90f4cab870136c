"""Keeping unrelated text: the unedited model's next-token distributions on snippets of the statistics corpus,
and the KL to them. FT's retain term, and unlearning's `corpus_kl`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qedit.core.batching import Batch, build_batch, logits_at
from qedit.core.model import LoadedModel
from qedit.core.stats import StatsConfig, corpus_tokens

_CORPUS_STRIDE = 6  # score every 6th position of a corpus snippet: the output layer (262k rows for Gemma) is costly


@torch.no_grad()
def corpus_retain(loaded: LoadedModel, stats: StatsConfig, n: int, length: int
                  ) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Corpus snippets, the positions scored on them (every 6th), and the unedited model's log-probs there."""
    if n == 0:
        return None
    tok = loaded.tokenizer
    texts = []
    for seq in corpus_tokens(loaded, stats)[:n]:
        body = [t for t in seq if t not in tok.all_special_ids][:length]
        text = tok.decode(body, skip_special_tokens=True).strip()
        if text:
            texts.append(text)
    if not texts:
        return None
    batch = build_batch(loaded, texts, [None] * len(texts))
    mask = batch.attention_mask.bool()                                                 # (b, s)
    mask[:, torch.arange(mask.shape[1], device=mask.device) % _CORPUS_STRIDE != _CORPUS_STRIDE - 1] = False
    rows, cols = mask.nonzero(as_tuple=True)
    ref = F.log_softmax(logits_at(loaded, batch, rows, cols), -1)                     # (n_pos, vocab)
    return batch, rows, cols, ref


def kl_to(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || softmax(logits)), mean over positions; logits, ref_logp (n, vocab)."""
    return F.kl_div(F.log_softmax(logits, -1), ref_logp, log_target=True, reduction="batchmean")
