"""Tokenizers: byte-level and locally trained byte-level BPE (no network: BPE trains on in-memory text)."""

import numpy as np
import pytest

from infllm_jax.data import tokenizer
from infllm_jax.data.tokenizer import BPETokenizer, ByteTokenizer, chunk_text, load_or_train_bpe, train_bpe

TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void;  \n\n  and darkness was upon the face of the deep.\n"
    "def f(x):\n    return x ** 2  # café, naïve, 日本語, emoji 🙂\n"
) * 20
SAMPLES = ["", "a", "hello world", "  spaces  ", "tabs\tand\nnewlines\n\n", "café 日本語 🙂", TEXT]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe([TEXT], vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES, ids=[f"sample{i}" for i in range(len(SAMPLES))])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == text


def test_byte_specials_are_distinct_and_dropped():
    tok = ByteTokenizer()
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert len(specials) == 3 and min(specials) >= 256 and max(specials) < tok.vocab_size
    ids = np.concatenate([[tok.bos_id], tok.encode("abc"), [tok.eos_id, tok.pad_id]])
    assert tok.decode(ids) == "abc"
    assert [x.tolist() for x in tok.encode_batch(["ab", "c"])] == [[97, 98], [99]]


@pytest.mark.parametrize("text", SAMPLES, ids=[f"sample{i}" for i in range(len(SAMPLES))])
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32
    assert bpe.decode(ids) == text
    assert bpe.decode(np.concatenate([ids, [bpe.eos_id]])) == text


def test_bpe_compresses_and_has_eos(bpe):
    assert 257 < bpe.vocab_size <= 400
    assert bpe.eos_id == bpe.pad_id == bpe.bos_id
    assert len(bpe.encode(TEXT)) < len(TEXT.encode()) / 2
    assert bpe.name.startswith(f"bpe{bpe.vocab_size}-")


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe([TEXT], vocab_size=400)
    assert again.name == bpe.name
    np.testing.assert_array_equal(again.encode(TEXT), bpe.encode(TEXT))


def test_bpe_save_load(bpe, tmp_path):
    path = tmp_path / "sub" / "bpe.json"
    bpe.save(path)
    loaded = BPETokenizer.from_file(path)
    assert loaded.name == bpe.name and loaded.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(loaded.encode(TEXT), bpe.encode(TEXT))


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 10_000], ids=lambda c: f"chunk_chars={c}")
def test_chunked_encoding_equals_whole(bpe, chunk_chars):
    chunks = chunk_text(TEXT, chunk_chars)
    assert "".join(chunks) == TEXT
    assert len(chunks) > 1 or chunk_chars >= len(TEXT)
    np.testing.assert_array_equal(np.concatenate(bpe.encode_batch(chunks)), bpe.encode(TEXT))


def test_load_or_train_bpe_caches_per_training_sources(tmp_path, monkeypatch):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "kjv.txt").write_text("Ge1:1 " + TEXT + "Jude1:1 held out verse.\n")
    (corpus_dir / "essays.txt").write_text("An essay that is never trained on.\n")
    tok = load_or_train_bpe(tmp_path, ["kjv", "essays"], vocab_size=300, progress=False)
    assert (tmp_path / "tokenizers" / "bpe300-kjv.json").exists()
    # The second call must load the cache, not train.
    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a, **k: pytest.fail("retrained"))
    assert load_or_train_bpe(tmp_path, ["kjv", "essays"], vocab_size=300, progress=False).name == tok.name
    with pytest.raises(ValueError, match="training sources"):
        load_or_train_bpe(tmp_path, ["essays"], vocab_size=300, progress=False)
