"""Starting the towers from public weights: Swin checkpoints (official and timm layouts) into Swin and
CoSwin, CLIP's tokenizer, CLIP's text tower, and `train.py --init_image swin: --init_text clip:
--tokenizer clip:`. The weights cannot be downloaded here, so every file is written by the test in the
published layout (the published key names and shapes, random values); the ids and the text features are
checked against references derived by hand or re-stated from the published code."""
import gzip
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import coswin
import text_encoder
import unicl
from coswin import CoSwin, CoSwinConfig, WindowAttention, relative_position_index
from tasks.base import tokenizer_from_state
from text_encoder import ClipTokenizer, bytes_to_unicode, clip_clean, clip_pieces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# files in the published layouts


def _swin(embed_dim=16, depths=(2, 2), heads=(1, 2), window=7, classes=10, seed=0) -> CoSwin:
    """A random Swin (embed="patch") with non-trivial norms and biases, so every check has teeth."""
    torch.manual_seed(seed)
    m = CoSwin(CoSwinConfig(embed="patch", embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                            num_classes=classes, drop_path_rate=0.0))
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
            mod.bias.data.normal_(0, 0.1)
    return m.eval()


def official_layout(model: CoSwin) -> dict:
    """microsoft/Swin-Transformer's state dict: ours plus its stored index and mask buffers."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, WindowAttention):
            sd[name + ".relative_position_index"] = relative_position_index(mod.window_size)
        if isinstance(mod, coswin.SwinBlock) and mod.shift:
            sd[name + ".attn_mask"] = torch.zeros(4, mod.window_size ** 2, mod.window_size ** 2)
    return sd


def timm_layout(sd: dict) -> dict:
    """timm ≥ 0.9's names for the same tensors: the merge opens the next stage, the classifier is head.fc."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) + 1)
        elif k.startswith("head."):
            parts = ["head", "fc"] + parts[1:]
        out[".".join(parts)] = v
    return out


def write_clip_vocab(path, merges: list[str]):
    """CLIP's bpe_simple_vocab_16e6.txt.gz format: a version line, then one merge 'a b' per line."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(path)


def full_size_merges() -> list[str]:
    """48,894 distinct merges of two byte characters: CLIP's count, so the ids are CLIP's 49406 / 49407."""
    chars = list(bytes_to_unicode().values())
    return [f"{chars[i % 256]} {chars[i // 256]}" for i in range(48894)]


def clip_text_state_dict(vocab, width=64, layers=2, context=77, D=32, layout="openai", seed=0) -> dict:
    """A CLIP model's state dict as OpenAI CLIP / open_clip publish it (text tower, projection, temperature,
    a few image-tower keys and OpenAI's ints). layout="open_clip_custom": CustomTextCLIP's `text.` names
    with an nn.Linear projection."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(context, width, std=0.01)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(width, std=0.1), p + "ln_1.bias": r(width, std=0.1),
                   p + "attn.in_proj_weight": r(3 * width, width, std=width ** -0.5),
                   p + "attn.in_proj_bias": r(3 * width, std=0.1),
                   p + "attn.out_proj.weight": r(width, width, std=width ** -0.5), p + "attn.out_proj.bias": r(width),
                   p + "ln_2.weight": 1 + r(width, std=0.1), p + "ln_2.bias": r(width, std=0.1),
                   p + "mlp.c_fc.weight": r(4 * width, width, std=width ** -0.5), p + "mlp.c_fc.bias": r(4 * width),
                   p + "mlp.c_proj.weight": r(width, 4 * width, std=(4 * width) ** -0.5),
                   p + "mlp.c_proj.bias": r(width)})
    sd.update({"ln_final.weight": 1 + r(width, std=0.1), "ln_final.bias": r(width, std=0.1),
               "text_projection": r(width, D, std=width ** -0.5)})
    if layout == "open_clip_custom":
        sd = {"text." + k: v for k, v in sd.items()}
        sd["text.text_projection.weight"] = sd.pop("text.text_projection").t().contiguous()
    sd.update({"logit_scale": torch.tensor(math.log(100.0)), "visual.proj": r(48, D),
               "visual.conv1.weight": r(48, 3, 32, 32), "visual.class_embedding": r(48)})
    if layout == "openai":
        sd.update({"input_resolution": torch.tensor(224), "context_length": torch.tensor(context),
                   "vocab_size": torch.tensor(vocab)})
    return sd


