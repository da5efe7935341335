"""Exact mid-epoch resume: a training sampler and loader that restart at the exact batch, and the global RNG state.

Lightning restores a checkpoint's global step, optimizer, schedulers and callbacks, but a plain
``DataLoader`` restarts its epoch from the first batch, so a resumed run would see a different
data order from an uninterrupted one. Lightning saves ``state_dict()`` of every train loader
that has ``state_dict``/``load_state_dict`` (its "stateful" loaders) and hands it back on resume
(``FitLoop.setup_data``); :class:`ResumableDataLoader` uses that to store (epoch, batches
handed out) and, on resume, skips the consumed batches *in the sampler*, so no skipped batch
is loaded or collated.

Kept instead of torchdata's ``StatefulDataLoader`` (0.11), because that did not resume exactly: Lightning's
``FitLoop.setup_data`` creates the loader's iterator *before* it calls ``set_epoch`` (Lightning issue
#21938), and ``StatefulDataLoader`` skips the consumed batches when the iterator is created, so on resume it
skipped through epoch 0's order; the killed-and-resumed test then drifted from step 6 on. This loader
decides where to start at its first batch, after ``set_epoch``.

The order of an epoch is a pure function of (seed, epoch): :class:`ResumableSampler` is a
``DistributedSampler`` (seeded shuffle, ``set_epoch`` called by Lightning every epoch, one
shard per rank), so Lightning keeps it under DDP/FSDP instead of wrapping it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ["ResumableDataLoader", "ResumableSampler", "rng_state", "sample_batches", "set_rng_state"]


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle of this rank's shard that can start part-way through an epoch.

    ``len()`` stays the full shard (so the epoch length Lightning counts with is unchanged); an
    iteration after :meth:`start_at` yields the shard from that position on, once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._start = 0

    def start_at(self, position: int) -> None:
        """Skip the first ``position`` indices of this rank's shard in the next iteration only."""
        self._start = max(int(position), 0)

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        indices = list(super().__iter__())
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """``DataLoader`` (normally over a :class:`ResumableSampler`) whose position in the epoch is checkpointed.

    ``state_dict()`` is ``{"epoch", "batches"}``: the sampler's epoch and the batches handed out
    in it so far. After ``load_state_dict``, the next pass over the same epoch starts right
    after those batches; a pass over another epoch (the checkpoint closed its epoch) starts at
    the beginning.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self._batches = 0  # batches handed out in the current pass
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is requested, i.e. after Lightning's
        # set_epoch of the epoch that is about to run.
        epoch, skip = self._resume or (self._epoch, 0)
        self._resume = None
        if epoch != self._epoch or skip >= len(self):
            skip = 0
        self._batches = skip
        if isinstance(self.sampler, ResumableSampler) and self.batch_size is not None:
            self.sampler.start_at(skip * self.batch_size)  # every batch before the last one is full
            batches = super().__iter__()
        else:  # another sampler (e.g. Lightning's overfit_batches): load and drop the consumed batches
            batches = itertools.islice(super().__iter__(), skip, None)
        for batch in batches:
            self._batches += 1
            yield batch

    @property
    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": int(self._batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


def sample_batches(
    loader: DataLoader, max_batches: int | None, *, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Iterable[dict[str, Tensor]]:
    """Batches of a seeded random sample of ``loader``'s rows, for this rank.

    Up to ``max_batches`` batches of ``loader.batch_size`` rows (None or <= 0: all rows), ranks
    get disjoint rows. The sample is drawn with its own generator, so the training order (the
    loader's own generator) is left untouched: a run with a probe sees the same batches as one
    without. Loaders without a length or a fixed batch size are read as they come (first batches).
    """
    limit = max_batches if max_batches and max_batches > 0 else None
    dataset = loader.dataset
    if loader.batch_size is None or not hasattr(dataset, "__len__"):
        return itertools.islice(loader, limit)
    # Every rank the same number of rows (so of batches): under DDP a rank with one batch more would wait.
    usable = len(dataset) - len(dataset) % world_size
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:usable][rank::world_size]
    if limit is not None:
        order = order[: limit * loader.batch_size]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def rng_state() -> dict[str, Any]:
    """The global random generators training draws from (dropout masks, LoRA dropout)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA's only on as many devices as it was saved from)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
