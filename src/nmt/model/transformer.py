"""The encoder-decoder Transformer with an explicit, functional KV cache.

Shapes: B = batch, S = source length, T = target tokens in this call,
L = target tokens already cached, D = d_model, H = heads, dh = D // H, V = vocab.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from nmt.config import ConfigError, ModelConfig
from nmt.model.cache import KVCache
from nmt.model.kernels import Dropout, dropout, linear_smoothed_cross_entropy
from nmt.model.layers import DecoderLayer, EncoderLayer, sinusoidal_positions

__all__ = ["KVCache", "Transformer"]


def _key_mask(mask: Tensor) -> Tensor:
    """Key-padding mask [B,S] (True = real token) -> [B,1,1,S] for SDPA.

    A row with no real token at all makes softmax produce NaN on some SDPA
    kernels and PyTorch versions (the project allows torch>=2.2), which would
    then leak into other rows through 0 * NaN; such rows may attend everywhere
    instead (their output is meaningless but finite).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"src_mask must be a bool tensor (True at real tokens), got {mask.dtype}")
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class Transformer(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al., 2017) with pre- or post-norm.

    ``encode`` runs the source once; ``decode`` runs target tokens against that
    memory and returns logits plus a :class:`KVCache` to continue from.
    """

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        _check_config(cfg, src_vocab_size, tgt_vocab_size)
        self.cfg = cfg
        self.pad_id = pad_id
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.max_positions = cfg.max_positions
        d = cfg.d_model
        self.embed_scale = math.sqrt(d)

        self.src_embed = nn.Embedding(src_vocab_size, d, padding_idx=pad_id)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings == "all"
                          else nn.Embedding(tgt_vocab_size, d, padding_idx=pad_id))
        # recomputed on load, so checkpoints stay small and max_positions can change
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, d), persistent=False)
        self.embed_drop = Dropout(cfg.dropout)

        pre = cfg.norm == "pre"
        args = (d, cfg.heads, cfg.ffn, cfg.dropout, cfg.attention_dropout,
                cfg.activation, cfg.activation_dropout, pre)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*args) for _ in range(cfg.n_decoder_layers))
        # pre-norm leaves the residual stream unnormalised: normalise once at the top of each stack
        self.encoder_norm: nn.Module = nn.LayerNorm(d) if pre else nn.Identity()
        self.decoder_norm: nn.Module = nn.LayerNorm(d) if pre else nn.Identity()
        self.output_proj = nn.Linear(d, tgt_vocab_size, bias=False)

        self._reset_parameters()
        if cfg.share_embeddings in ("all", "decoder"):
            self.output_proj.weight = self.tgt_embed.weight

    def _reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # fused q/k/v (and k/v) projections: xavier per D x D block, as if they were separate layers
        for module in self.modules():
            for name in ("qkv_proj", "kv_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Linear):
                    for block in proj.weight.data.split(self.cfg.d_model, dim=0):
                        nn.init.xavier_uniform_(block)
        std = self.cfg.d_model ** -0.5
        # an untied output projection starts like a tied one (an embedding matrix),
        # so logits have the same scale at init whatever share_embeddings says
        embeddings = [self.src_embed.weight, self.tgt_embed.weight, self.output_proj.weight]
        for w in embeddings:
            nn.init.normal_(w, mean=0.0, std=std)
        with torch.no_grad():
            for w in embeddings:
                if -w.shape[0] <= self.pad_id < w.shape[0]:
                    w[self.pad_id].zero_()

    # ------------------------------------------------------------------ helpers
    def _check_length(self, end: int, what: str) -> None:
        if end > self.max_positions:
            raise ValueError(
                f"{what} needs {end} positions but the model has max_positions={self.max_positions}; "
                f"shorten or split the input (e.g. lower data.max_len / the decode max length) "
                f"or train with a larger model.max_positions")

    def _embed(self, embed: nn.Embedding, ids: Tensor, start: int, word_dropout: float = 0.0) -> Tensor:
        """ids [B,T] at positions start..start+T-1 -> [B,T,D].

        ``word_dropout`` (training only) zeroes whole token embeddings, scaling the
        others by 1/(1-p) as dropout does; the position signal stays, so the model
        sees a blank word (Sennrich & Zhang, 2019; Marian's --dropout-src/--dropout-trg).
        """
        x = embed(ids) * self.embed_scale
        if word_dropout and self.training:
            x = x * dropout(x.new_ones(ids.shape[0], ids.shape[1], 1), word_dropout, True)
        return self.embed_drop(x + self.positions[start:start + ids.shape[1]])

    # ------------------------------------------------------------------ API
    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src [B,S] (Long), src_mask [B,S] (bool, True at real tokens) -> memory [B,S,D]."""
        self._check_length(src.shape[1], f"source of length {src.shape[1]}")
        key_mask = _key_mask(src_mask)
        x = self._embed(self.src_embed, src, 0, self.cfg.source_word_dropout)
        for layer in self.encoder_layers:
            x = layer(x, key_mask)
        return self.encoder_norm(x)

    def decode(self, tgt: Tensor, memory: Optional[Tensor], src_mask: Tensor,
               cache: Optional[KVCache] = None) -> tuple[Tensor, KVCache]:
        """Run target tokens through the decoder: logits [N,T,V] and the extended cache.

        See :meth:`decode_states`, whose output this projects to the vocabulary.
        """
        states, new_cache = self.decode_states(tgt, memory, src_mask, cache)
        return self.output_proj(states), new_cache

    def decode_states(self, tgt: Tensor, memory: Optional[Tensor], src_mask: Tensor,
                      cache: Optional[KVCache] = None) -> tuple[Tensor, KVCache]:
        """Run target tokens through the decoder, up to (not including) the output projection.

        Without ``cache``: tgt [B,T] is the whole prefix (positions 0..T-1, causal
        mask); the returned cache holds all T positions and the cross-attention
        K/V of ``memory`` [B,S,D].
        With ``cache``: tgt [N,T] holds only the NEW tokens at positions
        cache.length..cache.length+T-1 of its N = cache.batch_size rows;
        ``memory`` is not used (may be None), the cross K/V come from the cache.
        src_mask [B,S] must match the source sentences: memory's rows, or
        cache.sentences (N // cache.beams) with a cache.
        Returns the final decoder states [N,T,D] in the compute dtype and the extended cache.
        """
        b, t = tgt.shape
        start = 0 if cache is None else cache.length
        self._check_length(start + t, f"target prefix of length {start + t}")
        if cache is None:
            if memory is None:
                raise ValueError("decode() without a cache needs the encoder memory")
            cross = [layer.cross_attn.project_memory(memory) for layer in self.decoder_layers]
            past: list = [None] * len(self.decoder_layers)
            room, beams, version = None, 1, 0
            self_mask, causal = None, t > 1
        else:
            cross = list(zip(cache.cross_k, cache.cross_v))
            room, beams = cache.claim_room(t), cache.beams
            version = room.version
            past = [(k[:b], v[:b], start) for k, v in zip(room.k, room.v)]
            causal = False
            # one new token may see every cached one: no mask needed. Several new
            # tokens: query i (position start+i) sees keys 0..start+i. SDPA's own
            # is_causal aligns top-left, which is wrong once start > 0.
            self_mask = (None if t == 1 else
                         torch.ones(t, start + t, dtype=torch.bool, device=tgt.device).tril(diagonal=start))
        sentences = cross[0][0].shape[0]
        if src_mask.shape[0] != sentences or b != sentences * beams:
            raise ValueError(f"decode() got {b} target rows and a src_mask of {src_mask.shape[0]} rows for "
                             f"{sentences} source sentences with {beams} row(s) each")
        cross_mask = _key_mask(src_mask)

        x = self._embed(self.tgt_embed, tgt, start, self.cfg.target_word_dropout)
        self_k, self_v = [], []
        for layer, kv, p in zip(self.decoder_layers, cross, past):
            x, (k, v) = layer(x, kv, cross_mask, self_mask=self_mask, is_causal=causal, past=p, beams=beams)
            self_k.append(k)
            self_v.append(v)
        new_cache = KVCache(self_k, self_v, [kv[0] for kv in cross], [kv[1] for kv in cross], start + t,
                            beams, room, version)
        return self.decoder_norm(x), new_cache

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_out: Optional[Tensor] = None,
                label_smoothing: float = 0.0) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Teacher forcing: src [B,S], src_mask [B,S], tgt_in [B,T] -> logits [B,T,V].

        With ``tgt_out`` [B,T] (labels, ``pad_id`` where there is none) it returns the
        training loss instead: ``(loss_sum, nll_sum, n_tokens)`` over the non-pad
        labels, label-smoothed by ``label_smoothing`` (see
        :func:`~nmt.model.kernels.linear_smoothed_cross_entropy`). Only real positions
        are projected, and the [tokens, V] logits are never stored: the output
        projection and the loss over the vocabulary are the largest costs of a step.
        """
        states, _ = self.decode_states(tgt_in, self.encode(src, src_mask), src_mask)
        if tgt_out is None:
            return self.output_proj(states)
        keep = tgt_out != self.pad_id
        loss, nll = linear_smoothed_cross_entropy(states[keep], self.output_proj.weight, tgt_out[keep],
                                                  label_smoothing)
        return loss, nll, keep.sum()


def _check_config(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
    """The model-level checks, so a Transformer built outside ``config.validate`` fails clearly."""
    if cfg.share_embeddings not in ("all", "decoder", "none"):
        raise ConfigError(f"model.share_embeddings={cfg.share_embeddings!r} is not valid; "
                          "choose one of: all, decoder, none")
    if cfg.share_embeddings == "all" and src_vocab_size != tgt_vocab_size:
        raise ConfigError(
            f"model.share_embeddings=all needs one vocabulary for both sides, but the source "
            f"vocabulary has {src_vocab_size} entries and the target {tgt_vocab_size}; "
            "use a joint tokenizer (tokenizer.joint=true) or model.share_embeddings=decoder|none")
    if cfg.norm not in ("pre", "post"):
        raise ConfigError(f"model.norm={cfg.norm!r} is not valid; choose one of: pre, post")
    if cfg.activation not in ("relu", "gelu"):
        raise ConfigError(f"model.activation={cfg.activation!r} is not valid; choose one of: relu, gelu")
    if cfg.d_model <= 0 or cfg.heads <= 0 or cfg.d_model % cfg.heads:
        raise ConfigError(f"model.d_model ({cfg.d_model}) must be a positive multiple of model.heads ({cfg.heads})")
    if cfg.max_positions <= 0:
        raise ConfigError(f"model.max_positions must be > 0, got {cfg.max_positions}")
