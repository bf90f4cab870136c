"""llama.cpp's tokenization of a GGUF vocabulary, as a transformers fast tokenizer (llama.cpp's
`src/llama-vocab.cpp`, `src/unicode.cpp`).

transformers' own GGUF tokenizer conversion differs from llama.cpp in places (no `add_space_prefix` for
Gemma and Llama files, a prefix only at the start of the text, GPT-2's regex for pre-tokenizers it does not
list, no `ignore_merges`), so the tokenizer is built here from the file alone:

- SentencePiece (`tokenizer.ggml.model` "llama", llama.cpp's SPM): the text is cut at CONTROL, USER_DEFINED
  and UNKNOWN tokens (matched on the raw text); every other piece gets a leading space when
  `add_space_prefix` (default true), spaces become "▁", then the adjacent pair whose concatenation is the
  best-scored token is merged until none is left, unknown characters falling back to <0xXX> bytes. Here:
  added tokens (not normalized), a normalizer [Prepend "▁"] + Replace " " -> "▁" applied to each piece, and a
  BPE model whose merges are every pair of tokens making a token, ranked by that token's score.
- byte-level BPE ("gpt2"): the same added tokens, then llama.cpp's regexes for `tokenizer.ggml.pre` applied in
  turn (`PRE_TOKENIZERS`), GPT-2's byte alphabet, the file's merges, and `ignore_merges` where llama.cpp has it.

Known limits, all outside real vocabularies' normal use: where two merges of the same score compete, llama.cpp
takes the leftmost and the BPE model the one ranked first; overlapping added tokens are matched longest-first
in llama.cpp and leftmost-longest here; after a right-stripping special token (Phi-3 files) llama.cpp strips
ASCII whitespace and transformers Unicode whitespace (a no-break space differs). A tokenizer llama.cpp knows but qedit does not reproduce raises a
one-line QeditError, never a tokenizer with different ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import generate_merges
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

_SPACE = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


@dataclass(frozen=True)
class PreTokenizer:
    """One of llama.cpp's BPE pre-tokenizers: its regexes, applied in turn (each split keeps the text between
    matches), and the flags its `tokenizer.ggml.pre` names set."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself a token is taken whole
    add_bos: bool = False        # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's own forms of the GPT-4o and Tekken regexes (an upper/lower-case letter is a letter outside a-z/A-Z)
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          rf"{_CONTRACTION}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           rf"| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _names(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


# tokenizer.ggml.pre -> what llama.cpp does with it (llm_tokenizer_bpe and llama_vocab::impl::load)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **_names("dbrx smaug-bpe", PreTokenizer((_LLAMA3,))),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2", PreTokenizer((_QWEN2,))),
    **_names("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2",
             PreTokenizer((r"\p{N}", _GPT2))),
    **_names("gpt-2 phi-2 olmo mpt jais trillion granite-docling exaone4 mellum a.x-4.0 gigachat",
             PreTokenizer((_GPT2,))),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((_GPT4O,))),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
}
# tokenizer.ggml.model values llama.cpp reads that qedit does not reproduce
_REFUSED_MODELS = {"bert": "WordPiece (WPM)", "t5": "Unigram (UGM)", "rwkv": "RWKV", "plamo2": "PLaMo-2",
                   "gemma4": "Gemma 4 BPE", "hybriddna": "hybrid DNA BPE", "whitespace": "whitespace BPE",
                   "none": "no vocabulary", "no_vocab": "no vocabulary"}


def _fail(gf: GGUFFile, what: str) -> QeditError:
    return QeditError(f"{gf.path.name}: {what}")


def _list(gf: GGUFFile, key: str, n: int | None = None) -> list:
    value = gf.fields.get(key)
    if not isinstance(value, list) or (n is not None and len(value) != n):
        expected = "a list" if n is None else f"a list of {n} entries"
        raise _fail(gf, f"metadata {key} is missing or malformed (expected {expected}); the tokenizer is incomplete")
    return value


