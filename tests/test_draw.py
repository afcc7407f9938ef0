"""tasks/draw.py: the pictures a person reads. Detection tags never cover one another and stay by their box
inside the tile; captions wrap at spaces to the tile's width (only an over-long word is split) and are
shown whole; the loss axis spans the loss seen, with distinct round ticks; beyond ~50 classes the
confusion picture ranks the most-confused pairs; the same inputs give the same bytes."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tasks import draw

QUESTION = ("is the small blue triangle to the left of the large red circle near the bottom edge of the "
            "picture, or is it hidden behind the green square")


def measured(text, f):
    """The right edge of the text's ink drawn at x = 0, measured by ImageDraw.textbbox, not by draw.py."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=f)[2] if text else 0


def disjoint(a, b):  # half-open (x0, y0, x1, y1)
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def touches(r, b, slack=1.5):
    """r (a tag) shares an edge with box b, or overlaps it."""
    return r[0] <= b[2] + slack and b[0] <= r[2] + slack and r[1] <= b[3] + slack and b[1] <= r[3] + slack


# ----------------------------------------------------------------------------------------------------
# wrapping

@pytest.mark.parametrize("width", [60, 100, 152, 400])
def test_wrap_breaks_at_spaces_greedily_and_every_line_fits(width):
    f = draw.font(11)
    lines = draw.wrap(QUESTION, f, width)
    assert " ".join(lines).split() == QUESTION.split()  # every word, in order, none cut
    assert all(measured(line, f) <= width for line in lines)
    assert all(line == line.strip() and "  " not in line for line in lines)
    for a, b in zip(lines, lines[1:]):  # greedy: the next line's first word would not have fitted
        assert measured(f"{a} {b.split()[0]}", f) > width
    if width >= 400:
        assert len(lines) <= 3


def test_wrap_splits_only_a_word_wider_than_a_line():
    f = draw.font(11)
    long = "antidisestablishmentarianism" * 2
    lines = draw.wrap(f"what is {long} for", f, 80)
    assert lines[0] == "what is" and lines[-1].endswith("for")
    rest = lines[1:-1] if lines[-1] == "for" else lines[1:-1] + [lines[-1][:-len(" for")]]
    assert "".join(rest) == long and len(rest) >= 3 and all(measured(line, f) <= 80 for line in lines)
    assert all(measured(a + b[0], f) > 80 for a, b in zip(rest, rest[1:]))  # each piece as long as fits
    assert draw.wrap("", f, 80) == [""] and draw.wrap("x", f, 1) == ["x"]  # an empty line keeps its place


def test_captioned_grid_shows_the_whole_question_inside_its_tile(tmp_path):
    images = torch.zeros(3, 3, 16, 16)
    short = [[("a", draw.BLACK), ("pred: red", draw.GREEN)] for _ in range(3)]
    long = [[(QUESTION, draw.BLACK), ("pred: red", draw.GREEN)]] + short[1:]
    a = Image.open(draw.captioned_grid(images, short, str(tmp_path / "a.png"), tile=160, cols=3))
    b = np.asarray(Image.open(draw.captioned_grid(images, long, str(tmp_path / "b.png"), tile=160, cols=3)))
    n_lines = len(draw.wrap(QUESTION, draw.font(11), 152)) + 1
    assert n_lines >= 4 and b.shape[0] == 160 + 14 * n_lines + 6 > a.size[1]  # the band grew to fit, for all tiles
    band = b[160:] < 200  # ink under the images
    rows = np.flatnonzero(band[:, :160].any(axis=(1, 2)))
    assert rows.max() - rows.min() >= 14 * (n_lines - 1)  # the question's lines all drawn
    assert not band[:, 156:164].any() and not band[:, 316:324].any()  # none of it spills into the next tile


def test_vqa_visualise_hands_the_whole_question_to_the_grid(tmp_path, monkeypatch):
    from tasks.vqa import VQATask

    task = object.__new__(VQATask)  # only what visualise reads
    task.dist = type("D", (), {"main": True})()
    task.answers = ["red", "blue", "three"]
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    task.predict = lambda model, n: (torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), targets, ["", ""],
                                     [QUESTION, "how many?"], torch.zeros(2, 3, 16, 16))
    seen = {}
    real = draw.captioned_grid
    monkeypatch.setattr(draw, "captioned_grid", lambda images, captions, path, **kw: seen.update(c=captions)
                        or real(images, captions, path, **kw))
    path = task.visualise(None, str(tmp_path))
    assert seen["c"][0][0][0] == QUESTION and seen["c"][1][0][0] == "how many?"
    assert seen["c"][0][1][1] == draw.GREEN and seen["c"][1][2][0] == "true: (not in the vocabulary)"
    assert Image.open(path).size[0] == 4 * 160


