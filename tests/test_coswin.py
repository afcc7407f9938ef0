"""CoSwin (coswin.py): every mechanism checked against the math or against a reference computed another
way (loops over tokens; a functional re-statement of the official Swin forward)."""
import math

import pytest
import torch
import torch.nn.functional as F

import coswin
from coswin import (CoSwin, CoSwinConfig, SwinBlock, WindowAttention, load_swin_checkpoint,
                    relative_position_index, resize_window, shifted_window_mask, window_partition,
                    window_reverse)


def small_cfg(**kw):
    base = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, drop_path_rate=0.0)
    base.update(kw)
    return CoSwinConfig(**base)


# ---------------------------------------------------------------------------------------------------
# window helpers


def test_partition_reverse_round_trip_and_window_contents():
    x = torch.randn(2, 12, 8, 5)
    w = window_partition(x, 4)
    assert torch.equal(window_reverse(w, 4, 12, 8), x)
    # window k (row-major over the 3×2 grid of windows of image b) holds the 4×4 block at (k//2, k%2)
    for b in range(2):
        for k in range(6):
            i, j = divmod(k, 2)
            block = x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(16, 5)
            assert torch.equal(w[b * 6 + k], block)


def test_relative_position_index_matches_loops():
    for M, T in [(3, 3), (4, 4), (2, 4)]:
        idx = relative_position_index(M, T)
        for i in range(M * M):
            for j in range(M * M):
                dh = i // M - j // M
                dw = i % M - j % M
                assert idx[i, j] == (dh + T - 1) * (2 * T - 1) + (dw + T - 1)
    assert relative_position_index(7).max() == 13 * 13 - 1


def _orig_coords(Hp, Wp, M, s):
    """For each (window, token) of the shifted, padded map: the token's (h, w) in the unshifted map."""
    hh, ww = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    grid = torch.stack([hh, ww], -1)
    grid = torch.roll(grid, shifts=(-s, -s), dims=(0, 1))  # what sits at each rolled position
    return window_partition(grid[None], M)  # (nW, M², 2)


