"""Tokenizer metadata (the `tokenizer.*` GGUF key/values) for exporting an HF model directory to GGUF.

Each supported layout maps onto the llama.cpp tokenizer that reproduces it:

- byte-level BPE in tokenizer.json (GPT-2 byte alphabet: Llama 3, Qwen2/3, SmolLM2, OLMo 2, Phi-4-mini) ->
  model "gpt2" with the merges, and the llama.cpp pre-tokenizer splitting the text the same way: by the
  tokenizer.json Split regex ("llama-bpe" with ignore_merges, else "dbrx", for Llama 3's; "qwen2"; "gpt-4o"),
  digits then GPT-2's regex ("smollm"), or GPT-2's alone ("gpt-2");
- a SentencePiece tokenizer.model (read with `sentencepiece`: Llama 2, Gemma) -> model "llama" with the
  model's own scores and piece types;
- SentencePiece-converted BPE in tokenizer.json (byte_fallback, "▁" for spaces) -> model "llama". llama.cpp
  merges greedily the adjacent pair whose concatenation has the highest score, so each token's score is
  minus the rank of the first merge producing it: the BPE merge order becomes the score order.

Anything else (WordLevel, WordPiece, Unigram without tokenizer.model, unknown regexes) raises QeditError.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from qedit.core.errors import QeditError

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
TT = gguf.TokenType
K = gguf.Keys.Tokenizer

VocabKV = tuple[str, Any, gguf.GGUFValueType] | tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType]

_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_GPT4O_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.json Split regex -> the llama.cpp pre-tokenizer that implements exactly that split, as
# (without ignore_merges, with ignore_merges)
_PRE_BY_REGEX = {_LLAMA3_RE: ("dbrx", "llama-bpe"), _QWEN2_RE: ("qwen2", None), _GPT2_RE: ("gpt-2", None),
                 _GPT4O_RE: ("gpt-4o", None)}
# llama.cpp tokenizer models each exported architecture is known to use
_ARCH_MODELS: dict[str, tuple[str, ...]] = {
    "llama": ("gpt2", "llama"), "qwen2": ("gpt2",), "qwen3": ("gpt2",), "gemma2": ("llama",), "gemma3": ("llama",),
    "phi3": ("llama", "gpt2"), "smollm3": ("gpt2",), "granite": ("gpt2",), "olmo2": ("gpt2",),
}
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_SPACE = "\u2581"
_SUPPORTED = ("supported: byte-level BPE tokenizer.json (Llama 3 / Qwen2 / GPT-4o / GPT-2 regex, SmolLM's digits), a "
              "SentencePiece "
              "tokenizer.model, or a SentencePiece-style BPE tokenizer.json with byte_fallback")


@dataclass
class _Vocab:
    model: str                    # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                      # tokenizer.ggml.pre
    tokens: list[str | None]      # None: an id no file names (becomes an unused [PADn])
    types: list[int]              # gguf.TokenType values
    scores: list[float] | None    # SentencePiece only
    merges: list[str] | None      # byte-level BPE only, "left right"
    add_space_prefix: bool | None  # SentencePiece only
    default_ids: dict[str, int] = field(default_factory=dict)  # special ids stated by tokenizer.model

    def __post_init__(self) -> None:
        if len(self.types) != len(self.tokens) or (self.scores is not None and len(self.scores) != len(self.tokens)):
            raise QeditError("tokenizer vocabulary: tokens, types and scores differ in length")


def vocab_kvs(model_dir: Path, arch: str) -> list[VocabKV]:
    """Every `tokenizer.*` GGUF key/value llama.cpp needs for the HF model in `model_dir`.

    Entries are (key, value, value type) or, for arrays, (key, list, ARRAY, element type), ready for
    `GGUFWriter.add_key_value`. `arch` is the GGUF architecture (llama, qwen2, gemma3, ...).
    """
    model_dir = Path(model_dir)
    tok_json_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tok_json = _read_json(tok_json_path) if tok_json_path.is_file() else None
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    model_type = ((tok_json or {}).get("model") or {}).get("type")
    if tok_json is not None and _is_byte_level(tok_json):
        vocab = _byte_level_vocab(tok_json, tok_json_path)
    elif sp_path.is_file():
        vocab = _sentencepiece_vocab(sp_path, _added_tokens(tok_json, tok_cfg))
    elif tok_json is not None and model_type == "BPE":
        vocab = _spm_bpe_vocab(tok_json, tok_json_path)
    elif tok_json is None:
        raise QeditError(f"{tok_json_path}: no such file (and no tokenizer.model); save the HF tokenizer "
                         f"into {model_dir} first ({_SUPPORTED})")
    else:
        raise QeditError(f"{tok_json_path}: model type {model_type!r} cannot be exported to GGUF without "
                         f"a tokenizer.model next to it; {_SUPPORTED}")
    expected = _ARCH_MODELS.get(arch)
    if expected is not None and vocab.model not in expected:
        raise QeditError(f"{model_dir}: the tokenizer maps to llama.cpp model {vocab.model!r}, but arch {arch!r} "
                         f"uses {' or '.join(expected)}; the tokenizer does not belong to this model")
    cfg = _read_json(model_dir / "config.json")
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    token_ids = _finish_tokens(vocab, size if isinstance(size, int) else None, model_dir)
    ids = vocab.default_ids | _special_ids(model_dir, tok_cfg, token_ids, len(vocab.tokens))
    add_bos, add_eos = _add_flags(tok_cfg, tok_json, ids, default_bos=vocab.model == "llama" and tok_json is None)

    kvs: list[VocabKV] = [
        (K.MODEL, vocab.model, VT.STRING),
        (K.PRE, vocab.pre, VT.STRING),
        (K.LIST, vocab.tokens, VT.ARRAY, VT.STRING),
        (K.TOKEN_TYPE, vocab.types, VT.ARRAY, VT.INT32),
    ]
    if vocab.scores is not None:
        kvs.append((K.SCORES, vocab.scores, VT.ARRAY, VT.FLOAT32))
    if vocab.merges:
        kvs.append((K.MERGES, vocab.merges, VT.ARRAY, VT.STRING))
    keys = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID, "eot": K.EOT_ID}
    kvs += [(keys[typ], tid, VT.UINT32) for typ, tid in ids.items()]
    kvs += [(K.ADD_BOS, add_bos, VT.BOOL), (K.ADD_EOS, add_eos, VT.BOOL)]
    if vocab.add_space_prefix is not None:
        kvs.append((K.ADD_PREFIX, vocab.add_space_prefix, VT.BOOL))
    kvs += _chat_template_kvs(model_dir, tok_cfg)
    log.info("%s: %s tokenizer (pre %s), %d tokens, %d merges, special ids %s, add_bos %s", model_dir,
             vocab.model, vocab.pre, len(vocab.tokens), len(vocab.merges or ()), ids, add_bos)
    return kvs


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QeditError(f"{path}: unreadable JSON ({exc}); re-save the tokenizer with save_pretrained") from exc
    if not isinstance(data, dict):
        raise QeditError(f"{path}: expected a JSON object at the top level")
    return data


def _flatten(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / post-processor, with Sequence nodes expanded."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(key, []) for leaf in _flatten(child, key)]
    return [node]


def _is_byte_level(tok_json: dict[str, Any]) -> bool:
    return any(n.get("type") == "ByteLevel" for n in _flatten(tok_json.get("pre_tokenizer"), "pretokenizers"))


def _added_tokens(tok_json: dict[str, Any] | None, tok_cfg: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of the added tokens (tokenizer.json, else tokenizer_config.json)."""
    if tok_json is not None:
        return {int(t["id"]): (t["content"], bool(t.get("special"))) for t in tok_json.get("added_tokens", [])}
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    return {int(i): (t["content"], bool(t.get("special"))) for i, t in decoder.items()}


