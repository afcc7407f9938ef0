"""Use what you trained: load any train.py checkpoint or exported model and run it on your own inputs.

    import florence
    m = florence.load("runs/pretrain-toy/model.pt")          # a checkpoint (ckpt.pt) or an export (model.pt)
    m.zero_shot(["cat.jpg", "dog.png"], ["circle", "square", "triangle"])   # [[("circle", 0.91), …], …]
    m.embed_images(images), m.embed_texts(["a red circle"])   # L2-normalised (N, D): u and v of the paper

    det = florence.load("runs/detect-toy/model.pt")
    det.detect(["street.jpg"], ["circle", "star"])            # any names, in words (the text-aligned head)
    florence.load("runs/vqa-toy/model.pt").answer(["img.png"], ["what colour is the circle?"])
    florence.load("runs/video-toy/model.pt").classify(clips)

`load` reads the file with `torch.load(weights_only=True)`, rebuilds the task's model from the stored
`model_args` (tasks/<task>.py `rebuild`), loads the weights strictly, puts it in eval mode on `device`, and
brings the run's tokenizer and image size. Images may be paths, PIL images or tensors: a path or PIL image
goes through the evaluation transform the run used (data/transforms.py); a tensor (3, H, W) or (B, 3, H, W)
is taken as already normalised, as data/ yields it. Every call runs under torch.no_grad.

This file sits above tasks/ (like train.py): it only reads what the tasks write.
"""
from __future__ import annotations

import json
import os

import torch
from PIL import Image

import unicl
from data.transforms import DetectionTransform, VideoTransform, image_transform
from tasks import TASKS
from tasks.base import load_checkpoint, source_task, tokenizer_from_state


def load(path: str, device: str | torch.device = "cpu"):
    """A checkpoint or export of any task → the matching predictor below, ready (eval mode, on `device`)."""
    try:
        ckpt = load_checkpoint(path)
    except SystemExit as e:  # the loader speaks to train.py's users; here the caller is Python code
        raise ValueError(str(e).removeprefix("train.py: ")) from None
    task = source_task(ckpt)
    if task not in PREDICTORS:
        raise ValueError(f"{path} was written by --task {task!r}; florence.load reads {', '.join(PREDICTORS)}")
    if not ckpt.get("model_args"):
        raise ValueError(f"{path} holds no model_args (written by an older train.py); export it again with "
                         f"python train.py --task {task} --eval_only --init_from {path} --export model.pt")
    model = TASKS[task].rebuild(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return PREDICTORS[task](model.eval().to(device), ckpt, torch.device(device))


class Predictor:
    """The model of one run, its config (the run's Config fields, a dict) and task state (tokenizer, names)."""

    def __init__(self, model, ckpt: dict, device: torch.device):
        self.model, self.device = model, device
        self.config = json.loads(ckpt.get("config", "{}"))
        self.state = ckpt.get("task", {})
        self.model_args = ckpt["model_args"]
        self.tokenizer = tokenizer_from_state(self.state)
        self.img_size = int(self.config.get("img_size") or 64)

    def images(self, images) -> torch.Tensor:
        """Paths, PIL images or tensors → one normalised batch (B, 3, S, S) on the device."""
        if isinstance(images, torch.Tensor):
            return (images[None] if images.dim() == 3 else images).to(self.device)
        tf = image_transform(self.img_size, train=False)
        return torch.stack([x if isinstance(x, torch.Tensor) else tf(_open(x)) for x in _as_list(images)]).to(self.device)

    def tokens(self, texts: list[str], context_length: int) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length).to(self.device)


class Pretrained(Predictor):
    """--task pretrain: the two towers (paper §2.2)."""

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """u = f_θ(x) / ‖f_θ(x)‖ → (N, D) on the CPU."""
        return self.model.encode_image(self.images(images)).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """v = f_φ(t) / ‖f_φ(t)‖ → (N, D) on the CPU."""
        return self.model.encode_text(self.tokens(texts, self.model.text_encoder.cfg.context_length)).float().cpu()

    @torch.no_grad()
    def zero_shot(self, images, class_names: list[str], templates: list[str] | None = None, top_k: int = 5):
        """Each image's top_k (class name, probability): the classifier is the mean text embedding of each
        name in the prompt templates (unicl.TEMPLATES unless given, each with one "{}")."""
        if not class_names:
            raise ValueError("zero_shot needs at least one class name")
        W = unicl.zero_shot_classifier(self.model, self.tokenizer, list(class_names), templates=templates or unicl.TEMPLATES,
                                       context_length=self.model.text_encoder.cfg.context_length)  # (D, K)
        probs = (float(self.model.scale()) * self.model.encode_image(self.images(images)) @ W.to(self.device)).softmax(-1)
        return _top(probs.float().cpu(), list(class_names), top_k)


