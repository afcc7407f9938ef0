"""figures.py: every figure runs on toy models built here (no checkpoint), has its documented size and is
deterministic; the attention it draws is the attention the blocks compute; the mask figure's token grid is
`coswin.shifted_window_mask`; the Dynamic Head hooks read the values the block really used."""
import json
import math

import numpy as np
import pytest
import torch
from einops import rearrange

import coswin
import data
import dynamic_head as dh
import figures as fg
import meter
import text_encoder
import unicl
import video_coswin


@pytest.fixture(scope="module")
def toy():
    """A toy Florence (CoSwin-nano + toy text tower) with a byte-level tokenizer, random weights, eval mode;
    a toy detector, METER and inflated video model on its towers; a few held-out images and clips."""
    torch.manual_seed(0)
    tok = text_encoder.Tokenizer()
    florence = unicl.build("toy", vocab_size=tok.vocab_size).eval()
    det = dh.Detector.from_pretrained(florence, dh.build_config("toy"), "text").eval()
    det.set_classes(tok(["a photo of a red circle.", "a photo of a blue square."], 16))
    with torch.no_grad():  # offsets and masks away from their zero init, so the sampling points move
        for blk in det.dyhead.blocks:
            blk.offset.weight.normal_(0, 0.05)
            blk.offset.bias.normal_(0, 0.5)
            blk.task_attn.fc2.weight.normal_(0, 0.5)  # dynamic ReLU away from plain ReLU
    fusion = meter.from_pretrained(florence, "toy", num_answers=3, pretrain_heads=False).eval()
    ds = data.ShapesText("val", img_size=32, seed=0)
    images = torch.stack([ds[i]["image"] for i in range(2)])
    vds = data.MovingShapes("val", img_size=32, num_frames=8, seed=0)
    clips = torch.stack([vds[i]["video"] for i in range(2)])
    video = video_coswin.VideoCoSwin.from_image_model(florence.image_encoder, 2).eval()
    return dict(tok=tok, florence=florence, det=det, meter=fusion, images=images, labels=torch.tensor([0, 1]),
                clips=clips, video=video, big=torch.stack([data.ShapesText("val", img_size=64)[0]["image"]]))


def _twice(fn):
    """The figure twice: it must come out byte for byte the same."""
    a, b = fn(), fn()
    assert a.mode == "RGB" and a.size == b.size
    assert a.tobytes() == b.tobytes(), "the figure is not deterministic"
    return a


# ----------------------------------------------------------------------------------------------------
# Sizes and determinism of every figure


def test_coswin_figures_size_and_determinism(toy):
    img = _twice(lambda: fg.fig_window_partition(toy["big"][0], M=4, stride=4, tile=128))
    assert img.size == (3 * (128 + 16) + 16, 128 + 86)
    img = _twice(lambda: fg.fig_shift_mask(16, 16, 4, 2))
    cell = fg.mask_layout(4, 3)[1]
    assert img.size == (40 + 3 * (16 * cell + 60), 70 + 20 * 4 + 24 + 16 * cell + 40)
    enc = toy["florence"].image_encoder
    img = _twice(lambda: fg.fig_bias_tables(enc, size=40))
    heads, blocks = max(enc.cfg.num_heads), sum(enc.cfg.depths)
    assert img.size == (130 + 2 * heads * (40 + 8) + 30 + 70, 70 + blocks * (40 + 22))


def test_unicl_figures_size_and_determinism():
    texts = ["red circle", "a photo of a red circle.", "a blue square on the left", "blue square",
             "a blue square on the left"]
    img = _twice(lambda: fg.fig_unicl_targets(texts, cell=20))
    assert img.size == (260 + 2 * 5 * 20 + 150, 5 * 20 + 110)
    rows = [{"step": s, "tau": 14.3 + s / 10, "loss": 1.0} for s in range(0, 300, 10)] + [{"step": 5, "event": "eval"}]
    assert _twice(lambda: fg.fig_temperature(rows)).size == (720, 360)
    assert fg.fig_temperature([{"step": 1, "loss": 2.0}]).size == (720, 360)  # no tau logged: says so, same size


def test_zero_shot_figure_size_and_determinism(toy):
    names = ["red circle", "blue square", "green cross"]
    img = _twice(lambda: fg.fig_zero_shot_attention(toy["florence"], toy["tok"], toy["images"], names,
                                                    toy["labels"], tile=64))
    assert img.size == (4 * (64 + 8) + 80, 50 + 2 * (64 + 34))


