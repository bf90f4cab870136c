"""A runner on llama.cpp (llama-cpp-python): scores facts on the GGUF file exactly as it ships."""
from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qedit.core.batching import continuation_ids, is_marker_token
from qedit.core.errors import QeditError
from qedit.core.linalg import draw_tokens
from qedit.runtimes.llama_chat import chat_formatter
from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS, TokenScore, check_sampling, prompt_seed

log = logging.getLogger(__name__)
# llama.cpp's own log (model loading, "llama_kv_cache_iswa: using full-size SWA cache", ...), routed here: a
# Python logger, so that the command line shows it with -v only and a library user configures it as any other.
native_log = logging.getLogger("llama_cpp.native")
# ggml's levels: 1 debug, 2 info (model loading: at DEBUG here), 3 warn, 4 error, 5 a continued line
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_routed: list[Any] = []     # the installed ctypes callback, kept alive


def _route_native_log(llama_cpp: Any) -> None:
    """Send llama.cpp's log to `native_log` (INFO lines at DEBUG) instead of llama-cpp-python's stderr printer."""
    if _routed:
        return
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        last[0] = _GGML_LEVELS.get(level, last[0])
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if line and native_log.isEnabledFor(last[0]):
            native_log.log(last[0], "%s", line)

    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
    _routed.append(forward)


@contextlib.contextmanager
def without_repacking() -> Iterator[None]:
    """Models loaded inside read every weight from the memory-mapped file: llama.cpp's weight repacking (its CPU
    "extra buffer types") is off, as `llama-cli --no-repack`. Repacking copies quantized weights into memory of its
    own, a second copy of most of the file; without it bytes written into the file are also seen at once.
    llama-cpp-python has no argument for it, so its default model parameters are wrapped while a model loads."""
    import llama_cpp.llama_cpp as low

    real = low.llama_model_default_params

    def params() -> Any:
        p = real()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = real