def clip_encode_text(sd: dict, tokens: torch.Tensor, act: str = "quick_gelu") -> torch.Tensor:
    """openai/CLIP clip/model.py `encode_text` (before its L2 normalisation), re-stated functionally on
    the published state dict: token + positional embeddings, pre-LN resblocks with
    nn.MultiheadAttention's fused in_proj and an additive −inf causal mask, QuickGELU (or GELU), ln_final,
    the state at argmax(tokens) (<eot>, the largest id) times text_projection."""
    B, L = tokens.shape
    width = sd["token_embedding.weight"].shape[1]
    H = width // 64
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    mask = torch.full((L, L), float("-inf")).triu(1)
    gelu = (lambda t: t * torch.sigmoid(1.702 * t)) if act == "quick_gelu" else F.gelu

    def ln(t, p):
        return F.layer_norm(t, (width,), sd[p + ".weight"], sd[p + ".bias"])

    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:L]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.reshape(B, L, H, width // H).transpose(1, 2) for t in (q, k, v))
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(width // H) + mask).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(B, L, width)
        x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = ln(x, "ln_final")
    return x[torch.arange(B), tokens.argmax(dim=-1)] @ sd["text_projection"]


# a small vocabulary, written in CLIP's format; its ids derived by hand below
SMALL_MERGES = ["h e", "l l", "he ll", "hell o</w>", "w o", "r l", "wo rl", "worl d</w>", "' s</w>", "o r"]


@pytest.fixture
def small_vocab(tmp_path):
    return write_clip_vocab(tmp_path / "bpe_small.txt.gz", SMALL_MERGES)


# ---------------------------------------------------------------------------------------------------
# Swin → CoSwin


@pytest.mark.parametrize("H,W", [(64, 64), (60, 68), (63, 59)])  # ≡ 0 or 3 (mod 4): the grids agree
def test_conv_stem_holds_swins_patch_embedding_exactly(H, W):
    swin = _swin()
    co = coswin.build("toy", embed="conv", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7).eval()
    co.patch_embed.proj.weight.data = coswin.swin_patch_embed_to_conv(swin.patch_embed.proj.weight.data,
                                                                      co.patch_embed.proj)
    co.patch_embed.proj.bias.data = swin.patch_embed.proj.bias.data.clone()
    co.patch_embed.norm.load_state_dict(swin.patch_embed.norm.state_dict())
    w = co.patch_embed.proj.weight
    assert w[:, :, 2:6, 2:6].equal(swin.patch_embed.proj.weight) and w.abs().sum() == w[:, :, 2:6, 2:6].abs().sum()
    x = torch.randn(2, 3, H, W)
    torch.testing.assert_close(co.patch_embed(x), swin.patch_embed(x), atol=1e-5, rtol=1e-5)


def test_swin_checkpoint_into_coswin_reproduces_the_stem_and_stage_1_and_reports_every_key():
    swin = _swin()
    sd = official_layout(swin)
    co = coswin.build("toy", embed="conv", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7).eval()
    report = coswin.load_swin_weights({"model": sd}, co)
    x = torch.randn(2, 3, 56, 56)
    ours, theirs = co.forward_features(x), swin.forward_features(x)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)  # stem + stage-1 blocks: Swin's function
    assert not torch.allclose(ours[1], theirs[1], atol=1e-3)  # the merge's LayerNorm sits elsewhere (documented)
    assert set(report["converted"]) == {"patch_embed.proj.weight", "layers.0.downsample.proj.weight",
                                        "layers.0.downsample.proj.bias", "layers.0.downsample.norm.weight",
                                        "layers.0.downsample.norm.bias"}
    own = set(co.state_dict())
    assert set(report["loaded"]) | set(report["converted"]) == own and report["fresh"] == []
    buffers = {k for k in sd if k.endswith(("relative_position_index", "attn_mask"))}
    assert len(buffers) == 6 and set(report["ignored"]) == {"head.weight", "head.bias"} | buffers
    for k in report["loaded"]:  # blocks, norms, bias tables: as they are
        assert co.state_dict()[k].equal(sd[k])


@pytest.mark.parametrize("H", [8, 7])  # 7: the odd row and column are zero-padded on both sides alike
def test_merging_conv_folds_the_centring_and_gain_and_differs_only_by_the_per_token_scale(H):
    torch.manual_seed(1)
    C = 8
    swin_merge = coswin.PatchMerging(C, 2 * C)
    swin_merge.norm.weight.data.uniform_(0.5, 1.5)
    swin_merge.norm.bias.data.normal_(0, 0.3)
    conv_merge = coswin.ConvMerging(C, 2 * C)
    parts = coswin.swin_merging_to_conv(swin_merge.norm.weight, swin_merge.norm.bias, swin_merge.reduction.weight,
                                        conv_merge.proj)
    conv_merge.load_state_dict(parts)
    x = torch.randn(2, H, H, C)
    z = swin_merge(x)  # (B, ⌈H/2⌉, ⌈H/2⌉, 2C)
    xp = F.pad(x, (0, 0, 0, H % 2, 0, H % 2))
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    sigma = (cat.var(-1, unbiased=False, keepdim=True) + swin_merge.norm.eps).sqrt()
    Rb = swin_merge.reduction.weight @ swin_merge.norm.bias
    pre = conv_merge.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(pre / sigma + Rb, z, atol=1e-5, rtol=1e-5)  # the conv is exactly σ·(z − Rβ)
    zc = z - Rb
    s = parts["norm.weight"][0]
    expect = s * (zc - zc.mean(-1, keepdim=True)) / (zc.var(-1, unbiased=False, keepdim=True)
                                                     + conv_merge.norm.eps / sigma ** 2).sqrt() + Rb
    torch.testing.assert_close(conv_merge(x), expect, atol=1e-5, rtol=1e-4)
    A = (swin_merge.reduction.weight * swin_merge.norm.weight)
    A = A - A.mean(1, keepdim=True)
    torch.testing.assert_close(s, A.norm() / math.sqrt(2 * C))


def test_timm_layout_loads_the_same_function_as_the_official_one():
    swin = _swin()
    official = official_layout(swin)
    timm = timm_layout(official)
    assert "layers.1.downsample.reduction.weight" in timm and "head.fc.weight" in timm
    assert coswin.swin_layout(official) == "official" and coswin.swin_layout(timm) == "timm"
    assert coswin.swin_config_from_state_dict(timm) == coswin.swin_config_from_state_dict(official)
    headless = {k: v for k, v in timm.items() if not k.startswith("head.")}  # a timm backbone, num_classes=0
    assert coswin.swin_layout(headless) == "timm"
    x0 = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(coswin.load_swin_checkpoint(headless).eval().forward_features(x0)[-1],
                               swin.forward_features(x0)[-1])
    a = coswin.load_swin_checkpoint(official).eval()
    b = coswin.load_swin_checkpoint({"state_dict": {"module." + k: v for k, v in timm.items()}}).eval()
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(b(x), a(x))
    torch.testing.assert_close(b(x), swin(x))
    co_a = coswin.build("toy", embed="conv", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7,
                        num_classes=10).eval()
    co_b = coswin.build("toy", embed="conv", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7,
                        num_classes=10).eval()
    coswin.load_swin_weights(official, co_a)
    rep = coswin.load_swin_weights(timm, co_b)
    assert "head.weight" in rep["loaded"]  # a classifier of the model's size loads
    torch.testing.assert_close(co_b(x), co_a(x))


def test_a_224_checkpoint_into_a_384_model_resizes_the_bias_tables():
    sd = official_layout(_swin(window=7))
    co = coswin.build("toy", embed="conv", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=12)
    rep = coswin.load_swin_weights(sd, co)
    k = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert "window 7 → 12" in rep["converted"][k]
    torch.testing.assert_close(co.state_dict()[k], coswin.resize_bias_table(sd[k], 12))
    assert torch.isfinite(co(torch.randn(1, 3, 96, 96))).all()


def test_swin_size_mismatch_and_bad_files_say_what_to_do(tmp_path):
    sd = official_layout(_swin())
    with pytest.raises(ValueError, match=r"depths \(2, 2\).*depths \(2, 2, 2, 2\)"):
        coswin.load_swin_weights(sd, coswin.build("toy", embed="conv", embed_dim=16))
    with pytest.raises(ValueError, match="lacks 1 of the model's tensors"):
        coswin.load_swin_weights({k: v for k, v in sd.items() if k != "norm.weight"},
                                 coswin.build("toy", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7))
    with pytest.raises(ValueError, match="does not exist"):
        coswin.read_state_dict(str(tmp_path / "nope.pth"), "Swin checkpoint")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Swin checkpoint"):
        coswin.read_state_dict(str(tmp_path / "junk.pth"), "Swin checkpoint")
    ts = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    with pytest.raises(ValueError, match="TorchScript archive.*torch.jit.load"):
        coswin.read_state_dict(str(ts), "CLIP checkpoint")


def test_safetensors_files_are_read_without_the_package(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16)}
    names = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    out = coswin.read_state_dict(str(path))
    assert set(out) == set(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].equal(t)


