"""Token streams and packed fixed-length language-modelling windows.

A split is tokenized once into one long int32 stream (each source document followed by EOS) and cached as
``<data_dir>/tokens/<tokenizer.name>/<split>-<sources>.npy``. Windows of any length ``L`` are cut from the
stream, with ``targets`` the next tokens:

* ``PackedBatches``: the training iterator. Each epoch draws a random offset in ``[0, L)`` and a random order
  of the non-overlapping windows that start there, so every token is seen once per epoch and window boundaries
  move between epochs. Batch ``step`` is a pure function of ``(stream, seed, step)``: resuming needs the step.
* ``eval_batches``: a fixed set of non-overlapping windows spread evenly over a (held-out) stream.

Every batch is ``{"tokens": [B, L] int32, "targets": [B, L] int32, "loss_mask": [B, L] float32}``; the loss
mask is all ones here and exists so that LM batches and task batches (``tasks.LabelledTokens.to_batch``) share
one format.
"""

import os
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from infllm_jax.data import corpus
from infllm_jax.data.tokenizer import Tokenizer, chunk_text

Batch = dict[str, np.ndarray]


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
    """Tokenizes documents into one stream, each document followed by ``tokenizer.eos_id``.

    Args:
        tokenizer: any ``Tokenizer``.
        texts: the documents.
        progress: a tqdm bar over text chunks.

    Returns:
        ``[T]`` int32 token stream.
    """
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = []
    total = sum(map(len, texts))
    with tqdm(total=total, desc="tokenize", unit="char", unit_scale=True, disable=not progress) as bar:
        for text in texts:
            chunks = chunk_text(text)
            # A few chunks per call: encode_batch runs them on parallel threads.
            for i in range(0, len(chunks), 8):
                pieces.extend(tokenizer.encode_batch(chunks[i : i + 8]))
                bar.update(sum(map(len, chunks[i : i + 8])))
            pieces.append(eos)
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros((0,), np.int32)


def ensure_token_stream(
    tokenizer: Tokenizer,
    split: corpus.Split,
    *,
    data_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Returns the cached token stream of a corpus split, fetching and tokenizing on first use.

    Args:
        tokenizer: any ``Tokenizer``; its ``name`` keys the cache.
        split: ``"train"`` or ``"validation"`` (see ``corpus``).
        data_dir: cache folder (see ``corpus.default_data_dir``).
        sources: corpus sources (all when None).
        progress: progress bars for fetching and tokenizing.

    Returns:
        ``[T]`` int32 stream, memory-mapped read-only from the cache.

    Raises:
        ValueError: the split has no document among ``sources``.
    """
    paths = corpus.ensure_corpus(data_dir, sources, progress=progress)
    docs = corpus.split_texts(paths, split)
    if not docs:
        raise ValueError(f"the {split} split has no document among sources {list(paths)}")
    name = f"{split}-{'+'.join(source for source, _ in docs)}.npy"
    cache = corpus.default_data_dir(data_dir) / "tokens" / tokenizer.name / name
    if not cache.exists():
        stream = encode_documents(tokenizer, [text for _, text in docs], progress=progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp.npy")
        np.save(tmp, stream)
        tmp.replace(cache)
    return np.load(cache, mmap_mode="r")


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    # [B, L + 1]: tokens and their next tokens in one gather.
    window = np.asarray(stream[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return {
        "tokens": window[:, :-1],
        "targets": window[:, 1:],
        "loss_mask": np.ones((len(starts), seq_len), dtype=np.float32),
    }


class PackedBatches:
    """Deterministic, seeded training batches of packed windows (see the module docstring).

    Args:
        stream: ``[T]`` token stream, e.g. from ``ensure_token_stream``.
        batch_size: windows per batch ``B``.
        seq_len: window length ``L``; the stream must hold at least ``2 L`` tokens.
        seed: seed of the window order and of each epoch's offset.

    Example:
        ``for step, batch in zip(range(num_steps), PackedBatches(stream, batch_size=8, seq_len=4096)): ...``
        or, when resuming, ``batches[step]``.
    """

    def __init__(self, stream: np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"{batch_size=} and {seq_len=} must be positive")
        # With an offset up to L - 1, window k of an epoch reads [off + kL, off + (k + 1)L] inclusive of the
        # next-token target, so W windows fit for any offset when W L + L <= T.
        self.windows_per_epoch = (len(stream) - seq_len) // seq_len
        if self.windows_per_epoch < 1:
            raise ValueError(f"{len(stream)=} tokens is too short for {seq_len=}: needs 2 * seq_len")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self._epoch = -1
        self._offset, self._order = 0, np.zeros((0,), np.int64)

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._offset = int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch

    def __getitem__(self, step: int) -> Batch:
        """Returns batch ``step`` (any step >= 0): ``tokens``, ``targets``, ``loss_mask``, each [B, L]."""
        if step < 0:
            raise ValueError(f"{step=} must be non-negative")
        starts = np.empty((self.batch_size,), dtype=np.int64)
        for b in range(self.batch_size):
            epoch, k = divmod(step * self.batch_size + b, self.windows_per_epoch)
            self._set_epoch(epoch)
            starts[b] = self._offset + self._order[k] * self.seq_len
        return _windows(self.stream, starts, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        """Yields batches 0, 1, 2, ... forever."""
        step = 0
        while True:
            yield self[step]
            step += 1


def eval_batches(
    stream: np.ndarray, *, seq_len: int, batch_size: int, num_windows: int | None = None
) -> list[Batch]:
    """A deterministic evaluation set: non-overlapping windows spread evenly over ``stream``.

    Args:
        stream: ``[T]`` token stream, typically the validation split.
        seq_len: window length ``L``.
        batch_size: windows per batch ``B``.
        num_windows: how many windows; a multiple of ``batch_size``, so that all batches share one shape and
            one compiled step. When None, as many as fit, rounded down to a multiple of ``B``.

    Returns:
        ``num_windows // B`` batches of ``tokens``/``targets``/``loss_mask`` ``[B, L]``.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"{batch_size=} and {seq_len=} must be positive")
    slots = (len(stream) - 1) // seq_len
    if num_windows is None:
        num_windows = slots - slots % batch_size
    if num_windows < 1 or num_windows % batch_size or num_windows > slots:
        raise ValueError(
            f"{num_windows=} must be a positive multiple of {batch_size=} and at most {slots} "
            f"(the windows of {seq_len=} that fit in {len(stream)} tokens)"
        )
    starts = (np.arange(num_windows) * slots // num_windows) * seq_len
    return [_windows(stream, starts[i : i + batch_size], seq_len) for i in range(0, num_windows, batch_size)]
