"""Time two versions of a training command alternately on one machine, the fair way on a shared CPU.

    python docs/experiments/alternate_runs.py --before /tmp/old-checkout --after . --repeats 3
    python docs/experiments/alternate_runs.py --before . --after . --after_flags "--max_steps 1800"

Runs `python train.py FLAGS` in each checkout (before, after, before, after, ...: each pair meets the same
load), times each process from start to exit, reads the last evaluation of its metrics.jsonl and prints one
markdown table: every run's wall time and final metric, the medians, and the evaluation curve of each.
Run it alone: anything beside it (tests, another run) is timed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time


def run_once(checkout: str, flags: list[str], out_dir: str, name: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "train.py", *flags, "--out_dir", out_dir, "--name", name,
                        "--progress", "false"], cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"alternate_runs.py: {name} in {checkout} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {"wall_s": wall, "rows": rows}


def curve(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(r["step"], r[metric]) for r in rows if metric in r and r.get("event") != "end"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="checkout of the version to compare against")
    ap.add_argument("--after", required=True, help="checkout of the new version")
    ap.add_argument("--before_flags", default="", help="train.py flags of the before runs (one string)")
    ap.add_argument("--after_flags", default="", help="train.py flags of the after runs (one string)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--metric", default="zeroshot_top1")
    ap.add_argument("--out_dir", default="/tmp/alternate_runs", help="where the runs' folders go")
    args = ap.parse_args(argv)
    versions = [("before", os.path.abspath(args.before), shlex.split(args.before_flags)),
                ("after", os.path.abspath(args.after), shlex.split(args.after_flags))]
    results = {label: [] for label, *_ in versions}
    for r in range(args.repeats):
        for label, checkout, flags in versions:
            out = os.path.join(os.path.abspath(args.out_dir), label)
            res = run_once(checkout, flags, out, f"{label}-{r}-{int(time.time())}")
            results[label].append(res)
            final = res["rows"][-1].get(args.metric, float("nan"))
            print(f"{label} run {r + 1}: {res['wall_s']:.1f} s, {args.metric} {final:.4f}", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end\n")
    print(f"| version | flags | wall s per run | median wall s | {args.metric} per run | median |")
    print("|---|---|---|---|---|---|")
    for label, _, flags in versions:
        walls = [x["wall_s"] for x in results[label]]
        finals = [x["rows"][-1].get(args.metric, float("nan")) for x in results[label]]
        print(f"| {label} | `{' '.join(flags) or '(defaults)'}` | {' / '.join(f'{w:.0f}' for w in walls)} | "
              f"{statistics.median(walls):.0f} | {' / '.join(f'{f:.3f}' for f in finals)} | "
              f"{statistics.median(finals):.3f} |")
    for label, *_ in versions:
        for i, x in enumerate(results[label]):
            pts = ", ".join(f"{s}: {v:.3f}" for s, v in curve(x["rows"], args.metric))
            print(f"{label} run {i + 1} curve: {pts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