# ---------------------------------------------------------------------------------------------------
# CLIP's tokenizer


def test_clip_tokenizer_gives_the_ids_derived_by_hand(small_vocab):
    tok = ClipTokenizer.from_vocab_file(small_vocab)
    # ids: 0–255 the byte characters in bytes_to_unicode order ('!' = 0 … '~' = 93: ASCII c → ord(c) − 33),
    # 256–511 the same + '</w>', 512 + r merge r, then <sot> 522 and <eot> 523
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (524, 522, 523, 0)
    # "Hello, World!" → "hello, world!" → hello | , | world | !
    #   h e l l o</w> → he (r0) → ll (r1) → hell (r2) → hello</w> (r3) = 515;  ,</w> = 11 + 256 = 267
    #   w o r l d</w> → wo (r4) → rl (r5) → worl (r6) → world</w> (r7) = 519;  !</w> = 0 + 256 = 256
    assert tok.encode("Hello, World!") == [515, 267, 519, 256]
    assert tok.encode("hell") == [512, 75, 331]  # he, l (108−33), l</w> (75+256): 'll' needs both without </w>
    assert tok.encode("it's") == [72, 339, 520]  # i, t</w> (83+256), 's</w> (r8): the contraction splits off
    # "world" holds (w,o) r4 and (o,r) r9 overlapping: the lower rank wins, so "o r" is never used
    assert tok.encode("or") == [78, 337] and tok.encode("ord") == [521, 323]  # o r</w> is not o r; or = 512 + 9
    assert tok.encode("2024") == [273, 271, 273, 275]  # one digit a piece: '2' = 17 + 256, '0' = 15 + 256 …
    assert tok.encode("café") == [66, 64, 69, 127, 358]  # é = bytes c3 a9 → 'Ã' (106 + 195−174), '©' (94+169−161)+256
    assert tok.encode("x <|endoftext|> y") == [87 + 256, 523, 88 + 256]  # a literal special is the special
    out = tok(["Hello, World!", "hell " * 40], context_length=77)
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert out[0, :6].tolist() == [522, 515, 267, 519, 256, 523] and (out[0, 6:] == 0).all()
    assert out[1, 0] == 522 and out[1, 76] == 523 and out[1, 1:76].tolist() == [512, 75, 331] * 25
    assert tok(["hello"], 77, trim=True).tolist() == [[522, 515, 523]]
    assert tok.decode(out[0]) == "hello , world ! "  # CLIP's decode: '</w>' → ' '


