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
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import eval as ev
import hft
from checkpoint import (CheckpointReader, atomic_file, fill_weights, replace_dir, save_checkpoint,
                        write_json)
from data import all_sum, hard_exit, setup_distributed
from model import Transformer

# Config: TOML with these keys (and their defaults); command-line overrides `--section.key value`.

DEFAULTS = {
    "out_dir": None, "seed": 0,
    "model": {"path": None, "tokenizer": None, "max_seq_len": 2048},
    "hft": {"granularity": "category", "ratio": 0.5, "train_embeddings": True},
    "train": {
        "lr": 2e-5, "min_lr_ratio": 0.0, "schedule": "linear", "warmup_ratio": 0.03,
        "weight_decay": 0.0, "betas": [0.9, 0.999], "batch_size": 128, "micro_batch_size": 1,
        "epochs": 1, "max_steps": 0, "grad_clip": 1.0, "device": "auto", "precision": "auto",
        "activation_checkpointing": False, "save_every": 0, "dpo_beta": 0.1,
        "export_format": "meta", "export_dtype": "fp32", "replicate": 1, "replicate_frozen": False,
        "replay": 0.0,
    },
    # max_batch_tokens bounds a batch's positions and so its KV cache (see eval.MAX_BATCH_TOKENS).
    "eval": {"probes": [], "max_new_tokens": 64, "batch_size": 8,
             "max_batch_tokens": ev.MAX_BATCH_TOKENS},
    "stages": [],
}
CHOICES = {
    "hft.granularity": hft.GRANULARITIES,
    "train.schedule": ("linear", "cosine", "constant"), "train.precision": ("auto", "bf16", "fp32"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.export_format": ("meta", "hf"), "train.export_dtype": ("fp32", "bf16"),
    "stages.kind": ("lm", "sft", "dpo"),
}
STAGE_KEYS = {"name", "kind", "train", "eval"}
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # a directory name in out_dir
RESERVED = {"tokenized", "base_eval.json", "report.json", "report.md", "summary.json",
            "run_config.json"}


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
        raise ConfigError(f"config key '{key}': expected "
                          f"{type(default).__name__ if default is not None else 'str'}, "
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
    apply_overrides(raw, overrides)
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
    if not raw.get("stages"):
        raise ConfigError(f"{path}: no [[stages]]: nothing to train")
    cfg["stages"] = [resolve_stage(st, i, cfg, path) for i, st in enumerate(raw["stages"])]
    names = [s["name"] for s in cfg["stages"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    check_together(cfg, path)
    return cfg


def apply_overrides(raw: dict, overrides: list[str]):
    """`--a.b value`, `--a.b=value` and `--stages.N.key value`, into the TOML's dict."""
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
        for p in parts[:-1]:
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"command line: --{key}: no stage {p!r} (config has "
                                      f"{len(node)} stages)")
                node = node[int(p)]
            else:
                node = node.setdefault(p, [] if p == "stages" else {})
        node[parts[-1]] = _parse_override(val)


def resolve_stage(st: dict, i: int, cfg: dict, path: str) -> dict:
    """One [[stages]] table with the run's [train] and [hft] under its own overrides. The TOML's
    `train` is the stage's data file (stage["data"]); its settings are stage["train"]."""
    where = f"stages[{i}]"
    for k in ("name", "kind", "train"):
        if k not in st:
            raise ConfigError(f"{path}: {where} is missing '{k}'")
    s = {"name": st["name"], "kind": _check_value("stages.kind", st["kind"], ""),
         "data": st["train"], "eval": st.get("eval", []), "hft": dict(cfg["hft"]),
         "train": dict(cfg["train"])}
    if (not isinstance(s["name"], str) or not STAGE_NAME.fullmatch(s["name"])
            or s["name"] in RESERVED):
        raise ConfigError(f"{path}: {where}.name must be a unique plain name (letters, digits, "
                          f"'_', '-', '.', not starting with '.' or '-'; it names a directory in "
                          f"out_dir, other than {', '.join(sorted(RESERVED))}), got {s['name']!r}")
    if isinstance(s["eval"], str):
        s["eval"] = [s["eval"]]
    for k, v in st.items():
        if k in STAGE_KEYS:
            continue
        if k == "device":
            raise ConfigError(f"{path}: {where}.device: train.device applies to the whole run; "
                              "set it in [train]")
        if k in DEFAULTS["train"]:
            s["train"][k] = _check_value(f"{where}.{k}", v, DEFAULTS["train"][k])
        elif k in DEFAULTS["hft"]:
            s["hft"][k] = _check_value(f"{where}.{k}", v, DEFAULTS["hft"][k])
        else:
            raise ConfigError(f"{path}: unknown config key '{where}.{k}'")
    cfg_checks(s, f"{path}: {where}")
    return s


def cfg_checks(s: dict, where: str):
    """One stage's settings, each on its own and those that only make sense together."""
    t = s["train"]
    for key in ("batch_size", "micro_batch_size", "epochs", "replicate"):
        if t[key] < 1:
            raise ConfigError(f"{where}: train.{key} must be >= 1, got {t[key]}")
    for key in ("max_steps", "save_every", "grad_clip", "weight_decay", "replay"):
        if t[key] < 0:
            raise ConfigError(f"{where}: train.{key} must be >= 0, got {t[key]}")
    if not 0 < t["lr"] or not 0 <= t["warmup_ratio"] <= 1 or not 0 <= t["min_lr_ratio"] <= 1:
        raise ConfigError(f"{where}: need train.lr > 0 and train.warmup_ratio, "
                          f"train.min_lr_ratio in [0, 1]")
    if len(t["betas"]) != 2 or not all(0 <= b < 1 for b in t["betas"]):
        raise ConfigError(f"{where}: train.betas must be two numbers in [0, 1), got {t['betas']}")
    if t["batch_size"] % t["micro_batch_size"]:
        raise ConfigError(f"{where}: train.batch_size = {t['batch_size']} is not a multiple of "
                          f"train.micro_batch_size = {t['micro_batch_size']}")
    if s["kind"] == "dpo" and t["dpo_beta"] <= 0:
        raise ConfigError(f"{where}: train.dpo_beta must be > 0 for a dpo stage, "
                          f"got {t['dpo_beta']}")
    try:
        hft.check_settings(s["hft"]["granularity"], s["hft"]["ratio"])
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_together(cfg: dict, path: str):
    """Settings of different sections that only make sense together, checked before any compute."""
    L, e = cfg["model"]["max_seq_len"], cfg["eval"]
    if L < 2:
        raise ConfigError(f"{path}: model.max_seq_len must be >= 2, got {L}")
    if e["batch_size"] < 1 or e["max_new_tokens"] < 1:
        raise ConfigError(f"{path}: eval.batch_size and eval.max_new_tokens must be >= 1, got "
                          f"{e['batch_size']} and {e['max_new_tokens']}")
    has_evals = bool(e["probes"]) or any(st["eval"] for st in cfg["stages"])
    if has_evals and L - e["max_new_tokens"] < 2:
        raise ConfigError(f"{path}: eval.max_new_tokens = {e['max_new_tokens']} leaves "
                          f"{L - e['max_new_tokens']} of model.max_seq_len = {L} positions for the "
                          f"prompt (generation needs at least 2: bos and one token)")
    for i, st in enumerate(cfg["stages"]):
        for item in st["eval"]:
            if not (isinstance(item, str) or isinstance(item, dict)
                    and isinstance(item.get("path"), str) and set(item) <= {"path", "metric"}):
                raise ConfigError(f"{path}: stages[{i}].eval: each entry is a file path or "
                                  f"{{path = ..., metric = ...}}, got {item!r}")


# The sharded model (the process group: data.setup_distributed).

def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def compute_dtype(tcfg: dict, device) -> torch.dtype:
    """`[train] precision`: "auto" is bf16 on a GPU and fp32 on the CPU; "bf16" is bf16 compute
    (fp32 master weights, fp32 gradient reduction) on any device, the CPU included."""
    p = tcfg["precision"]
    return (torch.bfloat16 if p == "bf16" or (p == "auto" and device.type == "cuda")
            else torch.float32)


def shard_model(model: Transformer, tcfg: dict, device) -> Transformer:
    """fully_shard each TransformerBlock, then the root (1-D mesh, or 2-D (replicate, shard) for
    HSDP); compute in compute_dtype (bf16: fp32 master weights and fp32 gradient reduction).
    Call on a meta-device model whose requires_grad already carries the HFT mask; materialise
    with `to_empty` after. Forward inputs are not cast (cast_forward_inputs=False): the blocks'
    inputs are already in the compute dtype, except the rotary table, which stays float32.

    `replicate_frozen`: frozen tensors stay out of FSDP, whole on every rank in the compute dtype,
    so they are never all-gathered (forward or backward) nor cast. It trades their memory on every
    rank for communication: bench.py measures what it saves."""
    mesh = device_mesh(device, tcfg["replicate"])
    cdtype = compute_dtype(tcfg, device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cdtype == torch.bfloat16 else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    if tcfg["activation_checkpointing"]:
        for block in model.layers:
            _checkpoint_block(block)
    frozen = ({p for p in model.parameters() if not p.requires_grad}
              if tcfg["replicate_frozen"] else None)
    for p in frozen or ():  # cast while on meta: to_empty allocates them once, never in fp32
        p.data = p.data.to(cdtype)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    # The loss is already normalised by the global token count: reduce gradients by sum.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


_MESH: dict = {}


def device_mesh(device, rep: int):
    """The 1-D mesh of all ranks, or the 2-D (replicate, shard) one of HSDP, made once per process
    group: each 2-D init_device_mesh makes new process groups (NCCL communicators), which live
    until the process group is destroyed, so a mesh per stage would pile them up."""
    world = dist.get_world_size()
    if world % rep:
        raise ConfigError(f"train.replicate = {rep} does not divide the world size {world}")
    if _MESH.get("world") is not dist.group.WORLD:
        _MESH.clear()
        _MESH["world"] = dist.group.WORLD
    if (device.type, rep) not in _MESH:
        _MESH[device.type, rep] = (
            init_device_mesh(device.type, (rep, world // rep),
                             mesh_dim_names=("replicate", "shard"))
            if rep > 1 else init_device_mesh(device.type, (world,), mesh_dim_names=("shard",)))
    return _MESH[device.type, rep]


def build_model(reader: CheckpointReader, tcfg: dict, trainable: set[str] | None,
                device) -> Transformer:
    """Meta-device build -> HFT requires_grad -> shard -> materialise -> copy weights tensor by
    tensor, each rank keeping only its shard (no rank ever holds a full copy of the model).
    Frozen tensors outside FSDP (train.replicate_frozen) are whole, in the compute dtype."""
    with torch.device("meta"):
        model = Transformer(reader.args)
    if trainable is not None:
        hft.apply_mask(model, trainable)  # before sharding: frozen params never get a gradient
    else:
        model.requires_grad_(False)
    shard_model(model, tcfg, device)
    model.to_empty(device=device)
    model.init_buffers()
    fill_weights(model, reader)
    return model


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


def reset_peak_memory(device):
    """Start a new peak-memory window (per stage): CUDA's allocator statistics, or the kernel's
    RSS high-water mark on the CPU (Linux >= 4.0; elsewhere the process's peak stays)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device) -> int:
    """Bytes: the CUDA allocator's peak, or the process's RSS high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Checkpoints: DCP for model + optimizer (sharded), a small JSON/pt per rank for the rest.

def checkpoint_dirs(stage_dir: str) -> list[str]:
    root = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-"))


def save_training_checkpoint(stage_dir, step, model, opt, device, sources: list | None = None):
    """Model and optimizer shards (DCP), per-rank RNG, and the fingerprints of the training
    files (`sources`, data.json), written to a temporary directory and renamed when complete."""
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
    if sources is not None and dist.get_rank() == 0:
        write_json(os.path.join(tmp, "data.json"), sources)
    dist.barrier()
    if dist.get_rank() == 0:
        replace_dir(tmp, final)  # a checkpoint exists only once complete
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


def resume(stage_dir, name, model, opt, device) -> int:
    """Load the newest checkpoint that loads and return its step (0: none). A damaged one (a
    truncated shard, as a full disk or a bad copy leaves it) is skipped with a warning naming it;
    the ranks agree on every attempt, so none continues from a checkpoint another rank refused."""
    ckpts = checkpoint_dirs(stage_dir)
    for ckpt in reversed(ckpts):
        err = None
        try:
            step = load_training_checkpoint(ckpt, model, opt, device)
        except (Exception, CheckpointException) as e:  # noqa: BLE001  DCP's is a BaseException
            err = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        if all_sum(err is not None) == 0:
            log(f"stage '{name}': loaded checkpoint {ckpt}")
            return step
        log(f"warning: stage '{name}': checkpoint {ckpt} does not load "
            f"({err or 'on another rank'}); trying the one before it")
    if ckpts:
        raise ConfigError(f"stage '{name}': none of its {len(ckpts)} checkpoints in "
                          f"{os.path.join(stage_dir, 'checkpoints')} loads; delete that directory "
                          "to start the stage over")
    return 0


def export(model, reader, path, fmt, dtype_name, tokenizer_path):
    """Gather full weights to rank 0 (CPU) and write them atomically in Meta or HF format."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
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
    logps = pair_logps(model, batch, device)
    n = batch["chosen_input_ids"].shape[0]
    losses, m = data.dpo_loss(logps[:n], logps[n:], ref[:, 0].to(device), ref[:, 1].to(device),
                              beta)
    return losses.sum(), {k: v.detach().sum() for k, v in m.items()}


def pair_logps(model, batch, device) -> torch.Tensor:
    """[2B] summed log-probs of chosen then rejected responses, in one forward."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(device)
    return data.sequence_logps(model(ids), labels)


@torch.no_grad()
def reference_logps(model, examples, tcfg, tok, device, desc) -> torch.Tensor:
    """DPO reference: log-probs of chosen and rejected under the model the stage starts from,
    computed once (split across ranks, every rank doing the same number of forwards) and
    gathered on the rank's device (NCCL gathers only device tensors). Returns [n, 2] on the CPU."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mb = tcfg["micro_batch_size"]
    per_rank = math.ceil(len(examples) / world)
    out = torch.zeros(per_rank, 2, dtype=torch.float32, device=device)
    mine = list(range(rank * per_rank, min(len(examples), (rank + 1) * per_rank)))
    model.eval()
    for j in tqdm(range(0, per_rank, mb), desc=desc, disable=rank != 0, leave=False):
        idx = [mine[k] if k < len(mine) else 0 for k in range(j, min(j + mb, per_rank))]
        b = data.collate([examples[i] for i in idx], pad_id=max(tok.pad_id, 0))
        lp = pair_logps(model, b, device).float()
        out[j:j + len(idx)] = torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1)
    model.train()
    return gather_rows(out).cpu()[:len(examples)]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated in rank order; the buffers live where x does (NCCL gathers
    only into tensors on the rank's GPU)."""
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x)
    return torch.cat(gathered)


def train_step(model, trainable, mbs, kind, ref_mbs, denom, t, element_mask, device, stop=None):
    """Forward and backward over this rank's micro-batches, then clip. Returns the global loss,
    the gradient norm over all trainable parameters (across shards) and the summed DPO metrics
    as tensors on `device` (the caller reads them once per step). Frozen parameters have no
    .grad: backward skips their weight-gradient matmuls, FSDP reduces no gradient for them, and
    clipping never sees them.

    Gradients are reduce-scattered after every micro-batch, so only sharded fp32 gradients
    live between micro-batches (a no-sync accumulation would keep every trainable tensor's
    unsharded fp32 gradient on every rank); under HSDP only the cross-replica all-reduce waits
    for the last micro-batch. `stop()` is asked before each micro-batch (all ranks agree on its
    answer); when it says yes the partial gradients are dropped and None is returned, with the
    parameters as the previous step left them."""
    loss_acc = torch.zeros((), device=device)
    extra = {}
    for j, (b, ref_b) in enumerate(zip(mbs, ref_mbs)):
        if stop is not None and stop():
            model.zero_grad(set_to_none=True)
            return None
        if t["replicate"] > 1:
            model.set_requires_all_reduce(j == len(mbs) - 1)
        loss_sum, m = forward_loss(model, b, kind, ref_b, t["dpo_beta"], device)
        (loss_sum / max(denom, 1)).backward()
        loss_acc += loss_sum.detach()
        for k, v in m.items():
            extra[k] = extra.get(k, 0.0) + v
    if element_mask is not None:
        element_mask.mask_grads()
    clip = t["grad_clip"] if t["grad_clip"] > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(trainable, clip, foreach=True)
    gn = gn.full_tensor() if isinstance(gn, DTensor) else gn
    red = torch.stack([loss_acc.float(),
                       *(torch.as_tensor(v, device=device).float() for v in extra.values())])
    dist.all_reduce(red)
    return red[0] / max(denom, 1), gn, dict(zip(extra, red[1:] / t["batch_size"]))


def real_tokens(batch_examples) -> int:
    """Tokens of these examples without padding (both sides of a preference pair)."""
    n = 0
    for ex in batch_examples:
        for seq in ((ex["chosen"], ex["rejected"]) if "chosen" in ex else (ex,)):
            n += len(seq["input_ids"])
    return n


@dataclass
class StageRun:
    """One stage, ready to train: what prepare_stage builds and the step loop uses."""
    name: str
    kind: str
    idx: int
    t: dict  # the stage's [train] settings
    dir: str
    examples: list
    sampler: data.StepSampler
    total: int  # optimizer steps
    start: int  # the step a resumed stage continues from
    mask: dict
    model: Transformer
    reader: CheckpointReader
    opt: torch.optim.Optimizer
    trainable: list
    element_mask: hft.ElementMask | None
    ref: torch.Tensor | None  # DPO reference log-probs [n, 2]


def run_stage(cfg, idx, stage, init_path, tok, device) -> dict:
    """Prepare, train and export one stage. Returns {"model", "stats"}."""
    t0 = time.time()
    reset_peak_memory(device)
    run = prepare_stage(cfg, idx, stage, init_path, tok, device)
    tokens, train_time = train_loop(run, tok, device)
    opt_bytes = all_sum(local_bytes(v for s in run.opt.state.values() for v in s.values()))
    peak = all_sum(peak_memory(device), dist.ReduceOp.MAX)  # the rank nearest to running out
    export(run.model, run.reader, os.path.join(cfg["out_dir"], f".{run.name}.export"),
           run.t["export_format"], run.t["export_dtype"], cfg["model"]["tokenizer"])
    return {"model": run.model, "stats": {
        "name": run.name, "kind": run.kind, "steps": run.total, "resumed_from_step": run.start,
        "examples": len(run.examples), "replayed": len(run.examples.extra),
        "wall_time_s": time.time() - t0, "train_time_s": train_time,
        "tokens_per_s": tokens / train_time if train_time else 0.0,
        "peak_memory_bytes": int(peak), "compute_dtype": str(compute_dtype(run.t, device))[6:],
        "trainable_params": run.mask["summary"]["total"]["trainable"],
        "optimizer_state_bytes": int(opt_bytes)}}


def prepare_stage(cfg, idx, stage, init_path, tok, device) -> StageRun:
    """Data, mask (new or resumed), model, optimizer, DPO reference and resume point."""
    name, kind, t, h = stage["name"], stage["kind"], stage["train"], stage["hft"]
    stage_dir = os.path.join(cfg["out_dir"], name)
    rank, world, seed = dist.get_rank(), dist.get_world_size(), cfg["seed"]
    # All of the stage's data is read and validated before anything is built or trained.
    examples = stage_examples(cfg, idx, stage, tok)  # refuses files changed under a resume
    sampler = data.StepSampler(len(examples), t["batch_size"], t["micro_batch_size"], world, rank,
                               seed, idx, t["epochs"])
    total = sampler.total_steps if not t["max_steps"] else min(t["max_steps"], sampler.total_steps)
    reader = CheckpointReader(init_path, max_seq_len=cfg["model"]["max_seq_len"])
    reader.validate()
    mask = stage_mask(cfg, idx, stage, reader.args)
    model = build_model(reader, t, set(mask["trainable"]), device)
    if rank == 0:
        log(f"\n== stage {idx} '{name}' ({kind}) from {init_path}: {len(examples)} examples, "
            f"{total} steps, compute {str(compute_dtype(t, device))[6:]}\n"
            + hft.format_summary(mask["summary"]))
    element_mask = (hft.ElementMask(model, h["ratio"], seed, idx)
                    if h["granularity"] == "parameter" else None)
    opt = torch.optim.AdamW(hft.param_groups(model, t["weight_decay"], element_mask), lr=t["lr"],
                            betas=tuple(t["betas"]), foreach=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = dpo_reference(model, examples, t, tok, device, stage_dir, name) if kind == "dpo" else None
    torch.manual_seed(seed + 1000 * idx + rank)  # restored below when resuming
    start = resume(stage_dir, name, model, opt, device)
    if start:
        log(f"resuming stage '{name}' from step {start}/{total}")
    if rank == 0:
        trim_metrics(os.path.join(stage_dir, "metrics.jsonl"), start)
    return StageRun(name, kind, idx, t, stage_dir, examples, sampler, total, start, mask, model,
                    reader, opt, trainable, element_mask, ref)


def stage_examples(cfg, idx, stage, tok) -> data.Mixture:
    """The stage's tokenized examples and, with `train.replay` = r > 0, round(r x their number)
    more drawn from the earlier stages' training files (equal shares, seeded by (seed, stage);
    TRACE's replay baseline), mixed into the stage's batches. Earlier stages replay when their
    examples have the same shape: lm and sft into lm or sft, dpo into dpo."""
    quiet = (lambda *a, **k: None)
    stage_dir = os.path.join(cfg["out_dir"], stage["name"])
    # A file changed under a resumed stage is refused once hashed, before it is tokenized again.
    unchanged = lambda fp: check_sources(stage_dir, stage["name"], [fp])  # noqa: E731
    load = lambda st, log_fn=log: data.cached_examples(  # noqa: E731
        st["data"], st["kind"], tok, cfg["model"]["max_seq_len"],
        os.path.join(cfg["out_dir"], "tokenized"), log=log_fn, check=unchanged)
    own = load(stage)
    r, pairs = stage["train"]["replay"], stage["kind"] == "dpo"
    earlier = [st for st in cfg["stages"][:idx] if (st["kind"] == "dpo") == pairs]
    if not r or not earlier:
        if r:
            log(f"stage '{stage['name']}': train.replay = {r}, but no earlier stage "
                f"has its kind of data")
        return data.Mixture(own, [])
    pools = [load(st, quiet) for st in earlier]
    n = math.floor(r * len(own) + 0.5)
    picks = data.replay_indices([len(p) for p in pools], n, cfg["seed"], idx)
    log(f"replay: {n} examples (train.replay = {r} x {len(own)}) from "
        + ", ".join(f"'{st['name']}' {len(i)}" for st, i in zip(earlier, picks)))
    return data.Mixture(own, list(zip(pools, picks)))


def check_sources(stage_dir: str, name: str, fingerprints: list[dict]):
    """Refuse to resume onto changed training data: the sampler's saved position would point at
    other examples. Checkpoints record the fingerprints (size, sha256) of the files they saw."""
    ckpts = checkpoint_dirs(stage_dir)
    path = os.path.join(ckpts[-1], "data.json") if ckpts else ""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = {fp["path"]: fp for fp in json.load(f)}
    for fp in fingerprints:
        old = saved.get(fp["path"])
        if old is not None and (old["size"], old["sha256"]) != (fp["size"], fp["sha256"]):
            raise data.DataError(
                f"stage '{name}': {fp['path']} changed since the stage's checkpoints were written "
                f"(size {old['size']} -> {fp['size']} bytes, sha256 {old['sha256'][:12]}... -> "
                f"{fp['sha256'][:12]}...): resuming would train on other examples. Restore the "
                f"file, or delete {os.path.join(stage_dir, 'checkpoints')} to restart the stage")


def stage_mask(cfg, idx, stage, args) -> dict:
    """The stage's HFT mask: the one it saved if it is resuming, never a new draw; else a new
    draw from (seed, stage index), written to <stage>/mask.json before any training."""
    path = os.path.join(cfg["out_dir"], stage["name"], "mask.json")
    if os.path.exists(path):
        return hft.load_mask(path)
    h = stage["hft"]
    with torch.device("meta"):
        shapes = Transformer(args)
    mask = hft.make_mask(shapes, h["granularity"], h["ratio"], cfg["seed"], idx,
                         h["train_embeddings"])
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        hft.save_mask(path, mask)
    return mask


def dpo_reference(model, examples, t, tok, device, stage_dir, name) -> torch.Tensor:
    """DPO reference log-probs: once per stage, saved beside the checkpoints, reused on resume."""
    path = os.path.join(stage_dir, "ref_logps.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    ref = reference_logps(model, examples, t, tok, device, f"{name}: reference log-probs")
    if dist.get_rank() == 0:
        with atomic_file(path, "wb") as f:
            torch.save(ref, f)
    dist.barrier()
    return ref


def trim_metrics(path: str, start: int):
    """Drop the lines of steps after the checkpoint a resumed stage continues from."""
    kept = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start]
    with atomic_file(path) as f:
        f.writelines(kept)


def train_loop(run: StageRun, tok, device) -> tuple[float, float]:
    """Steps run.start .. run.total, with metrics, checkpoints and SIGTERM. Returns (tokens
    trained on, excluding padding; seconds spent in steps)."""
    pad_id = max(tok.pad_id, 0)
    stop = lambda: all_sum(_SIGTERM["hit"]) > 0  # noqa: E731  agreed by every rank
    tokens, train_time = 0.0, 0.0
    mfile = (open(os.path.join(run.dir, "metrics.jsonl"), "a", encoding="utf-8")
             if dist.get_rank() == 0 else None)
    bar = tqdm(total=run.total, initial=run.start, desc=run.name, disable=dist.get_rank() != 0,
               dynamic_ncols=True)
    prev = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for step in range(run.start, run.total):
            out = one_step(run, step, pad_id, stop, device)
            if out is None:  # SIGTERM between micro-batches: this step is dropped, not saved
                preempt(run, step, device)
            rec, gtok, dt = out
            tokens, train_time = tokens + gtok, train_time + dt
            if mfile:
                mfile.write(json.dumps(rec) + "\n")
                mfile.flush()
            fault_injection(run.name, step + 1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{gtok / dt:.0f}")
            bar.update(1)
            done, stopping = step + 1 == run.total, stop()
            if done or stopping or (run.t["save_every"] and (step + 1) % run.t["save_every"] == 0):
                save_training_checkpoint(run.dir, step + 1, run.model, run.opt, device,
                                         run.examples.fingerprints)
            if stopping and not done:
                preempt(run, step + 1, device)
    finally:
        signal.signal(signal.SIGTERM, prev)
        bar.close()
        if mfile:
            mfile.close()
    return tokens, train_time


def one_step(run: StageRun, step: int, pad_id: int, stop, device):
    """One optimizer step. Returns (metrics record, global tokens without padding, seconds), or
    None when `stop()` interrupted it between micro-batches."""
    ts = time.time()
    t = run.t
    lr = lr_at(step, run.total, t)
    for g in run.opt.param_groups:
        g["lr"] = lr
    mb_idx = run.sampler.micro_batches(step)
    batches = [[run.examples[i] for i in m] for m in mb_idx]
    mbs = [data.collate(b, pad_id=pad_id) for b in batches]
    if run.kind == "dpo":
        ref_mbs, denom = [run.ref[m] for m in mb_idx], t["batch_size"]  # pairs in the global batch
    else:
        ref_mbs = [None] * len(mbs)
        denom = all_sum(sum(data.count_targets(b["labels"]) for b in mbs))
    out = train_step(run.model, run.trainable, mbs, run.kind, ref_mbs, denom, t, run.element_mask,
                     device, stop=stop)
    if out is None:
        return None
    loss, gn, extra = out[0].item(), out[1].item(), {k: v.item() for k, v in out[2].items()}
    if not (math.isfinite(loss) and math.isfinite(gn)):
        raise FloatingPointError(f"stage '{run.name}' step {step + 1}: non-finite "
                                 f"{'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                 f"(loss {loss}, grad_norm {gn}); nothing exported from this state")
    if run.element_mask is not None:
        run.element_mask.apply_weight_decay(lr, t["weight_decay"])
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    dt = time.time() - ts
    gtok = all_sum(sum(real_tokens(b) for b in batches))
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gn, "tokens_per_s": gtok / dt,
            **extra}, gtok, dt


def preempt(run: StageRun, step: int, device):
    """Save the state after `step` completed steps (unless that checkpoint exists) and stop."""
    ckpts = checkpoint_dirs(run.dir)
    if step > 0 and not (ckpts and ckpts[-1].endswith(f"step-{step:08d}")):
        save_training_checkpoint(run.dir, step, run.model, run.opt, device,
                                 run.examples.fingerprints)
    raise Preempted(f"SIGTERM: saved a checkpoint of stage '{run.name}' at step {step}; "
                    "run the same command again to continue" if step else
                    f"SIGTERM before the first step of stage '{run.name}' finished; "
                    "nothing to save")


def fault_injection(name: str, step: int):
    """Test hook: HFT_FAULT_AT=<stage>:<step> makes rank 0 SIGKILL itself after that step."""
    if os.environ.get("HFT_FAULT_AT") == f"{name}:{step}" and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


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


# Evaluation hooks (eval.py computes; the runner decides what and when).

def evaluate_all(cfg, model, tok, files, tcfg: dict, device) -> dict:
    """{"evals": {path: result}, "probes": {path: result}}: `model` scored on the eval entries
    `files` and on [eval] probes, its weights all-gathered once for all of them (not per token).
    `tcfg`: the [train] settings the model was built with; its compute dtype is the KV cache's."""
    e = cfg["eval"]
    kw = dict(max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"],
              max_batch_tokens=e["max_batch_tokens"], dtype=compute_dtype(tcfg, device))
    out = {"evals": {}, "probes": {}}
    with ev.gathered(model):
        for group, items in (("evals", files), ("probes", e["probes"])):
            for item in items:
                metric = None if isinstance(item, str) else item.get("metric")
                out[group][_eval_path(item)] = ev.evaluate_file(model, tok, _eval_path(item),
                                                                metric=metric, **kw)
    return out


def run(cfg: dict):
    """Every stage of the config in order, each scored after it, then the report and summary."""
    device, tok = start_run(cfg)
    out, has_evals = cfg["out_dir"], (bool(cfg["eval"]["probes"])
                                      or any(s["eval"] for s in cfg["stages"]))
    base = read_json(os.path.join(out, "base_eval.json")) if has_evals else None
    init_path = cfg["model"]["path"]
    all_stats, stage_evals = [], []
    for idx, stage in enumerate(cfg["stages"]):
        stage_dir = os.path.join(out, stage["name"])
        # finished stages are not retrained
        if os.path.exists(os.path.join(stage_dir, "done.json")):
            log(f"stage '{stage['name']}' is done ({stage_dir}/done.json); skipping")
            all_stats.append(read_json(os.path.join(stage_dir, "done.json")))
            scores = read_json(os.path.join(stage_dir, "eval.json"))
            if scores is not None:
                stage_evals.append(scores)
            init_path = stage_dir
            continue
        if has_evals and base is None:
            base = evaluate_base(cfg, init_path, tok, device)
        res = run_stage(cfg, idx, stage, init_path, tok, device)
        scores = None
        if has_evals:
            seen = [e for s in cfg["stages"][:idx + 1] for e in s["eval"]]
            scores = {"name": stage["name"], "eval_files": [_eval_path(e) for e in stage["eval"]],
                      **evaluate_all(cfg, res["model"], tok, seen, stage["train"], device)}
            stage_evals.append(scores)
        del res["model"]
        release_memory(device)  # the next stage's model must not share the GPU with this one
        finish_stage(cfg, stage, res["stats"], scores)
        all_stats.append(res["stats"])
        init_path = stage_dir
    report = None
    if dist.get_rank() == 0:
        if has_evals:
            report = ev.write_report(out, base, stage_evals)
        write_json(os.path.join(out, "summary.json"), {"stages": all_stats})
        print_summary(all_stats)
    dist.barrier()
    return report


def start_run(cfg: dict):
    """Process group, first log line, every file checked, out_dir shared and the config recorded,
    before anything is built. Returns (device, tokenizer)."""
    try:
        device = setup_distributed(cfg["train"]["device"])
    except ValueError as e:  # train.device = "cuda" without a GPU
        raise ConfigError(str(e)) from None
    check_world(cfg, dist.get_world_size())
    t0 = cfg["stages"][0]["train"]
    log(f"hft: world size {dist.get_world_size()}, backend {dist.get_backend()}, device "
        f"{describe(device)}, compute {str(compute_dtype(t0, device))[6:]} (train.precision = "
        f"{t0['precision']}), out_dir {cfg['out_dir']}")
    for s in cfg["stages"]:
        for f in [s["data"]] + [_eval_path(e) for e in s["eval"]]:
            if not os.path.isfile(f):
                raise ConfigError(f"stage '{s['name']}': file not found: {f}")
    for p in cfg["eval"]["probes"]:
        if not os.path.isfile(p):
            raise ConfigError(f"eval.probes: file not found: {p}")
    tok = data.Tokenizer(cfg["model"]["tokenizer"])
    if dist.get_rank() == 0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    check_shared_dir(cfg["out_dir"])
    record_config(cfg, cfg["out_dir"])
    torch.manual_seed(cfg["seed"])
    return device, tok


def check_world(cfg: dict, world: int):
    """Every stage's settings that depend on the world size, at start: found only when the stage
    is built, a later stage's would stop the run after the earlier stages had trained."""
    for s in cfg["stages"]:
        t, where = s["train"], f"stage '{s['name']}'"
        if world % t["replicate"]:
            raise ConfigError(f"{where}: train.replicate = {t['replicate']} does not divide the "
                              f"world size {world}")
        share = world * t["micro_batch_size"]
        if t["batch_size"] % share:
            raise ConfigError(f"{where}: train.batch_size = {t['batch_size']} is not a multiple "
                              f"of train.micro_batch_size x world size = {share}")


def evaluate_base(cfg, init_path, tok, device) -> dict:
    """The model the run starts from, scored once on every stage's eval files and the probes."""
    reader = CheckpointReader(init_path, max_seq_len=cfg["model"]["max_seq_len"])
    reader.validate()
    model = build_model(reader, cfg["stages"][0]["train"], None, device)
    files = [e for s in cfg["stages"] for e in s["eval"]]
    base = evaluate_all(cfg, model, tok, files, cfg["stages"][0]["train"], device)
    del model, reader
    release_memory(device)
    if dist.get_rank() == 0:
        write_json(os.path.join(cfg["out_dir"], "base_eval.json"), base)
    return base


def _eval_path(entry) -> str:
    return entry if isinstance(entry, str) else entry.get("path", "")


def read_json(path: str):
    """The JSON at path, or None when there is no file."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def record_config(cfg: dict, out: str):
    """Write the resolved config to <out_dir>/run_config.json. On a rerun, first warn about
    every key whose value differs from the recorded one: a warning, not an error (lowering
    micro_batch_size after running out of memory is legitimate), but never silent. Rank 0's
    work: it alone prints and writes."""
    if dist.get_rank() != 0:
        return
    path = os.path.join(out, "run_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = dict(_flatten(json.load(f)))
        new = dict(_flatten(json.loads(json.dumps(cfg))))
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "(absent)") != new.get(key, "(absent)"):
                log(f"warning: {key} = {new.get(key, '(absent)')!r} differs from "
                    f"{old.get(key, '(absent)')!r} recorded in {path} by an earlier run")
    write_json(path, cfg)


def _flatten(x, prefix=""):
    """(dotted key, value) pairs of nested dicts and of lists of dicts (stages.N.key)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        for i, v in enumerate(x):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], x


def describe(device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def release_memory(device):
    """Free a model the caller has just dropped: FSDP2 modules sit in reference cycles (hooks,
    states), which only the cycle collector frees; then give cached GPU blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_shared_dir(path: str):
    """Every rank must see out_dir: checkpoints, exports and each stage's input (the previous
    stage's export) live there, so on several nodes it must be a filesystem all of them mount.
    Rank 0 writes a token there; a rank that cannot read it back stops the run at once."""
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(path, f".shared-check-{token[0]}")
    if dist.get_rank() == 0:
        write_json(probe, token[0])
    dist.barrier()
    try:
        with open(probe, encoding="utf-8") as f:
            seen = json.load(f) == token[0]
    except OSError:
        seen = False
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"out_dir {path} is not visible from {', '.join(blind)}: on several "
                          "nodes out_dir must be on a filesystem every node mounts (checkpoints, "
                          "exports and each stage's input are read from it)")


def print_summary(stats):
    head = (f"{'stage':<16}{'kind':<6}{'steps':>7}{'wall s':>9}{'tok/s':>10}{'peak MiB':>10}"
            f"{'trainable':>13}{'optim MiB':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for s in stats:
        tp = s.get("trainable_params")
        print(f"{s['name']:<16}{s['kind']:<6}{s['steps']:>7}{s['wall_time_s']:>9.1f}"
              f"{s['tokens_per_s']:>10.0f}{s['peak_memory_bytes'] / 2**20:>10.0f}"
              f"{(tp if tp is not None else 0):>13,}{s['optimizer_state_bytes'] / 2**20:>11.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TOML file (see configs/)")
    ap.add_argument("--plan", action="store_true", help="print what each GPU of a --world-size N "
                    "run holds per stage, whether it fits, and the steps; one CPU process "
                    "(bench.py)")
    ap.add_argument("--world-size", type=int, help="--plan: GPUs of the run")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0,
                    help="--plan: memory of one GPU (A100 80GB: 80, H100 80GB: 79.6)")
    ap.add_argument("--plan-json", help="--plan: also write the plan here as JSON")
    args, overrides = ap.parse_known_args(argv)
    if args.plan:  # bench.py's planner, in its own process: bench imports train, never the reverse
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable,
                                os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "bench.py"), *argv])
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
        print(f"error (rank {dist.get_rank() if dist.is_initialized() else 0}): {e}",
              file=sys.stderr)
        code = 2
    else:
        code = 0
    if dist.is_initialized():
        if code == 0:
            dist.barrier()  # no rank tears gloo down while another still has work in flight
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    hard_exit(main())