@pytest.mark.parametrize("H,W,M,s", [(8, 8, 4, 2), (11, 13, 4, 2), (14, 14, 7, 3), (9, 9, 3, 1)])
def test_mask_never_attends_across_regions(H, W, M, s):
    """Probabilities of the plain path are > 0 exactly for key tokens that are real and were within a
    window's reach of the query in the *unshifted* image, never for wrapped-around or padded tokens."""
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, M, s, fused=False).eval()
    blk.attn.keep_attn = True
    blk(torch.randn(1, H, W, 8))
    Hp, Wp = math.ceil(H / M) * M, math.ceil(W / M) * M
    nW = (Hp // M) * (Wp // M)
    probs = blk.attn.last_attn.view(1, nW, 2, M * M, M * M)[0]  # (nW, heads, N, N)
    coords = _orig_coords(Hp, Wp, M, s)
    for w in range(nW):
        c = coords[w]
        real = (c[:, 0] < H) & (c[:, 1] < W)
        near = ((c[:, None, 0] - c[None, :, 0]).abs() < M) & ((c[:, None, 1] - c[None, :, 1]).abs() < M)
        allowed = near & real[None, :]
        for q in range(M * M):
            if not real[q]:
                continue  # padded queries are cropped away
            p = probs[w, :, q]
            assert torch.all(p[:, ~allowed[q]] == 0)
            assert torch.all(p[:, allowed[q]] > 0)
            torch.testing.assert_close(p.sum(-1), torch.ones(2))


def test_mask_none_when_nothing_to_mask():
    assert shifted_window_mask(8, 8, 4, 0) is None
    m = shifted_window_mask(8, 8, 4, 2)
    assert m.shape == (4, 16, 16)
    assert torch.all(m[0] == 0)  # the top-left window has no wrapped-around tokens
    assert torch.isinf(m[3]).any()  # the bottom-right one mixes four regions


# ---------------------------------------------------------------------------------------------------
# attention and blocks


def _block_reference(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The Swin block written token by token from the paper's definition, without roll or padding:
    a query attends to the real tokens of its (shifted) window that were adjacent in the image."""
    B, H, W, C = x.shape
    M, s = blk.window_and_shift(H, W)
    Hp, Wp = math.ceil(H / M) * M, math.ceil(W / M) * M
    attn = blk.attn
    heads, d = attn.num_heads, C // attn.num_heads
    y = blk.norm1(x)
    qkv = attn.qkv(y).view(B, H, W, 3, heads, d)
    table = attn.relative_position_bias_table
    T = attn.window_size
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for h in range(H):
        for w in range(W):
            r, c = (h - s) % Hp, (w - s) % Wp  # position in the rolled frame
            keys = [(h2, w2) for h2 in range(H) for w2 in range(W)
                    if ((h2 - s) % Hp) // M == r // M and ((w2 - s) % Wp) // M == c // M
                    and (h2 < s) == (h < s) and (w2 < s) == (w < s)]
            q = qkv[:, h, w, 0]  # (B, heads, d)
            k = torch.stack([qkv[:, a, b, 1] for a, b in keys], 1)  # (B, n, heads, d)
            v = torch.stack([qkv[:, a, b, 2] for a, b in keys], 1)
            bias = torch.stack([table[(r - (a - s) % Hp + T - 1) * (2 * T - 1) + (c - (b - s) % Wp + T - 1)]
                                for a, b in keys])  # (n, heads)
            logits = torch.einsum("bhd,bnhd->bhn", q, k) * d ** -0.5 + bias.T[None]
            out[:, h, w] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), v).reshape(B, C)
    z = x + attn.proj(out)
    return z + blk.mlp(blk.norm2(z))


@pytest.mark.parametrize("H,W,shift", [(8, 8, 0), (8, 8, 2), (7, 10, 0), (11, 13, 2)])
@pytest.mark.parametrize("fused", [True, False])
def test_block_equals_token_loop_reference(H, W, shift, fused):
    torch.manual_seed(1)
    blk = SwinBlock(8, 2, 4, shift, fused=fused).double().eval()
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    with torch.no_grad():  # without a gradient to the bias the fused block runs SDPA on CPU too
        got = blk(x)
    torch.testing.assert_close(got, _block_reference(blk, x))


def test_fused_and_plain_paths_agree_on_whole_model():
    torch.manual_seed(0)
    m = coswin.build("toy").eval()
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        fused = m.forward_features(x)
    m.set_fused_attention(False)
    plain = m.forward_features(x)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# the fast paths against the reference paths (speed levers: docs/PERFORMANCE.md)


@pytest.mark.parametrize("Hp,Wp,M,s", [(8, 8, 4, 2), (12, 8, 4, 0), (14, 14, 7, 3), (9, 6, 3, 1)])
def test_window_order_is_roll_then_partition_and_its_inverse_undoes_both(Hp, Wp, M, s):
    blk = SwinBlock(5, 1, M, s)
    x = torch.randn(2, Hp, Wp, 5)
    order, inverse = blk.window_order(Hp, Wp, M, s, x.device)
    windows = x.reshape(2, Hp * Wp, 5).index_select(1, order).view(-1, M * M, 5)
    assert torch.equal(windows, window_partition(torch.roll(x, (-s, -s), (1, 2)), M))
    back = windows.reshape(2, Hp * Wp, 5).index_select(1, inverse).view(2, Hp, Wp, 5)
    assert torch.equal(back, x)
    assert torch.equal(torch.roll(window_reverse(windows, M, Hp, Wp), (s, s), (1, 2)), back)


def _step(module, x, seed=7):
    """Output and gradients (input first, then parameters by name) of one forward+backward."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    torch.manual_seed(seed)  # the same drop-path draws in both modules
    out = module(x)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {"input": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}


@pytest.mark.parametrize("H,W,shift", [(8, 8, 2), (7, 10, 0), (11, 13, 2), (4, 4, 2)])
def test_block_fast_paths_equal_the_reference_paths(H, W, shift):
    """The gathered windows and the attention dispatch (SDPA, or on CPU with a bias gradient the plain math)
    against torch.roll + window_partition and the plain math: float64, training with drop path (output and
    every gradient), and inference (SDPA)."""
    torch.manual_seed(0)
    fast = SwinBlock(8, 2, 4, shift, drop_path=0.3).double()
    ref = SwinBlock(8, 2, 4, shift, drop_path=0.3, fused=False).double()
    ref.load_state_dict(fast.state_dict())
    ref.gather_windows, ref.skip_dropped = False, False
    x = torch.randn(3, H, W, 8, dtype=torch.float64)
    (out_f, g_f), (out_r, g_r) = _step(fast, x), _step(ref, x)
    torch.testing.assert_close(out_f, out_r)
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], msg=n)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x))