def test_clip_cleaning_follows_ftfy_html_whitespace_and_lower_case():
    assert clip_clean("  Hello\t\n  WORLD \u3000 ") == "hello world"
    assert clip_clean("&amp;lt;b&amp;gt; x") == "<b> x"
    assert clip_clean("&amp;amp;amp;lt;") == "<"  # ftfy unescapes to a fixed point, then html twice more
    assert clip_clean("a\xa0b\x0cc") == "a b c"  # no-break space and form feed are White_Space
    assert clip_clean("A &EACUTE; B") == "a é b"  # ftfy's upper-case entity names
    assert clip_clean("<p>&EACUTE;</p>") == "<p>&eacute;</p>"  # a line with '<': ftfy leaves its entities; html
    #                                                            is unescaped after it, but not the upper-case one
    assert clip_clean("ﬁne ﬂour") == "fine flour"  # Latin ligatures
    assert clip_clean("ＦＵＬＬ ｗｉｄｔｈ") == "full width"  # full-width forms
    assert clip_clean("“curly” ‘quotes’") == "\"curly\" 'quotes'"
    assert clip_clean("a\x00b\x1bc\ufeffd") == "abcd"  # control characters removed
    assert clip_clean("\x85 \x80") == "… €"  # C1 controls read as Windows-1252
    assert clip_clean("e\u0301") == "\u00e9"  # NFC
    assert clip_clean("a\x1cb") == "ab" and clip_clean("a\u180eb") == "a\u180eb"  # only White_Space is space


def test_clip_pre_split_follows_clips_pattern():
    assert clip_pieces("hello, world!") == ["hello", ",", "world", "!"]
    assert clip_pieces("don't we'll") == ["don", "'t", "we", "'ll"]
    assert clip_pieces("!'s ''s") == ["!'", "s", "''", "s"]  # a run of others swallows '; contractions start a match
    assert clip_pieces("x1.5kg") == ["x", "1", ".", "5", "kg"]
    assert clip_pieces("!<|endoftext|> <|startoftext|>x") == ["!<|", "endoftext", "|>", "<|startoftext|>", "x"]
    assert clip_pieces("日本語のテキスト") == ["日本語のテキスト"]
    assert clip_pieces("½²") == ["½", "²"]  # \p{N} is one character at a time
    assert clip_pieces("a\u0345b") == ["a", "b"]  # regex's IGNORECASE quirk: U+0345 is matched by nothing
    assert clip_pieces("'ſ") == ["'ſ"]  # … and long s is s in the contraction 's
    assert clip_pieces("a\x1cb c") == ["a", "\x1c", "b", "c"]  # \s is White_Space, not str.isspace()


