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
    the end of the epoch (`data.loader.Loader`). Just before returning (or yielding) that None the dataset
    sets `last_skip = (kind, message)`, kind one of SKIP_KINDS, so a caller can count skips by kind;
  * a malformed index file (bad JSON line, ragged CSV row, unterminated quote, missing column, not UTF-8)
    -> DataFormatError, one sentence naming the file, the line (or key) and the fix.

Images are read as they are: EXIF orientation applied, 16-bit and float images rescaled to 8 bits by their
range (not clipped), float / 16-bit video arrays likewise. Relative paths in an index file are looked up
beside that file, else in the working directory (open_clip's convention); `path_rule` says which was used.
Hidden files and folders (".*", "__MACOSX") are never samples or classes.
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
import types
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from meter import soft_target

from .transforms import DetectionTransform, VideoTransform, image_transform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataFormatError(ValueError):
    """An index/annotation file that cannot be read as the format it claims to be."""


# ----------------------------------------------------------------------------- shared helpers

WARN_LIMIT = 20

# Why a sample came back as None: `dataset.last_skip = (kind, message)`, kind one of these words.
SKIP_KINDS = {
    "missing": "the file is not there (image, clip, frame folder or shard not found)",
    "undecodable": "the bytes cannot be decoded (image, array, or a caption that is not UTF-8)",
    "empty": "the caption is empty",
    "malformed": "the sample has the wrong shape or lacks a member (no caption, no frames, bad array shape)",
    "truncated": "a shard is cut short: the rest of it is lost (how many samples that was is unknown)",
}


class BadSample(Exception):
    """A sample that cannot be read: `kind` (one of SKIP_KINDS) and a message naming the file and the fix."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def is_hidden(name: str) -> bool:
    """Hidden files and folders never hold samples: '.ipynb_checkpoints', '._x.jpg' (macOS), '__MACOSX'."""
    return name.startswith(".") or name == "__MACOSX"


def to_uint8(a: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """Pixel values of any numeric dtype -> uint8, rescaled by their range, never clipped at 255:
    uint16 (or sixteen_bit=True, e.g. PIL mode "I" from a 16-bit PNG) -> /257 (65535 -> 255);
    float in [0, 1] -> ×255; float (or int) up to 255 -> as is; larger ranges -> by their max."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    x = np.nan_to_num(np.asarray(a, dtype=np.float64))
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if a.dtype.kind == "f":
        scale = 255.0 if lo >= 0 and hi <= 1 else 1.0 if hi <= 255 else 255.0 / hi
    elif (a.dtype.kind == "u" and a.dtype.itemsize == 2) or sixteen_bit:  # uint16, either byte order
        scale = 1 / 257 if hi <= 65535 else 255.0 / hi
    else:
        scale = 1.0 if hi <= 255 else 1 / 257 if hi <= 65535 else 255.0 / hi
    return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


def _as_rgb(img: Image.Image) -> Image.Image:
    """RGB in 8 bits. 16-bit grayscale ("I;16*", "I") is divided by 257; float ("F") in [0, 1] is ×255,
    other floats are scaled by their max (PIL's own convert clips both, so a 16-bit PNG comes out white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray(to_uint8(np.asarray(img), sixteen_bit=True), "L").convert("RGB")
    if img.mode == "F":
        x = np.nan_to_num(np.asarray(img, dtype=np.float32))
        hi = float(x.max()) if x.size else 0.0
        x = x * 255.0 if x.min() >= 0 and hi <= 1 else x * (255.0 / hi if hi > 0 else 0.0)
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decode_image(path: str, data: bytes | None = None) -> Image.Image:
    """Open an image file (or its bytes) as 8-bit RGB, upright (EXIF orientation applied); raises BadSample."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:  # closed even if decoding fails
            img.load()
            try:
                if img.getexif().get(0x0112, 1) != 1:  # a camera's "rotate 90°" tag: stand the photo up
                    img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            return _as_rgb(img)
    except (FileNotFoundError, NotADirectoryError):
        raise BadSample("missing", f"skipping {path}: the image file does not exist; fix the path in the index "
                                   f"or remove the row.") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, SyntaxError...
        raise BadSample("undecodable", f"skipping {path}: the image cannot be decoded ({type(e).__name__}: {e}); "
                                       f"replace or remove the file.") from None


def load_image(path: str, data: bytes | None = None) -> tuple[Image.Image | None, str | None]:
    """decode_image as (image, None), or (None, why) if the image is missing or undecodable."""
    try:
        return decode_image(path, data), None
    except BadSample as e:
        return None, e.message


class SkipCounter:
    """Bad-sample bookkeeping shared by the datasets: `skipped` counts them (in this process — each
    DataLoader worker has its own copy, which is why the collate functions count the Nones too),
    `skip_counts` per kind, `last_skip` = (kind, message) of the latest (set before the None is returned),
    and the first WARN_LIMIT of them are named in a warning; the rest are only counted."""

    skipped = 0
    _shown = 0
    last_skip: tuple[str, str] | None = None
    skip_counts = types.MappingProxyType({})  # read-only until the first skip gives the instance its own dict

    def _skip(self, msg: str, kind: str = "undecodable"):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}; use one of {', '.join(SKIP_KINDS)}.")
        self.last_skip = (kind, msg)
        self.skipped += 1
        counts = self.__dict__.setdefault("skip_counts", {})
        counts[kind] = counts.get(kind, 0) + 1
        self._shown += 1
        if self._shown <= WARN_LIMIT:
            tail = " (further bad samples are counted, not shown)" if self._shown == WARN_LIMIT else ""
            warnings.warn(msg + tail, stacklevel=3)
        return None

    def _image(self, path: str, data: bytes | None = None):
        try:
            return decode_image(path, data)
        except BadSample as e:
            return self._skip(e.message, e.kind)


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


