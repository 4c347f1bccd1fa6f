"""A run's batches: the order of the examples (`BatchOrder`) and the stream of padded micro-batches that the trainer
consumes (`batch_stream`), made in the training process or, with `--workers N`, by N worker processes that read
and preprocess the images of the next batches while the model trains on this one.

Micro-batch k (= step * grad_accum + micro) depends only on k and the seed, whoever makes it, so runs with any
number of workers, and resumed runs, see the same batches.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import ConversationDataset

PREFETCH_PER_WORKER = 4  # micro-batches each worker prepares ahead


class BatchOrder:
    """A fresh permutation of the examples per epoch (from the seed), walked `batch_size` examples at a time."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int):
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self._epoch, self._order = None, None

    def epoch(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._order

    def indices(self, step: int, micro: int) -> list[int]:
        """Examples of micro-batch `micro` of optimizer step `step`."""
        first = (step * self.grad_accum + micro) * self.batch_size
        return [int(self.epoch(k // self.n)[k % self.n]) for k in range(first, first + self.batch_size)]


class MicroBatches(Dataset):
    """Item k is micro-batch k of the run, padded (`ConversationDataset.batch`)."""

    def __init__(self, data: ConversationDataset, order: BatchOrder):
        self.data, self.order = data, order

    def __getitem__(self, k: int) -> dict:
        step, micro = divmod(k, self.order.grad_accum)
        return self.data.batch(self.order.indices(step, micro))


def _as_is(batch: dict) -> dict:  # (a module-level function: worker processes must be able to import it)
    return batch


def batch_stream(data: ConversationDataset, order: BatchOrder, first: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[dict]:
    """Micro-batches first, first + 1, ... without end. With `workers` > 0 they come from that many processes,
    `PREFETCH_PER_WORKER` each ahead of the trainer (in pinned memory with `pin_memory`, for faster copies to a
    GPU); closing the generator stops them."""
    source = MicroBatches(data, order)
    if workers <= 0:
        k = first
        while True:
            yield source[k]
            k += 1
    # The loader's own generator: drawing its worker seed from torch's global one would shift the dropout masks.
    loader = DataLoader(source, batch_size=None, sampler=range(first, 2**62), num_workers=workers,
                        collate_fn=_as_is, pin_memory=pin_memory, prefetch_factor=PREFETCH_PER_WORKER,
                        generator=torch.Generator().manual_seed(order.seed))
    batches = iter(loader)
    try:
        yield from batches
    finally:
        del batches  # the last reference: its workers stop now, not whenever the generator is collected