def test_clip_vocabulary_of_clips_size_gives_clips_special_ids_and_the_state_rebuilds_it(tmp_path):
    path = write_clip_vocab(tmp_path / "bpe_simple_vocab_16e6.txt.gz", full_size_merges())
    tok = text_encoder.load_tokenizer("clip:" + path)
    assert isinstance(tok, ClipTokenizer)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, 49406, 49407)
    texts = ["a photo of a dog.", "Ünïcödé &amp; émoji 🐶", "x" * 200]
    ids = tok(texts, 77)
    # a checkpoint's task state: the merges (pairs of str) and the kind, no vocabulary file needed
    state = {"tokenizer_merges": [list(m) for m in tok.merges], "tokenizer_kind": "clip"}
    for sd in (state, {"tokenizer_merges": state["tokenizer_merges"]}):  # the kind is also read off the merges
        again = tokenizer_from_state(torch.load(_save(tmp_path, sd), weights_only=True))
        assert isinstance(again, ClipTokenizer) and again(texts, 77).equal(ids)
    tok.save(tmp_path / "tokenizer.json")
    assert text_encoder.Tokenizer.load(tmp_path / "tokenizer.json")(texts, 77).equal(ids)
    assert text_encoder.load_tokenizer(tmp_path / "tokenizer.json")(texts, 77).equal(ids)
    ours = text_encoder.Tokenizer.train(["a red circle"] * 4, 300)
    back = tokenizer_from_state({"tokenizer_merges": [list(m) for m in ours.merges]})
    assert isinstance(back, text_encoder.Tokenizer) and back.merges == ours.merges


def _save(tmp_path, obj):
    p = tmp_path / "state.pt"
    torch.save(obj, p)
    return p


