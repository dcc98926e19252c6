"""Synthetic long-context tasks in token space (DATA.md §6): passkey, RULER NIAH single/multikey, MQAR.

Every generator is numpy-only and seeded, and returns fixed-length ``[N, L]`` arrays so that a whole set is
scored by one jitted forward pass.

Text tasks are concatenations of separately encoded pieces: instruction, haystack pieces, needle(s), question,
answer. Every piece after the instruction starts with a space or a newline, so a byte-level BPE splits it as
it would in running text and the needle's tokens occur verbatim in the prompt. Haystack pieces are added until
one more would not fit; the prompt and answer are then right-padded with ``pad_id`` to ``L``.

Scoring is teacher-forced. Run the model once on ``tokens`` and take ``predictions = argmax(logits, -1)``
(``predictions[:, t]`` predicts token ``t + 1``); ``labels`` holds the expected token at scored positions
and ``IGNORE`` (-100) elsewhere. A text example is correct iff every answer token is predicted: this equals
greedy exact match of the answer, since greedy decoding emits the answer iff each answer token is the argmax
given the previous answer tokens. MQAR accuracy is the fraction of correct query positions (Zoology).

Deviations from RULER: keys come from a built-in list of 40 x 40 adjective-noun pairs (RULER uses the much
longer ``wonderwords`` lists), sentences are split by a regex instead of NLTK, and no tokens are reserved for
generation.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from infllm_jax.data.tokenizer import Tokenizer

IGNORE = -100
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text?\n"
    "The special magic number for {key} mentioned in the provided text is"
)
# RULER's 40 evenly spaced needle depths, rounded to whole percents.
NIAH_DEPTHS = np.round(np.linspace(0, 100, 40)) / 100
_ADJECTIVES = (
    "abundant adorable agreeable ancient bitter brave breezy bright calm careful cheerful clever cloudy "
    "curly damp eager elegant fancy fierce gentle gigantic glossy grumpy handsome hollow humble icy jolly "
    "lazy little lively mighty nervous odd plain proud quiet rapid silly tender"
).split()
_NOUNS = (
    "anchor apple badge banjo basket beach bicycle blanket bottle bridge cabin camera candle canyon castle "
    "comet cookie desk dragon engine falcon feather forest garden guitar harbor helmet island kettle lantern "
    "meadow mirror nutmeg orchard pencil pillow river rocket saddle violin"
).split()
KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class LabelledTokens:
    """Token sequences with next-token labels at the scored positions.

    Attributes:
        tokens: ``[N, L]`` int32 inputs.
        labels: ``[N, L]`` int32; ``labels[:, t]`` is the token expected after position ``t``, ``IGNORE``
            where unscored.
    """

    tokens: np.ndarray
    labels: np.ndarray

    def to_batch(self) -> dict[str, np.ndarray]:
        """Converts to the batch format of ``packing``, for training or evaluating with the LM step.

        Returns:
            ``tokens``, ``targets`` (the label where scored, else the next input token, 0 at the end) and
            ``loss_mask`` (1.0 where scored), each ``[N, L]``.
        """
        scored = self.labels != IGNORE
        next_tokens = np.concatenate([self.tokens[:, 1:], np.zeros_like(self.tokens[:, :1])], axis=1)
        return {
            "tokens": self.tokens,
            "targets": np.where(scored, self.labels, next_tokens).astype(np.int32),
            "loss_mask": scored.astype(np.float32),
        }


@dataclasses.dataclass(frozen=True)
class RetrievalExamples(LabelledTokens):
    """Passkey / NIAH examples: prompt then answer, right-padded; ``labels`` score the answer tokens.

    Attributes:
        prompt_len: ``[N]`` int32; the prompt is ``tokens[i, :prompt_len[i]]``, the answer follows it.
        answer: ``[N, A]`` int32 answer tokens, ``IGNORE``-padded; ``A`` is the longest answer.
        answer_len: ``[N]`` int32.
        needle_pos: ``[N]`` int32 index in ``tokens`` of the first token of the queried needle.
        depth: ``[N]`` float32 fraction of the haystack pieces placed before the queried needle.
    """

    prompt_len: np.ndarray
    answer: np.ndarray
    answer_len: np.ndarray
    needle_pos: np.ndarray
    depth: np.ndarray


def haystack_sentences(tokenizer: Tokenizer, text: str) -> list[np.ndarray]:
    """Splits text (e.g. the essays or KJV) into sentences, each encoded with a leading space.

    Whitespace runs are collapsed to one space first, as RULER does for its essay haystack.

    Returns:
        One ``[T_i]`` int32 array per non-empty sentence, in text order.
    """
    sentences = [s for s in _SENTENCE_END.split(re.sub(r"\s+", " ", text).strip()) if s]
    if not sentences:
        raise ValueError("the haystack text has no sentence")
    return tokenizer.encode_batch([" " + s for s in sentences])


def _check_common(num_examples: int, seq_len: int, depth: float | None) -> None:
    if num_examples < 1 or seq_len < 1:
        raise ValueError(f"{num_examples=} and {seq_len=} must be positive")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"{depth=} must lie in [0, 1]")


class _Row(NamedTuple):
    pieces: list[np.ndarray]  # prompt pieces, in order
    answer: np.ndarray
    needle_pos: int
    depth: float


def _stack(tokenizer: Tokenizer, rows: list[_Row], seq_len: int) -> RetrievalExamples:
    n, max_answer = len(rows), max(len(r.answer) for r in rows)
    tokens = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    answer = np.full((n, max_answer), IGNORE, dtype=np.int32)
    prompt_len, answer_len = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
    for i, r in enumerate(rows):
        prompt = np.concatenate(r.pieces)
        p, a = prompt_len[i], answer_len[i] = len(prompt), len(r.answer)
        tokens[i, :p], tokens[i, p : p + a] = prompt, r.answer
        # Position t predicts token t + 1, so the answer is scored at positions p - 1 ... p + a - 2.
        labels[i, p - 1 : p + a - 1] = r.answer
        answer[i, :a] = r.answer
    return RetrievalExamples(
        tokens=tokens,
        labels=labels,
        prompt_len=prompt_len,
        answer=answer,
        answer_len=answer_len,
        needle_pos=np.array([r.needle_pos for r in rows], dtype=np.int32),
        depth=np.array([r.depth for r in rows], dtype=np.float32),
    )


def _place(
    head: np.ndarray, haystack: list[np.ndarray], needles: list[tuple[int, np.ndarray]], tail: np.ndarray
) -> tuple[list[np.ndarray], int]:
    """Inserts ``(index, needle)`` pairs before haystack piece ``index``; the first needle is the queried one.

    Returns:
        The prompt pieces and the token offset of the queried needle.
    """
    order = sorted(range(len(needles)), key=lambda j: (needles[j][0], j))
    pieces, offset, needle_pos, h = [head], len(head), -1, 0
    for j in order:
        index, needle = needles[j]
        pieces.extend(haystack[h:index])
        offset += sum(len(x) for x in haystack[h:index])
        h = index
        if j == 0:
            needle_pos = offset
        pieces.append(needle)
        offset += len(needle)
    pieces.extend(haystack[h:])
    pieces.append(tail)
    return pieces, needle_pos


def _too_short(seq_len: int, fixed: int) -> ValueError:
    return ValueError(f"{seq_len=} is too short: instruction, needles, question, answer take {fixed} tokens")


def passkey(
    tokenizer: Tokenizer, *, num_examples: int, seq_len: int, depth: float | None = None, seed: int = 0
) -> RetrievalExamples:
    """Passkey retrieval (Mohtashami & Jaggi 2023, as used by LongLoRA).

    The instruction; grass filler sentences with the needle "The pass key is K. Remember it. K is the pass
    key." among them; "What is the pass key? The pass key is"; the answer " K", K uniform in [1, 50000].

    Args:
        tokenizer: any ``Tokenizer``.
        num_examples: ``N``.
        seq_len: ``L``; prompt + answer fill it up to less than one filler sentence.
        depth: fraction of the filler before the needle; None draws the filler prefix uniformly.
        seed: seed of keys and depths.

    Returns:
        ``RetrievalExamples`` with ``[N, L]`` tokens and labels.
    """
    _check_common(num_examples, seq_len, depth)
    rng = np.random.default_rng(seed)
    head, filler = tokenizer.encode(PASSKEY_INSTRUCTION), tokenizer.encode(" " + FILLER)
    tail = tokenizer.encode("\n" + PASSKEY_QUESTION)
    rows = []
    for _ in range(num_examples):
        key = int(rng.integers(1, 50001))
        needle, answer = tokenizer.encode(" " + PASSKEY_NEEDLE.format(key=key)), tokenizer.encode(f" {key}")
        fixed = len(head) + len(needle) + len(tail) + len(answer)
        if fixed > seq_len:
            raise _too_short(seq_len, fixed)
        n = (seq_len - fixed) // len(filler)
        before = int(rng.integers(n + 1)) if depth is None else int(depth * n)
        pieces, needle_pos = _place(head, [filler] * n, [(before, needle)], tail)
        rows.append(_Row(pieces, answer, needle_pos, before / max(n, 1)))
    return _stack(tokenizer, rows, seq_len)


def _niah(
    tokenizer: Tokenizer,
    *,
    num_examples: int,
    seq_len: int,
    haystack: str | Sequence[np.ndarray],
    num_distractors: int,
    depth: float | None,
    seed: int,
) -> RetrievalExamples:
    _check_common(num_examples, seq_len, depth)
    kind = haystack if isinstance(haystack, str) else "sentences"
    if kind not in ("grass", "needles", "sentences"):
        raise ValueError(f"{haystack=} must be 'grass', 'needles' or a list of encoded sentences")
    if kind == "sentences" and not len(haystack):
        raise ValueError("the sentence haystack is empty")
    if not 0 <= num_distractors < min(len(KEYS), len(NIAH_DEPTHS)):
        raise ValueError(f"{num_distractors=} must lie in [0, {min(len(KEYS), len(NIAH_DEPTHS)) - 1}]")
    rng = np.random.default_rng(seed)
    # Sentences run on after a space; the grass and needle haystacks put one piece per line, as RULER does.
    sep = " " if kind == "sentences" else "\n"
    head = tokenizer.encode(NIAH_INSTRUCTION + ("\n" if kind == "sentences" else ""))
    filler = tokenizer.encode("\n" + FILLER)

    def needle(key: str, value: int) -> np.ndarray:
        return tokenizer.encode(sep + NIAH_NEEDLE.format(key=key, value=value))

    rows = []
    for _ in range(num_examples):
        keys = [KEYS[k] for k in rng.choice(len(KEYS), size=num_distractors + 1, replace=False)]
        values = rng.integers(10**6, 10**7, size=num_distractors + 1)
        needles = [needle(k, int(v)) for k, v in zip(keys, values, strict=True)]
        tail = tokenizer.encode("\n" + NIAH_QUESTION.format(key=keys[0]))
        answer = tokenizer.encode(f" {values[0]}")
        fixed = len(head) + sum(map(len, needles)) + len(tail) + len(answer)
        if fixed > seq_len:
            raise _too_short(seq_len, fixed)
        budget, pieces = seq_len - fixed, []
        if kind == "grass":
            pieces = [filler] * (budget // len(filler))
        elif kind == "needles":
            # Distractor needles with fresh keys fill the haystack (RULER niah_multikey_2).
            while True:
                key = KEYS[int(rng.integers(len(KEYS)))]
                if key in keys:
                    continue
                piece = needle(key, int(rng.integers(10**6, 10**7)))
                if len(piece) > budget:
                    break
                pieces.append(piece)
                budget -= len(piece)
        else:
            start = int(rng.integers(len(haystack)))
            for i in range(start, start + len(haystack)):
                sentence = haystack[i % len(haystack)]
                if len(sentence) > budget:
                    break
                pieces.append(sentence)
                budget -= len(sentence)
        n = len(pieces)
        # Depths for all needles come from RULER's grid, without repeats; a given depth applies to the query.
        grid = rng.permutation(NIAH_DEPTHS)[: num_distractors + 1]
        depths = [grid[0] if depth is None else depth, *grid[1:]]
        placed = [(int(d * n), x) for d, x in zip(depths, needles, strict=True)]
        prompt, needle_pos = _place(head, pieces, placed, tail)
        rows.append(_Row(prompt, answer, needle_pos, placed[0][0] / max(n, 1)))
    return _stack(tokenizer, rows, seq_len)


def niah_single(
    tokenizer: Tokenizer,
    *,
    num_examples: int,
    seq_len: int,
    haystack: str | Sequence[np.ndarray] = "grass",
    depth: float | None = None,
    seed: int = 0,
) -> RetrievalExamples:
    """RULER needle-in-a-haystack with one needle (niah_single_1 / niah_single_2).

    The needle is "One of the special magic numbers for {key} is: {value}." with an adjective-noun key and a
    7-digit value; the question asks for the key's number and the answer is " {value}".

    Args:
        tokenizer: any ``Tokenizer``.
        num_examples: ``N``.
        seq_len: ``L``.
        haystack: ``"grass"`` (the repeated grass sentence, niah_single_1) or sentences from
            ``haystack_sentences`` (essays: niah_single_2; or any corpus text), taken in order from a random
            start.
        depth: needle depth in [0, 1]; None draws it from RULER's 40 depths.
        seed: seed of keys, values, depths and haystack starts.

    Returns:
        ``RetrievalExamples`` with ``[N, L]`` tokens and labels.
    """
    return _niah(
        tokenizer,
        num_examples=num_examples,
        seq_len=seq_len,
        haystack=haystack,
        num_distractors=0,
        depth=depth,
        seed=seed,
    )


def niah_multikey(
    tokenizer: Tokenizer,
    *,
    num_examples: int,
    seq_len: int,
    haystack: str | Sequence[np.ndarray] = "needles",
    num_distractors: int = 3,
    depth: float | None = None,
    seed: int = 0,
) -> RetrievalExamples:
    """RULER multi-key NIAH: the queried needle among distractor needles with other keys.

    Args:
        tokenizer: any ``Tokenizer``.
        num_examples: ``N``.
        seq_len: ``L``.
        haystack: ``"needles"`` (the haystack is made of distractor needles, niah_multikey_2), ``"grass"``, or
            sentences from ``haystack_sentences`` (essays with 3 distractors: niah_multikey_1).
        num_distractors: distractor needles placed at RULER depths, besides any in the haystack.
        depth: depth of the queried needle in [0, 1]; None draws it from RULER's 40 depths.
        seed: seed of keys, values, depths and haystack contents.

    Returns:
        ``RetrievalExamples`` with ``[N, L]`` tokens and labels; ``needle_pos`` is the queried needle's.
    """
    return _niah(
        tokenizer,
        num_examples=num_examples,
        seq_len=seq_len,
        haystack=haystack,
        num_distractors=num_distractors,
        depth=depth,
        seed=seed,
    )


def mqar(
    *,
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
) -> LabelledTokens:
    """Multi-query associative recall on integer tokens (Zoology's ``multiquery_ar``).

    The first ``2 * num_kv_pairs`` tokens are key, value pairs (distinct keys from ``[1, V/2)``, distinct
    values from ``[V/2, V)``). Each key is queried once, at position ``2 * num_kv_pairs + 2 g`` with gaps
    ``g`` drawn without replacement with ``p(g) ∝ a g^(a - 1)`` (Gumbel top-k: the law of numpy's sequential
    draw); the label there is the key's value. All other positions hold random tokens from ``[0, V)``.

    Args:
        num_examples: ``N``.
        seq_len: ``L``, even.
        vocab_size: ``V > L`` (Zoology's constraint).
        num_kv_pairs: with ``4 * num_kv_pairs <= L``.
        power_a: ``a``; small values favour short gaps.
        seed: seed of everything.

    Returns:
        ``LabelledTokens`` with ``[N, L]`` tokens and labels (``num_kv_pairs`` labels per row).
    """
    if num_examples < 1 or num_kv_pairs < 1:
        raise ValueError(f"{num_examples=} and {num_kv_pairs=} must be positive")
    if seq_len % 2:
        raise ValueError(f"{seq_len=} must be even")
    if vocab_size <= seq_len:
        raise ValueError(f"MQAR needs vocab_size > seq_len; got {vocab_size=}, {seq_len=}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs 4 * num_kv_pairs <= seq_len; got {num_kv_pairs=}, {seq_len=}")
    if power_a <= 0:
        raise ValueError(f"{power_a=} must be positive")
    rng = np.random.default_rng(seed)
    context, half = 2 * num_kv_pairs, vocab_size // 2
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    tokens = np.zeros((num_examples, seq_len), dtype=np.int32)
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int32)
    for i in range(num_examples):
        keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
        gaps = np.argsort(-(log_p + rng.gumbel(size=space)))[:num_kv_pairs]
        tokens[i, 0:context:2], tokens[i, 1:context:2] = keys, values
        tokens[i, context + 2 * gaps] = keys
        labels[i, context + 2 * gaps] = values
    # Keys are >= 1 and values >= V/2, so the zeros left are exactly the unfilled slots.
    empty = tokens == 0
    tokens[empty] = rng.integers(vocab_size, size=int(empty.sum()))
    return LabelledTokens(tokens=tokens, labels=labels)


def _check_scoring(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or labels.ndim != 2:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must both be [N, L]")
    return predictions, labels


def answer_correct(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Teacher-forced exact match per example: every scored position predicted correctly.

    Args:
        predictions: ``[N, L]`` argmax of the logits (``predictions[:, t]`` predicts token ``t + 1``).
        labels: ``[N, L]`` from a task, ``IGNORE`` where unscored.

    Returns:
        ``[N]`` bool.
    """
    predictions, labels = _check_scoring(predictions, labels)
    scored = labels != IGNORE
    if not scored.any(axis=1).all():
        raise ValueError("every example needs at least one scored position")
    return np.all((predictions == labels) | ~scored, axis=1)


def answer_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples answered exactly (see ``answer_correct``): passkey and NIAH."""
    return float(answer_correct(predictions, labels).mean())


def mqar_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of scored (query) positions predicted correctly, pooled over examples (Zoology's metric).

    Args:
        predictions: ``[N, L]`` argmax of the logits.
        labels: ``[N, L]`` from ``mqar``.
    """
    predictions, labels = _check_scoring(predictions, labels)
    scored = labels != IGNORE
    if not scored.any():
        raise ValueError("labels have no scored position")
    return float((predictions == labels)[scored].mean())
