"""One prepared GPU check: one call on a CUDA machine runs it end to end in under 10 minutes and prints one table.

    bash scripts/gpu_check.sh                         # one CUDA GPU (H100/H200: MFU against 989 TFLOP/s bf16)
    bash scripts/gpu_check.sh --device cpu --quick    # the same steps, tiny, on CPU (tests/test_bench.py runs it)

Steps, in order (each in its own process, each with its own time limit; a failure is a row, not the end):
  1. bench.py --device cuda --dtype bf16 --compile, CoSwin-T, batch 64: inference images/s (the Swin paper
     reports ~755 img/s for Swin-T on a V100) and the training step's MFU;
  2. the same for a UniCL training step on CoSwin-B + the CLIP-base text tower (MFU; aim: ≥ 40% on H100/H200);
  3. torchrun --nproc_per_node=1 train.py --device cuda --amp bf16 --preset base, 100 steps;
  4.–6. smokes of the same run for --fsdp, --amp fp16 (GradScaler) and --grad_ckpt (20 steps each); --fsdp
     runs one process per GPU (at most 2; on CPU two gloo processes).
--quick shrinks every step (toy models, 32² bench images, 1–2 training steps, no compile) so the plumbing can be
checked on a CPU; --amp fp16 needs CUDA and is reported as skipped there. Logs and JSON go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def bench_step(name: str, component: str, args, out: Path) -> dict:
    cuda = args.device.startswith("cuda")
    json_path = out / f"bench_{component}.json"
    cmd = [PY, "bench.py", "--device", args.device, "--only", component, "--out", str(json_path)]
    if args.quick:
        cmd += ["--dtype", "fp32", "--batch", "2", "--img_size", "32", "--warmup", "0", "--iters", "1"]
    else:
        cmd += ["--dtype", "bf16" if cuda else "fp32", "--batch", "64", "--warmup", "3", "--iters", "10"]
        cmd += ["--compile"] if cuda else []

    def result(_stdout: str) -> str:
        data = json.loads(json_path.read_text())
        row, peak = data["rows"][0], data.get("peak_flop_s")
        frac = f"{row['train_flop_s'] / peak:.0%} of {'the card' if cuda else 'the measured matmul'} peak" if peak else "no peak known"
        return (f"inference {row['fwd_samples_s']:.0f} img/s; training {row['train_samples_s']:.0f} samples/s, "
                f"{row['train_flop_s'] / 1e12:.1f} TFLOP/s, {frac}")
    return {"name": name, "cmd": cmd, "result": result}


def train_step(name: str, extra: list[str], steps: int, args, out: Path, procs: int = 1) -> dict:
    run = name.split()[0].replace("/", "_")
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "train.py", "--device", args.device,
           "--out_dir", str(out / "runs"), "--name", run, "--overwrite", "--progress", "false",
           "--eval_every", "0", "--ckpt_every", "100000", "--max_steps", str(1 if args.quick and steps < 100 else
                                                                              2 if args.quick else steps)]
    if args.quick:
        cmd += ["--preset", "toy", "--amp", "off", "--batch_size", "8", "--eval_size", "16", "--tokenizer_texts", "200"]
    else:
        cmd += ["--preset", "base", "--batch_size", "64", "--eval_size", "256", "--workers", "4"]
    cmd += extra

    def result(_stdout: str) -> str:
        rows = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r and "samples_per_s" in r]
        if not train:
            return "no training record in metrics.jsonl"
        last = train[-1]
        return (f"step {last['step']}: loss {train[0]['loss']:.3f} → {last['loss']:.3f}, "
                f"{last['samples_per_s']:.0f} samples/s")
    return {"name": name, "cmd": cmd, "result": result}


def gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def plan(args, out: Path) -> list[dict]:
    cuda = args.device.startswith("cuda")
    img = "toy" if args.quick else "CoSwin-T"
    steps = [bench_step(f"bench {img}" + (", bf16, compiled, batch 64" if cuda and not args.quick else ""),
                        "coswin-toy" if args.quick else "coswin-t", args, out),
             bench_step("bench UniCL step " + ("(toy towers)" if args.quick else "(CoSwin-B + CLIP-base text)"),
                        "unicl-step-toy" if args.quick else "unicl-step-b", args, out),
             train_step("train 100 steps" + ("" if cuda else " (quick: 2)"), ["--amp", "bf16"] if cuda else [], 100,
                        args, out),
             # FSDP shards over the processes: on CPU two gloo processes; on CUDA one per GPU (at most 2)
             train_step("fsdp smoke", ["--fsdp"] + (["--amp", "bf16"] if cuda else []), 20, args, out,
                        procs=min(2, gpu_count()) if cuda else 2)]
    if cuda:
        steps.append(train_step("fp16 smoke (GradScaler)", ["--amp", "fp16"], 20, args, out))
    else:
        steps.append({"name": "fp16 smoke (GradScaler)", "cmd": None, "skip": "needs CUDA (train.py refuses fp16 on CPU)"})
    steps.append(train_step("grad_ckpt smoke", ["--grad_ckpt"] + (["--amp", "bf16"] if cuda else []), 20, args, out))
    return steps


def run_steps(steps: list[dict], out: Path, limit_s: float) -> list[dict]:
    rows = []
    for i, step in enumerate(steps):
        if step.get("cmd") is None:
            rows.append({"check": step["name"], "status": "skipped", "wall_s": 0.0, "result": step["skip"]})
            continue
        log = out / f"step{i + 1}.log"
        t0 = time.time()
        try:
            with open(log, "w") as fh:
                proc = subprocess.run(step["cmd"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit_s,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({limit_s:.0f} s)"
        wall = time.time() - t0
        text = log.read_text(errors="replace")
        try:
            result = step["result"](text) if status == "ok" else text.strip().splitlines()[-1][:160] if text.strip() else ""
        except (OSError, ValueError, KeyError, IndexError) as e:
            status, result = "failed (no result)", f"{type(e).__name__}: {e}"
        rows.append({"check": step["name"], "status": status, "wall_s": wall, "result": result,
                     "command": " ".join(str(c) for c in step["cmd"]).replace(PY, "python"), "log": str(log)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| check | status | wall s | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['status']} | {r['wall_s']:.0f} | {r['result']} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ×{os.cpu_count()}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="every step tiny (toy models, a step or two), e.g. on CPU")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for logs, JSON and run folders")
    p.add_argument("--step_limit_s", type=float, default=0.0, help="time limit of one step (default 150, quick 300)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = run_steps(plan(args, out), out, args.step_limit_s or (300.0 if args.quick else 150.0))
    print(f"gpu_check on {machine(args.device)}: {time.time() - t0:.0f} s in all")
    print(table(rows))
    (out / "gpu_check.json").write_text(json.dumps({"machine": machine(args.device), "rows": rows}, indent=1))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
