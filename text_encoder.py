"""Florence's text tower: a byte-level BPE tokenizer and a 12-layer CLIP-style transformer.

Paper: Florence (arXiv 2111.11432) §2.2-2.3, "a 12-layer transformer" of 256M parameters whose output at
the end-of-text token is the text feature f_φ(t); UniCL (unicl.py) projects and normalises it into
v = f_φ(t) / ‖f_φ(t)‖. Width, heads and tokenizer are not published (see PRESETS below for our choice).

Two parts, top-down:
  Tokenizer    byte-level BPE (GPT-2 / CLIP style) trained here: text → pieces (regex) → UTF-8 bytes →
               merges. Ids: 0 <pad>, 1 <sot>, 2 <eot>, 3 <mask>, 4..259 the 256 bytes, 260.. the merges.
               An untrained tokenizer is pure bytes, so every string encodes and round-trips losslessly.
  TextEncoder  token + learned positional embeddings → pre-LN blocks (causal self-attention by default,
               bidirectional with a padding mask for METER's MLM) → final LayerNorm → the state at the
               end-of-text position.
and, to start from public weights (CLIP's text tower):
  ClipTokenizer  CLIP's BPE with CLIP's ids, in pure Python: `clip_clean` (ftfy's fixers but its mojibake
               repair, HTML, whitespace, lower case) and `clip_pieces` (CLIP's pre-split pattern as a scan).
  load_clip_text  an OpenAI CLIP / open_clip state dict → TextEncoder (QuickGELU or GELU) + text_projection.

Followed (read, then written anew): openai/CLIP clip/model.py (text transformer, `initialize_parameters`),
openai/CLIP clip/simple_tokenizer.py and openai/gpt-2 src/encoder.py (byte-level BPE with a pre-split
regex), karpathy/minbpe minbpe/regex.py (training loop), karpathy/nanoGPT model.py (style).
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# GPT-2's pre-split pattern in Python's `re` (which lacks \p{L}): contractions, an optional space plus a
# run of letters / digits / other symbols, then whitespace. The alternatives cover every character, so
# "".join(pieces) == text and no merge ever crosses a word boundary.
_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

SPECIALS = ("<pad>", "<sot>", "<eot>", "<mask>")
PAD_ID, SOT_ID, EOT_ID, MASK_ID = 0, 1, 2, 3
BYTE_OFFSET = len(SPECIALS)  # byte b has id BYTE_OFFSET + b
FIRST_MERGE_ID = BYTE_OFFSET + 256  # merge r (0-based rank) has id FIRST_MERGE_ID + r


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def token_batch(texts, encode, sot: int, eot: int, pad: int, context_length: int, trim: bool, who: str):
    """Both tokenizers' batching: list[str] (or one str) → LongTensor (B, L), each row <sot> ids <eot> then
    pad, a long text keeping its first context_length − 2 ids; L = context_length, or with `trim` the
    batch's longest row."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"{who} got an empty caption list; pass at least one text")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (<sot> and <eot>), got {context_length}")
    rows = [[sot] + encode(text)[: context_length - 2] + [eot] for text in texts]
    width = max(map(len, rows)) if trim else context_length
    return torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], dtype=torch.long)  # (B, L)


