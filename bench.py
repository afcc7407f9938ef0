"""Benchmarks: throughput (and peak memory on CUDA) of each component. Benchmarks measure; tests assert.

    python bench.py coswin --preset tiny --img 224 --batch 8          # CPU: images/s, fwd and fwd+bwd
    python bench.py coswin --preset base --img 224 --batch 64 --device cuda --amp bf16

Each figure is the median over `--iters` timed iterations after `--warmup` untimed ones. Put the
printed line, with the machine's name, in the README.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU, {torch.get_num_threads()} threads"


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def bench_coswin(args) -> dict:
    import coswin

    device = torch.device(args.device)
    model = coswin.build(args.preset, embed=args.embed).to(device)
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    result = {"component": f"coswin-{args.preset} ({args.embed})", "img": args.img, "batch": args.batch,
              "amp": args.amp, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}

    model.eval()

    def fwd():
        with torch.no_grad(), autocast(device, args.amp):
            model(x)

    result["fwd_img_s"] = round(args.batch / time_it(fwd, device, args.warmup, args.iters), 1)

    model.train()

    def fwd_bwd():
        with autocast(device, args.amp):
            out = model(x)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["fwd_bwd_img_s"] = round(args.batch / time_it(fwd_bwd, device, args.warmup, args.iters), 1)
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


BENCHES = {"coswin": bench_coswin}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=sorted(BENCHES))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--embed", default="conv", choices=["conv", "patch"])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    result = BENCHES[args.what](args)
    result["machine"] = machine_name(torch.device(args.device))
    result["torch"] = torch.__version__
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
