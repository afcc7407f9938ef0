"""--task detect end to end (tasks/detect.py): a run logs fractions, draws, resumes from its saved model
arguments; bad class names fail with a sentence."""
import json

import numpy as np
import pytest
import torch

import train
from tasks import DetectTask
from tasks.base import Dist


# ----------------------------------------------------------------------------------------------------
# --task detect


@pytest.mark.slow
def test_detect_task_runs_logs_fractions_and_resumes(tmp_path):
    base = ["--task", "detect", "--img_size", "64", "--batch_size", "4", "--eval_size", "8", "--det_channels", "16",
            "--det_blocks", "1", "--vocab_size", "300", "--log_every", "1", "--progress", "false", "--max_minutes", "0",
            "--zero_shot_classes", "red cross,blue circle", "--det_classes", "yellow square,a purple thing",
            "--out_dir", str(tmp_path), "--eval_every", "100", "--ckpt_every", "100"]

    def trainer(*flags):
        cfg = train.resolved(train.parse_config(base + list(flags)))
        return train.Trainer(cfg, train.setup_distributed(cfg))

    t = trainer("--name", "det", "--max_steps", "2")
    metrics = t.fit()
    assert set(metrics) == {"det_map", "det_map50", "det_zs_map", "det_zs_map50"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (tmp_path / "det" / "predictions.png").is_file()
    rows = [json.loads(line) for line in open(tmp_path / "det" / "metrics.jsonl")]
    assert rows[0]["bad_boxes"] == 0 and np.isfinite(rows[0]["loss"])
    assert t.model.class_tokens.shape[0] == 18  # 20 classes − 2 held out
    # resume: a run stopped after step 1 is rebuilt from the saved recipe (no --init_from) and goes on
    first = trainer("--name", "r", "--max_steps", "3")
    real_step = first.train_step

    def step_then_preempt(batches):
        out = real_step(batches)
        first._on_signal(15, None)
        return out

    first.train_step = step_then_preempt
    first.fit()
    assert first.step == 1
    again = trainer("--name", "r", "--max_steps", "3", "--resume", "auto")
    assert again.step == 1
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), first.model.state_dict().values()))
    again.fit()
    assert again.step == 3


def test_detect_task_rejects_unknown_held_out_classes_and_empty_names(tmp_path):
    cfg = train.resolved(train.parse_config(["--task", "detect", "--zero_shot_classes", "red dragon", "--out_dir",
                                             str(tmp_path)]))
    with pytest.raises(SystemExit, match="not classes"):
        DetectTask(cfg, Dist())


# ----------------------------------------------------------------------------------------------------
# --det_adapter dydetr


@pytest.mark.slow
def test_dydetr_adapter_runs_logs_fractions_and_rebuilds_from_model_args(tmp_path):
    import dynamic_detr as dd
    from tasks import TASKS
    from tasks.base import load_checkpoint

    flags = ["--task", "detect", "--det_adapter", "dydetr", "--img_size", "64", "--batch_size", "4", "--eval_size", "8",
             "--det_channels", "16", "--det_blocks", "1", "--vocab_size", "300", "--log_every", "1", "--progress",
             "false", "--max_minutes", "0", "--zero_shot_classes", "red cross,blue circle", "--out_dir", str(tmp_path),
             "--eval_every", "100", "--ckpt_every", "100", "--name", "dd", "--max_steps", "2"]
    cfg = train.resolved(train.parse_config(flags))
    t = train.Trainer(cfg, train.setup_distributed(cfg))
    metrics = t.fit()
    assert isinstance(t.model, dd.DynamicDETR)
    assert set(metrics) == {"det_map", "det_map50", "det_zs_map", "det_zs_map50"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (tmp_path / "dd" / "predictions.png").is_file()
    rows = [json.loads(line) for line in open(tmp_path / "dd" / "metrics.jsonl")]
    assert np.isfinite(rows[0]["loss"]) and {"loss_cls", "loss_l1", "loss_giou"} <= set(rows[0])
    ckpt = load_checkpoint(str(tmp_path / "dd" / "ckpt.pt"))
    assert ckpt["model_args"]["adapter"] == "dydetr"
    model = TASKS["detect"].rebuild(ckpt["model_args"])
    model.load_state_dict(ckpt["model"], strict=True)
    assert isinstance(model, dd.DynamicDETR) and model.cfg.channels == 16 and model.cfg.enc_blocks == 1
    # an adapter this code does not know is refused in a sentence
    with pytest.raises(SystemExit, match="adapter 'detr3d' is unknown"):
        TASKS["detect"].rebuild({**ckpt["model_args"], "adapter": "detr3d"})


def test_dydetr_takes_its_own_defaults_where_no_flag_set_them(tmp_path):
    def cfg(*flags):
        c = train.resolved(train.parse_config(["--task", "detect", "--out_dir", str(tmp_path), *flags]))
        return DetectTask.resolve_config(c, None)

    assert cfg().max_minutes == DetectTask.demo_defaults["max_minutes"]  # dyhead: the detect demo budget
    assert cfg("--det_adapter", "dydetr").max_minutes == DetectTask.demo_defaults["max_minutes"]  # one budget
    assert cfg("--det_adapter", "dydetr", "--max_minutes", "3").max_minutes == 3.0  # a flag wins
    assert cfg("--det_adapter", "dydetr", "--preset", "tiny").max_minutes == 0.0  # not the CPU demo: no budget
    assert cfg("--det_adapter", "dydetr", "--preset", "tiny").det_classifier == "frozen"  # every run
    assert cfg("--det_adapter", "dydetr", "--det_classifier", "fixed").det_classifier == "fixed"
    assert cfg().det_classifier == "text"
