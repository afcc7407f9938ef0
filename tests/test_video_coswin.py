"""Video CoSwin (video_coswin.py) and --task video: the inflation invariants of paper §2.6 checked exactly,
the 3D window machinery against references computed another way (coordinates, loops), and a short run
of the video task end to end."""
import math

import pytest
import torch

import coswin
import video_coswin as vc
from video_coswin import (VideoCoSwin, WindowAttention3D, inflate_bias_table, inflate_conv,
                          relative_position_index3d, shifted_window_mask3d, window_partition3d, window_reverse3d)


def image_model(dtype=torch.float64, **kw):
    """A toy CoSwin with every weight (biases, norms and bias tables included) perturbed away from its
    init, so no term of the comparison is trivially zero or one."""
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4, drop_path_rate=0.0)
    cfg.update(kw)
    model = coswin.CoSwin(coswin.CoSwinConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------------------------
# The static-clip invariance


@pytest.mark.parametrize("H,W,T,kt,merge", [
    (64, 64, 8, 2, (1, 1)),   # shifted windows in every dimension, no padding
    (50, 70, 6, 2, (2, 1)),   # T' = 3 with Wt = 2: temporal padding and shift; odd spatial maps; time merged
    (37, 45, 5, 1, (1, 2)),   # odd T, H, W; K_t = 1
    (40, 40, 8, 4, (1, 1)),   # K_t = 4
    (32, 48, 7, 2, (1, 1)),   # T = 7 is not a multiple of K_t: the last frame is repeated (still static)
])
@pytest.mark.parametrize("fused", [False, True])
def test_static_clip_gives_the_image_models_features(H, W, T, kt, merge, fused):
    """T identical frames through the inflated model give the image model's four maps at every time step.

    Why it holds: (1) the tokenizer and every patch merging sum K_t equal frames with W_2D / K_t each,
    i.e. W_2D once, and tile time without zero frames, so tokens start equal along t; (2) a 3D window
    holds each key of the 2D window n_t times (n_t = the query's temporal region; the mask factorises into
    time × space), every copy with the same logit q·k/√d + E_2D(Δh,Δw) since E_3D does not depend on Δt;
    softmax(l with every entry repeated n_t times) weights each value by n_t·e^l / (n_t·Σe^l), so the
    attention average equals the 2D one; (3) norms and MLPs act per token. Tokens stay equal along t."""
    image = image_model()
    image.set_fused_attention(fused)
    video = VideoCoSwin.from_image_model(image, temporal_kernel=kt, temporal_merge=merge).eval()
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    clip = x[:, :, None].expand(-1, -1, T, -1, -1)
    with torch.no_grad():
        maps2d, maps3d = image.forward_features(x), video.forward_features(clip)
    t = -(-T // kt)
    for i, (a, b) in enumerate(zip(maps2d, maps3d)):
        assert b.shape == (2, a.shape[1], t, *a.shape[2:]), i
        assert (b - a[:, :, None]).abs().max() <= 1e-5, i
        if i < len(merge):
            t = -(-t // merge[i])
    with torch.no_grad():
        assert (video(clip) - image(x)).abs().max() <= 1e-5


def test_static_clip_invariance_in_float32_with_the_toy_preset():
    image = coswin.build("toy").eval()
    video = VideoCoSwin.from_image_model(image).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (video(x[:, :, None].expand(-1, -1, 8, -1, -1)) - image(x)).abs().max()
    assert diff <= 1e-4


def test_a_moving_clip_is_not_a_static_one():
    """The converse, so the invariance test cannot pass by ignoring time: frames that differ change the
    features of the inflated model.

    The order of the frames, though, is invisible to a freshly inflated model: every temporal kernel is
    W_2D/k_t at each offset and the bias tables do not depend on Δt, so the network commutes with time
    reversal and a clip and its reverse pool to the same vector (here the default merge leaves T = 1 in
    the last map). Fine-tuning must create the asymmetry; once a temporal kernel differs between its
    offsets (as after any training step on motion), order matters."""
    image = image_model()
    video = VideoCoSwin.from_image_model(image).eval()
    clip = torch.randn(1, 3, 8, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a0, *_, a = video.forward_features(clip)
        b = video.forward_features(clip.flip(2))[-1]
    assert a.shape[2] == 1
    assert (a0[:, :, 0] - a0[:, :, -1]).abs().max() > 1e-3  # time steps differ
    assert (a - b).abs().max() < 1e-10  # but the inflated model cannot tell the order
    with torch.no_grad():
        w = video.layers[0].downsample.proj.weight  # (C_out, C_in, 2, 3, 3), both offsets W_2D / 2
        w[:, :, 0] += 0.05 * torch.randn_like(w[:, :, 0])
        a, b = video.forward_features(clip)[-1], video.forward_features(clip.flip(2))[-1]
    assert (a - b).abs().max() > 1e-3  # a temporal kernel that differs between offsets sees the order


# ---------------------------------------------------------------------------------------------------
# Inflation of the weights


def test_inflate_conv_divides_by_kt_and_sums_back():
    conv = torch.nn.Conv2d(3, 5, 7, 4, 2)
    c3 = inflate_conv(conv, 3)
    assert c3.kernel_size == (3, 7, 7) and c3.stride == (3, 4, 4) and c3.padding == (0, 2, 2)
    for t in range(3):
        torch.testing.assert_close(c3.weight[:, :, t], conv.weight / 3)
    torch.testing.assert_close(c3.weight.sum(2), conv.weight)
    torch.testing.assert_close(c3.bias, conv.bias)
    x = torch.randn(2, 3, 20, 20)
    torch.testing.assert_close(c3(x[:, :, None].expand(-1, -1, 6, -1, -1)),
                               conv(x)[:, :, None].expand(-1, -1, 2, -1, -1), atol=1e-5, rtol=1e-5)


def test_inflated_bias_table_equals_the_2d_one_at_every_temporal_offset():
    image = image_model()
    video = VideoCoSwin.from_image_model(image, windows=((2, 4, 4), (3, 4, 4), (4, 4, 4)))
    for l2, l3 in zip(image.layers, video.layers):
        for b2, b3 in zip(l2.blocks, l3.blocks):
            t2 = b2.attn.relative_position_bias_table
            t3 = b3.attn.relative_position_bias_table
            Wt = b3.attn.window_size[0]
            assert t3.shape == ((2 * Wt - 1) * 7 * 7, t2.shape[1])
            per_dt = t3.view(2 * Wt - 1, 7 * 7, -1)
            for dt in range(2 * Wt - 1):
                assert torch.equal(per_dt[dt], t2)
            # and through the index: the (heads, N, N) bias of a 3D window is E_2D(Δh, Δw) for every pair
            ws = b3.attn.window_size
            bias3 = b3.attn.relative_bias(ws)  # (heads, N, N)
            bias2 = b2.attn.relative_bias(4)  # (heads, 16, 16)
            n = ws[0]
            assert torch.equal(bias3, bias2.repeat(1, n, n))


def test_inflate_bias_table_resizes_the_spatial_window_first():
    """Inflation = the 2D resize, then duplication along time. The resize itself (bicubic per head, as the
    official Swin loader) is checked against an independent loop in tests/test_coswin.py."""
    table = torch.randn(7 * 7, 3)
    out = inflate_bias_table(table, (2, 6, 6))
    assert out.shape == (3 * 11 * 11, 3)
    torch.testing.assert_close(out.view(3, 121, 3)[1], coswin.resize_bias_table(table, 6))
    const = inflate_bias_table(torch.full((49, 2), 0.5), (3, 6, 6))
    torch.testing.assert_close(const, torch.full_like(const, 0.5))


@pytest.mark.parametrize("copy_weights", [True, False])
def test_every_other_weight_is_inherited_unchanged(copy_weights):
    """Besides the convolutions (inflated) and the bias tables (duplicated along time), every weight —
    qkv, projections, MLPs, norms — equals the image model's: a copy with its own storage
    (copy_weights=True, so training the video model never changes the image model) or the very same
    tensor (copy_weights=False)."""
    image = image_model()
    video = VideoCoSwin.from_image_model(image, copy_weights=copy_weights)
    sd2, sd3 = image.state_dict(), video.state_dict()
    assert sd2.keys() == sd3.keys()  # the names line up key by key
    convs = {n for n, m in video.named_modules() if isinstance(m, torch.nn.Conv3d)}
    assert len(convs) == len(image.layers)  # the stem and the transitions
    inflated = {k for k in sd3 if k.rsplit(".", 1)[0] in convs or k.endswith("relative_position_bias_table")}
    for k in sd2:
        if k in inflated:
            assert sd3[k].data_ptr() != sd2[k].data_ptr()
            continue
        assert torch.equal(sd2[k], sd3[k]), k
        assert (sd2[k].data_ptr() == sd3[k].data_ptr()) == (not copy_weights), k
    assert not any(p.is_meta for p in video.parameters())
    with torch.no_grad():
        video.layers[0].blocks[0].mlp.fc1.weight.add_(1.0)
    same = torch.equal(image.layers[0].blocks[0].mlp.fc1.weight, video.layers[0].blocks[0].mlp.fc1.weight)
    assert same == (not copy_weights)


def test_from_image_model_copy_leaves_the_image_model_alone_in_training():
    image = image_model(torch.float32)
    before = {k: v.clone() for k, v in image.state_dict().items()}
    video = VideoCoSwin.from_image_model(image).train()
    opt = torch.optim.SGD(video.parameters(), lr=0.1)
    video(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in image.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# 3D windows, index, mask


def test_partition_reverse_round_trip_and_window_contents():
    x = torch.randn(2, 4, 6, 8, 3)
    ws = (2, 3, 4)
    w = window_partition3d(x, ws)
    assert w.shape == (2 * 2 * 2 * 2, 24, 3)
    assert torch.equal(window_reverse3d(w, ws, 4, 6, 8), x)
    # window k of clip b (row-major over the 2×2×2 grid) holds the block at (kt, kh, kw), (t, h, w) order
    for b in range(2):
        for k in range(8):
            kt, kh, kw = k // 4, (k // 2) % 2, k % 2
            block = x[b, 2 * kt:2 * kt + 2, 3 * kh:3 * kh + 3, 4 * kw:4 * kw + 4].reshape(24, 3)
            assert torch.equal(w[b * 8 + k], block)


def test_relative_position_index3d_matches_loops():
    for ws, tw in [((2, 3, 3), (2, 3, 3)), ((1, 2, 2), (2, 4, 4)), ((3, 2, 2), (3, 2, 2))]:
        idx = relative_position_index3d(ws, tw)
        pos = [(t, h, w) for t in range(ws[0]) for h in range(ws[1]) for w in range(ws[2])]
        for i, (ti, hi, wi) in enumerate(pos):
            for j, (tj, hj, wj) in enumerate(pos):
                row = (((ti - tj) + tw[0] - 1) * (2 * tw[1] - 1) + (hi - hj) + tw[1] - 1) * (2 * tw[2] - 1) \
                    + (wi - wj) + tw[2] - 1
                assert idx[i, j] == row
    assert relative_position_index3d((8, 7, 7)).max() == 15 * 13 * 13 - 1


def _orig_coords3d(padded, ws, shift):
    """For each (window, token) of the shifted, padded map: its (t, h, w) in the unshifted map."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in padded], indexing="ij"), -1)
    grid = torch.roll(grid, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    return window_partition3d(grid[None], ws)  # (nW, N, 3)


@pytest.mark.parametrize("size,ws,shift", [((4, 8, 8), (2, 4, 4), (1, 2, 2)), ((3, 7, 9), (2, 4, 4), (1, 2, 2)),
                                           ((5, 6, 6), (2, 3, 3), (1, 0, 0)), ((2, 5, 5), (2, 4, 4), (0, 2, 2)),
                                           ((3, 4, 4), (2, 4, 4), (0, 0, 0))])
def test_3d_mask_never_lets_a_token_attend_across_regions(size, ws, shift):
    """Reference from coordinates: a real query may attend exactly the real keys of its window that were
    within a window's reach in the *unshifted* clip (no wrap-around in t, h or w); the plain attention's
    probabilities are > 0 there and exactly 0 everywhere else (wrapped and padded tokens)."""
    torch.manual_seed(0)
    blk = vc.SwinBlock3D(8, 2, ws, shift, fused=False).eval()
    blk.attn.keep_attn = True
    blk(torch.randn(1, *size, 8))
    padded = [math.ceil(n / w) * w for n, w in zip(size, ws)]
    N = math.prod(ws)
    nW = math.prod(p // w for p, w in zip(padded, ws))
    probs = blk.attn.last_attn.view(nW, 2, N, N)
    coords = _orig_coords3d(padded, ws, shift)
    mask = shifted_window_mask3d(size, ws, shift)
    for w in range(nW):
        c = coords[w]
        real = (c[:, 0] < size[0]) & (c[:, 1] < size[1]) & (c[:, 2] < size[2])
        near = torch.ones(N, N, dtype=torch.bool)
        for d in range(3):
            near &= (c[:, None, d] - c[None, :, d]).abs() < ws[d]
        allowed = near & real[None, :]
        for q in range(N):
            if not real[q]:
                continue  # padded queries are cropped away
            p = probs[w, :, q]
            assert torch.all(p[:, ~allowed[q]] == 0)
            assert torch.all(p[:, allowed[q]] > 0)
            if mask is not None:
                assert torch.equal(mask[w, q] == 0, allowed[q])


def test_mask_is_none_when_nothing_needs_masking():
    assert shifted_window_mask3d((4, 8, 8), (2, 4, 4), (0, 0, 0)) is None
    assert shifted_window_mask3d((3, 8, 8), (2, 4, 4), (0, 0, 0)) is not None  # temporal padding


def test_windows_shrink_to_the_map_time_alone_and_space_by_coswins_rule():
    blk = vc.SwinBlock3D(8, 2, (4, 4, 4), (2, 2, 2))
    assert blk.window_and_shift(8, 16, 16) == ((4, 4, 4), (2, 2, 2))
    assert blk.window_and_shift(3, 16, 16) == ((3, 4, 4), (0, 2, 2))  # time shrinks, space keeps its shift
    assert blk.window_and_shift(8, 3, 9) == ((4, 3, 3), (2, 0, 0))  # as coswin.SwinBlock: min(H, W)
    blk2 = coswin.SwinBlock(8, 2, 4, 2)
    assert blk2.window_and_shift(3, 9) == (3, 0)


def test_default_temporal_merge_halves_time_at_the_first_two_transitions():
    assert vc.default_temporal_merge(4) == (2, 2, 1) and vc.default_temporal_merge(3) == (2, 2)
    assert vc.default_temporal_merge(2) == (2,)
    assert vc.PRESETS["tiny"].stage_temporal_merge() == (2, 2, 1)
    clip = torch.randn(1, 3, 8, 32, 32)
    for model in (vc.build("toy"), VideoCoSwin.from_image_model(coswin.build("toy"))):
        with torch.no_grad():
            maps = model.forward_features(clip)
        assert [m.shape[2] for m in maps] == [4, 2, 1, 1]  # T/K_t, then halved twice
        assert [l.downsample.proj.kernel_size[0] for l in model.layers[:-1]] == [2, 2, 1]
    with torch.no_grad():  # (1, 1, 1) (Video Swin's: time reduced by the tokenizer only) stays available
        maps = vc.build("toy", temporal_merge=(1, 1, 1)).forward_features(clip)
    assert [m.shape[2] for m in maps] == [4, 4, 4, 4]


def test_dynamic_window_sizes_default_and_override():
    cfg = vc.PRESETS["tiny"]
    assert cfg.stage_windows() == [(2, 7, 7), (4, 7, 7), (8, 7, 7), (8, 7, 7)]
    m = vc.build("toy", windows=((1, 2, 2), (2, 4, 4), (4, 4, 4), (4, 4, 4)))
    assert [l.blocks[1].window_size for l in m.layers] == [(1, 2, 2), (2, 4, 4), (4, 4, 4), (4, 4, 4)]
    assert [l.blocks[1].shift for l in m.layers] == [(0, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert m.layers[0].blocks[0].attn.relative_position_bias_table.shape == (1 * 3 * 3, 1)
    with pytest.raises(ValueError, match="one \\(Wt, Wh, Ww\\)"):
        vc.build("toy", windows=((2, 4, 4),))


# ---------------------------------------------------------------------------------------------------
# Training behaviour


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = vc.build("toy", depths=(2, 2, 2), num_heads=(1, 2, 4), temporal_merge=(1, 2), num_classes=5)
    model(torch.randn(2, 3, 8, 40, 40)).square().sum().backward()  # shifts active in every dimension
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_checkpointed_equals_plain():
    torch.manual_seed(0)
    model = vc.build("toy", drop_path_rate=0.0)
    x = torch.randn(2, 3, 6, 32, 32)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(l.grad_checkpointing for l in model.layers) and model.cfg.grad_checkpointing
    out2 = model(x)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    model = vc.build("toy").eval()
    x = torch.randn(1, 3, 8, 48, 40)
    with torch.no_grad():
        a = model(x)
        model.set_fused_attention(False)
        assert all(not m.fused for m in model.modules() if isinstance(m, WindowAttention3D))
        b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,H,W", [(5, 37, 45), (3, 17, 23), (9, 64, 33), (2, 4, 4)])
def test_odd_clip_sizes_run_and_match_the_grid(T, H, W):
    model = vc.build("toy", temporal_merge=(2, 1, 1)).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, T, H, W))
    h, w = (H + 4 - 7) // 4 + 1, (W + 4 - 7) // 4 + 1
    t = -(-T // 2)
    for i, m in enumerate(maps):
        assert m.shape == (1, 32 * 2 ** i, t, h, w) and torch.isfinite(m).all()
        h, w = (h + 1) // 2, (w + 1) // 2
        if i == 0:
            t = -(-t // 2)


def test_huge_preset_parameter_count_on_the_meta_device():
    """The inflated huge preset: CoSwin-H's 633.28M plus the longer stem kernel and the Δt rows of the
    bias tables; counted without allocating weights."""
    n = vc.count_params("huge")
    image = coswin.count_params("huge")
    heads, depths = (11, 22, 44, 88), (2, 2, 16, 2)
    extra_tables = sum(d * h * 13 * 13 * (2 * wt - 1 - 1) for d, h, wt in zip(depths, heads, (2, 4, 8, 8)))
    extra_stem = 3 * 352 * 7 * 7 * (2 - 1)
    # the first two patch mergings have temporal kernel 2 (default_temporal_merge): one more 3×3 slice each
    extra_merge = sum(c * 2 * c * 3 * 3 * (kt - 1) for c, kt in zip((352, 704, 1408), (2, 2, 1)))
    assert n == image + extra_tables + extra_stem + extra_merge
    with torch.device("meta"):
        inflated = VideoCoSwin.from_image_model(coswin.build("huge"), copy_weights=False)
    assert sum(p.numel() for p in inflated.parameters()) == n


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_fails_with_a_clear_message():
    model = vc.build("toy")
    with pytest.raises(ValueError, match="5-D clip batch"):
        model(torch.randn(2, 3, 32, 32))  # an image batch where a clip is expected
    with pytest.raises(ValueError, match="at least 2 frames"):
        model(torch.randn(2, 3, 1, 32, 32))  # too few frames for the temporal kernel
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 8, 3, 32, 32))  # (B, T, C, H, W) by mistake
    with pytest.raises(ValueError, match="embed='conv'"):
        VideoCoSwin.from_image_model(coswin.build("toy", embed="patch"))
    with pytest.raises(ValueError, match="temporal_merge"):
        vc.build("toy", temporal_merge=(1, 1))
