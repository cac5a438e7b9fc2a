"""One tokenizer interface over SentencePiece models and Hugging Face tokenizers.

`load_tokenizer(spec)` accepts a SentencePiece `.model` file, a local Hugging Face tokenizer
directory, or (when online) a hub name. Every tokenizer exposes encode / decode / vocab size and
the EOS, BOS and pad ids; `eos_id` is what preprocessing appends after every document.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from llm.errors import LLMError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO_ROOT / "tokenizer" / "llm_sp8k.model"


class TokenizerError(LLMError, ValueError):
    """A tokenizer that cannot be found or loaded; the message says what to pass instead."""


class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece `.model` (BPE or unigram)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.name = str(path)
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"'{path}' is not a SentencePiece model ({e})") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"SentencePiece model '{path}' has no EOS piece; train it with --eos_id set")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int | None:
        i = int(self._sp.bos_id())
        return i if i >= 0 else None

    @property
    def pad_id(self) -> int | None:
        i = int(self._sp.pad_id())
        return i if i >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.Encode(texts, num_threads=1)]

    def decode(self, ids: list[int]) -> str:
        return str(self._sp.DecodeIds([int(i) for i in ids]))

    def piece(self, token_id: int) -> str:
        return str(self._sp.IdToPiece(int(token_id)))


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory, or a hub name when online."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.name = name_or_path
        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = " (offline: pass a local directory)" if offline else ""
            raise TokenizerError(f"cannot load Hugging Face tokenizer '{name_or_path}'{hint}: {e}") from None
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer '{name_or_path}' has no EOS token")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def pad_id(self) -> int | None:
        return self._tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._tok(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(spec: str | Path | None) -> SentencePieceTokenizer | HFTokenizer:
    """A `.model` file -> SentencePiece; a directory or hub name -> Hugging Face; None -> shipped default."""
    path = Path(spec) if spec is not None else DEFAULT_TOKENIZER
    if path.suffix == ".model" or path.is_file():
        if not path.is_file():
            raise TokenizerError(f"tokenizer file '{path}' does not exist; pass a SentencePiece .model file")
        return SentencePieceTokenizer(path)
    if path.is_dir():
        return HFTokenizer(str(path))
    if str(spec).count("/") <= 1 and not str(spec).startswith((".", "/")):
        return HFTokenizer(str(spec))
    raise TokenizerError(
        f"tokenizer '{spec}' not found: pass a SentencePiece .model file, a Hugging Face tokenizer directory, "
        "or a hub name (online only)"
    )


def run_tokenizer(spec: str | None, override: str | None = None) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer a run names (`data.tokenizer`), or `override`; a relative path is tried from the
    working directory, then from the repository root (where configs name the shipped one)."""
    chosen = override or spec
    if chosen is None:
        raise TokenizerError("the checkpoint's config names no tokenizer: pass --tokenizer")
    if not Path(chosen).exists() and (REPO_ROOT / chosen).exists():
        chosen = str(REPO_ROOT / chosen)
    return load_tokenizer(chosen)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def tokenizer_fingerprint(spec: str | None) -> str | None:
    """A short hash of the tokenizer's files (a .model file, or a directory's tokenizer files), so a
    resume can tell a different tokenizer of the same vocabulary size; None for a hub name."""
    if spec is None:
        return None
    path = Path(spec) if Path(spec).exists() or not (REPO_ROOT / spec).exists() else REPO_ROOT / spec
    files = [path] if path.is_file() else sorted(path / n for n in _TOKENIZER_FILES if (path / n).is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() if len(files) > 1 else b"")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
