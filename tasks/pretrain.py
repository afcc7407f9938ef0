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
import itertools
import json
import os
import random
import re
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
from tasks.base import Task, build_data, eval_length, eval_mode, is_synthetic, load_checkpoint, tokenizer_from_state

EVAL_CACHE_BYTES = 256 * 2 ** 20  # a synthetic held-out set up to this size is drawn once (eval_batches)


class PretrainTask(Task):
    """UniCL pretraining of the two towers (paper §2.2): hash-key positives, global-batch contrastive loss,
    prompt templates for short texts in stage 1, none of them in stage 2. Evaluation: zero-shot top-1/5
    on held-out images (class names through the prompt templates) and image↔text retrieval R@1/5/10."""

    name = "pretrain"

    metrics = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")
    # The run's Config defaults are this recipe's (train.py): 1,500 steps of 64 at lr 6e-4 with a 100-step
    # warmup and a cosine to lr/2; AdamW wd 0.1 and β2 0.98 as CLIP (the paper gives neither). The CPU demo
    # (`python train.py`) keeps its lr up instead: 8e-4 after a 50-step warmup, held until the last 150 of
    # its 1,500 steps, where a cosine takes it to 0 (warmup–stable–decay). The toy run learns shape late,
    # and an lr that decays from the start slowed that; a constant one left the accuracy jumping by a few
    # points from one evaluation to the next (docs/EXPERIMENTS.md, pretrain).
    defaults: dict = {}
    demo_defaults: dict = dict(lr=8e-4, warmup_steps=50, decay_steps=150, min_lr_ratio=0.0)

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
        self._eval_cache = None  # the synthetic held-out batches, once drawn (eval_batches)
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
            return self._hold_out_shard()
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

    def _hold_out_shard(self):
        """Tar shards are streamed, not indexed: the held-out set is the last shard (in name order), read
        whole without augmentation; training streams the others. One shard leaves nothing to hold out."""
        cfg = self.cfg
        shards = list(getattr(self._train, "shards", []))
        if len(shards) < 2:
            raise SystemExit(f"train.py: --data {cfg.data!r} is one tar shard, streamed, so nothing can be held out "
                             "of it for evaluation; write the data as several shards (the last is then held out) or "
                             "give a held-out set with --eval_data (e.g. shards:OTHER_DIR or folder:DIR)")
        self._eval = build_data(cfg.data, "val", cfg, "pretrain", "held-out")
        self._eval.shards, self._train.shards = shards[-1:], shards[:-1]
        if self.dist.main:
            run_dir = os.path.join(cfg.out_dir, cfg.name)
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "holdout_rows.json"), "w") as fh:
                json.dump({"data": cfg.data, "shards": shards[-1:]}, fh)
            tqdm.write(f"held out for evaluation: the last of the {len(shards)} shards of --data {cfg.data} "
                       f"({shards[-1]}); training streams the other {len(shards) - 1}")

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
        """The resumed run's, the --init_from run's, --tokenizer's (FILE.json: ours or a saved CLIP one;
        clip:VOCAB: CLIP's, `text_encoder.ClipTokenizer`), or BPE merges learned on the training texts."""
        if self.tokenizer is None and self.init_checkpoint is not None:
            self.load_tokenizer(self.init_checkpoint.get("task", {}))  # the run we start from has one
        if self.tokenizer is not None:
            pass
        elif self.cfg.tokenizer:
            try:
                self.tokenizer = text_encoder.load_tokenizer(self.cfg.tokenizer)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"train.py: --tokenizer: {e}") from None
            if self.dist.main and isinstance(self.tokenizer, text_encoder.ClipTokenizer):
                tqdm.write(f"tokenizer: CLIP's BPE, {self.tokenizer.vocab_size} tokens (<sot> "
                           f"{self.tokenizer.sot_id}, <eot> {self.tokenizer.eot_id}) from {self.cfg.tokenizer}")
        else:
            if self.cfg.init_text:  # before minutes of learning merges the CLIP weights could not use
                raise SystemExit(NEEDS_CLIP_TOKENIZER)
            t0 = time.time()
            self.tokenizer = text_encoder.Tokenizer.train(self._corpus(), self.cfg.vocab_size)
            if self.dist.main:
                tqdm.write(f"tokenizer: {self.tokenizer.vocab_size} tokens learned in {time.time() - t0:.1f}s")
        self.save_tokenizer()
        return self.tokenizer

    def build_model(self) -> nn.Module:
        """The two towers: the resumed run's shapes; or --preset's, where --init_image / --init_text give
        public weights the towers take their shapes from (`public_towers_args`); or, with --init_from a run of
        the same --preset, that run's shapes (`carry_towers`). The load report is printed once."""
        cfg, tok = self.cfg, self.build_tokenizer()
        public = None
        if getattr(self, "_towers", None) is not None:  # resumed: the towers this run was built with
            self.model_args = resumed_towers(self._towers, cfg)
        else:
            self.model_args = towers_args(cfg, tok.vocab_size, tokenizer=tok)
            if self.init_checkpoint is not None:
                if cfg.init_image or cfg.init_text:
                    raise SystemExit("train.py: --init_from sets every weight of the run, so --init_image / "
                                     "--init_text would be overwritten; give either --init_from or the public weights")
                self.model_args = carry_towers(self.model_args, self.init_checkpoint, cfg.preset)
            elif cfg.init_image or cfg.init_text:
                public = read_public_towers(cfg, tok)
                self.model_args = public_towers_args(self.model_args, public)
        model = unicl.from_model_args(self.model_args, grad_checkpointing=self.cfg.grad_ckpt)
        if public is not None:
            self.public_report = load_public_towers(model, public)
            if self.dist.main:
                tqdm.write(format_report(self.public_report, public, cfg.preset))
        self.context_length = model.text_encoder.cfg.context_length
        return model

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        return unicl.from_model_args(model_args)

    def fsdp_wrap_classes(self):
        return {coswin.SwinBlock, text_encoder.Block}

    def state_dict(self):
        """The tokenizer (its merges, and which kind: CLIP's merges are pairs of str, enough to rebuild it
        without the vocabulary file) and the towers' arguments (public weights may have set their shapes)."""
        return {**self.tokenizer_state(), "tokenizer_kind": getattr(self.tokenizer, "kind", "florence-bpe"),
                "towers": self.model_args}

    def load_state_dict(self, sd):
        self.load_tokenizer(sd)
        self._towers = sd.get("towers")  # a resumed run is rebuilt with the shapes it had

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
    def eval_batches(self):
        """The held-out set in batches of 128. A synthetic set is pure (sample i is the same tensor at every
        evaluation), so up to EVAL_CACHE_BYTES of it is drawn once and kept: each later evaluation costs the
        two towers' forwards only, not a fresh rendering of every image (a third of an evaluation of the toy
        run). Files are read again at each evaluation: they can change on disk."""
        if self._eval_cache is not None:
            return self._eval_cache
        ds = self.eval_dataset()
        loader = DataLoader(ds, batch_size=128, shuffle=False, collate_fn=self.collate, num_workers=0,
                            generator=torch.Generator())  # its own generator: evaluation draws no global RNG
        if not is_synthetic(self.cfg.eval_data):  # resolved: "" became "synthetic" or "holdout"
            return loader
        kept, size, batches = [], 0, iter(loader)
        for batch in batches:
            kept.append(batch)
            size += batch["image"].nbytes if "image" in batch else 0
            if size > EVAL_CACHE_BYTES:  # too large to keep: the rest is drawn as it is read, each time
                return itertools.chain(kept, batches)
        self._eval_cache = kept
        return kept

    @torch.no_grad()
    def embed_eval(self, model, max_n: int | None = None):
        """Held-out image and caption embeddings, labels and the images themselves (CPU)."""
        u, v, labels, images, texts = [], [], [], [], []
        for batch in self.eval_batches():
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


