"""Runs a user can trust (train.py, run_folder.py, data/accounting.py): no hang, no lost run, exact resume
on real data (a CSV read by a worker, tar shards), every skipped sample counted where it shows, early and
clear failures; and the pretraining recipe's stages on real data."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import run_folder
from data import ShapesText, write_shards
from tasks.pretrain import Stage2Data
from test_train import FAST, ROOT, losses, make_trainer, weights


@pytest.fixture(scope="module")
def shapes():
    return ShapesText("train", length=48, img_size=32)


def write_csv(root, shapes, n=32, missing=(), captions=None):
    """n images of ShapesText as PNG files and a CSV of (filepath, title); rows in `missing` name no file."""
    os.makedirs(root / "imgs", exist_ok=True)
    rows = ["filepath,title"]
    for i in range(n):
        if i not in missing:
            Image.fromarray(shapes.image_uint8(i)).save(root / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{captions[i] if captions else shapes.scene(i)['text']}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'pairs.csv'}"


def write_class_folder(root, shapes, n: int) -> str:
    """n ShapesText images as PNG files in two class subfolders (circles, squares) of `root`: folder:ROOT."""
    for i in range(n):
        d = root / ("circles" if i % 2 else "squares")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shapes.image_uint8(i)).save(d / f"{i}.png")
    return f"folder:{root}"


def interrupted_then_resumed(tmp_path, *flags):
    """(weights and losses of an uninterrupted 6-step run, the same of a run stopped by SIGTERM in step 3
    and resumed with --resume auto)."""
    steps = ["--max_steps", "6", "--eval_every", "100", "--ckpt_every", "100", "--batch_size", "8", *flags]
    full = make_trainer(tmp_path, *steps, name="full")
    full.fit()
    part = make_trainer(tmp_path, *steps, name="part")
    real = part.train_step

    def step_then_preempt(batches):
        out = real(batches)
        if part.step == 2:
            part._on_signal(signal.SIGTERM, None)
        return out

    part.train_step = step_then_preempt
    part.fit()
    assert part.step == 3 and part.stopped_by == signal.SIGTERM
    resumed = make_trainer(tmp_path, *steps, "--resume", "auto", name="part")
    assert resumed.step == 3
    resumed.fit()
    return (weights(full), losses(tmp_path / "full")), (weights(resumed), losses(tmp_path / "part"))


@pytest.mark.parametrize("source", ["csv_worker", "shards"])
def test_sigterm_then_resume_auto_equals_the_uninterrupted_run_on_real_data(tmp_path, shapes, source):
    if source == "csv_worker":  # a CSV with random crops read by one DataLoader worker
        flags = ["--data", write_csv(tmp_path, shapes), "--workers", "1"]
    else:  # tar shards read in this process: re-read batches must not use up the restored random state
        write_shards(((f"{i:04d}", Image.fromarray(shapes.image_uint8(i)), shapes.scene(i)["text"]) for i in range(40)),
                     str(tmp_path / "shards"), per_shard=10)
        flags = ["--data", f"shards:{tmp_path / 'shards'}"]
    (w_full, l_full), (w_res, l_res) = interrupted_then_resumed(tmp_path, *flags)
    assert l_full == l_res
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k


def test_a_second_run_on_a_finished_or_live_name_leaves_the_first_untouched(tmp_path):
    first = make_trainer(tmp_path, "--max_steps", "2", "--eval_every", "100", name="keep")
    first.fit()
    run = tmp_path / "keep"
    before = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "config.json")}
    with pytest.raises(SystemExit, match=r"already holds a run.*--resume auto.*--name.*--overwrite"):
        make_trainer(tmp_path, "--max_steps", "20", name="keep")
    assert before == {f: (run / f).read_bytes() for f in before}
    # a live process owns the run: refused; once it is gone its lock is taken over, with a note
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": os.uname().nodename, "pid": other.pid, "since": "now"}
        (run / "lock").write_text(json.dumps(lock))
        with pytest.raises(SystemExit, match=rf"in use by process {other.pid}"):
            make_trainer(tmp_path, "--resume", "auto", name="keep")
        assert before == {f: (run / f).read_bytes() for f in before}
    finally:
        other.kill()
        other.wait()
    (run / "lock").write_text(json.dumps({"host": "another-machine", "pid": 1, "since": "now"}))
    with pytest.raises(SystemExit, match="in use by process 1 on another-machine"):  # cannot be checked: live
        make_trainer(tmp_path, "--resume", "auto", name="keep")
    (run / "lock").write_text(json.dumps({**lock, "pid": other.pid}))  # the finished process's lock
    again = make_trainer(tmp_path, "--resume", "auto", "--max_steps", "3", name="keep")
    assert json.loads((run / "lock").read_text())["pid"] == os.getpid()
    again.fit()
    assert not (run / "lock").exists()  # released when the run ends
    # --overwrite starts afresh on purpose
    fresh = make_trainer(tmp_path, "--max_steps", "1", "--overwrite", name="keep")
    assert fresh.step == 0


def _run_cli(args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_data_that_forms_no_batch_stops_in_seconds_with_counts_and_reasons(tmp_path, shapes):
    spec = write_csv(tmp_path, shapes, n=24, missing=range(24))  # every image is missing
    t0 = time.time()
    p = _run_cli(FAST + ["--data", spec, "--max_steps", "5", "--out_dir", str(tmp_path), "--name", "nobatch"])
    assert p.returncode != 0 and time.time() - t0 < 120
    err = p.stderr.strip().splitlines()[-1]
    assert "no training batch could be formed" in err and "missing" in err and ".png: the image file does not exist" in err, err
    # tar shards with fewer samples than one batch: an epoch that forms no batch stops the run too
    write_shards(((f"{i:04d}", Image.fromarray(shapes.image_uint8(i)), "a red circle") for i in range(3)),
                 str(tmp_path / "few"), per_shard=2)  # two shards: the last is held out, two samples train
    p = _run_cli(FAST + ["--data", f"shards:{tmp_path / 'few'}", "--out_dir", str(tmp_path), "--name", "few"])
    assert p.returncode != 0 and "formed no micro-batch of 16 samples" in p.stderr, p.stderr[-2000:]


def test_skipped_samples_are_counted_by_kind_in_the_log_and_the_end_record(tmp_path, shapes, capsys):
    spec = write_csv(tmp_path, shapes, n=32, missing=(3, 7, 11))
    t = make_trainer(tmp_path, "--data", spec, "--max_steps", "4", "--batch_size", "8", "--eval_every", "100",
                     "--eval_data", "synthetic", name="skips")
    t.fit()
    rows = [json.loads(line) for line in open(tmp_path / "skips" / "metrics.jsonl")]
    end = rows[-1]
    assert end["event"] == "end" and end["samples_read"] == 32 and end["skipped_samples"] == 3
    assert end["skipped_by_kind"] == {"missing": 3}
    assert [r["skipped_samples"] for r in rows if "loss" in r] == sorted(r["skipped_samples"] for r in rows if "loss" in r)
    out = capsys.readouterr().out
    assert "3 samples skipped (3 missing) of 32 read" in out
    assert "WARNING: 9.4% of the training samples read were skipped" in out  # above 5%: said loudly
    assert "first reasons: skipping " in out and "imgs/3.png: the image file does not exist" in out  # named


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, "--max_steps", "3", "--ckpt_every", "1", "--eval_every", "100", name="disk")
    real = torch.save
    calls = []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"could not write the checkpoint .*ckpt.pt \(the disk is full\)"):
        t.fit()
    files = sorted(os.listdir(tmp_path / "disk"))
    assert not [f for f in files if ".tmp." in f]  # the partial file is gone
    assert torch.load(tmp_path / "disk" / "ckpt.pt", weights_only=True)["step"] == 1  # the last good one
    monkeypatch.setattr(torch, "save", real)
    t2 = make_trainer(tmp_path, "--max_steps", "3", "--ckpt_every", "1", "--resume", "auto", name="disk")
    assert t2.step == 1


def test_resume_auto_falls_back_to_the_previous_checkpoint_when_the_newest_is_unreadable(tmp_path, capsys):
    make_trainer(tmp_path, "--max_steps", "2", "--ckpt_every", "1", "--eval_every", "100", name="prev").fit()
    assert torch.load(tmp_path / "prev" / run_folder.PREVIOUS, weights_only=True)["step"] == 1
    (tmp_path / "prev" / "ckpt.pt").write_bytes(b"cut short")
    t = make_trainer(tmp_path, "--max_steps", "2", "--resume", "auto", name="prev")
    assert t.step == 1 and "resuming from" in capsys.readouterr().out


def test_resume_extends_the_run_and_records_changed_flags(tmp_path, capsys):
    make_trainer(tmp_path, "--max_steps", "2", "--eval_every", "100", name="ext").fit()
    t = make_trainer(tmp_path, "--max_steps", "4", "--lr", "5e-4", "--eval_every", "100", "--resume", "auto",
                     name="ext")
    assert t.total_steps == 4
    t.fit()
    assert t.step == 4
    out = capsys.readouterr().out
    assert "--lr 0.001 → 0.0005" in out
    history = [json.loads(line) for line in open(tmp_path / "ext" / "config_history.jsonl")]
    assert history[0]["changed"] == {} and history[1]["changed"] == {"lr": [0.001, 0.0005]}
    assert json.load(open(tmp_path / "ext" / "config.json"))["lr"] == 0.0005


def test_sigterm_saves_then_exits_with_its_own_status(tmp_path):
    args = FAST + ["--max_steps", "100000", "--eval_every", "0", "--ckpt_every", "0", "--out_dir", str(tmp_path),
                   "--name", "term"]
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and "loss" in metrics.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1
    assert json.loads(metrics.read_text().splitlines()[-1])["event"] == "stopped"


def test_intervals_of_zero_are_off(tmp_path):
    t = make_trainer(tmp_path, "--max_steps", "3", "--eval_every", "0", "--ckpt_every", "0", "--log_every", "0",
                     name="off")
    t.fit()
    rows = [json.loads(line) for line in open(tmp_path / "off" / "metrics.jsonl")]
    assert [r.get("event") for r in rows] == ["eval", "end"]  # the final evaluation and the end, nothing periodic
    assert torch.load(tmp_path / "off" / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("flag,value,rule", [("lr", "-1", "0 or more"), ("workers", "-1", "0 or more"),
                                             ("img_size", "-64", "0 or more"), ("drop_path", "2", r"in \[0, 1\) \(or below 0 for the preset's\)"),
                                             ("batch_size", "0", "at least 1"), ("beta2", "1.5", r"in \[0, 1\)")])
def test_numeric_flags_are_range_checked_with_one_sentence(flag, value, rule):
    from train import parse_config

    with pytest.raises(SystemExit, match=rf"--{flag} must be {rule}, got"):
        parse_config([f"--{flag}", value])


def test_a_held_out_set_without_classes_is_said_before_the_first_step(tmp_path, shapes, capsys):
    spec = write_csv(tmp_path, shapes, n=16)
    make_trainer(tmp_path, "--eval_data", spec, name="early")  # a CSV has no classes: said at once
    assert "has captions but no class names: evaluation measures image↔text retrieval only" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot build the held-out data"):
        make_trainer(tmp_path, "--eval_data", f"csv:{tmp_path}/missing.tsv", name="early2")


def test_a_two_class_folder_evaluates_draws_and_ends(tmp_path, shapes):
    t = make_trainer(tmp_path, "--eval_data", write_class_folder(tmp_path / "val", shapes, 12), "--max_steps", "2",
                     "--eval_every", "100", name="two")
    metrics = t.fit()
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert rows[-1]["event"] == "end" and 0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] == 1.0
    assert (tmp_path / "two" / "predictions.png").is_file()


def test_a_batch_without_negatives_is_said_once(tmp_path, capsys):
    make_trainer(tmp_path, "--batch_size", "1", "--max_steps", "3", "--eval_every", "100", name="one").fit()
    assert capsys.readouterr().out.count("has no negatives") == 1


# ----------------------------------------------------------------------------------------------------
# The pretraining stages on real data (paper §2.2: stage 2 drops the texts stage 1 wrapped in templates)


def test_stage2_drops_the_short_texts_of_a_csv_and_keeps_batches_full(tmp_path, shapes):
    words = ["dog", "golden retriever", "a dog on the grass", "a photo of a dog."]
    spec = write_csv(tmp_path, shapes, n=32, captions=[words[i % 4] for i in range(32)])
    t = make_trainer(tmp_path, "--data", spec, "--stage", "2", "--max_steps", "2", "--batch_size", "8",
                     "--eval_every", "100", "--eval_data", "synthetic", name="s2")
    ds = t.task.train_dataset()
    assert isinstance(ds, Stage2Data) and len(ds) == 32
    texts = [ds[i]["text"] for i in range(len(ds))]
    assert set(texts) == {"a dog on the grass", "a photo of a dog."}  # every slot filled by a natural caption
    assert [ds[i]["text"] for i in range(len(ds))] == texts  # the same draws every time (and after a resume)
    assert all(texts[i] == words[i % 4] for i in range(32) if i % 4 >= 2)  # a natural caption keeps its slot
    batch = t.next_batch(t.batches())
    assert len(batch["text"]) == 8  # a full batch, on every rank
    spec = write_csv(tmp_path / "short", shapes, n=8, captions=["dog"] * 8)
    with pytest.raises(SystemExit, match="--stage 2 drops every text"):
        make_trainer(tmp_path, "--data", spec, "--stage", "2", name="s2short")


def test_the_384_phase_started_from_stage_2_stays_at_stage_2(tmp_path):
    make_trainer(tmp_path, "--stage", "2", "--max_steps", "1", "--eval_every", "100", name="st2").fit()
    ckpt = str(tmp_path / "st2" / "ckpt.pt")
    hi = make_trainer(tmp_path, "--img_size", "64", "--window_size", "4", "--init_from", ckpt, name="hi")
    assert hi.cfg.stage == 2 and isinstance(hi.task.train_dataset(), Stage2Data)
    assert json.load(open(tmp_path / "hi" / "config.json"))["stage"] == 2
    texts = [hi.task.train_dataset()[i]["text"] for i in range(40)]
    assert all(len(t.split()) > 2 for t in texts)  # no bare class name: nothing for a template to wrap
    again = make_trainer(tmp_path, "--stage", "1", "--init_from", ckpt, name="back")  # said explicitly: taken
    assert again.cfg.stage == 1
    assert make_trainer(tmp_path, name="plain").cfg.stage == 1


def test_an_unreadable_vqa_question_scores_zero_and_is_counted(tmp_path):
    from torch.utils.data import Dataset

    t = make_trainer(tmp_path, "--task", "vqa", "--img_size", "32", "--batch_size", "4", "--eval_size", "16",
                     "--max_minutes", "0", name="vqa")
    task, model = t.task, t.model
    full = task.evaluate(model, 0)

    class Holes(Dataset):  # the same questions, four of them without a readable image
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return None if i < 4 else self.ds[i]

    good = task.predict(model, 16)
    held = task.eval_dataset()
    task._eval = Holes(held)
    holed = task.evaluate(model, 0)
    assert holed["vqa_unreadable"] == 4
    import meter

    scores = meter.vqa_metric(good[0], good[1])
    assert holed["vqa_score"] == pytest.approx(float(scores[4:].sum()) / 16)
    assert holed["vqa_score"] <= full["vqa_score"] + 1e-9 or float(scores[:4].sum()) == 0


def test_tar_shards_hold_out_their_last_shard_and_one_shard_is_refused(tmp_path, shapes):
    write_shards(((f"{i:04d}", Image.fromarray(shapes.image_uint8(i)), shapes.scene(i)["text"]) for i in range(30)),
                 str(tmp_path / "sh"), per_shard=10)
    t = make_trainer(tmp_path, "--data", f"shards:{tmp_path / 'sh'}", "--max_steps", "1", name="held")
    train, held = t.task._train, t.task.eval_dataset()
    assert len(train.shards) == 2 and held.shards == [sorted(train.shards + held.shards)[-1]]
    assert json.loads((tmp_path / "held" / "holdout_rows.json").read_text())["shards"] == held.shards
    assert not held.shuffle  # read whole, in order, without augmentation
    write_shards(((f"{i:04d}", Image.fromarray(shapes.image_uint8(i)), "a red circle") for i in range(4)),
                 str(tmp_path / "one"))
    with pytest.raises(SystemExit, match="one tar shard.*--eval_data"):
        make_trainer(tmp_path, "--data", f"shards:{tmp_path / 'one'}", "--max_steps", "1", name="one")
