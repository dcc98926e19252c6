"""Synthetic tasks: generators follow their definitions; scorers give 1 when perfect, 0 when wrong."""

import re

import numpy as np
import pytest

from infllm_jax.data import tasks
from infllm_jax.data.tasks import IGNORE
from infllm_jax.data.tokenizer import ByteTokenizer, train_bpe

ESSAY = " ".join(f"Sentence number {i} of an essay about startups and art." for i in range(300))


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request):
    if request.param == "byte":
        return ByteTokenizer()
    text = " ".join(
        [tasks.PASSKEY_INSTRUCTION, tasks.FILLER, tasks.NIAH_INSTRUCTION, tasks.NIAH_QUESTION, ESSAY]
    )
    return train_bpe([text * 3], vocab_size=500)


def _check_retrieval(tok, ex, seq_len):
    n = len(ex.tokens)
    assert ex.tokens.shape == ex.labels.shape == (n, seq_len)
    assert ex.tokens.dtype == ex.labels.dtype == np.int32
    for i in range(n):
        p, a = int(ex.prompt_len[i]), int(ex.answer_len[i])
        answer = ex.answer[i, :a]
        assert (ex.answer[i, a:] == IGNORE).all()
        assert p + a <= seq_len
        np.testing.assert_array_equal(ex.tokens[i, p : p + a], answer)
        assert (ex.tokens[i, p + a :] == tok.pad_id).all()
        # Labels score exactly the positions that predict the answer tokens.
        assert np.flatnonzero(ex.labels[i] != IGNORE).tolist() == list(range(p - 1, p + a - 1))
        np.testing.assert_array_equal(ex.labels[i, p - 1 : p + a - 1], answer)
        assert 0.0 <= ex.depth[i] <= 1.0
    return [tok.decode(ex.tokens[i, : ex.prompt_len[i]]) for i in range(n)]


@pytest.mark.parametrize("seq_len", [512, 2048], ids=lambda n: f"seq_len={n}")
def test_passkey(tok, seq_len):
    ex = tasks.passkey(tok, num_examples=4, seq_len=seq_len, seed=3)
    prompts = _check_retrieval(tok, ex, seq_len)
    for i, prompt in enumerate(prompts):
        key = tok.decode(ex.answer[i, : ex.answer_len[i]]).strip()
        assert 1 <= int(key) <= 50000
        needle = tok.encode(" " + tasks.PASSKEY_NEEDLE.format(key=key))
        np.testing.assert_array_equal(ex.tokens[i, ex.needle_pos[i] : ex.needle_pos[i] + len(needle)], needle)
        assert prompt.startswith(tasks.PASSKEY_INSTRUCTION)
        assert prompt.endswith("\n" + tasks.PASSKEY_QUESTION)
        # Filled up to less than one more filler sentence.
        assert seq_len - ex.prompt_len[i] - ex.answer_len[i] < len(tok.encode(" " + tasks.FILLER))


def test_passkey_depth_moves_the_needle(tok):
    first = tasks.passkey(tok, num_examples=2, seq_len=1024, depth=0.0)
    last = tasks.passkey(tok, num_examples=2, seq_len=1024, depth=1.0)
    assert (first.needle_pos == len(tok.encode(tasks.PASSKEY_INSTRUCTION))).all() and (first.depth == 0).all()
    assert (last.depth == 1).all()
    tail = len(tok.encode("\n" + tasks.PASSKEY_QUESTION))
    for i in range(2):
        key = tok.decode(last.answer[i, : last.answer_len[i]]).strip()
        needle = tok.encode(" " + tasks.PASSKEY_NEEDLE.format(key=key))
        # At depth 1 the needle is the last piece before the question.
        assert last.needle_pos[i] + len(needle) == last.prompt_len[i] - tail


def _needles(prompt):
    return re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", prompt)


@pytest.mark.parametrize("haystack", ["grass", "essay"])
def test_niah_single(tok, haystack):
    hay = tasks.haystack_sentences(tok, ESSAY) if haystack == "essay" else "grass"
    ex = tasks.niah_single(tok, num_examples=4, seq_len=1024, haystack=hay, seed=1)
    prompts = _check_retrieval(tok, ex, 1024)
    for i, prompt in enumerate(prompts):
        ((key, value),) = _needles(prompt)
        assert tok.decode(ex.answer[i, : ex.answer_len[i]]) == f" {value}"
        assert prompt.endswith(f"The special magic number for {key} mentioned in the provided text is")
        assert (
            tok.decode(ex.tokens[i, ex.needle_pos[i] :])
            .lstrip()
            .startswith(f"One of the special magic numbers for {key}")
        )
        assert ("The grass is green." in prompt) == (haystack == "grass")
        assert ("essay about startups" in prompt) == (haystack == "essay")


def test_niah_depth_grid_and_explicit_depth(tok):
    ex = tasks.niah_single(tok, num_examples=16, seq_len=1024, seed=0)
    assert len(set(ex.needle_pos.tolist())) > 3
    pos = [
        tasks.niah_single(tok, num_examples=1, seq_len=1024, depth=d).needle_pos[0] for d in (0.0, 0.5, 1.0)
    ]
    assert pos[0] < pos[1] < pos[2]


