"""Token-budget, length-bucketed batches (seeded, resumable) and their collation into tensors.

Training: :class:`TokenBatchSampler` yields lists of dataset positions whose
padded size fits a token budget; :func:`collate` turns the id lists of one such
batch into a :class:`Batch`. Inference: :func:`batches_for_inference` sorts by
length and cuts; the caller restores the input order from the indices.

Lengths given to the sampler are the sequence lengths the model will see:
``len(src_ids)`` including the EOS that ``Tokenizer.encode_src`` appends, and
``len(tgt_ids) + 1`` for the target (``tgt_in`` = BOS + y and ``tgt_out`` =
y + EOS both have that length).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from nmt.tokenizer import BOS, EOS, PAD

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- Batch + collate
@dataclass
class Batch:
    """One batch of padded id tensors (B sentences, S source and T target positions).

    src:      LongTensor[B, S]  source ids + EOS, PAD-padded on the right
    src_mask: BoolTensor[B, S]  True at real tokens, False at PAD
    tgt_in:   LongTensor[B, T]  BOS + y, PAD-padded  (None when translating)
    tgt_out:  LongTensor[B, T]  y + EOS, PAD-padded  (None when translating)
    n_src_tokens / n_tgt_tokens: non-PAD positions in src / tgt_out (EOS included)
    indices:  dataset position of each row
    """

    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: Optional[torch.Tensor]
    tgt_out: Optional[torch.Tensor]
    n_src_tokens: int
    n_tgt_tokens: int
    indices: list[int]

    @property
    def size(self) -> int:
        """B, the number of sentences."""
        return self.src.size(0)

    @property
    def padded_tokens(self) -> int:
        """Positions in the padded tensors, real and PAD: B*S + B*T (B*S when translating)."""
        return self.src.numel() + (self.tgt_out.numel() if self.tgt_out is not None else 0)

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on ``device`` (asynchronous copies where the source memory is pinned)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so that ``to('cuda')`` overlaps with compute (DataLoader calls this)."""
        return self._map(lambda t: t.pin_memory())


