"""label_smoothed_nll and n_correct: reference equalities and a hand-checked case."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.loss import label_smoothed_nll, n_correct

PAD = 0


def batch(seed: int = 0, shape: tuple[int, int] = (3, 5), vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    target = torch.randint(1, vocab, shape, generator=g)
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    return logits, target


def test_no_smoothing_equals_cross_entropy():
    logits, target = batch()
    loss, nll, n = label_smoothed_nll(logits, target, PAD, 0.0)
    ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, ref)
    assert n.item() == 3 + 5 + 1 and n.dtype == torch.long


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0.0, 0.9), seed=st.integers(0, 1000), pad=st.integers(0, 10))
def test_smoothing_matches_torch_convention(eps, seed, pad):
    """The documented convention is F.cross_entropy(label_smoothing=eps)'s (uniform over all V)."""
    logits, target = batch(seed)
    target[target == PAD] = pad
    loss, nll, n = label_smoothed_nll(logits, target, pad, eps)
    flat_logits, flat_target = logits.view(-1, 11), target.view(-1)
    ref = F.cross_entropy(flat_logits, flat_target, ignore_index=pad, reduction="sum", label_smoothing=eps)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    ref_nll = F.cross_entropy(flat_logits, flat_target, ignore_index=pad, reduction="sum")
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-4)
    assert n.item() == int((target != pad).sum())


def test_hand_checked_smoothing():
    # p = (1/2, 1/4, 1/4), target 0, eps = 0.3:
    # nll = log 2; mean(-log p) = (log 2 + 2 log 4) / 3 = 5/3 log 2
    # loss = 0.7 log 2 + 0.3 * 5/3 log 2 = 1.2 log 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    target = torch.tensor([0])
    loss, nll, n = label_smoothed_nll(logits, target, pad_id=2, epsilon=0.3)
    assert loss.item() == pytest.approx(1.2 * math.log(2), rel=1e-6)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-6)
    assert n.item() == 1


def test_padding_positions_do_not_contribute():
    logits, target = batch()
    loss, nll, n = label_smoothed_nll(logits, target, PAD, 0.1)
    wild = logits.clone()
    wild[target == PAD] = torch.tensor(float("inf"))  # garbage at pad positions
    loss2, nll2, n2 = label_smoothed_nll(wild, target, PAD, 0.1)
    assert torch.equal(loss, loss2) and torch.equal(nll, nll2) and torch.equal(n, n2)
    x = logits.clone().requires_grad_()
    label_smoothed_nll(x, target, PAD, 0.1)[0].backward()
    assert torch.all(x.grad[target == PAD] == 0) and x.grad[target != PAD].abs().sum() > 0


def test_all_pad_gives_zero():
    logits, target = batch()
    loss, nll, n = label_smoothed_nll(logits, torch.full_like(target, PAD), PAD, 0.1)
    assert loss.item() == nll.item() == n.item() == 0


def test_low_precision_logits_are_computed_in_float32():
    logits, target = batch()
    loss, nll, _ = label_smoothed_nll(logits.bfloat16(), target, PAD, 0.1)
    ref, _, _ = label_smoothed_nll(logits.bfloat16().float(), target, PAD, 0.1)
    assert loss.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_invalid_epsilon_raises():
    logits, target = batch()
    with pytest.raises(ValueError, match="epsilon"):
        label_smoothed_nll(logits, target, PAD, 1.0)


def test_n_correct():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [9.0, 0.0, 0.0]],
                           [[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    target = torch.tensor([[1, 1, 0], [2, 0, 0]])  # argmax: [[1,2,0],[2,0,0]]
    # row 0: pos 0 right, pos 1 wrong, pos 2 pad (argmax happens to match: must not count)
    # row 1: pos 0 right, pos 1 and 2 pad
    assert n_correct(logits, target, PAD).item() == 2
