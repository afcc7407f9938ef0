"""dynamic_detr.py: RoIAlign against a plain-loop transcription of torchvision's CPU kernel (gradients by
finite differences); FPN's level rule; the Hungarian solver against brute force (square, rectangular, ties);
the dynamic convolution against a hand computation for one query, and its kernels depend on the query;
the cross-scale SE; box refinement composes; the set loss ignores the order of the ground truth, drops
crowd boxes, is normalised by the mean over processes; text-aligned classes score each name on its own;
NMS-free postprocessing; the whole adapter overfits one image."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import coswin
import dynamic_detr as dd
import dynamic_head as dh
import text_encoder

# ----------------------------------------------------------------------------------------------------
# RoIAlign


def _bilinear_tv(img, y, x):
    """torchvision roi_align_kernel.cpp `bilinear_interpolate`, in plain Python."""
    H, W = img.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * float(img[yl, xl]) + hy * lx * float(img[yl, xh])
            + ly * hx * float(img[yh, xl]) + ly * lx * float(img[yh, xh]))


def _roi_align_loop(x, boxes, P, scale, sampling_ratio, aligned):
    """torchvision's roi_align_forward_kernel_impl loop: one box, one bin, one sample at a time."""
    B, C, H, W = x.shape
    N = boxes.shape[1]
    out = torch.zeros(B, N, C, P, P, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for b in range(B):
        for n in range(N):
            x1, y1, x2, y2 = [float(v) * scale - off for v in boxes[b, n]]
            rw, rh = x2 - x1, y2 - y1
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
            bh, bw = rh / P, rw / P
            gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / P)
            gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / P)
            count = max(gh * gw, 1)
            for c in range(C):
                for i in range(P):
                    for j in range(P):
                        s = 0.0
                        for iy in range(gh):
                            yy = y1 + i * bh + (iy + 0.5) * bh / gh
                            for ix in range(gw):
                                xx = x1 + j * bw + (ix + 0.5) * bw / gw
                                s += _bilinear_tv(x[b, c], yy, xx)
                        out[b, n, c, i, j] = s / count
    return out


