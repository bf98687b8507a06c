"""Training from shards: each rank and each data-loader worker streams its own part of an epoch, exactly once.

One epoch is the manifest's shards in an order fixed by (seed, epoch), read as one sequence of samples. Rank ``r``
of ``W`` takes the ``r``-th of ``W`` equal contiguous parts (``count // W`` samples; the remainder, fewer than
``W``, is left out of the epoch and logged), cut to whole batches; its batches are split into contiguous runs, one
per loader worker. Parts are disjoint, so every sample is read by one worker of one rank; when the shard count is a
multiple of ranks x workers and the shards are equal, every part is a set of whole shards (otherwise a boundary
shard is shared, each side reading its own samples of it).

Each worker collates its own batches (the loader runs with ``batch_size=None``) and the loader takes them round
robin; a mid-epoch resume after ``b`` batches replays that round robin to know how many batches each worker had
given and starts each at its shard and sample (:meth:`ShardStream.set_position`), reading nothing before it but
the skipped samples' bytes of the first shard. The trainer drives this through the small interface
:class:`~densevlm.engine.trainer.StreamingDataset` (``configure``, ``set_position``), knowing nothing of shards.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from densevlm.data.shards import ShardError, ShardSet, read_shard

log = logging.getLogger(__name__)

ItemFn = Callable[[dict[str, Any]], dict[str, Any]]


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard order: a permutation fixed by (seed, epoch), the same on every rank and after a resume."""
    if not shuffle:
        return list(range(n_shards))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_shards, generator=g).tolist()


def worker_batch_counts(batches: int, workers: int) -> list[int]:
    """How many of a rank's ``batches`` each loader worker yields (contiguous runs, sizes differing by <= 1)."""
    return [(w + 1) * batches // workers - w * batches // workers for w in range(workers)]


def batches_given(done: int, counts: list[int]) -> tuple[list[int], int]:
    """How many batches each worker had given when the loader had yielded ``done``, and whose turn is next: the
    loader takes the workers round robin, a worker that ran out left out of the turn (as torch's DataLoader does
    with iterable datasets)."""
    given, turn = [0] * len(counts), 0
    while done > 0:
        progressed = False
        for w, c in enumerate(counts):
            if done == 0:
                break
            turn = (w + 1) % len(counts)
            if given[w] < c:
                given[w] += 1
                done -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"resume position beyond the epoch's {sum(counts)} batches")
    return given, turn


def pieces(order: list[int], counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, first sample, samples) for the epoch sequence's samples ``[start, stop)`` (shards in ``order``)."""
    out, pos = [], 0
    for s in order:
        a, b = max(start, pos), min(stop, pos + counts[s])
        if a < b:
            out.append((s, a - pos, b - a))
        pos += counts[s]
        if pos >= stop:
            break
    return out


