"""--task video end to end (tasks/video.py): defaults from the task, a run writes top-1 and its picture,
the middle-frame baseline, inflation of a pretraining checkpoint, unreadable clips counted."""
import json

import numpy as np
import pytest
import torch

import coswin
from video_coswin import VideoCoSwin


# ---------------------------------------------------------------------------------------------------
# --task video end to end


FAST = ["--img_size", "32", "--batch_size", "8", "--eval_size", "16", "--warmup_steps", "2", "--log_every", "1",
        "--progress", "false", "--max_minutes", "0", "--eval_every", "100", "--ckpt_every", "100"]


def make_trainer(tmp_path, *flags, name="video"):
    from train import Trainer, parse_config, resolved, setup_distributed

    cfg = resolved(parse_config(["--task", "video"] + FAST + ["--out_dir", str(tmp_path), "--name", name]
                                + list(flags)))
    return Trainer(cfg, setup_distributed(cfg))


def test_video_task_defaults_come_from_the_task():
    from tasks import VideoTask
    from train import parse_config

    cfg = parse_config(["--task", "video"])
    for k, v in VideoTask.defaults.items():
        assert getattr(cfg, k) == v, k
    assert parse_config(["--task", "video", "--lr", "0.5"]).lr == 0.5  # a flag wins
    assert parse_config([]).img_size == 0  # pretraining keeps its own defaults


def test_video_task_runs_and_writes_top1_and_the_picture(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "3")
    metrics = t.fit()
    assert 0.0 <= metrics["video_top1"] <= 1.0
    run = tmp_path / "video"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert rows[-1]["event"] == "end" and "video_top1" in rows[-1]
    from PIL import Image

    img = Image.open(run / "predictions.png")
    assert img.size[0] == 8 * 64 + 8  # 8 frames side by side
    assert isinstance(t.model.encoder, VideoCoSwin)


def test_middle_frame_baseline_uses_the_image_model(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "2", "--video_input", "middle_frame", name="mid")
    metrics = t.fit()
    assert set(metrics) == {"video_middle_frame_top1"}
    assert isinstance(t.model.encoder, coswin.CoSwin)


def test_video_task_inflates_a_pretraining_checkpoint(tmp_path):
    from tasks.pretrain import load_pretrained
    from train import Trainer, parse_config, resolved, setup_distributed

    pcfg = resolved(parse_config(["--img_size", "32", "--batch_size", "8", "--eval_size", "16", "--max_steps", "1",
                                  "--tokenizer_texts", "500", "--progress", "false", "--out_dir", str(tmp_path),
                                  "--name", "pre"]))
    Trainer(pcfg, setup_distributed(pcfg)).fit()
    ckpt = str(tmp_path / "pre" / "ckpt.pt")
    t = make_trainer(tmp_path, "--max_steps", "1", "--init_from", ckpt, "--lr", "0")
    florence, _, _, _ = load_pretrained(ckpt)
    image = florence.image_encoder.eval()
    video = t.model.encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the inflated pretrained tower: a static clip gives the pretrained image features
        torch.testing.assert_close(video(x[:, :, None].expand(-1, -1, 8, -1, -1)), image(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit, match="--preset toy"):
        make_trainer(tmp_path, "--init_from", ckpt, "--preset", "tiny", name="other")


def test_unreadable_clips_are_skipped_and_counted(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    rows = ["path,label"]
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(root / f"{i}.npy", rng.integers(0, 255, (8, 24, 24, 3), dtype=np.uint8))
        rows.append(f"{i}.npy,{['a', 'b'][i % 2]}")
    (root / "broken").mkdir()
    (root / "broken" / "0000.jpg").write_bytes(b"not a jpeg")
    rows.append("broken,a")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = f"video:{root / 'labels.csv'}"
    t = make_trainer(tmp_path, "--data", spec, "--eval_data", spec, "--batch_size", "9", "--max_steps", "2",
                     name="files")
    t.fit()
    assert t.tally.skipped == 2 and t.tally.read == 18  # the broken clip, once per step (one epoch = one step here)
    assert sum(t.tally.kinds.values()) == 2
    end = json.loads(open(tmp_path / "files" / "metrics.jsonl").readlines()[-1])
    assert end["event"] == "end" and end["skipped_samples"] == 2 and end["samples_read"] == 18
    with pytest.raises(SystemExit, match="--eval_data video:VAL.csv"):
        make_trainer(tmp_path, "--data", spec, name="files2").task.eval_dataset()
