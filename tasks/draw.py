"""Pictures for people, drawn with pillow only: training curves, confusion matrices and the tasks'
prediction panels. Each function takes plain tensors and strings (no model) and writes a PNG atomically
(a temporary file, then os.replace), so a picture is never seen half written."""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
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


def text_width(text: str, f) -> int:
    """The pixels a line of text spans from its origin to its rightmost ink (font.getbbox; getsize on a
    Pillow without it), so a line that measures ≤ w drawn at x never reaches past x + w."""
    if not text:
        return 0
    if hasattr(f, "getbbox"):
        return int(math.ceil(f.getbbox(text)[2]))
    return int(f.getsize(text)[0])


def wrap(text: str, f, width_px: int) -> list[str]:
    """Lines of text, each at most width_px wide in font f, broken greedily at spaces: a line takes words
    while the next one still fits. Only a word wider than a whole line is split (at the last character that
    fits), since nothing else could show it. An empty text is one empty line, so a caption keeps its place."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if text_width(trial, f) <= width_px:
            line = trial
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and text_width(word, f) > width_px:
            cut = max([k for k in range(1, len(word)) if text_width(word[:k], f) <= width_px], default=1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


def axis_range(values: list[float], margin: float = 0.05, floor: float | None = 0.0) -> tuple[float, float]:
    """The y range that fits the data: [min, max] widened by `margin` of the span on each side, so the curve
    fills the panel instead of hugging its top as a range from 0 would. A flat series (one value, or all
    equal) gets ±5% of its value (at least ±0.01) so it still has a visible axis. When every value is ≥
    `floor` (a loss is never negative) the lower end is not pushed below it. Non-finite values are ignored."""
    vals = [float(v) for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        half = max(0.05 * abs(hi), 0.01)
        lo, hi = lo - half, hi + half
    else:
        lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
    if floor is not None and min(vals) >= floor:
        lo = max(lo, floor)
    return lo, hi


def nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], list[str]]:
    """Tick values inside [lo, hi] at a round step (1, 2, 2.5 or 5 × 10^k, the one giving closest to
    `target` ticks) and their labels with the decimals the step needs, so neighbours always read apart: a
    loss between 2.3451 and 2.3459 reads 2.3452, 2.3454, … rather than 2.35 four times."""
    raw = (hi - lo) / max(1, target - 1)
    if not raw > 0:
        return [lo], [f"{lo:.3g}"]
    exp = math.floor(math.log10(raw))

    def count(step):
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    steps = [m * 10 ** e for e in (exp - 1, exp, exp + 1) for m in (1, 2, 2.5, 5)]
    step = min(steps, key=lambda s: (abs(count(s) - target), -s))  # ties: the coarser step
    decimals = 0
    while decimals < 12 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6 * step * 10 ** decimals:
        decimals += 1
    ticks = [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    return ticks, [f"{t:.{decimals}f}" for t in ticks]


def curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """curves.png: training loss (left) and every evaluation fraction (right) against step. The loss axis
    spans the loss actually seen (axis_range: min to max plus a margin), so a loss going from 2.31 to 2.28
    is a visible descent, not a flat line at the top of a 0-to-2.3 panel; ticks sit at round values
    (nice_ticks). The right panel stays 0 to 1 and holds only the series whose values are fractions."""
    rows = []
    with open(metrics_path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    loss = [(r["step"], float(r["loss"])) for r in rows
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]) and "step" in r]
    evals = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and (k.endswith(("top1", "top5", "_r1", "_r5", "_r10"))
                                                                or k.startswith(("det_", "vqa_", "video_"))):
                evals.setdefault(k, []).append((r["step"], v))
    evals = {k: pts for k, pts in evals.items() if all(0.0 <= v <= 1.0 for _, v in pts)}  # counts are not fractions
    W, H, pad = 960, 400, 56
    img = Image.new("RGB", (W, H), "white")
    draw, f = ImageDraw.Draw(img), font(12)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    max_step = max([s for s, _ in loss] + [s for pts in evals.values() for s, _ in pts] + [1])

    def panel(x0, series, ylo, yhi, label):
        x1, y0, y1 = x0 + W // 2 - pad - 16, pad // 2 + 16, H - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 6), label, fill="black", font=f)
        for yv, text in zip(*nice_ticks(ylo, yhi)):
            yy = y1 - (yv - ylo) / max(1e-12, yhi - ylo) * (y1 - y0)
            draw.line([x0 - 4, yy, x0, yy], fill="black")
            draw.text((max(0, x0 - 6 - text_width(text, f)), yy - 7), text, fill="black", font=f)
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
        panel(pad, {"loss": loss}, *axis_range(vals), f"training loss {title}  (last {vals[-1]:.4g})")
    if evals:
        panel(W // 2 + pad, evals, 0.0, 1.0, "held-out evaluation (fractions)")
    return save(img, out_path)


def most_confused(cm: torch.Tensor, top: int = 20) -> list[tuple[int, int, int, float]]:
    """The `top` largest off-diagonal cells of a confusion matrix (rows true, columns predicted) as
    (true, predicted, count, share of the true class's images), most images first; ties go to the larger
    share, then the lower (true, predicted) index, so the list is the same on every run."""
    cm = cm.long()
    rows = cm.sum(1).clamp_min(1)
    off = cm.clone()
    off.fill_diagonal_(0)
    ij = off.nonzero()  # (P, 2)
    cells = [(i, j, c, c / n) for (i, j), c, n in zip(ij.tolist(), off[ij[:, 0], ij[:, 1]].tolist(),
                                                      rows[ij[:, 0]].tolist())]
    cells.sort(key=lambda cell: (-cell[2], -cell[3], cell[0], cell[1]))
    return cells[:top]


def fit(text: str, f, width_px: int) -> str:
    """text cut at the end (with "...", which every default font has) so that it is at most width_px wide."""
    if text_width(text, f) <= width_px:
        return text
    while text and text_width(text + "...", f) > width_px:
        text = text[:-1]
    return text + "..."


BAR = (70, 110, 180)


def confused_pairs(cm: torch.Tensor, names: list[str], path: str, title: str = "", top: int = 25) -> str:
    """confusion.png for many classes: a matrix of 2-pixel cells shows nothing a person can read, so this
    ranks the most-confused (true → predicted) pairs instead, one bar per pair (length ∝ its count) with
    the count and the share of the true class's images, under a title with the overall top-1 accuracy.
    The picture's size depends on `top`, never on the number of classes."""
    f = font(12)
    pairs = most_confused(cm, top)
    total, right = int(cm.sum()), int(cm.diag().sum())
    wrong = total - right
    row_h, name_w, bar_w, num_w = 20, 380, 220, 150
    width = 12 + name_w + bar_w + num_w
    top_y = 46
    canvas = Image.new("RGB", (width, top_y + row_h * max(1, len(pairs)) + 28), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), fit(f"{title}  top-1 {right / max(1, total):.1%} of {total} over {len(names)} classes",
                          f, width - 12), fill="black", font=f)
    draw.text((6, 22), fit(f"the {len(pairs)} most-confused pairs (true -> predicted): images, share of the true "
                           f"class", f, width - 12), fill=GREY, font=f)
    if not pairs:
        draw.text((6, top_y), "no image was given a wrong class", fill=GREEN, font=f)
    most = max([c for _, _, c, _ in pairs], default=1)
    for r, (i, j, count, share) in enumerate(pairs):
        y = top_y + r * row_h
        draw.text((6, y + 3), fit(f"{r + 1}. {names[i]} -> {names[j]}", f, name_w - 8), fill="black", font=f)
        x0 = 6 + name_w
        draw.rectangle([x0, y + 3, x0 + max(2, round(count / most * bar_w)) - 1, y + row_h - 4], fill=BAR)
        draw.text((x0 + bar_w + 8, y + 3), f"{count}  ({share:.0%})", fill="black", font=f)
    shown = sum(c for _, _, c, _ in pairs)
    draw.text((6, canvas.height - 22), f"{wrong} wrong in all; these {len(pairs)} pairs hold "
              f"{shown / max(1, wrong):.0%} of them", fill=GREY, font=f)
    return save(canvas, path)


