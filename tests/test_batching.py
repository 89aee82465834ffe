"""Batching: collate layout, sampler invariants (coverage, budget, determinism, resume), inference batches."""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.batching import (Batch, TokenBatchSampler, batches_for_inference, collate, padding_efficiency,
                          shape_multiples)
from nmt.tokenizer import BOS, EOS, PAD


def lognormal_lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Skewed lengths like a real corpus: mostly short, a long tail."""
    rng = np.random.default_rng(seed)
    src = np.clip(rng.lognormal(3.0, 0.6, n), 2, 300).astype(int)
    tgt = np.clip(src * rng.uniform(0.7, 1.4, n), 2, 300).astype(int)
    return src.tolist(), tgt.tolist()


@pytest.fixture(scope="module")
def real_lengths(data_root: Path) -> tuple[list[int], list[int]]:
    """Word counts of the embedded bible corpus's training split (+1 for EOS / BOS)."""
    from nmt.config import DataConfig
    from nmt.corpus import load_split

    pairs = load_split(DataConfig(name="bible-ko-en", root=str(data_root)), "train")
    return [len(ko.split()) + 1 for ko, _ in pairs], [len(en.split()) + 1 for _, en in pairs]


# ---------------------------------------------------------------------- collate
def test_collate_layout():
    src = [[5, 6, 7, EOS], [8, EOS]]
    tgt = [[9, 10], [11, 12, 13]]
    b = collate(src, tgt, [4, 1])
    assert b.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert b.src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert b.tgt_in.tolist() == [[BOS, 9, 10, PAD], [BOS, 11, 12, 13]]
    assert b.tgt_out.tolist() == [[9, 10, EOS, PAD], [11, 12, 13, EOS]]
    assert b.src.dtype == b.tgt_in.dtype == b.tgt_out.dtype == torch.long and b.src_mask.dtype == torch.bool
    assert (b.n_src_tokens, b.n_tgt_tokens, b.indices, b.size) == (6, 7, [4, 1], 2)
    assert b.padded_tokens == 2 * 4 + 2 * 4
    assert b.n_tgt_tokens == int(b.tgt_out.ne(PAD).sum())
    # teacher forcing: position t of tgt_in predicts position t of tgt_out, both carry y
    for row_in, row_out, y in zip(b.tgt_in.tolist(), b.tgt_out.tolist(), tgt):
        assert row_in[1:len(y) + 1] == y == row_out[:len(y)]


def test_collate_for_translation_and_to_device():
    b = collate([[5, EOS], [6, 7, 8, EOS]], None, [0, 1])
    assert b.tgt_in is None and b.tgt_out is None and b.n_tgt_tokens == 0
    assert b.padded_tokens == 8
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.src, b.src) and moved.indices == [0, 1]


def test_collate_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        collate([[5, EOS]], [[1], [2]], [0])
    with pytest.raises(ValueError):
        collate([[5, EOS]], None, [0, 1])


def test_collate_indices_are_python_ints():
    # plain ints (not numpy scalars), so logs and checkpoints can hold them
    b = collate([[5, EOS]], [[6]], np.array([3]))
    assert type(b.indices[0]) is int


# ---------------------------------------------------------------------- sampler
def cost(batch, src, tgt) -> int:
    return len(batch) * max(max(src[i], tgt[i]) for i in batch)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), max_tokens=st.integers(1, 200), bucket=st.integers(1, 8), seed=st.integers(0, 5),
       shuffle=st.booleans())
def test_every_index_once_and_budget_respected(n, max_tokens, bucket, seed, shuffle):
    rng = random.Random(n * 7 + max_tokens)
    src = [rng.randint(1, 60) for _ in range(n)]
    tgt = [rng.randint(1, 60) for _ in range(n)]
    s = TokenBatchSampler(src, tgt, max_tokens=max_tokens, seed=seed, bucket_size=bucket, shuffle=shuffle)
    for epoch in range(2):
        batches = list(s)
        assert len(batches) == len(s)
        assert sorted(i for b in batches for i in b) == list(range(n))
        for b in batches:
            assert b and (cost(b, src, tgt) <= max_tokens or len(b) == 1)
        s.next_epoch()


def padded(n: int, m: int) -> int:
    return -(-n // m) * m


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), max_tokens=st.integers(1, 400), lm=st.integers(1, 9), bm=st.integers(1, 9),
       seed=st.integers(0, 5))
