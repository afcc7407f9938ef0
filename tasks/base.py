"""The Task interface between the loop (train.py) and one objective, and the helpers the tasks share.

A task says what to train and how to judge it; `train.py` owns the loop, the distribution, AMP and the
checkpoints. A task file imports this module, the model files and `data/`, never `train.py`: what a task
needs of the run arrives as `cfg` (the run's config, read by attribute) and `dist` (a `Dist`).

The checkpoint helpers live here, not in train.py, because both sides need them: the loop writes and
resumes checkpoints, and the adapters read a pretraining checkpoint to start from.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import data as data_lib


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


class Task:
    """The interface between the loop and an objective. Subclass it and list the class in tasks/__init__.py.

    build_model() → nn.Module            the raw model (the loop wraps it for DDP/FSDP/compile); sets
                                         `self.model_args`, the JSON-able arguments that rebuild it
    rebuild(model_args) → nn.Module      (static) the same model with fresh weights, from a checkpoint's
                                         `model_args`: load the checkpoint's weights into it, strictly
    train_dataset() / eval_dataset()     map-style (preferred: exact resume) or iterable datasets
    check_eval()                         build and check the held-out set before the first step (a bad
                                         --eval_data fails at once, not after training)
    counters() → {name: int}             the task's own counts of what it dropped or cut (bad boxes, …),
                                         summed over ranks in the run's end record
    collate(samples) → batch dict        may include "skipped": n for dropped bad samples
    loss(model, batch, step) → (loss, logs)   model is the wrapped model: call model(...)
    forward_backward(model, batch, step, scale) → (loss, logs)   default: loss() then (loss·scale).backward()
    trains_by_steps                      False: not an optimiser loop; the loop calls fit_directly(model)
                                         once instead of the steps (the linear probe's L-BFGS fit)
    evaluate(model, step) → {metric: float}   model is the raw model, full parameters available
    visualise(model, run_dir)            write a picture for people (e.g. predictions.png); called on
                                         every rank (forwards are collective under FSDP), write on rank 0
    state_dict() / load_state_dict(sd)   task-owned state that must travel with checkpoints (a tokenizer)
    fsdp_wrap_classes() → set of module classes to shard as units
    lr_scales(model) → {param name: lr multiplier}   default {} (all at the scheduled lr); e.g. layer decay
    init_from(model, ckpt, path)         --init_from: default = every weight, window tables resized;
                                         adapters override it to take the towers of a pretraining run
    defaults                             {field: value} used where neither --config nor a flag sets the
                                         field (e.g. --task video's lr and schedule length)
    demo_defaults                        the same, applied only to the CPU demo (--preset toy on synthetic
                                         data): the time budgets and image sizes fitted to a CPU run
    resolve_config(cfg, source) → cfg    (class method) fill fields that depend on the checkpoint the run
                                         resumes or starts from (pretrain: --stage 0 → that run's stage)
    img_scale                            --img_size 0 means the preset's pretraining size × this
    `self.init_checkpoint` holds the --init_from checkpoint (or None) while build_model() runs, so a
    task can read the tokenizer or config from it (see `tasks.pretrain.load_pretrained`).
    """
    name = "base"
    defaults: dict = {}
    demo_defaults: dict = {}
    img_scale = 1
    trains_by_steps = True

    def __init__(self, cfg, d: Dist):
        self.cfg, self.dist = cfg, d
        self.init_checkpoint = None
        self.model_args: dict | None = None
        self.tokenizer = None

    @classmethod
    def resolve_config(cls, cfg, source: dict | None):
        return cfg

    def init_from(self, model: nn.Module, ckpt: dict, path: str):
        import coswin

        sd = dict(ckpt["model"])
        own = model.state_dict()
        check_compatible(own, sd, path, allow_resize=True)
        for k, v in sd.items():
            if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
                sd[k] = coswin.resize_bias_table(v, (math.isqrt(own[k].shape[0]) + 1) // 2)
        model.load_state_dict(sd)

    def held_out_set(self, build, hint: str):
        """The --eval_data set of a task with classes, built once by build(spec, split, **kw) and checked:
        a synthetic one gets --eval_size samples (unless its spec names a length, synthetic:N); a synthetic
        held-out set for training files is refused (its classes would not be theirs); its classes must
        equal self.classes. `hint` says what to give instead, e.g. "--eval_data folder:DIR"."""
        if getattr(self, "_eval", None) is None:
            if is_synthetic(self.cfg.eval_data) and not is_synthetic(self.cfg.data):
                raise SystemExit(f"train.py: --data {self.cfg.data!r} needs a held-out set of the same classes, "
                                 f"not the synthetic one; give {hint}")
            ds = build(self.cfg.eval_data, "val", **eval_length(self.cfg.eval_data, self.cfg.eval_size))
            classes = list(getattr(ds, "classes", None) or [])
            if classes != self.classes:
                raise SystemExit(f"train.py: --eval_data {self.cfg.eval_data!r} has other classes than --data "
                                 f"{self.cfg.data!r} ({classes[:5]}… vs {self.classes[:5]}…); give both the same classes")
            self._eval = ds
        return self._eval

    def forward_backward(self, model, batch, step: int, scale: float, scaler=None):
        loss, logs = self.loss(model, batch, step)
        scaled = loss * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach(), logs

    def train_dataset(self):
        return self._train  # every task builds its training set in __init__

    def check_eval(self):
        self.eval_dataset()

    def counters(self) -> dict[str, int]:
        return {}

    def fit_directly(self, model) -> tuple[float, dict]:
        raise NotImplementedError(f"--task {self.name} trains by optimiser steps")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict):
        pass

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        return {}

    def fsdp_wrap_classes(self) -> set:
        return set()

    def visualise(self, model, run_dir: str):
        pass

    # -- the tokenizer, for the tasks that read text ------------------------------------------------------
    def tokenizer_state(self) -> dict:
        return {"tokenizer_merges": [list(m) for m in self.tokenizer.merges]}

    def load_tokenizer(self, sd: dict):
        self.tokenizer = tokenizer_from_state(sd) or self.tokenizer

    def save_tokenizer(self):
        """tokenizer.json in the run's folder (rank 0), for people and for --tokenizer in a later run."""
        if self.dist.main and self.cfg.name:
            run_dir = os.path.join(self.cfg.out_dir, self.cfg.name)
            os.makedirs(run_dir, exist_ok=True)
            self.tokenizer.save(os.path.join(run_dir, "tokenizer.json"))


# ----------------------------------------------------------------------------------------------------
# Shared helpers


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode for the block, then the mode the model had (a task's evaluation runs mid-training)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A loss of 0 that still reaches every trainable weight: a micro-batch whose every sample was unreadable
    (counted under "skipped") takes part in the step's gradient all-reduce like any other."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def is_synthetic(spec: str) -> bool:
    """--data / --eval_data names a synthetic set: "synthetic", "synthetic:N", "synthetic?key=value"."""
    try:
        return data_lib.parse_spec(spec)[0] == "synthetic"
    except ValueError:  # a malformed spec: build_dataset says what is wrong with it
        return False


def eval_length(spec: str, eval_size: int) -> dict:
    """A synthetic held-out set gets --eval_size samples, unless its spec names its own (synthetic:N)."""
    return {"length": eval_size} if is_synthetic(spec) and not data_lib.parse_spec(spec)[1] else {}


def build_data(spec: str, split: str, cfg, task: str, what: str, **kw):
    """data.build_dataset with the run's image size and seed; a bad spec or file is one sentence."""
    try:
        return data_lib.build_dataset(spec, split=split, img_size=cfg.img_size, task=task, seed=cfg.seed, **kw)
    except (ValueError, OSError) as e:
        raise SystemExit(f"train.py: cannot build the {what} data {spec!r}: {e}") from None


def source_task(ckpt: dict | None) -> str | None:
    """The --task that wrote a checkpoint (None for no checkpoint or one without a train.py config)."""
    if ckpt is None:
        return None
    try:
        return json.loads(ckpt.get("config", "{}")).get("task")
    except (TypeError, json.JSONDecodeError):
        return None


def tokenizer_from_state(sd: dict):
    """A task state's BPE merges → the tokenizer they define (None if the state holds none): ours (pairs
    of ids) or CLIP's (pairs of str, `text_encoder.ClipTokenizer`; "tokenizer_kind" says so where written),
    so an adapter of a run that used CLIP's tokenizer gets it back without the vocabulary file."""
    from text_encoder import tokenizer_from_merges

    if "tokenizer_merges" not in sd:
        return None
    return tokenizer_from_merges(sd["tokenizer_merges"], sd.get("tokenizer_kind"))


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def split_names(text: str) -> list[str]:
    """"red cross, blue circle" → ["red cross", "blue circle"] (class names given on the command line)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def set_drop_path(image_encoder: nn.Module, rate: float):
    """This run's stochastic depth on a pretrained CoSwin: rising linearly over the blocks from 0 to `rate`."""
    blocks = [b for layer in image_encoder.layers for b in layer.blocks]
    for b, p in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        b.drop_path.p = p


# ----------------------------------------------------------------------------------------------------
# Checkpoint files: atomic save, clear errors on load (train.py writes them, adapters read them)


def atomic_save(obj, path: str, previous: str | None = None, what: str = "file", hint: str = "run again"):
    """torch.save to a temporary file, then rename it to `path`: a reader never sees half a file. With
    `previous`, the file it replaces is kept under that name. On failure the temporary file is removed, the
    files already there stay, and one sentence says why (e.g. the disk is full)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        why = "the disk is full" if full else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise SystemExit(f"train.py: could not write the {what} {path} ({why}); the {what}s already there are kept. "
                         f"Free space (or fix the folder) and {hint}") from None
    if previous is not None and os.path.isfile(path):
        os.replace(path, previous)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"train.py: checkpoint {path!r} does not exist; check the path or drop --resume/--init_from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"train.py: checkpoint {path!r} is corrupt or not a torch checkpoint "
                         f"({type(e).__name__}); use an earlier checkpoint or start without --resume") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"train.py: {path!r} is not a train.py checkpoint (no 'model' entry)")
    return ckpt


def check_compatible(own: dict, theirs: dict, path: str, allow_resize: bool = False):
    """Raise a clear message naming mismatched keys (missing, unexpected, or of another shape)."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shape = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape
                   and not (allow_resize and k.endswith("relative_position_bias_table")))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape, e.g. {k}: checkpoint {tuple(theirs[k].shape)} vs "
                         f"model {tuple(own[k].shape)}")
        raise SystemExit(f"train.py: checkpoint {path!r} is from a different architecture ({'; '.join(parts)}). "
                         "Use the --preset/--window_size it was trained with, or start a fresh run.")
