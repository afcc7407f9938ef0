"""Video CoSwin: Florence's video adapter (arXiv 2111.11432, §2.6), a CoSwin inflated from 2D to 3D.

An image CoSwin (coswin.py) becomes a video model with almost nothing learned from scratch:

    clip x (B,3,T,H,W)
      └─ ConvEmbed3D (K_t,7,7)/(K_t,4,4)/(0,2,2) ──► (B, T/K_t, H/4, W/4, C)     stage 1: 3D (S)W-MSA blocks
           └─ ConvMerging3D (k_t,3,3)/(k_t,2,2)/(0,1,1) ──► (B, T_2, H/8, W/8, 2C)   stage 2 ...
                ...                                     stage 4 → LayerNorm → mean over (T, H, W)

  * Tokenizer and patch merging: each Conv2d becomes a Conv3d with W_3D(t,h,w) = W_2D(h,w) / K_t for
    t = 1..K_t (`inflate_conv`), so a static clip gives the image model's token statistics.
  * Windows: 2D shifted windows become 3D shifted windows of Wt×Wh×Ww tokens; the cyclic shift and the
    mask act in T, H and W, and padded tokens (T, H, W padded to window multiples) are masked out.
  * Relative position bias: the 2D table is duplicated along time, E_3D(Δt,Δh,Δw) = E_2D(Δh,Δw) ∀Δt
    (`inflate_bias_table`), so the 3D table has (2Wt−1)(2Wh−1)(2Ww−1) rows.
  * Every other weight (qkv, projections, MLPs, LayerNorms, final norm) is inherited unchanged.

Choices the paper leaves open (Video Swin, arXiv 2106.13230, uses patch (2,4,4) and windows (8,7,7)):

  * Temporal kernels tile the clip: the stem's temporal kernel equals its temporal stride (K_t, default
    2, Video Swin's), and so does each transition's (`temporal_merge`; 1 keeps T at that transition, 2
    halves it). No zero frames are padded in time: a zero frame next to real ones would change the edge
    tokens of a static clip. A clip whose T is not a multiple of a temporal stride is completed by
    repeating its last frame (a static clip stays static); a clip with fewer than K_t frames is an error.
  * `temporal_merge` default (2, 2, 1, ...): the first two transitions halve T (Video Swin reduces time
    only in its tokenizer, (1, 1, 1)). Why: a temporal-merge conv has its own weights per time offset, so
    from a random init its features already tell "before" from "after", and its gradient is first-order
    in the motion. Attention cannot: softmax averages values with the same projection at every Δt, and
    its only handle on temporal order, the bias table (random ±.02, or exactly Δt-symmetric when
    inflated), starts symmetric, so order enters only through a product of two small things. On the toy
    clips a model with (1, 1, 1) stayed at chance where one with (2, 2, 1) learned the actions, given a
    small enough lr: both are needed (measured runs: docs/EXPERIMENTS.md, video). Inflated weights
    (W_2D/k_t per offset) keep the static-clip invariance at any temporal_merge; a freshly inflated model
    is even blind to the order of the frames (a clip and its reverse pool alike, tests/test_video_coswin.py),
    but the gradient of a merge conv differs between its offsets from the first step.
  * Dynamic window size (`windows`, one (Wt, Wh, Ww) per stage): small windows early, larger later.
    Default: temporal extents (2, 4, 8, 8) tokens and the image model's spatial window M at every stage,
    so every spatial table is inherited without resizing. A window larger than the feature map shrinks to
    it: in time independently (T ≤ Wt → Wt = T, no temporal shift), in space by CoSwin's own rule
    (min(H, W) ≤ M → M = min(H, W), no spatial shift), so a video block sees exactly the spatial windows
    its image block saw. Spatial windows other than M resize the 2D table bicubically first.

Consequence (tests/test_video_coswin.py): a clip of T identical frames gives exactly the image model's
features at every time step. Tokens are equal along time, so each key of the 2D window appears n_t times
in the 3D window with the same logit (the bias does not depend on Δt); softmax averages are unchanged by
duplicating every key the same number of times.

Followed for semantics (not copied): SwinTransformer/Video-Swin-Transformer mmaction/models/backbones/
swin_transformer.py (3D window partition, get_window_size, 3D relative position index).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import coswin
from coswin import CoSwin, CoSwinConfig, DropPath, Mlp, WindowAttention

# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class VideoCoSwinConfig(CoSwinConfig):
    """A CoSwinConfig (every image field means the same) plus the three video choices."""
    temporal_kernel: int = 2  # K_t of the tokenizer (= its temporal stride)
    temporal_merge: tuple | None = None  # temporal kernel = stride of each transition; None = default_temporal_merge
    windows: tuple | None = None  # ((Wt, Wh, Ww) per stage); None = default_windows(window_size, stages)

    def stage_temporal_merge(self) -> tuple:
        n = len(self.depths)
        tm = tuple(self.temporal_merge) if self.temporal_merge is not None else default_temporal_merge(n)
        if len(tm) != n - 1 or any(int(k) < 1 for k in tm):
            raise ValueError(f"temporal_merge needs one stride ≥ 1 per transition ({n - 1}), got {self.temporal_merge}")
        return tuple(int(k) for k in tm)

    def stage_windows(self) -> list[tuple[int, int, int]]:
        ws = self.windows if self.windows is not None else default_windows(self.window_size, len(self.depths))
        ws = [tuple(int(v) for v in w) for w in ws]
        if len(ws) != len(self.depths) or any(len(w) != 3 or min(w) < 1 or w[1] != w[2] for w in ws):
            raise ValueError(f"VideoCoSwinConfig.windows must give one (Wt, Wh, Ww) with Wh == Ww (square, as "
                             f"CoSwin's) for each of the {len(self.depths)} stages; got {self.windows}")
        return ws


def default_windows(M: int, stages: int = 4) -> tuple:
    """Dynamic window size: temporal extent 2, 4, 8, 8 tokens over the stages; the image window M in space."""
    return tuple((min(8, 2 ** (i + 1)), M, M) for i in range(stages))


def default_temporal_merge(stages: int = 4) -> tuple:
    """Temporal stride of each stage transition: 2 at the first two (T/K_t → T/2K_t → T/4K_t), then 1.
    See the top of the file for why (per-offset temporal weights learn motion; attention starts blind to order)."""
    return tuple(2 if i < 2 else 1 for i in range(stages - 1))


def video_config(image_cfg: CoSwinConfig, **video) -> VideoCoSwinConfig:
    """The video config of an image config: every image field copied, video fields from `video`."""
    if image_cfg.embed != "conv":
        raise ValueError("VideoCoSwin inflates CoSwin (embed='conv'); plain Swin's patch merging is not a "
                         "convolution. Build the image model with embed='conv'.")
    base = {f.name: getattr(image_cfg, f.name) for f in fields(CoSwinConfig)}
    return VideoCoSwinConfig(**base, **video)


PRESETS: dict[str, VideoCoSwinConfig] = {name: video_config(cfg) for name, cfg in coswin.PRESETS.items()}


def build(name: str = "tiny", **overrides) -> "VideoCoSwin":
    """`build("toy")`: a Video CoSwin from scratch (random init); inflate a trained CoSwin with
    `VideoCoSwin.from_image_model`."""
    return VideoCoSwin(coswin.preset_config(PRESETS, name, "Video CoSwin", **overrides))


def count_params(name_or_cfg="tiny", **overrides) -> int:
    """Parameter count of a preset (or config), built on the meta device."""
    return coswin.meta_param_count(VideoCoSwin, PRESETS, name_or_cfg, **overrides)


# ----------------------------------------------------------------------------------------------------
# Inflation of the convolutions: W_3D(t,h,w) = W_2D(h,w) / K_t


def inflate_conv(conv2d: nn.Conv2d, kernel_t: int, stride_t: int | None = None) -> nn.Conv3d:
    """Conv2d (k, s, p) → Conv3d ((K_t, k), (stride_t, s), (0, p)) with W_3D(t,h,w) = W_2D(h,w) / K_t.

    On K_t equal frames the 3D kernel sums K_t copies of W_2D/K_t: exactly the 2D response. stride_t
    defaults to K_t (the temporal windows tile the clip; smaller strides overlap in time); there is no
    temporal zero padding."""
    if kernel_t < 1:
        raise ValueError(f"temporal kernel must be ≥ 1, got {kernel_t}")
    stride_t = kernel_t if stride_t is None else stride_t
    w = conv2d.weight  # (C_out, C_in, k, k)
    conv3d = nn.Conv3d(conv2d.in_channels, conv2d.out_channels, (kernel_t, *conv2d.kernel_size),
                       (stride_t, *conv2d.stride), (0, *conv2d.padding), bias=conv2d.bias is not None,
                       device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv3d.weight.copy_(w[:, :, None].expand(-1, -1, kernel_t, -1, -1) / kernel_t)
        if conv2d.bias is not None:
            conv3d.bias.copy_(conv2d.bias)
    return conv3d


def pad_time(x: torch.Tensor, kernel_t: int, stride_t: int) -> torch.Tensor:
    """x: (B, C, T, H, W) → T completed by repeats of the last frame until the temporal windows tile it,
    (T − K_t) a multiple of stride_t (for K_t = stride_t: T a multiple of K_t). A static clip stays static."""
    extra = -(x.shape[2] - kernel_t) % stride_t
    if extra:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2)
    return x


class ConvEmbed3D(nn.Module):
    """The tokenizer: Conv3d (K_t,7,7)/(K_t,4,4)/(0,2,2), then LayerNorm. (B,3,T,H,W) → (B,T',H',W',C)."""

    def __init__(self, in_chans: int, dim: int, kernel: tuple, stride: tuple, padding: tuple):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def inflate(cls, embed2d: nn.Module, kernel_t: int) -> "ConvEmbed3D":
        """From coswin.ConvEmbed / ConvMerging: the conv inflated, the LayerNorm inherited (same module)."""
        conv = inflate_conv(embed2d.proj, kernel_t)
        with torch.device("meta"):  # a skeleton; its two modules are replaced at once
            m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        m.proj, m.norm = conv, embed2d.norm
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_time(x, self.proj.kernel_size[0], self.proj.stride[0])
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class ConvMerging3D(ConvEmbed3D):
    """Stage transition: Conv3d (k_t,3,3)/(k_t,2,2)/(0,1,1) on a channels-last map, then LayerNorm.
    (B,T,H,W,C) → (B,⌈T/k_t⌉,⌈H/2⌉,⌈W/2⌉,2C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 4, 1, 2, 3))


# ----------------------------------------------------------------------------------------------------
# 3D window helpers: small pure functions


def window_partition3d(x: torch.Tensor, ws: tuple) -> torch.Tensor:
    """(B, T, H, W, C) → (B·nW, Wt·Wh·Ww, C), windows in (t, h, w) row-major order; T, H, W multiples of ws."""
    return rearrange(x, "b (nt wt) (nh wh) (nw ww) c -> (b nt nh nw) (wt wh ww) c", wt=ws[0], wh=ws[1], ww=ws[2])


def window_reverse3d(windows: torch.Tensor, ws: tuple, T: int, H: int, W: int) -> torch.Tensor:
    """(B·nW, Wt·Wh·Ww, C) → (B, T, H, W, C); the inverse of `window_partition3d`."""
    return rearrange(windows, "(b nt nh nw) (wt wh ww) c -> b (nt wt) (nh wh) (nw ww) c",
                     nt=T // ws[0], nh=H // ws[1], nw=W // ws[2], wt=ws[0], wh=ws[1])


def relative_position_index3d(ws: tuple, table_ws: tuple | None = None) -> torch.Tensor:
    """(N, N) long, N = Wt·Wh·Ww: for query i and key j the row of the bias table holding B[Δt, Δh, Δw].
    The table (window `table_ws`, default ws) has (2Tt−1)(2Th−1)(2Tw−1) rows, Δt-major:
    row = ((Δt + Tt−1)·(2Th−1) + Δh + Th−1)·(2Tw−1) + Δw + Tw−1; a smaller window reads its centre."""
    tw = ws if table_ws is None else table_ws
    if any(a > b for a, b in zip(ws, tw)):
        raise ValueError(f"a bias table for window {tw} cannot serve a window of {ws}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in ws], indexing="ij")).flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([n - 1 for n in tw])[:, None, None]  # (3, N, N)
    return (rel[0] * (2 * tw[1] - 1) + rel[1]) * (2 * tw[2] - 1) + rel[2]


def shifted_window_mask3d(size: tuple, ws: tuple, shift: tuple) -> torch.Tensor | None:
    """Additive mask for the 3D windows of a (T, H, W) map padded to multiples of ws and cyclically
    shifted by −shift. Returns (nW, N, N) with 0 where query i may attend key j and −inf elsewhere, or
    None when nothing needs masking.

    As coswin.shifted_window_mask, one dimension more: each token gets a region label in the *unshifted*
    padded map, bit d set when its coordinate along d is < shift_d (it wraps round under the roll), and
    padded tokens (beyond T, H or W) form region 8. Tokens attend each other only within one region."""
    padded = [math.ceil(n / w) * w for n, w in zip(size, ws)]
    if not any(shift) and list(size) == padded:
        return None
    t, h, w = torch.meshgrid(*[torch.arange(n) for n in padded], indexing="ij")
    label = (t < shift[0]).long() * 4 + (h < shift[1]).long() * 2 + (w < shift[2]).long()
    label = label.masked_fill((t >= size[0]) | (h >= size[1]) | (w >= size[2]), 8)
    label = torch.roll(label, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    lw = window_partition3d(label[None, ..., None], ws).squeeze(-1)  # (nW, N)
    allowed = lw[:, :, None] == lw[:, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def inflate_bias_table(table2d: torch.Tensor, window: tuple) -> torch.Tensor:
    """((2M−1)², heads) → ((2Wt−1)(2Wh−1)(2Ww−1), heads): E_3D(Δt,Δh,Δw) = E_2D(Δh,Δw) for every Δt.
    The 2D table is resized bicubically first when the spatial window Wh = Ww differs from M."""
    Wt, Wh, Ww = window
    if Wh != Ww:
        raise ValueError(f"spatial windows are square (Wh == Ww), got {window}")
    table2d = coswin.resize_bias_table(table2d, Wh)
    return table2d.repeat(2 * Wt - 1, 1)  # Δt-major rows: the 2D table once per temporal offset


# ----------------------------------------------------------------------------------------------------
# Attention and block


class WindowAttention3D(WindowAttention):
    """coswin.WindowAttention over Wt×Wh×Ww windows: the same qkv, projections and both attention paths
    (fused / plain); only the bias table is 3D, (2Wt−1)(2Wh−1)(2Ww−1) rows × heads."""

    def __init__(self, dim: int, num_heads: int, window: tuple, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused: bool = True):
        super().__init__(dim, num_heads, window[1], qkv_bias, attn_drop, proj_drop, fused)
        self.window_size = tuple(window)
        rows = math.prod(2 * n - 1 for n in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    @classmethod
    def inflate(cls, attn2d: WindowAttention, window: tuple) -> "WindowAttention3D":
        """qkv and proj inherited (the same modules); the bias table duplicated along time."""
        with torch.device("meta"):  # a skeleton; its weights are replaced at once
            m = cls(attn2d.qkv.in_features, attn2d.num_heads, window, attn2d.qkv.bias is not None,
                    attn2d.attn_drop, attn2d.proj_drop.p, attn2d.fused)
        m.qkv, m.proj, m.proj_drop = attn2d.qkv, attn2d.proj, attn2d.proj_drop
        m.relative_position_bias_table = nn.Parameter(inflate_bias_table(attn2d.relative_position_bias_table.data,
                                                                         window))
        return m

    def relative_bias(self, ws: tuple) -> torch.Tensor:
        """(heads, N, N) bias for a window ws ≤ the table's window, N = Wt·Wh·Ww."""
        key = (tuple(ws), self.relative_position_bias_table.device)
        if key not in self._index_cache:
            self._index_cache[key] = relative_position_index3d(ws, self.window_size).to(key[1])
        idx = self._index_cache[key]
        N = idx.shape[0]
        return self.relative_position_bias_table[idx.flatten()].view(N, N, -1).permute(2, 0, 1)


class SwinBlock3D(nn.Module):
    """Pre-norm 3D (shifted-)window attention block. x: (B, T, H, W, C) → (B, T, H, W, C).

    Window and shift shrink as described at the top of the file; T, H, W are zero-padded to window
    multiples after the first norm, padded tokens are masked out as keys and cropped away afterwards."""

    def __init__(self, dim: int, num_heads: int, window: tuple, shift: tuple, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 fused: bool = True):
        super().__init__()
        self.window_size, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window, qkv_bias, attn_drop, drop, fused)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._mask_cache: dict = {}

    @classmethod
    def inflate(cls, block2d: coswin.SwinBlock, window: tuple) -> "SwinBlock3D":
        """Norms, MLP and drop-path inherited (the same modules); attention inflated. A shifted 2D block
        (shift > 0) becomes a shifted 3D block, shift ⌊W/2⌋ in each dimension."""
        dim = block2d.norm1.normalized_shape[0]
        shift = tuple(n // 2 for n in window) if block2d.shift else (0, 0, 0)
        with torch.device("meta"):  # a skeleton; every module is replaced at once
            m = cls(dim, block2d.attn.num_heads, window, shift, block2d.mlp.fc1.out_features / dim)
        m.norm1, m.norm2, m.mlp, m.drop_path = block2d.norm1, block2d.norm2, block2d.mlp, block2d.drop_path
        m.attn = WindowAttention3D.inflate(block2d.attn, window)
        return m

    def window_and_shift(self, T: int, H: int, W: int) -> tuple[tuple, tuple]:
        (Wt, M, _), (st, s, _) = self.window_size, self.shift
        if T <= Wt:  # time shrinks on its own
            Wt, st = T, 0
        if min(H, W) <= M:  # space: CoSwin's rule (SwinBlock.window_and_shift)
            M, s = min(H, W), 0
        return (Wt, M, M), (st, s, s)

    def attn_mask(self, size: tuple, ws: tuple, shift: tuple, device) -> torch.Tensor | None:
        key = (size, ws, shift, device)
        if key not in self._mask_cache:
            m = shifted_window_mask3d(size, ws, shift)
            self._mask_cache[key] = None if m is None else m.to(device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, W, C = x.shape
        ws, shift = self.window_and_shift(T, H, W)
        shortcut = x
        x = self.norm1(x)
        x = F.pad(x, (0, 0, 0, -W % ws[2], 0, -H % ws[1], 0, -T % ws[0]))  # (B, Tp, Hp, Wp, C)
        Tp, Hp, Wp = x.shape[1:4]
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition3d(x, ws)  # (B·nW, N, C)
        nW = (Tp // ws[0]) * (Hp // ws[1]) * (Wp // ws[2])
        windows = self.attn(windows, nW, ws, self.attn_mask((T, H, W), ws, shift, x.device))
        x = window_reverse3d(windows, ws, Tp, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        x = shortcut + self.drop_path(x[:, :T, :H, :W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage3D(coswin.Stage):
    """`depth` 3D blocks (alternating shift 0 and ⌊W/2⌋) and the transition to the next stage; the
    forward (with activation checkpointing) is coswin.Stage's."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None, grad_checkpointing: bool = False):
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = grad_checkpointing


# ----------------------------------------------------------------------------------------------------
# The model


class VideoCoSwin(nn.Module):
    """forward_features(x: (B,3,T,H,W)) → 4 maps (B, C_i, T_i, H_i, W_i) (the last after the final
    LayerNorm); forward(x) → (B, C_4), the mean over T, H, W of the last map (or the head's logits).
    Module and parameter names mirror CoSwin's, so the two state dicts line up key by key."""

    def __init__(self, cfg: VideoCoSwinConfig):
        super().__init__()
        if cfg.embed != "conv":
            raise ValueError("VideoCoSwin has convolutional embeddings only (embed='conv')")
        n = len(cfg.depths)
        merge = cfg.stage_temporal_merge()
        self.cfg = cfg
        dims = [cfg.embed_dim * 2 ** i for i in range(n)]
        windows = cfg.stage_windows()
        self.num_features = dims[-1]
        self.patch_embed = ConvEmbed3D(cfg.in_chans, dims[0], (cfg.temporal_kernel, 7, 7),
                                       (cfg.temporal_kernel, 4, 4), (0, 2, 2))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            w = windows[i]
            blocks = [SwinBlock3D(dims[i], cfg.num_heads[i], w, (0, 0, 0) if j % 2 == 0 else tuple(v // 2 for v in w),
                                  cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_rate, cfg.attn_drop_rate,
                                  dpr[sum(cfg.depths[:i]) + j], cfg.fused_attn) for j in range(cfg.depths[i])]
            kt = merge[i] if i < n - 1 else None
            down = ConvMerging3D(dims[i], dims[i + 1], (kt, 3, 3), (kt, 2, 2), (0, 1, 1)) if i < n - 1 else None
            self.layers.append(Stage3D(blocks, down, cfg.grad_checkpointing))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.init == "swin":  # "fan_in" (the toy preset) keeps PyTorch's Linear defaults, as CoSwin does
            self.apply(CoSwin._init_weights)

    @classmethod
    def from_image_model(cls, image: CoSwin, temporal_kernel: int = 2, windows: tuple | None = None,
                         temporal_merge: tuple | None = None, copy_weights: bool = True) -> "VideoCoSwin":
        """Inflate a CoSwin: convs by W_3D = W_2D / K_t, bias tables duplicated along time, everything else
        (qkv, projections, MLPs, norms, final norm, head) inherited unchanged.

        copy_weights=True (default) deep-copies the image model first, so the video model owns its
        weights and training it never changes `image`; False shares the inherited modules by reference
        (no extra memory; the two models then change together)."""
        if not isinstance(image, CoSwin):
            raise TypeError(f"from_image_model expects a coswin.CoSwin, got {type(image).__name__}")
        if copy_weights:
            image = copy.deepcopy(image)
        cfg = video_config(image.cfg, temporal_kernel=temporal_kernel, windows=windows, temporal_merge=temporal_merge)
        with torch.device("meta"):  # the skeleton only: every module is replaced by an inflated one below
            model = cls(replace(cfg, num_classes=0))
        model.cfg = cfg
        model.patch_embed = ConvEmbed3D.inflate(image.patch_embed, temporal_kernel)
        model.pos_drop = image.pos_drop
        merge = cfg.stage_temporal_merge()
        for i, (layer2d, w) in enumerate(zip(image.layers, cfg.stage_windows())):
            blocks = [SwinBlock3D.inflate(b, w) for b in layer2d.blocks]
            down = ConvMerging3D.inflate(layer2d.downsample, merge[i]) if layer2d.downsample else None
            model.layers[i] = Stage3D(blocks, down, layer2d.grad_checkpointing)
        model.norm, model.head = image.norm, image.head
        return model

    # -- switches (CoSwin's: they act on the stages and on every WindowAttention, 3D ones included) --------
    set_grad_checkpointing = CoSwin.set_grad_checkpointing
    set_fused_attention = CoSwin.set_fused_attention
    no_weight_decay_keywords = CoSwin.no_weight_decay_keywords

    # -- forward --------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        expect = f"(B, {self.cfg.in_chans}, T, H, W) with T ≥ {self.cfg.temporal_kernel} and H, W ≥ 4"
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"VideoCoSwin expects a 5-D clip batch {expect}; got {shape}. An image batch "
                             "(B, 3, H, W) goes to the image CoSwin; x[None] adds a batch dimension to one clip.")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"VideoCoSwin expects {self.cfg.in_chans} channels {expect}; got {tuple(x.shape)}. "
                             "Clips are channels-first: permute (B, T, C, H, W) with x.transpose(1, 2).")
        if x.shape[2] < self.cfg.temporal_kernel:
            raise ValueError(f"VideoCoSwin needs at least {self.cfg.temporal_kernel} frames (its temporal kernel) "
                             f"{expect}; got {x.shape[2]} in {tuple(x.shape)}. Sample more frames per clip or "
                             "build the model with a smaller temporal_kernel.")
        if min(x.shape[-2:]) < 4:
            raise ValueError(f"VideoCoSwin expects frames of at least 4×4 pixels {expect}; got {tuple(x.shape)}.")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))  # (B, T/K_t, H/4, W/4, C)
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1:
                x = self.norm(x)
            maps.append(x.permute(0, 4, 1, 2, 3))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[-1].mean(dim=(2, 3, 4)))


# ----------------------------------------------------------------------------------------------------
# The video classification head


class VideoClassifier(nn.Module):
    """An encoder and a linear head on its pooled vector: (B,3,T,H,W) → logits (B, K).

    With a VideoCoSwin the whole clip is seen; with `middle_frame=True` the encoder is an image CoSwin fed
    frame ⌊T/2⌋ alone, the baseline that shows what the time axis adds."""

    def __init__(self, encoder: nn.Module, num_classes: int, middle_frame: bool = False):
        super().__init__()
        self.encoder, self.middle_frame = encoder, middle_frame
        self.head = nn.Linear(encoder.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"VideoClassifier expects clips (B, 3, T, H, W); got shape {tuple(x.shape)}")
        if self.middle_frame:
            x = x[:, :, x.shape[2] // 2]  # (B, 3, H, W)
        return self.head(self.encoder(x))
