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