PATH_PROBE = 32  # how many of the first relative paths decide where an index file's paths are read from


def choose_path_base(index_file: str, paths, root: str | None = None, what: str = "image"):
    """Where the relative paths listed in `index_file` are read from -> (base folder, rule, one-line note).

    root given: that folder (rule "the given root"). Otherwise the first PATH_PROBE relative paths are
    looked up beside the index file and in the working directory (open_clip's CsvDataset reads paths as
    written, i.e. relative to the working directory; mlfoundations/open_clip src/training/data.py), and the
    folder where more of them exist wins, the index file's own on a tie (rule "beside the index file" or
    "the working directory"). If none exists in either, rule is None and the note (also a warning) says so:
    those samples will be skipped as missing. Only relative paths are probed ("absolute paths" if none is)."""
    beside = os.path.dirname(os.path.abspath(index_file))
    if root is not None:
        return root, "the given root", f"{index_file}: {what} paths are read relative to root={root}."
    rel = [p for p in paths if p and not os.path.isabs(p)][:PATH_PROBE]
    if not rel:
        if any(paths):
            return beside, "absolute paths", f"{index_file}: {what} paths are absolute."
        return beside, "beside the index file", f"{index_file} lists no {what} paths."
    cwd = os.getcwd()
    hits_beside = sum(os.path.exists(os.path.join(beside, p)) for p in rel)
    hits_cwd = hits_beside if cwd == beside else sum(os.path.exists(os.path.join(cwd, p)) for p in rel)
    if hits_beside and hits_beside >= hits_cwd:
        return beside, "beside the index file", (f"{index_file}: {what} paths are read relative to its folder "
                                                 f"{beside} ({hits_beside} of the first {len(rel)} found there).")
    if hits_cwd:
        note = (f"{index_file}: {what} paths are read relative to the working directory {cwd} ({hits_cwd} of the "
                f"first {len(rel)} found there, {hits_beside} beside the index file).")
        warnings.warn(note, stacklevel=3)
        return cwd, "the working directory", note
    note = (f"{index_file}: none of the first {len(rel)} {what} paths it lists exists, neither beside it ({beside}) "
            f"nor in the working directory ({cwd}), e.g. {rel[0]!r}; those samples will be skipped as missing — "
            f"fix the paths, run from the folder they are relative to, or pass root=<that folder>.")
    warnings.warn(note, stacklevel=3)
    return beside, None, note


