"""dynamic_head.py: the deformable conv against a plain-loop transcription of torchvision's CPU kernel and
against conv2d; NMS against a naive greedy loop (ties, IoU exactly at the threshold); COCO mAP on hand-built
cases with known answers; each attention does what its name says; the neighbour-alignment fix; ATSS;
bad boxes; the FPN, the scale attention and the three loss terms (centerness target included) against
hand computations; crowd boxes give no positives; the loss normalisers are means over processes (a
stand-in for the all-reduce, and two gloo processes); the whole adapter overfits one image."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import coswin
import dynamic_head as dh
import text_encoder

# ----------------------------------------------------------------------------------------------------
# Modulated deformable convolution


def _bilinear(img, h, w):
    """torchvision deform_conv2d_kernel.cpp bilinear_interpolate, in plain Python."""
    H, W = img.shape
    if h <= -1 or h >= H or w <= -1 or w >= W:
        return 0.0
    hl, wl = math.floor(h), math.floor(w)
    lh, lw = h - hl, w - wl

    def v(y, x):
        return float(img[y, x]) if 0 <= y < H and 0 <= x < W else 0.0

    return ((1 - lh) * (1 - lw) * v(hl, wl) + (1 - lh) * lw * v(hl, wl + 1)
            + lh * (1 - lw) * v(hl + 1, wl) + lh * lw * v(hl + 1, wl + 1))


def _deform_loop(x, offset, mask, weight, bias, stride, pad, dil=1):
    """The deformable_im2col loop: channel g·2K + 2k is Δy, + 1 is Δx; mask channel g·K + k."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    G = offset.shape[1] // (2 * K)
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        for oy in range(Ho):
            for ox in range(Wo):
                for c in range(C):
                    g = c // (C // G)
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = float(offset[b, g * 2 * K + 2 * k, oy, ox])
                            dx = float(offset[b, g * 2 * K + 2 * k + 1, oy, ox])
                            val = float(mask[b, g * K + k, oy, ox]) * _bilinear(
                                x[b, c], oy * stride - pad + i * dil + dy, ox * stride - pad + j * dil + dx)
                            out[b, :, oy, ox] += weight[:, c, i, j].double() * val
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)
    return out


def _random_offsets(B, G, K, Ho, Wo, seed):
    g = torch.Generator().manual_seed(seed)
    off = (torch.rand(B, 2 * G * K, Ho, Wo, generator=g, dtype=torch.float64) - 0.5) * 5  # fractional, ±2.5 px
    off[:, 0, 0, 0] = 9.7  # far below the image: samples zeros
    off[:, 1, 0, Wo - 1] = -7.3  # far left
    off[:, 2, Ho - 1, 1] = 1.0  # an exact integer shift
    off[:, 3, Ho - 1, 0] = -0.999  # just inside the "≤ −1 is outside" rule
    return off


@pytest.mark.parametrize("sampler", ["bag", "grid_sample"])
@pytest.mark.parametrize("H,W,stride,pad,G", [(5, 6, 1, 1, 1), (7, 6, 2, 1, 1), (5, 5, 1, 0, 2), (1, 5, 1, 1, 1)])
def test_deform_conv_equals_the_torchvision_loop(H, W, stride, pad, G, sampler):
    torch.manual_seed(1)
    C, O = 4, 3
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, dtype=torch.float64)
    b = torch.randn(O, dtype=torch.float64)
    Ho, Wo = (H + 2 * pad - 3) // stride + 1, (W + 2 * pad - 3) // stride + 1
    off = _random_offsets(1, G, 9, Ho, Wo, seed=H * 100 + W)
    mask = torch.rand(1, G * 9, Ho, Wo, dtype=torch.float64)  # mask ≠ 1
    got = dh.modulated_deform_conv2d(x, off, mask, w, b, stride, pad, sampler=sampler)
    want = _deform_loop(x, off, mask, w, b, stride, pad)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stride,pad,dil", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_deform_conv_with_zero_offsets_and_unit_mask_is_conv2d(stride, pad, dil):
    x = torch.randn(2, 3, 9, 8)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    ref = F.conv2d(x, w, b, stride, pad, dil)
    Ho, Wo = ref.shape[-2:]
    got = dh.modulated_deform_conv2d(x, torch.zeros(2, 18, Ho, Wo), torch.ones(2, 9, Ho, Wo), w, b, stride, pad, dil)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_offset_channel_2k_is_dy_and_2k_plus_1_is_dx():
    """A kernel that only reads position k = (0, 2) (top right); Δy = +1 on channel 2k moves that read down
    one row, so the output is x shifted left by one column: y[r, c] = x[r, c + 1]."""
    x = torch.randn(1, 1, 6, 7)
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 0, 2] = 1.0
    k = 0 * 3 + 2
    off = torch.zeros(1, 18, 6, 7)
    off[:, 2 * k] = 1.0  # Δy
    y = dh.modulated_deform_conv2d(x, off, torch.ones(1, 9, 6, 7), w, None, 1, 1)
    torch.testing.assert_close(y[0, 0, :, :-1], x[0, 0, :, 1:])
    off[:, 2 * k], off[:, 2 * k + 1] = 0.0, 1.0  # Δx instead: reads (r − 1, c + 2)
    y = dh.modulated_deform_conv2d(x, off, torch.ones(1, 9, 6, 7), w, None, 1, 1)
    torch.testing.assert_close(y[0, 0, 1:, :-2], x[0, 0, :-1, 2:])


