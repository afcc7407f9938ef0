"""Pictures for people, drawn with pillow only: training curves, confusion matrices and the tasks'
prediction panels. Each function takes plain tensors and strings (no model) and writes a PNG atomically
(a temporary file, then os.replace), so a picture is never seen half written."""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from data.transforms import denormalize

GREEN, RED, GREY, BLACK = (0, 140, 0), (200, 0, 0), (90, 90, 90), (0, 0, 0)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 has a scalable default font
    except TypeError:
        return ImageFont.load_default()


def to_pil(image: torch.Tensor, size: int) -> Image.Image:
    """A normalised (3, H, W) image tensor → a size × size picture (nearest: the toy images' pixels stay crisp)."""
    pixels = (denormalize(image).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((size, size), Image.NEAREST)


def save(canvas: Image.Image, path: str) -> str:
    tmp = f"{path}.tmp.{os.getpid()}"
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def curves(metrics_path: str, out_path: str, title: str = "") -> str:
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
    draw, f = ImageDraw.Draw(img), font(12)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    max_step = max([s for s, _ in loss] + [s for pts in evals.values() for s, _ in pts] + [1])

    def panel(x0, series, ylo, yhi, label):
        x1, y0, y1 = x0 + W // 2 - pad - 16, pad // 2 + 16, H - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 6), label, fill="black", font=f)
        for frac in (0, 0.5, 1):
            yv = ylo + frac * (yhi - ylo)
            yy = y1 - frac * (y1 - y0)
            draw.line([x0 - 4, yy, x0, yy], fill="black")
            draw.text((x0 - 44, yy - 7), f"{yv:.3g}", fill="black", font=f)
        for frac in (0, 0.5, 1):
            xx = x0 + frac * (x1 - x0)
            draw.text((xx - 10, y1 + 6), f"{int(frac * max_step)}", fill="black", font=f)
        draw.text(((x0 + x1) // 2 - 12, y1 + 24), "step", fill="black", font=f)
        for i, (name, pts) in enumerate(series.items()):
            colour = palette[i % len(palette)]
            xy = [(x0 + s / max_step * (x1 - x0), y1 - (v - ylo) / max(1e-12, yhi - ylo) * (y1 - y0)) for s, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for p in xy[-1:] if len(xy) > 1 else xy:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
            if len(series) > 1:
                draw.text((x0 + 8, y0 + 6 + 14 * i), f"{name} {pts[-1][1]:.3f}", fill=colour, font=f)

    if loss:
        vals = [v for _, v in loss]
        panel(pad, {"loss": loss}, min(0.0, min(vals)), max(vals), f"training loss {title}  (last {vals[-1]:.3f})")
    if evals:
        panel(W // 2 + pad, evals, 0.0, 1.0, "held-out evaluation (fractions)")
    return save(img, out_path)


def confusion(cm: torch.Tensor, names: list[str], path: str, title: str = "") -> str:
    """confusion.png: each row (true class) shaded by the share of its images given each predicted class
    (white 0 → blue 1), counts written in the cells when they fit."""
    K = len(names)
    cell = max(2, min(28, 720 // max(1, K)))
    f = font(11)
    labelled = cell >= 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(n, font=f) for n in names)) + 10 if labelled else 0
    top = 24 + label_w
    canvas = Image.new("RGB", (label_w + K * cell + 12, top + K * cell + 30), "white")
    draw = ImageDraw.Draw(canvas)
    total, right = int(cm.sum()), int(cm.diag().sum())
    draw.text((4, 4), f"{title}  top-1 {right / max(1, total):.1%} of {total}  (rows: true, columns: predicted)",
              fill="black", font=f)
    share = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    for i in range(K):
        for j in range(K):
            v = float(share[i, j])
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(225, 225, 225),
                           fill=(int(255 - 255 * v), int(255 - 185 * v), int(255 - 95 * v)))
            if labelled and cell >= 18 and int(cm[i, j]):
                draw.text((x0 + 2, y0 + cell // 2 - 6), str(int(cm[i, j])), font=f,
                          fill="white" if v > 0.5 else (60, 60, 60))
    if labelled:
        for k, name in enumerate(names):
            draw.text((4, top + k * cell + cell // 2 - 6), name, fill="black", font=f)  # rows
            txt = Image.new("RGB", (label_w, cell), "white")  # columns: the name, rotated upright
            ImageDraw.Draw(txt).text((2, cell // 2 - 6), name, fill="black", font=f)
            canvas.paste(txt.rotate(90, expand=True), (label_w + k * cell, 22))
    return save(canvas, path)


def captioned_grid(images: torch.Tensor, captions: list[list[tuple[str, tuple]]], path: str, tile: int = 128,
                   cols: int = 4, line_h: int = 14, font_size: int = 11) -> str:
    """Images in a grid, each with lines of (text, colour) under it: the zero-shot and VQA panels."""
    n = len(images)
    text_h = line_h * max((len(c) for c in captions), default=0) + 6
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw, f = ImageDraw.Draw(canvas), font(font_size)
    for i in range(n):
        x0, y0 = (i % cols) * tile, (i // cols) * (tile + text_h)
        canvas.paste(to_pil(images[i], tile - 8), (x0 + 4, y0 + 4))
        for r, (line, colour) in enumerate(captions[i]):
            draw.text((x0 + 4, y0 + tile + r * line_h), line, fill=colour, font=f)
    return save(canvas, path)


def captioned_rows(images: torch.Tensor, captions: list[list[tuple[str, tuple]]], path: str, tile: int = 96,
                   width: int = 560, line_h: int = 18) -> str:
    """One image per row with lines of (text, colour) beside it: the ITM / MLM panel."""
    n = len(images)
    canvas = Image.new("RGB", (width, n * (tile + 4) + 4), "white")
    draw, f = ImageDraw.Draw(canvas), font(12)
    for i in range(n):
        y0 = i * (tile + 4) + 4
        canvas.paste(to_pil(images[i], tile), (4, y0))
        for r, (line, colour) in enumerate(captions[i]):
            draw.text((tile + 12, y0 + 4 + r * line_h), line[:80], fill=colour, font=f)
    return save(canvas, path)


def detections(images: torch.Tensor, truth: list[torch.Tensor], preds: list[dict], names: list[str], path: str,
               min_score: float = 0.3, tile: int = 256, cols: int = 4) -> str:
    """Images with ground-truth boxes in grey and detections (score ≥ min_score) in a colour per class,
    named with their score. truth[i]: (M, 4) xyxy pixels; preds[i]: {"boxes", "scores", "labels"}."""
    n = len(images)
    scale = tile / images.shape[-1]
    canvas = Image.new("RGB", (cols * tile, math.ceil(n / cols) * tile), "white")
    draw, f = ImageDraw.Draw(canvas), font(11)

    def box(x0, y0, b, **kw):
        draw.rectangle([x0 + b[0] * scale, y0 + b[1] * scale, x0 + b[2] * scale, y0 + b[3] * scale], **kw)

    for i in range(n):
        x0, y0 = (i % cols) * tile, (i // cols) * tile
        canvas.paste(to_pil(images[i], tile), (x0, y0))
        for b in truth[i].tolist():
            box(x0, y0, b, outline=(160, 160, 160))
        p = preds[i]
        for b, s, k in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            if s < min_score:
                continue
            colour = PALETTE[k % len(PALETTE)]
            box(x0, y0, b, outline=colour, width=2)
            draw.text((x0 + b[0] * scale + 2, y0 + b[1] * scale + 1), f"{names[k]} {s:.2f}", fill=colour, font=f)
    return save(canvas, path)


def clips(videos: torch.Tensor, titles: list[tuple[str, tuple]], path: str, tile: int = 64, label_h: int = 18) -> str:
    """Clips (N, 3, T, H, W), one per row, frames side by side, each row under a (text, colour) title."""
    n, T = len(videos), videos.shape[2]
    canvas = Image.new("RGB", (T * tile + 8, n * (tile + label_h) + 4), "white")
    draw, f = ImageDraw.Draw(canvas), font(12)
    for i in range(n):
        y0 = i * (tile + label_h) + 2
        draw.text((4, y0), titles[i][0], fill=titles[i][1], font=f)
        for t in range(T):
            canvas.paste(to_pil(videos[i][:, t], tile - 2), (4 + t * tile, y0 + label_h))
    return save(canvas, path)