def _warn_dropped(path: str, what: str, lines: list[int]) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
        warnings.warn(f"{path}: skipped {len(lines)} rows with {what} (lines {shown}); they are not in the dataset.",
                      stacklevel=3)


# ----------------------------------------------------------------------------- image–text files

IMAGE_KEYS = ("filepath", "image", "image_path", "img", "file", "file_name", "filename", "path", "url")
CAPTION_KEYS = ("title", "caption", "text", "alt", "sentence")


def _pick(columns, key, candidates, path, what, flag):
    """The column for `key` (or the first of `candidates`), matched exactly, else ignoring case."""
    columns = list(columns)

    def find(name):
        if name in columns:
            return name
        hits = [c for c in columns if c.lower() == name.lower()]
        if len(hits) > 1:
            raise DataFormatError(f"{path} has {len(hits)} {what} columns that differ only in case "
                                  f"({', '.join(hits)}); rename one or pass {flag}=<the exact name>.")
        return hits[0] if hits else None

    if key is not None:
        found = find(key)
        if found is None:
            raise DataFormatError(f"{path} has no {what} column '{key}' (columns found: {', '.join(columns)}); "
                                  f"pass {flag}=<one of those>.")
        return found
    for c in candidates:
        found = find(c)
        if found is not None:
            return found
    raise DataFormatError(f"{path} has no {what} column: none of {', '.join(candidates)} "
                          f"(columns found: {', '.join(columns)}); pass {flag}=<column>.")


