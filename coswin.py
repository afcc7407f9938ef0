"""CoSwin: the image tower of Florence (arXiv 2111.11432, §2.3).

CoSwin is the hierarchical Swin Transformer (Liu et al., arXiv 2103.14030) with one change: the patch
embedding and the patch-merging layers are replaced by CvT's *convolutional embedding* (Wu et al.,
arXiv 2103.15808): a strided, overlapping Conv2d followed by LayerNorm over channels.

    image x (B,3,H,W)
      └─ ConvEmbed 7/4/2 ──► tokens (B, H/4, W/4, C)          stage 1: d_1 Swin blocks, C channels
           └─ ConvEmbed 3/2/1 ──► (B, H/8, W/8, 2C)            stage 2: d_2 blocks
                └─ ConvEmbed 3/2/1 ──► (B, H/16, W/16, 4C)     stage 3: d_3 blocks
                     └─ ConvEmbed 3/2/1 ──► (B, H/32, W/32, 8C) stage 4: d_4 blocks → LayerNorm → mean

Every Swin block is pre-norm:  z = x + DropPath(W-MSA(LN(x)));  out = z + DropPath(MLP(LN(z))).
W-MSA attends inside non-overlapping M×M windows with a learned relative position bias B:
    Attention(Q, K, V) = SoftMax(Q Kᵀ / √d + B + mask) V
and every second block cyclically shifts the map by ⌊M/2⌋ first (SW-MSA), with a mask so tokens never
attend across regions that were not adjacent in the image.

`embed="patch"` turns the model back into plain Swin (4×4 patch embedding, 2×2 patch merging), so the
paper's one change is one argument, and official Swin checkpoints load (`load_swin_checkpoint`).

Followed for semantics (not copied): microsoft/Swin-Transformer models/swin_transformer.py (relative
position index, shifted-window mask, PatchMerging order x0,x1,x2,x3), microsoft/CvT lib/models/
cls_cvt.py (ConvEmbed), huggingface/pytorch-image-models timm/models/swin_transformer.py (helpers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange


# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class CoSwinConfig:
    embed: str = "conv"  # "conv" = CoSwin (CvT embedding), "patch" = plain Swin
    in_chans: int = 3
    embed_dim: int = 96  # C, the width of stage 1
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)  # C_i / 32: head dim 32, as Swin
    window_size: int = 7  # M (7 at 224, 12 at 384)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after attention / MLP projections
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2  # stochastic depth, rising linearly over all blocks
    num_classes: int = 0  # 0: no head, forward returns the pooled (B, C_4) vector
    # "swin": Swin's init (trunc-normal σ = .02 Linear weights, zero biases). "fan_in": PyTorch's default
    # Linear init (uniform ±1/√fan_in), whose larger residual branches make the blocks non-linear from step
    # 0 — the toy presets' choice: from scratch, σ = .02 leaves a CPU-sized run in a long plateau where it
    # learns colour (nearly linear) at once but shape late (measured runs: docs/EXPERIMENTS.md, pretrain).
    init: str = "swin"
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = the plain, readable math
    grad_checkpointing: bool = False

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


# CoSwin-H: Florence reports 637M parameters for its image encoder but not the config. We keep Swin's
# head dim 32 and SwinV2-H's width C = 352 (heads 11/22/44/88) and choose the depths. A block of width
# C_i costs ≈ 12·C_i² (qkv 3C², proj C², MLP 8C²) and a 3×3 ConvEmbed from C_i to 2C_i costs 18·C_i², so
#   params ≈ C²·(12·(d1 + 4·d2 + 16·d3 + 64·d4) + 18·(1 + 4 + 16)).
# With Swin-L/H's depths [2, 2, 18, 2] that is 680.8M (+6.9%: too many); each stage-3 block is
# 12·(4C)² ≈ 23.8M, so two fewer gives depths [2, 2, 16, 2]: 633,280,450 (count_params("huge"),
# no head) = 633.3M, −0.6% from 637M. tests/test_coswin.py checks the ±3% window on the meta device.
PRESETS: dict[str, CoSwinConfig] = {
    # CPU-fast: for tests and the adapters' toy towers built from scratch (64×64 images → maps 16, 8, 4, 2).
    "toy": CoSwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                        drop_path_rate=0.0, init="fan_in"),
    # The tower of the default CPU pretraining (`python train.py`, 64×64 images → maps 16, 8, 4, 2): toy at half
    # the width, a quarter of its FLOPs. On a CPU the image tower is most of a UniCL step, and the toy preset
    # learns shape in fewer steps at 64² than at 32², but each step costs ~3× as much; nano gets the
    # 64² token grid at about the 32² price (measured runs: docs/EXPERIMENTS.md, pretrain).
    "nano": CoSwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 4), window_size=4,
                         drop_path_rate=0.0, init="fan_in"),
    "tiny": CoSwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": CoSwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": CoSwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "large": CoSwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
    "huge": CoSwinConfig(embed_dim=352, depths=(2, 2, 16, 2), num_heads=(11, 22, 44, 88), drop_path_rate=0.2),
}


def preset_config(presets: dict, name: str, what: str = "CoSwin", **overrides):
    """presets[name] with fields overridden; an unknown name fails naming the choices (Video CoSwin too)."""
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(presets)}")
    return replace(presets[name], **overrides)


def meta_param_count(model_cls, presets: dict, name_or_cfg, **overrides) -> int:
    """Parameters of model_cls(config), built on the meta device (no memory is allocated for weights)."""
    cfg = name_or_cfg if not isinstance(name_or_cfg, str) else preset_config(presets, name_or_cfg, model_cls.__name__)
    with torch.device("meta"):
        model = model_cls(replace(cfg, **overrides))
    return sum(p.numel() for p in model.parameters())


def build(name: str = "tiny", **overrides) -> "CoSwin":
    """`build("tiny")` is CoSwin-T; `build("tiny", embed="patch", num_classes=1000)` is Swin-T."""
    return CoSwin(preset_config(PRESETS, name, "CoSwin", **overrides))


def count_params(name_or_cfg="tiny", **overrides) -> int:
    """Parameter count of a preset (or config), built on the meta device."""
    return meta_param_count(CoSwin, PRESETS, name_or_cfg, **overrides)


# ----------------------------------------------------------------------------------------------------
# Embeddings: convolutional (CoSwin) or patch (Swin)


class ConvEmbed(nn.Module):
    """CvT's convolutional token embedding: Conv2d, then LayerNorm over channels.

    x: (B, C_in, H, W) → (B, H', W', C_out) with H' = ⌊(H + 2p − k)/s⌋ + 1. The stem uses 7/4/2, the
    stage transitions 3/2/1 (so 224 → 56 → 28 → 14 → 7, Swin's grid). Overlapping windows mean no
    padding to a multiple of the stride is needed: any H, W ≥ the stride works.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Swin's patch embedding: non-overlapping p×p patches (a stride-p conv), then LayerNorm.
    x: (B, 3, H, W) → (B, ⌈H/p⌉, ⌈W/p⌉, C); H, W are zero-padded to multiples of p first."""

    def __init__(self, in_chans: int, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.patch, 0, -H % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging: concatenate each 2×2 neighbourhood (order x[0::2,0::2], x[1::2,0::2],
    x[0::2,1::2], x[1::2,1::2], as the official code), LayerNorm(4C), Linear 4C → 2C without bias.
    x: (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class ConvMerging(nn.Module):
    """CoSwin's stage transition: a 3/2/1 ConvEmbed on a channels-last map. (B,H,W,C) → (B,⌈H/2⌉,⌈W/2⌉,2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------
# Window helpers: small pure functions


def window_partition(x: torch.Tensor, M: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M·M, C), windows in row-major order; H and W must be multiples of M."""
    return rearrange(x, "b (nh m1) (nw m2) c -> (b nh nw) (m1 m2) c", m1=M, m2=M)


def window_reverse(windows: torch.Tensor, M: int, H: int, W: int) -> torch.Tensor:
    """(B·nW, M·M, C) → (B, H, W, C); the inverse of `window_partition`."""
    return rearrange(windows, "(b nh nw) (m1 m2) c -> b (nh m1) (nw m2) c", nh=H // M, nw=W // M, m1=M)


def relative_position_index(M: int, table_window: int | None = None) -> torch.Tensor:
    """(M², M²) long: for query i and key j of an M×M window, the row of the bias table holding
    B[Δh, Δw], Δ = pos_i − pos_j ∈ [−(M−1), M−1]. The table has (2T−1)² rows for T = `table_window`
    (default M), row (Δh + T−1)·(2T−1) + (Δw + T−1); T > M reads the centre of a larger table."""
    T = M if table_window is None else table_window
    if T < M:
        raise ValueError(f"a bias table for window {T} cannot serve a window of {M}")
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)  # (2, M²)
    rel = coords[:, :, None] - coords[:, None, :] + (T - 1)  # (2, M², M²), each in [0, 2T−2]
    return rel[0] * (2 * T - 1) + rel[1]


def shifted_window_mask(H: int, W: int, M: int, shift: int, Hp: int | None = None, Wp: int | None = None):
    """Additive attention mask for the windows of an (H, W) map, padded to (Hp, Wp) (multiples of M,
    default the next ones) and cyclically shifted by −`shift`. Returns (nW, M², M²) float with 0 where
    query i may attend key j and −inf elsewhere, or None when nothing needs masking.

    Tokens get a region label in the *unshifted* padded map: rows h < shift wrap to the bottom under the
    roll, columns w < shift to the right, and padded tokens form a region of their own. Two tokens of a
    window may attend each other only when their labels agree, so rolled-in tokens never see the far
    side of the image and real tokens never see padding. (The official code writes the same regions as
    slices of the shifted map and uses −100 instead of −inf.)
    """
    Hp = Hp if Hp is not None else math.ceil(H / M) * M
    Wp = Wp if Wp is not None else math.ceil(W / M) * M
    if shift == 0 and Hp == H and Wp == W:
        return None
    h = torch.arange(Hp)[:, None]
    w = torch.arange(Wp)[None, :]
    label = (h < shift).long() * 2 + (w < shift).long()  # 4 regions (only 1 when shift == 0)
    label = torch.where((h >= H) | (w >= W), torch.full_like(label, 4), label)  # padding: region 4
    label = torch.roll(label, shifts=(-shift, -shift), dims=(0, 1))
    lw = window_partition(label[None, :, :, None], M).squeeze(-1)  # (nW, M²)
    allowed = lw[:, :, None] == lw[:, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# Attention


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    The bias table has (2M−1)² rows × heads (trunc-normal, std .02); `relative_position_index` picks
    the (heads, M², M²) bias B for a window. Two paths compute the same thing:
      fused: F.scaled_dot_product_attention with B (+ mask) as a float attn_mask — except on CPU when
             B needs a gradient (training), where SDPA has no fused kernel and the plain math is faster;
      plain: softmax(q·d^−½ kᵀ + B + mask) v, written out (kept for readers and tests).
    The index for each effective window size is cached (no recomputation per forward).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.keep_attn = False  # plain path only: keep the last probabilities in `last_attn` (tests)
        self.last_attn = None
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._index_cache: dict = {}

    def relative_bias(self, M: int) -> torch.Tensor:
        """(heads, M², M²) bias for an M×M window (M ≤ the table's window)."""
        key = (M, self.relative_position_bias_table.device)
        if key not in self._index_cache:
            self._index_cache[key] = relative_position_index(M, self.window_size).to(key[1])
        idx = self._index_cache[key]
        return self.relative_position_bias_table[idx.flatten()].view(M * M, M * M, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, nW: int, M: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B·nW, N, C) windows of N = M² tokens, grouped by image; mask: (nW, N, N) or None."""
        BnW, N, C = x.shape
        B, h = BnW // nW, self.num_heads
        # q, k, v: (B·nW, heads, N, d) views of the projection (chunk's backward writes one (B·nW, N, 3C) grad)
        q, k, v = (rearrange(t, "bw n (h d) -> bw h n d", h=h) for t in self.qkv(x).chunk(3, dim=-1))
        bias = self.relative_bias(M)  # (heads, N, N): the same in every window, broadcast, never expanded
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # (nW, heads, N, N)
        drop = self.attn_drop if self.training else 0.0
        # On CPU a bias that needs a gradient sends SDPA to its unfused math (two scalings, a "safe" softmax):
        # the plain math below is faster there (docs/PERFORMANCE.md), so fused means SDPA where it pays.
        if self.fused and not (x.device.type == "cpu" and bias.requires_grad):
            if mask is not None:  # windows folded into the heads, so the (nW·heads) bias broadcasts over B
                q, k, v = (t.reshape(B, nW * h, N, -1) for t in (q, k, v))
            bias = bias.reshape(1, -1, N, N)  # a 4-D mask: the CPU flash kernel takes no 3-D one
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=self.scale)
            out = out.reshape(BnW, h, N, -1)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B·nW, heads, N, N); the scale costs N·d, not N²
            attn = (attn.view(B, nW, h, N, N) + bias).view(BnW, h, N, N)  # bias broadcast over B (and windows)
            attn = attn.float().softmax(dim=-1).to(v.dtype)  # softmax in fp32
            if self.keep_attn:
                self.last_attn = attn.detach().view(B, nW * h, N, N)
            out = F.dropout(attn, drop) @ v
        out = rearrange(out, "bw h n d -> bw n (h d)")
        return self.proj_drop(self.proj(out))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (scale by 1/(1−p))."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ----------------------------------------------------------------------------------------------------
# Swin block and stage


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block. x: (B, H, W, C) → (B, H, W, C).

    `shift` is ⌊M/2⌋ on odd blocks, 0 on even ones. When the map is no larger than the window
    (min(H, W) ≤ M) the window shrinks to min(H, W) and the shift is dropped, as Swin does. H and W are
    zero-padded to window multiples after the first norm (only when they are not multiples already);
    padded tokens are masked out as keys, so they never change a real token's output, and are cropped
    away afterwards.

    `gather_windows` (default True): the cyclic shift and the window partition are one `index_select`
    with a cached token order, and its inverse undoes both (torch.roll copies the map twice on CPU). False
    runs the reference, torch.roll + window_partition / window_reverse + torch.roll; both are tested equal.
    Masks and token orders are cached per stage (`Stage` gives its blocks one cache). `skip_dropped`
    (default True): in CPU training the residual branches skip the samples DropPath drops (`residual`).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 fused: bool = True):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, fused)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gather_windows = True
        self.skip_dropped = True
        self._mask_cache: dict = {}  # masks and token orders by size; shared by the blocks of a Stage

    def window_and_shift(self, H: int, W: int) -> tuple[int, int]:
        if min(H, W) <= self.window_size:
            return min(H, W), 0
        return self.window_size, self.shift

    def attn_mask(self, H: int, W: int, M: int, shift: int, device) -> torch.Tensor | None:
        key = ("mask", H, W, M, shift, device)
        if key not in self._mask_cache:
            m = shifted_window_mask(H, W, M, shift)
            self._mask_cache[key] = None if m is None else m.to(device)
        return self._mask_cache[key]

    def window_order(self, Hp: int, Wp: int, M: int, shift: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, inverse), each (Hp·Wp,) long: token t of the shifted, partitioned (Hp, Wp) map is token
        order[t] of the map (row-major), and inverse[order[t]] = t. Computed by the reference ops on indices."""
        key = ("order", Hp, Wp, M, shift, device)
        if key not in self._mask_cache:
            pos = torch.arange(Hp * Wp).view(1, Hp, Wp, 1)
            order = window_partition(torch.roll(pos, shifts=(-shift, -shift), dims=(1, 2)), M).flatten()
            self._mask_cache[key] = order.to(device), torch.argsort(order).to(device)
        return self._mask_cache[key]

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(S)W-MSA(LN(x)) for x: (B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        M, s = self.window_and_shift(H, W)
        Hp, Wp = H + -H % M, W + -W % M
        nW = (Hp // M) * (Wp // M)
        x = self.norm1(x)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C)
        if self.gather_windows:
            order, inverse = self.window_order(Hp, Wp, M, s, x.device)
            windows = x.reshape(B, Hp * Wp, C).index_select(1, order).view(B * nW, M * M, C)
        else:
            windows = window_partition(torch.roll(x, shifts=(-s, -s), dims=(1, 2)) if s else x, M)  # (B·nW, M², C)
        windows = self.attn(windows, nW, M, self.attn_mask(H, W, M, s, x.device))
        if self.gather_windows:
            x = windows.reshape(B, Hp * Wp, C).index_select(1, inverse).view(B, Hp, Wp, C)
        else:
            x = window_reverse(windows, M, Hp, Wp)
            x = torch.roll(x, shifts=(s, s), dims=(1, 2)) if s else x
        return x[:, :H, :W] if (Hp, Wp) != (H, W) else x

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def residual(self, x: torch.Tensor, branch) -> torch.Tensor:
        """x + DropPath(branch(x)). With `skip_dropped` (training on CPU, no dropout inside the branch) the
        branch runs only on the samples DropPath keeps: the same random draw, the same outputs and gradients
        (to rounding), without computing the branches DropPath multiplies by zero (Swin-T at drop-path rate
        0.2: 10% of the blocks' work on average). Off, on CUDA (a host sync per block) or under torch.compile:
        the reference, the branch on every sample, then DropPath."""
        p = self.drop_path.p
        if not (self.skip_dropped and self.training and p > 0 and x.device.type == "cpu" and self.attn.attn_drop == 0
                and self.mlp.drop.p == 0 and self.attn.proj_drop.p == 0 and not torch.compiler.is_compiling()):
            return x + self.drop_path(branch(x))
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)  # DropPath.forward's draw
        kept = keep.flatten().nonzero().flatten()
        if len(kept) == x.shape[0]:
            return x + branch(x) / (1 - p)
        return x.index_add(0, kept, branch(x.index_select(0, kept)) / (1 - p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual(x, self.attention_branch)
        return self.residual(x, self.mlp_branch)


class Stage(nn.Module):
    """`depth` Swin blocks (alternating shift 0 and ⌊M/2⌋), then the transition to the next stage."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_path: list[float],
                 downsample: nn.Module | None, cfg: CoSwinConfig):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, cfg.mlp_ratio,
                      cfg.qkv_bias, cfg.drop_rate, cfg.attn_drop_rate, drop_path[i], cfg.fused_attn)
            for i in range(depth)])
        cache: dict = {}  # one mask and token order per map size for the whole stage
        for blk in self.blocks:
            blk._mask_cache = cache
        self.downsample = downsample
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


# ----------------------------------------------------------------------------------------------------
# The model


class CoSwin(nn.Module):
    """CoSwin (embed="conv") or Swin (embed="patch").

    forward_features(x: (B,3,H,W)) → 4 maps (B, C_i, H_i, W_i), C_i = C·2^i, H_i ≈ H/4·2^−i (the last
    map after the final LayerNorm); forward(x) → (B, C_4) global average of the last map (or the head's
    logits when num_classes > 0). Module names follow the official Swin checkpoint layout.
    """

    def __init__(self, cfg: CoSwinConfig):
        super().__init__()
        if cfg.init not in ("swin", "fan_in"):
            raise ValueError(f"CoSwinConfig.init must be 'swin' or 'fan_in', got {cfg.init!r}")
        if cfg.embed not in ("conv", "patch"):
            raise ValueError(f"CoSwinConfig.embed must be 'conv' (CoSwin) or 'patch' (Swin), got {cfg.embed!r}")
        self.cfg = cfg
        n = len(cfg.depths)
        dims = [cfg.embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        self.stride = 4  # the stem's stride: the smallest image side accepted
        if cfg.embed == "conv":
            self.patch_embed = ConvEmbed(cfg.in_chans, dims[0], kernel=7, stride=4, padding=2)
        else:
            self.patch_embed = PatchEmbed(cfg.in_chans, dims[0], patch=4)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        merge = ConvMerging if cfg.embed == "conv" else PatchMerging
        self.layers = nn.ModuleList()
        for i in range(n):
            lo = sum(cfg.depths[:i])
            self.layers.append(Stage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size,
                                     dpr[lo:lo + cfg.depths[i]], merge(dims[i], dims[i + 1]) if i < n - 1 else None,
                                     cfg))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.init == "swin":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # Swin's init: trunc-normal(.02) Linear weights, zero biases, LayerNorm (1, 0). Convs keep
        # PyTorch's default (as CvT and Swin). The bias tables are initialised in WindowAttention.
        # (init="fan_in" skips this: every Linear keeps the default it was built with.)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- switches -------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True):
        self.cfg = replace(self.cfg, grad_checkpointing=enable)
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool = True):
        self.cfg = replace(self.cfg, fused_attn=enable)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused = enable

    def no_weight_decay_keywords(self) -> set[str]:
        """Names of parameters that should not be weight-decayed (with norms and biases)."""
        return {"relative_position_bias_table"}

    # -- forward --------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        expect = f"(B, {self.cfg.in_chans}, H, W) with H, W ≥ {self.stride}"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CoSwin expects a 4-D image batch {expect}; got {shape}. "
                             "Add a batch dimension with x[None] for a single image.")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"CoSwin expects {self.cfg.in_chans} channels {expect}; got shape {tuple(x.shape)}. "
                             "Convert grey or RGBA images to RGB first.")
        if min(x.shape[-2:]) < self.stride:
            raise ValueError(f"CoSwin expects images of at least {self.stride}×{self.stride} pixels {expect}; "
                             f"got shape {tuple(x.shape)}. Resize the images up.")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))  # (B, H/4, W/4, C)
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1:
                x = self.norm(x)
            maps.append(x.permute(0, 3, 1, 2))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[-1].mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------
# Resolution change (224 → 384) and official Swin checkpoints


def resize_bias_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """((2M−1)², heads) → ((2M'−1)², heads) by bicubic interpolation of each head's (2M−1)×(2M−1) grid."""
    old = math.isqrt(table.shape[0])
    new = 2 * new_window - 1
    if old == new:
        return table.clone()
    grid = rearrange(table, "(a b) h -> 1 h a b", a=old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 h a b -> (a b) h").to(table.dtype)


def resize_window(model_or_state_dict, new_window: int):
    """Change the attention window (e.g. 7 → 12 for the 224 → 384 fine-tune of Florence §2.2).

    A model is changed in place (tables resized, cached indices and masks dropped) and returned; a state
    dict comes back as a new dict with resized tables and without stale index/mask buffers."""
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias_table = nn.Parameter(resize_bias_table(m.relative_position_bias_table.data,
                                                                                new_window))
                m.window_size = new_window
                m._index_cache.clear()
            if isinstance(m, SwinBlock):
                m.window_size = new_window
                m.shift = new_window // 2 if m.shift else 0
                m._mask_cache.clear()
        if isinstance(model, CoSwin):
            model.cfg = replace(model.cfg, window_size=new_window)
        return model
    out = {}
    for k, v in model_or_state_dict.items():
        if k.endswith("relative_position_index") or k.endswith("attn_mask"):
            continue
        out[k] = resize_bias_table(v, new_window) if k.endswith("relative_position_bias_table") else v
    return out


# Public Swin checkpoints: the official layout (microsoft/Swin-Transformer) and timm's, into Swin or CoSwin.
#
# Followed for the layouts (read, not copied): microsoft/Swin-Transformer models/swin_transformer.py (each
# stage's PatchMerging is `layers.i.downsample`, the classifier `head`) and huggingface/pytorch-image-models
# timm/models/swin_transformer.py `checkpoint_filter_fn` (timm ≥ 0.9 moves the merging to the start of the
# next stage, `layers.{i+1}.downsample`, and the classifier to `head.fc`; its 2×2 concatenation has the
# official x0, x1, x2, x3 order). Both store buffers (relative_position_index, attn_mask) recomputed here.

_SWIN_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")

# safetensors' dtype names (huggingface/safetensors docs, "format"): the header is JSON, then raw bytes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: str) -> dict:
    """A .safetensors file → {name: tensor}: 8 bytes little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the little-endian tensor bytes. No code is run."""
    import json

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        blob = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        flat = torch.frombuffer(bytearray(blob[a:b]), dtype=dtype) if b > a else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(meta["shape"])
    return out


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 30


def read_state_dict(path_or_state_dict, what: str = "checkpoint") -> dict:
    """A public checkpoint (a path or an already-loaded dict) → a flat {name: tensor} state dict.

    Reads PyTorch files with torch.load(weights_only=True) (no pickled code runs) and .safetensors files
    with a 20-line reader above; unwraps {'model': …} (official Swin), {'state_dict': …} (open_clip
    training checkpoints) and a leading 'module.' (DDP). Used for both towers' public files (Swin here,
    CLIP in text_encoder.load_clip_text). Raises ValueError naming the file and the fix."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        path = str(sd)
        try:
            if _looks_like_safetensors(path):
                sd = _read_safetensors(path)
            else:
                import warnings

                with warnings.catch_warnings():  # torch's note on TorchScript archives: the error below says it
                    warnings.simplefilter("ignore", UserWarning)
                    sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{what} {path!r} does not exist; check the path") from None
        except RuntimeError as e:
            if "TorchScript" not in str(e):
                raise ValueError(f"cannot read {what} {path!r} ({type(e).__name__}); re-download it") from None
            raise ValueError(
                f"{what} {path!r} is a TorchScript archive (as OpenAI's CLIP .pt files), which cannot be read "
                "without running its code; use the plain state dict (e.g. open_clip_pytorch_model.bin from "
                "huggingface.co/timm/vit_base_patch32_clip_224.openai) or convert it once with: python -c "
                f"\"import torch; torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), "
                "'clip_state_dict.pt')\"") from None
        except Exception as e:  # a truncated or non-torch file, a pickle with code in it
            raise ValueError(f"cannot read {what} {path!r} ({type(e).__name__}); re-download it or pass a "
                             "state dict") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{what} holds a {type(sd).__name__}, not a state dict of tensors")
    for wrapper in ("model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _strip_prefixes(sd: dict) -> dict:
    for prefix in ("module.", "backbone.", "encoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def swin_layout(sd: dict) -> str:
    """'official' (merging in `layers.i.downsample` of stages 0..n−2) or 'timm' (in stages 1..n−1,
    classifier in `head.fc`). A one-stage model has no merging: read as official."""
    sd = _strip_prefixes(sd)
    merges = {int(k.split(".")[1]) for k in sd if k.startswith("layers.") and ".downsample." in k}
    if "head.fc.weight" in sd or (merges and 0 not in merges):
        return "timm"
    return "official"


def official_swin_state_dict(sd: dict) -> dict:
    """A Swin state dict in either layout → the official key names, without the recomputed buffers."""
    sd = _strip_prefixes(dict(sd))
    timm = swin_layout(sd) == "timm"
    out = {}
    for k, v in sd.items():
        if k.endswith(_SWIN_BUFFERS) or not isinstance(v, torch.Tensor):
            continue
        if timm:
            parts = k.split(".")
            if k.startswith("layers.") and len(parts) > 2 and parts[2] == "downsample":
                parts[1] = str(int(parts[1]) - 1)  # timm: stage i+1 opens with the merge that ends stage i
                k = ".".join(parts)
            elif k.startswith("head.fc."):
                k = "head." + k[len("head.fc."):]
        out[k] = v
    return out


def swin_config_from_state_dict(sd: dict) -> CoSwinConfig:
    """Read embed dim, depths, heads, window and classes off a Swin state dict (official or timm layout)."""
    sd = official_swin_state_dict(sd)
    try:
        embed_dim = sd["patch_embed.proj.weight"].shape[0]
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        depths = tuple(1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks."))
                       for i in range(n_layers))
        heads = tuple(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(n_layers))
        window = (math.isqrt(sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]) + 1) // 2
        mlp_ratio = sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    except (KeyError, ValueError) as e:
        raise ValueError(f"this does not look like a Swin checkpoint (missing {e}); expected keys like "
                         "'patch_embed.proj.weight' and 'layers.0.blocks.0.attn.relative_position_bias_table'") from None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return CoSwinConfig(embed="patch", embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                        mlp_ratio=mlp_ratio, num_classes=num_classes, drop_path_rate=0.0)


def swin_size_name(cfg: CoSwinConfig) -> str:
    """'Swin-T' / 'Swin-S' / 'Swin-B' / 'Swin-L' when the widths and depths are a published size, else the numbers."""
    for name, letter in (("tiny", "T"), ("small", "S"), ("base", "B"), ("large", "L")):
        p = PRESETS[name]
        if (p.embed_dim, tuple(p.depths), tuple(p.num_heads)) == \
                (cfg.embed_dim, tuple(cfg.depths), tuple(cfg.num_heads)):
            return f"Swin-{letter}"
    return f"Swin(C={cfg.embed_dim}, depths={tuple(cfg.depths)}, heads={tuple(cfg.num_heads)})"


def load_swin_checkpoint(path_or_state_dict, model: CoSwin | None = None) -> CoSwin:
    """Load an official microsoft/Swin-Transformer checkpoint (or timm's layout; a path or a state dict,
    possibly wrapped in {'model': ...}) into an `embed="patch"` CoSwin that computes the same function.
    Without `model`, one is built from the shapes in the checkpoint. Returns the model; raises ValueError
    listing missing or unexpected keys. (Index/mask buffers are recomputed here and are ignored.)
    For a CoSwin (`embed="conv"`), or a model of another window, use `load_swin_weights`."""
    sd = official_swin_state_dict(read_state_dict(path_or_state_dict, "Swin checkpoint"))
    if model is None:
        model = CoSwin(swin_config_from_state_dict(sd))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"Swin checkpoint does not match the model (embed={model.cfg.embed!r}): "
                         f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}. "
                         "Build the model with embed='patch' and the checkpoint's size, or pass model=None.")
    bad = [k for k in own if own[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"Swin checkpoint shape mismatch at {k}: checkpoint {tuple(sd[k].shape)}, model "
                         f"{tuple(own[k].shape)} ({len(bad)} such keys); for a different window use resize_window")
    model.load_state_dict(sd)
    return model


# -- Swin's patch embedding and patch merging as CoSwin's convolutions ----------------------------------


def _patch_offset(conv: nn.Conv2d, patch: int) -> int:
    """The first kernel row/column that sees input row s·i of output i (= the conv's padding), checked so
    that a patch of `patch` rows starting there fits in the kernel."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if s != patch or p + patch > k:
        raise ValueError(f"a {k}×{k}/{s}/{p} conv cannot hold a {patch}×{patch}/{patch} patch map")
    return p


def swin_patch_embed_to_conv(weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Swin's 4×4/4 patch-embedding kernel (C, 3, 4, 4) → CoSwin's 7×7/4/2 kernel (C, 3, 7, 7).

    Output (i, j) of the 7×7/4/2 conv reads input rows 4i−2 … 4i+4, so kernel row 2 + d sees row 4i + d:
    the 4×4 kernel goes to rows and columns 2–5, zeros elsewhere, and the conv computes exactly Swin's
    patch map (the bias is the same). The grids agree when H and W are ≡ 0 or 3 (mod 4) (224, 384, any
    multiple of 32): else the 7×7 conv has one row or column fewer than Swin's zero-padded grid."""
    o = _patch_offset(conv, weight.shape[-1])
    w = torch.zeros_like(conv.weight, dtype=weight.dtype)
    w[:, :, o:o + weight.shape[-2], o:o + weight.shape[-1]] = weight
    return w


def swin_merging_to_conv(norm_weight, norm_bias, reduction, conv: nn.Conv2d) -> dict[str, torch.Tensor]:
    """Swin's PatchMerging z = R·LN₄C([x0 x1 x2 x3]) → CoSwin's ConvMerging LN₂C(conv3×3/2/1(x)).

    The conv's output (i, j) reads input rows 2i−1 … 2i+1, so kernel rows/columns 1–2 see the 2×2
    neighbourhood: x0 (row +0, col +0) at [1, 1], x1 (+1, +0) at [2, 1], x2 (+0, +1) at [1, 2], x3 at [2, 2].
    With x̂ = (x − μ)/σ the LayerNorm-ed concatenation, z = R·diag(γ)·x̂ + R·β. Centring is linear
    (x − μ = P x, P = I − 11ᵀ/4C), so the kernel holds A = R·diag(γ)·P and, with a zero bias, the conv
    computes exactly A x = σ·(z − Rβ). Only the division by σ (the neighbourhood's std) does not fit in a
    conv, and CoSwin's LayerNorm after it removes any per-token scale anyway. So the merge outputs
        s · standardise(z − Rβ) + Rβ        (standardised over the 2C channels of each token),
    with its LayerNorm set to weight s·1 and bias Rβ (Swin's output for a zero input); s = ‖A‖_F / √2C
    is the RMS z − Rβ has when x̂ is white. What stays different: Swin's z − Rβ keeps its own mean and
    scale per token; CoSwin's is re-centred and scaled to s. Returns the ConvMerging's four tensors."""
    norm_weight, norm_bias, reduction = (t.detach().float() for t in (norm_weight, norm_bias, reduction))
    C4 = reduction.shape[1]
    C, out = C4 // 4, reduction.shape[0]
    A = reduction * norm_weight[None, :]  # R·diag(γ): (2C, 4C)
    A = A - A.mean(dim=1, keepdim=True)  # ·P: LN's centring folded in
    o = _patch_offset(conv, 2)
    w = torch.zeros(out, C, *conv.kernel_size)
    for k, (dh, dw) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):  # x0, x1, x2, x3
        w[:, :, o + dh, o + dw] = A[:, k * C:(k + 1) * C]
    return {"proj.weight": w, "proj.bias": torch.zeros(out),
            "norm.weight": torch.full((out,), float(A.norm() / math.sqrt(out))),
            "norm.bias": reduction @ norm_bias}


def load_swin_weights(path_or_state_dict, model: CoSwin) -> dict:
    """Load a public Swin checkpoint (official or timm layout) into `model`, a Swin (`embed="patch"`) or a
    CoSwin (`embed="conv"`) of the same widths, depths and heads. Returns the report
    {"loaded": [keys as they are], "converted": {key: how}, "fresh": [keys left as built],
     "ignored": [checkpoint keys not used]}.

    - patch: every tensor as it is: the same function (tests/test_coswin.py, the official forward).
    - conv: blocks, norms and bias tables as they are; the stem's 4×4 kernel inside the 7×7
      (`swin_patch_embed_to_conv`: the same stem function) and each PatchMerging as a 3×3 conv with a
      LayerNorm after it (`swin_merging_to_conv`: exact up to the per-token standardisation it says).
    - a model of another window (224 ↔ 384): each bias table is resized bicubically (`resize_bias_table`).
    - the classifier `head` loads when the model has one of the same size, else it is ignored.
    Raises ValueError when the sizes differ (naming both)."""
    raw = _strip_prefixes(read_state_dict(path_or_state_dict, "Swin checkpoint"))
    buffers = sorted(k for k in raw if k.endswith(_SWIN_BUFFERS))  # recomputed here from the window
    sd = official_swin_state_dict(raw)
    theirs = swin_config_from_state_dict(sd)
    cfg = model.cfg
    if (theirs.embed_dim, tuple(theirs.depths), tuple(theirs.num_heads), theirs.mlp_ratio) != \
            (cfg.embed_dim, tuple(cfg.depths), tuple(cfg.num_heads), cfg.mlp_ratio):
        raise ValueError(f"the Swin checkpoint is {swin_size_name(theirs)} (C={theirs.embed_dim}, depths "
                         f"{tuple(theirs.depths)}, heads {tuple(theirs.num_heads)}) but the model is C={cfg.embed_dim}, "
                         f"depths {tuple(cfg.depths)}, heads {tuple(cfg.num_heads)}; build it with "
                         "swin_config_from_state_dict's sizes")
    own = model.state_dict()
    new, loaded, converted = {}, [], {}
    used = set()
    for k, v in sd.items():
        if k in own and own[k].shape == v.shape:
            new[k] = v
            loaded.append(k)
            used.add(k)
        elif k.endswith("relative_position_bias_table") and k in own:
            new[k] = resize_bias_table(v, cfg.window_size)
            converted[k] = f"bias table resized bicubically, window {theirs.window_size} → {cfg.window_size}"
            used.add(k)
    if cfg.embed == "conv":
        k = "patch_embed.proj.weight"
        new[k] = swin_patch_embed_to_conv(sd[k], model.patch_embed.proj)
        converted[k] = "Swin's 4×4/4 kernel at rows and columns 2–5 of the 7×7/4/2 kernel, zeros elsewhere (exact)"
        used.add(k)
        for i, layer in enumerate(model.layers):
            if layer.downsample is None:
                continue
            p = f"layers.{i}.downsample."
            parts = swin_merging_to_conv(sd[p + "norm.weight"], sd[p + "norm.bias"], sd[p + "reduction.weight"],
                                         layer.downsample.proj)
            for name, t in parts.items():
                new[p + name] = t
            used.update(p + n for n in ("norm.weight", "norm.bias", "reduction.weight"))
            loaded = [q for q in loaded if not q.startswith(p)]  # the LN(2C) shapes may coincide; they are converted
            converted[p + "proj.weight"] = ("reduction · diag(LN γ) · (I − 11ᵀ/4C) at kernel rows and columns 1–2 "
                                            "(x0 [1,1], x1 [2,1], x2 [1,2], x3 [2,2])")
            converted[p + "proj.bias"] = "zeros (the LayerNorm after the conv carries Swin's offset)"
            converted[p + "norm.weight"] = "s·1, s = ‖A‖_F/√2C, the RMS of Swin's merge output for white input"
            converted[p + "norm.bias"] = "reduction · LN β (Swin's merge output for a zero input)"
    missing_shape = [k for k in new if k in own and new[k].shape != own[k].shape]
    if missing_shape:
        k = missing_shape[0]
        raise ValueError(f"Swin checkpoint shape mismatch at {k}: checkpoint {tuple(new[k].shape)}, model "
                         f"{tuple(own[k].shape)}; build the model with swin_config_from_state_dict's sizes")
    fresh = sorted(k for k in own if k not in new)
    lacking = [k for k in fresh if not k.startswith("head.")]
    if lacking:
        raise ValueError(f"the Swin checkpoint lacks {len(lacking)} of the model's tensors (first: {lacking[0]}); "
                         "re-download it (a complete official or timm Swin checkpoint holds every block)")
    state = {**own, **new}
    model.load_state_dict(state)
    return {"loaded": sorted(loaded), "converted": dict(sorted(converted.items())), "fresh": fresh,
            "ignored": sorted(k for k in sd if k not in used) + buffers, "swin": theirs}