def towers_args(cfg, vocab_size: int, tokenizer=None) -> dict:
    """A run's --preset, --window_size and --drop_path → the `model_args` of its Florence model. With a
    `tokenizer` whose pad / end ids are not ours (CLIP's: 0 and 49407), the text tower takes them."""
    over = {}
    if cfg.window_size:
        over["window_size"] = cfg.window_size
    if cfg.drop_path >= 0:
        over["drop_path_rate"] = cfg.drop_path
    text_over = {}
    if tokenizer is not None:
        default = text_encoder.TextConfig()
        text_over = {f: getattr(tokenizer, f) for f in ("pad_id", "eot_id")
                     if getattr(tokenizer, f) != getattr(default, f)}
    return unicl.model_args(unicl.config(cfg.preset, vocab_size=vocab_size, image_overrides=over,
                                         text_overrides=text_over))


def resumed_towers(towers: dict, cfg) -> dict:
    """A resumed run is rebuilt with the towers its checkpoint holds. --drop_path, which owns no weight, may
    change; a --window_size other than the checkpoint's would change the bias tables' shapes, which a resume
    cannot load: refused (a new window is a new run: --init_from, whose load resizes the tables)."""
    import coswin

    over = dict(towers.get("image_overrides", {}))
    window = over.get("window_size") or coswin.preset_config(coswin.PRESETS, towers["image"]).window_size
    if cfg.window_size and cfg.window_size != window:
        raise SystemExit(f"train.py: the checkpoint is from a different architecture (window {window}, so its "
                         f"relative_position_bias_table tensors do not fit --window_size {cfg.window_size}); resume "
                         f"with --window_size {window}, or start a new run with --init_from CKPT --window_size "
                         f"{cfg.window_size} (its load resizes the tables)")
    if cfg.drop_path >= 0:
        over["drop_path_rate"] = cfg.drop_path
    return {**towers, "image_overrides": over}


