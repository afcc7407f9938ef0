"""bench.py's smoke tests: one tiny component yields positive, finite figures; versions side by side (--official,
--ab) are checked to compute the same function before they are timed; scripts/gpu_check.sh runs tiny on CPU.
Nothing is timed against a bar."""
import math

import pytest
import torch

import bench


def test_bench_runs_a_tiny_component_and_reports_finite_figures(tmp_path, capsys):
    out = tmp_path / "b.json"
    rows = bench.main(["--only", "coswin-toy", "--device", "cpu", "--batch", "2", "--img_size", "32",
                       "--warmup", "0", "--iters", "1", "--out", str(out)])
    (row,) = rows
    for k in ("fwd_samples_s", "train_samples_s", "flops_fwd", "flops_train", "train_flop_s"):
        assert math.isfinite(row[k]) and row[k] > 0, k
    assert row["flops_train"] > 2 * row["flops_fwd"]  # backward costs about twice the forward
    assert out.is_file() and "coswin-toy" in capsys.readouterr().out


def test_every_model_traces_for_torch_compile_without_graph_breaks():
    # torch.compile must see each model (CoSwin, the text tower, Video CoSwin, DyHead, METER) as one
    # graph; a host read-back (e.g. an input check's bool(tensor)) or an untraceable op would split it
    import torch
    import torch._dynamo as dynamo

    import coswin
    import dynamic_head
    import meter
    import text_encoder
    import video_coswin

    torch.manual_seed(0)
    tokens = torch.randint(4, 100, (2, 16))
    tokens[:, 10], tokens[:, 11:] = 2, 0  # end-of-text, then padding
    cases = {
        "coswin": (coswin.build("toy"), (torch.randn(2, 3, 32, 32),)),
        "text": (text_encoder.build("toy"), (tokens,)),
        "video": (video_coswin.VideoCoSwin.from_image_model(coswin.build("toy"), 2), (torch.randn(2, 3, 4, 32, 32),)),
        "dynamic_head": (dynamic_head.Detector(coswin.build("toy"), dynamic_head.build_config("toy"), num_classes=3),
                         (torch.randn(1, 3, 64, 64),)),
        "meter": (meter.build("toy", coswin.build("toy"), text_encoder.build("toy", causal=False)),
                  (torch.randn(2, 3, 64, 64), tokens)),
    }
    for name, (model, args) in cases.items():
        dynamo.reset()
        report = dynamo.explain(model.train())(*args)
        assert report.graph_break_count == 0, (name, [str(r.reason) for r in report.break_reasons])


# A stand-in for microsoft/Swin-Transformer's models/swin_transformer.py (the real file is never in this
# repository): its constructor, its timm imports (provided by bench.py's shim when timm is absent) and the
# official state-dict layout, which is ours.
STAND_IN = '''
from timm.models.layers import DropPath, to_2tuple, trunc_normal_

import coswin


class SwinTransformer(coswin.CoSwin):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.1, **kwargs):
        assert to_2tuple(patch_size) == (4, 4) and callable(trunc_normal_) and DropPath(0.5).drop_prob == 0.5
        super().__init__(coswin.CoSwinConfig(embed="patch", in_chans=in_chans, embed_dim=embed_dim,
                                             depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                                             num_classes=num_classes, drop_path_rate=drop_path_rate))
        self.offset = OFFSET

    def forward(self, x):
        return super().forward(x) + self.offset
'''


def _checkout(tmp_path, offset=0.0):
    models = tmp_path / "Swin-Transformer" / "models"
    models.mkdir(parents=True)
    (models / "swin_transformer.py").write_text(STAND_IN.replace("OFFSET", repr(offset)))
    return models.parent


def test_official_comparison_checks_the_outputs_then_prints_the_ratios(tmp_path, capsys):
    import json
    import sys

    out = tmp_path / "o.json"
    args = ["--official", str(_checkout(tmp_path)), "--device", "cpu", "--batch", "1", "--img_size", "64",
            "--warmup", "0", "--iters", "1", "--out", str(out)]
    rows = bench.main(args)
    assert [r["version"].split(",")[0] for r in rows] == ["official Swin-T (microsoft/Swin-Transformer)", "ours", "ours"]
    assert rows[0]["train_speed_vs_first"] == 1.0 and all(r["train_samples_s"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "ours/official Swin-T, forward+backward:" in text and "CoSwin-T/Swin-T (ours), forward+backward:" in text
    assert "load average" in text and len(json.loads(out.read_text())["rows"]) == 3
    if "timm" in sys.modules and not hasattr(sys.modules["timm"], "__file__"):  # the shim: timm 0.4.12's drop path
        drop = sys.modules["timm.models.layers"].DropPath(0.5)
        assert drop.eval()(torch.ones(2)).tolist() == [1.0, 1.0]
        assert set(drop.train()(torch.ones(4000, 1)).flatten().tolist()) == {0.0, 2.0}
    # a version that does not compute the same function from the same weights is refused, not timed
    with pytest.raises(SystemExit, match="does not compute what"):
        bench.main(["--official", str(_checkout(tmp_path / "off", offset=0.5)), *args[2:]])


def test_ab_builds_the_older_version_from_its_folder_and_gives_the_modules_back(tmp_path):
    import sys

    import coswin

    old = tmp_path / "before"
    old.mkdir()
    src = open(coswin.__file__).read()
    (old / "coswin.py").write_text(src)
    rows = bench.main(["--only", "coswin-toy", "--ab", str(old), "--device", "cpu", "--batch", "1", "--img_size", "32",
                       "--warmup", "0", "--iters", "1", "--out", ""])
    assert [r["version"] for r in rows] == [f"before ({old})", "this checkout"]
    assert sys.modules["coswin"] is coswin  # the checkout's module is back
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    frag = "self.scale = (dim // num_heads) ** -0.5"
    assert src.count(frag) == 1
    (wrong / "coswin.py").write_text(src.replace(frag, "self.scale = (dim // num_heads) ** -0.25"))
    with pytest.raises(SystemExit, match="does not compute what"):
        bench.main(["--only", "coswin-toy", "--ab", str(wrong), "--device", "cpu", "--batch", "1", "--img_size", "32",
                    "--warmup", "0", "--iters", "1", "--out", ""])
    assert sys.modules["coswin"] is coswin


def test_dyhead_component_is_the_six_paper_blocks_on_a_p3_to_p7_pyramid():
    import argparse

    args = argparse.Namespace(batch=1, img_size=224, device="cpu")
    model, forward, _ = bench.COMPONENTS["dyhead"].build(args)
    assert bench.pyramid_sizes(224) == [28, 14, 7, 4, 2] and bench.pyramid_sizes(200) == [25, 13, 7, 4, 2]
    assert len(model.blocks) == 6 and model.blocks[0].offset.in_channels == 256


@pytest.mark.slow  # five short processes (two bench runs, three torchrun launches of train.py)
def test_gpu_check_runs_its_steps_tiny_on_cpu_and_prints_one_table(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    root = Path(bench.__file__).parent
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # header and the six checks
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [x["status"] for x in rows] == ["ok", "ok", "ok", "ok", "skipped", "ok"]
    assert "inference" in rows[0]["result"] and "loss" in rows[2]["result"] and "--fsdp" in rows[3]["command"]
