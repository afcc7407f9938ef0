"""Image, box and clip transforms in pure torch / PIL / numpy (no torchvision).

The semantics follow torchvision's, so numbers line up with the published recipes:
  * `random_resized_crop_params` is the sampling rule of torchvision's RandomResizedCrop
    (pytorch/vision, torchvision/transforms/transforms.py, `RandomResizedCrop.get_params`):
    up to 10 tries at a random area fraction in `scale` and log-uniform aspect in `ratio`,
    then a centre crop with the aspect clamped into `ratio`.
  * `resize(img, int)` resizes the *shorter* side, as torchvision's Resize does, and truncates the
    longer one as it does (int(size · long / short)).
  * Boxes are xyxy in continuous pixel coordinates (pixel column j spans [j, j+1)), so a horizontal
    flip maps x -> W - x (x1' = W - x2, x2' = W - x1) and a resize maps x -> x * W'/W, as in
    torchvision.transforms.v2.functional (horizontal_flip_bounding_boxes / resize_bounding_boxes).
    PIL resamples with the same centre-aligned convention, so the box stays on the same pixels.

CLIP's normalisation constants are used everywhere (the text side of Florence is CLIP-like).
Randomness comes from torch's RNG (an optional `torch.Generator`); DataLoader workers seed it per
worker, so random crops differ across workers and are reproducible for a given loader seed.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR


# ----------------------------------------------------------------------------- tensors

def _uint8_hwc(img) -> np.ndarray:
    a = np.array(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)  # a writable copy
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def to_tensor(img) -> torch.Tensor:
    """PIL image or uint8 array (H, W, 3) -> float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(_uint8_hwc(img)).permute(2, 0, 1).float().div_(255.0)


_M255 = np.array(CLIP_MEAN, np.float32).reshape(3, 1, 1) * 255
_INV255 = 1.0 / (np.array(CLIP_STD, np.float32).reshape(3, 1, 1) * 255)


def to_normalized_tensor(img) -> torch.Tensor:
    """PIL image or uint8 (H, W, 3) -> CLIP-normalised float (3, H, W), computed as (q − 255·mean) / (255·std)
    in float32 — the one formula every dataset here uses, so a PNG of a synthetic sample reads back bit-exact."""
    x = np.ascontiguousarray(_uint8_hwc(img).transpose(2, 0, 1)).astype(np.float32)
    x -= _M255
    x *= _INV255
    return torch.from_numpy(x)


def normalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """x: (3, ...) in [0, 1] -> (x - mean) / std per channel (works for images (3,H,W) and clips (3,T,H,W))."""
    shape = (3,) + (1,) * (x.dim() - 1)
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Inverse of `normalize` (for looking at samples)."""
    shape = (3,) + (1,) * (x.dim() - 1)
    return x * torch.tensor(std, dtype=x.dtype).view(shape) + torch.tensor(mean, dtype=x.dtype).view(shape)


# ----------------------------------------------------------------------------- PIL geometry

def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(img: Image.Image, size, interpolation=BICUBIC) -> Image.Image:
    """size: int -> shorter side becomes `size`, longer side int(size · long / short) (aspect kept,
    truncated as torchvision's `_compute_resized_output_size`, pytorch/vision
    torchvision/transforms/functional.py: a 640×427 image to 224 becomes 335×224, not 336×224);
    (h, w) -> exactly that. At least 1 pixel per side."""
    w, h = img.size
    if isinstance(size, int):
        if w <= h:
            new_w, new_h = size, max(1, int(size * h / w))
        else:
            new_w, new_h = max(1, int(size * w / h)), size
    else:
        new_h, new_w = _hw(size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interpolation)


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return img.crop((left, top, left + width, top + height))


def center_crop(img: Image.Image, size) -> Image.Image:
    th, tw = _hw(size)
    w, h = img.size
    return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _uniform(a: float, b: float, gen) -> float:
    return a + (b - a) * torch.rand(1, generator=gen).item()


def random_resized_crop_params(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect in `ratio`."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_r[0], log_r[1], generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # fallback: whole image, aspect clamped into `ratio`, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------- transform objects

class Compose:
    def __init__(self, fns: Sequence[Callable]):
        self.fns = list(fns)

    def __call__(self, x):
        for f in self.fns:
            x = f(x)
        return x


class Resize:
    def __init__(self, size, interpolation=BICUBIC):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        return resize(img, self.size, self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        return center_crop(img, self.size)


class RandomResizedCrop:
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=BICUBIC, generator=None):
        self.size, self.scale, self.ratio = _hw(size), scale, ratio
        self.interpolation, self.generator = interpolation, generator

    def __call__(self, img):
        top, left, h, w = random_resized_crop_params(*img.size, self.scale, self.ratio, self.generator)
        return resize(crop(img, top, left, h, w), self.size, self.interpolation)


class RandomHorizontalFlip:
    def __init__(self, p=0.5, generator=None):
        self.p, self.generator = p, generator

    def __call__(self, img):
        return hflip(img) if torch.rand(1, generator=self.generator).item() < self.p else img


class ToTensor:
    def __call__(self, img):
        return to_tensor(img)


class ToNormalizedTensor:
    """ToTensor + Normalize(CLIP) in one step (`to_normalized_tensor`)."""

    def __call__(self, img):
        return to_normalized_tensor(img)


class Normalize:
    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD):
        self.mean, self.std = mean, std

    def __call__(self, x):
        return normalize(x, self.mean, self.std)


def image_transform(img_size: int, train: bool, scale=(0.9, 1.0), flip: bool = False) -> Compose:
    """PIL image -> normalised (3, img_size, img_size).

    train: random resized crop with open_clip's default scale (0.9, 1.0) (mlfoundations/open_clip,
    src/open_clip/transform.py); no flip by default because captions say "left of".
    eval: resize the shorter side, centre crop (CLIP's preprocessing).
    """
    if train:
        fns = [RandomResizedCrop(img_size, scale=scale)] + ([RandomHorizontalFlip()] if flip else [])
    else:
        fns = [Resize(img_size), CenterCrop(img_size)]
    return Compose(fns + [ToNormalizedTensor()])


# ----------------------------------------------------------------------------- boxes (detection)

def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """boxes: (N, 4) xyxy pixels -> the same boxes in the horizontally flipped image."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def resize_boxes(boxes: torch.Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """old_size/new_size are (width, height); boxes scale with the image."""
    sx, sy = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)


class DetectionTransform:
    """(PIL image, boxes (N,4) xyxy) -> (normalised (3, S, S), boxes in the new pixels).

    Resize so the longer side is `img_size` (aspect kept), pad right/bottom with zeros to a square
    (padding does not move boxes), and in training flip horizontally with probability `flip_p`.
    `info` (returned third) tells what was done: scale and flip, for mapping predictions back.
    """

    def __init__(self, img_size: int, train: bool, flip_p: float = 0.5, generator=None):
        self.img_size, self.train, self.flip_p, self.generator = img_size, train, flip_p, generator

    def __call__(self, img: Image.Image, boxes: torch.Tensor):
        w, h = img.size
        s = self.img_size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        img = img.resize((nw, nh), BILINEAR) if (nw, nh) != (w, h) else img
        boxes = resize_boxes(boxes.float(), (w, h), (nw, nh))
        flipped = self.train and torch.rand(1, generator=self.generator).item() < self.flip_p
        if flipped:
            img, boxes = hflip(img), hflip_boxes(boxes, nw)
        canvas = torch.zeros(3, self.img_size, self.img_size)  # padding = 0 = the mean colour after normalising
        canvas[:, :nh, :nw] = to_normalized_tensor(img)
        return canvas, boxes, {"scale": (nw / w, nh / h), "flipped": flipped, "size": (nh, nw)}


# ----------------------------------------------------------------------------- clips (video)

class VideoTransform:
    """list of T PIL frames (or uint8 array (T,H,W,3)) -> normalised clip (3, T, S, S).

    Train: ONE random resized crop and ONE flip decision drawn per clip and applied to every frame,
    so motion between frames is not distorted. Eval: shorter side to S, centre crop.
    Flipping is off by default: it would swap "moves left" and "moves right" (turn it on for
    Kinetics-like label sets that are mirror-symmetric).
    """

    def __init__(self, img_size: int, train: bool, scale=(0.5, 1.0), flip: bool = False, generator=None):
        self.img_size, self.train, self.scale, self.flip, self.generator = img_size, train, scale, flip, generator

    def __call__(self, frames) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            frames = [Image.fromarray(f) for f in frames]
        frames = [f.convert("RGB") for f in frames]
        if self.train:
            top, left, h, w = random_resized_crop_params(*frames[0].size, self.scale, (3 / 4, 4 / 3), self.generator)
            do_flip = self.flip and torch.rand(1, generator=self.generator).item() < 0.5
            out = []
            for f in frames:
                f = resize(crop(f, top, left, h, w), (self.img_size, self.img_size))
                out.append(hflip(f) if do_flip else f)
        else:
            out = [center_crop(resize(f, self.img_size), self.img_size) for f in frames]
        return torch.stack([to_normalized_tensor(f) for f in out], dim=1)  # (3, T, S, S)