# ----------------------------------------------------------------------------------------------------
# Public weights: --init_image swin:PATH, --init_text clip:PATH (with --tokenizer clip:VOCAB)
#
# The public files set their tower's shape, whatever --preset says (the report says when they differ):
# a Swin checkpoint its widths, depths and heads (the window stays --window_size's or the preset's, the
# bias tables resized to it), a CLIP one its text tower (width, layers, heads = width/64, vocab, context,
# QuickGELU for clip:, GELU for clip-gelu:) and the joint width D of its text_projection. --preset keeps
# the rest: the image size, CoSwin's convolutional embedding, drop path, the schedule.

_IMAGE_SHAPE = ("embed_dim", "depths", "num_heads", "mlp_ratio")
_TEXT_SHAPE = ("context_length", "width", "layers", "heads", "mlp_ratio", "act", "pad_id", "eot_id")
_TEXT_KINDS = {"clip": "quick_gelu", "clip-gelu": "gelu"}
NEEDS_CLIP_TOKENIZER = ("train.py: --init_text clip:… holds weights for CLIP's token ids; add --tokenizer "
                        "clip:bpe_simple_vocab_16e6.txt.gz (CLIP's vocabulary)")


def _spec(flag: str, value: str, kinds) -> tuple[str, str]:
    kind, _, path = value.partition(":")
    if kind not in kinds or not path:
        forms = " or ".join(f"{k}:PATH" for k in kinds)
        raise SystemExit(f"train.py: --{flag} takes {forms}, got {value!r}")
    return kind, path


def read_public_towers(cfg, tokenizer) -> dict:
    """Read and check --init_image / --init_text before any tower is built: {"image": {...}, "text": {...}}."""
    out = {}
    if cfg.init_image:
        _, path = _spec("init_image", cfg.init_image, ("swin",))
        try:
            raw = coswin.read_state_dict(path, "--init_image Swin checkpoint")
            layout = coswin.swin_layout(raw)
            scfg = coswin.swin_config_from_state_dict(raw)
        except ValueError as e:
            raise SystemExit(f"train.py: --init_image: {e}") from None
        out["image"] = {"path": path, "sd": raw, "cfg": scfg, "layout": layout}
    if cfg.init_text:
        kind, path = _spec("init_text", cfg.init_text, _TEXT_KINDS)
        if not isinstance(tokenizer, text_encoder.ClipTokenizer):
            raise SystemExit(NEEDS_CLIP_TOKENIZER)
        try:
            sd = coswin.read_state_dict(path, "--init_text CLIP checkpoint")
            w, names, ignored = text_encoder.clip_text_weights(sd)
            tcfg, D = text_encoder.clip_text_config(w, act=_TEXT_KINDS[kind])
        except ValueError as e:
            raise SystemExit(f"train.py: --init_text: {e}") from None
        if tcfg.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"train.py: the --init_text tower has {tcfg.vocab_size} token embeddings but --tokenizer "
                             f"{cfg.tokenizer!r} has {tokenizer.vocab_size} tokens; give CLIP's own vocabulary file")
        out["text"] = {"path": path, "sd": sd, "cfg": tcfg, "embed_dim": D, "act": _TEXT_KINDS[kind]}
    return out


def public_towers_args(args: dict, public: dict) -> dict:
    """model_args with the towers' shapes the public weights have (only the fields that differ from the presets)."""
    args = {**args, "image_overrides": dict(args["image_overrides"]), "text_overrides": dict(args["text_overrides"])}
    if "image" in public:
        theirs, base = public["image"]["cfg"], coswin.preset_config(coswin.PRESETS, args["image"])
        for f in _IMAGE_SHAPE:
            v = getattr(theirs, f)
            v = tuple(v) if isinstance(v, (list, tuple)) else v
            if v != (tuple(getattr(base, f)) if isinstance(getattr(base, f), (list, tuple)) else getattr(base, f)):
                args["image_overrides"][f] = v
            else:
                args["image_overrides"].pop(f, None)
    if "text" in public:
        theirs, base = public["text"]["cfg"], text_encoder.config("clip_base")
        args["text"] = "clip_base"
        args["text_overrides"] = {f: getattr(theirs, f) for f in _TEXT_SHAPE if getattr(theirs, f) != getattr(base, f)}
        args["vocab_size"] = theirs.vocab_size
        args["embed_dim"] = public["text"]["embed_dim"]
    return args


