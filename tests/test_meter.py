"""meter.py: co-attention really couples the streams (and only when on), both streams update in parallel,
padding changes nothing, soft scores / metric / VQA loss on hand-built cases, BERT's masking ratios over
many draws, ITM negatives, the paper's fusion size, a single batch is overfit; train.py's itm_mlm and vqa
tasks run end to end from a pretraining checkpoint."""
import math

import pytest
import torch

import coswin
import meter
import text_encoder
from data import ShapesVQA, collate_vqa

VOCAB = 300


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight the other jobs on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(cross_attention=True, num_answers=5, layers=2, seed=0):
    torch.manual_seed(seed)
    image = coswin.build("toy", embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
    text = text_encoder.build("toy", vocab_size=VOCAB, context_length=16, width=32, layers=1, heads=2, causal=False)
    m = meter.METER(image, text, hidden=32, layers=layers, heads=4, mlp_ratio=2.0, dropout=0.0, image_levels=(2, 3),
                    cross_attention=cross_attention, num_answers=num_answers)
    return m.eval()


def tokens_with_padding(B=3, L=16, real=(9, 5, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(real):
        t[b, 0], t[b, n - 1] = text_encoder.SOT_ID, text_encoder.EOT_ID
        t[b, 1:n - 1] = torch.randint(4, VOCAB, (n - 2,), generator=g)
    return t


# ----------------------------------------------------------------------------------------------------
# fusion


def test_cross_attention_makes_text_depend_on_the_image_and_not_when_disabled():
    images = torch.randn(2, 3, 32, 32)
    other = torch.randn(2, 3, 32, 32)
    tokens = tokens_with_padding(B=2, real=(9, 5))
    with torch.no_grad():
        on = tiny(cross_attention=True)
        a, b = on(images, tokens), on(other, tokens)
        assert (a["text"] - b["text"]).abs().max() > 1e-3  # text states see the image
        assert (a["pooled"][:, :32] - b["pooled"][:, :32]).abs().max() > 1e-4  # so does the text [CLS]
        off = tiny(cross_attention=False)
        a, b = off(images, tokens), off(other, tokens)
        torch.testing.assert_close(a["text"], b["text"], rtol=0, atol=1e-6)  # no path from image to text
        # ... and the image stream does not see the text either
        c = off(images, tokens_with_padding(B=2, real=(7, 11), seed=1))
        torch.testing.assert_close(a["image"], c["image"], rtol=0, atol=1e-6)


def test_padding_tokens_do_not_change_other_tokens_outputs():
    m = tiny()
    images = torch.randn(3, 3, 32, 32)
    real = (9, 5, 12)
    tokens = tokens_with_padding(B=3, L=12, real=real)
    mask = tokens != text_encoder.PAD_ID
    longer = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # 4 more pads
    junk = longer.clone()
    junk_mask = junk != text_encoder.PAD_ID
    junk[~junk_mask] = torch.randint(4, VOCAB, (int((~junk_mask).sum()),))  # garbage ids under the mask
    with torch.no_grad():
        ref = m(images, tokens, mask)
        for t, msk in ((longer, None), (junk, junk_mask)):
            out = m(images, t, msk)
            for b, n in enumerate(real):
                torch.testing.assert_close(out["text"][b, :n], ref["text"][b, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["image"], ref["image"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["vqa"], ref["vqa"], rtol=1e-5, atol=1e-5)
        # the check can fail: unmasking the junk changes the real tokens' states
        bad = m(images, junk, torch.ones_like(junk_mask))
        assert (bad["text"][0, :9] - ref["text"][0, :9]).abs().max() > 1e-3


def test_both_streams_update_in_parallel_from_the_previous_layer():
    m = tiny(layers=2)
    g = torch.Generator().manual_seed(3)
    x0, y0 = torch.randn(2, 7, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        x_out, y_out = m.fuse(x0, y0)
        x, y = x0 + m.type_embedding.weight[0], y0 + m.type_embedding.weight[1]
        for tl, il in zip(m.text_layers, m.image_layers):
            x, y = tl(x, y), il(y, x)  # the image layer reads the text state of the *previous* layer
        torch.testing.assert_close(x_out, x)
        torch.testing.assert_close(y_out, y)
        xs, ys = x0 + m.type_embedding.weight[0], y0 + m.type_embedding.weight[1]
        for tl, il in zip(m.text_layers, m.image_layers):  # a sequential update would differ
            xs = tl(xs, ys)
            ys = il(ys, xs)
        assert (ys - y_out).abs().max() > 1e-4


def test_co_attention_layer_is_post_ln_self_then_cross_then_ffn():
    torch.manual_seed(1)
    layer = meter.CoAttentionLayer(16, 2, mlp_ratio=2.0, dropout=0.0).eval()
    x, other = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    other_mask = torch.tensor([[True, True, False], [True, False, False]])

    def attn(a, q_in, kv_in, key_mask):  # plain per-head softmax attention written out
        q = a.q(q_in)
        k, v = a.kv(kv_in).chunk(2, dim=-1)
        h = a.heads
        d = q.shape[-1] // h
        outs = []
        for i in range(h):
            s = q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / math.sqrt(d)
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
            outs.append(s.softmax(-1) @ v[..., i * d:(i + 1) * d])
        return a.proj(torch.cat(outs, -1))

    with torch.no_grad():
        h = layer.ln_self(x + attn(layer.self_attn, x, x, None))
        h = layer.ln_cross(h + attn(layer.cross_attn, h, other, other_mask))
        h = layer.ln_ffn(h + layer.ffn(h))
        torch.testing.assert_close(layer(x, other, None, other_mask), h, rtol=1e-5, atol=1e-5)


def test_sincos_positions_are_row_major_image_coordinates():
    pe = meter.sincos_2d(2, 3, 2)  # (6, 8): [sin πu, sin 2πu, cos πu, cos 2πu, sin πv, sin 2πv, cos πv, cos 2πv]
    u, v = 0.25, 0.5  # token 1 = row 0, column 1: cell centre ((0 + ½)/2, (1 + ½)/3)
    ref = [math.sin(math.pi * u), math.sin(2 * math.pi * u), math.cos(math.pi * u), math.cos(2 * math.pi * u),
           math.sin(math.pi * v), math.sin(2 * math.pi * v), math.cos(math.pi * v), math.cos(2 * math.pi * v)]
    torch.testing.assert_close(pe[1], torch.tensor(ref))
    big = meter.sincos_2d(16, 16, meter.POS_FREQS)
    assert torch.cdist(big, big).add(torch.eye(256) * 9).min() > 0.1  # every cell of a 16 × 16 grid has its own code
    # the same image point gets the same code at every CoSwin stage: centre of the 1 × 1 grid = (½, ½)
    torch.testing.assert_close(meter.sincos_2d(1, 1, 3)[0], meter.sincos_2d(3, 3, 3)[4])


def test_a_causal_text_encoder_is_refused_with_a_clear_message():
    image = coswin.build("toy")
    with pytest.raises(ValueError, match="bidirectional.*causal=False"):
        meter.METER(image, text_encoder.build("toy"), hidden=32, layers=1, heads=2)


def test_paper_fusion_size_and_presets():
    # 6 co-attention layers per modality at hidden 768, 12 heads, FFN 3072 (paper §2.5)
    cfg = meter.PRESETS["florence"]
    assert (cfg.layers, cfg.hidden, cfg.heads, int(cfg.hidden * cfg.mlp_ratio)) == (6, 768, 12, 3072)
    with torch.device("meta"):
        m = meter.build("florence", coswin.build("toy"), text_encoder.build("toy", causal=False), num_answers=3129)
    fusion = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("text_layers", "image_layers")))
    assert fusion == meter.count_fusion_params(768, 6) == 113_421_312
    assert m.vqa_head[-1].out_features == 3129 and m.vqa_head[0].in_features == 1536  # two pooled 768s


# ----------------------------------------------------------------------------------------------------
# VQA targets, metric, loss


def test_soft_scores_and_metric_on_hand_built_cases():
    assert [meter.vqa_score(k) for k in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    vocab = {"yes": 0, "no": 1, "2": 2, "red": 3}
    s = meter.soft_target(["yes"] * 6 + ["no"] * 3 + ["maybe"], vocab)  # "maybe" is outside the vocabulary
    torch.testing.assert_close(s, torch.tensor([1.0, 0.9, 0.0, 0.0]))
    s = meter.soft_target(["2", "red", "red", "no"] + ["blue"] * 6, vocab)
    torch.testing.assert_close(s, torch.tensor([0.0, 0.3, 0.3, 0.6]))
    targets = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.3, 0.6], [0.0, 0.0, 0.0, 0.0]])
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0],  # picks "yes": 1.0
                           [0.0, 0.0, 5.0, 1.0],  # picks "2": 0.3
                           [9.0, 0.0, 0.0, 0.0]])  # every answer outside the vocabulary: 0
    torch.testing.assert_close(meter.vqa_metric(logits, targets), torch.tensor([1.0, 0.3, 0.0]))
    assert abs(float(meter.vqa_metric(logits, targets).mean()) - 1.3 / 3) < 1e-6


