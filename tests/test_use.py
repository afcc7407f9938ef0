"""Using what a run trained: the README's florence.py example runs on checkpoints of short runs; --eval_only
evaluates without touching the checkpoint's folder; the weights-only export loads with weights_only=True and
gives the trained model's outputs; --help explains every flag; the CPU demo's budgets stay in the demo; file
data is evaluated on held-out rows of itself; off a terminal the loop prints plain lines."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import florence
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--img_size", "32", "--batch_size", "16", "--eval_size", "32", "--warmup_steps", "2", "--tokenizer_texts",
        "1000", "--log_every", "1", "--progress", "false", "--eval_every", "0"]


def run(out_dir, *flags, name):
    cfg = train.resolved(train.parse_config(FAST + ["--out_dir", str(out_dir), "--name", name] + list(flags)))
    t = train.Trainer(cfg, train.setup_distributed(cfg))
    return t, t.fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/pretrain-toy (4 steps) and runs/detect-toy (2 steps from it), as the README's commands name them."""
    root = tmp_path_factory.mktemp("use")
    pre, _ = run(root / "runs", "--max_steps", "4", name="pretrain-toy")
    run(root / "runs", "--task", "detect", "--init_from", str(root / "runs" / "pretrain-toy" / "ckpt.pt"),
        "--max_steps", "2", "--img_size", "64", "--batch_size", "4", "--eval_size", "8", "--det_channels", "16",
        "--det_blocks", "1", "--max_minutes", "0", name="detect-toy")
    return root, pre