# fractional boxes inside, across every border, beyond the image, thin and degenerate (x2 < x1)
_BOXES = torch.tensor([[[1.3, 2.7, 9.8, 7.1], [-3.0, -2.5, 4.2, 5.5], [10.5, 6.2, 18.0, 13.9], [4.0, 4.0, 4.3, 11.0]],
                       [[0.0, 0.0, 16.0, 14.0], [14.5, 12.5, 21.0, 20.0], [7.2, 3.3, 7.9, 3.6], [9.0, 9.0, 6.0, 5.0]]],
                      dtype=torch.float64)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_equals_the_torchvision_loop(aligned, sampling_ratio):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)  # an image of 14 × 16 pixels at spatial_scale ½
    got = dd.roi_align(x, _BOXES, 3, spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    want = _roi_align_loop(x, _BOXES, 3, 0.5, sampling_ratio, aligned)
    assert got.shape == (2, 4, 3, 3, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_roi_align_aligned_shifts_by_half_a_pixel():
    """aligned=True samples a 1-pixel box [j, j+1] at the pixel centre j + ½ − ½ = j: the pixel itself."""
    x = torch.arange(20.0, dtype=torch.float64).view(1, 1, 4, 5)
    box = torch.tensor([[[2.0, 1.0, 3.0, 2.0]]], dtype=torch.float64)
    assert float(dd.roi_align(x, box, 1, 1.0, 1, aligned=True)) == pytest.approx(float(x[0, 0, 1, 2]))
    assert float(dd.roi_align(x, box, 1, 1.0, 1, aligned=False)) == pytest.approx(  # centre (2.5, 1.5)
        (x[0, 0, 1, 2] + x[0, 0, 1, 3] + x[0, 0, 2, 2] + x[0, 0, 2, 3]).item() / 4)


def test_roi_align_under_bf16_samples_at_fp32_positions():
    """bf16 holds 8 bits of mantissa: positions near 100 px would round to ½ px; the weights stay in fp32."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 64)
    boxes = torch.tensor([[[101.3, 97.9, 117.7, 121.1]]])
    want = dd.roi_align(x, boxes, 3, 0.5, 2, True)
    got = dd.roi_align(x.bfloat16(), boxes, 3, 0.5, 2, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.02)


def test_roi_align_gradients_match_finite_differences():
    torch.manual_seed(1)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[1.3, 0.7, 8.8, 6.1], [-1.7, 3.2, 4.4, 11.1]], [[6.1, 2.3, 11.3, 9.4], [0.4, 0.6, 3.3, 2.9]]],
                         dtype=torch.float64, requires_grad=True)
    for ratio in (2, 0):
        assert torch.autograd.gradcheck(lambda f: dd.roi_align(f, boxes.detach(), 2, 0.5, ratio, True), (x,))
    # the box coordinates too (away from the integer kinks of bilinear sampling)
    assert torch.autograd.gradcheck(lambda b: dd.roi_align(x.detach(), b, 2, 0.5, 2, True), (boxes,))


def test_fpn_level_rule():
    """k = ⌊k₀ + log₂(√(wh)/s₀)⌋ clamped, level k = stride 2^k: with s₀ = 224 at k₀ = 4 and strides 8…64."""
    sides = torch.tensor([20.0, 111.9, 112.0, 223.0, 224.0, 447.0, 448.0, 900.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], -1)
    got = dd.fpn_levels(boxes, [8, 16, 32, 64], 224.0, 4)
    # 111.9 → ⌊2.998⌋ = 2 → clamped to 3 (stride 8); 112 → 3; 224 → 4; 447 → 4; 448 → 5; 900 → ⌊6.006⌋ = 6
    assert got.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="consecutive powers of two"):
        dd.fpn_levels(boxes, [8, 32], 224.0, 4)


def test_multiscale_roi_align_pools_each_box_from_its_level():
    torch.manual_seed(0)
    feats = [torch.randn(1, 2, 16, 16, dtype=torch.float64), torch.randn(1, 2, 8, 8, dtype=torch.float64),
             torch.randn(1, 2, 4, 4, dtype=torch.float64)]
    boxes = torch.tensor([[[2.0, 3.0, 12.0, 11.0], [10.0, 5.0, 50.0, 45.0], [0.0, 0.0, 64.0, 64.0]]], dtype=torch.float64)
    got = dd.multiscale_roi_align(feats, [4, 8, 16], boxes, 3, 2, 64.0, 4)
    levels = dd.fpn_levels(boxes, [4, 8, 16], 64.0, 4)[0].tolist()
    assert levels == [0, 1, 2]
    for n, l in enumerate(levels):
        want = dd.roi_align(feats[l], boxes[:, n:n + 1], 3, 1.0 / [4, 8, 16][l], 2, True)
        torch.testing.assert_close(got[:, n:n + 1], want)
    fused = dd.multiscale_roi_align(feats, [4, 8, 16], boxes, 3, 2, 64.0, 4, levels="all")
    want = sum(dd.roi_align(f, boxes, 3, 1.0 / s, 2, True) for f, s in zip(feats, [4, 8, 16])) / 3
    torch.testing.assert_close(fused, want)
    with pytest.raises(ValueError, match="fpn or all"):
        dd.multiscale_roi_align(feats, [4, 8, 16], boxes, 3, 2, 64.0, 4, levels="max")


# ----------------------------------------------------------------------------------------------------
# The Hungarian solver


def _brute_force(c):
    n, m = c.shape
    if n <= m:
        return min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(c[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def test_hungarian_equals_brute_force_on_square_rectangular_and_tied_matrices():
    rng = np.random.default_rng(0)
    shapes = [(n, m) for n in range(1, 7) for m in range(1, 7)]
    for trial, (n, m) in enumerate(shapes * 4):
        if trial % 3 == 0:
            c = rng.integers(0, 3, (n, m)).astype(float)  # many ties
        elif trial % 3 == 1:
            c = rng.normal(size=(n, m)) * 10
        else:
            c = np.full((n, m), 1.5)  # everything tied
        rows, cols = dd.linear_sum_assignment(c)
        assert len(rows) == min(n, m)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert (np.diff(rows) > 0).all()  # rows ascending, as scipy
        assert c[rows, cols].sum() == pytest.approx(_brute_force(c), abs=1e-9), (c, rows, cols)


def test_hungarian_edge_cases():
    rows, cols = dd.linear_sum_assignment(np.zeros((0, 4)))
    assert rows.size == cols.size == 0
    rows, cols = dd.linear_sum_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]  # 1 + 2 + 2 = 5, the unique optimum
    with pytest.raises(ValueError, match="NaN or infinite"):
        dd.linear_sum_assignment(np.array([[1.0, np.nan]]))


# ----------------------------------------------------------------------------------------------------
# The dynamic encoder


def test_scale_se_weights_each_branch_from_the_whole_neighbourhood():
    torch.manual_seed(0)
    se = dd.ScaleSE(4)
    br = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    torch.testing.assert_close(se(br), 0.5 * sum(br) / 3)  # every weight ½ at init
    torch.testing.assert_close(se([None, br[1], br[2]]), 0.5 * (br[1] + br[2]) / 2)  # a missing neighbour is left out
    nn.init.normal_(se.fc2.weight, std=1.0)
    w = se.weights(br)
    want = dh.hard_sigmoid(se.fc2(torch.relu(se.fc1(torch.cat([b.mean((2, 3)) for b in br], 1)))))
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(se(br), sum(w[:, s, None, None, None] * br[s] for s in range(3)) / 3)
    # cross-scale: the weight of the middle level moves when only its finer neighbour changes
    w2 = se.weights([br[0] + 3.0, br[1], br[2]])
    assert not torch.allclose(w[:, 1], w2[:, 1])


def test_encoder_block_is_dyhead_spatial_then_scale_se_then_dynamic_relu():
    torch.manual_seed(0)
    block = dd.DynamicEncoderBlock(8, gn_groups=4)
    assert not hasattr(block, "scale_attn")  # DyHead's per-branch scale attention is replaced
    nn.init.normal_(block.scale_se.fc2.weight, std=1.0)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    out = block(feats)
    for l in range(3):
        br = block.spatial(feats, l)  # [same, finer?, coarser?]
        slots = [br[1] if l > 0 else None, br[0], br[-1] if l < 2 else None]
        torch.testing.assert_close(out[l], block.task_attn(block.scale_se(slots)))


# ----------------------------------------------------------------------------------------------------
# The dynamic decoder


def test_dynamic_conv_equals_a_hand_computation_for_one_query():
    torch.manual_seed(0)
    C, d, S = 6, 3, 2
    conv = dd.DynamicConv(C, d, S)
    for ln in (conv.norm1, conv.norm2, conv.norm3):  # non-trivial affine LayerNorms
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    q = torch.randn(1, 2, C, dtype=torch.float64)
    roi = torch.randn(1, 2, C, S, S, dtype=torch.float64)
    got = conv.double()(q, roi)[0, 1]

    def ln(v, norm):
        v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + norm.eps)
        return v * norm.weight + norm.bias

    with torch.no_grad():
        p = conv.dynamic.weight @ q[0, 1] + conv.dynamic.bias  # the query's kernels
        k1 = torch.tensor([[float(p[c * d + e]) for e in range(d)] for c in range(C)], dtype=torch.float64)
        k2 = torch.tensor([[float(p[C * d + e * C + c]) for c in range(C)] for e in range(d)], dtype=torch.float64)
        rows = []
        for y in range(S):
            for x in range(S):  # a 1×1 conv: the same two matrices at every RoI position
                f = torch.relu(ln(roi[0, 1, :, y, x] @ k1, conv.norm1))
                rows.append(torch.relu(ln(f @ k2, conv.norm2)))
        want = torch.relu(ln(conv.out.weight @ torch.cat(rows) + conv.out.bias, conv.norm3))
    torch.testing.assert_close(got, want)


def test_dynamic_attention_depends_on_the_query_not_only_on_the_roi():
    """Two queries reading the same RoI features must get different results (a static kernel — one that
    ignores the query — would give the same), and the RoI features must matter too."""
    torch.manual_seed(0)
    conv = dd.DynamicConv(8, 4, 3)
    roi = torch.randn(1, 1, 8, 3, 3).expand(1, 2, 8, 3, 3)
    q = torch.randn(1, 2, 8, requires_grad=True)
    out = conv(q, roi)
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-3
    out[0, 0].sum().backward()
    assert q.grad[0, 0].abs().sum() > 0  # the kernels, and so the output, are a function of the query
    assert not torch.allclose(conv(q, roi), conv(q, torch.randn_like(roi)))


def test_queries_see_each_other_only_through_self_attention():
    """Changing query j changes query i's output (self-attention); RoI reading and the dynamic conv are
    per query, so with the attention's output projection zeroed the queries are independent."""
    torch.manual_seed(0)
    cfg = dd.build_config("toy", channels=16, heads=2, ffn_dim=32, dyconv_dim=4, roi_size=3)
    layer = dd.DecoderLayer(cfg, 3)
    feats = [torch.randn(1, 16, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)]
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]])
    q = torch.randn(1, 2, 16)
    q2 = q.clone()
    q2[0, 1] += 1.0
    run = lambda qq: layer(qq, boxes, feats, [4, 8, 16], (64, 64))[0][0, 0]  # noqa: E731
    assert (run(q) - run(q2)).abs().max() > 1e-4
    nn.init.zeros_(layer.self_attn.out_proj.weight)
    torch.testing.assert_close(run(q), run(q2))