def test_dyhead_figures_size_and_determinism(toy):
    det, images = toy["det"], toy["images"]
    L, blocks, C = len(det.strides), len(det.dyhead.blocks), det.cfg.channels
    img = _twice(lambda: fg.fig_scale_attention(det, images, tile=64))
    assert img.size == (64 + 24 + blocks * (3 * 34 + 70) + 60, 76 + 2 * (max(64, L * 34 + 14) + 24))
    img = _twice(lambda: fg.fig_deformable_points(det, images[0], (10.0, 20.0), tile=96))
    assert img.size == (L * (96 + 12) + 90, 60 + blocks * (96 + 24))
    img = _twice(lambda: fg.fig_dyrelu(det, images, channels=3))
    assert img.size == (max(220 + 6 * C, 40 + 170 * 3), 250 + blocks * (16 * L + 30))


def test_meter_figure_size_and_determinism(toy):
    qs = ["what colour is the circle?", "is there a red square?"]
    img = _twice(lambda: fg.fig_meter_cross_attention(toy["meter"], toy["tok"], toy["big"].expand(2, -1, -1, -1), qs,
                                                      ["yes", "no", "red"], words=5, tile=64))
    assert img.size == (6 * (64 + 6) + 80, 50 + 2 * (64 + 34))


def test_video_figures_size_and_determinism(toy):
    enc = toy["florence"].image_encoder
    img = _twice(lambda: fg.fig_static_clip(enc, toy["images"][0], tile=48))
    assert img.size == (5 * (48 + 8) + 300, 60 + len(enc.layers) * (48 + 20))
    img = _twice(lambda: fg.fig_frame_attention(toy["video"], toy["video"], toy["clips"], cell=30))
    # at 32² and 8 frames: stage 1 has 4 time steps, stage 2 two, stages 3-4 one → 4 blocks drawn, T1 = 4
    assert img.size == (220 + 4 * (4 * 30 + 24) + 70, 80 + 2 * (4 * 30 + 70))


# ----------------------------------------------------------------------------------------------------
# What the pictures show is what the code computes


@pytest.mark.parametrize("H,W,M,s", [(16, 16, 4, 2), (8, 12, 4, 2), (9, 9, 3, 1)])
def test_mask_figure_grid_equals_shifted_window_mask(H, W, M, s):
    """Every cell of every drawn N × N grid is white exactly where shifted_window_mask is 0."""
    img = np.asarray(fg.fig_shift_mask(H, W, M, s))
    mask = coswin.shifted_window_mask(H, W, M, s)
    nw = math.ceil(W / M)
    windows = [nw + 1 if mask.shape[0] > nw + 1 else 0, nw - 1, mask.shape[0] - 1]  # the documented default
    origins, cell = fg.mask_layout(M, len(windows))
    N = M * M
    c = np.arange(N) * cell + cell // 2
    for (x0, y0), w in zip(origins, windows):
        drawn = img[y0 + c][:, x0 + c, 0] == 255  # (N queries, N keys)
        assert (drawn == (mask[w] == 0).numpy()).all(), f"window {w}"


def test_mask_figure_shows_all_four_regions_of_the_corner_window():
    img = np.asarray(fg.fig_shift_mask(16, 16, 4, 2, windows=[15]))
    (x0, y0), cell = fg.mask_layout(4, 1)[0][0], fg.mask_layout(4, 1)[1]
    c = np.arange(16) * cell + cell // 2
    allowed = img[y0 + c][:, x0 + c, 0] == 255
    assert allowed.sum(1).tolist() == [4] * 16  # four regions of four tokens each: every query sees 4 keys
    assert allowed.sum() == 64


def test_unicl_figure_draws_one_over_positives():
    texts = ["red circle", "a photo of a red circle.", "two shapes: a big red circle", "a drawing of a red circle."]
    img = np.asarray(fg.fig_unicl_targets(texts, cell=20))
    keys = unicl.batch_labels(texts)
    pos = (keys[:, None] == keys[None, :]).float()
    target = (pos / pos.sum(1, keepdim=True)).numpy()
    assert target[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])  # a short text and its template prompts
    x0, y0 = 260, 70
    for i in range(4):
        for j in range(4):
            pixel = img[y0 + i * 20 + 1, x0 + j * 20 + 1]  # a cell's corner (its number is written further in)
            assert (pixel == fg.colours(target[i, j], 0.0, 1.0)).all()
    ident = img[y0 + 1 + 20 * np.arange(4)][:, 260 + 4 * 20 + 30 + 1 + 20 * np.arange(4)]
    assert (ident == fg.colours(np.eye(4), 0.0, 1.0)).all()  # CLIP's panel: the identity


