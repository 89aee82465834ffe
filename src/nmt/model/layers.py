"""Building blocks of the Transformer: positions, attention, feed-forward, layers.

Shapes: B = batch, T = query (target) length, S = source / key length,
L = cached key length, D = d_model, H = heads, dh = D // H.

Masks are boolean and follow ``F.scaled_dot_product_attention``: True means
"may attend". Key-padding masks are passed as [B, 1, 1, S] so they broadcast
over heads and queries without a copy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.model.kernels import Dropout, attention, one_query_attention  # noqa: F401 (re-exported)

KV = tuple[Tensor, Tensor]  # (keys, values), each [B, H, L, dh]
# Cached self-attention state handed to a layer: key and value buffers
# [B, H, capacity, dh] whose first ``start`` positions are filled and which
# have room for the new positions, plus ``start``. The layer writes the new
# keys/values in place, so a decoding step copies nothing that was cached.
Past = tuple[Tensor, Tensor, int]


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """Sinusoidal table [n_positions, D] of Vaswani et al. (sin on even, cos on odd dims)."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    # 10000^(-2i/D) computed in float64 so long tables stay accurate
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table.float()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, D] -> [B, H, T, dh] (a view, no copy)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


class _Attention(nn.Module):
    """Shared parts of self- and cross-attention: the SDPA call and the output projection."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """q [B,H,T,dh], k/v [B,H,S,dh], mask broadcastable to [B,H,T,S] -> [B,T,D]."""
        out = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        b, h, t, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * dh))


class SelfAttention(_Attention):
    """Multi-head self-attention with one fused [D -> 3D] projection for q, k, v."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__(d_model, heads, dropout)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
                past: Optional[Past] = None) -> tuple[Tensor, KV]:
        """x [B,T,D] -> (out [B,T,D], (k, v) [B,H,L+T,dh]).

        With ``past`` (L = its start), the new keys/values are written into its
        buffers at L..L+T-1 and attention runs over all L+T positions; the
        returned (k, v) are views of those buffers.
        """
        b, t, d = x.shape
        # one matmul, then views: [B,T,3,H,dh] -> 3 x [B,H,T,dh]
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k_buf, v_buf, start = past
            k_buf[:, :, start:start + t] = k
            v_buf[:, :, start:start + t] = v
            k, v = k_buf[:, :, :start + t], v_buf[:, :, :start + t]
        return self._attend(q, k, v, mask, is_causal), (k, v)


class CrossAttention(_Attention):
    """Multi-head attention from the decoder to the encoder memory.

    Keys and values depend only on the memory, so :meth:`project_memory` is
    called once per source batch and its result reused at every decoding step.
    """

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__(d_model, heads, dropout)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)

    def project_memory(self, memory: Tensor) -> KV:
        """memory [B,S,D] -> (k, v), each [B,H,S,dh]."""
        b, s, d = memory.shape
        k, v = self.kv_proj(memory).view(b, s, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: KV, mask: Optional[Tensor], beams: int = 1) -> Tensor:
        """x [B*beams,T,D], kv from :meth:`project_memory` ([B,H,S,dh]), mask [B,1,1,S] -> [B*beams,T,D].

        Consecutive rows of x are ``beams`` hypotheses of one source sentence:
        they query its keys together as one [beams*T] block, so the memory is
        projected and stored once per sentence, not once per hypothesis.
        """
        q = self.q_proj(x)
        n, t, d = q.shape
        out = self._attend(_split_heads(q.view(n // beams, beams * t, d), self.heads), kv[0], kv[1], mask, False)
        return out.view(n, t, d)


class FeedForward(nn.Module):
    """Position-wise D -> ffn -> D with relu|gelu and dropout on the hidden activation."""

    def __init__(self, d_model: int, ffn: int, activation: str, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.act = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.drop = Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """[B,T,D] -> [B,T,D]."""
        return self.fc2(self.drop(self.act(self.fc1(x))))


class _Residual(nn.Module):
    """Residual connection around a sublayer, with LayerNorm before (pre) or after (post).

    Pre-norm keeps an identity path from input to output (stable without long
    warmup); post-norm is the original 2017 layout.
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.drop = Dropout(dropout)
        self.pre_norm = pre_norm

    def inp(self, x: Tensor) -> Tensor:
        """What the sublayer reads: the normalised x for pre-norm, x itself for post-norm."""
        return self.norm(x) if self.pre_norm else x

    def out(self, x: Tensor, y: Tensor) -> Tensor:
        """Combine the residual stream x with the sublayer output y."""
        x = x + self.drop(y)
        return x if self.pre_norm else self.norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float, attention_dropout: float,
                 activation: str, activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn, activation, activation_dropout)
        self.res_attn = _Residual(d_model, dropout, pre_norm)
        self.res_ffn = _Residual(d_model, dropout, pre_norm)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """x [B,S,D], key_mask [B,1,1,S] (True = real token) -> [B,S,D]."""
        y, _ = self.self_attn(self.res_attn.inp(x), mask=key_mask)
        x = self.res_attn.out(x, y)
        return self.res_ffn.out(x, self.ffn(self.res_ffn.inp(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float, attention_dropout: float,
                 activation: str, activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads, attention_dropout)
        self.cross_attn = CrossAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn, activation, activation_dropout)
        self.res_self = _Residual(d_model, dropout, pre_norm)
        self.res_cross = _Residual(d_model, dropout, pre_norm)
        self.res_ffn = _Residual(d_model, dropout, pre_norm)

    def forward(self, x: Tensor, cross_kv: KV, cross_mask: Tensor, self_mask: Optional[Tensor] = None,
                is_causal: bool = False, past: Optional[Past] = None, beams: int = 1) -> tuple[Tensor, KV]:
        """x [B*beams,T,D] (new positions only) -> (x [B*beams,T,D], self-attention (k, v) [B*beams,H,L+T,dh]).

        ``self_mask`` [T, L+T] or ``is_causal`` (only valid when there is no past)
        keep each position from seeing later ones; cross_kv is [B,H,S,dh] and
        cross_mask [B,1,1,S], shared by each sentence's ``beams`` rows.
        """
        y, kv = self.self_attn(self.res_self.inp(x), mask=self_mask, is_causal=is_causal, past=past)
        x = self.res_self.out(x, y)
        x = self.res_cross.out(x, self.cross_attn(self.res_cross.inp(x), cross_kv, cross_mask, beams))
        return self.res_ffn.out(x, self.ffn(self.res_ffn.inp(x))), kv