class Tokenizer:
    """Byte-level BPE. `Tokenizer()` is pure bytes; `Tokenizer.train(texts, vocab_size)` learns merges.

    Encoding is lossless (no lower-casing, no whitespace cleaning): `decode(encode(s)) == s` for any str.
    """

    pad_id, sot_id, eot_id, mask_id = PAD_ID, SOT_ID, EOT_ID, MASK_ID
    kind = "florence-bpe"

    def __init__(self, merges: list[tuple[int, int]] | None = None):
        self.merges = [tuple(int(i) for i in m) for m in (merges or [])]
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        # bytes of every non-special id, built up through the merges
        self.id_bytes = [b""] * BYTE_OFFSET + [bytes([b]) for b in range(256)]
        for r, (a, b) in enumerate(self.merges):
            if not (BYTE_OFFSET <= a < FIRST_MERGE_ID + r and BYTE_OFFSET <= b < FIRST_MERGE_ID + r):
                raise ValueError(f"merge {r} ({a}, {b}) refers to an id that is not defined before it")
            self.id_bytes.append(self.id_bytes[a] + self.id_bytes[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return FIRST_MERGE_ID + len(self.merges)

    # ---- training ----
    @classmethod
    def train(cls, texts, vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Learn up to vocab_size - 260 merges from `texts` (an iterable of str).

        Words (regex pieces) are counted once; each merge takes the most frequent adjacent pair, weighted
        by word counts (ties: the smallest pair of ids), and only the words containing it are updated.
        Deterministic and independent of the order of `texts`. Stops early when no pair occurs at least
        `min_frequency` times, so the result's `vocab_size` may be smaller than asked.
        """
        if vocab_size < FIRST_MERGE_ID:
            raise ValueError(f"vocab_size must be at least {FIRST_MERGE_ID} (4 specials + 256 bytes), "
                             f"got {vocab_size}")
        word_counts = Counter()
        for text in texts:
            word_counts.update(_SPLIT.findall(text))
        vocab = sorted(word_counts)
        words = [[BYTE_OFFSET + b for b in w.encode("utf-8")] for w in vocab]
        counts = [word_counts[w] for w in vocab]

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may contain it
        for wi, ids in enumerate(words):
            for p in zip(ids, ids[1:]):
                pair_counts[p] += counts[wi]
                where[p].add(wi)
        heap = [(-c, p) for p, c in pair_counts.items()]  # lazy max-heap: stale entries are skipped
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while heap and len(merges) < vocab_size - FIRST_MERGE_ID:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg_count:
                continue  # stale entry; the current count has its own entry
            if -neg_count < min_frequency:
                break
            new_id = FIRST_MERGE_ID + len(merges)
            merges.append(pair)
            changed = set()
            for wi in where.pop(pair):
                ids, c = words[wi], counts[wi]
                new = _merge(ids, pair, new_id)
                if len(new) == len(ids):
                    continue  # stale index entry: the pair left this word in an earlier merge
                for p in zip(ids, ids[1:]):
                    pair_counts[p] -= c
                    changed.add(p)
                for p in zip(new, new[1:]):
                    pair_counts[p] += c
                    where[p].add(wi)
                    changed.add(p)
                words[wi] = new
            for p in changed:
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    del pair_counts[p]
        return cls(merges)

    # ---- encoding ----
    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = [BYTE_OFFSET + b for b in piece.encode("utf-8")]
        while len(ids) > 1:  # apply the lowest-ranked merge present, as in training order
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, FIRST_MERGE_ID + self.ranks[pair])
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """str → token ids, without <sot>/<eot>."""
        if not isinstance(text, str):
            raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return [i for piece in _SPLIT.findall(text) for i in self._encode_piece(piece)]

    def decode(self, ids) -> str:
        """Token ids → str; special tokens are skipped, invalid UTF-8 (a cut multi-byte char) becomes �."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def __call__(self, texts, context_length: int = 77, trim: bool = False) -> torch.Tensor:
        """list[str] (or one str) → LongTensor (B, context_length): <sot> ids <eot> <pad>...

        Too-long texts are cut so that <eot> stays the last real token (TextEncoder pools there).
        trim=True pads only to the longest row (≤ context_length): the same TextEncoder output, since causal
        attention never lets a token before <eot> see a later pad and bidirectional attention masks pads
        (tests/test_text_encoder.py), at a fraction of the cost when captions are short (toy captions
        average 9 of 32 positions). Off where every batch must have one shape (torch.compile).
        """
        return token_batch(texts, self.encode, SOT_ID, EOT_ID, PAD_ID, context_length, trim, "Tokenizer")

    # ---- persistence ----
    def save(self, path) -> None:
        state = {"format": "florence-bpe", "version": 1, "specials": list(SPECIALS),
                 "pattern": _SPLIT.pattern, "merges": [list(m) for m in self.merges]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """A JSON file from .save; also 'clip:VOCAB' and a saved ClipTokenizer (`load_tokenizer`'s forms),
        which give a ClipTokenizer."""
        if str(path).startswith("clip:"):
            return ClipTokenizer.from_vocab_file(str(path)[len("clip:"):])
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} not found; train one with Tokenizer.train "
                                    f"and save it with .save(path)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer file {path} is not valid JSON ({e}); re-save it") from None
        if state.get("format") == "clip-bpe":  # a run's tokenizer.json when it used CLIP's tokenizer
            return ClipTokenizer(state["merges"])
        if state.get("format") != "florence-bpe" or state.get("pattern") != _SPLIT.pattern \
                or state.get("specials") != list(SPECIALS):
            raise ValueError(f"{path} is not a tokenizer saved by this version of text_encoder.Tokenizer")
        return cls([tuple(m) for m in state["merges"]])


# --------------------------------------------------------------------------------------------------
# CLIP's tokenizer, for CLIP's text weights (load_clip_text below)
# --------------------------------------------------------------------------------------------------
# Followed (read, then written anew): openai/CLIP clip/simple_tokenizer.py and clip/clip.py `tokenize`,
# mlfoundations/open_clip src/open_clip/tokenizer.py; rspeer/python-ftfy 6.1 ftfy/__init__.py, fixes.py,
# chardata.py (the fixers CLIP's `basic_clean` runs through `ftfy.fix_text`).

CLIP_CONTEXT = 77
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CLIP_MERGES = 49152 - 256 - 2  # CLIP reads merges[1 : 49152-256-2+1]: 48,894 merges → 49,408 tokens

# The `regex` module's \s (Unicode White_Space), which CLIP's whitespace_clean and pre-split pattern use.
# Python's str.isspace() differs: it also counts U+001C–U+001F.
_WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                   0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters: the 188 printable Latin-1
    bytes map to themselves, the others to U+0100 onwards, in byte order. Its order is the order of the
    first 256 ids."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _build_html_entities() -> dict[str, str]:
    """ftfy's table: every HTML5 entity that ends in ';', plus the upper-case spelling of the lower-case
    ones that html.unescape leaves alone (&EACUTE; → É)."""
    import html
    import html.entities

    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                out["&" + name.upper()] = char.upper()
    return out


_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_CONTROL = re.compile(r"[\x80-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LIGATURES = {ord(k): v for k, v in {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
                                     "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj",
                                     "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl",
                                     "ﬅ": "ſt", "ﬆ": "st"}.items()}
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                0xFEFF, *range(0xFFF9, 0xFFFD)])
_CLEAN_TABLES: dict = {}