def test_whole_model_fast_paths_equal_the_reference_paths_in_training():
    torch.manual_seed(0)
    fast = coswin.build("toy", drop_path_rate=0.2).double()
    ref = coswin.build("toy", drop_path_rate=0.2, fused_attn=False).double()
    ref.load_state_dict(fast.state_dict())
    for m in ref.modules():
        if isinstance(m, SwinBlock):
            m.gather_windows, m.skip_dropped = False, False
    x = torch.randn(4, 3, 61, 75, dtype=torch.float64)  # padded maps, shifted and unshifted blocks
    (out_f, g_f), (out_r, g_r) = _step(fast, x), _step(ref, x)
    torch.testing.assert_close(out_f, out_r)
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], msg=n)


@pytest.mark.parametrize("p", [0.5, 0.999])
def test_skipping_dropped_samples_equals_drop_path_on_the_whole_batch(p):
    """The branches run only on the samples DropPath keeps: the same draw gives the same output and the same
    gradients (to rounding: the matmuls see fewer rows); when every sample is dropped the branch's parameters get zeros, not None (DDP and
    AdamW see every parameter)."""
    torch.manual_seed(0)
    fast = SwinBlock(8, 2, 4, 2, drop_path=p).double()
    ref = SwinBlock(8, 2, 4, 2, drop_path=p).double()
    ref.load_state_dict(fast.state_dict())
    ref.skip_dropped = False
    x = torch.randn(6, 7, 10, 8, dtype=torch.float64)
    for seed in range(4):
        (out_f, g_f), (out_r, g_r) = _step(fast, x, seed), _step(ref, x, seed)
        torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
        for n in g_r:
            assert g_f[n] is not None, n
            torch.testing.assert_close(g_f[n], g_r[n], msg=n)
    kept = []
    for seed in range(20):  # the draws are DropPath's: about 1 − p of the samples are kept
        torch.manual_seed(seed)
        kept.append(float(fast.drop_path.train()(torch.ones(6, 1)).ne(0).float().mean()))
    assert abs(sum(kept) / len(kept) - (1 - p)) < 0.2


def test_fused_attention_runs_sdpa_unless_a_cpu_bias_needs_a_gradient(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    blk = SwinBlock(8, 2, 4, 2)
    x = torch.randn(1, 8, 8, 8)
    blk(x)  # training on CPU: SDPA would fall back to its unfused math, the plain math runs
    assert calls == []
    with torch.no_grad():
        blk(x)
    assert len(calls) == 1
    blk.requires_grad_(False)  # a frozen tower: no gradient for the bias, SDPA with autograd on
    blk(x)
    assert len(calls) == 2


def test_blocks_of_a_stage_share_one_cache_of_masks_and_token_orders():
    m = coswin.build("toy").eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 64))  # maps 16, 8, 4, 2 with window 4
    caches = [{id(b._mask_cache) for b in layer.blocks} for layer in m.layers]
    assert all(len(c) == 1 for c in caches) and len(set.union(*caches)) == len(m.layers)
    first = m.layers[0].blocks
    cpu = torch.device("cpu")
    assert first[1].attn_mask(16, 16, 4, 2, cpu) is first[0].attn_mask(16, 16, 4, 2, cpu)
    assert {k[0] for k in first[0]._mask_cache} == {"mask", "order"}


def test_shift_dropped_when_map_fits_in_window():
    torch.manual_seed(0)
    shifted = SwinBlock(8, 2, 4, 2).eval()
    plain = SwinBlock(8, 2, 4, 0).eval()
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 4, 4, 8)
    assert shifted.window_and_shift(4, 4) == (4, 0)
    torch.testing.assert_close(shifted(x), plain(x))
    # on a larger map the shift matters
    x = torch.randn(1, 8, 8, 8)
    assert not torch.allclose(shifted(x), plain(x))


