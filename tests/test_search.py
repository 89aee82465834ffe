"""Search and logit processors: hand-checked vectors and invariants on tiny random models."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt import search as search_mod
from nmt.config import DecodeConfig, ModelConfig
from nmt.logits import (apply_repetition_penalty, block_repeated_ngrams, length_penalty,
                        top_k_top_p_filter)
from nmt.model import KVCache, Transformer
from nmt.search import Hypothesis, beam_search, greedy_search, max_lengths, next_logprobs, search

PAD, BOS, EOS = 0, 2, 3
V = 24
INF = float("inf")


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    """Tiny random model made 'lively': varied tokens, EOS at different steps."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, layers=2, heads=4, ffn=64, dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0, share_embeddings="none", max_positions=64)
    m = Transformer(cfg, V, V, pad_id=PAD).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.mul_(3.0)            # random init is too smooth: it repeats one token forever
        m.output_proj.weight.mul_(4.0)
        m.output_proj.weight[EOS].mul_(2.0)
    return m


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """6 source sentences of lengths 9, 4, 7, 9, 2, 6, right-padded."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 4, 7, 9, 2, 6])
    src = torch.randint(4, V, (6, 9), generator=g)
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return src.masked_fill(~mask, PAD), mask


def cfg_(**kw) -> DecodeConfig:
    base = dict(max_len_a=0.0, max_len_b=12, length_penalty=1.0)
    return DecodeConfig(**{**base, **kw})


def toks(results: list[list[Hypothesis]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in results]


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# ----------------------------------------------------------------------------- repetition penalty
def test_repetition_penalty_divides_positive_multiplies_negative():
    scores = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_repetition_penalty(scores, torch.tensor([[0, 1]]), 2.0, ignore_ids=())
    assert out.tolist() == [[1.0, -2.0, 0.5]]
    assert scores.tolist() == [[2.0, -1.0, 0.5]]          # input untouched


def test_repetition_penalty_counts_a_repeated_token_once_and_is_batched():
    scores = torch.tensor([[4.0, -1.0, 3.0, 1.0], [4.0, -1.0, 3.0, 1.0]])
    history = torch.tensor([[1, 1, 1, 1], [0, 2, 0, 3]])
    out = apply_repetition_penalty(scores, history, 2.0, ignore_ids=())
    assert out.tolist() == [[4.0, -2.0, 3.0, 1.0], [2.0, -1.0, 1.5, 0.5]]


def test_repetition_penalty_ignores_bos_and_pad_and_penalty_one_is_identity():
    scores = torch.tensor([[4.0, -1.0, 3.0, 1.0, 8.0]])
    history = torch.tensor([[2, 4, 0, 0]])                  # BOS, token 4, PAD, PAD
    out = apply_repetition_penalty(scores, history, 2.0, ignore_ids=(BOS, PAD))
    assert out.tolist() == [[4.0, -1.0, 3.0, 1.0, 4.0]]
    assert apply_repetition_penalty(scores, history, 1.0).tolist() == scores.tolist()


# ----------------------------------------------------------------------------- n-gram blocking
def banned(scores: torch.Tensor) -> list[list[int]]:
    return [[i for i, x in enumerate(row) if x == -INF] for row in scores.tolist()]


@pytest.mark.parametrize("n, history, expected", [
    (3, [5, 6, 7, 5, 6], [7]),        # the example of the spec
    (3, [7, 8, 9, 7, 8], [9]),        # the n-gram at the very start
    (2, [4, 5, 4], [5]),
    (2, [1, 2, 1, 3, 1], [2, 3]),     # every earlier continuation of the suffix
    (2, [1, 2, 3, 2, 1], [2]),        # 2 follows 1 once and follows 3 too: still banned
    (1, [4, 5, 4], [4, 5]),           # n=1: no token twice
    (3, [5, 6], []),                  # shorter than n: nothing to block
    (3, [5, 6, 7, 6, 5], []),         # suffix (6, 5) never seen before
])
def test_block_repeated_ngrams_vectors(n, history, expected):
    scores = torch.zeros(1, 10)
    assert banned(block_repeated_ngrams(scores, torch.tensor([history]), n)) == [expected]


def naive_ngram_ban(history: list[int], n: int, vocab: int) -> list[int]:
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    out = set()
    for i in range(len(history) - n + 1):
        if tuple(history[i:i + n - 1]) == prefix:
            out.add(history[i + n - 1])
    return sorted(t for t in out if t < vocab)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.lists(st.lists(st.integers(0, 5), min_size=7, max_size=7), min_size=1, max_size=4))
def test_block_repeated_ngrams_matches_naive_reference(n, histories):
    scores = torch.randn(len(histories), 6)
    out = block_repeated_ngrams(scores, torch.tensor(histories), n)
    assert banned(out) == [naive_ngram_ban(h, n, 6) for h in histories]
    kept = out != -INF
    assert torch.equal(out[kept], scores[kept])


# ----------------------------------------------------------------------------- other processors
def test_length_penalty_modes():
    assert length_penalty(4, 0.0, "power") == 1.0
    assert length_penalty(4, 1.0, "power") == 4.0
    assert length_penalty(9, 0.5, "power") == 3.0
    assert length_penalty(1, 1.0, "gnmt") == 1.0
    assert length_penalty(7, 2.0, "gnmt") == 4.0
    assert torch.allclose(length_penalty(torch.tensor([1.0, 4.0]), 2.0), torch.tensor([1.0, 16.0]))
    with pytest.raises(ValueError, match="power, gnmt"):
        length_penalty(3, 1.0, "linear")


def test_top_k_top_p_filter():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert banned(top_k_top_p_filter(logits, top_k=2)) == [[2, 3]]
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert banned(top_k_top_p_filter(probs, top_p=0.6)) == [[2]]
    assert banned(top_k_top_p_filter(probs, top_p=0.5)) == [[1, 2]]
    assert banned(top_k_top_p_filter(probs, top_p=1e-6)) == [[1, 2]]   # the best token survives
    assert banned(top_k_top_p_filter(probs)) == [[]]


def test_max_lengths_per_sentence_and_capped_by_positions():
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    assert max_lengths(mask, DecodeConfig(max_len_a=1.5, max_len_b=2), 100).tolist() == [8, 11]
    assert max_lengths(mask, DecodeConfig(max_len_a=1.5, max_len_b=2), 10).tolist() == [8, 9]


# ----------------------------------------------------------------------------- search invariants
def reference_greedy(model, src, mask, cfg) -> list[list[int]]:
    """Slow greedy: one sentence at a time, the whole prefix re-decoded without a cache."""
    limits = max_lengths(mask, cfg, model.max_positions).tolist()
    out = []
    with torch.no_grad():
        for i in range(src.shape[0]):
            s, m = src[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())]
            memory, prefix = model.encode(s, m), torch.tensor([[BOS]])
            for step in range(limits[i]):
                logits, _ = model.decode(prefix, memory, m, None)
                tok = next_logprobs(logits[:, -1], prefix, step, cfg, BOS, EOS, PAD).argmax(-1)
                prefix = torch.cat((prefix, tok[:, None]), dim=1)
                if tok.item() == EOS:
                    break
            seq = prefix[0, 1:].tolist()
            out.append(seq[:-1] if seq[-1] == EOS else seq)
    return out


@pytest.mark.parametrize("kw", [{}, {"no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "min_len": 3}])
def test_cached_batched_greedy_equals_uncached_one_by_one(model, batch, kw):
    cfg = cfg_(**kw)
    got = [hyps[0].tokens for hyps in greedy_search(model, *batch, cfg)]
    assert got == reference_greedy(model, *batch, cfg)


@pytest.mark.parametrize("kw", [{}, {"no_repeat_ngram_size": 3, "repetition_penalty": 1.5}])
def test_beam_one_equals_greedy(model, batch, kw):
    cfg = cfg_(length_penalty=0.0, **kw)
    g, b = greedy_search(model, *batch, cfg), beam_search(model, *batch, cfg)
    assert toks(g) == toks(b)
    for hg, hb in zip(g, b):
        assert hg[0].logprob == pytest.approx(hb[0].logprob, abs=1e-4)


@pytest.mark.parametrize("fn, k", [(greedy_search, 1), (beam_search, 4)])
def test_sentence_in_padded_batch_equals_alone(model, batch, fn, k):
    src, mask = batch
    cfg = cfg_(beam_size=k, nbest=min(2, k), max_len_a=1.0, max_len_b=3, no_repeat_ngram_size=3)
    together = fn(model, src, mask, cfg)
    for i in range(src.shape[0]):
        n = int(mask[i].sum())
        alone = fn(model, src[i:i + 1, :n], mask[i:i + 1, :n], cfg)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[i]], abs=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 3])
def test_no_repeated_ngram_in_outputs(model, batch, n, k):
    cfg = cfg_(beam_size=k, nbest=k, no_repeat_ngram_size=n, max_len_b=16, min_len=8)
    for hyps in search(model, *batch, cfg):
        assert hyps and not any(has_repeated_ngram(h.tokens, n) for h in hyps)


@pytest.mark.parametrize("k", [1, 3])
def test_min_and_max_length(model, batch, k):
    src, mask = batch
    src_len = mask.sum(1).tolist()
    # min_len >= max_len: exactly max_len tokens, per sentence (max_len_a=1, b=2)
    exact = search(model, src, mask, cfg_(beam_size=k, nbest=k, min_len=100, max_len_a=1.0, max_len_b=2))
    assert [[len(h.tokens) for h in hyps] for hyps in exact] == [[n + 2] * k for n in src_len]
    free = search(model, src, mask, cfg_(beam_size=k, nbest=k, min_len=5, max_len_a=1.0, max_len_b=2))
    for hyps, n in zip(free, src_len):
        assert all(min(5, n + 2) <= len(h.tokens) <= n + 2 for h in hyps)
    if k == 1:  # the cap is shared code; one strategy is enough to check it end to end
        capped = search(model, src[:1], mask[:1], cfg_(min_len=1000, max_len_b=1000))
        assert len(capped[0][0].tokens) == model.max_positions - 1


def rescore(model, src, mask, tokens: list[int], ended: bool, cfg) -> float:
    """Sum of processed log-probs of BOS tokens [EOS] under uncached teacher forcing."""
    seq = torch.tensor([[BOS] + tokens + ([EOS] if ended else [])])
    with torch.no_grad():
        logits, _ = model.decode(seq[:, :-1], model.encode(src, mask), mask, None)
        return sum(next_logprobs(logits[:, i], seq[:, :i + 1], i, cfg, BOS, EOS, PAD)[0, seq[0, i + 1]].item()
                   for i in range(seq.shape[1] - 1))


@pytest.mark.parametrize("mode, alpha", [("power", 1.0), ("gnmt", 0.6), ("power", 0.0)])
def test_nbest_sorted_and_scores_match_rescoring(model, batch, mode, alpha):
    src, mask = batch
    cfg = cfg_(beam_size=4, nbest=3, length_penalty=alpha, length_penalty_mode=mode,
               no_repeat_ngram_size=2, repetition_penalty=1.2)
    limits = max_lengths(mask, cfg, model.max_positions).tolist()
    results = beam_search(model, src, mask, cfg)
    for i, hyps in enumerate(results):
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        n = int(mask[i].sum())
        for h in hyps:
            ended = len(h.tokens) < limits[i]
            assert h.logprob == pytest.approx(rescore(model, src[i:i + 1, :n], mask[i:i + 1, :n],
                                                      h.tokens, ended, cfg), abs=1e-3)
            length = len(h.tokens) + ended
            assert h.score == pytest.approx(h.logprob / length_penalty(length, alpha, mode), rel=1e-5)


def test_beam_finds_the_best_two_token_sequence_among_its_beams(model, batch):
    """With two forced steps beam search is exact over its K first tokens, so >= greedy."""
    src, mask = batch
    k = 3
    cfg = cfg_(beam_size=k, length_penalty=0.0, min_len=2, max_len_b=2)
    beam, greedy = beam_search(model, src, mask, cfg), greedy_search(model, src, mask, cfg)
    for i in range(src.shape[0]):
        n = int(mask[i].sum())
        s, m = src[i:i + 1, :n], mask[i:i + 1, :n]
        with torch.no_grad():
            memory = model.encode(s, m)
            bos = torch.tensor([[BOS]])
            first = next_logprobs(model.decode(bos, memory, m)[0][:, -1], bos, 0, cfg, BOS, EOS, PAD)[0]
            best = -INF
            for a in first.topk(k).indices.tolist():
                prefix = torch.tensor([[BOS, a]])
                second = next_logprobs(model.decode(prefix, memory, m)[0][:, -1], prefix, 1, cfg, BOS, EOS, PAD)
                best = max(best, first[a].item() + second.max().item())
        assert beam[i][0].logprob == pytest.approx(best, abs=1e-4)
        assert beam[i][0].logprob >= greedy[i][0].logprob - 1e-4


def test_early_stopping_changes_nothing(model, batch, monkeypatch):
    cfg = cfg_(beam_size=4, nbest=4, max_len_b=14)
    for alpha in (0.0, 1.0):
        c = replace(cfg, length_penalty=alpha)
        early = beam_search(model, *batch, c)
        monkeypatch.setattr(search_mod, "_cannot_improve", lambda key, *a: torch.zeros(key.shape[0], dtype=torch.bool))
        full = beam_search(model, *batch, c)
        monkeypatch.undo()
        assert toks(early) == toks(full)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model, batch):
    cfg = cfg_(sampling=True, temperature=1.5)
    a = greedy_search(model, *batch, cfg, generator=torch.Generator().manual_seed(7))
    b = greedy_search(model, *batch, cfg, generator=torch.Generator().manual_seed(7))
    assert toks(a) == toks(b)
    greedy = toks(greedy_search(model, *batch, cfg_(no_repeat_ngram_size=2)))
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = search(model, *batch, cfg_(sampling=True, no_repeat_ngram_size=2, **kw),
                         generator=torch.Generator().manual_seed(3))
        assert toks(sampled) == greedy


def test_search_dispatch_and_sampling_needs_beam_one(model, batch):
    assert toks(search(model, *batch, cfg_(beam_size=1))) == toks(greedy_search(model, *batch, cfg_()))
    assert toks(search(model, *batch, cfg_(beam_size=3))) == toks(beam_search(model, *batch, cfg_(beam_size=3)))
    with pytest.raises(ValueError, match="beam_size=1"):
        search(model, *batch, cfg_(beam_size=3, sampling=True))


def test_inplace_processing_equals_pure():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    history = torch.cat((torch.full((6, 1), BOS), torch.randint(4, V, (6, 9), generator=g)), dim=1)
    cfg = cfg_(repetition_penalty=1.3, no_repeat_ngram_size=2, min_len=20)
    pure = next_logprobs(logits, history, 3, cfg, BOS, EOS, PAD, temperature=0.7)
    scratch, out = logits.clone(), torch.empty(6, V)
    assert next_logprobs(scratch, history, 3, cfg, BOS, EOS, PAD, temperature=0.7, out=out) is out
    assert torch.equal(pure, out)
    assert banned(out[:1]) == [sorted({BOS, PAD, EOS} | set(naive_ngram_ban(history[0].tolist(), 2, V)))]
    for fn, args in ((apply_repetition_penalty, (1.3,)), (block_repeated_ngrams, (2,))):
        x = logits.clone()
        assert fn(x, history, *args, inplace=True) is x and torch.equal(x, fn(logits, history, *args))


# ----------------------------------------------------------------------------- in-place cache path
class _PerRowCrossModel:
    """The model as beam search used it before shared cross K/V: every hypothesis
    gets its own copy of its sentence's cross K/V (and of the source mask)."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.max_positions = model, model.max_positions

    def encode(self, src, mask):
        return self.model.encode(src, mask)

    def decode(self, tgt, memory, mask, cache):
        if cache is not None and mask.shape[0] != cache.batch_size:
            mask = mask.repeat_interleave(cache.batch_size // mask.shape[0], dim=0)
        return self.model.decode(tgt, memory, mask, cache)


def full_copy_beam_search(model, src, mask, cfg, monkeypatch):
    """Beam search on the old path: cross K/V per hypothesis, every cache row copied
    into fresh buffers each step, beams kept in rank order."""
    with monkeypatch.context() as m:
        m.setattr(KVCache, "for_beams", lambda self, index, beams, capacity=None: self.select(index))
        m.setattr(KVCache, "reorder_", lambda self, index, sentences=None: self.select(index))
        m.setattr(search_mod, "_stay_in_place", lambda parent: torch.arange(parent.shape[1]).expand_as(parent))
        return beam_search(_PerRowCrossModel(model), src, mask, cfg)


@pytest.mark.parametrize("kw", [
    dict(beam_size=4, nbest=4, max_len_b=14),                                      # EOS at various steps
    dict(beam_size=3, nbest=2, max_len_a=1.0, max_len_b=2, no_repeat_ngram_size=2,
         repetition_penalty=1.3, length_penalty=0.6, length_penalty_mode="gnmt"),  # sentences stop apart
    dict(beam_size=5, nbest=1, min_len=16, max_len_b=16, no_repeat_ngram_size=3),  # like the benchmark
])
def test_in_place_cache_path_equals_full_copy_path(model, batch, kw, monkeypatch):
    cfg = cfg_(**kw)
    got, ref = beam_search(model, *batch, cfg), full_copy_beam_search(model, *batch, cfg, monkeypatch)
    assert toks(got) == toks(ref)
    for hg, hr in zip(got, ref):
        assert [h.score for h in hg] == pytest.approx([h.score for h in hr], abs=1e-5)


def test_stay_in_place_keeps_one_child_of_each_parent_in_its_slot():
    parent = torch.tensor([[2, 2, 0, 4, 1], [0, 0, 0, 0, 0], [4, 3, 2, 1, 0]])
    order = search_mod._stay_in_place(parent)
    assert order.tolist() == [[2, 4, 0, 1, 3], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    assert parent.gather(1, order).tolist() == [[0, 1, 2, 2, 4], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
