"""Transformer invariants on tiny random models (CPU, fixed seeds, no golden floats)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nmt.config import ConfigError, ModelConfig
from nmt.loss import label_smoothed_nll
from nmt.model import KVCache, Transformer

V, PAD = 23, 0


def make(seed: int = 0, vocab: tuple[int, int] = (V, V), **kw) -> Transformer:
    base = dict(d_model=32, layers=2, heads=4, ffn=48, dropout=0.1, attention_dropout=0.1,
                activation_dropout=0.1, max_positions=40)
    base.update(kw)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**base), *vocab, pad_id=PAD)


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, shape, generator=g)  # never PAD


def decode_steps(model: Transformer, tgt: torch.Tensor, memory, mask, chunks: list[int]):
    """Decode ``tgt`` chunk by chunk through the cache; returns logits of all positions."""
    out, cache, pos = [], None, 0
    for n in chunks:
        logits, cache = model.decode(tgt[:, pos:pos + n], memory if cache is None else None, mask, cache)
        out.append(logits)
        pos += n
    assert cache.length == pos == tgt.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.fixture(params=["pre", "post"])
def model(request) -> Transformer:
    return make(norm=request.param).eval()


def test_shapes_and_cache_layout(model):
    src, tgt = ids(3, 7), ids(3, 5, seed=2)
    mask = torch.ones(3, 7, dtype=torch.bool)
    memory = model.encode(src, mask)
    assert memory.shape == (3, 7, 32)
    logits, cache = model.decode(tgt, memory, mask)
    assert logits.shape == (3, 5, V) and logits.dtype == torch.float32
    assert isinstance(cache, KVCache) and cache.length == 5 and cache.batch_size == 3
    assert len(cache.self_k) == len(cache.cross_v) == model.cfg.n_decoder_layers
    assert cache.self_k[0].shape == cache.self_v[1].shape == (3, 4, 5, 8)
    assert cache.cross_k[0].shape == (3, 4, 7, 8)
    assert model(src, mask, tgt).shape == (3, 5, V)
    assert (model.pad_id, model.src_vocab_size, model.tgt_vocab_size, model.max_positions) == (PAD, V, V, 40)


def test_causality(model):
    src, tgt = ids(2, 6), ids(2, 8, seed=2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    changed = tgt.clone()
    changed[:, 5] = (changed[:, 5] % (V - 1)) + 1  # a different non-pad token
    with torch.no_grad():
        a, b = model(src, mask, tgt), model(src, mask, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_source_padding_invariance(model):
    """A sentence alone == the same sentence inside a padded batch (pad slots hold junk ids)."""
    src = ids(3, 9)
    lengths = [5, 9, 3]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    tgt = ids(3, 6, seed=2)
    with torch.no_grad():
        memory = model.encode(src, mask)
        logits, _ = model.decode(tgt, memory, mask)
        for i, n in enumerate(lengths):
            alone_mem = model.encode(src[i:i + 1, :n], mask[i:i + 1, :n])
            alone_logits, _ = model.decode(tgt[i:i + 1], alone_mem, mask[i:i + 1, :n])
            torch.testing.assert_close(memory[i:i + 1, :n], alone_mem, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[i:i + 1], alone_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 3], [2, 5]])
def test_incremental_decoding_equals_full(model, chunks):
    src, tgt = ids(3, 6), ids(3, 7, seed=2)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool)
    with torch.no_grad():
        memory = model.encode(src, mask)
        full, full_cache = model.decode(tgt, memory, mask)
        steps, cache = decode_steps(model, tgt, memory, mask, chunks)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    for a, b in zip(cache.self_k + cache.self_v, full_cache.self_k + full_cache.self_v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cache_is_a_value(model):
    """Decoding twice from one cache (branching) changes neither that cache nor the other branch."""
    src, tgt = ids(2, 5), ids(2, 6, seed=2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    other = ids(2, 1, seed=3)
    with torch.inference_mode():
        memory = model.encode(src, mask)
        _, base = decode_steps(model, tgt[:, :3], memory, mask, [1, 1, 1])
        before = [k.clone() for k in base.self_k]
        a1, ca = model.decode(tgt[:, 3:4], None, mask, base)       # grows in place
        b1, cb = model.decode(other, None, mask, base)              # must not overwrite branch a
        a2, _ = model.decode(tgt[:, 4:6], None, mask, ca)           # continue branch a
        full, _ = model.decode(tgt, memory, mask)
        branch_b, _ = model.decode(torch.cat([tgt[:, :3], other], 1), memory, mask)
    for k, k0 in zip(base.self_k, before):
        assert torch.equal(k, k0)
    torch.testing.assert_close(torch.cat([a1, a2], 1), full[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(b1, branch_b[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["inference", "grad"])
def test_select_reorders_consistently(model, mode):
    src, tgt = ids(3, 6), ids(3, 5, seed=2)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], dtype=torch.bool)
    index = torch.tensor([2, 0, 0, 1, 2])  # reorder and expand, as beam search does
    ctx = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    with ctx:
        _, cache = decode_steps(model, tgt[:, :4], model.encode(src, mask), mask, [1, 1, 2])
        moved = cache.select(index)
        assert moved.batch_size == 5 and moved.length == 4
        after, _ = model.decode(tgt[index, 4:], None, mask[index], moved)
        ref, _ = model.decode(tgt[index], model.encode(src[index], mask[index]), mask[index])
    torch.testing.assert_close(after, ref[:, 4:], atol=1e-5, rtol=0)


def test_select_without_cross_within_beam_groups(model):
    """Beams of one sentence share cross K/V, so reordering inside groups may skip them."""
    beam = 3
    src = ids(2, 5).repeat_interleave(beam, 0)
    mask = torch.ones(6, 5, dtype=torch.bool)
    tgt = ids(6, 4, seed=2)
    index = torch.tensor([2, 2, 0, 4, 3, 3])  # stays inside {0,1,2} and {3,4,5}
    with torch.inference_mode():
        _, cache = decode_steps(model, tgt[:, :3], model.encode(src, mask), mask, [1, 2])
        moved = cache.select(index, cross=False)
        assert moved.cross_k[0] is cache.cross_k[0]
        after, _ = model.decode(tgt[index, 3:], None, mask, moved)
        ref, _ = model.decode(tgt[index], model.encode(src, mask), mask)
    torch.testing.assert_close(after, ref[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("share", ["all", "decoder", "none"])
def test_embedding_sharing_ties_exactly_the_right_parameters(share):
    vocab = (V, V) if share == "all" else (V, V + 7)
    m = make(share_embeddings=share, vocab=vocab)
    src, tgt, out = (m.src_embed.weight.data_ptr(), m.tgt_embed.weight.data_ptr(),
                     m.output_proj.weight.data_ptr())
    expected = {"all": (True, True), "decoder": (False, True), "none": (False, False)}[share]
    assert (src == tgt, tgt == out) == expected
    assert src != out or share == "all"
    assert m.output_proj.bias is None and m.output_proj.weight.shape == (vocab[1], 32)
    n_unique = len({p.data_ptr() for p in m.parameters()})
    assert n_unique == len(list(m.parameters()))  # parameters() lists a tied matrix once


def test_share_all_needs_one_vocabulary():
    with pytest.raises(ConfigError, match="share_embeddings=all"):
        make(share_embeddings="all", vocab=(V, V + 1))


def test_init_and_state_dict():
    m = make(share_embeddings="none")
    for emb in (m.src_embed, m.tgt_embed):
        assert torch.all(emb.weight[PAD] == 0)
    assert all(torch.all(mod.bias == 0) for mod in m.modules()
               if isinstance(mod, torch.nn.Linear) and mod.bias is not None)
    state = m.state_dict()
    assert not any("positions" in k for k in state)  # recomputed, not saved
    clone = make(seed=5, share_embeddings="none").eval()
    clone.load_state_dict(state)
    src, tgt = ids(2, 4), ids(2, 3, seed=2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.equal(clone(src, mask, tgt), m.eval()(src, mask, tgt))


def test_eval_is_deterministic_and_train_uses_dropout():
    m = make(dropout=0.3)
    src, tgt = ids(2, 6), ids(2, 5, seed=2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(src, mask, tgt), m(src, mask, tgt))
        m.train()
        assert not torch.allclose(m(src, mask, tgt), m(src, mask, tgt))


def test_too_long_input_raises_a_clear_error():
    m = make(max_positions=8).eval()
    with pytest.raises(ValueError, match="max_positions=8"):
        m.encode(ids(1, 9), torch.ones(1, 9, dtype=torch.bool))
    mask = torch.ones(1, 4, dtype=torch.bool)
    memory = m.encode(ids(1, 4), mask)
    _, cache = m.decode(ids(1, 8), memory, mask)  # exactly max_positions is fine
    with pytest.raises(ValueError, match="max_positions=8"):
        m.decode(ids(1, 1), None, mask, cache)


def test_empty_source_row_stays_finite():
    m = make().eval()
    src = ids(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    logits = m(src, mask, ids(2, 3, seed=2))
    assert torch.isfinite(logits).all()


def test_bf16_autocast_returns_compute_dtype_logits():
    m = make().eval()
    src, mask = ids(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = m.decode(ids(2, 2, seed=2), m.encode(src, mask), mask)
        step, _ = m.decode(ids(2, 1, seed=3), None, mask, cache.select(torch.tensor([1, 0])))
    assert logits.dtype == step.dtype == torch.bfloat16


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_tiny_model_overfits_a_tiny_batch(norm):
    m = make(norm=norm, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
             activation="gelu" if norm == "post" else "relu")
    src, tgt = ids(4, 7), ids(4, 7, seed=2)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[2, 5:] = False
    tgt[3, 5:] = PAD  # a padded target as well
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss, _, n = label_smoothed_nll(m(src, mask, tgt_in), tgt_out, PAD, 0.0)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append((loss / n).item())
    assert losses[-1] < 0.1 * losses[0]
    # tied rows still trained; the config object is left as given
    assert dataclasses.asdict(m.cfg)["norm"] == norm


# ----------------------------------------------------------------------------- beam-grouped cache
def grouped(model, beams: int = 3, steps: int = 3):
    """2 sentences (one padded) decoded ``steps`` tokens, then spread to ``beams`` rows each."""
    src = ids(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    tgt = ids(2, steps, seed=2)
    memory = model.encode(src, mask)
    _, cache = decode_steps(model, tgt, memory, mask, [1] * steps)
    index = torch.arange(2).repeat_interleave(beams)
    return src, mask, tgt, memory, cache, index


def test_for_beams_shares_cross_kv_and_equals_per_row_copies(model):
    """Beams querying their sentence's K/V together == each beam with its own copy."""
    with torch.inference_mode():
        src, mask, tgt, memory, cache, index = grouped(model)
        shared = cache.for_beams(index, 3, capacity=10)
        assert shared.cross_k[0] is cache.cross_k[0] and shared.sentences == 2
        assert shared.batch_size == 6 and shared.beams == 3 and shared._room.capacity == 10
        nxt = ids(6, 2, seed=4)
        a, a_cache = model.decode(nxt, None, mask, shared)              # src_mask per sentence
        b, _ = model.decode(nxt, None, mask[index], cache.select(index))  # per row
        full, _ = model.decode(torch.cat([tgt[index], nxt], 1), memory[index], mask[index])
        assert a_cache.beams == 3 and a_cache.length == 5
        with pytest.raises(ValueError, match="src_mask of 6 rows for 2 source sentences"):
            model.decode(nxt[:, :1], None, mask[index], a_cache)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, full[:, 3:], atol=1e-5, rtol=0)