def _clean_tables():
    """Built once, on first use: the HTML entities and the half/full-width map (U+3000 → space, and each
    of U+FF01–U+FFEF that NFKC changes → its NFKC form)."""
    if not _CLEAN_TABLES:
        import unicodedata

        width = {0x3000: " "}
        for i in range(0xFF01, 0xFFF0):
            alt = unicodedata.normalize("NFKC", chr(i))
            if alt != chr(i):
                width[i] = alt
        _CLEAN_TABLES.update(entities=_build_html_entities(), width=width)
    return _CLEAN_TABLES


def _c1_as_windows_1252(m) -> str:
    try:
        return m.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D: undefined in cp1252, kept ("sloppy" codec)
        return m.group(0)


def _surrogate_pair(m) -> str:
    hi, lo = m.group(0)
    return chr(0x10000 + (ord(hi) - 0xD800) * 0x400 + (ord(lo) - 0xDC00))


def fix_text(text: str) -> str:
    """ftfy.fix_text's default fixers without its mojibake repair, in ftfy's order, to a fixed point.

    Per line (ftfy's segments; once a line holds '<' HTML is left escaped from there on): HTML entities
    (ftfy's table: only ';'-terminated, plus upper-case names), C1 controls read as Windows-1252, Latin
    ligatures split, half/full-width forms to normal width, curly quotes straightened, line breaks to
    '\\n', surrogate pairs joined, terminal escapes and control characters removed, NFC; repeated until
    nothing changes. Not done: ftfy's `fix_encoding` (with restore_byte_a0, replace_lossy_sequences,
    decode_inconsistent_utf8), which guesses that text is mojibake — UTF-8 read as Latin-1 or
    Windows-1252, "cafÃ©" — and re-decodes it ("café"). Such text is tokenised as it is here, so CLIP's
    ids differ on it; on text that is not mojibake the result is ftfy's."""
    import unicodedata

    tables = _clean_tables()
    entities, width = tables["entities"], tables["width"]

    def entity(m):
        t = m.group(0)
        if t in entities:
            return entities[t]
        if t.startswith("&#"):
            import html
            u = html.unescape(t)
            return t if ";" in u else u
        return t

    out, unescape, pos = [], True, 0
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + 1_000_000)  # ftfy's max_decode_length
        seg = text[pos:end]
        pos = end
        if "<" in seg:
            unescape = False
        while True:
            before = seg
            if unescape:
                seg = _HTML_ENTITY.sub(entity, seg)
            seg = _C1_CONTROL.sub(_c1_as_windows_1252, seg)
            seg = seg.translate(_LIGATURES).translate(width)
            seg = re.sub("[\u201c-\u201f]", '"', seg)
            seg = re.sub("[\u02bc\u2018-\u201b]", "'", seg)
            seg = seg.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace(
                "\u2029", "\n").replace("\u0085", "\n")
            if _SURROGATE.search(seg):
                seg = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_surrogate_pair, seg))
            seg = _ANSI_ESCAPE.sub("", seg).translate(_CONTROL_CHARS)
            seg = unicodedata.normalize("NFC", seg)
            if seg == before:
                break
        out.append(seg)
    return "".join(out)


def clip_clean(text: str) -> str:
    """CLIP's text cleaning: basic_clean (fix_text, HTML unescaped twice, strip), whitespace_clean (every
    run of White_Space → one space, strip), then lower case."""
    import html

    text = html.unescape(html.unescape(fix_text(text))).strip()
    out, space = [], False
    for ch in text:
        if ch in _WHITE_SPACE:
            space = True
            continue
        if space and out:
            out.append(" ")
        space = False
        out.append(ch)
    return "".join(out).lower()


