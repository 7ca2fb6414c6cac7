"""Stage runner: torchrun + FSDP2, a chain of fine-tuning stages, each with its own HFT mask.

    torchrun --nproc_per_node=8 train.py --config configs/tulu_sft_7b.toml [--train.lr 1e-5 ...]

Each stage starts from the previous stage's export (the first from `[model] path`), draws its
HFT mask with its stage index, builds a fresh AdamW over the trainable parameters only, trains,
writes `<out_dir>/<stage>/` (model export, mask.json, metrics.jsonl, eval.json) and is marked done.
Re-running the same command resumes: finished stages are skipped, an interrupted stage continues
from its newest sharded checkpoint, and the result equals an uninterrupted run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import tomllib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import data
import hft
from model import CheckpointReader, Transformer, save_checkpoint

# ---------------------------------------------------------------------------------------------
# Config: TOML with these keys (and their defaults); command-line overrides `--section.key value`.

DEFAULTS = {
    "out_dir": None, "seed": 0,
    "model": {"path": None, "tokenizer": None, "max_seq_len": 2048},
    "hft": {"granularity": "category", "ratio": 0.5, "train_embeddings": True},
    "train": {
        "lr": 2e-5, "min_lr_ratio": 0.0, "schedule": "linear", "warmup_ratio": 0.03,
        "weight_decay": 0.0, "betas": [0.9, 0.999], "batch_size": 128, "micro_batch_size": 1,
        "epochs": 1, "max_steps": 0, "grad_clip": 1.0, "precision": "bf16",
        "activation_checkpointing": False, "save_every": 0, "dpo_beta": 0.1,
        "export_format": "meta", "export_dtype": "fp32", "replicate": 1, "replicate_frozen": False,
    },
    # max_batch_tokens bounds a batch's positions and so its KV cache (eval.MAX_BATCH_TOKENS).
    "eval": {"probes": [], "max_new_tokens": 64, "batch_size": 8, "max_batch_tokens": 16384},
    "stages": [],
}
CHOICES = {
    "hft.granularity": ("category", "layer", "model", "parameter", "none"),
    "train.schedule": ("linear", "cosine", "constant"), "train.precision": ("bf16", "fp32"),
    "train.export_format": ("meta", "hf"), "train.export_dtype": ("fp32", "bf16"),
    "stages.kind": ("lm", "sft", "dpo"),
}
STAGE_KEYS = {"name", "kind", "train", "eval"}


class ConfigError(ValueError):
    pass


def _check_value(key: str, value, default):
    """Type-check a value against its default's type (ints are accepted where floats are)."""
    if default is None:
        ok = isinstance(value, str)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key '{key}': expected {type(default).__name__ if default is not None else 'str'}, "
                          f"got {value!r}")
    choices = CHOICES.get(key)
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
    return value


