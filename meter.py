"""METER: Florence's fine-grained vision–language adapter (co-attention fusion, ITM / MLM / VQA heads).

Paper: Florence (arXiv 2111.11432) §2.5, which follows METER (Dou et al., arXiv 2111.02387) with CoSwin
as the image encoder and a bidirectional (RoBERTa-like) text encoder. Both encoders are the pretrained
towers of Florence (coswin.CoSwin, text_encoder.TextEncoder with causal=False); only their public
methods are called (`forward_features`, `forward_tokens`).

    image x ─► CoSwin.forward_features ─► tokens of the chosen stages (B, N, C_i) ─► LN, W_v ─┐
                                  + W_pos · 2D sine-cosine position of each token (our addition) │
    text t  ─► TextEncoder.forward_tokens (bidirectional, padding mask) (B, L, C) ─► W_t ─────┤
                                                                + modality-type embeddings ──┘
    co-attention layer k = 1..K, both streams from layer k−1's outputs (METER's "co-attention"):
        x_k = CoAttn_text(x_{k−1}, y_{k−1}),   y_k = CoAttn_image(y_{k−1}, x_{k−1})
        CoAttn(a, b):  a = LN(a + SelfAttn(a, a));  a = LN(a + CrossAttn(q = a, k = v = b));
                       a = LN(a + FFN(a))                                     (post-LN, as BERT / METER)
    poolers: h_text = tanh(W_p x_K[0]) (the <sot> token, BERT's [CLS]); h_image = tanh(W_p' mean_j y_K[j])
    h = [h_text; h_image]  (2·hidden; METER: 1536 at hidden 768)

Heads and objectives (METER §3 / its `objectives.py`):
  ITM  h → Linear → 2 logits; half the batch (at least 2 rows, `itm_pairs`) gets another row's image (a
       negative unless that row has the same caption), cross-entropy.
  MLM  15 % of the real text tokens (not <sot>, <eot>, <pad>) are chosen; of those 80 % become <mask>, 10 %
       a random token, 10 % stay; text states → Linear, GELU, LN, Linear → vocabulary; cross-entropy on
       the chosen positions only.
  VQA  h → Linear(2H, 2H), LN, GELU, Linear(2H, A) → logits z; soft targets s ∈ {0, .3, .6, .9, 1}
       (`vqa_score`: an answer given by k of 10 annotators scores the mean of min(1, k′/3) over the ten
       leave-one-annotator-out subsets of 9, k′ its count in the subset — the official VQA accuracy;
       exactly 0, .3, .6, .9, 1 for k = 0, 1, 2, 3, ≥ 4);
       L = (1/B) Σ_b Σ_a BCE(σ(z_ba), s_ba); metric = mean_b s_{b, argmax_a z_ba}.
Paper size: 6 layers per modality, hidden 768, 12 heads, FFN 3072 (PRESETS["florence"]); the CPU toy
preset is 2 layers × 128.

Followed for semantics (read, then written anew): zdou0830/METER meter/modules/meter_module.py
(type embeddings, parallel co-attention update, poolers with image-token averaging for Swin backbones,
VQA classifier), meter/modules/bert_model.py `BertCrossLayer` (self → cross → FFN, post-LN),
meter/modules/heads.py (Pooler, ITMHead, MLMHead), meter/modules/objectives.py (`compute_vqa`:
BCE × number of answers, `compute_mlm`, `compute_itm`); huggingface/transformers
data/data_collator.py `DataCollatorForLanguageModeling.torch_mask_tokens` (80/10/10 masking).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = ["METERConfig", "PRESETS", "build", "from_pretrained", "METER", "CoAttentionLayer", "Attention", "mask_tokens",
           "itm_pairs", "itm_mlm_loss", "mlm_loss", "vqa_loss", "vqa_metric", "vqa_score", "soft_target",
           "count_fusion_params"]


# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class METERConfig:
    hidden: int = 768  # width of both fusion streams (METER: 768)
    layers: int = 6  # co-attention layers per modality (METER: 6)
    heads: int = 12
    mlp_ratio: float = 4.0  # FFN 3072 at hidden 768
    dropout: float = 0.1  # attention / residual dropout (BERT's 0.1)
    image_levels: tuple = (-1,)  # CoSwin stages whose tokens enter the fusion; -1 = the last (METER)
    image_pos: bool = True  # add 2D sine-cosine positions to the image tokens (see `sincos_2d`)
    cross_attention: bool = True  # False: each stream sees only itself (an ablation; tests use it)
    pretrain_heads: bool = True  # the ITM and MLM heads (fusion pretraining); off for VQA fine-tuning
    num_answers: int = 0  # > 0: a VQA head over this many answers
    vocab_size: int = 0  # MLM head size; 0 = the text encoder's vocabulary


# Fusion parameters per layer and modality: self-attention 4H² + 4H, cross-attention 4H² + 4H,
# FFN 2·r·H² + (r + 1)·H, three LayerNorms 6H. At H = 768, r = 4: 9,451,776 per stream-layer, so the
# paper's 6 × 2 stream-layers are 113.4M (count_fusion_params; tests check it on the meta device).
PRESETS: dict[str, METERConfig] = {
    # CPU minutes. The last stage only, as METER: at the VQA task's 128² (twice the toy pretraining's 64²,
    # as METER fine-tunes VQA at twice its pretraining resolution) it is a 4 × 4 grid of 16 tokens; hidden 128
    # is the narrowest width that learned as fast per step as a wider fusion (docs/EXPERIMENTS.md, vqa).
    "toy": METERConfig(hidden=128, layers=2, heads=4, dropout=0.0, image_levels=(-1,)),
    "base": METERConfig(hidden=768, layers=6, heads=12),
    "florence": METERConfig(hidden=768, layers=6, heads=12),  # paper §2.5
}


def config(name: str, **overrides) -> METERConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown METER preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(METERConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown METERConfig field(s) {unknown}; the fields are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build(name: str, image_encoder: nn.Module, text_encoder: nn.Module, **overrides) -> "METER":
    """`build("toy", coswin_model, bidirectional_text_encoder, num_answers=18)`."""
    return METER(image_encoder, text_encoder, **dataclasses.asdict(config(name, **overrides)))


def bidirectional(text_encoder: nn.Module) -> nn.Module:
    """A causal text tower's weights in a bidirectional TextEncoder (only the attention mask differs)."""
    text = type(text_encoder)(dataclasses.replace(text_encoder.cfg, causal=False))
    text.load_state_dict(text_encoder.state_dict())
    return text