# ----------------------------------------------------------------------------------------------------
# detection labels

def check_layout(boxes, sizes, bounds, spots):
    X0, Y0, X1, Y1 = bounds
    for r, (w, h) in zip(spots, sizes):
        if r is not None:
            assert r[2] - r[0] == w and r[3] - r[1] == h and X0 <= r[0] and r[2] <= X1 and Y0 <= r[1] and r[3] <= Y1
    for a, b in itertools.combinations([r for r in spots if r is not None], 2):
        assert disjoint(a, b), (a, b)


@pytest.mark.parametrize("box", [(40, 40, 160, 160), (0, 0, 30, 20), (230, 240, 256, 256), (100, 100, 101, 101)])
def test_labels_of_boxes_at_one_place_stack_without_overlap_beside_their_box(box):
    bounds, sizes = (0, 0, 256, 256), [(58, 13)] * 8
    spots = draw.place_labels([box] * 8, sizes, bounds)
    check_layout([box] * 8, sizes, bounds, spots)
    assert all(s is not None for s in spots) and all(touches(s, box) for s in spots[:2])
    if box[3] - box[1] >= 8 * 14:  # room inside: all stacked inside the box
        assert all(box[0] <= s[0] and s[2] <= box[2] and box[1] <= s[1] and s[3] <= box[3] for s in spots)
    far = max(max(box[0] - s[2], s[0] - box[2], box[1] - s[3], s[1] - box[3]) for s in spots)
    assert far <= 7 * 14  # the rest stacked one under another (or above), not strewn over the tile
    if box[0] + 58 <= 256 and box[1] + 13 <= 256:  # room at the preferred place: just inside the top-left corner
        assert spots[0][:2] == (box[0], box[1])


def test_labels_stay_apart_when_the_tile_fills_up_and_in_random_scenes():
    bounds = (256, 0, 512, 256)  # the second tile of a row
    many = [(300, 100, 340, 140)] * 200
    spots = draw.place_labels(many, [(60, 13)] * 200, bounds)
    check_layout(many, [(60, 13)] * 200, bounds, spots)
    assert None in spots and sum(s is not None for s in spots) >= 40  # the whole tile is used, then labels drop
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        xy = torch.rand(12, 2, generator=g) * 230
        wh = torch.rand(12, 2, generator=g) * 80 + 2
        boxes = [(256 + x, y, 256 + x + w, y + h) for (x, y), (w, h) in zip(xy.tolist(), wh.tolist())]
        sizes = [(int(w), 13) for w in (torch.rand(12, generator=g) * 60 + 20).tolist()]
        spots = draw.place_labels(boxes, sizes, bounds)
        check_layout(boxes, sizes, bounds, spots)
        assert all(s is not None for s in spots)


