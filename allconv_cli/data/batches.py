"""Batches of a split for one process: shuffled from (seed, epoch) alone, so that any step replays
after a resume; sharded by rank under DDP."""

from __future__ import annotations

import math

import torch

from allconv_cli.data.folders import FolderDataset
from allconv_cli.data.splits import ImageData, Split
from allconv_cli.processes import ignore_stop_signals


class Batches:
    """Batches of one split for one process of ``world`` (DDP shards by rank).

    Shuffling draws a permutation from ``(seed, epoch)`` alone, so any epoch and step can be
    replayed exactly after a resume. In-memory data is moved to ``device`` once and batches are
    index_select-ed there; folder data goes through DataLoader workers. Training shards
    (``drop_last``) are of equal length, ``len // world``, so every process takes the same
    number of steps; evaluation shards cover every example once (they differ by at most one).
    """

    def __init__(self, data: Split, batch_size: int, shuffle: bool, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 workers: int = 2):
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.device, self.workers = seed, rank, world, torch.device(device), workers
        self.classes = data.classes
        if isinstance(data, ImageData):
            self.images = data.images.to(self.device)
            self.labels = data.labels.to(self.device)
        # drop_last: len // world each; else rank r takes examples r, r + world, ... of all len
        per_rank = len(data) // world if drop_last else len(range(rank, len(data), world))
        self.per_rank = per_rank
        self.steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self.steps == 0 and (drop_last or rank == 0):  # a later rank may get no image of a tiny split
            raise ValueError(f"{len(data)} examples make no batch of {batch_size} (on {world} "
                             "processes): lower --batch-size")

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for ``epoch``."""
        if self.shuffle:
            # below 2^63 for every valid seed: torch's generators take at most 64 bits
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            index = torch.randperm(len(self.data), generator=generator)
        else:
            index = torch.arange(len(self.data))
        return index[self.rank::self.world][: self.per_rank]

    def epoch(self, epoch: int, start_step: int = 0):
        index = self.order(epoch)[start_step * self.batch_size: self.steps * self.batch_size]
        if isinstance(self.data, ImageData):
            index = index.to(self.device)
            for start in range(0, len(index), self.batch_size):
                batch = index[start:start + self.batch_size]
                yield self.images.index_select(0, batch), self.labels.index_select(0, batch)
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(FolderDataset(self.data), index.tolist()),
            batch_size=self.batch_size, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except (ValueError, OSError) as err:  # re-raised from a worker with its traceback inside
                raise ValueError(str(err).strip().splitlines()[-1].split(": ", 1)[-1]) from None
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