def from_pretrained(florence: nn.Module, name: str, **overrides) -> "METER":
    """METER on the towers of a pretrained Florence model (unicl.Florence): its CoSwin as the image
    encoder, its causal text tower's weights in a bidirectional copy (paper §2.5: METER's text side
    attends both ways); the joint-space projections are not used. `from_pretrained(florence, "toy",
    num_answers=18)`."""
    return build(name, florence.image_encoder, bidirectional(florence.text_encoder), **overrides)


# ----------------------------------------------------------------------------------------------------
# The co-attention layer


class Attention(nn.Module):
    """Multi-head attention, queries from `x`, keys and values from `context` (= x for self-attention).

    x: (B, Lq, H), context: (B, Lk, H), key_mask: (B, Lk) bool, True where a key may be attended to.

    `keep_attn = True` switches to the written-out path, softmax(q kᵀ / √d, masked) v, and keeps its
    probabilities (B, heads, Lq, Lk) in `last_attn` (detached), so that a reader can see what each query
    looks at (figures.py draws the text-to-image cross-attention); the output is the same function as the
    fused path's (tests/test_figures.py checks both)."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"METER hidden size {hidden} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.keep_attn = False
        self.last_attn = None

    def forward(self, x, context, key_mask=None):
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk): the same for every query
        drop = self.dropout if self.training else 0.0
        if self.keep_attn:  # the plain math, probabilities kept for drawing
            logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, Lq, Lk)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            attn = logits.float().softmax(dim=-1).to(v.dtype)
            self.last_attn = attn.detach()
            y = F.dropout(attn, drop) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))  # (B, Lq, H)


class CoAttentionLayer(nn.Module):
    """One modality's layer (METER's BertCrossLayer): self-attention → cross-attention → FFN, each
    followed by dropout, the residual and a LayerNorm (post-LN).

    forward(x: (B, L, H), other: (B, M, H), mask: (B, L) bool | None, other_mask: (B, M) bool | None)
    → (B, L, H). Queries come from x; the cross-attention's keys and values come from `other`.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 cross_attention: bool = True):
        super().__init__()
        self.cross_attention = cross_attention
        self.self_attn, self.ln_self = Attention(hidden, heads, dropout), nn.LayerNorm(hidden)
        self.cross_attn, self.ln_cross = Attention(hidden, heads, dropout), nn.LayerNorm(hidden)
        ffn = int(hidden * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.ln_ffn = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, other, mask=None, other_mask=None):
        x = self.ln_self(x + self.drop(self.self_attn(x, x, mask)))
        if self.cross_attention:
            x = self.ln_cross(x + self.drop(self.cross_attn(x, other, other_mask)))
        return self.ln_ffn(x + self.drop(self.ffn(x)))


