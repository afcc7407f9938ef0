"""Florence's training loop: one loop for every task, from a CPU toy run to `torchrun` on many GPUs.

    python train.py                                   # toy UniCL pretraining on synthetic shapes, any device
    python train.py --preset tiny --data csv:pairs.tsv --eval_data folder:val/ --batch_size 256
    torchrun --nproc_per_node=8 train.py --preset florence --data shards:/data/fld --fsdp --grad_ckpt
    python train.py --help                            # every config field is a --flag

Paper: Florence (arXiv 2111.11432) §2.7 (ZeRO → FSDP `--fsdp`, activation checkpointing → `--grad_ckpt`,
mixed precision → `--amp`, gradient cache → `--gradcache_chunk`); the schedule of §2.2.

The loop knows nothing about a particular objective: a task (tasks/, one file per paper section, listed
in tasks/__init__.py) builds the model, turns a batch into a loss, evaluates and draws; the loop,
checkpoints, AMP and distribution come for free. This file holds the Config and CLI, the distributed
set-up, the global-batch sampler, the optimiser groups and schedule, AMP, checkpoint I/O and the Trainer.

Batch semantics: `--batch_size` is the *global* batch of one optimiser step (the paper's 24,576). Each
of W processes runs `--accum_steps` micro-batches of batch_size / (W · accum) samples. Step s of the run
always consumes the same global batch, whatever W is, so a run resumes exactly and W processes compute
what one process would.

Outputs in runs/<name>/: config.json, metrics.jsonl (one JSON object per event, with "step"), ckpt.pt
(atomic: temporary file, then os.replace; it holds `model_args`, the arguments that rebuild the model),
curves.png and the task's picture (e.g. predictions.png).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

import run_folder
import unicl
from data.accounting import Accounted, AccountedCollate, AccountedStream, SkipTally, sample_seed
from tasks import TASKS, Task
from tasks import draw
from tasks.base import Dist, atomic_save, check_compatible, load_checkpoint, source_task

# ----------------------------------------------------------------------------------------------------
# Config: a dataclass; every field is a --flag. Grouped in the paper's order; each group names the task
# file that reads it. A task's `defaults` replace these where neither --config nor a flag sets a field.


@dataclass
class Config:
    # what to train (train.py, every task)
    task: str = "pretrain"  # pretrain | detect | itm_mlm | vqa | video | linear_probe | classify (tasks/__init__.py)
    preset: str = "toy"  # toy | tiny | base | florence: the two towers' sizes (unicl.PRESETS)
    data: str = "synthetic"  # synthetic[:N] | csv:FILE | shards:DIR | folder:DIR | coco:… | vqa:… | video:… (data/README.md)
    eval_data: str = ""  # same forms, or holdout; "" = synthetic for synthetic --data, else (pretrain) holdout: a slice of --data (tar shards: the last shard)
    img_size: int = 0  # 0 = the preset's (64 toy, 224 otherwise) × the task's img_scale; 384 for the paper's last phase
    window_size: int = 0  # 0 = the image preset's; 12 at 384 (bias tables are resized on --init_from)
    init_from: str = ""  # a checkpoint whose weights start this run (e.g. the 224 run before 384, or the towers of an adapter)
    init_image: str = ""  # swin:PATH = the image tower from an official microsoft/Swin-Transformer or timm Swin checkpoint
    init_text: str = ""  # clip:PATH = the text tower of an OpenAI CLIP / open_clip -quickgelu state dict; clip-gelu:PATH = open_clip's GELU ones (with --tokenizer clip:VOCAB)
    # §2.2 UniCL pretraining (tasks/pretrain.py)
    stage: int = 0  # UniCL stage 1: short texts wrapped in prompt templates; 2: those texts dropped; 0: 1, or the --init_from run's
    tokenizer: str = ""  # "" = learn BPE merges on the data | FILE.json (ours) | clip:VOCAB (CLIP's bpe_simple_vocab_16e6.txt.gz)
    vocab_size: int = 0  # 0 = the preset's; BPE merges are learned up to this size
    tokenizer_texts: int = 10_000  # training captions the BPE merges are learned from
    # the schedule (train.py)
    max_steps: int = 1500  # optimiser steps of the run (the cosine schedule's length)
    max_minutes: float = 0.0  # > 0: a time budget; the cosine schedule is fitted to it (see Trainer)
    batch_size: int = 64  # global batch per optimiser step
    accum_steps: int = 1  # micro-batches per optimiser step (gradient accumulation; the global batch stays --batch_size)
    lr: float = 6e-4  # peak learning rate (AdamW), reached after the warmup
    min_lr_ratio: float = 0.5  # cosine decays to lr × this (short CPU runs learn shape late: keep lr up)
    decay_steps: int = 0  # > 0: the lr holds at --lr after the warmup, and the cosine runs over the last this many steps only
    warmup_steps: int = 100  # linear warmup from 0 to --lr
    weight_decay: float = 0.1  # AdamW; never on norms, biases, bias tables, embeddings, logit scale
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.98  # AdamW β2 (CLIP's 0.98: steadier for large contrastive batches)
    eps: float = 1e-6  # AdamW ε
    grad_clip: float = 1.0  # 0 = off
    drop_path: float = -1.0  # < 0 = the preset's
    # §2.7 scale and precision (train.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA that has it, fp16 on older CUDA, off on CPU) | bf16 | fp16 | off
    fsdp: bool = False  # shard parameters, gradients and optimiser state (ZeRO-3) instead of DDP
    grad_ckpt: bool = False  # activation checkpointing in every transformer block
    gradcache_chunk: int = 0  # > 0: contrastive gradient cache with sub-batches of this many rows
    compile: bool = False  # torch.compile the model
    workers: int = 0  # DataLoader worker processes per rank
    seed: int = 0  # initial weights, data order and augmentation (a run repeats bit for bit on CPU)
    # §2.4 object-level adapter, Dynamic Head + ATSS or Dynamic DETR (tasks/detect.py)
    det_adapter: str = "dyhead"  # dyhead: Dynamic Head + ATSS (dynamic_head.py) | dydetr: Dynamic DETR (dynamic_detr.py)
    det_head: str = "toy"  # DynamicHead preset: toy (CPU: narrow, few blocks) | paper (6 blocks × 256, P3–P7)
    det_channels: int = 0  # > 0: the pyramid / DyHead width instead of the preset's
    det_blocks: int = 0  # > 0: the number of DyHead blocks instead of the preset's
    det_classifier: str = "text"  # text: region · class-name embeddings, text tower fine-tuned | frozen | fixed: a logit per class
    zero_shot_classes: str = ""  # comma-separated class names left out of detection training, evaluated zero-shot
    det_classes: str = ""  # comma-separated names (any words) to detect in predictions.png; default: all classes
    # §2.5 fine-grained adapter, METER co-attention fusion: --task itm_mlm / vqa (tasks/vqa.py)
    meter_preset: str = ""  # "" = toy for --preset toy, else florence (6 layers × 768 × 12 heads)
    meter_layers: int = 0  # 0 = the METER preset's co-attention layers per modality
    meter_hidden: int = 0  # 0 = the METER preset's fusion width
    meter_heads: int = 0  # 0 = the METER preset's
    meter_levels: str = ""  # "" = the preset's CoSwin stages whose tokens enter the fusion, e.g. "2,3"
    mlm_prob: float = 0.15  # MLM: share of real tokens chosen (then 80/10/10 mask/random/keep)
    tower_lr: float = 0.2  # lr multiplier of the pretrained towers (METER: backbones at 1/5 of the fusion's lr); 0 freezes
    image_tower_lr: float = -1.0  # ≥ 0: the image tower's own multiplier (0: frozen, a fixed feature extractor)
    image_frozen_stages: int = 0  # > 0: the image tower's stem and first N stages are frozen (no backward through them)
    vqa_blind: bool = False  # image-blind ablation: image features zeroed before the fusion
    vqa_questions: int = 1  # ShapesVQA training questions per image (the held-out set keeps one); --task vqa: 5
    # §2.6 video adapter, Video CoSwin (tasks/video.py)
    num_frames: int = 8  # frames per clip (MovingShapes and video:LABELS.csv)
    temporal_kernel: int = 2  # K_t of the inflated tokenizer (= its temporal stride): T/K_t token frames
    video_input: str = "clip"  # clip: Video CoSwin | middle_frame: the image CoSwin on the middle frame (baseline)
    # §3 the image tower judged: --task linear_probe / classify (tasks/classify.py)
    probe_size: int = 10_000  # synthetic: training images whose frozen features the probe is fitted on
    probe_l2: str = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"  # L2 strengths swept; the best top-1 on the validation split wins
    probe_val: float = 0.2  # share of the probe's training features held out to choose the L2 strength
    feature_cache: str = ""  # "" = <out_dir>/feature_cache; off = extract every run (keyed by weights and data)
    label_smoothing: float = 0.1  # classify: cross-entropy label smoothing
    layer_decay: float = 0.9  # classify: block j of N gets lr·decay^(N+1−j) (last block lr·decay); 1.0 = off
    # evaluation, logging, checkpoints (train.py)
    eval_only: bool = False  # with --init_from or --resume: evaluate and draw on --eval_data, no training, no checkpoint
    export: str = ""  # a path: also write the weights-only model there (every run writes <run>/model.pt at its end)
    tensorboard: bool = False  # also write TensorBoard events to <run>/tb (only if the tensorboard package is installed)
    eval_every: int = 250  # steps between evaluations (0 = only the final one)
    eval_size: int = 1000  # held-out samples for evaluation (synthetic / capped for files)
    log_every: int = 10  # steps between metrics.jsonl records (and log lines when stdout is not a terminal)
    ckpt_every: int = 250  # steps between checkpoints (one is always written at the end)
    max_bad_steps: int = 20  # this many non-finite steps in a row stop the run
    out_dir: str = "runs"  # run folders are made here: <out_dir>/<name>/
    name: str = ""  # run name; default: <task>-<preset>
    resume: str = ""  # "" (fresh) | auto (runs/<name>/ckpt.pt, else ckpt.prev.pt, if present) | PATH
    overwrite: bool = False  # start afresh in a run folder that holds a checkpoint (its files are deleted)
    progress: bool = True  # tqdm bar on rank 0


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def config_help() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(group title, [(field, help)])] read from the Config's source: its `# group` lines and the comment
    after each field, so the help a user reads is the comment a developer reads (one place to keep)."""
    with open(os.path.abspath(__file__), encoding="utf-8") as fh:  # not inspect: it fails under `python -m cProfile`
        source = fh.read()
    start = source.index("\nclass Config:")
    lines = source[start + 1:].split("\n\n\n", 1)[0].splitlines()  # the class, up to the next top-level name
    groups = []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("# "):
            groups.append((text[2:], []))
        elif ":" in text and not text.startswith(("#", '"')):
            name = text.split(":", 1)[0].strip()
            comment = text.split("  # ", 1)[1] if "  # " in text else ""
            if not groups:
                groups.append(("", []))
            groups[-1][1].append((name, comment))
    return groups


