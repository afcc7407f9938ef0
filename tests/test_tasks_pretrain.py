"""--task pretrain end to end (tasks/pretrain.py) and the model arguments every checkpoint carries: a toy
run learns and writes its artefacts, --init_from resizes the window tables, and each task's checkpoint
rebuilds its model from `model_args` alone (strict loading), the pretraining one through unicl."""
import json

import pytest
import torch

import unicl
from tasks import TASKS
from tasks.base import load_checkpoint
from test_train import losses, make_trainer


def test_toy_run_learns_and_writes_every_artefact(tmp_path):
    # a 10-step warmup: the toy CoSwin's fan-in init takes a 1e-3 step from step 2 badly (colour unlearned)
    t = make_trainer(tmp_path, "--max_steps", "40", "--eval_every", "20", "--ckpt_every", "20", "--warmup_steps", "10")
    metrics = t.fit()
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "ckpt.pt", "curves.png", "predictions.png", "tokenizer.json"):
        assert (run / f).is_file(), f
    ls = losses(run)
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3  # the contrastive loss falls
    assert 0.0 <= metrics["zeroshot_top1"] <= 1.0 and 0.0 <= metrics["t2i_r1"] <= 1.0
    assert metrics["zeroshot_top5"] > 5 / 20  # better than chance over 20 classes
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any(r.get("event") == "eval" and r["step"] == 20 for r in rows)
    assert rows[-1]["event"] == "end" and rows[-1]["skipped_samples"] == 0
    cfg = json.load(open(run / "config.json"))
    assert cfg["max_steps"] == 40 and cfg["img_size"] == 32
    from PIL import Image

    assert Image.open(run / "curves.png").size == (960, 400)


def test_init_from_resizes_window_tables(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "1", "--eval_every", "100", name="w4")
    t.fit()
    big = make_trainer(tmp_path, "--img_size", "64", "--window_size", "6", "--init_from",
                       str(tmp_path / "w4" / "ckpt.pt"), name="w6")
    table = big.model.image_encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == 11 * 11
    torch.testing.assert_close(big.model.text_proj.weight, t.model.text_proj.weight)


