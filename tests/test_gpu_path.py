"""The GPU's branches, run on a CPU: bf16 mixed precision on 2 gloo ranks (accumulation,
replicate_frozen, DPO, kill and resume, the fp32 export of frozen tensors), collectives whose
buffers must stay on the rank's device (checked under a fake "cuda" process group), the rotary
table under FSDP mixed precision, gradients reduce-scattered per micro-batch, SIGTERM between
micro-batches, a model freed after `del`, and `train.device = "cuda"` without a GPU."""
import json
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT
from test_train import load_weights, torchrun, world, write_cfg  # noqa: F401  (world: fixture)

import collective_guard  # noqa: E402
import hft  # noqa: E402
from checkpoint import CheckpointReader  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
GUARD = os.path.join(ROOT, "tests", "collective_guard.py")


def bf16_stages(root):
    """An sft stage with accumulation (batch 8 = 2 ranks x 2 micro-batches x 2) and a dpo stage."""
    return [{"name": "sft", "kind": "sft", "train": str(root / "sft.jsonl")},
            {"name": "dpo", "kind": "dpo", "train": str(root / "dpo.jsonl"), "lr": 5e-4,
             "save_every": 1}]


def guarded_torchrun(cfg, log_prefix, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           GUARD, TRAIN, "--config", str(cfg)]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HFT_GUARD_LOG=str(log_prefix),
             **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def bf16_run(world):
    cfg = write_cfg(world, "bf16", bf16_stages(world),
                    train={"precision": "bf16", "replicate_frozen": True})
    p = guarded_torchrun(cfg, world / "guard-bf16")
    return world / "bf16", p


def test_bf16_on_cpu_computes_in_bf16_and_keeps_frozen_tensors_bitwise(world, bf16_run):
    out, p = bf16_run
    assert "compute bfloat16 (train.precision = bf16)" in p.stdout
    base, sft, dpo = (load_weights(world / "base"), load_weights(out / "sft"),
                      load_weights(out / "dpo"))
    assert all(t.dtype == torch.float32 for t in sft.values())  # fp32 master weights exported
    for before, after, stage in ((base, sft, "sft"), (sft, dpo, "dpo")):
        mask = set(json.load(open(out / stage / "mask.json"))["trainable"])
        for k in before:  # frozen tensors (replicated in bf16 for compute) exported bit for bit
            assert torch.equal(before[k], after[k]) == (k not in mask), (stage, k)
    # The same first step in fp32 (same data, same weights) gives another loss: bf16 is real.
    fp32 = write_cfg(world, "fp32twin", bf16_stages(world)[:1], train={"max_steps": 1})
    torchrun(fp32)
    l16 = json.loads(open(out / "sft" / "metrics.jsonl").readline())["loss"]
    l32 = json.loads(open(world / "fp32twin" / "sft" / "metrics.jsonl").readline())["loss"]
    assert 1e-6 < abs(l16 - l32) < 0.05 * l32, (l16, l32)


def test_bf16_dpo_starts_near_ln2(bf16_run):
    out, _ = bf16_run
    lines = [json.loads(ln) for ln in open(out / "dpo" / "metrics.jsonl")]
    # Policy and reference are the same bf16 model, but the reference pass batches the pairs
    # differently (other padding, other GEMM shapes), so bf16 rounding shows: ~1e-3, not 1e-6.
    assert abs(lines[0]["loss"] - math.log(2)) < 2e-2, lines[0]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_the_guard_watched_the_runs_collectives(bf16_run):
    """On a CPU every buffer is on the CPU, so here the guard can only show that it saw the
    run's collectives; the device check itself is exercised under a fake CUDA process group
    (test_gather_rows_keeps_buffers_on_a_gpu_under_a_fake_process_group)."""
    out, _ = bf16_run
    calls = []
    for rank in (0, 1):
        calls += open(f"{out.parent / 'guard-bf16'}.{rank}").read().splitlines()
    names = {c.split()[0] for c in calls}
    # FSDP's all-gathers and reduce-scatters, the DPO reference gather, the loss all-reduce.
    assert {"all_gather_single", "reduce_scatter_single", "all_gather",
            "all_reduce"} <= names, names