def test_vqa_loss_equals_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.6, 0.9, 0.0]])
    total = 0.0
    for b in range(2):
        for a in range(3):
            p = 1 / (1 + math.exp(-float(logits[b, a])))
            t = float(targets[b, a])
            total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    assert abs(float(meter.vqa_loss(logits, targets)) - total / 2) < 1e-5  # summed over answers, mean over batch


# ----------------------------------------------------------------------------------------------------
# MLM and ITM


def test_mlm_masking_ratios_over_many_draws():
    g = torch.Generator().manual_seed(0)
    chosen = masked_n = random_n = kept_n = real_n = 0
    for _ in range(20):
        t = tokens_with_padding(B=512, L=32, real=[int(n) for n in torch.randint(3, 33, (512,), generator=g)], seed=_)
        masked, labels = meter.mask_tokens(t, VOCAB, text_encoder.MASK_ID, prob=0.15, generator=g)
        real = t >= 4
        sel = labels != -100
        assert not bool((sel & ~real).any())  # <sot>, <eot>, <pad> are never chosen
        assert torch.equal(labels[sel], t[sel]) and torch.equal(masked[~sel], t[~sel])  # only chosen tokens change
        assert bool(((masked[sel] == text_encoder.MASK_ID) | (masked[sel] >= 4)).all())  # never a special id
        real_n += int(real.sum())
        chosen += int(sel.sum())
        masked_n += int((masked[sel] == text_encoder.MASK_ID).sum())
        kept_n += int((masked[sel] == t[sel]).sum())
        random_n += int(((masked[sel] != t[sel]) & (masked[sel] != text_encoder.MASK_ID)).sum())
    assert real_n > 100_000
    assert abs(chosen / real_n - 0.15) < 0.005
    assert abs(masked_n / chosen - 0.8) < 0.01
    assert abs(random_n / chosen - 0.1 * (1 - 1 / (VOCAB - 4))) < 0.008  # a random draw may hit the same id
    assert abs(kept_n / chosen - 0.1 * (1 + 1 / (VOCAB - 4))) < 0.008


