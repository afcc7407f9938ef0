"""--task itm_mlm and --task vqa: Florence's fine-grained adapter, METER co-attention fusion on the
pretrained towers (paper §2.5, meter.py).

    python train.py --name pretrain-toy                                         # 1. the towers (UniCL, toy)
    python train.py --task itm_mlm --init_from runs/pretrain-toy/ckpt.pt        # 2. (optional) fusion pretraining
    python train.py --task vqa --init_from runs/pretrain-toy/ckpt.pt            # 3. VQA on ShapesVQA: vqa_score
    python train.py --task vqa --init_from runs/pretrain-toy/ckpt.pt --vqa_blind --name vqa-blind   # ablation

Step 3 may start from step 2's runs/itm_mlm-toy/ckpt.pt instead; for VQA v2 give --data and --eval_data
vqa:QUESTIONS.json,ANNOTATIONS.json,IMAGES/.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import coswin
import data
import meter
import text_encoder
import unicl
from tasks import draw
from tasks.base import Task, build_data, eval_mode, is_synthetic, source_task, zero_loss
from tasks.pretrain import load_pretrained, towers_args


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

    def __init__(self, cfg, d):
        super().__init__(cfg, d)
        self.truncated = 0
        self._train = self._dataset(cfg.data, "train")
        self._eval = None

    def _dataset(self, spec: str, split: str, **kw):
        return build_data(spec, split, self.cfg, self.data_task, self.data_task, **kw)

    def eval_dataset(self):
        if self._eval is None:
            synthetic = is_synthetic(self.cfg.eval_data)
            if synthetic and not is_synthetic(self.cfg.data):
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
        if self.tokenizer is not None:  # resumed, or carried by a METER checkpoint
            return self.tokenizer
        if self.cfg.tokenizer:
            return text_encoder.Tokenizer.load(self.cfg.tokenizer)
        ds, limit = self._train, self.cfg.tokenizer_texts
        step = max(1, len(ds) // limit) if hasattr(ds, "__len__") else 1
        corpus = []
        for i in range(0, min(len(ds), limit * step), step):
            s = ds.scene(i) if hasattr(ds, "scene") else ds[i]
            if s is not None:
                corpus.append(self.texts(s))
        return text_encoder.Tokenizer.train(corpus, self.cfg.vocab_size)

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
        cfg, ckpt = self.cfg, self.init_checkpoint
        source = source_task(ckpt)
        preset = cfg.meter_preset or ("toy" if cfg.preset == "toy" else "florence")
        fusion = {"name": preset, **self.meter_overrides(), **self.heads()}  # meter.build's arguments
        if source == "pretrain":
            florence, self.tokenizer, towers, _ = load_pretrained(ckpt, preset=cfg.preset)
            model = meter.from_pretrained(florence, **fusion)  # the causal tower's weights, attending both ways
            self.init_checkpoint = None  # taken here; nothing left for init_from()
        else:
            if ckpt is not None:
                if source not in ("itm_mlm", "vqa"):
                    raise SystemExit(f"train.py: --init_from holds a --task {source} checkpoint; METER starts from "
                                     "a --task pretrain (or itm_mlm / vqa) checkpoint")
                self.load_tokenizer(ckpt.get("task", {}))  # its tokenizer; the weights come in init_from()
            self.tokenizer = self._tokenizer_for_fresh_towers()
            towers = towers_args(cfg, self.tokenizer.vocab_size)
            p = unicl.config(cfg.preset)
            image = coswin.build(p.image, **towers["image_overrides"])
            text = text_encoder.build(p.text, vocab_size=self.tokenizer.vocab_size, causal=False)
            model = meter.build(image_encoder=image, text_encoder=text, **fusion)
        model.image_encoder.set_grad_checkpointing(cfg.grad_ckpt)
        model.text_encoder.grad_checkpointing = cfg.grad_ckpt
        self.context_length = model.text_encoder.cfg.context_length
        self.save_tokenizer()
        self.model_args = {"towers": towers, "fusion": fusion}
        return self.freeze_towers(model)

    @staticmethod
    def rebuild(model_args: dict) -> nn.Module:
        return meter.from_pretrained(unicl.from_model_args(model_args["towers"]), **model_args["fusion"])

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
        return {coswin.SwinBlock, text_encoder.Block, meter.CoAttentionLayer}

    def counters(self):
        return {"truncated_texts": self.truncated}

    def state_dict(self):
        return self.tokenizer_state()

    def load_state_dict(self, sd):
        self.load_tokenizer(sd)


class ITMMLMTask(MeterTask):
    """METER's fusion pretraining on image–caption pairs (ShapesText by default): image–text matching (half
    the images swapped) + masked language modelling (`--mlm_prob` of the real tokens, 80/10/10), one forward.
    Metrics on held-out pairs (fixed masks and swaps): `itm_accuracy`, `mlm_accuracy`."""

    name = "itm_mlm"

    defaults = dict(
        batch_size=64, lr=5e-4, warmup_steps=50,  # a fresh fusion on pretrained towers
        weight_decay=0.01,  # METER's
        max_steps=600,
        eval_every=200, eval_size=500, ckpt_every=200)
    demo_defaults = dict(max_minutes=10.0)  # toy on synthetic: a 10-minute CPU schedule (ITM learns well before MLM)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if isinstance(self.tokenizer, text_encoder.ClipTokenizer):  # said before the first step, not inside it
            raise SystemExit("train.py: --task itm_mlm masks tokens, and the towers' tokenizer is CLIP's, which has no "
                             "mask token; start METER from a pretraining run with our BPE tokenizer, or use --task vqa")
        return model

    def collate(self, samples):
        return data.collate_image_text(samples)

    def loss(self, model, batch, step):
        if "image" not in batch:  # every sample of this micro-batch was unreadable (counted under "skipped")
            return zero_loss(model), {}
        dev = self.dist.device
        tokens = self.tokenize(batch["text"]).to(dev, non_blocking=True)
        loss, logs = meter.itm_mlm_loss(model, batch["image"].to(dev, non_blocking=True), tokens, batch["text"],
                                        self.tokenizer.mask_id, self.tokenizer.vocab_size, prob=self.cfg.mlm_prob)
        return loss, {**logs, "truncated_texts": self.truncated}

    @torch.no_grad()
    def _eval_batches(self, model, max_n: int):
        """Held-out batches with their fixed masks / swaps → (images, texts, tokens, out, labels, itm_label)."""
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
        itm_ok = itm_n = mlm_ok = mlm_n = 0
        with eval_mode(model):
            for batch, _, labels, out, itm_label in self._eval_batches(model, self.cfg.eval_size):
                B = len(itm_label)
                itm_ok += int((out["itm"][B:].argmax(-1).cpu() == itm_label).sum())
                itm_n += B
                target = labels[labels != -100]
                mlm_ok += int((out["mlm"].argmax(-1).cpu() == target).sum())
                mlm_n += len(target)
        return {"itm_accuracy": itm_ok / max(1, itm_n), "mlm_accuracy": mlm_ok / max(1, mlm_n)}

    def visualise(self, model, run_dir):
        """predictions.png: held-out images with the caption, the masked caption, the model's filling, and its
        match probability for the true caption."""
        with eval_mode(model):
            batch, masked, labels, out, _ = next(iter(self._eval_batches(model, 8)))
        if not self.dist.main:
            return None
        n = min(8, len(masked))
        preds = out["mlm"].argmax(-1).cpu()
        filled = masked.clone()
        filled[labels != -100] = preds
        with torch.no_grad():  # P(match) for each image with its own caption (unmasked)
            own = model(batch["image"][:n].to(self.dist.device), self.tokenizer(batch["text"][:n], self.context_length)
                        .to(self.dist.device))["itm"].float().softmax(-1)[:, 1].cpu()

        def show(ids):
            return "".join("[mask]" if i == self.tokenizer.mask_id else self.tokenizer.decode([i]) for i in ids.tolist()
                           if i not in (self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id))

        captions = []
        for i in range(n):
            chosen = labels[i] != -100
            ok = bool((filled[i][chosen] == labels[i][chosen]).all())
            captions.append([(f"caption: {batch['text'][i]}", draw.BLACK), (f"masked:  {show(masked[i])}", draw.GREY),
                             (f"filled:  {show(filled[i])}", draw.GREEN if ok else draw.RED),
                             (f"P(match) = {float(own[i]):.0%}", draw.GREEN if own[i] > 0.5 else draw.RED)])
        return draw.captioned_rows(batch["image"][:n], captions, os.path.join(run_dir, "predictions.png"))


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
    14-minute cosine schedule. The runs behind each choice: docs/EXPERIMENTS.md, vqa."""

    name = "vqa"

    data_task = "vqa"
    img_scale = 2  # --img_size 0: twice the preset's pretraining size (METER fine-tunes VQA at 576 after 288)
    defaults = dict(
        batch_size=64, warmup_steps=50,
        lr=1e-3,  # the fusion's; the towers train at --tower_lr 0.2 of it (METER's ratio)
        weight_decay=0.01,  # METER's
        max_steps=5000,
        eval_every=200, eval_size=1000, ckpt_every=200,
        image_frozen_stages=2,  # stem + stages 1-2 frozen: no backward at the costly resolutions
        vqa_questions=5)  # five questions per training image: the tower, most of a step, runs once for all
    demo_defaults = dict(max_minutes=14.0)  # toy on synthetic: a 14-minute CPU schedule (12 fell just short of 0.85)

    def __init__(self, cfg, d):
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

    def counters(self):
        return {**super().counters(), "oov_questions": self.oov}

    def texts(self, s):
        return s["question"]

    def heads(self):
        return {"pretrain_heads": False, "num_answers": len(self.answers)}

    def tower_scales(self):
        image, text = super().tower_scales()
        # blind: no gradient reaches the image tower, so freeze it (DDP needs every used weight to get one)
        return (0.0 if self.cfg.vqa_blind else image), text

    def collate(self, samples):
        return data.collate_vqa(samples)

    def _dataset(self, spec: str, split: str, **kw):
        # several training questions per synthetic image: the image tower runs once for all of them
        many = split == "train" and self.cfg.vqa_questions > 1 and is_synthetic(spec)
        return super()._dataset(spec, split, **kw, **({"questions": self.cfg.vqa_questions} if many else {}))

    def _logits(self, model, batch, tokens):
        image_index = batch.get("image_index")
        return model(batch["image"].to(self.dist.device, non_blocking=True), tokens, blind=self.cfg.vqa_blind,
                     image_index=None if image_index is None else image_index.to(self.dist.device))["vqa"]

    def loss(self, model, batch, step):
        if "image" not in batch:  # every sample of this micro-batch was unreadable (counted under "skipped")
            return zero_loss(model), {}
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
        """Held-out (probabilities (N, A), soft targets (N, A), question types, questions, first ≤ 12 images).
        A question whose image cannot be read scores 0: it is counted in `self.unreadable`, not left out
        (leaving it out would raise vqa_score)."""
        loader = DataLoader(self.eval_dataset(), batch_size=128, shuffle=False, collate_fn=self.collate,
                            num_workers=0, generator=torch.Generator())
        probs, targets, qtypes, questions, images = [], [], [], [], []
        self.unreadable = 0
        with eval_mode(model):
            for batch in loader:
                self.unreadable += int(batch.get("skipped", 0))
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
        if not probs:
            raise SystemExit(f"train.py: no readable held-out question in --eval_data {self.cfg.eval_data!r}")
        return torch.cat(probs), torch.cat(targets), qtypes, questions, torch.cat(images)

    def evaluate(self, model, step):
        probs, targets, qtypes, _, _ = self.predict(model, self.cfg.eval_size)
        scores = meter.vqa_metric(probs, targets)  # (N,)
        out = {"vqa_score": float(scores.sum()) / (len(scores) + self.unreadable)}  # an unreadable question scores 0
        if self.unreadable:
            out["vqa_unreadable"] = self.unreadable
        for qt in sorted(set(qtypes) - {""}):
            out[f"vqa_score_{qt}"] = float(scores[torch.tensor([q == qt for q in qtypes])].mean())
        return out

    def visualise(self, model, run_dir):
        """predictions.png: held-out images with the whole question (draw.captioned_grid wraps it at spaces to
        the tile's width), the predicted answer (its probability and soft score; green when it scores) and
        the annotators' best answer."""
        probs, targets, _, questions, images = self.predict(model, 12)
        if not self.dist.main:
            return None
        n = min(12, len(images))
        captions = []
        for i in range(n):
            p, k = probs[i].max(-1)
            true = int(targets[i].argmax())
            score = float(targets[i, k])
            captions.append([(questions[i], draw.BLACK),
                             (f"pred: {self.answers[int(k)]} {float(p):.0%} (score {score:.1f})",
                              draw.GREEN if score > 0 else draw.RED),
                             (f"true: {self.answers[true]}" if targets[i].max() > 0 else "true: (not in the vocabulary)",
                              draw.GREY)])
        return draw.captioned_grid(images[:n], captions, os.path.join(run_dir, "predictions.png"), tile=160)

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

