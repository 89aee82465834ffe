"""The fast training path equals the plain one: fused output projection + loss, CPU dropout,
explicit attention, fused Adam (CPU, fp32, fixed seeds, no golden floats)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.loss import label_smoothed_nll
from nmt.model import Transformer
from nmt.model.kernels import cpu_dropout, dropout, linear_smoothed_cross_entropy, math_attention

PAD = 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk,tail", [(3, 1), (7, 1), (1000, 1), (7, 4), (6, 16), (1000, 8)])
def test_linear_smoothed_ce_equals_projection_then_label_smoothed_nll(eps, chunk, tail):
    # tail > 1: the last chunk reaches back over rows of the one before (20 rows: 14..20 -> 12..20 for
    # chunk 7 and tail 4), which must still count once
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    weight = torch.randn(30, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 30, (20,), generator=g)
    loss, nll = linear_smoothed_cross_entropy(hidden, weight, target, eps, chunk, tail)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_loss, ref_nll, n = label_smoothed_nll(hidden @ weight.t(), target, -1, eps)
    (ref_loss * 1.0).backward()
    assert n == 20
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)
    assert not nll.requires_grad


def test_linear_smoothed_ce_gradient_scales_with_the_upstream_gradient():
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (5,))
    assert torch.autograd.gradcheck(lambda h, w: 3.0 * linear_smoothed_ce(h, w, target), (hidden, weight))


def linear_smoothed_ce(h, w, target):
    return linear_smoothed_cross_entropy(h, w, target, 0.1, chunk=2)[0]


def test_linear_smoothed_ce_without_grad_and_bad_shapes():
    h, w, t = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    with torch.no_grad():
        loss, _ = linear_smoothed_cross_entropy(h, w, t, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="hidden"):
        linear_smoothed_cross_entropy(h, w, t[:3], 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        linear_smoothed_cross_entropy(h, w, t, 1.0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_cpu_dropout_keeps_the_expectation_and_the_rate(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = cpu_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005                      # ~5 standard deviations at this size
    assert abs(y.mean().item() - 1.0) < 0.01             # inverted dropout: E[y] = x
    kept = y[y != 0]
    assert torch.allclose(kept, kept[0].expand_as(kept))  # one scale for every kept element


def test_cpu_dropout_is_seeded_and_differentiable():
    x = torch.randn(3, 50, requires_grad=True)
    torch.manual_seed(5)
    a = cpu_dropout(x, 0.2)
    torch.manual_seed(5)
    b = cpu_dropout(x, 0.2)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad == 0, a == 0)              # gradient flows exactly where x was kept
    assert dropout(x, 0.2, training=False) is x and cpu_dropout(x, 0.0) is x


def test_odd_sizes_and_shapes():
    torch.manual_seed(0)
    for shape in [(1,), (3,), (5, 7), (2, 3, 5)]:
        y = cpu_dropout(torch.ones(shape), 0.5)
        assert y.shape == shape


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_equals_sdpa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))
    mask = None if causal else torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)[:, None, None, :]
    torch.testing.assert_close(math_attention(q, k, v, mask, causal),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
                               rtol=1e-5, atol=1e-6)


def small_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, layers=2, heads=4, ffn=48, dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0, max_positions=40)
    return Transformer(cfg, 29, 29, pad_id=PAD)


def batch():
    g = torch.Generator().manual_seed(3)
    src, tgt_in, tgt_out = (torch.randint(4, 29, (3, 9), generator=g) for _ in range(3))
    src_mask = torch.ones(3, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    src[1, 6:] = PAD
    tgt_out[2, 5:] = PAD
    tgt_in[2, 6:] = PAD
    return src, src_mask, tgt_in, tgt_out


def test_one_update_of_the_fast_path_equals_the_plain_path():
    """model(..., tgt_out) + fused Adam == logits -> label_smoothed_nll + Adam's per-tensor loop."""
    from nmt.config import OptimConfig
    from nmt.optim import build_optimizer

    src, src_mask, tgt_in, tgt_out = batch()
    fast, plain = small_model(), small_model()
    # Adam's first step is lr * g / (|g| + eps): with eps 1e-9, gradients that are rounding noise
    # (the key bias's is exactly 0 in exact arithmetic) would move by +-lr on their sign alone
    cfg = OptimConfig(name="constant", lr=1e-3, warmup_steps=0, eps=1e-6)
    fast_opt = build_optimizer(fast.parameters(), cfg, 32, None)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    loss, nll, n = fast(src, src_mask, tgt_in, tgt_out, 0.1)
    (loss / n).backward()
    ref, ref_nll, ref_n = label_smoothed_nll(plain(src, src_mask, tgt_in), tgt_out, PAD, 0.1)
    (ref / ref_n).backward()
    assert int(n) == int(ref_n)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    fast_opt.step()
    plain_opt.step()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_training_path_stays_close_to_fp32():
    src, src_mask, tgt_in, tgt_out = batch()
    model = small_model().train()
    loss32, _, n = model(src, src_mask, tgt_in, tgt_out, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _, _ = model(src, src_mask, tgt_in, tgt_out, 0.1)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) / n < 0.02


def test_an_unsynchronised_step_skips_a_non_finite_update_on_the_device():
    """train_step(sync=False), the CUDA path, tried on the CPU's fused Adam: a NaN gradient leaves
    weights and Adam's state as they were, without the host reading anything; a good step moves them."""
    from nmt.batching import collate
    from nmt.config import OptimConfig
    from nmt.optim import build_optimizer
    from nmt.step import train_step

    model = small_model()
    opt = build_optimizer(model.parameters(), OptimConfig(name="constant", lr=1e-3, warmup_steps=0), 32, None)
    if not opt.fused:
        pytest.skip("this torch has no fused Adam on the CPU")   # (torch < 2.4)
    batch = collate([[5, 6, 7, 3], [8, 3]], [[9, 10], [11, 12, 13]], [0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.output_proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    u = train_step(model, model, opt, [batch], torch.device("cpu"), None, 0.1, 1.0, sync=False)
    hook.remove()
    assert isinstance(u.ok, torch.Tensor) and not bool(u.ok)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(float(s["step"]) == 0 for s in opt.optimizer.state.values())   # Adam's step count was rolled back
    u = train_step(model, model, opt, [batch], torch.device("cpu"), None, 0.1, 1.0, sync=False)
    assert bool(u.ok) and not torch.equal(before["output_proj.weight"], model.output_proj.weight)


def test_collate_rounds_lengths_up_to_a_multiple():
    from nmt.batching import collate

    b = collate([[5, 6, 7, 3], [8, 3]], [[9, 10], [11, 12, 13]], [0, 1], multiple=8)
    assert b.src.shape == b.tgt_in.shape == b.tgt_out.shape == (2, 8)
    assert b.n_src_tokens == 6 and b.n_tgt_tokens == 7 and int(b.src_mask.sum()) == 6


@pytest.mark.slow
def test_one_compiled_update_equals_the_plain_one():
    """train.compile: torch.compile'd forward passes give the same loss and gradients (fp32, CPU).

    Gradients, not Adam's update, are compared: the key bias has a true gradient of zero, and Adam
    turns rounding noise of 1e-10 in it into a full step of either sign."""
    src, src_mask, tgt_in, tgt_out = batch()
    plain, compiled = small_model(), small_model()
    results = []
    for model, forward in ((plain, plain), (compiled, torch.compile(compiled, dynamic=True))):
        loss, _, n = forward(src, src_mask, tgt_in, tgt_out, 0.1)
        (loss / n).backward()
        results.append(loss.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())   # the plain module's names
