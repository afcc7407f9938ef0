"""UniCL (Florence §2.2): hash keys, the loss against references, distributed equivalence, Florence,
gradient cache, zero-shot classification and retrieval."""
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import text_encoder
import unicl
from unicl import (Florence, augment_short_caption, batch_labels, caption_key, class_key, gradcache_step,
                   retrieval_recall, unicl_loss, zero_shot_classifier)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _loop_reference(u, v, keys, tau):
    """The paper's L_i2t + L_t2i written with plain Python loops (each direction a mean over rows)."""
    B = len(keys)
    s = [[tau * float(u[i] @ v[j]) for j in range(B)] for i in range(B)]  # s[i][j] = τ u_iᵀ v_j
    l_i2t = l_t2i = 0.0
    for i in range(B):
        P = [k for k in range(B) if keys[k] == keys[i]]
        log_z_row = math.log(sum(math.exp(s[i][j]) for j in range(B)))
        l_i2t -= sum(s[i][k] - log_z_row for k in P) / len(P)
        log_z_col = math.log(sum(math.exp(s[j][i]) for j in range(B)))  # text i against all images
        l_t2i -= sum(s[k][i] - log_z_col for k in P) / len(P)
    return (l_i2t + l_t2i) / B


# ---------------------------------------------------------------- the loss


def test_distinct_keys_give_twice_clips_loss():
    u, v = _unit(8, 16, seed=1), _unit(8, 16, seed=2)
    keys = torch.arange(100, 108)
    tau = torch.tensor(1 / 0.07)
    logits = tau * u @ v.T
    target = torch.arange(8)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(unicl_loss(u, v, keys, tau), 2 * clip)


def test_repeated_keys_match_the_loop_reference():
    u, v = _unit(9, 6, dtype=torch.float64, seed=3), _unit(9, 6, dtype=torch.float64, seed=4)
    keys = torch.tensor([5, 1, 5, 7, 1, 5, 9, 2, 7])
    for tau in (1.0, 10.0, 100.0):
        got = unicl_loss(u, v, keys, tau)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(_loop_reference(u, v, keys.tolist(), tau), rel=1e-10)


def test_all_same_key_and_single_pair():
    u, v = _unit(4, 5, dtype=torch.float64), _unit(4, 5, dtype=torch.float64, seed=1)
    keys = torch.full((4,), 3)
    assert unicl_loss(u, v, keys, 5.0).item() == pytest.approx(_loop_reference(u, v, [3] * 4, 5.0))
    assert unicl_loss(u[:1], v[:1], keys[:1], 5.0).item() == pytest.approx(0.0, abs=1e-12)


def test_invariant_to_permuting_the_batch():
    u, v = _unit(12, 8, seed=5), _unit(12, 8, seed=6)
    keys = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5, 0, 6, 7, 3])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unicl_loss(u, v, keys, 20.0), unicl_loss(u[perm], v[perm], keys[perm], 20.0))


def test_single_process_loss_transposes_its_one_logits_matmul_and_equals_two_matmuls():
    """One process: τ v uᵀ is (τ u vᵀ)ᵀ, so the loss runs one (b, D)×(D, b) matmul; value and gradients
    equal the two-matmul formulation (repeated keys, u ≠ v)."""
    from torch.utils.flop_counter import FlopCounterMode

    keys = torch.tensor([3, 1, 3, 0, 1, 2, 3])
    b, D = len(keys), 5

    def run(loss_fn):
        u = _unit(b, D, dtype=torch.float64, seed=21).requires_grad_()
        v = _unit(b, D, dtype=torch.float64, seed=22).requires_grad_()
        tau = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(u, v, tau)
        loss.backward()
        return loss.detach(), u.grad, v.grad, tau.grad

    def two_matmuls(u, v, tau):
        positive = (keys[:, None] == keys[None, :]).double()
        target = positive / positive.sum(1, keepdim=True)
        l_i2t = -(target * (tau * u @ v.T).log_softmax(1)).sum(1)
        l_t2i = -(target * (tau * v @ u.T).log_softmax(1)).sum(1)
        return (l_i2t + l_t2i).mean()

    for got, want in zip(run(lambda u, v, tau: unicl_loss(u, v, keys, tau)), run(two_matmuls)):
        torch.testing.assert_close(got, want)
    u, v = _unit(b, D, seed=1), _unit(b, D, seed=2)
    with FlopCounterMode(display=False) as counter:
        unicl_loss(u, v, keys, 7.0)
    assert counter.get_total_flops() == 2 * b * b * D  # one matmul