def _window_inputs(block, x):
    """The windows (B·nW, N, C), nW, M and mask that `block` hands its attention, caught by a pre-hook."""
    got = {}
    h = block.attn.register_forward_pre_hook(lambda m, args: got.update(args=args))
    block(x)
    h.remove()
    return got["args"]


def _from_probabilities(attn_mod, windows, nW, probs):
    """proj(P v) with the module's own value projection: what the block outputs, given its probabilities."""
    v = rearrange(attn_mod.qkv(windows), "(b w) n (three h d) -> three b (w h) n d", w=nW, three=3,
                  h=attn_mod.num_heads)[2]
    return attn_mod.proj(rearrange(probs @ v, "b (w h) n d -> (b w) n (h d)", w=nW))


@pytest.mark.parametrize("video", [False, True])
def test_kept_window_attention_reproduces_the_fused_blocks(toy, video):
    """The probabilities kept for drawing, times the block's values, give the fused path's output; and the
    model's features inside `kept_window_attention` equal the normal (fused) forward's."""
    enc = toy["video"] if video else toy["florence"].image_encoder
    x = toy["clips"][:1] if video else toy["images"]
    block = enc.layers[0].blocks[1]  # a shifted block: the mask takes part
    assert block.attn.fused
    with torch.no_grad():
        normal = enc.forward_features(x)
        with fg.kept_window_attention(enc, [block]) as rec:
            kept = enc.forward_features(x)
        assert block.attn.fused and not block.attn.keep_attn and block.attn.last_attn is None  # flags restored
        for a, b in zip(normal, kept):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        feats = {}
        hook = block.register_forward_pre_hook(lambda m, args: feats.update(x=args[0]))
        enc.forward_features(x)
        hook.remove()
        windows, nW, M, mask = _window_inputs(block, feats["x"])
        fused = block.attn(windows, nW, M, mask)
        torch.testing.assert_close(_from_probabilities(block.attn, windows, nW, rec[block]["attn"]), fused,
                                   atol=1e-5, rtol=1e-5)
        assert rec[block]["shape"] == tuple(feats["x"].shape)


def test_attention_received_against_a_token_loop(toy):
    """Σ_q p(q → k) per image token, computed by walking every window slot with the block's roll written as
    coordinates (as tests/test_coswin.py's _orig_coords) instead of figures' index tensors."""
    enc = toy["florence"].image_encoder
    block = enc.layers[0].blocks[1]
    with torch.no_grad(), fg.kept_window_attention(enc, [block]) as rec:
        enc.forward_features(toy["images"])
    got = fg.attention_received(rec[block], block)  # (B, H, W)
    B, H, W, _ = rec[block]["shape"]
    M, s = block.window_and_shift(H, W)
    nW, N = (H // M) * (W // M), M * M
    probs = rec[block]["attn"].view(B, nW, -1, N, N).mean(2)
    want = torch.zeros(B, H, W)
    for w in range(nW):
        wr, wc = divmod(w, W // M)
        for k in range(N):
            r, c = divmod(k, M)
            h, ww = (wr * M + r + s) % H, (wc * M + c + s) % W  # the image token at this slot of the rolled map
            want[:, h, ww] += probs[:, w, :, k].sum(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum((1, 2)), torch.full((B,), float(H * W)))  # the average token receives 1


def test_frame_attention_of_a_static_clip_is_uniform_over_frames(toy):
    """Inflated bias tables do not depend on Δt and a static clip's tokens are equal in time, so inside a
    window every query spreads its attention equally over the window's time steps (W_3D = W_2D / K_t)."""
    enc = toy["video"]
    static = toy["clips"][:1, :, :1].expand(-1, -1, 8, -1, -1).contiguous()
    blocks = list(enc.layers[0].blocks)
    with torch.no_grad(), fg.kept_window_attention(enc, blocks) as rec:
        enc.forward_features(static)
    a0 = fg.frame_attention(rec[blocks[0]], blocks[0])  # windows of 2 time steps: (0, 1), (2, 3)
    half = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])
    torch.testing.assert_close(a0, half, atol=1e-5, rtol=0)
    a1 = fg.frame_attention(rec[blocks[1]], blocks[1])  # shifted by one step: (1, 2) together, 3 and 0 masked apart
    shifted = torch.tensor([[1., 0, 0, 0], [0, .5, .5, 0], [0, .5, .5, 0], [0, 0, 0, 1.]])
    torch.testing.assert_close(a1, shifted, atol=1e-5, rtol=0)