def test_reorder_in_place_equals_select_and_consumes_the_cache(model):
    with torch.inference_mode():
        src, mask, tgt, memory, cache, index = grouped(model)
        _, cache = model.decode(ids(6, 1, seed=3), None, mask, cache.for_beams(index, 3))
        older = cache
        _, cache = model.decode(ids(6, 1, seed=5), None, mask, cache)
        parents = torch.tensor([0, 0, 1, 5, 4, 5])       # within each sentence's rows
        copied = cache.select(parents, cross=False)       # the reference: a full copy
        buffers = [k.data_ptr() for k in cache._room.k]
        row4 = cache.self_k[0][4].clone()
        moved = cache.reorder_(parents)
        assert [k.data_ptr() for k in moved._room.k] == buffers           # no new buffers
        assert torch.equal(moved.self_k[0][4], row4)                       # a row in its own slot
        for a, b in zip(moved.self_k + moved.self_v, copied.self_k + copied.self_v):
            assert torch.equal(a, b)
        nxt = ids(6, 2, seed=6)
        after, _ = model.decode(nxt, None, mask, moved)
        ref, _ = model.decode(nxt, None, mask, copied)
        for stale in (cache, older):
            with pytest.raises(RuntimeError, match="consumed by reorder_"):
                model.decode(nxt, None, mask, stale)
    torch.testing.assert_close(after, ref, atol=1e-6, rtol=0)


