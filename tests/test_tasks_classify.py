"""--task linear_probe and --task classify (tasks/classify.py): a pretrained image tower judged by a linear
probe on cached frozen features (one L-BFGS fit, not a step loop) and by fine-tuning from a
zero-shot-initialised head with layer-wise lr decay."""
import json
import os

import pytest
import torch

import train
import unicl
from tasks import LinearProbeTask
from tasks.base import atomic_save
from tasks.classify import layer_lr_scales
from tasks.pretrain import load_pretrained
from train import lr_at

FAST = ["--img_size", "32", "--eval_size", "40", "--tokenizer_texts", "2000", "--log_every", "1",
        "--progress", "false", "--max_minutes", "0"]


def make_trainer(tmp_path, *flags, name):
    cfg = train.resolved(train.parse_config(FAST + ["--out_dir", str(tmp_path), "--name", name] + list(flags)))
    return train.Trainer(cfg, train.setup_distributed(cfg))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two toy pretraining checkpoints of different weights (3 steps; then one more step)."""
    tmp = tmp_path_factory.mktemp("pre")
    t = make_trainer(tmp, "--max_steps", "3", "--batch_size", "16", "--lr", "1e-3", "--warmup_steps", "1", name="pre")
    t.fit()
    a = str(tmp / "pre" / "ckpt.pt")
    ckpt = torch.load(a, weights_only=True)
    ckpt["model"] = {k: v + 0.01 if k.startswith("image_encoder.layers.0.") and v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}  # another image tower, same recipe
    b = str(tmp / "other.pt")
    atomic_save(ckpt, b)
    return a, b


def test_probe_runs_caches_features_and_reextracts_when_the_checkpoint_changes(tmp_path, pretrained, monkeypatch):
    a, b = pretrained
    cache = str(tmp_path / "cache")
    flags = ["--task", "linear_probe", "--probe_size", "120", "--probe_l2", "1e-1,1", "--feature_cache", cache]
    calls = []
    extract = LinearProbeTask.extract
    monkeypatch.setattr(LinearProbeTask, "extract", lambda self, m, ds: calls.append(len(ds)) or extract(self, m, ds))

    first = make_trainer(tmp_path, *flags, "--init_from", a, "--max_steps", "10", name="p1")
    m1 = first.fit()
    assert first.step == 1 and len([r for r in rows(tmp_path / "p1") if "loss" in r]) == 1  # one fit, not 10
    assert calls == [120, 40] and len(os.listdir(cache)) == 2  # train and eval features, extracted once
    assert 0.0 <= m1["probe_top1"] <= m1["probe_top5"] <= 1.0 and 0.0 <= m1["zeroshot_top1"] <= 1.0
    assert (tmp_path / "p1" / "confusion.png").is_file()
    fit = [r for r in rows(tmp_path / "p1") if "probe_l2" in r][0]
    assert fit["probe_l2"] in (1e-1, 1.0) and fit["probe_train_images"] == 120

    second = make_trainer(tmp_path, *flags, "--init_from", a, name="p2")  # same checkpoint, same data: the cache
    m2 = second.fit()
    assert calls == [120, 40]
    assert m2 == m1  # and the same answer (deterministic for a seed)
    torch.testing.assert_close(second.model.head.weight, first.model.head.weight, rtol=0, atol=0)

    key = first.task.cache_key(first.model, "train")
    other = make_trainer(tmp_path, *flags, "--init_from", b, name="p3")  # another image tower: new features
    assert other.task.cache_key(other.model, "train") != key
    other.fit()
    assert calls == [120, 40, 120, 40] and len(os.listdir(cache)) == 4
    # other data (a different seed draws other images) is another key too
    reseeded = make_trainer(tmp_path, *flags, "--init_from", a, "--seed", "1", name="p4")
    assert reseeded.task.cache_key(reseeded.model, "train") != key


def _zero_shot_logits(ckpt_path, images, classes):
    florence, tok, _, _ = load_pretrained(ckpt_path)
    florence.eval()
    with torch.no_grad():
        W = unicl.zero_shot_classifier(florence, tok, classes)
        return florence.scale() * florence.encode_image(images) @ W


def test_classify_head_starts_as_the_zero_shot_classifier(tmp_path, pretrained):
    a, _ = pretrained
    t = make_trainer(tmp_path, "--task", "classify", "--init_from", a, "--max_steps", "2", "--batch_size", "16",
                     "--eval_every", "100", name="cls")
    batch = t.task.collate([t.task.eval_dataset()[i] for i in range(40)])  # a fixed held-out batch
    t.model.eval()
    with torch.no_grad():
        logits = t.model(batch["image"])
    expected = _zero_shot_logits(a, batch["image"], t.task.classes)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    top1 = unicl.accuracy(logits, batch["label"], (1,))[0]
    assert top1 == unicl.accuracy(expected, batch["label"], (1,))[0]
    t.model.train()
    metrics = t.fit()
    # every evaluation reports the starting (zero-shot) accuracy on the whole held-out set: the batch above
    assert metrics["zeroshot_top1"] == pytest.approx(top1) and 0.0 <= metrics["cls_top1"] <= 1.0
    assert (tmp_path / "cls" / "confusion.png").is_file()
    # resume: the tower's recipe and the classes travel with the checkpoint (no --init_from needed)
    r = make_trainer(tmp_path, "--task", "classify", "--max_steps", "3", "--batch_size", "16", "--resume", "auto",
                     name="cls")
    assert r.step == 2 and r.task.start == t.task.start
    for (k, x), y in zip(r.model.state_dict().items(), t.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_layer_decay_gives_the_documented_lrs_to_the_first_and_last_blocks(tmp_path, pretrained):
    a, _ = pretrained
    d, lr = 0.5, 1e-3
    flags = ["--task", "classify", "--init_from", a, "--batch_size", "16", "--lr", str(lr), "--warmup_steps", "1",
             "--weight_decay", "0", "--eps", "1e-12", "--max_steps", "1"]
    t = make_trainer(tmp_path, *flags, "--layer_decay", str(d), name="lld")
    N = 8  # CoSwin-toy: depths 2, 2, 2, 2
    scales = layer_lr_scales(t.model, d)
    first, last = "image_encoder.layers.0.blocks.0.mlp.fc1.weight", "image_encoder.layers.3.blocks.1.mlp.fc1.weight"
    assert scales[first] == d ** N and scales[last] == d
    assert scales["image_encoder.patch_embed.proj.weight"] == d ** (N + 1)
    assert scales["image_encoder.layers.0.downsample.proj.weight"] == scales["image_encoder.layers.0.blocks.1.mlp.fc1.weight"] == d ** (N - 1)
    assert scales["head.weight"] == scales["image_proj.weight"] == scales["image_encoder.norm.weight"] == 1.0

    def step_sizes(trainer):
        """Adam's first step moves every weight by lr·g/|g| = ±lr: the median |Δ| is the lr it got."""
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        trainer.train_step(trainer.batches())
        out = {}
        for k, v in trainer.model.named_parameters():
            delta = (v.detach() - before[k]).abs()
            out[k] = float(delta[delta > 0].median())
        return out

    base = lr_at(0, t.cfg, t.total_steps)
    got = step_sizes(t)
    assert got[first] == pytest.approx(base * d ** N, rel=1e-3)
    assert got[last] == pytest.approx(base * d, rel=1e-3)
    assert got["head.weight"] == pytest.approx(base, rel=1e-3)
    flat = step_sizes(make_trainer(tmp_path, *flags, "--layer_decay", "1.0", name="flat"))  # 1.0: decay off
    assert flat[first] == pytest.approx(base, rel=1e-3) and flat[last] == pytest.approx(base, rel=1e-3)


