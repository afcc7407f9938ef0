"""Florence's object-level adapter: Dynamic Head on the CoSwin pyramid (paper §2.4; Dai et al. 2021,
"Dynamic Head: Unifying Object Detection Heads with Attentions", arXiv 2106.08322).

The CoSwin maps become a feature pyramid F ∈ R^{L×S×C} (L levels, S = H·W positions, C channels), and
each DyHead block applies three attentions in turn (DyHead eq. 2–5):

    W(F) = π_C( π_S( π_L(F) · F ) · F ) · F

  scale-aware   π_L(F)·F = σ( f( 1/(SC) Σ_{S,C} F ) ) · F                        σ = hard sigmoid (below)
  spatial-aware π_S(F)·F = 1/L Σ_l Σ_k w_{l,k} · F(l; p_k + Δp_k; c) · Δm_k      K = 9 sampling points
  task-aware    π_C(F)·F = max( α¹(F)·F_c + β¹(F), α²(F)·F_c + β²(F) )            dynamic ReLU

As in the official code (microsoft/DynamicHead, dyhead/dyhead.py `DyConv`): for level l the 3×3
modulated deformable convolution (offsets Δp and masks Δm from one 3×3 conv with 27 = 2·9 + 9 outputs,
computed on level l) is applied to level l and to its neighbours l−1 (finer) and l+1 (coarser); each
result is weighted by the scale attention (GAP → 1×1 conv → ReLU → hard sigmoid) and the weighted
results are averaged; dynamic ReLU follows. So the scale attention is computed on the spatially
aggregated maps, the order of the official code.

Hard sigmoid: the DyHead paper writes σ(x) = max(0, min(1, (x + 1)/2)); the official code's h_sigmoid
(dyhead/dyrelu.py) is ReLU6(x + 3)/6 = max(0, min(1, (x + 3)/6)). **This code uses the official form**
(`hard_sigmoid`), in the scale attention and in the dynamic ReLU's hyper-network.

Initialisation, and where it departs from the official code: the official `DyConv.init_weights` draws
N(0, 0.01²) only for modules that are `nn.Conv2d`, so its ModulatedDeformConv layers (not Conv2d) keep
their own reset_parameters (uniform ±1/√(9·C_in), bias 0), and its 27-channel offset conv (outside the
loop) keeps PyTorch's default Conv2d init, i.e. random offsets and masks at the start. Here the
deformable-conv weights are drawn from N(0, 0.01²) (bias 0): GroupNorm follows each of them, so only
the direction of the weights matters at init, not their scale. The offset conv is zero-initialised, as
DCNv2's own ModulatedDeformConvPack does (`init_offset`): Δp = 0 and Δm = sigmoid(0) = ½, so every
block starts as plain 3×3 convs on a regular grid (a tested, known starting point) and learns its
offsets from there. The scale-attention 1×1 conv is N(0, 0.01²), bias 0, as the official code.

Neighbour alignment (the known defect, microsoft/DynamicHead#25, also in GLIP's vldyhead.py): the
official code runs the coarser level l+1 (half the size) through the deformable conv with level l's
offsets and mask — twice the spatial size of that conv's output — so the kernel reads only the first
quarter of the flattened offset map, displaced from where it belongs; the result is upsampled after.
**Our fix: upsample level l+1 to level l's size first (bilinear), then apply the deformable conv with
level l's offsets and mask**, so every offset is used at the position it was predicted for. The offsets
are in level l's pixels; the finer level l−1 is read by a stride-2 conv, where one level-l pixel is two
pixels, so we also double the offsets on that branch (the official code uses them unscaled).

Detection head (our choice, stated as the issue asks): **ATSS** as the paper (Florence: DyHead + ATSS),
in the ATSS paper's anchor-free form — one location per map cell, regressing the distances (l, t, r, b)
to the box sides; ATSS chooses the positives (per level the k = 9 locations nearest to the box centre,
IoU of their square anchor of side `anchor_scale`·stride with the box ≥ mean + std of those IoUs,
centre inside the box, highest IoU wins). Losses: sigmoid focal loss (α = .25, γ = 2) / #positives,
GIoU loss × 2 weighted by the centerness target, centerness BCE (ATSS / FCOS). COCO crowd boxes are
removed from the targets, and under torch.distributed the normalisers are averaged over the processes
(see `Detector.loss`).

Departures from the official ATSS heads (sfzhang15/ATSS atss_core/modeling/rpn/atss/atss.py and
inference.py; microsoft/DynamicHead extra/atss.py, the DyHead + ATSS head), documented rather than
changed because the measured results were obtained with this code:
  * Output convs are 3×3 (class / joint-space embedding, box distances, centerness), as sfzhang15/ATSS's
    ATSSHead; the DyHead repository's ATSSHead, which sits directly on the DyHead output (no tower
    convs), uses 1×1 output convs.
  * Box regression: distances exp(s_l · x)·stride from the location (FCOS-style, one per location);
    the DyHead ATSS head regresses Box2BoxTransform deltas against its anchors.
  * Inference score: here s = √(σ(cls)·σ(ctr)) is computed first and thresholded (s > 0.05); the
    official code thresholds σ(cls) > 0.05 first and multiplies by σ(ctr) after (sfzhang15 then reports
    √ of the product, DyHead's extra/atss.py the product itself). The candidate sets differ: here a
    low-cls, high-ctr location can pass (σ(cls) = .003, σ(ctr) = 1), there it cannot.
  * Pre-NMS top-k (1000) is taken over all levels together here; the official code keeps the top 1000
    per level, then runs class-wise NMS on the union. Both keep at most 100 detections after NMS.

Classification is **text-aligned** by a CLIP/ViLD-style region–prompt dot product (what Florence needs
for zero-shot transfer): a region feature r at each location is projected to the joint space and
compared with ONE pooled embedding v_k per class prompt from the pretrained text tower (the prompt
"a photo of a {name}.", encoded in every forward so the tower can be fine-tuned with the detector, or
kept frozen), as CLIP's zero-shot classifier scores an image and ViLD's text-embedding head scores a
region:

    logit_{i,k} = τ · ⟨ r_i/‖r_i‖, v_k ⟩ + b        (learnable τ = exp(log_scale) ≤ 100, shared bias b)

so any class named in words can be scored. This is not GLIP's word–region alignment, which scores each
region against every word token of the prompt (and fuses image and text inside the head): here a class
is one vector, and image and text meet only in this dot product. `num_classes > 0` instead gives one
fixed logit per class.

Also here: box ops (IoU, GIoU, xyxy↔xywh), `batched_nms` (torchvision's rule: suppress a box when its
IoU with a kept, higher-scored box of its class is strictly above the threshold) and `coco_map` with
pycocotools' rules. Modulated deformable convolution is pure torch (`F.embedding_bag` on CPU,
`F.grid_sample` elsewhere), with torchvision's `deform_conv2d` offset layout. Public code followed for
semantics (not copied): microsoft/DynamicHead dyhead/dyhead.py, dyhead/dyrelu.py, extra/atss.py;
pytorch/vision torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp and nms_kernel.cpp; cocodataset/cocoapi
PythonAPI/pycocotools/cocoeval.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class DetectorConfig:
    channels: int = 256  # pyramid / DyHead width C
    num_blocks: int = 6  # DyHead blocks
    in_indices: tuple = (1, 2, 3)  # which CoSwin maps feed the pyramid (0 = stride 4 … 3 = stride 32)
    num_extra: int = 2  # extra coarser levels by stride-2 convs (P6, P7)
    gn_groups: int = 16  # GroupNorm after each deformable conv (official Conv3x3Norm)
    dyrelu_reduction: int = 4  # hyper-network width C / 4 (official DYReLU)
    embed_dim: int = 0  # text-aligned classifier: joint-space width D (0: take it from the text tower)
    init_logit_scale: float = 10.0  # τ at init for the text-aligned logits
    prior_prob: float = 0.01  # focal-loss prior: initial foreground probability
    anchor_scale: float = 8.0  # ATSS: side of the square anchor = anchor_scale · stride
    topk: int = 9  # ATSS: candidates per level and box
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_weight: float = 2.0  # GIoU loss weight (ATSS)
    score_thresh: float = 0.05  # inference
    pre_nms_topk: int = 1000
    nms_iou: float = 0.6
    max_det: int = 100

    def strides(self) -> list[int]:
        base = [4 * 2 ** i for i in self.in_indices]
        return base + [base[-1] * 2 ** (j + 1) for j in range(self.num_extra)]


PRESETS: dict[str, DetectorConfig] = {
    # the paper's DyHead-ATSS: 6 blocks × 256 channels on P3–P7 (strides 8 … 128)
    "paper": DetectorConfig(),
    # CPU toy: 64 channels, 2 blocks, three levels at strides 4, 8, 16 (64×64 images → 16², 8², 4²)
    "toy": DetectorConfig(channels=64, num_blocks=2, in_indices=(0, 1, 2), num_extra=0, anchor_scale=4.0),
}


def build_config(name: str = "paper", **overrides) -> DetectorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DynamicHead preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Box ops: boxes are (N, 4) float xyxy in pixels, continuous coordinates (a box [0, 0, 2, 2] covers 4 px²)


def box_xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], -1)


def box_xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], -1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor):
    """Pairwise intersection and union of a: (N, 4), b: (M, 4) → (N, M) each."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) → (N, M) IoU (0 where both boxes are empty)."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) → (N, M) GIoU = IoU − |C \\ (A ∪ B)| / |C|, C the smallest enclosing box."""
    inter, union = _inter_union(a, b)
    eps = torch.finfo(union.dtype).tiny
    iou = inter / union.clamp(min=eps)
    enclose = box_area(torch.cat([torch.minimum(a[:, None, :2], b[None, :, :2]).expand(-1, len(b), -1),
                                  torch.maximum(a[:, None, 2:], b[None, :, 2:]).expand(-1, len(b), -1)], -1))
    return iou - (enclose - union) / enclose.clamp(min=eps)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise 1 − GIoU of matching rows (N, 4), (N, 4) → (N,)."""
    lt, rb = torch.maximum(pred[:, :2], target[:, :2]), torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    enclose = box_area(torch.cat([torch.minimum(pred[:, :2], target[:, :2]),
                                  torch.maximum(pred[:, 2:], target[:, 2:])], -1))
    eps = 1e-7
    return 1 - (inter / (union + eps) - (enclose - union) / (enclose + eps))


