"""data/formats.py: every real format round-trips through small files written here; bad input is named,
skipped and counted; tar shards split over ranks × workers cover every sample exactly once."""
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (CocoDetection, DataFormatError, ImageFolder, ImageTextFile, ShapesText, TarShards, VideoClips,
                  VQAv2, build_dataset, collate_image_text, make_loader, write_shards)
from data.transforms import denormalize

S = 32


@pytest.fixture(scope="module")
def shapes():
    return ShapesText("train", length=64, img_size=S)


def _save(arr: np.ndarray, path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------- CSV / TSV / JSONL

@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_image_text_file_round_trip(tmp_path, shapes, fmt, monkeypatch):
    for i in range(5):
        _save(shapes.image_uint8(i), tmp_path / "imgs" / f"{i}.png")
    texts = [shapes[i]["text"] for i in range(5)]
    if fmt == "csv":  # open_clip's default column names, paths relative to the CSV file
        rows = ["filepath,title"] + [f'../imgs/{i}.png,"{t}"' for i, t in enumerate(texts)]
        path, kw = _write(tmp_path / "lists" / "pairs.csv", "\n".join(rows) + "\n"), {}
    elif fmt == "tsv":  # other column names, given explicitly; a label column with class names
        rows = ["caption\tlabel\timg"] + [f"{t}\t{shapes.classes[shapes[i]['label']]}\t../imgs/{i}.png"
                                          for i, t in enumerate(texts)]
        path = _write(tmp_path / "lists" / "pairs.tsv", "\n".join(rows) + "\n")
        kw = dict(image_key="img", caption_key="caption", label_key="label")
    else:
        rows = [json.dumps({"image": f"../imgs/{i}.png", "text": t, "label": shapes[i]["label"]})
                for i, t in enumerate(texts)]
        path, kw = _write(tmp_path / "lists" / "pairs.jsonl", "\n".join(rows) + "\n"), dict(label_key="label")
    monkeypatch.chdir(tmp_path / "imgs")  # relative paths resolve against the file, not the cwd
    ds = ImageTextFile(path, img_size=S, split="val", **kw)
    assert len(ds) == 5
    for i in range(5):
        s = ds[i]
        assert s["text"] == texts[i]
        assert torch.equal(s["image"], shapes[i]["image"])  # lossless PNG + same normalisation: same tensor
        if fmt == "tsv":
            assert ds.classes[s["label"]] == shapes.classes[shapes[i]["label"]]
        elif fmt == "jsonl":
            assert s["label"] == shapes[i]["label"]
        else:
            assert s["label"] == -1
    spec = "?".join([f"csv:{path}", "&".join(f"{k}={v}" for k, v in kw.items())]) if kw else f"csv:{path}"
    assert torch.equal(build_dataset(spec, split="val", img_size=S)[3]["image"], ds[3]["image"])
    # training transforms: random resized crop at the requested size, still normalised around 0
    x = ImageTextFile(path, img_size=24, split="train", **kw)[0]["image"]
    assert x.shape == (3, 24, 24) and -3 < float(x.mean()) < 3


def test_bad_images_and_empty_captions_are_skipped_and_counted(tmp_path, shapes):
    for i in range(4):
        _save(shapes.image_uint8(i), tmp_path / f"{i}.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "0.png").read_bytes()[:60])
    rows = ["filepath,title", "0.png,zero", "missing.png,ghost", "1.png,", "corrupt.png,broken",
            "2.png,two", "truncated.png,cut", "3.png,three"]
    path = _write(tmp_path / "pairs.csv", "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"pairs.csv: skipped 1 rows with an empty caption \(lines 4\)"):
        ds = ImageTextFile(path, img_size=S, split="val")
    assert len(ds) == 6 and ds.dropped_at_load == 1
    with pytest.warns(UserWarning, match="missing.png: the image file does not exist"):
        assert ds[1] is None
    with pytest.warns(UserWarning, match="corrupt.png: the image cannot be decoded"):
        assert ds[2] is None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        batch = collate_image_text([ds[i] for i in range(len(ds))])
    assert len(w) == 3 and "truncated.png: the image cannot be decoded" in str(w[-1].message)
    assert batch["text"] == ["zero", "two", "three"] and batch["skipped"] == 3
    assert collate_image_text([None, None]) == {"skipped": 2}
    for workers in (0, 2):  # the count survives worker processes, and the epoch ends with a report
        loader = make_loader(ds, batch_size=4, workers=workers, shuffle=False)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            batches = list(loader)
        assert "epoch 0: skipped 3 bad samples" in str(w[-1].message)
        assert "1 rows with an empty caption" in str(w[-1].message)
        assert sorted(t for b in batches for t in b["text"]) == ["three", "two", "zero"] and loader.skipped == 3
        assert all(set(b) == {"image", "text", "label", "short"} for b in batches)


def test_malformed_index_files_name_the_file_and_line(tmp_path):
    p = _write(tmp_path / "ragged.csv", "filepath,title\na.png,ok\nb.png,too,many\n")
    with pytest.raises(DataFormatError, match=r"ragged.csv, line 3: 3 fields but the header has 2"):
        ImageTextFile(p)
    p = _write(tmp_path / "cols.csv", "path_to_img,words\na.png,hi\n")
    with pytest.raises(DataFormatError, match=r"cols.csv has no image column.*columns found: path_to_img, words"):
        ImageTextFile(p)
    with pytest.raises(DataFormatError, match=r"no image column 'file'.*columns found: path_to_img, words"):
        ImageTextFile(p, image_key="file", caption_key="words")
    p = tmp_path / "latin1.csv"
    head = b"filepath,title\na.png,caf"
    p.write_bytes(head + "é".encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=rf"latin1.csv is not UTF-8 text: the byte 0xe9 at byte offset "
                                              rf"{len(head)} \(line 2\)"):
        ImageTextFile(str(p))
    p = _write(tmp_path / "bad.jsonl", '{"image": "a.png", "text": "x"}\n\n{"image": "b.png", "text": }\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 3: malformed JSON"):
        ImageTextFile(p)
    p = _write(tmp_path / "keys.jsonl", '{"image": "a.png", "text": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(DataFormatError, match=r"keys.jsonl, line 2: no key 'text' \(keys found: image\)"):
        ImageTextFile(p)


# ----------------------------------------------------------------------------- tar shards

def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _shards(tmp_path, shapes, n_shards, per_shard):
    n = n_shards * per_shard
    samples = ((f"{i:05d}", _jpeg(shapes.image_uint8(i % 64)), f"caption {i}", i % 7) for i in range(n))
    return write_shards(samples, str(tmp_path / "shards"), per_shard=per_shard), n


def test_tar_shards_round_trip(tmp_path, shapes):
    paths, n = _shards(tmp_path, shapes, 3, 4)
    assert len(paths) == 3 and data.expand_shards(str(tmp_path / "shards")) == paths
    assert data.expand_shards(str(tmp_path / "shards" / "shard-{000000..000002}.tar")) == paths
    ds = TarShards(str(tmp_path / "shards"), img_size=S, split="val")
    out = list(ds)
    assert [s["text"] for s in out] == [f"caption {i}" for i in range(n)]
    assert [s["label"] for s in out] == [i % 7 for i in range(n)]
    # JPEG is lossy: the decoded image is close to, not equal to, the original
    ref = shapes[5]["image"]
    assert (denormalize(out[5]["image"]) - denormalize(ref)).abs().mean() < 0.03
    assert ds.num_samples() == n
    spec = build_dataset(f"shards:{tmp_path / 'shards'}", split="val", img_size=S)
    assert [s["text"] for s in spec] == [s["text"] for s in out]


@pytest.mark.parametrize("n_shards", [3, 8])  # fewer shards than readers (sample split) and more (shard split)
def test_shards_split_over_2_ranks_x_2_workers_exactly_once(tmp_path, shapes, n_shards):
    paths, n = _shards(tmp_path, shapes, n_shards, 3)
    for epoch in (0, 1):
        ds = TarShards(paths, split="train", seed=5)  # shuffled shard order and shuffle buffer
        ds.set_epoch(epoch)
        keys = [k for r in range(2) for w in range(2) for _, k, _ in ds.raw_samples(r, 2, w, 2)]
        assert sorted(keys) == [f"{i:05d}" for i in range(n)]
    # decoded, shuffled streams of one epoch also cover everything once; epochs differ in order
    ds = TarShards(paths, img_size=S, split="train", seed=5, shuffle_buffer=4)
    order = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        texts = [s["text"] for r in range(2) for w in range(2) for s in ds.samples(r, 2, w, 2)]
        assert sorted(texts) == sorted(f"caption {i}" for i in range(n))
        order.append(texts)
    assert order[0] != order[1]


def test_shards_with_real_dataloader_workers_and_ranks(tmp_path, shapes):
    paths, n = _shards(tmp_path, shapes, 4, 3)
    seen = []
    for rank in range(2):  # two ranks simulated in one process, each with a real 2-worker DataLoader
        ds = TarShards(paths, img_size=S, split="train", seed=1)
        loader = make_loader(ds, batch_size=2, distributed=True, rank=rank, world_size=2, workers=2, seed=1)
        loader.set_epoch(3)
        seen += [t for b in loader for t in b["text"]]
    assert sorted(seen) == sorted(f"caption {i}" for i in range(n))


def test_bad_shard_samples_are_skipped_and_counted(tmp_path, shapes):
    good = _jpeg(shapes.image_uint8(0))
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        add("a.jpg", good), add("a.txt", b"fine")
        add("b.jpg", good)                                   # no caption
        add("c.jpg", good), add("c.txt", b"caf\xe9 au lait")  # not UTF-8
        add("d.jpg", good), add("d.txt", b"   ")             # empty caption
        add("e.jpg", b"not a jpeg"), add("e.txt", b"broken")  # corrupt image
        add("f.jpg", good), add("f.txt", b"also fine")
    (tmp_path / "trunc.tar").write_bytes(path.read_bytes()[:2000])  # cut mid-shard
    ds = TarShards([str(path)], img_size=S, split="val")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = list(ds)
    msgs = " | ".join(str(x.message) for x in w)
    assert "sample 'b'" in msgs and "found .jpg" in msgs
    assert "c.txt is not UTF-8 (byte offset 3)" in msgs
    assert "caption d.txt is empty" in msgs and "e.jpg: the image cannot be decoded" in msgs
    batch = collate_image_text(out)
    assert batch["text"] == ["fine", "also fine"] and batch["skipped"] == 4
    with pytest.warns(UserWarning, match="trunc.tar is corrupt or truncated"):
        out = list(TarShards([str(tmp_path / "trunc.tar")], img_size=S, split="val"))
    assert out[-1] is None


# ----------------------------------------------------------------------------- image folders

def test_image_folder_prompts_and_labels(tmp_path, shapes):
    for i in range(6):
        _save(shapes.image_uint8(i), tmp_path / ("red_circle" if i % 2 else "blue_square") / f"{i}.png")
    (tmp_path / "blue_square" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path), img_size=S, split="val")
    assert ds.classes == ["blue square", "red circle"] and len(ds) == 6
    s = ds[0]
    assert s["text"] == "a photo of a blue square." and s["label"] == 0 and not s["short"]
    assert torch.equal(s["image"], shapes[0]["image"])
    bare = ImageFolder(str(tmp_path), img_size=S, split="val", template=None)
    assert bare[5]["text"] == "red circle" and bare[5]["short"] and bare[5]["label"] == 1
    spec = build_dataset(f"folder:{tmp_path}?template=a picture of a {{}}", split="val", img_size=S)
    assert spec[0]["text"] == "a picture of a blue square"


# ----------------------------------------------------------------------------- COCO

def _coco(tmp_path):
    img = np.zeros((48, 64, 3), np.uint8)  # H=48, W=64
    img[10:20, 30:50] = 255  # a white rectangle: pixels x 30..49, y 10..19 -> xywh (30, 10, 20, 10)
    os.makedirs(tmp_path / "val2017")
    Image.fromarray(img).save(tmp_path / "val2017" / "a.png")
    Image.fromarray(img[:, ::-1].copy()).save(tmp_path / "val2017" / "b.png")
    ann = {"images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 48},
                      {"id": 9, "file_name": "b.png", "width": 64, "height": 48}],
           "categories": [{"id": 5, "name": "box"}, {"id": 1, "name": "person"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [30, 10, 20, 10], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 8, 8], "iscrowd": 1},
                           {"id": 3, "image_id": 9, "category_id": 5, "bbox": [14, 10, 20, 10], "iscrowd": 0},
                           {"id": 4, "image_id": 9, "category_id": 5, "bbox": [1, 1, 0, 5], "iscrowd": 0}]}
    _write(tmp_path / "annotations" / "instances_val2017.json", json.dumps(ann))
    return str(tmp_path / "annotations" / "instances_val2017.json")


def test_coco_round_trip_boxes_on_the_same_pixels(tmp_path):
    path = _coco(tmp_path)
    with pytest.warns(UserWarning, match="dropped 1 boxes with zero width or height"):
        ds = CocoDetection(path, img_size=128, split="val")  # images found in ../val2017 (COCO layout)
    assert ds.classes == ["person", "box"] and len(ds) == 2
    s = ds[0]
    assert s["labels"].tolist() == [1, 0] and s["iscrowd"].tolist() == [0, 1] and s["image_id"] == 7
    assert s["boxes"][0].tolist() == [60, 20, 100, 40]  # xywh -> xyxy, scaled ×2 (longer side 64 -> 128)
    x1, y1, x2, y2 = s["boxes"][0].long().tolist()
    white = denormalize(s["image"]).mean(0) > 0.5
    ys, xs = torch.nonzero(white, as_tuple=True)
    assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
    assert white[y1 + 1:y2 - 1, x1 + 1:x2 - 1].all()
    assert ds[1]["boxes"].tolist() == [[28, 20, 68, 40]]
    with pytest.warns(UserWarning, match="zero width"):
        spec = build_dataset(f"coco:{path},{tmp_path / 'val2017'}", split="val", img_size=64, task="detect")
    assert spec[0]["boxes"][0].tolist() == [30, 10, 50, 20]


def test_coco_errors_name_the_key(tmp_path):
    p = _write(tmp_path / "broken.json", '{"images": [], "annotations": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataFormatError, match=r"broken.json is not valid JSON: .* line 2, column"):
        CocoDetection(p)
    p = _write(tmp_path / "nobox.json", json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                    "categories": [{"id": 1, "name": "x"}],
                                                    "annotations": [{"id": 4, "image_id": 1, "category_id": 1}]}))
    with pytest.raises(DataFormatError, match=r"nobox.json: annotations\[0\] \(id 4\) has no 'bbox'"):
        CocoDetection(p)
    p = _write(tmp_path / "notcoco.json", json.dumps({"questions": []}))
    with pytest.raises(DataFormatError, match=r"notcoco.json has no 'images' \(found: questions\)"):
        CocoDetection(p)


# ----------------------------------------------------------------------------- VQA v2

def test_vqa_v2_vocabulary_and_soft_scores(tmp_path, shapes):
    for im_id in (1, 2):
        _save(shapes.image_uint8(im_id), tmp_path / "val2014" / f"COCO_val2014_{im_id:012d}.jpg")
    qs = {"data_subtype": "val2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "How many shapes?"},
        {"question_id": 11, "image_id": 2, "question": "Is it red?"},
        {"question_id": 12, "image_id": 2, "question": "What colour?"},
        {"question_id": 13, "image_id": 3, "question": "Where is the image?"}]}
    ans = lambda xs: [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(xs)]
    anns = {"annotations": [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "2",
         "answers": ans(["2", "two", "Two", "2", "3", "2.", "2", "2", "3", "4"])},
        {"question_id": 11, "image_id": 2, "multiple_choice_answer": "yes", "answers": ans(["yes"] * 9 + ["no"])},
        {"question_id": 12, "image_id": 2, "multiple_choice_answer": "yes", "answers": ans(["red"] * 2 + ["yes"] * 8)},
        {"question_id": 13, "image_id": 3, "multiple_choice_answer": "2", "answers": ans(["2"] * 10)}]}
    qf, af = _write(tmp_path / "q.json", json.dumps(qs)), _write(tmp_path / "a.json", json.dumps(anns))
    ds = VQAv2(qf, af, img_size=S, split="val", min_count=1)
    assert ds.answers == ["2", "yes"]  # most frequent majority answer first
    s = ds[0]
    assert s["question"] == "How many shapes?" and s["answers"].count("2") == 7  # "two", "Two", "2." normalised
    assert s["target"].tolist() == pytest.approx([1.0, 0.0])
    assert ds[2]["target"].tolist() == pytest.approx([0.0, 1.0])  # "red" is outside the vocabulary
    assert ds[0]["image"].shape == (3, S, S)
    with pytest.warns(UserWarning, match="does not exist"):
        assert ds[3] is None  # image 3 is missing -> skipped
    assert VQAv2(qf, af, split="val", min_count=2).answers == ["2", "yes"]
    with pytest.warns(UserWarning, match="no answer occurs 3 times"):
        assert VQAv2(qf, af, split="val", min_count=3).answers == []
    test_split = VQAv2(qf, None, img_size=S, split="val", answers=ds.answers)  # test-dev: no annotations
    assert test_split[1]["target"].sum() == 0 and test_split.answers == ds.answers
    assert data.normalize_answer("The Two dogs.") == "2 dogs" and data.normalize_answer("1,000") == "1000"
    assert data.normalize_answer("3.5") == "3.5"


