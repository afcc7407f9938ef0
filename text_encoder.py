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


class Tokenizer:
    """Byte-level BPE. `Tokenizer()` is pure bytes; `Tokenizer.train(texts, vocab_size)` learns merges.

    Encoding is lossless (no lower-casing, no whitespace cleaning): `decode(encode(s)) == s` for any str.
    """

    pad_id, sot_id, eot_id, mask_id = PAD_ID, SOT_ID, EOT_ID, MASK_ID

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
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("Tokenizer got an empty caption list; pass at least one text")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (<sot> and <eot>), got {context_length}")
        rows = [[SOT_ID] + self.encode(text)[: context_length - 2] + [EOT_ID] for text in texts]
        width = max(map(len, rows)) if trim else context_length
        rows = [ids + [PAD_ID] * (width - len(ids)) for ids in rows]
        return torch.tensor(rows, dtype=torch.long)  # (B, L)

    # ---- persistence ----
    def save(self, path) -> None:
        state = {"format": "florence-bpe", "version": 1, "specials": list(SPECIALS),
                 "pattern": _SPLIT.pattern, "merges": [list(m) for m in self.merges]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} not found; train one with Tokenizer.train "
                                    f"and save it with .save(path)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer file {path} is not valid JSON ({e}); re-save it") from None
        if state.get("format") != "florence-bpe" or state.get("pattern") != _SPLIT.pattern \
                or state.get("specials") != list(SPECIALS):
            raise ValueError(f"{path} is not a tokenizer saved by this version of text_encoder.Tokenizer")
        return cls([tuple(m) for m in state["merges"]])


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


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc = nn.Linear(cfg.width, hidden)
        self.proj = nn.Linear(hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, L, C)
        return self.drop(self.proj(F.gelu(self.fc(x))))  # CLIP uses QuickGELU; we use exact GELU


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.width), SelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg)

    def forward(self, x, mask, is_causal: bool):
        x = x + self.attn(self.ln_1(x), mask, is_causal)
        return x + self.mlp(self.ln_2(x))


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

    def forward_tokens(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """tokens: (B, L) long → all token states (B, L, width) after the final LayerNorm.

        attention_mask: optional (B, L) bool, True for tokens that may be attended to. Defaults to
        `tokens != pad_id` when bidirectional, and to nothing when causal (pads follow <eot>, so causal
        attention never lets them reach a real token).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        if L > self.cfg.context_length:
            raise ValueError(f"{L} tokens exceed the context length {self.cfg.context_length}; tokenize "
                             f"with context_length={self.cfg.context_length}")
        causal = self.cfg.causal
        if attention_mask is None and not causal:
            attention_mask = tokens != self.cfg.pad_id
        mask, is_causal = None, causal
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): key j visible to all queries
            if causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
                is_causal = False  # SDPA takes either is_causal or an explicit mask
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, C)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, is_causal, use_reentrant=False)
            else:
                x = blk(x, mask, is_causal)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """tokens: (B, L) long → (B, width), the state at each row's (first) end-of-text token."""
        x = self.forward_tokens(tokens, attention_mask)  # (B, L, C)
        is_eot = tokens == self.cfg.eot_id
        # the check reads a value back to the host: skipped under torch.compile, where it would break the graph
        if not torch.compiler.is_compiling() and not bool(is_eot.any(dim=1).all()):
            raise ValueError(f"every row of tokens needs the end-of-text token (id {self.cfg.eot_id}); "
                             f"tokenize with Tokenizer.__call__, which always appends it")
        eot = is_eot.int().argmax(dim=1)  # (B,) first <eot> position
        return x[torch.arange(x.shape[0], device=x.device), eot]


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


if __name__ == "__main__":
    for name in PRESETS:
        print(f"{name:10s} {count_params(name):>13,d} parameters")