def test_clip_vocabulary_errors_say_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="does not exist; download bpe_simple_vocab_16e6"):
        ClipTokenizer.from_vocab_file(tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2 is not a merge"):
        ClipTokenizer.from_vocab_file(bad)
    (tmp_path / "bin.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(ValueError, match="not a UTF-8 text or gzip"):
        ClipTokenizer.from_vocab_file(tmp_path / "bin.gz")
    tok = ClipTokenizer([("a", "b")])
    with pytest.raises(ValueError, match="no mask token"):
        tok.mask_id


# ---------------------------------------------------------------------------------------------------
# CLIP's text tower


def test_clip_text_tower_equals_clips_text_features(small_vocab):
    tok = ClipTokenizer.from_vocab_file(small_vocab)
    sd = clip_text_state_dict(tok.vocab_size, width=128, layers=2, D=48)  # 2 heads of 64
    tokens = tok(["Hello, World!", "it's a hell of a world", "2024", "x"], 77)
    enc, proj, report = text_encoder.load_clip_text(sd)
    assert enc.cfg.heads == 2 and enc.cfg.act == "quick_gelu" and (enc.cfg.pad_id, enc.cfg.eot_id) == (0, 523)
    with torch.no_grad():
        ours = enc.eval()(tokens) @ proj
        ref = clip_encode_text(sd, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert "blocks.1.attn.qkv.weight ← transformer.resblocks.1.attn.in_proj_weight" in report["loaded"]
    assert {"logit_scale", "visual.proj", "input_resolution"} <= set(report["ignored"])
    # the re-statement's attention is nn.MultiheadAttention's, as CLIP calls it
    mha = torch.nn.MultiheadAttention(128, 2)
    p = "transformer.resblocks.0."
    mha.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                         "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
    x = torch.randn(5, 1, 128)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    blk = enc.blocks[0].attn
    torch.testing.assert_close(blk(x.transpose(0, 1), None, True).transpose(0, 1),
                               mha(x, x, x, need_weights=False, attn_mask=mask)[0], atol=1e-5, rtol=1e-5)


def test_open_clip_custom_text_layout_with_gelu(small_vocab):
    tok = ClipTokenizer.from_vocab_file(small_vocab)
    sd = clip_text_state_dict(tok.vocab_size, width=64, layers=1, D=16, layout="open_clip_custom", seed=3)
    tokens = tok(["hello world", "it's"], 77)
    enc, proj, _ = text_encoder.load_clip_text({"state_dict": {"module." + k: v for k, v in sd.items()}}, act="gelu")
    plain = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    plain["text_projection"] = plain.pop("text_projection.weight").t()
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(tokens) @ proj, clip_encode_text(plain, tokens, act="gelu"),
                                   atol=1e-5, rtol=1e-5)
        quick = text_encoder.load_clip_text(sd, act="quick_gelu")[0].eval()(tokens) @ proj
    assert not torch.allclose(quick, enc(tokens) @ proj, atol=1e-4)  # the activation is not a detail


def test_vit_b_text_shapes_give_clip_base():
    with torch.device("meta"):  # the published ViT-B/32 text shapes, no memory
        sd = clip_text_state_dict(49408, width=512, layers=12, D=512)
    cfg, D = text_encoder.clip_text_config(sd)
    base = text_encoder.config("clip_base")
    assert (cfg.vocab_size, cfg.context_length, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio) == \
        (base.vocab_size, base.context_length, base.width, base.layers, base.heads, base.mlp_ratio) and D == 512
    assert (cfg.pad_id, cfg.eot_id, cfg.act) == (0, 49407, "quick_gelu")


def test_clip_text_layouts_that_are_not_clips_are_refused():
    sd = clip_text_state_dict(600, width=64, layers=1)
    with pytest.raises(ValueError, match="text keys this CLIP text transformer does not have.*ls_1"):
        text_encoder.load_clip_text({**sd, "transformer.resblocks.0.ls_1.gamma": torch.ones(64)})
    with pytest.raises(ValueError, match="does not look like a CLIP state dict"):
        text_encoder.load_clip_text({"a.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"does not fit the model at positional_embedding: checkpoint \(77, 64\)"):
        text_encoder.load_clip_text(sd, text_encoder.build("toy"))


# ---------------------------------------------------------------------------------------------------
# train.py --init_image swin:PATH --init_text clip:PATH --tokenizer clip:VOCAB


def _public_files(tmp_path, full_size=False):
    """A Swin checkpoint (official layout, {'model': …} as released) and a CLIP state dict, both written
    to disk, and CLIP's vocabulary file. full_size: Swin-T and CLIP ViT-B's text tower, the published shapes."""
    if full_size:
        swin = _swin(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), classes=1000)
        vocab = write_clip_vocab(tmp_path / "bpe_simple_vocab_16e6.txt.gz", full_size_merges())
        clip = clip_text_state_dict(49408, width=512, layers=12, D=512)
    else:
        swin = _swin(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 1, 2, 4), classes=1000)
        vocab = write_clip_vocab(tmp_path / "bpe_small.txt.gz", SMALL_MERGES)
        clip = clip_text_state_dict(524, width=64, layers=2, D=32)
    if full_size:
        clip = {k: v.half() if v.is_floating_point() else v for k, v in clip.items()}  # OpenAI's are float16
    torch.save({"model": official_layout(swin), "epoch": 300}, tmp_path / "swin.pth")
    torch.save(clip, tmp_path / "clip.bin")
    return str(tmp_path / "swin.pth"), str(tmp_path / "clip.bin"), vocab, swin, clip


def _train(tmp_path, *flags, timeout=600):
    cmd = [sys.executable, "train.py", "--out_dir", str(tmp_path / "runs"), "--progress", "false", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


SMALL_RUN = ["--preset", "tiny", "--max_steps", "2", "--batch_size", "4", "--img_size", "64", "--eval_size", "8",
             "--eval_every", "0", "--warmup_steps", "1", "--name", "pw"]


def test_public_towers_compute_swins_stage_1_and_clips_text_features():
    """What --init_image / --init_text build, without the loop: the tower shapes come from the files
    (--preset tiny's Swin-T and text tower give way), and the functions are Swin's and CLIP's."""
    import tempfile
    from pathlib import Path

    from tasks.pretrain import load_public_towers, public_towers_args, read_public_towers, towers_args
    from train import parse_config, resolved

    with tempfile.TemporaryDirectory() as d:
        swin_path, clip_path, vocab, swin, clip = _public_files(Path(d))
        cfg = resolved(parse_config(["--init_image", "swin:" + swin_path, "--init_text", "clip:" + clip_path,
                                     "--tokenizer", "clip:" + vocab] + SMALL_RUN))
        tok = ClipTokenizer.from_vocab_file(vocab)
        public = read_public_towers(cfg, tok)
    args = public_towers_args(towers_args(cfg, tok.vocab_size, tok), public)
    assert args["image_overrides"]["depths"] == (2, 2, 2, 2) and args["image_overrides"]["embed_dim"] == 16
    assert "window_size" not in args["image_overrides"]  # the window stays the preset's (or --window_size's)
    assert args["text"] == "clip_base" and args["vocab_size"] == 524 and args["embed_dim"] == 32
    assert args["text_overrides"] == {"width": 64, "layers": 2, "heads": 1, "act": "quick_gelu", "eot_id": 523}
    model = unicl.from_model_args(args).eval()
    report = load_public_towers(model, public)
    assert set(report["fresh"]) == {"image_proj.weight", "logit_scale"}
    assert set(report["fresh"]) | {k.split(" ←")[0] for k in report["loaded"]} | set(report["converted"]) == \
        set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.image_encoder.forward_features(x)[0], swin.forward_features(x)[0],
                               atol=1e-5, rtol=1e-5)
    tokens = tok(["hello world", "it's"], 77)
    with torch.no_grad():
        torch.testing.assert_close(model.text_proj(model.text_encoder(tokens)), clip_encode_text(clip, tokens),
                                   atol=1e-5, rtol=1e-5)


def test_clip_tokenizer_without_clip_weights_gives_a_fresh_text_tower_its_ids_and_init_from_carries_shapes():
    from tasks.pretrain import carry_towers, towers_args
    from train import parse_config, resolved

    tok = ClipTokenizer([tuple(m.split()) for m in SMALL_MERGES])
    cfg = resolved(parse_config(SMALL_RUN))
    args = towers_args(cfg, tok.vocab_size, tok)
    assert args["text_overrides"] == {"eot_id": 523}  # pads are 0 in both; <eot> is CLIP's
    model = unicl.from_model_args(args).eval()
    tokens = tok(["hello world", "it's"], 77)
    assert model.encode_text(tokens).shape == (2, args["embed_dim"])  # pools at CLIP's <eot>
    assert towers_args(cfg, 300)["text_overrides"] == {}  # our tokenizer: nothing changes
    # --init_from a run of the same preset whose towers public weights shaped: those shapes, this window
    theirs = {**args, "image_overrides": {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 4),
                                          "window_size": 7}, "text_overrides": {"width": 64, "eot_id": 523},
              "embed_dim": 32}
    ckpt = {"model_args": theirs, "config": json.dumps({"task": "pretrain", "preset": "tiny"})}
    mine = towers_args(resolved(parse_config(SMALL_RUN + ["--window_size", "12"])), tok.vocab_size, tok)
    got = carry_towers(mine, ckpt, "tiny")
    assert got["image_overrides"] == {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 4),
                                      "window_size": 12}
    assert got["text_overrides"] == {"width": 64, "eot_id": 523} and got["embed_dim"] == 32
    assert carry_towers(mine, ckpt, "base") == mine  # another preset: this run's own towers


