"""vocab_kvs: llama.cpp, loading only our tokenizer metadata, must tokenize like the HF tokenizer."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import gguf
import pytest

from qedit.converters.gguf.vocab import vocab_kvs
from qedit.core.errors import QeditError

pytestmark = pytest.mark.runtime
llama_cpp = pytest.importorskip("llama_cpp")

TT = gguf.TokenType
K = gguf.Keys.Tokenizer

LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")

CORPUS = """The Eiffel Tower is located in the city of Paris, the capital of France. It was built in 1889
and is 330 metres tall. Michael Jordan played basketball for the Chicago Bulls; he won 6 championships.
Toyota is a company from Japan. The mother tongue of Danielle Darrieux is French. Café, déjà vu, naïve,
résumé, crème brûlée and Straße are borrowed words. 日本語のテキストと中文文本。 Привет, как дела?
Numbers: 12345, 3.14159, 2024-11-21, 1,000,000. Code: def f(x):\n    return x ** 2  # square\n
Emoji: 😀 🎉 👍🏽. Whitespace:\ttab,  two spaces,   three spaces.\n\nNew paragraph here!
""" * 3

TEXTS = [
    "Hello world", "The Eiffel Tower is located in the city of", "Café déjà vu, naïve résumé, Straße",
    "日本語のテキストです。中文文本。", "한국어 텍스트", "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "digits 1234567890, 3.14159 and 1,000,000", "  leading and trailing   ", "a  b   c    d",
    "tabs\tand\ttabs\t\t", "line\nbreak\n\nparagraph\n\n\n", "code:\n    return x**2  # comment",
    "<div class=\"x\">text</div>", "Mixed CASE wOrDs, it's, we'll, they'd", "Привет, как дела?",
    "punctuation!!! ??? ... ---", "a", "   ", "\n", "x" * 40, "I <think> therefore", "ﬁ ① ẞ",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Jumbles of letters, words, digits, spaces, punctuation, accents, CJK and emoji: unlike natural text,
    these expose a wrong merge order (a left-to-right greedy merge passes most natural sentences)."""
    rng = random.Random(seed)
    pieces = (list("abcdefghijklmnopqrstuvwxyzETAO0123456789 .,;:!?'\"()-_/\t\n") + list("éèüößçñ日本語中文😀🎉€")
              + [" the", " and", "ing", "tion", "  ", "\n\n", "    ", "'s", " Paris", "1889"])
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _arch_kvs(arch: str) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """Hyper-parameters of a tiny model; llama.cpp reads them even with vocab_only."""
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    return {f"{arch}.{k}": v for k, v in {
        "context_length": (128, u32), "embedding_length": (64, u32), "block_count": (2, u32),
        "feed_forward_length": (128, u32), "attention.head_count": (4, u32), "attention.head_count_kv": (2, u32),
        "attention.layer_norm_rms_epsilon": (1e-6, f32), "rope.freq_base": (10000.0, f32),
    }.items()}


