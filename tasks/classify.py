"""--task linear_probe and --task classify: the pretrained image tower judged two more ways (paper §3.2
linear probe, §3.3 fine-tuning); zero-shot transfer (§3.1) is --task pretrain's own evaluation.

    python train.py --name pretrain-toy                                         # once: the two towers
    python train.py --task linear_probe --init_from runs/pretrain-toy/ckpt.pt   # frozen features → logistic regression
    python train.py --task classify --init_from runs/pretrain-toy/ckpt.pt       # fine-tune; head = zero-shot classifier

For image-label folders add --data folder:train/ --eval_data folder:val/ (the same class subfolders).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import coswin
import data
import unicl
from tasks import draw
from tasks.base import (Task, atomic_save, build_data, check_compatible, eval_mode, is_synthetic, set_drop_path,
                        source_task, unwrap, zero_loss)
from tasks.pretrain import load_pretrained


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
    confusion.png. The model's arguments and the class list travel in the checkpoint (resume needs no --init_from)."""

    head_on = "joint"
    prefix = ""  # metric names: <prefix>_top1, <prefix>_top5

    def __init__(self, cfg, d):
        super().__init__(cfg, d)
        self._train = self._dataset(cfg.data, "train", **self._train_options())
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class names; --task {self.name} needs labelled "
                             "images: synthetic (ShapesText) or folder:DIR (one subfolder per class)")
        self.tower = None  # the pretrained image tower's arguments: {"image", "image_overrides", "embed_dim"}
        self.start = None  # zero-shot top-1/5 of the starting checkpoint on the held-out set
        self.last = None  # (labels, predictions) of the last evaluation, for confusion.png

    # -- data ------------------------------------------------------------------------------------------
    def _dataset(self, spec: str, split: str, **kw):
        return build_data(spec, split, self.cfg, "pretrain", "image-label", **kw)

    def _train_options(self) -> dict:
        return {}

    def eval_dataset(self):
        return self.held_out_set(self._dataset, "held-out images of the same classes with --eval_data folder:DIR")

    def collate(self, samples):
        return data.collate_image_text(samples)

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg, ckpt = self.cfg, self.init_checkpoint
        source = source_task(ckpt)
        if ckpt is not None and source != "pretrain":
            if source != self.name:
                raise SystemExit(f"train.py: --init_from holds a --task {source} checkpoint; --task {self.name} starts "
                                 "from a --task pretrain checkpoint (or one of its own)")
            self.load_state_dict(ckpt.get("task", {}))  # its tower recipe; the weights come in init_from()
        if ckpt is not None and source == "pretrain":
            florence, tokenizer, towers, _ = load_pretrained(ckpt, device=self.dist.device, preset=cfg.preset)
            self.tower = {k: towers[k] for k in ("image", "image_overrides", "embed_dim")}
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
            model = self.rebuild({**self.tower, "num_classes": len(self.classes), "head_on": self.head_on})
        else:
            raise SystemExit(f"train.py: --task {self.name} judges a pretrained image tower; pass --init_from "
                             "runs/<pretraining run>/ckpt.pt (written by `python train.py --task pretrain`)")
        if cfg.drop_path >= 0:  # this run's stochastic depth, rising linearly over the blocks
            set_drop_path(model.image_encoder, cfg.drop_path)
        model.image_encoder.set_grad_checkpointing(cfg.grad_ckpt)
        self.model_args = {**self.tower, "num_classes": len(self.classes), "head_on": self.head_on}
        return model

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        a = model_args
        return ImageClassifier(coswin.build(a["image"], **a["image_overrides"]), a["embed_dim"], a["num_classes"],
                               a["head_on"])

    def init_from(self, model, ckpt, path):
        """A checkpoint of this task (a pretraining one was taken in build_model): every weight, same shapes."""
        check_compatible(model.state_dict(), ckpt["model"], path)
        model.load_state_dict(ckpt["model"])

    def fsdp_wrap_classes(self):
        return {coswin.SwinBlock}

    def state_dict(self):
        return {"classes": self.classes, "tower": self.tower, "start": self.start}

    def load_state_dict(self, sd):
        if sd.get("classes") is not None and list(sd["classes"]) != self.classes:
            raise SystemExit(f"train.py: the checkpoint's {len(sd['classes'])} classes differ from those of --data "
                             f"{self.cfg.data!r} ({len(self.classes)}); use the data it was trained on")
        tower = sd.get("tower", self.tower)
        if tower is not None and "preset" in tower:  # a checkpoint from before the tower's arguments were stored
            p = unicl.config(tower["preset"])
            tower = {"image": p.image, "embed_dim": p.embed_dim,
                     "image_overrides": {"window_size": tower["window_size"]} if tower["window_size"] else {}}
        self.tower = tower
        self.start = sd.get("start", self.start)

    # -- evaluation ------------------------------------------------------------------------------------
    def scores(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
        top1, top5 = unicl.accuracy(logits.float(), labels, topk=(1, 5))
        return {f"{prefix}_top1": top1, f"{prefix}_top5": top5}

    def visualise(self, model, run_dir):
        """confusion.png: the held-out set's confusion matrix at the last evaluation."""
        if not self.dist.main or self.last is None:
            return None
        labels, preds = self.last
        title = f"{self.name} {self.cfg.name}:"
        return draw.confusion(confusion_matrix(labels, preds, len(self.classes)), self.classes,
                              os.path.join(run_dir, "confusion.png"), title)


class LinearProbeTask(ClassTask):
    """Linear probe (Florence §3.2): the pretrained image tower frozen, pooled features f (B, C) of the
    training and held-out images extracted once and cached on disk, then a multinomial logistic regression
    (`unicl.linear_probe`: L-BFGS, the L2 strength swept over --probe_l2 and chosen on a --probe_val share of
    the training features). The fit is not a loop of optimiser steps: the Trainer calls `fit_directly` once
    instead (trains_by_steps = False). Metrics probe_top1 / probe_top5, and zeroshot_top1 / zeroshot_top5 of
    the same checkpoint on the same images for comparison.

    Training images: --probe_size from ShapesText's training partition, or every image of --data folder:DIR
    (without augmentation). The cache <feature_cache>/<sha256>.pt is keyed by the image tower's tensors and
    the data (spec, split, image size, length, seed, and each file's path, size and mtime), so a changed
    checkpoint or changed data is extracted again. Under torchrun each rank extracts a share (DDP only)."""

    name = "linear_probe"

    head_on = "pooled"
    metrics = ("probe_top1", "probe_top5")
    trains_by_steps = False  # one L-BFGS fit on cached features, not an optimiser loop

    def __init__(self, cfg, d):
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
        if is_synthetic(self.cfg.data):
            return {} if data.parse_spec(self.cfg.data)[1] else {"length": self.cfg.probe_size}
        if data.parse_spec(self.cfg.data)[0] != "folder":
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
        with eval_mode(model):
            for batch, idx in loader:
                if "image" not in batch:
                    continue
                feats.append(model.image_encoder(batch["image"].to(d.device)).float().cpu())
                labels.append(batch["label"])
                index += idx
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

    # -- the fit: L-BFGS once, instead of the step loop --------------------------------------------------
    def fit_directly(self, model) -> tuple[float, dict]:
        raw = unwrap(model)
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
        return float(r["train_loss"]), {"probe_l2": r["l2"], "probe_val_top1": r["val_top1"][r["l2"]],
                                               "probe_train_images": len(x)}

    @torch.no_grad()
    def evaluate(self, model, step):
        x, y = self.get_features(model, "eval")
        logits = x @ model.head.weight.float().cpu().T + model.head.bias.float().cpu()
        zs = model.logit_scale * model.joint(x.to(model.zeroshot.device)).float() @ model.zeroshot.float()
        self.last = (y, logits.argmax(-1))
        return {**self.scores(logits, y, "probe"), **self.scores(zs.cpu(), y, "zeroshot")}


class ClassifyTask(ClassTask):
    """Fine-tuned classification (Florence §3.3): the pretrained image tower and projection trained end to
    end with a linear head initialised from the zero-shot classifier (τ · class-name text embeddings, see
    ImageClassifier), so step 0 scores exactly the zero-shot accuracy (reported as zeroshot_top1 in every
    evaluation, next to cls_top1 / cls_top5). Cross-entropy with --label_smoothing; --layer_decay d gives
    the head, projection and final norm --lr, the last block lr·d, the first block lr·d^N and the stem
    lr·d^(N+1) (N = 8 blocks for CoSwin-toy; `layer_lr_scales`); 1.0 trains every weight at --lr."""

    name = "classify"

    metrics = ("cls_top1", "cls_top5")
    defaults = dict(
        batch_size=64, warmup_steps=40,
        lr=3e-4,  # half pretraining's: the head starts as the zero-shot classifier, not from scratch
        weight_decay=0.05,  # BEiT / SimMIM fine-tuning practice
        max_steps=1200,  # the toy fine-tune: ShapesText at the pretraining's size
        eval_every=300, eval_size=1000, ckpt_every=300)  # runs: docs/EXPERIMENTS.md, classify
    demo_defaults = dict(max_minutes=4.0)  # --preset toy on synthetic data only: a 4-minute CPU cap

    def __init__(self, cfg, d):
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
        with eval_mode(model):
            for batch in loader:
                if "image" in batch:
                    logits.append(model(batch["image"].to(self.dist.device)).float().cpu())
                    labels.append(batch["label"])
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
            return zero_loss(model), {}
        x = batch["image"].to(self.dist.device, non_blocking=True)
        y = batch["label"].to(self.dist.device)
        logits = model(x).float()
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"train_top1": float((logits.argmax(-1) == y).float().mean())}

    def evaluate(self, model, step):
        logits, labels = self.predict(model)
        self.last = (labels, logits.argmax(-1))
        return {**self.scores(logits, labels, "cls"), **(self.start or {})}
