"""data/synthetic.py: determinism, disjoint held-out split, captions that repeat, pixels that match labels."""
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from data.synthetic import (CLASSES, COLOURS, RGB, MovingShapes, ShapesDetection, ShapesText, ShapesVQA,
                            _alpha, _background)
from meter import vqa_score

ALL = [ShapesText, ShapesDetection, ShapesVQA, MovingShapes]
SMALL = dict(img_size=32)  # keep the tests fast; behaviour does not depend on the size


def _bytes(sample: dict) -> bytes:
    key = "video" if "video" in sample else "image"
    return sample[key].numpy().tobytes()


@pytest.mark.parametrize("cls", ALL)
def test_same_seed_same_bytes_and_indices_differ(cls):
    a, b = cls(length=50, seed=3, **SMALL), cls(length=50, seed=3, **SMALL)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert _bytes(x) == _bytes(y)
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k])
            else:
                assert x[k] == y[k]
    assert _bytes(a[7]) == _bytes(a[7])  # re-reading an index gives it again
    images = {_bytes(a[i]) for i in range(30)}
    assert len(images) == 30  # every index is a different sample
    other_seed = cls(length=50, seed=4, **SMALL)
    assert _bytes(other_seed[0]) != _bytes(a[0])
    assert _bytes(a[-1]) == _bytes(a[49])  # negative indices work
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("cls", ALL)
def test_held_out_split_never_overlaps_training(cls):
    train, val = cls("train", length=400, **SMALL), cls("val", length=150, **SMALL)
    sig_train = {train.scene(i)["signature"] for i in range(len(train))}
    sig_val = {val.scene(i)["signature"] for i in range(len(val))}
    assert sig_train and sig_val and not (sig_train & sig_val)
    # even another seed's training set avoids this val set: the split is a property of the scene
    sig_train_other_seed = {cls("train", length=200, seed=9, **SMALL).scene(i)["signature"] for i in range(200)}
    assert not (sig_train_other_seed & sig_val)
    assert not ({_bytes(train[i]) for i in range(100)} & {_bytes(val[i]) for i in range(100)})


def test_val_split_covers_every_class():
    val = ShapesText("val", length=400, **SMALL)
    assert set(val.scene(i)["label"] for i in range(len(val))) == set(range(len(CLASSES)))


def test_captions_repeat_within_a_batch_of_64_and_share_labels():
    ds = ShapesText(length=4000, **SMALL)
    scenes = [ds.scene(i) for i in range(2000)]
    # a contiguous batch and a shuffled batch both contain identical captions (hash-key positives)
    for idx in (range(64), torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:64].tolist()):
        counts = Counter(scenes[i]["text"] for i in idx)
        assert counts.most_common(1)[0][1] >= 2
    # identical caption => identical label, and every caption names the label's class
    by_text = {}
    for sc in scenes:
        by_text.setdefault(sc["text"], set()).add(sc["label"])
        assert CLASSES[sc["label"]] in sc["text"]
    assert all(len(labels) == 1 for labels in by_text.values())
    # label-only short texts are exactly the class name, and they are a share, not all, of the texts
    shorts = [sc for sc in scenes if sc["short"]]
    assert all(sc["text"] == CLASSES[sc["label"]] for sc in shorts)
    assert 0.15 < len(shorts) / len(scenes) < 0.35
    # captions vary: many distinct phrasings
    assert len(by_text) > 300


def test_main_object_is_clearly_the_largest():
    ds = ShapesText(length=500, **SMALL)
    for i in range(len(ds)):
        objs = ds.scene(i)["objects"]
        assert objs[0]["cls"] == ds.scene(i)["label"]
        assert all(o["r"] <= 0.6 * objs[0]["r"] + 1e-9 for o in objs[1:])


@pytest.mark.parametrize("shape", range(4))
def test_shapes_have_their_analytic_area(shape):
    r, S = 20.0, 128
    y0, x0, a = _alpha(shape, 64.3, 63.7, r, 0.3, S)
    area = {0: math.pi * r * r, 1: (1.7 * r) ** 2, 2: 3 * math.sqrt(3) / 4 * (1.35 * r) ** 2,
            3: 2 * (2 * r) * (0.66 * r) - (0.66 * r) ** 2}[shape]
    assert abs(a.sum() - area) / area < 0.01