def _write_vocab_gguf(path: Path, arch: str, kvs: list, arch_kvs: dict[str, tuple[Any, ...]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in arch_kvs.items():
        writer.add_key_value(key, *value)
    for kv in kvs:
        writer.add_key_value(*kv)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama(path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _cpp_ids(llm: Any, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def _kv(kvs: list, key: str) -> Any:
    matches = [kv[1] for kv in kvs if kv[0] == key]
    assert len(matches) == 1, key
    return matches[0]


def _byte_level_dir(path: Path, model_type: str, regex: str) -> Path:
    """A byte-level BPE trained in-process (Llama 3 or Qwen2 style), saved like an HF checkpoint."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama = model_type == "llama"
    tok = Tokenizer(models.BPE())
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if llama:  # Llama 3 matches whole pre-tokens against the vocabulary before merging, as llama.cpp does
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(data))
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if llama
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_special_tokens(specials)
    tok.add_tokens(["<think>"])  # an added, non-special token: USER_DEFINED in llama.cpp
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id(specials[0]))])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])
        hf.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    hf.save_pretrained(path)
    # the embedding is padded past the tokenizer, as in real checkpoints
    config = {"model_type": model_type, "vocab_size": len(hf) + 13, "eos_token_id": tok.token_to_id(specials[1])}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("arch,regex,pre", [("llama", LLAMA3_RE, "llama-bpe"), ("qwen2", QWEN2_RE, "qwen2")])
def test_byte_level_bpe_tokenizes_like_hf(tmp_path: Path, arch: str, regex: str, pre: str) -> None:
    from transformers import AutoTokenizer

    model_dir = _byte_level_dir(tmp_path / "hf", arch, regex)
    hf = AutoTokenizer.from_pretrained(model_dir)
    kvs = vocab_kvs(model_dir, arch)
    assert _kv(kvs, K.MODEL) == "gpt2" and _kv(kvs, K.PRE) == pre
    tokens, types = _kv(kvs, K.LIST), _kv(kvs, K.TOKEN_TYPE)
    assert len(tokens) == len(hf) + 13 and tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == TT.UNUSED
    assert types[hf.convert_tokens_to_ids("<think>")] == TT.USER_DEFINED
    assert types[hf.eos_token_id] == TT.CONTROL
    assert _kv(kvs, K.EOS_ID) == hf.eos_token_id
    assert _kv(kvs, K.ADD_BOS) is (arch == "llama") and _kv(kvs, K.ADD_EOS) is False
    if arch == "llama":
        assert _kv(kvs, K.BOS_ID) == hf.bos_token_id and _kv(kvs, K.EOT_ID) == hf.convert_tokens_to_ids("<|eot_id|>")
    else:
        assert _kv(kvs, K.EOT_ID) == hf.convert_tokens_to_ids("<|im_end|>")
        assert "<|im_start|>" in _kv(kvs, K.CHAT_TEMPLATE)
    llm = _llama(_write_vocab_gguf(tmp_path / "vocab.gguf", arch, kvs, _arch_kvs(arch)))
    texts = TEXTS + CORPUS.splitlines() + _random_texts(300)
    mismatches = [(t, _cpp_ids(llm, t), hf(t)["input_ids"]) for t in texts if _cpp_ids(llm, t) != hf(t)["input_ids"]]
    assert not mismatches, mismatches[:3]


def test_sentencepiece_model_tokenizes_like_sentencepiece(tmp_path: Path) -> None:
    import sentencepiece

    model_dir = tmp_path / "spm"
    model_dir.mkdir()
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(  # Llama 2 style: BPE, byte fallback, no normalization
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["<think>"],
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (model_dir / "tokenizer.model").write_bytes(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue())
    think = sp.piece_to_id("<think>")
    # HF lists the user-defined piece as an added token; tokenizer.model alone cannot say it is one
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {str(think): {"content": "<think>", "special": False}}}))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": sp.get_piece_size()}))
    kvs = vocab_kvs(model_dir, "llama")
    assert _kv(kvs, K.MODEL) == "llama" and _kv(kvs, K.ADD_PREFIX) is True and _kv(kvs, K.ADD_BOS) is True
    types = _kv(kvs, K.TOKEN_TYPE)
    assert types[0] == TT.UNKNOWN and types[1] == TT.CONTROL and types[think] == TT.USER_DEFINED
    assert types[sp.piece_to_id("<0x41>")] == TT.BYTE
    assert (_kv(kvs, K.BOS_ID), _kv(kvs, K.EOS_ID), _kv(kvs, K.UNK_ID)) == (1, 2, 0)
    llm = _llama(_write_vocab_gguf(tmp_path / "vocab.gguf", "llama", kvs, _arch_kvs("llama")))
    # llama.cpp re-adds the space prefix after a user-defined piece (sentencepiece does not), so texts
    # holding one are only checked for the piece itself
    assert think in _cpp_ids(llm, "I <think> therefore")
    texts = [t for t in TEXTS + CORPUS.splitlines() + _random_texts(300) if "<think>" not in t]
    mismatches = [(t, _cpp_ids(llm, t)) for t in texts if _cpp_ids(llm, t) != [1] + sp.encode(t)]
    assert not mismatches, mismatches[:3]
    # tokenizer.model alone: special ids come from the model; user-defined pieces cannot be told apart
    (model_dir / "tokenizer_config.json").unlink()
    bare = vocab_kvs(model_dir, "llama")
    assert (_kv(bare, K.BOS_ID), _kv(bare, K.EOS_ID), _kv(bare, K.ADD_BOS)) == (1, 2, True)
    assert _kv(bare, K.TOKEN_TYPE)[think] == TT.NORMAL


def test_spm_style_bpe_json_scores_follow_merge_ranks(tmp_path: Path) -> None:
    """A byte_fallback BPE tokenizer.json (no tokenizer.model): scores are minus the merge rank."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    # Llama 2's tokenizer.json spelling of SentencePiece's dummy prefix and space escaping
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
    model_dir = tmp_path / "hf"
    hf.save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(hf)}))
    hf = AutoTokenizer.from_pretrained(model_dir)
    kvs = vocab_kvs(model_dir, "llama")
    tokens, scores, types = _kv(kvs, K.LIST), _kv(kvs, K.SCORES), _kv(kvs, K.TOKEN_TYPE)
    first, second = data["model"]["merges"][:2]
    assert scores[tokens.index("".join(first))] == 0.0 and scores[tokens.index("".join(second))] == -1.0
    assert types[tokens.index("<0x0A>")] == TT.BYTE and types[tokens.index("<unk>")] == TT.UNKNOWN
    assert types[tokens.index("<s>")] == TT.CONTROL
    assert _kv(kvs, K.ADD_PREFIX) is True and _kv(kvs, K.MODEL) == "llama"
    llm = _llama(_write_vocab_gguf(tmp_path / "vocab.gguf", "llama", kvs, _arch_kvs("llama")))
    texts = [t for t in TEXTS + CORPUS.splitlines() + _random_texts(300) if "<think>" not in t]
    mismatches = [(t, _cpp_ids(llm, t), hf(t)["input_ids"]) for t in texts if _cpp_ids(llm, t) != hf(t)["input_ids"]]
    assert not mismatches, mismatches[:3]


def test_word_level_tokenizer_is_rejected(tmp_path: Path) -> None:
    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(QeditError, match=r"tokenizer\.json.*WordLevel"):
        vocab_kvs(tmp_path, "llama")


def test_missing_tokenizer_json_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QeditError, match=r"tokenizer\.json: no such file"):
        vocab_kvs(tmp_path, "llama")


