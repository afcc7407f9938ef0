"""--task video: Florence's video adapter, Video CoSwin (paper §2.6), with a classification head.

    python train.py --task video                                                # from scratch, on MovingShapes
    python train.py --task video --init_from runs/pretrain-toy/ckpt.pt          # inflated from the UniCL CoSwin
    python train.py --task video --video_input middle_frame --name video-frame  # the image-only baseline

A CoSwin becomes a video model by inflation (video_coswin.VideoCoSwin.from_image_model: W_3D = W_2D / K_t,
3D shifted windows, bias tables duplicated in time); a linear head classifies the pooled clip.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import coswin
import data
import unicl
import video_coswin
from tasks import draw
from tasks.base import Task, build_data, check_compatible, eval_mode, set_drop_path, source_task, zero_loss
from tasks.pretrain import load_pretrained


class VideoTask(Task):
    """Action classification on clips (MovingShapes, or video:LABELS.csv) with a Video CoSwin inflated from
    the CoSwin of a `--task pretrain` checkpoint (`--init_from`), or built from scratch without one.
    Metric: top-1 on held-out clips, `video_top1`. `--video_input middle_frame` trains the image CoSwin on
    each clip's middle frame instead (metric `video_middle_frame_top1`): the baseline that shows what time adds.

    Defaults (below): 32×32 clips of 8 frames, K_t = 2, so the toy model sees 4 × 8 × 8 tokens at stage 1
    and the run fits in minutes on a laptop CPU. lr 1e-4, not pretraining's: larger steps of Adam swamp
    the small first-order motion signal, and the model stays at chance (with video_coswin's default
    temporal_merge (2, 2, 1), which it needs too). Measured runs: docs/EXPERIMENTS.md, video."""

    name = "video"

    defaults = dict(
        batch_size=32,
        lr=1e-4, warmup_steps=50,  # larger lrs sat at chance: the motion signal is small next to Adam's noise
        weight_decay=0.05,  # Video Swin's
        max_steps=2500,
        eval_every=250, eval_size=500, ckpt_every=250)
    demo_defaults = dict(  # --preset toy on synthetic data only
        img_size=32,  # 32² clips of 8 frames: 4 × 8 × 8 tokens at stage 1, minutes on a CPU
        max_minutes=9.0)  # 2,500 steps capped by a 9-minute CPU budget
    inputs = ("clip", "middle_frame")
    # the tower of a Video CoSwin built from scratch, per --preset (else the preset's own image tower): the toy
    # run keeps CoSwin-toy, the width the video defaults above were fitted with
    SCRATCH_TOWER = {"toy": "toy"}

    def __init__(self, cfg, d):
        super().__init__(cfg, d)
        if cfg.video_input not in self.inputs:
            raise SystemExit(f"train.py: --video_input must be one of {self.inputs}, got {cfg.video_input!r}")
        if cfg.video_input == "clip" and cfg.num_frames < cfg.temporal_kernel:
            raise SystemExit(f"train.py: --num_frames {cfg.num_frames} is fewer than --temporal_kernel "
                             f"{cfg.temporal_kernel}; sample more frames or lower the temporal kernel")
        self._train = self._dataset(cfg.data, "train")
        self._eval = None
        self.classes = list(getattr(self._train, "classes", None) or [])
        if not self.classes:
            raise SystemExit(f"train.py: --data {cfg.data!r} has no class list; use synthetic or video:LABELS.csv")
        self.metric = "video_top1" if cfg.video_input == "clip" else "video_middle_frame_top1"

    def _dataset(self, spec: str, split: str, **kw):
        return build_data(spec, split, self.cfg, "video", "video", num_frames=self.cfg.num_frames, **kw)

    def eval_dataset(self):
        return self.held_out_set(self._dataset, "held-out clips with --eval_data video:VAL.csv")

    def collate(self, samples):
        return data.collate_video(samples)

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg, ckpt = self.cfg, self.init_checkpoint
        args = {"temporal_kernel": cfg.temporal_kernel, "middle_frame": cfg.video_input == "middle_frame",
                "num_classes": len(self.classes)}
        if source_task(ckpt) == "pretrain":
            florence, _, towers, _ = load_pretrained(ckpt, preset=cfg.preset)
            image = florence.image_encoder  # trained CoSwin: inflated below, every weight inherited
            self.init_checkpoint = None  # taken here; nothing left for init_from()
            if cfg.drop_path >= 0:
                set_drop_path(image, cfg.drop_path)
            encoder = (image if cfg.video_input == "middle_frame" else
                       video_coswin.VideoCoSwin.from_image_model(image, cfg.temporal_kernel, copy_weights=False))
            args.update(image=towers["image"], image_overrides=towers["image_overrides"], inflated=True)
        else:  # from scratch (or a --task video checkpoint, loaded by Task.init_from)
            kw = {"window_size": cfg.window_size} if cfg.window_size else {}
            if cfg.drop_path >= 0:
                kw["drop_path_rate"] = cfg.drop_path
            image_preset = self.SCRATCH_TOWER.get(cfg.preset, unicl.config(cfg.preset).image)
            encoder = (coswin.build(image_preset, **kw) if cfg.video_input == "middle_frame" else
                       video_coswin.build(image_preset, temporal_kernel=cfg.temporal_kernel, **kw))
            args.update(image=image_preset, image_overrides=kw, inflated=False)
        encoder.set_grad_checkpointing(cfg.grad_ckpt)
        self.model_args = args
        return video_coswin.VideoClassifier(encoder, len(self.classes), middle_frame=cfg.video_input == "middle_frame")

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        a = model_args
        if a["middle_frame"]:
            encoder = coswin.build(a["image"], **a["image_overrides"])
        elif a["inflated"]:
            encoder = video_coswin.VideoCoSwin.from_image_model(coswin.build(a["image"], **a["image_overrides"]),
                                                                a["temporal_kernel"], copy_weights=False)
        else:
            encoder = video_coswin.build(a["image"], temporal_kernel=a["temporal_kernel"], **a["image_overrides"])
        return video_coswin.VideoClassifier(encoder, a["num_classes"], middle_frame=a["middle_frame"])

    def init_from(self, model, ckpt, path):
        """A --task video checkpoint (a pretraining one was inflated in build_model): every weight, same shapes."""
        check_compatible(model.state_dict(), ckpt["model"], path)
        model.load_state_dict(ckpt["model"])

    def state_dict(self):
        return {"classes": list(self.classes)}  # the names of the classifier's rows, for florence.load

    def fsdp_wrap_classes(self):
        return {coswin.SwinBlock, video_coswin.SwinBlock3D}

    # -- loss ------------------------------------------------------------------------------------------
    def loss(self, model, batch, step):
        if "video" not in batch:  # every clip of this micro-batch was unreadable (counted under "skipped")
            return zero_loss(model), {}
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
        with eval_mode(model):
            for batch in loader:
                if "video" not in batch:
                    continue
                probs.append(model(batch["video"].to(self.dist.device)).float().softmax(-1).cpu())
                labels.append(batch["label"])
                clips.append(batch["video"][:max(0, 8 - sum(len(c) for c in clips))])
                if max_n and sum(len(p) for p in probs) >= max_n:
                    break
        if not probs:
            raise SystemExit(f"train.py: no readable held-out clip in --eval_data {self.cfg.eval_data!r}")
        return torch.cat(probs), torch.cat(labels), torch.cat(clips)

    def evaluate(self, model, step):
        probs, labels, _ = self.predict(model, self.cfg.eval_size)
        return {self.metric: float((probs.argmax(-1) == labels).float().mean())}

    def visualise(self, model, run_dir):
        """predictions.png: held-out clips, one per row, frames side by side, with the true and the predicted
        action (green when right, red when wrong) and the prediction's probability."""
        probs, labels, clips = self.predict(model, 8)
        if not self.dist.main:
            return None
        titles = []
        for i in range(len(clips)):
            p, k = probs[i].max(-1)
            what = "middle frame only, " if self.cfg.video_input == "middle_frame" else ""
            titles.append((f"true: {self.classes[int(labels[i])]}   predicted ({what}{float(p):.0%}): "
                           f"{self.classes[int(k)]}", draw.GREEN if int(k) == int(labels[i]) else draw.RED))
        return draw.clips(clips, titles, os.path.join(run_dir, "predictions.png"))