def test_reorder_dropping_sentences_equals_select(model):
    with torch.inference_mode():
        src, mask, tgt, memory, cache, index = grouped(model)
        _, cache = model.decode(ids(6, 1, seed=3), None, mask, cache.for_beams(index, 3))
        parents = torch.tensor([5, 3, 3])                 # only sentence 1 goes on
        ref, _ = model.decode(ids(3, 1, seed=4), None, mask[[1, 1, 1]], cache.select(parents))
        moved = cache.reorder_(parents, torch.tensor([1]))
        assert moved.batch_size == 3 and moved.sentences == 1
        after, _ = model.decode(ids(3, 1, seed=4), None, mask[1:], moved)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=0)


def test_reorder_copies_when_it_may_not_write_in_place(model):
    """Under autograd (or on a cache without buffers of its own) reorder_ is a plain select."""
    src, mask, tgt = ids(2, 5), torch.ones(2, 5, dtype=torch.bool), ids(2, 3, seed=2)
    memory = model.encode(src, mask)
    _, cache = decode_steps(model, tgt, memory, mask, [1, 1, 1])
    before = [k.clone() for k in cache.self_k]
    moved = cache.reorder_(torch.tensor([1, 1]))
    assert all(torch.equal(k, k0) for k, k0 in zip(cache.self_k, before))
    assert all(torch.equal(k[0], k0[1]) and torch.equal(k[1], k0[1]) for k, k0 in zip(moved.self_k, before))