def clean_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip boxes (N, 4) to the image → (clipped boxes, ok (N,) bool): ok is False for rows that are not
    finite or empty after clipping (x2 ≤ x1 or y2 ≤ y1, e.g. reversed corners or a box outside the image);
    the caller drops and counts those."""
    boxes = boxes.reshape(-1, 4).float()
    finite = torch.isfinite(boxes).all(-1)
    boxes = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], -1)
    return boxes, finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ----------------------------------------------------------------------------------------------------
# Non-maximum suppression (torchvision semantics, pure torch)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS → indices of kept boxes, highest score first. A box is suppressed when its IoU with an
    already kept box is strictly above `iou_threshold` (torchvision's nms_kernel.cpp). Equal scores keep
    the lower index first (a stable sort; torchvision leaves tie order unspecified)."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long, device=boxes.device), iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS independently per category `idxs` → kept indices sorted by decreasing score. Boxes of different
    categories never suppress each other (torchvision's batched_nms; done here by zeroing cross-class IoU
    rather than torchvision's coordinate offset, which is equivalent up to rounding)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b, c = boxes[order], idxs[order]
    suppress = ((box_iou(b, b) > iou_threshold) & (c[:, None] == c[None, :])).cpu()
    keep, removed = [], torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


# ----------------------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2) in pure torch


# On CPU the sampled columns (9× the input) of at most this many bytes are built at a time: the batch is split
# into chunks (each image is independent). Larger blocks are mapped afresh by the allocator on every call
# (glibc returns blocks over 32 MB to the system when they are freed); DyHead at batch 8: docs/PERFORMANCE.md.
DEFORM_CHUNK_BYTES = 16 * 2 ** 20

# How the columns are sampled: "bag" (each sample a weighted sum of its 4 corner pixels, F.embedding_bag;
# `_deform_bag`), "grid_sample" (F.grid_sample, the reference) or "auto": bag on CPU, where its backward is
# the faster (docs/PERFORMANCE.md), grid_sample elsewhere (not yet measured on CUDA). Both give the same
# values and gradients (tests/test_dynamic_head.py).
DEFORM_SAMPLER = "auto"


def _bilinear_pairs(p: torch.Tensor, n: int):
    """Bilinear sampling along one side of n ≥ 2 pixels, zero outside: for positions p, the two pixels lo and
    lo + 1 each sample reads and their weights. The corners are floor(p) and floor(p) + 1 with weights
    1 − frac and frac (torchvision's bilinear_interpolate); a corner outside the image reads 0, so its weight
    is dropped. lo is clamped to [0, n − 2] so the two pixels are always in range and distinct; a pair moved
    inside carries only the weight of the corner that is really there (or none)."""
    f = p.floor()
    frac = p - f  # the gradient of p flows through frac, as in torchvision (floor has none)
    i = f.long()
    lo = i.clamp(0, n - 2)
    d = i - lo  # 0: both corners inside; −1: only floor(p) + 1 = 0 is; +1: only floor(p) = n − 1 is; else none
    w_lo = (1 - frac) * (d == 0) + frac * (d == -1)
    w_hi = frac * (d == 0) + (1 - frac) * (d == 1)
    return lo, w_lo, w_hi


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                            sampler: str | None = None) -> torch.Tensor:
    """DCNv2 with torchvision's `deform_conv2d` layout (pytorch/vision torchvision/ops/deform_conv.py and
    csrc/ops/cpu/deform_conv2d_kernel.cpp):

        y(p) = Σ_k w_k · x(p·s − pad + p_k + Δp_k) · Δm_k  (+ bias)

    x: (B, C, H, W); weight: (O, C, kh, kw); offset: (B, 2·G·kh·kw, Ho, Wo) where, for offset group g and
    kernel position k = i·kw + j, channel g·2K + 2k is Δy and g·2K + 2k + 1 is Δx (in input pixels);
    mask: (B, G·kh·kw, Ho, Wo), channel g·K + k. Channels of x split into G equal offset groups. Sampling
    is bilinear with zeros outside the image (torchvision's bilinear_interpolate).

    The samples x(·) form "columns", 9× the input, contracted with the weight in one matmul. They are
    gathered in one of two ways (`sampler`, default DEFORM_SAMPLER): "grid_sample", F.grid_sample with
    align_corners=True (grid −1 / +1 are the centres of the first / last pixel), or "bag": the pixels as
    rows of channels, each sample the sum of its 4 corner rows weighted by the bilinear weights times Δm —
    exactly F.embedding_bag(mode="sum", per_sample_weights=…), whose backward scatters into the pixels and
    takes one dot product per corner for the weights.
    """
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    B, C, H, W = x.shape
    O, Cw, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Cw != C:
        raise ValueError(f"modulated_deform_conv2d: weight has {Cw} input channels but x has {C} (groups > 1 "
                         "are not supported)")
    G = offset.shape[1] // (2 * K)
    if offset.shape[1] != 2 * G * K or G < 1 or C % G or tuple(offset.shape[-2:]) != (Ho, Wo) or offset.shape[0] != B:
        raise ValueError(f"modulated_deform_conv2d: offset must be (B={B}, 2·G·{K}, Ho={Ho}, Wo={Wo}) with G dividing "
                         f"{C} channels; got {tuple(offset.shape)}")
    if tuple(mask.shape) != (B, G * K, Ho, Wo):
        raise ValueError(f"modulated_deform_conv2d: mask must be {(B, G * K, Ho, Wo)}; got {tuple(mask.shape)}")
    sampler = sampler or DEFORM_SAMPLER
    if sampler == "auto":
        sampler = "bag" if x.device.type == "cpu" else "grid_sample"
    if sampler not in ("bag", "grid_sample"):
        raise ValueError(f"modulated_deform_conv2d: sampler must be 'auto', 'bag' or 'grid_sample'; got {sampler!r}")
    per = max(1, DEFORM_CHUNK_BYTES // (C * K * Ho * Wo * x.element_size()))  # images whose columns fit the budget
    if x.device.type == "cpu" and B > per:  # the same result, in batch chunks (see DEFORM_CHUNK_BYTES)
        return torch.cat([modulated_deform_conv2d(x[i:i + per], offset[i:i + per], mask[i:i + per], weight, bias,
                                                  stride, padding, dilation, sampler) for i in range(0, B, per)])
    # both samplers need ≥ 2 pixels per side; a zero row/column beyond the edge is exactly the "zeros
    # outside" rule, so padding a 1-pixel side changes nothing.
    if H < 2 or W < 2:
        x = F.pad(x, (0, max(0, 2 - W), 0, max(0, 2 - H)))
    Hp, Wp = x.shape[-2:]
    # sampling positions p·s − pad + p_k + Δp_k, in input pixels: (B, G, K, Ho, Wo) for y and for x
    dev, dt = x.device, offset.dtype
    ki, kj = torch.meshgrid(torch.arange(kh, device=dev), torch.arange(kw, device=dev), indexing="ij")
    base_y = (torch.arange(Ho, device=dev) * sh - ph)[None, :, None] + (ki.reshape(K) * dh)[:, None, None]  # (K, Ho, 1)
    base_x = (torch.arange(Wo, device=dev) * sw - pw)[None, None, :] + (kj.reshape(K) * dw)[:, None, None]  # (K, 1, Wo)
    off = offset.reshape(B, G, K, 2, Ho, Wo)
    py, px = base_y.to(dt) + off[:, :, :, 0], base_x.to(dt) + off[:, :, :, 1]
    if sampler == "bag":
        return _deform_bag(x, py, px, mask, weight, bias)
    grid = torch.stack([px * (2.0 / (Wp - 1)) - 1, py * (2.0 / (Hp - 1)) - 1], dim=-1)  # x first, as grid_sample wants
    grid = rearrange(grid, "b g k h w two -> (b g) (k h) w two")
    xg = rearrange(x, "b (g c) h w -> (b g) c h w", g=G)
    if xg.device.type == "cpu":  # the CPU sampler reads and scatters a pixel's channels faster when adjacent
        xg = xg.contiguous(memory_format=torch.channels_last)
    cols = F.grid_sample(xg, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    # the columns (B·G, C/G, K·Ho, Wo) are (B, C·K, Ho·Wo) in memory, (g, c, k) in the order of the weight's
    # (O, C·K): modulate, then one batched matmul, no copy of the 9×-sized columns
    cols = cols.reshape(B, G, C // G, K, Ho * Wo) * mask.reshape(B, G, 1, K, Ho * Wo).to(cols.dtype)
    out = torch.bmm(weight.reshape(1, O, C * K).expand(B, -1, -1), cols.view(B, C * K, Ho * Wo)).view(B, O, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _deform_bag(x, py, px, mask, weight, bias):
    """The "bag" sampler of modulated_deform_conv2d. x: (B, C, Hp, Wp) with Hp, Wp ≥ 2; py, px: sampling
    positions (B, G, K, Ho, Wo). The samples are taken in (b, p, g, k) order, so the columns come out as
    (B·Ho·Wo, G·K·C/G), each position's samples side by side, and one matmul with the weight's (g, k, c)
    rows gives the output as (B·Ho·Wo, O)."""
    B, C, Hp, Wp = x.shape
    _, G, K, Ho, Wo = py.shape
    O = weight.shape[0]
    y0, wy0, wy1 = _bilinear_pairs(rearrange(py, "b g k h w -> b h w g k"), Hp)
    x0, wx0, wx1 = _bilinear_pairs(rearrange(px, "b g k h w -> b h w g k"), Wp)
    m = rearrange(mask.reshape(B, G, K, Ho, Wo), "b g k h w -> b h w g k")
    # the pixels as rows (b, g, y, x): pixel (b, g, y, x) is row ((b·G + g)·Hp + y)·Wp + x
    pixels = rearrange(x, "b (g c) h w -> (b g h w) c", g=G)
    first = (torch.arange(B * G, device=x.device).view(B, 1, 1, G, 1) * Hp + y0) * Wp + x0  # top-left corner
    corners = torch.stack([first, first + 1, first + Wp, first + Wp + 1], -1).view(-1, 4)
    weights = (torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], -1) * m.unsqueeze(-1)).view(-1, 4)
    cols = F.embedding_bag(corners, pixels, per_sample_weights=weights.to(x.dtype), mode="sum")  # (samples, C/G)
    w = rearrange(weight, "o (g c) i j -> o (g i j c)", g=G)  # the weight in the columns' (g, k, c) order
    cols = cols.view(B * Ho * Wo, -1)
    out = cols @ w.t() if bias is None else torch.addmm(bias.to(cols.dtype), cols, w.t())
    return out.view(B, Ho, Wo, O).permute(0, 3, 1, 2)


class DeformConvNorm(nn.Module):
    """3×3 modulated deformable conv → GroupNorm (the official Conv3x3Norm). forward(x, offset, mask)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        # N(0, 0.01²), what the official init_weights intends; its ModulatedDeformConv keeps its own uniform
        # init (the loop only reaches nn.Conv2d). GroupNorm follows, so only the direction matters at init.
        # stored channels-last, (O, kh, kw, C) in memory: the order of the bag sampler's columns, so its matmul
        # reads the weight as a view instead of a permuted copy per call (the shape stays (O, C, 3, 3))
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3).normal_(0, 0.01)
                                   .contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.norm = nn.GroupNorm(math.gcd(groups, out_ch), out_ch)

    def forward(self, x, offset, mask):
        return self.norm(modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, 1))


