"""--task pretrain: UniCL pretraining of Florence's two towers (paper §2.2; the towers of §2.3).

    python train.py                                               # stage 1, the toy run on synthetic shapes
    python train.py --stage 2 --init_from runs/pretrain-toy/ckpt.pt --name stage2
    python train.py --img_size 384 --window_size 12 --init_from runs/stage2/ckpt.pt   # the 384² phase

A batch of (image, text) pairs becomes (u, v, keys): each text's hash key y (unicl.text_key; a class
key for image-label folders) makes every pair with the same key a positive. Stage 1 wraps short texts
(one or two words, `unicl.is_short_caption`) in a random prompt template ("a photo of a {}."), keeping
the text's key, so all prompts of one label are positives; stage 2 drops those texts from the training
data, whatever its source, so that every batch is full (`Stage2Data`). The paper's last phase, 384², follows
stage 2: a run started with --init_from a pretraining checkpoint takes that run's stage unless --stage is
given. The loss is `unicl.unicl_loss` over the global batch. Evaluation: zero-shot top-1/5 on held-out images (class names through the templates) and
image↔text retrieval R@1/5/10; predictions.png shows held-out images with their top-3 classes.

`load_pretrained` reads a checkpoint of this task back (the Florence model, its tokenizer, its config):
the adapters start from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

import coswin
import data
import text_encoder
import unicl
from tasks import draw
from tasks.base import Task, build_data, eval_length, eval_mode, load_checkpoint, tokenizer_from_state


class PretrainTask(Task):
    """UniCL pretraining of the two towers (paper §2.2): hash-key positives, global-batch contrastive loss,
    prompt templates for short texts in stage 1, none of them in stage 2. Evaluation: zero-shot top-1/5
    on held-out images (class names through the prompt templates) and image↔text retrieval R@1/5/10."""

    name = "pretrain"

    metrics = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")
    # The run's Config defaults are this recipe's (train.py): 1,500 steps of 64 at lr 6e-4 with a 100-step
    # warmup and a cosine to lr/2 (short CPU runs learn shape late: the lr stays up); AdamW wd 0.1 and
    # β2 0.98 as CLIP (the paper gives neither). Measured runs: docs/EXPERIMENTS.md, pretrain.
    defaults: dict = {}

    @classmethod
    def resolve_config(cls, cfg, source: dict | None):
        """--stage 0: the stage of the pretraining run this one continues or starts from, else 1. So the
        paper's 384² phase, started from the stage-2 run with --init_from, stays at stage 2."""
        if cfg.stage:
            return cfg
        theirs = json.loads(source.get("config", "{}")) if source is not None else {}
        stage = int(theirs.get("stage") or 1) if theirs.get("task") == "pretrain" else 1
        return dataclasses.replace(cfg, stage=stage)

    def __init__(self, cfg, d):
        super().__init__(cfg, d)
        self._train = build_data(cfg.data, "train", cfg, "pretrain", "image-text")
        self._eval = None
        if cfg.eval_data == "holdout":
            self._hold_out()
        if cfg.stage == 2:
            self._train = stage2_data(self._train, cfg.data, d)

    # -- data ------------------------------------------------------------------------------------------
    def _hold_out(self):
        """--eval_data holdout (the default for file data): evenly spaced rows of --data, read without
        augmentation, are the held-out set, and training never sees them; their numbers go to
        <run>/holdout_rows.json."""
        cfg = self.cfg
        if isinstance(self._train, IterableDataset):
            raise SystemExit(f"train.py: --data {cfg.data!r} is a stream, so no rows can be held out of it; give a "
                             "held-out set with --eval_data (e.g. shards:OTHER_DIR or folder:DIR)")
        rows = data.holdout_rows(len(self._train), cfg.eval_size)
        if len(rows) == len(self._train):
            raise SystemExit(f"train.py: --data {cfg.data!r} has {len(self._train)} rows, too few to hold some out; "
                             "give a held-out set with --eval_data")
        held = set(rows)
        self._eval = data.Rows(build_data(cfg.data, "val", cfg, "pretrain", "held-out"), rows)
        self._train = data.Rows(self._train, [i for i in range(len(self._train)) if i not in held])
        if self.dist.main:
            run_dir = os.path.join(cfg.out_dir, cfg.name)
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "holdout_rows.json"), "w") as fh:
                json.dump({"data": cfg.data, "rows": rows}, fh)
            n = len(self._train) + len(rows)
            tqdm.write(f"held out for evaluation: {len(rows)} of the {n} rows of --data {cfg.data}, evenly spaced "
                       f"(rows {', '.join(map(str, rows[:3]))}, …; all in {run_dir}/holdout_rows.json); training "
                       f"uses the other {len(self._train)}")

    def eval_dataset(self):
        if self._eval is None:
            cfg = self.cfg
            self._eval = build_data(cfg.eval_data, "val", cfg, "pretrain", "held-out",
                                    **eval_length(cfg.eval_data, cfg.eval_size))
        return self._eval

    def collate(self, samples):
        return data.collate_image_text(samples)

    def check_eval(self):
        """Builds the held-out set now. Without class names (captions only) zero-shot top-1 is not measured,
        retrieval is: said once."""
        if not self.class_names() and self.dist.main:
            tqdm.write(f"--eval_data {self.cfg.eval_data!r} has captions but no class names: evaluation measures "
                       "image↔text retrieval only (zero-shot needs classes: --eval_data folder:DIR, one subfolder "
                       "per class)")

    def class_names(self) -> list[str]:
        return list(getattr(self.eval_dataset(), "classes", None) or [])

    def _corpus(self) -> list[str]:
        """Texts to learn BPE merges from: captions of the training set, plus the prompts of the classes."""
        ds, limit = self._train, self.cfg.tokenizer_texts
        texts = []
        if isinstance(ds, IterableDataset):
            inner = getattr(ds, "ds", ds)  # a stage-2 stream wraps the shards
            stream = inner.captions(limit) if hasattr(inner, "captions") else (s and s["text"] for s in ds)
            for t in stream:  # shards: the captions without decoding the images
                if t is not None:
                    texts.append(t)
                if len(texts) >= limit:
                    break
        else:
            step = max(1, len(ds) // limit)
            for i in range(0, min(len(ds), limit * step), step):
                t = sample_text(ds, i)  # synthetic scenes and files: the caption without decoding the image
                if t is not None:
                    texts.append(t)
        for name in getattr(ds, "classes", None) or []:
            texts += [t.format(name) for t in unicl.TEMPLATES]
        return texts

    # -- model -----------------------------------------------------------------------------------------
    def build_tokenizer(self):
        if self.tokenizer is None and self.init_checkpoint is not None:
            self.load_state_dict(self.init_checkpoint.get("task", {}))  # the run we start from has one
        if self.tokenizer is not None:
            pass
        elif self.cfg.tokenizer:
            self.tokenizer = text_encoder.Tokenizer.load(self.cfg.tokenizer)
        else:
            t0 = time.time()
            self.tokenizer = text_encoder.Tokenizer.train(self._corpus(), self.cfg.vocab_size)
            if self.dist.main:
                tqdm.write(f"tokenizer: {self.tokenizer.vocab_size} tokens learned in {time.time() - t0:.1f}s")
        self.save_tokenizer()
        return self.tokenizer

    def build_model(self) -> nn.Module:
        tok = self.build_tokenizer()
        self.model_args = towers_args(self.cfg, tok.vocab_size)
        model = unicl.from_model_args(self.model_args, grad_checkpointing=self.cfg.grad_ckpt)
        self.context_length = model.text_encoder.cfg.context_length
        return model

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        return unicl.from_model_args(model_args)

    def fsdp_wrap_classes(self):
        return {coswin.SwinBlock, text_encoder.Block}

    def state_dict(self):
        return self.tokenizer_state()

    def load_state_dict(self, sd):
        self.load_tokenizer(sd)

    # -- loss ------------------------------------------------------------------------------------------
    def prepare(self, batch, step: int):
        """Texts → (tokens, keys). Stage 1 wraps short texts in a random template (the key stays the
        text's own, so all prompts of one label are positives); at stage 2 the data holds no short text."""
        texts, labels = batch["text"], batch["label"]
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
        dev = self.dist.device
        return batch["image"].to(dev, non_blocking=True), tokens.to(dev, non_blocking=True), keys.to(dev)

    def loss(self, model, batch, step):
        images, tokens, keys = self.prepare(batch, step)
        self.check_negatives(keys)
        u, v, tau = model(images, tokens)
        return unicl.unicl_loss(u, v, keys, tau), {"tau": float(tau.detach())}

    def check_negatives(self, keys: torch.Tensor):
        """One warning when a batch has no negatives (a batch of 1, or one key for every pair): its
        contrastive loss is 0 whatever the model does, so nothing is learned from it."""
        if len(keys) and bool((keys == keys[0]).all()) and not getattr(self, "_warned_negatives", False):
            self._warned_negatives = True
            if self.dist.main:
                tqdm.write(f"WARNING: a batch of {len(keys)} pair(s) with one key for all: every pair is a positive of "
                           "every other, so the contrastive loss has no negatives (it is 0 and teaches nothing); use a "
                           "larger --batch_size or data with varied captions")

    def forward_backward(self, model, batch, step, scale, scaler=None):
        if self.cfg.gradcache_chunk <= 0:
            return super().forward_backward(model, batch, step, scale, scaler)
        images, tokens, keys = self.prepare(batch, step)
        self.check_negatives(keys)
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
        with eval_mode(model):
            u, v, labels, _, texts = self.embed_eval(model, self.cfg.eval_size)
            out = {}
            if self.class_names() and (labels >= 0).any():
                W = unicl.zero_shot_classifier(model, self.tokenizer, self.class_names(),
                                               context_length=self.context_length).float().cpu()  # (D, K)
                ok = labels >= 0
                top1, top5 = unicl.accuracy(u[ok] @ W, labels[ok], topk=(1, 5))
                out.update(zeroshot_top1=top1, zeroshot_top5=top5)
            out.update(unicl.retrieval_recall(u, v, torch.arange(len(v))))
            return out

    @torch.no_grad()
    def visualise(self, model, run_dir):
        """predictions.png: held-out images with their top-3 zero-shot classes (green = correct); without class
        names, their top-3 captions retrieved among the held-out ones (green = the image's own caption)."""
        with eval_mode(model):
            names = self.class_names()
            u, v, labels, images, texts = self.embed_eval(model, 16 if names else 256)
            if names:
                W = unicl.zero_shot_classifier(model, self.tokenizer, names,
                                               context_length=self.context_length).float().cpu()
            else:  # retrieval: the candidates are the held-out captions, image i's own is caption i
                W, names, labels = v.T, texts, torch.arange(len(texts))
            probs = (float(model.scale()) * u @ W).softmax(-1)
        if not self.dist.main:
            return None
        n = min(16, len(images))
        captions = []
        for i in range(n):
            p, k = probs[i].topk(min(3, len(names)))  # any number of classes, one upward
            captions.append([(f"{names[kk]} {pp:.0%}", draw.GREEN if kk == int(labels[i]) else draw.RED if r == 0
                              else draw.GREY) for r, (pp, kk) in enumerate(zip(p.tolist(), k.tolist()))])
        return draw.captioned_grid(images[:n], captions, os.path.join(run_dir, "predictions.png"), tile=128)


# ----------------------------------------------------------------------------------------------------
# Stage 2: natural captions only, for every data source


def sample_text(ds, i: int) -> str | None:
    """The text of sample i without decoding its image where the dataset can (synthetic scenes, files)."""
    if isinstance(ds, Stage2Data):
        j = ds.source(i)
        return None if j is None else sample_text(ds.ds, j)
    if isinstance(ds, data.Rows):
        return sample_text(ds.ds, ds.index[i])
    if hasattr(ds, "scene"):
        return ds.scene(i)["text"]
    if hasattr(ds, "caption"):
        return ds.caption(i)
    s = ds[i]
    return None if s is None else s["text"]


class Stage2Data(torch.utils.data.Dataset):
    """A map-style training set without the texts stage 1 would wrap in templates (unicl.keep_in_stage2).
    Dropping them here, not in the batch, keeps every batch full (and every rank's batch the same size):
    the slot of a short text is given to another sample drawn by a hash of (slot, attempt), so each natural
    caption is equally likely to fill it, the same in every run and after a resume, with no pass over the
    data first."""

    ATTEMPTS = 64

    def __init__(self, ds):
        self.ds = ds
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.ds)

    def source(self, i: int) -> int | None:
        """The index whose sample fills slot i (None: no natural caption found in ATTEMPTS draws)."""
        n = len(self.ds)
        for attempt in range(self.ATTEMPTS):
            j = i if attempt == 0 else int.from_bytes(
                hashlib.blake2b(f"{i}:{attempt}".encode(), digest_size=8).digest(), "big") % n
            t = sample_text(self.ds, j)
            if t is None or unicl.keep_in_stage2(t):  # None: an unreadable sample, counted as such later
                return j
        return None

    def __getitem__(self, i):
        j = self.source(i)
        if j is None:
            self.last_skip = ("empty", f"stage 2 found no natural caption for slot {i} in {self.ATTEMPTS} draws")
            return None
        return self.ds[j]