def _parse_override(text: str):
    """A command-line value is read as a TOML value when it parses (1e-5, true, [0.9, 0.95]),
    else as a plain string (--hft.granularity none)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str, overrides: list[str] = ()) -> dict:
    """Read the TOML file, apply `--a.b value` / `--a.b=value` overrides (`--stages.N.key` for one
    stage), check every key and value against DEFAULTS, and return the merged config.
    Raises ConfigError naming the key on any unknown key or bad value, before any compute."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    it = iter(overrides)
    for tok in it:
        if not tok.startswith("--"):
            raise ConfigError(f"command line: expected --section.key value, got {tok!r}")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            val = next(it, None)
            if val is None:
                raise ConfigError(f"command line: --{key} needs a value")
        parts = key.split(".")
        node = raw
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"command line: --{key}: no stage {p!r} (config has {len(node)} stages)")
                node = node[int(p)]
            else:
                node = node.setdefault(p, [] if p == "stages" else {})
        node[parts[-1]] = _parse_override(val)

    cfg = copy.deepcopy(DEFAULTS)
    for key, val in raw.items():
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown config key '{key}'")
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(val, dict):
                raise ConfigError(f"{path}: '{key}' must be a table [{key}]")
            for k, v in val.items():
                if k not in DEFAULTS[key]:
                    raise ConfigError(f"{path}: unknown config key '{key}.{k}'")
                cfg[key][k] = _check_value(f"{key}.{k}", v, DEFAULTS[key][k])
        elif key != "stages":
            cfg[key] = _check_value(key, val, DEFAULTS[key]) if DEFAULTS[key] is not None else val
    if not isinstance(cfg["out_dir"], str):
        raise ConfigError(f"{path}: 'out_dir' is required (a directory path)")
    if not isinstance(cfg["model"]["path"], str):
        raise ConfigError(f"{path}: 'model.path' is required (a Meta or HF checkpoint directory)")
    if cfg["model"]["tokenizer"] is None:
        cfg["model"]["tokenizer"] = os.path.join(cfg["model"]["path"], "tokenizer.model")
    stages = raw.get("stages", [])
    if not stages:
        raise ConfigError(f"{path}: no [[stages]]: nothing to train")
    names = set()
    for i, st in enumerate(stages):
        where = f"stages[{i}]"
        for k in ("name", "kind", "train"):
            if k not in st:
                raise ConfigError(f"{path}: {where} is missing '{k}'")
        s = {"name": st["name"], "kind": _check_value("stages.kind", st["kind"], ""), "train": st["train"],
             "eval": st.get("eval", []), "hft": dict(cfg["hft"]), "train_cfg": dict(cfg["train"])}
        if not isinstance(s["name"], str) or not s["name"] or "/" in s["name"] or s["name"] in names:
            raise ConfigError(f"{path}: {where}.name must be a unique non-empty name without '/', got {s['name']!r}")
        names.add(s["name"])
        if isinstance(s["eval"], str):
            s["eval"] = [s["eval"]]
        for k, v in st.items():
            if k in STAGE_KEYS:
                continue
            if k in DEFAULTS["train"]:
                s["train_cfg"][k] = _check_value(f"{where}.{k}", v, DEFAULTS["train"][k])
            elif k in DEFAULTS["hft"]:
                s["hft"][k] = _check_value(f"{where}.{k}", v, DEFAULTS["hft"][k])
            else:
                raise ConfigError(f"{path}: unknown config key '{where}.{k}'")
        cfg_checks(s, f"{path}: {where}")
        stages[i] = s
    cfg["stages"] = stages
    return cfg


def cfg_checks(s: dict, where: str):
    t = s["train_cfg"]
    for key in ("batch_size", "micro_batch_size", "epochs", "replicate"):
        if t[key] < 1:
            raise ConfigError(f"{where}: train.{key} must be >= 1, got {t[key]}")
    if not 0 < t["lr"] or not 0 <= t["warmup_ratio"] <= 1 or not 0 <= t["min_lr_ratio"] <= 1:
        raise ConfigError(f"{where}: need train.lr > 0 and train.warmup_ratio, train.min_lr_ratio in [0, 1]")
    if len(t["betas"]) != 2:
        raise ConfigError(f"{where}: train.betas must be two numbers, got {t['betas']}")
    if not 0 < s["hft"]["ratio"] <= 1:
        raise ConfigError(f"{where}: hft.ratio must be in (0, 1], got {s['hft']['ratio']}")