def digest(folder) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def test_the_readme_example_runs(runs, monkeypatch, capsys):
    root, _ = runs
    os.makedirs(root / "my_images", exist_ok=True)
    ds = data.ShapesText(split="val", img_size=64, length=3)
    for i in range(3):
        x = data.transforms.denormalize(ds[i]["image"])  # (3, H, W) in [0, 1]
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / "my_images" / f"{i}.png")
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- the README example: tests/test_use.py runs this block -->\n```python\n(.*?)```", readme,
                      re.S)
    assert block, "README.md lost its florence.py example"
    monkeypatch.chdir(root)
    exec(compile(block.group(1), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith(os.path.join("my_images", "0.png"))  # 3 zero-shot, 3 detections


def test_the_export_loads_weights_only_and_gives_the_trained_outputs(runs):
    root, pre = runs
    path = root / "runs" / "pretrain-toy" / "model.pt"
    sd = torch.load(path, weights_only=True)
    assert {"model", "model_args", "task", "config"} <= set(sd) and "optimizer" not in sd
    m = florence.load(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = pre.model.eval().encode_image(x)
    assert torch.allclose(m.embed_images(x), want, atol=1e-6)
    texts = ["a red circle", "two blue squares"]
    tokens = pre.task.tokenizer(texts, pre.task.context_length)
    with torch.no_grad():
        assert torch.allclose(m.embed_texts(texts), pre.model.encode_text(tokens), atol=1e-6)
    top = m.zero_shot(x, ["red circle", "blue square", "green cross"], top_k=3)
    assert len(top) == 2 and abs(sum(p for _, p in top[0]) - 1) < 1e-5  # three names: all the probability
    assert [p for _, p in top[0]] == sorted((p for _, p in top[0]), reverse=True)


def test_the_detector_predictor_maps_boxes_back_to_the_image(runs):
    root, _ = runs
    det = florence.load(str(root / "runs" / "detect-toy" / "model.pt"))
    img = Image.new("RGB", (128, 96), (30, 30, 30))
    found = det.detect([img], ["red circle", "yellow star"], threshold=0.0)[0]
    assert found and {d["name"] for d in found} <= {"red circle", "yellow star"}
    boxes = torch.tensor([d["box"] for d in found])
    assert boxes[:, 2].max() <= 128.5 and boxes[:, 3].max() <= 96.5 + 32  # original pixels: 64 → 128 wide


def test_eval_only_writes_metrics_and_pictures_and_leaves_the_checkpoint_folder_untouched(runs, tmp_path):
    root, pre = runs
    folder = root / "runs" / "pretrain-toy"
    before = digest(folder)
    val = tmp_path / "val"
    ds = data.ShapesText(split="val", img_size=32, length=40)
    for i in range(40):
        s = ds[i]
        os.makedirs(val / data.CLASSES[int(s["label"])], exist_ok=True)
        x = data.transforms.denormalize(s["image"])
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
            val / data.CLASSES[int(s["label"])] / f"{i}.png")
    t, metrics = run(root / "runs", "--task", "pretrain", "--eval_only", "--init_from", str(folder / "ckpt.pt"),
                     "--eval_data", f"folder:{val}", name="")
    out = root / "runs" / "pretrain-toy-eval"
    assert digest(folder) == before
    assert (out / "predictions.png").is_file() and not (out / "ckpt.pt").exists() and not (out / "model.pt").exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[0]["event"] == "eval" and rows[0]["step"] == 4 and "zeroshot_top1" in metrics
    assert torch.equal(t.model.state_dict()["logit_scale"], pre.model.state_dict()["logit_scale"])
    # evaluating a checkpoint of another task, or into a folder that holds one, is refused in a sentence
    with pytest.raises(SystemExit, match="holds a pretrain one; pass --task pretrain"):
        run(root / "runs", "--task", "detect", "--eval_only", "--init_from", str(folder / "ckpt.pt"), name="x")
    with pytest.raises(SystemExit, match="holds a training run's checkpoint"):
        run(root / "runs", "--eval_only", "--init_from", str(folder / "ckpt.pt"), name="pretrain-toy")
    with pytest.raises(SystemExit, match="--eval_only needs the weights"):
        run(root / "runs", "--eval_only", name="y")


def test_help_explains_every_flag_with_its_default_and_the_tasks_own(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--help"])
    assert e.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for name, comment in (m for _, ms in train.config_help() for m in ms):
        assert comment, f"Config.{name} has no comment: --help would show nothing for it"
        assert f"--{name}" in text
    assert "--amp WORD" in text and "{auto, bf16, fp16, off}" in text
    with pytest.raises(SystemExit):
        train.parse_config(["--task", "vqa", "--help"])
    vqa = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert re.search(r"--max_steps MAX_STEPS .*?\[default: 5000\]", vqa)
    assert re.search(r"--max_minutes MAX_MINUTES .*?\[default: 14\.0 in the CPU demo\]", vqa)


def test_cpu_demo_budgets_apply_only_to_the_toy_preset_on_synthetic_data():
    assert train.parse_config(["--task", "classify"]).max_minutes == 4.0
    tiny = train.parse_config(["--task", "classify", "--preset", "tiny"])
    assert tiny.max_minutes == 0.0 and tiny.max_steps == 1200
    assert train.parse_config(["--task", "detect", "--data", "coco:x.json"]).img_size == 0  # the preset's size
    assert train.parse_config(["--task", "detect"]).img_size == 64
    assert train.parse_config(["--task", "detect", "--preset", "toy", "--max_minutes", "3"]).max_minutes == 3


def test_file_data_is_evaluated_on_held_out_rows_of_itself(tmp_path, capsys):
    from test_runs import write_csv

    ds = data.ShapesText(split="val", img_size=32, length=200)
    spec = write_csv(tmp_path, ds, n=200)
    t, metrics = run(tmp_path, "--data", spec, "--max_steps", "2", name="csv")
    assert t.cfg.eval_data == "holdout"
    rows = json.load(open(tmp_path / "csv" / "holdout_rows.json"))["rows"]
    assert rows == list(range(0, 200, 10))  # eval_size 32 is capped at a tenth of the 200 rows
    assert set(t.task._train.index).isdisjoint(rows) and len(t.task._train) == 180
    assert "zeroshot_top1" not in metrics and "i2t_r1" in metrics  # captions only: retrieval
    out = capsys.readouterr().out
    assert "held out for evaluation: 20 of the 200 rows" in out and "retrieval only" in out


def test_off_a_terminal_the_loop_prints_plain_lines(tmp_path, capsys):
    run(tmp_path, "--max_steps", "3", "--log_every", "1", "--progress", "true", name="lines")
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if " step " in line and "loss" in line] == \
        [["lines", "step"]] * 3
    assert "\r" not in out
    assert "wrote" in out and "model.pt" in out and "predictions.png" in out


def test_tensorboard_without_the_package_is_said_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    t, _ = run(tmp_path, "--max_steps", "1", "--tensorboard", name="tb")
    assert "tensorboard package is not installed" in capsys.readouterr().out and t.step == 1


@pytest.mark.parametrize("task", ["itm_mlm", "vqa", "detect", "classify"])
def test_every_adapter_says_where_it_started(runs, tmp_path, capsys, task):
    root, _ = runs
    cfg = train.resolved(train.parse_config(FAST + ["--task", task, "--init_from", str(root / "runs" / "pretrain-toy" /
                                                                                          "ckpt.pt"),
                                                    "--out_dir", str(tmp_path), "--det_channels", "16"]))
    t = train.Trainer(cfg, train.setup_distributed(cfg))
    t.lock.release()
    assert "runs/pretrain-toy/ckpt.pt (a --task pretrain checkpoint at step 4)" in capsys.readouterr().out