class _LlamaTokenizer:
    """Just enough of the HF tokenizer call interface for `qedit.core.batching.continuation_ids`. Special tokens
    written in the text (<start_of_turn>, <|im_end|>) are parsed as such, as transformers' tokenizers and qedit's
    GGUF tokenizer parse them, so a prompt holding a chat turn is the same ids in torch and in llama.cpp."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": list(ids)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits (n, vocab) -> log-probabilities (n, vocab), float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _token_logprobs(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """logits (n, vocab), ids (n,) -> log P(ids[j]) under row j (n,), float64. Only the log-normaliser of
    each row is formed (exp in float32, summed in float64) instead of the whole log-softmax: for a text of
    a few hundred tokens and Gemma's 262k vocabulary that is most of a perplexity's cost."""
    top = logits.max(axis=-1, keepdims=True)                                         # (n, 1)
    total = np.exp(logits - top, dtype=np.float32).sum(axis=-1, dtype=np.float64)   # (n,)
    picked = logits[np.arange(len(ids)), np.asarray(ids)].astype(np.float64)        # (n,)
    return picked - top[:, 0].astype(np.float64) - np.log(total)


class LlamaCppRunner:
    """Runs a .gguf file in llama.cpp, one sequence at a time (greedy, teacher-forced scores)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int = 1, lora: str | Path | None = None) -> None:
        """`n_threads` is used for prompts and single tokens alike. One thread by default: with two
        threads on two shared cores, a busy neighbour slows a short prompt many times over
        (benchmarks/RESULTS.md, "Setup").
        `lora`: a GGUF LoRA adapter llama.cpp applies at run time on top of `path`."""
        try:
            import llama_cpp
        except ImportError as exc:
            raise QeditError("llama.cpp runner needs llama-cpp-python: pip install llama-cpp-python") from exc
        _route_native_log(llama_cpp)
        self.path = Path(path)
        if not self.path.is_file():
            raise QeditError(f"{self.path}: no such GGUF file; check the path")
        self._version = str(getattr(llama_cpp, "__version__", "unknown"))
        if n_threads < 1 or n_ctx < 8:
            raise QeditError(f"LlamaCppRunner: n_threads must be >= 1 and n_ctx >= 8, got {n_threads} and {n_ctx}")
        kwargs: dict[str, Any] = {"n_threads": n_threads, "n_threads_batch": n_threads}
        self.lora = None if lora is None else Path(lora)
        if self.lora is not None:
            if not self.lora.is_file():
                raise QeditError(f"{self.lora}: no such LoRA adapter file; check the path")
            kwargs["lora_path"] = str(self.lora)
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), logits_all=True, n_ctx=n_ctx, verbose=False, **kwargs)
        except (ValueError, RuntimeError) as exc:
            what = f"{self.path} with adapter {self.lora}" if self.lora else str(self.path)
            raise QeditError(f"{what}: llama.cpp could not load the model ({exc}); is it a valid GGUF?") from exc
        self.n_ctx = n_ctx
        self.tokenizer = _LlamaTokenizer(self.llm)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._stops: dict[int, bool] = {}
        self._chat_ids: Callable[[str], list[int]] | None = None

    def _logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits (len(ids), vocab) at every position of `ids`, from an empty context."""
        if len(ids) > self.n_ctx:
            raise QeditError(f"{self.path.name}: {len(ids)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)  # (seq, vocab), a copy

    def _last_logits(self, tokens: list[int]) -> np.ndarray:
        """Append `tokens` to the context and return the next-token logits (vocab,) after the last one.

        Only the last position goes through the output layer (a 262k-row matrix for Gemma, as costly
        as the rest of the model), so the runner's `logits_all` is switched off for this call.
        """
        import llama_cpp

        self._decode(tokens)
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32)  # (vocab,), a copy

    def _decode(self, tokens: list[int]) -> None:
        """Append `tokens` to the context, with next-token logits (in llama.cpp's context) after the last one only."""
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise QeditError(f"{self.path.name}: {self.llm.n_tokens + len(tokens)} tokens exceed the context of {self.n_ctx}")
        logits_all = self.llm._logits_all  # llama-cpp-python keeps this flag private; restored below
        self.llm._logits_all = False
        try:
            self.llm.eval(tokens)
        finally:
            self.llm._logits_all = logits_all

    def score(self, pairs: Sequence[tuple[str, str]], generate: Sequence[bool] | None = None) -> list[TokenScore]:
        """Teacher-forced scores. A prompt shared by consecutive pairs (new and true answer) is run once:
        its KV cache is kept and only the target tokens are decoded after it. A continuation asked for
        (`generate`) starts from that KV cache too: greedy decoding follows the target for as long as the
        target's tokens are the top-1 ones, so only the tokens after that point are decoded again."""
        out: list[TokenScore] = []
        cached: tuple[list[int], np.ndarray] | None = None     # (prompt ids, logits after the prompt)
        for i, (prompt, target) in enumerate(pairs):
            p, t = continuation_ids(self.tokenizer, prompt, target)
            if not t:
                raise QeditError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
            if cached is not None and cached[0] == p:
                self.llm.n_tokens = len(p)                      # drop the previous target from the KV cache
            else:
                self.llm.reset()
                cached = (p, self._last_logits(p))
            rows = [cached[1]] + [self._last_logits([tok]) for tok in t[:-1]]
            logp = _log_softmax(np.stack(rows))                 # (len(t), vocab): row j predicts t[j]
            tok_lp = tuple(float(logp[j, tid]) for j, tid in enumerate(t))
            tok_arg = tuple(int(a) for a in logp.argmax(axis=-1))
            text = None
            if generate is not None and generate[i]:
                # the context holds prompt + t[:-1]; greedy decoding agrees with t up to its first miss
                agree = next((j for j, (a, b) in enumerate(zip(tok_arg, t)) if a != b), len(t))
                keep = min(agree, len(t) - 1)
                self.llm.n_tokens = len(p) + keep
                text = self._greedy(list(t[:keep]), logp[keep], len(t) + GEN_EXTRA_TOKENS)
            out.append(TokenScore(tuple(t), tok_lp, tok_arg, text))
        return out

    def _stop(self, token: int) -> bool:
        """Whether a continuation ends before `token`: end of generation, a control token or a marker."""
        if token not in self._stops:
            import llama_cpp

            attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
            text = (llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")
            self._stops[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)
                                      or attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or is_marker_token(text))
        return self._stops[token]

    def _greedy(self, new: list[int], logits: np.ndarray, max_tokens: int) -> str:
        """Continue greedily from the context (which ends with `new`, the tokens generated so far, and whose
        next-token `logits` are given) to at most `max_tokens` new tokens; the text without special tokens."""
        while len(new) < max_tokens:
            token = int(np.argmax(logits))
            if self._stop(token):
                break
            new.append(token)
            if len(new) < max_tokens:
                logits = self._last_logits([token])
        return self.llm.detokenize(new).decode("utf-8", errors="replace")

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) + max_tokens > self.n_ctx:
            raise QeditError(f"{self.path.name}: {len(ids) + max_tokens} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        return self._greedy([], self._last_logits(ids), max_tokens)

    def sample(self, items: Sequence[tuple[str, int]], n: int, temperature: float, seed: int) -> list[list[str]]:
        """`n` continuations of each (prompt, max_tokens) drawn by llama.cpp's own sampler: a chain of the temperature
        sampler and the distribution sampler (no top-k, top-p or min-p), seeded by `prompt_seed(seed, prompt)` and
        kept for the prompt's `n` samples. The prompt is run once; each sample drops what the previous one added to
        the KV cache and runs the prompt's last token again, for its next-token logits."""
        import llama_cpp

        check_sampling(n, temperature)
        out = []
        for prompt, max_tokens in items:
            ids = self.tokenizer(prompt)["input_ids"]
            if len(ids) + max_tokens > self.n_ctx:
                raise QeditError(f"{self.path.name}: {len(ids) + max_tokens} tokens exceed the context of {self.n_ctx}")
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(prompt_seed(seed, prompt)))
            try:
                self.llm.reset()
                if len(ids) > 1:
                    self._decode(ids[:-1])
                texts = []
                for _ in range(n):
                    self.llm.n_tokens = len(ids) - 1
                    self._decode(ids[-1:])
                    new: list[int] = []
                    while len(new) < max_tokens:
                        token = int(llama_cpp.llama_sampler_sample(chain, self.llm.ctx, -1))
                        if self._stop(token):
                            break
                        new.append(token)
                        if len(new) < max_tokens:
                            self._decode([token])
                    texts.append(self.llm.detokenize(new).decode("utf-8", errors="replace"))
                out.append(texts)
            finally:
                llama_cpp.llama_sampler_free(chain)
        return out

    def chat(self, items: Sequence[tuple[str, int]]) -> list[str]:
        """The assistant's greedy reply to each (user message, max_tokens) one-turn chat, the chat formatted and
        tokenized as llama-cpp-python's `create_chat_completion` does for this file (`qedit.runtimes.llama_chat`)."""
        if self._chat_ids is None:
            self._chat_ids = chat_formatter(self.llm, self._vocab, str(self.path))
        out = []
        for question, max_tokens in items:
            ids = self._chat_ids(question)
            if len(ids) + max_tokens > self.n_ctx:
                raise QeditError(f"{self.path.name}: {len(ids) + max_tokens} tokens exceed the context of {self.n_ctx}")
            self.llm.reset()
            out.append(self._greedy([], self._last_logits(ids), max_tokens))
        return out

    def nll(self, text: str) -> tuple[float, int]:
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) < 2:
            raise QeditError(f"text {text[:40]!r} has fewer than two tokens; perplexity needs a longer text")
        logp = _token_logprobs(self._logits(ids[:-1]), ids[1:])    # (len(ids) - 1,): row j predicts ids[j + 1]
        return float(-logp.sum()), len(ids) - 1

    def describe(self) -> dict[str, str]:
        out = {"runner": self.name, "llama_cpp": self._version, "model": str(self.path)}
        if self.lora is not None:
            out["lora"] = str(self.lora)
        return out


