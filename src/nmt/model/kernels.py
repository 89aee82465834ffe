"""The two hot spots of a CPU training step that PyTorch's defaults serve badly: dropout and attention.

Measured on a 2-core AVX-512 CPU (torch 2.13, ``scripts/bench.py train``):

- ``nn.Dropout`` draws one Bernoulli sample per element from a scalar generator
  (about 9 ns per element: 4.6 ms for one [2048 tokens, 256] activation, ~8% of
  a step with 22 dropout sites). :func:`dropout` draws 64 random bits per
  generator call and cuts them into four 16-bit uniforms, five times cheaper.
- ``F.scaled_dot_product_attention`` on the CPU runs a flash-attention kernel
  whose backward pass in bfloat16 is 3-4x slower than three plain batched
  matmuls for the short sequences of translation (and which falls back to an
  unfused path anyway when attention dropout is on). :func:`attention` picks
  the explicit computation there and SDPA everywhere else (on CUDA it selects
  the flash / memory-efficient kernels, dropout included).

Masks are boolean, True = "may attend", as for SDPA.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16    # dropout probabilities are rounded to multiples of 1/65536


def cpu_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout of ``x`` (zero with probability ~p, else scaled by 1/(1 - p)).

    Random bits come from the default CPU generator (so ``torch.manual_seed`` and
    the checkpointed RNG state make it reproducible), 64 per call, used as four
    16-bit uniforms: p is rounded to a multiple of 1/65536 and the scale uses the
    rounded value, so the expectation of the output is exactly x.
    """
    n = x.numel()
    cut = round(p * _LEVELS)                        # drop where the 16-bit uniform is below cut
    if cut == 0 or n == 0:
        return x
    if cut >= _LEVELS:
        return torch.zeros_like(x)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = words.view(torch.int16)[:n].view(x.shape)     # signed: -32768..32767
    drop = uniform < (cut - _LEVELS // 2)
    return x.masked_fill(drop, 0.0).mul_(_LEVELS / (_LEVELS - cut))


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` semantics; on the CPU drawn by :func:`cpu_dropout` (same distribution up to
    the rounding of p to 1/65536, a different random stream)."""
    if not training or p == 0.0:
        return x
    if x.device.type == "cpu":
        return cpu_dropout(x, p)
    return F.dropout(x, p, True)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s faster CPU sampling."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
                   dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(dh) + mask) v as three plain ops: q [..., T, dh], k/v [..., S, dh] -> [..., T, dh].

    ``is_causal`` lets query i see keys 0..i (top-left aligned, as SDPA). The
    softmax runs in float32 whatever the input dtype; its output goes back to
    v's dtype for the second matmul. Every query row must be allowed at least
    one key (the model's masks guarantee it).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    if is_causal:
        t, s = scores.shape[-2:]
        future = torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, -math.inf)
    weights = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, True)
    return torch.matmul(weights, v)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
              dropout_p: float) -> Tensor:
    """Scaled dot-product attention with the fastest exact kernel for the device and dtype.

    q [B,H,T,dh], k/v [B,H,S,dh], mask broadcastable to [B,H,T,S] -> [B,H,T,dh].
    On the CPU: explicit matmuls for reduced precision, for attention dropout and
    for unmasked one-query decoding steps (where SDPA's fixed cost per row and
    head dominates: ~25% slower there); otherwise (fp32 without dropout, and
    always on CUDA) SDPA.
    """
    one_query = q.shape[-2] == 1 and mask is None
    if q.device.type == "cpu" and (q.dtype != torch.float32 or dropout_p > 0.0 or one_query):
        return math_attention(q, k, v, mask, is_causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


def one_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention of one query per row: q [B,H,1,dh], k/v [B,H,L,dh] -> [B,H,1,dh] (a decoding step)."""
    return math_attention(q, k, v)


class _LinearSmoothedCE(torch.autograd.Function):
    """Output projection + label-smoothed cross-entropy, chunk by chunk, gradients made in the forward pass.

    The loss is a sum, so its gradient is a scalar times d(loss)/d(input), which
    has a closed form per row: ``(softmax(x) - (1 - eps) * onehot - eps / V) @ W``.
    Computing it chunk by chunk while the chunk's logits are in cache never
    materialises the [N, V] logits, their float32 copy or autograd's several
    [N, V] temporaries (on the ``small`` model those passes were a quarter of a
    CPU step). The backward pass only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float,
                chunk: int, tail_multiple: int) -> tuple[Tensor, Tensor]:
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        nll = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
        w = None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            # the last chunk reaches back over rows already done to a size that is a multiple of
            # tail_multiple, so that matmuls see a few shapes, not one per batch; those rows are skipped
            low = max(0, end - -(-(end - start) // tail_multiple) * tail_multiple)
            skip = start - low
            h = hidden[low:end]
            t = target[low:end].unsqueeze(-1)
            logits = torch.mm(h, weight.t())        # the autocast dtype, when autocast is on
            if w is None:
                w = weight.to(logits.dtype)         # for the gradient matmuls, cast once
            lprobs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
            row_nll = lprobs.gather(-1, t).neg_()[skip:]
            nll += row_nll.sum()
            loss += row_nll.sum() if epsilon == 0.0 else \
                (1.0 - epsilon) * row_nll.sum() - epsilon * lprobs[skip:].mean(dim=-1).sum()
            if grads:
                g = lprobs.exp_()                   # softmax, in place of the log-probabilities
                if epsilon:
                    g.sub_(epsilon / vocab)
                g.scatter_add_(-1, t, torch.full(t.shape, epsilon - 1.0, dtype=g.dtype, device=g.device))
                g[:skip] = 0.0                      # rows of the previous chunk count there
                g = g.to(logits.dtype)
                grad_h[start:end] = torch.mm(g, w)[skip:]
                grad_w += torch.mm(g.t(), h.to(logits.dtype))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(nll)
        ctx.weight_dtype = weight.dtype
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None,
                None)


def linear_smoothed_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float,
                                  chunk: int = 256, tail_multiple: int = 64) -> tuple[Tensor, Tensor]:
    """Label-smoothed cross-entropy of ``hidden @ weight.T`` against ``target``, summed over rows.

    hidden [N, D] (real positions only, no padding), weight [V, D] (the output
    projection, no bias), target [N] (Long). Returns ``(loss_sum, nll_sum)``,
    float32 scalars (float64 for float64 input); only ``loss_sum`` has a gradient. Per row: ``loss = (1 - eps)
    * nll + eps * mean_v(-log p_v)``, the convention of ``nmt.loss.label_smoothed_nll``
    (which this equals up to rounding). Matmuls follow autocast; the softmax is float32.
    Rows go ``chunk`` at a time; the last chunk is widened backwards to a multiple of
    ``tail_multiple`` rows (recomputing a few, counted once), so that the number of real
    target tokens, which differs in every batch, does not make a new matmul shape each time.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    if hidden.dim() != 2 or weight.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"linear_smoothed_cross_entropy needs hidden [N, D], weight [V, D], target [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if chunk <= 0 or tail_multiple <= 0:
        raise ValueError(f"chunk ({chunk}) and tail_multiple ({tail_multiple}) must be > 0")
    return _LinearSmoothedCE.apply(hidden, weight, target, float(epsilon), int(chunk), int(tail_multiple))