@pytest.mark.parametrize("sampler", ["bag", "grid_sample"])
def test_deform_conv_gradients_flow_to_input_offsets_mask_and_weights(sampler):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    off = (torch.rand(1, 18, 3, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()  # off the integer kinks
    mask = torch.rand(1, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dh.modulated_deform_conv2d(*a, stride=1, padding=1, sampler=sampler),
                                    (x, off, mask, w, b), eps=1e-6, atol=1e-5, fast_mode=True)
    dh.modulated_deform_conv2d(x, off, mask, w, b, 1, 1, sampler=sampler).square().sum().backward()
    assert off.grad.abs().sum() > 0 and mask.grad.abs().sum() > 0


def _deform_einsum(x, offset, mask, weight, bias, stride, pad):
    """The contraction written as an einsum over grid_sample's columns of the NCHW input: the same sampling
    rule, another contraction and memory layout than the batched matmul (here H, W ≥ 2, dilation 1)."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    K, (Ho, Wo) = kh * kw, offset.shape[-2:]
    G = offset.shape[1] // (2 * K)
    ki, kj = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    off = offset.reshape(B, G, K, 2, Ho, Wo).flatten(0, 1)
    py = (torch.arange(Ho) * stride - pad)[None, :, None] + ki.reshape(K, 1, 1) + off[:, :, 0]  # (B·G, K, Ho, Wo)
    px = (torch.arange(Wo) * stride - pad)[None, None, :] + kj.reshape(K, 1, 1) + off[:, :, 1]
    grid = torch.stack([px * 2 / (W - 1) - 1, py * 2 / (H - 1) - 1], -1).reshape(B * G, K * Ho, Wo, 2)
    cols = F.grid_sample(x.reshape(B * G, C // G, H, W), grid, align_corners=True).reshape(B, G, C // G, K, Ho, Wo)
    cols = cols * mask.reshape(B, G, 1, K, Ho, Wo)
    return torch.einsum("bgckhw,ogck->bohw", cols, weight.reshape(O, G, C // G, K)) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("sampler", ["bag", "grid_sample"])
@pytest.mark.parametrize("stride,G", [(1, 1), (2, 2)])
def test_deform_conv_equals_the_einsum_over_its_columns_in_value_and_gradients(stride, G, sampler):
    torch.manual_seed(0)
    B, C, O, H, W = 2, 4, 3, 7, 6
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, dtype=torch.float64)
    b = torch.randn(O, dtype=torch.float64)
    Ho, Wo = (H + 2 - 3) // stride + 1, (W + 2 - 3) // stride + 1
    off = _random_offsets(B, G, 9, Ho, Wo, seed=5)
    mask = torch.rand(B, G * 9, Ho, Wo, dtype=torch.float64)

    def grads(fn):
        args = [t.clone().requires_grad_() for t in (x, off, mask, w, b)]
        out = fn(*args, stride=stride, pad=1)
        (out.square().sum() + out.sum()).backward()
        return out.detach(), [a.grad for a in args]

    got, got_g = grads(lambda x, o, m, w, b, stride, pad: dh.modulated_deform_conv2d(x, o, m, w, b, stride, pad,
                                                                                      sampler=sampler))
    want, want_g = grads(_deform_einsum)
    torch.testing.assert_close(got, want)
    for name, a, e in zip(("x", "offset", "mask", "weight", "bias"), got_g, want_g):
        torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize("sampler", ["bag", "grid_sample"])
def test_deform_conv_in_batch_chunks_equals_the_whole_batch(monkeypatch, sampler):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 7, dtype=torch.float64)
    w, b = torch.randn(3, 4, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    off, mask = _random_offsets(5, 1, 9, 6, 7, seed=3), torch.rand(5, 9, 6, 7, dtype=torch.float64)
    whole = dh.modulated_deform_conv2d(x, off, mask, w, b, 1, 1, sampler=sampler)
    monkeypatch.setattr(dh, "DEFORM_CHUNK_BYTES", 2 * 4 * 9 * 6 * 7 * 8)  # two images per chunk: 2 + 2 + 1
    chunks = dh.modulated_deform_conv2d(x, off, mask, w, b, 1, 1, sampler=sampler)
    torch.testing.assert_close(chunks, whole, rtol=1e-12, atol=1e-12)


def test_the_two_samplers_agree_on_a_dyhead_block_in_fp32_and_auto_takes_bag_on_cpu(monkeypatch):
    """A DyHead block (three deformable convs per level, shared offsets, the channels-last weights) with
    offsets of a few pixels: the bag sampler (the CPU default) and grid_sample give the same outputs and
    gradients in fp32, for the input maps, the offset conv and the conv weights."""
    torch.manual_seed(0)
    block = dh.DyHeadBlock(32, gn_groups=8)
    nn.init.normal_(block.offset.weight, std=0.5)  # offsets and masks that vary over the map
    feats = [torch.randn(2, 32, s, s) for s in (9, 5, 3)]

    def run(sampler):
        monkeypatch.setattr(dh, "DEFORM_SAMPLER", sampler)
        block.zero_grad()
        xs = [f.clone().requires_grad_() for f in feats]
        out = block(xs)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        return out, [x.grad for x in xs] + [p.grad.clone() for p in block.parameters()]

    out_b, grads_b = run("bag")
    out_g, grads_g = run("grid_sample")
    for a, e in zip(out_b + grads_b, out_g + grads_g):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)  # fp32 sums in another order
    assert grads_b[3].abs().sum() > 0  # the offset conv's weight learns
    x = torch.randn(1, 2, 4, 4)
    monkeypatch.setattr(dh, "DEFORM_SAMPLER", "auto")
    calls = []
    bag = dh._deform_bag
    monkeypatch.setattr(dh, "_deform_bag", lambda *a: calls.append(a[0].device.type) or bag(*a))
    dh.modulated_deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.ones(1, 9, 4, 4), torch.randn(2, 2, 3, 3), padding=1)
    assert calls == ["cpu"]
    with pytest.raises(ValueError, match="sampler must be"):
        dh.modulated_deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.ones(1, 9, 4, 4), torch.randn(2, 2, 3, 3),
                                   padding=1, sampler="sparse")


def test_deform_conv_rejects_offsets_of_the_wrong_size():
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="offset must be"):  # the official DyHead bug: offsets of twice the size
        dh.modulated_deform_conv2d(x, torch.zeros(1, 18, 16, 16), torch.ones(1, 9, 16, 16), w, None, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Boxes and NMS


def _naive_nms(boxes, scores, thr, classes=None):
    b, s = boxes.tolist(), scores.tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))  # ties: lower index first

    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    keep = []
    for i in order:
        if all(iou(b[i], b[j]) <= thr or (classes is not None and classes[i] != classes[j]) for j in keep):
            keep.append(i)
    return keep


def test_nms_equals_a_naive_greedy_loop_with_ties_and_duplicates():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 40
        xy = torch.randint(0, 12, (n, 2), generator=g).float()
        wh = torch.randint(1, 6, (n, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], 1)
        boxes[5] = boxes[3]  # an exact duplicate
        scores = torch.randint(0, 5, (n,), generator=g).float() / 4  # many equal scores
        classes = torch.randint(0, 3, (n,), generator=g)
        for thr in (0.0, 0.3, 0.5, 0.7):
            assert dh.nms(boxes, scores, thr).tolist() == _naive_nms(boxes, scores, thr)
            assert dh.batched_nms(boxes, scores, classes, thr).tolist() == _naive_nms(boxes, scores, thr, classes.tolist())


def test_nms_suppresses_only_strictly_above_the_threshold():
    boxes = torch.tensor([[0.0, 0, 3, 1], [1.0, 0, 4, 1]])  # intersection 2, union 4: IoU exactly 0.5
    assert float(dh.box_iou(boxes[:1], boxes[1:])) == 0.5
    scores = torch.tensor([0.8, 0.9])
    assert dh.nms(boxes, scores, 0.5).tolist() == [1, 0]  # equal to the threshold: kept
    assert dh.nms(boxes, scores, 0.49).tolist() == [1]
    same = torch.tensor([[0.0, 0, 2, 2], [0.0, 0, 2, 2]])
    assert dh.nms(same, torch.tensor([0.5, 0.5]), 0.5).tolist() == [0]  # a tie keeps the lower index
    assert dh.batched_nms(same, torch.tensor([0.5, 0.5]), torch.tensor([0, 1]), 0.5).tolist() == [0, 1]


def test_box_ops():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [4.0, 4, 5, 5]])
    torch.testing.assert_close(dh.box_iou(a, b), torch.tensor([[1 / 7, 0.0]]))
    # GIoU: enclosing box of a and b[1] is 5×5 = 25, union 5 → 0 − 20/25
    torch.testing.assert_close(dh.generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, -20 / 25]]))
    torch.testing.assert_close(dh.giou_loss(a.expand(2, 4), b), 1 - dh.generalized_box_iou(a, b)[0], atol=1e-6, rtol=0)
    xywh = torch.tensor([[1.0, 2, 3, 4]])
    torch.testing.assert_close(dh.box_xyxy_to_xywh(dh.box_xywh_to_xyxy(xywh)), xywh)
    assert dh.box_xywh_to_xyxy(xywh).tolist() == [[1, 2, 4, 6]]


def test_bad_boxes_are_clipped_or_flagged():
    boxes = torch.tensor([[-5.0, 2, 10, 8],  # partly outside: clipped
                          [6.0, 2, 3, 8],  # x2 < x1
                          [70.0, 70, 80, 80],  # entirely outside a 64×64 image
                          [1.0, float("nan"), 3, 4],  # not finite
                          [2.0, 2, 2, 9]])  # zero width
    clipped, ok = dh.clean_boxes(boxes, 64, 64)
    assert ok.tolist() == [True, False, False, False, False]
    assert clipped[0].tolist() == [0, 2, 10, 8]


# ----------------------------------------------------------------------------------------------------
# COCO mAP


def _gt(boxes, labels, crowd=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "iscrowd": torch.tensor(crowd if crowd is not None else [0] * len(labels))}


def _dt(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_map_perfect_detections_score_one_in_every_area_range():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 70, 70]], [0, 1]), _gt([[0, 0, 120, 120]], [1])]  # small, medium, large
    preds = [_dt(g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in gts]
    ap = dh.coco_map(preds, gts)
    assert ap == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AP_small": 1.0, "AP_medium": 1.0, "AP_large": 1.0})


def test_map_one_false_positive_ranked_first_halves_precision():
    gt = [_gt([[0, 0, 10, 10]], [0])]
    fp_first = [_dt([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    fp_last = [_dt([[50, 50, 60, 60], [0, 0, 10, 10]], [0.7, 0.8], [0, 0])]
    assert dh.coco_map(fp_first, gt)["AP"] == pytest.approx(0.5)  # precision 1/2 at every recall level
    assert dh.coco_map(fp_last, gt)["AP"] == pytest.approx(1.0)  # the envelope forgives a trailing FP
    wrong_class = [_dt([[0, 0, 10, 10]], [0.9], [1])]
    assert dh.coco_map(wrong_class, gt)["AP"] == 0.0


def test_map_partial_overlap_counts_only_the_thresholds_it_passes():
    gt = [_gt([[0, 0, 10, 10]], [0])]
    pred = [_dt([[0, 0, 10, 6.2]], [0.9], [0])]  # IoU 0.62: matched at .50, .55, .60 only
    ap = dh.coco_map(pred, gt)
    assert ap["AP"] == pytest.approx(0.3) and ap["AP50"] == pytest.approx(1.0) and ap["AP75"] == 0.0


def test_map_crowd_boxes_are_ignored_not_missed_and_absorb_detections():
    gt = [_gt([[0, 0, 10, 10], [30, 30, 60, 60]], [0, 0], crowd=[0, 1])]
    preds = [_dt([[0, 0, 10, 10], [31, 31, 40, 40], [45, 45, 59, 59]], [0.5, 0.9, 0.8], [0, 0, 0])]
    assert dh.coco_map(preds, gt)["AP"] == pytest.approx(1.0)  # the two detections in the crowd region are neither TP nor FP
    no_crowd = [_gt([[0, 0, 10, 10], [30, 30, 60, 60]], [0, 0], crowd=[0, 0])]
    assert dh.coco_map(preds, no_crowd)["AP"] < 0.6
    missed_crowd = [_dt([[0, 0, 10, 10]], [0.5], [0])]  # the crowd region is never detected: not a miss
    assert dh.coco_map(missed_crowd, gt)["AP"] == pytest.approx(1.0)
    assert dh.coco_map(missed_crowd, no_crowd)["AP"] == pytest.approx(51 / 101)


def test_map_keeps_at_most_100_detections_per_image_and_class():
    gt = [_gt([[0, 0, 10, 10]], [0])]
    fps = [[50 + i, 50, 60 + i, 60] for i in range(100)]
    cut = [_dt(fps + [[0, 0, 10, 10]], [0.9] * 100 + [0.1], [0] * 101)]  # the true positive is the 101st
    assert dh.coco_map(cut, gt)["AP"] == 0.0
    kept = [_dt(fps[:99] + [[0, 0, 10, 10]], [0.9] * 99 + [0.1], [0] * 100)]  # 100th: precision 1/100
    assert dh.coco_map(kept, gt)["AP"] == pytest.approx(0.01)


def test_map_area_ranges_classes_without_ground_truth_and_dict_input():
    gts = [_gt([[0, 0, 10, 10], [0, 0, 50, 50]], [0, 0])]  # a small box found, a medium one missed
    preds = [_dt([[0, 0, 10, 10], [60, 0, 100, 40], [80, 80, 90, 90]], [0.9, 0.95, 0.8], [0, 0, 3])]
    # the medium-sized false positive ranks first; class 3 has no ground truth at all (left out)
    ap = dh.coco_map(preds, gts)
    assert ap["AP_small"] == pytest.approx(1.0)  # an unmatched detection outside the range is ignored
    assert ap["AP_medium"] == 0.0 and ap["AP_large"] == -1.0
    assert ap["AP"] == pytest.approx(0.5 * 51 / 101)  # precision ½ up to recall ½
    two = dh.coco_map({7: preds[0], 9: _dt([], [], [])}, {7: gts[0], 9: _gt([[0, 0, 5, 5]], [1])})
    assert two["AP"] == pytest.approx((0.5 * 51 / 101 + 0.0) / 2)  # the mean over classes 0 and 1


# ----------------------------------------------------------------------------------------------------
# The attentions and the block


def test_hard_sigmoid_and_scale_attention_stay_in_range():
    x = torch.tensor([-10.0, -3, 0, 3, 10])
    assert dh.hard_sigmoid(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    # the official ReLU6(x + 3)/6, not the paper's max(0, min(1, (x + 1)/2)): they differ inside (−3, 3)
    torch.testing.assert_close(dh.hard_sigmoid(torch.tensor([-2.0, -1, 1, 2])),
                               torch.tensor([1 / 6, 2 / 6, 4 / 6, 5 / 6]))
    attn = dh.ScaleAttention(8)
    nn.init.normal_(attn.fc.weight, std=5.0)
    w = attn(torch.randn(16, 8, 5, 5) * 10)
    assert w.shape == (16, 1, 1, 1) and (w >= 0.5).all() and (w <= 1).all()  # ReLU then hard sigmoid
    assert (w > 0.5).any() and (w < 1).any()
    nn.init.constant_(attn.fc.bias, 100.0)
    assert (attn(torch.randn(2, 8, 3, 3)) == 1).all()


def test_dynamic_relu_is_relu_at_init_and_two_affine_pieces_after():
    act = dh.DynamicReLU(8)
    x = torch.randn(3, 8, 5, 5) * 3
    assert torch.equal(act(x), F.relu(x))
    nn.init.normal_(act.fc2.weight, std=1.0)
    nn.init.normal_(act.fc2.bias, std=1.0)
    a1, b1, a2, b2 = act.coefficients(x)
    assert ((a1 >= 0) & (a1 <= 2)).all() and ((a2 >= -1) & (a2 <= 1)).all() and (b1.abs() <= 0.5).all()
    y = act(x)
    torch.testing.assert_close(y, torch.maximum(a1 * x + b1, a2 * x + b2))
    assert not torch.allclose(y, F.relu(x))


def _pyramid(C=16, sizes=(16, 8, 4), B=2):
    return [torch.randn(B, C, s, s) for s in sizes]


def test_block_at_init_is_a_half_weight_conv_on_each_branch():
    """Offsets start at zero and the mask at sigmoid(0) = ½: each branch is a plain conv with ½ the weight."""
    blk = dh.DyHeadBlock(16)
    feats = _pyramid()
    same, finer, coarser = blk.spatial(feats, 1)
    c = blk.conv_same
    torch.testing.assert_close(same, c.norm(F.conv2d(feats[1], c.weight / 2, c.bias, 1, 1)), atol=1e-5, rtol=1e-5)
    c = blk.conv_finer
    torch.testing.assert_close(finer, c.norm(F.conv2d(feats[0], c.weight / 2, c.bias, 2, 1)), atol=1e-5, rtol=1e-5)
    up = F.interpolate(feats[2], size=(8, 8), mode="bilinear", align_corners=False)
    c = blk.conv_coarser
    torch.testing.assert_close(coarser, c.norm(F.conv2d(up, c.weight / 2, c.bias, 1, 1)), atol=1e-5, rtol=1e-5)
    out = blk(feats)
    assert [o.shape for o in out] == [f.shape for f in feats] and (out[0] >= 0).all()  # ReLU at init


def test_neighbour_levels_are_read_where_the_offsets_point():
    """The alignment fix. A linear ramp f(y, x) = a·y + b·x at level 1 (8×8), the same ramp at level 2
    (avg-pooled, 4×4) and at level 0 (16×16). Identity kernels, unit mask and a uniform offset (Δy, Δx) in
    level 1's pixels: the coarser branch must read the same values as level 1 itself, and the finer branch
    the same up to the stride-2 conv's constant quarter-pixel phase −(a + b)/4. The official code reads
    the coarser map with offsets of twice its size and the finer one with unscaled offsets."""
    C, a, b, dy, dx = 16, 0.7, -0.4, 1.0, 0.5
    blk = dh.DyHeadBlock(C)
    for conv in (blk.conv_same, blk.conv_finer, blk.conv_coarser):
        conv.norm = nn.Identity()
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(C), torch.arange(C), 1, 1] = 1.0
            conv.bias.zero_()
    with torch.no_grad():
        blk.offset.bias[0:18:2] = dy
        blk.offset.bias[1:18:2] = dx
        blk.offset.bias[18:] = 30.0  # mask = sigmoid(30) = 1

    def ramp(n):  # level of side n; pixel centres in level-1 units: (i + ½)·8/n − ½
        c = (torch.arange(n, dtype=torch.float32) + 0.5) * 8 / n - 0.5
        return (a * c[:, None] + b * c[None, :]).expand(1, C, n, n).contiguous()

    feats = [ramp(16), ramp(8), ramp(4)]
    torch.testing.assert_close(feats[2], F.avg_pool2d(feats[1], 2))
    same, finer, coarser = blk.spatial(feats, 1)
    inner = (slice(None), slice(None), slice(1, 5), slice(1, 5))  # away from the borders' clamping / zeros
    torch.testing.assert_close(coarser[inner], same[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(finer[inner] - same[inner], torch.full_like(same[inner], -(a + b) / 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(same[0, 0, 2, 2], torch.tensor(a * (2 + dy) + b * (2 + dx)))  # reads p + Δp


def test_dynamic_head_paper_size_runs_and_counts_its_parameters():
    head = dh.DynamicHead(channels=256, num_blocks=6)
    C = 256
    per_block = (C * 27 * 9 + 27) + 3 * (C * C * 9 + C + 2 * C) + (C + 1) + (C * 64 + 64) + (64 * 4 * C + 4 * C)
    assert sum(p.numel() for p in head.parameters()) == 6 * per_block
    with torch.no_grad():
        out = head([torch.randn(1, C, s, s) for s in (8, 4, 2, 1, 1)])
    assert [o.shape[-1] for o in out] == [8, 4, 2, 1, 1] and all(torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------------------------------------
# The detector


NAMES = ["red circle", "blue square", "green cross"]


def _detector(text=True, trainable=True, **over):
    torch.manual_seed(0)
    backbone = coswin.build("toy")
    cfg = dh.build_config("toy", channels=32, num_blocks=1, **over)
    if not text:
        return dh.Detector(backbone, cfg, num_classes=3)
    enc = text_encoder.build("toy", vocab_size=300)
    tower = dh.TextTower(enc, nn.Linear(enc.num_features, 24, bias=False), trainable=trainable)
    model = dh.Detector(backbone, cfg, text=tower)
    model.set_classes(text_encoder.Tokenizer()(NAMES, 16))  # byte-level tokens
    return model


def test_atss_positives_lie_inside_their_box_and_prefer_the_fitting_level():
    model = _detector(in_indices=(0, 1, 2))  # strides 4, 8, 16
    sizes = [(16, 16), (8, 8), (4, 4)]
    points, strides = model.points(sizes, "cpu")
    boxes = torch.tensor([[10.0, 12, 22, 24], [30, 30, 62, 62]])  # 12 px and 32 px boxes in a 64² image
    a = model.assign(points, strides, sizes, boxes)
    for g in range(2):
        p = points[a == g]
        assert len(p) > 0
        assert ((p[:, 0] > boxes[g, 0]) & (p[:, 0] < boxes[g, 2]) & (p[:, 1] > boxes[g, 1]) & (p[:, 1] < boxes[g, 3])).all()
    assert (strides[a == 0] == 4).all() and (strides[a == 1] >= 8).all()  # anchors 16 px vs 32/64 px
    tiny = torch.tensor([[20.0, 20, 23, 23]])  # its 3×3 candidates all pass the IoU test; one centre is inside
    assert points[model.assign(points, strides, sizes, tiny) == 0].tolist() == [[22.0, 22.0]]
    assert (model.assign(points, strides, sizes, torch.zeros(0, 4)) == -1).all()


def test_loss_is_finite_with_an_image_without_boxes_and_the_classifier_is_text_aligned():
    model = _detector()
    assert model.text.text_proj.weight.requires_grad
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
               {"boxes": torch.tensor([[8.0, 8, 20, 20]]), "labels": torch.tensor([2])}]
    loss, logs = model.loss(out, targets, (64, 64))
    assert torch.isfinite(loss) and logs["num_pos"] > 0
    loss.backward()
    assert model.text.text_proj.weight.grad.abs().sum() > 0  # the text tower is fine-tuned with the detector
    empty, _ = model.loss(model(x), [targets[0], targets[0]], (64, 64))
    assert torch.isfinite(empty)
    # logits are τ·cos(region, name) + b: reordering the names reorders the columns, any name can be scored
    tokens = text_encoder.Tokenizer()(NAMES + ["a purple thing"], 16)
    with torch.no_grad():
        l1 = model(x, tokens)["cls"]
        l2 = model(x, tokens[[2, 0, 3, 1]])["cls"]
    torch.testing.assert_close(l2, l1[..., [2, 0, 3, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1[..., :3], model(x)["cls"].detach(), atol=1e-5, rtol=1e-5)  # the stored names
    assert float(l1.max() - model.cls_bias.detach()) <= float(model.log_scale.detach().exp()) + 1e-4
    frozen = _detector(trainable=False)
    frozen.loss(frozen(x), targets, (64, 64))[0].backward()
    assert all(p.grad is None for p in frozen.text.parameters())


@pytest.mark.slow
def test_the_adapter_overfits_one_image():
    torch.manual_seed(0)
    model = _detector(text=False)
    x = torch.randn(1, 3, 64, 64) * 0.2
    boxes = torch.tensor([[6.0, 6, 20, 18], [34, 10, 54, 30], [12, 38, 30, 58]])
    labels = torch.tensor([0, 1, 2])
    for (x1, y1, x2, y2), k in zip(boxes.long().tolist(), labels.tolist()):
        x[0, k, y1:y2, x1:x2] += 2.0  # each class a colour
    targets = [{"boxes": boxes, "labels": labels}]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(120):
        loss, _ = model.loss(model(x), targets, (64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    pred = model.predict(x)
    ap = dh.coco_map(pred, [{"boxes": boxes, "labels": labels}])
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP"] > 0.8, ap


# ----------------------------------------------------------------------------------------------------
# Each mechanism against an independent computation


def test_pyramid_equals_a_hand_computed_top_down_sum():
    """FPN: lateral 1×1 convs, then coarse → fine each lateral map plus the nearest-upsampled (pixel
    repeat) sum from above, then 3×3 output convs, then a stride-2 conv for the extra level — written
    here with einsum and repeat_interleave, so the comparison does not reuse the module's code."""
    torch.manual_seed(0)
    fpn = dh.FeaturePyramid([8, 16, 32], 12, num_extra=1)
    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]

    def lateral(conv, m):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], m) + conv.bias.view(1, -1, 1, 1)

    def up2(t):  # nearest, ×2: every pixel repeated into a 2×2 block
        return t.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    with torch.no_grad():
        lat = [lateral(c, m) for c, m in zip(fpn.lateral, maps)]
        top = [None, None, lat[2]]
        top[1] = lat[1] + up2(top[2])
        top[0] = lat[0] + up2(top[1])
        want = [F.conv2d(t, c.weight, c.bias, padding=1) for t, c in zip(top, fpn.output)]
        want.append(F.conv2d(want[-1], fpn.extra[0].weight, fpn.extra[0].bias, stride=2, padding=1))
        got = fpn(maps)
    assert [g.shape[-1] for g in got] == [8, 4, 2, 1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # the finest output hears the coarsest input only through the top-down path
    maps2 = [maps[0], maps[1], maps[2] + 1.0]
    with torch.no_grad():
        assert (fpn(maps2)[0] - got[0]).abs().max() > 1e-3


def test_scale_attention_weights_each_branch_before_the_mean():
    """π_L: each spatial branch b is scaled by its own σ(ReLU(w·GAP(b) + c)) before the mean over the
    branches (the official DyConv: mean(res_fea · h_sigmoid(AttnConv(fea)))). Computed here by hand
    with σ(x) = clamp((x + 3)/6, 0, 1); a plain mean of the branches gives another output."""
    torch.manual_seed(0)
    blk = dh.DyHeadBlock(16)
    with torch.no_grad():
        nn.init.normal_(blk.scale_attn.fc.weight, std=2.0)
        blk.scale_attn.fc.bias.fill_(0.5)
        nn.init.normal_(blk.task_attn.fc2.weight, std=0.3)  # a dynamic ReLU that is not plain ReLU
        nn.init.normal_(blk.offset.weight, std=0.05)  # offsets ≠ 0
        for conv in (blk.conv_same, blk.conv_finer, blk.conv_coarser):  # GroupNorm output has zero mean per
            nn.init.normal_(conv.norm.bias, std=1.0)  # group: shifted, the branches' GAPs differ
    feats = _pyramid()
    with torch.no_grad():
        out = blk(feats)
        spread = []
        for l in range(len(feats)):
            branches = blk.spatial(feats, l)
            w = [((b.mean(dim=(2, 3)) @ blk.scale_attn.fc.weight[:, :, 0, 0].T + blk.scale_attn.fc.bias)
                  .clamp(min=0).add(3).div(6).clamp(0, 1)).view(-1, 1, 1, 1) for b in branches]
            fused = sum(wi * b for wi, b in zip(w, branches)) / len(branches)
            torch.testing.assert_close(out[l], blk.task_attn(fused), atol=1e-5, rtol=1e-5)
            spread.append(float(torch.cat(w).max() - torch.cat(w).min()))
    assert max(spread) > 0.05  # the branches really get different weights


def _fake_out(B, seed, K=3):
    """Detector outputs for a 64×64 image on the toy pyramid (strides 4, 8, 16): random logits and
    positive distances, so the loss can be checked without running the network."""
    sizes = [(16, 16), (8, 8), (4, 4)]
    N = sum(h * w for h, w in sizes)
    g = torch.Generator().manual_seed(seed)
    return {"cls": torch.randn(B, N, K, generator=g), "ltrb": torch.rand(B, N, 4, generator=g) * 20 + 1,
            "ctr": torch.randn(B, N, generator=g), "sizes": sizes}


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 36 + 2
    wh = torch.rand(n, 2, generator=g) * 20 + 6
    return torch.cat([xy, xy + wh], 1), torch.randint(0, 3, (n,), generator=g)


def _hand_loss(model, out, targets):
    """The ATSS loss written out in float64 from the assignment: focal (α = .25, γ = 2) / P, GIoU ·
    centerness / Σ centerness, BCE(centerness) / P, with the FCOS centerness target
    √(min(l, r)/max(l, r) · min(t, b)/max(t, b)) computed location by location."""
    points, strides = model.points(out["sizes"], "cpu")
    cls, ltrb, ctr = out["cls"].double(), out["ltrb"].double(), out["ctr"].double()
    focal, giou_w, bce, csum, P = 0.0, 0.0, 0.0, 0.0, 0
    for b, t in enumerate(targets):
        a = model.assign(points, strides, out["sizes"], t["boxes"].float())
        onehot = torch.zeros_like(cls[b])
        for n in (a >= 0).nonzero().squeeze(1).tolist():
            onehot[n, int(t["labels"][a[n]])] = 1.0
            x, y = points[n].tolist()
            x1, y1, x2, y2 = t["boxes"][a[n]].tolist()
            l, tp, r, bt = x - x1, y - y1, x2 - x, y2 - y
            c = math.sqrt(min(l, r) / max(l, r) * min(tp, bt) / max(tp, bt))
            d = ltrb[b, n].tolist()
            pred = torch.tensor([[x - d[0], y - d[1], x + d[2], y + d[3]]], dtype=torch.float64)
            giou_w += (1 - float(dh.generalized_box_iou(pred, t["boxes"][a[n]].double().view(1, 4)))) * c
            s = 1 / (1 + math.exp(-float(ctr[b, n])))
            bce += -(c * math.log(s) + (1 - c) * math.log(1 - s))
            csum += c
            P += 1
        p = cls[b].sigmoid()
        focal += float((-(0.25 * onehot * (1 - p) ** 2 * p.log())
                        - (0.75 * (1 - onehot) * p ** 2 * (1 - p).log())).sum())
    return {"loss_cls": focal / max(P, 1), "loss_box": giou_w / csum, "loss_ctr": bce / max(P, 1), "P": P, "S": csum}


def test_loss_terms_equal_a_hand_computation_with_the_centerness_target():
    model = _detector(text=False)
    out = _fake_out(2, seed=3)
    targets = []
    for b in range(2):
        boxes, labels = _boxes(2 + b, seed=10 + b)
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(len(labels), dtype=torch.long)})
    want = _hand_loss(model, out, targets)
    loss, logs = model.loss(out, targets, (64, 64))
    assert want["P"] > 4 and logs["num_pos"] == want["P"] / 2
    for k in ("loss_cls", "loss_box", "loss_ctr"):
        assert logs[k] == pytest.approx(want[k], rel=1e-5), k
    assert float(loss) == pytest.approx(want["loss_cls"] + 2 * want["loss_box"] + want["loss_ctr"], rel=1e-5)
    # the targets are not constant: positives off a box's centre get less than 1
    assert want["S"] < want["P"] - 0.5


