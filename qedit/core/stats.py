"""Key statistics C = E[k k^T] at edit layers, and the text they come from.

The keys k are the inputs of a layer's MLP output projection, one per token. The corpus is a
text file the user gives or, by default, text sampled from the model itself (so nothing is ever
downloaded). Both the sampled text and the statistics are cached on disk, keyed by the model's
fingerprint, the corpus, the layer and the sample count; the text is stored once per corpus, so a
new layer reuses it and only runs the forward pass up to that layer.

Sampling is the slow part of a first edit (one forward pass per token, and each pass ends in the
output layer over the whole vocabulary: 262k rows for Gemma 3). The sampler keeps a KV cache,
draws tokens by inverse CDF (exact; torch.multinomial's exponential race over 262k columns cost
as much as the output layer: benchmarks/RESULTS.md, "Patching a GGUF"), and computes the output
layer in bfloat16 by default (`sampling_precision`; a bfloat16 copy of the output weight, 335 MB
for Gemma, lives while sampling). The precision is fixed, never chosen by the CPU: the drawn text,
and with it every statistic and every edit, would otherwise depend on the machine. The body of the
model always runs in its own dtype, so the keys recorded while sampling are the keys of the model
being edited: when the text is sampled for a covariance request, the covariance is accumulated
during sampling and no second forward pass over the text is needed. The sampling precision is part
of the cache key of a sampled corpus.

The cache entry of a corpus (qedit.core.cache) is written file by file, first writer wins, and a run uses what
the cache holds: the covariances of a sampled corpus are stored before its text, so a concurrent run that finds
the text finds them too and never keeps a covariance computed again in another kernel order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qedit.core.batching import padded
from qedit.core.cache import CacheEntry, T, default_cache_dir, model_entry, model_key
from qedit.core.errors import QeditError
from qedit.core.hooks import record, stop_after
from qedit.core.linalg import draw_tokens, float64_device, wide
from qedit.core.memory import Shape
from qedit.core.model import LoadedModel, TextSampler

log = logging.getLogger(__name__)

SAMPLING_PRECISIONS = ("bfloat16", "float32")


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
    # Precision of the output layer while sampling text. The keys are always computed in the
    # model's dtype. Fixed rather than per-CPU, so the same config samples the same text everywhere.
    sampling_precision: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.sample_len < 4 or self.batch_size < 1:
            raise ValueError("StatsConfig: n_samples >= 1, sample_len >= 4 and batch_size >= 1 are required")
        if self.sampling_precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"StatsConfig: sampling_precision must be one of {SAMPLING_PRECISIONS}, "
                             f"not {self.sampling_precision!r}")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise QeditError(f"{self.corpus}: corpus file not found; give a plain-text file or omit --corpus")

    def root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    def corpus_digest(self) -> str:
        """sha256 prefix of the corpus file, hashed once per config and again only when the file changes."""
        if self.corpus is None:
            raise ValueError("StatsConfig.corpus_digest: no corpus file (the text is sampled from the model)")
        path = Path(self.corpus)
        try:
            st = path.stat()
        except OSError as exc:
            raise QeditError(f"{path}: cannot read the corpus file ({exc.strerror or exc})") from exc
        stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        memo = self.__dict__.get("_digest_memo")  # per instance, not a dataclass field
        if memo is None or memo[0] != stamp:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            memo = (stamp, h.hexdigest()[:16])
            object.__setattr__(self, "_digest_memo", memo)
        return memo[1]


def _corpus_key(cfg: StatsConfig, sampler: TextSampler | None = None) -> str:
    if cfg.corpus is None and sampler is not None:   # text drawn by another runtime: another corpus
        return f"self-s{cfg.seed}-n{cfg.n_samples}-l{cfg.sample_len}-{sampler.name}"
    if cfg.corpus is None:
        return f"self-s{cfg.seed}-n{cfg.n_samples}-l{cfg.sample_len}-{cfg.sampling_precision}"
    return f"file-{cfg.corpus_digest()}-n{cfg.n_samples}-l{cfg.sample_len}"


def model_cache_dir(loaded: LoadedModel, cfg: StatsConfig) -> Path:
    """Where everything qedit caches about this model lives (statistics per corpus, targets)."""
    return cfg.root() / model_key(loaded.fingerprint)


def _entry(loaded: LoadedModel, cfg: StatsConfig) -> CacheEntry:
    return model_entry(cfg.root(), loaded, _corpus_key(cfg, loaded.sampler))


def _lineage_entry(loaded: LoadedModel, cfg: StatsConfig) -> CacheEntry | None:
    """The statistics entry of the unedited file a qedit-patched GGUF descends from. A chain of patches keeps
    the statistics of its first file, as sequential editing computes them once on the unedited model: the
    chain's edits then equal one run's batches, and no patch samples the corpus again."""
    if not (cfg.use_cache and loaded.lineage) or loaded.lineage == loaded.fingerprint:
        return None
    return CacheEntry(cfg.root() / model_key(loaded.lineage) / _corpus_key(cfg, loaded.sampler))


def _cached(loaded: LoadedModel, cfg: StatsConfig, name: str, read: Callable[[Path], T]) -> T | None:
    """The cached file `name` of the lineage's entry, else of the model's own; None when neither holds it."""
    if not cfg.use_cache:
        return None
    base = _lineage_entry(loaded, cfg)
    found = base.load(name, read) if base is not None else None
    if found is not None:
        log.debug("%s: %s from the unedited file it was patched from (sha256 %s...)", loaded.source.name, name,
                  loaded.lineage[:12])
        return found
    return _entry(loaded, cfg).load(name, read)


def resolve_sampling_dtype(cfg: StatsConfig) -> torch.dtype:
    """The dtype of the output layer while sampling (cfg.sampling_precision), the same on every CPU."""
    return torch.bfloat16 if cfg.sampling_precision == "bfloat16" else torch.float32


class _KeySums:
    """Running sums of k k^T (float64, or what a streamed model's plan allows) at some layers, fed one sampling
    step at a time."""

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]) -> None:
        self.dtype = _sums_dtype(loaded)
        self.names = {layer: loaded.arch.mlp_out.format(layer) for layer in layers}
        self.last = loaded.arch.mlp_out.format(max(layers))
        self.sums: dict[int, torch.Tensor] = {}
        self.count = 0
        self._pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def add_step(self, rec: dict[str, torch.Tensor]) -> None:
        for layer, name in self.names.items():
            k = rec[name]
            self._pending[layer].append(k.reshape(-1, k.shape[-1]))            # (rows, d_in)

    def end_batch(self) -> None:
        """Fold a batch's keys into the sums (one float64 product per batch, as in `_compute`)."""
        tokens = 0
        for layer, parts in self._pending.items():
            if parts:
                keys = torch.cat(parts)                                         # (tokens, d_in)
                _add_outer(self.sums, layer, keys, self.dtype)
                tokens = keys.shape[0]
                parts.clear()
        self.count += tokens

    def result(self) -> dict[int, tuple[torch.Tensor, int]]:
        return {layer: ((self.sums[layer] / self.count).float(), self.count) for layer in self.names}


def _sums_dtype(loaded: LoadedModel) -> torch.dtype:
    """float64 sums, unless a streamed model's memory plan holds its statistics in float32."""
    return torch.float64 if loaded.streamer is None else loaded.streamer.stats_dtype


def _add_outer(sums: dict[int, torch.Tensor], layer: int, keys: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> None:
    """Add keys^T keys (tokens, d_in) to the layer's sum, on the keys' device (float64 sums of keys on a device
    without float64 on the CPU, `linalg.float64_device`)."""
    device = float64_device(keys.device) if dtype == torch.float64 else keys.device
    k = keys.to(device=device, dtype=dtype)                                     # (tokens, d_in)
    if layer in sums and dtype != torch.float64:
        sums[layer].addmm_(k.t(), k)    # in place: no second (d_in, d_in) matrix
    else:
        sums[layer] = sums[layer] + k.t() @ k if layer in sums else k.t() @ k


def _sampling_head(loaded: LoadedModel, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (rows, d_model), final-normed -> logits (rows, vocab) float32, with the output layer in `dtype`
    (a streamed model's a chunk of rows at a time)."""
    head = loaded.module(loaded.arch.lm_head)
    softcap = getattr(loaded.model.config, "final_logit_softcapping", None)
    scaling = getattr(loaded.model.config, "logits_scaling", None) or 1.0  # Granite divides its logits by this
    if loaded.streamer is not None:
        linear = partial(loaded.streamer.head_logits, dtype=dtype)
    else:
        weight = head.weight.detach().to(dtype)                                # (vocab, d_model)
        bias = head.bias.detach().to(dtype) if getattr(head, "bias", None) is not None else None
        # with a device map the final norm's output may be on another device than the head
        linear = lambda hidden: torch.nn.functional.linear(  # noqa: E731
            hidden.to(device=weight.device, dtype=dtype), weight, bias).float()

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = linear(hidden) / scaling
        return torch.tanh(out / softcap) * softcap if softcap else out

    return logits


def _sample_batch(loaded: LoadedModel, first: torch.Tensor, length: int, generator: torch.Generator,
                  head: Callable[[torch.Tensor], torch.Tensor], keys: _KeySums | None, step: Callable[[], object],
                  banned: Sequence[int] = ()) -> torch.Tensor:
    """Continue `first` (rows, 1) to (rows, length) tokens, one KV-cached forward pass per token;
    `banned` tokens (the special ones: no end of text, no padding) are never drawn."""
    base = loaded.module(loaded.arch.base_model)
    ids, columns, past = first, [first], None
    for pos in range(length - 1):  # feeds position `pos`, draws position pos + 1
        names = list(keys.names.values()) if keys is not None and pos > 0 else []  # no keys at BOS
        with record(loaded.model, names, kind="input") as rec:
            out = base(input_ids=ids, past_key_values=past, use_cache=True)
        if keys is not None and names:
            keys.add_step(rec)
        past = out.past_key_values
        ids = draw_tokens(head(out.last_hidden_state[:, -1]), generator, banned).to(first.device)  # (rows, 1)
        columns.append(ids)
        step()
    if keys is not None:  # the last token is never fed to draw a successor: a partial pass for its keys
        with record(loaded.model, list(keys.names.values()), kind="input") as rec, stop_after(loaded.model, keys.last):
            base(input_ids=ids, past_key_values=past, use_cache=True)
        keys.add_step(rec)
        keys.end_batch()
    return torch.cat(columns, dim=1)


@torch.no_grad()
def _sample_from_model(loaded: LoadedModel, cfg: StatsConfig, keys: _KeySums | None = None) -> list[list[int]]:
    """cfg.n_samples token sequences of cfg.sample_len sampled from the model, starting from BOS.

    With `keys`, the keys at its layers are summed along the way (every position but BOS).
    """
    tok = loaded.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    dtype = resolve_sampling_dtype(cfg)
    head = _sampling_head(loaded, dtype)
    # Special tokens are not banned: on the tiny gpt2 test model, banning them made AlphaEdit's and
    # ROME's statistics much worse (a far larger KL on unrelated prompts); to be understood.
    banned: list[int] = []
    generator = torch.Generator().manual_seed(cfg.seed)   # the CPU's: the same draws on every device (draw_tokens)
    began = time.perf_counter()
    seqs: list[list[int]] = []
    with tqdm(total=cfg.n_samples * (cfg.sample_len - 1), desc="sampling corpus", unit="tok", leave=False) as bar:
        for lo in range(0, cfg.n_samples, cfg.batch_size):
            rows = min(cfg.batch_size, cfg.n_samples - lo)
            first = torch.full((rows, 1), start, dtype=torch.long, device=loaded.device)
            batch = _sample_batch(loaded, first, cfg.sample_len, generator, head, keys, partial(bar.update, rows),
                                  banned)
            seqs.extend(batch.tolist())
    log.info("sampled %d x %d tokens from the model in %.1f s (output layer in %s)", cfg.n_samples,
             cfg.sample_len, time.perf_counter() - began, str(dtype).removeprefix("torch."))
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


def _read_tokens(path: Path) -> list[list[int]]:
    seqs = json.loads(path.read_text())
    if not (isinstance(seqs, list) and all(isinstance(s, list) and s for s in seqs)):
        raise ValueError("not a list of token lists")
    return seqs


def _cached_tokens(loaded: LoadedModel, cfg: StatsConfig) -> list[list[int]] | None:
    return _cached(loaded, cfg, "tokens.json", _read_tokens)


def _store_tokens(loaded: LoadedModel, cfg: StatsConfig, seqs: list[list[int]]) -> list[list[int]]:
    """Cache the text; returns the text the cache holds (another run's, when it stored it first)."""
    if not cfg.use_cache:
        return seqs
    theirs = _entry(loaded, cfg).publish("tokens.json", lambda tmp: tmp.write_text(json.dumps(seqs)), _read_tokens)
    return seqs if theirs is None else theirs


def _read_cov(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True)["cov"]


def _publish_cov(loaded: LoadedModel, cfg: StatsConfig, layer: int, cov: torch.Tensor, count: int) -> torch.Tensor:
    """Cache a layer's covariance; returns the one the cache holds (another run's, when it stored it first)."""
    if not cfg.use_cache:
        return cov
    theirs = _entry(loaded, cfg).publish(f"cov_layer{layer}.pt", partial(_save, {"cov": cov, "count": count}), _read_cov)
    return cov if theirs is None else theirs


def _save(payload: dict[str, torch.Tensor | int], path: Path) -> None:
    torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in payload.items()}, path)


def corpus_tokens(loaded: LoadedModel, cfg: StatsConfig) -> list[list[int]]:
    """The token sequences the statistics are computed on (cached)."""
    seqs = _cached_tokens(loaded, cfg)
    if seqs is None:
        if cfg.corpus is not None:
            seqs = _chunk_corpus(loaded, cfg)
        elif loaded.sampler is not None:
            began = time.perf_counter()
            seqs = loaded.sampler(cfg.n_samples, cfg.sample_len, cfg.seed)
            log.info("sampled %d x %d tokens in %s in %.1f s", cfg.n_samples, cfg.sample_len, loaded.sampler.name,
                     time.perf_counter() - began)
        else:
            seqs = _sample_from_model(loaded, cfg)
        seqs = _store_tokens(loaded, cfg, seqs)
    return seqs


def corpus_texts(loaded: LoadedModel, cfg: StatsConfig) -> list[str]:
    return [loaded.tokenizer.decode(s, skip_special_tokens=True) for s in corpus_tokens(loaded, cfg)]


@torch.no_grad()
def _compute(loaded: LoadedModel, layers: Sequence[int], cfg: StatsConfig) -> dict[int, tuple[torch.Tensor, int]]:
    """(E[k k^T] (d_in, d_in) float32, token count) per layer; samples the corpus when it is not cached."""
    began = time.perf_counter()
    if cfg.corpus is None and loaded.sampler is None and _cached_tokens(loaded, cfg) is None:
        acc = _KeySums(loaded, layers)  # sample and sum the keys in the same forward passes
        seqs = _sample_from_model(loaded, cfg, acc)
        result = acc.result()
        for layer, (cov, count) in result.items():  # before the text (the module's docstring says why)
            _publish_cov(loaded, cfg, layer, cov, count)
        _store_tokens(loaded, cfg, seqs)
        log.info("key statistics for layers %s from %d tokens in %.1f s, computed while sampling", list(layers),
                 acc.count, time.perf_counter() - began)
        return result
    seqs = corpus_tokens(loaded, cfg)
    names = {layer: loaded.arch.mlp_out.format(layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count, step, dtype = 0, cfg.batch_size, _sums_dtype(loaded)
    if loaded.streamer is not None:   # as many rows per pass as the plan's working memory holds
        width = max(len(s) for s in seqs)
        per_row = Shape.of(loaded.model.config).forward_bytes(1, width) + 12 * width * len(layers) * \
            loaded.edit_shape(layers[0])[1]
        step = max(1, min(step, loaded.streamer.work_room // per_row))
    for lo in tqdm(range(0, len(seqs), step), desc=f"key statistics (layers {list(layers)})", unit="batch", leave=False):
        ids, mask = padded(seqs[lo:lo + step], loaded.tokenizer.pad_token_id, loaded.device)     # (b, s) each
        mask_keys = mask.clone()
        mask_keys[:, 0] = 0  # the BOS position is an attention sink with outsized activations
        last = loaded.arch.mlp_out.format(max(layers))
        with record(loaded.model, list(names.values()), kind="input") as rec, stop_after(loaded.model, last):
            loaded.model(input_ids=ids, attention_mask=mask)
        sel = mask_keys.bool().reshape(-1)
        for layer, name in names.items():
            _add_outer(sums, layer, rec[name].reshape(-1, rec[name].shape[-1])[sel.to(rec[name].device)], dtype)
        count += int(sel.sum())
    log.info("key statistics for layers %s from %d tokens in %.1f s", list(layers), count, time.perf_counter() - began)
    return {layer: ((sums[layer] / count).float(), count) for layer in layers}


def key_covariance(loaded: LoadedModel, layers: Sequence[int], cfg: StatsConfig) -> dict[int, torch.Tensor]:
    """E[k k^T] (d_in, d_in) float32 for each layer, from cache when present."""
    for layer in layers:
        loaded.check_layer(layer)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        cov = _cached(loaded, cfg, f"cov_layer{layer}.pt", _read_cov)
        if cov is None:
            missing.append(layer)
        else:
            out[layer] = cov
    if missing:
        log.info("computing key statistics for layers %s", missing)
        for layer, (cov, count) in _compute(loaded, missing, cfg).items():
            out[layer] = _publish_cov(loaded, cfg, layer, cov, count)
    return out


def key_eigh(loaded: LoadedModel, layers: Sequence[int], cfg: StatsConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Eigendecomposition (eigenvalues (d_in,), eigenvectors (d_in, d_in), float64) of each layer's
    E[k k^T], cached beside the covariance: a float64 eigh of Gemma's 2048 x 2048 covariance takes
    seconds, and AlphaEdit needs one per layer per edit. The covariance is read only for layers
    whose decomposition is not cached."""
    entry = _entry(loaded, cfg)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    missing = []
    for layer in layers:
        loaded.check_layer(layer)
        found = _cached(loaded, cfg, f"eigh_layer{layer}.pt", partial(_read_eigh, d_in=loaded.edit_shape(layer)[1]))
        if found is None:
            missing.append(layer)
        else:
            out[layer] = found
    for layer, cov in (key_covariance(loaded, missing, cfg) if missing else {}).items():
        evals, evecs = torch.linalg.eigh(wide(cov))         # (d_in,), (d_in, d_in)
        theirs = entry.publish(f"eigh_layer{layer}.pt", partial(_save, {"evals": evals, "evecs": evecs}),
                               partial(_read_eigh, d_in=evecs.shape[0])) if cfg.use_cache else None
        out[layer] = (evals, evecs) if theirs is None else theirs
    return out


def _read_eigh(path: Path, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["evecs"].shape != (d_in, d_in):
        raise ValueError(f"eigenvectors of shape {tuple(saved['evecs'].shape)}, not {(d_in, d_in)}")
    return saved["evals"], saved["evecs"]
