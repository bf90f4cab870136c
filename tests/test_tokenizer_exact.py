"""qedit's tokenizer of a GGUF file (converters/gguf/tokenizer.py) gives exactly llama.cpp's token ids
(`llama_cpp.Llama(path, vocab_only=True).tokenize(text, add_bos=..., special=True)`), for SentencePiece files with
and without add_space_prefix, Phi-3's right-stripped special tokens, and every BPE pre-tokenizer qedit
reproduces; tokenizers llama.cpp knows but qedit does not are refused with one line."""
from __future__ import annotations

import pytest
from conftest import WORDS
from tiny_archs import bpe_vocab, finish, spm_vocab, write_vocab_gguf

from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.tokenizer import PRE_TOKENIZERS, build_tokenizer
from qedit.core.errors import QeditError

TEXTS = [
    "The Eiffel Tower is located in the city of Paris", " leading space", "  two leading", "a  b   c    d",
    "tabs\tand\nnewlines\n\n\nend\r\nCRLF", "digits 1234567 3,141,592.65 $100 0.5%", "don't I'LL it's we'VE",
    "éclair École Ελληνικά 日本語テキスト 한국어", "e\u0301 combining", "emoji 🙂🚀 done", "nbsp\u00a0and\u3000ideographic",
    "<start_of_turn>user\nhi<end_of_turn>\n", "x<|endoftext|>y <s> </s>", "think: <think>hmm</think>", "",
    "   ", "ĠHello ▁Hello <0x41>", "HelloWorldABC camelCase URLs https://example.com/a_b?c=1", "!!!???...;;;",
    "Michael Jordan plays the sport of basketball.", "\n", "a\n\nb", "trailing space ", "the EiffelTower 2024",
]
_CORPUS = [" ".join(WORDS), "digits 1234567 314159 2024 100 42", "don't it's we've I'll they're",
           "éclair École Ελληνικά 日本語テキスト 한국어 🙂", "tabs\tand\nnewlines\n\n", "HelloWorld camelCase ABC"] * 3


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """name -> a tensor-less GGUF with that tokenizer."""
    root = tmp_path_factory.mktemp("vocabs")
    spm_tokens, spm_types, scores = spm_vocab(list(dict.fromkeys(WORDS)))
    bpe_tokens, bpe_types, merges = bpe_vocab(_CORPUS)
    bos = bpe_tokens.index("<|endoftext|>")
    spm = dict(tokens=spm_tokens, types=spm_types, scores=scores)
    phi_tokens, phi_types, phi_scores = spm_vocab(list(dict.fromkeys(WORDS)), user_defined=("<think>", "</think>"))
    out = {
        "spm-default-prefix": dict(spm),
        "spm-prefix-true-gemma3": dict(spm, arch="gemma3", add_space_prefix=True),
        "spm-prefix-false-gemma3": dict(spm, arch="gemma3", add_space_prefix=False),
        "spm-prefix-false-llama": dict(spm, add_space_prefix=False),
        "spm-phi3-rstrip": dict(tokens=phi_tokens, types=phi_types, scores=phi_scores, arch="phi3", name="Phi-3-mini"),
        "spm-phi3-blank": dict(spm, arch="phi3", name="Phi-3-mini"),
        "spm-no-bos-eos": dict(spm, add_bos=False),
        **{f"bpe-{pre}": dict(tokens=bpe_tokens, types=bpe_types, merges=merges, model="gpt2", pre=pre, add_bos=None,
                              bos=bos, eos=bos)
           for pre in ("llama-bpe", "dbrx", "qwen2", "deepseek-r1-qwen", "smollm", "refact", "starcoder", "gpt-2",
                       "olmo", "gpt-4o", "tekken", "default", "stablelm2", "mpt")},
    }
    return {name: write_vocab_gguf(root / f"{name}.gguf", **kw) for name, kw in out.items()}


def _llama_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["spm-default-prefix", "spm-prefix-true-gemma3", "spm-prefix-false-gemma3",
                                  "spm-prefix-false-llama", "spm-phi3-rstrip", "spm-no-bos-eos",
                                  *[f"bpe-{p}" for p in ("llama-bpe", "dbrx", "qwen2", "deepseek-r1-qwen", "smollm",
                                                         "refact", "starcoder", "gpt-2", "olmo", "gpt-4o", "tekken",
                                                         "default", "stablelm2", "mpt")]])
def test_token_ids_equal_llama_cpp(vocabs, name):
    llm = _llama_vocab(vocabs[name])
    with GGUFFile(vocabs[name]) as gf:
        tok = build_tokenizer(gf)
    for text in TEXTS:
        for special in (True, False):
            want = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)
            got = tok(text, add_special_tokens=special).input_ids
            assert got == want, (name, text, special, tok.convert_ids_to_tokens(got), tok.convert_ids_to_tokens(want))