def test_crowd_boxes_are_removed_from_the_targets():
    """A crowd box gives exactly the loss of no box (no positives; its locations are background), and
    next to a real box it changes nothing; the same box with iscrowd = 0 is a positive."""
    model = _detector(text=False)
    out = _fake_out(1, seed=5)
    box, other = torch.tensor([[10.0, 12, 40, 44]]), torch.tensor([[44.0, 6, 60, 22]])
    lab = torch.tensor([1])

    def loss(boxes, labels, crowd):
        t = [{"boxes": boxes, "labels": labels, "iscrowd": torch.tensor(crowd, dtype=torch.long)}]
        return model.loss(out, t, (64, 64))

    none, none_logs = loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [])
    crowd, crowd_logs = loss(box, lab, [1])
    real, real_logs = loss(box, lab, [0])
    assert crowd_logs["num_pos"] == 0 and real_logs["num_pos"] > 0
    assert float(crowd) == float(none) and crowd_logs == none_logs
    assert float(real) != pytest.approx(float(crowd))
    both, _ = loss(torch.cat([other, box]), torch.tensor([2, 1]), [0, 1])
    alone, _ = loss(other, torch.tensor([2]), [0])
    assert float(both) == float(alone)


def test_loss_normalisers_are_the_means_over_processes(monkeypatch):
    """Under torch.distributed the loss divides by the mean over processes of the number of positives
    and of Σ centerness. A stand-in for the all-reduce plays a second rank with other counts: each term
    is the local sum over the averaged normaliser."""
    model = _detector(text=False)
    out = _fake_out(1, seed=7)
    boxes, labels = _boxes(2, seed=21)
    targets = [{"boxes": boxes, "labels": labels}]
    want = _hand_loss(model, out, targets)
    other = torch.tensor([3.0, 1.25])  # the other rank: 3 positives, Σ centerness 1.25
    seen = []

    def two_ranks(x):
        seen.append(x.clone())
        return (x + other) / 2

    monkeypatch.setattr(dh, "mean_over_processes", two_ranks)
    _, logs = model.loss(out, targets, (64, 64))
    assert len(seen) == 1 and seen[0].tolist() == pytest.approx([want["P"], want["S"]], rel=1e-5)
    p_mean, s_mean = (want["P"] + 3) / 2, (want["S"] + 1.25) / 2
    assert logs["loss_cls"] == pytest.approx(want["loss_cls"] * want["P"] / p_mean, rel=1e-5)
    assert logs["loss_ctr"] == pytest.approx(want["loss_ctr"] * want["P"] / p_mean, rel=1e-5)
    assert logs["loss_box"] == pytest.approx(want["loss_box"] * want["S"] / s_mean, rel=1e-5)
    # a rank without positives still takes part in the reduction (the others would wait for it)
    seen.clear()
    _, logs = model.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}], (64, 64))
    assert len(seen) == 1 and seen[0].tolist() == [0.0, 0.0]


