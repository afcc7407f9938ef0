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
from data import (SKIP_KINDS, CocoDetection, DataFormatError, ImageFolder, ImageTextFile, ShapesText, TarShards,
                  VideoClips, VQAv2, build_dataset, collate_image_text, make_loader, normalize_answer, write_shards)
from data.formats import load_image
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
    assert len(ds) == 5 and ds.path_rule == "beside the index file"
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
    assert ds.last_skip[0] == "missing" and "missing.png" in ds.last_skip[1]
    with pytest.warns(UserWarning, match="corrupt.png: the image cannot be decoded"):
        assert ds[2] is None
    assert ds.last_skip[0] == "undecodable" and "corrupt.png" in ds.last_skip[1]
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


def test_relative_paths_beside_the_file_else_the_working_directory(tmp_path, shapes, monkeypatch):
    for i in range(3):
        _save(shapes.image_uint8(i), tmp_path / "imgs" / f"{i}.png")
    path = _write(tmp_path / "lists" / "pairs.csv", "filepath,title\n" + "".join(
        f"imgs/{i}.png,shape {i}\n" for i in range(3)))  # open_clip style: relative to where the run starts
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"pairs.csv: image paths are read relative to the working directory"):
        ds = ImageTextFile(path, img_size=S, split="val")
    assert ds.path_rule == "the working directory" and "3 of the first 3" in ds.path_note
    monkeypatch.chdir(tmp_path / "lists")  # decided once, as an absolute folder: a later chdir changes nothing
    assert torch.equal(ds[2]["image"], shapes[2]["image"])
    with pytest.warns(UserWarning, match=r"none of the first 3 image paths it lists exists.*pass root="):
        lost = ImageTextFile(path, img_size=S, split="val")
    assert lost.path_rule is None
    with pytest.warns(UserWarning, match="does not exist"):
        assert lost[0] is None
    assert lost.last_skip[0] == "missing"
    given = ImageTextFile(path, img_size=S, split="val", root=str(tmp_path))
    assert given.path_rule == "the given root" and given[1]["text"] == "shape 1"
    # the labels CSV of VideoClips follows the same rule
    os.makedirs(tmp_path / "clips")
    np.save(tmp_path / "clips" / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
    labels = _write(tmp_path / "lists" / "labels.csv", "path,label\nclips/a.npy,wave\n")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="clip paths are read relative to the working directory"):
        clips = VideoClips(labels, num_frames=2, img_size=8, split="val")
    assert clips.path_rule == "the working directory" and clips[0]["video"].shape == (3, 2, 8, 8)


