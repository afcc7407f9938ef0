"""data/ — the data Florence trains on, as tensors (FLD-900M / FLOD-9M stand-ins, paper §2.1).

    from data import build_dataset, make_loader
    ds = build_dataset("synthetic", split="train", img_size=64)          # or csv:FILE, shards:DIR, folder:DIR
    loader = make_loader(ds, batch_size=64, workers=2, seed=0)
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader: ...   # {"image", "text", "label", "short"}

Modules: `synthetic` (toy sets for all four tasks), `formats` (real on-disk formats), `transforms`,
`loader` (collate + make_loader). See data/README.md for every format with an example.
A bad sample comes back as None, after its dataset set `last_skip = (kind, message)`, kind in SKIP_KINDS.
"""
from __future__ import annotations

import torch

from meter import soft_target, vqa_score  # the paper's VQA soft scores (meter.py), re-exported for data users

from .formats import (SKIP_KINDS, CocoDetection, DataFormatError, ImageFolder, ImageTextFile, TarShards, VideoClips,
                      VQAv2, expand_shards, load_image, normalize_answer, write_shards)
from .loader import (Loader, collate, collate_detection, collate_image_text, collate_video, collate_vqa,
                     make_loader)
from .synthetic import CLASSES, MovingShapes, ShapesDetection, ShapesText, ShapesVQA
from .transforms import CLIP_MEAN, CLIP_STD

TASKS = ("pretrain", "detect", "vqa", "video")
_SYNTHETIC = {"pretrain": ShapesText, "detect": ShapesDetection, "vqa": ShapesVQA, "video": MovingShapes}
_KIND_TASK = {"csv": "pretrain", "shards": "pretrain", "folder": "pretrain", "coco": "detect", "vqa": "vqa",
              "video": "video"}
SPEC_HELP = ("synthetic[:N] | csv:FILE(.csv/.tsv/.jsonl) | shards:DIR_OR_PATTERN | folder:DIR | "
             "coco:INSTANCES.json[,IMAGE_DIR] | vqa:QUESTIONS.json[,ANNOTATIONS.json[,IMAGE_DIR]] | "
             "video:LABELS.csv[,ROOT], each optionally followed by ?key=value&key=value")


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_spec(spec: str) -> tuple[str, list[str], dict]:
    """'csv:pairs.tsv?caption_key=text' -> ('csv', ['pairs.tsv'], {'caption_key': 'text'})."""
    spec = spec.strip()
    options = {}
    if "?" in spec:
        spec, query = spec.split("?", 1)
        for part in filter(None, query.split("&")):
            if "=" not in part:
                raise ValueError(f"data spec option {part!r} is not key=value; write e.g. ?caption_key=text.")
            k, v = part.split("=", 1)
            options[k.strip()] = _value(v.strip())
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    args = [a for a in rest.split(",") if a] if rest else []
    return kind, args, options


def build_dataset(spec: str, split: str = "train", img_size: int = 64, task: str = "pretrain", seed: int = 0,
                  **options):
    """Build the dataset a `--data` / `--eval_data` string names (see SPEC_HELP and data/README.md).

    split: "train" (augmentation on; synthetic train partition) or "val" (deterministic transforms;
    synthetic held-out partition). Extra keyword options (and ?key=value in the spec) go to the dataset's
    constructor, e.g. length=, caption_key=, num_frames=, answers= (to reuse a training VQA vocabulary).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    kind, args, spec_options = parse_spec(spec)
    options = {**options, **spec_options}
    if kind == "synthetic":
        if len(args) > 1:
            raise ValueError(f"data spec {spec!r}: write synthetic or synthetic:N (N = samples per epoch).")
        if args:
            options.setdefault("length", int(args[0]))
        return _SYNTHETIC[task](split=split, img_size=img_size, seed=seed, **options)
    if kind not in _KIND_TASK:
        raise ValueError(f"unknown data spec {spec!r}; expected {SPEC_HELP}.")
    if _KIND_TASK[kind] != task:
        raise ValueError(f"data spec {spec!r} holds {_KIND_TASK[kind]} data but the task is {task}; use a spec "
                         f"of the form {[k for k, t in _KIND_TASK.items() if t == task] + ['synthetic']}.")
    if not args:
        raise ValueError(f"data spec {spec!r} names no path; write {kind}:PATH.")
    if kind == "csv":
        return ImageTextFile(args[0], img_size=img_size, split=split, **options)
    if kind == "shards":
        return TarShards(args if len(args) > 1 else args[0], img_size=img_size, split=split, seed=seed, **options)
    if kind == "folder":
        return ImageFolder(args[0], img_size=img_size, split=split, **options)
    if kind == "coco":
        return CocoDetection(args[0], *args[1:2], img_size=img_size, split=split, **options)
    if kind == "vqa":
        return VQAv2(args[0], *args[1:3], img_size=img_size, split=split, **options)
    return VideoClips(args[0], *args[1:2], img_size=img_size, split=split, **options)


def holdout_rows(n: int, size: int) -> list[int]:
    """`size` rows (at most a tenth of n, at least 1) spread evenly over rows 0 … n−1: a held-out slice that is
    the same in every run and after a resume, and samples the whole file (a file sorted by class or source
    would bias a slice taken from its end)."""
    k = max(1, min(size, n // 10))
    return [i * n // k for i in range(k)]


class Rows(torch.utils.data.Dataset):
    """The rows `index` of a map-style dataset, renumbered 0 … len−1 (a held-out slice, or the rest), with the
    dataset's class names."""

    def __init__(self, ds, index):
        self.ds, self.index = ds, list(index)
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.ds[self.index[i]]


__all__ = ["holdout_rows", "Rows", "build_dataset", "parse_spec", "make_loader", "Loader", "collate", "collate_image_text",
           "collate_detection", "collate_vqa", "collate_video", "ShapesText", "ShapesDetection", "ShapesVQA",
           "MovingShapes", "ImageTextFile", "TarShards", "ImageFolder", "CocoDetection", "VQAv2", "VideoClips",
           "DataFormatError", "SKIP_KINDS", "load_image", "write_shards", "expand_shards", "normalize_answer", "vqa_score", "soft_target",
           "CLASSES", "CLIP_MEAN", "CLIP_STD", "TASKS", "SPEC_HELP"]
