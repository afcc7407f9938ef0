"""Benchmarks: speed, memory and FLOPs of each component. Benchmarks measure; tests assert.

    python bench.py                                  # every component at its default size, CPU or GPU
    python bench.py --only swin-t,coswin-t --batch 8  # a subset
    python bench.py --device cuda --dtype bf16 --batch 64 --compile
    python bench.py --only unicl-step --grad_ckpt    # what activation checkpointing costs and saves
    python bench.py --only swin-t,dyhead --ab /tmp/before  # against an older version (files in /tmp/before)
    python bench.py --official ~/Swin-Transformer    # Swin-T against the official code, same weights

For each component: forward (eval, no grad) and forward+backward (train) samples/s as the median over
`--iters` timed runs after `--warmup` untimed ones (with the min–max spread), peak memory (CUDA max
allocated; on CPU the process's peak RSS, reset before each component where Linux allows), FLOPs per
sample counted by `torch.utils.flop_counter.FlopCounterMode`, and the achieved FLOP/s. On CPU the
machine's own fp32 matmul FLOP/s is measured too and each row says what fraction of it the component
reaches; on CUDA the fraction is MFU against `--peak_tflops` (H100/H200 dense bf16 by default).
Prints a markdown table and writes the rows as JSON (`--out`).

`--ab DIR` and `--official DIR` time versions of a model alternately in one process (each timed run of
one version followed by one of the other, medians compared), after checking that they compute the same
outputs from the same weights: `--ab` builds each component once from this checkout and once with the
modules in DIR imported instead (e.g. `git show <commit>:coswin.py > DIR/coswin.py`), `--official` builds
Swin-T from a checkout of microsoft/Swin-Transformer (its models/swin_transformer.py, read from DIR and
never part of this repository) beside ours with the same weights, and CoSwin-T beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------------------------------
# Machine


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{name} CPU ×{torch.get_num_threads()} threads"


# dense bf16 tensor-core peaks (TFLOP/s) used for MFU when --peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, iters: int = 10) -> float:
    """The machine's measured matmul FLOP/s for n×n @ n×n (the CPU's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_runs(lambda: a @ b, device, warmup=2, iters=iters)
    return 2 * n ** 3 / statistics.median(t)


# ----------------------------------------------------------------------------------------------------
# Measuring


def time_runs(fn: Callable, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) of this process
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return kb / 2 ** 20
    return None