# ----------------------------------------------------------------------------------------------------
# Feature pyramid on the CoSwin maps


class FeaturePyramid(nn.Module):
    """FPN (Lin et al. 2017): lateral 1×1 convs, top-down nearest upsampling and sum, 3×3 output convs,
    then `num_extra` coarser levels by stride-2 3×3 convs on the last output (RetinaNet/ATSS's P6, P7,
    ReLU between them). maps: list of (B, C_i, H_i, W_i) fine → coarse → list of (B, C, H_l, W_l)."""

    def __init__(self, in_channels: list[int], channels: int, num_extra: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_extra))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.lateral):
            raise ValueError(f"FeaturePyramid expects {len(self.lateral)} maps, got {len(maps)}")
        lat = [conv(m) for conv, m in zip(self.lateral, maps)]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse → fine
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        outs = [conv(m) for conv, m in zip(self.output, lat)]
        for j, conv in enumerate(self.extra):
            outs.append(conv(outs[-1] if j == 0 else F.relu(outs[-1])))
        return outs


# ----------------------------------------------------------------------------------------------------
# The three attentions and the DyHead block


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """σ(x) = ReLU6(x + 3) / 6 = max(0, min(1, (x + 3) / 6)): the official h_sigmoid (dyhead/dyrelu.py),
    used here. The DyHead paper writes max(0, min(1, (x + 1) / 2)) (slope ½ around −1..1 instead of ⅙
    around −3..3); both are 0.5 at x = 0."""
    return F.relu6(x + 3) / 6