_CHAR_CLASS: dict[str, str] = {}


def _char_class(ch: str) -> str:
    """'L' letter, 'N' number, ' ' White_Space, '-' matched by nothing, 'O' other: the classes of CLIP's
    pattern. From the running Python's unicodedata (3.11: Unicode 14.0); the regex module ships newer
    tables, so characters assigned after that version are 'O' here and may be 'L' or 'N' in CLIP."""
    c = _CHAR_CLASS.get(ch)
    if c is None:
        import unicodedata

        if ch in _WHITE_SPACE:
            c = " "
        elif ch == "\u0345":  # COMBINING GREEK YPOGEGRAMMENI: under IGNORECASE it folds to ι, so regex's
            c = "-"  # [^\s\p{L}\p{N}] refuses it while [\p{L}] does not take it: findall skips it
        else:
            cat = unicodedata.category(ch)[0]
            c = cat if cat in "LN" else "O"
        _CHAR_CLASS[ch] = c
    return c


_CLIP_LITERALS = (*_CLIP_SPECIALS, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clip_pieces(text: str) -> list[str]:
    """CLIP's pre-split, regex.findall of
        <\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
    with IGNORECASE, written as a scan: at each position the alternatives in that order; a run of letters,
    one digit, or a run of other characters (which swallows ' and <, so a contraction or a special starts
    only a match); White_Space is skipped. IGNORECASE matters on lower-cased text only through ſ (long s),
    which regex takes for s in the literals ('ſ is a contraction)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        for lit in _CLIP_LITERALS:
            m = len(lit)
            if i + m <= n and all(a == b or (b == "s" and a == "ſ") for a, b in zip(text[i:i + m], lit)):
                pieces.append(text[i:i + m])
                i += m
                break
        else:
            c = _char_class(text[i])
            if c in " -":
                i += 1
                continue
            j = i + 1
            if c != "N":
                while j < n and _char_class(text[j]) == c:
                    j += 1
            pieces.append(text[i:j])
            i = j
    return pieces


class ClipTokenizer:
    """CLIP's BPE tokenizer in pure Python, with CLIP's ids (openai/CLIP clip/simple_tokenizer.py).

    text → `clip_clean` (ftfy's fixers as `fix_text` says, HTML, whitespace, lower case) → `clip_pieces`
    → each piece's UTF-8 bytes as `bytes_to_unicode` characters, '</w>' on the last → BPE by merge rank →
    ids. Ids: 0–255 the byte characters, 256–511 the same with '</w>', then one per merge, then
    <|startoftext|> and <|endoftext|> (49406 and 49407 with CLIP's 48,894 merges). Rows are
    <sot> ids <eot> padded with 0 (which is also the id of '!': CLIP pools at <eot>, never reads pads).
    A literal '<|endoftext|>' in a caption becomes that token, as in CLIP.

    The merges alone define it, so a checkpoint stores them (`merges`, pairs of str) and needs no
    vocabulary file to rebuild it. There is no mask token: CLIP's vocabulary has none.
    """

    kind = "clip"

    def __init__(self, merges):
        self.merges = [tuple(str(s) for s in m) for m in merges]
        if any(len(m) != 2 for m in self.merges):
            raise ValueError("a CLIP merge is a pair of symbols; got one that is not")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in self.merges] + list(_CLIP_SPECIALS)
        self.encoder = dict(zip(vocab, range(len(vocab))))  # as CLIP: a repeated string keeps its last id
        self.decoder = dict(enumerate(vocab))
        self.ranks = dict(zip(self.merges, range(len(self.merges))))
        self.pad_id = 0
        self.sot_id, self.eot_id = len(vocab) - 2, len(vocab) - 1
        self.vocab_size = len(vocab)
        self._cache = {s: [s] for s in _CLIP_SPECIALS}

    @property
    def mask_id(self) -> int:
        raise ValueError("CLIP's vocabulary has no mask token, so masked-language modelling cannot use "
                         "--tokenizer clip:…; use our BPE tokenizer (--tokenizer '' or FILE.json) for MLM")

    @classmethod
    def from_vocab_file(cls, path) -> "ClipTokenizer":
        """CLIP's bpe_simple_vocab_16e6.txt.gz (or its plain-text merges): a version line, then one merge
        'a b' per line; CLIP reads the first 48,894. Blank lines are skipped (CLIP would make a merge of one)."""
        import gzip

        path = str(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValueError(f"CLIP vocabulary {path!r} does not exist; download bpe_simple_vocab_16e6.txt.gz "
                             "from github.com/openai/CLIP (clip/) and give its path") from None
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"CLIP vocabulary {path!r} is not a UTF-8 text or gzip file ({type(e).__name__}); "
                             "re-download bpe_simple_vocab_16e6.txt.gz") from None
        lines = text.split("\n")[1:_CLIP_MERGES + 1]
        merges = []
        for no, line in enumerate(lines, start=2):
            if not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"CLIP vocabulary {path!r} line {no} is not a merge 'a b' ({line[:40]!r}); "
                                 "give bpe_simple_vocab_16e6.txt.gz, whose first line is a version line")
            merges.append(tuple(pair))
        if not merges:
            raise ValueError(f"CLIP vocabulary {path!r} holds no merges; give bpe_simple_vocab_16e6.txt.gz")
        return cls(merges)

    def _bpe(self, token: str) -> list[str]:
        """A byte-encoded piece → its symbols: '</w>' joined to the last character, then the lowest-ranked
        adjacent pair merged everywhere (left to right, without overlap) until no pair has a rank."""
        word = self._cache.get(token)
        if word is not None:
            return word
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) > 200_000:
            self._cache = {s: [s] for s in _CLIP_SPECIALS}
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """str → CLIP's token ids, without <sot>/<eot>."""
        if not isinstance(text, str):
            raise ValueError(f"ClipTokenizer.encode expects a str, got {type(text).__name__}")
        ids = []
        for piece in clip_pieces(clip_clean(text)):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(token))
        return ids

    def decode(self, ids) -> str:
        """Ids → text as CLIP decodes it ('</w>' → a space), without <sot>/<eot>; what follows the first
        <eot> is padding (0, which is also '!') and is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.sot_id)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length: int = CLIP_CONTEXT, trim: bool = False) -> torch.Tensor:
        """list[str] (or one str) → LongTensor (B, context_length): <sot> ids <eot> 0…; a long text keeps
        its first context_length − 2 ids (clip.tokenize(truncate=True), open_clip). trim: as Tokenizer."""
        return token_batch(texts, self.encode, self.sot_id, self.eot_id, self.pad_id, context_length, trim,
                           "ClipTokenizer")

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": "clip-bpe", "version": 1, "merges": [list(m) for m in self.merges]}, f)


def load_tokenizer(spec):
    """--tokenizer's forms → a tokenizer: 'clip:VOCAB' (CLIP's bpe_simple_vocab_16e6.txt.gz), or a JSON
    file saved by Tokenizer.save (ours) or ClipTokenizer.save (a run's tokenizer.json)."""
    spec = str(spec)
    if spec.startswith("clip:"):
        return ClipTokenizer.from_vocab_file(spec[len("clip:"):])
    return Tokenizer.load(spec)


def tokenizer_from_merges(merges, kind: str | None = None):
    """Stored merges → the tokenizer they define: pairs of ids are ours, pairs of str are CLIP's
    (`kind` 'clip' or 'florence-bpe' says so explicitly)."""
    merges = list(merges)
    if kind is None:
        kind = "clip" if merges and isinstance(merges[0][0], str) else "florence-bpe"
    if kind == "clip":
        return ClipTokenizer([tuple(m) for m in merges])
    if kind != "florence-bpe":
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip' or 'florence-bpe'")
    return Tokenizer([tuple(m) for m in merges])


# --------------------------------------------------------------------------------------------------
# TextEncoder
# --------------------------------------------------------------------------------------------------


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77  # <sot> + up to 75 text tokens + <eot>, as CLIP
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # attention and residual dropout (CLIP: 0)
    causal: bool = True  # False: bidirectional, padding positions masked out as keys (METER's MLM)
    grad_checkpointing: bool = False  # torch.utils.checkpoint per block while training
    pad_id: int = PAD_ID  # the ids of Tokenizer above; change them to run another tokenizer's ids
    eot_id: int = EOT_ID
    act: str = "gelu"  # the MLP's: "gelu" (exact) or "quick_gelu" (x·σ(1.702x), OpenAI CLIP's weights)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, is_causal: bool):  # x: (B, L, C), mask: (B, 1, L|1, L) bool or None
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(rearrange(y, "b h l d -> b l (h d)")))

    def forward_rows(self, x, rows, key_mask):
        """The output at one query position per row only: x (B, L, C), rows (B,) long, key_mask (B, 1, 1, L)
        bool (the keys that query may see) → (B, C). Keys and values come from every token; the query
        projection (the first third of qkv's weight) is applied to the B query tokens alone."""
        C = x.shape[-1]
        w, b = self.qkv.weight, self.qkv.bias
        k, v = rearrange(F.linear(x, w[C:], b[C:]), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        q = F.linear(x[torch.arange(x.shape[0], device=x.device), rows], w[:C], b[:C])  # (B, C)
        q = rearrange(q, "b (h d) -> b h 1 d", h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(rearrange(y, "b h 1 d -> b (h d)")))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702x): the GELU approximation OpenAI's CLIP was trained with (clip/model.py QuickGELU)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"TextConfig.act must be one of {sorted(ACTIVATIONS)}, got {cfg.act!r}")
        self.act = ACTIVATIONS[cfg.act]
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc = nn.Linear(cfg.width, hidden)
        self.proj = nn.Linear(hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, L, C)
        return self.drop(self.proj(self.act(self.fc(x))))  # exact GELU from scratch; QuickGELU for CLIP's weights


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.width), SelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg)

    def forward(self, x, mask, is_causal: bool, rows: torch.Tensor | None = None):
        """x (B, L, C) → (B, L, C). With rows (B,) long: only the output at position rows[b] of each row b,
        (B, C), what the full output gives there, with mask the (B, 1, 1, L) keys those queries see; the MLP,
        the output projection and the second norm run for those B tokens alone. (One entry point, so that
        wrappers that act on a module's call, FSDP's unsharding and checkpointing, see both paths.)"""
        if rows is not None:
            return self._forward_rows(x, rows, mask)
        x = x + self.attn(self.ln_1(x), mask, is_causal)
        return x + self.mlp(self.ln_2(x))

    def _forward_rows(self, x, rows, key_mask):
        y = x[torch.arange(x.shape[0], device=x.device), rows] + self.attn.forward_rows(self.ln_1(x), rows, key_mask)
        return y + self.mlp(self.ln_2(y))