# ---------------------------------------------------------------------------------------------
# Distributed setup and the sharded model.

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` runs as a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def compute_dtype(tcfg: dict, device) -> torch.dtype:
    return torch.bfloat16 if tcfg["precision"] == "bf16" and device.type == "cuda" else torch.float32


def shard_model(model: Transformer, tcfg: dict, device) -> Transformer:
    """fully_shard each TransformerBlock, then the root (1-D mesh, or 2-D (replicate, shard) for
    HSDP); bf16 compute with fp32 gradient reduction on GPU, fp32 on CPU. Call on a meta-device
    model whose requires_grad already carries the HFT mask; materialise with `to_empty` after.

    `replicate_frozen`: frozen tensors stay out of FSDP, whole on every rank in the compute dtype,
    so they are never all-gathered (forward or backward) nor cast. It trades their memory on every
    rank for communication: bench.py measures what it saves."""
    world = dist.get_world_size()
    rep = tcfg["replicate"]
    if world % rep:
        raise ConfigError(f"train.replicate = {rep} does not divide the world size {world}")
    mesh = (init_device_mesh(device.type, (rep, world // rep), mesh_dim_names=("replicate", "shard"))
            if rep > 1 else init_device_mesh(device.type, (world,), mesh_dim_names=("shard",)))
    bf16 = compute_dtype(tcfg, device) == torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    if tcfg["activation_checkpointing"]:
        for block in model.layers:
            _checkpoint_block(block)
    frozen = {p for p in model.parameters() if not p.requires_grad} if tcfg["replicate_frozen"] else None
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    # The loss is already normalised by the global token count: reduce gradients by sum.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def build_model(path: str, tcfg: dict, trainable: set[str] | None, device, max_seq_len: int):
    """Meta-device build -> HFT requires_grad -> shard -> materialise -> copy weights tensor by
    tensor, each rank keeping only its shard (no rank ever holds a full copy of the model)."""
    reader = CheckpointReader(path, max_seq_len=max_seq_len)
    reader.validate()
    with torch.device("meta"):
        model = Transformer(reader.args)
    if trainable is not None:
        hft.apply_mask(model, trainable)  # before sharding: frozen params never get a gradient
    else:
        model.requires_grad_(False)
    shard_model(model, tcfg, device)
    model.to_empty(device=device)
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = reader.get(name, dtype=torch.float32).to(device)
            if isinstance(p, DTensor):
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
                del local
            else:  # a frozen tensor outside FSDP (train.replicate_frozen): whole, compute dtype
                p.data = full.to(compute_dtype(tcfg, device))
            del full
    return model, reader


def _checkpoint_block(block):
    """Recompute the block's activations in backward (torch.utils.checkpoint), keeping the
    module and its parameter names unchanged (a wrapper module would rename them)."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward
    block.forward = lambda *a, **k: checkpoint(inner, *a, use_reentrant=False, **k)


def lr_at(step: int, total: int, t: dict) -> float:
    """Linear warmup over ceil(warmup_ratio*total) steps (the first step already at lr/warm),
    then linear or cosine decay towards min_lr_ratio*lr, reached just after the last step."""
    warm = math.ceil(t["warmup_ratio"] * total)
    if step < warm:
        return t["lr"] * (step + 1) / warm
    if t["schedule"] == "constant":
        return t["lr"]
    frac = (step - warm) / (total - warm)  # as HF's schedules: the last step's lr is not zero
    scale = 1 - frac if t["schedule"] == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * scale)


def local_bytes(tensors) -> int:
    n = 0
    for x in tensors:
        if isinstance(x, torch.Tensor):
            x = x.to_local() if isinstance(x, DTensor) else x
            n += x.numel() * x.element_size()
    return n


def all_sum(x: float, device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ---------------------------------------------------------------------------------------------
# Checkpoints: DCP for model + optimizer (sharded), a small JSON/pt per rank for the rest.

def checkpoint_dirs(stage_dir: str) -> list[str]:
    root = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-"))


def save_training_checkpoint(stage_dir, step, model, opt, device):
    root = os.path.join(stage_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f"tmp-step-{step:08d}")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "step": torch.tensor(step)}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(rng, os.path.join(tmp, f"rng-rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint exists only once complete
        for old in checkpoint_dirs(stage_dir)[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_training_checkpoint(ckpt, model, opt, device) -> int:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    rng_file = os.path.join(ckpt, f"rng-rank{dist.get_rank()}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    return int(os.path.basename(ckpt).split("-")[1])


def export(model, reader, path, fmt, dtype_name, tokenizer_path):
    """Gather full weights to rank 0 (CPU) and write them atomically in Meta or HF format."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor) and p.dtype != torch.float32:
                # A frozen tensor kept in bf16 for compute (replicate_frozen on GPU): it never
                # changed, so the stage's input holds it exactly, at full precision.
                full[name] = reader.get(name, dtype=torch.float32)
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        save_checkpoint(full, reader.args, path, format=fmt, tokenizer=tokenizer_path, dtype=dtype)
    del full
    dist.barrier()


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# One stage.

class Preempted(Exception):
    pass


_SIGTERM = {"hit": False}


def _on_sigterm(signum, frame):
    _SIGTERM["hit"] = True


def forward_loss(model, batch, kind, ref, beta, device):
    """Sum of the objective over this micro-batch (normalised by the caller) and its metrics."""
    if kind != "dpo":
        logits = model(batch["input_ids"].to(device))
        loss_sum, _ = data.token_loss_sum(logits, batch["labels"].to(device))
        return loss_sum, {}
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(device)
    logps = data.sequence_logps(model(ids), labels)
    n = batch["chosen_input_ids"].shape[0]
    losses, m = data.dpo_loss(logps[:n], logps[n:], ref[:, 0].to(device), ref[:, 1].to(device), beta)
    return losses.sum(), {k: v.detach().sum() for k, v in m.items()}


@torch.no_grad()
def reference_logps(model, examples, tcfg, tok, device, desc) -> torch.Tensor:
    """DPO reference: log-probs of chosen and rejected under the model the stage starts from,
    computed once (split across ranks, every rank doing the same number of forwards)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mb = tcfg["micro_batch_size"]
    per_rank = math.ceil(len(examples) / world)
    out = torch.zeros(per_rank, 2, dtype=torch.float32)
    mine = list(range(rank * per_rank, min(len(examples), (rank + 1) * per_rank)))
    model.eval()
    for j in tqdm(range(0, per_rank, mb), desc=desc, disable=rank != 0, leave=False):
        idx = [mine[k] if k < len(mine) else 0 for k in range(j, min(j + mb, per_rank))]
        b = data.collate([examples[i] for i in idx], pad_id=max(tok.pad_id, 0))
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]).to(device)
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]]).to(device)
        lp = data.sequence_logps(model(ids), labels).float().cpu()
        out[j:j + len(idx)] = torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1)
    model.train()
    gathered = [torch.zeros_like(out) for _ in range(world)]
    dist.all_gather(gathered, out.to(device) if device.type == "cuda" else out)
    return torch.cat([g.cpu() for g in gathered])[:len(examples)]


def train_step(model, trainable, mbs, kind, ref_mbs, denom, t, element_mask, device):
    """Forward and backward over this rank's micro-batches, then clip. Returns the global loss,
    the gradient norm over all trainable parameters (across shards), summed DPO metrics, and
    this rank's token count. Frozen parameters have no .grad: backward skips their weight-gradient
    matmuls, FSDP reduces no gradient for them, and clipping never sees them."""
    loss_acc = torch.zeros((), device=device)
    extra, ntok = {}, 0
    for j, (b, ref_b) in enumerate(zip(mbs, ref_mbs)):
        model.set_requires_gradient_sync(j == len(mbs) - 1)  # one reduce-scatter per step
        loss_sum, m = forward_loss(model, b, kind, ref_b, t["dpo_beta"], device)
        (loss_sum / max(denom, 1)).backward()
        loss_acc += loss_sum.detach()
        for k, v in m.items():
            extra[k] = extra.get(k, 0.0) + v
        ntok += sum(v.numel() for k, v in b.items() if k.endswith("input_ids"))
    if element_mask is not None:
        element_mask.mask_grads()
    clip = t["grad_clip"] if t["grad_clip"] > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(trainable, clip, foreach=True)
    gn = gn.full_tensor() if isinstance(gn, DTensor) else gn
    red = torch.stack([loss_acc.float(), *(torch.as_tensor(v, device=device).float() for v in extra.values())])
    dist.all_reduce(red)
    vals = red.tolist()
    return vals[0] / max(denom, 1), gn.item(), dict(zip(extra, vals[1:])), ntok


def run_stage(cfg, idx, stage, init_path, tok, device) -> dict:
    name, kind, t, h = stage["name"], stage["kind"], stage["train_cfg"], stage["hft"]
    stage_dir = os.path.join(cfg["out_dir"], name)
    rank, world = dist.get_rank(), dist.get_world_size()
    seed = cfg["seed"]
    t0 = time.time()

    # All of the stage's data is read and validated before anything is built or written.
    examples = data.load_examples(stage["train"], kind, tok, cfg["model"]["max_seq_len"],
                                  log=log if rank == 0 else (lambda *a, **k: None))
    sampler = data.StepSampler(len(examples), t["batch_size"], t["micro_batch_size"], world, rank,
                               seed, idx, t["epochs"])
    total = sampler.total_steps if not t["max_steps"] else min(t["max_steps"], sampler.total_steps)

    # The mask: a resumed stage reads the one it saved, never a new draw.
    mask_path = os.path.join(stage_dir, "mask.json")
    if os.path.exists(mask_path):
        mask = hft.load_mask(mask_path)
    else:
        with torch.device("meta"):
            shape_model = Transformer(CheckpointReader(init_path, cfg["model"]["max_seq_len"]).args)
        mask = hft.make_mask(shape_model, h["granularity"], h["ratio"], seed, idx, h["train_embeddings"])
    model, reader = build_model(init_path, t, set(mask["trainable"]), device, cfg["model"]["max_seq_len"])
    if rank == 0:
        os.makedirs(stage_dir, exist_ok=True)
        if not os.path.exists(mask_path):
            hft.save_mask(mask_path, mask)
        log(f"\n== stage {idx} '{name}' ({kind}) from {init_path}: {len(examples)} examples, {total} steps\n"
            + hft.format_summary(mask["summary"]))
    element_mask = (hft.ElementMask(model, h["ratio"], seed, idx)
                    if h["granularity"] == "parameter" else None)
    groups = hft.param_groups(model, t["weight_decay"], element_mask)
    opt = torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), foreach=True)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # DPO reference log-probs: once per stage, saved beside the checkpoints, reused on resume.
    ref = None
    if kind == "dpo":
        ref_path = os.path.join(stage_dir, "ref_logps.pt")
        if os.path.exists(ref_path):
            ref = torch.load(ref_path, weights_only=True)
        else:
            ref = reference_logps(model, examples, t, tok, device, f"{name}: reference log-probs")
            if rank == 0:
                torch.save(ref, ref_path + ".tmp")
                os.replace(ref_path + ".tmp", ref_path)
        dist.barrier()

    torch.manual_seed(seed + 1000 * idx + rank)  # restored below when resuming
    start = 0
    ckpts = checkpoint_dirs(stage_dir)
    if ckpts:
        start = load_training_checkpoint(ckpts[-1], model, opt, device)
        log(f"resuming stage '{name}' from {ckpts[-1]} (step {start}/{total})")

    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    if rank == 0:  # drop lines of steps after the checkpoint we resumed from
        kept = []
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    mfile = open(metrics_path, "a") if rank == 0 else None

    pad_id = max(tok.pad_id, 0)
    tokens_seen, train_time = 0, 0.0
    bar = tqdm(total=total, initial=start, desc=name, disable=rank != 0, dynamic_ncols=True)
    prev = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for step in range(start, total):
            ts = time.time()
            lr = lr_at(step, total, t)
            for g in opt.param_groups:
                g["lr"] = lr
            mb_idx = sampler.micro_batches(step)
            mbs = [data.collate([examples[i] for i in m], pad_id=pad_id) for m in mb_idx]
            ref_mbs = [ref[m] for m in mb_idx] if kind == "dpo" else [None] * len(mbs)
            if kind == "dpo":
                denom = t["batch_size"]  # pairs in the global batch
            else:
                denom = all_sum(sum(data.count_targets(b["labels"]) for b in mbs), device)
            loss, gn, extra, ntok = train_step(model, trainable, mbs, kind, ref_mbs, denom, t, element_mask, device)
            if not (math.isfinite(loss) and math.isfinite(gn)):
                raise FloatingPointError(f"stage '{name}' step {step + 1}: non-finite "
                                         f"{'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                         f"(loss {loss}, grad_norm {gn}); nothing exported from this state")
            if element_mask is not None:
                element_mask.apply_weight_decay(lr, t["weight_decay"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.time() - ts
            train_time += dt
            gtok = all_sum(ntok, device)
            tokens_seen += gtok
            rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gn, "tokens_per_s": gtok / dt}
            rec.update({k: v / t["batch_size"] for k, v in extra.items()})
            if mfile:
                mfile.write(json.dumps(rec) + "\n")
                mfile.flush()
            if os.environ.get("HFT_FAULT_AT") == f"{name}:{step + 1}" and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{gtok / dt:.0f}")
            bar.update(1)
            done = step + 1 == total
            stop = all_sum(1.0 if _SIGTERM["hit"] else 0.0, device) > 0
            if done or stop or (t["save_every"] and (step + 1) % t["save_every"] == 0):
                save_training_checkpoint(stage_dir, step + 1, model, opt, device)
            if stop and not done:
                raise Preempted(f"SIGTERM: saved a checkpoint of stage '{name}' at step {step + 1}; "
                                "run the same command again to continue")
    finally:
        signal.signal(signal.SIGTERM, prev)
        bar.close()
        if mfile:
            mfile.close()

    opt_bytes = all_sum(local_bytes(v for s in opt.state.values() for v in s.values()), device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    export(model, reader, os.path.join(cfg["out_dir"], f".{name}.export"),
           t["export_format"], t["export_dtype"], cfg["model"]["tokenizer"])
    return {"model": model, "stats": {
        "name": name, "kind": kind, "steps": total, "resumed_from_step": start,
        "wall_time_s": time.time() - t0, "train_time_s": train_time,
        "tokens_per_s": tokens_seen / train_time if train_time else 0.0,
        "peak_memory_bytes": int(all_sum(peak, device) / world),
        "trainable_params": mask["summary"]["total"]["trainable"],
        "optimizer_state_bytes": int(opt_bytes)}}


def finish_stage(cfg, stage, stats, eval_result):
    """Move the export into the stage directory and mark the stage done (rank 0)."""
    stage_dir = os.path.join(cfg["out_dir"], stage["name"])
    tmp = os.path.join(cfg["out_dir"], f".{stage['name']}.export")
    if dist.get_rank() == 0:
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(stage_dir, f))
        shutil.rmtree(tmp)
        if eval_result is not None:
            write_json(os.path.join(stage_dir, "eval.json"), eval_result)
        write_json(os.path.join(stage_dir, "done.json"), stats)
        # The export is the stage's result; its optimizer checkpoints are no longer needed.
        shutil.rmtree(os.path.join(stage_dir, "checkpoints"), ignore_errors=True)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Evaluation hooks (eval.py computes; the runner decides what and when).

def evaluate_all(cfg, model, tok, files, tcfg: dict | None = None) -> dict:
    """Score `model` on each file. `tcfg`: the train config the model was built with (default
    the first stage's, as for the base model); its compute dtype is the KV cache's."""
    import eval as ev
    e = cfg["eval"]
    dtype = compute_dtype(tcfg or cfg["stages"][0]["train_cfg"], next(model.parameters()).device)
    out = {}
    with ev.gathered(model):  # all-gather the sharded weights once for every file, not per token
        for item in files:
            path, metric = (item, None) if isinstance(item, str) else (item["path"], item.get("metric"))
            out[path] = ev.evaluate_file(model, tok, path, metric=metric, max_new_tokens=e["max_new_tokens"],
                                         batch_size=e["batch_size"], max_batch_tokens=e["max_batch_tokens"],
                                         dtype=dtype)
    return out


def run(cfg: dict):
    device = setup_distributed()
    rank = dist.get_rank()
    out = cfg["out_dir"]
    for s in cfg["stages"]:  # fail before any compute when a file is missing
        for f in [s["train"]] + [e if isinstance(e, str) else e.get("path", "") for e in s["eval"]]:
            if not os.path.isfile(f):
                raise ConfigError(f"stage '{s['name']}': file not found: {f}")
    for p in cfg["eval"]["probes"]:
        if not os.path.isfile(p):
            raise ConfigError(f"eval.probes: file not found: {p}")
    tok = data.Tokenizer(cfg["model"]["tokenizer"])
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    has_evals = bool(cfg["eval"]["probes"]) or any(s["eval"] for s in cfg["stages"])

    base_path = os.path.join(out, "base_eval.json")
    base = None
    if has_evals and os.path.exists(base_path):
        with open(base_path) as f:
            base = json.load(f)
    init_path = cfg["model"]["path"]
    all_stats, stage_evals = [], []
    for idx, stage in enumerate(cfg["stages"]):
        stage_dir = os.path.join(out, stage["name"])
        done_path = os.path.join(stage_dir, "done.json")
        if os.path.exists(done_path):  # finished stages are not retrained
            log(f"stage '{stage['name']}' is done ({done_path}); skipping")
            with open(done_path) as f:
                all_stats.append(json.load(f))
            ev_path = os.path.join(stage_dir, "eval.json")
            if os.path.exists(ev_path):
                with open(ev_path) as f:
                    stage_evals.append(json.load(f))
            init_path = stage_dir
            continue
        if has_evals and base is None:  # the base model, scored once on every eval file and probe
            model, _ = build_model(init_path, cfg["stages"][0]["train_cfg"], None, device,
                                   cfg["model"]["max_seq_len"])
            files = [e for s in cfg["stages"] for e in s["eval"]]
            base = {"evals": evaluate_all(cfg, model, tok, files),
                    "probes": evaluate_all(cfg, model, tok, cfg["eval"]["probes"])}
            del model
            if rank == 0:
                write_json(base_path, base)
        res = run_stage(cfg, idx, stage, init_path, tok, device)
        ev = None
        if has_evals:
            seen = [e for s in cfg["stages"][:idx + 1] for e in s["eval"]]
            ev = {"name": stage["name"], "eval_files": [e if isinstance(e, str) else e["path"] for e in stage["eval"]],
                  "evals": evaluate_all(cfg, res["model"], tok, seen),
                  "probes": evaluate_all(cfg, res["model"], tok, cfg["eval"]["probes"])}
            stage_evals.append(ev)
        del res["model"]
        finish_stage(cfg, stage, res["stats"], ev)
        all_stats.append(res["stats"])
        init_path = stage_dir

    report = None
    if rank == 0:
        if has_evals:
            import eval as ev_mod
            report = ev_mod.write_report(out, base, stage_evals)
        write_json(os.path.join(out, "summary.json"), {"stages": all_stats})
        print_summary(all_stats)
    dist.barrier()
    return report


def print_summary(stats):
    head = f"{'stage':<16}{'kind':<6}{'steps':>7}{'wall s':>9}{'tok/s':>10}{'peak MiB':>10}{'trainable':>13}{'optim MiB':>11}"
    print("\n" + head + "\n" + "-" * len(head))
    for s in stats:
        tp = s.get("trainable_params")
        print(f"{s['name']:<16}{s['kind']:<6}{s['steps']:>7}{s['wall_time_s']:>9.1f}{s['tokens_per_s']:>10.0f}"
              f"{s['peak_memory_bytes'] / 2**20:>10.0f}{(tp if tp is not None else 0):>13,}"
              f"{s['optimizer_state_bytes'] / 2**20:>11.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TOML file (see configs/)")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except Preempted as e:
        log(str(e))
        code = 0
    except (ConfigError, data.DataError) as e:
        print(f"error (rank {dist.get_rank() if dist.is_initialized() else 0}): {e}", file=sys.stderr)
        code = 2
    else:
        code = 0
    if dist.is_initialized():
        if code == 0:
            dist.barrier()  # no rank tears gloo down while another still has work in flight
        dist.destroy_process_group()
    return code


def hard_exit(code: int):
    """Leave without interpreter finalization. gloo's worker threads may still hold work objects
    (FSDP keeps some) whose destruction while Python tears down aborts the process ("terminate
    called without an active exception", about one CPU run in twenty) after all work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    hard_exit(main())