def test_mlm_loss_only_on_chosen_positions():
    m = tiny()
    images = torch.randn(2, 3, 32, 32)
    t = tokens_with_padding(B=2, real=(9, 5))
    labels = torch.full_like(t, -100)
    labels[0, 3], labels[1, 2] = t[0, 3], t[1, 2]
    out = m(images, t, mlm_labels=labels)
    loss, _ = meter.mlm_loss(out["mlm"], labels)
    logits = m.mlm_head(out["text"])  # (B, L, V): every position, then pick the two chosen
    ref = (torch.nn.functional.cross_entropy(logits[0, 3:4], t[0, 3:4])
           + torch.nn.functional.cross_entropy(logits[1, 2:3], t[1, 2:3])) / 2
    torch.testing.assert_close(loss, ref)
    none = torch.full_like(t, -100)
    empty, acc = meter.mlm_loss(m(images, t, mlm_labels=none)["mlm"], none, out["text"])
    assert float(empty.detach()) == 0.0 and math.isnan(acc) and empty.requires_grad


def test_image_index_pairs_text_rows_with_images_in_one_pass():
    m = tiny()
    images = torch.randn(3, 3, 32, 32)
    t = tokens_with_padding(B=3, real=(9, 5, 12))
    idx = torch.tensor([2, 0, 0, 1])  # four text rows, three images
    t4 = torch.cat([t, t[:1]])
    with torch.no_grad():
        a = m(images, t4, image_index=idx)
        b = m(images[idx], t4)
    torch.testing.assert_close(a["pooled"], b["pooled"])
    torch.testing.assert_close(a["itm"], b["itm"])