def test_box_refinement_composes_in_logit_space():
    torch.manual_seed(0)
    b = torch.rand(5, 4) * 0.8 + 0.1
    d1, d2 = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(dd.refine_boxes(b, torch.zeros(5, 4)), b)
    torch.testing.assert_close(dd.refine_boxes(dd.refine_boxes(b, d1), d2), dd.refine_boxes(b, d1 + d2))
    torch.testing.assert_close(dd.refine_boxes(b, d1), torch.sigmoid(torch.log(b / (1 - b)) + d1))


def _model(text=False, **over):
    torch.manual_seed(0)
    cfg = dd.build_config("toy", channels=32, enc_blocks=1, num_queries=9, dec_layers=2, heads=2, ffn_dim=64,
                          dyconv_dim=8, roi_size=4, **over)
    if not text:
        return dd.DynamicDETR(coswin.build("toy"), cfg, num_classes=3)
    enc = text_encoder.build("toy", vocab_size=300)
    tower = dh.TextTower(enc, nn.Linear(enc.num_features, 24, bias=False))
    model = dd.DynamicDETR(coswin.build("toy"), cfg, text=tower)
    model.set_classes(text_encoder.Tokenizer()(["red circle", "blue square", "green cross"], 16))
    return model


def test_decoder_boxes_are_the_initial_grid_refined_layer_by_layer():
    """b_l = σ(σ⁻¹(b_{l−1}) + Δ_l): the final box is σ(σ⁻¹(b_0) + Σ Δ); the box a layer pools from is
    detached, so the last box's gradient never reaches an earlier layer's box head."""
    model = _model()
    with torch.no_grad():  # at init (zero Δ heads) every layer predicts the initial grid
        fresh = model(torch.randn(1, 3, 64, 64))
    for o in fresh["aux"] + [fresh]:
        torch.testing.assert_close(o["boxes"][0], dd.grid_boxes(9), atol=1e-5, rtol=0)
    for layer in model.layers:  # non-zero deltas
        nn.init.normal_(layer.box_delta.weight, std=0.1)
    deltas = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: deltas.append(o[2]))
    out = model(torch.randn(2, 3, 64, 64))
    b0 = torch.sigmoid(model.query_box.weight)
    torch.testing.assert_close(model.query_box.weight, dd.inverse_sigmoid(dd.grid_boxes(9)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["aux"][0]["boxes"], torch.sigmoid(dd.inverse_sigmoid(b0) + deltas[0]))
    torch.testing.assert_close(out["boxes"], torch.sigmoid(dd.inverse_sigmoid(b0) + deltas[0] + deltas[1]),
                               atol=1e-5, rtol=1e-4)
    out["boxes"].sum().backward()
    assert model.layers[0].box_delta.weight.grad is None or model.layers[0].box_delta.weight.grad.abs().max() == 0
    assert model.layers[1].box_delta.weight.grad.abs().max() > 0


def test_grid_boxes_cover_the_image():
    b = dd.grid_boxes(16)
    assert b[:, 0].unique().tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert (b[:, 2:] == 0.5).all()  # two grid spacings wide
    assert dd.grid_boxes(5).shape == (5, 4)


# ----------------------------------------------------------------------------------------------------
# The set loss


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6, 20, 18], [30, 8, 50, 30], [10, 40, 24, 60]]), "labels": torch.tensor([0, 2, 1])},
            {"boxes": torch.tensor([[12.0, 12, 40, 44]]), "labels": torch.tensor([1])}]


