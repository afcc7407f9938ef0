"""Tokenizer (byte-level BPE) and TextEncoder (CLIP-style 12-layer transformer): behaviour and math."""
import json
import random

import pytest
import torch

import text_encoder
from text_encoder import EOT_ID, PAD_ID, SOT_ID, TextConfig, TextEncoder, Tokenizer

ODD_TEXTS = [
    "",
    "Hello, world!",
    "café naïve crème brûlée — Ångström",
    "e\u0301 (decomposed accent) and \u00e9",
    "你好，世界。東京タワー 서울",
    "emoji 🌍🚀👩‍👩‍👧 flag 🇯🇵",
    "tabs\tand\nnewlines  and   spaces ",
    "snake_case __dunder__ x=1+2*3; 3.14 1,000 ½ ²",
    "don't can't I'll we've they're",
]


def _corpus(n=3000, seed=0):
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "yellow", "purple", "black", "white"]
    shapes = ["circle", "square", "triangle", "star", "hexagon"]
    rels = ["above", "below", "left of", "right of", "next to"]
    return [f"a {rng.choice(['small', 'large'])} {rng.choice(colours)} {rng.choice(shapes)} "
            f"{rng.choice(rels)} a {rng.choice(colours)} {rng.choice(shapes)}" for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(_corpus(), 400)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_untrained_tokenizer_is_bytes_and_round_trips(text):
    tok = Tokenizer()
    ids = tok.encode(text)
    assert tok.vocab_size == 260
    assert ids == [4 + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_trained_tokenizer_round_trips_any_utf8(trained, text):
    assert trained.decode(trained.encode(text)) == text
    row = trained([text], context_length=200)[0]
    assert trained.decode(row) == text  # specials are skipped


def test_bpe_merges_follow_pair_counts():
    # words: "ab" ×1, " ab" ×2, " cd" ×1 → (a,b) occurs 3 times, then (" ", ab) twice
    tok = Tokenizer.train(["ab ab ab cd"], 300)
    a, b, space = 4 + ord("a"), 4 + ord("b"), 4 + ord(" ")
    assert tok.merges[0] == (a, b)
    assert tok.merges[1] == (space, 260)
    assert len(tok.merges) == 2  # every other pair occurs once (< min_frequency 2)
    assert tok.encode(" ab") == [261]


def test_bpe_training_is_deterministic_and_order_free(trained):
    corpus = _corpus()
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    again = Tokenizer.train(shuffled, 400)
    assert again.merges == trained.merges
    # it stopped early: every word of this small domain became one token, no pair is left to merge
    assert trained.vocab_size < 400
    words = {w for c in corpus[:50] for w in text_encoder._SPLIT.findall(c)}  # "a", " red", ...
    assert all(len(trained.encode(w)) == 1 for w in words)
    text = "a small red circle above a blue square"
    assert len(trained.encode(text)) < len(text.encode()) / 3  # it compresses the training domain


def test_call_pads_and_truncates_keeping_eot_last(trained):
    long_text = "a small red circle above a blue square " * 20
    short_text = "red"
    out = trained([long_text, short_text], context_length=16)
    assert out.dtype == torch.long and out.shape == (2, 16)
    assert out[0, 0] == SOT_ID and out[0, -1] == EOT_ID and (out[0] != PAD_ID).all()
    assert out[0, 1:-1].tolist() == trained.encode(long_text)[:14]
    n = len(trained.encode(short_text))
    assert out[1, : n + 2].tolist() == [SOT_ID] + trained.encode(short_text) + [EOT_ID]
    assert (out[1, n + 2:] == PAD_ID).all()
    assert trained("red", context_length=16).shape == (1, 16)


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == trained.merges and loaded.vocab_size == trained.vocab_size
    texts = _corpus(20, seed=5) + ODD_TEXTS
    assert torch.equal(loaded(texts, 40), trained(texts, 40))
    json.loads(path.read_text())  # plain JSON


def test_tokenizer_bad_input(tmp_path):
    tok = Tokenizer()
    with pytest.raises(ValueError, match="empty caption list"):
        tok([], 8)
    with pytest.raises(ValueError, match="context_length"):
        tok(["a"], 1)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a"], 100)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(tmp_path / "bad.json")


# ---------------------------------------------------------------- encoder


def _tiny(**kw):
    cfg = dict(vocab_size=300, context_length=12, width=32, layers=2, heads=4)
    cfg.update(kw)
    return TextEncoder(TextConfig(**cfg)).eval()


def _tokens(B=3, L=12, vocab=300, lengths=(12, 7, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.full((B, L), PAD_ID, dtype=torch.long)
    for b, n in enumerate(lengths):
        t[b, :n] = torch.randint(4, vocab, (n,), generator=g)
        t[b, 0], t[b, n - 1] = SOT_ID, EOT_ID
    return t


def test_param_counts_on_meta_device():
    # CLIP's text tower: 12·(12C² + 13C) + V·C + 77·C + 2C at C = 512, V = 49408
    C, V = 512, 49408
    assert text_encoder.count_params("clip_base") == 12 * (12 * C * C + 13 * C) + V * C + 77 * C + 2 * C
    assert abs(text_encoder.count_params("clip_base") / 63e6 - 1) < 0.01
    assert abs(text_encoder.count_params("florence") / 256e6 - 1) < 0.03
    assert text_encoder.PRESETS["florence"].layers == 12
    toy = text_encoder.build("toy")
    assert sum(p.numel() for p in toy.parameters()) == text_encoder.count_params("toy")
    assert toy.num_features == toy.cfg.width


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown text preset"):
        text_encoder.build("gigantic")
    with pytest.raises(ValueError, match="unknown TextConfig field"):
        text_encoder.build("toy", widht=64)


def test_causal_mask_earlier_states_ignore_later_tokens():
    model = _tiny()
    t = _tokens()
    t2 = t.clone()
    t2[:, 5] = (t2[:, 5] + 1 - 4) % 296 + 4  # change position 5 (a real token in row 0, 1)
    with torch.no_grad():
        a, b = model.forward_tokens(t), model.forward_tokens(t2)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:2, 5:] - b[:2, 5:]).abs().amax(dim=-1).min() > 1e-4  # every later state moves


def test_pooling_reads_the_eot_position():
    model = _tiny()
    t = _tokens(lengths=(12, 7, 4))
    with torch.no_grad():
        states, pooled = model.forward_tokens(t), model(t)
    torch.testing.assert_close(pooled, states[torch.arange(3), torch.tensor([11, 6, 3])])
    # causal: anything after <eot> (pads, or junk) cannot change the pooled feature
    t2 = t.clone()
    t2[1, 7:] = 5
    with torch.no_grad():
        torch.testing.assert_close(model(t2)[1], pooled[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="end-of-text"):
        model(torch.full((1, 4), 7))
    with pytest.raises(ValueError, match="context length"):
        model(torch.full((1, 13), EOT_ID))


def test_bidirectional_padding_mask():
    model = _tiny(causal=False)
    t = _tokens(lengths=(12, 7, 4))
    with torch.no_grad():
        full = model.forward_tokens(t)
        # 1) trailing pads are invisible: row 2 alone, cut to its 4 real tokens, gives the same states
        cut = model.forward_tokens(t[2:, :4])
        torch.testing.assert_close(full[2, :4], cut[0], rtol=0, atol=1e-5)
        # 2) with an explicit mask, whatever sits at a masked position does not matter
        mask = t != PAD_ID
        t2 = t.clone()
        t2[~mask] = 9
        torch.testing.assert_close(model.forward_tokens(t2, mask)[mask], full[mask], rtol=0, atol=1e-5)
        # 3) and it is bidirectional: a later real token changes earlier states
        t3 = t.clone()
        t3[0, 8] = t3[0, 8] % 295 + 5
        assert (model.forward_tokens(t3)[0, :8] - full[0, :8]).abs().max() > 1e-4


def _pooled_both_ways(model, t, mask=None):
    """model(t) by the last-block-at-<eot> path and by the full last block: outputs and every gradient."""
    out = []
    for at_eot in (True, False):
        model.zero_grad()
        model.last_block_at_eot = at_eot
        y = model(t, mask)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        out.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    model.last_block_at_eot = True
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_last_block_at_eot_equals_the_full_last_block(causal, explicit_mask):
    # forward runs its last block at <eot> alone (keys and values from every token): the pooled states and
    # every gradient must be those of the full last block read at <eot>, in float64 to rounding
    torch.manual_seed(0)
    model = _tiny(causal=causal, layers=3).double()
    t = _tokens(lengths=(12, 7, 4))
    mask = None
    if explicit_mask:  # a masked real token: the <eot> query must not see it either
        mask = t != PAD_ID
        mask[0, 3] = mask[1, 2] = False
    (fast, g_fast), (full, g_full) = _pooled_both_ways(model, t, mask)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-12)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # under activation checkpointing too, and with one block (the last is the only one)
    model.train().grad_checkpointing = True
    (ckpt, g_ckpt), _ = _pooled_both_ways(model, t, mask)
    torch.testing.assert_close(ckpt, full, rtol=0, atol=1e-12)
    for a, b in zip(g_ckpt, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    one = _tiny(causal=causal, layers=1).double()
    (fast, _), (full, _) = _pooled_both_ways(one, t, mask)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-12)


def test_last_block_at_eot_skips_the_work_it_does_not_need():
    # of the last block's 12·C² multiply-adds per token, only the key and value projections (2·C²) run for
    # every token; the rest runs for one token per row
    from torch.utils.flop_counter import FlopCounterMode
    model = _tiny(layers=2)
    t = _tokens(lengths=(12, 12, 12))
    counts = []
    for at_eot in (True, False):
        model.last_block_at_eot = at_eot
        with FlopCounterMode(display=False) as fc:
            model(t)
        counts.append(fc.get_total_flops())
    B, L, C = 3, 12, 32
    block = 2 * B * L * 12 * C * C  # one block's projections and MLP over all tokens, in FLOPs (SDPA uncounted)
    saved = 2 * B * (L - 1) * 10 * C * C  # the query, output projection and MLP of L − 1 tokens per row
    assert counts[1] == 2 * block and counts[0] == counts[1] - saved


def test_clip_init_scheme():
    torch.manual_seed(0)
    model = TextEncoder(TextConfig(vocab_size=512, width=256, layers=6, heads=4))
    w, n = 256, 6
    blk = model.blocks[0]
    for p, std in [(model.token_embedding.weight, 0.02), (model.positional_embedding, 0.01),
                   (blk.attn.qkv.weight, w ** -0.5), (blk.attn.proj.weight, w ** -0.5 * (2 * n) ** -0.5),
                   (blk.mlp.fc.weight, (2 * w) ** -0.5), (blk.mlp.proj.weight, w ** -0.5 * (2 * n) ** -0.5)]:
        assert abs(p.std().item() / std - 1) < 0.05
    assert all((b.attn.qkv.bias == 0).all() for b in model.blocks)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _tiny(dropout=0.1).train()
    t = _tokens()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        torch.manual_seed(1)
        model(t).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_toy_encoder_with_toy_tokenizer(trained):
    model = text_encoder.build("toy", vocab_size=trained.vocab_size)
    out = model(trained(_corpus(4), model.cfg.context_length))
    assert out.shape == (4, model.num_features) and torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [True, False])
def test_trimmed_tokens_give_the_same_embeddings(trained, causal):
    # Tokenizer(trim=True) pads only to the longest caption: the pooled <eot> states must not change (causal:
    # no token before <eot> sees a later pad; bidirectional: pads are masked keys), in values and gradients.
    texts = ["red", "a small red circle above a blue square", "a blue star", "green"]
    full, cut = trained(texts, 32), trained(texts, 32, trim=True)
    longest = max(len(trained.encode(t)) for t in texts) + 2
    assert cut.shape == (4, longest) and longest < 32 and torch.equal(full[:, :longest], cut)
    torch.manual_seed(0)
    model = text_encoder.build("toy", vocab_size=trained.vocab_size, causal=causal).double()  # float64: exact
    outs, grads = [], []
    for t in (full, cut):
        model.zero_grad()
        y = model(t)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(model.token_embedding.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)
    assert trained(texts, 4, trim=True).shape == (4, 4)  # never wider than the context