def _base_tokens(tok_json: dict[str, Any], path: Path) -> list[str | None]:
    """Tokens by id from model.vocab plus added_tokens; holes stay None."""
    vocab = tok_json["model"].get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise QeditError(f"{path}: model.vocab is missing or empty; {_SUPPORTED}")
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: content for i, (content, _) in _added_tokens(tok_json, {}).items()})
    tokens: list[str | None] = [None] * (max(by_id) + 1)
    for i, t in by_id.items():
        tokens[i] = t
    return tokens


def _merge_pairs(tok_json: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, merge in enumerate(tok_json["model"].get("merges") or []):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise QeditError(f"{path}: model.merges[{n}] = {merge!r} is not a pair of non-empty strings")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_vocab(tok_json: dict[str, Any], path: Path) -> _Vocab:
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise QeditError(f"{path}: ByteLevel pre-tokenizer with model type {model.get('type')!r}; {_SUPPORTED}")
    norms = [n.get("type") for n in _flatten(tok_json.get("normalizer"), "normalizers")]
    if any(t != "NFC" for t in norms):
        raise QeditError(f"{path}: normalizer {norms} has no llama.cpp equivalent for byte-level BPE "
                         "(only none or NFC is supported)")
    pre = _pre_tokenizer_name(tok_json, path, bool(model.get("ignore_merges")))
    tokens = _base_tokens(tok_json, path)
    types = [int(TT.NORMAL)] * len(tokens)
    for i, (_, special) in _added_tokens(tok_json, {}).items():
        types[i] = int(TT.CONTROL if special else TT.USER_DEFINED)
    merges = []
    for left, right in _merge_pairs(tok_json, path):
        if " " in left or " " in right:
            raise QeditError(f"{path}: merge ({left!r}, {right!r}) contains a space, which llama.cpp's merge "
                             "format cannot hold; byte-level vocabularies never should")
        merges.append(f"{left} {right}")
    return _Vocab("gpt2", pre, tokens, types, None, merges, None)


def _pre_tokenizer_name(tok_json: dict[str, Any], path: Path, ignore_merges: bool) -> str:
    """The llama.cpp pre-tokenizer splitting text exactly like [Split(regex, Isolated)] + ByteLevel, or
    [Digits(individual)] + ByteLevel (SmolLM's), with llama.cpp's ignore_merges as the BPE model has it."""
    nodes = _flatten(tok_json.get("pre_tokenizer"), "pretokenizers")
    kinds = [n.get("type") for n in nodes]
    if kinds not in (["ByteLevel"], ["Split", "ByteLevel"], ["Digits", "ByteLevel"]):
        raise QeditError(f"{path}: pre_tokenizer {kinds} is not an optional Split or Digits then ByteLevel; "
                         f"{_SUPPORTED}")
    split, byte_level = (None, nodes[0]) if len(nodes) == 1 else nodes
    if byte_level.get("add_prefix_space"):
        raise QeditError(f"{path}: ByteLevel add_prefix_space=true has no llama.cpp equivalent; "
                         "set it to false in tokenizer.json if the model was trained that way")
    if kinds[0] == "Digits":  # each digit alone, then GPT-2's regex: llama.cpp's "smollm"
        if not (split.get("individual_digits") and byte_level.get("use_regex", True)) or ignore_merges:
            raise QeditError(f"{path}: Digits must split individual digits, followed by ByteLevel use_regex=true "
                             "and a BPE without ignore_merges (llama.cpp's smollm pre-tokenizer)")
        return "smollm"
    if split is None:  # ByteLevel's own regex is GPT-2's
        regex = _GPT2_RE if byte_level.get("use_regex", True) else None
    elif byte_level.get("use_regex", True) or split.get("behavior") != "Isolated" or split.get("invert"):
        raise QeditError(f"{path}: Split must be behavior=Isolated, invert=false, followed by ByteLevel "
                         "use_regex=false")
    else:
        regex = (split.get("pattern") or {}).get("Regex")
    names = _PRE_BY_REGEX.get(regex or "")
    if names is None:
        raise QeditError(f"{path}: pre_tokenizer Split regex {regex!r} is not one llama.cpp implements here; "
                         f"supported: the Llama 3 (llama-bpe/dbrx), Qwen2 (qwen2), GPT-4o (gpt-4o) and GPT-2 (gpt-2) "
                         "regexes")
    name = names[ignore_merges]
    if name is None:
        raise QeditError(f"{path}: a BPE with ignore_merges and the {names[0]!r} regex has no llama.cpp pre-tokenizer; "
                         "set ignore_merges to false in tokenizer.json if the model was trained that way")
    return name


def _spm_bpe_vocab(tok_json: dict[str, Any], path: Path) -> _Vocab:
    model = tok_json["model"]
    if not model.get("byte_fallback"):
        raise QeditError(f"{path}: BPE without ByteLevel and without byte_fallback; llama.cpp's SentencePiece "
                         f"tokenizer needs <0xXX> byte tokens; {_SUPPORTED}")
    prefix = _spm_space_prefix(tok_json, path)
    tokens = _base_tokens(tok_json, path)
    pairs = _merge_pairs(tok_json, path)
    ids = {t: i for i, t in enumerate(tokens) if t is not None}
    floor = -float(len(pairs) + 1)  # below every merge: tokens no merge produces are a last resort
    scores = [floor] * len(tokens)
    for rank in range(len(pairs) - 1, -1, -1):  # backwards, so the first merge making a token wins
        tid = ids.get(pairs[rank][0] + pairs[rank][1])
        if tid is not None:
            scores[tid] = -float(rank)
    types = [int(TT.BYTE if t is not None and _BYTE_TOKEN.fullmatch(t) else TT.NORMAL) for t in tokens]
    for i, (_, special) in _added_tokens(tok_json, {}).items():
        types[i] = int(TT.CONTROL if special else TT.USER_DEFINED)
    unk = model.get("unk_token")
    if unk in ids:
        types[ids[unk]] = int(TT.UNKNOWN)
    for i, t in enumerate(types):
        if t != TT.NORMAL:
            scores[i] = floor
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in ids]
    if missing:
        raise QeditError(f"{path}: byte_fallback vocabulary lacks byte tokens {missing[:4]}...; "
                         "llama.cpp needs all 256 <0xXX> tokens")
    return _Vocab("llama", "default", tokens, types, scores, None, prefix)