def test_detections_draws_tags_that_do_not_overlap(tmp_path, monkeypatch):
    tags, ink = [], []
    rect, text = ImageDraw.ImageDraw.rectangle, ImageDraw.ImageDraw.text

    def rec_rect(self, xy, *a, **kw):
        if kw.get("fill") is not None:
            tags.append((xy[0], xy[1], xy[2] + 1, xy[3] + 1))
        return rect(self, xy, *a, **kw)

    def rec_text(self, xy, s, *a, **kw):
        ink.append(self.textbbox(xy, s, font=kw.get("font")))
        return text(self, xy, s, *a, **kw)

    monkeypatch.setattr(ImageDraw.ImageDraw, "rectangle", rec_rect)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", rec_text)
    b = torch.tensor([[8.0, 8, 40, 40]] * 6 + [[0.0, 0, 64, 64], [56.0, 60, 64, 64]])  # six at one place, one
    preds = [{"boxes": b, "scores": torch.linspace(0.95, 0.35, 8), "labels": torch.arange(8) % 4}] * 2  # full
    # frame, one in the bottom-right corner whose label would run out of its tile
    draw.detections(torch.zeros(2, 3, 64, 64), [b[:1]] * 2, preds, ["circle", "square", "triangle", "star"],
                    str(tmp_path / "d.png"), tile=256, cols=2)
    assert len(tags) == len(ink) == 16
    for a, c in itertools.combinations(tags, 2):
        assert disjoint(a, c)
    for k, (t, i) in enumerate(zip(tags, ink)):
        x0 = 256 * (k // 8)
        assert x0 <= t[0] and t[2] <= x0 + 256 and 0 <= t[1] and t[3] <= 256  # inside its own tile
        assert t[0] <= i[0] and i[2] <= t[2] and t[1] <= i[1] and i[3] <= t[3]  # the text inside its tag
    same = [(x0 + 32, 32, x0 + 160, 160) for x0 in (0, 256)]  # the six boxes at one place, in pixels
    assert all(touches(t, same[k // 8]) for k, t in enumerate(tags) if k % 8 < 6)


# ----------------------------------------------------------------------------------------------------
# curves

@pytest.mark.parametrize("vals", [[2.31, 2.305, 2.29, 2.28], [5.0, 0.01], [0.7], [3.0, 3.0, 3.0], [-1.0, 2.0],
                                  [1e-4, 3e-4], [float("nan"), 2.0, float("inf"), 1.5]])
def test_axis_range_is_the_data_range_plus_a_small_margin(vals):
    lo, hi = draw.axis_range(vals)
    finite = [v for v in vals if math.isfinite(v)]
    vmin, vmax = min(finite), max(finite)
    span = vmax - vmin
    assert lo <= vmin and hi >= vmax and hi > lo
    if span > 0:
        assert vmin - lo <= 0.1 * span + 1e-12 and hi - vmax <= 0.1 * span + 1e-12
        assert (hi - lo) <= 1.2 * span
    else:
        assert lo < vmin < hi and hi - lo <= max(0.2 * abs(vmax), 0.05)
    if vmin >= 0:
        assert lo >= 0


@pytest.mark.parametrize("lo,hi", [(2.3451, 2.3459), (0.0, 1.0), (0.1, 7.3), (1.9, 2.1), (-0.5, 0.25),
                                   (1e-4, 3e-4), (120.0, 980.0)])
def test_ticks_are_round_distinct_and_inside_the_range(lo, hi):
    ticks, labels = draw.nice_ticks(lo, hi)
    assert 3 <= len(ticks) <= 8 and len(set(labels)) == len(labels)
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    assert all(abs(float(s) - t) <= 1e-9 * max(1, abs(t)) for s, t in zip(labels, ticks))
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])


def write_metrics(path, losses, extra=()):
    with open(path, "w") as fh:
        for s, v in enumerate(losses, 1):
            fh.write(json.dumps({"step": s, "loss": v}) + "\n")
        for row in extra:
            fh.write(json.dumps(row) + "\n")


LOSS_BLUE = (31, 119, 180)


def loss_rows(png):
    px = np.asarray(Image.open(png).convert("RGB"))[:, :480]
    return np.flatnonzero((px == LOSS_BLUE).all(-1).any(1))


def test_the_loss_curve_fills_its_panel_instead_of_hugging_the_top(tmp_path):
    y0, y1 = 44, 344  # the left panel's frame
    write_metrics(tmp_path / "m.jsonl", [2.31, 2.30, 2.305, 2.29, 2.285, 2.28],
                  [{"step": 6, "zs_top1": 0.4, "vqa_unreadable": 7}, {"step": 7, "loss": None, "event": "nonfinite"}])
    rows = loss_rows(draw.curves(str(tmp_path / "m.jsonl"), str(tmp_path / "c.png"), "toy"))
    assert Image.open(tmp_path / "c.png").size == (960, 400)
    assert rows.max() - rows.min() >= 0.8 * (y1 - y0)  # 2.28 … 2.31 spans the panel, not 1% of it
    assert y0 <= rows.min() and rows.max() <= y1
    write_metrics(tmp_path / "f.jsonl", [1.5] * 5)  # a flat loss: a line across the middle
    rows = loss_rows(draw.curves(str(tmp_path / "f.jsonl"), str(tmp_path / "f.png")))
    assert abs((rows.min() + rows.max()) / 2 - (y0 + y1) / 2) <= 6


# ----------------------------------------------------------------------------------------------------
# confusion

def test_most_confused_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    cm = torch.randint(0, 4, (30, 30), generator=g) * (torch.rand(30, 30, generator=g) < 0.2)
    cm += torch.diag(torch.randint(5, 20, (30,), generator=g))
    ref = []
    for i in range(30):
        for j in range(30):
            if i != j and cm[i, j] > 0:
                ref.append((i, j, int(cm[i, j]), int(cm[i, j]) / int(cm[i].sum())))
    ref.sort(key=lambda r: (-r[2], -r[3], r[0], r[1]))
    assert draw.most_confused(cm, 10) == ref[:10] and draw.most_confused(cm, 10**6) == ref
    assert draw.most_confused(torch.eye(5, dtype=torch.long) * 3) == []


def bars(png):
    """(row, length) of each bar of the ranked pairs, top to bottom."""
    px = (np.asarray(Image.open(png).convert("RGB")) == draw.BAR).all(-1)
    col = np.flatnonzero(px.any(0))
    rows = np.flatnonzero(px[:, col[0]])
    starts = rows[np.r_[True, np.diff(rows) > 1]]
    return [(int(r), int(px[r].sum())) for r in starts]


def test_many_classes_rank_the_most_confused_pairs(tmp_path):
    K = 120
    cm = torch.diag(torch.full((K,), 10))
    planted = {(3, 7): 9, (50, 2): 6, (7, 3): 4, (99, 100): 2, (10, 11): 1}
    for (i, j), c in planted.items():
        cm[i, j] = c
    names = [f"class {k:03d}" for k in range(K)]
    out = draw.confusion(cm, names, str(tmp_path / "c.png"), "classify toy:", )
    found = bars(out)
    assert len(found) == len(planted)
    lengths = [n for _, n in found]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > 3 * lengths[-1]
    assert abs(lengths[1] / lengths[0] - 6 / 9) < 0.05  # a bar's length is proportional to its count
    size = Image.open(out).size
    big = torch.diag(torch.full((600,), 3))
    big[5, 6] = 1
    other = draw.confusion(big, [f"class {k:03d}" for k in range(600)], str(tmp_path / "d.png"))
    assert Image.open(other).size[0] == size[0] and Image.open(other).size[1] < size[1]  # width fixed by layout
    assert len(bars(other)) == 1
    crowded = torch.ones(K, K, dtype=torch.long)
    assert len(bars(draw.confusion(crowded, names, str(tmp_path / "e.png"), top=25))) == 25


def test_few_classes_keep_the_matrix(tmp_path):
    for K in (5, 50):
        cm = torch.diag(torch.full((K,), 4))
        cm[0, 1] = 2
        img = Image.open(draw.confusion(cm, [f"c{k}" for k in range(K)], str(tmp_path / f"m{K}.png")))
        assert not (np.asarray(img.convert("RGB")) == draw.BAR).all(-1).any()
        cell = max(2, min(28, 720 // K))
        assert img.size[0] >= K * cell and img.size[1] >= K * cell


# ----------------------------------------------------------------------------------------------------
# determinism and size

def test_pictures_are_deterministic_and_small(tmp_path):
    write_metrics(tmp_path / "m.jsonl", [3.0 - 0.01 * s for s in range(200)], [{"step": 200, "zs_top1": 0.5}])
    cm = torch.randint(0, 3, (80, 80), generator=torch.Generator().manual_seed(0))
    b = torch.tensor([[8.0, 8, 40, 40]] * 5)
    preds = [{"boxes": b, "scores": torch.full((5,), 0.9), "labels": torch.arange(5)}] * 4
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    makers = {
        "curves": lambda p: draw.curves(str(tmp_path / "m.jsonl"), p),
        "pairs": lambda p: draw.confusion(cm, [f"k{k}" for k in range(80)], p),
        "matrix": lambda p: draw.confusion(cm[:20, :20], [f"k{k}" for k in range(20)], p),
        "detections": lambda p: draw.detections(images, [b] * 4, preds, [f"n{k}" for k in range(5)], p),
        "grid": lambda p: draw.captioned_grid(images, [[(QUESTION, draw.BLACK)]] * 4, p, tile=160),
    }
    for name, make in makers.items():
        one, two = make(str(tmp_path / f"{name}1.png")), make(str(tmp_path / f"{name}2.png"))
        data = open(one, "rb").read()
        assert data == open(two, "rb").read(), name
        assert len(data) < 120_000, (name, len(data))