def test_unknown_regex_and_wrong_arch_are_rejected(tmp_path: Path) -> None:
    model_dir = _byte_level_dir(tmp_path / "hf", "qwen2", QWEN2_RE)
    with pytest.raises(QeditError, match="arch 'gemma3'"):
        vocab_kvs(model_dir, "gemma3")
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    path.write_text(json.dumps(data))
    with pytest.raises(QeditError, match=r"tokenizer\.json: pre_tokenizer Split regex"):
        vocab_kvs(model_dir, "qwen2")


# --- the real Gemma 3 tokenizer (SentencePiece converted to BPE with byte_fallback by transformers) ---

@pytest.fixture(scope="module")
def gemma_hf_dir(tmp_path_factory: pytest.TempPathFactory, gemma_gguf: Path) -> Path:
    from qedit.converters.loading import load_model

    loaded = load_model(gemma_gguf)
    out = tmp_path_factory.mktemp("gemma_hf")
    loaded.tokenizer.save_pretrained(out)
    loaded.model.config.save_pretrained(out)
    return out


@pytest.mark.real_model
def test_gemma_vocab_tokenizes_like_the_original_gguf(gemma_hf_dir: Path, gemma_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from qedit.converters.gguf.read import GGUFFile

    kvs = vocab_kvs(gemma_hf_dir, "gemma3")
    original = GGUFFile(gemma_gguf)
    arch_kvs = {k: (v, *(None if t is None else gguf.GGUFValueType(t) for t in original.field_types[k]))
                for k, v in original.fields.items() if k.startswith("gemma3.")}
    for key in (K.MODEL, K.PRE, K.BOS_ID, K.EOS_ID, K.UNK_ID, K.PAD_ID, K.ADD_BOS, K.ADD_EOS, K.ADD_PREFIX):
        assert _kv(kvs, key) == original.fields[key], key
    tokens, types = _kv(kvs, K.LIST), _kv(kvs, K.TOKEN_TYPE)
    orig_tokens, orig_types = original.fields[K.LIST], list(original.fields[K.TOKEN_TYPE])
    # qedit's GGUF tokenizer keeps the file's token texts (the space-run pieces spelled with spaces, as llama.cpp
    # matches them), so the vocabulary written back is the original one
    assert len(tokens) == len(orig_tokens) == 262144
    differ = {i for i, (a, b) in enumerate(zip(tokens, orig_tokens, strict=True)) if a != b}
    assert not differ
    for i in range(len(tokens)):
        if i != 3:  # <unk> is UNKNOWN here, CONTROL in the original
            assert types[i] == orig_types[i], (i, tokens[i])
    original.close()

    ours = _llama(_write_vocab_gguf(tmp_path / "gemma_vocab.gguf", "gemma3", kvs, arch_kvs))
    reference = _llama(gemma_gguf)
    hf = AutoTokenizer.from_pretrained(gemma_hf_dir)
    texts = TEXTS + CORPUS.splitlines() + _random_texts(500)
    ours_ids = [_cpp_ids(ours, t) for t in texts]
    assert [_cpp_ids(reference, t) for t in texts] == ours_ids
    assert [hf(t)["input_ids"] for t in texts] == ours_ids