def _spm_space_prefix(tok_json: dict[str, Any], path: Path) -> bool:
    """Whether the tokenizer prepends "▁" to the text; raises on normalizers llama.cpp cannot mirror."""
    prefix = False
    for node in _flatten(tok_json.get("normalizer"), "normalizers"):
        kind = node.get("type")
        if kind == "Prepend" and node.get("prepend") == _SPACE:
            prefix = True
        elif not (kind == "Replace" and node.get("pattern") == {"String": " "} and node.get("content") == _SPACE):
            raise QeditError(f"{path}: normalizer {kind!r} has no llama.cpp SentencePiece equivalent "
                             "(supported: Replace ' ' -> '▁', Prepend '▁')")
    for node in _flatten(tok_json.get("pre_tokenizer"), "pretokenizers"):
        kind = node.get("type")
        if kind == "Metaspace" and node.get("replacement", _SPACE) == _SPACE:
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            if scheme != "never":
                log.warning("%s: Metaspace adds '▁' only when the text does not start with a space, llama.cpp "
                            "always adds it: texts starting with a space tokenize differently", path)
            prefix = prefix or scheme != "never"
        elif not (kind == "Split" and node.get("pattern") == {"String": " "}):
            raise QeditError(f"{path}: pre_tokenizer {kind!r} has no llama.cpp SentencePiece equivalent "
                             "(supported: Metaspace '▁', Split on ' ')")
    return prefix


