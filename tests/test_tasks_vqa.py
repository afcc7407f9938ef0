"""--task itm_mlm and --task vqa end to end (tasks/vqa.py): METER on the towers of a pretraining
checkpoint, several questions per image, the image-blind ablation, counted truncations and unknown
answers, the lr multipliers and the frozen stages."""
import json
import os

import pytest
import torch

import meter
from data import ShapesVQA


# ----------------------------------------------------------------------------------------------------
# --task itm_mlm / vqa from a pretraining checkpoint

FAST = ["--img_size", "32", "--batch_size", "8", "--eval_size", "16", "--warmup_steps", "2", "--tokenizer_texts", "300",
        "--log_every", "1", "--progress", "false", "--max_minutes", "0", "--eval_every", "100"]


def make_trainer(tmp_path, *flags, name):
    from train import Trainer, parse_config, resolved, setup_distributed

    cfg = resolved(parse_config(FAST + ["--out_dir", str(tmp_path), "--name", name] + list(flags)))
    return Trainer(cfg, setup_distributed(cfg))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A one-step toy pretraining run: its checkpoint holds the (causal) towers and the tokenizer."""
    tmp = tmp_path_factory.mktemp("pre")
    t = make_trainer(tmp, "--task", "pretrain", "--max_steps", "1", name="pre")
    t.fit()
    return str(tmp / "pre" / "ckpt.pt"), t.model


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_vqa_task_starts_from_the_pretrained_towers_with_a_bidirectional_text_tower(tmp_path, pretrained):
    ckpt, florence = pretrained
    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", ckpt, "--max_steps", "2", "--ckpt_every", "1", name="vqa")
    m = t.model
    assert m.text_encoder.cfg.causal is False and florence.text_encoder.cfg.causal is True
    for mine, theirs in ((m.text_encoder, florence.text_encoder), (m.image_encoder, florence.image_encoder)):
        for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert m.vqa_head[-1].out_features == len(ShapesVQA.answers) and m.itm_head is None
    metrics = t.fit()
    run = tmp_path / "vqa"
    assert (run / "predictions.png").is_file() and (run / "ckpt.pt").is_file()
    assert 0.0 <= metrics["vqa_score"] <= 1.0 and "vqa_score_colour" in metrics
    end = rows(run)[-1]
    assert end["event"] == "end" and 0.0 <= end["vqa_score"] <= 1.0
    # resume: the task state (tokenizer, answers) travels with the checkpoint
    r = make_trainer(tmp_path, "--task", "vqa", "--max_steps", "3", "--resume", "auto", name="vqa")
    assert r.step == 2
    for (k, a), b in zip(r.model.state_dict().items(), m.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_vqa_task_trains_on_several_questions_per_image_and_holds_out_one(tmp_path, pretrained):
    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--max_steps", "1", name="q5")
    assert t.cfg.vqa_questions == 5  # the task's default
    batch = t.task.collate([t.task.train_dataset()[i] for i in range(4)])
    assert len(batch["question"]) > 4 and batch["image_index"].max() == 3
    torch.manual_seed(0)
    loss, logs = t.task.loss(t.model.eval(), batch, 0)
    tokens = t.task.tokenize(batch["question"])
    with torch.no_grad():
        ref = meter.vqa_loss(t.model(batch["image"][batch["image_index"]], tokens)["vqa"], batch["target"])
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)
    probs, targets, qtypes, questions, images = t.task.predict(t.model, 16)
    assert len(probs) == len(questions) == t.cfg.eval_size == 16  # held out: one question per image, as before
    assert "more_questions" not in t.task.eval_dataset()[0]
    with pytest.raises(SystemExit, match="vqa_questions must be at least 1"):
        make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--vqa_questions", "0", name="q0")


def test_vqa_blind_ablation_ignores_the_image(tmp_path, pretrained):
    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--max_steps", "1", "--vqa_blind",
                     name="blind")
    m = t.model.eval()
    assert not any(p.requires_grad for p in m.image_encoder.parameters())
    tokens = t.task.tokenize(["what colour is the circle?"] * 2)
    with torch.no_grad():
        a = m(torch.randn(2, 3, 32, 32), tokens, blind=True)["vqa"]
        b = m(torch.randn(2, 3, 32, 32), tokens, blind=True)["vqa"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_long_questions_and_out_of_vocabulary_answers_are_counted(tmp_path, pretrained):
    import meter

    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--max_steps", "1", name="bad")
    t.task.tokenize(["is there a red circle?", "is there " + "a very " * 40 + "red circle?"])
    assert t.task.truncated == 1
    ds = ShapesVQA("train", img_size=32, length=4)
    batch = t.task.collate([ds[i] for i in range(4)])
    batch["target"][1] = 0.0  # every annotator answer outside the vocabulary
    t.model.eval()
    torch.manual_seed(0)
    loss, logs = t.task.loss(t.model, batch, 0)
    assert logs["oov_questions"] == 1
    tokens = t.task.tokenizer(batch["question"], t.task.context_length)
    logits = t.model(batch["image"], tokens)["vqa"]
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss, meter.vqa_loss(logits[keep], batch["target"][keep]))


def test_itm_mlm_run_then_vqa_from_its_checkpoint(tmp_path, pretrained):
    t = make_trainer(tmp_path, "--task", "itm_mlm", "--init_from", pretrained[0], "--max_steps", "2", name="itm")
    metrics = t.fit()
    assert 0.0 <= metrics["itm_accuracy"] <= 1.0 and 0.0 <= metrics["mlm_accuracy"] <= 1.0
    assert (tmp_path / "itm" / "predictions.png").is_file()
    assert all(k in r for r in rows(tmp_path / "itm") if "loss" in r for k in ("mlm_loss", "itm_loss"))
    v = make_trainer(tmp_path, "--task", "vqa", "--init_from", str(tmp_path / "itm" / "ckpt.pt"), "--max_steps", "1",
                     name="v2")
    theirs = t.model.state_dict()
    for k, a in v.model.state_dict().items():
        if not k.startswith("vqa_head"):
            torch.testing.assert_close(a, theirs[k], rtol=0, atol=0, msg=k)
    assert v.task.tokenizer.merges == t.task.tokenizer.merges


def test_towers_train_at_a_fifth_of_the_lr_and_a_zero_multiplier_freezes_the_image_tower(tmp_path, pretrained):
    """METER's fine-tuning: the backbones at `--tower_lr` × the fusion's lr; `--image_tower_lr 0` makes the image
    tower a fixed feature extractor: no gradient, no optimizer state, kept in eval mode, features unchanged by
    training, and the same features as the tower run by itself."""
    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--max_steps", "2", "--tower_lr", "0.2",
                     "--image_tower_lr", "0", name="frozen")
    m = t.model
    assert not any(p.requires_grad for p in m.image_encoder.parameters())
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in m.image_encoder.parameters())
    scale_of = {id(p): g["lr_scale"] for g in t.optimizer.param_groups for p in g["params"]}
    assert {scale_of[id(p)] for p in m.text_encoder.parameters()} == {0.2}
    assert {scale_of[id(p)] for n, p in m.named_parameters() if n.startswith(("text_layers.", "vqa_head."))} == {1.0}
    m.train()
    assert m.training and m.text_layers.training and not m.image_encoder.training
    before = {k: v.clone() for k, v in m.image_encoder.state_dict().items()}
    text_before = m.text_encoder.token_embedding.weight.clone()
    t.fit()
    for k, v in m.image_encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(m.text_encoder.token_embedding.weight, text_before)  # the text tower does train
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.image_encoder.eval().forward_features(x)[m.levels[0]]
    y = m.image_features(x)
    assert y.requires_grad  # the projection trains on top of the fixed features
    h, w = ref.shape[-2:]
    torch.testing.assert_close(y[:, : h * w], m.image_proj[0](ref.flatten(2).transpose(1, 2))
                               + m.image_pos_proj(meter.sincos_2d(h, w, meter.POS_FREQS)), rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit, match="tower_lr"):
        make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--tower_lr", "-1", name="neg")


def test_vqa_runs_at_twice_the_pretraining_size_unless_told():
    from train import parse_config, resolved

    assert resolved(parse_config(["--task", "vqa"])).img_size == 2 * resolved(parse_config([])).img_size == 128
    assert resolved(parse_config(["--task", "vqa", "--img_size", "96"])).img_size == 96
    assert resolved(parse_config(["--task", "itm_mlm"])).img_size == 64  # ShapesText: the pretraining's own scale


def test_image_frozen_stages_freeze_the_stem_and_the_first_stages_only(tmp_path, pretrained):
    t = make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--max_steps", "1",
                     "--image_frozen_stages", "2", name="partial")
    enc = t.model.image_encoder
    frozen = [enc.patch_embed, enc.layers[0], enc.layers[1]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (enc.layers[2], enc.layers[3], enc.norm) for p in m.parameters())
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    t.fit()
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(("patch_embed.", "layers.0.", "layers.1.")) for n in moved)  # frozen: unchanged
    assert any(n.startswith("layers.2.") for n in moved) and any(n.startswith("layers.3.") for n in moved)
    with pytest.raises(SystemExit, match="image_frozen_stages 5 exceeds"):
        make_trainer(tmp_path, "--task", "vqa", "--init_from", pretrained[0], "--image_frozen_stages", "5", name="p5")