def test_itm_mlm_loss_is_the_sum_of_both_objectives_in_one_forward():
    m = tiny().train()
    images = torch.randn(4, 3, 32, 32)
    t = tokens_with_padding(B=4, real=(9, 5, 12, 16))
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    loss, logs = meter.itm_mlm_loss(m, images, t, ["a", "b", "c", "d"], text_encoder.MASK_ID, VOCAB, prob=0.5)
    assert len(calls) == 1
    assert abs(float(loss.detach()) - logs["mlm_loss"] - logs["itm_loss"]) < 1e-5
    assert logs["mlm_loss"] > 0 and 0 <= logs["itm_accuracy"] <= 1
    loss.backward()
    assert m.itm_head.weight.grad.abs().sum() > 0 and m.mlm_head[0].weight.grad.abs().sum() > 0


def test_itm_pairs_swap_half_the_images_and_label_by_caption():
    texts = [f"caption {i}" for i in range(10)]
    texts[3] = texts[7] = "a red circle."  # a repeated caption: swapping these two is still a match
    g = torch.Generator().manual_seed(0)
    swapped_total = 0
    for _ in range(50):
        idx, label = meter.itm_pairs(texts, g)
        swapped = idx != torch.arange(10)
        assert int(swapped.sum()) == 5  # half the batch
        assert sorted(idx.tolist()) == list(range(10))  # every image used once
        swapped_total += int(swapped.sum())
        for b in range(10):
            assert int(label[b]) == int(texts[b] == texts[int(idx[b])])
    assert swapped_total == 250


# ----------------------------------------------------------------------------------------------------
# learning


