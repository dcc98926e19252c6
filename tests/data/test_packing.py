"""Packing: token streams, training windows (shapes, shift, determinism, epochs) and held-out evaluation."""

import numpy as np
import pytest

from infllm_jax.data import packing
from infllm_jax.data.packing import PackedBatches, encode_documents, ensure_token_stream, eval_batches
from infllm_jax.data.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
# Distinct vocabularies per split, so that any train/validation overlap of 16 bytes would be a real leak.
TRAIN_TEXTS = {
    "kjv": "".join(f"Ge{i}:1 And God saw the light {i}.\n" for i in range(200)) + "Jude1:1 Held out verse.\n",
    "python_docs": "".join(f"def function_{i}(x): return x + {i}\n" for i in range(200)),
    "essays": "".join(f"Startups are hard, essay number {i}. " for i in range(100)),
}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "corpus").mkdir()
    for source, text in TRAIN_TEXTS.items():
        (tmp_path / "corpus" / f"{source}.txt").write_text(text)
    return tmp_path


def test_encode_documents_appends_eos():
    stream = encode_documents(BYTES, ["ab", "", "c"])
    assert stream.dtype == np.int32
    assert stream.tolist() == [97, 98, BYTES.eos_id, BYTES.eos_id, 99, BYTES.eos_id]


def test_token_stream_is_cached_per_tokenizer_and_split(data_dir, monkeypatch):
    sources = list(TRAIN_TEXTS)
    train = ensure_token_stream(BYTES, "train", data_dir=data_dir, sources=sources, progress=False)
    assert (data_dir / "tokens" / "byte" / "train-kjv+python_docs.npy").exists()
    assert BYTES.decode(train) == TRAIN_TEXTS["kjv"].split("Jude")[0] + TRAIN_TEXTS["python_docs"]
    monkeypatch.setattr(packing, "encode_documents", lambda *a, **k: pytest.fail("re-tokenized"))
    again = ensure_token_stream(BYTES, "train", data_dir=data_dir, sources=sources, progress=False)
    np.testing.assert_array_equal(again, train)


def test_validation_windows_never_occur_in_training(data_dir):
    kwargs = dict(data_dir=data_dir, sources=list(TRAIN_TEXTS), progress=False)
    train = ensure_token_stream(BYTES, "train", **kwargs)
    validation = ensure_token_stream(BYTES, "validation", **kwargs)
    train_bytes = BYTES.decode(train).encode()
    for batch in eval_batches(validation, seq_len=16, batch_size=4):
        for row in batch["tokens"]:
            assert row.astype(np.uint8).tobytes() not in train_bytes


@pytest.mark.parametrize("seq_len", [8, 64, 256], ids=lambda n: f"seq_len={n}")
def test_packed_batches_shapes_and_shift(seq_len):
    # With stream[i] = i, a window is identified by its first token.
    stream = np.arange(10 * seq_len + 3, dtype=np.int32)
    batch = PackedBatches(stream, batch_size=3, seq_len=seq_len, seed=0)[5]
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (3, seq_len)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and (batch["loss_mask"] == 1).all()
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)
    np.testing.assert_array_equal(np.diff(batch["tokens"], axis=1), 1)


def test_packed_batches_are_deterministic_and_seeded():
    stream = np.arange(5000, dtype=np.int32)
    a, b = (
        PackedBatches(stream, batch_size=4, seq_len=32, seed=1),
        PackedBatches(stream, batch_size=4, seq_len=32, seed=1),
    )
    first = [batch["tokens"] for _, batch in zip(range(20), a, strict=False)]
    # Random access after iteration, and in another order, gives the same batches.
    for step in (19, 0, 7):
        np.testing.assert_array_equal(b[step]["tokens"], first[step])
    other = PackedBatches(stream, batch_size=4, seq_len=32, seed=2)
    assert not np.array_equal(other[0]["tokens"], first[0])


def test_each_epoch_covers_every_window_once():
    seq_len, stream = 16, np.arange(16 * 12 + 5, dtype=np.int32)
    batches = PackedBatches(stream, batch_size=1, seq_len=seq_len, seed=0)
    per_epoch = batches.windows_per_epoch
    assert per_epoch == 11
    for epoch in range(3):
        starts = sorted(int(batches[epoch * per_epoch + k]["tokens"][0, 0]) for k in range(per_epoch))
        offset = starts[0]
        assert 0 <= offset < seq_len
        assert starts == [offset + k * seq_len for k in range(per_epoch)]


def test_packed_batches_reject_short_streams():
    with pytest.raises(ValueError, match="too short"):
        PackedBatches(np.arange(31, dtype=np.int32), batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="must be positive"):
        PackedBatches(np.arange(100, dtype=np.int32), batch_size=0, seq_len=16)


def test_eval_batches_are_fixed_and_non_overlapping():
    stream = np.arange(1000, dtype=np.int32)
    batches = eval_batches(stream, seq_len=32, batch_size=4, num_windows=8)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (4, 32)
    starts = np.concatenate([b["tokens"][:, 0] for b in batches])
    assert (np.diff(starts) >= 32).all() and starts[-1] + 32 < len(stream)
    np.testing.assert_array_equal(
        np.concatenate([b["targets"] for b in batches]), np.concatenate([b["tokens"] for b in batches]) + 1
    )
    again = eval_batches(stream, seq_len=32, batch_size=4, num_windows=8)
    np.testing.assert_array_equal(again[1]["tokens"], batches[1]["tokens"])
    # All that fit ((1000 - 1) // 32 = 31 windows), rounded down to whole batches.
    assert len(eval_batches(stream, seq_len=32, batch_size=4)) == 7


@pytest.mark.parametrize("num_windows", [0, 6, 40], ids=lambda n: f"num_windows={n}")
def test_eval_batches_reject_bad_counts(num_windows):
    with pytest.raises(ValueError, match="num_windows"):
        eval_batches(np.arange(1000, dtype=np.int32), seq_len=32, batch_size=4, num_windows=num_windows)