def test_multiples_keep_coverage_and_the_padded_budget(n, max_tokens, lm, bm, seed):
    rng = random.Random(n * 7 + max_tokens)
    src = [rng.randint(1, 60) for _ in range(n)]
    tgt = [rng.randint(1, 60) for _ in range(n)]
    s = TokenBatchSampler(src, tgt, max_tokens=max_tokens, seed=seed, bucket_size=3, length_multiple=lm,
                          batch_multiple=bm)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(n))
    for b in batches:
        # the budget holds for the lengths as collate pads them
        assert b and (len(b) * max(padded(max(src[i], tgt[i]), lm) for i in b) <= max_tokens or len(b) == 1)
        x = collate([[5] * (src[i] - 1) + [EOS] for i in b], [[6] * (tgt[i] - 1) for i in b], b, lm)
        assert x.src.shape[1] % lm == 0 and x.tgt_in.shape[1] % lm == 0


def test_batch_sizes_are_multiples_but_for_the_last_of_a_pool():
    src, tgt = lognormal_lengths(3000)
    src, tgt = [min(x, 60) for x in src], [min(x, 60) for x in tgt]    # 8 sentences of 64 fit in 1,000
    s = TokenBatchSampler(src, tgt, max_tokens=1000, seed=0, bucket_size=10 ** 6, shuffle=False,
                          length_multiple=8, batch_multiple=8)
    sizes = [len(b) for b in s.batches()]      # one pool, batches in order: only the last one is free
    assert sum(sizes) == 3000 and all(k % 8 == 0 for k in sizes[:-1]), sizes


def shapes(sampler: TokenBatchSampler, src, tgt, epochs: int) -> set:
    out = set()
    for _ in range(epochs):
        m = sampler.length_multiple
        out |= {(len(b), padded(max(src[i] for i in b), m), padded(max(tgt[i] for i in b), m)) for b in sampler}
        sampler.next_epoch()
    return out


def test_multiples_make_few_batch_shapes_at_a_small_cost_in_padding():
    # why the trainer uses them where kernels are compiled per shape: a few dozen shapes instead of
    # hundreds, for a little more padding
    src, tgt = lognormal_lengths(20000)
    plain = TokenBatchSampler(src, tgt, max_tokens=2048, seed=0)
    fixed = TokenBatchSampler(src, tgt, max_tokens=2048, seed=0, length_multiple=8, batch_multiple=8)
    few, many = shapes(fixed, src, tgt, 5), shapes(plain, src, tgt, 5)
    assert 3 * len(few) < len(many), (len(few), len(many))

    def efficiency(sampler):         # real tokens / positions as collate pads them
        m, real, positions = sampler.length_multiple, 0, 0
        for b in sampler.batches():
            real += sum(src[i] + tgt[i] for i in b)
            positions += len(b) * (padded(max(src[i] for i in b), m) + padded(max(tgt[i] for i in b), m))
        return real / positions
    assert efficiency(plain) == pytest.approx(padding_efficiency(plain.batches(), src, tgt))
    assert 0.85 * efficiency(plain) < efficiency(fixed) < efficiency(plain)


def test_shape_multiples_are_eight_unless_set():
    assert shape_multiples(0, 0) == (8, 8)
    assert shape_multiples(4, 0) == (4, 8) and shape_multiples(0, 2) == (8, 2) and shape_multiples(1, 1) == (1, 1)


def test_oversize_pairs_get_their_own_batch_and_one_warning(caplog):
    src, tgt = [5] * 50 + [500, 600], [5] * 50 + [10, 700]
    with caplog.at_level(logging.WARNING, logger="nmt.batching"):
        s = TokenBatchSampler(src, tgt, max_tokens=100, seed=0)
        list(s)
    assert [r.getMessage() for r in caplog.records if "longer than max_tokens" in r.getMessage()] == \
        ["2 pairs are longer than max_tokens=100; each gets a batch of its own"]
    assert [50] in s.batches() and [51] in s.batches()


def test_deterministic_for_seed_and_different_across_epochs():
    src, tgt = lognormal_lengths(3000)
    a = TokenBatchSampler(src, tgt, max_tokens=2000, seed=7)
    b = TokenBatchSampler(src, tgt, max_tokens=2000, seed=7)
    c = TokenBatchSampler(src, tgt, max_tokens=2000, seed=8)
    e0 = list(a)
    assert e0 == list(b)
    assert e0 != list(c)
    a.next_epoch()
    assert a.epoch == 1 and a.position == 0
    assert list(a) != e0
    b.set_epoch(1)
    assert list(b) == a.batches()