class Pooler(nn.Module):
    """tanh(W h): BERT's pooler, applied to the first token (text) or to the token average (image)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, h):  # (B, H)
        return torch.tanh(self.dense(h))


# ----------------------------------------------------------------------------------------------------
# The fusion model with its heads


class METER(nn.Module):
    """Co-attention fusion of an image encoder and a bidirectional text encoder, with ITM, MLM and (when
    num_answers > 0) VQA heads.

    image_encoder: has `forward_features(x) -> list of maps (B, C_i, H_i, W_i)` (coswin.CoSwin) and
        `cfg.embed_dim` / `num_features` to size the projections (C_i = embed_dim · 2^i).
    text_encoder: has `forward_tokens(tokens, attention_mask) -> (B, L, width)`, `num_features`, and
        `cfg.causal == False` (METER's text side is bidirectional; a causal tower is refused).

    forward(images (B, 3, H, W), tokens (B', L), attention_mask=None, blind=False, image_index=None,
            mlm_labels=None) -> dict with
        text: (B', L, H) and image: (B', N, H) fusion outputs, pooled: (B', 2H) = [h_text; h_image],
        itm: (B', 2) logits (pretraining heads), mlm: (M, V) logits at the M positions where
        mlm_labels != −100 (if given), vqa: (B', A) logits (if the VQA head exists).
    Text row b is paired with image image_index[b] (default b): ITM's swapped negatives and MLM's masked
    copies share one pass of the image tower, and everything happens inside one forward (as DDP wants).
    `blind=True` zeroes the image encoder's features before the fusion (the image-blind ablation).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, hidden: int = 768, layers: int = 6,
                 heads: int = 12, mlp_ratio: float = 4.0, dropout: float = 0.1, image_levels=(-1,),
                 image_pos: bool = True, cross_attention: bool = True, pretrain_heads: bool = True,
                 num_answers: int = 0, vocab_size: int = 0):
        super().__init__()
        if getattr(getattr(text_encoder, "cfg", None), "causal", False):
            raise ValueError("METER needs a bidirectional text encoder; build it with causal=False (the weights of "
                             "a causal tower load unchanged: TextEncoder(replace(cfg, causal=False)))")
        self.cfg = METERConfig(hidden=hidden, layers=layers, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout,
                               image_levels=tuple(image_levels), image_pos=image_pos, cross_attention=cross_attention,
                               pretrain_heads=pretrain_heads, num_answers=num_answers,
                               vocab_size=vocab_size or text_encoder.cfg.vocab_size)
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        n_stages = len(image_encoder.cfg.depths)
        self.levels = sorted({lvl % n_stages for lvl in self.cfg.image_levels})
        dims = [image_encoder.cfg.embed_dim * 2 ** i for i in range(n_stages)]
        # W_v per chosen stage (a LayerNorm first: only the last CoSwin map is normalised), W_t for text
        self.image_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(dims[i]), nn.Linear(dims[i], hidden))
                                        for i in self.levels)
        self.image_pos_proj = nn.Linear(4 * POS_FREQS, hidden) if image_pos else None  # W_pos: sincos → hidden
        self.text_proj = nn.Linear(text_encoder.num_features, hidden)
        self.type_embedding = nn.Embedding(2, hidden)  # 0: text, 1: image
        self.text_layers = nn.ModuleList(CoAttentionLayer(hidden, heads, mlp_ratio, dropout, cross_attention)
                                         for _ in range(layers))
        self.image_layers = nn.ModuleList(CoAttentionLayer(hidden, heads, mlp_ratio, dropout, cross_attention)
                                          for _ in range(layers))
        self.text_pooler, self.image_pooler = Pooler(hidden), Pooler(hidden)
        self.itm_head = self.mlm_head = self.vqa_head = None
        if pretrain_heads:
            self.itm_head = nn.Linear(2 * hidden, 2)
            self.mlm_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                          nn.Linear(hidden, self.cfg.vocab_size))
        if num_answers > 0:
            self.vqa_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                          nn.Linear(2 * hidden, num_answers))
        for name, m in self.named_children():  # BERT init for the new modules; the towers keep theirs
            if name not in ("image_encoder", "text_encoder"):
                m.apply(_bert_init)

    def train(self, mode: bool = True):
        """As nn.Module.train, except that a frozen image tower stays in eval mode (no drop-path in a fixed
        feature extractor)."""
        super().train(mode)
        if self.image_tower_frozen():
            self.image_encoder.eval()
        return self

    def image_tower_frozen(self) -> bool:
        """No parameter of the image tower requires grad: it is a fixed feature extractor."""
        return not any(p.requires_grad for p in self.image_encoder.parameters())

    # -- the two streams ------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor, blind: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) → projected image tokens (B, N, hidden), N = Σ over chosen stages of H_i·W_i.
        blind: the encoder's features are replaced by zeros (the tower runs without gradients, for the shapes).
        A frozen tower (no parameter requires grad) runs without autograd too: a fixed feature extractor."""
        with torch.no_grad() if blind or self.image_tower_frozen() else contextlib.nullcontext():
            maps = self.image_encoder.forward_features(images)
        tokens = []
        for proj, i in zip(self.image_proj, self.levels):
            h, w = maps[i].shape[-2:]
            t = rearrange(maps[i], "b c h w -> b (h w) c")
            t = proj(torch.zeros_like(t) if blind else t)  # (B, h·w, hidden)
            if self.image_pos_proj is not None and not blind:
                t = t + self.image_pos_proj(sincos_2d(h, w, POS_FREQS, t.device, t.dtype))
            tokens.append(t)
        return torch.cat(tokens, dim=1)

    def text_features(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) → (B, L, hidden), bidirectional over the tokens where attention_mask is True."""
        return self.text_proj(self.text_encoder.forward_tokens(tokens, attention_mask))

    def fuse(self, x, y, x_mask=None, y_mask=None):
        """x: text (B, L, H), y: image (B, N, H) → both after K co-attention layers. Each layer reads the
        previous layer's x and y, so the two streams update in parallel (neither sees the other's new state)."""
        x = x + self.type_embedding.weight[0]
        y = y + self.type_embedding.weight[1]
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            x, y = text_layer(x, y, x_mask, y_mask), image_layer(y, x, y_mask, x_mask)
        return x, y

    def pool(self, x, y, y_mask=None):
        """[tanh(W x[:, 0]); tanh(W' mean(y))] → (B, 2H); the image mean is over valid tokens."""
        if y_mask is None:
            y_mean = y.mean(dim=1)
        else:
            w = y_mask.to(y.dtype)[..., None]
            y_mean = (y * w).sum(1) / w.sum(1).clamp(min=1.0)
        return torch.cat([self.text_pooler(x[:, 0]), self.image_pooler(y_mean)], dim=-1)

    def forward(self, images, tokens, attention_mask=None, blind: bool = False, image_index=None, mlm_labels=None):
        if attention_mask is None:
            attention_mask = tokens != self.text_encoder.cfg.pad_id
        attention_mask = attention_mask.bool()
        y = self.image_features(images, blind)  # (B, N, H)
        if image_index is not None:
            y = y[image_index]  # (B', N, H)
        x = self.text_features(tokens, attention_mask)  # (B', L, H)
        x, y = self.fuse(x, y, attention_mask, None)
        out = {"text": x, "image": y, "pooled": self.pool(x, y)}
        if self.itm_head is not None:
            out["itm"] = self.itm_head(out["pooled"])
        if mlm_labels is not None:
            out["mlm"] = self.mlm_head(x[mlm_labels != -100])  # only the chosen positions go through the head
        if self.vqa_head is not None:
            out["vqa"] = self.vqa_head(out["pooled"])
        return out