def _random_out(B=2, N=9, K=3, layers=2):
    torch.manual_seed(3)
    one = lambda: {"cls": torch.randn(B, N, K, requires_grad=True),  # noqa: E731
                   "boxes": torch.sigmoid(torch.randn(B, N, 4)).requires_grad_()}
    last = one()
    return {**last, "aux": [one() for _ in range(layers - 1)]}


def test_set_loss_does_not_depend_on_the_order_of_the_ground_truth():
    model = _model()
    out = _random_out()
    loss, logs = model.loss(out, _targets(), (64, 64))
    perm = [2, 0, 1]
    shuffled = [{"boxes": _targets()[0]["boxes"][perm], "labels": _targets()[0]["labels"][perm]}, _targets()[1]]
    loss2, logs2 = model.loss(out, shuffled, (64, 64))
    assert float(loss.detach()) == pytest.approx(float(loss2.detach()), rel=1e-6)
    assert logs == pytest.approx(logs2)


def test_matching_minimises_the_documented_cost():
    model = _model()
    torch.manual_seed(0)
    logits, boxes = torch.randn(5, 3), torch.sigmoid(torch.randn(5, 4))
    labels, tboxes = torch.tensor([2, 0, 2]), torch.sigmoid(torch.randn(3, 4))
    cost = np.zeros((5, 3))
    for i in range(5):
        for j in range(3):
            p = float(torch.sigmoid(logits[i, labels[j]]))
            focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
            l1 = float((boxes[i] - tboxes[j]).abs().sum())
            giou = float(dh.generalized_box_iou(dd.box_cxcywh_to_xyxy(boxes[i:i + 1]), dd.box_cxcywh_to_xyxy(tboxes[j:j + 1])))
            cost[i, j] = 2 * focal + 5 * l1 - 2 * giou
    np.testing.assert_allclose(model.match_cost(logits, boxes, labels, tboxes).numpy(), cost, rtol=1e-5, atol=1e-5)
    other = (torch.tensor([1]), torch.sigmoid(torch.randn(1, 4)))  # a second image: its costs are cut apart
    (qi, ti), (qo, to) = model.match(torch.stack([logits, torch.randn(5, 3)]), torch.stack([boxes, boxes]),
                                     [(labels, tboxes), other])
    assert len(qo) == len(to) == 1 and int(to[0]) == 0
    assert cost[qi.numpy(), ti.numpy()].sum() == pytest.approx(_brute_force(cost), rel=1e-5)