def _sentencepiece_vocab(sp_path: Path, added: dict[int, tuple[str, bool]]) -> _Vocab:
    import sentencepiece  # a core dependency; imported here to keep module import cheap

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(sp_path))
    except (OSError, RuntimeError) as exc:
        raise QeditError(f"{sp_path}: not a SentencePiece model ({exc})") from exc
    n = sp.get_piece_size()
    tokens: list[str | None] = [sp.id_to_piece(i) for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    types = [int(TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.UNUSED
                 if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL) for i in range(n)]
    for i, (content, special) in sorted(added.items()):
        if i >= len(tokens):
            tokens += [None] * (i + 1 - len(tokens))
            types += [int(TT.UNUSED)] * (i + 1 - len(types))
            scores += [-1000.0] * (i + 1 - len(scores))
        elif tokens[i] != content:
            raise QeditError(f"{sp_path}: added token {i} is {content!r} in the HF tokenizer files but "
                             f"{tokens[i]!r} in tokenizer.model; the files do not belong together")
        if types[i] in (TT.NORMAL, TT.UNUSED):
            tokens[i], types[i] = content, int(TT.CONTROL if special else TT.USER_DEFINED)
    defaults = {typ: i for typ, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                                      ("pad", sp.pad_id())) if 0 <= i < n}
    prefix = sp.normalize("a").startswith(_SPACE)  # SentencePiece's dummy prefix
    for probe in ("a  b ", "\ufb01\u2460"):  # whitespace folding, NFKC: llama.cpp only escapes spaces
        if sp.normalize(probe) != (_SPACE if prefix else "") + probe.replace(" ", _SPACE):
            log.warning("%s: the model normalizes %r to %r and llama.cpp does not; such text tokenizes "
                        "differently", sp_path, probe, sp.normalize(probe))
            break
    return _Vocab("llama", "default", tokens, types, scores, None, prefix, defaults)


