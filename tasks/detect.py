"""--task detect: Florence's object-level adapter on the pretrained CoSwin (paper §2.4): Dynamic Head + ATSS
(--det_adapter dyhead, the default) or Dynamic DETR (--det_adapter dydetr).

    python train.py --name pretrain-toy                                          # once: the two towers
    python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt          # DyHead-ATSS on them
    python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt --det_adapter dydetr   # Dynamic DETR
    python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt --zero_shot_classes "red cross,blue circle"

dyhead: the pretrained CoSwin → FeaturePyramid → DynamicHead → ATSS head (dynamic_head.py). dydetr: CoSwin →
FeaturePyramid → dynamic encoder → ROI-based dynamic decoder with Hungarian set loss (dynamic_detr.py). Both
have classes that are text-aligned: each region's (or query's) feature is dotted with one pooled embedding of
the class's prompt from the pretrained text tower (CLIP/ViLD-style; GLIP instead scores regions against word
tokens), the tower fine-tuned with the detector, so a class named in words can be detected zero-shot. Each
class is the prompt "a photo of a {name}." (PROMPT). Trained on ShapesDetection or COCO JSON; the same data,
evaluation (COCO mAP), pictures and metrics for both adapters.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import coswin
import data
import dynamic_detr as dd
import dynamic_head as dh
import text_encoder
import unicl
from tasks import draw
from tasks.base import Task, build_data, eval_mode, is_synthetic, split_names, unwrap
from tasks.pretrain import load_pretrained, towers_args


class DetectTask(Task):
    """Object detection with the object-level adapter (paper §2.4, dynamic_head.py).

    Without --init_from the towers start fresh from --preset (no zero-shot meaning then). Metrics on the
    held-out split, COCO rules: det_map (AP .50:.95) and det_map50 over the training classes. With
    --zero_shot_classes those classes are removed from training (their objects are unlabelled background,
    as in open-vocabulary detection) and evaluated from their names alone with a vocabulary of just those
    names (zero-shot transfer): det_zs_map, det_zs_map50. --det_classifier frozen keeps the text tower as
    pretrained; fixed replaces the text side by one logit per class (no zero-shot). Boxes are clipped to
    the image; empty, reversed or non-finite boxes and unknown labels are dropped and counted (bad_boxes in
    the training log). predictions.png: held-out images, ground truth in grey, detections with names and scores."""

    name = "detect"

    metrics = ("det_map", "det_map50")
    PROMPT = "a photo of a {}."
    defaults = dict(
        batch_size=32, lr=1e-3, warmup_steps=50,  # a fresh head on pretrained towers takes a larger lr
        weight_decay=0.05,  # DyHead / ATSS practice for detection fine-tuning
        max_steps=3000, det_classifier="text",
        eval_every=500, eval_size=500, ckpt_every=500)  # mAP over 500 held-out images costs about a minute
    demo_defaults = dict(  # --preset toy on synthetic data only (docs/EXPERIMENTS.md, detect)
        img_size=64,  # 64² ShapesDetection: objects of 8–19 px, enough for the toy head's strides 4–16
        max_minutes=12.0)  # the schedule fitted to a 12-minute CPU run
    # --det_adapter dydetr's own values, where the field still holds the value the defaults above gave it
    # (neither a flag nor --config set it), for every run ("all"). Its model
    # sizes (16 queries, 3 decoder layers, …) are its preset's, dynamic_detr.PRESETS["toy"].
    adapter_defaults = {"dydetr": {
        # frozen class embeddings (ViLD's fixed text classifier): fine-tuned with one positive query per
        # object and every other query a negative, the tower drove the 20 class prompts together (mean
        # cosine 0.03 → 0.59 in 150 steps), so shapes could no longer be told apart
        "all": dict(det_classifier="frozen")}}  # the CPU demo's 12 minutes are DyHead's: the two compare at one budget

    @classmethod
    def resolve_config(cls, cfg, source: dict | None):
        """The adapter's own defaults (adapter_defaults) replace the detect task's where the config still
        holds those. A flag that repeats a detect default cannot be told from
        no flag here (the config holds the same value), so it gets the adapter's value too."""
        own = cls.adapter_defaults.get(cfg.det_adapter)
        if not own:
            return cfg
        demo = cfg.preset == "toy" and is_synthetic(cfg.data)
        base, wanted = dict(cls.defaults), dict(own.get("all", {}))
        if demo:
            base.update(cls.demo_defaults)
        return dataclasses.replace(cfg, **{k: v for k, v in wanted.items() if getattr(cfg, k) == base.get(k)})

    def __init__(self, cfg, d):
        super().__init__(cfg, d)
        self._train = build_data(cfg.data, "train", cfg, "detect", "detection")
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class names; --task detect needs a detection set "
                             "(synthetic or coco:INSTANCES.json)")
        self.zero_shot = split_names(cfg.zero_shot_classes)
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
        self.towers = None  # the towers' model_args (from the pretraining run, or fresh from --preset)
        self.bad_boxes = 0

    # -- data ------------------------------------------------------------------------------------------
    def eval_dataset(self):
        return self.held_out_set(lambda spec, split, **kw: build_data(spec, split, self.cfg, "detect", "detection",
                                                                      **kw),
                                 "--eval_data coco:VAL_INSTANCES.json")

    def collate(self, samples):
        return data.collate_detection(samples)

    def targets(self, raw: list[dict], size, to: torch.Tensor, count: bool) -> list[dict]:
        """Dataset targets → {"boxes", "labels" (indices into a vocabulary via `to`), "iscrowd"}; boxes clipped,
        bad rows dropped (and counted when `count`), classes outside the vocabulary dropped."""
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
    def _towers(self) -> nn.Module:
        """→ a Florence model (towers + projections): from --init_from, from the saved arguments (resume), or fresh."""
        if self.init_checkpoint is not None:
            florence, self.tokenizer, self.towers, _ = load_pretrained(self.init_checkpoint)
            florence.image_encoder.set_grad_checkpointing(self.cfg.grad_ckpt)
            florence.text_encoder.grad_checkpointing = self.cfg.grad_ckpt
            return florence
        if self.towers is None:  # fresh towers from --preset; a tokenizer learned on the class prompts
            prompts = [t.format(c) for c in self.classes + split_names(self.cfg.det_classes) for t in unicl.TEMPLATES]
            self.tokenizer = text_encoder.Tokenizer.train(prompts, self.cfg.vocab_size)
            self.towers = towers_args(self.cfg, self.tokenizer.vocab_size)
        return unicl.from_model_args(self.towers, grad_checkpointing=self.cfg.grad_ckpt)

    # the adapter's module and the fields --det_channels / --det_blocks set in its config
    ADAPTERS = {"dyhead": (dh, dh.Detector, dh.DetectorConfig, "num_blocks"),
                "dydetr": (dd, dd.DynamicDETR, dd.DynamicDETRConfig, "enc_blocks")}

    def build_model(self) -> nn.Module:
        module, detector, _, blocks = self.ADAPTERS[self.cfg.det_adapter]
        over = {k: v for k, v in (("channels", self.cfg.det_channels), (blocks, self.cfg.det_blocks)) if v > 0}
        try:
            det_cfg = module.build_config(self.cfg.det_head, **over)
        except ValueError as e:
            raise SystemExit(f"train.py: --det_head: {e}") from None
        florence = self._towers()
        self.context_length = florence.text_encoder.cfg.context_length
        model = detector.from_pretrained(florence, det_cfg, self.cfg.det_classifier, num_classes=len(self.seen))
        if model.text is not None:
            model.set_classes(self.tokenize_names(self.seen))
        self.model_args = {"towers": self.towers, "adapter": self.cfg.det_adapter, "detector": dataclasses.asdict(det_cfg),
                           "classifier": self.cfg.det_classifier, "num_classes": len(self.seen),
                           "context_length": self.context_length}
        return model

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        """model_args → the detector with fresh weights; "adapter" names dyhead or dydetr (absent in
        checkpoints from before Dynamic DETR: those are DyHead)."""
        adapter = model_args.get("adapter", "dyhead")
        if adapter not in DetectTask.ADAPTERS:
            raise SystemExit(f"train.py: the checkpoint's detector adapter {adapter!r} is unknown; this code knows "
                             f"{', '.join(DetectTask.ADAPTERS)}")
        _, detector, config, _ = DetectTask.ADAPTERS[adapter]
        florence = unicl.from_model_args(model_args["towers"])
        model = detector.from_pretrained(florence, config(**model_args["detector"]), model_args["classifier"],
                                         num_classes=model_args["num_classes"])
        if model.text is not None:  # the training vocabulary's prompts: their values come with the weights
            model.set_classes(torch.zeros(model_args["num_classes"], model_args["context_length"], dtype=torch.long))
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
        return {coswin.SwinBlock, dh.DyHeadBlock, dd.DecoderLayer, text_encoder.Block}  # dydetr's encoder blocks are DyHeadBlocks

    def counters(self):
        return {"bad_boxes": self.bad_boxes}

    def state_dict(self):
        return {**self.tokenizer_state(), "towers": self.towers, "classes": list(self.seen),  # for florence.load
                "zero_shot_classes": list(self.zero_shot)}

    def load_state_dict(self, sd):
        self.load_tokenizer(sd)
        if sd.get("towers") is not None:
            self.towers = sd["towers"]
        elif "pretrain_config" in sd:  # a checkpoint from before the towers' arguments were stored
            self.towers = towers_args(types.SimpleNamespace(**json.loads(sd["pretrain_config"])),
                                      self.tokenizer.vocab_size)

    # -- loss ------------------------------------------------------------------------------------------
    def loss(self, model, batch, step):
        images = batch["image"].to(self.dist.device, non_blocking=True)
        targets = self.targets(batch["targets"], images.shape[-2:], self.to_seen, count=True)
        out = model(images)
        loss, logs = unwrap(model).loss(out, targets, images.shape[-2:])
        return loss, {**logs, "bad_boxes": self.bad_boxes}

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect_eval(self, model, names: list[str] | None, max_images: int | None = None):
        """→ (predictions per vocabulary, raw targets, images): one forward over the held-out set with the
        seen names and (if any) the zero-shot names, split by vocabulary afterwards (sigmoid scores of a
        class do not depend on the other names, so this equals separate runs)."""
        raw = unwrap(model)
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
        with eval_mode(model):
            preds, raw_targets, images = self.detect_eval(model, None)
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
        custom = split_names(self.cfg.det_classes)
        if custom and unwrap(model).text is None:
            custom = []  # fixed classes cannot take new names
        with eval_mode(model):
            preds, raw_targets, images = self.detect_eval(model, custom or None, max_images=12)
        if not self.dist.main:
            return None
        names = custom or (self.seen + self.zero_shot)
        offsets = [0] if custom else [0, len(self.seen)]
        merged = [{k: torch.cat([dict(p[i], labels=p[i]["labels"] + off)[k] for p, off in zip(preds, offsets)])
                   for k in ("boxes", "scores", "labels")} for i in range(len(images))]  # vocabularies side by side
        return draw.detections(images, [t["boxes"] for t in raw_targets], merged, names,
                               os.path.join(run_dir, "predictions.png"))