class ScaleAttention(nn.Module):
    """π_L: one weight per level map in [0, 1]: GAP → 1×1 conv (C → 1) → ReLU → hard sigmoid.
    (B, C, H, W) → (B, 1, 1, 1). After the ReLU the weight is in [0.5, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return hard_sigmoid(F.relu(self.fc(x.mean(dim=(2, 3), keepdim=True))))


class DynamicReLU(nn.Module):
    """π_C (DY-ReLU-B, Chen et al. 2020): y_c = max(α¹_c·x_c + β¹_c, α²_c·x_c + β²_c), with
    [α¹, β¹, α², β²] = θ(GAP(x)) from a two-layer hyper-network ending in a hard sigmoid h ∈ [0, 1]:
    α¹ = 1 + 2(h − ½), α² = 2(h − ½), β = h − ½ (official dyrelu.py ranges: α¹ ∈ [0, 2], α² ∈ [−1, 1],
    β ∈ [−½, ½]). The last layer starts at zero, so h = ½ and the block is exactly ReLU at init (the
    official code is ReLU only on average at init)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 4 * channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def coefficients(self, x):
        """(B, C, H, W) → α¹, β¹, α², β² each (B, C, 1, 1)."""
        h = hard_sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))  # (B, 4C)
        h1, h2, h3, h4 = rearrange(h, "b (four c) -> four b c 1 1", four=4)
        return 1.0 + 2 * (h1 - 0.5), h2 - 0.5, 2 * (h3 - 0.5), h4 - 0.5

    def forward(self, x):
        a1, b1, a2, b2 = self.coefficients(x)
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class DyHeadBlock(nn.Module):
    """One DyHead block on a pyramid (list of L maps (B, C, H_l, W_l), each level half the size of the
    one before, rounded up) → list of the same shapes. See the module docstring for the alignment fix."""

    def __init__(self, channels: int, gn_groups: int = 16, dyrelu_reduction: int = 4):
        super().__init__()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)  # 2·9 offsets (Δy, Δx) + 9 mask logits
        # zero init (DCNv2's ModulatedDeformConvPack.init_offset; the official DyConv leaves this conv at
        # PyTorch's default, random offsets): Δp = 0 and Δm = ½ at init, a plain (halved) 3×3 conv
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv_same = DeformConvNorm(channels, channels, 1, gn_groups)
        self.conv_finer = DeformConvNorm(channels, channels, 2, gn_groups)  # level l−1 (twice the size)
        self.conv_coarser = DeformConvNorm(channels, channels, 1, gn_groups)  # level l+1, upsampled first
        self.scale_attn = ScaleAttention(channels)
        self.task_attn = DynamicReLU(channels, dyrelu_reduction)

    def spatial(self, feats: list[torch.Tensor], l: int) -> list[torch.Tensor]:
        """π_S for level l: the deformable conv of level l and of its neighbours, all at level l's size,
        with level l's offsets and mask (in level l's pixels). → list of (B, C, H_l, W_l)."""
        x = feats[l]
        om = self.offset(x)  # (B, 27, H, W)
        offset, mask = om[:, :18], om[:, 18:].sigmoid()
        outs = [self.conv_same(x, offset, mask)]
        if l > 0:
            fine = feats[l - 1]
            if (fine.shape[-2] + 1) // 2 != x.shape[-2] or (fine.shape[-1] + 1) // 2 != x.shape[-1]:
                raise ValueError(f"DyHead: pyramid level {l - 1} is {tuple(fine.shape[-2:])}, level {l} is "
                                 f"{tuple(x.shape[-2:])}; each level must be half the previous one (rounded up)")
            outs.append(self.conv_finer(fine, 2 * offset, mask))  # one level-l pixel = two finer pixels
        if l < len(feats) - 1:
            up = F.interpolate(feats[l + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.conv_coarser(up, offset, mask))
        return outs

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for l in range(len(feats)):
            branches = self.spatial(feats, l)
            fused = torch.stack([self.scale_attn(b) * b for b in branches]).mean(0)  # π_L-weighted mean
            out.append(self.task_attn(fused))
        return out


class DynamicHead(nn.Module):
    """`num_blocks` DyHead blocks (paper: 6 × 256 channels). list of maps → list of maps."""

    def __init__(self, channels: int = 256, num_blocks: int = 6, gn_groups: int = 16, dyrelu_reduction: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(DyHeadBlock(channels, gn_groups, dyrelu_reduction) for _ in range(num_blocks))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in self.blocks:
            feats = block(feats)
        return feats


# ----------------------------------------------------------------------------------------------------
# Text side: class names → unit vectors v_k in the joint space


class TextTower(nn.Module):
    """The text half of a Florence model (text encoder + projection): tokens (K, L) → v (K, D), ‖v‖ = 1,
    the same map as `Florence.encode_text`. `trainable=True` fine-tunes it with the detector (GLIP fine-tunes
    its language encoder too); frozen, the class embeddings are exactly the pretrained ones. Works with
    `unicl.zero_shot_classifier(tower, tokenizer, names)`."""

    def __init__(self, text_encoder: nn.Module, text_proj: nn.Linear, trainable: bool = True):
        super().__init__()
        self.text_encoder, self.text_proj = text_encoder, text_proj
        self.embed_dim = text_proj.out_features
        self.requires_grad_(trainable)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(tokens)), dim=-1)