@pytest.mark.parametrize("haystack", ["needles", "essay"])
def test_niah_multikey(tok, haystack):
    hay = tasks.haystack_sentences(tok, ESSAY) if haystack == "essay" else "needles"
    ex = tasks.niah_multikey(tok, num_examples=3, seq_len=2048, haystack=hay, num_distractors=3, seed=2)
    prompts = _check_retrieval(tok, ex, 2048)
    for i, prompt in enumerate(prompts):
        needles = _needles(prompt)
        query = re.search(r"magic number for ([a-z]+-[a-z]+) mentioned", prompt).group(1)
        values = [v for k, v in needles if k == query]
        assert len(values) == 1 and tok.decode(ex.answer[i, : ex.answer_len[i]]) == f" {values[0]}"
        assert len(needles) >= 4 if haystack == "essay" else len(needles) > 20
        assert (
            tok.decode(ex.tokens[i, ex.needle_pos[i] :])
            .lstrip()
            .startswith(f"One of the special magic numbers for {query} ")
        )


def test_generators_are_deterministic_and_validate(tok):
    a = tasks.niah_multikey(tok, num_examples=2, seq_len=1024, seed=5)
    b = tasks.niah_multikey(tok, num_examples=2, seq_len=1024, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="too short"):
        tasks.passkey(tok, num_examples=1, seq_len=40)
    with pytest.raises(ValueError, match="depth"):
        tasks.niah_single(tok, num_examples=1, seq_len=512, depth=1.5)
    with pytest.raises(ValueError, match="haystack"):
        tasks.niah_single(tok, num_examples=1, seq_len=512, haystack="essays")


@pytest.mark.parametrize(("seq_len", "pairs"), [(64, 4), (256, 16), (512, 64)], ids=lambda x: str(x))
def test_mqar_follows_zoology(seq_len, pairs):
    vocab = 8192
    ex = tasks.mqar(num_examples=8, seq_len=seq_len, vocab_size=vocab, num_kv_pairs=pairs, seed=0)
    assert ex.tokens.shape == ex.labels.shape == (8, seq_len) and ex.tokens.dtype == np.int32
    assert ex.tokens.min() >= 0 and ex.tokens.max() < vocab
    for tokens, labels in zip(ex.tokens, ex.labels, strict=True):
        keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs and (keys >= 1).all() and (keys < vocab // 2).all()
        assert (values >= vocab // 2).all()
        queries = np.flatnonzero(labels != IGNORE)
        assert (
            len(queries) == pairs and (queries >= 2 * pairs).all() and ((queries - 2 * pairs) % 2 == 0).all()
        )
        # Every key is queried once, and labelled with its own value.
        assert sorted(tokens[queries].tolist()) == sorted(keys.tolist())
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert all(labels[q] == pair[int(tokens[q])] for q in queries)


def test_mqar_prefers_short_gaps():
    ex = tasks.mqar(num_examples=64, seq_len=512, vocab_size=8192, num_kv_pairs=8, seed=0)
    gaps = (np.nonzero(ex.labels != IGNORE)[1] - 16) // 2
    assert np.median(gaps) < (512 - 16) // 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seq_len=64, vocab_size=64, num_kv_pairs=4), "vocab_size > seq_len"),
        (dict(seq_len=64, vocab_size=8192, num_kv_pairs=17), "4 \\* num_kv_pairs <= seq_len"),
        (dict(seq_len=63, vocab_size=8192, num_kv_pairs=4), "even"),
    ],
    ids=["vocab_not_above_len", "too_many_pairs", "odd_len"],
)
def test_mqar_constraints(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tasks.mqar(num_examples=1, **kwargs)


def _perfect(labels, tokens):
    return np.where(labels != IGNORE, labels, tokens)


def test_scoring_perfect_and_wrong(tok):
    ex = tasks.passkey(tok, num_examples=8, seq_len=512)
    assert tasks.answer_accuracy(_perfect(ex.labels, ex.tokens), ex.labels) == 1.0
    assert tasks.answer_accuracy(np.where(ex.labels != IGNORE, ex.labels + 1, 0), ex.labels) == 0.0
    # One wrong answer token fails the whole example.
    predictions = _perfect(ex.labels, ex.tokens)
    predictions[0, ex.prompt_len[0] + ex.answer_len[0] - 2] += 1
    np.testing.assert_array_equal(tasks.answer_correct(predictions, ex.labels), [False] + [True] * 7)

    mq = tasks.mqar(num_examples=4, seq_len=128, vocab_size=512, num_kv_pairs=8)
    assert tasks.mqar_accuracy(_perfect(mq.labels, mq.tokens), mq.labels) == 1.0
    assert tasks.mqar_accuracy(np.zeros_like(mq.labels), mq.labels) == 0.0
    half = _perfect(mq.labels, mq.tokens)
    half[:2] = 0
    assert tasks.mqar_accuracy(half, mq.labels) == 0.5
    with pytest.raises(ValueError, match="must both be"):
        tasks.mqar_accuracy(half[:, :-1], mq.labels)


def test_to_batch_matches_the_lm_format(tok):
    ex = tasks.niah_single(tok, num_examples=2, seq_len=512)
    batch = ex.to_batch()
    scored = ex.labels != IGNORE
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (2, 512)
    assert batch["loss_mask"].dtype == np.float32 and batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["loss_mask"], scored)
    # For text tasks the labels are the next tokens, so targets are the plain shift.
    np.testing.assert_array_equal(batch["targets"][:, :-1], ex.tokens[:, 1:])