class ShardStream(IterableDataset):
    """Batches of ``item_fn(sample)`` from a :class:`~densevlm.data.shards.ShardSet`, split over ranks and workers.

    ``item_fn`` turns a decoded sample (``image``, ``index``, ``payload``, ...) into a training item (e.g. the grid
    regions and the targets of the drawn cells); its randomness should depend on (epoch, index) only, which
    :meth:`set_epoch` passes on through ``on_epoch``. With ``skip_bad_shards`` a damaged shard is logged (named,
    with a count) and its missing samples are replaced by the worker's previous good sample, so every rank still
    yields its number of batches; without it the :class:`~densevlm.data.shards.ShardError` stops training.
    """

    def __init__(self, shards: ShardSet, item_fn: ItemFn, *, seed: int = 0, shuffle: bool = True,
                 skip_bad_shards: bool = False, on_epoch: Optional[Callable[[int], None]] = None) -> None:
        self.shards, self.item_fn, self.seed, self.shuffle = shards, item_fn, seed, shuffle
        self.skip_bad_shards, self.on_epoch = skip_bad_shards, on_epoch
        self.counts = [int(x["count"]) for x in shards.shards]
        self.rank, self.world, self.batch_size, self.workers = 0, 1, 1, 1
        self.epoch, self.done = 0, 0
        self._first = [int(x.get("first", 0)) for x in shards.shards]

    # -------------------------------------------------------------- the trainer's interface
    def configure(self, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> int:
        """Fix this process's place; returns its batches per epoch (the same on every rank)."""
        self.rank, self.world, self.batch_size, self.workers = rank, world_size, batch_size, max(1, num_workers)
        per_rank = self.shards.count // world_size
        if per_rank < batch_size:
            raise ValueError(f"{self.shards.root}: {self.shards.count} samples over {world_size} process(es) is "
                             f"fewer than one batch of {batch_size} per process")
        left = self.shards.count - per_rank * world_size + (per_rank % batch_size) * world_size
        if left and rank == 0:
            log.info("%s: %d of %d samples do not fill a batch on every one of %d process(es) and are left out of "
                     "each epoch", self.shards.root, left, self.shards.count, world_size)
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration in ``epoch`` after this rank's first ``batches_done`` batches."""
        self.set_epoch(epoch)
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"resume position: batch {batches_done} of an epoch of {len(self)}")
        self.done = batches_done

    def __len__(self) -> int:
        return (self.shards.count // self.world) // self.batch_size

    # -------------------------------------------------------------- the plan
    def worker_span(self, worker: int) -> tuple[int, int]:
        """Samples ``[start, stop)`` of the epoch sequence that ``worker`` of this rank yields in a full epoch."""
        counts = worker_batch_counts(len(self), self.workers)
        base = self.rank * (self.shards.count // self.world)
        start = base + sum(counts[:worker]) * self.batch_size
        return start, start + counts[worker] * self.batch_size

    def logical_worker(self, loader_worker: int) -> int:
        """The part of the epoch loader worker ``loader_worker`` reads. A resumed loader starts its round robin at
        worker 0; the parts are rotated so that the part whose turn was next comes first, and the batches follow in
        the uninterrupted run's order."""
        turn = batches_given(self.done, worker_batch_counts(len(self), self.workers))[1]
        return (loader_worker + turn) % self.workers

    def plan(self, worker: int) -> list[tuple[int, int, int]]:
        """(shard, first sample, samples) logical ``worker`` reads from the current position to the epoch's end."""
        start, stop = self.worker_span(worker)
        skip = batches_given(self.done, worker_batch_counts(len(self), self.workers))[0][worker]
        order = shard_order(len(self.counts), self.seed, self.epoch, self.shuffle)
        return pieces(order, self.counts, start + skip * self.batch_size, stop)

    def image_name(self, index: int) -> str:
        """The shard holding source image ``index`` (for messages)."""
        for s, (first, n) in enumerate(zip(self._first, self.counts)):
            if first <= index < first + self.shards.manifest.get("shard_size", n):
                return f"{self.shards.url(s)}:{index:09d}"
        return f"{self.shards.root}:{index:09d}"

    # -------------------------------------------------------------- iteration
    def _samples(self, worker: int) -> Iterator[dict[str, Any]]:
        last: Optional[dict[str, Any]] = None
        owed, bad = 0, 0
        for s, first, take in self.plan(worker):
            got = 0
            try:
                whole = first + take == self.counts[s]  # read to its end: its count and sha256 are checked
                for sample in read_shard(self.shards, s, skip=first):
                    got += 1
                    if got > take:  # more samples than the manifest says: read_shard raises at the end
                        continue
                    last = sample
                    for _ in range(owed + 1):
                        yield sample
                    owed = 0
                    if got == take and not whole:
                        break
            except ShardError as err:
                if not self.skip_bad_shards:
                    raise
                bad += 1
                log.warning("%s; %d sample(s) replaced by good ones (data.skip_bad_shards; %d bad shard(s) in "
                            "this worker)", err, take - got, bad)
                owed += max(0, take - got)
                if last is not None:
                    for _ in range(owed):
                        yield last
                    owed = 0
        if owed:
            raise ShardError(f"{self.shards.root}: every shard of worker {worker} of rank {self.rank} is damaged")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream configured for {self.workers} loader worker(s), run with "
                               f"{info.num_workers}")
        batch: list[dict[str, Any]] = []
        for sample in self._samples(self.logical_worker(worker)):
            batch.append(self.item_fn(sample))
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []
