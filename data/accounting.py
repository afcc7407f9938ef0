"""What the training loop wraps around a task's dataset: every skipped sample counted by kind where the
user sees it, and per-sample random streams that make a resumed run exact with DataLoader workers.

A dataset returns None for a sample it cannot use and, just before, sets `last_skip = (kind, message)`
(data/formats.py). `Accounted` (map-style) and `AccountedStream` (streams) turn that None into a marker
in the process that read it (a DataLoader worker or the main process); `AccountedCollate` turns the
markers back into None for the task's collate and adds to the batch the counts `_read`, `_kinds` and the
first messages `_why`; `SkipTally` adds them up over the run.

Random streams: with workers, each worker's random state would restart on resume. Here a sample's
augmentation draws from python's `random`, numpy and torch seeded by (run seed, step, position in the
global batch) — the same for that sample in any run of the same config, however it is interrupted.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

MARK = "_skipped"


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of the sample at `position` of the global batch of `step` (a 63-bit integer)."""
    return ((seed * 1_000_003 + step) * 1_000_033 + position) % (2 ** 63)


def seed_everything(s: int):
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def _last_skip(ds) -> tuple[str, str]:
    """The reason the innermost dataset gave for its last None (wrappers keep theirs in `.ds`)."""
    while True:
        why = getattr(ds, "last_skip", None)
        if why is not None:
            return why
        if not hasattr(ds, "ds"):
            return "unreadable", "a sample could not be read"
        ds = ds.ds


def mark(ds, sample):
    if sample is not None:
        return sample
    kind, message = _last_skip(ds)
    return {MARK: kind, "why": message}


class Accounted(Dataset):
    """A map-style dataset whose None samples become markers; an index (i, seed) seeds the sample's draws."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            i, s = item
            seed_everything(s)
        else:
            i = item
        return mark(self.ds, self.ds[i])


class AccountedStream(IterableDataset):
    """The same for a stream (tar shards)."""

    def __init__(self, ds):
        self.ds = ds

    def set_epoch(self, epoch: int):
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)

    def __iter__(self):
        for s in self.ds:
            yield mark(self.ds, s)


def is_marker(s) -> bool:
    return isinstance(s, dict) and MARK in s


class AccountedCollate:
    """The task's collate on the good samples (markers passed on as None, which it counts as "skipped"),
    plus `_read` (samples read), `_kinds` ({kind: count}) and `_why` (the first messages)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        kinds = Counter(s[MARK] for s in samples if is_marker(s))
        why = [s["why"] for s in samples if is_marker(s)][:3]
        batch = self.collate([None if is_marker(s) else s for s in samples])
        batch.update(_read=len(samples), _kinds=dict(kinds), _why=why)
        return batch


class SkipTally:
    """Samples read and skipped over a run, by kind, with the first few messages."""

    def __init__(self, read: int = 0, skipped: int = 0, kinds: dict | None = None, examples: list | None = None):
        self.read, self.skipped = read, skipped
        self.kinds = Counter(kinds or {})
        self.examples: list[str] = list(examples or [])[:5]

    def add(self, batch: dict) -> int:
        """Take the counts out of a batch; → the number of samples it skipped."""
        n = int(batch.pop("skipped", 0))
        self.read += int(batch.pop("_read", n))
        kinds = batch.pop("_kinds", {})
        self.kinds.update(kinds)
        if n > sum(kinds.values()):  # a collate that dropped samples for its own reasons
            self.kinds["unreadable"] += n - sum(kinds.values())
        for w in batch.pop("_why", []):
            if len(self.examples) < 5:
                self.examples.append(w)
        self.skipped += n
        return n

    def share(self) -> float:
        return self.skipped / max(1, self.read)

    def summary(self) -> str:
        """"3 samples skipped (2 missing, 1 undecodable) of 640 read"."""
        if not self.skipped:
            return f"no sample skipped of {self.read} read"
        parts = ", ".join(f"{n} {k}" for k, n in self.kinds.most_common() if n)
        return f"{self.skipped} sample{'s' if self.skipped != 1 else ''} skipped ({parts}) of {self.read} read"

    def state(self) -> dict:
        return {"read": self.read, "skipped": self.skipped, "kinds": dict(self.kinds), "examples": list(self.examples)}

    @classmethod
    def merged(cls, states: list[dict]) -> "SkipTally":
        """The tally of several ranks."""
        out = cls()
        for st in states:
            out.read += st["read"]
            out.skipped += st["skipped"]
            out.kinds.update(st["kinds"])
            out.examples += st.get("examples", [])[:5 - len(out.examples)]
        return out