def confusion(cm: torch.Tensor, names: list[str], path: str, title: str = "", max_classes: int = 50,
              top: int = 25) -> str:
    """confusion.png: each row (true class) shaded by the share of its images given each predicted class
    (white 0 → blue 1), counts written in the cells when they fit. Beyond max_classes the cells would be a
    few pixels wide, so the picture becomes the ranked list of the `top` most-confused pairs instead."""
    K = len(names)
    if K > max_classes:
        return confused_pairs(cm, names, path, title, top)
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
    """Images in a grid, each with lines of (text, colour) under it: the zero-shot and VQA panels. Every
    line is wrapped (wrap) to the image's width, so a long question is shown whole and never runs into the
    next tile; the text band is as tall as the most-wrapped caption's, the same under every tile."""
    n = len(images)
    f = font(font_size)
    wrapped = [[(piece, colour) for line, colour in c for piece in wrap(line, f, tile - 8)] for c in captions[:n]]
    text_h = line_h * max((len(c) for c in wrapped), default=0) + 6
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x0, y0 = (i % cols) * tile, (i // cols) * (tile + text_h)
        canvas.paste(to_pil(images[i], tile - 8), (x0 + 4, y0 + 4))
        for r, (line, colour) in enumerate(wrapped[i]):
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


def place_labels(boxes: list[tuple[float, float, float, float]], sizes: list[tuple[int, int]],
                 bounds: tuple[int, int, int, int], gap: int = 1) -> list[tuple[int, int, int, int] | None]:
    """Where each box's label goes, in order, so that no two labels overlap: rectangles (x0, y0, x1, y1),
    half-open, inside bounds, or None when no free place is left. A label first tries the place a reader
    looks for it, touching its own box: just inside the top edge at the left or the right corner, then
    rows stacked downward inside the box, then just above the top edge, just below the bottom edge, and
    beside the box; then rows stacked upward above it and downward below it. Each place is pulled inside
    bounds. Only when all of those are taken does it go to the nearest free row anywhere in bounds (the
    caller draws a leader line back to the box). Earlier labels keep their places, so the caller passes
    the most confident detection first."""
    X0, Y0, X1, Y1 = bounds
    placed = np.zeros((0, 4), dtype=np.int64)  # (P, 4) the labels so far
    out = []

    def first_free(cands: list[tuple[float, float]], w: int, h: int):
        """The first of the candidate corners, pulled inside bounds, whose rectangle meets no placed label."""
        xy = np.array(cands, dtype=np.float64).reshape(-1, 2)
        x = np.clip(np.round(xy[:, 0]), X0, X1 - w).astype(np.int64)
        y = np.clip(np.round(xy[:, 1]), Y0, Y1 - h).astype(np.int64)
        r = np.stack([x, y, x + w, y + h], 1)  # (C, 4)
        q = placed[None]  # (1, P, 4)
        hit = ((r[:, None, 0] < q[..., 2]) & (q[..., 0] < r[:, None, 2]) &
               (r[:, None, 1] < q[..., 3]) & (q[..., 1] < r[:, None, 3])).any(1)  # (C,)
        free = np.flatnonzero(~hit)
        return tuple(int(v) for v in r[free[0]]) if len(free) else None

    for (bx0, by0, bx1, by1), (w, h) in zip(boxes, sizes):
        w, h = min(int(w), X1 - X0), min(int(h), Y1 - Y0)
        step = h + gap
        xs = (bx0, bx1 - w)
        inside = [(x, by0 + k * step) for k in range(max(1, int((by1 - by0 - h) // step) + 1)) for x in xs]
        sides = [(x, y) for y in (by0, by1 - h) for x in (bx1 + gap, bx0 - w - gap)]
        touching = inside + [(x, by0 - step) for x in xs] + [(x, by1 + gap) for x in xs] + sides
        outward = [(x, y) for k in range(1, math.ceil((Y1 - Y0) / step) + 1) for x in xs
                   for y in (by0 - (k + 1) * step, by1 + gap + k * step)]
        spot = first_free(touching + outward, w, h)
        if spot is None:
            grid = [(x, y) for y in range(Y0, Y1 - h + 1, step) for x in range(X0, X1 - w + 1, 4)]
            grid.sort(key=lambda p: (abs(p[0] - bx0) + abs(p[1] - by0), p[1], p[0]))
            spot = first_free(grid, w, h)
        if spot is not None:
            placed = np.concatenate([placed, np.array([spot], dtype=np.int64)])
        out.append(spot)
    return out


def detections(images: torch.Tensor, truth: list[torch.Tensor], preds: list[dict], names: list[str], path: str,
               min_score: float = 0.3, tile: int = 256, cols: int = 4) -> str:
    """Images with ground-truth boxes in grey and detections (score ≥ min_score) in a colour per class,
    named with their score on a tag of the class's colour. Tags never cover one another (place_labels,
    most confident first), stay inside their tile and touch their own box unless the space around it is
    full; a label with no free place left in the tile is left out (its box is still drawn).
    truth[i]: (M, 4) xyxy pixels; preds[i]: {"boxes", "scores", "labels"}."""
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
        shown = sorted((-s, r, b, k) for r, (b, s, k) in enumerate(zip(p["boxes"].tolist(), p["scores"].tolist(),
                                                                       p["labels"].tolist())) if s >= min_score)
        for _, _, b, k in shown:
            box(x0, y0, b, outline=PALETTE[k % len(PALETTE)], width=2)
        texts = [f"{names[k]} {-s:.2f}" for s, _, _, k in shown]
        px = [tuple(x0 + v * scale if c % 2 == 0 else y0 + v * scale for c, v in enumerate(b)) for _, _, b, _ in shown]
        sizes = [(text_width(t, f) + 4, max(label_h(f), text_height(t, f) + 1)) for t in texts]
        spots = place_labels(px, sizes, (x0, y0, x0 + tile, y0 + tile))
        for (_, _, _, k), bp, spot in zip(shown, px, spots):  # leaders first, so no line crosses a tag
            if spot and (spot[2] < bp[0] - 1 or spot[0] > bp[2] + 1 or spot[3] < bp[1] - 1 or spot[1] > bp[3] + 1):
                draw.line([((spot[0] + spot[2]) / 2, (spot[1] + spot[3]) / 2), bp[:2]], fill=PALETTE[k % len(PALETTE)])
        for (_, _, _, k), t, spot in zip(shown, texts, spots):
            if spot is None:
                continue
            colour = PALETTE[k % len(PALETTE)]
            draw.rectangle([spot[0], spot[1], spot[2] - 1, spot[3] - 1], fill=colour)
            ink = BLACK if sum(w * c for w, c in zip((0.299, 0.587, 0.114), colour)) > 140 else (255, 255, 255)
            draw.text((spot[0] + 2, spot[1]), t, fill=ink, font=f)
    return save(canvas, path)


def text_height(text: str, f) -> int:
    """The pixels a line of text spans from its origin down to its lowest ink."""
    if hasattr(f, "getbbox"):
        return int(math.ceil(f.getbbox(text)[3])) if text else 0
    return int(f.getsize(text)[1])


def label_h(f) -> int:
    """The height of a one-line tag in font f: letters with ascenders and descenders, plus a pixel."""
    return text_height("Ag|y", f) + 1


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