def test_model_args_rebuild_the_pretrained_model_strictly(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "1", "--eval_every", "100", "--window_size", "2", "--drop_path", "0.1",
                     name="args")
    t.fit()
    ckpt = load_checkpoint(str(tmp_path / "args" / "ckpt.pt"))
    args = ckpt["model_args"]
    assert args["image"] == "nano" and args["image_overrides"] == {"window_size": 2, "drop_path_rate": 0.1}
    assert args["vocab_size"] == t.task.tokenizer.vocab_size  # the learned size, not the --vocab_size cap
    model = unicl.from_model_args(args)
    model.load_state_dict(ckpt["model"], strict=True)
    assert model.image_encoder.layers[0].blocks[0].attn.window_size == 2
    x = torch.randn(2, 3, 32, 32)
    tokens = t.task.tokenizer(["a red circle", "a blue square"], t.task.context_length)
    model.eval()
    t.model.eval()
    with torch.no_grad():
        for a, b in zip(model(x, tokens), t.model(x, tokens)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown field"):
        unicl.from_model_args({**args, "depth": 3})


@pytest.mark.parametrize("task,flags", [
    ("detect", ["--img_size", "32", "--batch_size", "4", "--det_channels", "16", "--det_blocks", "1"]),
    ("vqa", ["--batch_size", "4", "--vqa_questions", "2"]),
    ("video", ["--batch_size", "4", "--num_frames", "4"]),
    ("classify", ["--batch_size", "4"]),
])
def test_every_tasks_checkpoint_rebuilds_its_model_from_model_args(tmp_path, task, flags):
    pre = make_trainer(tmp_path, "--max_steps", "1", "--eval_every", "100", name="pre")
    pre.fit()
    t = make_trainer(tmp_path, "--task", task, "--init_from", str(tmp_path / "pre" / "ckpt.pt"), "--max_steps", "1",
                     "--max_minutes", "0", "--eval_every", "100", "--eval_size", "8", *flags, name=task)
    t.fit()
    ckpt = load_checkpoint(str(tmp_path / task / "ckpt.pt"))
    model = TASKS[task].rebuild(ckpt["model_args"])
    model.load_state_dict(ckpt["model"], strict=True)
    own = t.model.state_dict()
    assert set(model.state_dict()) == set(own)
    for k, v in model.state_dict().items():
        assert v.shape == own[k].shape and torch.equal(v, own[k].cpu()), k


def test_prepare_wraps_short_texts_in_stage_1_keeps_their_keys_and_leaves_stage_2_texts_alone(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "1", name="prep")
    task = t.task
    texts = ["red circle", "A photo of a red circle.", "a small blue square on a grey ground"]
    batch = {"text": texts, "label": torch.tensor([0, 0, 1]), "image": torch.zeros(3, 3, 32, 32)}
    _, tokens, keys = task.prepare(batch, step=5)
    tok = task.tokenizer
    L = tokens.shape[1]

    def row(text):
        return tok([text], task.context_length)[0, :L]

    assert any(torch.equal(tokens[0], row(tpl.format("red circle"))) for tpl in unicl.TEMPLATES)  # wrapped
    assert not torch.equal(tokens[0], row("red circle"))
    assert torch.equal(tokens[1], row(texts[1])) and torch.equal(tokens[2], row(texts[2]))  # left as they are
    assert keys[0] == keys[1] == unicl.caption_key("red circle") and keys[2] != keys[0]  # identical texts, one key
    # the template is a function of (seed, step, text): the same again, another at another step
    assert torch.equal(task.prepare(batch, step=5)[1], tokens)
    assert any(not torch.equal(task.prepare(batch, step=s)[1][0], tokens[0]) for s in range(6, 30))
    # stage 2: no text is rewritten (the data holds no short text to wrap)
    two = make_trainer(tmp_path, "--max_steps", "1", "--stage", "2", name="prep2")
    _, tokens2, keys2 = two.task.prepare({**batch, "text": texts[1:], "label": batch["label"][1:],
                                          "image": batch["image"][1:]}, step=5)
    assert torch.equal(keys2, keys[1:])
    tok2 = two.task.tokenizer
    assert torch.equal(tokens2, tok2(texts[1:], two.task.context_length)[:, :tokens2.shape[1]])


def test_image_label_folders_give_class_keys(tmp_path):
    from data import ShapesText
    from test_runs import write_class_folder

    spec = write_class_folder(tmp_path / "train", ShapesText("train", length=8, img_size=32), 8)
    t = make_trainer(tmp_path, "--data", spec, "--batch_size", "4", "--max_steps", "1", name="folder")
    batch = t.next_batch(t.batches())
    _, _, keys = t.task.prepare(batch, step=0)
    assert all(unicl.is_class_key(int(k)) for k in keys)
    assert [int(k) for k in keys] == [unicl.class_key(int(y)) for y in batch["label"]]


def test_synthetic_held_out_set_is_drawn_once_and_files_are_read_each_time(tmp_path, monkeypatch):
    # a synthetic held-out sample is a pure function of its index: evaluations after the first reuse the
    # drawn batches (the same metrics as drawing afresh); files are read again at every evaluation
    import tasks.pretrain as pretrain
    from data import ShapesText
    from test_runs import write_class_folder

    reads = []
    real = ShapesText.__getitem__
    monkeypatch.setattr(ShapesText, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    t = make_trainer(tmp_path, "--max_steps", "1", name="cached")
    first, again = t.task.evaluate(t.model, 0), t.task.evaluate(t.model, 0)
    assert first == again and sorted(reads) == list(range(48))  # --eval_size 48, each drawn once
    monkeypatch.setattr(pretrain, "EVAL_CACHE_BYTES", 0)  # over the limit: drawn at every evaluation
    fresh = make_trainer(tmp_path, "--max_steps", "1", name="fresh")
    reads.clear()
    assert fresh.task.evaluate(fresh.model, 0) == first and fresh.task.evaluate(fresh.model, 0) == first
    assert sorted(reads) == sorted(list(range(48)) * 2)
    monkeypatch.undo()
    spec = write_class_folder(tmp_path / "val", ShapesText("val", length=8, img_size=32), 8)
    files = make_trainer(tmp_path, "--eval_data", spec, "--max_steps", "1", name="files")
    files.task.evaluate(files.model, 0)
    assert files.task._eval_cache is None


def test_the_cpu_demo_keeps_its_lr_up_and_other_runs_keep_the_cosine(tmp_path):
    # `python train.py` (toy preset, synthetic data) runs the demo's schedule: 8e-4 after a 50-step warmup,
    # held until the last 150 of 1,500 steps, then a cosine to 0; a flag still wins, and any other preset or
    # data keeps the cosine recipe
    import train

    def cfg(*flags):
        return train.resolved(train.parse_config(["--out_dir", str(tmp_path), *flags]))

    demo = cfg()
    assert (demo.max_steps, demo.lr, demo.warmup_steps, demo.decay_steps, demo.min_lr_ratio) == (1500, 8e-4, 50, 150, 0.0)
    assert [train.lr_at(s, demo, 1500) for s in (50, 800, 1350)] == [8e-4] * 3
    assert 0 < train.lr_at(1499, demo, 1500) < 1e-6 and train.lr_at(1425, demo, 1500) == pytest.approx(4e-4)
    assert cfg("--lr", "1e-3").lr == 1e-3 and cfg("--lr", "1e-3").decay_steps == 150
    other = cfg("--preset", "tiny")
    assert (other.max_steps, other.lr, other.warmup_steps, other.decay_steps, other.min_lr_ratio) == (1500, 6e-4, 100, 0, 0.5)
    assert train.lr_at(1499, other, 1500) < 0.6 * 6e-4