def test_set_loss_is_zero_for_boxes_on_target_and_sums_every_layer():
    model = _model()
    t = _targets()[:1]
    gt = dd.box_xyxy_to_cxcywh(t[0]["boxes"] / 64)
    boxes = torch.cat([gt, torch.full((6, 4), 0.5)])[None]  # queries 0–2 sit exactly on the objects
    logits = torch.full((1, 9, 3), -30.0)
    logits[0, [0, 1, 2], t[0]["labels"]] = 30.0
    out = {"cls": logits, "boxes": boxes, "aux": [{"cls": logits, "boxes": boxes}]}
    loss, logs = model.loss(out, t, (64, 64))
    assert float(loss) < 1e-4 and logs["loss_l1"] < 1e-6 and logs["loss_giou"] < 1e-5
    moved = {"cls": logits, "boxes": boxes + torch.tensor([0.02, 0.0, 0.01, 0.0]), "aux": [{"cls": logits, "boxes": boxes}]}
    loss_moved, l_moved = model.loss(moved, t, (64, 64))
    # L1 on (cx, cy, w, h) of the three matched boxes: 3 × (0.02 + 0.01), divided by 3 boxes (on xyxy: 0.04)
    assert l_moved["loss_l1"] == pytest.approx(0.03, rel=1e-4)
    # the total is the weighted sum of the last layer's three terms and the same for every auxiliary layer
    want = 2 * l_moved["loss_cls"] + 5 * l_moved["loss_l1"] + 2 * l_moved["loss_giou"]
    assert float(loss_moved) == pytest.approx(want, abs=1e-4)
    aux = {"cls": logits * 0.5, "boxes": boxes + 0.02}
    both = model.loss({**moved, "aux": [aux]}, t, (64, 64))[0]
    alone = model.loss({**moved, "aux": []}, t, (64, 64))[0] + model.loss({**aux, "aux": []}, t, (64, 64))[0]
    assert float(both) == pytest.approx(float(alone), rel=1e-6) and float(both) > float(loss_moved) + 0.1