def test_spm_space_prefix_follows_the_file(vocabs):
    """The reported mismatch: a Gemma 3 file with add_space_prefix=true gets the prefix, as in llama.cpp."""
    texts = {}
    for name in ("spm-prefix-true-gemma3", "spm-prefix-false-gemma3", "spm-default-prefix"):
        with GGUFFile(vocabs[name]) as gf:
            tok = build_tokenizer(gf)
        texts[name] = tok.convert_ids_to_tokens(tok("Paris<end_of_turn>Paris", add_special_tokens=False).input_ids)
    assert texts["spm-prefix-true-gemma3"] == ["▁Paris", "<end_of_turn>", "▁Paris"]  # after a special token too
    assert texts["spm-default-prefix"] == texts["spm-prefix-true-gemma3"]
    assert not any(t.startswith("▁") for t in texts["spm-prefix-false-gemma3"])


def test_saved_tokenizer_reloads_exactly(vocabs, tmp_path):
    from qedit.converters.loading import load_hf_tokenizer

    for name in ("spm-prefix-true-gemma3", "bpe-qwen2", "bpe-llama-bpe"):
        with GGUFFile(vocabs[name]) as gf:
            tok = build_tokenizer(gf)
        tok.save_pretrained(tmp_path / name)
        again = load_hf_tokenizer(tmp_path / name)
        for text in TEXTS:
            assert again(text).input_ids == tok(text).input_ids, (name, text)


@pytest.mark.parametrize("model, pre, match", [
    ("t5", "default", "'t5' \\(Unigram \\(UGM\\)\\) is a llama.cpp tokenizer qedit does not reproduce"),
    ("bert", "default", "'bert' \\(WordPiece \\(WPM\\)\\)"),
    ("rwkv", "default", "'rwkv' \\(RWKV\\)"),
    ("plamo2", "default", "'plamo2'"),
    ("gemma4", "gemma4", "'gemma4'"),
    ("no_vocab", "default", "no vocabulary"),
    ("gpt2", "viking", "tokenizer.ggml.pre 'viking' is a BPE pre-tokenizer qedit does not reproduce"),
    ("gpt2", "chameleon", "tokenizer.ggml.pre 'chameleon'"),
])
def test_tokenizers_qedit_does_not_reproduce_are_one_line_errors(tmp_path, model, pre, match):
    tokens, types, merges = bpe_vocab(_CORPUS[:2], 300)
    path = write_vocab_gguf(tmp_path / "v.gguf", tokens, types, merges=merges, model=model, pre=pre,
                            scores=[0.0] * len(tokens))
    with GGUFFile(path) as gf, pytest.raises(QeditError, match=match) as err:
        build_tokenizer(gf)
    assert "\n" not in str(err.value) and str(err.value).startswith("v.gguf: ")


def test_phi3_right_strip_next_to_whitespace_tokens_is_refused(vocabs):
    with GGUFFile(vocabs["spm-phi3-blank"]) as gf, pytest.raises(QeditError, match="Phi-3 vocabulary .* whitespace"):
        build_tokenizer(gf)


def test_every_listed_pre_tokenizer_builds(vocabs):
    with GGUFFile(vocabs["bpe-gpt-2"]) as gf:
        for pre in PRE_TOKENIZERS:
            gf.fields["tokenizer.ggml.pre"] = pre
            assert build_tokenizer(gf)("don't 123").input_ids


# ---- HF tokenizer.json -> GGUF (vocab.py): llama.cpp then tokenizes as transformers does --------------------

_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _hf_layout(kind: str, path):
    """A byte-level BPE tokenizer.json of one of the layouts real models ship (trained in-process) in `path`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    regex = _SPLITS.get(kind.replace("dbrx", "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    first = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "gpt-2": []}.get(
        kind, [pre_tokenizers.Split(Regex(regex or ""), behavior="isolated")])
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([*first, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "</s>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


@pytest.mark.runtime
@pytest.mark.parametrize("kind", ["llama-bpe", "dbrx", "qwen2", "gpt-4o", "smollm", "gpt-2"])
def test_exported_vocab_tokenizes_in_llama_cpp_as_in_transformers(tmp_path, kind):
    import gguf

    from qedit.converters.gguf.vocab import vocab_kvs

    hf = _hf_layout(kind, tmp_path / "hf")
    kvs = vocab_kvs(tmp_path / "hf", "qwen3")
    assert dict((kv[0], kv[1]) for kv in kvs)["tokenizer.ggml.pre"] == kind
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "qwen3")
    for key, value, vtype, *sub in kvs:
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    finish(w, tmp_path / "v.gguf")
    llm = _llama_vocab(tmp_path / "v.gguf")
    with GGUFFile(tmp_path / "v.gguf") as gf:
        ours = build_tokenizer(gf)
    for text in TEXTS:
        want = hf(text).input_ids
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == want, (kind, text)
        assert ours(text).input_ids == want, (kind, text)