def test_an_unclosed_quote_names_its_line_instead_of_swallowing_rows(tmp_path):
    rows = [f"{i}.png,caption {i}" for i in range(40)]
    good = _write(tmp_path / "good.csv", "filepath,title\n" + "\n".join(
        rows[:3] + ['3.png,"a caption, with a comma and ""quotes"""'] + rows[4:]) + "\n")
    with pytest.warns(UserWarning, match="none of the first 32 image paths"):  # no images here, just rows
        ds = ImageTextFile(good)
    assert len(ds) == 40 and ds.caption(3) == 'a caption, with a comma and "quotes"'
    rows[4] = '4.png,"an unclosed caption'  # line 6 (the header is line 1)
    p = _write(tmp_path / "open.csv", "filepath,title\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=r"open.csv, line 6: a quote opened on that line is not closed on "
                                              r"it, so the field runs on to the end of the file; close the quote "
                                              r"on line 6"):
        ImageTextFile(p)
    rows[8] = '8.png,a stray quote" here'  # a later quote closes the field: 40 rows would read as 36
    p = _write(tmp_path / "closed.csv", "filepath,title\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=r"closed.csv, line 6: .* runs on to line 10;"):
        ImageTextFile(p)
    p = _write(tmp_path / "eof.tsv", 'filepath\ttitle\na.png\tfine\nb.png\t"no end')  # no final newline
    with pytest.raises(DataFormatError, match=r"eof.tsv, line 3: .* runs on to the end of the file"):
        ImageTextFile(p)
    p = _write(tmp_path / "head.csv", 'filepath,"title\na.png,x\n')
    with pytest.raises(DataFormatError, match=r"head.csv, line 1: a quote opened on that line"):
        ImageTextFile(p)
    p = _write(tmp_path / "video.csv", 'path,label\na.npy,"wave\nb.npy,clap\n')
    with pytest.raises(DataFormatError, match=r"video.csv, line 2: a quote opened"):
        VideoClips(p)


def test_column_names_match_ignoring_case(tmp_path, shapes):
    _save(shapes.image_uint8(0), tmp_path / "0.png")
    ds = ImageTextFile(_write(tmp_path / "a.csv", "FilePath,Title\n0.png,zero\n"), img_size=S, split="val")
    assert ds[0]["text"] == "zero"
    ds = ImageTextFile(_write(tmp_path / "b.tsv", "IMG\tCaption\tLabel\n0.png\tzero\tcat\n"), img_size=S,
                       split="val", image_key="img", caption_key="caption", label_key="label")
    assert ds[0]["text"] == "zero" and ds.classes == ["cat"]
    ds = ImageTextFile(_write(tmp_path / "c.jsonl", '{"Image": "0.png", "TEXT": "zero", "Label": 3}\n'),
                       img_size=S, split="val", label_key="label")
    assert ds[0]["text"] == "zero" and ds[0]["label"] == 3
    assert ImageTextFile(_write(tmp_path / "d.csv", "title,Title,filepath\nexact,other,0.png\n")).caption(0) == "exact"
    with pytest.raises(DataFormatError, match=r"e.csv has 2 caption columns that differ only in case \(Title, TITLE\)"):
        ImageTextFile(_write(tmp_path / "e.csv", "filepath,Title,TITLE\n0.png,a,b\n"))
    np.save(tmp_path / "c.npy", np.zeros((2, 8, 8, 3), np.uint8))
    clips = VideoClips(_write(tmp_path / "v.csv", "Video,Class\nc.npy,wave\n"), num_frames=2, img_size=8)
    assert clips.classes == ["wave"] and clips[0]["video"].shape == (3, 2, 8, 8)


# ----------------------------------------------------------------------------- reading images as they are

def test_16_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    a8 = np.tile(np.arange(256, dtype=np.uint8), (8, 1))  # every grey level
    a16 = np.clip(a8.astype(np.int64) * 257 + rng.integers(-120, 121, a8.shape), 0, 65535).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    got, _ = load_image(str(tmp_path / "deep.png"))
    g = np.asarray(got).astype(int)
    assert g.shape == (8, 256, 3) and abs(g.mean() - a8.mean()) <= 1 and np.abs(g[..., 0] - a8).max() <= 1
    Image.fromarray(a16.astype(np.int32), "I").save(tmp_path / "deep32.tif")  # mode "I" holding 16-bit values
    assert np.abs(np.asarray(load_image(str(tmp_path / "deep32.tif"))[0])[..., 1].astype(int) - a8).max() <= 1
    dim = a8 // 2  # float in [0, 1] (max 0.5 here): ×255, not stretched to its max
    Image.fromarray(dim.astype(np.float32) / 255, "F").save(tmp_path / "unit.tif")
    assert np.abs(np.asarray(load_image(str(tmp_path / "unit.tif"))[0])[..., 2].astype(int) - dim).max() <= 1
    Image.fromarray(a8.astype(np.float32) * 4.0, "F").save(tmp_path / "wide.tif")  # float beyond 1: by its max
    assert np.abs(np.asarray(load_image(str(tmp_path / "wide.tif"))[0])[..., 0].astype(int) - a8).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((24, 48, 3), np.uint8)  # H=24, W=48; the top-left quarter is white
    arr[:12, :24] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    Image.fromarray(arr).save(tmp_path / "plain.jpg", quality=95)
    img, _ = load_image(str(tmp_path / "phone.jpg"))
    assert img.size == (24, 48)  # (W, H): standing up
    expected = np.rot90(arr, k=-1)  # clockwise: the white quarter is now top-right
    assert np.abs(np.asarray(img).astype(int) - expected).mean() < 4
    assert load_image(str(tmp_path / "plain.jpg"))[0].size == (48, 24)


def test_float_and_16_bit_clip_arrays_are_scaled(tmp_path):
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", clip)
    np.save(tmp_path / "unit.npy", clip.astype(np.float32) / 255)      # float in [0, 1]
    np.save(tmp_path / "f255.npy", clip.astype(np.float32))           # float already in [0, 255]
    np.save(tmp_path / "u16.npy", clip.astype(np.uint16) * 257)       # 16-bit
    np.save(tmp_path / "grey.npy", clip[..., :1])                     # (T, H, W, 1)
    np.save(tmp_path / "dark16.npy", clip.astype(np.uint16))           # 16-bit, all below 256: near black
    np.save(tmp_path / "bad.npy", np.zeros((4, 16, 16, 2), np.uint8))
    names = ["u8", "unit", "f255", "u16", "grey", "dark16", "bad"]
    ds = VideoClips(_write(tmp_path / "l.csv", "path,label\n" + "".join(f"{n}.npy,x\n" for n in names)),
                    num_frames=4, stride=1, img_size=16, split="val")
    ref = denormalize(ds[0]["video"])
    for i in (1, 2, 3):
        assert (denormalize(ds[i]["video"]) - ref).abs().max() <= 1.01 / 255  # within rounding
    grey = denormalize(ds[4]["video"])
    assert (grey - ref[:1]).abs().max() <= 1.01 / 255 and torch.allclose(grey[0], grey[2], atol=1e-6)
    assert denormalize(ds[5]["video"]).max() <= 1.01 / 255  # 255 / 257 rounds to 1
    with pytest.warns(UserWarning, match=r"bad.npy: expected frames \(T, H, W\) or \(T, H, W, 3\)"):
        assert ds[6] is None
    assert ds.last_skip[0] == "malformed"


def test_hidden_files_and_folders_are_never_classes_or_samples(tmp_path, shapes):
    for i in range(4):
        _save(shapes.image_uint8(i), tmp_path / ("cat" if i % 2 else "dog") / f"{i}.png")
    _save(shapes.image_uint8(5), tmp_path / ".ipynb_checkpoints" / "5-checkpoint.png")
    _save(shapes.image_uint8(6), tmp_path / "__MACOSX" / "cat" / "6.png")
    (tmp_path / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    _save(shapes.image_uint8(7), tmp_path / "dog" / ".hidden.png")
    ds = ImageFolder(str(tmp_path), img_size=S, split="val")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert all(not os.path.basename(p).startswith(".") for p, _ in ds.samples)
    # frame folders of a clip, and tar shards, pass over hidden files too
    for t in range(3):
        _save(np.full((8, 8, 3), 40 * t, np.uint8), tmp_path / "clip" / f"{t:04d}.png")
    (tmp_path / "clip" / "._0000.png").write_bytes(b"junk")
    clips = VideoClips(_write(tmp_path / "v.csv", "path,label\nclip,a\n"), num_frames=3, stride=1, img_size=8,
                       split="val")
    level = (denormalize(clips[0]["video"]).mean(dim=(0, 2, 3)) * 255 / 40).round().tolist()
    assert level == [0, 1, 2] and clips.skipped == 0
    with tarfile.open(tmp_path / "mac.tar", "w") as tf:
        for name, payload in [("._a.jpg", b"junk"), ("a.jpg", _jpeg(shapes.image_uint8(0))), ("a.txt", b"fine")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    shards = TarShards([str(tmp_path / "mac.tar")], img_size=S, split="val")
    assert [s["text"] for s in shards] == ["fine"] and shards.skipped == 0 and shards.num_samples() == 1


# ----------------------------------------------------------------------------- skip kinds and captions

def test_every_skip_names_its_kind(tmp_path, shapes):
    assert set(SKIP_KINDS) == {"missing", "undecodable", "empty", "malformed", "truncated"}
    np.save(tmp_path / "bad_shape.npy", np.zeros((3, 4), np.uint8))
    (tmp_path / "not_an_array.npy").write_bytes(b"not numpy")
    os.makedirs(tmp_path / "no_frames")
    _save(shapes.image_uint8(0), tmp_path / "broken_frame" / "0000.png")
    (tmp_path / "broken_frame" / "0001.png").write_bytes(b"not a png")
    rows = ["gone.npy", "bad_shape.npy", "not_an_array.npy", "no_frames", "no_folder", "broken_frame"]
    ds = VideoClips(_write(tmp_path / "l.csv", "path,label\n" + "".join(f"{r},x\n" for r in rows)),
                    num_frames=2, stride=1, img_size=8, split="val")
    kinds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(ds)):
            assert ds[i] is None
            kinds.append(ds.last_skip[0])
    assert kinds == ["missing", "malformed", "undecodable", "malformed", "missing", "undecodable"]
    assert ds.skipped == 6 and sum(ds.skip_counts.values()) == 6 and set(ds.skip_counts) <= set(SKIP_KINDS)
    with pytest.raises(ValueError, match="unknown skip kind 'oops'"):
        ds._skip("x", "oops")


def test_captions_are_read_without_opening_images_or_spending_warnings(tmp_path, shapes):
    rows = ["filepath,title"] + [f"missing{i}.png,caption {i}" for i in range(data.formats.WARN_LIMIT + 5)]
    _save(shapes.image_uint8(0), tmp_path / "real.png")
    rows.append("real.png,the real one")
    ds = ImageTextFile(_write(tmp_path / "p.csv", "\n".join(rows) + "\n"), img_size=S, split="val")
    assert ds.path_rule == "beside the index file"  # one of the first 32 paths is found there
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        texts = [ds.caption(i) for i in range(len(ds))]
    assert texts[:2] == ["caption 0", "caption 1"] and texts[-1] == "the real one"
    assert w == [] and ds.skipped == 0 and ds.last_skip is None
    with pytest.warns(UserWarning, match="missing0.png: the image file does not exist"):  # still the first warning
        assert ds[0] is None
    folder = tmp_path / "folder"
    _save(shapes.image_uint8(1), folder / "red_circle" / "0.png")
    assert ImageFolder(str(folder)).caption(0) == "a photo of a red circle."
    paths, n = _shards(tmp_path, shapes, 2, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        caps = list(TarShards(paths).captions())
    assert caps == [f"caption {i}" for i in range(n)] and w == []
    assert list(TarShards(paths).captions(limit=4)) == [f"caption {i}" for i in range(4)]


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
    ds = TarShards([str(path)], img_size=S, split="val")
    kinds = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = []
        for s in ds:  # last_skip is set on the dataset before each None is yielded
            out.append(s)
            if s is None:
                kinds.append(ds.last_skip[0])
    msgs = " | ".join(str(x.message) for x in w)
    assert "sample 'b'" in msgs and "found .jpg" in msgs
    assert "c.txt is not UTF-8 (byte offset 3)" in msgs
    assert "caption d.txt is empty" in msgs and "e.jpg: the image cannot be decoded" in msgs
    assert kinds == ["malformed", "undecodable", "empty", "undecodable"]
    assert ds.skip_counts == {"malformed": 1, "undecodable": 2, "empty": 1}
    batch = collate_image_text(out)
    assert batch["text"] == ["fine", "also fine"] and batch["skipped"] == 4


def test_truncated_shard_says_the_rest_is_lost_after_n_samples(tmp_path, shapes):
    paths, _ = _shards(tmp_path, shapes, 1, 6)
    with tarfile.open(paths[0]) as tf:
        offsets = [m.offset for m in tf.getmembers()]  # each sample is key.jpg, key.txt, key.cls
    raw = open(paths[0], "rb").read()
    (tmp_path / "trunc.tar").write_bytes(raw[:offsets[3 * 4] + 700])  # 4 whole samples, then cut inside a jpg
    ds = TarShards([str(tmp_path / "trunc.tar")], img_size=S, split="val")
    with pytest.warns(UserWarning, match=r"the rest of shard .*trunc.tar is lost \(after 4 samples\)"):
        out = list(ds)
    assert [s["text"] for s in out[:-1]] == [f"caption {i}" for i in range(4)] and out[-1] is None
    assert ds.last_skip[0] == "truncated" and ds.skip_counts == {"truncated": 1}
    gone = TarShards([str(tmp_path / "nowhere.tar")], img_size=S, split="val")
    with pytest.warns(UserWarning, match="nowhere.tar does not exist"):
        assert list(gone) == [None]
    assert gone.last_skip[0] == "missing"


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


# expected values worked out by hand from GT-Vision-Lab/VQA vqaEval.py (master): punct has no apostrophe,
# colon, & % $ # * ^; a mark touching a space, or any mark when a digit-comma-digit is present, is deleted,
# otherwise it becomes a space; periodStrip deletes a period not followed by a digit; then lower case,
# manualMap (number words), articles dropped, the contractions map per word.
@pytest.mark.parametrize("raw, expected", [
    ("dont", "don't"), ("Dont.", "don't"), ("don't know", "don't know"), ("it's", "it's"),
    ("isn't it?", "isn't it"),               # '?' touches no space: replaced by a space, then split away
    ("50%", "50%"), ("black & white", "black & white"), ("black and white", "black and white"),
    ("black/white", "black white"), ("red,white", "red white"), ("t-shirt", "t shirt"),
    ("hot-dog, mustard", "hot dog mustard"),  # ', ' touches a space: deleted; '-' does not: a space
    ("1,000", "1000"), ("1, 2", "1 2"), ("1,000-2,000", "10002000"),  # digit,digit: every mark deleted
    ("yes.", "yes"), ("3.5", "3.5"), ("2.", "2"), ("Mr.Smith", "mrsmith"), ("yes\n", "yes"),
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("eleven", "eleven"),
    ("a dog", "dog"), ("The", ""), ("an apple on the table", "apple on table"),
    ("Im", "im"),  # the evaluator's capitalised keys ("Im", "Ive") never match after lower-casing
    ("." * 40, "." * 8),  # its re.UNICODE (= 32) lands in periodStrip.sub's count: at most 32 periods go
])
def test_normalize_answer_follows_the_official_evaluator(raw, expected):
    assert normalize_answer(raw) == expected


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