def test_bf16_kill9_then_rerun_equals_uninterrupted(world, bf16_run):
    out, _ = bf16_run
    cfg = write_cfg(world, "bf16crash", bf16_stages(world),
                    train={"precision": "bf16", "replicate_frozen": True})
    p = guarded_torchrun(cfg, world / "guard-crash", env={"HFT_FAULT_AT": "dpo:2"}, check=False)
    assert p.returncode != 0 and not (world / "bf16crash" / "dpo" / "done.json").exists()
    p = guarded_torchrun(cfg, world / "guard-crash")
    assert "resuming stage 'dpo'" in p.stdout
    a, b = load_weights(out / "dpo"), load_weights(world / "bf16crash" / "dpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gather_rows_keeps_buffers_on_a_gpu_under_a_fake_process_group():
    """The DPO reference gather on a (fake) CUDA device with 8 ranks: the guard passes it, and
    the gather this project once had (CPU buffers for a GPU input) fails it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import train
    uninstall = collective_guard.install()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        with FakeTensorMode():
            x = torch.zeros(3, 2, device="cuda")
            y = train.gather_rows(x)
            assert y.shape == (24, 2) and y.device.type == "cuda"
            with pytest.raises(AssertionError, match="all_gather.*cpu.*cuda"):
                dist.all_gather([torch.zeros(3, 2) for _ in range(8)], x)
    finally:
        dist.destroy_process_group()
        uninstall()


TCFG = {"precision": "bf16", "replicate": 1, "replicate_frozen": False,
        "activation_checkpointing": False, "dpo_beta": 0.1, "grad_clip": 1.0, "batch_size": 4}


def test_rotary_table_reaches_attention_in_float32_under_bf16(one_rank, tiny_ckpt):
    import train
    model = train.build_model(CheckpointReader(tiny_ckpt), TCFG, None, torch.device("cpu"))
    seen = []
    model.layers[0].attention.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].dtype, a[1].dtype)))
    model(torch.randint(0, 320, (2, 16)))
    assert seen == [(torch.bfloat16, torch.float32)]  # activations bf16, rotary angles fp32


def test_gradients_are_reduce_scattered_after_every_micro_batch(one_rank, tiny_ckpt):
    """Between micro-batches each trainable tensor holds its sharded gradient; a no-sync
    accumulation would hold unsharded fp32 gradients instead and leave .grad empty."""
    import train
    model = train.build_model(CheckpointReader(tiny_ckpt), TCFG, None, torch.device("cpu"))
    model.requires_grad_(True)
    trainable = list(model.parameters())
    mbs = [{"input_ids": torch.randint(3, 320, (2, 16)), "labels": torch.randint(3, 320, (2, 16))}
           for _ in range(3)]
    seen = []

    def stop():  # asked before each micro-batch: a window into the accumulation
        seen.append(sum(p.grad is not None for p in trainable))
        return False

    out = train.train_step(model, trainable, mbs, "sft", [None] * 3, 90, TCFG, None,
                           torch.device("cpu"), stop)
    assert seen == [0, len(trainable), len(trainable)] and out is not None
    assert all(p.grad.to_local().shape == p.to_local().shape for p in trainable)


def test_stop_between_micro_batches_drops_the_partial_step(one_rank, tiny_ckpt):
    import train
    model = train.build_model(CheckpointReader(tiny_ckpt), TCFG, None, torch.device("cpu"))
    model.requires_grad_(True)
    trainable = list(model.parameters())
    before = [p.detach().to_local().clone() for p in trainable]
    mbs = [{"input_ids": torch.randint(3, 320, (2, 16)), "labels": torch.randint(3, 320, (2, 16))}
           for _ in range(3)]
    asked = []
    out = train.train_step(model, trainable, mbs, "sft", [None] * 3, 90, TCFG, None,
                           torch.device("cpu"), stop=lambda: asked.append(1) or len(asked) == 2)
    assert out is None and len(asked) == 2
    assert all(p.grad is None for p in trainable)
    assert all(torch.equal(b, p.detach().to_local()) for b, p in zip(before, trainable))


def test_a_sharded_model_is_freed_by_del_and_gc(one_rank, tiny_ckpt):
    import train
    reader = CheckpointReader(tiny_ckpt)
    model = train.build_model(reader, dict(TCFG, activation_checkpointing=True), None,
                              torch.device("cpu"))
    model(torch.randint(0, 320, (1, 8)))
    ref, p_ref = weakref.ref(model), weakref.ref(next(model.parameters()))
    del model, reader
    train.release_memory(torch.device("cpu"))  # what the runner calls after each stage
    assert ref() is None and p_ref() is None


def test_replicated_frozen_tensors_are_allocated_in_the_compute_dtype(one_rank, tiny_ckpt):
    """replicate_frozen under bf16: the frozen tensors are bf16 already on the meta device, so
    `to_empty` never allocates them in fp32 (twice their memory while the model is built: the
    whole model for the base evaluation), and they hold the checkpoint rounded to bf16."""
    import train
    from model import Transformer
    reader = CheckpointReader(tiny_ckpt)
    t = dict(TCFG, replicate_frozen=True)
    trainable = {n for n in reader.keys() if n.startswith("layers.0.")}
    with torch.device("meta"):
        meta = Transformer(reader.args)
    hft.apply_mask(meta, trainable)
    train.shard_model(meta, t, torch.device("cpu"))
    assert {n: p.dtype for n, p in meta.named_parameters()} == {
        n: torch.float32 if n in trainable else torch.bfloat16 for n in reader.keys()}
    model = train.build_model(reader, t, trainable, torch.device("cpu"))
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.dtype == torch.bfloat16 and torch.equal(p, reader.get(name).bfloat16()), name


MESH_WORKER = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import train
from model import ModelArgs, Transformer
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=int(sys.argv[1]),
                        world_size=2)
t = dict(train.DEFAULTS["train"], replicate=2)
groups = []
for stage in range(3):
    with torch.device("meta"):
        m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32))
    train.shard_model(m, t, torch.device("cpu"))
    groups.append(len(dist.distributed_c10d._world.pg_map))  # every group this rank has made
assert groups == [groups[0]] * 3, groups
dist.destroy_process_group()
print("ok", sys.argv[1])
'''


def test_hsdp_stages_share_one_mesh_and_its_process_groups(tmp_path):
    """Each 2-D init_device_mesh makes new process groups (eagerly created NCCL communicators on
    GPUs) that live as long as the run: three stages' models, on two gloo ranks, make them once."""
    script = tmp_path / "worker.py"
    script.write_text(MESH_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "pg"), ROOT],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {rank}" in out, out[-2000:]


def test_device_cuda_without_a_gpu_exits_2_naming_the_key(world, tmp_path):
    cfg = write_cfg(world, "nocuda", bf16_stages(world)[:1])
    p = subprocess.run([sys.executable, TRAIN, "--config", str(cfg), "--train.device", "cuda"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "train.device" in p.stderr, p.stderr[-2000:]
    assert not (world / "nocuda").exists()


def test_device_is_a_whole_run_setting(world):
    import train
    stages = bf16_stages(world)
    stages[0]["device"] = "cpu"
    with pytest.raises(train.ConfigError, match=r"stages\[0\].device"):
        train.load_config(str(write_cfg(world, "stagedev", stages)))