class Detector(Predictor):
    """--task detect: boxes for names in words (a text-aligned head) or the trained classes (a fixed one)."""

    @torch.no_grad()
    def detect(self, images, names: list[str] | None = None, threshold: float = 0.3):
        """Per image a list of {"box": (x0, y0, x1, y1) in the image's own pixels, "score", "name"}, best first.
        `names` default to the classes the run trained on."""
        from tasks.detect import DetectTask

        trained = list(self.state.get("classes") or [])
        names = list(names) if names else trained
        text = self.model.text is not None
        if not text and names != trained:
            raise ValueError("this detector has a fixed classifier (--det_classifier fixed): it detects only "
                             f"its trained classes {trained}")
        tf = DetectionTransform(self.img_size, train=False)
        out = []
        for img in _as_list(images):
            if isinstance(img, torch.Tensor):
                x, scale = img[None] if img.dim() == 3 else img, (1.0, 1.0)
            else:
                canvas, _, info = tf(_open(img), torch.zeros(0, 4))
                x, scale = canvas[None], info["scale"]
            tokens = self.tokens([DetectTask.PROMPT.format(n) for n in names],
                                 self.model_args["context_length"]) if text else None
            raw = self.model(x.to(self.device), tokens)
            for p in self.model.postprocess(raw, x.shape[-2:]):
                keep = p["scores"] >= threshold
                boxes = p["boxes"][keep].float().cpu() / torch.tensor([scale[0], scale[1], scale[0], scale[1]])
                out.append([{"box": tuple(round(float(v), 1) for v in b), "score": float(s), "name": names[int(k)]}
                            for b, s, k in zip(boxes, p["scores"][keep].cpu(), p["labels"][keep].cpu())])
        return out


class VQA(Predictor):
    """--task vqa: answers from the run's answer vocabulary (paper §2.5, METER)."""

    @torch.no_grad()
    def answer(self, images, questions: list[str], top_k: int = 3):
        """One question per image → its top_k (answer, probability) (sigmoid scores, as trained)."""
        x, questions = self.images(images), list(questions)
        if len(x) != len(questions):
            raise ValueError(f"answer takes one question per image; got {len(x)} images and {len(questions)} questions")
        tokens = self.tokenizer(questions, self.model.text_encoder.cfg.context_length, trim=True).to(self.device)
        probs = self.model(x, tokens)["vqa"].float().sigmoid().cpu()
        return _top(probs, list(self.state["answers"]), top_k)


class VideoClassifier(Predictor):
    """--task video: action classes for clips (paper §2.6, Video CoSwin)."""

    @torch.no_grad()
    def classify(self, clips, top_k: int = 3):
        """clips: a list of clips, each a list of frames (paths or PIL images) or a uint8 array (T, H, W, 3), or
        a normalised tensor (B, 3, T, S, S) → per clip its top_k (class name, probability)."""
        if isinstance(clips, torch.Tensor):
            x = clips
        else:
            tf = VideoTransform(self.img_size, train=False)
            x = torch.stack([tf(c if not isinstance(c, list) else [_open(f) for f in c]) for c in clips])
        return _top(self.model(x.to(self.device)).float().softmax(-1).cpu(), list(self.state["classes"]), top_k)


class ImageClassifier(Predictor):
    """--task classify: the fine-tuned image tower and its class head (paper §3)."""

    @torch.no_grad()
    def classify(self, images, top_k: int = 5):
        return _top(self.model(self.images(images)).float().softmax(-1).cpu(), list(self.state["classes"]), top_k)


PREDICTORS = {"pretrain": Pretrained, "detect": Detector, "vqa": VQA, "video": VideoClassifier,
              "classify": ImageClassifier}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _open(x) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (str, os.PathLike)):
        try:
            with Image.open(x) as im:
                return im.convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read the image {x} ({e})") from None
    raise ValueError(f"expected an image path, a PIL image or a tensor, got {type(x).__name__}")


def _top(probs: torch.Tensor, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    p, i = probs.topk(min(k, len(names)), dim=-1)
    return [[(names[int(j)], float(q)) for q, j in zip(pr, ir)] for pr, ir in zip(p, i)]
