"""Real on-disk data formats, read with the standard library + PIL + numpy only.

  ImageTextFile  image–text pairs in CSV / TSV / JSONL (open_clip's csv convention: columns `filepath`
                 and `title`, configurable; mlfoundations/open_clip, src/training/data.py `CsvDataset`)
  TarShards      image–text tar shards in the webdataset layout (key.jpg + key.txt), an IterableDataset
                 that splits shards across ranks × DataLoader workers (webdataset/webdataset,
                 `split_by_node` / `split_by_worker` — here in a few lines of `tarfile`)
  ImageFolder    one subfolder per class -> prompts from class names (UniCL's image-label branch)
  CocoDetection  COCO `instances_*.json`: xywh -> xyxy, category names, iscrowd kept
  VQAv2          VQA v2 questions + annotations -> answer vocabulary and soft scores
  VideoClips     folders of frames or .npy arrays + a labels CSV, T frames sampled at a stride

Bad input never crashes a run deep in a stack trace:
  * a missing or corrupt image, an empty or non-UTF-8 caption -> a warning naming the file, the sample
    comes back as None; the collate functions drop it and count it, and the loader reports the count at
    the end of the epoch (`data.loader.Loader`);
  * a malformed index file (bad JSON line, ragged CSV row, missing column, not UTF-8) -> DataFormatError,
    one sentence naming the file, the line (or key) and the fix.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import re
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from meter import soft_target

from .transforms import DetectionTransform, VideoTransform, image_transform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataFormatError(ValueError):
    """An index/annotation file that cannot be read as the format it claims to be."""


# ----------------------------------------------------------------------------- shared helpers

WARN_LIMIT = 20


def load_image(path: str, data: bytes | None = None) -> tuple[Image.Image | None, str | None]:
    """Open an image file (or its bytes) as RGB -> (image, None), or (None, why) if missing or undecodable."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:  # closed even if decoding fails
            img.load()
            return img.convert("RGB"), None
    except FileNotFoundError:
        return None, f"skipping {path}: the image file does not exist; fix the path in the index or remove the row."
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, SyntaxError...
        return None, f"skipping {path}: the image cannot be decoded ({type(e).__name__}: {e}); replace or remove the file."


class SkipCounter:
    """Bad-sample bookkeeping shared by the datasets: `skipped` counts them (in this process — each
    DataLoader worker has its own copy, which is why the collate functions count the Nones too), and the
    first WARN_LIMIT of them are named in a warning; the rest are only counted."""

    skipped = 0
    _shown = 0

    def _skip(self, msg: str):
        self.skipped += 1
        self._shown += 1
        if self._shown <= WARN_LIMIT:
            tail = " (further bad samples are counted, not shown)" if self._shown == WARN_LIMIT else ""
            warnings.warn(msg + tail, stacklevel=3)
        return None

    def _image(self, path: str, data: bytes | None = None):
        img, why = load_image(path, data)
        return img if img is not None else self._skip(why)