def _added_tokens(gf: GGUFFile, tokens: list[str], types: list[int]) -> list[AddedToken]:
    """The tokens llama.cpp matches in the raw text before tokenizing (CONTROL, USER_DEFINED, UNKNOWN), with
    llama.cpp's per-model right-strip (Phi-3 files, by general.name)."""
    name = str(gf.fields.get("general.name", "")).lower()
    phi3 = "phi-3" in name or "phi3" in name
    out = []
    for text, kind in zip(tokens, types):
        if kind in (_CONTROL, _USER_DEFINED, _UNKNOWN) and text:
            rstrip = phi3 and text not in ("<unk>", "<s>", "<|endoftext|>")
            out.append(AddedToken(text, special=kind != _USER_DEFINED, normalized=False, rstrip=rstrip))
    if phi3 and "</s>" in tokens and types[tokens.index("</s>")] not in (_CONTROL, _USER_DEFINED, _UNKNOWN):
        out.append(AddedToken("</s>", special=True, normalized=False, rstrip=True))
    blank = [t.content for t in out if not t.content.strip()]
    if phi3 and blank:  # transformers matches them inside the whitespace a right-stripping token swallows
        raise _fail(gf, f"a Phi-3 vocabulary (right-stripped special tokens, by general.name) with whitespace "
                        f"tokens {blank[:3]} matched in the text; qedit cannot reproduce llama.cpp's ids for it")
    return out


def _spm_backend(gf: GGUFFile, tokens: list[str], vocab: dict[str, int]) -> Tokenizer:
    scores = _list(gf, "tokenizer.ggml.scores", len(tokens)) if "tokenizer.ggml.scores" in gf.fields else [0.0] * len(tokens)
    merges = generate_merges(vocab, {t: float(scores[i]) for t, i in vocab.items()})
    unk_id = gf.fields.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    prefix = gf.fields.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default for SPM
    steps = [normalizers.Prepend(_SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    backend.pre_tokenizer = None  # llama.cpp merges over each whole piece
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *strip])
    return backend


def _bpe_backend(gf: GGUFFile, vocab: dict[str, int]) -> Tokenizer:
    pre_name = gf.fields.get("tokenizer.ggml.pre") or "default"  # llama.cpp: missing means default
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise _fail(gf, f"tokenizer.ggml.pre {pre_name!r} is a BPE pre-tokenizer qedit does not reproduce; "
                        f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    merges = []
    for merge in _list(gf, "tokenizer.ggml.merges"):
        cut = merge.find(" ", 1)  # as llama.cpp splits "left right"
        left, right = (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")
        if left in vocab and right in vocab and left + right in vocab:  # others can only produce unknown tokens
            merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in pre.regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def build_tokenizer(gf: GGUFFile, config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `gf`, giving llama.cpp's ids (`llama_tokenize` with parse_special: control tokens in the
    text are matched; BOS/EOS added as the file says). `config` is unused (kept for the loader's signature)."""
    kind = gf.fields.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in gf.fields or kind is None:
        raise _fail(gf, "metadata has no tokenizer.ggml.tokens/model; the file carries no tokenizer")
    if kind in _REFUSED_MODELS:
        raise _fail(gf, f"tokenizer.ggml.model {kind!r} ({_REFUSED_MODELS[kind]}) is a llama.cpp tokenizer qedit "
                        "does not reproduce; supported: 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
    if kind not in ("llama", "gpt2"):
        raise _fail(gf, f"tokenizer.ggml.model {kind!r} is unknown; supported: 'llama' and 'gpt2'")
    tokens = _list(gf, "tokenizer.ggml.tokens")
    types = gf.fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise _fail(gf, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    vocab = {text: i for i, text in enumerate(tokens)}
    backend = _spm_backend(gf, tokens, vocab) if kind == "llama" else _bpe_backend(gf, vocab)
    backend.add_tokens(_added_tokens(gf, tokens, types))
    default_bos = True if kind == "llama" else PRE_TOKENIZERS[gf.fields.get("tokenizer.ggml.pre") or "default"].add_bos
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = gf.fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise _fail(gf, f"tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
        special[name] = tokens[token_id] if token_id is not None else None
    add_bos = bool(gf.fields.get("tokenizer.ggml.add_bos_token", default_bos)) and special["bos_token"] is not None
    add_eos = bool(gf.fields.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    extra = {"chat_template": gf.fields["tokenizer.chat_template"]} if "tokenizer.chat_template" in gf.fields else {}
    return TokenizersBackend(tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos, **special,
                             **extra)