# ----------------------------------------------------------------------------------------------------
# The detector: CoSwin → FeaturePyramid → DynamicHead → ATSS head


class Scale(nn.Module):
    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.scale


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the processes of the default torch.distributed group (all_reduce SUM / world size,
    the ATSS reference's `reduce_sum(...) / num_gpus`), or x itself when torch.distributed is not
    initialised or has one process. Detached: it computes loss normalisers, which carry no gradient."""
    x = x.detach()
    if not (dist.is_available() and dist.is_initialized()):
        return x
    world = dist.get_world_size()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Σ −α_t (1 − p_t)^γ log p_t over all entries (Lin et al. 2017), summed (divide by #positives)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


class TextClassified:
    """What both object-level adapters (`Detector` here, `dynamic_detr.DynamicDETR`) share about their
    classes: built on a pretrained Florence model, scored against class-name embeddings from its text tower
    (`TextTower`, zero-shot by name) or one fixed logit per class, the learned logit scale clamped as CLIP's.
    The adapter sets `text` (None for fixed classes), `class_tokens`, `log_scale` and `max_logit_scale`."""

    @classmethod
    def from_pretrained(cls, florence: nn.Module, cfg, classifier: str = "text", num_classes: int = 0):
        """The adapter on a pretrained Florence model (unicl.Florence): its CoSwin is the backbone; with
        classifier "text" (fine-tuned) or "frozen" the classes are its text tower + projection (`TextTower`,
        zero-shot by name), with "fixed" a logit per class (`num_classes`), the text tower unused."""
        if classifier not in ("text", "frozen", "fixed"):
            raise ValueError(f"classifier must be text, frozen or fixed, got {classifier!r}")
        if classifier == "fixed":
            return cls(florence.image_encoder, cfg, num_classes=num_classes)
        text = TextTower(florence.text_encoder, florence.text_proj, trainable=classifier == "text")
        return cls(florence.image_encoder, cfg, text=text)

    @torch.no_grad()
    def set_classes(self, tokens: torch.Tensor):
        """Store the training vocabulary's tokenised class prompts (K, L) (saved with the model)."""
        self.class_tokens = tokens.detach().to(self.class_tokens.device, torch.long).clone()

    def encode_classes(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Class prompts (K, L) → v (K, D) unit rows (with gradients when the tower is trainable)."""
        tokens = self.class_tokens if tokens is None else tokens
        if tokens.numel() == 0:
            raise ValueError(f"{type(self).__name__}: no class names; call set_classes(tokens) or pass class_tokens")
        return self.text.encode_text(tokens.to(self.class_tokens.device))

    @torch.no_grad()
    def clamp_logit_scale_(self):
        if self.text is not None:
            self.log_scale.clamp_(0.0, self.max_logit_scale)


class Detector(TextClassified, nn.Module):
    """Florence's object-level adapter.

    backbone: a CoSwin (`forward_features` → 4 maps); text: a TextTower for text-aligned classes (the
    training vocabulary's prompts, tokenised, live in the buffer `class_tokens` (K, L), set with
    `set_classes`; they are encoded in every forward, so a trainable tower learns), or `num_classes` > 0
    for fixed classes.

    forward(images (B,3,H,W), class_tokens (K, L) or None = the training vocabulary) → dict
        cls (B, N, K) logits, ltrb (B, N, 4) distances in pixels, ctr (B, N) centerness logits,
        sizes [(H_l, W_l)] of the L levels (N = Σ H_l·W_l locations, level-major, row-major inside).
    loss(out, targets, image_size) → (loss, logs); predict(images, class_tokens) → per-image dicts.
    """

    def __init__(self, backbone: nn.Module, cfg: DetectorConfig, text: TextTower | None = None, num_classes: int = 0):
        super().__init__()
        if (text is None) == (num_classes <= 0):
            raise ValueError("Detector needs exactly one of a TextTower (text-aligned classes) or num_classes > 0")
        self.cfg = cfg
        self.backbone = backbone
        dims = [backbone.cfg.embed_dim * 2 ** i for i in range(len(backbone.cfg.depths))]
        self.pyramid = FeaturePyramid([dims[i] for i in cfg.in_indices], cfg.channels, cfg.num_extra)
        self.dyhead = DynamicHead(cfg.channels, cfg.num_blocks, cfg.gn_groups, cfg.dyrelu_reduction)
        self.strides = cfg.strides()
        C = cfg.channels
        self.text = text
        prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        if text is not None:
            D = cfg.embed_dim or text.embed_dim
            self.cls_embed = nn.Conv2d(C, D, 3, padding=1)  # region features → joint space
            self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))
            self.cls_bias = nn.Parameter(torch.tensor(prior))  # shared by every class name
            self.register_buffer("class_tokens", torch.zeros(0, 1, dtype=torch.long))
        else:
            self.cls_logits = nn.Conv2d(C, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(C, 4, 3, padding=1)
        self.centerness = nn.Conv2d(C, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        for m in [self.bbox_pred, self.centerness] + ([self.cls_embed] if text is not None else [self.cls_logits]):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        if text is None:
            nn.init.constant_(self.cls_logits.bias, prior)
        self.max_logit_scale = math.log(100.0)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, class_tokens: torch.Tensor | None = None) -> dict:
        maps = self.backbone.forward_features(images)
        feats = self.dyhead(self.pyramid([maps[i] for i in self.cfg.in_indices]))
        if len(feats) != len(self.strides):
            raise ValueError(f"Detector: {len(feats)} pyramid levels but {len(self.strides)} strides")
        if self.text is not None:
            v = self.encode_classes(class_tokens).to(feats[0].dtype)  # (K, D)
            tau = self.log_scale.clamp(max=self.max_logit_scale).exp()
        cls, ltrb, ctr = [], [], []
        for f, s, scale in zip(feats, self.strides, self.scales):
            if self.text is not None:
                r = F.normalize(rearrange(self.cls_embed(f), "b d h w -> b (h w) d"), dim=-1)
                cls.append(tau * r @ v.T + self.cls_bias)  # (B, HW, K)
            else:
                cls.append(rearrange(self.cls_logits(f), "b k h w -> b (h w) k"))
            d = scale(self.bbox_pred(f)).clamp(max=math.log(1e4)).exp() * s  # (B, 4, H, W) distances ≥ 0
            ltrb.append(rearrange(d, "b four h w -> b (h w) four"))
            ctr.append(rearrange(self.centerness(f), "b 1 h w -> b (h w)"))
        return {"cls": torch.cat(cls, 1), "ltrb": torch.cat(ltrb, 1), "ctr": torch.cat(ctr, 1),
                "sizes": [tuple(f.shape[-2:]) for f in feats]}

    def points(self, sizes, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Location centres (N, 2) as (x, y) pixels, ((j + ½)·s, (i + ½)·s), and their strides (N,)."""
        pts, strides = [], []
        for (h, w), s in zip(sizes, self.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            pts.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).float().add(0.5).mul(s))
            strides.append(torch.full((h * w,), float(s), device=device))
        return torch.cat(pts), torch.cat(strides)

    # -- training --------------------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, points, strides, sizes, gt_boxes) -> torch.Tensor:
        """ATSS (Zhang et al. 2020; microsoft/DynamicHead extra/atss.py `label_anchors`) for one image →
        index of the assigned box per location (N,), −1 = background."""
        N, G = len(points), len(gt_boxes)
        if G == 0:
            return torch.full((N,), -1, dtype=torch.long, device=points.device)
        half = (self.cfg.anchor_scale * strides / 2)[:, None]
        anchors = torch.cat([points - half, points + half], 1)  # (N, 4)
        ious = box_iou(anchors, gt_boxes)  # (N, G)
        centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        dist = torch.cdist(points, centres)  # (N, G)
        cand, start = [], 0
        for h, w in sizes:  # per level, the k locations nearest each box centre
            n = h * w
            cand.append(dist[start:start + n].topk(min(self.cfg.topk, n), dim=0, largest=False).indices + start)
            start += n
        cand = torch.cat(cand)  # (M, G)
        cand_iou = ious.gather(0, cand)  # (M, G)
        std = cand_iou.std(0) if len(cand) > 1 else torch.zeros_like(cand_iou[0])  # unbiased, as ATSS
        is_pos = cand_iou >= (cand_iou.mean(0) + std)[None]
        p = points[cand]  # (M, G, 2)
        dist_sides = torch.stack([p[..., 0] - gt_boxes[:, 0], p[..., 1] - gt_boxes[:, 1],
                                  gt_boxes[:, 2] - p[..., 0], gt_boxes[:, 3] - p[..., 1]], -1)
        is_pos &= dist_sides.min(-1).values > 0.01  # the location lies inside the box
        gt_idx = torch.arange(G, device=points.device).expand_as(cand)
        iou_pos = torch.full((N, G), -1.0, device=points.device)
        iou_pos[cand[is_pos], gt_idx[is_pos]] = ious[cand[is_pos], gt_idx[is_pos]]
        best, arg = iou_pos.max(1)  # a location claimed by several boxes goes to the highest IoU
        return torch.where(best >= 0, arg, torch.full_like(arg, -1))

    def loss(self, out: dict, targets: list[dict], image_size) -> tuple[torch.Tensor, dict]:
        """ATSS's three losses for a batch → (loss, logs).

        targets: per image {"boxes": (G, 4) xyxy pixels, "labels": (G,) indices into the K classes,
        optional "iscrowd": (G,)}.

        Crowd boxes (iscrowd = 1, COCO's one box around a group of objects) are removed from the targets
        before assignment, as the ATSS reference does when it loads COCO (sfzhang15/ATSS,
        atss_core/data/datasets/coco.py keeps only `iscrowd == 0`): a crowd box yields no positive, and
        the locations it covers are plain background like any other location. (The alternative, ignoring
        the locations a crowd box covers, is not done: the reference does not do it either.)

        Normalisers (as sfzhang15/ATSS atss_core/modeling/rpn/atss/loss.py and microsoft/DynamicHead
        extra/atss.py): the focal and centerness losses are divided by N̄_pos = max(mean over processes of
        the number of positives, 1), the GIoU loss by the mean over processes of Σ centerness targets.
        Under torch.distributed these are all-reduced (one SUM all_reduce / world size, no gradient), so
        a rank with few positives is not over-weighted; DDP's gradient average then makes the update that
        of one process on the global batch. Every rank runs the all-reduce, with or without positives.
        """
        cls, ltrb, ctr = out["cls"], out["ltrb"], out["ctr"]
        B, N, K = cls.shape
        points, strides = self.points(out["sizes"], cls.device)
        cls_t = torch.zeros_like(cls)
        pos_b, pos_n, pos_box = [], [], []
        for b, t in enumerate(targets):
            boxes = t["boxes"].to(cls.device, torch.float32).reshape(-1, 4)
            labels = t["labels"].to(cls.device).reshape(-1)
            if t.get("iscrowd") is not None:  # crowd boxes leave the targets before assignment
                keep = t["iscrowd"].to(cls.device).reshape(-1) == 0
                boxes, labels = boxes[keep], labels[keep]
            a = self.assign(points, strides, out["sizes"], boxes)
            pos = (a >= 0).nonzero().squeeze(1)
            cls_t[b, pos, labels[a[pos]]] = 1.0
            pos_b.append(torch.full_like(pos, b))
            pos_n.append(pos)
            pos_box.append(boxes[a[pos]])
        pos_b, pos_n, pos_box = torch.cat(pos_b), torch.cat(pos_n), torch.cat(pos_box)
        p = points[pos_n]  # (P, 2)
        sides = torch.cat([p - pos_box[:, :2], pos_box[:, 2:] - p], 1)  # l, t, r, b > 0
        lr, tb = sides[:, [0, 2]], sides[:, [1, 3]]
        # FCOS/ATSS centerness target √( min(l,r)/max(l,r) · min(t,b)/max(t,b) ): 1 at the box centre
        ctr_t = torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))
        local = torch.stack([torch.tensor(float(len(pos_n)), device=cls.device), ctr_t.sum().float()])
        mean_pos, mean_ctr = mean_over_processes(local).unbind()  # N̄_pos and the mean Σ centerness
        num_pos = mean_pos.clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(cls.float(), cls_t.float(), self.cfg.focal_alpha, self.cfg.focal_gamma) / num_pos
        if len(pos_n) > 0:
            d = ltrb[pos_b, pos_n].float()  # (P, 4)
            pred = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)
            loss_box = (giou_loss(pred, pos_box) * ctr_t).sum() / mean_ctr.clamp(min=1e-6)
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos_b, pos_n].float(), ctr_t, reduction="sum") / num_pos
        else:  # keep the graph connected (DDP) with zero-valued terms
            loss_box = ltrb.sum() * 0.0
            loss_ctr = ctr.sum() * 0.0
        loss = loss_cls + self.cfg.reg_weight * loss_box + loss_ctr
        logs = {"loss_cls": float(loss_cls.detach()), "loss_box": float(loss_box.detach()),
                "loss_ctr": float(loss_ctr.detach()), "num_pos": len(pos_n) / B}
        return loss, logs

    # -- inference -------------------------------------------------------------------------------------
    def postprocess(self, out: dict, image_size) -> list[dict]:
        """→ per image {"boxes": (n, 4) xyxy clipped, "scores": (n,), "labels": (n,)}, n ≤ max_det;
        score = sqrt(sigmoid(cls) · sigmoid(ctr)), thresholded (> score_thresh) after the product, the top
        pre_nms_topk over all levels together, class-wise NMS, the first max_det (the official order —
        threshold σ(cls), then top-k per level — is described in the module docstring)."""
        H, W = image_size
        points, _ = self.points(out["sizes"], out["cls"].device)
        scores_all = torch.sqrt(out["cls"].float().sigmoid() * out["ctr"].float().sigmoid()[..., None])  # (B, N, K)
        K = scores_all.shape[-1]
        results = []
        for b in range(scores_all.shape[0]):
            s = scores_all[b].reshape(-1)
            idx = (s > self.cfg.score_thresh).nonzero().squeeze(1)
            if len(idx) > self.cfg.pre_nms_topk:
                idx = idx[s[idx].topk(self.cfg.pre_nms_topk).indices]
            loc, lab = idx // K, idx % K
            p, d = points[loc], out["ltrb"][b, loc].float()
            boxes = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)
            boxes = torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                                 boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], 1)
            keep = batched_nms(boxes, s[idx], lab, self.cfg.nms_iou)[: self.cfg.max_det]
            results.append({"boxes": boxes[keep], "scores": s[idx][keep], "labels": lab[keep]})
        return results

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_tokens: torch.Tensor | None = None) -> list[dict]:
        return self.postprocess(self(images, class_tokens), images.shape[-2:])