def test_folder_data_and_clear_errors(tmp_path, pretrained):
    from PIL import Image

    from data import ShapesText

    a, _ = pretrained
    for split, per_class in (("train", 8), ("val", 4)):  # 3 classes, images drawn by ShapesText
        src = ShapesText(split=split, length=400, img_size=32)
        count = {}
        for i in range(len(src)):
            label = src.scene(i)["label"]
            if label < 3 and count.get(label, 0) < per_class:
                count[label] = count.get(label, 0) + 1
                folder = tmp_path / split / src.classes[label].replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(src.image_uint8(i)).save(folder / f"{i}.png")
        assert sorted(count.values()) == [per_class] * 3
    classes = sorted(os.listdir(tmp_path / "train"))
    data = ["--data", f"folder:{tmp_path / 'train'}", "--eval_data", f"folder:{tmp_path / 'val'}"]
    p = make_trainer(tmp_path, "--task", "linear_probe", "--init_from", a, "--feature_cache", "off", *data, name="fp")
    assert p.task.classes == [c.replace("_", " ") for c in classes]
    m = p.fit()
    assert 0.0 <= m["probe_top1"] <= 1.0 and (tmp_path / "fp" / "confusion.png").is_file()
    c = make_trainer(tmp_path, "--task", "classify", "--init_from", a, "--batch_size", "8", "--max_steps", "1", *data,
                     name="fc")
    assert 0.0 <= c.fit()["cls_top1"] <= 1.0

    with pytest.raises(SystemExit, match="--init_from"):
        make_trainer(tmp_path, "--task", "classify", name="none")
    with pytest.raises(SystemExit, match="synthetic"):
        make_trainer(tmp_path, "--task", "classify", "--init_from", a, "--data", f"folder:{tmp_path / 'train'}",
                     "--eval_data", "synthetic", name="mix").task.eval_dataset()
    with pytest.raises(SystemExit, match="--layer_decay"):
        make_trainer(tmp_path, "--task", "classify", "--init_from", a, "--layer_decay", "0", name="bad")
    with pytest.raises(SystemExit, match="--probe_l2"):
        make_trainer(tmp_path, "--task", "linear_probe", "--init_from", a, "--probe_l2", "strong", name="bad2")