def saved_activation_bytes(model: nn.Module, fn: Callable) -> int:
    """Bytes of the tensors autograd keeps for the backward while `fn` runs a forward (each storage once,
    parameters excluded): the activation memory of a training step, on any device, without allocator noise.
    Under activation checkpointing the checkpointed blocks keep only their inputs, so this is what
    --grad_ckpt saves (CPU peak RSS cannot show it: freed pages stay with the process)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers): skip
            return t
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def count_flops(fn: Callable) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------
# Components: each gives a model and a way to run it on a batch


@dataclass
class Component:
    name: str
    build: Callable[[argparse.Namespace], tuple[nn.Module, Callable, Callable]]
    # build(args) → (model, forward(model) → output, loss(output) → scalar)


def _images(args, size=None):
    s = size or args.img_size
    x = torch.randn(args.batch, 3, s, s, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def _coswin(preset: str, embed: str):
    def build(args):
        import coswin

        model = coswin.build(preset, embed=embed, grad_checkpointing=args.grad_ckpt)
        x = _images(args)
        return model, (lambda m: m(x)), (lambda out: out.float().square().mean())
    return build


def _text(preset: str):
    def build(args):
        import text_encoder

        model = text_encoder.build(preset, grad_checkpointing=args.grad_ckpt)
        L = model.cfg.context_length
        tokens = torch.randint(4, model.cfg.vocab_size, (args.batch, L), device=args.device)
        tokens[:, L // 2] = model.cfg.eot_id
        tokens[:, L // 2 + 1:] = model.cfg.pad_id
        return model, (lambda m: m(tokens)), (lambda out: out.float().square().mean())
    return build


def _unicl_step(image_preset: str, text_preset: str, embed_dim: int):
    """A full UniCL training step's model work: both towers, projections, the contrastive loss."""
    def build(args):
        import coswin
        import text_encoder
        import unicl

        model = unicl.Florence(coswin.build(image_preset, grad_checkpointing=args.grad_ckpt),
                               text_encoder.build(text_preset, grad_checkpointing=args.grad_ckpt), embed_dim)
        x = _images(args)
        L = model.text_encoder.cfg.context_length
        tokens = torch.randint(4, model.text_encoder.cfg.vocab_size, (args.batch, L), device=args.device)
        tokens[:, L // 2] = model.text_encoder.cfg.eot_id
        tokens[:, L // 2 + 1:] = model.text_encoder.cfg.pad_id
        keys = torch.arange(args.batch, device=args.device)
        return model, (lambda m: m(x, tokens)), (lambda out: unicl.unicl_loss(*out[:2], keys, out[2]))
    return build


def _out_loss(out) -> torch.Tensor:
    """A scalar touching every output tensor (dicts and lists of tensors included), for the backward."""
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    items = out.values() if isinstance(out, dict) else out
    return sum(_out_loss(o) for o in items if isinstance(o, (torch.Tensor, dict, list, tuple)))


def _dynamic_head(args):
    """DyHead-ATSS of the paper (6 blocks × 256 on P3–P7) on CoSwin-T, 80 fixed classes (COCO's)."""
    import coswin
    import dynamic_head

    backbone = coswin.build("tiny", grad_checkpointing=args.grad_ckpt)
    model = dynamic_head.Detector(backbone, dynamic_head.build_config("paper"), num_classes=80)
    x = _images(args)
    return model, (lambda m: m(x)), _out_loss


def pyramid_sizes(img_size: int, levels: int = 5) -> list[int]:
    """Sides of the P3–P7 maps of an img_size image (stride 8, then each level half the one before, rounded up)."""
    sizes = [-(-img_size // 8)]
    while len(sizes) < levels:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _dyhead(args):
    """The paper's 6 DyHead blocks (256 channels) alone on a P3–P7 pyramid of an --img_size image: the three
    attentions, with 13 modulated deformable convolutions per block, without the backbone."""
    import dynamic_head

    model = dynamic_head.DynamicHead(256, 6)
    feats = [torch.randn(args.batch, 256, s, s, device=args.device, requires_grad=True)
             for s in pyramid_sizes(args.img_size)]
    return model, (lambda m: m(feats)), _out_loss


def _dynamic_detr(args):
    """Dynamic DETR of the paper preset (6 encoder blocks, 300 queries, 6 decoder layers, 256 channels, P3–P7)
    on CoSwin-T, 80 fixed classes; the forward includes every decoder layer's outputs (auxiliary losses)."""
    import coswin
    import dynamic_detr

    backbone = coswin.build("tiny", grad_checkpointing=args.grad_ckpt)
    model = dynamic_detr.DynamicDETR(backbone, dynamic_detr.build_config("paper"), num_classes=80)
    x = _images(args)
    return model, (lambda m: m(x)), _out_loss


def _meter(args):
    """METER fusion (6 layers × 768 × 12 heads per modality) on CoSwin-T and a bidirectional CLIP-base text
    tower, with the ITM head, at 40 text tokens."""
    import coswin
    import meter
    import text_encoder

    image = coswin.build("tiny", grad_checkpointing=args.grad_ckpt)
    text = text_encoder.build("clip_base", causal=False, context_length=40, grad_checkpointing=args.grad_ckpt)
    model = meter.build("florence", image, text)
    x = _images(args)
    tokens = torch.randint(4, text.cfg.vocab_size, (args.batch, 40), device=args.device)
    tokens[:, 20:] = text.cfg.pad_id
    return model, (lambda m: m(x, tokens)), _out_loss


def _video(args):
    """Video CoSwin-T inflated from CoSwin-T (K_t = 2): clips of 8 frames at --img_size."""
    import coswin
    import video_coswin

    model = video_coswin.VideoCoSwin.from_image_model(coswin.build("tiny"), temporal_kernel=2)
    model.set_grad_checkpointing(args.grad_ckpt)
    s = args.img_size
    x = torch.randn(args.batch, 3, 8, s, s, device=args.device)
    return model, (lambda m: m(x)), _out_loss


COMPONENTS = {
    "coswin-toy": Component("coswin-toy", _coswin("toy", "conv")),
    "swin-t": Component("swin-t", _coswin("tiny", "patch")),
    "coswin-t": Component("coswin-t", _coswin("tiny", "conv")),
    "coswin-b": Component("coswin-b", _coswin("base", "conv")),
    "text-clip_base": Component("text-clip_base", _text("clip_base")),
    "unicl-step-toy": Component("unicl-step-toy", _unicl_step("nano", "toy", 128)),
    "unicl-step": Component("unicl-step", _unicl_step("tiny", "clip_base", 512)),
    "unicl-step-b": Component("unicl-step-b", _unicl_step("base", "clip_base", 512)),
    "unicl-step-florence": Component("unicl-step-florence", _unicl_step("huge", "florence", 1024)),
    "dynamic-head": Component("dynamic-head", _dynamic_head),
    "dyhead": Component("dyhead", _dyhead),
    "dynamic-detr": Component("dynamic-detr", _dynamic_detr),
    "meter": Component("meter", _meter),
    "video-coswin-t": Component("video-coswin-t", _video),
}
DEFAULT = ["swin-t", "coswin-t", "text-clip_base", "unicl-step", "dynamic-head", "dynamic-detr", "meter", "video-coswin-t"]


# ----------------------------------------------------------------------------------------------------
# One component


def set_reference_paths(model: nn.Module, args):
    """--plain_attn: the written-out attention math (CoSwin, Video CoSwin); --plain_windows: torch.roll and
    window_partition instead of one gather (CoSwin's SwinBlock). Both are levers to measure; tested equal."""
    for m in model.modules():
        if args.plain_attn and hasattr(m, "fused"):
            m.fused = False
        if getattr(args, "plain_windows", False) and hasattr(m, "gather_windows"):
            m.gather_windows = False


def autocast_for(args):
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_type = torch.device(args.device).type
    return lambda: torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()


def bench_component(comp: Component, args) -> dict:
    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    model, forward, loss_of = comp.build(args)
    model = model.to(device)
    set_reference_paths(model, args)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if args.compile else model
    params = sum(p.numel() for p in model.parameters())

    def fwd():
        with torch.no_grad(), autocast():
            forward(runner)

    def fwd_bwd():
        with autocast():
            out = forward(runner)
        loss_of(out).backward()
        for p in model.parameters():
            p.grad = None

    row = {"component": comp.name, "device": args.device, "dtype": args.dtype, "batch": args.batch,
           "img_size": args.img_size, "compile": args.compile, "grad_ckpt": args.grad_ckpt,
           "plain_attn": args.plain_attn, "channels_last": args.channels_last,
           "params_M": round(params / 1e6, 2)}
    model.eval()
    row["flops_fwd"] = count_flops(fwd) / args.batch
    reset_peak_memory(device)
    t = time_runs(fwd, device, args.warmup, args.iters)
    row["fwd_samples_s"] = args.batch / statistics.median(t)
    row["fwd_spread"] = [args.batch / max(t), args.batch / min(t)]
    row["fwd_peak_GiB"] = peak_memory_gib(device)
    model.train()
    row["flops_train"] = count_flops(fwd_bwd) / args.batch
    with autocast():
        row["saved_act_MiB"] = saved_activation_bytes(model, lambda: forward(model)) / 2 ** 20 / args.batch
    reset_peak_memory(device)
    t = time_runs(fwd_bwd, device, args.warmup, args.iters)
    row["train_samples_s"] = args.batch / statistics.median(t)
    row["train_spread"] = [args.batch / max(t), args.batch / min(t)]
    row["train_peak_GiB"] = peak_memory_gib(device)
    row["train_flop_s"] = row["flops_train"] * row["train_samples_s"]
    row["fwd_flop_s"] = row["flops_fwd"] * row["fwd_samples_s"]
    return row


def markdown(rows: list[dict], peak: float | None, peak_label: str) -> str:
    head = ("| component | device | dtype | batch | img | params | fwd samples/s | train samples/s (min–max) | "
            f"GFLOP/sample (train) | train TFLOP/s | {peak_label} | peak mem (train) | saved activations/sample |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        frac = f"{r['train_flop_s'] / peak:.0%}" if peak else "—"
        mem = f"{r['train_peak_GiB']:.2f} GiB" if r.get("train_peak_GiB") is not None else "—"
        lines.append(f"| {r['component']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['img_size']} | "
                     f"{r['params_M']}M | {r['fwd_samples_s']:.1f} | {r['train_samples_s']:.1f} "
                     f"({r['train_spread'][0]:.1f}–{r['train_spread'][1]:.1f}) | {r['flops_train'] / 1e9:.2f} | "
                     f"{r['train_flop_s'] / 1e12:.3f} | {frac} | {mem} | {r['saved_act_MiB']:.0f} MiB |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Versions side by side: this checkout against an older version of itself, or Swin-T against the official code


@contextlib.contextmanager
def modules_from(folder: str | None):
    """While active, `import coswin` (or any module with a file in `folder`) imports folder's file instead of
    this checkout's. Models built inside keep the code they were built with; afterwards the checkout's
    modules are back (modules first imported inside, which may hold folder's code, are dropped again)."""
    if folder is None:
        yield
        return
    folder = str(Path(folder).resolve())
    names = [f.stem for f in Path(folder).glob("*.py")]
    if not names:
        raise SystemExit(f"bench.py --ab: no .py files in {folder}; put the older versions of the modules there, "
                         "e.g. git show HEAD~1:coswin.py > {folder}/coswin.py")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    known = set(sys.modules)
    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for n in set(sys.modules) - known:
            f = getattr(sys.modules[n], "__file__", None) or ""
            if f.startswith((folder, here)):
                del sys.modules[n]
        sys.modules.update(saved)


def install_timm_shim():
    """models/swin_transformer.py imports DropPath, to_2tuple and trunc_normal_ from timm.models.layers; timm
    is no dependency of this project, so when it is not installed these three stand in, with the semantics
    of timm 0.4.12 (the version the official get_started.md pins): drop_path keeps a sample with probability
    1 − p, divides the branch by 1 − p and multiplies it by the 0/1 mask."""

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float = 0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
            return x / keep * mask

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = nn.init.trunc_normal_
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def load_official_swin(checkout: str):
    """The module models/swin_transformer.py of a microsoft/Swin-Transformer checkout (read from there)."""
    path = Path(checkout).expanduser() / "models" / "swin_transformer.py"
    if not path.is_file():
        raise SystemExit(f"bench.py --official: {path} not found; pass the folder of a clone of "
                         "https://github.com/microsoft/Swin-Transformer")
    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        install_timm_shim()
    spec = importlib.util.spec_from_file_location("official_swin_transformer", path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):  # its note that the optional CUDA window kernel is absent
        spec.loader.exec_module(module)
    return module


def _official_swin_t(checkout: str):
    """Swin-T as configs/swin/swin_tiny_patch4_window7_224.yaml (drop path 0.2), 1000 classes."""
    def build(args):
        official = load_official_swin(checkout).SwinTransformer(
            img_size=args.img_size, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.2)
        x = _images(args)
        return official, (lambda m: m(x)), (lambda out: out.float().square().mean())
    return build


def _ours_swin_t(official_model):
    def build(args):
        import coswin

        model = coswin.load_swin_checkpoint(official_model.state_dict(),
                                            coswin.build("tiny", embed="patch", num_classes=1000))
        x = _images(args)
        return model, (lambda m: m(x)), (lambda out: out.float().square().mean())
    return build


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for o in items for t in _tensors(o)]


def bench_versions(name: str, versions: list[tuple[str, Callable, bool]], args) -> list[dict]:
    """versions: (label, build, same_function). Each is built with the same seed; one that computes the same
    function as the first gets the first's weights (when the state dicts match) and must give its outputs
    on the first's input. Then forward, and forward+backward, are timed alternately, run by run."""
    device = torch.device(args.device)
    autocast = autocast_for(args)
    built = []
    for label, build, same in versions:
        torch.manual_seed(0)
        model, forward, loss_of = build(args)
        model = model.to(device)
        set_reference_paths(model, args)
        if same and built:
            ref_sd, sd = built[0][1].state_dict(), model.state_dict()
            if ref_sd.keys() == sd.keys() and all(ref_sd[k].shape == sd[k].shape for k in sd):
                model.load_state_dict(ref_sd)
        built.append((label, model, forward, loss_of, same))
    ref_label, ref_model, ref_forward = built[0][:3]
    with torch.no_grad(), autocast():
        ref_out = _tensors(ref_forward(ref_model.eval()))
        for label, model, _, _, same in built[1:]:
            if not same:
                continue
            out = _tensors(ref_forward(model.eval()))
            worst = max(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6))
                        for a, b in zip(out, ref_out))
            if len(out) != len(ref_out) or worst > (1e-4 if args.dtype == "fp32" else 3e-2):
                raise SystemExit(f"bench.py: {name} {label!r} does not compute what {ref_label!r} computes from the "
                                 f"same weights (largest difference {worst:.2e} of the output's scale); not timed")
    runs = []
    for label, model, forward, loss_of, _ in built:
        def fwd(model=model, forward=forward):
            with torch.no_grad(), autocast():
                forward(model)

        def fwd_bwd(model=model, forward=forward, loss_of=loss_of):
            with autocast():
                out = forward(model)
            loss_of(out).backward()
            for q in model.parameters():
                q.grad = None
        runs.append((fwd, fwd_bwd))
    times = {(i, kind): [] for i in range(len(built)) for kind in (0, 1)}
    for kind in (0, 1):
        for i, (label, model, *_rest) in enumerate(built):
            model.train(kind == 1)
        for r in range(args.warmup + args.iters):
            for i in (range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))):  # no version always first
                run = runs[i]
                sync(device)
                t0 = time.perf_counter()
                run[kind]()
                sync(device)
                if r >= args.warmup:
                    times[(i, kind)].append(time.perf_counter() - t0)
    rows = []
    for i, (label, *_rest) in enumerate(built):
        tf, tt = times[(i, 0)], times[(i, 1)]
        # speed against the first version: the median of the per-run ratios (each pair of runs back to back,
        # so both met the same load), steadier on a shared machine than the ratio of the two medians
        paired = {kind: statistics.median(a / b for a, b in zip(times[(0, kind)], times[(i, kind)])) for kind in (0, 1)}
        rows.append({"component": name, "version": label, "device": args.device, "dtype": args.dtype,
                     "batch": args.batch, "img_size": args.img_size, "iters": args.iters,
                     "fwd_samples_s": args.batch / statistics.median(tf),
                     "fwd_spread": [args.batch / max(tf), args.batch / min(tf)],
                     "train_samples_s": args.batch / statistics.median(tt),
                     "train_spread": [args.batch / max(tt), args.batch / min(tt)],
                     "fwd_speed_vs_first": paired[0], "train_speed_vs_first": paired[1]})
    return rows


def markdown_versions(rows: list[dict]) -> str:
    lines = ["| component | version | batch | fwd samples/s (min–max) | train samples/s (min–max) | "
             "speed vs the first row: fwd, train (median of paired runs) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['component']} | {r['version']} | {r['batch']} | {r['fwd_samples_s']:.2f} "
                     f"({r['fwd_spread'][0]:.2f}–{r['fwd_spread'][1]:.2f}) | {r['train_samples_s']:.2f} "
                     f"({r['train_spread'][0]:.2f}–{r['train_spread'][1]:.2f}) | "
                     f"{r['fwd_speed_vs_first']:.2f}×, {r['train_speed_vs_first']:.2f}× |")
    return "\n".join(lines)


def official_versions(args) -> list[tuple[str, Callable, bool]]:
    official_build = _official_swin_t(args.official)
    holder = {}

    def official(a):
        out = official_build(a)
        holder["model"] = out[0]
        return out
    return [("official Swin-T (microsoft/Swin-Transformer)", official, True),
            ("ours, Swin-T (embed='patch')", lambda a: _ours_swin_t(holder["model"])(a), True),
            ("ours, CoSwin-T (embed='conv')", _coswin("tiny", "conv"), False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma list of components (default: {','.join(DEFAULT)}); "
                                              f"all: {','.join(COMPONENTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--batch", type=int, default=0, help="default: 8 on CPU, 64 on CUDA")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad_ckpt", action="store_true")
    p.add_argument("--plain_attn", action="store_true",
                   help="the readable attention math instead of F.scaled_dot_product_attention (a lever to measure)")
    p.add_argument("--plain_windows", action="store_true",
                   help="torch.roll + window_partition instead of one gather (a lever to measure)")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format for the images and the model")
    p.add_argument("--ab", default="", metavar="DIR",
                   help="time each component against the version built from the modules in DIR, alternately")
    p.add_argument("--official", default="", metavar="DIR",
                   help="a microsoft/Swin-Transformer checkout: time its Swin-T, ours and CoSwin-T, alternately")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="CUDA peak for MFU (default: by card name)")
    p.add_argument("--out", default="bench.json", help="JSON file for the rows ('' to skip)")
    args = p.parse_args(argv)
    if not args.batch:
        args.batch = 64 if args.device.startswith("cuda") else 8
    return args


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    return "load average unknown"


def compare_versions(args, names: list[str]) -> list[dict]:
    """--official and --ab: versions side by side, timed alternately (see the module docstring)."""
    rows, load_before = [], load_average()
    if args.official:
        rows += bench_versions("swin-t", official_versions(args), args)
    if args.ab:
        def before(build):
            def built(a):
                with modules_from(args.ab):
                    return build(a)
            return built
        for n in names:
            rows += bench_versions(n, [(f"before ({args.ab})", before(COMPONENTS[n].build), True),
                                       ("this checkout", COMPONENTS[n].build, True)], args)
    machine = machine_name(torch.device(args.device))
    print(f"machine: {machine}, torch {torch.__version__}; {load_before} before, {load_average()} after")
    print(markdown_versions(rows))
    if args.official:
        _, swin, coswin_t = rows[:3]
        print(f"ours/official Swin-T, forward+backward: {swin['train_speed_vs_first']:.2f}× "
              f"(forward {swin['fwd_speed_vs_first']:.2f}×); CoSwin-T/Swin-T (ours), forward+backward: "
              f"{coswin_t['train_speed_vs_first'] / swin['train_speed_vs_first']:.2f}× "
              f"(forward {coswin_t['fwd_speed_vs_first'] / swin['fwd_speed_vs_first']:.2f}×); medians of paired runs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "load": [load_before, load_average()],
                       "rows": rows}, f, indent=1)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or DEFAULT
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise SystemExit(f"bench.py: unknown component(s) {unknown}; choose from {sorted(COMPONENTS)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.official or args.ab:
        return compare_versions(args, names)
    if device.type == "cuda":
        peak = (args.peak_tflops or default_peak_tflops(device) or 0) * 1e12 or None
        label = "MFU"
    else:
        peak = matmul_flops(device, torch.float32)
        label = "of matmul peak"
    rows = []
    for n in names:
        rows.append(bench_component(COMPONENTS[n], args))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    machine = machine_name(device)
    print(f"machine: {machine}, torch {torch.__version__}" + (f", measured fp32 matmul peak "
                                                               f"{peak / 1e12:.3f} TFLOP/s" if device.type != "cuda" and peak else ""))
    print(markdown(rows, peak, label))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "peak_flop_s": peak, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