def _pad(rows: Sequence[Sequence[int]], prefix: list[int], suffix: list[int], multiple: int = 1) -> torch.Tensor:
    """[B, W] int64: each row as prefix + row + suffix, PAD to the longest, W rounded up to ``multiple``
    (rows: lists or numpy arrays)."""
    lens = [len(r) for r in rows]
    extra = len(prefix) + len(suffix)
    width = -(-(max(lens) + extra) // multiple) * multiple
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    if prefix:
        out[:, :len(prefix)] = prefix
    for i, (r, n) in enumerate(zip(rows, lens)):
        start = len(prefix)
        out[i, start:start + n] = r
        if suffix:
            out[i, start + n:start + n + len(suffix)] = suffix
    return torch.from_numpy(out)


def collate(src: Sequence[Sequence[int]], tgt: Optional[Sequence[Sequence[int]]], indices: Sequence[int],
            multiple: int = 1) -> Batch:
    """Pad one batch. ``src`` rows already end with EOS; ``tgt`` rows are bare (no BOS/EOS).

    ``tgt=None`` (translation) leaves ``tgt_in``/``tgt_out`` as None. ``multiple`` rounds the
    padded lengths up (8 on GPUs: tensor-core friendly shapes, and fewer distinct shapes).
    """
    if not src:
        raise ValueError("collate needs at least one sentence")
    if len(indices) != len(src) or (tgt is not None and len(tgt) != len(src)):
        raise ValueError(f"collate got {len(src)} sources, {len(indices)} indices"
                         + ("" if tgt is None else f", {len(tgt)} targets"))
    src_t = _pad(src, [], [], multiple)
    src_mask = src_t.ne(PAD)
    tgt_in = tgt_out = None
    n_tgt = 0
    if tgt is not None:
        tgt_in = _pad(tgt, [BOS], [], multiple)
        tgt_out = _pad(tgt, [], [EOS], multiple)
        n_tgt = sum(len(y) for y in tgt) + len(tgt)   # each target row gets an EOS
    return Batch(src_t, src_mask, tgt_in, tgt_out, int(src_mask.sum()), n_tgt, [int(i) for i in indices])


# ---------------------------------------------------------------------- training sampler
class EpochPlan(Sequence):
    """One epoch's batches (``plan[i]`` is batch i's list of pair indices), held as arrays: the pair
    indices of all batches end to end, where each batch starts, and the order of the batches. About
    4-8 bytes per pair, where a list of Python int lists took about 40."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray, batch_ids: np.ndarray) -> None:
        self.flat, self.starts, self.batch_ids = flat, starts, batch_ids

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        b = int(self.batch_ids[i])
        return self.flat[self.starts[b]:self.starts[b + 1]].tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, EpochPlan)) and len(self) == len(other) and \
            all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class TokenBatchSampler:
    """Seeded, resumable token-budget batches of dataset positions, length-bucketed.

    ``src_lens``/``tgt_lens`` are the lengths the model sees, INCLUDING the added
    EOS (source) and BOS/EOS (target: ``len(y) + 1``). A batch costs
    ``n_sentences * max(longest source, longest target)`` padded positions, kept
    ``<= max_tokens``; a pair longer than ``max_tokens`` on its own gets a batch
    of its own.

    ``length_multiple`` rounds the lengths up as :func:`collate` pads them (pass the
    same value to both), and ``batch_multiple`` makes every batch but the last of a
    pool hold a multiple of that many sentences (the rest start the next batch). Both
    keep the set of batch shapes small: CPU matmul libraries (oneDNN) compile and
    cache a kernel per shape, and allocators fragment on ever-new tensor sizes.

    Each epoch (seeded by ``(seed, epoch)``): shuffle the positions, cut them into
    pools of about ``bucket_size`` batches, sort each pool by length, cut it into
    batches, shuffle the batch order. ``shuffle=False`` keeps the positions and
    the batch order as they are (pools are still sorted).

    With ``world > 1`` (distributed training) each rank gets its share of every
    epoch's batches (see :meth:`_share`).

    Iterating yields the batches of the current epoch from the saved position,
    advancing it as each batch is handed out, so :meth:`state_dict` taken after
    processing a batch resumes with the next one. (With a prefetching DataLoader
    the position runs ahead of training by the prefetched batches.) At the end of
    an epoch call :meth:`next_epoch`.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, seed: int,
                 bucket_size: int = 100, shuffle: bool = True, rank: int = 0, world: int = 1,
                 length_multiple: int = 1, batch_multiple: int = 1):
        if len(src_lens) != len(tgt_lens):
            raise ValueError(f"{len(src_lens)} source lengths but {len(tgt_lens)} target lengths")
        if min(max_tokens, bucket_size, length_multiple, batch_multiple) <= 0:
            raise ValueError(f"max_tokens ({max_tokens}), bucket_size ({bucket_size}), length_multiple "
                             f"({length_multiple}) and batch_multiple ({batch_multiple}) must be > 0")
        src = np.ascontiguousarray(src_lens, dtype=np.int64).reshape(-1)
        tgt = np.ascontiguousarray(tgt_lens, dtype=np.int64).reshape(-1)
        m = int(length_multiple)
        self._len = -(-np.maximum(src, tgt) // m) * m   # what a pair costs per batch row, padded as collate pads
        self.max_tokens, self.seed, self.bucket_size, self.shuffle = int(max_tokens), int(seed), int(bucket_size), bool(shuffle)
        self.length_multiple, self.batch_multiple = m, int(batch_multiple)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.rank, self.world = int(rank), int(world)
        avg_batch = max(1, self.max_tokens // max(1, int(self._len.mean()))) if len(self._len) else 1
        self.pool_size = self.bucket_size * avg_batch
        self._fingerprint = {
            "n": len(self._len), "lengths_crc": zlib.crc32(tgt, zlib.crc32(src)),   # no copies
            "seed": self.seed, "max_tokens": self.max_tokens, "bucket_size": self.bucket_size, "shuffle": self.shuffle,
            "length_multiple": self.length_multiple, "batch_multiple": self.batch_multiple,
            "world": self.world,      # not the rank: every rank is at the same position, rank 0's state is saved
        }
        self._epoch, self._position = 0, 0
        self._batches: Optional[EpochPlan] = None  # cache for the current epoch
        too_long = int((self._len > self.max_tokens).sum())
        if too_long:
            log.warning("%d pairs are longer than max_tokens=%d; each gets a batch of its own", too_long, self.max_tokens)

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its first batch; the current epoch keeps its position."""
        if epoch != self._epoch:
            self._epoch, self._position, self._batches = int(epoch), 0, None

    def next_epoch(self) -> None:
        self.set_epoch(self._epoch + 1)

    def batches(self) -> EpochPlan:
        """All batches of the current epoch (computed once per epoch; do not modify)."""
        if self._batches is None:
            self._batches = self._make_batches(self._epoch)
        return self._batches

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        while self._position < len(batches):
            self._position += 1
            yield batches[self._position - 1]

    def _make_batches(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self._len)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pools, sizes = [], []
        for start in range(0, n, self.pool_size):
            pool = order[start:start + self.pool_size]
            pool = pool[np.argsort(self._len[pool], kind="stable")]
            pools.append(pool)
            sizes.extend(self._cut(self._len[pool].tolist()))
        flat = np.concatenate(pools).astype(np.int32 if n < 2 ** 31 else np.int64) if pools else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        batch_ids = rng.permutation(len(sizes)) if self.shuffle else np.arange(len(sizes))
        return EpochPlan(flat, starts, self._share(batch_ids))

    def _share(self, batch_ids: np.ndarray) -> np.ndarray:
        """This rank's batches: every ``world``-th from ``rank`` on, the list first padded by repeating its
        start so that all ranks do the same number of updates (so an epoch covers the corpus at least once).
        Round-robin, so that update i of ``world`` ranks sees the batches that update i of one process
        with ``train.accumulate=world`` would."""
        if self.world == 1 or not len(batch_ids):
            return batch_ids
        per_rank = -(-len(batch_ids) // self.world)
        padded = batch_ids[np.arange(per_rank * self.world) % len(batch_ids)]
        return padded[self.rank::self.world]

    def _cut(self, sorted_lens: list[int]) -> list[int]:
        """Sizes of the batches of a greedy cut of ascending lengths within the budget, each a multiple
        of ``batch_multiple`` where it holds that many (the sentences over it start the next batch, or
        make one of their own where they do not fit beside the newcomer); the pool's last batch is free."""
        sizes: list[int] = []
        count = 0
        for length in sorted_lens:
            # ascending order: the newcomer is the longest in the batch
            while count and (count + 1) * length > self.max_tokens:
                size = count - count % self.batch_multiple if count >= self.batch_multiple else count
                sizes.append(size)
                count -= size
            count += 1
        if count:
            sizes.append(count)
        return sizes

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Builtins only (checkpoints load with weights_only=True)."""
        return {"epoch": self._epoch, "position": self._position, **self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off: iterating yields exactly the remaining batches.

        If the data or batching settings changed since, the saved position means
        nothing, so the saved epoch restarts from its first batch (with a warning).
        """
        self.set_epoch(int(state["epoch"]))
        changed = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if changed:
            log.warning("batching changed since the checkpoint (%s); epoch %d restarts from its first batch",
                        ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()), self._epoch)
            self._position = 0
        else:
            self._position = int(state["position"])


def shape_multiples(length_multiple: int, batch_multiple: int) -> tuple[int, int]:
    """``train.length_multiple`` and ``train.batch_multiple``, 0 meaning 8 on every device: CUDA
    and bf16 on CPUs compile or cache kernels per shape; in fp32 on a CPU the padding costs up to 7%
    of the real tokens per second (docs/benchmarks.md), and buys the same batches in either
    precision, so that a schedule's epochs, and the checks the defaults were chosen by, are the same."""
    auto = 8
    return length_multiple or auto, batch_multiple or auto


def training_sampler(src_lens: Sequence[int], tgt_lens: Sequence[int], train, rank: int = 0,
                     world: int = 1) -> TokenBatchSampler:
    """The sampler of the training batches as the trainer cuts them for ``train`` (a TrainConfig);
    collate its batches with ``multiple=sampler.length_multiple``."""
    lm, bm = shape_multiples(train.length_multiple, train.batch_multiple)
    return TokenBatchSampler(src_lens, tgt_lens, train.max_tokens, seed=train.seed, bucket_size=train.bucket_size,
                             rank=rank, world=world, length_multiple=lm, batch_multiple=bm)


def padding_efficiency(batches: Sequence[Sequence[int]], src_lens: Sequence[int], tgt_lens: Sequence[int]) -> float:
    """Real tokens / padded positions over both sides: sum(src+tgt lengths) / sum(B*(S+T)).

    Lengths as given to :class:`TokenBatchSampler`; 1.0 means no padding at all.
    """
    real = padded = 0
    for b in batches:
        s = [src_lens[i] for i in b]
        t = [tgt_lens[i] for i in b]
        real += sum(s) + sum(t)
        padded += len(b) * (max(s) + max(t))
    return real / padded if padded else 1.0


# ---------------------------------------------------------------------- inference
def batches_for_inference(lengths: Sequence[int], max_sentences: int = 0, max_tokens: int = 0) -> list[list[int]]:
    """Positions sorted by length (longest first), cut into batches.

    A batch holds at most ``max_sentences`` sentences and at most ``max_tokens``
    padded positions (``n * longest``); 0 turns a limit off, but at least one must be
    set. A sentence longer than ``max_tokens`` gets a batch of its own. Longest
    first means an out-of-memory error shows up at once. Callers restore the input
    order from the positions.
    """
    if max_sentences <= 0 and max_tokens <= 0:
        raise ValueError("batches_for_inference needs max_sentences > 0 or max_tokens > 0")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(-lens, kind="stable").tolist()
    out: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        full = (max_sentences > 0 and len(batch) >= max_sentences) or \
               (max_tokens > 0 and (len(batch) + 1) * max(longest, int(lens[i])) > max_tokens)
        if batch and full:
            out.append(batch)
            batch = []
        if not batch:
            longest = int(lens[i])
        batch.append(i)
    if batch:
        out.append(batch)
    return out