def test_gradcheck_float64():
    u = _unit(5, 4, dtype=torch.float64, seed=7).requires_grad_()
    v = _unit(5, 4, dtype=torch.float64, seed=8).requires_grad_()
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([1, 2, 1, 3, 2])
    assert torch.autograd.gradcheck(lambda a, b, s: unicl_loss(a, b, keys, s), (u, v, tau))


def test_low_precision_inputs_are_computed_in_float32():
    u, v = _unit(6, 8, seed=9), _unit(6, 8, seed=10)
    keys = torch.tensor([0, 1, 0, 2, 3, 1])
    got = unicl_loss(u.bfloat16(), v.bfloat16(), keys, 14.0)
    assert got.dtype == torch.float32
    ref = unicl_loss(u.bfloat16().float(), v.bfloat16().float(), keys, 14.0)
    torch.testing.assert_close(got, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would run the logits matmul in bf16
        torch.testing.assert_close(unicl_loss(u, v, keys, 14.0), unicl_loss(u.double(), v.double(), keys,
                                                                            14.0).float())


def test_loss_bad_input():
    u, v = _unit(4, 3), _unit(4, 3, seed=1)
    with pytest.raises(ValueError, match="4 embeddings but 3 keys"):
        unicl_loss(u, v, torch.arange(3), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        unicl_loss(u, v, torch.arange(4).view(2, 2), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        unicl_loss(u, v, [0, 1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="same shape"):
        unicl_loss(u, v[:3], torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="empty batch"):
        unicl_loss(u[:0], v[:0], torch.arange(0), 1.0)


# ---------------------------------------------------------------- keys


_PROBE = "print(__import__('unicl').caption_key('A photo of  a Dog'), hash('a photo of a dog'))"


def test_caption_key_is_stable_across_processes():
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT))
             for seed in ("0", "1")]  # run side by side: each pays torch's import
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o[0] for o in outs}) == 1  # our key: one value
    assert len({o[1] for o in outs}) > 1  # Python's hash: salted, differs (why we never use it)
    assert int(outs[0][0]) == caption_key("a photo of a dog")
    # pinned: BLAKE2b-64 (person "florence-captn") of the normalised text, top two bits cleared
    assert caption_key("a photo of a dog") == 3904898677138342196


def test_caption_key_normalisation():
    assert caption_key("  A photo\tof a\n DOG ") == caption_key("a photo of a dog")
    assert caption_key("caf\u00e9") == caption_key("cafe\u0301")  # NFC
    assert caption_key("a photo of a dog") != caption_key("a photo of a cat")
    with pytest.raises(ValueError, match="empty after normalisation"):
        caption_key(" \t\n ")
    with pytest.raises(ValueError, match="must be a str"):
        caption_key(None)


def test_class_keys_are_disjoint_from_caption_keys():
    caps = [caption_key(f"caption number {i}") for i in range(2000)] + [caption_key(str(i)) for i in range(100)]
    classes = [class_key(i) for i in range(2000)] + [class_key(str(i)) for i in range(100)] + [class_key("dog")]
    assert all(0 <= k < 2 ** 62 for k in caps) and not any(unicl.is_class_key(k) for k in caps)
    assert all(2 ** 62 <= k < 2 ** 63 for k in classes) and all(unicl.is_class_key(k) for k in classes)
    assert class_key("dog") != caption_key("dog") and class_key(0) != caption_key("0")
    assert class_key(" Dog ") == class_key("dog") and class_key(7) == class_key(7)
    with pytest.raises(ValueError, match="class_id"):
        class_key(-1)