def test_small_map_uses_centre_of_bias_table():
    """A 3×3 map with window 4: attention over the 3×3 window reads table rows for |Δ| ≤ 2."""
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, 4, 2).double().eval()
    x = torch.randn(1, 3, 5, 8, dtype=torch.float64)  # min side 3 ≤ 4: window 3, no shift
    torch.testing.assert_close(blk(x), _block_reference(blk, x))


def test_padding_does_not_change_real_tokens():
    """Real outputs are independent of what the padded positions hold: change the block's padding value
    (by patching F.pad inside coswin) and the real outputs stay the same."""
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, 4, 2).eval()
    x = torch.randn(1, 7, 10, 8)
    ref = blk(x)
    orig_pad = coswin.F.pad
    try:
        coswin.F.pad = lambda t, p, *a, **k: orig_pad(t, p, value=3.7) if t.dim() == 4 else orig_pad(t, p, *a, **k)
        changed = blk(x)
    finally:
        coswin.F.pad = orig_pad
    torch.testing.assert_close(ref, changed)


def test_odd_image_sizes_run_and_match_the_grid():
    m = coswin.build("toy").eval()
    maps = m.forward_features(torch.randn(1, 3, 97, 131))
    sizes = [tuple(f.shape[-2:]) for f in maps]
    h, w = (97 + 4 - 7) // 4 + 1, (131 + 4 - 7) // 4 + 1  # CvT stem 7/4/2
    expect = []
    for _ in range(4):
        expect.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2  # 3/2/1
    assert sizes == expect
    assert all(torch.isfinite(f).all() for f in maps)


# ---------------------------------------------------------------------------------------------------
# the model