def _help_defaults(argv) -> tuple[str, dict]:
    """The task named on the command line (for --help) and the defaults a run of it would get."""
    task = Config.task
    for i, a in enumerate(argv or []):
        if a == "--task" and i + 1 < len(argv):
            task = argv[i + 1]
        elif a.startswith("--task="):
            task = a.split("=", 1)[1]
    t = TASKS.get(task)
    return task, {**getattr(t, "defaults", {}), **getattr(t, "demo_defaults", {})}


def parse_config(argv=None) -> Config:
    """CLI → Config. `--config run.json` loads a file first; flags given on the line win; then the task's
    defaults fill what neither set, and its CPU-demo defaults too for the toy preset on synthetic data."""
    argv = list(sys.argv[1:] if argv is None else argv)
    help_task, task_defaults = _help_defaults(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults shown are those of --task {help_task}"
               + (" (the CPU demo's values where marked: --preset toy on synthetic data)"
                  if getattr(TASKS.get(help_task), "demo_defaults", None) else "")
               + "; `python train.py --task NAME --help` shows another task's.")
    p.add_argument("--config", default="", help="a JSON file of config fields (e.g. a run's config.json)")
    defaults = Config()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    demo = getattr(TASKS.get(help_task), "demo_defaults", {})
    choices = {**CHOICES, "task": tuple(TASKS), "preset": tuple(unicl.PRESETS)}
    for title, members in config_help():
        group = p.add_argument_group(title)
        for name, comment in members:
            default = task_defaults.get(name, getattr(defaults, name))
            shown = f"{default!r}" + (" in the CPU demo" if name in demo else "")
            text = (comment.replace("%", "%%") + " " if comment else "") + f"[default: {shown}]"
            if name in choices:
                text += f" {{{', '.join(map(str, choices[name]))}}}"
            if isinstance(getattr(defaults, name), bool):  # `--fsdp` alone means true; `--fsdp false` also works
                group.add_argument(f"--{name}", type=_parse_bool, nargs="?", const=True, default=None, help=text,
                                   metavar="BOOL")
            else:
                group.add_argument(f"--{name}", type=type(getattr(defaults, name)), default=None, help=text,
                                   metavar=name.upper() if name not in choices else "WORD")
        assert all(n in fields for n, _ in members), "config_help() must read only Config fields"
    args, unknown = p.parse_known_args(argv)
    if unknown:
        valid = " ".join(f"--{f.name}" for f in dataclasses.fields(Config))
        raise SystemExit(f"train.py: unknown flag(s) {' '.join(unknown)}. Valid flags: --config {valid}")
    values = {}
    if args.config:
        try:
            with open(args.config) as fh:
                values = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"train.py: cannot read --config {args.config!r} ({e}); give a JSON file of fields")
        bad = sorted(set(values) - set(fields))
        if bad:
            raise SystemExit(f"train.py: {args.config} has unknown field(s) {bad}; valid: {sorted(fields)}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    task = TASKS.get(values.get("task", defaults.task))
    base = dict(getattr(task, "defaults", {}))
    if is_cpu_demo(values.get("preset", defaults.preset), values.get("data", defaults.data)):
        base.update(getattr(task, "demo_defaults", {}))
    cfg = Config(**{**base, **values})  # the task's defaults, then file, then flags
    if not cfg.eval_data:  # file data is judged on held-out rows of itself, never on synthetic shapes
        synthetic = cfg.data == "synthetic" or cfg.data.startswith(("synthetic:", "synthetic?"))
        cfg = dataclasses.replace(cfg, eval_data="synthetic" if synthetic or cfg.task != "pretrain" else "holdout")
    validate_config(cfg)
    return cfg


def is_cpu_demo(preset: str, data: str) -> bool:
    """The toy preset on synthetic data: the runs whose time budgets and image sizes were fitted to a CPU."""
    return preset == "toy" and (data == "synthetic" or data.startswith(("synthetic:", "synthetic?")))


def validate_config(cfg: Config):
    if cfg.preset not in unicl.PRESETS:
        raise SystemExit(f"train.py: unknown --preset {cfg.preset!r}; choose one of {sorted(unicl.PRESETS)}")
    if cfg.task not in TASKS:
        raise SystemExit(f"train.py: unknown --task {cfg.task!r}; available: {sorted(TASKS)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise SystemExit(f"train.py: --{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if cfg.stage not in (0, 1, 2):
        raise SystemExit(f"train.py: --stage must be 1 or 2 (0: the --init_from run's), got {cfg.stage}")
    for name, ok, rule in RANGES:
        value = getattr(cfg, name)
        if not ok(value):
            raise SystemExit(f"train.py: --{name} must be {rule}, got {value}")


# the flags that take one of a few words (shown by --help, checked before anything is built)
CHOICES = {"amp": ("auto", "bf16", "fp16", "off"), "det_head": ("toy", "paper"),
           "det_adapter": ("dyhead", "dydetr"), "det_classifier": ("text", "frozen", "fixed"),
           "video_input": ("clip", "middle_frame")}

# (flag, check, the rule in words): every numeric flag is checked before anything is built
RANGES = [
    *[(n, lambda v: v >= 1, "at least 1") for n in ("batch_size", "accum_steps", "max_steps", "eval_size",
                                                   "max_bad_steps", "tokenizer_texts", "num_frames",
                                                   "temporal_kernel", "probe_size", "vqa_questions")],
    *[(n, lambda v: v >= 0, "0 or more") for n in ("lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "workers",
                                                  "img_size", "window_size", "vocab_size", "max_minutes",
                                                  "gradcache_chunk", "eval_every", "log_every", "ckpt_every",
                                                  "det_channels", "det_blocks", "meter_layers", "meter_hidden",
                                                  "meter_heads", "tower_lr", "image_frozen_stages", "seed")],
    *[(n, lambda v: 0 <= v < 1, "in [0, 1)") for n in ("beta1", "beta2", "label_smoothing")],
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("eps", lambda v: v > 0, "above 0"),
    ("drop_path", lambda v: v < 0 or v < 1, "in [0, 1) (or below 0 for the preset's)"),
    ("image_tower_lr", lambda v: v >= 0 or v == -1, "0 or more (or -1: --tower_lr)"),
    ("mlm_prob", lambda v: 0 < v < 1, "in (0, 1)"),
    ("probe_val", lambda v: 0 < v < 1, "in (0, 1)"),
    ("layer_decay", lambda v: 0 < v <= 1, "in (0, 1] (1.0 = off)"),
]


def resolved(cfg: Config) -> Config:
    """Fill the preset-dependent zeros (img_size: the preset's × the task's `img_scale`, vocab_size, name)."""
    p = unicl.PRESETS[cfg.preset]
    scale = getattr(TASKS.get(cfg.task), "img_scale", 1)
    name = cfg.name or f"{cfg.task}-{cfg.preset}" + ("-eval" if cfg.eval_only else "")
    return dataclasses.replace(cfg, img_size=cfg.img_size or p.img_size * scale,
                               vocab_size=cfg.vocab_size or p.vocab_size, name=name)


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, NCCL on CUDA, gloo on CPU


def _fsdp2():
    """(fully_shard, FSDPModule): public in torch ≥ 2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def setup_distributed(cfg: Config) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("train.py: --device cuda but no CUDA device is visible; use --device cpu")
            if device.index is None:
                device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local_rank, device)


# ----------------------------------------------------------------------------------------------------
# Data order: a step-indexed global batch, split over ranks and micro-steps


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of indices, step by step, from `start_step` on.

    Epoch e is a permutation of the n samples seeded by (seed, e); step s of the run takes global batch
    s mod steps_per_epoch of epoch s // steps_per_epoch (the tail that does not fill a batch is dropped).
    Micro-step m of rank r gets rows [(m·W + r)·b, (m·W + r + 1)·b) of the global batch, so gathering over
    ranks in rank order rebuilds the global batch exactly. `start_micro` skips that many micro-batches of
    this rank (a resumed run's data position); `sample_seeds` yields (index, seed) pairs instead of indices,
    the seed a function of (seed, step, row of the global batch) (data/accounting.py)."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, accum: int, seed: int, start_step: int = 0,
                 start_micro: int = 0, sample_seeds: bool = False):
        self.n, self.B, self.rank, self.world, self.accum, self.seed = n, global_batch, rank, world, accum, seed
        self.start_micro, self.sample_seeds = start_micro, sample_seeds
        self.micro = global_batch // (world * accum)
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"train.py: the training set has {n} samples, fewer than one global batch of "
                             f"{global_batch}; lower --batch_size or add data")
        self.start_step = start_step

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        step = self.start_step + self.start_micro // self.accum
        skip = self.start_micro % self.accum
        epoch, perm = None, None
        while True:
            e = step // self.steps_per_epoch
            if e != epoch:
                epoch, perm = e, self._perm(e)
            s = step % self.steps_per_epoch
            batch = perm[s * self.B:(s + 1) * self.B]
            for m in range(skip, self.accum):
                j = m * self.world + self.rank
                rows = batch[j * self.micro:(j + 1) * self.micro].tolist()
                if self.sample_seeds:
                    rows = [(i, sample_seed(self.seed, step, j * self.micro + k)) for k, i in enumerate(rows)]
                yield rows
            skip = 0
            step += 1

    def __len__(self):  # infinite in principle; DataLoader only asks for len() when we do
        return 2 ** 62


def infinite_stream(loader_factory, skip_batches: int, isolate_rng: bool = True, micro: int = 0):
    """For iterable (sharded) datasets: epochs back to back; `skip_batches` are read and dropped first
    (a resumed stream repeats the epoch's order, so skipping re-reads rather than seeking). With
    `isolate_rng` (the stream read in this process) the random state is put back after the skipped
    batches, so the batches that follow draw what they drew in the uninterrupted run. An epoch that forms
    no batch at all stops the run (it would otherwise retry for ever)."""
    epoch = 0
    saved = rng_state() if skip_batches > 0 and isolate_rng else None
    while True:
        formed = False
        for batch in loader_factory(epoch):
            formed = True
            if skip_batches > 0:
                skip_batches -= 1
                if skip_batches == 0 and saved is not None:
                    set_rng_state(saved)
                continue
            yield batch
        if not formed:
            raise SystemExit(f"train.py: the training stream formed no micro-batch of {micro} samples in a whole epoch "
                             "(fewer samples than one micro-batch per rank, or none readable); lower --batch_size, "
                             "add data, or check the shards")
        epoch += 1


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule


NO_DECAY_WORDS = ("relative_position_bias_table", "logit_scale", "embedding", "pos_embed", "positional", "token_embed")


def fused_adamw(device: torch.device, sharded: bool = False) -> bool:
    """AdamW's fused kernel (one pass over all parameters) on CUDA and, from torch 2.4, on CPU, where the
    per-tensor loop it replaces cost the toy run about a tenth of its step (many small tensors). FSDP's
    sharded parameters on CPU keep the loop (the gloo tests' path)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or sharded:
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError):  # a torch without the CPU kernel
        return False


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: decay on weight matrices and conv kernels; none on norms, biases, bias tables,
    embeddings and the logit scale (CLIP / Swin practice). `lr_scales` {parameter name: multiplier} (a
    task's `lr_scales`, e.g. layer-wise decay) splits the groups further; each group's "lr_scale" multiplies
    the scheduled lr in every step (see Trainer.train_step)."""
    lr_scales = lr_scales or {}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(w in name for w in NO_DECAY_WORDS) or isinstance(_owner(model, name), nn.Embedding)
        scale = float(lr_scales.get(name, 1.0))
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], -k[1]))]


def _owner(model: nn.Module, param_name: str):
    mod = model
    for part in param_name.split(".")[:-1]:
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def lr_at(step: int, cfg: Config, total: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr · min_lr_ratio at `total`. With
    decay_steps > 0 the lr holds at lr after the warmup and the cosine spans the last decay_steps steps
    alone (warmup–stable–decay, as MiniCPM trains): a run keeps a high lr for most of its steps and still
    ends annealed, where a constant lr would leave the weights jittering from step to step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps if cfg.decay_steps <= 0 else max(cfg.warmup_steps, total - cfg.decay_steps)
    t = min(1.0, max(0.0, (step - start) / max(1, total - start)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def resolve_amp(cfg: Config, device: torch.device):
    """→ (autocast dtype or None, use GradScaler)."""
    amp = cfg.amp
    if amp == "auto":
        if device.type != "cuda":
            return None, False
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return None, False
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("train.py: --amp fp16 needs CUDA (use bf16 or off on CPU)")
    return (torch.bfloat16 if amp == "bf16" else torch.float16), amp == "fp16"


# ----------------------------------------------------------------------------------------------------
# Gradient averaging for the gradient cache (its re-forwards bypass DDP's hooks)


def grad_buckets(params: list, cap_bytes: int = 25 * 2 ** 20) -> list[list]:
    """Consecutive parameters of one dtype and device, in groups of at most `cap_bytes` (DDP's 25 MB default
    bucket, torch/nn/parallel/distributed.py `bucket_cap_mb`; a larger parameter is a bucket of its own)."""
    buckets, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > cap_bytes or (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def all_reduce_mean(params: list, max_buckets: int = 8) -> int:
    """Average the gradients of `params` over the processes with one all-reduce per bucket instead of one per
    parameter (455 blocking calls per step for the florence preset): buckets of at least 25 MB and at most
    about `max_buckets` of them; each is flattened into one buffer, its all-reduce is started asynchronously,
    and the next bucket is flattened while it runs; then the averaged values are copied back (the buffers
    together hold one copy of the gradients). A parameter without a gradient on this rank contributes zeros,
    so every rank builds the same buckets. → the number of collectives."""
    total = sum(p.numel() * p.element_size() for p in params)
    works = []
    for bucket in grad_buckets(params, max(25 * 2 ** 20, -(-total // max_buckets))):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        works.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    world = dist.get_world_size()
    for bucket, flat, work in works:
        work.wait()
        flat /= world
        offset = 0
        for p in bucket:
            g = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    return len(works)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the RNG streams that make resume exact (atomic_save, load_checkpoint: tasks/base.py)


def rng_state() -> dict:
    st = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "numpy_pos": int(np.random.get_state()[2]),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------------
# The loop


class _Stopped(Exception):
    """A signal arrived while the loop waited for data: save and stop as after a step."""


class Trainer:
    """Owns the run: model wrapping, optimiser, data position, AMP, checkpoints, evaluation, logging.

    `--max_minutes`: after 10 timed steps the cosine schedule's length is set to the steps that fit in
    the remaining budget (minus the measured evaluation cost), capped by --max_steps; the run then ends
    cleanly with its final evaluation and checkpoint when the budget or the steps run out.

    Resume: `--resume auto|PATH` continues from a checkpoint (model, optimiser, RNG streams, data position)
    so that the run ends bit for bit where an uninterrupted one does (on CPU). A --max_steps other than the
    checkpoint's sets the schedule's new length (the cosine is recomputed for it: the lr moves to the new
    curve's value at the resume step); any other changed flag is named and recorded in config_history.jsonl.
    SIGTERM or SIGINT: a checkpoint after the current step, then exit status 128 + the signal's number
    (143, 130); a second SIGINT exits at once."""

    def __init__(self, cfg: Config, d: Dist):
        self.dist = d
        self.run_dir = os.path.join(cfg.out_dir, cfg.name)
        self.ckpt_path = os.path.join(self.run_dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.lock = run_folder.Lock(self.run_dir)
        self.t_created = time.time()
        self.weights = None  # --eval_only: the checkpoint or export whose weights are evaluated
        self.tb = None  # --tensorboard's writer (opened by fit)
        if cfg.eval_only:
            self.weights, ckpt, resume_path = self._eval_source(cfg), None, ""
        else:
            ckpt, resume_path = run_folder.load_resume(cfg.resume, self.run_dir, say=tqdm.write if d.main else None)
        refusal = None
        if d.main:
            try:
                if cfg.eval_only and os.path.isfile(self.ckpt_path):
                    raise SystemExit(f"train.py: --eval_only writes metrics into {self.run_dir}/, which holds a "
                                     "training run's checkpoint; give another --name")
                run_folder.guard_folder(self.run_dir, resuming=ckpt is not None, overwrite=cfg.overwrite)
                os.makedirs(self.run_dir, exist_ok=True)
                self.lock.acquire(say=tqdm.write)
            except SystemExit as e:
                refusal = e
        if d.on:  # every rank stops when rank 0 refuses the folder (the others would wait in a collective)
            flag = torch.tensor([1.0 if refusal else 0.0], device=d.device)
            dist.broadcast(flag, src=0)
            if flag.item() and refusal is None:
                raise SystemExit("train.py: rank 0 refused the run folder (its message says why)")
        if refusal is not None:
            raise refusal
        try:
            self._build(cfg, ckpt, resume_path)
        except BaseException:
            self.lock.release()
            raise

    @staticmethod
    def _eval_source(cfg: Config) -> dict:
        """--eval_only: the checkpoint (or weights-only export) named by --resume PATH or --init_from, of this task."""
        path = cfg.resume or cfg.init_from
        if not path or path == "auto":
            raise SystemExit("train.py: --eval_only needs the weights to evaluate: --init_from PATH (a checkpoint "
                             "or an exported model.pt) or --resume PATH")
        src = load_checkpoint(path)
        theirs = source_task(src)
        if theirs != cfg.task:
            raise SystemExit(f"train.py: --eval_only --task {cfg.task} evaluates a {cfg.task} model, but {path} holds "
                             f"a {theirs or 'unknown'} one; pass --task {theirs}" if theirs else
                             f"train.py: {path} has no train.py config; --eval_only reads checkpoints and exports "
                             "written by train.py")
        return src

    def _build(self, cfg: Config, ckpt: dict | None, resume_path: str):
        d = self.dist
        init = load_checkpoint(cfg.init_from) if ckpt is None and cfg.init_from and not cfg.eval_only else None
        cfg = self.cfg = TASKS[cfg.task].resolve_config(cfg, ckpt or init or self.weights)
        changes = None
        if ckpt is not None:
            changes = run_folder.changed_fields(json.loads(ckpt.get("config", "{}")), dataclasses.asdict(cfg))
            if changes and d.main:
                tqdm.write("resume: changed since the checkpoint: " +
                           ", ".join(f"--{k} {old!r} → {new!r}" for k, (old, new) in changes.items()))
        self.task: Task = TASKS[cfg.task](cfg, d)
        self.amp_dtype, use_scaler = resolve_amp(cfg, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.step = 0
        self.data_position = 0  # micro-batches this rank has taken from the training data
        self.micro_per_epoch = None  # of a map-style training set (set by batches())
        self.total_steps = cfg.max_steps
        self.bad_in_a_row = self.bad_total = 0
        self.tally = SkipTally()
        self.stop_requested, self.stopped_by = False, 0

        if ckpt is not None or self.weights is not None:
            self.task.load_state_dict((ckpt or self.weights).get("task", {}))
        elif init is not None:
            self.task.init_checkpoint = init
        # the same initial weights on every rank; then a per-rank stream for dropout / drop-path
        torch.manual_seed(cfg.seed)
        self.model = self.task.build_model()
        if self.task.init_checkpoint is not None:  # what build_model did not take itself (e.g. a pretraining run's towers)
            self.task.init_from(self.model, self.task.init_checkpoint, cfg.init_from)
            self.task.init_checkpoint = None
        if init is not None and d.main:  # one line for every task, whichever side took the weights
            tqdm.write(f"initialised from {cfg.init_from} (a --task {source_task(init)} checkpoint at step "
                       f"{init.get('step', '?')})")
        if self.weights is not None:
            check_compatible(self.model.state_dict(), self.weights["model"], cfg.resume or cfg.init_from)
            self.model.load_state_dict(self.weights["model"])
            self.step = int(self.weights.get("step", 0))  # metrics are recorded at the step the weights reached
            if d.main:
                tqdm.write(f"evaluating {cfg.resume or cfg.init_from} (no training, no checkpoint)")
        self.task.check_eval()  # the held-out set is built and checked now, not after training
        self.model.to(d.device)
        self.wrapped = self._wrap(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, self.task.lr_scales(self.model)),
                                           lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=fused_adamw(d.device, cfg.fsdp))
        torch.manual_seed(cfg.seed + 1000 * d.rank)
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        if ckpt is not None:
            self._load(ckpt, resume_path)
        if d.main:
            if ckpt is None and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)  # a folder without a checkpoint: nothing of it to continue
            run_folder.record_config(self.run_dir, dataclasses.asdict(cfg), self.step, changes)

    # -- set-up ----------------------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        cfg, d = self.cfg, self.dist
        wrapped = model
        if cfg.fsdp:
            if cfg.gradcache_chunk > 0:
                raise SystemExit("train.py: --gradcache_chunk with --fsdp is not supported yet; use DDP with "
                                 "--gradcache_chunk, or --fsdp with --grad_ckpt")
            if not dist.is_initialized():
                raise SystemExit("train.py: --fsdp needs torchrun (torch.distributed); launch with "
                                 "torchrun --nproc_per_node=N train.py --fsdp")
            # FSDP2 (per-parameter sharding, ZeRO-3): each transformer block is a unit, then the root.
            # Works on CPU (gloo) and CUDA (NCCL); the model is changed in place.
            fully_shard, _ = _fsdp2()
            units = tuple(self.task.fsdp_wrap_classes())
            for m in model.modules():
                if units and isinstance(m, units):
                    fully_shard(m)
            fully_shard(model)
            wrapped = model
        elif d.on:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        if cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _full_state(self) -> tuple[dict, dict]:
        """Unwrapped, uncompiled model and optimiser state (full, even under FSDP)."""
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.wrapped, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict(), self.optimizer.state_dict()

    def _load(self, ckpt: dict, path: str):
        check_compatible(self.model.state_dict(), ckpt["model"], path)
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.wrapped, self.optimizer, model_state_dict=ckpt["model"],
                           optim_state_dict=ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.total_steps = int(ckpt.get("total_steps", self.cfg.max_steps))
        theirs = json.loads(ckpt.get("config", "{}")).get("max_steps", self.cfg.max_steps)
        if self.cfg.max_steps != theirs:  # a new length: the schedule is recomputed for it
            self.total_steps = max(self.cfg.max_steps, self.step)
            if self.dist.main:
                tqdm.write(f"resume: --max_steps {theirs} → {self.cfg.max_steps}: the run now ends at step "
                           f"{self.total_steps} (the cosine schedule is recomputed for that length)")
        positions = ckpt.get("data_position")
        self.data_position = (int(positions[self.dist.rank]) if isinstance(positions, list) and
                              len(positions) == self.dist.world else self.step * self.cfg.accum_steps)
        tally = ckpt.get("tally")
        if isinstance(tally, list) and len(tally) == self.dist.world:
            self.tally = SkipTally(**tally[self.dist.rank])
        rngs = ckpt.get("rng", [])
        if len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank])
        if self.dist.main:
            tqdm.write(f"resumed from {path} at step {self.step}")

    def _gather(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        if not self.dist.on:
            return [obj]
        out = [None] * self.dist.world
        dist.all_gather_object(out, obj)
        return out

    def save(self):
        model_sd, optim_sd = self._full_state()
        per_rank = self._gather((rng_state(), self.data_position, self.tally.state()))
        if self.dist.main:
            run_folder.save_checkpoint(
                {"model": model_sd, "optimizer": optim_sd,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "step": self.step, "total_steps": self.total_steps,
                 "data_position": [p for _, p, _ in per_rank], "tally": [t for _, _, t in per_rank],
                 "skipped_samples": sum(t["skipped"] for _, _, t in per_rank), "rng": [r for r, _, _ in per_rank],
                 "config": json.dumps(dataclasses.asdict(self.cfg)), "task": self.task.state_dict(),
                 "model_args": self.task.model_args},
                self.ckpt_path)
        if self.dist.on:
            dist.barrier()

    def export(self):
        """The weights-only model (weights, model_args, the task's state such as the tokenizer, the config;
        no optimiser, no RNG): <run>/model.pt, and --export PATH too. `torch.load(weights_only=True)` reads
        it, and so do `florence.load` and `--eval_only --init_from`."""
        model_sd, _ = self._full_state()  # collective under FSDP: every rank takes part
        if not self.dist.main:
            return
        obj = {"format": "florence-export", "model": model_sd, "model_args": self.task.model_args,
               "task": self.task.state_dict(), "config": json.dumps(dataclasses.asdict(self.cfg)), "step": self.step}
        paths = ([] if self.cfg.eval_only else [os.path.join(self.run_dir, "model.pt")]) + \
            ([self.cfg.export] if self.cfg.export else [])
        for path in paths:
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(obj, path, what="exported model", hint="export again with --eval_only --init_from CKPT --export PATH")

    # -- logging ---------------------------------------------------------------------------------------
    def log(self, record: dict):
        if self.dist.main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps({"step": self.step, **record}) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                        self.tb.add_scalar(f"{record.get('event', 'train')}/{k}", v, self.step)

    def _open_tensorboard(self):
        """--tensorboard: a SummaryWriter in <run>/tb when the tensorboard package is there (never a dependency)."""
        self.tb = None
        if self.cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                           "metrics.jsonl and curves.png are written as always")
                return
            self.tb = SummaryWriter(os.path.join(self.run_dir, "tb"))

    @contextlib.contextmanager
    def _unsharded_root(self):
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()

    def evaluate(self, final: bool = False):
        ctx = contextlib.nullcontext()
        if self.cfg.fsdp:  # evaluation calls encode_* directly: gather the root's own parameters first
            ctx = self._unsharded_root()
        with ctx, torch.autocast(self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                                 enabled=self.amp_dtype is not None):
            metrics = self.task.evaluate(self.model, self.step)
            if final:  # on every rank: under FSDP each forward is collective; the task writes on rank 0
                self.task.visualise(self.model, self.run_dir)
        self.log({"event": "eval", **metrics})
        if self.dist.main:
            tqdm.write(f"step {self.step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    # -- data ------------------------------------------------------------------------------------------
    def batches(self):
        """This rank's micro-batches from the run's data position on. Every sample a dataset could not use
        arrives counted by kind (data/accounting.py); with workers, each sample draws from its own seeds."""
        cfg, d = self.cfg, self.dist
        ds = self.task.train_dataset()
        micro = cfg.batch_size // (d.world * cfg.accum_steps)
        if micro * d.world * cfg.accum_steps != cfg.batch_size:
            raise SystemExit(f"train.py: --batch_size {cfg.batch_size} must be divisible by processes × "
                             f"accum_steps = {d.world} × {cfg.accum_steps}")
        g = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)
        collate = AccountedCollate(self.task.collate)
        if isinstance(ds, IterableDataset):
            stream = AccountedStream(ds)

            def factory(epoch):
                stream.set_epoch(epoch)
                return DataLoader(stream, batch_size=micro, collate_fn=collate, num_workers=cfg.workers,
                                  generator=g, pin_memory=d.device.type == "cuda", drop_last=True)
            yield from infinite_stream(factory, self.data_position, isolate_rng=cfg.workers == 0, micro=micro)
            return
        sampler = GlobalBatchSampler(len(ds), cfg.batch_size, d.rank, d.world, cfg.accum_steps, cfg.seed,
                                     start_micro=self.data_position, sample_seeds=cfg.workers > 0)
        self.micro_per_epoch = sampler.steps_per_epoch * cfg.accum_steps
        loader = DataLoader(Accounted(ds), batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                            generator=g, pin_memory=d.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
        yield from loader

    def next_batch(self, batches) -> dict:
        """The next micro-batch with a usable sample. One whose every sample was unusable is counted and passed
        over; when no batch can be formed the run stops with what was read and why, instead of retrying for ever."""
        empty = 0
        limit = min(50, self.micro_per_epoch or 50)
        while True:
            if self.stop_requested and not self.dist.on:
                raise _Stopped()
            batch = next(batches)
            self.data_position += 1
            self.tally.add(batch)
            if batch:
                return batch
            empty += 1
            if empty >= limit:
                t = self.tally
                reasons = "; ".join(t.examples[:3]) or "no reason given"
                raise SystemExit(f"train.py: no training batch could be formed from --data {self.cfg.data!r}: "
                                 f"{t.skipped} of the {t.read} samples read were unusable ({t.summary()}); first "
                                 f"reasons: {reasons}. Fix the paths or files the reasons name (relative image "
                                 "paths resolve beside the index file, then from the working directory)")

    # -- one optimiser step ----------------------------------------------------------------------------
    def train_step(self, batches) -> tuple[float, dict]:
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        manual_sync = d.on and not cfg.fsdp and cfg.gradcache_chunk > 0  # gradcache bypasses DDP's hooks
        losses, logs = [], {}
        for m in range(cfg.accum_steps):
            batch = self.next_batch(batches)
            last = m == cfg.accum_steps - 1
            sync_ctx = contextlib.nullcontext()
            if cfg.fsdp:
                self.wrapped.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last micro-step
            elif hasattr(self.wrapped, "no_sync") and (not last or manual_sync):
                sync_ctx = self.wrapped.no_sync()
            with sync_ctx, torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32,
                                          enabled=self.amp_dtype is not None):
                loss, logs = self.task.forward_backward(self.wrapped, batch, self.step, 1.0 / cfg.accum_steps,
                                                        self.scaler)
            losses.append(torch.as_tensor(loss, device=d.device).detach().to(torch.float64))  # stays on device
        if manual_sync:
            all_reduce_mean([p for p in self.model.parameters() if p.requires_grad])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            gnorm = gnorm.full_tensor()
        # one host-device sync per step: loss, grad norm and the stop flag travel (and all-reduce) as one tensor
        stats = torch.stack([sum(losses) / len(losses), gnorm.detach().to(torch.float64),
                             torch.tensor(1.0 if self.stop_requested else 0.0, dtype=torch.float64, device=d.device)])
        if d.on:
            dist.all_reduce(stats)
            stats /= d.world
        loss, gnorm_f, stop_flag = stats.tolist()
        self.stop_requested = stop_flag > 0
        finite = math.isfinite(loss) and math.isfinite(gnorm_f)
        if finite or self.scaler is not None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "clamp_logit_scale_"):
            self.model.clamp_logit_scale_()
        if finite:
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.bad_total += 1
            self.log({"event": "nonfinite", "loss": None if not math.isfinite(loss) else loss})
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise SystemExit(f"train.py: {self.bad_in_a_row} non-finite steps in a row at step {self.step}; "
                                 "lower --lr, use --amp bf16 or off, or check the data")
        return loss, {"grad_norm": gnorm_f, **logs}

    # -- the run ---------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now, without the checkpoint
        self.stop_requested, self.stopped_by = True, signum
        if self.dist.main:
            tqdm.write(f"signal {signum}: saving a checkpoint after this step, then stopping (Ctrl-C again: at once)")

    def _finish(self, t_start: float, metrics: dict, what: str) -> dict:
        """The end record, summed over ranks: skipped samples by kind and the task's counters; one line for people."""
        cfg, d = self.cfg, self.dist
        wall = time.time() - t_start
        tally = SkipTally.merged(self._gather(self.tally.state()))
        counters = {}
        for c in self._gather(self.task.counters()):
            for k, v in c.items():
                counters[k] = counters.get(k, 0) + v
        self.log({"event": "end", "wall_s": wall, "skipped_samples": tally.skipped, "samples_read": tally.read,
                  "skipped_by_kind": dict(tally.kinds), "nonfinite_steps": self.bad_total, **counters, **metrics})
        if d.main:
            if not cfg.eval_only:
                draw.curves(self.metrics_path, os.path.join(self.run_dir, "curves.png"), cfg.name)
            if self.tb is not None:
                self.tb.close()
            extra = "".join(f"; {k} {v}" for k, v in counters.items())
            data = "" if cfg.eval_only else f"; {tally.summary()}{extra}"
            tqdm.write(f"done: {what} in {wall / 60:.1f} min{data}; wrote {self.written()}")
            if tally.share() > 0.05:
                tqdm.write(f"WARNING: {tally.share():.1%} of the training samples read were skipped "
                           f"({tally.summary()}); first reasons: {'; '.join(tally.examples[:3])}. Check --data")
        return metrics

    def written(self) -> str:
        """Every file this run wrote in its folder (and the --export file), for the closing line."""
        names = sorted(f for f in os.listdir(self.run_dir) if f != "lock" and
                       os.path.getmtime(os.path.join(self.run_dir, f)) >= self.t_created - 1)
        out = f"{self.run_dir}/{{{', '.join(names)}}}" if names else f"nothing in {self.run_dir}/"
        return out + (f" and {self.cfg.export}" if self.cfg.export else "")

    def evaluate_only(self) -> dict:
        """--eval_only: the task's evaluation and pictures on --eval_data; no step, no checkpoint."""
        t_start = time.time()
        try:
            metrics = self.evaluate(final=True)
            if self.cfg.export:
                self.export()
            return self._finish(t_start, metrics, "evaluated")
        finally:
            self.lock.release()

    def fit_directly(self) -> dict:
        """A task that is not a loop of optimiser steps (trains_by_steps = False, e.g. the linear probe's
        L-BFGS fit): its fit runs once, as the run's step 1, then the checkpoint and the final evaluation."""
        t_start = time.time()
        try:
            if self.step == 0:
                loss, logs = self.task.fit_directly(self.wrapped)
                self.step = self.total_steps = 1
                self.log({"loss": loss, **logs})
                self.save()
            metrics = self.evaluate(final=True)
            self.export()
            return self._finish(t_start, metrics, "fitted")
        finally:
            self.lock.release()

    def fit(self) -> dict:
        self._open_tensorboard()
        if self.cfg.eval_only:
            return self.evaluate_only()
        if not self.task.trains_by_steps:
            return self.fit_directly()
        cfg, d = self.cfg, self.dist
        # a terminal gets the tqdm bar; a log file (a cluster job, a pipe) gets a plain line every --log_every
        lines = d.main and cfg.progress and not (sys.stdout.isatty() and sys.stderr.isatty())
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else None
        eval_cost = 0.0
        batches = self.batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (d.main and cfg.progress) or lines,
                   dynamic_ncols=True, desc=cfg.name)
        t_window, n_window = time.time(), 0
        timed_from, timed_t0 = None, None
        start = self.step

        def every(n: int) -> bool:  # an interval of 0 is off
            return n > 0 and self.step % n == 0

        try:
            while self.step < self.total_steps:
                try:
                    loss, logs = self.train_step(batches)
                except _Stopped:
                    self.save()
                    break
                self.step += 1
                n_window += 1
                bar.update(1)
                if timed_from is None and self.step >= 2:
                    timed_from, timed_t0 = self.step, time.time()
                if deadline and timed_from is not None and self.step == timed_from + 10:
                    per_step = (time.time() - timed_t0) / 10
                    n_evals = max(1, (self.total_steps - self.step) // cfg.eval_every) if cfg.eval_every else 0
                    left = deadline - time.time() - eval_cost * n_evals
                    fit = self.step + max(1, int(left / per_step))
                    self.total_steps = min(cfg.max_steps, max(fit, self.step + 1))
                    bar.total = self.total_steps
                    self.log({"event": "schedule", "total_steps": self.total_steps, "per_step_s": per_step})
                    if d.main and self.total_steps < cfg.max_steps:
                        tqdm.write(f"--max_minutes {cfg.max_minutes:g}: {per_step:.2f} s per step, so the schedule ends "
                                   f"at step {self.total_steps} of --max_steps {cfg.max_steps} "
                                   f"(--max_minutes 0 runs them all)")
                if every(cfg.log_every) or (cfg.log_every and self.step == self.total_steps):
                    sps = n_window * cfg.batch_size / max(1e-9, time.time() - t_window)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log({"loss": loss, "lr": lr, "samples_per_s": sps, "skipped_samples": self.tally.skipped,
                              **logs})
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{sps:.0f}",
                                    skipped=self.tally.skipped)
                    if lines:
                        eta = (self.total_steps - self.step) * (time.time() - t_start) / max(1, self.step - start)
                        tqdm.write(f"{cfg.name} step {self.step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                                   f"samples/s {sps:.0f}  skipped {self.tally.skipped}  eta {eta / 60:.1f} min",
                                   file=sys.stdout)
                    t_window, n_window = time.time(), 0
                out_of_time = deadline is not None and time.time() >= deadline
                done = self.step >= self.total_steps or out_of_time or self.stop_requested
                if every(cfg.eval_every) and not done:
                    t0 = time.time()
                    self.evaluate()
                    eval_cost = time.time() - t0
                if every(cfg.ckpt_every) or done:
                    self.save()
                if done:
                    break
            if self.stop_requested:
                self.log({"event": "stopped", "reason": "signal", "signal": int(self.stopped_by)})
                return {}
            metrics = self.evaluate(final=True)
            self.export()
            return self._finish(t_start, metrics, f"{self.step} steps")
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
            self.lock.release()


def main(argv=None):
    cfg = resolved(parse_config(argv))
    d = setup_distributed(cfg)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        trainer = Trainer(cfg, d)
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.stopped_by:  # preempted: saved, not finished; a scheduler can tell the two apart
        raise SystemExit(128 + int(trainer.stopped_by))


if __name__ == "__main__":
    main(sys.argv[1:])