def test_rendered_colour_matches_the_label():
    """A reference computed another way: the pixel colours at the main object's centre."""
    ds = ShapesText(length=200, img_size=64)
    for i in range(len(ds)):
        sc = ds.scene(i)
        m = sc["objects"][0]
        img = ds.image_uint8(i).astype(np.float32) / 255
        px = img[int(m["cy"]), int(m["cx"])]  # the centre is inside every shape kind
        nearest = int(np.argmin(((RGB - px) ** 2).sum(1)))
        assert COLOURS[nearest] == CLASSES[sc["label"]].split()[0]


def test_detection_boxes_are_exact():
    ds = ShapesDetection(length=40, img_size=96)
    n_objects = 0
    for i in range(len(ds)):
        sc = ds.scene(i)
        s = ds[i]
        img, boxes, labels = ds.render(sc)
        diff = np.abs(img - _background(sc["background"], ds.img_size)).max(0)  # (S, S), painted pixels only
        b = s["boxes"]
        assert b.dtype == torch.float32 and s["labels"].tolist() == [o["cls"] for o in sc["objects"]]
        assert torch.equal(s["iscrowd"], torch.zeros(len(b), dtype=torch.long))
        inside = np.zeros_like(diff, dtype=bool)
        for (x1, y1, x2, y2) in b.round().long().tolist():
            assert 0 <= x1 < x2 <= ds.img_size and 0 <= y1 < y2 <= ds.img_size
            inside[y1:y2, x1:x2] = True
            # tight: every edge row/column of the box holds painted pixels
            box = diff[y1:y2, x1:x2]
            assert box[0].max() > 0 and box[-1].max() > 0 and box[:, 0].max() > 0 and box[:, -1].max() > 0
            assert box.max() > 0.2  # and the object inside is clearly visible
        assert not (diff[~inside] > 0).any()  # nothing painted outside the boxes
        n_objects += len(b)
    assert n_objects > 2 * len(ds)  # several objects per image


def _recompute_answer(q: str, objs: list) -> str:
    """Answer a ShapesVQA question from the scene, with regexes (independent of the generator)."""
    names = [CLASSES[o["cls"]] for o in objs]
    if m := re.match(r"(what colour is|which colour does) the (\w+)", q):
        return [n.split()[0] for n in names if n.split()[1] == m.group(2)][0]
    if m := re.match(r"(what shape is|which shape is) the (\w+)|which shape is (\w+)", q):
        c = m.group(2) or m.group(3)
        return [n.split()[1] for n in names if n.split()[0] == c][0]
    if q.startswith(("how many shapes", "how many objects")):
        return str(len(objs))
    if m := re.match(r"how many (\w+) shapes", q):
        return str(sum(n.split()[0] == m.group(1) for n in names))
    if m := re.match(r"how many (\w+)s are", q):
        return str(sum(n.split()[1] == m.group(1) for n in names))
    if m := re.match(r"is there a (\w+ \w+)", q):
        return "yes" if m.group(1) in names else "no"
    m = re.match(r"where is the (\w+ \w+) relative to the (\w+ \w+)\?", q)
    a, b = objs[names.index(m.group(1))], objs[names.index(m.group(2))]
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    return ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")


def test_vqa_answers_are_right_noisy_and_scored():
    ds = ShapesVQA(length=400, **SMALL)
    types, agree = Counter(), []
    for i in range(len(ds)):
        sc, s = ds.scene(i), ds[i]
        assert s["answer"] == _recompute_answer(s["question"], sc["objects"]), s["question"]
        assert len(s["answers"]) == 10 and all(a in ds.answers for a in s["answers"])
        k = s["answers"].count(s["answer"])
        agree.append(k)
        assert s["target"][ds.answer_index[s["answer"]]] == pytest.approx(vqa_score(k))
        assert {round(v, 4) for v in s["target"].tolist()} <= {0.0, 0.3, 0.6, 0.9, 1.0}
        types[s["question_type"]] += 1
    assert set(types) == set(ShapesVQA.QTYPES) and min(types.values()) > 30
    assert np.mean(agree) > 7 and min(agree) < 10 and Counter(agree)[10] > 40  # mostly agreeing, some noise