def test_mean_over_processes_is_the_identity_without_a_process_group():
    x = torch.tensor([3.0, 2.5], requires_grad=True)
    y = dh.mean_over_processes(x)
    assert y.tolist() == [3.0, 2.5] and not y.requires_grad


def _gloo_loss_worker(rank, world, init_file, out_dir):
    import os
    import sys

    import torch.distributed as dist

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _detector(text=False)
        out = _fake_out(2, seed=11)
        mine = {k: (v[rank:rank + 1] if torch.is_tensor(v) else v) for k, v in out.items()}
        loss, logs = model.loss(mine, [_gloo_targets()[rank]], (64, 64))
        torch.save({"loss": float(loss), **logs}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears its gloo pairs down
    finally:
        dist.destroy_process_group()


def _gloo_targets():
    """Rank 0: one box; rank 1: three boxes (so the two ranks have different numbers of positives)."""
    out = []
    for n, seed in ((1, 30), (3, 31)):
        boxes, labels = _boxes(n, seed)
        out.append({"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(n, dtype=torch.long)})
    return out


@pytest.mark.slow  # two spawned processes
def test_two_gloo_processes_normalise_by_the_average_number_of_positives(tmp_path):
    """Two ranks with different numbers of positives: each rank's terms are its local sums over the
    averages (N̄_pos, mean Σ centerness) and the mean of the two ranks' losses is the loss of one
    process on both images (what DDP's gradient average then optimises)."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_loss_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _detector(text=False)
    out, targets = _fake_out(2, seed=11), _gloo_targets()
    local = [_hand_loss(model, {k: (v[r:r + 1] if torch.is_tensor(v) else v) for k, v in out.items()}, [targets[r]])
             for r in range(2)]
    assert local[0]["P"] != local[1]["P"]
    p_mean, s_mean = (local[0]["P"] + local[1]["P"]) / 2, (local[0]["S"] + local[1]["S"]) / 2
    for r in range(2):
        assert ranks[r]["num_pos"] == local[r]["P"]
        assert ranks[r]["loss_cls"] == pytest.approx(local[r]["loss_cls"] * local[r]["P"] / p_mean, rel=1e-5)
        assert ranks[r]["loss_ctr"] == pytest.approx(local[r]["loss_ctr"] * local[r]["P"] / p_mean, rel=1e-5)
        assert ranks[r]["loss_box"] == pytest.approx(local[r]["loss_box"] * local[r]["S"] / s_mean, rel=1e-5)
    whole, _ = model.loss(out, targets, (64, 64))
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(float(whole), rel=1e-5)
