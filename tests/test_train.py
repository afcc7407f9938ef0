"""train.py end to end on the CPU: a toy run learns and writes its artefacts; resume is exact; torchrun
with 2 processes equals one process; the scaling switches compute the same step; bad checkpoints and
flags fail with a clear message."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from train import Config, GlobalBatchSampler, Trainer, parse_config, resolved, setup_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small and fast: 32² images (CoSwin-toy maps 8, 4, 2, 1), tiny eval set
FAST = ["--img_size", "32", "--batch_size", "16", "--eval_size", "48", "--warmup_steps", "2",
        "--tokenizer_texts", "2000", "--log_every", "1", "--progress", "false", "--lr", "1e-3"]


def make_trainer(tmp_path, *flags, name="run"):
    cfg = resolved(parse_config(FAST + ["--out_dir", str(tmp_path), "--name", name] + list(flags)))
    return Trainer(cfg, setup_distributed(cfg))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r["loss"] for r in rows if "loss" in r and r.get("event") is None]


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path):
    steps = ["--max_steps", "6", "--eval_every", "100", "--ckpt_every", "100"]
    full = make_trainer(tmp_path, *steps, name="full")
    full.fit()
    w_full = weights(full)

    part = make_trainer(tmp_path, *steps, name="part")
    real_step = part.train_step

    def step_then_preempt(batches):  # a SIGTERM arriving during step 3
        out = real_step(batches)
        if part.step == 2:
            part._on_signal(15, None)
        return out

    part.train_step = step_then_preempt
    part.fit()
    assert part.step == 3
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert rows[-1] == {"step": 3, "event": "stopped", "reason": "signal", "signal": 15}

    resumed = make_trainer(tmp_path, *steps, "--resume", "auto", name="part")
    assert resumed.step == 3
    resumed.fit()
    w_res = weights(resumed)
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def _grads_of_first_step(trainer):
    """Run one optimiser step and return the gradients it applied (before AdamW changes weights)."""
    captured = {}
    real = trainer.optimizer.step

    def capture(*a, **k):
        for n, p in trainer.model.named_parameters():
            captured[n] = p.grad.detach().clone()
        return real(*a, **k)

    trainer.optimizer.step = capture
    trainer.train_step(trainer.batches())
    return captured


@pytest.mark.parametrize("flag", [["--gradcache_chunk", "4"], ["--grad_ckpt"]])
def test_memory_savers_compute_the_same_step(tmp_path, flag):
    plain = _grads_of_first_step(make_trainer(tmp_path, "--grad_clip", "0", name="plain"))
    other = _grads_of_first_step(make_trainer(tmp_path, "--grad_clip", "0", *flag, name="other"))
    for k in plain:
        torch.testing.assert_close(other[k], plain[k], atol=2e-5, rtol=1e-4, msg=k)


def test_accumulation_averages_the_micro_batch_gradients(tmp_path):
    """--accum_steps 2: the step's gradient is the mean of the two micro-batches' gradients (each
    micro-batch is its own contrastive batch: accumulation cannot add negatives; the gradient cache does)."""
    acc = make_trainer(tmp_path, "--accum_steps", "2", "--grad_clip", "0", name="acc")
    g_acc = _grads_of_first_step(acc)
    ref = make_trainer(tmp_path, "--batch_size", "8", "--grad_clip", "0", name="ref")
    sampler = GlobalBatchSampler(len(ref.task.train_dataset()), 16, 0, 1, 2, ref.cfg.seed)
    it = iter(sampler)
    total = {}
    for _ in range(2):
        batch = ref.task.collate([ref.task.train_dataset()[i] for i in next(it)])
        batch.pop("skipped")
        ref.model.zero_grad()
        loss, _ = ref.task.loss(ref.model, batch, 0)
        loss.backward()
        for n, p in ref.model.named_parameters():
            total[n] = total.get(n, 0) + p.grad / 2
    for k in g_acc:
        torch.testing.assert_close(g_acc[k], total[k], atol=2e-5, rtol=1e-4, msg=k)


def test_global_batch_sampler_splits_each_step_over_ranks_and_micro_steps():
    n, B, world, accum = 100, 12, 2, 3
    single = iter(GlobalBatchSampler(n, B, 0, 1, 1, seed=5, start_step=0))
    ranks = [iter(GlobalBatchSampler(n, B, r, world, accum, seed=5)) for r in range(world)]
    seen = []
    for step in range(20):  # crosses epoch boundaries (8 steps per epoch)
        glob = next(single)
        parts = [[next(ranks[r]) for _ in range(accum)] for r in range(world)]
        rebuilt = [i for m in range(accum) for r in range(world) for i in parts[r][m]]
        assert rebuilt == glob and len(set(glob)) == B
        seen.append(glob)
    epoch0 = sorted(i for s in seen[:8] for i in s)
    assert len(set(epoch0)) == 96  # no repeats inside an epoch
    resumed = iter(GlobalBatchSampler(n, B, 0, 1, 1, seed=5, start_step=13))
    assert next(resumed) == seen[13]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = Config(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # cosine half-way
    assert lrs[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lr_schedule_with_decay_steps_holds_then_anneals_at_the_end():
    # warmup–stable–decay: the lr holds at its peak, then the cosine spans the last decay_steps steps alone
    cfg = Config(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, decay_steps=40)
    lrs = [train.lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[9] == pytest.approx(1.0) and all(x == 1.0 for x in lrs[10:71])
    assert lrs[90] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0)  # half-way through the decay, its end
    assert all(a > b for a, b in zip(lrs[70:110], lrs[71:111]))
    # a decay longer than the run after its warmup is the plain cosine
    plain = Config(lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
    assert [train.lr_at(s, Config(**{**plain.__dict__, "decay_steps": 500}), 110) for s in range(111)] == \
        [train.lr_at(s, plain, 110) for s in range(111)]


def test_no_weight_decay_on_norms_biases_tables_embeddings_and_scale(tmp_path):
    t = make_trainer(tmp_path, name="wd")
    decay, no_decay = t.optimizer.param_groups
    names = {id(p): n for n, p in t.model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert any("relative_position_bias_table" in n for n in nd)
    assert any("norm" in n and n.endswith("weight") for n in nd)
    assert all(not n.endswith(".bias") for n in d)
    assert "image_encoder.layers.0.blocks.0.attn.qkv.weight" in d and "image_proj.weight" in d
    emb = [n for n, m in t.model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert emb and all(f"{n}.weight" in nd for n in emb)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    t = make_trainer(tmp_path, "--max_bad_steps", "3", "--max_steps", "10", name="nan")
    before = weights(t)
    real = t.task.loss

    def nan_loss(model, batch, step):
        loss, logs = real(model, batch, step)
        return loss * float("nan"), logs

    t.task.loss = nan_loss
    batches = t.batches()
    t.train_step(batches)
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the update was skipped
    assert t.bad_total == 1
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        for _ in range(3):
            t.train_step(batches)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    t = make_trainer(tmp_path, "--amp", "bf16", "--max_steps", "2", "--eval_every", "100", name="bf16")
    t.fit()
    ls = losses(tmp_path / "bf16")
    assert len(ls) == 2 and all(torch.isfinite(torch.tensor(ls)))


def test_bad_checkpoints_fail_with_a_clear_message(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="corrupt or not a torch checkpoint"):
        make_trainer(tmp_path, "--resume", str(bad), name="c1")
    with pytest.raises(SystemExit, match="does not exist"):
        make_trainer(tmp_path, "--resume", str(tmp_path / "nope.pt"), name="c2")
    t = make_trainer(tmp_path, "--max_steps", "1", "--eval_every", "100", name="small")
    t.fit()
    with pytest.raises(SystemExit, match=r"different architecture.*relative_position_bias_table"):
        make_trainer(tmp_path, "--window_size", "2", "--resume", str(tmp_path / "small" / "ckpt.pt"), name="c3")
    # a resume keeps the checkpoint's towers but takes a new --drop_path (it owns no weight)
    import coswin

    t = make_trainer(tmp_path, "--drop_path", "0.3", "--resume", str(tmp_path / "small" / "ckpt.pt"), name="c4")
    assert t.task.model_args["image_overrides"]["drop_path_rate"] == 0.3
    assert max(m.drop_path.p for m in t.model.modules() if isinstance(m, coswin.SwinBlock)) > 0


def test_flags_config_file_and_unknown_flags(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 0.5, "max_steps": 7}))
    cfg = parse_config(["--config", str(f), "--max_steps", "9", "--fsdp", "--grad_ckpt", "false"])
    assert cfg.lr == 0.5 and cfg.max_steps == 9 and cfg.fsdp is True and cfg.grad_ckpt is False
    with pytest.raises(SystemExit, match=r"unknown flag\(s\) --learning_rate.*--lr"):
        parse_config(["--learning_rate", "3"])
    with pytest.raises(SystemExit, match="unknown --preset"):
        parse_config(["--preset", "gigantic"])


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_gradcache"])
def test_torchrun_two_processes_equal_one_process(tmp_path, mode):
    """2 gloo processes (DDP, FSDP2 sharding, or DDP with the gradient cache and its manual gradient
    all-reduce) with the same global batch = one plain process."""
    extra = {"ddp": [], "fsdp": ["--fsdp"], "ddp_gradcache": ["--gradcache_chunk", "3"]}[mode]
    args = FAST + ["--max_steps", "4", "--eval_every", "100", "--out_dir", str(tmp_path)]
    _run([sys.executable, "train.py", *args, "--name", "one"], ROOT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
          "--name", "two", *extra], ROOT)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (one, two)
    wa = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_torchrun_refuses_a_finished_run_on_every_rank(tmp_path):
    """Rank 0 refuses a folder that holds a checkpoint; rank 1 must stop too, not wait in a collective."""
    args = FAST + ["--max_steps", "1", "--eval_every", "100", "--out_dir", str(tmp_path), "--name", "done"]
    _run([sys.executable, "train.py", *args], ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "already holds a run" in p.stdout + p.stderr


def test_gradient_buckets_cover_every_parameter_once_in_a_handful_of_collectives(tmp_path):
    import torch.distributed as dist

    import unicl

    with torch.device("meta"):
        big = [p for p in unicl.build("florence").parameters() if p.requires_grad]
    buckets = train.grad_buckets(big, 25 * 2 ** 20)
    assert [p for b in buckets for p in b] == big  # each parameter once, in order
    assert all(sum(p.numel() * 4 for p in b) <= 25 * 2 ** 20 or len(b) == 1 for b in buckets)
    # the averaging itself, on a one-process group: values unchanged, a missing gradient becomes zeros
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 7)]
        for p in ps[:2]:
            p.grad = torch.randn_like(p)
        want = [p.grad.clone() for p in ps[:2]]
        assert train.all_reduce_mean(ps) == 1
        assert all(torch.equal(p.grad, w) for p, w in zip(ps, want)) and torch.equal(ps[2].grad, torch.zeros(7))
    finally:
        dist.destroy_process_group()


def test_cpu_adamw_is_the_fused_kernel_and_steps_as_the_per_tensor_loop(tmp_path):
    """The fused AdamW (one kernel over every parameter) takes the same steps as torch's reference loop,
    weight decay and the groups' lr scales included; the Trainer uses it on CPU unless FSDP shards."""
    assert train.fused_adamw(torch.device("cpu")) and not train.fused_adamw(torch.device("cpu"), sharded=True)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(7, 3)) for _ in range(4)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    groups = lambda xs: [{"params": xs[:2], "weight_decay": 0.1}, {"params": xs[2:], "weight_decay": 0.0, "lr": 2e-3}]
    fused, loop = torch.optim.AdamW(groups(ps), fused=True, **kw), torch.optim.AdamW(groups(qs), foreach=False, **kw)
    for _ in range(6):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    t = make_trainer(tmp_path, "--max_steps", "1", name="opt")
    assert t.optimizer.defaults["fused"] is True
