"""Batches: collate functions that drop and count bad samples, and `make_loader` for one or many processes.

A dataset returns None for a sample it could not read (missing/corrupt image, empty caption). Each
collate function drops those, stacks the rest, and records how many it dropped under "skipped"; the
`Loader` returned by `make_loader` removes that key from the batch, sums it over the epoch (this works
with worker processes, because the count travels inside the batch) and warns with the total when the
epoch ends. Batches from a Loader therefore hold exactly:

  image–text  {"image": (B,3,H,W), "text": list[str], "label": LongTensor (B,), "short": BoolTensor (B,)}
  detection   {"image": (B,3,H,W), "targets": list of {"boxes": (N,4) xyxy, "labels": (N,), "iscrowd": (N,), ...}}
  VQA         {"image": (B,3,H,W), "question": list[str], "answers": list[list[str]], "target": (B, A)}
  video       {"video": (B,3,T,H,W), "label": LongTensor (B,)}
"""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset


def _keep(batch: list) -> tuple[list, int]:
    good = [s for s in batch if s is not None]
    return good, len(batch) - len(good)


def collate_image_text(batch: list) -> dict:
    """-> {"image", "text", "label", "short", "skipped"}; just {"skipped": n} if every sample was bad."""
    good, skipped = _keep(batch)
    if not good:
        return {"skipped": skipped}
    return {"image": torch.stack([s["image"] for s in good]),
            "text": [s["text"] for s in good],
            "label": torch.tensor([int(s.get("label", -1)) for s in good], dtype=torch.long),
            "short": torch.tensor([bool(s.get("short", False)) for s in good], dtype=torch.bool),
            "skipped": skipped}


def collate_detection(batch: list) -> dict:
    """-> {"image": (B,3,H,W), "targets": [per-image dict without "image"], "skipped"}."""
    good, skipped = _keep(batch)
    if not good:
        return {"skipped": skipped}
    return {"image": torch.stack([s["image"] for s in good]),
            "targets": [{k: v for k, v in s.items() if k != "image"} for s in good],
            "skipped": skipped}


def collate_vqa(batch: list) -> dict:
    """-> {"image": (B,3,H,W), "question", "answers", "target": (Q, A), "question_type", ["answer"], "skipped"}
    with one row per question. A sample may carry `more_questions` (ShapesVQA(questions=k)): they become rows
    of their own, and "image_index" (Q,) then names each row's image (METER runs each image once)."""
    good, skipped = _keep(batch)
    if not good:
        return {"skipped": skipped}
    rows, image_index = [], []
    for i, s in enumerate(good):
        for q in [s, *s.get("more_questions", ())]:
            rows.append(q)
            image_index.append(i)
    out = {"image": torch.stack([s["image"] for s in good]),
           "question": [q["question"] for q in rows],
           "answers": [list(q["answers"]) for q in rows],
           "target": torch.stack([q["target"] for q in rows]),
           "question_type": [q.get("question_type", "") for q in rows],
           "skipped": skipped}
    if len(rows) > len(good):
        out["image_index"] = torch.tensor(image_index, dtype=torch.long)
    if all("answer" in q for q in rows):
        out["answer"] = [q["answer"] for q in rows]
    return out


def collate_video(batch: list) -> dict:
    good, skipped = _keep(batch)
    if not good:
        return {"skipped": skipped}
    return {"video": torch.stack([s["video"] for s in good]),
            "label": torch.tensor([int(s["label"]) for s in good], dtype=torch.long),
            "skipped": skipped}


def collate(batch: list) -> dict:
    """Pick the collate function from the keys of the first good sample."""
    first = next((s for s in batch if s is not None), None)
    if first is None:
        return {"skipped": len(batch)}
    if "video" in first:
        return collate_video(batch)
    if "boxes" in first:
        return collate_detection(batch)
    if "question" in first:
        return collate_vqa(batch)
    return collate_image_text(batch)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (set by the DataLoader)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _dist_info(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    raise RuntimeError("make_loader(distributed=True) needs torch.distributed initialised (or rank= and "
                       "world_size=); call torch.distributed.init_process_group first or launch with torchrun.")


class Loader:
    """A DataLoader with epochs: `set_epoch(e)` fixes this epoch's shuffle (the same on every run, so a
    resumed run sees the same order), and iteration counts bad samples and reports them when it ends.

    Attributes: `dataloader`, `sampler`, `epoch`, `skipped` (bad samples so far this epoch),
    `skipped_total` (over all epochs). len(loader) = batches per epoch (map-style datasets only).
    """

    def __init__(self, dataloader: DataLoader, sampler, seed: int, rank: int):
        self.dataloader, self.sampler, self.seed, self.rank = dataloader, sampler, seed, rank
        self.dataset = dataloader.dataset
        self.batch_size = dataloader.batch_size
        self.epoch, self.skipped, self.skipped_total = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        # per-epoch, per-rank seed for the workers' random augmentations
        self.dataloader.generator.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank])
                                                  .generate_state(1)[0]))
        self.skipped = 0
        for batch in self.dataloader:
            n = batch.pop("skipped", 0)
            self.skipped += n
            self.skipped_total += n
            if batch:
                yield batch
        self.report()

    def report(self) -> str:
        dropped = getattr(self.dataset, "dropped_at_load", 0)
        msg = (f"epoch {self.epoch}: skipped {self.skipped} bad samples (missing/corrupt images, empty or "
               f"undecodable captions; the first few were named in warnings above)")
        if dropped:
            msg += f"; {dropped} rows with an empty caption were left out when the index was read"
        if self.skipped:
            warnings.warn(msg + ".", stacklevel=2)
        return msg


def make_loader(dataset, batch_size: int, distributed: bool = False, workers: int = 0, seed: int = 0,
                shuffle: bool = True, drop_last: bool = False, collate_fn=None, pin_memory: bool | None = None,
                rank: int | None = None, world_size: int | None = None, prefetch_factor: int | None = None) -> Loader:
    """A Loader over `dataset`.

    Map-style datasets go through a DistributedSampler (also with one process: num_replicas=1), which
    shuffles with seed + epoch, so `loader.set_epoch(e)` gives the same order on every run; across
    ranks it hands each rank a disjoint 1/world_size share (padding the last by repeating a few samples
    unless drop_last). Iterable datasets (TarShards) split themselves over ranks and workers; they get
    rank/world_size and the epoch from here. pin_memory defaults to True when CUDA is available.
    """
    rank, world_size = _dist_info(distributed, rank, world_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    collate_fn = collate_fn or collate
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "rank"):
            dataset.rank, dataset.world_size = rank, world_size
        sampler = None
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    kwargs = dict(num_workers=workers, worker_init_fn=_seed_worker, persistent_workers=False)
    if workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    dl = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, pin_memory=pin_memory,
                    drop_last=drop_last, generator=torch.Generator(), **kwargs)
    return Loader(dl, sampler, seed, rank)
