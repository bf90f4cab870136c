"""Key statistics C = E[k k^T] at edit layers, and the text they come from.

The keys k are the inputs of a layer's MLP output projection, one per token. The corpus is a
text file the user gives or, by default, text sampled from the model itself (so nothing is ever
downloaded). Both the sampled text and the statistics are cached on disk, keyed by the model's
fingerprint, the corpus, the layer and the sample count.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from qedit.errors import QeditError
from qedit.hooks import record, stop_after
from qedit.io_utils import atomic_path
from qedit.model import LoadedModel

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QEDIT_CACHE", Path.home() / ".cache" / "qedit"))


@dataclass(frozen=True)
class StatsConfig:
    """Where keys come from and how many."""

    n_samples: int = 64           # text sequences
    sample_len: int = 64          # tokens per sampled sequence (or per corpus chunk)
    corpus: Path | None = None    # plain-text file; None = sample text from the model
    seed: int = 0
    batch_size: int = 64
    cache_dir: Path | None = None  # None = $QEDIT_CACHE or ~/.cache/qedit
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.sample_len < 4 or self.batch_size < 1:
            raise ValueError("StatsConfig: n_samples >= 1, sample_len >= 4 and batch_size >= 1 are required")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise QeditError(f"{self.corpus}: corpus file not found; give a plain-text file or omit --corpus")

    def root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


def _corpus_key(cfg: StatsConfig) -> str:
    if cfg.corpus is None:
        return f"self-s{cfg.seed}-n{cfg.n_samples}-l{cfg.sample_len}"
    digest = hashlib.sha256(Path(cfg.corpus).read_bytes()).hexdigest()[:16]
    return f"file-{digest}-n{cfg.n_samples}-l{cfg.sample_len}"


def _cache_dir(loaded: LoadedModel, cfg: StatsConfig) -> Path:
    return cfg.root() / loaded.fingerprint[:20] / _corpus_key(cfg)


@torch.no_grad()
def _sample_from_model(loaded: LoadedModel, cfg: StatsConfig) -> list[list[int]]:
    """cfg.n_samples token sequences sampled from the model, starting from BOS."""
    tok = loaded.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for lo in tqdm(range(0, cfg.n_samples, cfg.batch_size), desc="sampling corpus", unit="batch", leave=False):
            n = min(cfg.batch_size, cfg.n_samples - lo)
            ids = torch.full((n, 1), start, dtype=torch.long, device=loaded.device)
            out = loaded.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                max_new_tokens=cfg.sample_len - 1, min_new_tokens=cfg.sample_len - 1,
                pad_token_id=tok.pad_token_id, eos_token_id=None,
            )
            seqs.extend(out.tolist())
    return seqs


def _chunk_corpus(loaded: LoadedModel, cfg: StatsConfig) -> list[list[int]]:
    text = Path(cfg.corpus).read_text(encoding="utf-8", errors="replace")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    body = cfg.sample_len - 1
    if len(ids) < body:
        raise QeditError(f"{cfg.corpus}: corpus has {len(ids)} tokens, fewer than one sample of {cfg.sample_len}")
    start = loaded.tokenizer.bos_token_id
    chunks = [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)][: cfg.n_samples]
    return [([start] if start is not None else []) + c for c in chunks]


def corpus_tokens(loaded: LoadedModel, cfg: StatsConfig) -> list[list[int]]:
    """The token sequences the statistics are computed on (cached for sampled text)."""
    path = _cache_dir(loaded, cfg) / "tokens.json"
    if cfg.use_cache and path.is_file():
        return json.loads(path.read_text())
    seqs = _sample_from_model(loaded, cfg) if cfg.corpus is None else _chunk_corpus(loaded, cfg)
    if cfg.use_cache:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(seqs))
    return seqs


def corpus_texts(loaded: LoadedModel, cfg: StatsConfig) -> list[str]:
    return [loaded.tokenizer.decode(s, skip_special_tokens=True) for s in corpus_tokens(loaded, cfg)]


@torch.no_grad()
def _compute(loaded: LoadedModel, layers: Sequence[int], cfg: StatsConfig) -> dict[int, tuple[torch.Tensor, int]]:
    seqs = corpus_tokens(loaded, cfg)
    names = {layer: loaded.arch.mlp_out.format(layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for lo in tqdm(range(0, len(seqs), cfg.batch_size), desc=f"key statistics (layers {list(layers)})", unit="batch", leave=False):
        batch = seqs[lo:lo + cfg.batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        mask_keys = mask.clone()
        mask_keys[:, 0] = 0  # the BOS position is an attention sink with outsized activations
        last = loaded.arch.mlp_out.format(max(layers))
        with record(loaded.model, list(names.values()), kind="input") as rec, stop_after(loaded.model, last):
            loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device))
        sel = mask_keys.bool().reshape(-1)
        for layer, name in names.items():
            k = rec[name].reshape(-1, rec[name].shape[-1])[sel.to(rec[name].device)].double()  # (tokens, d_in)
            sums[layer] = sums.get(layer, 0) + k.t() @ k
        count += int(sel.sum())
    return {layer: ((sums[layer] / count).float(), count) for layer in layers}


def key_covariance(loaded: LoadedModel, layers: Sequence[int], cfg: StatsConfig) -> dict[int, torch.Tensor]:
    """E[k k^T] (d_in, d_in) float32 for each layer, from cache when present."""
    for layer in layers:
        loaded.check_layer(layer)
    cache = _cache_dir(loaded, cfg)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = cache / f"cov_layer{layer}.pt"
        if cfg.use_cache and path.is_file():
            out[layer] = torch.load(path, map_location="cpu", weights_only=True)["cov"]
        else:
            missing.append(layer)
    if missing:
        log.info("computing key statistics for layers %s", missing)
        for layer, (cov, count) in _compute(loaded, missing, cfg).items():
            out[layer] = cov
            if cfg.use_cache:
                with atomic_path(cache / f"cov_layer{layer}.pt") as tmp:
                    torch.save({"cov": cov, "count": count}, tmp)
    return out