def test_batch_labels():
    keys = batch_labels(["a dog", "A  DOG", "a cat", class_key(3)])
    assert keys.dtype == torch.long and keys.shape == (4,)
    assert keys[0] == keys[1] != keys[2] and keys[3] == class_key(3)
    assert torch.equal(batch_labels(keys), keys)
    with pytest.raises(ValueError, match="empty caption list"):
        batch_labels([])
    with pytest.raises(ValueError, match="empty after normalisation"):
        batch_labels(["a dog", "   "])
    with pytest.raises(ValueError, match="1-D"):
        batch_labels(torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------- prompts


def test_short_caption_augmentation_and_stage2_filter():
    rng = random.Random(0)
    out = [augment_short_caption(t, rng) for t in ["dog", "golden retriever", "a dog on the grass"]]
    assert out[0][1] and out[1][1] and not out[2][1]
    assert out[2][0] == "a dog on the grass"
    assert any(out[0][0] == t.format("dog") for t in unicl.TEMPLATES)
    assert any(out[1][0] == t.format("golden retriever") for t in unicl.TEMPLATES)
    assert len(unicl.TEMPLATES) >= 12 and all(t.count("{}") == 1 for t in unicl.TEMPLATES)
    again = [augment_short_caption(t, random.Random(0)) for t in ["dog"]]
    assert again[0] == out[0]  # seeded rng → reproducible
    import numpy as np
    text, aug = augment_short_caption("cat", np.random.default_rng(0))
    assert aug and "cat" in text
    # stage 2 keeps exactly the texts stage 1 would not wrap: one rule ("short": one or two words) for both
    texts = ["dog", "golden retriever", "a dog on the grass", "a photo of a dog."]
    assert [unicl.keep_in_stage2(t) for t in texts] == [False, False, True, True]
    assert [unicl.is_short_caption(t) for t in texts] == [aug for _, aug in out] + [False]


def test_identical_texts_share_a_key_even_when_one_is_a_template_prompt():
    """A short caption wrapped by stage 1 keeps its key; a natural caption that reads exactly like that
    prompt gets the same key (identical strings are never each other's negatives)."""
    rng = random.Random(3)
    prompt, _ = augment_short_caption("red circle", rng)
    natural = prompt.upper()  # the same text, written by someone else
    keys = batch_labels(["red circle", prompt, natural, "a red circle on a grey ground", "a photo of a big red circle."])
    assert keys[0] == keys[1] == keys[2] == caption_key("red circle")
    assert len(set(keys.tolist())) == 3  # a long caption, and a template around a 3-word text, keep their own
    assert unicl.template_core("a photo of a large red circle") == "red circle"  # "a photo of a large {}."
    assert unicl.template_core("a photo of a red circle on grass.") is None
    # a class prompt keeps its class key: keys given as ints pass through
    assert batch_labels([class_key(3), class_key(3)]).tolist() == [class_key(3)] * 2


# ---------------------------------------------------------------- distributed (2 gloo processes)


class _TinyTowers(nn.Module):
    def __init__(self, d_in=6, d=5):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = nn.Linear(d_in, d, bias=False), nn.Linear(d_in, d, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x, t):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.logit_scale.exp()


def _global_batch(n=8):
    g = torch.Generator().manual_seed(42)
    x, t = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    keys = torch.tensor([0, 1, 2, 0, 3, 1, 4, 1])[:n]  # key 1 shared across ranks, key 0 within rank 0
    return x, t, keys


def _single_process(x, t, keys):
    model = _TinyTowers()
    u, v, s = model(x, t)
    loss = unicl_loss(u, v, keys, s)
    loss.backward()
    ue, ve = u.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    unicl_loss(ue, ve, keys, s.detach()).backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, ue.grad, ve.grad


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        x, t, keys = _global_batch()
        for name, sizes in (("even", [4, 4]), ("uneven", [3, 5])):
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            model = DDP(_TinyTowers())
            u, v, s = model(x[rows], t[rows])
            loss = unicl_loss(u, v, keys[rows], s)
            loss.backward()  # DDP averages the parameter gradients over the 2 ranks
            # the embeddings themselves as leaves: gradient of the sum of both ranks' losses
            ue, ve = u.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
            unicl_loss(ue, ve, keys[rows], s.detach()).backward()
            results[name] = dict(loss=loss.item(), grads={n: p.grad.clone() for n, p in
                                                           model.module.named_parameters()},
                                 u_grad=ue.grad, v_grad=ve.grad, no_gather=unicl_loss(
                                     u.detach(), v.detach(), keys[rows], s.detach(), gather=False).item())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears its gloo pairs down
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, t, keys = _global_batch()
    loss, grads, u_grad, v_grad = _single_process(x, t, keys)
    for name in ("even", "uneven"):
        res = [r[name] for r in ranks]
        # the mean of the ranks' losses is the global-batch loss ...
        assert sum(r["loss"] for r in res) / world == pytest.approx(loss, rel=1e-5)
        # ... and after DDP's averaging every parameter gradient is the global-batch gradient
        for n, g in grads.items():
            for r in res:
                torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6)
        # embedding gradients: rank r holds d(Σ_ranks loss)/d(its rows) = W · d(global loss)/d(rows)
        torch.testing.assert_close(torch.cat([r["u_grad"] for r in res]) / world, u_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([r["v_grad"] for r in res]) / world, v_grad, rtol=1e-4, atol=1e-6)
        # gather=False is a purely local loss (keys 1 and 0 then lose their cross-rank positives)
        assert all(r["no_gather"] != pytest.approx(r["loss"]) for r in res)