POS_FREQS = 6  # frequencies π·2^k, k = 0..5: enough to tell apart the cells of a 32 × 32 grid


def sincos_2d(h: int, w: int, n_freq: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed positions of an h × w grid of image tokens → (h·w, 4·n_freq), row-major like the tokens.

    Cell centres in image coordinates u = (i + ½)/h, v = (j + ½)/w ∈ (0, 1), so tokens of different CoSwin
    stages at the same place get the same code; features [sin(π 2^k u), cos(π 2^k u), sin(π 2^k v),
    cos(π 2^k v)]_k. Why: CoSwin has only window-relative position biases and METER's ViT backbones carry
    absolute position embeddings into the fusion; relations such as "left of" need them (the same sine-
    cosine idea as MAE's `get_2d_sincos_pos_embed`, facebookresearch/mae util/pos_embed.py, in [0, 1]
    coordinates and followed by a learned projection W_pos)."""
    u = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    v = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    f = math.pi * 2.0 ** torch.arange(n_freq, device=device, dtype=torch.float32)  # (K,)
    uu, vv = torch.meshgrid(u, v, indexing="ij")  # (h, w)
    ang_u, ang_v = uu.reshape(-1, 1) * f, vv.reshape(-1, 1) * f  # (h·w, K)
    return torch.cat([ang_u.sin(), ang_u.cos(), ang_v.sin(), ang_v.cos()], dim=1).to(dtype)


def _bert_init(m: nn.Module):
    """BERT / METER `init_weights`: normal(0, 0.02) weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def count_fusion_params(hidden: int = 768, layers: int = 6, mlp_ratio: float = 4.0) -> int:
    """Parameters of the 2 × `layers` co-attention layers (the formula above PRESETS)."""
    H, F_ = hidden, int(hidden * mlp_ratio)
    per = 2 * (4 * H * H + 4 * H) + (2 * H * F_ + F_ + H) + 6 * H
    return 2 * layers * per


# ----------------------------------------------------------------------------------------------------
# Objectives


def mask_tokens(tokens: torch.Tensor, vocab_size: int, mask_id: int, special_ids=(0, 1, 2, 3), prob: float = 0.15,
                first_regular_id: int = 4, generator: torch.Generator | None = None):
    """BERT's masking: each real token (not in special_ids) is chosen with probability `prob`; a chosen token
    becomes `mask_id` with p = .8, a uniformly random regular token (ids first_regular_id..vocab_size−1) with
    p = .1, and stays with p = .1.

    tokens: (B, L) → (masked tokens (B, L), labels (B, L): the original id where chosen, −100 elsewhere)."""
    dev = tokens.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    real = torch.ones_like(tokens, dtype=torch.bool)
    for s in special_ids:
        real &= tokens != s
    chosen = real & (rand(tokens.shape) < prob)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    u = rand(tokens.shape)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(first_regular_id, vocab_size, tokens.shape, generator=generator).to(dev)
    masked = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def itm_pairs(texts: list[str], generator: torch.Generator | None = None):
    """max(2, ⌊B/2⌋) random rows (for B ≥ 2; none for B = 1) get the image of another chosen row: the
    chosen rows' images are cyclically shifted by one among them, so every chosen row gets another row's
    image. At least 2 because one row alone cannot swap (B = 2 or 3 swaps 2 rows).

    → (image_index (B,) long: row b is paired with image image_index[b]; label (B,) long: 1 = match).
    A swapped pair whose two captions are equal is a match (label 1): only the caption decides."""
    B = len(texts)
    image_index = torch.arange(B)
    if B >= 2:
        rows = torch.randperm(B, generator=generator)[: max(2, B // 2)]
        image_index[rows] = rows.roll(1)
    label = torch.tensor([int(texts[b] == texts[int(image_index[b])]) for b in range(B)])
    return image_index, label


def itm_mlm_loss(model, images: torch.Tensor, tokens: torch.Tensor, texts: list[str], mask_id: int,
                 vocab_size: int, prob: float = 0.15, generator: torch.Generator | None = None):
    """METER's pretraining step in one forward: B rows of masked text with their own images (MLM) and B rows
    of clean text with half the images swapped (ITM) → (L_mlm + L_itm, logs).

    model: a METER with pretraining heads (or a DDP wrapper of one); images (B, 3, H, W), tokens (B, L),
    texts: the B captions (equal captions make a swapped pair a match)."""
    B = tokens.shape[0]
    masked, labels = mask_tokens(tokens, vocab_size, mask_id, prob=prob, generator=generator)
    image_index, itm_label = itm_pairs(texts, generator)
    dev = tokens.device
    all_labels = torch.cat([labels, torch.full_like(labels, -100)])  # (2B, L): MLM only on the masked copy
    out = model(images, torch.cat([masked, tokens]), image_index=torch.cat([torch.arange(B), image_index]).to(dev),
                mlm_labels=all_labels)
    l_mlm, mlm_acc = mlm_loss(out["mlm"], all_labels, out["text"])
    itm_logits, itm_label = out["itm"][B:], itm_label.to(dev)
    l_itm = F.cross_entropy(itm_logits.float(), itm_label)
    itm_acc = float((itm_logits.argmax(-1) == itm_label).float().mean())
    return l_mlm + l_itm, {"mlm_loss": float(l_mlm.detach()), "itm_loss": float(l_itm.detach()),
                           "mlm_accuracy": mlm_acc, "itm_accuracy": itm_acc}


def mlm_loss(mlm_logits: torch.Tensor, labels: torch.Tensor, text_states: torch.Tensor | None = None):
    """Cross-entropy on the chosen positions only. mlm_logits: (M, V) at the M positions where labels != −100
    (METER.forward's "mlm"), labels: (B, L) → (loss, accuracy on those positions). With no chosen position
    the loss is zero (connected to the graph through `text_states` when given) and the accuracy NaN."""
    target = labels[labels != -100]  # (M,) in the row-major order of the boolean index
    if target.numel() == 0:
        zero = (text_states.sum() if text_states is not None else mlm_logits.sum()) * 0.0
        return zero, float("nan")
    return F.cross_entropy(mlm_logits.float(), target), float((mlm_logits.argmax(-1) == target).float().mean())


def vqa_score(count: int) -> float:
    """Soft score of an answer given by `count` = k of 10 annotators: 0, .3, .6, .9, 1 for k = 0, 1, 2, 3, ≥ 4.

    The table used by METER and ViLT (dandelin/ViLT, vilt/utils/write_vqa.py `get_score`, from
    hengyuan-hu/bottom-up-attention-vqa, tools/compute_softscore.py). It is the official VQA evaluator's
    accuracy: the mean over the ten leave-one-annotator-out subsets of 9 answers of min(1, k′/3), k′ the
    answer's count in the subset. Leaving out one of the k who gave it (k of the ten subsets) leaves
    k′ = k − 1, leaving out another annotator (10 − k subsets) leaves k′ = k, so the score is
    [k·min(1, (k−1)/3) + (10−k)·min(1, k/3)] / 10 = 0, 3/10, 6/10, 9/10, 1 exactly — not min(1, k/3)
    (which would give 1/3, 2/3), and no rounding is involved.
    """
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def soft_target(answers: list[str], vocab_index: dict[str, int]) -> torch.Tensor:
    """Ten annotator answers -> (len(vocab),) soft scores; answers outside the vocabulary score nothing."""
    target = torch.zeros(len(vocab_index))
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    for a, k in counts.items():
        if a in vocab_index:
            target[vocab_index[a]] = vqa_score(k)
    return target


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b Σ_a BCE(σ(z_ba), s_ba): METER's `binary_cross_entropy_with_logits(z, s) · A`.
    logits, targets: (B, A); targets are soft scores in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


def vqa_metric(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VQA score per question: the soft score of the arg-max answer, s_{b, argmax_a z_ba} → (B,).
    An answer outside the vocabulary has no column, so a question whose answers are all outside scores 0."""
    return targets.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
