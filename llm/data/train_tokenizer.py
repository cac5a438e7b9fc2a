"""SentencePiece tokenizer training from the same inputs as preprocessing.

Settings that make every UTF-8 text round-trip exactly (decode(encode(t)) == t): identity
normalization, no whitespace collapsing, no dummy prefix, byte fallback for any character
outside the vocabulary, and newline as its own piece. Ids 0-3 are pad, unk, bos, eos; the
reserved special tokens follow them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llm.data.sources import Record, parse_record
from llm.data.tokenizer import TokenizerError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_SPECIAL_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(8))
CHUNK_CHARS = 2000  # SentencePiece trains on "sentences" of bounded length


def _chunks(records: Iterable[Record], json_key: str) -> Iterator[str]:
    for record in records:
        text, _ = parse_record(record, json_key)
        if text is None:
            continue
        for i in range(0, len(text), CHUNK_CHARS):
            yield text[i : i + CHUNK_CHARS]


def train_sentencepiece(
    records: Iterable[Record],
    *,
    output: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    max_sentences: int = 2_000_000,
    threads: int = 2,
) -> Path:
    """Trains `output.model` (and `output.vocab`); returns the .model path."""

    out = Path(output)
    if out.suffix == ".model":
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _train(
            sentence_iterator=_chunks(records, json_key),
            model_prefix=str(Path(tmp) / "sp"),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=["\n", *special_tokens],
            max_sentence_length=4 * CHUNK_CHARS + 16,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
        for suffix in (".model", ".vocab"):
            (Path(tmp) / f"sp{suffix}").replace(out.with_suffix(suffix))
    return out.with_suffix(".model")


def _train(**settings: Any) -> None:
    """SentencePiece reports bad settings (a vocabulary too large for the text, ...) as RuntimeError."""
    try:
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(**settings)
    except RuntimeError as e:
        lines = str(e).strip().splitlines() or ["unknown error"]
        raise TokenizerError(f"SentencePiece training failed: {lines[-1]}") from None
