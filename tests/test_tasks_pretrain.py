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