def test_frame_attention_against_a_token_loop(toy):
    """On moving clips (a matrix that is not symmetric): row t is the mean over the queries at time step t of
    the probability mass they give each time step, found by walking every window slot with the block's roll
    written as coordinates."""
    enc = video_coswin.VideoCoSwin.from_image_model(toy["florence"].image_encoder, 2).eval()
    block = enc.layers[0].blocks[1]  # shifted in time, height and width
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 2.0)  # a bias that tells Δt from −Δt
    with torch.no_grad(), fg.kept_window_attention(enc, [block]) as rec:
        enc.forward_features(toy["clips"])
    got = fg.frame_attention(rec[block], block)
    B, T, H, W, _ = rec[block]["shape"]
    ws, sh = block.window_and_shift(T, H, W)
    n = [T // ws[0], H // ws[1], W // ws[2]]
    N = ws[0] * ws[1] * ws[2]
    probs = rec[block]["attn"].view(B, -1, block.attn.num_heads, N, N).mean((0, 2))  # (nW, N, N)
    times = torch.zeros(probs.shape[:2], dtype=torch.long)
    for w in range(probs.shape[0]):
        wt = w // (n[1] * n[2])
        for slot in range(N):
            times[w, slot] = (wt * ws[0] + slot // (ws[1] * ws[2]) + sh[0]) % T  # the slot's time step, unrolled
    mass, count = torch.zeros(T, T), torch.zeros(T)
    for w in range(probs.shape[0]):
        for q in range(N):
            count[times[w, q]] += 1
            for k in range(N):
                mass[times[w, q], times[w, k]] += probs[w, q, k]
    torch.testing.assert_close(got, mass / count[:, None], atol=1e-5, rtol=1e-5)
    assert (got - got.T).abs().max() > 1e-3  # the check means something: this matrix is not symmetric


def test_a_freshly_inflated_model_is_blind_to_frame_order(toy):
    assert fg._temporal_kernel_spread(toy["video"]) == 0.0
    assert fg._order_gap(toy["video"], toy["clips"]) < 1e-5
    other = video_coswin.VideoCoSwin.from_image_model(toy["florence"].image_encoder, 2)
    with torch.no_grad():
        w = other.patch_embed.proj.weight  # one temporal offset differs (not by a constant: LayerNorm removes it)
        w[:, :, 0] += 0.05 * torch.randn_like(w[:, :, 0])
    assert fg._temporal_kernel_spread(other) > 0.01
    assert fg._order_gap(other.eval(), toy["clips"]) > 1e-3


def test_meter_keep_attn_is_the_same_function(toy):
    """METER with every attention on the written-out path (probabilities kept) gives the fused outputs, and the
    kept cross-attention probabilities times the values reproduce the layer's cross-attention output."""
    model, tok = toy["meter"], toy["tok"]
    tokens = tok(["what colour is the circle?", "is it red?"], 32, trim=True)  # padding in the second row
    images = toy["big"].expand(2, -1, -1, -1)
    attns = [m for m in model.modules() if isinstance(m, meter.Attention)]
    with torch.no_grad():
        normal = model(images, tokens)
        for m in attns:
            m.keep_attn = True
        try:
            got = {}
            cross = model.text_layers[-1].cross_attn
            h = cross.register_forward_pre_hook(lambda m, args: got.update(args=args))
            kept = model(images, tokens)
            h.remove()
        finally:
            for m in attns:
                m.keep_attn = False
        for k in ("text", "image", "vqa"):
            torch.testing.assert_close(kept[k], normal[k], atol=1e-5, rtol=1e-5)
        x, context = got["args"][:2]
        P = cross.last_attn  # (B, heads, L, N)
        assert torch.allclose(P.sum(-1), torch.ones(P.shape[:-1]))
        v = rearrange(cross.kv(context), "b l (two h d) -> two b h l d", two=2, h=cross.heads)[1]
        mine = cross.proj(rearrange(P @ v, "b h l d -> b l (h d)"))
        torch.testing.assert_close(mine, cross(x, context), atol=1e-5, rtol=1e-5)
        self_attn = model.text_layers[0].self_attn
        assert (self_attn.last_attn[1, :, :, tokens[1] == tok.pad_id] == 0).all()  # padded keys get nothing


def _bilinear(x, y, xx):
    """x: (C, H, W) sampled at (y, xx) with zeros outside (torchvision's bilinear_interpolate), by hand."""
    C, H, W = x.shape
    y0, x0 = math.floor(y), math.floor(xx)
    out = torch.zeros(C)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xq = y0 + dy, x0 + dx
            if 0 <= yy < H and 0 <= xq < W:
                out += x[:, yy, xq] * (1 - abs(y - yy)) * (1 - abs(xx - xq))
    return out


def test_dyhead_trace_reads_what_the_blocks_use(toy):
    """The sampling points decoded for drawing, read by hand-written bilinear sampling and modulated by Δm,
    give the block's own deformable conv at that location; the traced scale weights are the ScaleAttention of
    the real branch; the traced dynamic-ReLU coefficients reproduce the block's output."""
    det, images = toy["det"], toy["images"]
    records = fg.dyhead_trace(det, images)
    blk, rec = det.dyhead.blocks[0], records[0]
    assert len(records) == len(det.dyhead.blocks) and len(rec["sizes"]) == len(det.strides)
    lvl, b, (i, j) = 1, 1, (2, 1)
    x = rec["feats"][lvl]
    regular, deformed, m = fg.sampling_points(rec, lvl, b, i, j)
    assert (deformed - regular).abs().max() > 0.05  # the offsets really move the points in this test
    weight = blk.conv_same.weight  # (O, C, 3, 3)
    mine = blk.conv_same.bias.clone()
    for k in range(9):
        mine += weight[:, :, k // 3, k % 3] @ (_bilinear(x[b], float(deformed[k, 0]), float(deformed[k, 1])) * m[k])
    ref = dh.modulated_deform_conv2d(x, rec["offset"][lvl], rec["mask"][lvl], weight, blk.conv_same.bias, 1, 1)
    torch.testing.assert_close(mine, ref[b, :, i, j], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        used = {}  # what the block's deformable conv of level `lvl` really receives
        hk = blk.conv_same.register_forward_pre_hook(
            lambda mod, args: used.setdefault(args[0].shape[-2:], args))
        blk(rec["feats"])
        hk.remove()
        x_used, offset_used, mask_used = used[x.shape[-2:]]
        torch.testing.assert_close(rec["offset"][lvl], offset_used)
        torch.testing.assert_close(rec["mask"][lvl], mask_used)
        same = blk.conv_same(x_used, offset_used, mask_used)
        torch.testing.assert_close(rec["scale"][(lvl, lvl)], blk.scale_attn(same).flatten())
        assert set(rec["scale"]) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
        out = blk(rec["feats"])  # the block's output at each level = max of the two traced linear pieces
        nxt = records[1]["feats"]
        for level in range(len(out)):
            torch.testing.assert_close(nxt[level], out[level])
        pre = {}
        hk = blk.task_attn.register_forward_pre_hook(lambda mod, args: pre.setdefault(args[0].shape[-2:], args[0]))
        blk(rec["feats"])
        hk.remove()
        for level, (a1, b1, a2, b2) in rec["dyrelu"].items():
            z = pre[torch.Size(rec["sizes"][level])]
            a1, b1, a2, b2 = (c[..., None, None] for c in (a1, b1, a2, b2))
            y = torch.maximum(z * a1 + b1, z * a2 + b2)
            torch.testing.assert_close(y, out[level])


# ----------------------------------------------------------------------------------------------------
# The command


def test_command_draws_what_it_can_and_names_the_missing_runs(tmp_path, capsys):
    out = tmp_path / "figs"
    assert fg.main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["coswin_shift_mask.png", "coswin_windows.png", "unicl_targets.png"]
    for task, (folder, command) in fg.DEFAULT_RUNS.items():
        assert f"{folder}/ckpt.pt is missing; run `{command}` first" in said


def test_command_draws_the_pretraining_figures_from_a_checkpoint(tmp_path, capsys):
    """A pretraining checkpoint in train.py's layout (model, model_args, config, tokenizer) and its metrics:
    the command rebuilds the model through tasks.TASKS and draws its four figures, each under 200 KB."""
    tok = text_encoder.Tokenizer()
    cfg = unicl.config("toy", vocab_size=tok.vocab_size)
    model = unicl.build_from_config(cfg)
    run = tmp_path / "runs" / "pretrain-toy"
    run.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_args": unicl.model_args(cfg),
                "config": json.dumps({"task": "pretrain", "preset": "toy", "img_size": 32, "seed": 0}),
                "task": {"tokenizer_merges": []}}, run / "ckpt.pt")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tau": 14.3 + s}) + "\n" for s in range(5)))
    out = tmp_path / "figs"
    assert fg.main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    for name in ("coswin_bias_tables.png", "unicl_temperature.png", "zeroshot_attention.png", "video_static_clip.png"):
        assert name in names
    assert all(p.stat().st_size < 200_000 for p in out.iterdir())
    assert "pretrain-toy/ckpt.pt is missing" not in capsys.readouterr().out