def carry_towers(args: dict, ckpt: dict, preset: str) -> dict:
    """--init_from a pretraining run of the same --preset: that run's tower shapes and text tower (which
    public weights may have set), with this run's window and drop path."""
    theirs = ckpt.get("model_args")
    try:
        pcfg = json.loads(ckpt.get("config") or "{}")
    except (TypeError, json.JSONDecodeError):
        return args
    if not theirs or pcfg.get("task") != "pretrain" or pcfg.get("preset") != preset:
        return args
    image_over = {k: v for k, v in theirs.get("image_overrides", {}).items() if k in _IMAGE_SHAPE}
    return {**args, "image_overrides": {**args["image_overrides"], **image_over},
            **{k: theirs[k] for k in ("text", "text_overrides", "vocab_size", "embed_dim") if k in theirs}}


def load_public_towers(model: nn.Module, public: dict) -> dict:
    """Copy the public weights into a Florence model built by public_towers_args → the whole model's report
    {"loaded", "converted", "fresh", "ignored"} with Florence's key names (image_encoder., text_encoder.)."""
    report = {"loaded": [], "converted": {}, "ignored": []}
    if "image" in public:
        r = coswin.load_swin_weights(public["image"]["sd"], model.image_encoder)
        report["loaded"] += ["image_encoder." + k for k in r["loaded"]]
        report["converted"].update({"image_encoder." + k: v for k, v in r["converted"].items()})
        report["ignored"] += ["swin:" + k for k in r["ignored"]]
    if "text" in public:
        _, proj, r = text_encoder.load_clip_text(public["text"]["sd"], model.text_encoder, act=public["text"]["act"])
        with torch.no_grad():
            model.text_proj.weight.copy_(proj.t())  # x @ text_projection = Linear with weight text_projectionᵀ
        report["loaded"] += ["text_encoder." + k for k in r["loaded"]]
        report["converted"]["text_proj.weight"] = "← text_projection (width, D), transposed into the Linear's (D, width)"
        report["ignored"] += ["clip:" + k for k in r["ignored"]]
    done = {k.split(" ←")[0] for k in report["loaded"]} | set(report["converted"])
    report["fresh"] = [k for k in model.state_dict() if k not in done]
    return report


def _patterns(keys) -> str:
    """Keys grouped with their numbers as *: 'layers.*.blocks.*.norm1.weight ×12, norm.weight'."""
    from collections import Counter

    counts = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", k) for k in keys)
    return ", ".join(f"{p} ×{n}" if n > 1 else p for p, n in counts.items())


def format_report(report: dict, public: dict, preset: str) -> str:
    """The start-up lines: where each tower came from, and what was loaded, converted and left fresh."""
    lines = []
    if "image" in public:
        im = public["image"]
        p = unicl.PRESETS[preset].image
        size = coswin.swin_size_name(im["cfg"])
        same = coswin.swin_size_name(coswin.PRESETS[p]) == size
        lines.append(f"--init_image: {size} ({im['layout']} layout, window {im['cfg'].window_size}) from {im['path']} "
                     f"into CoSwin{'' if same else f', its shape in place of --preset {preset} ({p})'}")
    if "text" in public:
        t = public["text"]
        c, text_preset = t["cfg"], unicl.PRESETS[preset].text
        lines.append(f"--init_text: CLIP text tower (width {c.width}, {c.layers} layers, {c.heads} heads, vocab "
                     f"{c.vocab_size}, context {c.context_length}, {c.act}, D {t['embed_dim']}) from {t['path']}"
                     f"{'' if text_preset == 'clip_base' else f', in place of --preset {preset} ({text_preset})'}")
    loaded = [k.split(" ←")[0] for k in report["loaded"]]
    lines.append(f"  loaded as they are ({len(loaded)}): {_patterns(loaded)}")
    conv = {}
    for k, how in report["converted"].items():
        conv.setdefault((re.sub(r"\.\d+(?=\.|$)", ".*", k), how), []).append(k)
    lines.append(f"  converted ({len(report['converted'])}):")
    lines += [f"    {p}{f' ×{len(ks)}' if len(ks) > 1 else ''}: {how}" for (p, how), ks in conv.items()]
    lines.append(f"  fresh ({len(report['fresh'])}): {_patterns(report['fresh'])}")
    lines.append(f"  ignored ({len(report['ignored'])}): {_patterns(report['ignored'])}")
    return "\n".join(lines)


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