def test_crowd_boxes_leave_the_targets_and_the_normaliser_is_the_mean_over_processes(monkeypatch):
    model = _model()
    out = _random_out()
    t = _targets()
    loss, _ = model.loss(out, t, (64, 64))
    crowd = [dict(t[0], boxes=torch.cat([t[0]["boxes"], torch.tensor([[0.0, 0, 64, 64]])]),
                  labels=torch.cat([t[0]["labels"], torch.tensor([0])]), iscrowd=torch.tensor([0, 0, 0, 1])), t[1]]
    assert model.loss(out, crowd, (64, 64))[0].item() == pytest.approx(loss.item(), rel=1e-6)
    monkeypatch.setattr(dh, "mean_over_processes", lambda x: x.detach() * 2)  # other ranks hold 3× as many boxes
    assert model.loss(out, t, (64, 64))[0].item() == pytest.approx(loss.item() / 2, rel=1e-6)


def test_empty_ground_truth_gives_background_only_and_a_connected_graph():
    model = _model()
    out = _random_out()
    loss, logs = model.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2, (64, 64))
    loss.backward()
    assert logs["loss_l1"] == 0 and out["boxes"].grad is not None and out["cls"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Classes and inference


def test_text_aligned_logits_are_scaled_cosines_with_the_class_prompts():
    """logit_{i,k} = τ·⟨r_i/‖r_i‖, v_k⟩ + b at every layer, τ = exp(log_scale) clamped at 100."""
    model = _model(text=True).eval()
    feats = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: feats.append(o[1]))
    with torch.no_grad():
        model.log_scale.fill_(math.log(250.0))  # beyond the clamp
        out = model(torch.randn(1, 3, 64, 64))
        v = model.encode_classes()
        for o, r in zip(out["aux"] + [out], feats):
            want = 100.0 * (r / r.norm(dim=-1, keepdim=True)) @ v.T + model.cls_bias
            torch.testing.assert_close(o["cls"], want)