def _finish_tokens(vocab: _Vocab, size: int | None, model_dir: Path) -> dict[str, int]:
    """Pad up to config.json's vocab_size (llama.cpp sizes the embedding by the token count), name holes
    [PADn] (unused), and return token -> id, which must be one-to-one for llama.cpp."""
    n = len(vocab.tokens)
    if size is not None and size < n:
        raise QeditError(f"{model_dir / 'config.json'}: vocab_size {size} is smaller than the tokenizer's "
                         f"{n} tokens; the tokenizer does not belong to this model")
    extra = (size or n) - n
    vocab.tokens += [None] * extra
    vocab.types += [int(TT.UNUSED)] * extra
    if vocab.scores is not None:
        vocab.scores += [min(vocab.scores, default=0.0)] * extra
    ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if t is None:
            vocab.tokens[i], vocab.types[i] = t = f"[PAD{i}]", int(TT.UNUSED)
        if t in ids:
            raise QeditError(f"{model_dir}: token {t!r} appears twice (ids {ids[t]} and {i}); llama.cpp "
                             "needs every token text once")
        ids[t] = i
    return ids


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_ids(model_dir: Path, tok_cfg: dict[str, Any], token_ids: dict[str, int], n: int) -> dict[str, int]:
    """bos/eos/unk/pad ids (token names first, then config ids), plus eot when a chat end token exists."""
    named = {"tokenizer_config.json": tok_cfg,
             "special_tokens_map.json": _read_json(model_dir / "special_tokens_map.json")}
    numbered = {name: _read_json(model_dir / name) for name in ("config.json", "generation_config.json")}
    ids: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        for name, content in ((k, _token_content(v.get(f"{typ}_token"))) for k, v in named.items()):
            if content is not None:
                if content not in token_ids:
                    raise QeditError(f"{model_dir / name}: {typ}_token {content!r} is not in the vocabulary")
                ids[typ] = token_ids[content]
                break
        for name, data in numbered.items():
            tid = data.get(f"{typ}_token_id", (data.get("text_config") or {}).get(f"{typ}_token_id"))
            tid = tid[0] if isinstance(tid, list) and tid else tid  # a list of eos ids: the first is the eos
            if typ in ids or not isinstance(tid, int) or isinstance(tid, bool):
                continue
            if not 0 <= tid < n:
                raise QeditError(f"{model_dir / name}: {typ}_token_id {tid} is outside the vocabulary of {n} tokens")
            ids[typ] = tid
    eot = next((token_ids[t] for t in _EOT_NAMES if t in token_ids), None)
    return ids | ({"eot": eot} if eot is not None else {})


def _template_ends(tok_json: dict[str, Any] | None) -> tuple[list[int], list[int]] | None:
    """Ids the post-processor puts before and after a single sequence; None without a template."""
    for node in _flatten((tok_json or {}).get("post_processor"), "processors"):
        if node.get("type") != "TemplateProcessing":
            continue
        single, specials = node.get("single") or [], node.get("special_tokens") or {}
        seq = [n for n, piece in enumerate(single) if "Sequence" in piece]
        if len(seq) != 1:
            return None
        ids = [[int(i) for i in specials.get(p["SpecialToken"]["id"], {}).get("ids", [])] if "SpecialToken" in p
               else [] for p in single]
        return sum(ids[:seq[0]], []), sum(ids[seq[0] + 1:], [])
    return None


def _add_flags(tok_cfg: dict[str, Any], tok_json: dict[str, Any] | None, ids: dict[str, int],
               default_bos: bool) -> tuple[bool, bool]:
    """add_bos / add_eos: tokenizer_config.json when explicit, else what the post-processor template adds."""
    ends = _template_ends(tok_json)
    flags = []
    for typ, pos, default in (("bos", 0, default_bos), ("eos", 1, False)):
        explicit = tok_cfg.get(f"add_{typ}_token")
        if isinstance(explicit, bool):
            flags.append(explicit and typ in ids)
        elif ends is not None:
            flags.append(typ in ids and ends[pos] == [ids[typ]])
        else:
            flags.append(default and typ in ids)
    return flags[0], flags[1]


def _chat_template_kvs(model_dir: Path, tok_cfg: dict[str, Any]) -> list[VocabKV]:
    template = tok_cfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if template is None:
        return []
    if isinstance(template, list):  # the older list of named templates: llama.cpp applies the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise QeditError(f"{model_dir / 'tokenizer_config.json'}: chat_template is neither a string nor a list "
                         "holding a {name: default, template} entry")
    return [(K.CHAT_TEMPLATE, template, VT.STRING)]