class TextEncoder(nn.Module):
    """f_φ(t): tokens (B, L) → (B, width), the final-LayerNorm state at the end-of-text token."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.width
        self.grad_checkpointing = cfg.grad_checkpointing
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.last_block_at_eot = True  # forward: the last block at <eot> only (False: the plain reference path)
        self.init_weights()

    def init_weights(self):
        """CLIP's scheme (openai/CLIP clip/model.py `initialize_parameters`); biases zero, LayerNorm 1/0."""
        w, n = self.cfg.width, self.cfg.layers
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * n) ** -0.5, (2 * w) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.proj.weight, std=proj_std)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc, blk.mlp.proj):
                nn.init.zeros_(lin.bias)

    def _block(self, blk, *args):
        """One block, through torch.utils.checkpoint while training with grad_checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def _check_shape(self, tokens: torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.cfg.context_length}; "
                             f"tokenize with context_length={self.cfg.context_length}")

    def _key_mask(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None):
        """(B, L) bool of the keys any query may see, or None for all: the given mask, else the pads masked
        when bidirectional (causal attention needs none: pads follow <eot>)."""
        if attention_mask is None and not self.cfg.causal:
            attention_mask = tokens != self.cfg.pad_id
        return None if attention_mask is None else attention_mask.bool()

    def forward_tokens(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       blocks: int | None = None):
        """tokens: (B, L) long → all token states (B, L, width) after the final LayerNorm.

        attention_mask: optional (B, L) bool, True for tokens that may be attended to. Defaults to
        `tokens != pad_id` when bidirectional, and to nothing when causal (pads follow <eot>, so causal
        attention never lets them reach a real token). blocks: run only the first this many blocks and
        return their output before the final LayerNorm (`forward` finishes the last block itself).
        """
        self._check_shape(tokens)
        L = tokens.shape[1]
        causal = self.cfg.causal
        attention_mask = self._key_mask(tokens, attention_mask)
        mask, is_causal = None, causal
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :]  # (B, 1, 1, L): key j visible to all queries
            if causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
                is_causal = False  # SDPA takes either is_causal or an explicit mask
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, C)
        for blk in self.blocks[:blocks]:
            x = self._block(blk, x, mask, is_causal)
        return x if blocks is not None else self.ln_final(x)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """tokens: (B, L) long → (B, width), the state at each row's (first) end-of-text token.

        Only that state is read, so the last block runs at <eot> alone (`last_block_at_eot`, the default):
        keys and values from every token, the query, attention output, MLP and norms for one token per row:
        of the last block's 12·width² multiply-adds per token, only the key and value projections' 2 remain
        (the toy run's text tower: a third less work). The output is that of `forward_tokens(tokens)[b, eot_b]`,
        the reference path (`last_block_at_eot = False`), up to float rounding."""
        self._check_shape(tokens)
        is_eot = tokens == self.cfg.eot_id
        # the check reads a value back to the host: skipped under torch.compile, where it would break the graph
        if not torch.compiler.is_compiling() and not bool(is_eot.any(dim=1).all()):
            raise ValueError(f"every row of tokens needs the end-of-text token (id {self.cfg.eot_id}); "
                             f"tokenize with Tokenizer.__call__, which always appends it")
        eot = is_eot.int().argmax(dim=1)  # (B,) first <eot> position
        if not (self.last_block_at_eot and len(self.blocks)):
            x = self.forward_tokens(tokens, attention_mask)  # (B, L, C)
            return x[torch.arange(x.shape[0], device=x.device), eot]
        x = self.forward_tokens(tokens, attention_mask, blocks=len(self.blocks) - 1)
        L = tokens.shape[1]
        keys = self._key_mask(tokens, attention_mask)
        keys = torch.ones_like(tokens, dtype=torch.bool) if keys is None else keys
        if self.cfg.causal:  # the <eot> query sees the keys up to its own position, as row eot of the causal mask
            keys = keys & (torch.arange(L, device=tokens.device)[None, :] <= eot[:, None])
        x = self._block(self.blocks[-1], x, keys[:, None, None, :], False, eot)  # (B, C)
        return self.ln_final(x)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
# Parameters of one block: qkv 3C²+3C, proj C²+C, MLP 8C²+5C (ratio 4), two LayerNorms 4C
#   → 12C² + 13C. Whole tower: V·C (tokens) + 77·C (positions) + 12·(12C² + 13C) + 2C (final LN).
# clip_base (CLIP ViT-B/32's text tower): C=512, V=49408 → 63,165,952 (+ CLIP's 512×512 text projection,
#   which lives in unicl.Florence here, = 63.4M: "63M" in the CLIP paper).
# florence: the paper gives 12 layers and 256M only. Keeping CLIP's recipe (head dim 64, MLP 4×,
#   context 77) the blocks cost 151.2M at C=1024 and 191.3M at C=1152; with CLIP's 49408-token vocab
#   these give 201.8M (−21%) and 248.3M (−3.0%). We take C=1024, 16 heads and a 102,400-token BPE
#   (a 100k-class vocabulary like GPT-4's cl100k): 151,154,688 + 104,857,600 + 78,848 + 2,048
#   = 256,093,184 ≈ 256.1M (+0.04%). The 1024 → embed_dim projection is counted in Florence, not here.
PRESETS: dict[str, TextConfig] = {
    "toy": TextConfig(vocab_size=1024, context_length=32, width=128, layers=2, heads=4),
    "clip_base": TextConfig(vocab_size=49408, context_length=77, width=512, layers=12, heads=8),
    "florence": TextConfig(vocab_size=102400, context_length=77, width=1024, layers=12, heads=16),
}


def config(name: str, **overrides) -> TextConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown text preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TextConfig field(s) {unknown}; the fields are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build(name: str, **overrides) -> TextEncoder:
    """`build("toy", vocab_size=tokenizer.vocab_size)` → TextEncoder of that preset."""
    return TextEncoder(config(name, **overrides))


def count_params(name_or_cfg: str | TextConfig = "clip_base", **overrides) -> int:
    """Parameter count of a preset (or config), built on the meta device: no memory is allocated."""
    cfg = config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else \
        dataclasses.replace(name_or_cfg, **overrides)
    with torch.device("meta"):
        model = TextEncoder(cfg)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# CLIP's text weights (OpenAI CLIP, open_clip) into TextEncoder
# --------------------------------------------------------------------------------------------------
# Followed (read, then written anew): openai/CLIP clip/model.py (`build_model`: sizes from the shapes,
# heads = width // 64; `encode_text`; ResidualAttentionBlock: nn.MultiheadAttention's fused in_proj,
# mlp.c_fc / c_proj, QuickGELU) and mlfoundations/open_clip src/open_clip/model.py, transformer.py (the
# same names; `text.` in front for CustomTextCLIP; GELU unless the model is a -quickgelu one).

_CLIP_BLOCK_KEYS = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
                    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
                    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
                    "mlp.c_fc.weight": "mlp.fc.weight", "mlp.c_fc.bias": "mlp.fc.bias",
                    "mlp.c_proj.weight": "mlp.proj.weight", "mlp.c_proj.bias": "mlp.proj.bias"}
_CLIP_TOP_KEYS = {"token_embedding.weight": "token_embedding.weight", "positional_embedding": "positional_embedding",
                  "ln_final.weight": "ln_final.weight", "ln_final.bias": "ln_final.bias"}
# the image tower, the temperature, and the ints OpenAI's TorchScript state dict carries: not the text tower's
_CLIP_NOT_TEXT = ("visual.", "logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size",
                  "attn_mask")


def clip_text_weights(sd: dict) -> tuple[dict, dict, list[str]]:
    """A CLIP / open_clip state dict → ({our TextEncoder key: tensor}, {our key: their key}, ignored keys),
    plus their 'text_projection' kept under that name ((width, D), or an nn.Linear's weight transposed).
    Raises ValueError naming keys that are not a CLIP text transformer's (layer scale, other poolings)."""
    prefix = "text." if "text.token_embedding.weight" in sd else ""
    if prefix + "token_embedding.weight" not in sd:
        raise ValueError("this does not look like a CLIP state dict: it has no 'token_embedding.weight' "
                         "(OpenAI CLIP / open_clip) or 'text.token_embedding.weight' (open_clip CustomTextCLIP)")
    out, names, ignored, unknown = {}, {}, [], []
    for k, v in sd.items():
        if not k.startswith(prefix) or (not prefix and k.startswith(_CLIP_NOT_TEXT)) \
                or (prefix and k[len(prefix):].startswith(_CLIP_NOT_TEXT)):
            ignored.append(k)
            continue
        name = k[len(prefix):]
        if name in _CLIP_TOP_KEYS:
            ours = _CLIP_TOP_KEYS[name]
        elif name in ("text_projection", "text_projection.weight"):
            ours = "text_projection"
            v = v if name == "text_projection" else v.t()  # Linear (D, width) → (width, D)
        elif name.startswith("transformer.resblocks."):
            parts = name.split(".", 3)
            ours = f"blocks.{parts[2]}.{_CLIP_BLOCK_KEYS[parts[3]]}" if parts[3] in _CLIP_BLOCK_KEYS else None
        else:
            ours = None
        if ours is None:
            unknown.append(k)
            continue
        out[ours], names[ours] = v, k
    if unknown:
        raise ValueError(f"the CLIP state dict has text keys this CLIP text transformer does not have: "
                         f"{sorted(unknown)[:6]}{'…' if len(unknown) > 6 else ''} (layer scale, a projection bias "
                         "or another pooling: not an OpenAI-style CLIP text tower)")
    return out, names, sorted(ignored)


def clip_text_config(sd: dict, act: str = "quick_gelu", heads: int | None = None) -> tuple[TextConfig, int]:
    """The TextConfig of a CLIP text tower, read off its shapes (openai/CLIP `build_model`), and the joint
    width D of its text_projection. Heads are not in the shapes: width // 64, as OpenAI's build_model
    (every OpenAI and open_clip CLIP text tower has head dim 64). Pads are 0 and <eot> is the last id, as
    ClipTokenizer's."""
    w = sd if "blocks.0.ln_1.weight" in sd else clip_text_weights(sd)[0]  # ours already, or CLIP's names
    vocab, width = w["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    if heads is None:
        if width % 64:
            raise ValueError(f"CLIP text width {width} is not a multiple of 64; give heads= explicitly")
        heads = width // 64
    if "text_projection" not in w:
        raise ValueError("the CLIP state dict has no text_projection; give a full CLIP model's state dict")
    cfg = TextConfig(vocab_size=vocab, context_length=w["positional_embedding"].shape[0], width=width,
                     layers=layers, heads=heads, mlp_ratio=w["blocks.0.mlp.fc.weight"].shape[0] / width,
                     pad_id=0, eot_id=vocab - 1, act=act)
    return cfg, w["text_projection"].shape[1]


def load_clip_text(path_or_state_dict, encoder: TextEncoder | None = None, act: str = "quick_gelu"):
    """CLIP's text tower from an OpenAI CLIP or open_clip state dict (a path or a dict) →
    (TextEncoder, projection (width, D), report).

    With ClipTokenizer's tokens, `encoder(tokens) @ projection` is CLIP's `encode_text` (before its L2
    normalisation): token + positional embeddings, pre-LN resblocks under the causal mask (the fused
    in_proj is our qkv: rows q, k, v, heads split alike), ln_final, the state at <eot>. `act`: "quick_gelu"
    for OpenAI's weights and open_clip's -quickgelu models, "gelu" for open_clip's others. Without
    `encoder` one is built from the shapes; a given one must have them. The report lists what was loaded
    (our key ← theirs) and what was ignored (the image tower, logit_scale)."""
    from coswin import read_state_dict

    sd = read_state_dict(path_or_state_dict, "CLIP checkpoint")
    w, names, ignored = clip_text_weights(sd)
    cfg, _ = clip_text_config(w, act=act)
    if encoder is None:
        encoder = TextEncoder(cfg)
    own = encoder.state_dict()
    for k in own:
        if k not in w or own[k].shape != w[k].shape:
            theirs = tuple(w[k].shape) if k in w else "nothing"
            raise ValueError(f"CLIP text tower does not fit the model at {k}: checkpoint {theirs}, model "
                             f"{tuple(own[k].shape)}; build it with text_encoder.clip_text_config's sizes "
                             f"(width {cfg.width}, {cfg.layers} layers, vocab {cfg.vocab_size})")
    encoder.load_state_dict({k: w[k] for k in own})
    report = {"loaded": [f"{k} ← {names[k]}" for k in own], "converted": {}, "fresh": [], "ignored": ignored}
    return encoder, w["text_projection"].float(), report


if __name__ == "__main__":
    for name in PRESETS:
        print(f"{name:10s} {count_params(name):>13,d} parameters")