def test_public_weight_flags_refuse_bad_combinations(tmp_path):
    from tasks.pretrain import read_public_towers
    from train import parse_config, resolved

    swin_path, clip_path, vocab, _, _ = _public_files(tmp_path)
    tok = ClipTokenizer.from_vocab_file(vocab)

    def refused(*flags, tokenizer=tok):
        with pytest.raises(SystemExit) as e:
            read_public_towers(resolved(parse_config(list(flags) + SMALL_RUN)), tokenizer)
        return str(e.value)

    assert "add --tokenizer clip:" in refused("--init_text", "clip:" + clip_path, tokenizer=text_encoder.Tokenizer())
    assert "--init_image takes swin:PATH" in refused("--init_image", "timm:" + swin_path)
    assert "--init_text takes clip:PATH or clip-gelu:PATH" in refused("--init_text", "open_clip:" + clip_path)
    assert "does not look like a Swin checkpoint" in refused("--init_image", "swin:" + clip_path)
    assert "does not exist" in refused("--init_image", "swin:" + str(tmp_path / "nope.pth"))
    small = write_clip_vocab(tmp_path / "two.txt.gz", SMALL_MERGES[:2])
    assert "524 token embeddings but --tokenizer" in refused("--init_text", "clip:" + clip_path,
                                                              tokenizer=ClipTokenizer.from_vocab_file(small))


