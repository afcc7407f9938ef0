"""Deterministic toy data for all four Florence tasks (stand-ins for FLD-900M / FLOD-9M, paper §2.1, §2.4–2.6).

Every dataset here is index-addressable and *pure*: sample i is a function of (seed, split, i) only, drawn
from its own numpy PCG64 stream `default_rng([seed, split_id, i])` — nothing is written to disk, any
length works, any worker can produce any index, and the same seed gives the same bytes on every run.

Held-out split. Each scene has a coarse *signature* (main class, position on an 8×8 grid, size bucket,
...). A stable CRC of the signature decides the split: one signature in `VAL_EVERY` belongs to "val",
the rest to "train", and each split rejection-samples until the signature is its own. So a val scene never
equals a train scene, not even after quantising position and size — the split is disjoint by
construction, not by luck.

Shapes are drawn with numpy from signed distance functions (anti-aliased: alpha = clip(½ − sdf, 0, 1)),
only inside the shape's bounding window, so a 64×64 sample costs well under a millisecond.

  ShapesText     image + caption (+ class label = colour × shape of the largest object) — UniCL pretraining
  ShapesDetection  several objects with exact xyxy boxes — Dynamic Head
  ShapesVQA      question + 10 noisy annotator answers + soft scores — METER
  MovingShapes   T-frame clips labelled by an action only visible across frames — Video CoSwin
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from meter import soft_target  # the paper's VQA soft scores live with the model (meter.py)

from .transforms import _INV255, _M255

COLOURS = ("red", "green", "blue", "yellow", "purple")
RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 225), (235, 210, 40), (150, 50, 190)], np.float32) / 255
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # class k = colour k // 4, shape k % 4
SPLITS = {"train": 0, "val": 1}
VAL_EVERY = 4  # one scene signature in 4 is held out

_MEAN, _INV_STD = _M255.reshape(3), _INV255.reshape(3)  # CLIP mean·255 and 1/(std·255), float32
_NUM = ("zero", "one", "two", "three", "four", "five", "six")


# ----------------------------------------------------------------------------- drawing

def _background_params(rng: np.random.Generator) -> dict:
    """A low-saturation background: grey level, tint, gradient, sometimes faint stripes, some noise."""
    p = dict(grey=rng.uniform(0.12, 0.88), tint=rng.uniform(-0.06, 0.06, 3).astype(np.float32),
             phi=rng.uniform(0, 2 * math.pi), ramp=rng.uniform(0, 0.2), stripes=None,
             sigma=rng.uniform(0.0, 0.04), noise_at=(rng.random(), rng.random()))
    if rng.random() < 0.25:
        p["stripes"] = (rng.uniform(2, 6), rng.uniform(0, 2 * math.pi))
    return p


def _background(p: dict, S: int) -> np.ndarray:
    """Render background parameters -> float32 image (3, S, S) in channel-first layout
    (broadcasting over a trailing axis of 3 would make numpy's inner loops 3 long and 5× slower)."""
    t = (np.arange(S, dtype=np.float32) + 0.5) / S - 0.5
    ramp = p["ramp"] * (math.cos(p["phi"]) * t[None, :] + math.sin(p["phi"]) * t[:, None])
    if p["stripes"] is not None:
        freq, psi = p["stripes"]
        ramp += 0.05 * np.sin(2 * math.pi * freq * (math.cos(psi) * t[None, :] + math.sin(psi) * t[:, None]))
    img = (p["grey"] + p["tint"])[:, None, None] + ramp[None]
    if p["sigma"] > 0.005:  # sensor-like noise: a random window of a fixed noise field (cheaper than fresh normals)
        oy, ox = int(p["noise_at"][0] * S), int(p["noise_at"][1] * S)
        img += p["sigma"] * _noise_field(S)[:, oy:oy + S, ox:ox + S]
    return img.astype(np.float32, copy=False)


_NOISE: dict[int, np.ndarray] = {}


def _noise_field(S: int) -> np.ndarray:
    """A (3, 2S, 2S) standard-normal field, the same in every process (fixed seed), cached per size."""
    if S not in _NOISE:
        _NOISE[S] = np.random.default_rng(12345).standard_normal((3, 2 * S, 2 * S), dtype=np.float32)
    return _NOISE[S]


def _alpha(shape: int, cx: float, cy: float, r: float, theta: float, S: int):
    """Coverage of one shape inside its bounding window -> (y0, x0, alpha (h, w)) or None if off-image.

    r is the shape's size: circle radius r, square half-side 0.85r, triangle circumradius 1.35r,
    cross arms of half-length r and half-width 0.33r (areas within a factor 1.4 of each other).
    """
    R = 1.35 * r + 1.5
    x0, x1 = max(0, int(cx - R)), min(S, int(math.ceil(cx + R)) + 1)
    y0, y1 = max(0, int(cy - R)), min(S, int(math.ceil(cy + R)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    X = (np.arange(x0, x1, dtype=np.float32) + (0.5 - cx))[None, :]
    Y = (np.arange(y0, y1, dtype=np.float32) + (0.5 - cy))[:, None]
    if shape == 0:  # circle
        sdf = np.sqrt(X * X + Y * Y) - r
    else:
        c, s = math.cos(theta), math.sin(theta)
        u, v = c * X + s * Y, -s * X + c * Y  # rotate the frame by -theta
        if shape == 1:  # square
            sdf = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
        elif shape == 2:  # equilateral triangle, apex up: max over the 3 edge half-planes, inradius = R/2
            sdf = np.maximum(np.maximum(v, -0.8660254 * u - 0.5 * v), 0.8660254 * u - 0.5 * v) - 0.675 * r
        else:  # cross: union of two bars
            au, av, w = np.abs(u), np.abs(v), 0.33 * r
            sdf = np.minimum(np.maximum(au - r, av - w), np.maximum(av - r, au - w))
    a = 0.5 - sdf
    np.clip(a, 0.0, 1.0, out=a)
    return y0, x0, a


def _paint(img: np.ndarray, shape: int, rgb: np.ndarray, cx, cy, r, theta=0.0, box: bool = False):
    """Alpha-composite one shape onto img (3, S, S) in place.

    With box=True, returns its tight box (x1, y1, x2, y2) around every pixel the shape touches (alpha > 0,
    anti-aliased edge included; pixel column j spans [j, j+1), so x2 = last column + 1), or None.
    """
    out = _alpha(shape, cx, cy, r, theta, img.shape[-1])
    if out is None:
        return None
    y0, x0, a = out
    h, w = a.shape
    win = img[:, y0:y0 + h, x0:x0 + w]
    win += a[None] * (rgb[:, None, None] - win)
    if not box:
        return None
    cols, rows = np.nonzero(a.max(0) > 0)[0], np.nonzero(a.max(1) > 0)[0]
    if len(cols) == 0:
        return None
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def _uint8(img: np.ndarray) -> np.ndarray:
    """float image in [0, 1] -> uint8, rounded (what saving it to a file would keep)."""
    x = img * 255.0
    x += 0.5
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """float image (3, ..., S, S) in [0,1] -> quantised to uint8 like a real file, then CLIP-normalised
    with the same float32 formula as transforms.to_normalized_tensor (so a saved PNG reads back bit-exact)."""
    shape = (3,) + (1,) * (img.ndim - 1)
    x = _uint8(img).astype(np.float32)
    x -= _MEAN.reshape(shape)
    x *= _INV_STD.reshape(shape)
    return torch.from_numpy(x)


def _hwc(img: np.ndarray) -> np.ndarray:
    """(3, ..., S, S) float -> (..., S, S, 3) uint8, as an image file would hold it."""
    return np.moveaxis(_uint8(img), 0, -1)


def _colour(rng, k: int) -> np.ndarray:
    return np.minimum(np.maximum(RGB[k] + rng.uniform(-0.06, 0.06, 3).astype(np.float32), 0.0), 1.0)


def _place(rng, S: int, r: float, others: list, tries: int = 12, gap: float = 1.0):
    """A centre for a shape of size r whose bounding circle keeps `gap` px from every (cx, cy, r) in others."""
    lo, hi = 1.35 * r + 1, S - 1.35 * r - 1
    if hi <= lo:
        return None
    for _ in range(tries):
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if all(math.hypot(cx - ox, cy - oy) > 1.35 * (r + orr) + gap for ox, oy, orr in others):
            return cx, cy
    return None


def _in_split(signature: tuple, split_id: int) -> bool:
    """Stable split assignment of a scene signature (CRC32, never Python's salted hash)."""
    held_out = zlib.crc32(repr(signature).encode()) % VAL_EVERY == 0
    return held_out == (split_id == 1)


def _where(cx, cy, S) -> str:
    col, row = min(int(3 * cx / S), 2), min(int(3 * cy / S), 2)
    return [["in the top left corner", "at the top", "in the top right corner"],
            ["on the left", "in the centre", "on the right"],
            ["in the bottom left corner", "at the bottom", "in the bottom right corner"]][row][col]


def _relation(a, b) -> str:
    """Where object a is relative to object b (image coordinates, y down)."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


class _Synthetic(Dataset):
    """Shared plumbing: length, split, per-index RNG, rejection sampling into the split."""

    def __init__(self, split: str, length: int | None, img_size: int, seed: int, default_length: dict):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        self.split, self.split_id = split, SPLITS[split]
        self.length = int(length if length is not None else default_length[split])
        self.img_size, self.seed = int(img_size), int(seed)
        self.skipped = 0  # synthetic samples are never bad; kept for the common reporting interface

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {self.length}")
        return np.random.default_rng([self.seed, self.split_id, index % self.length])

    def _sample_in_split(self, rng, draw):
        """draw(rng) -> (signature, params); redraw until the signature belongs to this split."""
        while True:
            sig, params = draw(rng)
            if _in_split(sig, self.split_id):
                return sig, params


# ----------------------------------------------------------------------------- image–text

class ShapesText(_Synthetic):
    """Images of 1–3 coloured shapes with captions, for UniCL pretraining and zero-shot evaluation.

    label = class of the *largest* shape (colour × shape, 20 classes, names in `.classes`); every other
    shape is at most 0.6× its size. Every caption names that class first, so identical captions always
    share a label (hash-key positives are true positives). A share `p_short` of texts is the bare class
    name ("red circle", `short=True`, for prompt augmentation); another `p_simple` are short templated
    captions that repeat across samples; the rest describe the scene (size, position, relations).
    """

    classes = list(CLASSES)

    def __init__(self, split: str = "train", length: int | None = None, img_size: int = 64, seed: int = 0,
                 p_short: float = 0.25, p_simple: float = 0.35):
        super().__init__(split, length, img_size, seed, {"train": 100_000, "val": 1_000})
        self.p_short, self.p_simple = p_short, p_simple

    def _draw_layout(self, rng):
        S = self.img_size
        cls = int(rng.integers(len(CLASSES)))
        r = rng.uniform(0.16, 0.28) * S
        lo, hi = 1.35 * r + 1, S - 1.35 * r - 1
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        u = rng.random()
        n = 1 if u < 0.4 else 2 if u < 0.75 else 3
        sig = ("text", cls, int(8 * cx / S), int(8 * cy / S), int(4 * (r / S - 0.16) / 0.12), n)
        return sig, (cls, r, cx, cy, n)

    def scene(self, index: int) -> dict:
        """The sample's parameters (objects, background, caption) without rendering."""
        rng = self._rng(index)
        S = self.img_size
        sig, (cls, r, cx, cy, n) = self._sample_in_split(rng, self._draw_layout)
        objs = [dict(cls=cls, colour=cls // 4, shape=cls % 4, cx=cx, cy=cy, r=r, theta=rng.uniform(-0.3, 0.3))]
        for _ in range(n - 1):
            rd = rng.uniform(0.25, 0.6) * r
            pos = _place(rng, S, rd, [(o["cx"], o["cy"], o["r"]) for o in objs])
            if pos is None:
                continue
            k = int(rng.integers(len(CLASSES)))
            objs.append(dict(cls=k, colour=k // 4, shape=k % 4, cx=pos[0], cy=pos[1], r=rd,
                             theta=rng.uniform(-0.5, 0.5)))
        for o in objs:
            o["rgb"] = _colour(rng, o["colour"])
        bg = _background_params(rng)
        text, short = self._caption(rng, objs, bg["grey"])
        return dict(objects=objs, background=bg, text=text, short=short, label=cls, signature=sig)

    def _caption(self, rng, objs, grey) -> tuple[str, bool]:
        S = self.img_size
        m = objs[0]
        name = CLASSES[m["cls"]]
        bg = "dark" if grey < 0.35 else "light" if grey > 0.65 else "grey"
        rel = m["r"] / S
        size = "small " if rel < 0.19 else ("large " if rng.random() < 0.5 else "big ") if rel > 0.24 else ""
        u = rng.random()
        if u < self.p_short:
            return name, True
        if u < self.p_short + self.p_simple:
            t = int(rng.integers(6))
            return [f"a {name}.", f"a photo of a {name}.", f"a picture of a {name}.",
                    f"a {name} on a {bg} background.", f"there is a {name} in the image.",
                    f"a {size}{name}." if size else f"a {name} shape."][t], False
        others = [CLASSES[o["cls"]] for o in objs[1:]]
        if not others:
            t = int(rng.integers(3))
            return [f"a {size}{name} {_where(m['cx'], m['cy'], S)}.",
                    f"a single {name} on a {bg} background.",
                    f"only one shape here: a {size}{name}."][t], False
        t = int(rng.integers(4))
        if t == 0:
            return f"a {size}{name} {_relation(m, objs[1])} a {others[0]}.", False
        if t == 1:
            return "a " + " and a ".join([name] + others) + f" on a {bg} background.", False
        if t == 2:
            return f"{_NUM[len(objs)]} shapes: a big {name} and " + " and ".join(f"a small {o}" for o in others) + ".", False
        return f"the biggest shape is a {name}; there is also a {others[0]} {_where(objs[1]['cx'], objs[1]['cy'], S)}.", False

    def render(self, scene: dict) -> np.ndarray:
        img = _background(scene["background"], self.img_size)
        for o in scene["objects"][::-1]:  # smaller shapes first, the main (largest) one on top
            _paint(img, o["shape"], o["rgb"], o["cx"], o["cy"], o["r"], o["theta"])
        return img

    def image_uint8(self, index: int) -> np.ndarray:
        """Sample `index` as an (S, S, 3) uint8 array (e.g. to write fixture files or look at it)."""
        return _hwc(self.render(self.scene(index)))

    def __getitem__(self, index: int) -> dict:
        sc = self.scene(index)
        return {"image": _to_tensor(self.render(sc)), "text": sc["text"], "label": sc["label"], "short": sc["short"]}


# ----------------------------------------------------------------------------- detection

class ShapesDetection(_Synthetic):
    """1..max_objects non-overlapping shapes per image with exact xyxy boxes (tight around every pixel
    the shape paints, so a box encloses its object and each of its four edges touches it).

    Targets are COCO-style: boxes (N,4) float xyxy in pixels, labels (N,) indices into `.classes`
    (the 20 colour × shape names, so a text-aligned head can use them as prompts), iscrowd (N,) zeros.
    """

    classes = list(CLASSES)

    def __init__(self, split: str = "train", length: int | None = None, img_size: int = 128, seed: int = 0,
                 max_objects: int = 6):
        super().__init__(split, length, img_size, seed, {"train": 20_000, "val": 500})
        self.max_objects = max_objects

    def _draw_layout(self, rng):
        S = self.img_size
        n = int(rng.integers(1, self.max_objects + 1))
        objs = []
        for _ in range(n):
            r = rng.uniform(0.06, 0.15) * S
            pos = _place(rng, S, r, [(o[1], o[2], o[3]) for o in objs], gap=2.0)
            if pos is not None:
                objs.append((int(rng.integers(len(CLASSES))), pos[0], pos[1], r, rng.uniform(-0.4, 0.4)))
        sig = ("det",) + tuple(sorted((k, int(8 * x / S), int(8 * y / S)) for k, x, y, _, _ in objs))
        return sig, objs

    def scene(self, index: int) -> dict:
        rng = self._rng(index)
        sig, objs = self._sample_in_split(rng, self._draw_layout)
        return dict(signature=sig, objects=[dict(cls=k, cx=x, cy=y, r=r, theta=t, rgb=_colour(rng, k // 4)) for k, x, y, r, t in objs],
                    background=_background_params(rng))

    def render(self, scene: dict):
        img = _background(scene["background"], self.img_size)
        boxes, labels = [], []
        for o in scene["objects"]:
            box = _paint(img, o["cls"] % 4, o["rgb"], o["cx"], o["cy"], o["r"], o["theta"], box=True)
            if box is not None:
                boxes.append(box)
                labels.append(o["cls"])
        return img, boxes, labels

    def __getitem__(self, index: int) -> dict:
        img, boxes, labels = self.render(self.scene(index))
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return {"image": _to_tensor(img), "boxes": boxes, "labels": torch.tensor(labels, dtype=torch.long),
                "iscrowd": torch.zeros(len(labels), dtype=torch.long), "image_id": index}


# ----------------------------------------------------------------------------- VQA

class ShapesVQA(_Synthetic):
    """An image of 1–4 distinct shapes and a question about colour, shape, count, existence or position.

    Ten annotators answer; each errs with a per-question probability in [0, noise_max] by picking another
    answer of the same type, so the soft targets (`vqa_score`: for an answer given by k of the 10, the mean of
    min(1, k′/3) over the ten leave-one-annotator-out subsets, k′ its count among the other nine — the
    official VQA accuracy) take values .3/.6/.9/1 for k = 1/2/3/≥4. `.answers` is the
    fixed answer vocabulary; the sample also carries the true answer and the question type.
    """

    COUNTS = ("0", "1", "2", "3", "4")
    RELS = ("left", "right", "above", "below")
    answers = ["yes", "no", *COUNTS, *COLOURS, *SHAPES, *RELS]
    QTYPES = ("colour", "shape", "count", "exists", "position")

    def __init__(self, split: str = "train", length: int | None = None, img_size: int = 64, seed: int = 0,
                 noise_max: float = 0.3, questions: int = 1):
        super().__init__(split, length, img_size, seed, {"train": 50_000, "val": 1_000})
        if int(questions) < 1:
            raise ValueError(f"ShapesVQA questions (per image) must be at least 1, got {questions}.")
        self.noise_max = noise_max
        self.questions = int(questions)  # > 1: each sample also carries `more_questions` about the same image
        self.answer_index = {a: i for i, a in enumerate(self.answers)}

    def _draw_layout(self, rng):
        S = self.img_size
        n = int(rng.integers(1, 5))
        ks = rng.choice(len(CLASSES), size=n, replace=False)
        objs = []
        for k in ks:
            r = rng.uniform(0.09, 0.16) * S
            pos = _place(rng, S, r, [(o["cx"], o["cy"], o["r"]) for o in objs], gap=2.0)
            if pos is not None:
                objs.append(dict(cls=int(k), colour=int(k) // 4, shape=int(k) % 4, cx=pos[0], cy=pos[1], r=r))
        q = self._question(rng, objs)
        return self._signature(objs, q), (objs, q)

    def _signature(self, objs, q) -> tuple:
        """What decides the split: the question, its answer and the layout on a 4 × 4 grid."""
        S = self.img_size
        return ("vqa", q[0], q[1]) + tuple(sorted((o["cls"], int(4 * o["cx"] / S), int(4 * o["cy"] / S)) for o in objs))

    def _question(self, rng, objs):
        """-> (question, answer, type) about the scene; a question whose answer would be ambiguous is not asked."""
        shapes = [o["shape"] for o in objs]
        colours = [o["colour"] for o in objs]
        for _ in range(20):
            qt = self.QTYPES[int(rng.integers(5))]
            if qt == "colour":
                uniq = [o for o in objs if shapes.count(o["shape"]) == 1]
                if uniq:
                    o = uniq[int(rng.integers(len(uniq)))]
                    s = SHAPES[o["shape"]]
                    q = [f"what colour is the {s}?", f"which colour does the {s} have?"][int(rng.integers(2))]
                    return q, COLOURS[o["colour"]], qt
            elif qt == "shape":
                uniq = [o for o in objs if colours.count(o["colour"]) == 1]
                if uniq:
                    o = uniq[int(rng.integers(len(uniq)))]
                    c = COLOURS[o["colour"]]
                    q = [f"what shape is the {c} object?", f"which shape is {c}?"][int(rng.integers(2))]
                    return q, SHAPES[o["shape"]], qt
            elif qt == "count":
                v = int(rng.integers(3))
                if v == 0:
                    return ["how many shapes are there?", "how many objects are in the picture?"][int(rng.integers(2))], str(len(objs)), qt
                if v == 1:
                    c = int(rng.integers(5))
                    return f"how many {COLOURS[c]} shapes are there?", str(colours.count(c)), qt
                s = int(rng.integers(4))
                return f"how many {SHAPES[s]}s are there?", str(shapes.count(s)), qt
            elif qt == "exists":
                present = {o["cls"] for o in objs}
                k = int(rng.choice(sorted(present))) if rng.random() < 0.5 else int(rng.integers(len(CLASSES)))
                q = [f"is there a {CLASSES[k]}?", f"is there a {CLASSES[k]} in the image?"][int(rng.integers(2))]
                return q, "yes" if k in present else "no", qt
            else:  # position: a pair clearly separated along one axis
                pairs = [(a, b) for a in objs for b in objs if a is not b]
                for i in rng.permutation(len(pairs)) if pairs else []:
                    a, b = pairs[i]
                    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
                    if max(abs(dx), abs(dy)) > 2 * min(abs(dx), abs(dy)) + 2:
                        rel = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                        return f"where is the {CLASSES[a['cls']]} relative to the {CLASSES[b['cls']]}?", rel, qt
        return "how many shapes are there?", str(len(objs)), "count"

    def scene(self, index: int) -> dict:
        rng = self._rng(index)
        sig, (objs, (question, answer, qtype)) = self._sample_in_split(rng, self._draw_layout)
        for o in objs:
            o["rgb"], o["theta"] = _colour(rng, o["colour"]), rng.uniform(-0.4, 0.4)
        annot = self._annotate(rng, answer, qtype)
        scene = dict(signature=sig, objects=objs, background=_background_params(rng), question=question,
                     answer=answer, qtype=qtype, answers=annot)
        if self.questions > 1:
            scene["more"] = self._more_questions(index, objs, question)
        return scene

    def _annotate(self, rng, answer: str, qtype: str) -> list[str]:
        """Ten annotators; each errs with probability eps ~ U(0, noise_max) by naming another answer of the type."""
        pool = {"colour": COLOURS, "shape": SHAPES, "count": self.COUNTS, "exists": ("yes", "no"),
                "position": self.RELS}[qtype]
        wrong = [a for a in pool if a != answer]
        eps = rng.uniform(0, self.noise_max)
        return [wrong[int(rng.integers(len(wrong)))] if rng.random() < eps else answer for _ in range(10)]

    def _more_questions(self, index: int, objs: list, first: str) -> list[dict]:
        """Up to `questions` − 1 further questions about the same scene (as VQA v2 and CLEVR ask several per
        image). They come from a separate random stream, so the image and the first question are those of
        questions=1. Not asked: a (question, layout) pair of the other split (so no held-out question is ever
        trained on), a question already asked, or one of the same type and answer as a further one (paraphrases)."""
        rng = np.random.default_rng([self.seed, self.split_id, index % self.length, 1])
        asked, more = {first}, []
        for _ in range(8 * self.questions):
            if len(more) == self.questions - 1:
                break
            question, answer, qtype = self._question(rng, objs)
            if {question, (qtype, answer)} & asked or not _in_split(self._signature(objs, (question, answer, qtype)),
                                                                    self.split_id):
                continue
            asked |= {question, (qtype, answer)}
            more.append(dict(question=question, answer=answer, qtype=qtype, answers=self._annotate(rng, answer, qtype)))
        return more

    def render(self, scene: dict) -> np.ndarray:
        img = _background(scene["background"], self.img_size)
        for o in scene["objects"]:
            _paint(img, o["shape"], o["rgb"], o["cx"], o["cy"], o["r"], o["theta"])
        return img

    def __getitem__(self, index: int) -> dict:
        sc = self.scene(index)
        sample = {"image": _to_tensor(self.render(sc)), **self._qa(sc)}
        if self.questions > 1:
            sample["more_questions"] = [self._qa(q) for q in sc["more"]]  # collate_vqa: one row each, same image
        return sample

    def _qa(self, q: dict) -> dict:
        return {"question": q["question"], "answers": q["answers"], "target": soft_target(q["answers"], self.answer_index),
                "answer": q["answer"], "question_type": q["qtype"]}


# ----------------------------------------------------------------------------- video

class MovingShapes(_Synthetic):
    """T-frame clips of one moving shape (plus maybe a static distractor); label = the action.

    Actions: moves left/right/up/down, grows, shrinks, rotates, stays. The scene (shape, colour, centre,
    size, angle, background) is drawn from one RNG stream and the action from another, and each action is
    a motion *symmetric about the clip's centre time*: the time-average of the state (x, y, log r, θ) is
    the same scene state for every action. So every frame is a plausible frame of every action and only
    the change between frames tells them apart. Circles are not used as the moving shape (their rotation
    would be invisible); rotations stay under the 90°/120° symmetry of squares, crosses and triangles.
    """

    classes = ["moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "rotates", "stays"]

    def __init__(self, split: str = "train", length: int | None = None, img_size: int = 64, num_frames: int = 8,
                 seed: int = 0, travel: float = 0.25, growth: float = 1.8, turn: float = math.radians(60)):
        super().__init__(split, length, img_size, seed, {"train": 20_000, "val": 500})
        self.num_frames, self.travel, self.growth, self.turn = num_frames, travel, growth, turn

    def _draw_layout(self, rng):
        S = self.img_size
        shape = int(rng.integers(1, 4))  # square, triangle, cross
        colour = int(rng.integers(5))
        r = rng.uniform(0.10, 0.15) * S
        m = r * 1.35 * math.sqrt(self.growth) + 1
        m = max(m, r + self.travel * S / 2)
        cx, cy = rng.uniform(m, S - m), rng.uniform(m, S - m)
        sig = ("video", colour * 4 + shape, int(8 * cx / S), int(8 * cy / S))
        return sig, (shape, colour, r, cx, cy)

    def scene(self, index: int, action: int | None = None) -> dict:
        """Scene and per-frame states; `action` overrides the drawn action (same scene, other motion)."""
        rng = self._rng(index)
        S, T = self.img_size, self.num_frames
        sig, (shape, colour, r, cx, cy) = self._sample_in_split(rng, self._draw_layout)
        theta = rng.uniform(0, 2 * math.pi)
        rgb = _colour(rng, colour)
        distractor = None
        if rng.random() < 0.5:
            rd = rng.uniform(0.06, 0.09) * S
            reach = r * 1.35 * math.sqrt(self.growth) + self.travel * S / 2
            pos = _place(rng, S, rd, [(cx, cy, reach / 1.35)], gap=2.0)
            if pos is not None:
                dcol = (colour + 1 + int(rng.integers(4))) % 5  # never the moving shape's colour
                distractor = dict(shape=int(rng.integers(4)), rgb=_colour(rng, dcol), cx=pos[0], cy=pos[1], r=rd,
                                  theta=rng.uniform(0, 2 * math.pi))
        background = _background_params(rng)
        arng = np.random.default_rng([self.seed, self.split_id, index % self.length, 1])  # action stream
        act = int(arng.integers(len(self.classes))) if action is None else int(action)
        spin = 1.0 if arng.random() < 0.5 else -1.0
        t = np.linspace(-0.5, 0.5, T) if T > 1 else np.zeros(1)
        d = self.travel * S * t
        xs, ys = np.full(T, cx), np.full(T, cy)
        rs, ths = np.full(T, r), np.full(T, theta)
        name = self.classes[act]
        if name == "moves left":
            xs = cx - d
        elif name == "moves right":
            xs = cx + d
        elif name == "moves up":
            ys = cy - d
        elif name == "moves down":
            ys = cy + d
        elif name == "grows":
            rs = r * self.growth ** t
        elif name == "shrinks":
            rs = r * self.growth ** (-t)
        elif name == "rotates":
            ths = theta + spin * self.turn * t
        return dict(signature=sig, shape=shape, colour=colour, rgb=rgb, label=act, xs=xs, ys=ys, rs=rs, thetas=ths,
                    distractor=distractor, background=background)

    def render(self, sc: dict) -> np.ndarray:
        bg = _background(sc["background"], self.img_size)
        if sc["distractor"] is not None:
            o = sc["distractor"]
            _paint(bg, o["shape"], o["rgb"], o["cx"], o["cy"], o["r"], o["theta"])
        frames = np.repeat(bg[:, None], self.num_frames, axis=1)  # (3, T, S, S)
        for k in range(self.num_frames):
            _paint(frames[:, k], sc["shape"], sc["rgb"], sc["xs"][k], sc["ys"][k], sc["rs"][k], sc["thetas"][k])
        return frames

    def __getitem__(self, index: int) -> dict:
        sc = self.scene(index)
        x = _to_tensor(self.render(sc))  # (3, T, S, S)
        return {"video": x, "label": sc["label"]}


def benchmark(n: int = 2000, threads: int = 1) -> dict[str, float]:
    """Samples per second of each generator at its default size, on `threads` torch threads: the best of
    5 runs of n/5 consecutive indices (the best run is the least disturbed by other processes). One core:
    taskset -c 0 python -c "from data.synthetic import benchmark; print(benchmark())" """
    import time

    torch.set_num_threads(threads)
    out = {}
    for cls in (ShapesText, ShapesDetection, ShapesVQA, MovingShapes):
        for split in ("train", "val"):
            ds, best = cls(split, length=n), float("inf")
            ds[0]
            for k in range(5):
                t = time.perf_counter()
                for i in range(k * n // 5, (k + 1) * n // 5):
                    ds[i]
                best = min(best, time.perf_counter() - t)
            out[f"{cls.__name__}({split}, {ds.img_size}px)"] = (n // 5) / best
    return out

