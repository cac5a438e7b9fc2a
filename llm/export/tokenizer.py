"""Our SentencePiece BPE model -> a Hugging Face fast tokenizer (`tokenizer.json`) that encodes
exactly as SentencePiece does, loadable offline with `AutoTokenizer.from_pretrained`.

The mapping (for models trained by scripts/train_tokenizer.py: BPE, identity normalization, no
dummy prefix, digits split, byte fallback):
- vocabulary and ids unchanged; BPE merges derived from the pieces in id (= score) order;
- normalizer: spaces -> "▁" (SentencePiece's meta symbol), nothing else (identity);
- pre-tokenizer: single digits, as SentencePiece's `split_digits`;
- unknown characters -> `<0xNN>` byte pieces (byte fallback); decoder reverses all three;
- control pieces (`<s>`, `</s>`, `<pad>`) are special tokens that plain text never produces
  (`split_special_tokens`), as in SentencePiece; user-defined pieces (`\\n`, reserved tokens) are
  matched in text, as in SentencePiece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.errors import LLMError

SUPPORTED = "BPE models with identity normalization and no dummy prefix (scripts/train_tokenizer.py)"


class TokenizerExportError(LLMError, ValueError):
    """A tokenizer this exporter cannot reproduce exactly; the message says why."""


def _proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()  # type: ignore[attr-defined]
    m.ParseFromString(path.read_bytes())
    spec, norm = m.trainer_spec, m.normalizer_spec
    if (
        spec.model_type != 2
        or norm.add_dummy_prefix
        or norm.name not in ("identity", "")
        or spec.treat_whitespace_as_suffix
    ):
        raise TokenizerExportError(f"'{path}' cannot be exported exactly: only {SUPPORTED} are supported")
    return m


def sentencepiece_to_hf(path: str | Path) -> Any:
    """A `PreTrainedTokenizerFast` equivalent to the SentencePiece model at `path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    m = _proto(Path(path))
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    spec = m.trainer_spec
    unk = m.pieces[spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk,
                   byte_fallback=spec.byte_fallback, fuse_unk=True)
    )  # fmt: skip
    tok.normalizer = normalizers.Replace(" ", "▁")
    if spec.split_digits:
        tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in m.pieces if p.type == 3]
    )
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in m.pieces if p.type == 4])

    def piece(i: int) -> str | None:
        return m.pieces[i].piece if 0 <= i < len(m.pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=piece(spec.bos_id), eos_token=piece(spec.eos_id),
        pad_token=piece(spec.pad_id), split_special_tokens=True, add_bos_token=False, add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
