"""How many all-reduces the gradient cache's DDP path makes per step for a preset, against one per tensor.

    python docs/experiments/gradcache_collectives.py --preset florence

Builds the preset on the meta device (no memory, no weights) and sizes the buckets as
`train.all_reduce_mean` does: buckets of at least 25 MB, about eight of them.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import train  # noqa: E402
import unicl  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="florence", choices=sorted(unicl.PRESETS))
    ap.add_argument("--vocab_size", type=int, default=49408)
    args = ap.parse_args(argv)
    with torch.device("meta"):
        model = unicl.build(args.preset, vocab_size=args.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() * p.element_size() for p in params)
    buckets = train.grad_buckets(params, max(25 * 2 ** 20, -(-total // 8)))
    print(f"{args.preset}: {len(params)} parameter tensors, {total / 2 ** 30:.2f} GiB of gradients: "
          f"{len(params)} all-reduces one per tensor, {len(buckets)} in buckets")


if __name__ == "__main__":
    main()