def _read_utf8(path: str) -> str:
    """Whole text file as str; a non-UTF-8 file raises DataFormatError naming the byte offset."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; check the path given to the data spec.") from None
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # UTF-8 byte-order mark
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        off = start + e.start
        line = raw[:off].count(b"\n") + 1
        raise DataFormatError(
            f"{path} is not UTF-8 text: the byte 0x{raw[off]:02x} at byte offset {off} (line {line}) cannot be decoded; "
            f"re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None


def _load_json(path: str):
    text = _read_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                              f"fix the file (or re-download it).") from None


def _need(obj: dict, key: str, where: str, hint: str = ""):
    if not isinstance(obj, dict) or key not in obj:
        found = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataFormatError(f"{where} has no '{key}' (found: {found}){hint}.")
    return obj[key]


def _resolve(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _warn_dropped(path: str, what: str, lines: list[int]) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
        warnings.warn(f"{path}: skipped {len(lines)} rows with {what} (lines {shown}); they are not in the dataset.",
                      stacklevel=3)


# ----------------------------------------------------------------------------- image–text files

IMAGE_KEYS = ("filepath", "image", "image_path", "img", "file", "file_name", "filename", "path", "url")
CAPTION_KEYS = ("title", "caption", "text", "alt", "sentence")


def _pick(columns, key, candidates, path, what, flag):
    if key is not None:
        if key not in columns:
            raise DataFormatError(f"{path} has no {what} column '{key}' (columns found: {', '.join(columns)}); "
                                  f"pass {flag}=<one of those>.")
        return key
    for c in candidates:
        if c in columns:
            return c
    raise DataFormatError(f"{path} has no {what} column: none of {', '.join(candidates)} "
                          f"(columns found: {', '.join(columns)}); pass {flag}=<column>.")


def read_table(path: str, columns, sep: str | None = None):
    """Read a CSV/TSV file with a header -> (rows as tuples of the wanted columns, their line numbers).

    columns: [(what, key or None, candidate names, flag to set it)]; sep defaults to tab for .tsv, else comma.
    """
    sep = sep if sep is not None else ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
    sep = "\t" if sep in ("\\t", "tab") else sep
    reader = csv.reader(io.StringIO(_read_utf8(path), newline=""), delimiter=sep)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataFormatError(f"{path} is empty; it needs a header row naming the columns.") from None
    except csv.Error as e:
        raise DataFormatError(f"{path}, line 1: cannot parse the header ({e}).") from None
    idx = [header.index(_pick(header, key, cands, path, what, flag)) for what, key, cands, flag in columns]
    rows, lines = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFormatError(f"{path}, line {reader.line_num}: malformed CSV ({e}); fix the quoting "
                                  f"on that line.") from None
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(
                f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}); check the separator (sep={sep!r}) and the quoting of that line.")
        rows.append(tuple(row[i] for i in idx))
        lines.append(reader.line_num)
    return rows, lines


class ImageTextFile(SkipCounter, Dataset):
    """Image–text pairs listed in a CSV, TSV or JSONL file; image paths relative to that file (or `root`).

    Sample: {"image": (3, S, S) normalised, "text": str, "label": int (-1 without label_key)}.
    Columns: image_key / caption_key (default: open_clip's `filepath` / `title`, else the first of a few
    common names); label_key optional (ints, or class names -> indices into `.classes`).
    Rows with an empty caption are dropped when the file is read, with one warning and a count
    (`dropped_at_load`); a missing or corrupt image makes the sample None (dropped and counted by collate).
    """

    def __init__(self, path: str, img_size: int = 224, split: str = "train", image_key: str | None = None,
                 caption_key: str | None = None, label_key: str | None = None, sep: str | None = None,
                 root: str | None = None, transform=None):
        self.path, self.root = path, root if root is not None else os.path.dirname(os.path.abspath(path))
        self.transform = transform or image_transform(img_size, train=split == "train")
        rows, lines = (self._read_jsonl if path.lower().endswith((".jsonl", ".ndjson")) else self._read_csv)(
            path, image_key, caption_key, label_key, sep)
        self.images, self.captions, raw_labels, empty = [], [], [], []
        for (img, cap, lab), ln in zip(rows, lines):
            cap = (cap or "").strip()
            if not cap:
                empty.append(ln)
                continue
            self.images.append(img)
            self.captions.append(cap)
            raw_labels.append(lab)
        _warn_dropped(path, "an empty caption", empty)
        self.dropped_at_load = len(empty)
        self.classes, self.labels = self._labels(raw_labels, label_key)

    def _labels(self, raw, label_key):
        if label_key is None:
            return None, [-1] * len(raw)
        if all(re.fullmatch(r"-?\d+", str(v).strip()) for v in raw):
            return None, [int(v) for v in raw]
        classes = sorted({str(v).strip() for v in raw})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[str(v).strip()] for v in raw]

    @staticmethod
    def _read_csv(path, image_key, caption_key, label_key, sep):
        cols = [("image", image_key, IMAGE_KEYS, "image_key"), ("caption", caption_key, CAPTION_KEYS, "caption_key")]
        if label_key:
            cols.append(("label", label_key, (), "label_key"))
        rows, lines = read_table(path, cols, sep)
        return [r + (None,) * (3 - len(r)) for r in rows], lines

    @staticmethod
    def _read_jsonl(path, image_key, caption_key, label_key, sep):
        rows, lines, keys = [], [], None
        for n, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno}); "
                                      f"fix or remove that line.") from None
            if not isinstance(rec, dict):
                raise DataFormatError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}.")
            if keys is None:
                keys = (_pick(list(rec), image_key, IMAGE_KEYS, f"{path} (line {n})", "image", "image_key"),
                        _pick(list(rec), caption_key, CAPTION_KEYS, f"{path} (line {n})", "caption", "caption_key"))
            for k in keys + ((label_key,) if label_key else ()):
                if k not in rec:
                    raise DataFormatError(f"{path}, line {n}: no key '{k}' (keys found: {', '.join(rec)}).")
            cap = rec[keys[1]]
            rows.append((str(rec[keys[0]]), "" if cap is None else str(cap), rec.get(label_key) if label_key else None))
            lines.append(n)
        return rows, lines

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = _resolve(self.root, self.images[i])
        img = self._image(path)
        if img is None:
            return None
        return {"image": self.transform(img), "text": self.captions[i], "label": self.labels[i]}


# ----------------------------------------------------------------------------- tar shards

def expand_shards(spec: str | list[str]) -> list[str]:
    """A directory (all *.tar inside), a glob, a brace range `shard-{000..099}.tar`, or a list of those."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")) + glob.glob(os.path.join(spec, "*.tar.gz")))
        if not found:
            raise FileNotFoundError(f"{spec} contains no .tar shards; write shards as key.jpg + key.txt tar files there.")
        return found
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        a, b, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(a, b + 1) for p in expand_shards(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])]
    if any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches {spec}; check the pattern.")
        return found
    return [spec]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension."""
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    i = base.index(".")
    return posixpath.join(d, base[:i]), base[i + 1:].lower()


def iter_tar_groups(path: str):
    """Yield (key, {ext: bytes}) for consecutive members sharing a key; (None, error) if the shard breaks."""
    try:
        with tarfile.open(path, "r|*") as tf:
            key, group = None, {}
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split_key(m.name)
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext] = tf.extractfile(m).read()
            if key is not None:
                yield key, group
    except FileNotFoundError:
        yield None, f"shard {path} does not exist; check the shard list."
    except (tarfile.TarError, EOFError, OSError) as e:
        yield None, f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}); the rest of it is skipped."


class TarShards(SkipCounter, IterableDataset):
    """Image–text tar shards (webdataset layout: key.jpg + key.txt [+ key.cls]), streamed once per epoch.

    Splitting: the G = world_size × num_workers readers each get a global id g = rank·num_workers + worker.
    With at least G shards, reader g takes shards g, g+G, g+2G, ... of this epoch's shard order; with
    fewer shards, every reader walks all shards and keeps samples g, g+G, ... . Either way every sample is
    read by exactly one reader per epoch. The shard order (shuffle=True) and a shuffle buffer of raw
    samples (decoded after shuffling, so the buffer holds JPEG bytes, not tensors) are seeded by
    (seed, epoch): call `set_epoch` (make_loader's Loader does) for a new order each epoch.
    Under DDP, ranks can receive different numbers of samples when shards differ in size: keep shard
    sizes equal (and the shard count a multiple of G) so every rank runs the same number of steps.
    """

    def __init__(self, shards: str | list[str], img_size: int = 224, split: str = "train", transform=None,
                 shuffle: bool | None = None, shuffle_buffer: int = 1000, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, caption_ext: str = "txt"):
        self.shards = expand_shards(shards)
        self.transform = transform or image_transform(img_size, train=split == "train")
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer if self.shuffle else 0, seed, 0
        self.rank, self.world_size, self.caption_ext = rank, world_size, caption_ext

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _dist(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def assignment(self, rank: int, world_size: int, worker: int, num_workers: int):
        """-> (shards this reader opens, keep sample j of them iff j % stride == offset)."""
        G, g = world_size * num_workers, rank * num_workers + worker
        order = list(self.shards)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        if len(order) >= G:
            return order[g::G], 1, 0
        return order, G, g

    def raw_samples(self, rank: int, world_size: int, worker: int, num_workers: int):
        """Undecoded (shard, key, {ext: bytes}) of this reader, or (shard, None, error message)."""
        shards, stride, offset = self.assignment(rank, world_size, worker, num_workers)
        j = 0
        for shard in shards:
            for key, group in iter_tar_groups(shard):
                if key is None:  # a broken shard: reported by one reader only
                    if offset == 0:
                        yield shard, None, group
                    continue
                if j % stride == offset:
                    yield shard, key, group
                j += 1

    def samples(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1):
        """The decoded samples (or None for a bad one) reader (rank, worker) yields this epoch."""
        it = self.raw_samples(rank, world_size, worker, num_workers)
        if self.shuffle_buffer > 1:
            it = _shuffle_buffer(it, self.shuffle_buffer,
                                 np.random.default_rng([self.seed, self.epoch, rank, worker]))
        for shard, key, group in it:
            yield self.decode(shard, key, group)

    def decode(self, shard: str, key: str | None, group):
        if key is None:
            return self._skip(group)
        where = f"{shard}: sample '{key}'"
        img_ext = next((e for e in group if "." + e in IMAGE_EXTS), None)
        if img_ext is None or self.caption_ext not in group:
            return self._skip(f"skipping {where}: it needs an image and a .{self.caption_ext} caption, found "
                              f"{', '.join('.' + e for e in group) or 'nothing'}.")
        try:
            text = group[self.caption_ext].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return self._skip(f"skipping {where}: {key}.{self.caption_ext} is not UTF-8 (byte offset {e.start}); "
                              f"re-encode the caption as UTF-8.")
        if not text:
            return self._skip(f"skipping {where}: the caption {key}.{self.caption_ext} is empty.")
        img = self._image(f"{shard}:{key}.{img_ext}", group[img_ext])
        if img is None:
            return None
        label = -1
        if "cls" in group:
            try:
                label = int(group["cls"].decode("utf-8").strip())
            except ValueError:
                warnings.warn(f"{where}: {key}.cls is not an integer; label set to -1.", stacklevel=2)
        return {"image": self.transform(img), "text": text, "label": label}

    def __iter__(self):
        rank, world = self._dist()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.samples(rank, world, worker, num_workers)

    def num_samples(self) -> int:
        """Count complete samples in all shards by reading tar headers only (no decoding)."""
        n = 0
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r:*") as tf:
                    keys: dict[str, set] = {}
                    for m in tf.getmembers():
                        if m.isfile():
                            k, ext = _split_key(m.name)
                            keys.setdefault(k, set()).add(ext)
                    n += sum(1 for exts in keys.values()
                             if self.caption_ext in exts and any("." + e in IMAGE_EXTS for e in exts))
            except (tarfile.TarError, OSError, EOFError):
                pass
        return n


def _shuffle_buffer(it, size: int, rng: np.random.Generator):
    """Approximate shuffle of a stream: keep `size` items, emit a random one as each new one arrives."""
    buf = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    for j in rng.permutation(len(buf)):
        yield buf[j]


def write_shards(samples, directory: str, per_shard: int = 1000, prefix: str = "shard") -> list[str]:
    """Write (key, PIL image or JPEG bytes, caption[, label]) tuples as webdataset tar shards; returns the paths.

    Handy to convert a CSV dataset or to export synthetic data: `write_shards(((f"{i:08d}", img, txt) ...), dir)`.
    """
    os.makedirs(directory, exist_ok=True)
    paths, tf, n = [], None, 0

    def add(name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        tf.addfile(info, io.BytesIO(data))

    for sample in samples:
        if n % per_shard == 0:
            if tf is not None:
                tf.close()
            paths.append(os.path.join(directory, f"{prefix}-{len(paths):06d}.tar"))
            tf = tarfile.open(paths[-1], "w")
        key, img, text = sample[:3]
        if isinstance(img, Image.Image):
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            img = buf.getvalue()
        add(f"{key}.jpg", img)
        add(f"{key}.txt", text.encode("utf-8"))
        if len(sample) > 3 and sample[3] is not None:
            add(f"{key}.cls", str(int(sample[3])).encode())
        n += 1
    if tf is not None:
        tf.close()
    return paths


# ----------------------------------------------------------------------------- image–label folders

class ImageFolder(SkipCounter, Dataset):
    """root/<class>/<image>: one subfolder per class (sorted = label order), UniCL's image-label branch.

    `.classes` are the folder names with "_" read as spaces (or `class_names`, in sorted-folder order).
    text = template.format(class name) ("a photo of a {}."); with template=None the text is the bare name
    and `short` is True, so the training loop's prompt augmentation wraps it.
    """

    def __init__(self, root: str, img_size: int = 224, split: str = "train", template: str | None = "a photo of a {}.",
                 class_names: list[str] | None = None, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} is not a directory; an image folder needs one subfolder per class.")
        self.root, self.template = root, template
        self.folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.folders:
            raise DataFormatError(f"{root} has no subfolders; put each class's images in root/<class name>/.")
        if class_names is not None and len(class_names) != len(self.folders):
            raise DataFormatError(f"class_names has {len(class_names)} names but {root} has {len(self.folders)} "
                                  f"class folders; give one name per folder, in sorted folder order.")
        self.classes = list(class_names) if class_names is not None else [f.replace("_", " ") for f in self.folders]
        self.samples = []
        for label, folder in enumerate(self.folders):
            files = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(IMAGE_EXTS))
            if not files:
                warnings.warn(f"class folder {os.path.join(root, folder)} has no images.", stacklevel=2)
            self.samples += [(os.path.join(root, folder, f), label) for f in files]
        self.transform = transform or image_transform(img_size, train=split == "train")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = self._image(path)
        if img is None:
            return None
        name = self.classes[label]
        text = self.template.format(name) if self.template else name
        return {"image": self.transform(img), "text": text, "label": label, "short": self.template is None}


# ----------------------------------------------------------------------------- COCO detection

class CocoDetection(SkipCounter, Dataset):
    """COCO `instances_*.json` + an image directory -> detection samples.

    Boxes go from COCO's [x, y, w, h] to xyxy pixels, then through `DetectionTransform` (longer side to
    img_size, pad to a square, flip in training). Category ids map to contiguous labels in id order;
    `.classes` are the category names. iscrowd is kept (a loss or mAP ignores crowd boxes as COCO does);
    boxes with zero width or height are dropped.
    """

    def __init__(self, ann_file: str, image_root: str | None = None, img_size: int = 512, split: str = "train",
                 transform=None):
        data = _load_json(ann_file)
        where = f"{ann_file}"
        hint = "; is this a COCO instances_*.json file?"
        images = _need(data, "images", where, hint)
        anns = _need(data, "annotations", where, hint)
        cats = _need(data, "categories", where, hint)
        cats = sorted(cats, key=lambda c: _need(c, "id", f"{ann_file}: a category"))
        self.classes = [_need(c, "name", f"{ann_file}: category {c['id']}") for c in cats]
        self.cat_ids = [c["id"] for c in cats]
        cat_index = {c: i for i, c in enumerate(self.cat_ids)}
        self.images = []
        for i, im in enumerate(images):
            self.images.append((_need(im, "id", f"{ann_file}: images[{i}]"), _need(im, "file_name", f"{ann_file}: images[{i}]")))
        per_image: dict = {im_id: [] for im_id, _ in self.images}
        degenerate = 0
        for i, a in enumerate(anns):
            w = f"{ann_file}: annotations[{i}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
            im_id, cat, bbox = _need(a, "image_id", w), _need(a, "category_id", w), _need(a, "bbox", w)
            if cat not in cat_index:
                raise DataFormatError(f"{w} has category_id {cat}, which is not in 'categories'; fix the annotation.")
            if im_id not in per_image:
                raise DataFormatError(f"{w} refers to image_id {im_id}, which is not in 'images'; fix the annotation.")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                raise DataFormatError(f"{w} has bbox {bbox!r}; COCO boxes are [x, y, width, height].")
            x, y, bw, bh = map(float, bbox)
            if bw <= 0 or bh <= 0:
                degenerate += 1
                continue
            per_image[im_id].append((x, y, x + bw, y + bh, cat_index[cat], int(a.get("iscrowd", 0))))
        if degenerate:
            warnings.warn(f"{ann_file}: dropped {degenerate} boxes with zero width or height.", stacklevel=2)
        self.annotations = per_image
        self.image_root = image_root if image_root is not None else self._guess_root(ann_file)
        self.transform = transform or DetectionTransform(img_size, train=split == "train")

    def _guess_root(self, ann_file: str) -> str:
        """COCO layout: annotations/instances_val2017.json next to val2017/; else the JSON's own folder."""
        d = os.path.dirname(os.path.abspath(ann_file))
        m = re.match(r"instances_(\w+)\.json$", os.path.basename(ann_file))
        for cand in ([os.path.join(os.path.dirname(d), m.group(1)), os.path.join(d, m.group(1))] if m else []) + [d]:
            if self.images and os.path.exists(os.path.join(cand, self.images[0][1])):
                return cand
        return d

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        im_id, name = self.images[i]
        img = self._image(os.path.join(self.image_root, name))
        if img is None:
            return None
        rows = self.annotations[im_id]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        w, h = img.size
        x, boxes, info = self.transform(img, boxes)
        return {"image": x, "boxes": boxes, "labels": torch.tensor([r[4] for r in rows], dtype=torch.long),
                "iscrowd": torch.tensor([r[5] for r in rows], dtype=torch.long), "image_id": im_id,
                "orig_size": (h, w), "scale": info["scale"], "flipped": info["flipped"]}