def test_text_aligned_logits_of_a_name_do_not_depend_on_the_other_names():
    model = _model(text=True).eval()
    tok = text_encoder.Tokenizer()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        three = model(x, tok(["red circle", "blue square", "green cross"], 16))["cls"]
        one = model(x, tok(["green cross"], 16))["cls"]
    torch.testing.assert_close(one[..., 0], three[..., 2])
    with pytest.raises(ValueError, match="exactly one"):
        dd.DynamicDETR(coswin.build("toy"), dd.build_config("toy"))


def test_postprocess_takes_the_top_query_class_pairs_with_their_boxes():
    model = _model()
    logits = torch.full((1, 9, 3), -9.0)
    logits[0, 4, 1], logits[0, 7, 2], logits[0, 4, 0] = 3.0, 2.0, 1.0
    boxes = torch.full((1, 9, 4), 0.5)
    boxes[0, 4] = torch.tensor([0.25, 0.5, 0.5, 0.25])
    boxes[0, 7] = torch.tensor([0.9, 0.9, 0.4, 0.4])  # sticks out: clipped to the image
    model.cfg.max_det = 3
    res = model.postprocess({"cls": logits, "boxes": boxes, "aux": []}, (64, 128))[0]
    assert res["labels"].tolist() == [1, 2, 0]
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    torch.testing.assert_close(res["boxes"], torch.tensor([[0.0, 24.0, 64.0, 40.0], [89.6, 44.8, 128.0, 64.0],
                                                           [0.0, 24.0, 64.0, 40.0]]))


def test_the_adapter_overfits_one_image():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(1, 3, 64, 64) * 0.2
    boxes = torch.tensor([[6.0, 6, 20, 18], [34, 10, 54, 30], [12, 38, 30, 58]])
    labels = torch.tensor([0, 1, 2])
    for (x1, y1, x2, y2), k in zip(boxes.long().tolist(), labels.tolist()):
        x[0, k, y1:y2, x1:x2] += 2.0  # each class a colour
    targets = [{"boxes": boxes, "labels": labels}]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        loss, _ = model.loss(model(x), targets, (64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ap = dh.coco_map(model.predict(x), targets)
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP"] > 0.6, ap


@pytest.mark.parametrize("adapter", ["dyhead", "dydetr"])
def test_both_adapters_take_their_classes_from_a_florence_model_as_the_classifier_says(adapter):
    """from_pretrained (dynamic_head.TextClassified, shared): "text" fine-tunes the text tower, "frozen"
    keeps it fixed, "fixed" has no text tower but a logit per class; the backbone is Florence's CoSwin."""
    import unicl

    def florence():  # one each: the adapters share (not copy) the towers they are given
        torch.manual_seed(0)
        return unicl.build("toy", vocab_size=300)

    cls, cfg = ((dh.Detector, dh.build_config("toy", channels=32, num_blocks=1)) if adapter == "dyhead" else
                (dd.DynamicDETR, dd.build_config("toy")))
    fl = florence()
    tuned = cls.from_pretrained(fl, cfg, "text")
    frozen = cls.from_pretrained(florence(), cfg, "frozen")
    fixed = cls.from_pretrained(florence(), cfg, "fixed", num_classes=3)
    assert tuned.backbone is fl.image_encoder
    assert any(p.requires_grad for p in tuned.text.parameters())
    assert not any(p.requires_grad for p in frozen.text.parameters())
    assert fixed.text is None
    with pytest.raises(ValueError, match="text, frozen or fixed"):
        cls.from_pretrained(fl, cfg, "frozn")
    with pytest.raises(ValueError, match=f"{cls.__name__}: no class names"):
        tuned.encode_classes()