def _main_mask(ds, sc):
    """Pixels painted by the moving shape: the clip minus the same clip rendered without it."""
    without = dict(sc, rs=np.full(ds.num_frames, -100.0))
    return np.abs(ds.render(sc) - ds.render(without)).max(0) > 0.05  # (T, S, S)


def test_moving_shapes_action_is_in_the_motion():
    ds = MovingShapes(length=200, img_size=48, num_frames=6)
    seen = Counter()
    for i in range(len(ds)):
        sc = ds.scene(i)
        name = ds.classes[sc["label"]]
        seen[name] += 1
        frames = ds.render(sc)
        steps = [np.abs(frames[:, k + 1] - frames[:, k]).max() for k in range(ds.num_frames - 1)]
        if name == "stays":
            assert max(steps) == 0
            continue
        assert min(steps) > 0.05  # something changes between every pair of frames
        mask = _main_mask(ds, sc)
        ys, xs = np.nonzero(mask[0])
        ye, xe = np.nonzero(mask[-1])
        dx, dy, darea = xe.mean() - xs.mean(), ye.mean() - ys.mean(), len(xe) - len(xs)
        travel = ds.travel * ds.img_size
        expect = {"moves left": (-travel, 0, 0), "moves right": (travel, 0, 0), "moves up": (0, -travel, 0),
                  "moves down": (0, travel, 0)}
        if name in expect:
            ex, ey, _ = expect[name]
            assert abs(dx - ex) < 2.5 and abs(dy - ey) < 2.5, (name, dx, dy)  # (edges may clip a little)
        elif name == "grows":
            assert darea > 0.8 * len(xs)
        elif name == "shrinks":
            assert -darea > 0.4 * len(xs)
        else:  # rotates in place: same centre, same area, different pixels
            assert abs(dx) < 1 and abs(dy) < 1 and abs(darea) < 0.1 * len(xs)
            assert (mask[0] != mask[-1]).sum() > 4
    assert set(seen) == set(ds.classes)


def test_one_frame_cannot_tell_the_action():
    """Every action moves symmetrically about the clip's centre: the time-averaged state is the same scene."""
    ds = MovingShapes(length=20, **SMALL)
    for i in range(5):
        states = []
        for a in range(len(ds.classes)):
            sc = ds.scene(i, action=a)
            states.append([sc["xs"].mean(), sc["ys"].mean(), np.log(sc["rs"]).mean(), sc["thetas"].mean()])
        assert np.allclose(states, states[0], atol=1e-9)
    x = ds[0]["video"]
    assert x.shape == (3, ds.num_frames, 32, 32) and x.dtype == torch.float32


def test_vqa_several_questions_per_image_are_right_distinct_and_never_held_out():
    from data.synthetic import _in_split

    one, three = ShapesVQA(length=150, **SMALL), ShapesVQA(length=150, questions=3, **SMALL)
    n_more = Counter()
    for i in range(len(three)):
        a, b, sc = one[i], three[i], three.scene(i)
        assert torch.equal(a["image"], b["image"]) and a["question"] == b["question"]  # questions=1's sample first
        assert "more_questions" not in a
        asked = [b["question"]] + [q["question"] for q in b["more_questions"]]
        assert len(set(asked)) == len(asked) and len(asked) <= 3
        n_more[len(b["more_questions"])] += 1
        for q in b["more_questions"]:
            assert q["answer"] == _recompute_answer(q["question"], sc["objects"]), q["question"]
            assert q["target"][three.answer_index[q["answer"]]] == pytest.approx(vqa_score(q["answers"].count(q["answer"])))
            sig = three._signature(sc["objects"], (q["question"], q["answer"], q["question_type"]))
            assert _in_split(sig, three.split_id) and not _in_split(sig, 1 - three.split_id)
    assert n_more[2] > 140  # nearly every image gets its two further questions
    with pytest.raises(ValueError, match="questions .* at least 1"):
        ShapesVQA(questions=0, **SMALL)