def test_batch_list_is_computed_once_per_epoch(monkeypatch):
    src, tgt = lognormal_lengths(500)
    s = TokenBatchSampler(src, tgt, max_tokens=1000, seed=0)
    calls = []
    original = s._make_batches
    monkeypatch.setattr(s, "_make_batches", lambda e: calls.append(e) or original(e))
    len(s), list(s), len(s), s.set_epoch(0), len(s)
    s.next_epoch(), len(s), list(s)
    assert calls == [0, 1]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    src, tgt = lognormal_lengths(2000)
    uninterrupted = TokenBatchSampler(src, tgt, max_tokens=1500, seed=3)
    uninterrupted.set_epoch(2)
    full = list(uninterrupted)

    first = TokenBatchSampler(src, tgt, max_tokens=1500, seed=3)
    first.set_epoch(2)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 10:
            break
    buf = io.BytesIO()
    torch.save({"sampler": first.state_dict()}, buf)  # checkpoints load with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]
    assert state["epoch"] == 2 and state["position"] == 10 and state["seed"] == 3

    resumed = TokenBatchSampler(src, tgt, max_tokens=1500, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop's usual call at the top of the epoch keeps the position
    assert seen + list(resumed) == full
    assert list(resumed) == []  # the epoch is used up until next_epoch()
    resumed.next_epoch()
    uninterrupted.next_epoch()
    assert list(resumed) == list(uninterrupted)


def test_resume_with_changed_settings_restarts_the_epoch(caplog):
    src, tgt = lognormal_lengths(500)
    s = TokenBatchSampler(src, tgt, max_tokens=1000, seed=0)
    it = iter(s)
    next(it), next(it)
    other = TokenBatchSampler(src, tgt, max_tokens=800, seed=0)
    with caplog.at_level(logging.WARNING, logger="nmt.batching"):
        other.load_state_dict(s.state_dict())
    assert other.position == 0 and "max_tokens: 1000 -> 800" in caplog.text
    padded_lengths = TokenBatchSampler(src, tgt, max_tokens=1000, seed=0, length_multiple=8)
    with caplog.at_level(logging.WARNING, logger="nmt.batching"):
        padded_lengths.load_state_dict(s.state_dict())
    assert padded_lengths.position == 0 and "length_multiple: 1 -> 8" in caplog.text


def test_bucketing_beats_random_batches_on_padding(real_lengths):
    for src, tgt in (lognormal_lengths(5000), real_lengths):
        bucketed = TokenBatchSampler(src, tgt, max_tokens=1000, seed=0).batches()
        # the same batch sizes filled with random pairs
        rng = random.Random(0)
        perm = list(range(len(src)))
        rng.shuffle(perm)
        random_batches, start = [], 0
        for b in bucketed:
            random_batches.append(perm[start:start + len(b)])
            start += len(b)
        eff, eff_random = padding_efficiency(bucketed, src, tgt), padding_efficiency(random_batches, src, tgt)
        assert eff > 0.8 and eff > 1.5 * eff_random, (eff, eff_random)


def test_padding_efficiency_definition():
    assert padding_efficiency([[0, 1]], [2, 4], [3, 3]) == (2 + 4 + 3 + 3) / (2 * (4 + 3))
    assert padding_efficiency([], [], []) == 1.0


# ---------------------------------------------------------------------- inference
@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 80), max_size=200), max_sentences=st.integers(0, 20),
       max_tokens=st.integers(0, 300))
def test_batches_for_inference_cover_each_index_once(lengths, max_sentences, max_tokens):
    if max_sentences == 0 and max_tokens == 0:
        with pytest.raises(ValueError):
            batches_for_inference(lengths)
        return
    batches = batches_for_inference(lengths, max_sentences=max_sentences, max_tokens=max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    for b in batches:
        assert b
        if max_sentences:
            assert len(b) <= max_sentences
        if max_tokens and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= max_tokens


def test_batches_for_inference_order_can_be_restored():
    lines = ["a b c", "a", "a b c d e", "a b"]
    batches = batches_for_inference([len(x.split()) for x in lines], max_sentences=3)
    assert batches == [[2, 0, 3], [1]]
    out = [None] * len(lines)
    for b in batches:
        for i in b:
            out[i] = lines[i].upper()
    assert out == [x.upper() for x in lines]