def read_table(path: str, columns, sep: str | None = None):
    """Read a CSV/TSV file with a header -> (rows as tuples of the wanted columns, their line numbers).

    columns: [(what, key or None, candidate names, flag to set it)], names matched ignoring case; sep
    defaults to tab for .tsv, else comma. Quoting is strict about lines: a quoted field may not span lines,
    so an unclosed quote is a DataFormatError naming the line it opened on (Python's csv module would
    otherwise read every following row into that one field).
    """
    sep = sep if sep is not None else ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
    sep = "\t" if sep in ("\\t", "tab") else sep
    text = _read_utf8(path)
    if text and not text.endswith(("\n", "\r")):
        text += "\n"  # so a quote left open on the last line shows up as a field holding a line break
    n_lines = len(io.StringIO(text, newline="").readlines())  # the lines csv counts (\n, \r\n or \r)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)

    def unclosed(start: int, end: int) -> DataFormatError:
        where = "the end of the file" if end >= n_lines else f"line {end}"
        return DataFormatError(
            f"{path}, line {start}: a quote opened on that line is not closed on it, so the field runs on to "
            f"{where}; close the quote on line {start} (a literal quote inside a quoted field is written \"\"), "
            f"or drop the quote character.")

    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataFormatError(f"{path} is empty; it needs a header row naming the columns.") from None
    except csv.Error as e:
        raise DataFormatError(f"{path}, line 1: cannot parse the header ({e}).") from None
    if reader.line_num > 1 or any("\n" in h or "\r" in h for h in header):
        raise unclosed(1, reader.line_num)
    idx = [header.index(_pick(header, key, cands, path, what, flag)) for what, key, cands, flag in columns]
    rows, lines = [], []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFormatError(f"{path}, line {reader.line_num}: malformed CSV ({e}); fix the quoting "
                                  f"on that line.") from None
        if reader.line_num > start or any("\n" in f or "\r" in f for f in row):
            raise unclosed(start, reader.line_num)
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
    """Image–text pairs listed in a CSV, TSV or JSONL file.

    Sample: {"image": (3, S, S) normalised, "text": str, "label": int (-1 without label_key)}.
    Columns: image_key / caption_key (default: open_clip's `filepath` / `title`, else the first of a few
    common names; names match ignoring case); label_key optional (ints, or class names -> indices into
    `.classes`). Relative image paths are read beside the index file, else from the working directory
    (`choose_path_base`; `path_rule` and `path_note` say which), or from `root` if given.
    Rows with an empty caption are dropped when the file is read, with one warning and a count
    (`dropped_at_load`); a missing or corrupt image makes the sample None (dropped and counted by collate).
    `caption(i)` is the i-th caption without opening the image (for a tokenizer corpus).
    """

    def __init__(self, path: str, img_size: int = 224, split: str = "train", image_key: str | None = None,
                 caption_key: str | None = None, label_key: str | None = None, sep: str | None = None,
                 root: str | None = None, transform=None):
        self.path = path
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
        self.root, self.path_rule, self.path_note = choose_path_base(path, self.images, root, "image")

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
                where = f"{path} (line {n})"
                keys = (_pick(rec, image_key, IMAGE_KEYS, where, "image", "image_key"),
                        _pick(rec, caption_key, CAPTION_KEYS, where, "caption", "caption_key"))
                keys += (_pick(rec, label_key, (), where, "label", "label_key"),) if label_key else ()
            for k in keys:
                if k not in rec:
                    raise DataFormatError(f"{path}, line {n}: no key '{k}' (keys found: {', '.join(rec)}).")
            cap = rec[keys[1]]
            rows.append((str(rec[keys[0]]), "" if cap is None else str(cap), rec[keys[2]] if label_key else None))
            lines.append(n)
        return rows, lines

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, i: int) -> str | None:
        """The i-th caption, read from the index only: no image is opened, nothing is counted or warned
        (empty captions were dropped at load, so this is never None here)."""
        return self.captions[i]

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
    """Yield (key, {ext: bytes}) for consecutive members sharing a key; if the shard is missing or breaks,
    a last (None, (kind, message)): kind "missing", or "truncated" with the number of samples read before
    the break (a tar stream holds no index, so how many samples the rest of it held cannot be known).
    Hidden members ('._x.jpg' from macOS, '.x') are not samples and are passed over."""
    n = 0
    try:
        with tarfile.open(path, "r|*") as tf:
            key, group = None, {}
            for m in tf:
                if not m.isfile() or is_hidden(posixpath.basename(m.name)):
                    continue
                k, ext = _split_key(m.name)
                if k != key:
                    if key is not None:
                        yield key, group
                        n += 1
                    key, group = k, {}
                group[ext] = tf.extractfile(m).read()
            if key is not None:
                yield key, group
    except FileNotFoundError:
        yield None, ("missing", f"shard {path} does not exist; check the shard list.")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        yield None, ("truncated", f"the rest of shard {path} is lost (after {n} samples): it is corrupt or "
                                  f"truncated ({type(e).__name__}: {e}); re-download or re-write the shard.")


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
        """Undecoded (shard, key, {ext: bytes}) of this reader, or (shard, None, (skip kind, message))."""
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
        """A sample dict, or None after setting last_skip (a broken shard comes as key None, group (kind, msg))."""
        if key is None:
            kind, msg = group
            return self._skip(msg, kind)
        where = f"{shard}: sample '{key}'"
        img_ext = next((e for e in group if "." + e in IMAGE_EXTS), None)
        if img_ext is None or self.caption_ext not in group:
            return self._skip(f"skipping {where}: it needs an image and a .{self.caption_ext} caption, found "
                              f"{', '.join('.' + e for e in group) or 'nothing'}.", "malformed")
        try:
            text = group[self.caption_ext].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return self._skip(f"skipping {where}: {key}.{self.caption_ext} is not UTF-8 (byte offset {e.start}); "
                              f"re-encode the caption as UTF-8.", "undecodable")
        if not text:
            return self._skip(f"skipping {where}: the caption {key}.{self.caption_ext} is empty.", "empty")
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

    def captions(self, limit: int | None = None):
        """Yield the captions of all shards in their listed order (no shuffling, no split over readers)
        without decoding any image: for a tokenizer corpus. Undecodable or empty captions and broken shards
        are passed over silently: nothing is counted or warned (the training pass does that)."""
        n = 0
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r|*") as tf:
                    for m in tf:
                        if not m.isfile() or is_hidden(posixpath.basename(m.name)):
                            continue
                        if _split_key(m.name)[1] != self.caption_ext:
                            continue  # in a stream, an unread member is skipped over, not decoded
                        try:
                            text = tf.extractfile(m).read().decode("utf-8").strip()
                        except UnicodeDecodeError:
                            continue
                        if text:
                            yield text
                            n += 1
                            if limit is not None and n >= limit:
                                return
            except (tarfile.TarError, EOFError, OSError, zlib.error):
                continue

    def num_samples(self) -> int:
        """Count complete samples in all shards by reading tar headers only (no decoding)."""
        n = 0
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r:*") as tf:
                    keys: dict[str, set] = {}
                    for m in tf.getmembers():
                        if m.isfile() and not is_hidden(posixpath.basename(m.name)):
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
    and `short` is True, so the training loop's prompt augmentation wraps it. Hidden folders and files
    ('.ipynb_checkpoints', '._x.jpg', '__MACOSX') are neither classes nor samples.
    """

    def __init__(self, root: str, img_size: int = 224, split: str = "train", template: str | None = "a photo of a {}.",
                 class_names: list[str] | None = None, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} is not a directory; an image folder needs one subfolder per class.")
        self.root, self.template = root, template
        self.folders = sorted(d for d in os.listdir(root)
                              if os.path.isdir(os.path.join(root, d)) and not is_hidden(d))
        if not self.folders:
            raise DataFormatError(f"{root} has no subfolders; put each class's images in root/<class name>/.")
        if class_names is not None and len(class_names) != len(self.folders):
            raise DataFormatError(f"class_names has {len(class_names)} names but {root} has {len(self.folders)} "
                                  f"class folders; give one name per folder, in sorted folder order.")
        self.classes = list(class_names) if class_names is not None else [f.replace("_", " ") for f in self.folders]
        self.samples = []
        for label, folder in enumerate(self.folders):
            files = sorted(f for f in os.listdir(os.path.join(root, folder))
                           if f.lower().endswith(IMAGE_EXTS) and not is_hidden(f))
            if not files:
                warnings.warn(f"class folder {os.path.join(root, folder)} has no images.", stacklevel=2)
            self.samples += [(os.path.join(root, folder, f), label) for f in files]
        self.transform = transform or image_transform(img_size, train=split == "train")

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, i: int) -> str | None:
        """The i-th sample's text without opening its image (nothing counted or warned)."""
        name = self.classes[self.samples[i][1]]
        return self.template.format(name) if self.template else name

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = self._image(path)
        if img is None:
            return None
        text = self.caption(i)
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

