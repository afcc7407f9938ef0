"""Florence's training recipe: one loop from a CPU toy run to `torchrun` on many GPUs.

    python train.py                                   # toy UniCL pretraining on synthetic shapes, any device
    python train.py --preset tiny --data csv:pairs.tsv --eval_data folder:val/ --batch_size 256
    torchrun --nproc_per_node=8 train.py --preset florence --data shards:/data/fld --fsdp --grad_ckpt
    python train.py --help                            # every config field is a --flag

Paper: Florence (arXiv 2111.11432) §2.2 (UniCL, the two stages and the 384² fine-tune), §2.7 (ZeRO →
FSDP, activation checkpointing → `--grad_ckpt`, mixed precision → `--amp`, gradient cache →
`--gradcache_chunk`).

The loop knows nothing about a particular objective: a `Task` (below) builds the model, turns a batch
into a loss, evaluates and draws. `--task pretrain` (UniCL) lives here; the adapters register theirs
with `@register_task("detect")` etc. and the loop, checkpoints, AMP and distribution come for free.

Batch semantics: `--batch_size` is the *global* batch of one optimiser step (the paper's 24,576). Each
of W processes runs `--accum_steps` micro-batches of batch_size / (W · accum) samples. Step s of the run
always consumes the same global batch, whatever W is, so a run resumes exactly and W processes compute
what one process would.

Outputs in runs/<name>/: config.json, metrics.jsonl (one JSON object per event, with "step"), ckpt.pt
(atomic: temporary file, then os.replace), curves.png and the task's picture (e.g. predictions.png).
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Config: a dataclass; every field is a --flag


@dataclass
class Config:
    # what to train
    task: str = "pretrain"  # pretrain | detect | vqa | video (adapters register more)
    preset: str = "toy"  # toy | tiny | base | florence: model sizes (MODEL_PRESETS)
    stage: int = 1  # UniCL stage 1: short texts wrapped in prompt templates; 2: those texts dropped
    data: str = "synthetic"  # synthetic[:N] | csv:FILE | shards:DIR | folder:DIR (see data/README.md)
    eval_data: str = "synthetic"  # same forms; a folder's class subfolders become the zero-shot classes
    img_size: int = 0  # 0 = the preset's (64 toy, 224 otherwise); 384 for the paper's last phase
    window_size: int = 0  # 0 = the image preset's; 12 at 384 (bias tables are resized on --init_from)
    init_from: str = ""  # a checkpoint whose model weights start this run (e.g. the 224 run before 384)
    tokenizer: str = ""  # a tokenizer JSON to use instead of training one on the data
    vocab_size: int = 0  # 0 = the preset's; BPE merges are learned up to this size
    tokenizer_texts: int = 10_000  # training captions the BPE merges are learned from
    # schedule
    max_steps: int = 1500
    max_minutes: float = 0.0  # > 0: a time budget; the cosine schedule is fitted to it (see Trainer)
    batch_size: int = 64  # global batch per optimiser step
    accum_steps: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.5  # cosine decays to lr × this (short CPU runs learn shape late: keep lr up)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # AdamW; never on norms, biases, bias tables, embeddings, logit scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 = off
    drop_path: float = -1.0  # < 0 = the preset's
    # scale and precision (paper §2.7)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA that has it, fp16 on older CUDA, off on CPU) | bf16 | fp16 | off
    fsdp: bool = False  # shard parameters, gradients and optimiser state (ZeRO-3) instead of DDP
    grad_ckpt: bool = False  # activation checkpointing in every transformer block
    gradcache_chunk: int = 0  # > 0: contrastive gradient cache with sub-batches of this many rows
    compile: bool = False  # torch.compile the model
    workers: int = 0  # DataLoader worker processes per rank
    seed: int = 0
    # --task detect: object-level adapter, Dynamic Head + ATSS (issue 7, dynamic_head.py)
    det_head: str = "toy"  # DynamicHead preset: toy (CPU: narrow, few blocks) | paper (6 blocks × 256, P3–P7)
    det_channels: int = 0  # > 0: the pyramid / DyHead width instead of the preset's
    det_blocks: int = 0  # > 0: the number of DyHead blocks instead of the preset's
    det_classifier: str = "text"  # text: region · class-name embeddings, text tower fine-tuned | frozen | fixed: a logit per class
    zero_shot_classes: str = ""  # comma-separated class names left out of detection training, evaluated zero-shot
    det_classes: str = ""  # comma-separated names (any words) to detect in predictions.png; default: all classes
    # --task itm_mlm / vqa (issue 8, meter.py: METER co-attention fusion on the pretrained towers, paper §2.5)
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
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_size: int = 1000  # held-out samples for evaluation (synthetic / capped for files)
    log_every: int = 10
    ckpt_every: int = 250
    max_bad_steps: int = 20  # this many non-finite steps in a row stop the run
    out_dir: str = "runs"
    name: str = ""  # run name; default: <task>-<preset>
    resume: str = ""  # "" (fresh) | auto (runs/<name>/ckpt.pt if present) | PATH
    progress: bool = True  # tqdm bar on rank 0
    # --task video (video_coswin.py)
    num_frames: int = 8  # frames per clip (MovingShapes and video:LABELS.csv)
    temporal_kernel: int = 2  # K_t of the inflated tokenizer (= its temporal stride): T/K_t token frames
    video_input: str = "clip"  # clip: Video CoSwin | middle_frame: the image CoSwin on the middle frame (baseline)
    # --task linear_probe / classify (issue 10): the pretrained image tower judged by a probe and by fine-tuning
    probe_size: int = 10_000  # synthetic: training images whose frozen features the probe is fitted on
    probe_l2: str = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"  # L2 strengths swept; the best top-1 on the validation split wins
    probe_val: float = 0.2  # share of the probe's training features held out to choose the L2 strength
    feature_cache: str = ""  # "" = <out_dir>/feature_cache; off = extract every run (keyed by weights and data)
    label_smoothing: float = 0.1  # classify: cross-entropy label smoothing
    layer_decay: float = 0.9  # classify: block j of N gets lr·decay^(N+1−j) (last block lr·decay); 1.0 = off


MODEL_PRESETS = {
    # image tower (coswin preset), text tower (text_encoder preset), joint dim, image size, vocabulary
    # toy: the pretraining tower is CoSwin-nano at 64² (coswin.PRESETS); video from scratch keeps CoSwin-toy,
    # the width VideoTask's defaults were fitted with
    "toy": dict(image="nano", text="toy", embed_dim=128, img_size=64, vocab_size=1024, video_image="toy"),
    "tiny": dict(image="tiny", text="clip_base", embed_dim=512, img_size=224, vocab_size=49408),
    "base": dict(image="base", text="clip_base", embed_dim=512, img_size=224, vocab_size=49408),
    "florence": dict(image="huge", text="florence", embed_dim=1024, img_size=224, vocab_size=102400),
}


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_config(argv=None) -> Config:
    """CLI → Config. `--config run.json` loads a file first; flags given on the line win."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="a JSON file of config fields (e.g. a run's config.json)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):  # `--fsdp` alone means true; `--fsdp false` also works
            p.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(default), default=None)
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
        names = {f.name for f in dataclasses.fields(Config)}
        bad = sorted(set(values) - names)
        if bad:
            raise SystemExit(f"train.py: {args.config} has unknown field(s) {bad}; valid: {sorted(names)}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    task = TASKS.get(values.get("task", defaults.task))
    cfg = Config(**{**getattr(task, "defaults", {}), **values})  # the task's defaults, then file, then flags
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config):
    if cfg.preset not in MODEL_PRESETS:
        raise SystemExit(f"train.py: unknown --preset {cfg.preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    if cfg.task not in TASKS:
        raise SystemExit(f"train.py: unknown --task {cfg.task!r}; available: {sorted(TASKS)}")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise SystemExit(f"train.py: --amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
    if cfg.stage not in (1, 2):
        raise SystemExit(f"train.py: --stage must be 1 or 2, got {cfg.stage}")
    if cfg.accum_steps < 1 or cfg.batch_size < 1 or cfg.max_steps < 1:
        raise SystemExit("train.py: --batch_size, --accum_steps and --max_steps must be ≥ 1")


def resolved(cfg: Config) -> Config:
    """Fill the preset-dependent zeros (img_size: the preset's × the task's `img_scale`, vocab_size, name)."""
    mp = MODEL_PRESETS[cfg.preset]
    scale = getattr(TASKS.get(cfg.task), "img_scale", 1)
    return dataclasses.replace(cfg, img_size=cfg.img_size or mp["img_size"] * scale,
                               vocab_size=cfg.vocab_size or mp["vocab_size"],
                               name=cfg.name or f"{cfg.task}-{cfg.preset}")


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, NCCL on CUDA, gloo on CPU


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


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
    ranks in rank order rebuilds the global batch exactly."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, accum: int, seed: int, start_step: int = 0):
        self.n, self.B, self.rank, self.world, self.accum, self.seed = n, global_batch, rank, world, accum, seed
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
        step = self.start_step
        epoch, perm = None, None
        while True:
            e = step // self.steps_per_epoch
            if e != epoch:
                epoch, perm = e, self._perm(e)
            s = step % self.steps_per_epoch
            batch = perm[s * self.B:(s + 1) * self.B]
            for m in range(self.accum):
                j = m * self.world + self.rank
                yield batch[j * self.micro:(j + 1) * self.micro].tolist()
            step += 1

    def __len__(self):  # infinite in principle; DataLoader only asks for len() when we do
        return 2 ** 62


def infinite_stream(loader_factory, skip_batches: int):
    """For iterable (sharded) datasets: epochs back to back; `skip_batches` are read and dropped first
    (a resumed stream repeats the epoch's order, so skipping re-reads rather than seeking)."""
    epoch = 0
    while True:
        for batch in loader_factory(epoch):
            if skip_batches > 0:
                skip_batches -= 1
                continue
            yield batch
        epoch += 1


# ----------------------------------------------------------------------------------------------------
# Tasks: build model, batch → loss, evaluate, visualise


TASKS: dict[str, type] = {}


def register_task(name: str):
    def deco(cls):
        TASKS[name] = cls
        cls.name = name
        return cls
    return deco


class Task:
    """The interface between the loop and an objective. Subclass, decorate with @register_task(name).

    build_model() → nn.Module            the raw model (the loop wraps it for DDP/FSDP/compile)
    train_dataset() / eval_dataset()     map-style (preferred: exact resume) or iterable datasets
    collate(samples) → batch dict        may include "skipped": n for dropped bad samples
    loss(model, batch, step) → (loss, logs)   model is the wrapped model: call model(...)
    forward_backward(model, batch, step, scale) → (loss, logs)   default: loss() then (loss·scale).backward()
    evaluate(model, step) → {metric: float}   model is the raw model, full parameters available
    visualise(model, run_dir)            write a picture for people (e.g. predictions.png); called on
                                         every rank (forwards are collective under FSDP), write on rank 0
    state_dict() / load_state_dict(sd)   task-owned state that must travel with checkpoints (a tokenizer)
    fsdp_wrap_classes() → set of module classes to shard as units
    lr_scales(model) → {param name: lr multiplier}   default {} (all at the scheduled lr); e.g. layer decay
    init_from(model, ckpt, path)         --init_from: default = every weight, window tables resized;
                                         adapters override it to take the towers of a pretraining run
    defaults                             {field: value} used where neither --config nor a flag sets the
                                         field (e.g. --task video's clip size and schedule)
    `self.init_checkpoint` holds the --init_from checkpoint (or None) while build_model() runs, so a
    task can read the tokenizer or config from it (see `build_pretrained`).
    """
    name = "base"
    defaults: dict = {}

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.dist = cfg, d
        self.init_checkpoint = None

    def init_from(self, model: nn.Module, ckpt: dict, path: str):
        import coswin

        sd = dict(ckpt["model"])
        own = model.state_dict()
        check_compatible(own, sd, path, allow_resize=True)
        for k, v in sd.items():
            if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
                sd[k] = coswin.resize_bias_table(v, (math.isqrt(own[k].shape[0]) + 1) // 2)
        model.load_state_dict(sd)

    def held_out_set(self, build, hint: str):
        """The --eval_data set of a task with classes, built once by build(spec, split, **kw) and checked:
        a synthetic one gets --eval_size samples (unless its spec names a length, synthetic:N); a synthetic
        held-out set for training files is refused (its classes would not be theirs); its classes must
        equal self.classes. `hint` says what to give instead, e.g. "--eval_data folder:DIR"."""
        if getattr(self, "_eval", None) is None:
            import data as data_lib

            kind, args, _ = data_lib.parse_spec(self.cfg.eval_data)
            if kind == "synthetic" and data_lib.parse_spec(self.cfg.data)[0] != "synthetic":
                raise SystemExit(f"train.py: --data {self.cfg.data!r} needs a held-out set of the same classes, "
                                 f"not the synthetic one; give {hint}")
            kw = {"length": self.cfg.eval_size} if kind == "synthetic" and not args else {}
            ds = build(self.cfg.eval_data, "val", **kw)
            classes = list(getattr(ds, "classes", None) or [])
            if classes != self.classes:
                raise SystemExit(f"train.py: --eval_data {self.cfg.eval_data!r} has other classes than --data "
                                 f"{self.cfg.data!r} ({classes[:5]}… vs {self.classes[:5]}…); give both the same classes")
            self._eval = ds
        return self._eval

    def forward_backward(self, model, batch, step: int, scale: float, scaler=None):
        loss, logs = self.loss(model, batch, step)
        scaled = loss * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach(), logs

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict):
        pass

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        return {}

    def fsdp_wrap_classes(self) -> set:
        return set()

    def visualise(self, model, run_dir: str):
        pass


def _draw_font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 has a scalable default font
    except TypeError:
        return ImageFont.load_default()


@register_task("pretrain")
class PretrainTask(Task):
    """UniCL pretraining of the two towers (paper §2.2): hash-key positives, global-batch contrastive loss,
    prompt templates for short texts in stage 1, none of them in stage 2. Evaluation: zero-shot top-1/5
    on held-out images (class names through the prompt templates) and image↔text retrieval R@1/5/10."""

    metrics = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        import data as data_lib

        self.data_lib = data_lib
        self._train = data_lib.build_dataset(cfg.data, split="train", img_size=cfg.img_size, task="pretrain",
                                             seed=cfg.seed)
        self._eval = None
        self.tokenizer = None

    # -- data ------------------------------------------------------------------------------------------
    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        if self._eval is None:
            kw = {"length": self.cfg.eval_size} if self.cfg.eval_data.split(":")[0].strip() == "synthetic" else {}
            self._eval = self.data_lib.build_dataset(self.cfg.eval_data, split="val", img_size=self.cfg.img_size,
                                                     task="pretrain", seed=self.cfg.seed, **kw)
        return self._eval

    def collate(self, samples):
        return self.data_lib.collate_image_text(samples)

    def class_names(self) -> list[str]:
        classes = getattr(self.eval_dataset(), "classes", None)
        if not classes:
            raise SystemExit(f"train.py: --eval_data {self.cfg.eval_data!r} has no class names for zero-shot "
                             "evaluation; use synthetic or folder:DIR (one subfolder per class)")
        return list(classes)

    def _corpus(self) -> list[str]:
        """Texts to learn BPE merges from: captions of the training set, plus the prompts of the classes."""
        import unicl

        ds, limit = self._train, self.cfg.tokenizer_texts
        texts = []
        if isinstance(ds, IterableDataset):
            for s in ds:
                if s is not None:
                    texts.append(s["text"])
                if len(texts) >= limit:
                    break
        else:
            step = max(1, len(ds) // limit)
            for i in range(0, min(len(ds), limit * step), step):
                s = ds.scene(i) if hasattr(ds, "scene") else ds[i]  # synthetic: the caption without rendering
                if s is not None:
                    texts.append(s["text"])
        for name in getattr(ds, "classes", None) or []:
            texts += [t.format(name) for t in unicl.TEMPLATES]
        return texts

    # -- model -----------------------------------------------------------------------------------------
    def build_tokenizer(self):
        from text_encoder import Tokenizer

        if self.tokenizer is None and self.init_checkpoint is not None:
            self.load_state_dict(self.init_checkpoint.get("task", {}))  # the run we start from has one
        if self.tokenizer is not None:
            pass
        elif self.cfg.tokenizer:
            self.tokenizer = Tokenizer.load(self.cfg.tokenizer)
        else:
            t0 = time.time()
            self.tokenizer = Tokenizer.train(self._corpus(), self.cfg.vocab_size)
            if self.dist.main:
                tqdm.write(f"tokenizer: {self.tokenizer.vocab_size} tokens learned in {time.time() - t0:.1f}s")
        if self.dist.main and self.cfg.name:
            run_dir = os.path.join(self.cfg.out_dir, self.cfg.name)
            os.makedirs(run_dir, exist_ok=True)
            self.tokenizer.save(os.path.join(run_dir, "tokenizer.json"))
        return self.tokenizer

    def build_model(self) -> nn.Module:
        import coswin
        import text_encoder
        import unicl

        mp = MODEL_PRESETS[self.cfg.preset]
        tok = self.build_tokenizer()
        img_kw = {}
        if self.cfg.window_size:
            img_kw["window_size"] = self.cfg.window_size
        if self.cfg.drop_path >= 0:
            img_kw["drop_path_rate"] = self.cfg.drop_path
        image = coswin.build(mp["image"], grad_checkpointing=self.cfg.grad_ckpt, **img_kw)
        text = text_encoder.build(mp["text"], vocab_size=tok.vocab_size, grad_checkpointing=self.cfg.grad_ckpt)
        self.context_length = text.cfg.context_length
        return unicl.Florence(image, text, embed_dim=mp["embed_dim"])

    def fsdp_wrap_classes(self):
        import coswin
        import text_encoder

        return {coswin.SwinBlock, text_encoder.Block}

    def state_dict(self):
        return {"tokenizer_merges": [list(m) for m in self.tokenizer.merges]}

    def load_state_dict(self, sd):
        from text_encoder import Tokenizer

        if "tokenizer_merges" in sd:
            self.tokenizer = Tokenizer([tuple(m) for m in sd["tokenizer_merges"]])

    # -- loss ------------------------------------------------------------------------------------------
    def prepare(self, batch, step: int):
        """Texts → (tokens, keys). Stage 1 wraps short texts in a random template (the key stays the
        text's own, so all prompts of one label are positives); stage 2 drops short texts."""
        import unicl

        texts, keep = batch["text"], None
        short = batch.get("short")
        if short is None:
            short = torch.tensor([unicl.is_short_caption(t) for t in texts])
        if self.cfg.stage == 2 and bool(short.any()):
            keep = ~short
            texts = [t for t, k in zip(texts, keep.tolist()) if k]
        labels = batch["label"] if keep is None else batch["label"][keep]
        if getattr(self._train, "classes", None) and self.cfg.data.startswith("folder"):
            keys = torch.tensor([unicl.class_key(int(y)) for y in labels.tolist()])  # image-label data
        else:
            keys = unicl.batch_labels(texts)
        if self.cfg.stage == 1:  # the template is a function of (seed, step, text): the same on any rank layout
            texts = [unicl.augment_short_caption(t, random.Random(hash((self.cfg.seed, step, unicl.caption_key(t)))))[0]
                     for t in texts]
        # padded to the batch's longest caption, not the context (exact; the toy text tower costs ~30% less);
        # one shape for every batch under --compile, which would otherwise recompile for each new length
        tokens = self.tokenizer(texts, self.context_length, trim=not self.cfg.compile)
        images = batch["image"] if keep is None else batch["image"][keep]
        dev = self.dist.device
        return images.to(dev, non_blocking=True), tokens.to(dev, non_blocking=True), keys.to(dev)

    def loss(self, model, batch, step):
        import unicl

        images, tokens, keys = self.prepare(batch, step)
        u, v, tau = model(images, tokens)
        return unicl.unicl_loss(u, v, keys, tau), {"tau": float(tau.detach())}

    def forward_backward(self, model, batch, step, scale, scaler=None):
        if self.cfg.gradcache_chunk <= 0:
            return super().forward_backward(model, batch, step, scale, scaler)
        import unicl

        images, tokens, keys = self.prepare(batch, step)
        raw = model.module if hasattr(model, "module") else model

        def loss_fn(u, v, k, tau):
            loss = unicl.unicl_loss(u, v, k, tau) * scale
            return scaler.scale(loss) if scaler is not None else loss

        loss = unicl.gradcache_step(raw, images, tokens, keys, self.cfg.gradcache_chunk, loss_fn=loss_fn)
        if scaler is not None:
            loss = loss / scaler.get_scale()
        return loss / scale, {"tau": float(raw.scale().detach())}

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_eval(self, model, max_n: int | None = None):
        """Held-out image and caption embeddings, labels and the images themselves (CPU)."""
        ds = self.eval_dataset()
        loader = DataLoader(ds, batch_size=128, shuffle=False, collate_fn=self.collate, num_workers=0,
                            generator=torch.Generator())  # its own generator: evaluation draws no global RNG
        u, v, labels, images, texts = [], [], [], [], []
        for batch in loader:
            if "image" not in batch:
                continue
            x = batch["image"].to(self.dist.device)
            u.append(model.encode_image(x).float().cpu())
            v.append(model.encode_text(self.tokenizer(batch["text"], self.context_length).to(self.dist.device))
                     .float().cpu())
            labels.append(batch["label"])
            texts += batch["text"]
            images.append(batch["image"][:max(0, 32 - sum(len(i) for i in images))])
            if max_n and sum(len(t) for t in u) >= max_n:
                break
        return torch.cat(u), torch.cat(v), torch.cat(labels), torch.cat(images), texts

    @torch.no_grad()
    def evaluate(self, model, step):
        import unicl

        was = model.training
        model.eval()
        try:
            u, v, labels, _, texts = self.embed_eval(model, self.cfg.eval_size)
            W = unicl.zero_shot_classifier(model, self.tokenizer, self.class_names(),
                                           context_length=self.context_length).float().cpu()  # (D, K)
            out = {}
            if (labels >= 0).any():
                ok = labels >= 0
                top1, top5 = unicl.accuracy(u[ok] @ W, labels[ok], topk=(1, 5))
                out.update(zeroshot_top1=top1, zeroshot_top5=top5)
            out.update(unicl.retrieval_recall(u, v, torch.arange(len(v))))
            return out
        finally:
            model.train(was)

    @torch.no_grad()
    def visualise(self, model, run_dir):
        """predictions.png: held-out images with their top-3 zero-shot classes (green = correct)."""
        import unicl
        from data.transforms import denormalize

        was = model.training
        model.eval()
        try:
            names = self.class_names()
            u, _, labels, images, _ = self.embed_eval(model, 16)
            W = unicl.zero_shot_classifier(model, self.tokenizer, names, context_length=self.context_length).float().cpu()
            probs = (float(model.scale()) * u @ W).softmax(-1)
        finally:
            model.train(was)
        if not self.dist.main:
            return None
        n = min(16, len(images))
        tile, cols = 128, 4
        rows = math.ceil(n / cols)
        canvas = Image.new("RGB", (cols * tile, rows * (tile + 48)), "white")
        draw, font = ImageDraw.Draw(canvas), _draw_font(11)
        for i in range(n):
            img = (denormalize(images[i]).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            x0, y0 = (i % cols) * tile, (i // cols) * (tile + 48)
            canvas.paste(Image.fromarray(img).resize((tile - 8, tile - 8), Image.NEAREST), (x0 + 4, y0 + 4))
            p, k = probs[i].topk(3)
            for r, (pp, kk) in enumerate(zip(p.tolist(), k.tolist())):
                colour = (0, 140, 0) if kk == int(labels[i]) else (200, 0, 0) if r == 0 else (90, 90, 90)
                draw.text((x0 + 4, y0 + tile + r * 14), f"{names[kk]} {pp:.0%}", fill=colour, font=font)
        path = os.path.join(run_dir, "predictions.png")
        canvas.save(path)
        return path


# ----------------------------------------------------------------------------------------------------
# --task detect: Florence's object-level adapter (issue 7; dynamic_head.py)


def _unwrap(model: nn.Module) -> nn.Module:
    """The raw module under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


@register_task("detect")
class DetectTask(Task):
    """Object detection with the object-level adapter (paper §2.4, dynamic_head.py): the pretrained CoSwin
    → FeaturePyramid → DynamicHead → ATSS head whose classes are text-aligned (region features · class-name
    embeddings of the pretrained text tower, fine-tuned with the detector as in GLIP), trained on
    ShapesDetection or COCO JSON. Each class is the prompt "a photo of a {name}." (PROMPT).

        python train.py --name pretrain-toy                                          # once: the two towers
        python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt          # DyHead-ATSS on them
        python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt --zero_shot_classes "red cross,blue circle"

    Without --init_from the towers start fresh from --preset (no zero-shot meaning then). Metrics on the
    held-out split, COCO rules: det_map (AP .50:.95) and det_map50 over the training classes. With
    --zero_shot_classes those classes are removed from training (their objects are unlabelled background,
    as in open-vocabulary detection) and evaluated from their names alone with a vocabulary of just those
    names (zero-shot transfer): det_zs_map, det_zs_map50. --det_classifier frozen keeps the text tower as
    pretrained; fixed replaces the text side by one logit per class (no zero-shot). Boxes are clipped to the image; empty, reversed
    or non-finite boxes and unknown labels are dropped and counted (bad_boxes in the training log).
    predictions.png: held-out images, ground truth in grey, detections with names and scores."""

    metrics = ("det_map", "det_map50")
    PROMPT = "a photo of a {}."
    # the toy detection run: 64² ShapesDetection (objects of 8–19 px), a schedule fitted to 12 minutes
    defaults = dict(img_size=64, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=0.05, max_steps=3000,
                    max_minutes=12.0, eval_every=500, eval_size=500, ckpt_every=500)

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        import data as data_lib

        self.data_lib = data_lib
        self._train = data_lib.build_dataset(cfg.data, split="train", img_size=cfg.img_size, task="detect", seed=cfg.seed)
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class names; --task detect needs a detection set "
                             "(synthetic or coco:INSTANCES.json)")
        self.zero_shot = _split_names(cfg.zero_shot_classes)
        unknown = [n for n in self.zero_shot if n not in self.classes]
        if unknown:
            raise SystemExit(f"train.py: --zero_shot_classes {unknown} are not classes of --data {cfg.data!r}; "
                             f"choose among {self.classes}")
        self.seen = [c for c in self.classes if c not in self.zero_shot]
        if not self.seen:
            raise SystemExit("train.py: --zero_shot_classes holds every class; leave some to train on")
        if cfg.det_classifier not in ("text", "frozen", "fixed"):
            raise SystemExit(f"train.py: --det_classifier must be text, frozen or fixed, got {cfg.det_classifier!r}")
        if self.zero_shot and cfg.det_classifier == "fixed":
            raise SystemExit("train.py: --zero_shot_classes needs --det_classifier text or frozen (fixed classes "
                             "cannot be named)")
        # dataset label → index among the seen (training) classes, and among the zero-shot classes; −1 elsewhere
        self.to_seen = torch.tensor([self.seen.index(c) if c in self.seen else -1 for c in self.classes])
        self.to_zs = torch.tensor([self.zero_shot.index(c) if c in self.zero_shot else -1 for c in self.classes])
        self.tokenizer = None
        self.pretrain_config = None  # the recipe of the towers (a --task pretrain Config)
        self.bad_boxes = 0

    # -- data ------------------------------------------------------------------------------------------
    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self.held_out_set(lambda spec, split, **kw: self.data_lib.build_dataset(
            spec, split=split, img_size=self.cfg.img_size, task="detect", seed=self.cfg.seed, **kw),
            "--eval_data coco:VAL_INSTANCES.json")

    def collate(self, samples):
        return self.data_lib.collate_detection(samples)

    def targets(self, raw: list[dict], size, to: torch.Tensor, count: bool) -> list[dict]:
        """Dataset targets → {"boxes", "labels" (indices into a vocabulary via `to`), "iscrowd"}; boxes clipped,
        bad rows dropped (and counted when `count`), classes outside the vocabulary dropped."""
        import dynamic_head as dh

        out = []
        for t in raw:
            boxes, ok = dh.clean_boxes(t["boxes"], size[0], size[1])
            labels = t["labels"].reshape(-1).long()
            ok &= (labels >= 0) & (labels < len(self.classes))
            if count:
                self.bad_boxes += int((~ok).sum())
            lab = torch.where(ok, to[labels.clamp(0, len(self.classes) - 1)], torch.full_like(labels, -1))
            keep = lab >= 0
            crowd = t.get("iscrowd")
            crowd = torch.zeros_like(labels) if crowd is None else crowd.reshape(-1).long()
            out.append({"boxes": boxes[keep], "labels": lab[keep], "iscrowd": crowd[keep]})
        return out

    # -- model -----------------------------------------------------------------------------------------
    def _towers(self):
        """→ a Florence model (towers + projections): from --init_from, from the saved recipe (resume), or fresh."""
        if self.init_checkpoint is not None:
            florence, self.tokenizer, self.pretrain_config = build_pretrained(self.init_checkpoint)
            return florence
        if self.pretrain_config is None:  # fresh towers from --preset; a tokenizer learned on the class prompts
            import unicl
            from text_encoder import Tokenizer

            self.pretrain_config = dataclasses.replace(self.cfg, task="pretrain")
            prompts = [t.format(c) for c in self.classes + _split_names(self.cfg.det_classes) for t in unicl.TEMPLATES]
            self.tokenizer = Tokenizer.train(prompts, self.cfg.vocab_size)
        task = PretrainTask.__new__(PretrainTask)  # the pretraining recipe, without its datasets
        Task.__init__(task, dataclasses.replace(self.pretrain_config, name=""), Dist(device=torch.device("cpu")))
        task.tokenizer = self.tokenizer
        return task.build_model()

    def build_model(self) -> nn.Module:
        import dynamic_head as dh

        over = {k: v for k, v in (("channels", self.cfg.det_channels), ("num_blocks", self.cfg.det_blocks)) if v > 0}
        try:
            det_cfg = dh.build_config(self.cfg.det_head, **over)
        except ValueError as e:
            raise SystemExit(f"train.py: --det_head: {e}") from None
        florence = self._towers()
        self.context_length = florence.text_encoder.cfg.context_length
        if self.cfg.det_classifier == "fixed":
            return dh.Detector(florence.image_encoder, det_cfg, num_classes=len(self.seen))
        text = dh.TextTower(florence.text_encoder, florence.text_proj, trainable=self.cfg.det_classifier == "text")
        model = dh.Detector(florence.image_encoder, det_cfg, text=text)
        model.set_classes(self.tokenize_names(self.seen))
        return model

    def init_from(self, model, ckpt, path):
        pass  # build_model already took the towers (and tokenizer) of the --init_from pretraining run

    def tokenize_names(self, names: list[str]) -> torch.Tensor:
        """Class names → (K, L) tokens of their prompts; a name the tokenizer maps to nothing is an error."""
        for n in names:
            if not n.strip() or not self.tokenizer.encode(n):
                raise SystemExit(f"train.py: class name {n!r} maps to no tokens; give a name made of words")
        return self.tokenizer([self.PROMPT.format(n) for n in names], self.context_length)

    def fsdp_wrap_classes(self):
        import coswin
        import dynamic_head as dh
        import text_encoder

        return {coswin.SwinBlock, dh.DyHeadBlock, text_encoder.Block}

    def state_dict(self):
        return {"tokenizer_merges": [list(m) for m in self.tokenizer.merges],
                "pretrain_config": json.dumps(dataclasses.asdict(self.pretrain_config))}

    def load_state_dict(self, sd):
        from text_encoder import Tokenizer

        if "tokenizer_merges" in sd:
            self.tokenizer = Tokenizer([tuple(m) for m in sd["tokenizer_merges"]])
        if "pretrain_config" in sd:
            self.pretrain_config = Config(**json.loads(sd["pretrain_config"]))

    # -- loss ------------------------------------------------------------------------------------------
    def loss(self, model, batch, step):
        images = batch["image"].to(self.dist.device, non_blocking=True)
        targets = self.targets(batch["targets"], images.shape[-2:], self.to_seen, count=True)
        out = model(images)
        loss, logs = _unwrap(model).loss(out, targets, images.shape[-2:])
        return loss, {**logs, "bad_boxes": self.bad_boxes}

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect_eval(self, model, names: list[str] | None, max_images: int | None = None):
        """→ (predictions per vocabulary, raw targets, images): one forward over the held-out set with the
        seen names and (if any) the zero-shot names, split by vocabulary afterwards (sigmoid scores of a
        class do not depend on the other names, so this equals separate runs)."""
        raw = _unwrap(model)
        groups = [self.seen, self.zero_shot] if names is None else [names]
        groups = [g for g in groups if g]
        tokens = self.tokenize_names([n for g in groups for n in g]) if raw.text is not None else None
        loader = DataLoader(self.eval_dataset(), batch_size=32, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        preds, targets, images = [[] for _ in groups], [], []
        for batch in loader:
            if "image" not in batch:
                continue
            x = batch["image"].to(self.dist.device)
            out = raw(x, None if tokens is None else tokens.to(self.dist.device))
            start = 0
            for g, group in enumerate(groups):
                part = dict(out, cls=out["cls"][..., start:start + len(group)])
                preds[g] += [{k: v.cpu() for k, v in p.items()} for p in raw.postprocess(part, x.shape[-2:])]
                start += len(group)
            targets += batch["targets"]
            images.append(batch["image"])
            if max_images and len(targets) >= max_images:
                break
        return preds, targets, torch.cat(images)[:max_images]

    @torch.no_grad()
    def evaluate(self, model, step):
        import dynamic_head as dh

        was = model.training
        model.eval()
        try:
            preds, raw_targets, images = self.detect_eval(model, None)
        finally:
            model.train(was)
        size = images.shape[-2:]
        out = {}
        for key, group, to, p in (("det", self.seen, self.to_seen, preds[0]),
                                  ("det_zs", self.zero_shot, self.to_zs, preds[1] if len(preds) > 1 else None)):
            if not group:
                continue
            ap = dh.coco_map(p, self.targets(raw_targets, size, to, count=False))
            for name, value in ((f"{key}_map", ap["AP"]), (f"{key}_map50", ap["AP50"])):
                if value >= 0:  # −1: no ground truth of these classes in the held-out set
                    out[name] = value
        return out

    @torch.no_grad()
    def visualise(self, model, run_dir):
        """predictions.png: 12 held-out images, ground truth in grey, detections (score ≥ 0.3) with names.
        Forwards on every rank (collective under FSDP); rank 0 draws."""
        from data.transforms import denormalize

        custom = _split_names(self.cfg.det_classes)
        if custom and _unwrap(model).text is None:
            custom = []  # fixed classes cannot take new names
        was = model.training
        model.eval()
        try:
            preds, raw_targets, images = self.detect_eval(model, custom or None, max_images=12)
        finally:
            model.train(was)
        if not self.dist.main:
            return None
        names = custom or (self.seen + self.zero_shot)
        offsets = [0] if custom else [0, len(self.seen)]
        merged = [{k: torch.cat([dict(p[i], labels=p[i]["labels"] + off)[k] for p, off in zip(preds, offsets)])
                   for k in ("boxes", "scores", "labels")} for i in range(len(images))]  # vocabularies side by side
        n, tile, cols = len(images), 256, 4
        scale = tile / images.shape[-1]
        rows = math.ceil(n / cols)
        canvas = Image.new("RGB", (cols * tile, rows * tile), "white")
        draw, font = ImageDraw.Draw(canvas), _draw_font(11)
        palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                   (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
        for i in range(n):
            x0, y0 = (i % cols) * tile, (i // cols) * tile
            img = (denormalize(images[i]).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x0, y0))
            for b in raw_targets[i]["boxes"].tolist():
                draw.rectangle([x0 + b[0] * scale, y0 + b[1] * scale, x0 + b[2] * scale, y0 + b[3] * scale],
                               outline=(160, 160, 160))
            p = merged[i]
            for b, s, k in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                if s < 0.3:
                    continue
                colour = palette[k % len(palette)]
                draw.rectangle([x0 + b[0] * scale, y0 + b[1] * scale, x0 + b[2] * scale, y0 + b[3] * scale],
                               outline=colour, width=2)
                draw.text((x0 + b[0] * scale + 2, y0 + b[1] * scale + 1), f"{names[k]} {s:.2f}", fill=colour, font=font)
        path = os.path.join(run_dir, "predictions.png")
        canvas.save(path)
        return path


# ----------------------------------------------------------------------------------------------------
# --task itm_mlm / vqa: METER fine-grained adapter (paper §2.5, meter.py) on the pretrained towers (issue 8)
#
#   python train.py --name pretrain-toy                                         # 1. the towers (UniCL, toy)
#   python train.py --task itm_mlm --init_from runs/pretrain-toy/ckpt.pt        # 2. (optional) fusion pretraining
#   python train.py --task vqa --init_from runs/pretrain-toy/ckpt.pt            # 3. VQA on ShapesVQA: vqa_score
#   python train.py --task vqa --init_from runs/pretrain-toy/ckpt.pt --vqa_blind --name vqa-blind   # ablation
#   (step 3 may start from step 2's runs/itm_mlm-toy/ckpt.pt instead; VQA v2: --data and --eval_data
#    vqa:QUESTIONS.json,ANNOTATIONS.json,IMAGES/)


class MeterTask(Task):
    """Shared by `itm_mlm` and `vqa`: METER co-attention fusion (meter.py) on the towers of a `--task
    pretrain` checkpoint (`--init_from`). The pretrained text tower is causal; METER's is bidirectional, so
    its weights are loaded unchanged into a `TextEncoder(causal=False)` (only the attention mask differs)
    and the Florence projections are dropped. `--init_from` may also be an itm_mlm / vqa checkpoint (every
    weight of the same shape is taken; heads of another size start fresh). Without --init_from the towers
    are built fresh from --preset and a tokenizer is learned on the training texts.

    Counted, never silent: texts longer than the context (cut, `truncated_texts`), and for VQA questions whose
    every annotator answer is outside the answer vocabulary (left out of the loss, `oov_questions`; they
    score 0 in evaluation)."""

    data_task = "pretrain"

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        import data as data_lib

        self.data_lib = data_lib
        self.tokenizer = None
        self.truncated = 0
        self._train = self._dataset(cfg.data, "train")
        self._eval = None

    def _dataset(self, spec: str, split: str, **kw):
        try:
            return self.data_lib.build_dataset(spec, split=split, img_size=self.cfg.img_size, task=self.data_task,
                                               seed=self.cfg.seed, **kw)
        except (ValueError, OSError) as e:
            raise SystemExit(f"train.py: cannot build the {self.data_task} data {spec!r}: {e}") from None

    @staticmethod
    def _is_synthetic(spec: str) -> bool:  # "synthetic", "synthetic:N", "synthetic?key=value"
        return spec.split(":")[0].split("?")[0].strip().lower() == "synthetic"

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        if self._eval is None:
            synthetic = self._is_synthetic(self.cfg.eval_data)
            if synthetic and not self._is_synthetic(self.cfg.data):
                raise SystemExit(f"train.py: --data {self.cfg.data!r} is a file but --eval_data is synthetic; give "
                                 f"held-out data of the same kind with --eval_data")
            self._eval = self._dataset(self.cfg.eval_data, "val", **self._eval_options(synthetic))
        return self._eval

    def _eval_options(self, synthetic: bool) -> dict:
        return {"length": self.cfg.eval_size} if synthetic else {}

    def texts(self, sample_scene: dict) -> str:  # the text of a sample (or a synthetic scene) for the tokenizer
        return sample_scene["text"]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        L = self.context_length
        self.truncated += sum(len(self.tokenizer.encode(t)) > L - 2 for t in texts)
        return self.tokenizer(texts, L, trim=not self.cfg.compile)  # pad to the longest row: same outputs, less work

    # -- model -----------------------------------------------------------------------------------------
    def _tokenizer_for_fresh_towers(self):
        from text_encoder import Tokenizer

        if self.tokenizer is not None:  # resumed, or carried by a METER checkpoint
            return self.tokenizer
        if self.cfg.tokenizer:
            return Tokenizer.load(self.cfg.tokenizer)
        ds, limit = self._train, self.cfg.tokenizer_texts
        step = max(1, len(ds) // limit) if hasattr(ds, "__len__") else 1
        corpus = []
        for i in range(0, min(len(ds), limit * step), step):
            s = ds.scene(i) if hasattr(ds, "scene") else ds[i]
            if s is not None:
                corpus.append(self.texts(s))
        return Tokenizer.train(corpus, self.cfg.vocab_size)

    def meter_overrides(self) -> dict:
        cfg = self.cfg
        kw = {}
        if cfg.meter_layers:
            kw["layers"] = cfg.meter_layers
        if cfg.meter_hidden:
            kw["hidden"] = cfg.meter_hidden
        if cfg.meter_heads:
            kw["heads"] = cfg.meter_heads
        if cfg.meter_levels:
            kw["image_levels"] = tuple(int(v) for v in cfg.meter_levels.split(","))
        return kw

    def build_model(self) -> nn.Module:
        import coswin
        import meter
        import text_encoder

        cfg, ckpt = self.cfg, self.init_checkpoint
        source = json.loads(ckpt.get("config", "{}")).get("task") if ckpt is not None else None
        if source == "pretrain":
            florence, self.tokenizer, pcfg = build_pretrained(ckpt)
            if pcfg.preset != cfg.preset:
                raise SystemExit(f"train.py: --init_from holds a --preset {pcfg.preset} model; pass --preset "
                                 f"{pcfg.preset} so that checkpoints of this run resume with the same shapes")
            image = florence.image_encoder
            causal = florence.text_encoder
            text = text_encoder.TextEncoder(dataclasses.replace(causal.cfg, causal=False))
            text.load_state_dict(causal.state_dict())  # the same weights, now attending both ways
            self.init_checkpoint = None  # taken here; nothing left for init_from()
        else:
            if ckpt is not None:
                if source not in ("itm_mlm", "vqa"):
                    raise SystemExit(f"train.py: --init_from holds a --task {source} checkpoint; METER starts from "
                                     "a --task pretrain (or itm_mlm / vqa) checkpoint")
                MeterTask.load_state_dict(self, ckpt.get("task", {}))  # its tokenizer
            self.tokenizer = self._tokenizer_for_fresh_towers()
            mp = MODEL_PRESETS[cfg.preset]
            kw = {"window_size": cfg.window_size} if cfg.window_size else {}
            if cfg.drop_path >= 0:
                kw["drop_path_rate"] = cfg.drop_path
            image = coswin.build(mp["image"], **kw)
            text = text_encoder.build(mp["text"], vocab_size=self.tokenizer.vocab_size, causal=False)
        image.set_grad_checkpointing(cfg.grad_ckpt)
        text.grad_checkpointing = cfg.grad_ckpt
        self.context_length = text.cfg.context_length
        if self.dist.main and cfg.name:
            os.makedirs(os.path.join(cfg.out_dir, cfg.name), exist_ok=True)
            self.tokenizer.save(os.path.join(cfg.out_dir, cfg.name, "tokenizer.json"))
        preset = cfg.meter_preset or ("toy" if cfg.preset == "toy" else "florence")
        return self.freeze_towers(meter.build(preset, image, text, **self.meter_overrides(), **self.heads()))

    def heads(self) -> dict:
        return {}

    def tower_scales(self) -> tuple[float, float]:
        """(image tower, text tower) lr multipliers; the fusion and heads train at the full lr (METER's
        `lr_mult_cross_modal` = 5: the backbones at a fifth of it)."""
        cfg = self.cfg
        return (cfg.image_tower_lr if cfg.image_tower_lr >= 0 else cfg.tower_lr), cfg.tower_lr

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        image, text = self.tower_scales()
        return {n: image if n.startswith("image_encoder.") else text for n, _ in model.named_parameters()
                if n.startswith(("image_encoder.", "text_encoder."))}

    def freeze_towers(self, model: nn.Module) -> nn.Module:
        """A tower whose multiplier is 0 is frozen (no gradient, no optimizer state; meter.METER runs a frozen
        image tower without autograd and in eval mode); `--image_frozen_stages k` freezes its stem and first k stages."""
        image, text = self.tower_scales()
        if image < 0 or text < 0:
            raise SystemExit(f"train.py: --tower_lr / --image_tower_lr must be ≥ 0 (0 freezes), got {text} / {image}")
        if image == 0:
            model.image_encoder.requires_grad_(False)
        if text == 0:
            model.text_encoder.requires_grad_(False)
        k = self.cfg.image_frozen_stages
        if k > 0:  # detectron2's FREEZE_AT idea: the early, high-resolution stages are the costly ones to train
            enc = model.image_encoder
            if k > len(enc.layers):
                raise SystemExit(f"train.py: --image_frozen_stages {k} exceeds the image tower's {len(enc.layers)} "
                                 "stages")
            for part in [enc.patch_embed, *enc.layers[:k]] + ([enc.norm] if k == len(enc.layers) else []):
                part.requires_grad_(False)
        return model

    def init_from(self, model, ckpt, path, drop: tuple = ()):
        """A METER checkpoint: every weight of the same name and shape (except names starting with `drop`);
        the rest (e.g. a head of another size) starts fresh and is listed."""
        own = model.state_dict()
        sd = {k: v for k, v in ckpt["model"].items()
              if k in own and v.shape == own[k].shape and not k.startswith(tuple(drop))}
        if not any(k.startswith("text_layers.") for k in sd):
            raise SystemExit(f"train.py: {path!r} holds no METER fusion of this shape; pass the --meter_* flags it "
                             "was trained with, or start from a --task pretrain checkpoint")
        fresh = sorted(set(own) - set(sd))
        model.load_state_dict(sd, strict=False)
        if fresh and self.dist.main:
            tqdm.write(f"--init_from: {len(fresh)} tensors start fresh ({', '.join(fresh[:4])}"
                       f"{', …' if len(fresh) > 4 else ''})")

    def fsdp_wrap_classes(self):
        import coswin
        import meter
        import text_encoder

        return {coswin.SwinBlock, text_encoder.Block, meter.CoAttentionLayer}

    def state_dict(self):
        return {"tokenizer_merges": [list(m) for m in self.tokenizer.merges]}

    def load_state_dict(self, sd):
        from text_encoder import Tokenizer

        if "tokenizer_merges" in sd:
            self.tokenizer = Tokenizer([tuple(m) for m in sd["tokenizer_merges"]])


@register_task("itm_mlm")
class ITMMLMTask(MeterTask):
    """METER's fusion pretraining on image–caption pairs (ShapesText by default): image–text matching (half
    the images swapped) + masked language modelling (`--mlm_prob` of the real tokens, 80/10/10), one forward.
    Metrics on held-out pairs (fixed masks and swaps): `itm_accuracy`, `mlm_accuracy`."""

    defaults = dict(batch_size=64, lr=5e-4, weight_decay=0.01, warmup_steps=50, max_steps=600, max_minutes=10.0,
                    eval_every=200, eval_size=500, ckpt_every=200)

    def collate(self, samples):
        return self.data_lib.collate_image_text(samples)

    def loss(self, model, batch, step):
        import meter

        if "image" not in batch:  # every sample of this micro-batch was unreadable (counted under "skipped")
            return sum(p.sum() for p in model.parameters()) * 0.0, {}
        dev = self.dist.device
        tokens = self.tokenize(batch["text"]).to(dev, non_blocking=True)
        loss, logs = meter.itm_mlm_loss(model, batch["image"].to(dev, non_blocking=True), tokens, batch["text"],
                                        self.tokenizer.mask_id, self.tokenizer.vocab_size, prob=self.cfg.mlm_prob)
        return loss, {**logs, "truncated_texts": self.truncated}

    @torch.no_grad()
    def _eval_batches(self, model, max_n: int):
        """Held-out batches with their fixed masks / swaps → (images, texts, tokens, out, labels, itm_label)."""
        import meter

        g = torch.Generator().manual_seed(self.cfg.seed + 12345)  # the same masks every evaluation; no global RNG
        loader = DataLoader(self.eval_dataset(), batch_size=128, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        seen = 0
        for batch in loader:
            if "image" not in batch:
                continue
            dev = self.dist.device
            tokens = self.tokenizer(batch["text"], self.context_length)
            masked, labels = meter.mask_tokens(tokens, self.tokenizer.vocab_size, self.tokenizer.mask_id,
                                               prob=self.cfg.mlm_prob, generator=g)
            index, itm_label = meter.itm_pairs(batch["text"], g)
            B = len(tokens)
            all_labels = torch.cat([labels, torch.full_like(labels, -100)])
            out = model(batch["image"].to(dev), torch.cat([masked, tokens]).to(dev),
                        image_index=torch.cat([torch.arange(B), index]).to(dev), mlm_labels=all_labels.to(dev))
            yield batch, masked, labels, out, itm_label
            seen += B
            if seen >= max_n:
                break

    def evaluate(self, model, step):
        was = model.training
        model.eval()
        itm_ok = itm_n = mlm_ok = mlm_n = 0
        try:
            for batch, _, labels, out, itm_label in self._eval_batches(model, self.cfg.eval_size):
                B = len(itm_label)
                itm_ok += int((out["itm"][B:].argmax(-1).cpu() == itm_label).sum())
                itm_n += B
                target = labels[labels != -100]
                mlm_ok += int((out["mlm"].argmax(-1).cpu() == target).sum())
                mlm_n += len(target)
        finally:
            model.train(was)
        return {"itm_accuracy": itm_ok / max(1, itm_n), "mlm_accuracy": mlm_ok / max(1, mlm_n)}

    def visualise(self, model, run_dir):
        """predictions.png: held-out images with the caption, the masked caption, the model's filling, and its
        match probability for the true caption."""
        from data.transforms import denormalize

        was = model.training
        model.eval()
        try:
            batch, masked, labels, out, _ = next(iter(self._eval_batches(model, 8)))
        finally:
            model.train(was)
        if not self.dist.main:
            return None
        n = min(8, len(masked))
        preds = out["mlm"].argmax(-1).cpu()
        filled = masked.clone()
        filled[labels != -100] = preds
        with torch.no_grad():  # P(match) for each image with its own caption (unmasked)
            own = model(batch["image"][:n].to(self.dist.device), self.tokenizer(batch["text"][:n], self.context_length)
                        .to(self.dist.device))["itm"].float().softmax(-1)[:, 1].cpu()
        tile, width = 96, 560
        canvas = Image.new("RGB", (width, n * (tile + 4) + 4), "white")
        draw, font = ImageDraw.Draw(canvas), _draw_font(12)

        def show(ids):
            return "".join("[mask]" if i == self.tokenizer.mask_id else self.tokenizer.decode([i]) for i in ids.tolist()
                           if i not in (self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id))

        for i in range(n):
            y0 = i * (tile + 4) + 4
            img = (denormalize(batch["image"][i]).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (4, y0))
            chosen = labels[i] != -100
            ok = bool((filled[i][chosen] == labels[i][chosen]).all())
            lines = [(f"caption: {batch['text'][i]}", (0, 0, 0)), (f"masked:  {show(masked[i])}", (90, 90, 90)),
                     (f"filled:  {show(filled[i])}", (0, 140, 0) if ok else (200, 0, 0)),
                     (f"P(match) = {float(own[i]):.0%}", (0, 140, 0) if own[i] > 0.5 else (200, 0, 0))]
            for r, (line, colour) in enumerate(lines):
                draw.text((tile + 12, y0 + 4 + r * 18), line[:80], fill=colour, font=font)
        path = os.path.join(run_dir, "predictions.png")
        canvas.save(path)
        return path


@register_task("vqa")
class VQATask(MeterTask):
    """VQA fine-tuning (ShapesVQA, or VQA v2 JSON via `--data vqa:QUESTIONS.json,ANNOTATIONS.json,IMAGES/`):
    the two pooled vectors concatenated → MLP → answers, BCE against the annotators' soft scores (summed over
    answers, averaged over the batch). Metric `vqa_score`: the soft score of the arg-max answer on held-out
    questions (plus `vqa_score_<type>` per ShapesVQA question type). `--vqa_blind`: the image features are
    zeroed (and the image tower frozen) — the image-blind ablation; give it its own --name.

    Defaults (below) fit the CPU: ShapesVQA at twice the pretraining size (128² for the toy; METER fine-tunes
    VQA at 576 after pretraining at 288), where its small shapes are as large in pixels as the pretraining's
    main shapes; the fusion at lr 1e-3, the towers at --tower_lr 0.2 of it (METER's ratio), the image tower's stem
    and first two stages frozen (only stages 3-4 adapt; no backward at the costly resolutions); batch 64 images
    with five questions each (`--vqa_questions 5`, synthetic training data only: the tower, most of a step's
    cost, runs once for all of an image's questions; the held-out set keeps one question per image); a
    14-minute cosine schedule. README "VQA: what mattered" has the runs behind each choice."""

    data_task = "vqa"
    img_scale = 2  # --img_size 0: twice the preset's pretraining size (METER fine-tunes VQA at 576 after 288)
    defaults = dict(batch_size=64, lr=1e-3, weight_decay=0.01, warmup_steps=50, max_steps=5000, max_minutes=14.0,
                    eval_every=200, eval_size=1000, ckpt_every=200, image_frozen_stages=2, vqa_questions=5)

    def __init__(self, cfg: Config, d: Dist):
        if cfg.vqa_questions < 1:
            raise SystemExit(f"train.py: --vqa_questions must be at least 1 (questions per training image), got "
                             f"{cfg.vqa_questions}")
        super().__init__(cfg, d)
        self.answers = list(getattr(self._train, "answers", None) or [])
        if not self.answers:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no answer vocabulary; give VQA annotations "
                             "(vqa:QUESTIONS.json,ANNOTATIONS.json[,IMAGES]) or synthetic")
        self.oov = 0

    def _eval_options(self, synthetic: bool) -> dict:
        return {"length": self.cfg.eval_size} if synthetic else {"answers": self.answers}  # the training vocabulary

    def texts(self, s):
        return s["question"]

    def heads(self):
        return {"pretrain_heads": False, "num_answers": len(self.answers)}

    def tower_scales(self):
        image, text = super().tower_scales()
        # blind: no gradient reaches the image tower, so freeze it (DDP needs every used weight to get one)
        return (0.0 if self.cfg.vqa_blind else image), text

    def collate(self, samples):
        return self.data_lib.collate_vqa(samples)

    def _dataset(self, spec: str, split: str, **kw):
        # several training questions per synthetic image: the image tower runs once for all of them
        many = split == "train" and self.cfg.vqa_questions > 1 and self._is_synthetic(spec)
        return super()._dataset(spec, split, **kw, **({"questions": self.cfg.vqa_questions} if many else {}))

    def _logits(self, model, batch, tokens):
        image_index = batch.get("image_index")
        return model(batch["image"].to(self.dist.device, non_blocking=True), tokens, blind=self.cfg.vqa_blind,
                     image_index=None if image_index is None else image_index.to(self.dist.device))["vqa"]

    def loss(self, model, batch, step):
        import meter

        if "image" not in batch:  # every sample of this micro-batch was unreadable (counted under "skipped")
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0, {}
        dev = self.dist.device
        tokens = self.tokenize(batch["question"]).to(dev, non_blocking=True)
        target = batch["target"].to(dev)
        logits = self._logits(model, batch, tokens)
        known = target.sum(dim=1) > 0  # some annotator answer is in the vocabulary
        self.oov += int((~known).sum())
        loss = meter.vqa_loss(logits[known], target[known]) if bool(known.any()) else logits.sum() * 0.0
        return loss, {"train_vqa_score": float(meter.vqa_metric(logits.detach(), target).mean()),
                      "truncated_texts": self.truncated, "oov_questions": self.oov}

    @torch.no_grad()
    def predict(self, model, max_n: int):
        """Held-out (probabilities (N, A), soft targets (N, A), question types, questions, first ≤ 12 images)."""
        loader = DataLoader(self.eval_dataset(), batch_size=128, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        probs, targets, qtypes, questions, images = [], [], [], [], []
        was = model.training
        model.eval()
        try:
            for batch in loader:
                if "image" not in batch:
                    continue
                tokens = self.tokenizer(batch["question"], self.context_length, trim=True).to(self.dist.device)
                logits = self._logits(model, batch, tokens)
                probs.append(logits.float().sigmoid().cpu())
                targets.append(batch["target"])
                qtypes += batch["question_type"]
                questions += batch["question"]
                row_images = batch["image"] if "image_index" not in batch else batch["image"][batch["image_index"]]
                images.append(row_images[:max(0, 12 - sum(len(i) for i in images))])
                if sum(len(p) for p in probs) >= max_n:
                    break
        finally:
            model.train(was)
        if not probs:
            raise SystemExit(f"train.py: no readable held-out question in --eval_data {self.cfg.eval_data!r}")
        return torch.cat(probs), torch.cat(targets), qtypes, questions, torch.cat(images)

    def evaluate(self, model, step):
        import meter

        probs, targets, qtypes, _, _ = self.predict(model, self.cfg.eval_size)
        scores = meter.vqa_metric(probs, targets)  # (N,)
        out = {"vqa_score": float(scores.mean())}
        for qt in sorted(set(qtypes) - {""}):
            out[f"vqa_score_{qt}"] = float(scores[torch.tensor([q == qt for q in qtypes])].mean())
        return out

    def visualise(self, model, run_dir):
        """predictions.png: held-out images with the question, the predicted answer (its probability and soft
        score; green when it scores) and the annotators' best answer."""
        from data.transforms import denormalize

        probs, targets, _, questions, images = self.predict(model, 12)
        if not self.dist.main:
            return None
        n, cols, tile, text_h = min(12, len(images)), 4, 160, 62
        rows = math.ceil(n / cols)
        canvas = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
        draw, font = ImageDraw.Draw(canvas), _draw_font(11)
        for i in range(n):
            x0, y0 = (i % cols) * tile, (i // cols) * (tile + text_h)
            img = (denormalize(images[i]).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(img).resize((tile - 8, tile - 8), Image.NEAREST), (x0 + 4, y0 + 4))
            p, k = probs[i].max(-1)
            true = int(targets[i].argmax())
            score = float(targets[i, k])
            q = questions[i]
            cut = q.rfind(" ", 0, 28) if len(q) > 28 else len(q)
            lines = [(q[:cut], (0, 0, 0)), (q[cut:].strip()[:28], (0, 0, 0)),
                     (f"pred: {self.answers[int(k)]} {float(p):.0%} (score {score:.1f})",
                      (0, 140, 0) if score > 0 else (200, 0, 0)),
                     (f"true: {self.answers[true]}" if targets[i].max() > 0 else "true: (not in the vocabulary)",
                      (90, 90, 90))]
            for r, (line, colour) in enumerate(lines):
                draw.text((x0 + 4, y0 + tile + r * 14), line, fill=colour, font=font)
        path = os.path.join(run_dir, "predictions.png")
        canvas.save(path)
        return path

    def init_from(self, model, ckpt, path, drop=()):
        theirs = ckpt.get("task", {}).get("answers")
        same = theirs is None or list(theirs) == self.answers
        super().init_from(model, ckpt, path, drop=tuple(drop) + (() if same else ("vqa_head.",)))

    def state_dict(self):
        return {**super().state_dict(), "answers": list(self.answers)}

    def load_state_dict(self, sd):  # on --resume
        super().load_state_dict(sd)
        if sd.get("answers") is not None and list(sd["answers"]) != self.answers:
            raise SystemExit(f"train.py: the checkpoint's answer vocabulary ({len(sd['answers'])} answers) differs "
                             f"from that of --data {self.cfg.data!r} ({len(self.answers)}); resume with the same data")


def build_pretrained(ckpt: dict | str, device="cpu"):
    """A `--task pretrain` checkpoint (dict or path) → (Florence model with its weights, Tokenizer, Config).

    For adapters: `florence.image_encoder` is the CoSwin, `florence.text_encoder` the text tower."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    try:
        pcfg = Config(**json.loads(ckpt["config"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise SystemExit("train.py: the --init_from checkpoint holds no train.py config; give a checkpoint "
                         "written by `python train.py --task pretrain`") from None
    if pcfg.task != "pretrain" or "tokenizer_merges" not in ckpt.get("task", {}):
        raise SystemExit(f"train.py: the --init_from checkpoint is from --task {pcfg.task}; adapters start "
                         "from a --task pretrain checkpoint")
    task = PretrainTask.__new__(PretrainTask)  # no datasets needed: just the model recipe and tokenizer
    Task.__init__(task, dataclasses.replace(pcfg, name=""), Dist(device=torch.device(device)))
    task.load_state_dict(ckpt["task"])
    model = task.build_model()
    model.load_state_dict(ckpt["model"])
    return model.to(device), task.tokenizer, pcfg


# ----------------------------------------------------------------------------------------------------
# --task video: Video CoSwin (paper §2.6), a CoSwin inflated 2D → 3D, with a classification head


@register_task("video")
class VideoTask(Task):
    """Action classification on clips (MovingShapes, or video:LABELS.csv) with a Video CoSwin inflated from
    the CoSwin of a `--task pretrain` checkpoint (`--init_from`), or built from scratch without one.
    Metric: top-1 on held-out clips, `video_top1`. `--video_input middle_frame` trains the image CoSwin on
    each clip's middle frame instead (metric `video_middle_frame_top1`): the baseline that shows what time adds.

    Defaults (below): 32×32 clips of 8 frames, K_t = 2, so the toy model sees 4 × 8 × 8 tokens at stage 1
    and the run fits in minutes on a laptop CPU. lr 1e-4 (not pretraining's 1e-3): at batch 32 and lr
    1e-3 (or 3e-4) the model sat at chance for 1,500 steps, Adam's noisy steps swamping the small
    first-order motion signal; at 1e-4 it leaves chance after ~300-500 steps (with video_coswin's default
    temporal_merge (2, 2, 1), which it needs too). 2,500 steps, capped by the 9-minute budget: the
    toy-width tower reached 0.954 at step 2,130 (README, "video")."""

    defaults = dict(img_size=32, batch_size=32, lr=1e-4, weight_decay=0.05, warmup_steps=50, max_steps=2500,
                    max_minutes=9.0, eval_every=250, eval_size=500, ckpt_every=250)
    inputs = ("clip", "middle_frame")

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        import data as data_lib

        if cfg.video_input not in self.inputs:
            raise SystemExit(f"train.py: --video_input must be one of {self.inputs}, got {cfg.video_input!r}")
        if cfg.video_input == "clip" and cfg.num_frames < cfg.temporal_kernel:
            raise SystemExit(f"train.py: --num_frames {cfg.num_frames} is fewer than --temporal_kernel "
                             f"{cfg.temporal_kernel}; sample more frames or lower the temporal kernel")
        self.data_lib = data_lib
        self._train = self._dataset(cfg.data, "train")
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class list; use synthetic or video:LABELS.csv")
        self.metric = "video_top1" if cfg.video_input == "clip" else "video_middle_frame_top1"

    def _dataset(self, spec: str, split: str, **kw):
        try:
            return self.data_lib.build_dataset(spec, split=split, img_size=self.cfg.img_size, task="video",
                                               seed=self.cfg.seed, num_frames=self.cfg.num_frames, **kw)
        except (ValueError, OSError) as e:
            raise SystemExit(f"train.py: cannot build the video data {spec!r}: {e}") from None

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self.held_out_set(self._dataset, "held-out clips with --eval_data video:VAL.csv")

    def collate(self, samples):
        return self.data_lib.collate_video(samples)

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        import coswin
        import video_coswin

        cfg, ckpt = self.cfg, self.init_checkpoint
        if ckpt is not None and json.loads(ckpt.get("config", "{}")).get("task") == "pretrain":
            florence, _, pcfg = build_pretrained(ckpt)
            if pcfg.preset != cfg.preset:
                raise SystemExit(f"train.py: --init_from holds a --preset {pcfg.preset} model; pass --preset "
                                 f"{pcfg.preset} so that checkpoints of this run resume with the same shapes")
            image = florence.image_encoder  # trained CoSwin: inflated below, every weight inherited
            self.init_checkpoint = None  # taken here; nothing left for init_from()
            if cfg.drop_path >= 0:  # the stochastic-depth schedule of this run, rising linearly over the blocks
                blocks = [b for layer in image.layers for b in layer.blocks]
                for b, p in zip(blocks, torch.linspace(0, cfg.drop_path, len(blocks)).tolist()):
                    b.drop_path.p = p
            encoder = (image if cfg.video_input == "middle_frame" else
                       video_coswin.VideoCoSwin.from_image_model(image, cfg.temporal_kernel, copy_weights=False))
        else:  # from scratch (or a --task video checkpoint, loaded by Task.init_from)
            kw = {"window_size": cfg.window_size} if cfg.window_size else {}
            if cfg.drop_path >= 0:
                kw["drop_path_rate"] = cfg.drop_path
            image_preset = MODEL_PRESETS[cfg.preset].get("video_image", MODEL_PRESETS[cfg.preset]["image"])
            encoder = (coswin.build(image_preset, **kw) if cfg.video_input == "middle_frame" else
                       video_coswin.build(image_preset, temporal_kernel=cfg.temporal_kernel, **kw))
        encoder.set_grad_checkpointing(cfg.grad_ckpt)
        return video_coswin.VideoClassifier(encoder, len(self.classes), middle_frame=cfg.video_input == "middle_frame")

    def init_from(self, model, ckpt, path):
        """A --task video checkpoint (a pretraining one was inflated in build_model): every weight, same shapes."""
        check_compatible(model.state_dict(), ckpt["model"], path)
        model.load_state_dict(ckpt["model"])

    def fsdp_wrap_classes(self):
        import coswin
        import video_coswin

        return {coswin.SwinBlock, video_coswin.SwinBlock3D}

    # -- loss ------------------------------------------------------------------------------------------
    def loss(self, model, batch, step):
        if "video" not in batch:  # every clip of this micro-batch was unreadable (counted under "skipped")
            return sum(p.sum() for p in model.parameters()) * 0.0, {}
        x = batch["video"].to(self.dist.device, non_blocking=True)
        y = batch["label"].to(self.dist.device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        return loss, {"train_top1": float((logits.argmax(-1) == y).float().mean())}

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, max_n: int | None = None):
        """Held-out (probabilities (N, K), labels (N,), the first ≤ 8 clips (CPU))."""
        loader = DataLoader(self.eval_dataset(), batch_size=64, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        probs, labels, clips = [], [], []
        was = model.training
        model.eval()
        try:
            for batch in loader:
                if "video" not in batch:
                    continue
                probs.append(model(batch["video"].to(self.dist.device)).float().softmax(-1).cpu())
                labels.append(batch["label"])
                clips.append(batch["video"][:max(0, 8 - sum(len(c) for c in clips))])
                if max_n and sum(len(p) for p in probs) >= max_n:
                    break
        finally:
            model.train(was)
        if not probs:
            raise SystemExit(f"train.py: no readable held-out clip in --eval_data {self.cfg.eval_data!r}")
        return torch.cat(probs), torch.cat(labels), torch.cat(clips)

    def evaluate(self, model, step):
        probs, labels, _ = self.predict(model, self.cfg.eval_size)
        return {self.metric: float((probs.argmax(-1) == labels).float().mean())}

    def visualise(self, model, run_dir):
        """predictions.png: held-out clips, one per row, frames side by side, with the true and the predicted
        action (green when right, red when wrong) and the prediction's probability."""
        from data.transforms import denormalize

        probs, labels, clips = self.predict(model, 8)
        n, T = len(clips), clips.shape[2]
        tile, label_h = 64, 18
        canvas = Image.new("RGB", (T * tile + 8, n * (tile + label_h) + 4), "white")
        draw, font = ImageDraw.Draw(canvas), _draw_font(12)
        for i in range(n):
            y0 = i * (tile + label_h) + 2
            p, k = probs[i].max(-1)
            right = int(k) == int(labels[i])
            what = "middle frame only, " if self.cfg.video_input == "middle_frame" else ""
            draw.text((4, y0), f"true: {self.classes[int(labels[i])]}   predicted ({what}{float(p):.0%}): "
                      f"{self.classes[int(k)]}", fill=(0, 140, 0) if right else (200, 0, 0), font=font)
            for t in range(T):
                frame = (denormalize(clips[i][:, t]).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                canvas.paste(Image.fromarray(frame).resize((tile - 2, tile - 2), Image.NEAREST),
                             (4 + t * tile, y0 + label_h))
        path = os.path.join(run_dir, "predictions.png")
        canvas.save(path)
        return path


# ----------------------------------------------------------------------------------------------------
# --task linear_probe / classify: the paper's other two judgements of the image tower (issue 10;
# Florence §3.2 linear probe, §3.3 fine-tuning; PAPER.md §6)
#
#   python train.py --name pretrain-toy                                         # once: the two towers
#   python train.py --task linear_probe --init_from runs/pretrain-toy/ckpt.pt   # frozen features → logistic regression
#   python train.py --task classify --init_from runs/pretrain-toy/ckpt.pt       # fine-tune; head = zero-shot classifier
#   (image-label folders: add --data folder:train/ --eval_data folder:val/, the same class subfolders)


class ImageClassifier(nn.Module):
    """The image side of a pretrained Florence with a linear classifier over K classes.

    f = CoSwin(x): (B, C) pooled; u = normalize(P f): (B, D), P the pretrained image projection; then
      head_on="joint"  (classify): logits = τ · head(u), τ the pretrained logit scale (fixed), head.weight = Wᵀ
                       and head.bias = 0 at the start, W (D, K) the zero-shot classifier (template-averaged
                       class-name text embeddings): step 0 computes τ·u·W, zero-shot transfer's logits. The
                       zero-shot-initialised head of WiSE-FT (Wortsman et al. 2022; mlfoundations/wise-ft
                       src/models/modeling.py ClassificationHead), with τ kept outside the weights so that
                       Adam's steps are not tiny relative to them.
      head_on="pooled" (linear_probe): logits = head(f), the head holds the fitted logistic regression.
    The buffer `zeroshot` = W (D, K) scores zero-shot transfer from the same features: τ · u @ zeroshot."""

    def __init__(self, image_encoder: nn.Module, embed_dim: int, num_classes: int, head_on: str):
        super().__init__()
        self.image_encoder, self.head_on = image_encoder, head_on
        self.image_proj = nn.Linear(image_encoder.num_features, embed_dim, bias=False)
        self.head = nn.Linear(embed_dim if head_on == "joint" else image_encoder.num_features, num_classes)
        self.register_buffer("zeroshot", torch.zeros(embed_dim, num_classes))
        self.register_buffer("logit_scale", torch.ones(()))  # τ, from the pretraining run

    def joint(self, f: torch.Tensor) -> torch.Tensor:  # pooled features (B, C) → u (B, D), ‖u‖ = 1
        return nn.functional.normalize(self.image_proj(f), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) → logits (B, K)
        f = self.image_encoder(x)
        return self.logit_scale * self.head(self.joint(f)) if self.head_on == "joint" else self.head(f)


def layer_lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay over the CoSwin inside `model`: {parameter name: lr multiplier}.

    With N = Σ depths blocks numbered j = 1..N from the stem (across stages): block j gets decay^(N+1−j),
    so the LAST block gets lr·decay and the FIRST block lr·decay^N; a stage transition (ConvMerging) gets
    the multiplier of its stage's last block; the stem (patch_embed) decay^(N+1); everything after the
    blocks (the final norm, the projection, the head) 1. SimMIM's numbering for Swin (microsoft/SimMIM
    optimizer.py, get_swin_layer_id), after BEiT's layer decay."""
    import coswin

    prefix, enc = next(((n, m) for n, m in model.named_modules() if isinstance(m, coswin.CoSwin)), (None, None))
    if enc is None:
        raise ValueError("layer_lr_scales needs a model holding a coswin.CoSwin")
    prefix = f"{prefix}." if prefix else ""
    depths = [len(layer.blocks) for layer in enc.layers]
    N = sum(depths)
    scales = {}
    for name, _ in model.named_parameters():
        rest = name[len(prefix):].split(".") if name.startswith(prefix) else []
        if rest[:1] == ["patch_embed"]:
            layer_id = 0
        elif rest[:1] == ["layers"]:
            stage = int(rest[1])
            layer_id = sum(depths[:stage]) + (int(rest[3]) + 1 if rest[2] == "blocks" else depths[stage])
        else:
            layer_id = N + 1
        scales[name] = decay ** (N + 1 - layer_id)
    return scales


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    return torch.bincount(labels.long() * num_classes + preds.long(), minlength=num_classes ** 2).view(num_classes, -1)


def draw_confusion(cm: torch.Tensor, names: list[str], path: str, title: str = "") -> str:
    """confusion.png: each row (true class) shaded by the share of its images given each predicted class
    (white 0 → blue 1), counts written in the cells when they fit; written atomically."""
    K = len(names)
    cell = max(2, min(28, 720 // max(1, K)))
    font = _draw_font(11)
    labelled = cell >= 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(n, font=font) for n in names)) + 10 if labelled else 0
    top = 24 + label_w
    canvas = Image.new("RGB", (label_w + K * cell + 12, top + K * cell + 30), "white")
    draw = ImageDraw.Draw(canvas)
    total, right = int(cm.sum()), int(cm.diag().sum())
    draw.text((4, 4), f"{title}  top-1 {right / max(1, total):.1%} of {total}  (rows: true, columns: predicted)",
              fill="black", font=font)
    share = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    for i in range(K):
        for j in range(K):
            v = float(share[i, j])
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(225, 225, 225),
                           fill=(int(255 - 255 * v), int(255 - 185 * v), int(255 - 95 * v)))
            if labelled and cell >= 18 and int(cm[i, j]):
                draw.text((x0 + 2, y0 + cell // 2 - 6), str(int(cm[i, j])), font=font,
                          fill="white" if v > 0.5 else (60, 60, 60))
    if labelled:
        for k, name in enumerate(names):
            draw.text((4, top + k * cell + cell // 2 - 6), name, fill="black", font=font)  # rows
            txt = Image.new("RGB", (label_w, cell), "white")  # columns: the name, rotated upright
            ImageDraw.Draw(txt).text((2, cell // 2 - 6), name, fill="black", font=font)
            canvas.paste(txt.rotate(90, expand=True), (label_w + k * cell, 22))
    tmp = f"{path}.tmp.{os.getpid()}"
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


class _IndexedSamples(torch.utils.data.Dataset):
    """A dataset's samples with their index (to put features gathered from several ranks back in order)."""

    def __init__(self, ds, indices: list[int]):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        s = self.ds[self.indices[i]]
        return None if s is None else {**s, "index": self.indices[i]}


class ClassTask(Task):
    """Shared by `linear_probe` and `classify`: K classes (ShapesText's 20, or an image folder's subfolders),
    the image tower of a `--task pretrain` checkpoint (`--init_from`), top-1/5 on the held-out images and
    confusion.png. The tower's recipe and the class list travel in the task state (resume needs no --init_from)."""

    head_on = "joint"
    prefix = ""  # metric names: <prefix>_top1, <prefix>_top5

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        import data as data_lib

        self.data_lib = data_lib
        self._train = self._dataset(cfg.data, "train", **self._train_options())
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class names; --task {self.name} needs labelled "
                             "images: synthetic (ShapesText) or folder:DIR (one subfolder per class)")
        self.tower = None  # {"preset", "window_size"} of the pretrained image tower
        self.start = None  # zero-shot top-1/5 of the starting checkpoint on the held-out set
        self.last = None  # (labels, predictions) of the last evaluation, for confusion.png

    # -- data ------------------------------------------------------------------------------------------
    def _dataset(self, spec: str, split: str, **kw):
        try:
            return self.data_lib.build_dataset(spec, split=split, img_size=self.cfg.img_size, task="pretrain",
                                               seed=self.cfg.seed, **kw)
        except (ValueError, OSError) as e:
            raise SystemExit(f"train.py: cannot build the image-label data {spec!r}: {e}") from None

    def _synthetic(self, spec: str) -> tuple[bool, bool]:
        """→ (spec is synthetic, it names its own length as synthetic:N)."""
        kind, args, _ = self.data_lib.parse_spec(spec)
        return kind == "synthetic", bool(args)

    def _train_options(self) -> dict:
        return {}

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self.held_out_set(self._dataset, "held-out images of the same classes with --eval_data folder:DIR")

    def collate(self, samples):
        return self.data_lib.collate_image_text(samples)

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        import coswin
        import unicl

        cfg, ckpt = self.cfg, self.init_checkpoint
        source = json.loads(ckpt.get("config", "{}")).get("task") if ckpt is not None else None
        if ckpt is not None and source != "pretrain":
            if source != self.name:
                raise SystemExit(f"train.py: --init_from holds a --task {source} checkpoint; --task {self.name} starts "
                                 "from a --task pretrain checkpoint (or one of its own)")
            self.load_state_dict(ckpt.get("task", {}))  # its tower recipe; the weights come in init_from()
        if ckpt is not None and source == "pretrain":
            florence, tokenizer, pcfg = build_pretrained(ckpt, device=self.dist.device)
            if pcfg.preset != cfg.preset:
                raise SystemExit(f"train.py: --init_from holds a --preset {pcfg.preset} model; pass --preset "
                                 f"{pcfg.preset} so that checkpoints of this run resume with the same shapes")
            self.tower = {"preset": pcfg.preset, "window_size": pcfg.window_size}
            W = unicl.zero_shot_classifier(florence, tokenizer, self.classes,
                                           context_length=florence.text_encoder.cfg.context_length).float()  # (D, K)
            tau = float(florence.scale().detach())
            model = ImageClassifier(florence.image_encoder, florence.embed_dim, len(self.classes), self.head_on)
            with torch.no_grad():
                model.image_proj.weight.copy_(florence.image_proj.weight)
                model.zeroshot.copy_(W)
                model.logit_scale.fill_(tau)
                if self.head_on == "joint":  # logits = τ·u·W: step 0 is zero-shot transfer
                    model.head.weight.copy_(W.T)
                    model.head.bias.zero_()
            self.init_checkpoint = None  # taken here; nothing left for init_from()
        elif self.tower is not None:  # resumed (or a checkpoint of this task): the same shapes, weights loaded later
            kw = {"window_size": self.tower["window_size"]} if self.tower["window_size"] else {}
            mp = MODEL_PRESETS[self.tower["preset"]]
            model = ImageClassifier(coswin.build(mp["image"], **kw), mp["embed_dim"], len(self.classes), self.head_on)
        else:
            raise SystemExit(f"train.py: --task {self.name} judges a pretrained image tower; pass --init_from "
                             "runs/<pretraining run>/ckpt.pt (written by `python train.py --task pretrain`)")
        if cfg.drop_path >= 0:  # this run's stochastic depth, rising linearly over the blocks
            blocks = [b for layer in model.image_encoder.layers for b in layer.blocks]
            for b, p in zip(blocks, torch.linspace(0, cfg.drop_path, len(blocks)).tolist()):
                b.drop_path.p = p
        model.image_encoder.set_grad_checkpointing(cfg.grad_ckpt)
        return model

    def init_from(self, model, ckpt, path):
        """A checkpoint of this task (a pretraining one was taken in build_model): every weight, same shapes."""
        check_compatible(model.state_dict(), ckpt["model"], path)
        model.load_state_dict(ckpt["model"])

    def fsdp_wrap_classes(self):
        import coswin

        return {coswin.SwinBlock}

    def state_dict(self):
        return {"classes": self.classes, "tower": self.tower, "start": self.start}

    def load_state_dict(self, sd):
        if sd.get("classes") is not None and list(sd["classes"]) != self.classes:
            raise SystemExit(f"train.py: the checkpoint's {len(sd['classes'])} classes differ from those of --data "
                             f"{self.cfg.data!r} ({len(self.classes)}); use the data it was trained on")
        self.tower = sd.get("tower", self.tower)
        self.start = sd.get("start", self.start)

    # -- evaluation ------------------------------------------------------------------------------------
    def scores(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
        import unicl

        top1, top5 = unicl.accuracy(logits.float(), labels, topk=(1, 5))
        return {f"{prefix}_top1": top1, f"{prefix}_top5": top5}

    def visualise(self, model, run_dir):
        """confusion.png: the held-out set's confusion matrix at the last evaluation."""
        if not self.dist.main or self.last is None:
            return None
        labels, preds = self.last
        title = f"{self.name} {self.cfg.name}:"
        return draw_confusion(confusion_matrix(labels, preds, len(self.classes)), self.classes,
                              os.path.join(run_dir, "confusion.png"), title)


@register_task("linear_probe")
class LinearProbeTask(ClassTask):
    """Linear probe (Florence §3.2): the pretrained image tower frozen, pooled features f (B, C) of the
    training and held-out images extracted once and cached on disk, then a multinomial logistic regression
    (`unicl.linear_probe`: L-BFGS, the L2 strength swept over --probe_l2 and chosen on a --probe_val share of
    the training features). The whole fit is the run's single step; metrics probe_top1 / probe_top5, and
    zeroshot_top1 / zeroshot_top5 of the same checkpoint on the same images for comparison.

    Training images: --probe_size from ShapesText's training partition, or every image of --data folder:DIR
    (without augmentation). The cache <feature_cache>/<sha256>.pt is keyed by the image tower's tensors and
    the data (spec, split, image size, length, seed, and each file's path, size and mtime), so a changed
    checkpoint or changed data is extracted again. Under torchrun each rank extracts a share (DDP only)."""

    head_on = "pooled"
    metrics = ("probe_top1", "probe_top5")
    defaults = dict(max_steps=1, batch_size=8, warmup_steps=0, eval_every=1, ckpt_every=1, log_every=1)  # one step: the fit

    def __init__(self, cfg: Config, d: Dist):
        if cfg.fsdp:
            raise SystemExit("train.py: --task linear_probe trains no tower weights; run it without --fsdp (each "
                             "rank holds the frozen tower and extracts a share of the features)")
        try:
            self.l2 = [float(v) for v in cfg.probe_l2.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"train.py: --probe_l2 {cfg.probe_l2!r} is not a comma-separated list of numbers, "
                             "e.g. 1e-4,1e-3,1e-2") from None
        if not self.l2 or min(self.l2) < 0:
            raise SystemExit(f"train.py: --probe_l2 {cfg.probe_l2!r} needs at least one strength ≥ 0")
        if not 0.0 < cfg.probe_val < 1.0:
            raise SystemExit(f"train.py: --probe_val must be in (0, 1), got {cfg.probe_val}")
        super().__init__(cfg, d)
        self.features = {}  # "train" / "eval" → (features (N, C), labels (N,))

    def _train_options(self) -> dict:
        synthetic, sized = self._synthetic(self.cfg.data)
        if synthetic:
            return {} if sized else {"length": self.cfg.probe_size}
        if self.data_lib.parse_spec(self.cfg.data)[0] != "folder":
            return {}  # no class labels: ClassTask says so
        from data.transforms import image_transform

        return {"transform": image_transform(self.cfg.img_size, train=False)}  # features of the images as they are

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.requires_grad_(False)
        model.head.requires_grad_(True)  # fitted by L-BFGS, not by the loop's optimiser (its grad stays None)
        return model

    # -- features --------------------------------------------------------------------------------------
    def cache_key(self, model: nn.Module, which: str) -> str:
        """sha256 of the image tower's tensors and of everything that decides the images and their order."""
        import hashlib

        ds = self._train if which == "train" else self.eval_dataset()
        h = hashlib.sha256(b"florence linear_probe features v1")
        for k, v in sorted(model.image_encoder.state_dict().items()):
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        spec = self.cfg.data if which == "train" else self.cfg.eval_data
        ident = dict(spec=spec, split="train" if which == "train" else "val", img_size=self.cfg.img_size,
                     seed=self.cfg.seed, length=len(ds), dataset=type(ds).__name__, classes=self.classes)
        h.update(json.dumps(ident, sort_keys=True).encode())
        for path, label in getattr(ds, "samples", []):  # files: a changed, added or removed image changes the key
            st = os.stat(path)
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def cache_path(self, key: str) -> str | None:
        where = self.cfg.feature_cache or os.path.join(self.cfg.out_dir, "feature_cache")
        return None if where == "off" else os.path.join(where, f"{key}.pt")

    @torch.no_grad()
    def extract(self, model: nn.Module, ds) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pooled features (N, C) float32 and labels (N,) in dataset order; this rank extracts indices r, r+W, …
        and the shares are gathered. Unreadable images are left out and counted."""
        d = self.dist
        loader = DataLoader(_IndexedSamples(ds, list(range(d.rank, len(ds), d.world))), batch_size=256,
                            shuffle=False, num_workers=self.cfg.workers, generator=torch.Generator(),
                            collate_fn=self._collate_indexed)
        feats, labels, index = [], [], []
        was = model.training
        model.eval()
        try:
            for batch, idx in loader:
                if "image" not in batch:
                    continue
                feats.append(model.image_encoder(batch["image"].to(d.device)).float().cpu())
                labels.append(batch["label"])
                index += idx
        finally:
            model.train(was)
        C = model.image_encoder.num_features
        part = (torch.cat(feats) if feats else torch.zeros(0, C), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                torch.tensor(index, dtype=torch.long))
        parts = [part]
        if d.on:
            parts = [None] * d.world
            dist.all_gather_object(parts, part)
        f, y, i = (torch.cat([p[k] for p in parts]) for k in range(3))
        order = i.argsort()
        return f[order], y[order], len(ds) - len(i)

    def _collate_indexed(self, samples):
        return self.collate(samples), [s["index"] for s in samples if s is not None]

    def get_features(self, model: nn.Module, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which in self.features:
            return self.features[which]
        d = self.dist
        key = self.cache_key(model, which)
        path = self.cache_path(key)
        cached = None
        if d.main and path and os.path.isfile(path):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
                cached = (obj["features"], obj["labels"]) if obj.get("key") == key else None
            except Exception as e:  # a corrupt or foreign file: extract again and overwrite it
                tqdm.write(f"feature cache {path} unreadable ({type(e).__name__}); extracting again")
        if d.on:  # rank 0 decides, so that every rank extracts (collectively) or none does
            box = [cached]
            dist.broadcast_object_list(box, src=0)
            cached = box[0]
        if cached is None:
            t0 = time.time()
            ds = self._train if which == "train" else self.eval_dataset()
            f, y, skipped = self.extract(model, ds)
            if len(f) == 0:
                raise SystemExit(f"train.py: no readable image in the {which} data of --task linear_probe")
            if d.main:
                tqdm.write(f"linear_probe: {which} features {tuple(f.shape)} extracted in {time.time() - t0:.1f}s"
                           + (f", {skipped} unreadable images left out" if skipped else ""))
                if path:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    atomic_save({"key": key, "features": f, "labels": y, "skipped": skipped}, path)
            cached = (f, y)
        elif d.main:
            tqdm.write(f"linear_probe: {which} features {tuple(cached[0].shape)} from the cache {path}")
        self.features[which] = cached
        return cached

    # -- the fit: the run's one step ---------------------------------------------------------------------
    def forward_backward(self, model, batch, step, scale, scaler=None):
        import unicl

        raw = _unwrap(model)
        x, y = self.get_features(raw, "train")
        r = unicl.linear_probe(x, y, l2=self.l2, val_frac=self.cfg.probe_val, seed=self.cfg.seed,
                               num_classes=len(self.classes))
        with torch.no_grad():
            raw.head.weight.copy_(r["weight"])
            raw.head.bias.copy_(r["bias"])
        if self.dist.main:
            tqdm.write("linear_probe: validation top-1 by L2 strength " +
                       ", ".join(f"{lam:g}: {acc:.3f}" for lam, acc in sorted(r["val_top1"].items())) +
                       f"; chose {r['l2']:g}")
        return torch.tensor(r["train_loss"]), {"probe_l2": r["l2"], "probe_val_top1": r["val_top1"][r["l2"]],
                                               "probe_train_images": len(x)}

    @torch.no_grad()
    def evaluate(self, model, step):
        x, y = self.get_features(model, "eval")
        logits = x @ model.head.weight.float().cpu().T + model.head.bias.float().cpu()
        zs = model.logit_scale * model.joint(x.to(model.zeroshot.device)).float() @ model.zeroshot.float()
        self.last = (y, logits.argmax(-1))
        return {**self.scores(logits, y, "probe"), **self.scores(zs.cpu(), y, "zeroshot")}


@register_task("classify")
class ClassifyTask(ClassTask):
    """Fine-tuned classification (Florence §3.3): the pretrained image tower and projection trained end to
    end with a linear head initialised from the zero-shot classifier (τ · class-name text embeddings, see
    ImageClassifier), so step 0 scores exactly the zero-shot accuracy (reported as zeroshot_top1 in every
    evaluation, next to cls_top1 / cls_top5). Cross-entropy with --label_smoothing; --layer_decay d gives
    the head, projection and final norm --lr, the last block lr·d, the first block lr·d^N and the stem
    lr·d^(N+1) (N = 8 blocks for CoSwin-toy; `layer_lr_scales`); 1.0 trains every weight at --lr."""

    metrics = ("cls_top1", "cls_top5")
    # the toy fine-tune: ShapesText at the pretraining's size, 1200 steps of 64 with a 4-minute cap (3.1 min on 2
    # CPU cores with the earlier 32² CoSwin-toy tower; the 64² nano tower costs about the same per step)
    defaults = dict(batch_size=64, lr=3e-4, warmup_steps=40, weight_decay=0.05, max_steps=1200, max_minutes=4.0,
                    eval_every=300, eval_size=1000, ckpt_every=300)

    def __init__(self, cfg: Config, d: Dist):
        if not 0.0 < cfg.layer_decay <= 1.0:
            raise SystemExit(f"train.py: --layer_decay must be in (0, 1] (1.0 = off), got {cfg.layer_decay}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise SystemExit(f"train.py: --label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        super().__init__(cfg, d)

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        return layer_lr_scales(model, self.cfg.layer_decay) if self.cfg.layer_decay != 1.0 else {}

    @torch.no_grad()
    def predict(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out (logits (N, K), labels (N,)); every rank runs the whole set (forwards are collective
        under FSDP)."""
        loader = DataLoader(self.eval_dataset(), batch_size=256, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        logits, labels = [], []
        was = model.training
        model.eval()
        try:
            for batch in loader:
                if "image" in batch:
                    logits.append(model(batch["image"].to(self.dist.device)).float().cpu())
                    labels.append(batch["label"])
        finally:
            model.train(was)
        if not logits:
            raise SystemExit(f"train.py: no readable held-out image in --eval_data {self.cfg.eval_data!r}")
        return torch.cat(logits), torch.cat(labels)

    def forward_backward(self, model, batch, step, scale, scaler=None):
        if self.start is None and step == 0:  # the starting point is zero-shot transfer: score it once
            logits, labels = self.predict(model)
            self.start = self.scores(logits, labels, "zeroshot")
            if self.dist.main:
                tqdm.write(f"step 0 (zero-shot head): top-1 {self.start['zeroshot_top1']:.3f}")
        return super().forward_backward(model, batch, step, scale, scaler)

    def loss(self, model, batch, step):
        if "image" not in batch:  # every image of this micro-batch was unreadable (counted under "skipped")
            return sum(p.sum() for p in model.parameters()) * 0.0, {}
        x = batch["image"].to(self.dist.device, non_blocking=True)
        y = batch["label"].to(self.dist.device)
        logits = model(x).float()
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"train_top1": float((logits.argmax(-1) == y).float().mean())}

    def evaluate(self, model, step):
        logits, labels = self.predict(model)
        self.last = (labels, logits.argmax(-1))
        return {**self.scores(logits, labels, "cls"), **(self.start or {})}


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule


NO_DECAY_WORDS = ("relative_position_bias_table", "logit_scale", "embedding", "pos_embed", "positional", "token_embed")


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
    """Linear warmup over warmup_steps, then cosine from lr down to lr · min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
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
# Checkpoints: atomic save, clear errors on load


def atomic_save(obj, path: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"train.py: checkpoint {path!r} does not exist; check the path or drop --resume/--init_from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"train.py: checkpoint {path!r} is corrupt or not a torch checkpoint "
                         f"({type(e).__name__}); use an earlier checkpoint or start without --resume") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"train.py: {path!r} is not a train.py checkpoint (no 'model' entry)")
    return ckpt


def check_compatible(own: dict, theirs: dict, path: str, allow_resize: bool = False):
    """Raise a clear message naming mismatched keys (missing, unexpected, or of another shape)."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shape = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape
                   and not (allow_resize and k.endswith("relative_position_bias_table")))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape, e.g. {k}: checkpoint {tuple(theirs[k].shape)} vs "
                         f"model {tuple(own[k].shape)}")
        raise SystemExit(f"train.py: checkpoint {path!r} is from a different architecture ({'; '.join(parts)}). "
                         "Use the --preset/--window_size it was trained with, or start a fresh run.")


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
# Pictures (pillow only)


def plot_curves(metrics_path: str, out_path: str, title: str = ""):
    """curves.png: training loss (left) and every evaluation fraction (right) against step."""
    rows = []
    with open(metrics_path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and (k.endswith(("top1", "top5", "_r1", "_r5", "_r10"))
                                                                or k.startswith(("det_", "vqa_", "video_"))):
                evals.setdefault(k, []).append((r["step"], v))
    W, H, pad = 960, 400, 56
    img = Image.new("RGB", (W, H), "white")
    draw, font = ImageDraw.Draw(img), _draw_font(12)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    max_step = max([s for s, _ in loss] + [s for pts in evals.values() for s, _ in pts] + [1])

    def panel(x0, series, ylo, yhi, label):
        x1, y0, y1 = x0 + W // 2 - pad - 16, pad // 2 + 16, H - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 6), label, fill="black", font=font)
        for frac in (0, 0.5, 1):
            yv = ylo + frac * (yhi - ylo)
            yy = y1 - frac * (y1 - y0)
            draw.line([x0 - 4, yy, x0, yy], fill="black")
            draw.text((x0 - 44, yy - 7), f"{yv:.3g}", fill="black", font=font)
        for frac in (0, 0.5, 1):
            xx = x0 + frac * (x1 - x0)
            draw.text((xx - 10, y1 + 6), f"{int(frac * max_step)}", fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 12, y1 + 24), "step", fill="black", font=font)
        for i, (name, pts) in enumerate(series.items()):
            colour = palette[i % len(palette)]
            xy = [(x0 + s / max_step * (x1 - x0), y1 - (v - ylo) / max(1e-12, yhi - ylo) * (y1 - y0)) for s, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for p in xy[-1:] if len(xy) > 1 else xy:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
            if len(series) > 1:
                draw.text((x0 + 8, y0 + 6 + 14 * i), f"{name} {pts[-1][1]:.3f}", fill=colour, font=font)

    if loss:
        vals = [v for _, v in loss]
        panel(pad, {"loss": loss}, min(0.0, min(vals)), max(vals), f"training loss {title}  (last {vals[-1]:.3f})")
    if evals:
        panel(W // 2 + pad, evals, 0.0, 1.0, "held-out evaluation (fractions)")
    img.save(out_path)
    return out_path


# ----------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Owns the run: model wrapping, optimiser, data position, AMP, checkpoints, evaluation, logging.

    `--max_minutes`: after 10 timed steps the cosine schedule's length is set to the steps that fit in
    the remaining budget (minus the measured evaluation cost), capped by --max_steps; the run then ends
    cleanly with its final evaluation and checkpoint when the budget or the steps run out."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.dist = cfg, d
        self.run_dir = os.path.join(cfg.out_dir, cfg.name)
        self.ckpt_path = os.path.join(self.run_dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if d.main:
            os.makedirs(self.run_dir, exist_ok=True)
        self.task: Task = TASKS[cfg.task](cfg, d)
        self.amp_dtype, use_scaler = resolve_amp(cfg, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.step = 0
        self.total_steps = cfg.max_steps
        self.bad_in_a_row = self.bad_total = 0
        self.skipped_samples = 0
        self.stop_requested = False

        resume_path = self._resume_path()
        ckpt = load_checkpoint(resume_path) if resume_path else None
        if ckpt is not None:
            self.task.load_state_dict(ckpt.get("task", {}))
        elif cfg.init_from:
            self.task.init_checkpoint = load_checkpoint(cfg.init_from)
        # the same initial weights on every rank; then a per-rank stream for dropout / drop-path
        torch.manual_seed(cfg.seed)
        self.model = self.task.build_model()
        if self.task.init_checkpoint is not None:
            self.task.init_from(self.model, self.task.init_checkpoint, cfg.init_from)
            self.task.init_checkpoint = None
            if d.main:
                tqdm.write(f"initialised from {cfg.init_from}")
        self.model.to(d.device)
        self.wrapped = self._wrap(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, self.task.lr_scales(self.model)),
                                           lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=d.device.type == "cuda")
        torch.manual_seed(cfg.seed + 1000 * d.rank)
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        if ckpt is not None:
            self._load(ckpt, resume_path)
        if d.main and ckpt is None:
            with open(os.path.join(self.run_dir, "config.json"), "w") as fh:
                json.dump(dataclasses.asdict(cfg), fh, indent=2)
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)

    # -- set-up ----------------------------------------------------------------------------------------
    def _resume_path(self) -> str:
        r = self.cfg.resume
        if r == "auto":
            return self.ckpt_path if os.path.isfile(self.ckpt_path) else ""
        return r

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
        self.skipped_samples = int(ckpt.get("skipped_samples", 0))
        rngs = ckpt.get("rng", [])
        if len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank])
        if self.dist.main:
            tqdm.write(f"resumed from {path} at step {self.step}")

    def save(self):
        model_sd, optim_sd = self._full_state()
        rngs = [None] * self.dist.world
        if self.dist.on:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.dist.main:
            atomic_save({"model": model_sd, "optimizer": optim_sd,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                         "step": self.step, "total_steps": self.total_steps, "data_position": self.step,
                         "skipped_samples": self.skipped_samples, "rng": rngs,
                         "config": json.dumps(dataclasses.asdict(self.cfg)), "task": self.task.state_dict()},
                        self.ckpt_path)
        if self.dist.on:
            dist.barrier()

    # -- logging ---------------------------------------------------------------------------------------
    def log(self, record: dict):
        if self.dist.main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps({"step": self.step, **record}) + "\n")

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
        cfg, d = self.cfg, self.dist
        ds = self.task.train_dataset()
        micro = cfg.batch_size // (d.world * cfg.accum_steps)
        if micro * d.world * cfg.accum_steps != cfg.batch_size:
            raise SystemExit(f"train.py: --batch_size {cfg.batch_size} must be divisible by processes × "
                             f"accum_steps = {d.world} × {cfg.accum_steps}")
        g = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)
        if isinstance(ds, IterableDataset):
            def factory(epoch):
                if hasattr(ds, "set_epoch"):
                    ds.set_epoch(epoch)
                return DataLoader(ds, batch_size=micro, collate_fn=self.task.collate, num_workers=cfg.workers,
                                  generator=g, pin_memory=d.device.type == "cuda", drop_last=True)
            yield from infinite_stream(factory, self.step * cfg.accum_steps)
            return
        sampler = GlobalBatchSampler(len(ds), cfg.batch_size, d.rank, d.world, cfg.accum_steps, cfg.seed, self.step)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=self.task.collate, num_workers=cfg.workers,
                            generator=g, pin_memory=d.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
        yield from loader

    # -- one optimiser step ----------------------------------------------------------------------------
    def train_step(self, batches) -> tuple[float, dict]:
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        manual_sync = d.on and not cfg.fsdp and cfg.gradcache_chunk > 0  # gradcache bypasses DDP's hooks
        losses, logs = [], {}
        for m in range(cfg.accum_steps):
            while True:  # a batch whose every sample was bad comes as {"skipped": n}: count it, take the next
                batch = next(batches)
                self.skipped_samples += int(batch.pop("skipped", 0))
                if batch:
                    break
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
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= d.world
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
        self.stop_requested = True
        if self.dist.main:
            tqdm.write(f"signal {signum}: saving a checkpoint after this step, then stopping")

    def fit(self) -> dict:
        cfg, d = self.cfg, self.dist
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else None
        eval_cost = 0.0
        batches = self.batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (d.main and cfg.progress),
                   dynamic_ncols=True, desc=cfg.name)
        t_window, n_window = time.time(), 0
        timed_from, timed_t0 = None, None
        metrics = {}
        try:
            while self.step < self.total_steps:
                loss, logs = self.train_step(batches)
                self.step += 1
                n_window += 1
                bar.update(1)
                if timed_from is None and self.step >= 2:
                    timed_from, timed_t0 = self.step, time.time()
                if deadline and timed_from is not None and self.step == timed_from + 10:
                    per_step = (time.time() - timed_t0) / 10
                    n_evals = max(1, (self.total_steps - self.step) // cfg.eval_every)
                    left = deadline - time.time() - eval_cost * n_evals
                    fit = self.step + max(1, int(left / per_step))
                    self.total_steps = min(cfg.max_steps, max(fit, self.step + 1))
                    bar.total = self.total_steps
                    self.log({"event": "schedule", "total_steps": self.total_steps, "per_step_s": per_step})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    sps = n_window * cfg.batch_size / max(1e-9, time.time() - t_window)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log({"loss": loss, "lr": lr, "samples_per_s": sps, **logs})
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{sps:.0f}")
                    t_window, n_window = time.time(), 0
                out_of_time = deadline is not None and time.time() >= deadline
                done = self.step >= self.total_steps or out_of_time or self.stop_requested
                if self.step % cfg.eval_every == 0 and not done:
                    t0 = time.time()
                    metrics = self.evaluate()
                    eval_cost = time.time() - t0
                if self.step % cfg.ckpt_every == 0 or done:
                    self.save()
                if done:
                    break
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        if self.stop_requested:
            self.log({"event": "stopped", "reason": "signal"})
            return {}
        metrics = self.evaluate(final=True)
        wall = time.time() - t_start
        self.log({"event": "end", "wall_s": wall, "skipped_samples": self.skipped_samples,
                  "nonfinite_steps": self.bad_total, **metrics})
        if d.main:
            plot_curves(self.metrics_path, os.path.join(self.run_dir, "curves.png"), cfg.name)
            tqdm.write(f"done: {self.step} steps in {wall / 60:.1f} min; outputs in {self.run_dir}/ "
                       f"(metrics.jsonl, ckpt.pt, curves.png)")
        return metrics


def main(argv=None):
    cfg = resolved(parse_config(argv))
    d = setup_distributed(cfg)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        Trainer(cfg, d).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
