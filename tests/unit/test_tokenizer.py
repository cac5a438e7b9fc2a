from __future__ import annotations

from pathlib import Path

import pytest

from llm.data.sources import Record
from llm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer
from llm.data.train_tokenizer import EOS_ID, PAD_ID, train_sentencepiece

SAMPLES = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnew paragraphs  ",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, emoji 🚀✨, math ∑∫√",
    "def f(x):\n    return x ** 2  # 12345",
    "control \x00 char and \u200b zero width",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_shipped_tokenizer_round_trips_any_text(tokenizer_path: Path, text: str) -> None:
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(text)
    assert ids, "non-empty text gives tokens"
    assert tok.decode(ids) == text


def test_shipped_tokenizer_special_ids(tokenizer_path: Path) -> None:
    tok = load_tokenizer(tokenizer_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 8192
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (PAD_ID, EOS_ID, 2)
    assert tok.piece(4) == "\n"
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_reserved_special_tokens_are_single_pieces(tokenizer_path: Path) -> None:
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode("x<|reserved_0|>y")
    assert len([i for i in ids if tok.piece(i) == "<|reserved_0|>"]) == 1


def test_train_small_unigram_and_bpe(tmp_path: Path) -> None:
    from itertools import islice

    from llm.data.builtin_corpus import iter_documents

    records = [Record("str", t, "builtin", i) for i, t in enumerate(islice(iter_documents(), 40))]
    for kind in ("bpe", "unigram"):
        path = train_sentencepiece(records, output=tmp_path / kind, vocab_size=600, model_type=kind)
        tok = load_tokenizer(path)
        assert tok.vocab_size == 600
        for sample in SAMPLES:  # characters never seen in training still round-trip (byte fallback)
            assert tok.decode(tok.encode(sample)) == sample


def test_hf_tokenizer_from_local_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(SAMPLES * 20, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")

    tok = load_tokenizer(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(SAMPLES[:2]) == [tok.encode(SAMPLES[0]), tok.encode(SAMPLES[1])]


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bad)


def test_exported_hf_tokenizer_encodes_and_decodes_exactly_as_sentencepiece(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from llm.data.builtin_corpus import iter_documents
    from llm.data.tokenizer import load_tokenizer
    from llm.export.tokenizer import sentencepiece_to_hf
    from tests.conftest import TOKENIZER

    path = str(TOKENIZER)
    sentencepiece_to_hf(path).save_pretrained(tmp_path)
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(path)
    docs = [d for _, d in zip(range(200), iter_documents())]
    docs += [
        "a  b   c",
        "  lead",
        "trail  ",
        "x\n\ny\t",
        "3.14159",
        "héllo ✓ 😀 中文",
        "<|reserved_0|> </s><s>",
        "",
    ]
    for doc in docs:
        ids = ours.encode(doc)
        assert hf.encode(doc) == ids and hf(doc)["input_ids"] == ids, doc[:60]
        assert hf.decode(ids) == doc
