"""The decoder's KV cache: an explicit value handed to and returned by ``Transformer.decode``.

Shapes: N = decoder rows (hypotheses), B = source sentences (rows of the
cross-attention K/V), beams = N // B, H = heads, L = cached target positions,
S = source length, dh = D // H.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class _Room:
    """Key/value buffers [rows, H, capacity, dh] per layer, shared by the caches grown in place.

    ``frontier`` is how many positions have been written. A cache may append in
    place only when its length equals the frontier: then nobody else has
    written past it, and every cache sharing the buffers only sees positions
    below its own length, which in-place appends never touch. So caches behave
    as values even though the common path copies nothing.
    ``version`` counts in-place reorders (:meth:`KVCache.reorder_`): those do
    rewrite positions other caches see, so a cache made before one is stale.
    """

    k: list[Tensor]
    v: list[Tensor]
    frontier: int
    version: int = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def writable(self) -> bool:
        """Whether in-place writes are allowed in the current autograd mode."""
        return (not torch.is_grad_enabled()  # in-place writes would break autograd's saved tensors
                and (torch.is_inference_mode_enabled() or not self.k[0].is_inference()))


def _capacity(needed: int) -> int:
    # headroom so that greedy decoding regrows (one copy) only every so often
    return needed + max(16, needed // 2)


def _empty_room(like: list[Tensor], rows: int, capacity: int, frontier: int) -> _Room:
    _, h, _, dh = like[0].shape
    def new() -> list[Tensor]:
        return [torch.empty(rows, h, capacity, dh, dtype=t.dtype, device=t.device) for t in like]
    return _Room(new(), new(), frontier)


@dataclass
class KVCache:
    """Everything a decoder step needs from earlier steps; a value, never module state.

    self_k/self_v: per decoder layer, keys/values of the ``length`` target
    positions decoded so far, each [N, H, length, dh] (possibly views of
    larger buffers with room to grow).
    cross_k/cross_v: per decoder layer, keys/values of the encoder memory,
    each [B, H, S, dh], computed once when decoding starts. Row r of the
    self K/V belongs to source sentence r // ``beams``: beam search keeps the
    cross K/V once per sentence instead of once per hypothesis.
    Decoding from the same cache twice is safe: neither call changes what
    the cache (or any other cache) holds. Only :meth:`reorder_` consumes a cache.
    """

    self_k: list[Tensor]
    self_v: list[Tensor]
    cross_k: list[Tensor]
    cross_v: list[Tensor]
    length: int
    beams: int = 1
    _room: Optional[_Room] = field(default=None, repr=False, compare=False)
    _version: int = field(default=0, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        """N, the rows (hypotheses) decoded in parallel."""
        return self.self_k[0].shape[0]

    @property
    def sentences(self) -> int:
        """B, the rows of the cross K/V (what ``src_mask`` must match)."""
        return self.cross_k[0].shape[0]

    def _check_live(self) -> None:
        if self._room is not None and self._version != self._room.version:
            raise RuntimeError("this KVCache was consumed by reorder_() (its buffers were rewritten in place); "
                               "continue from the cache that reorder_() returned")

    def select(self, index: Tensor, cross: bool = True) -> "KVCache":
        """Rows ``index`` [N'] (LongTensor) of every cached tensor, in that order.

        Reorders or expands hypotheses, copying (this cache stays valid). With
        ``cross=True`` the result holds one cross K/V row per row (``beams`` 1).
        Pass ``cross=False`` when every ``index[i]`` is a row of row ``i``'s own
        source sentence (reordering beams within their group): the cross K/V
        are then kept as they are, saving one copy per layer, and ``beams``
        stays. The caller must select ``src_mask`` the same way.
        """
        self._check_live()
        if not cross:
            return self._copy_rows(index, self.cross_k, self.cross_v, self.beams, None)
        sent = index // self.beams if self.beams > 1 else index
        return self._copy_rows(index, *self._cross_rows(sent), 1, None)

    def for_beams(self, index: Tensor, beams: int, capacity: Optional[int] = None) -> "KVCache":
        """Rows ``index`` [B' * beams] as B' sentences of ``beams`` hypotheses each.

        The entries ``index[j * beams:(j + 1) * beams]`` must be rows of one
        source sentence. Beam search calls this once, after its first step, to
        turn one hypothesis per sentence into K. Self K/V rows are copied into
        fresh buffers with room for ``capacity`` positions (at least one more
        than now), so later steps and :meth:`reorder_` never reallocate. Cross
        K/V stay once per sentence, shared by its beams (the decoder runs the
        beams' queries against them together). This cache stays valid.
        """
        self._check_live()
        sent = index[::beams] // self.beams
        if sent.shape[0] == self.sentences and bool((sent == torch.arange(self.sentences, device=sent.device)).all()):
            cross_k, cross_v = self.cross_k, self.cross_v            # every sentence, in order: nothing to copy
        else:
            cross_k, cross_v = self._cross_rows(sent)
        return self._copy_rows(index, cross_k, cross_v, beams, capacity)

    def reorder_(self, index: Tensor, sentences: Optional[Tensor] = None) -> "KVCache":
        """Row i becomes row ``index[i]``, in place: beam search's per-step reorder.

        CONSUMES this cache: the result reuses its buffers, and this cache and
        every other cache sharing them (earlier values of the same decoding)
        must not be used again (they raise if they are). Only rows whose
        parent is another row (``index[i] != i``) are copied, and only their
        filled positions, so a search that keeps one child of each beam in the
        beam's own row moves few rows.
        Without ``sentences`` every sentence stays and ``index[i]`` must be a
        row of sentence ``i // beams``. ``sentences`` [B'] drops sentences: the
        result keeps those cross K/V rows, in that order, and ``index[i]`` must
        be a row of sentence ``sentences[i // beams]``. Copies instead (like
        :meth:`select`) when there are no buffers of ours to write into.
        """
        self._check_live()
        room, n = self._room, self.length
        if sentences is None:
            cross_k, cross_v = self.cross_k, self.cross_v
        else:
            cross_k, cross_v = self._cross_rows(sentences)
        if room is None or not room.writable():
            return self._copy_rows(index, cross_k, cross_v, self.beams, None)
        rows = index.shape[0]
        moved = (index != torch.arange(rows, device=index.device)).nonzero().squeeze(1)
        if moved.numel():
            parents = index.index_select(0, moved)
            for buf in room.k + room.v:
                filled = buf[:, :, :n]
                # gather first, then write: a row may be both a parent and overwritten
                filled.index_copy_(0, moved, filled.index_select(0, parents))
        room.version += 1
        room.frontier = n
        return KVCache([k[:rows, :, :n] for k in room.k], [v[:rows, :, :n] for v in room.v],
                       cross_k, cross_v, n, self.beams, room, room.version)

    def _cross_rows(self, sentences: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Cross K/V rows ``sentences`` [B'] of every layer (copies)."""
        return ([t.index_select(0, sentences) for t in self.cross_k],
                [t.index_select(0, sentences) for t in self.cross_v])

    def _copy_rows(self, index: Tensor, cross_k: list[Tensor], cross_v: list[Tensor], beams: int,
                   capacity: Optional[int]) -> "KVCache":
        """Self K/V rows ``index`` copied, with the given cross K/V."""
        n = self.length
        if torch.is_grad_enabled():  # out= does not support autograd: plain copies
            pick = [t.index_select(0, index) for t in self.self_k + self.self_v]
            half = len(self.self_k)
            return KVCache(pick[:half], pick[half:], cross_k, cross_v, n, beams)
        # copy straight into buffers with room, so the next step appends without a copy
        if capacity is None:
            capacity = self._room.capacity if self._room is not None else _capacity(n + 1)
        room = _empty_room(self.self_k, index.shape[0], max(capacity, n + 1), n)
        for src, dst in zip(self.self_k + self.self_v, room.k + room.v):
            torch.index_select(src, 0, index, out=dst[:, :, :n])
        return KVCache([k[:, :, :n] for k in room.k], [v[:, :, :n] for v in room.v],
                       cross_k, cross_v, n, beams, room, room.version)

    def claim_room(self, t: int) -> _Room:
        """A room holding this cache's positions with space for ``t`` more, claimed up to length + t.

        For ``Transformer.decode``: the new positions go to rows [:batch_size].
        """
        self._check_live()
        n, room = self.length, self._room
        reusable = (room is not None and room.frontier == n and room.capacity >= n + t and room.writable())
        if not reusable:
            room = _empty_room(self.self_k, self.batch_size, _capacity(n + t), n)
            for src, dst in zip(self.self_k + self.self_v, room.k + room.v):
                dst[:, :, :n] = src
        room.frontier = n + t
        return room