# ---------------------------------------------------------------- Florence


class _StandInImageEncoder(nn.Module):
    """A tiny image tower with CoSwin's contract: (B, 3, H, W) → (B, num_features)."""

    def __init__(self, width=16, dropout=0.0):
        super().__init__()
        self.num_features = width
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(F.gelu(self.conv(x)).mean(dim=(2, 3)))


def _florence(dropout=0.0, embed_dim=8):
    torch.manual_seed(0)
    text = text_encoder.TextEncoder(text_encoder.TextConfig(vocab_size=300, context_length=16, width=32,
                                                            layers=2, heads=4, dropout=dropout))
    return Florence(_StandInImageEncoder(16, dropout), text, embed_dim)


def _batch(B=8, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 8, 8, generator=g)
    tokens = torch.randint(4, 300, (B, L), generator=g)
    tokens[:, 0] = text_encoder.SOT_ID
    for b in range(B):
        n = 3 + b % (L - 3)
        tokens[b, n] = text_encoder.EOT_ID
        tokens[b, n + 1:] = text_encoder.PAD_ID
    keys = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 8, 9][:B])
    return images, tokens, keys


def test_florence_embeddings_and_temperature():
    model = _florence()
    images, tokens, _ = _batch()
    u, v, tau = model(images, tokens)
    assert u.shape == v.shape == (8, 8)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(8))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert tau.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.image_proj.bias is None and model.text_proj.bias is None
    with torch.no_grad():
        model.logit_scale.fill_(8.0)  # e^8 ≈ 2981
    assert model(images, tokens)[2].item() == pytest.approx(100.0, rel=1e-6)  # the used scale is clamped
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_florence_with_coswin_toy():
    coswin = pytest.importorskip("coswin")
    try:
        image = coswin.build("toy")
    except Exception as e:  # the image tower is written in parallel; not this file's concern
        pytest.skip(f"coswin.build('toy') unavailable: {e}")
    model = Florence(image, text_encoder.build("toy"), embed_dim=16)
    tokens = text_encoder.Tokenizer()(["a red circle", "a blue square"], model.text_encoder.cfg.context_length)
    u, v, tau = model(torch.randn(2, 3, 64, 64), tokens)
    loss = unicl_loss(u, v, batch_labels(["a red circle", "a blue square"]), tau)
    loss.backward()
    assert torch.isfinite(loss) and model.image_proj.weight.grad is not None


# ---------------------------------------------------------------- gradient cache


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradcache_single_chunk_equals_plain_full_batch_backward():
    model = _florence(dropout=0.2).train()
    images, tokens, keys = _batch()
    torch.manual_seed(123)
    u, v, tau = model(images, tokens)
    ref_loss = unicl_loss(u, v, keys, tau)
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad()
    torch.manual_seed(123)
    loss = gradcache_step(model, images, tokens, keys, chunk=8)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    got = _grads(model)
    assert got.keys() == ref.keys() and "logit_scale" in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