def test_forward_is_pooled_final_map_and_head():
    torch.manual_seed(0)
    m = coswin.build("toy", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    last = m.forward_features(x)[-1]
    assert last.shape[1] == m.num_features
    torch.testing.assert_close(m(x), m.head(last.mean(dim=(2, 3))))
    # the final LayerNorm was applied: each token of the last map has ~zero mean over channels
    m.norm.weight.data.fill_(1.0), m.norm.bias.data.zero_()
    tok = m.forward_features(x)[-1].permute(0, 2, 3, 1)
    torch.testing.assert_close(tok.mean(-1), torch.zeros(tok.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("embed", ["conv", "patch"])
def test_every_parameter_gets_a_gradient(embed):
    torch.manual_seed(0)
    m = coswin.build("toy", embed=embed, num_classes=3)
    m(torch.randn(2, 3, 64, 64)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_matches_plain_with_drop_path():
    torch.manual_seed(0)
    m = coswin.build("toy", drop_path_rate=0.3)
    m.train()
    x = torch.randn(4, 3, 48, 48)

    def run(ckpt):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        torch.manual_seed(123)
        out = m(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    out0, g0 = run(False)
    out1, g1 = run(True)
    torch.testing.assert_close(out0, out1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=n)


def test_drop_path_rises_linearly():
    m = coswin.build("tiny", drop_path_rate=0.2)
    rates = [b.drop_path.p for layer in m.layers for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 12))


SWIN_PARAMS = {"tiny": 28.3e6, "small": 49.6e6, "base": 87.8e6, "large": 196.5e6}


@pytest.mark.parametrize("name", list(SWIN_PARAMS))
def test_swin_presets_match_published_parameter_counts(name):
    n = coswin.count_params(name, embed="patch", num_classes=1000)
    assert abs(n - SWIN_PARAMS[name]) < 0.05e6, n


def test_huge_is_within_3_percent_of_florence_and_counting_does_not_allocate():
    n = coswin.count_params("huge")
    assert abs(n - 637e6) / 637e6 < 0.03, n
    with torch.device("meta"):
        m = coswin.build("huge")
    assert all(p.is_meta for p in m.parameters())
    # CoSwin differs from Swin only by the embeddings: the conv stem and 3×3 transitions add parameters
    assert coswin.count_params("tiny") > coswin.count_params("tiny", embed="patch")


def test_conv_embedding_is_conv_then_layernorm():
    torch.manual_seed(0)
    m = coswin.build("toy")
    x = torch.randn(1, 3, 32, 40)
    emb = m.patch_embed
    y = F.conv2d(x, emb.proj.weight, emb.proj.bias, stride=4, padding=2).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), emb.norm.weight, emb.norm.bias)
    torch.testing.assert_close(emb(x), y)
    assert emb.proj.kernel_size == (7, 7) and m.layers[0].downsample.proj.kernel_size == (3, 3)


# ---------------------------------------------------------------------------------------------------
# window resize (224 → 384) and official checkpoints


def test_resize_window_keeps_constant_table_and_outputs_finite():
    torch.manual_seed(0)
    m = coswin.build("toy").eval()
    for mod in m.modules():
        if isinstance(mod, WindowAttention):
            mod.relative_position_bias_table.data.fill_(0.25)
    resize_window(m, 6)
    for mod in m.modules():
        if isinstance(mod, WindowAttention):
            t = mod.relative_position_bias_table
            assert t.shape[0] == 11 * 11
            torch.testing.assert_close(t, torch.full_like(t, 0.25))
    out = m.forward_features(torch.randn(1, 3, 96, 96))
    assert all(torch.isfinite(f).all() for f in out)
    assert m.layers[0].blocks[1].window_and_shift(24, 24) == (6, 3)


def test_resize_window_state_dict_equals_model_path():
    torch.manual_seed(0)
    a = coswin.build("toy").eval()
    sd = resize_window(a.state_dict(), 6)
    assert not any(k.endswith("relative_position_index") for k in sd)
    b = coswin.build("toy", window_size=6).eval()
    b.load_state_dict(sd)
    resize_window(a, 6)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(a(x), b(x))
    # a smooth table stays close to the function it samples
    t = torch.linspace(-1, 1, 7)
    grid = (t[:, None] ** 2 + t[None, :] ** 2).reshape(49, 1)
    big = coswin.resize_bias_table(grid, 7)  # 7×7 → 13×13
    assert big.shape == (169, 1) and abs(big.max() - 2.0) < 0.2 and big.min() < 0.1


def _official_swin_forward(sd, cfg, x):
    """The official Swin forward (microsoft/Swin-Transformer models/swin_transformer.py), restated
    functionally on an official-layout state dict: slice-built mask with −100, PatchMerging x0..x3."""
    def ln(t, p):
        return F.layer_norm(t, (t.shape[-1],), sd[p + ".weight"], sd[p + ".bias"])

    def lin(t, p, bias=True):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias") if bias else None)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm")  # (B, L, C)
    M0 = cfg.window_size
    for i, depth in enumerate(cfg.depths):
        heads = cfg.num_heads[i]
        M = min(M0, H, W)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            s = 0 if (j % 2 == 0 or min(H, W) <= M0) else M0 // 2
            shortcut = x
            y = ln(x, p + ".norm1").view(B, H, W, -1)
            if s:
                y = torch.roll(y, (-s, -s), (1, 2))
                img = torch.zeros(1, H, W, 1)
                cnt = 0
                for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
                    for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
                        img[:, hs, ws] = cnt
                        cnt += 1
                mw = window_partition(img, M).squeeze(-1)
                mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0
            else:
                mask = None
            win = window_partition(y, M)  # (B·nW, N, C)
            Bw, N, Cc = win.shape
            qkv = lin(win, p + ".attn.qkv").reshape(Bw, N, 3, heads, Cc // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (Cc // heads) ** -0.5, qkv[1], qkv[2]
            attn = q @ k.transpose(-2, -1)
            idx = sd[p + ".attn.relative_position_index"]
            bias = sd[p + ".attn.relative_position_bias_table"][idx.view(-1)].view(N, N, -1).permute(2, 0, 1)
            attn = attn + bias[None]
            if mask is not None:
                nW = mask.shape[0]
                attn = attn.view(Bw // nW, nW, heads, N, N) + mask[None, :, None]
                attn = attn.view(-1, heads, N, N)
            o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, Cc)
            o = window_reverse(lin(o, p + ".attn.proj"), M, H, W)
            if s:
                o = torch.roll(o, (s, s), (1, 2))
            x = shortcut + o.reshape(B, H * W, -1)
            h = F.gelu(lin(ln(x, p + ".norm2"), p + ".mlp.fc1"))
            x = x + lin(h, p + ".mlp.fc2")
        if i < len(cfg.depths) - 1:
            t = x.view(B, H, W, -1)
            t = torch.cat([t[:, 0::2, 0::2], t[:, 1::2, 0::2], t[:, 0::2, 1::2], t[:, 1::2, 1::2]], -1)
            H, W = H // 2, W // 2
            x = lin(ln(t.view(B, H * W, -1), f"layers.{i}.downsample.norm"), f"layers.{i}.downsample.reduction",
                    bias=False)
    x = ln(x, "norm").mean(1)
    return lin(x, "head")


def _official_layout(model):
    """Our state dict plus the buffers the official code stores, as an official checkpoint has them."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, WindowAttention):
            sd[name + ".relative_position_index"] = relative_position_index(mod.window_size)
    return sd


def test_official_swin_checkpoint_loads_and_computes_the_official_function(tmp_path):
    torch.manual_seed(0)
    cfg = CoSwinConfig(embed="patch", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7,
                       num_classes=10, drop_path_rate=0.0)
    src = CoSwin(cfg)
    for mod in src.modules():  # non-trivial biases and norms so the check has teeth
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear)) and mod.bias is not None:
            mod.bias.data.normal_(0, 0.1)
    sd = _official_layout(src)
    path = tmp_path / "swin_official.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    loaded = load_swin_checkpoint(str(path)).eval()  # config read off the checkpoint
    assert loaded.cfg.embed == "patch" and loaded.cfg.depths == (2, 2) and loaded.cfg.window_size == 7
    x = torch.randn(2, 3, 56, 56)
    ref = _official_swin_forward(sd, cfg, x)
    torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(src.eval()(x), ref, atol=1e-5, rtol=1e-4)


def test_load_swin_checkpoint_lists_mismatched_keys():
    torch.manual_seed(0)
    sd = _official_layout(CoSwin(small_cfg(embed="patch")))
    sd["layers.9.blocks.0.extra"] = torch.zeros(1)
    del sd["norm.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\].*unexpected keys \['layers.9"):
        load_swin_checkpoint(sd, model=CoSwin(small_cfg(embed="patch")))
    with pytest.raises(ValueError, match="does not exist"):
        load_swin_checkpoint("/nonexistent/swin.pth")


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("shape,what", [((3, 64, 64), "4-D"), ((1, 1, 64, 64), "3 channels"),
                                        ((1, 3, 3, 64), "at least 4")])
def test_bad_input_names_shapes(shape, what):
    m = coswin.build("toy")
    with pytest.raises(ValueError, match=what) as e:
        m(torch.randn(*shape))
    assert str(tuple(shape)) in str(e.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown CoSwin preset 'gigantic'"):
        coswin.build("gigantic")


def test_init_schemes_follow_their_definitions():
    # "swin": trunc-normal σ = .02 weights (cut at ±2, i.e. ±100σ, so σ is unchanged), zero biases.
    # "fan_in": PyTorch's Linear default, weights and biases uniform in ±1/√fan_in (σ = 1/√(3·fan_in)).
    torch.manual_seed(0)
    swin = coswin.build("tiny", init="swin")
    fc1 = swin.layers[2].blocks[0].mlp.fc1  # 384 → 1536
    assert abs(fc1.weight.std().item() - 0.02) < 0.001 and fc1.bias.abs().max().item() == 0.0
    fan = coswin.build("toy")  # the toy preset uses fan_in
    assert fan.cfg.init == "fan_in"
    for lin in (fan.layers[0].blocks[0].mlp.fc1, fan.layers[0].blocks[0].mlp.fc2, fan.layers[3].blocks[1].attn.qkv):
        bound = 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max().item() <= bound and lin.bias.abs().max().item() <= bound
        assert abs(lin.weight.std().item() * math.sqrt(3 * lin.in_features) - 1) < 0.1
    with pytest.raises(ValueError, match="init must be"):
        coswin.build("toy", init="xavier")


# ---------------------------------------------------------------------------------------------------
# stochastic depth and the bias-table resize, against independent computations


def test_drop_path_drops_whole_samples_at_rate_p_and_rescales_the_kept():
    """Training: each sample's branch is zeroed with probability p, the kept ones scaled by 1/(1−p), so
    the expectation is unchanged. A fixed-seed statistic over 20,000 samples lies within 4σ of p
    (σ = √(p(1−p)/n) ≈ 0.003). Eval mode and p = 0: the identity."""
    p, n = 0.25, 20_000
    dp = coswin.DropPath(p).train()
    x = torch.rand(n, 3, 4) + 0.5
    torch.manual_seed(0)
    y = dp(x)
    ratio = y / x  # (n, 3, 4): 0 or 1/(1−p), the same for every element of a sample
    per_sample = ratio.reshape(n, -1)
    torch.testing.assert_close(per_sample.min(1).values, per_sample.max(1).values)  # whole samples
    kept = per_sample[:, 0] > 0
    torch.testing.assert_close(per_sample[kept, 0], torch.full((int(kept.sum()),), 1 / (1 - p)))
    dropped = 1 - float(kept.float().mean())
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(float(y.mean() / x.mean()) - 1) < 0.02  # unbiased
    assert torch.equal(dp.eval()(x), x)
    assert torch.equal(coswin.DropPath(0.0).train()(x), x)


def _keys_bicubic_1d_weights(src: float, size: int):
    """Indices and weights of PyTorch's bicubic at source coordinate `src` (Keys' cubic convolution,
    A = −0.75; taps floor(src) − 1 … floor(src) + 2, clamped to the border)."""
    A = -0.75
    i0 = math.floor(src)
    t = src - i0
    w = []
    for k in range(-1, 3):
        d = abs(t - k)
        w.append(((A + 2) * d - (A + 3)) * d * d + 1 if d <= 1 else ((A * d - 5 * A) * d + 8 * A) * d - 4 * A)
    return [min(max(i0 + k, 0), size - 1) for k in range(-1, 3)], w


def _bicubic_reference(grid, new):
    """(S, S) → (new, new) with align_corners=False: output pixel o reads source (o + ½)·S/new − ½, loops."""
    S = len(grid)
    out = [[0.0] * new for _ in range(new)]
    for oy in range(new):
        iy, wy = _keys_bicubic_1d_weights((oy + 0.5) * S / new - 0.5, S)
        for ox in range(new):
            ix, wx = _keys_bicubic_1d_weights((ox + 0.5) * S / new - 0.5, S)
            out[oy][ox] = sum(wy[a] * wx[b] * grid[iy[a]][ix[b]] for a in range(4) for b in range(4))
    return out


@pytest.mark.parametrize("old,new", [(7, 12), (7, 6), (4, 7)])
def test_resize_bias_table_is_bicubic_per_head_as_the_official_swin_loader(old, new):
    """The (2M−1)×(2M−1) grid of each head is resized bicubically (align_corners=False), as
    microsoft/Swin-Transformer utils.py `load_pretrained` does for 224 → 384; checked against a loop
    transcription of Keys' cubic convolution, and against that loader's own tensor recipe."""
    heads, S, S2 = 3, 2 * old - 1, 2 * new - 1
    table = torch.randn(S * S, heads, dtype=torch.float64)
    got = coswin.resize_bias_table(table, new)
    assert got.shape == (S2 * S2, heads)
    for h in range(heads):
        grid = table[:, h].reshape(S, S).tolist()  # row (a) = Δy, column (b) = Δx
        want = torch.tensor(_bicubic_reference(grid, S2), dtype=torch.float64)
        torch.testing.assert_close(got[:, h].reshape(S2, S2), want, atol=1e-5, rtol=1e-5)  # float32 inside
    official = F.interpolate(table.permute(1, 0).reshape(1, heads, S, S), size=(S2, S2), mode="bicubic")
    torch.testing.assert_close(got, official.reshape(heads, S2 * S2).permute(1, 0), atol=1e-5, rtol=1e-5)
