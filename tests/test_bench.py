"""bench.py's smoke test: one tiny component yields positive, finite figures (nothing is timed against a bar)."""
import math

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