def test_gradcache_chunks_equal_full_batch_gradients_with_dropout():
    """Chunks of 3 over B = 8: the same as back-propagating through the whole batch at once with the same
    dropout masks (which only RNG replay can give: the masks of the re-forward must be the cached ones)."""
    model = _florence(dropout=0.2).train()
    images, tokens, keys = _batch()

    def full_batch_grads(seed):  # the whole batch's graph in memory, encoded chunk by chunk with grad
        model.zero_grad()
        torch.manual_seed(seed)
        u = torch.cat([model.encode_image(x) for x in images.split(3)])
        v = torch.cat([model.encode_text(t) for t in tokens.split(3)])
        loss = unicl_loss(u, v, keys, model.scale())
        loss.backward()
        return loss.item(), _grads(model)

    ref_loss, ref = full_batch_grads(7)
    _, other = full_batch_grads(8)
    assert (other["text_encoder.blocks.0.mlp.fc.weight"] - ref["text_encoder.blocks.0.mlp.fc.weight"]).abs().max() > 1e-4
    assert (other["image_encoder.conv.weight"] - ref["image_encoder.conv.weight"]).abs().max() > 1e-4

    model.zero_grad()
    torch.manual_seed(7)
    loss = gradcache_step(model, images, tokens, keys, chunk=3)
    after = torch.rand(1)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    got = _grads(model)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
    # the caller's RNG stream advanced exactly as by the chunked forwards (replays are forked off)
    torch.manual_seed(7)
    with torch.no_grad():
        [model.encode_image(x) for x in images.split(3)] + [model.encode_text(t) for t in tokens.split(3)]
    assert torch.equal(torch.rand(1), after)
    with pytest.raises(ValueError, match="chunk"):
        gradcache_step(model, images, tokens, keys, chunk=0)


# ---------------------------------------------------------------- evaluation


def test_zero_shot_classifier_is_the_renormalised_template_mean():
    model = _florence()
    tok = text_encoder.Tokenizer()
    names, templates = ["cat", "dog", "red car"], ["a {}.", "the {}!", "{} photo"]
    model.train()
    W = zero_shot_classifier(model, tok, names, templates, context_length=16, batch_size=4)
    assert model.training  # mode restored
    assert W.shape == (8, 3)
    model.eval()
    with torch.no_grad():
        for k, name in enumerate(names):
            v = model.encode_text(tok([t.format(name) for t in templates], 16))  # (T, D) unit rows
            torch.testing.assert_close(W[:, k], F.normalize(v.mean(0), dim=0))
    assert W.requires_grad is False


def test_accuracy_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],
                           [0.8, 0.1, 0.0, 0.3, 0.2, 0.5],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    targets = torch.tensor([1, 5, 0])  # top-1 hit, rank 2, rank 6
    top1, top2, top5 = unicl.accuracy(logits, targets, topk=(1, 2, 5))
    assert (top1, top2, top5) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert unicl.accuracy(logits, targets, topk=(10,)) == [1.0]  # k capped at the number of classes


def _recall_loop(img, txt, txt_to_img, k):
    sim = img @ txt.T
    n_img, n_txt = sim.shape
    t2i = sum(int(txt_to_img[j]) in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(n_txt))
    i2t = 0
    for i in range(n_img):
        top = sim[i].argsort(descending=True)[:k].tolist()
        i2t += any(int(txt_to_img[j]) == i for j in top)
    return i2t / n_img, t2i / n_txt