class LlamaSampler:
    """Statistics text drawn in llama.cpp from the GGUF file itself (a `qedit.core.model.TextSampler`): for a model
    streamed layer by layer in torch, every sampled token would decode the whole model again. Tokens are drawn
    from llama.cpp's next-token logits by `qedit.core.linalg.draw_tokens` (inverse CDF, a seeded torch generator),
    one sequence at a time from BOS. llama.cpp maps the file while it samples; it is unloaded afterwards."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path, self.threads = Path(path), max(1, threads)

    @staticmethod
    def available(path: str | Path, threads: int = 1) -> "LlamaSampler | None":
        """A sampler for `path`, or None when llama-cpp-python is not installed."""
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            log.info("llama-cpp-python is not installed: statistics text is sampled in torch")
            return None
        return LlamaSampler(path, threads)

    def __call__(self, n_samples: int, sample_len: int, seed: int) -> list[list[int]]:
        import llama_cpp

        _route_native_log(llama_cpp)
        try:   # without repacking: the file's pages, which the memory budget counts, are all llama.cpp holds
            with without_repacking():
                llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=sample_len, logits_all=False, verbose=False,
                                      n_threads=self.threads, n_threads_batch=self.threads)
        except (ValueError, RuntimeError) as exc:
            raise QeditError(f"{self.path}: llama.cpp could not load the model to sample text ({exc})") from exc
        try:
            start = llm.token_bos() if llm.token_bos() >= 0 else llm.token_eos()
            generator = torch.Generator().manual_seed(seed)
            seqs = []
            for _ in range(n_samples):
                llm.reset()
                seq = [start]
                llm.eval(seq)
                while len(seq) < sample_len:
                    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                    logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)  # (vocab,)
                    seq.append(int(draw_tokens(torch.from_numpy(logits)[None], generator)[0, 0]))
                    if len(seq) < sample_len:
                        llm.eval(seq[-1:])
                seqs.append(seq)
            return seqs
        finally:
            llm.close()