# ----------------------------------------------------------------------------------------------------
# COCO-style mean average precision (pycocotools' COCOeval rules, bbox, in numpy)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)  # exactly COCOeval's Params
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)  # 101 points
AREA_RANGES = {"all": (0, 1e5 ** 2), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2)}


def _np(x, dtype=np.float64, shape=None):
    if x is None:
        return np.zeros(shape if shape is not None else (0,), dtype)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(shape if shape is not None else (-1,))


def _coco_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, 4), (G, 4) xyxy → (D, G); for a crowd box the union is the detection's area (maskApi bbIou)."""
    lt = np.maximum(dt[:, None, :2], gt[None, :, :2])
    rb = np.minimum(dt[:, None, 2:], gt[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    a_dt = ((dt[:, 2] - dt[:, 0]) * (dt[:, 3] - dt[:, 1]))[:, None]
    a_gt = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    union = np.where(crowd[None, :], a_dt, a_dt + a_gt - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _evaluate_image(ious, dt_area, gt_area, crowd, area_rng, max_det):
    """COCOeval.evaluateImg for one image, category and area range. ious: (D, G) with detections already
    in score order (stable) → (dt_matched (T, D) bool, dt_ignore (T, D) bool, gt_ignore (G,) bool)."""
    gt_ig = crowd | (gt_area < area_rng[0]) | (gt_area > area_rng[1])
    g_order = np.argsort(gt_ig, kind="mergesort")  # non-ignored boxes first
    gt_ig, g_crowd = gt_ig[g_order], crowd[g_order]
    D = min(len(dt_area), max_det)
    ious, dt_area = ious[:D][:, g_order], dt_area[:D]
    T, G = len(IOU_THRESHOLDS), len(gt_ig)
    gt_m, dt_m, dt_ig = np.zeros((T, G), bool), np.zeros((T, D), bool), np.zeros((T, D), bool)
    if D and G:
        for ti, t in enumerate(IOU_THRESHOLDS):
            for d in range(D):
                best, m = min(t, 1 - 1e-10), -1
                for g in range(G):
                    if gt_m[ti, g] and not g_crowd[g]:  # already matched (a crowd box can match many)
                        continue
                    if m > -1 and not gt_ig[m] and gt_ig[g]:  # matched a real box; only ignored ones remain
                        break
                    if ious[d, g] < best:
                        continue
                    best, m = ious[d, g], g
                if m == -1:
                    continue
                dt_ig[ti, d], dt_m[ti, d], gt_m[ti, m] = gt_ig[m], True, True
    out_of_range = (dt_area < area_rng[0]) | (dt_area > area_rng[1])  # unmatched detections outside: ignored
    dt_ig |= ~dt_m & out_of_range[None, :]
    return dt_m, dt_ig, gt_ig


def coco_map(predictions, ground_truth, max_dets: int = 100) -> dict[str, float]:
    """COCO box AP with pycocotools' rules (COCOeval, iouType="bbox").

    predictions: one dict per image {"boxes": (D, 4) xyxy, "scores": (D,), "labels": (D,)}; ground_truth:
    one dict per image (same order) {"boxes": (G, 4) xyxy, "labels": (G,), optional "iscrowd": (G,),
    optional "area": (G,) (default: box area)}. Dicts keyed by image id work too (ids of ground_truth).

    Rules kept: IoU thresholds .50:.05:.95; 101 recall points; precision made monotone (envelope) before
    sampling; detections sorted by score with a stable sort; at most `max_dets` per image *and category*
    (as COCOeval.evaluateImg); greedy matching in score order to the best-IoU free box (IoU ≥ threshold),
    crowd boxes ignored (a detection on one is neither TP nor FP; a crowd box may absorb many; IoU with a
    crowd box = intersection / detection area) and never counted as missed; boxes outside an area range
    ignored, and so are unmatched detections outside it; categories without a non-ignored box are left out
    of the mean (−1 if none is left, as pycocotools).

    → {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}: fractions in [0, 1], or −1.
    """
    if isinstance(ground_truth, dict):
        ids = list(ground_truth)
        ground_truth = [ground_truth[i] for i in ids]
        predictions = [predictions.get(i, {}) for i in ids] if isinstance(predictions, dict) else predictions
    if len(predictions) != len(ground_truth):
        raise ValueError(f"coco_map: {len(predictions)} prediction entries for {len(ground_truth)} images; "
                         "give one (possibly empty) prediction dict per ground-truth image")
    per_cat: dict[int, list] = {}  # category → list of (image, gt rows, dt rows)
    images = []
    for pred, gt in zip(predictions, ground_truth):
        g_boxes = _np(gt.get("boxes"), shape=(-1, 4))
        g_labels = _np(gt.get("labels"), np.int64)
        g_crowd = _np(gt.get("iscrowd"), bool) if gt.get("iscrowd") is not None else np.zeros(len(g_labels), bool)
        g_area = _np(gt.get("area")) if gt.get("area") is not None else \
            (g_boxes[:, 2] - g_boxes[:, 0]) * (g_boxes[:, 3] - g_boxes[:, 1])
        d_boxes = _np(pred.get("boxes"), shape=(-1, 4))
        d_scores, d_labels = _np(pred.get("scores")), _np(pred.get("labels"), np.int64)
        images.append((g_boxes, g_labels, g_crowd, g_area, d_boxes, d_scores, d_labels))
        for c in np.unique(g_labels):
            per_cat.setdefault(int(c), [])
    T, R = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    areas = list(AREA_RANGES.values())
    precision = -np.ones((T, R, len(per_cat), len(areas)))
    for k, c in enumerate(sorted(per_cat)):
        evals = [[] for _ in areas]  # per area range: (scores, dt_m, dt_ig, gt_ig) per image
        for g_boxes, g_labels, g_crowd, g_area, d_boxes, d_scores, d_labels in images:
            gi, di = g_labels == c, d_labels == c
            if not gi.any() and not di.any():
                continue
            order = np.argsort(-d_scores[di], kind="mergesort")[:max_dets]
            db, ds = d_boxes[di][order], d_scores[di][order]
            da = (db[:, 2] - db[:, 0]) * (db[:, 3] - db[:, 1])
            ious = _coco_iou(db, g_boxes[gi], g_crowd[gi])
            for a, rng in enumerate(areas):
                dt_m, dt_ig, gt_ig = _evaluate_image(ious, da, g_area[gi], g_crowd[gi], rng, max_dets)
                evals[a].append((ds[:max_dets], dt_m, dt_ig, gt_ig))
        for a in range(len(areas)):
            E = evals[a]
            if not E:
                continue
            npig = sum(int((~e[3]).sum()) for e in E)
            if npig == 0:
                continue
            scores = np.concatenate([e[0] for e in E])
            order = np.argsort(-scores, kind="mergesort")
            dt_m = np.concatenate([e[1] for e in E], axis=1)[:, order]
            dt_ig = np.concatenate([e[2] for e in E], axis=1)[:, order]
            tp = np.cumsum(dt_m & ~dt_ig, axis=1).astype(np.float64)
            fp = np.cumsum(~dt_m & ~dt_ig, axis=1).astype(np.float64)
            for t in range(T):
                rc = tp[t] / npig
                pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr  # precision envelope
                inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                q = np.zeros(R)
                valid = inds < len(pr)
                q[valid] = pr[inds[valid]]
                precision[t, :, k, a] = q

    def mean(s):
        s = s[s > -1]
        return float(s.mean()) if s.size else -1.0

    t50, t75 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.5))), int(np.argmin(np.abs(IOU_THRESHOLDS - 0.75)))
    return {"AP": mean(precision[:, :, :, 0]), "AP50": mean(precision[t50, :, :, 0]),
            "AP75": mean(precision[t75, :, :, 0]), "AP_small": mean(precision[:, :, :, 1]),
            "AP_medium": mean(precision[:, :, :, 2]), "AP_large": mean(precision[:, :, :, 3])}


__all__ = ["DetectorConfig", "PRESETS", "build_config", "box_xywh_to_xyxy", "box_xyxy_to_xywh", "box_area", "box_iou",
           "generalized_box_iou", "giou_loss", "clean_boxes", "nms", "batched_nms", "modulated_deform_conv2d",
           "DeformConvNorm", "FeaturePyramid", "hard_sigmoid", "ScaleAttention", "DynamicReLU", "DyHeadBlock",
           "DynamicHead", "TextTower", "Detector", "mean_over_processes", "sigmoid_focal_loss", "coco_map"]
