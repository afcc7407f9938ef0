"""Do two runs log the same numbers? `python docs/experiments/compare_metrics.py A/metrics.jsonl B/metrics.jsonl`

Compares every record of two metrics.jsonl files field by field, leaving out the fields that measure time
(samples_per_s, wall_s, per_step_s), and prints IDENTICAL or the first record that differs. Used to check
that a change of layout leaves a run's losses and evaluations bit for bit as they were."""
import json
import sys

TIMING = {"samples_per_s", "wall_s", "per_step_s"}


def records(path):
    with open(path) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh if line.strip()]


def main(a, b):
    ra, rb = records(a), records(b)
    for x, y in zip(ra, rb):
        if x != y:
            print(f"DIFFER at step {x.get('step')}:\n  {a}: {x}\n  {b}: {y}")
            return 1
    if len(ra) != len(rb):
        print(f"DIFFER: {len(ra)} records vs {len(rb)}")
        return 1
    print(f"IDENTICAL: {len(ra)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