# ----------------------------------------------------------------------------- video

def test_video_clips_from_npy_and_frame_folders(tmp_path):
    T = 10
    clip = np.zeros((T, 20, 24, 3), np.uint8)
    for t in range(T):
        clip[t] = 20 * t  # brightness encodes the frame index
    np.save(tmp_path / "clip.npy", clip)
    for t in range(T):
        _save(clip[t], tmp_path / "frames" / f"{t:04d}.png")
    np.save(tmp_path / "short.npy", clip[:3])
    _write(tmp_path / "labels.csv", "path,label\nclip.npy,waving\nframes,clapping\nshort.npy,waving\n"
                                    "gone.npy,waving\n")
    ds = VideoClips(str(tmp_path / "labels.csv"), num_frames=4, stride=2, img_size=16, split="val")
    assert ds.classes == ["clapping", "waving"] and ds.labels == [1, 0, 1, 1]
    for i in (0, 1):
        v = ds[i]["video"]
        assert v.shape == (3, 4, 16, 16)
        level = (denormalize(v).mean(dim=(0, 2, 3)) * 255 / 20).round().tolist()
        assert level == [1, 3, 5, 7]  # centred: span 7 of 10 frames starts at 1
    level = (denormalize(ds[2]["video"]).mean(dim=(0, 2, 3)) * 255 / 20).round().tolist()
    assert level == [0, 2, 2, 2]  # a short clip repeats its last frame
    with pytest.warns(UserWarning, match="gone.npy: the clip file does not exist"):
        assert ds[3] is None
    # training: one random crop for the whole clip — a static clip stays static
    static = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 20, 24, 3), dtype=np.uint8), 6, axis=0)
    np.save(tmp_path / "static.npy", static)
    _write(tmp_path / "static.csv", "path,label\nstatic.npy,0\n")
    tr = VideoClips(str(tmp_path / "static.csv"), num_frames=4, stride=1, img_size=12, split="train")
    for _ in range(3):
        v = tr[0]["video"]
        assert all(torch.equal(v[:, 0], v[:, t]) for t in range(4))
    batch = data.collate([ds[0], None, ds[1]])
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["label"].tolist() == [1, 0]
