"""Florence's second object-level adapter: Dynamic DETR on the CoSwin pyramid (paper §2.4; Dai et al.,
ICCV 2021, "Dynamic DETR: End-to-End Object Detection with Dynamic Attention").

DETR's set prediction, with its two costly parts replaced by dynamic attention. No code of Dynamic DETR
was ever released, so every choice below that the paper leaves open is stated as ours.

    images ─► CoSwin ─► FeaturePyramid ─► dynamic encoder (× enc_blocks) ─► pyramid P_1 … P_L
    N queries (content q_i, box b_i) ─► dynamic decoder (× dec_layers):
        q ← LN(q + SelfAttn(q))                                    queries look at each other
        q ← LN(q + DynConv(q, RoIAlign(P, b)))                     ROI-based dynamic attention
        q ← LN(q + FFN(q))
        logits_i = classifier(q_i);   b_i ← σ(σ⁻¹(b_i) + Δb(q_i))  refined coarse to fine
    set loss: Hungarian matching (focal + L1 + GIoU costs), the same three losses at every layer

Dynamic encoder (in place of DETR's quadratic self-attention encoder). Each block on
the pyramid, for every level l:
  spatial-aware   a 3×3 modulated deformable conv whose offsets and masks come from level l, applied to
                  level l and to its neighbours l−1, l+1 brought to level l's size — exactly DyHead's
                  spatial branch, reused from `dynamic_head.DyHeadBlock.spatial` (its neighbour-alignment
                  fix included);
  scale-aware     **what differs from DyHead**: DyHead weights each aligned branch by its own
                  GAP → 1×1 conv → hard sigmoid; our reading of Dynamic DETR's scale attention is a
                  squeeze-and-excitation over the neighbouring scales together, so here the three branches are pooled *together* (GAP of each, concatenated
                  to 3C) and one SE hyper-network (3C → 3C/r → ReLU → 3 → hard sigmoid) gives the three
                  scale weights w_{l−1}, w_l, w_{l+1}: a level's weight depends on what its neighbours hold.
                  A missing neighbour (the first and last level) enters as zeros and is left out of the
                  mean. The last SE layer starts at zero, so every weight is ½ at init (as DyHead's);
  representation-aware  dynamic ReLU on the fused map (`dynamic_head.DynamicReLU`, DyHead's task-aware
                  attention under the name Dynamic DETR gives it).
The stacking order (spatial → scale → representation) is DyHead's and our reading of the paper.

Dynamic decoder. Each query is a content vector q_i ∈ R^C and a box b_i (normalised cx, cy, w, h),
both learned (nn.Embedding), the boxes initialised on a regular √N×√N grid of boxes two grid spacings
wide (an object no larger than one spacing lies inside some initial box). In place of DETR's
cross-attention, each query reads the RoI features of its own current box and mixes them with a dynamic
convolution whose 1×1 kernels are generated from the query (Sparse R-CNN's dynamic instance interaction,
PeizeSun/SparseR-CNN projects/SparseRCNN/sparsercnn/head.py `DynamicConv`):

    [K¹_i, K²_i] = W q_i + b           K¹_i ∈ R^{C×d}, K²_i ∈ R^{d×C}     (d = dyconv_dim)
    f = ReLU(LN(X_i K¹_i));  f = ReLU(LN(f K²_i));  o_i = ReLU(LN(W_o · vec(f)))   X_i: (S², C) RoI of b_i

RoIAlign is pure torch with torchvision's semantics (torchvision/csrc/ops/cpu/roi_align_kernel.cpp:
`aligned` half-pixel shift, `sampling_ratio` points per bin or ceil(bin size) when ≤ 0, bilinear with
edge clamping, zero beyond one pixel outside). **Level rule: one level per box, by size, as FPN**
(Lin et al. 2017 eq. 1; torchvision's MultiScaleRoIAlign LevelMapper): k = ⌊k₀ + log₂(√(wh)/s₀) + 10⁻⁶⌋,
clamped to the pyramid, level k having stride 2^k; s₀ = 224 at k₀ = 4 in the paper preset (FPN's), and
s₀ = 64 (the toy image size) at k₀ = 4 in the toy preset.

Box refinement (Deformable DETR's iterative refinement, fundamentalvision/Deformable-DETR
models/deformable_detr.py and deformable_transformer.py): layer l predicts Δ_l and

    b_l = σ(σ⁻¹(b_{l−1}) + Δ_l)        so b_L = σ(σ⁻¹(b_0) + Δ_1 + … + Δ_L) without the detach,

σ⁻¹ clamped at 10⁻⁵. The box the next layer pools from is b_l.detach() (Deformable DETR's
`reference_points = new_reference_points.detach()`): each layer learns its own correction; the initial
boxes b_0 learn through layer 1's prediction. The last layer of every Δ head starts at zero, so at init
every layer predicts the initial grid.

Set loss (DETR §3.1, facebookresearch/detr models/matcher.py and detr.py `SetCriterion`; Deformable
DETR's focal form): per image, a Hungarian matching of the N predictions to the G ground-truth boxes
minimising  C = λ_cls·C_focal + λ_L1·‖b − b̂‖₁ + λ_giou·(−GIoU(b, b̂))  with the focal cost
C_focal = α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p)) at the target class; then sigmoid focal loss over every
query and class (matched queries' targets one-hot, the rest background), L1 on normalised (cx, cy, w, h)
and 1 − GIoU on the matched pairs, each divided by the number of ground-truth boxes (averaged over
processes), weights 2 / 5 / 2 for the costs and the losses (Deformable DETR). Every decoder layer's
output is matched and scored (auxiliary losses). The assignment solver is our own shortest augmenting
path (Jonker–Volgenant) Hungarian method (`linear_sum_assignment`; no scipy).

Classes are text-aligned as in the DyHead adapter (dynamic_head.py, its module docstring): logit_{i,k} =
τ·⟨r_i/‖r_i‖, v_k⟩ + b with v_k the pooled text embedding of "a photo of a {name}.", so any class named in
words can be scored (zero-shot); or one fixed logit per class. Inference is NMS-free (DETR): the top
`max_det` (query, class) pairs by σ(logit), each with its query's box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import dynamic_head as dh

# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class DynamicDETRConfig:
    channels: int = 256  # pyramid / encoder / query width C
    enc_blocks: int = 6  # dynamic encoder blocks (our choice: DyHead's paper depth)
    in_indices: tuple = (1, 2, 3)  # CoSwin maps feeding the pyramid (0 = stride 4 … 3 = stride 32)
    num_extra: int = 2  # extra coarser levels by stride-2 convs
    gn_groups: int = 16  # GroupNorm after each deformable conv
    dyrelu_reduction: int = 4  # dynamic ReLU hyper-network width C / 4
    se_reduction: int = 4  # scale SE hyper-network width 3C / 4
    num_queries: int = 300  # N object queries (Sparse R-CNN / Deformable DETR: 300)
    dec_layers: int = 6  # decoder layers, each refining the boxes
    heads: int = 8  # query self-attention heads
    ffn_dim: int = 2048
    dropout: float = 0.0  # Sparse R-CNN: 0
    roi_size: int = 7  # S: RoIAlign output S × S
    sampling_ratio: int = 2  # points per bin side (≤ 0: ceil(bin size), torchvision's adaptive rule)
    roi_levels: str = "fpn"  # fpn: each box from the one level its size picks | all: the mean over every level
    canonical_size: float = 224.0  # FPN level rule: a box of side s₀ …
    canonical_level: int = 4  # … is pooled from the level of stride 2^k₀
    dyconv_dim: int = 64  # d: the dynamic 1×1 kernels' inner width (Sparse R-CNN: 64)
    cls_layers: int = 1  # Linear → LN → ReLU before the class output (Sparse R-CNN: 1)
    reg_layers: int = 3  # … before the box output (Sparse R-CNN: 3)
    init_box_size: float = 2.0  # initial query boxes: side in grid spacings
    embed_dim: int = 0  # text-aligned classifier width D (0: the text tower's)
    init_logit_scale: float = 10.0
    prior_prob: float = 0.01  # focal prior: initial foreground probability
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cost_class: float = 2.0  # matching costs (Deformable DETR)
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_class: float = 2.0  # loss weights (Deformable DETR)
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    max_det: int = 100  # detections per image at inference

    def strides(self) -> list[int]:
        base = [4 * 2 ** i for i in self.in_indices]
        return base + [base[-1] * 2 ** (j + 1) for j in range(self.num_extra)]


PRESETS: dict[str, DynamicDETRConfig] = {
    # the paper-scale adapter: 256 channels, P3–P7, 300 queries, 6 decoder layers
    "paper": DynamicDETRConfig(),
    # CPU toy: 64² ShapesDetection (1–6 objects of 8–19 px): strides 4, 8, 16, 16 queries, 3 decoder layers
    "toy": DynamicDETRConfig(channels=64, enc_blocks=1, in_indices=(0, 1, 2), num_extra=0, num_queries=16,
                             dec_layers=3, heads=4, ffn_dim=256, dyconv_dim=16, roi_size=5, canonical_size=64.0,
                             reg_layers=2),
}


def build_config(name: str = "paper", **overrides) -> DynamicDETRConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DynamicDETR preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Boxes: the decoder works in normalised (cx, cy, w, h) ∈ [0, 1]; losses and RoIAlign convert


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """σ⁻¹(x) = log(x / (1 − x)), x clamped to [0, 1] and both sides to ≥ eps (Deformable DETR's util)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(boxes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """b' = σ(σ⁻¹(b) + Δ): one step of iterative box refinement (Deformable DETR), in normalised cxcywh.
    Steps compose by adding their Δ in logit space; Δ = 0 leaves the box as it is."""
    return torch.sigmoid(inverse_sigmoid(boxes) + delta)


def grid_boxes(n: int, size: float = 2.0) -> torch.Tensor:
    """n boxes (n, 4) normalised cxcywh: the first n cells of a g×g grid (g = ⌈√n⌉, row-major), centred in
    their cells, each `size` grid spacings wide (clipped to the image side)."""
    g = math.ceil(math.sqrt(n))
    i = torch.arange(n)
    cx, cy = ((i % g).float() + 0.5) / g, ((i // g).float() + 0.5) / g
    s = torch.full((n,), min(size / g, 1.0))
    return torch.stack([cx, cy, s, s], -1)


# ----------------------------------------------------------------------------------------------------
# RoIAlign (torchvision semantics, pure torch, separable)


def _axis_weights(start, bin_size, grid, size: int, pooled: int, grid_max: int) -> torch.Tensor:
    """Interpolation weights along one axis, summed over the sample points of each bin.

    start, bin_size: (R,) in feature pixels; grid: (R,) sample points per bin (long) → (R, pooled, size):
    entry [r, i, h] is Σ over bin i's samples y of the bilinear weight of row h at y, with torchvision's
    rules (roi_align_kernel.cpp bilinear_interpolate): y < −1 or y > size → weight 0; y ≤ 0 → y = 0;
    y ≥ size − 1 → the last row with weight 1."""
    dev, dt = start.device, start.dtype
    iy = torch.arange(grid_max, device=dev, dtype=dt)
    y = (start[:, None, None] + torch.arange(pooled, device=dev, dtype=dt)[None, :, None] * bin_size[:, None, None]
         + (iy[None, None, :] + 0.5) * bin_size[:, None, None] / grid.clamp(min=1).to(dt)[:, None, None])  # (R, P, G)
    used = (iy[None, :] < grid[:, None]).to(dt)[:, None, :]  # (R, 1, G): sample g exists in this roi
    inside = ((y >= -1.0) & (y <= size)).to(dt)
    yc = y.clamp(min=0)
    low = yc.detach().floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    yc = torch.where(edge, low.to(dt), yc)
    ly = yc - low.to(dt)
    rows = torch.arange(size, device=dev)
    w = (rows == low[..., None]).to(dt) * (1 - ly)[..., None] + (rows == high[..., None]).to(dt) * ly[..., None]
    return (w * (inside * used)[..., None]).sum(2)  # (R, P, size)


def roi_align(x: torch.Tensor, boxes: torch.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = True) -> torch.Tensor:
    """RoIAlign (Mask R-CNN) with torchvision.ops.roi_align's semantics, for N boxes per image.

    x: (B, C, H, W); boxes: (B, N, 4) xyxy in image pixels (× spatial_scale = feature pixels) →
    (B, N, C, ph, pw). Bin (i, j) of a box is the mean of grid_h × grid_w bilinear samples (sampling_ratio,
    or ⌈box side / pooled side⌉ when ≤ 0); aligned=True shifts the box by −½ pixel so that sample points
    fall on pixel centres (Detectron2's ROIAlignV2), aligned=False instead forces each box side ≥ 1.
    torchvision takes boxes as (K, 5) rows [image index, x1, y1, x2, y2]; here every image has N boxes.

    Bilinear sampling is separable and so is its sum over a bin's grid, so the op is two small
    contractions: out[b,n,c,i,j] = Σ_{h,w} Y[b,n,i,h] · x[b,c,h,w] · X[b,n,j,w] / count."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    B, C, H, W = x.shape
    if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[-1] != 4:
        raise ValueError(f"roi_align: boxes must be (B={B}, N, 4) xyxy, got {tuple(boxes.shape)}")
    N = boxes.shape[1]
    wdt = torch.promote_types(x.dtype, torch.float32)  # sample positions and weights in ≥ fp32, also under bf16
    b = boxes.reshape(B * N, 4).to(wdt) * spatial_scale - (0.5 if aligned else 0.0)
    start_x, start_y = b[:, 0], b[:, 1]
    roi_w, roi_h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if not aligned:  # torchvision: malformed boxes are forced to 1×1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full((B * N,), sampling_ratio, dtype=torch.long, device=x.device)
    else:
        grid_w, grid_h = torch.ceil(roi_w.detach() / pw).long(), torch.ceil(roi_h.detach() / ph).long()
    gh_max = max(int(grid_h.max()) if B * N else 1, 1)
    gw_max = max(int(grid_w.max()) if B * N else 1, 1)
    Y = _axis_weights(start_y, bin_h, grid_h, H, ph, gh_max)  # (BN, ph, H)
    X = _axis_weights(start_x, bin_w, grid_w, W, pw, gw_max)  # (BN, pw, W)
    count = (grid_h * grid_w).clamp(min=1).to(wdt)
    Y = rearrange(Y / count[:, None, None], "(b n) i h -> b n i h", b=B).to(x.dtype)
    X = rearrange(X, "(b n) j w -> b n j w", b=B).to(x.dtype)
    t = torch.einsum("bnih,bchw->bnicw", Y, x)
    return torch.einsum("bnicw,bnjw->bncij", t, X)


def fpn_levels(boxes: torch.Tensor, strides: list[int], canonical_size: float, canonical_level: int) -> torch.Tensor:
    """FPN's level rule (Lin et al. 2017 eq. 1; torchvision MultiScaleRoIAlign's LevelMapper): a box of
    side s = √(wh) pixels goes to k = ⌊k₀ + log₂(s / s₀) + 10⁻⁶⌋, clamped to the pyramid's levels, level k
    being the map of stride 2^k. boxes (..., 4) xyxy pixels → (...) index into `strides`."""
    ks = [int(round(math.log2(s))) for s in strides]
    if ks != list(range(ks[0], ks[0] + len(ks))):
        raise ValueError(f"fpn_levels: strides {strides} must be consecutive powers of two")
    side = torch.sqrt(dh.box_area(boxes).clamp(min=1e-12))
    k = torch.floor(canonical_level + torch.log2(side / canonical_size) + 1e-6)
    return (k.clamp(ks[0], ks[-1]) - ks[0]).long()


def multiscale_roi_align(feats: list[torch.Tensor], strides: list[int], boxes: torch.Tensor, output_size: int,
                         sampling_ratio: int, canonical_size: float, canonical_level: int,
                         levels: str = "fpn") -> torch.Tensor:
    """RoIAlign (aligned=True) on a pyramid. feats: L maps (B, C, H_l, W_l); boxes (B, N, 4) xyxy pixels →
    (B, N, C, S, S). levels="fpn": each box from the one level its size chooses (`fpn_levels`);
    levels="all": the mean of the box pooled from every level (PANet's adaptive feature pooling, Liu et
    al. 2018, with a plain mean as the fusion), so a small box also reads the coarse, semantic maps.
    Every level is pooled for every box either way (fpn masks the others out): the finest level dominates
    the cost (≈ 4/3 of it alone), and every level stays in the graph (DDP needs each parameter used)."""
    if levels not in ("fpn", "all"):
        raise ValueError(f"multiscale_roi_align: levels must be fpn or all, got {levels!r}")
    level = fpn_levels(boxes.detach(), strides, canonical_size, canonical_level)  # (B, N)
    out = 0
    for l, (f, s) in enumerate(zip(feats, strides)):
        pooled = roi_align(f, boxes, output_size, 1.0 / s, sampling_ratio, aligned=True)
        if levels == "all":
            out = out + pooled / len(feats)
        else:
            out = out + pooled * (level == l).to(pooled.dtype)[..., None, None, None]
    return out


# ----------------------------------------------------------------------------------------------------
# The assignment solver: Hungarian method with shortest augmenting paths (Jonker–Volgenant), numpy


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of a rectangular (n, m) cost matrix → (rows, cols), min(n, m) pairs, rows
    ascending (scipy.optimize.linear_sum_assignment's contract).

    The Hungarian method in its shortest-augmenting-path form (Jonker & Volgenant 1987; the O(n²m)
    formulation with row / column potentials u, v): rows are added one at a time; from the new row, a
    Dijkstra-like search over reduced costs c_ij − u_i − v_j ≥ 0 finds the cheapest path to a free column,
    the potentials are updated by the path lengths (keeping every reduced cost ≥ 0 and matched ones 0),
    and the path is flipped. With n > m the transpose is solved. The inner loop over columns is numpy."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"linear_sum_assignment: the cost must be a 2-D matrix, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("linear_sum_assignment: the cost matrix holds NaN or infinite entries; give finite costs")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    match = np.zeros(m + 1, np.int64)  # match[j] = 1-based row on column j (0: free); column 0 is the root
    way = np.zeros(m + 1, np.int64)  # the previous column on the shortest path
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            reduced = c[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            free = ~used[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta  # rows on the tree (distinct: one per used column)
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = np.nonzero(match[1:])[0]
    rows = match[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Dynamic encoder


class ScaleSE(nn.Module):
    """Scale-aware attention across a neighbourhood (l−1, l, l+1): squeeze each branch (GAP → C), concat
    (3C, zeros for a missing neighbour), excite (3C → 3C/r → ReLU → 3 → hard sigmoid) → one weight per
    branch. branches: list of 3 (B, C, H, W) or None → the weighted mean over the present ones."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(3 * channels, max(3 * channels // reduction, 4))
        self.fc2 = nn.Linear(self.fc1.out_features, 3)
        nn.init.zeros_(self.fc2.weight)  # every weight ½ at init
        nn.init.zeros_(self.fc2.bias)

    def weights(self, branches: list) -> torch.Tensor:
        ref = next(b for b in branches if b is not None)
        pooled = [b.mean(dim=(2, 3)) if b is not None else ref.new_zeros(ref.shape[:2]) for b in branches]
        return dh.hard_sigmoid(self.fc2(F.relu(self.fc1(torch.cat(pooled, 1)))))  # (B, 3)

    def forward(self, branches: list) -> torch.Tensor:
        w = self.weights(branches)
        present = [(s, b) for s, b in enumerate(branches) if b is not None]
        return sum(w[:, s, None, None, None] * b for s, b in present) / len(present)


class DynamicEncoderBlock(dh.DyHeadBlock):
    """One dynamic encoder block: DyHead's spatial-aware branch (deformable conv on level l and its aligned
    neighbours, `DyHeadBlock.spatial`), the cross-scale SE (`ScaleSE`, in place of DyHead's per-branch
    scale attention), dynamic ReLU. list of L maps (B, C, H_l, W_l) → the same shapes."""

    def __init__(self, channels: int, gn_groups: int = 16, dyrelu_reduction: int = 4, se_reduction: int = 4):
        super().__init__(channels, gn_groups, dyrelu_reduction)
        del self.scale_attn  # replaced by the neighbourhood SE
        self.scale_se = ScaleSE(channels, se_reduction)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out, L = [], len(feats)
        for l in range(L):
            branches = self.spatial(feats, l)  # [same, finer if l > 0, coarser if l < L − 1]
            same, rest = branches[0], list(branches[1:])
            finer = rest.pop(0) if l > 0 else None
            coarser = rest.pop(0) if l < L - 1 else None
            out.append(self.task_attn(self.scale_se([finer, same, coarser])))
        return out


class DynamicEncoder(nn.Module):
    def __init__(self, cfg: DynamicDETRConfig):
        super().__init__()
        self.blocks = nn.ModuleList(DynamicEncoderBlock(cfg.channels, cfg.gn_groups, cfg.dyrelu_reduction,
                                                        cfg.se_reduction) for _ in range(cfg.enc_blocks))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in self.blocks:
            feats = block(feats)
        return feats


# ----------------------------------------------------------------------------------------------------
# Dynamic decoder


class DynamicConv(nn.Module):
    """ROI-based dynamic attention: 1×1 kernels generated from each query, applied to its RoI features
    (Sparse R-CNN's dynamic instance interaction; see the module docstring for the equations).
    q: (B, N, C), roi: (B, N, C, S, S) → (B, N, C)."""

    def __init__(self, channels: int, dim: int, roi_size: int):
        super().__init__()
        self.C, self.d = channels, dim
        self.dynamic = nn.Linear(channels, 2 * channels * dim)  # q → [K¹ (C×d), K² (d×C)]
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(channels)
        self.out = nn.Linear(channels * roi_size ** 2, channels)
        self.norm3 = nn.LayerNorm(channels)

    def kernels(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) → K¹ (B, N, C, d), K² (B, N, d, C): a different pair of 1×1 convs for every query."""
        p = self.dynamic(q)
        k1 = rearrange(p[..., : self.C * self.d], "b n (c d) -> b n c d", c=self.C)
        k2 = rearrange(p[..., self.C * self.d:], "b n (d c) -> b n d c", d=self.d)
        return k1, k2

    def forward(self, q: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        k1, k2 = self.kernels(q)
        f = rearrange(roi, "b n c h w -> b n (h w) c")  # (B, N, S², C)
        f = F.relu(self.norm1(f @ k1))  # (B, N, S², d)
        f = F.relu(self.norm2(f @ k2))  # (B, N, S², C)
        return F.relu(self.norm3(self.out(f.flatten(2))))


def _tower(channels: int, depth: int) -> nn.Sequential:
    """depth × (Linear → LayerNorm → ReLU), Sparse R-CNN's cls / reg towers."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    """One dynamic decoder layer: self-attention among the queries, ROI-based dynamic attention on each
    query's box, FFN (post-norm, as DETR and Sparse R-CNN), then its own class and box-delta heads.

    forward(q (B, N, C), boxes (B, N, 4) normalised cxcywh, feats, strides, image_size (H, W)) →
    (q (B, N, C), class features (B, N, D or K), Δ (B, N, 4) in logit space)."""

    def __init__(self, cfg: DynamicDETRConfig, cls_out: int):
        super().__init__()
        C = cfg.channels
        self.cfg = cfg
        self.self_attn = nn.MultiheadAttention(C, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(C)
        self.dynconv = DynamicConv(C, cfg.dyconv_dim, cfg.roi_size)
        self.norm2 = nn.LayerNorm(C)
        self.ffn = nn.Sequential(nn.Linear(C, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, C))
        self.norm3 = nn.LayerNorm(C)
        self.drop = nn.Dropout(cfg.dropout)
        self.cls_tower, self.reg_tower = _tower(C, cfg.cls_layers), _tower(C, cfg.reg_layers)
        self.cls_out = nn.Linear(C, cls_out)
        self.box_delta = nn.Linear(C, 4)
        nn.init.zeros_(self.box_delta.weight)  # Δ = 0 at init: every layer starts at its input boxes
        nn.init.zeros_(self.box_delta.bias)

    def forward(self, q, boxes, feats, strides, image_size):
        H, W = image_size
        q = self.norm1(q + self.drop(self.self_attn(q, q, q, need_weights=False)[0]))
        scale = boxes.new_tensor([W, H, W, H])
        # the box is detached here: RoIAlign gives no gradient to the boxes (torchvision's); boxes learn
        # through their deltas
        roi = multiscale_roi_align(feats, strides, box_cxcywh_to_xyxy(boxes.detach()) * scale, self.cfg.roi_size,
                                   self.cfg.sampling_ratio, self.cfg.canonical_size, self.cfg.canonical_level,
                                   self.cfg.roi_levels)
        q = self.norm2(q + self.drop(self.dynconv(q, roi.to(q.dtype))))
        q = self.norm3(q + self.drop(self.ffn(q)))
        return q, self.cls_out(self.cls_tower(q)), self.box_delta(self.reg_tower(q))


# ----------------------------------------------------------------------------------------------------
# The detector


class DynamicDETR(dh.TextClassified, nn.Module):
    """Florence's Dynamic DETR adapter.

    backbone: a CoSwin; text: a `dynamic_head.TextTower` (text-aligned classes; the training vocabulary's
    prompts live in the buffer `class_tokens`, set with `set_classes`) or `num_classes` > 0 fixed classes.

    forward(images (B, 3, H, W), class_tokens (K, L) or None) → {"cls": (B, N, K) logits, "boxes": (B, N, 4)
    normalised cxcywh, "aux": [the same dict for each earlier decoder layer]}.
    loss(out, targets, image_size) → (loss, logs); postprocess(out, image_size) / predict(images) → per
    image {"boxes" (n, 4) xyxy pixels, "scores" (n,), "labels" (n,)}, NMS-free."""

    def __init__(self, backbone: nn.Module, cfg: DynamicDETRConfig, text: dh.TextTower | None = None,
                 num_classes: int = 0):
        super().__init__()
        if (text is None) == (num_classes <= 0):
            raise ValueError("DynamicDETR needs exactly one of a TextTower (text-aligned classes) or num_classes > 0")
        self.cfg, self.backbone, self.text = cfg, backbone, text
        dims = [backbone.cfg.embed_dim * 2 ** i for i in range(len(backbone.cfg.depths))]
        self.pyramid = dh.FeaturePyramid([dims[i] for i in cfg.in_indices], cfg.channels, cfg.num_extra)
        self.encoder = DynamicEncoder(cfg)
        self.strides = cfg.strides()
        C = cfg.channels
        self.query_content = nn.Embedding(cfg.num_queries, C)  # q_i
        self.query_box = nn.Embedding(cfg.num_queries, 4)  # σ⁻¹(b_i): the initial boxes, in logit space
        with torch.no_grad():
            self.query_box.weight.copy_(inverse_sigmoid(grid_boxes(cfg.num_queries, cfg.init_box_size)))
        prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        if text is not None:
            D = cfg.embed_dim or text.embed_dim
            self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))
            self.cls_bias = nn.Parameter(torch.tensor(prior))  # shared by every class name and layer
            self.register_buffer("class_tokens", torch.zeros(0, 1, dtype=torch.long))
        else:
            D = num_classes
        self.layers = nn.ModuleList(DecoderLayer(cfg, D) for _ in range(cfg.dec_layers))
        if text is None:
            for layer in self.layers:
                nn.init.constant_(layer.cls_out.bias, prior)
        self.max_logit_scale = math.log(100.0)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, class_tokens: torch.Tensor | None = None) -> dict:
        maps = self.backbone.forward_features(images)
        feats = self.encoder(self.pyramid([maps[i] for i in self.cfg.in_indices]))
        if len(feats) != len(self.strides):
            raise ValueError(f"DynamicDETR: {len(feats)} pyramid levels but {len(self.strides)} strides")
        B = images.shape[0]
        # (B, N, C); repeat, not a view of the parameter (a view of it would still require grad under no_grad)
        q = self.query_content.weight.to(feats[0].dtype).unsqueeze(0).repeat(B, 1, 1)
        boxes = torch.sigmoid(self.query_box.weight)[None].expand(B, -1, -1)  # (B, N, 4) b_0
        if self.text is not None:
            v = self.encode_classes(class_tokens).to(feats[0].dtype)  # (K, D)
            tau = self.log_scale.clamp(max=self.max_logit_scale).exp()
        outs = []
        for layer in self.layers:
            q, c, delta = layer(q, boxes, feats, self.strides, images.shape[-2:])
            logits = tau * F.normalize(c, dim=-1) @ v.T + self.cls_bias if self.text is not None else c
            new = refine_boxes(boxes.float(), delta.float())
            outs.append({"cls": logits, "boxes": new})
            boxes = new.detach()  # the next layer pools from this box but does not move it (Deformable DETR)
        return {**outs[-1], "aux": outs[:-1]}

    # -- the set loss ----------------------------------------------------------------------------------
    @torch.no_grad()
    def match_cost(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                   tboxes: torch.Tensor) -> torch.Tensor:
        """The matching cost (DETR's HungarianMatcher with Deformable DETR's focal class cost) of every
        prediction (M, K) logits, (M, 4) normalised cxcywh against every target (T,) labels, (T, 4) → (M, T):
        λ_cls·[α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p))] + λ_L1·‖b − b̂‖₁ − λ_giou·GIoU(b, b̂), p = σ(logit)."""
        cfg = self.cfg
        p = logits.float().sigmoid()[:, labels]  # (M, T)
        a, g = cfg.focal_alpha, cfg.focal_gamma
        pos = a * (1 - p) ** g * -(p + 1e-8).log()
        neg = (1 - a) * p ** g * -(1 - p + 1e-8).log()
        boxes, tboxes = boxes.float(), tboxes.float()
        return (cfg.cost_class * (pos - neg) + cfg.cost_bbox * torch.cdist(boxes, tboxes, p=1)
                - cfg.cost_giou * dh.generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tboxes)))

    @torch.no_grad()
    def match(self, logits: torch.Tensor, boxes: torch.Tensor, tgts: list[tuple]) -> list[tuple]:
        """Hungarian matching per image. logits (B, N, K), boxes (B, N, 4) normalised cxcywh; tgts: per
        image (labels (G,), boxes (G, 4) normalised cxcywh) → per image (query indices, target indices),
        min(N, G) pairs minimising `match_cost`. As DETR, the costs of the whole batch are one (B·N, ΣG)
        matrix, moved to the CPU once and cut per image."""
        dev = logits.device
        labels = torch.cat([t[0] for t in tgts])
        B, N = logits.shape[:2]
        if len(labels) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return [(empty, empty) for _ in tgts]
        cost = self.match_cost(logits.flatten(0, 1), boxes.flatten(0, 1), labels, torch.cat([t[1] for t in tgts]))
        cost = cost.view(B, N, -1).cpu().numpy()
        out, start = [], 0
        for b, (lab, _) in enumerate(tgts):
            rows, cols = linear_sum_assignment(cost[b, :, start:start + len(lab)])
            start += len(lab)
            out.append((torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)))
        return out

    def layer_loss(self, out: dict, tgts: list[tuple], num_boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One decoder layer's (focal, L1, GIoU) losses, each / num_boxes, after its own matching."""
        logits, boxes = out["cls"].float(), out["boxes"].float()
        onehot = torch.zeros_like(logits)
        src, tgt = [], []
        for b, ((labels, tboxes), (qi, ti)) in enumerate(zip(tgts, self.match(logits, boxes, tgts))):
            onehot[b, qi, labels[ti]] = 1.0
            src.append(boxes[b, qi])
            tgt.append(tboxes[ti])
        src, tgt = torch.cat(src), torch.cat(tgt)
        loss_cls = dh.sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma) / num_boxes
        if len(src):
            loss_l1 = (src - tgt).abs().sum() / num_boxes
            loss_giou = dh.giou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)).sum() / num_boxes
        else:  # no ground truth in the batch: keep the graph connected with zero-valued terms
            loss_l1 = loss_giou = boxes.sum() * 0.0
        return loss_cls, loss_l1, loss_giou

    def loss(self, out: dict, targets: list[dict], image_size) -> tuple[torch.Tensor, dict]:
        """The set loss summed over the decoder layers (the last and the auxiliary ones) → (loss, logs).

        targets: per image {"boxes": (G, 4) xyxy pixels, "labels": (G,), optional "iscrowd"}; crowd boxes
        leave the targets (DETR's COCO loader does the same). The normaliser is the number of
        ground-truth boxes, averaged over processes (DETR's all_reduce / world size), at least 1."""
        H, W = image_size
        dev = out["cls"].device
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=dev)
        tgts = []
        for t in targets:
            boxes = t["boxes"].to(dev, torch.float32).reshape(-1, 4)
            labels = t["labels"].to(dev).reshape(-1).long()
            if t.get("iscrowd") is not None:
                keep = t["iscrowd"].to(dev).reshape(-1) == 0
                boxes, labels = boxes[keep], labels[keep]
            tgts.append((labels, box_xyxy_to_cxcywh(boxes / scale)))
        total = torch.tensor(float(sum(len(l) for l, _ in tgts)), device=dev)
        num_boxes = dh.mean_over_processes(total).clamp(min=1.0)
        cfg = self.cfg
        loss = 0.0
        for o in out["aux"] + [out]:
            lc, l1, lg = self.layer_loss(o, tgts, num_boxes)
            loss = loss + cfg.loss_class * lc + cfg.loss_bbox * l1 + cfg.loss_giou * lg
        logs = {"loss_cls": float(lc.detach()), "loss_l1": float(l1.detach()), "loss_giou": float(lg.detach()),
                "num_gt": float(total) / max(len(targets), 1)}
        return loss, logs

    # -- inference -------------------------------------------------------------------------------------
    def postprocess(self, out: dict, image_size) -> list[dict]:
        """NMS-free (DETR / Deformable DETR PostProcess): per image the top max_det (query, class) pairs by
        σ(logit); a query may give several classes, each with its box (xyxy pixels, clipped)."""
        H, W = image_size
        prob = out["cls"].float().sigmoid()  # (B, N, K)
        B, N, K = prob.shape
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=prob.device)
        boxes = box_cxcywh_to_xyxy(out["boxes"].float()) * scale
        boxes = torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H),
                             boxes[..., 2].clamp(0, W), boxes[..., 3].clamp(0, H)], -1)
        results = []
        for b in range(B):
            scores, idx = prob[b].reshape(-1).topk(min(self.cfg.max_det, N * K))
            results.append({"boxes": boxes[b, idx // K], "scores": scores, "labels": idx % K})
        return results

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_tokens: torch.Tensor | None = None) -> list[dict]:
        return self.postprocess(self(images, class_tokens), images.shape[-2:])


__all__ = ["DynamicDETRConfig", "PRESETS", "build_config", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh",
           "inverse_sigmoid", "refine_boxes", "grid_boxes", "roi_align", "fpn_levels", "multiscale_roi_align",
           "linear_sum_assignment", "ScaleSE", "DynamicEncoderBlock", "DynamicEncoder", "DynamicConv",
           "DecoderLayer", "DynamicDETR"]