@pytest.mark.slow
def test_train_py_starts_both_towers_from_public_files_and_adapters_get_clips_tokenizer(tmp_path):
    swin_path, clip_path, vocab, swin, clip = _public_files(tmp_path)
    p = _train(tmp_path, "--init_image", "swin:" + swin_path, "--init_text", "clip:" + clip_path,
               "--tokenizer", "clip:" + vocab, *SMALL_RUN)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "--init_image: Swin(C=16" in out and "its shape in place of --preset tiny (tiny)" in out
    assert "--init_text: CLIP text tower (width 64, 2 layers, 1 heads, vocab 524" in out
    assert "layers.*.downsample.proj.weight ×3: reduction · diag(LN γ)" in out
    fresh = next(line for line in out.splitlines() if line.startswith("  fresh"))
    assert fresh.startswith("  fresh (2): ") and {"image_proj.weight", "logit_scale"} == set(fresh[13:].split(", "))
    assert "swin:layers.*.blocks.*.attn.relative_position_index ×8" in out  # recomputed buffers, listed
    assert out.count("loaded as they are") == 1  # printed once
    from tasks.pretrain import load_pretrained

    ckpt = torch.load(tmp_path / "runs" / "pw" / "ckpt.pt", weights_only=True)
    assert ckpt["task"]["tokenizer_kind"] == "clip"
    model, tok, args, _ = load_pretrained(ckpt)  # how every adapter starts
    assert isinstance(tok, ClipTokenizer) and tok.vocab_size == 524
    assert args["image_overrides"]["embed_dim"] == 16 and args["text_overrides"]["act"] == "quick_gelu"
    assert args["embed_dim"] == 32 and model.text_encoder.cfg.eot_id == 523
    # after two steps the text tower is still close to CLIP's: its features, through Florence's projection
    tokens = tok(["a red circle", "hello, world!"], 77)
    with torch.no_grad():
        feats = model.eval().text_proj(model.text_encoder(tokens))
    assert torch.nn.functional.cosine_similarity(feats, clip_encode_text(clip, tokens)).min() > 0.9
    # a bad flag from the command line: one sentence, no traceback
    p = _train(tmp_path, "--init_image", "timm:" + swin_path, "--tokenizer", "clip:" + vocab, *SMALL_RUN[:-2],
               "--name", "bad")
    assert p.returncode != 0 and "--init_image takes swin:PATH" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_run_from_public_weights_resumes_without_the_files(tmp_path):
    from test_train import make_trainer

    swin_path, clip_path, vocab, _, _ = _public_files(tmp_path)
    flags = ["--init_image", "swin:" + swin_path, "--init_text", "clip:" + clip_path, "--tokenizer", "clip:" + vocab]
    t = make_trainer(tmp_path, *flags, *SMALL_RUN[:-2], name="res")
    t.fit()
    os.remove(swin_path)
    os.remove(clip_path)  # the towers' shapes travel in the task state; the weights in the checkpoint
    again = make_trainer(tmp_path, *flags, *SMALL_RUN[:-2], "--max_steps", "3", "--resume", "auto", name="res")
    assert again.step == 2 and again.task.model_args == t.task.model_args
    again.fit()
    assert again.step == 3


@pytest.mark.slow
def test_published_shapes_swin_t_and_clip_vit_b_text_give_preset_tiny_and_their_functions(tmp_path):
    """Swin-T (official layout, as released) and CLIP ViT-B/32's text tower in float16 (as OpenAI's weights
    are): --preset tiny's towers exactly, so model_args hold nothing but CLIP's activation and ids."""
    from tasks.pretrain import load_public_towers, public_towers_args, read_public_towers, towers_args
    from train import parse_config, resolved

    swin_path, clip_path, vocab, swin, clip = _public_files(tmp_path, full_size=True)
    cfg = resolved(parse_config(["--init_image", "swin:" + swin_path, "--init_text", "clip:" + clip_path,
                                 "--tokenizer", "clip:" + vocab] + SMALL_RUN))
    tok = text_encoder.load_tokenizer(cfg.tokenizer)
    public = read_public_towers(cfg, tok)
    args = public_towers_args(towers_args(cfg, tok.vocab_size, tok), public)
    assert args["image_overrides"] == {}  # Swin-T is CoSwin-T's shape
    assert args["text"] == "clip_base" and args["text_overrides"] == {"act": "quick_gelu", "eot_id": 49407}
    assert (args["vocab_size"], args["embed_dim"]) == (49408, 512)
    model = unicl.from_model_args(args).eval()
    load_public_towers(model, public)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder.forward_features(x)[0], swin.forward_features(x)[0],
                                   atol=1e-4, rtol=1e-4)
        tokens = tok(["a photo of a dog.", "a diagram"], 77)
        ref = clip_encode_text({k: v.float() for k, v in clip.items()}, tokens)
        torch.testing.assert_close(model.text_proj(model.text_encoder(tokens)), ref, atol=1e-5, rtol=1e-5)
