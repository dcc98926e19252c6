"""Tokenizers with one small interface: a byte-level one and a locally trained 8K byte-level BPE (DATA.md §5).

* ``ByteTokenizer``: ids 0-255 are the UTF-8 bytes, then PAD, BOS, EOS. No artefact, no training: for kernels,
  unit tests and synthetic tasks.
* ``BPETokenizer``: a ``tokenizers`` byte-level BPE (ByteLevel pre-tokenizer and decoder, the 256-byte initial
  alphabet, one special token ``<|endoftext|>``). ``load_or_train_bpe`` trains it on the corpus training split
  at first use and caches the json under ``<data_dir>/tokenizers/``; training is deterministic.

Both encode to int32 numpy arrays, decode lossless round trips (special ids are dropped), and carry a ``name``
that identifies their vocabulary, used to key token caches.
"""

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from infllm_jax.data import corpus

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 8192
# A newline between two non-space characters: cutting after it leaves the ByteLevel pre-tokenization (GPT-2
# regex) of both halves identical to that of the whole text, so chunked encoding equals whole-text encoding.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


class Tokenizer(Protocol):
    """What the data pipeline and the synthetic tasks need from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then ``pad_id = 256``, ``bos_id = 257``, ``eos_id = 258``."""

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> np.ndarray:
        """Encodes ``text`` to ``[len(text.encode('utf-8'))]`` int32 byte ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes each text (see ``encode``)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ``[T]`` ids, dropping special ids; invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer``; ``<|endoftext|>`` serves as EOS, BOS and PAD (as in GPT-2).

    Args:
        tokenizer: a trained byte-level BPE that has the special token ``<|endoftext|>``.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN!r} token")
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = self.bos_id = self.pad_id = eos_id
        digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
        self.name = f"bpe{self.vocab_size}-{digest}"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Loads a tokenizer saved by ``save`` (any ``tokenizers`` json with ``<|endoftext|>``)."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer json atomically (readers never see a partial file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self._tokenizer.save(str(tmp))
        tmp.replace(path)

    def encode(self, text: str) -> np.ndarray:
        """Encodes ``text`` to ``[T]`` int32 ids."""
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes each text in parallel (Rust threads); same ids as ``encode``."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ``[T]`` ids, dropping ``<|endoftext|>``."""
        return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def chunk_text(text: str, chunk_chars: int = 1 << 20) -> list[str]:
    """Splits ``text`` into pieces of about ``chunk_chars`` characters at line starts.

    Cuts fall only after a newline between two non-space characters, so that a byte-level BPE gives the same
    ids for the concatenated chunks as for the whole text; a text without such a newline stays one chunk.

    Returns:
        Chunks whose concatenation is ``text`` (an empty list for an empty text).
    """
    if chunk_chars < 1:
        raise ValueError(f"{chunk_chars=} must be positive")
    chunks, start = [], 0
    while start < len(text):
        cut = _SAFE_CUT.search(text, start + chunk_chars)
        end = len(text) if cut is None else cut.start() + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def train_bpe(
    texts: Iterable[str], *, vocab_size: int = DEFAULT_BPE_VOCAB, show_progress: bool = False
) -> BPETokenizer:
    """Trains a byte-level BPE (deterministic for a given sequence of texts).

    Args:
        texts: training texts; long ones are best passed pre-chunked (``chunk_text``) to bound memory.
        vocab_size: target size including the 256 byte tokens and ``<|endoftext|>``; a small text may stop
            short of it when no pair is left to merge.
        show_progress: the trainer's own progress bar.
    """
    if vocab_size < 257:
        raise ValueError(f"{vocab_size=} must be at least 257 (256 bytes + {EOS_TOKEN})")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)


def _training_chunks(docs: Sequence[tuple[str, str]]) -> Iterator[str]:
    for _, text in docs:
        yield from chunk_text(text)


def load_or_train_bpe(
    data_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | None = None,
    *,
    vocab_size: int = DEFAULT_BPE_VOCAB,
    progress: bool = True,
) -> BPETokenizer:
    """Returns the BPE trained on the training split of ``sources``, training and caching it on first use.

    Args:
        data_dir: cache folder (see ``corpus.default_data_dir``); the json goes to
            ``tokenizers/bpe<vocab_size>-<training sources>.json``.
        sources: corpus sources (all when None); fetched if missing; at least one must have training text.
        vocab_size: BPE vocabulary size.
        progress: progress bars for the corpus fetch and the training.

    Raises:
        ValueError: ``sources`` hold no training source (e.g. only ``essays``).
    """
    paths = corpus.ensure_corpus(data_dir, sources, progress=progress)
    train_sources = [s for s in paths if s in corpus.TRAIN_SOURCES]
    if not train_sources:
        raise ValueError(f"{sources=} include none of the training sources {corpus.TRAIN_SOURCES}")
    name = f"bpe{vocab_size}-{'+'.join(train_sources)}.json"
    cache = corpus.default_data_dir(data_dir) / "tokenizers" / name
    if cache.exists():
        return BPETokenizer.from_file(cache)
    docs = corpus.split_texts(paths, "train")
    tokenizer = train_bpe(_training_chunks(docs), vocab_size=vocab_size, show_progress=progress)
    tokenizer.save(cache)
    return tokenizer