@pytest.mark.parametrize("length", [1, 7, 40])
def test_one_query_attention_matches_sdpa(length):
    """The CPU decoding-step kernel computes what SDPA computes (up to float rounding)."""
    from nmt.model.layers import one_query_attention
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((6, 4, 1, 8), (6, 4, length, 8), (6, 4, length, 8)))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = one_query_attention(q, k, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_word_dropout_blanks_whole_tokens_in_training_only():
    m = make(source_word_dropout=0.5, target_word_dropout=0.5, dropout=0.0, attention_dropout=0.0,
             activation_dropout=0.0)
    plain = make(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    src, tgt = ids(4, 30), ids(4, 6, seed=2)
    mask = torch.ones(4, 30, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(m.eval()(src, mask, tgt), plain.eval()(src, mask, tgt))   # off at evaluation
        m.train()
        torch.manual_seed(0)
        x = m._embed(m.src_embed, src, 0, 0.5) - m.positions[:30]
    token = m.src_embed(src) * m.embed_scale
    blank = x.abs().sum(-1) == 0
    assert 0.3 < blank.float().mean().item() < 0.7                 # about half the tokens, each entirely
    torch.testing.assert_close(x[~blank], 2 * token[~blank])        # the others scaled by 1 / (1 - p)


def test_word_dropout_is_validated():
    from nmt.config import Config, validate

    cfg = Config()
    cfg.train.max_steps = 1
    cfg.model.source_word_dropout = 1.0
    with pytest.raises(ConfigError, match="source_word_dropout"):
        validate(cfg)