def test_the_model_overfits_a_single_vqa_batch():
    ds = ShapesVQA("train", img_size=32, length=8)
    batch = collate_vqa([ds[i] for i in range(8)])
    tok = text_encoder.Tokenizer.train([ds.scene(i)["question"] for i in range(8)], 400)
    tokens = tok(batch["question"], 16)
    t = batch["target"]
    # with soft targets the BCE cannot reach 0: its floor is the targets' entropy, Σ_a H(s_ba), batch-averaged
    floor = float(-(t * t.clamp_min(1e-12).log() + (1 - t) * (1 - t).clamp_min(1e-12).log()).sum() / len(t))
    m = tiny(num_answers=len(ShapesVQA.answers)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = meter.vqa_loss(m(batch["image"], tokens)["vqa"], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    m.eval()
    with torch.no_grad():
        score = meter.vqa_metric(m(batch["image"], tokens)["vqa"], t).mean()
    assert losses[-1] - floor < 0.05 * (losses[0] - floor)
    assert abs(float(score) - float(t.max(dim=1).values.mean())) < 1e-6  # each question's best answer


def test_several_questions_per_image_are_one_row_each_and_share_one_image_pass():
    ds = ShapesVQA("train", img_size=32, length=6, questions=3)
    samples = [ds[i] for i in range(6)]
    samples[2] = None  # an unreadable sample is skipped and counted; the rows still name the right image
    batch = collate_vqa(samples)
    per = [1 + len(s["more_questions"]) for s in samples if s is not None]
    assert batch["skipped"] == 1 and len(batch["image"]) == 5 and len(batch["question"]) == sum(per)
    assert batch["image_index"].tolist() == [i for i, k in enumerate(per) for _ in range(k)]
    good = [s for s in samples if s is not None]
    rows = [q for s in good for q in [s, *s["more_questions"]]]
    assert batch["question"] == [q["question"] for q in rows] and batch["question_type"] == [q["question_type"] for q in rows]
    torch.testing.assert_close(batch["target"], torch.stack([q["target"] for q in rows]))
    # image_index: the same logits as repeating each image for each of its questions
    tok = text_encoder.Tokenizer.train(batch["question"], VOCAB)
    m = tiny(num_answers=len(ShapesVQA.answers)).eval()
    tokens = tok(batch["question"], 16)
    with torch.no_grad():
        shared = m(batch["image"], tokens, image_index=batch["image_index"])["vqa"]
        repeated = m(batch["image"][batch["image_index"]], tokens)["vqa"]
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)


def test_vqa_soft_scores():
    assert [meter.vqa_score(k) for k in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    t = meter.soft_target(["2"] * 7 + ["3", "3", "unknown"], {"2": 0, "3": 1, "4": 2})
    assert t.tolist() == pytest.approx([1.0, 0.6, 0.0])


def test_vqa_score_is_the_mean_over_leave_one_annotator_out_subsets():
    """The official VQA accuracy, computed here by brute force: ten annotators of whom k gave the answer;
    drop each annotator in turn and score min(1, matches among the other nine / 3); average the ten."""
    for k in range(11):
        answers = [1] * k + [0] * (10 - k)
        acc = sum(min(1.0, sum(answers[:i] + answers[i + 1:]) / 3) for i in range(10)) / 10
        assert meter.vqa_score(k) == pytest.approx(acc, abs=1e-12), k
        assert meter.vqa_score(k) == pytest.approx(round(acc, 1), abs=1e-12)  # the table's one decimal: exact
    assert meter.vqa_score(1) != pytest.approx(1 / 3)  # not min(1, k/3)


def test_image_pooler_averages_the_image_tokens_and_the_text_pooler_reads_the_first():
    """pooled = [tanh(W x_K[:, 0]); tanh(W' mean_j y_K[:, j])] (METER's poolers with image-token averaging
    for Swin backbones), recomputed from the fusion outputs."""
    m = tiny()
    with torch.no_grad():
        for pooler in (m.text_pooler, m.image_pooler):
            torch.nn.init.normal_(pooler.dense.weight, std=0.3)
    tokens = tokens_with_padding()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = m(images, tokens)
        x, y = out["text"], out["image"]
        want_text = torch.tanh(x[:, 0] @ m.text_pooler.dense.weight.T + m.text_pooler.dense.bias)
        want_image = torch.tanh(y.sum(1) / y.shape[1] @ m.image_pooler.dense.weight.T + m.image_pooler.dense.bias)
    H = x.shape[-1]
    assert y.shape[1] > 1
    torch.testing.assert_close(out["pooled"][:, :H], want_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pooled"][:, H:], want_image, atol=1e-5, rtol=1e-5)


def test_itm_pairs_swap_at_least_two_rows():
    g = torch.Generator().manual_seed(1)
    for B, swapped in ((1, 0), (2, 2), (3, 2), (5, 2), (7, 3)):
        idx, label = meter.itm_pairs([f"caption {i}" for i in range(B)], g)
        assert int((idx != torch.arange(B)).sum()) == swapped, B
        assert sorted(idx.tolist()) == list(range(B)) and label.tolist() == (idx == torch.arange(B)).long().tolist()