# ----------------------------------------------------------------------------- VQA v2

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(ans: str) -> str:
    """The gist of the official VQA answer normalisation (GT-Vision-Lab/VQA,
    PythonEvaluationTools/vqaEvaluation/vqaEval.py processPunctuation / processDigitArticle):
    lower case, punctuation removed (a decimal point kept), number words as digits, articles dropped."""
    a = ans.lower().replace("\n", " ").replace("\t", " ").strip()
    a = re.sub(r"\.(?!\d)", "", a)  # a period not followed by a digit (vqaEval's periodStrip in effect)
    a = re.sub(r"(?<=\d),(?=\d)", "", a)  # 1,000 -> 1000
    a = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$']", " ", a)
    words = [_NUMBER_WORDS.get(w, w) for w in a.split() if w not in _ARTICLES]
    return " ".join(words)


class VQAv2(SkipCounter, Dataset):
    """VQA v2: `v2_OpenEnded_mscoco_<split>_questions.json` [+ `v2_mscoco_<split>_annotations.json`] + images.

    Answer vocabulary: the normalised majority answers (`multiple_choice_answer`) seen at least
    `min_count` times (9 gives the usual 3,129 on train+val), most frequent first; pass `answers=` to
    reuse the training vocabulary for evaluation. target[a] = vqa_score(#annotators who said a):
    0/.3/.6/.9/1 for 0/1/2/3/≥4 of 10, answers outside the vocabulary score nothing.
    Images: `image_root/COCO_<data_subtype>_<image_id:012d>.jpg` unless `image_pattern` says otherwise
    (a format string with {image_id} and {subtype}).
    """

    def __init__(self, questions_file: str, annotations_file: str | None = None, image_root: str | None = None,
                 img_size: int = 384, split: str = "train", answers: list[str] | None = None, min_count: int = 9,
                 image_pattern: str | None = None, transform=None):
        qdata = _load_json(questions_file)
        questions = _need(qdata, "questions", questions_file, "; is this a VQA questions file?")
        subtype = qdata.get("data_subtype", "")
        self.image_pattern = image_pattern or ("COCO_{subtype}_{image_id:012d}.jpg" if subtype else "{image_id}.jpg")
        self.subtype = subtype
        self.image_root = image_root or self._guess_root(questions_file, subtype)
        ann_by_q = {}
        if annotations_file is not None:
            adata = _load_json(annotations_file)
            for i, a in enumerate(_need(adata, "annotations", annotations_file, "; is this a VQA annotations file?")):
                w = f"{annotations_file}: annotations[{i}]"
                ann_by_q[_need(a, "question_id", w)] = a
                for j, ans in enumerate(_need(a, "answers", w)):
                    _need(ans, "answer", f"{w}.answers[{j}]")
        self.items, missing = [], 0
        for i, q in enumerate(questions):
            w = f"{questions_file}: questions[{i}]"
            qid, im_id, text = _need(q, "question_id", w), _need(q, "image_id", w), _need(q, "question", w)
            a = ann_by_q.get(qid)
            if annotations_file is not None and a is None:
                missing += 1
                continue
            ans = [normalize_answer(x["answer"]) for x in a["answers"]] if a else []
            major = normalize_answer(a.get("multiple_choice_answer", "")) if a else ""
            self.items.append((qid, im_id, text, ans, major))
        if missing:
            warnings.warn(f"{questions_file}: {missing} questions have no annotation in {annotations_file}; "
                          f"they are skipped.", stacklevel=2)
        if answers is None:
            counts: dict[str, int] = {}
            for *_, major in self.items:
                if major:
                    counts[major] = counts.get(major, 0) + 1
            answers = sorted((a for a, k in counts.items() if k >= min_count), key=lambda a: (-counts[a], a))
            if annotations_file is not None and not answers:
                warnings.warn(f"no answer occurs {min_count} times in {annotations_file}; lower min_count.", stacklevel=2)
        self.answers = list(answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self.transform = transform or image_transform(img_size, train=split == "train")

    @staticmethod
    def _guess_root(questions_file: str, subtype: str) -> str:
        d = os.path.dirname(os.path.abspath(questions_file))
        for cand in ([os.path.join(d, subtype), os.path.join(os.path.dirname(d), subtype)] if subtype else []):
            if os.path.isdir(cand):
                return cand
        return d

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        qid, im_id, question, answers, major = self.items[i]
        path = os.path.join(self.image_root, self.image_pattern.format(image_id=im_id, subtype=self.subtype))
        img = self._image(path)
        if img is None:
            return None
        return {"image": self.transform(img), "question": question, "answers": answers,
                "target": soft_target(answers, self.answer_index), "question_id": qid}


# ----------------------------------------------------------------------------- video clips

class VideoClips(SkipCounter, Dataset):
    """A labels CSV (columns `path`, `label`) listing clips as folders of frame images or .npy arrays
    (T, H, W, 3) uint8; paths relative to the CSV (or `root`). Kinetics-style lists convert to this with
    one line per clip.

    `num_frames` frames are taken `stride` apart: from a random start in training, centred in evaluation;
    a clip shorter than the span repeats its last frame. Labels are class names (-> indices into the sorted
    `.classes`, or into `classes=` if given) or integers. Sample: {"video": (3, T, S, S), "label": int}.
    """

    def __init__(self, labels_csv: str, root: str | None = None, num_frames: int = 8, stride: int = 2,
                 img_size: int = 64, split: str = "train", path_key: str = "path", label_key: str = "label",
                 classes: list[str] | None = None, transform=None):
        self.root = root if root is not None else os.path.dirname(os.path.abspath(labels_csv))
        rows, _ = read_table(labels_csv, [("clip path", path_key, ("path", "filepath", "video"), "path_key"),
                                          ("label", label_key, ("label", "class"), "label_key")])
        self.paths = [r[0] for r in rows]
        raw = [r[1].strip() for r in rows]
        if classes is None:
            if all(re.fullmatch(r"\d+", v) for v in raw):
                classes = [str(i) for i in range(max(map(int, raw), default=-1) + 1)]
            else:
                classes = sorted(set(raw))
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({v for v in raw if v not in index})
        if unknown:
            raise DataFormatError(f"{labels_csv}: labels {', '.join(unknown[:5])} are not in the class list; "
                                  f"add them to classes= or fix the CSV.")
        self.labels = [index[v] for v in raw]
        self.num_frames, self.stride, self.train = num_frames, stride, split == "train"
        self.transform = transform or VideoTransform(img_size, train=self.train)

    def __len__(self) -> int:
        return len(self.paths)

    def frame_indices(self, n: int) -> list[int]:
        span = (self.num_frames - 1) * self.stride + 1
        slack = max(0, n - span)
        start = int(torch.randint(0, slack + 1, (1,))) if self.train else slack // 2
        return [min(start + k * self.stride, n - 1) for k in range(self.num_frames)]

    def _frames(self, path: str):
        if path.lower().endswith(".npy"):
            try:
                arr = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                return self._skip(f"skipping {path}: the clip file does not exist; fix the path in the labels CSV.")
            except Exception as e:
                return self._skip(f"skipping {path}: cannot read the array ({type(e).__name__}: {e}); "
                                  f"re-save it with np.save.")
            if arr.ndim not in (3, 4) or len(arr) == 0:
                return self._skip(f"skipping {path}: expected frames (T, H, W[, 3]), got shape {arr.shape}.")
            frames = [np.asarray(arr[i]) for i in self.frame_indices(len(arr))]
            return [Image.fromarray(f.astype(np.uint8)).convert("RGB") for f in frames]
        if not os.path.isdir(path):
            return self._skip(f"skipping {path}: no such frame folder or .npy file; fix the path in the labels CSV.")
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            return self._skip(f"skipping {path}: the folder has no frame images.")
        frames = []
        for i in self.frame_indices(len(files)):
            img, why = load_image(os.path.join(path, files[i]))
            if img is None:
                return self._skip(why)
            frames.append(img)
        return frames

    def __getitem__(self, i: int):
        frames = self._frames(_resolve(self.root, self.paths[i]))
        if frames is None:
            return None
        return {"video": self.transform(frames), "label": self.labels[i]}