# The official VQA evaluator's answer normalisation, rule for rule (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py at master, a013f00: manualMap, articles, contractions,
# punct, periodStrip, commaStrip, processPunctuation, processDigitArticle).
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so in effect r"\.(?!\d)"
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(ans: str) -> str:
    """A VQA answer as the official evaluator compares it (vqaEval.py: the tab/newline clean-up of
    `evaluate`, then processPunctuation and processDigitArticle):

    * each mark of `_PUNCT` (not the apostrophe, not & % $ # * ^ :) is deleted if it touches a space
      somewhere in the answer or the answer holds a digit-comma-digit ("1,000" -> "1000", "1, 2" -> "1 2"),
      else replaced by a space ("black/white" -> "black white");
    * a period not followed by a digit is deleted ("yes." -> "yes", "3.5" stays; at most 32 of them,
      because the evaluator passes re.UNICODE where `sub` takes its count);
    * lower case, number words zero..ten (and "none") as digits, articles a/an/the dropped, and the
      evaluator's contraction map applied per word ("dont" -> "don't").
    """
    text = ans.replace("\n", " ").replace("\t", " ").strip()
    out = text
    spaced_or_number = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space or spaced_or_number else " ")
    out = _PERIOD_STRIP.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


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
    """A labels CSV (columns `path`, `label`; also `filepath`/`video`, `class`; any case) listing clips as
    folders of frame images or .npy arrays (T, H, W[, 3]); relative paths are read beside the CSV, else from
    the working directory (`path_rule`), or from `root`. Kinetics-style lists convert to this with one line
    per clip. Arrays are read as they are: uint8 as is, float in [0, 1] ×255, uint16 /257 (`to_uint8`).

    `num_frames` frames are taken `stride` apart: from a random start in training, centred in evaluation;
    a clip shorter than the span repeats its last frame. Labels are class names (-> indices into the sorted
    `.classes`, or into `classes=` if given) or integers. Sample: {"video": (3, T, S, S), "label": int}.
    """

    def __init__(self, labels_csv: str, root: str | None = None, num_frames: int = 8, stride: int = 2,
                 img_size: int = 64, split: str = "train", path_key: str | None = None,
                 label_key: str | None = None, classes: list[str] | None = None, transform=None):
        rows, _ = read_table(labels_csv, [("clip path", path_key, ("path", "filepath", "video"), "path_key"),
                                          ("label", label_key, ("label", "class"), "label_key")])
        self.paths = [r[0] for r in rows]
        self.root, self.path_rule, self.path_note = choose_path_base(labels_csv, self.paths, root, "clip")
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

    def _array_frames(self, path: str) -> list[Image.Image]:
        """The sampled frames of a .npy clip as RGB images; raises BadSample."""
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise BadSample("missing", f"skipping {path}: the clip file does not exist; fix the path in the "
                                       f"labels CSV.") from None
        except Exception as e:
            raise BadSample("undecodable", f"skipping {path}: cannot read the array ({type(e).__name__}: {e}); "
                                           f"re-save it with np.save.") from None
        ok = arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (1, 3, 4))
        if not ok or len(arr) == 0 or arr.dtype.kind not in "biuf":
            raise BadSample("malformed", f"skipping {path}: expected frames (T, H, W) or (T, H, W, 3) of numbers, "
                                         f"got shape {arr.shape} of {arr.dtype}; re-save the clip in that layout.")
        frames = to_uint8(np.stack([np.asarray(arr[i]) for i in self.frame_indices(len(arr))]))  # one scale per clip
        if frames.ndim == 4:
            frames = frames[..., 0] if frames.shape[-1] == 1 else frames[..., :3]  # grey, or RGBA without alpha
        return [Image.fromarray(np.ascontiguousarray(f)).convert("RGB") for f in frames]

    def _folder_frames(self, path: str) -> list[Image.Image]:
        if not os.path.isdir(path):
            raise BadSample("missing", f"skipping {path}: no such frame folder or .npy file; fix the path in the "
                                       f"labels CSV.")
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and not is_hidden(f))
        if not files:
            raise BadSample("malformed", f"skipping {path}: the folder has no frame images; add the frames "
                                         f"or remove the row.")
        return [decode_image(os.path.join(path, files[i])) for i in self.frame_indices(len(files))]

    def _frames(self, path: str):
        try:
            return self._array_frames(path) if path.lower().endswith(".npy") else self._folder_frames(path)
        except BadSample as e:
            return self._skip(e.message, e.kind)

    def __getitem__(self, i: int):
        frames = self._frames(_resolve(self.root, self.paths[i]))
        if frames is None:
            return None
        return {"video": self.transform(frames), "label": self.labels[i]}