class Stage2Stream(torch.utils.data.IterableDataset):
    """The same for streamed data (tar shards): short texts are passed over as they come."""

    def __init__(self, ds):
        self.ds = ds
        self.classes = getattr(ds, "classes", None)

    def set_epoch(self, epoch: int):
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)

    def __iter__(self):
        for s in self.ds:
            if s is None or unicl.keep_in_stage2(s["text"]):
                yield s


def stage2_data(ds, spec: str, d):
    """The stage-2 view of the training data; a first look at up to 200 texts says what share it drops."""
    if isinstance(ds, IterableDataset):
        return Stage2Stream(ds)
    look = [sample_text(ds, i) for i in range(min(len(ds), 200))]
    short = sum(t is not None and not unicl.keep_in_stage2(t) for t in look)
    if look and short == len(look):
        raise SystemExit(f"train.py: --stage 2 drops every text of --data {spec!r} (each of the first {len(look)} has "
                         "one or two words, the texts stage 1 wraps in templates); stage 2 needs natural captions")
    if d is not None and d.main and short:
        tqdm.write(f"stage 2: short texts (one or two words; {short} of the first {len(look)}) are dropped, their "
                   "slots filled by other samples' natural captions")
    return Stage2Data(ds)


# ----------------------------------------------------------------------------------------------------
# The towers' arguments, and reading a pretraining checkpoint back (for the adapters)