def test_retrieval_recall_with_several_captions_per_image():
    img, txt = _unit(7, 4, seed=11), _unit(20, 4, seed=12)
    txt_to_img = torch.tensor([i % 7 for i in range(20)])[torch.randperm(20)]
    got = retrieval_recall(img, txt, txt_to_img)
    for k in (1, 5, 10):
        i2t, t2i = _recall_loop(img, txt, txt_to_img, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
    # an image whose SECOND caption ranks first is an image→text hit at 1
    img = torch.eye(2)
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # captions 0 and 1 of image 0, 2 of image 1
    r = retrieval_recall(img, txt, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(torch.eye(3), txt, torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------- a toy run that learns


def test_toy_pretraining_learns_zero_shot_classes():
    """Image-label data through UniCL: class names in templates, class keys as labels. After a few dozen
    steps the zero-shot classifier built from the names recognises held-out images."""
    names = ["red", "green", "blue", "white"]
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]])
    g = torch.Generator().manual_seed(0)

    def images_of(labels):
        return colours[labels][:, :, None, None] + 0.5 * torch.randn(len(labels), 3, 8, 8, generator=g)

    model = _florence()
    tok = text_encoder.Tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    for _ in range(80):
        labels = torch.randint(0, 4, (16,), generator=g)
        texts = [augment_short_caption(names[c], rng)[0] for c in labels.tolist()]
        keys = batch_labels([class_key(c) for c in labels.tolist()])
        u, v, tau = model(images_of(labels), tok(texts, 16))
        loss = unicl_loss(u, v, keys, tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    W = zero_shot_classifier(model, tok, names, unicl.TEMPLATES, context_length=16)
    labels = torch.randint(0, 4, (64,), generator=g)
    with torch.no_grad():
        model.eval()
        logits = model.encode_image(images_of(labels)) @ W
    assert unicl.accuracy(logits, labels, topk=(1,))[0] > 0.9  # chance: 0.25


# --------------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression with an L2 sweep


def _clusters(n, K=5, D=16, spread=0.3, seed=0, means_seed=0):
    means = 4 * torch.randn(K, D, generator=torch.Generator().manual_seed(means_seed)) + 3  # off-centre on purpose
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    return means[y] + spread * torch.randn(n, D, generator=g), y


def test_linear_probe_recovers_a_linearly_separable_set_exactly_and_deterministically():
    x, y = _clusters(300)
    ex, ey = _clusters(200, seed=1)
    r = unicl.linear_probe(x, y, ex, ey, l2=(1e-2, 1e-1), seed=3)
    assert r["top1"] == 1.0 and r["top5"] == 1.0
    assert r["weight"].shape == (5, 16) and r["bias"].shape == (5,)
    # the returned weights act on raw features (the standardisation is folded in) and give the same answer
    assert bool(((ex @ r["weight"].T + r["bias"]).argmax(1) == ey).all())
    assert r["l2"] in (1e-2, 1e-1) and r["val_top1"][r["l2"]] == max(r["val_top1"].values())
    again = unicl.linear_probe(x, y, ex, ey, l2=(1e-2, 1e-1), seed=3)
    assert torch.equal(again["weight"], r["weight"]) and again["l2"] == r["l2"]


def test_linear_probe_solves_the_regularised_objective():
    """At the optimum of mean CE + λ/2‖W‖² (standardised features) the gradient vanishes: check it from the
    returned raw-feature weights, on overlapping classes where the regulariser matters."""
    x, y = _clusters(400, spread=4.0)
    lam = 1e-2
    r = unicl.linear_probe(x, y, l2=(lam,), val_frac=0.25)
    xd = x.double()
    mean, std = xd.mean(0), xd.std(0)
    W = (r["weight"].double().T * std[:, None]).requires_grad_(True)  # standardised-space weights (D, K)
    b = (r["bias"].double() + mean @ r["weight"].double().T).requires_grad_(True)
    loss = F.cross_entropy(((xd - mean) / std) @ W + b, y) + 0.5 * lam * (W * W).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert float(gW.abs().max()) < 1e-5 and float(gb.abs().max()) < 1e-5
    assert abs(float(loss.detach()) - r["train_loss"]) < 1e-5
    assert "top1" not in r  # no eval data: no eval metrics


def test_linear_probe_refits_the_l2_strength_that_wins_on_the_validation_split():
    x, y = _clusters(120, spread=3.0)
    r = unicl.linear_probe(x, y, l2=(1e-6, 1e-3, 1.0), val_frac=0.5)
    best = max(r["val_top1"].values())
    assert r["l2"] == max(lam for lam, acc in r["val_top1"].items() if acc == best)  # ties → the stronger λ
    only = unicl.linear_probe(x, y, l2=(r["l2"],), val_frac=0.5)  # the refit on every row is that λ's fit
    torch.testing.assert_close(only["weight"], r["weight"], rtol=0, atol=0)
    # a separable set scores every λ alike: the strongest is kept
    assert unicl.linear_probe(*_clusters(60), l2=(1e-6, 1e-3), val_frac=0.5)["l2"] == 1e-3


def test_linear_probe_rejects_bad_input():
    x, y = _clusters(20)
    with pytest.raises(ValueError, match="train_y"):
        unicl.linear_probe(x, y[:-1])
    with pytest.raises(ValueError, match="eval_x"):
        unicl.linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="val_frac"):
        unicl.linear_probe(x, y, val_frac=1.0)
    with pytest.raises(ValueError, match="class indices"):
        unicl.linear_probe(x, y - 1)