def towers_args(cfg, vocab_size: int) -> dict:
    """A run's --preset, --window_size and --drop_path → the `model_args` of its Florence model."""
    over = {}
    if cfg.window_size:
        over["window_size"] = cfg.window_size
    if cfg.drop_path >= 0:
        over["drop_path_rate"] = cfg.drop_path
    return unicl.model_args(unicl.config(cfg.preset, vocab_size=vocab_size, image_overrides=over))


def load_pretrained(ckpt: dict | str, device="cpu", preset: str | None = None):
    """A `--task pretrain` checkpoint (dict or path) → (Florence model with its weights, Tokenizer,
    the towers' model_args, the run's config as a namespace). With `preset`, a checkpoint of another
    --preset is refused (an adapter's own checkpoints must resume with the same shapes).

    For adapters: `florence.image_encoder` is the CoSwin, `florence.text_encoder` the text tower. A
    checkpoint written before checkpoints carried `model_args` is read through its config."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    try:
        pcfg = SimpleNamespace(**json.loads(ckpt["config"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise SystemExit("train.py: the --init_from checkpoint holds no train.py config; give a checkpoint "
                         "written by `python train.py --task pretrain`") from None
    if pcfg.task != "pretrain" or "tokenizer_merges" not in ckpt.get("task", {}):
        raise SystemExit(f"train.py: the --init_from checkpoint is from --task {pcfg.task}; adapters start "
                         "from a --task pretrain checkpoint")
    if preset is not None and pcfg.preset != preset:
        raise SystemExit(f"train.py: --init_from holds a --preset {pcfg.preset} model; pass --preset "
                         f"{pcfg.preset} so that checkpoints of this run resume with the same shapes")
    tokenizer = tokenizer_from_state(ckpt["task"])
    args = ckpt.get("model_args") or towers_args(pcfg, tokenizer.vocab_size)
    model = unicl.from_model_args(args)
    model.load_state_dict(ckpt["model"])
    return model.to(device), tokenizer, args, pcfg
